"""Genomics data pipeline throughput: FASTA windows -> token batches through the DataLoader workers.

Builds a FASTA of --mb megabases (the demo genome's contigs tiled, so windows are real sequence with
N runs and soft-masking), then times `WindowBatches` behind a DataLoader as pretraining uses it (random
offsets, N filter, RC augmentation, causal targets) for several worker counts and batch shapes.

    python benchmarks/genomics_dataloader.py --mb 200 --workers 0 4 8 --out dataloader.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genomics.data import Genome, StepRange, WindowBatches, WindowSampler
from genomics.demo import demo_genome, write_fasta


def big_fasta(folder: Path, mb: int) -> Path:
    path = folder / f"tiled_{mb}mb.fa"
    if path.is_file():
        return path
    demo = Genome.open([demo_genome(folder / "demo")])
    seqs = [demo.fetch(i, 0, c.length).tobytes() for i, c in enumerate(demo.contigs)]
    unit = b"".join(seqs)
    per = mb * 1_000_000 // 8
    records = [(f"chr{k + 1}", (unit * (per // len(unit) + 1))[k * 7919:k * 7919 + per]) for k in range(8)]
    return write_fasta(path, records)


def time_loader(genome: Genome, batch: int, seq_len: int, workers: int, n_batches: int) -> dict:
    intervals = [(i, 0, c.length) for i, c in enumerate(genome.contigs)]
    ds = WindowBatches(WindowSampler(genome, intervals, "train", 0, max_n_frac=0.1), batch, seq_len,
                       rc_augment=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, sampler=StepRange(0, n_batches + 2),
                                         num_workers=workers, prefetch_factor=4 if workers else None)
    it = iter(loader)
    next(it), next(it)                    # workers started and warm
    t = time.perf_counter()
    tokens = sum(b["input_ids"].numel() for b in it)
    dt = time.perf_counter() - t
    return {"batch": batch, "seq_len": seq_len, "workers": workers, "tokens_per_s": round(tokens / dt),
            "batches": n_batches}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--folder", default="/tmp/genomics_bench")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 4, 8])
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--out", default="dataloader.json")
    args = ap.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    genome = Genome.open([big_fasta(folder, args.mb)])
    print(f"FASTA {sum(c.length for c in genome.contigs) / 1e6:.0f} Mb ready in {time.perf_counter() - t:.1f}s")
    rows = []
    for batch, seq_len in ((1024, 1024), (8, 131072)):     # 1M-token batches: short and long context
        for w in args.workers:
            r = time_loader(genome, batch, seq_len, w, args.batches)
            rows.append(r)
            print(json.dumps(r), flush=True)
            Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
