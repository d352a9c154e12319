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
