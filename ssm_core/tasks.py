"""Synthetic tasks that show why selection matters (Mamba paper, section 3.1).

* selective-copy: `n_memorize` data tokens sit at random positions among blanks; after the sequence,
  `n_memorize` marker tokens ask for them back in order. Where the tokens are varies per example, so a
  time-invariant (LTI) SSM, whose filter is the same for every input, cannot pick them out; a selective one
  can, by letting Delta, B, C depend on the token.
* induction: random tokens with a trigger token followed by a key somewhere; the sequence ends with the
  trigger again and the model must recall the key (associative recall).

    python -m ssm_core.tasks selective-copy --steps 1500
    python -m ssm_core.tasks selective-copy --model.selective false   # the LTI ablation
    python -m ssm_core.tasks induction --model.mixer mamba2 --output-dir runs/induction

Token ids: 0 blank, 1 marker/trigger, 2.. data tokens.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .cli import UserError, config_dict, main_entry
from .io import write_json_atomic
from .model import MambaConfig, MambaLM
from .training import OptimConfig, make_optimizer

BLANK, MARKER, FIRST_DATA = 0, 1, 2


@dataclass
class TaskConfig:
    task: Literal["selective-copy", "induction"] = "selective-copy"
    seq_len: int = field(default=16, metadata={"help": "length of the region holding the data tokens"})
    n_memorize: int = 2
    n_tokens: int = field(default=4, metadata={"help": "number of distinct data tokens"})
    # `--model.selective false` makes the SSM time-invariant (LTI); the vocabulary follows from --n-tokens.
    model: MambaConfig = field(default_factory=lambda: MambaConfig(
        d_model=32, n_layer=2, d_state=16, vocab_size=FIRST_DATA + 4))
    # warmup_steps 0: a twentieth of --steps.
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-2, grad_clip=1.0))
    steps: int = 1500
    batch_size: int = 32
    seed: int = 0
    eval_examples: int = 1024
    device: str = field(default="cpu", metadata={"help": "cpu, cuda, or auto (cuda when available)"})
    output_dir: str | None = field(default=None, metadata={"help": "write metrics.json here"})
    progress: bool = True

    DERIVED = {"model.vocab_size": "--n-tokens", "model.d_input": "token input",
               "model.complement_map": "token input (not DNA)"}

    @classmethod
    def derive(cls, values: dict) -> dict:
        return {"model.vocab_size": FIRST_DATA + int(values.get("n_tokens", 4)), "model.d_input": None,
                "model.complement_map": None}

    def __post_init__(self):
        if self.n_memorize < 1 or self.n_memorize > self.seq_len:
            raise ValueError(f"--n-memorize: must be in [1, --seq-len={self.seq_len}], got {self.n_memorize}")
        if self.task == "induction" and self.seq_len < 4:
            raise ValueError("--seq-len: induction needs at least 4 positions")
        for name in ("n_tokens", "steps", "batch_size", "eval_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
        if self.model.vocab_size != self.vocab_size:
            self.model = dataclasses.replace(self.model, vocab_size=self.vocab_size)
        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"--device: expected cpu, cuda or auto, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available")

    @property
    def vocab_size(self) -> int:
        return FIRST_DATA + self.n_tokens


def selective_copy_batch(cfg: TaskConfig, batch: int, gen: torch.Generator):
    """Returns (inputs (b, L), targets (b, L) with -100 where no answer is asked)."""
    L, k = cfg.seq_len, cfg.n_memorize
    data = torch.randint(FIRST_DATA, cfg.vocab_size, (batch, k), generator=gen)
    pos = torch.rand(batch, L, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values
    region = torch.full((batch, L), BLANK, dtype=torch.long).scatter_(1, pos, data)
    x = torch.cat([region, torch.full((batch, k), MARKER, dtype=torch.long)], dim=1)
    y = torch.full_like(x, -100)
    y[:, L:] = data  # at the j-th marker, answer the j-th data token
    return x, y


def induction_batch(cfg: TaskConfig, batch: int, gen: torch.Generator):
    L = cfg.seq_len
    x = torch.randint(FIRST_DATA, cfg.vocab_size, (batch, L), generator=gen)
    p = torch.randint(0, L - 3, (batch,), generator=gen)
    rows = torch.arange(batch)
    key = x[rows, p + 1]
    x[rows, p] = MARKER
    x[:, -1] = MARKER
    y = torch.full_like(x, -100)
    y[:, -1] = key
    return x, y


BATCHES = {"selective-copy": selective_copy_batch, "induction": induction_batch}


def build_model(cfg: TaskConfig) -> MambaLM:
    return MambaLM(cfg.model)


@torch.no_grad()
def evaluate(model: MambaLM, cfg: TaskConfig, seed: int = 1234) -> dict:
    """Token accuracy over the answer positions, and the fraction of examples answered entirely right."""
    gen = torch.Generator().manual_seed(seed)
    model.eval()
    correct = total = exact = n = 0
    for start in range(0, cfg.eval_examples, cfg.batch_size):
        b = min(cfg.batch_size, cfg.eval_examples - start)
        x, y = (t.to(cfg.device) for t in BATCHES[cfg.task](cfg, b, gen))
        pred = model(x).argmax(-1)
        mask = y != -100
        hit = (pred == y) & mask
        correct += hit.sum().item()
        total += mask.sum().item()
        exact += (hit.sum(1) == mask.sum(1)).sum().item()
        n += b
    model.train()
    return {"accuracy": correct / total, "exact_match": exact / n}


def train(cfg: TaskConfig) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg).to(cfg.device)
    opt, sched, _ = make_optimizer(model, cfg.optim, cfg.steps, cfg.optim.warmup_steps or max(1, cfg.steps // 20))
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, desc=f"{cfg.task} [{describe(cfg)}]",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    loss_ema = None
    for _ in range(cfg.steps):
        x, y = (t.to(cfg.device) for t in BATCHES[cfg.task](cfg, cfg.batch_size, gen))
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        sched.step()
        loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    if bar is not None:
        bar.close()
    metrics = evaluate(model, cfg)
    metrics.update(final_train_loss=loss_ema, train_seconds=round(time.perf_counter() - t0, 1),
                   params=sum(p.numel() for p in model.parameters()), config=config_dict(cfg),
                   chance_accuracy=1.0 / cfg.n_tokens)
    return metrics


def describe(cfg: TaskConfig) -> str:
    mixers = cfg.model.layer_mixers()
    return ",".join(dict.fromkeys(mixers)) + ("" if cfg.model.selective else ", LTI")


def main(cfg: TaskConfig) -> dict:
    metrics = train(cfg)
    print(f"{cfg.task} mixer={describe(cfg)} params={metrics['params']}: accuracy "
          f"{metrics['accuracy']:.3f}, exact match {metrics['exact_match']:.3f} "
          f"(chance {metrics['chance_accuracy']:.3f}) in {metrics['train_seconds']} s")
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        try:
            write_json_atomic(out / "metrics.json", metrics)
        except OSError as e:
            raise UserError(f"--output-dir {out}: cannot write metrics.json ({e.strerror or e})") from None
    return metrics


def _argv_with_task(argv: list[str]) -> list[str]:
    # `python -m ssm_core.tasks selective-copy ...`: the task is a positional word.
    if argv and not argv[0].startswith("-"):
        return ["--task", argv[0], *argv[1:]]
    return argv


if __name__ == "__main__":
    sys.argv[1:] = _argv_with_task(sys.argv[1:])
    main_entry(main, TaskConfig, prog="python -m ssm_core.tasks",
               description="Selective copying / induction heads: selective vs time-invariant SSMs.")
