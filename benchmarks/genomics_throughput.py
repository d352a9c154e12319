"""Genomics training throughput: our MambaLM vs the official mamba_ssm anchor, same shapes, same loop.

Runs `anchor_lm.benchmark()` (../shared/bench/anchor_lm.py, copied to .bench/) around four models of the
released Caduceus size (d_model 256, 16 layers, vocab 12), shape by shape so each ratio is measured side by
side: the anchor (official fast-path blocks), our causal `MambaLM`, our RC-equivariant `MambaLM`
(Caduceus-PS parameter sharing) and `ours_bf16res`, the causal one with `residual_in_fp32=False` (the
anchor's setting: its residual stream is bf16 like the rest of the cast model; ours keeps it in float32).
Full training steps: forward, cross-entropy, backward, AdamW, bf16.

    mkdir -p .bench && cp -r ../shared/bench/* .bench/
    python benchmarks/genomics_throughput.py --out genomics_throughput.json      # on a GPU
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

from genomics import tokenizer as tok
from ssm_core import MambaConfig, MambaLM


def ours(rc: bool, residual_in_fp32: bool = True):
    def make(ckpt: bool):
        return MambaLM(MambaConfig(d_model=256, n_layer=16, vocab_size=tok.VOCAB_SIZE, d_state=16, expand=2,
                                   rc_equivariant=rc, complement_map=tok.complement_map() if rc else None,
                                   gradient_checkpointing=ckpt, residual_in_fp32=residual_in_fp32))
    return make


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench-dir", default=str(REPO / ".bench"), help="folder holding anchor_lm.py")
    ap.add_argument("--out", default="genomics_throughput.json")
    ap.add_argument("--models", nargs="+", default=["anchor", "ours", "ours_rc", "ours_bf16res"])
    ap.add_argument("--max-shape-index", type=int, default=99, help="stop after this many shapes")
    args = ap.parse_args()
    sys.path.insert(0, args.bench_dir)
    import anchor_lm

    makers = {"anchor": anchor_lm.make_anchor, "ours": ours(False), "ours_rc": ours(True),
              "ours_bf16res": ours(False, residual_in_fp32=False)}
    rows = []
    for shape in anchor_lm.SHAPES[:args.max_shape_index]:
        for name in args.models:
            t = time.perf_counter()
            (r,) = anchor_lm.benchmark(make_model=makers[name], shapes=[shape])
            r.update(model=name, wall_s=round(time.perf_counter() - t, 1))
            rows.append(r)
            print(json.dumps(r), flush=True)
            Path(args.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"\n{'B':>4} {'L':>8} {'ckpt':>5} | " + " | ".join(f"{m:>22}" for m in args.models) + " | ours/anchor  rc/anchor  bf16res/anchor")
    for shape in anchor_lm.SHAPES[:args.max_shape_index]:
        by = {r["model"]: r for r in rows if (r["B"], r["L"], r["checkpointing"]) == shape}
        cells = [f"{by[m].get('tokens_per_s', 'OOM'):>10} t/s {by[m].get('peak_GiB', '-'):>5} GiB" for m in args.models]
        def ratio(m, by=by):
            ok = "tokens_per_s" in by.get(m, {}) and "tokens_per_s" in by.get("anchor", {})
            return f"{by[m]['tokens_per_s'] / by['anchor']['tokens_per_s']:.2f}x" if ok else "-"
        print(f"{shape[0]:>4} {shape[1]:>8} {shape[2]!s:>5} | " + " | ".join(cells)
              + f" | {ratio('ours'):>10} {ratio('ours_rc'):>9} {ratio('ours_bf16res'):>14}")


if __name__ == "__main__":
    main()
