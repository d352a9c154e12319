"""How far back can a trained selective model carry a token? The memory horizon of each Mamba layer of a
`ssm_core.tasks` run, read from its weights on the task's own sequences.

A Mamba state (channel d, state n) evolves as h_t = exp(Delta_t,d * A_dn) h_(t-1) + ..., so across filler
tokens (those the task asks nothing about: induction's random tokens, selective copying's blanks) it keeps
exp(-|A_dn| * sum_t Delta_t,d) of what it held. Averaged over filler tokens, its time constant is

    tau_dn = 1 / (|A_dn| * mean over filler tokens of Delta_t,d)

and the slowest tau of a layer bounds how far back that layer can bring a token through filler: a model
answers at test length L only if some state keeps a usable fraction of exp(-L / tau). Selection is what
lets Delta fall on filler tokens; this measures how far it fell.

    python -m benchmarks.memory_horizon --run runs/seeds/induction/runs/mamba-lr0.001-s0

Prints, per layer, the five slowest time constants and what the slowest keeps over 2^12 .. 2^20 tokens;
writes <run>/memory_horizon.json (or --out).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import main_entry
from ssm_core.io import write_json_atomic


@dataclass
class HorizonConfig:
    run: str = ""
    length: int = 4096
    examples: int = 8
    seed: int = 0
    out: str | None = None

    def __post_init__(self):
        if not self.run:
            raise ValueError("--run: give the folder of a ssm_core.tasks run (with metrics.json and checkpoints/)")
        if self.length < 8 or self.examples < 1:
            raise ValueError("--length must be >= 8 and --examples >= 1")


def filler_mask(task: str, x):
    """True at the tokens the task asks nothing about."""
    from ssm_core.tasks import BLANK, MARKER
    if task == "selective-copy":
        return x == BLANK
    keep = x != MARKER
    keep[:, 1:] &= x[:, :-1] != MARKER          # the key right after the trigger is what must be remembered
    return keep


def layer_time_constants(mixer, h, filler):
    """(d_inner, d_state) time constants of one Mamba mixer whose input (after the block's norm) is
    h (batch, L, d_model), over the tokens where `filler` (batch, L) is True."""
    import torch.nn.functional as F
    _, _, delta, _, _ = mixer.scan_inputs(h)
    delta = F.softplus(delta + mixer.dt_proj.bias[None, :, None].to(delta.dtype))      # (b, d_inner, L)
    w = filler[:, None, :].to(delta.dtype)
    mean_delta = (delta * w).sum((0, 2)) / w.sum()
    return 1.0 / (mixer.A_log.float().exp() * mean_delta[:, None].float())


def main(cfg: HorizonConfig) -> dict:
    import torch

    from ssm_core import Mamba
    from ssm_core.tasks import BATCHES, load_run
    run = Path(cfg.run)
    model, task = load_run(run)
    x, _ = BATCHES[task.task](task, cfg.examples, torch.Generator().manual_seed(cfg.seed), seq_len=cfg.length)
    inputs: dict[int, torch.Tensor] = {}
    blocks = [b for b in model.modules() if hasattr(b, "mixer") and isinstance(b.mixer, Mamba)]
    hooks = [b.register_forward_pre_hook(lambda b, a, i=i: inputs.__setitem__(i, b.norm(a[0])))
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(x)
        for hk in hooks:
            hk.remove()
        filler = filler_mask(task.task, x)
        layers = []
        for i, b in enumerate(blocks):
            tau = layer_time_constants(b.mixer, inputs[i], filler)
            slowest = torch.topk(tau.flatten(), min(5, tau.numel())).values.tolist()
            keeps = {f"2^{k}": math.exp(-(2 ** k) / slowest[0]) for k in (12, 14, 16, 18, 20)}
            layers.append({"layer": i, "slowest_tau_tokens": slowest, "median_tau_tokens": tau.median().item(),
                           "slowest_keeps": keeps})
            print(f"layer {i}: slowest time constants {', '.join(f'{t:,.0f}' for t in slowest)} tokens "
                  f"(median {tau.median().item():,.1f}); the slowest keeps "
                  + ", ".join(f"{v:.2g} over {k}" for k, v in keeps.items()))
    result = {"run": str(run), "task": task.task, "length": cfg.length, "examples": cfg.examples, "layers": layers}
    write_json_atomic(Path(cfg.out) if cfg.out else run / "memory_horizon.json", result)
    return result


if __name__ == "__main__":
    main_entry(main, HorizonConfig, "python -m benchmarks.memory_horizon")
