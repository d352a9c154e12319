"""What embed / evaluate / probe share: loading a trained model and turning sequences into pooled embeddings."""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ssm_core import MambaLM
from ssm_core.cli import UserError
from ssm_core.interop import WEIGHT_FILES

from . import tokenizer as tok


def resolve_model_dir(path: str) -> Path:
    """--checkpoint may name a pretrain output folder, its model/ folder, or a mamba_ssm MambaLMHeadModel
    folder (config.json + pytorch_model.bin or model.safetensors)."""
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / "config.json").is_file() and any((cand / w).is_file() for w in WEIGHT_FILES):
            return cand
    if not p.exists():
        raise UserError(f"--checkpoint {path}: no such file or folder")
    raise UserError(f"--checkpoint {path}: no trained model here (expected model/config.json and "
                    "model.safetensors, as written by genomics.pretrain, or a mamba_ssm folder with "
                    "config.json and pytorch_model.bin)")


def load_model(path: str, device: str = "auto") -> tuple[MambaLM, dict, torch.device]:
    """(model in eval mode, genomics.json metadata, device)."""
    d = resolve_model_dir(path)
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    try:
        model = MambaLM.from_pretrained(d, map_location=str(dev))
    except (ValueError, RuntimeError, OSError) as e:
        raise UserError(f"--checkpoint {path}: cannot load the model ({str(e).splitlines()[0]})") from None
    meta_path = d / "genomics.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return model.eval().to(dev), meta, dev


def chunks(ids: np.ndarray, window: int) -> list[np.ndarray]:
    """A long sequence as consecutive windows (the last one shorter)."""
    return [ids[i:i + window] for i in range(0, max(1, len(ids)), window)]


@torch.no_grad()
def embed_sequences(model: MambaLM, seqs: Iterable[np.ndarray], device: torch.device, window: int = 2048,
                    batch_size: int = 32, both_strands: bool | None = None,
                    autocast: bool = True) -> Iterator[np.ndarray]:
    """Yield one mean-pooled embedding (d_model,) per token sequence, in order.

    Long sequences are cut into windows of `window` tokens and pooled as a length-weighted mean, so memory
    stays constant whatever the record length; windows of equal length are batched together. N positions
    are left out of the mean. For RC-equivariant models (default) both strands are embedded and averaged:
    the result is then identical for a sequence and its reverse complement."""
    if both_strands is None:
        both_strands = bool(model.config.rc_equivariant)
    use_amp = autocast and device.type == "cuda"
    pending: list[tuple[int, np.ndarray]] = []   # (position in this group, window) of whole sequences
    n_seqs = 0

    def flush():
        # Windows of equal length go through the model together; results are summed back per sequence.
        sums, counts = np.zeros((n_seqs, model.config.d_model)), np.zeros(n_seqs)
        by_len: dict[int, list[tuple[int, np.ndarray]]] = {}
        for k, w in pending:
            by_len.setdefault(len(w), []).append((k, w))
        for items in by_len.values():
            for i in range(0, len(items), batch_size):
                part = items[i:i + batch_size]
                x = np.stack([w for _, w in part])
                h, c = _pooled(model, x, device, use_amp)
                if both_strands:
                    h = 0.5 * (h + _pooled(model, tok.reverse_complement(x), device, use_amp)[0])
                idx = np.array([k for k, _ in part])
                np.add.at(sums, idx, h)
                np.add.at(counts, idx, c)
        pending.clear()
        return sums / np.maximum(counts, 1.0)[:, None]

    for ids in seqs:
        pending.extend((n_seqs, w) for w in chunks(ids, window))
        n_seqs += 1
        if len(pending) >= batch_size * 4:
            yield from flush()
            n_seqs = 0
    if n_seqs:
        yield from flush()


def _pooled(model: MambaLM, x: np.ndarray, device: torch.device, use_amp: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sum of hidden states over non-N positions (batch, d) and their count (batch,)."""
    ids = torch.from_numpy(np.ascontiguousarray(x)).to(device).long()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
        h = model.backbone(ids).float()
    keep = (tok.unmask(x) != tok.N)
    keep_t = torch.from_numpy(keep).to(device).float().unsqueeze(-1)
    return (h * keep_t).sum(1).cpu().numpy(), keep.sum(1).astype(np.float64)


# --- streaming: whole contigs with the state carried across chunks ------------------------------------------
def check_streamable(model: MambaLM, flag: str = "--stream") -> None:
    if not model.config.streamable:
        raise UserError(f"{flag}: this model is bidirectional / RC-equivariant and sees the future of the "
                        "sequence, so it cannot stream; use windows (drop --stream)")


def genome_chunks(genome, contig: int, start: int, end: int, chunk: int, softmask: bool) -> Iterator[np.ndarray]:
    """Token ids of contig[start:end] as consecutive chunks of `chunk` bases, read from the FASTA one chunk
    at a time (memory does not grow with the contig)."""
    for s in range(start, end, chunk):
        yield tok.encode_bytes(genome.fetch(contig, s, min(end, s + chunk)), softmask)


@torch.no_grad()
def stream_hidden(model: MambaLM, chunks: Iterable[np.ndarray], device: torch.device,
                  autocast: bool = True) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """(chunk ids, hidden states (T, d_model)) for consecutive chunks of one sequence: `MambaModel.stream`
    carries the recurrent state from chunk to chunk, so every position sees the whole sequence to its left
    and the result equals one forward pass over the concatenation (up to float rounding), in memory set by
    the chunk length alone."""
    check_streamable(model)
    state = model.init_state(1, device=device)
    use_amp = autocast and device.type == "cuda"
    for ids in chunks:
        x = torch.from_numpy(np.ascontiguousarray(ids)[None]).to(device).long()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            h, state = model.backbone.stream(x, state)
        yield ids, h[0]


def stream_embedding(model: MambaLM, chunks: Iterable[np.ndarray], device: torch.device) -> np.ndarray:
    """Mean of the streamed hidden states over the non-N positions of one sequence (d_model,)."""
    total, count = None, 0.0
    for ids, h in stream_hidden(model, chunks, device):
        keep = torch.from_numpy(tok.unmask(ids) != tok.N).to(h.device)
        s = (h.float() * keep[:, None]).sum(0)
        total = s if total is None else total + s
        count += float(keep.sum())
    return (total / max(count, 1.0)).cpu().numpy()


def peak_memory_gib(device: torch.device) -> float:
    """Peak GPU memory allocated by this process (CUDA), else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux
