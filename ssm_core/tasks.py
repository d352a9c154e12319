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
    python -m ssm_core.tasks induction --output-dir runs/ih --eval-lengths 256 4096 1048576 --eval-mode stream
    python -m ssm_core.tasks induction --init-from runs/ih/checkpoints/last.ckpt --initial-state passed --steps 500

With --output-dir a run keeps checkpoints/last.ckpt (every --checkpoint-every steps, at --time-limit and on
Ctrl-C) and `--resume` continues it exactly (model, optimiser, schedule, data stream). --time-limit stops a
long training in time to be continued by the next command. --eval-lengths evaluates an induction model at
other lengths than it was trained at, over the whole sequence at once (`fused`) or chunk by chunk with the
recurrent state carried over (`stream`: memory bounded by --stream-chunk whatever the length).
--initial-state passed trains every batch from the previous batch's final state (state passing).

Token ids: 0 blank, 1 marker/trigger, 2.. data tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .cli import UserError, config_dict, main_entry
from .io import atomic_path, write_json_atomic
from .model import MambaConfig, MambaLM
from .run_dir import prepare_run_dir
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
    output_dir: str | None = field(default=None, metadata={
        "help": "write metrics.json and checkpoints/last.ckpt here"})
    resume: bool = field(default=False, metadata={"help": "continue from <output-dir>/checkpoints/last.ckpt"})
    overwrite: bool = field(default=False, metadata={
        "help": "replace the earlier run in --output-dir (only its own files are removed)"})
    checkpoint_every: int = field(default=500, metadata={"help": "save checkpoints/last.ckpt every this many steps"})
    time_limit: float | None = field(default=None, metadata={
        "help": "minutes: stop training after this long, checkpoint saved, to continue with --resume"})
    eval_lengths: list[int] = field(default_factory=list, metadata={
        "help": "also evaluate at these --seq-len values (extrapolation beyond the training length)"})
    eval_mode: list[Literal["fused", "stream"]] = field(default_factory=lambda: ["fused"], metadata={
        "help": "for --eval-lengths: fused (whole sequence in one call) and/or stream (chunks, state carried)"})
    eval_length_examples: int = field(default=64, metadata={"help": "examples per --eval-lengths entry"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from the weights of this checkpoint (a run's checkpoints/last.ckpt, e.g. one trained "
                "at a shorter --seq-len), with a new optimiser and schedule"})
    stream_chunk: int = field(default=65536, metadata={"help": "tokens per chunk of --eval-mode stream"})
    eval_tokens_per_batch: int = field(default=1 << 20, metadata={
        "help": "--eval-lengths: at most this many tokens per batch (bounds fused mode's memory at long lengths)"})
    initial_state: Literal["zero", "passed"] = field(default="zero", metadata={
        "help": "the state each training sequence starts from: zero, or passed (the final state of the previous "
                "batch's sequence in the same row, detached: state passing, Buitrago Ruiz & Gu 2025, which shows "
                "the model the states that long sequences reach; recurrent mixers only)"})
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
        for name in ("n_tokens", "steps", "batch_size", "eval_examples", "checkpoint_every",
                     "eval_length_examples", "stream_chunk", "eval_tokens_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1")
        if any(n < max(4, self.n_memorize) for n in self.eval_lengths):
            raise ValueError(f"--eval-lengths: every length must be >= 4 and >= --n-memorize, got {self.eval_lengths}")
        if self.init_from is not None and not Path(self.init_from).is_file():
            raise ValueError(f"--init-from {self.init_from}: no such checkpoint file")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"--time-limit: must be > 0 minutes, got {self.time_limit}")
        if self.initial_state == "passed" and "attention" in self.model.layer_mixers():
            raise ValueError("--initial-state passed: needs recurrent mixers only (an attention layer's cache "
                             "would grow with every batch)")
        if (self.resume or self.time_limit is not None) and not self.output_dir:
            raise ValueError("--resume and --time-limit need --output-dir (where the checkpoint is kept)")
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


def selective_copy_batch(cfg: TaskConfig, batch: int, gen: torch.Generator, seq_len: int | None = None):
    """Returns (inputs (b, L + k), targets (b, L + k) with -100 where no answer is asked). `seq_len`
    overrides cfg.seq_len (evaluation at other lengths)."""
    L, k = seq_len or cfg.seq_len, cfg.n_memorize
    data = torch.randint(FIRST_DATA, cfg.vocab_size, (batch, k), generator=gen)
    pos = torch.rand(batch, L, generator=gen).argsort(dim=1)[:, :k].sort(dim=1).values
    region = torch.full((batch, L), BLANK, dtype=torch.long).scatter_(1, pos, data)
    x = torch.cat([region, torch.full((batch, k), MARKER, dtype=torch.long)], dim=1)
    y = torch.full_like(x, -100)
    y[:, L:] = data  # at the j-th marker, answer the j-th data token
    return x, y


def induction_batch(cfg: TaskConfig, batch: int, gen: torch.Generator, seq_len: int | None = None):
    """Random tokens, the trigger once at a random place followed by its key, and the trigger again at the
    end, where the key is asked. `seq_len` overrides cfg.seq_len (evaluation at other lengths)."""
    L = seq_len or cfg.seq_len
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


def load_run(run: str | Path) -> tuple[MambaLM, TaskConfig]:
    """A finished run's trained model (on the CPU, in eval mode) and its configuration, from <run>/metrics.json
    and checkpoints/last.ckpt: what the benchmarks that study a trained model start from."""
    run = Path(run)
    metrics, ckpt = run / "metrics.json", run / "checkpoints" / "last.ckpt"
    for f in (metrics, ckpt):
        if not f.is_file():
            raise UserError(f"--run {run}: {f.name} is missing (not a finished ssm_core.tasks run)")
    saved = json.loads(metrics.read_text())["config"]     # as config_dict wrote it: derived fields left out
    model_cfg = MambaConfig.from_dict({**saved["model"], **{k.removeprefix("model."): v for k, v in
                                                           TaskConfig.derive(saved).items()}})
    task = TaskConfig(**{k: v for k, v in saved.items() if k not in ("model", "optim", "device")},
                      model=model_cfg, device="cpu")
    model = MambaLM(model_cfg)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    return model.eval(), task


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


@torch.no_grad()
def last_logits(model: MambaLM, x: torch.Tensor, mode: str, chunk: int, k: int = 1) -> torch.Tensor:
    """Logits (batch, k, vocab) at the last k <= chunk positions of x (batch, L). `fused`: one forward over the
    whole sequence; `stream`: chunks of `chunk` tokens with the recurrent state (or KV cache) carried from one
    to the next, so the activations held at once are those of one chunk."""
    if mode == "fused":
        return model(x)[:, -k:]
    state = model.init_state(x.shape[0], device=x.device)
    # The last chunk is the one holding the last k positions whole.
    cut = max(0, x.shape[1] - max(k, (x.shape[1] - 1) % chunk + 1))
    for part in [*x[:, :cut].split(chunk, dim=1), x[:, cut:]]:
        if part.shape[1]:
            logits, state = model.stream(part, state)
    return logits[:, -k:]


def evaluate_lengths(model: MambaLM, cfg: TaskConfig, seed: int = 4321) -> list[dict]:
    """Answer accuracy at every --eval-lengths length and --eval-mode: the same examples for every mode
    (one generator seed per length), the peak accelerator memory of each when on CUDA."""
    k = cfg.n_memorize if cfg.task == "selective-copy" else 1
    rows = []
    model.eval()
    for L in cfg.eval_lengths:
        for mode in cfg.eval_mode:
            gen = torch.Generator().manual_seed(seed + L)
            # The same batches in both modes (the generator's draws depend on the batch shape).
            per_batch = max(1, min(cfg.batch_size, cfg.eval_tokens_per_batch // L))
            cuda = str(cfg.device).startswith("cuda")
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            correct = done = 0
            while done < cfg.eval_length_examples:
                b = min(per_batch, cfg.eval_length_examples - done)
                x, y = BATCHES[cfg.task](cfg, b, gen, seq_len=L)
                pred = last_logits(model, x.to(cfg.device), mode, cfg.stream_chunk, k).argmax(-1).cpu()
                correct += (pred == y[:, -k:]).sum().item()
                done += b
            row = {"length": L, "mode": mode, "accuracy": correct / (done * k), "examples": done,
                   "seconds": round(time.perf_counter() - t0, 2)}
            if cuda:
                row["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
            rows.append(row)
            if cfg.progress:
                print(f"  {cfg.task} at length {L:>8} ({mode}): accuracy {row['accuracy']:.3f} "
                      f"over {done} examples in {row['seconds']} s", file=sys.stderr, flush=True)
    model.train()
    return rows


# Options that change what is trained; a --resume must repeat them (the others only say how a run is
# carried out: for how long, where, with what output).
_HOW_NOT_WHAT = {"init_from", "steps", "device", "output_dir", "resume", "overwrite", "checkpoint_every", "time_limit",
                 "progress", "eval_examples", "eval_lengths", "eval_mode", "eval_length_examples", "stream_chunk",
                 "eval_tokens_per_batch"}


def _training_options(cfg: TaskConfig) -> dict:
    return {k: v for k, v in config_dict(cfg).items() if k not in _HOW_NOT_WHAT}


def _check_resumable(saved: dict, cfg: TaskConfig, path: Path) -> None:
    now = _training_options(cfg)
    # An option added after the checkpoint was written counts as given its default there.
    saved = {**_training_options(TaskConfig()), **saved}
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if differ:
        raise UserError(f"--resume: {path} was written with other {', '.join('--' + k for k in differ)} "
                        "(repeat the options of the run that wrote it, or start anew with --overwrite)")


def _state_tensors(state: list) -> list[dict]:
    """The tensors of a model's recurrent state (one dataclass per layer), e.g. to save them."""
    return [{f.name: getattr(s, f.name) for f in dataclasses.fields(s) if isinstance(getattr(s, f.name), torch.Tensor)}
            for s in state]


def _detached(state: list) -> list:
    """The state cut from the graph that computed it, as copies: `stream` writes into its state in place, and
    the next step must neither backpropagate into this one nor overwrite what this one's graph saved."""
    return [dataclasses.replace(s, **{k: v.detach().clone() for k, v in t.items()})
            for s, t in zip(state, _state_tensors(state))]


def _save_checkpoint(path: Path, model, opt, sched, gen, step: int, loss_ema, elapsed: float, cfg,
                     carried: list | None) -> None:
    with atomic_path(path) as tmp:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "step": step, "loss_ema": loss_ema, "elapsed": elapsed,
                    "carried_state": None if carried is None else _state_tensors(carried),
                    "options": _training_options(cfg)}, tmp)


OWNED = ("checkpoints", "metrics.json")


def train(cfg: TaskConfig) -> dict:
    """Train for --steps (resuming from the checkpoint with --resume), then evaluate. Returns the metrics,
    or {"complete": False, "step": n} when --time-limit stopped it first (checkpoint saved)."""
    out = (prepare_run_dir(cfg.output_dir, resume=cfg.resume, overwrite=cfg.overwrite, owned=OWNED,
                           program="ssm_core.tasks") if cfg.output_dir else None)
    ckpt = out / "checkpoints" / "last.ckpt" if out else None
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg).to(cfg.device)
    opt, sched, _ = make_optimizer(model, cfg.optim, cfg.steps, cfg.optim.warmup_steps or max(1, cfg.steps // 20))
    step, loss_ema, elapsed = 0, None, 0.0
    carried = None   # --initial-state passed: the state the next batch starts from
    if cfg.resume:
        if not ckpt.is_file():
            raise UserError(f"--resume: {ckpt} does not exist (the earlier run saved no checkpoint)")
        state = torch.load(ckpt, map_location=cfg.device, weights_only=True)
        _check_resumable(state["options"], cfg, ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"].cpu())   # map_location moved it to --device
        step, loss_ema, elapsed = state["step"], state["loss_ema"], state["elapsed"]
        if state.get("carried_state") is not None:
            carried = [dataclasses.replace(s, **t) for s, t in
                       zip(model.init_state(cfg.batch_size, device=cfg.device), state["carried_state"])]
    elif cfg.init_from:
        try:
            model.load_state_dict(torch.load(cfg.init_from, map_location=cfg.device, weights_only=True)["model"])
        except (RuntimeError, KeyError) as e:
            raise UserError(f"--init-from {cfg.init_from}: not a checkpoint of this model "
                            f"({str(e).splitlines()[0]})") from None
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, desc=f"{cfg.task} [{describe(cfg)}]",
                   file=sys.stderr, dynamic_ncols=True)
    t0 = time.perf_counter()
    deadline = math.inf if cfg.time_limit is None else t0 + 60 * cfg.time_limit

    def save():
        if ckpt is not None:
            _save_checkpoint(ckpt, model, opt, sched, gen, step, loss_ema, elapsed + time.perf_counter() - t0, cfg,
                             carried)

    # SIGTERM (a scheduler's stop) ends the run at the next step boundary with its checkpoint saved, and
    # exits 143 through the same path as the Lightning trainings (ssm_core.errors).
    stop = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    try:
        while step < cfg.steps:
            if stop:
                save()
                from lightning.pytorch.utilities.exceptions import SIGTERMException
                raise SIGTERMException(128 + signal.SIGTERM)
            x, y = (t.to(cfg.device) for t in BATCHES[cfg.task](cfg, cfg.batch_size, gen))
            if cfg.initial_state == "passed":
                if carried is None:
                    carried = model.init_state(cfg.batch_size, device=cfg.device)
                logits, carried = model.stream(x, carried)
                carried = _detached(carried)
            else:
                logits = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.optim.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            sched.step()
            step += 1
            loss_ema = loss.item() if loss_ema is None else 0.95 * loss_ema + 0.05 * loss.item()
            if not math.isfinite(loss_ema):
                raise UserError(f"the training loss became {loss_ema} at step {step}: try a smaller --optim.lr")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_ema:.3f}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save()
            if time.perf_counter() > deadline and step < cfg.steps:
                save()
                if bar is not None:
                    bar.close()
                print(f"{cfg.task} [{describe(cfg)}]: --time-limit reached at step {step} of {cfg.steps}; "
                      f"checkpoint saved, continue with --resume", file=sys.stderr, flush=True)
                return {"complete": False, "step": step}
    except KeyboardInterrupt:
        save()
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if bar is not None:
            bar.close()
    metrics = evaluate(model, cfg)
    if cfg.eval_lengths:
        metrics["extrapolation"] = evaluate_lengths(model, cfg)
    metrics.update(complete=True, step=step, final_train_loss=loss_ema,
                   train_seconds=round(elapsed + time.perf_counter() - t0, 1),
                   params=sum(p.numel() for p in model.parameters()), config=config_dict(cfg),
                   chance_accuracy=1.0 / cfg.n_tokens)
    return metrics


def describe(cfg: TaskConfig) -> str:
    mixers = cfg.model.layer_mixers()
    return ",".join(dict.fromkeys(mixers)) + ("" if cfg.model.selective else ", LTI")


def main(cfg: TaskConfig) -> dict:
    metrics = train(cfg)
    if not metrics["complete"]:
        return metrics
    print(f"{cfg.task} mixer={describe(cfg)} params={metrics['params']}: accuracy "
          f"{metrics['accuracy']:.3f}, exact match {metrics['exact_match']:.3f} "
          f"(chance {metrics['chance_accuracy']:.3f}) in {metrics['train_seconds']} s")
    if cfg.output_dir:
        write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
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
