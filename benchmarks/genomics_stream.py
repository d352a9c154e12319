"""Whole-chromosome speed and memory: streaming evaluation and variant scoring, Caduceus-size causal model.

    python benchmarks/genomics_stream.py --out genomics_stream.json                  # GPU: 50 Mb contig, 131k
    python benchmarks/genomics_stream.py --d-model 16 --n-layer 1 --contig-mb 0.05 --chunk 4096 \\
        --score-context 512 --score-variants 8 --device cpu                          # a CPU smoke run

Generates a FASTA with one random contig of --contig-mb megabases (with N runs) in --workdir, builds the
model of --model-config (configs/genomics/hg38.yaml: d_model 256, 16 layers, d_state 16, expand 2, random weights:
speed does not depend on them), then
  * streams prefixes of the contig of each --lengths-mb (the whole contig last) through
    `genomics.evaluate.stream_bits` (the `--stream` path: `MambaModel.stream` chunk by chunk, every base
    predicted from everything to its left) in chunks of --chunk bases: bases/s and peak memory per length,
    so flat memory in contig length shows as equal peaks;
  * scores --score-variants random SNVs through `genomics.score.score_variants` (the CLI's path) with
    --score-context bases of context each, --score-batch windows per forward: variants/s, window bases/s,
    peak memory.
Each measurement runs with bf16 autocast (the CLIs' default on a GPU) and in float32; a failure is recorded
in the JSON rather than stopping the run. Writes JSON to --out (atomically, after every measurement) and
prints each row, then the markdown table of docs/BENCHMARKS.md.
"""
from __future__ import annotations

import datetime
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genomics.common import peak_memory_gib
from genomics.data import Genome
from genomics.demo import write_fasta
from genomics.evaluate import stream_bits
from genomics.lightning_module import model_inputs
from genomics.score import Variant, score_variants
from ssm_core import MambaConfig, MambaLM
from ssm_core.cli import main_entry
from ssm_core.io import write_json_atomic


@dataclass
class BenchConfig:
    model_config: str = field(default=str(REPO / "configs/genomics/hg38.yaml"), metadata={"help": "model sizes from here"})
    d_model: int | None = field(default=None, metadata={"help": "override the config's (tiny CPU runs)"})
    n_layer: int | None = None
    contig_mb: float = field(default=50.0, metadata={"help": "length of the generated contig in megabases"})
    lengths_mb: list[float] = field(default_factory=lambda: [5.0], metadata={
        "help": "also stream these prefixes (memory against length); the whole contig always runs"})
    chunk: int = field(default=131072, metadata={"help": "bases per streamed chunk"})
    score_variants: int = 256
    score_context: int = 131072
    score_batch: int = 4
    precisions: list[str] = field(default_factory=lambda: ["bf16-autocast", "float32"])
    device: str = "auto"
    workdir: str = field(default="/tmp/genomics_stream_bench", metadata={"help": "where the FASTA is written"})
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "write the results as JSON here"})

    def __post_init__(self):
        if self.contig_mb <= 0 or self.chunk < 1 or self.score_context < 8:
            raise ValueError("--contig-mb must be > 0, --chunk >= 1, --score-context >= 8")
        if set(self.precisions) - {"bf16-autocast", "float32"}:
            raise ValueError("--precisions: bf16-autocast and/or float32")


def make_contig(cfg: BenchConfig) -> Path:
    n = int(cfg.contig_mb * 1e6)
    path = Path(cfg.workdir) / f"bench_{n}.fa"
    if path.is_file() and Path(str(path) + ".fai").is_file():
        return path
    rng = np.random.default_rng(cfg.seed)
    seq = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, n)]
    for s in rng.integers(0, max(1, n - 10_000), max(1, n // 5_000_000)):   # assembly-gap-like N runs
        seq[s:s + 5_000] = ord("N")
    return write_fasta(path, [("chrB", seq.tobytes())])


def _reset(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def main(cfg: BenchConfig) -> dict:
    sizes = yaml.safe_load(Path(cfg.model_config).read_text())["model"]
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    torch.manual_seed(cfg.seed)
    mc = MambaConfig(d_model=cfg.d_model or sizes["d_model"], n_layer=cfg.n_layer or sizes["n_layer"],
                     d_state=sizes["d_state"], expand=sizes["expand"], **model_inputs(False, False))
    model = MambaLM(mc).to(device).eval()
    t0 = time.perf_counter()
    genome = Genome.open([make_contig(cfg)])
    n = genome.contigs[0].length
    print(f"contig of {n:,} bases ready in {time.perf_counter() - t0:.1f} s", flush=True)
    result = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "model": {k: getattr(mc, k) for k in ("d_model", "n_layer", "d_state", "expand")},
              "n_params": sum(p.numel() for p in model.parameters()), "contig_bases": n, "chunk": cfg.chunk,
              "command": " ".join(sys.argv), "stream": [], "score": []}
    lengths = sorted({min(n, int(x * 1e6)) for x in cfg.lengths_mb} | {n})
    for prec in cfg.precisions:
        amp = prec == "bf16-autocast"
        for end in lengths:
            _reset(device)
            try:
                r = stream_bits(model, genome, 0, end, cfg.chunk, False, device, progress=False, autocast=amp)
                row = {k: r[k] for k in ("bases", "seconds", "tokens_per_second", "peak_memory_gib", "bits_per_base")}
            except Exception as e:   # recorded, so that one failing precision does not lose the others
                row = {"bases": end, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
            row["precision"] = prec
            result["stream"].append(row)
            print("stream", row, flush=True)
            if cfg.out:     # after every measurement: a run cut short keeps what it measured
                write_json_atomic(cfg.out, result)
        rng = np.random.default_rng([cfg.seed, 1])
        variants = []
        for p in rng.integers(cfg.score_context, n - cfg.score_context, cfg.score_variants * 2):
            ref = genome.fetch(0, int(p), int(p) + 1).tobytes().decode()
            if ref in "ACGT" and len(variants) < cfg.score_variants:
                variants.append(Variant("chrB", int(p) + 1, ".", ref, ("ACGT"[("ACGT".index(ref) + 1) % 4],)))
        _reset(device)
        t1 = time.perf_counter()
        try:
            score_variants(model, {"objective": "causal"}, genome, variants, cfg.score_context, False, device,
                           cfg.score_batch, progress=False, autocast=amp)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            sec = time.perf_counter() - t1
            row = {"variants": len(variants), "context": cfg.score_context, "seconds": sec,
                   "variants_per_second": len(variants) / sec,
                   # two windows (REF and ALT) of the context per SNV go through the model
                   "window_bases_per_second": 2 * len(variants) * cfg.score_context / sec,
                   "peak_memory_gib": peak_memory_gib(device), "scored": sum(v.score is not None for v in variants)}
        except Exception as e:
            row = {"variants": len(variants), "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        row["precision"] = prec
        result["score"].append(row)
        print("score", row, flush=True)
    if cfg.out:
        write_json_atomic(cfg.out, result)
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    """The measurements as the table docs/BENCHMARKS.md shows."""
    lines = ["| what | precision | bases | bases/s | peak memory (GiB) | seconds |", "|---|---|---|---|---|---|"]
    for r in result["stream"]:
        if "error" in r:
            lines.append(f"| stream | {r['precision']} | {r['bases']:,} | {r['error']} | | |")
        else:
            lines.append(f"| stream, chunk {result['chunk']:,} | {r['precision']} | {r['bases']:,} | "
                         f"{r['tokens_per_second'] / 1e6:.2f}M | {r['peak_memory_gib']:.2f} | {r['seconds']:.1f} |")
    for r in result["score"]:
        if "error" in r:
            lines.append(f"| score {r['variants']} SNVs | {r['precision']} | | {r['error']} | | |")
        else:
            lines.append(f"| score {r['variants']} SNVs at {r['context']:,} context ({r['variants_per_second']:.1f} "
                         f"variants/s) | {r['precision']} | {2 * r['variants'] * r['context']:,} (window bases) | "
                         f"{r['window_bases_per_second'] / 1e6:.2f}M | {r['peak_memory_gib']:.2f} | "
                         f"{r['seconds']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main_entry(main, BenchConfig, "python benchmarks/genomics_stream.py", description=__doc__.split("\n\n")[0])
