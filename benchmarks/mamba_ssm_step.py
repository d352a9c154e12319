"""One selective-copying training step of our two-layer Mamba LM against the same LM built from the official
mamba_ssm `Mamba` block (on CUDA its fast path: causal-conv1d and the fused CUDA scan; on the CPU its
pure-PyTorch path), on identical weights and batch: the loss and every parameter's gradient, as relative
differences ||ours - theirs|| / ||theirs||. If our Mamba-1 trained differently from the paper's, it would show here.

    python -m benchmarks.mamba_ssm_step --device cuda --seq-len 4096 --anchor-dir .bench --out $OUT/step.json
    python -m benchmarks.mamba_ssm_step --device cpu --seq-len 64 --anchor-dir ../shared/bench

Needs ../shared/bench copied to --anchor-dir (see ../shared/bench/README.md); a benchmark, never a dependency.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm_core.cli import UserError, main_entry
from ssm_core.io import write_json_atomic


@dataclass
class StepConfig:
    seq_len: int = 4096
    n_memorize: int = 16
    n_tokens: int = 16
    d_model: int = 64
    n_layer: int = 2
    batch_size: int = 8
    seed: int = 0
    device: str = "cuda"
    anchor_dir: str = ".bench"
    out: str | None = None


def reference_lm(ref, ours):
    """Our LM's architecture from mamba_ssm's Mamba block (pre-norm residual blocks, fp32 residual, final
    RMSNorm, head tied to the embedding), loaded with our LM's weights."""
    import torch.nn as nn
    cfg = ours.config

    class RefLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
            self.mixers = nn.ModuleList(ref.Mamba(cfg.d_model, d_state=cfg.d_state, layer_idx=i)
                                        for i in range(cfg.n_layer))
            self.norms = nn.ModuleList(nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_layer))
            self.norm_f = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

        def forward(self, x):
            r = self.embedding(x)
            for norm, mixer in zip(self.norms, self.mixers):
                r = r + mixer(norm(r))
            return self.norm_f(r) @ self.embedding.weight.t()

    theirs = RefLM()
    names = {"embedding.weight": "backbone.embedding.weight", "norm_f.weight": "backbone.norm_f.weight"}
    for i in range(cfg.n_layer):
        names[f"norms.{i}.weight"] = f"backbone.layers.{i}.norm.weight"
        for k in theirs.mixers[i].state_dict():
            names[f"mixers.{i}.{k}"] = f"backbone.layers.{i}.mixer.{k}"
    sd = ours.state_dict()
    theirs.load_state_dict({k: sd[v] for k, v in names.items()}, strict=True)
    return theirs, names


def main(cfg: StepConfig) -> dict:
    import torch
    import torch.nn.functional as F

    from ssm_core import MambaConfig
    from ssm_core.model import MambaLM
    from ssm_core.tasks import TaskConfig, selective_copy_batch
    anchor = Path(cfg.anchor_dir)
    if not (anchor / "mamba_reference.py").is_file():
        raise UserError(f"--anchor-dir {anchor}: no mamba_reference.py there (copy ../shared/bench into it)")
    sys.path.insert(0, str(anchor.resolve()))
    import mamba_reference
    ref = mamba_reference.load() if cfg.device == "cuda" else mamba_reference.load_cpu()
    torch.manual_seed(cfg.seed)
    task = TaskConfig(seq_len=cfg.seq_len, n_memorize=cfg.n_memorize, n_tokens=cfg.n_tokens)
    ours = MambaLM(MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=task.vocab_size))
    theirs, names = reference_lm(ref, ours)
    ours, theirs = ours.to(cfg.device), theirs.to(cfg.device)
    x, y = (t.to(cfg.device) for t in selective_copy_batch(task, cfg.batch_size, torch.Generator().manual_seed(cfg.seed)))
    losses = {}
    for name, model in (("ours", ours), ("mamba_ssm", theirs)):
        logits = model(x)
        losses[name] = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        losses[name].backward()
    mine = dict(ours.named_parameters())
    grads = {}
    for k, p in theirs.named_parameters():
        g, mg = p.grad.double(), mine[names[k]].grad.double()
        grads[names[k]] = (mg - g).norm().item() / max(g.norm().item(), 1e-30)
    result = {"device": torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu", "config": vars(cfg),
              "loss": {k: v.item() for k, v in losses.items()},
              "loss_rel_diff": abs(losses["ours"].item() - losses["mamba_ssm"].item()) / losses["mamba_ssm"].item(),
              "grad_rel_diff": grads, "max_grad_rel_diff": max(grads.values())}
    print(f"loss ours {result['loss']['ours']:.6f}, mamba_ssm {result['loss']['mamba_ssm']:.6f}; largest gradient "
          f"relative difference {result['max_grad_rel_diff']:.2e} ({max(grads, key=grads.get)})")
    if cfg.out:
        write_json_atomic(cfg.out, result)
    return result


if __name__ == "__main__":
    main_entry(main, StepConfig, "python -m benchmarks.mamba_ssm_step")
