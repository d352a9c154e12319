"""Lightning pieces of DNA pretraining: the LightningModule (MambaLM + objective + torchmetrics; the optimiser
is ssm_core's shared recipe) and the DataModule (WindowBatches behind DataLoaders whose position is the
global step)."""
from __future__ import annotations

import math
import time

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from ssm_core import MambaConfig, MambaLM
from ssm_core.lightning_module import TaskModule

from . import tokenizer as tok
from .data import Genome, Interval, StepRange, WindowBatches, WindowSampler

LN2 = math.log(2.0)


def model_inputs(keep_softmask: bool, rc_equivariant: bool) -> dict:
    """The MambaConfig fields that follow from the data options: the vocabulary (soft-masked ids widen it)
    and, for an RC-equivariant model, its complement map."""
    vocab = tok.SOFTMASK_VOCAB_SIZE if keep_softmask else tok.VOCAB_SIZE
    return {"vocab_size": vocab, "d_input": None,
            "complement_map": tok.complement_map(vocab) if rc_equivariant else None}


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(summed cross-entropy in nats, number of scored targets, number predicted right); N/pad ignored."""
    logits = logits.float().reshape(-1, logits.shape[-1])
    targets = targets.reshape(-1).long()
    nll = F.cross_entropy(logits, targets, ignore_index=tok.IGNORE_INDEX, reduction="sum")
    scored = targets != tok.IGNORE_INDEX
    correct = ((logits.argmax(-1) == targets) & scored).sum()
    return nll, scored.sum(), correct


class DNALightningModule(TaskModule):
    def __init__(self, model_config: dict, optim: dict | None = None, total_steps: int | None = None):
        super().__init__(optim or {}, total_steps)
        self.save_hyperparameters()
        self.model = MambaLM(MambaConfig.from_dict(model_config))
        # nan_strategy="disable": a NaN loss must reach the validation metric (and FiniteGuard), not be
        # dropped from the sum (torchmetrics' default warns and drops it, which reported 0 bits/base).
        self.val_nll, self.val_count, self.val_correct = (torchmetrics.SumMetric(nan_strategy="disable")
                                                          for _ in range(3))
        # Saved in the checkpoint, so that metrics.json counts the tokens of the whole run across --resume.
        self.train_tokens = torchmetrics.SumMetric()
        self.train_tokens.persistent(True)
        self.history: dict[str, list] = {"train": [], "valid": []}   # (step, bits/base) for the loss curve
        self.last_val: dict[str, float] = {}
        self._timed_tokens, self._timed_seconds, self._t0, self._timing = 0, 0.0, None, False

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids.long())

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"])
        nll, count, _ = token_stats(logits, batch["targets"])
        loss = nll / count.clamp(min=1)
        n_tokens = batch["input_ids"].numel()
        self.train_tokens.update(torch.tensor(float(n_tokens), device=self.device))
        self._timed_tokens += n_tokens
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_bits_per_base", loss / LN2)
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=False)
        if self.global_step % 10 == 0:
            self.history["train"].append((int(self.global_step), float(loss.detach()) / LN2))
        return loss

    # Throughput: wall-clock of training only (data loading included, validation excluded), from the third
    # batch on so one-off start-up (worker spawn, kernel compilation) stays out of tokens_per_second. The
    # clock pauses at each validation and resumes at the next training batch; tokens are zeroed only once.
    def on_train_batch_start(self, batch, batch_idx):
        if self._t0 is not None:
            return
        if not self._timing:
            if batch_idx < 2:
                return
            self._timing, self._timed_tokens = True, 0
        self._t0 = time.perf_counter()

    def on_validation_start(self):
        if self._t0 is not None:
            self._timed_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def on_train_end(self):
        if self._t0 is not None:
            self._timed_seconds += time.perf_counter() - self._t0
            self._t0 = None

    def tokens_per_second(self) -> float:
        return self._timed_tokens / self._timed_seconds if self._timed_seconds > 0 else float("nan")

    def validation_step(self, batch, batch_idx):
        nll, count, correct = token_stats(self(batch["input_ids"]), batch["targets"])
        self.val_nll.update(nll)
        self.val_count.update(count.float())
        self.val_correct.update(correct.float())

    def on_validation_epoch_end(self):
        nll, count, correct = self.val_nll.compute(), self.val_count.compute(), self.val_correct.compute()
        for m in (self.val_nll, self.val_count, self.val_correct):
            m.reset()
        loss = nll / count.clamp(min=1)
        # val_tokens: FiniteGuard stops a run whose validation scored nothing (a FASTA of only N).
        self.log_dict({"val_loss": loss, "val_bits_per_base": loss / LN2, "val_accuracy": correct / count.clamp(min=1),
                       "val_tokens": count},
                      prog_bar=True, sync_dist=False)   # SumMetric already reduced across ranks
        self.last_val = {"val_loss": float(loss), "val_bits_per_base": float(loss) / LN2,
                         "val_accuracy": float(correct / count.clamp(min=1)), "val_tokens": int(count)}
        if not self.trainer.sanity_checking:
            self.history["valid"].append((int(self.global_step), float(loss) / LN2))

    def on_save_checkpoint(self, checkpoint):
        checkpoint["genomics_history"] = self.history
        checkpoint["genomics_throughput"] = (self._timed_tokens, self._timed_seconds)

    def on_load_checkpoint(self, checkpoint):
        self.history = checkpoint.get("genomics_history", self.history)
        # Checkpoints from before train_tokens was saved: load them with the count starting at 0.
        state = checkpoint.get("state_dict", {})
        for name, value in self.train_tokens.state_dict(prefix="train_tokens.").items():
            state.setdefault(name, value)


class SyntheticBatches(torch.utils.data.Dataset):
    """Random-token batches with the shape of the real ones: the 'data costs nothing' baseline."""

    def __init__(self, batch_size: int, seq_len: int, seed: int, rank: int):
        self.batch_size, self.seq_len, self.seed, self.rank = batch_size, seq_len, seed, rank

    def __len__(self):
        return 2**62

    def __getitem__(self, index):
        g = torch.Generator().manual_seed(hash((self.seed, index, self.rank)) % 2**63)
        ids = torch.randint(tok.A, tok.N, (self.batch_size, self.seq_len + 1), generator=g, dtype=torch.uint8)
        return {"input_ids": ids[:, :-1].contiguous(), "targets": ids[:, 1:].long()}


class DNADataModule(L.LightningDataModule):
    def __init__(self, genome: Genome, splits: dict[str, list[Interval]], batch_size: int, seq_len: int,
                 objective: str, seed: int, max_n_frac: float, keep_softmask: bool, rc_augment: bool,
                 num_workers: int, max_steps: int, val_batches: int, seq_len_warmup_steps: int = 0,
                 seq_len_warmup_start: int = 1024, synthetic: bool = False):
        super().__init__()
        self.genome, self.splits = genome, splits
        self.batch_size, self.seq_len, self.objective, self.seed = batch_size, seq_len, objective, seed
        self.max_n_frac, self.keep_softmask, self.rc_augment = max_n_frac, keep_softmask, rc_augment
        self.num_workers, self.max_steps, self.val_batches = num_workers, max_steps, val_batches
        self.warmup_steps, self.warmup_start, self.synthetic = seq_len_warmup_steps, seq_len_warmup_start, synthetic

    def _rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def _loader(self, dataset, start: int, stop: int):
        return torch.utils.data.DataLoader(
            dataset, batch_size=None, sampler=StepRange(start, stop), num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(), persistent_workers=False,
            prefetch_factor=4 if self.num_workers > 0 else None)

    def train_dataloader(self):
        # The loader starts at the restored global step: a resumed run sees the batches an uninterrupted
        # run would have seen (Lightning restores global_step before asking for the loader).
        start = self.trainer.global_step if self.trainer is not None else 0
        stop = self.max_steps if self.max_steps > 0 else 2**62
        if self.synthetic:
            ds = SyntheticBatches(self.batch_size, self.seq_len, self.seed, self._rank())
        else:
            sampler = WindowSampler(self.genome, self.splits["train"], "train", self.seed, self.max_n_frac,
                                    self.keep_softmask)
            ds = WindowBatches(sampler, self.batch_size, self.seq_len, self.objective, rank=self._rank(),
                               rc_augment=self.rc_augment, seq_len_warmup_steps=self.warmup_steps,
                               seq_len_warmup_start=self.warmup_start)
        return self._loader(ds, start, stop)

    def eval_dataset(self, split: str, rank: int | None = None) -> WindowBatches:
        sampler = WindowSampler(self.genome, self.splits[split], split, self.seed, self.max_n_frac, self.keep_softmask)
        return WindowBatches(sampler, self.batch_size, self.seq_len, self.objective,
                             rank=self._rank() if rank is None else rank)

    def val_dataloader(self):
        # The same fixed validation windows every time (seeded by batch index), split across ranks.
        return self._loader(self.eval_dataset("valid"), 0, self.val_batches)
