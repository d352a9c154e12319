"""Inference-time spectrum scaling of a trained induction-heads model: multiply the A of chosen Mamba layers
by s (slower decay everywhere in them), then measure answer accuracy at longer test lengths, streamed. A
training-free lever from the length-extension literature (DeciMamba, "Mamba Modulation"), tried here on the
models of docs/seeds.md section 3.

    python -m benchmarks.induction_a_scale --run runs/seeds/induction/runs/mamba-lr0.001-s0 \
        --scales 1 0.5 0.25 --layers 0 --lengths 256 4096 16384 65536 --examples 16
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ssm_core import Mamba, MambaConfig, MambaLM
from ssm_core.tasks import BATCHES, TaskConfig, last_logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a finished ssm_core.tasks induction run folder")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="Mamba layers to scale (default: all)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 4096, 16384, 65536])
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Path(args.run)
    saved = json.loads((run / "metrics.json").read_text())["config"]
    model_cfg = MambaConfig.from_dict({**saved["model"], **{k.removeprefix("model."): v for k, v in
                                                           TaskConfig.derive(saved).items()}})
    task = TaskConfig(**{k: v for k, v in saved.items() if k not in ("model", "optim", "device")},
                      model=model_cfg, device="cpu")
    weights = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["model"]
    model = MambaLM(model_cfg).eval()
    rows = []
    for s in args.scales:
        model.load_state_dict(weights)
        mambas = [m for m in model.modules() if isinstance(m, Mamba)]
        with torch.no_grad():
            for i in args.layers if args.layers is not None else range(len(mambas)):
                mambas[i].A_log.add_(math.log(s))      # A = -exp(A_log): |A| times s
        acc = []
        for L in args.lengths:
            gen = torch.Generator().manual_seed(4321 + L)   # the examples of ssm_core.tasks' evaluation
            correct = done = 0
            while done < args.examples:
                b = min(args.examples - done, max(1, (1 << 18) // L))
                x, y = BATCHES[task.task](task, b, gen, seq_len=L)
                with torch.no_grad():
                    correct += (last_logits(model, x, "stream", 8192).argmax(-1) == y[:, -1:]).sum().item()
                done += b
            acc.append(correct / done)
        rows.append({"scale": s, "accuracy": dict(zip(map(str, args.lengths), acc))})
        print(f"A x {s:g} (layers {args.layers if args.layers is not None else 'all'}): "
              + ", ".join(f"{L}: {a:.3f}" for L, a in zip(args.lengths, acc)), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"run": str(run), "layers": args.layers, "examples": args.examples,
                                              "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
