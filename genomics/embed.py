"""Embeddings of FASTA records or BED regions from a pretrained DNA model.

    python -m genomics.embed --checkpoint runs/genomics --fasta genes.fa --output genes.npy
    python -m genomics.embed --checkpoint runs/genomics --fasta hg38.fa --bed peaks.bed --output peaks.parquet

One mean-pooled vector (d_model) per record/region. `.npy` writes a float32 (n, d_model) array plus
`<output>.ids.tsv` naming the rows; `.parquet` writes one row per sequence (name, contig, start, end, embedding).
Long sequences are processed in windows (constant memory), batched; RC-equivariant models average both strands.
With --stream (causal models) each sequence instead goes through the model once, in chunks of --window
bases with the state carried across them (`MambaModel.stream`): every position sees the whole sequence to
its left, memory stays flat however long the record (a 100 Mb chromosome), and the embedding equals that
of a single window covering the whole sequence.

    python -m genomics.embed --checkpoint runs/genomics --fasta chr1.fa --stream --window 65536 --output chr1.npy
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ssm_core.cli import UserError, main_entry
from ssm_core.io import atomic_path, write_text_atomic
from ssm_core.training import prepare_output_dir

from . import tokenizer as tok
from .common import check_streamable, embed_sequences, genome_chunks, load_model, stream_embedding
from .data import Genome


@dataclass
class EmbedConfig:
    checkpoint: str = field(default="runs/genomics", metadata={"help": "genomics.pretrain output folder (or its model/)"})
    fasta: list[str] = field(default_factory=list, metadata={"help": "FASTA file(s) whose records to embed"})
    bed: str | None = field(default=None, metadata={"help": "embed these regions (chrom start end [name]) instead"})
    output: str = field(default="embeddings.npy", metadata={"help": ".npy (+ .ids.tsv) or .parquet"})
    window: int = field(default=2048, metadata={"help": "tokens per forward pass; longer sequences are pooled"})
    batch_size: int = 32
    device: str = "auto"
    cache_dir: str | None = None
    stream: bool = field(default=False, metadata={"help": "carry the state across windows (full left context)"})

    def __post_init__(self):
        if not self.fasta:
            raise ValueError("--fasta: give the FASTA file(s) to embed")
        if Path(self.output).suffix not in (".npy", ".parquet"):
            raise ValueError(f"--output {self.output}: must end in .npy or .parquet")
        if self.window < 1 or self.batch_size < 1:
            raise ValueError("--window and --batch-size must be >= 1")


def regions(genome: Genome, bed: str | None) -> list[tuple[str, int, int, int, str]]:
    """(name, contig index, start, end, contig name) of every sequence to embed."""
    if bed is None:
        return [(c.name, i, 0, c.length, c.name) for i, c in enumerate(genome.contigs)]
    p = Path(bed)
    if not p.is_file():
        raise UserError(f"--bed {bed}: no such file")
    out = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip() or line.startswith(("#", "track", "browser")):
            continue
        cols = line.split()
        if len(cols) < 3:
            raise UserError(f"--bed {bed}:{n}: expected chrom, start, end [name]")
        i = genome.index_of(cols[0])
        if i is None:
            raise UserError(f"--bed {bed}:{n}: contig {cols[0]!r} is not in the FASTA")
        try:
            s, e = int(cols[1]), int(cols[2])
        except ValueError:
            raise UserError(f"--bed {bed}:{n}: start/end must be integers") from None
        if not 0 <= s < e <= genome.contigs[i].length:
            raise UserError(f"--bed {bed}:{n}: interval {s}-{e} outside {cols[0]} (length {genome.contigs[i].length})")
        out.append((cols[3] if len(cols) > 3 else f"{cols[0]}:{s}-{e}", i, s, e, cols[0]))
    if not out:
        raise UserError(f"--bed {bed}: no intervals")
    return out


def main(cfg: EmbedConfig) -> Path:
    out = Path(cfg.output)
    prepare_output_dir(out.parent if str(out.parent) else ".", flag="--output")
    model, meta, device = load_model(cfg.checkpoint, cfg.device)
    genome = Genome.open(cfg.fasta, cfg.cache_dir)
    todo = regions(genome, cfg.bed)
    softmask = bool(meta.get("keep_softmask", False))

    def token_streams() -> Iterator[np.ndarray]:
        for _, i, s, e, _ in todo:
            yield tok.encode_bytes(genome.fetch(i, s, e), softmask)

    def streamed() -> Iterator[np.ndarray]:
        for _, i, s, e, _ in todo:
            yield stream_embedding(model, genome_chunks(genome, i, s, e, cfg.window, softmask), device)

    from tqdm import tqdm
    if cfg.stream:
        check_streamable(model)
    it = streamed() if cfg.stream else embed_sequences(model, token_streams(), device, cfg.window, cfg.batch_size)
    embs = np.stack(list(tqdm(it, total=len(todo), desc="embed", unit="seq"))).astype(np.float32)
    if out.suffix == ".npy":
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, embs)
        write_text_atomic(str(out) + ".ids.tsv", "name\tcontig\tstart\tend\n" + "".join(
            f"{name}\t{cname}\t{s}\t{e}\n" for name, _, s, e, cname in todo))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.table({"name": [t[0] for t in todo], "contig": [t[4] for t in todo],
                          "start": [t[2] for t in todo], "end": [t[3] for t in todo],
                          "embedding": list(embs)})
        with atomic_path(out) as tmp:
            pq.write_table(table, tmp)
    print(f"{len(todo)} embeddings of size {embs.shape[1]} -> {out}")
    return out


if __name__ == "__main__":
    main_entry(main, EmbedConfig, "python -m genomics.embed", description=__doc__.split("\n\n")[0])
