"""Inference-time spectrum scaling of a trained induction-heads model: multiply the A of chosen Mamba layers
by s (slower decay everywhere in them), then measure answer accuracy at longer test lengths, streamed. A
training-free lever from the length-extension literature (DeciMamba, "Mamba Modulation"), tried here on the
models of docs/seeds.md section 3.

    python -m benchmarks.induction_a_scale --run runs/seeds/induction/runs/mamba-lr0.001-s0 \
        --scales 1 0.5 0.25 --layers 0 --lengths 256 4096 16384 65536 --examples 16
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

from ssm_core import Mamba
from ssm_core.tasks import evaluate_lengths, load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished ssm_core.tasks induction run folder")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="Mamba layers to scale (default: all)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 4096, 16384, 65536])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model, task = load_run(args.run)
    # ssm_core.tasks' own evaluation at the test lengths, streamed (8,192-token chunks, state carried over)
    task = dataclasses.replace(task, eval_lengths=args.lengths, eval_mode=["stream"], stream_chunk=8192,
                               eval_length_examples=args.examples, eval_tokens_per_batch=1 << 18, progress=False)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    for s in args.scales:
        model.load_state_dict(weights)
        mambas = [m for m in model.modules() if isinstance(m, Mamba)]
        with torch.no_grad():
            for i in args.layers if args.layers is not None else range(len(mambas)):
                mambas[i].A_log.add_(math.log(s))      # A = -exp(A_log): |A| times s
        acc = [row["accuracy"] for row in evaluate_lengths(model, task)]
        rows.append({"scale": s, "accuracy": dict(zip(map(str, args.lengths), acc))})
        print(f"A x {s:g} (layers {args.layers if args.layers is not None else 'all'}): "
              + ", ".join(f"{L}: {a:.3f}" for L, a in zip(args.lengths, acc)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"run": args.run, "layers": args.layers, "examples": args.examples,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
