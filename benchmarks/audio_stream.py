"""Streaming keyword-spotting speed: CPU real-time factor and chunk latency; GPU streams at real time.

    python benchmarks/audio_stream.py --device cpu --threads 1 --seconds 60            # one stream, 20 ms chunks
    python benchmarks/audio_stream.py --device cuda --batches 256 1024 4096 16384      # many streams batched

CPU: one stream through `KeywordSpotter.stream` (log-mel front-end + causal Mamba encoder + head) chunk by
chunk, each chunk timed; side by side, the offline forward over the same audio, so the cost of streaming
is a ratio measured in the same run. GPU: B independent streams advanced together one chunk at a time;
a step over B streams that takes t seconds for c seconds of audio serves B * c / t streams in real time.
Random weights (speed does not depend on them); the model is the default of audio.train unless flags say
otherwise.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from audio.model import KeywordSpotter, KWSConfig
from audio.stream import LatencyHistogram
from ssm_core import MambaConfig
from ssm_core.cli import main_entry
from ssm_core.io import write_json_atomic


@dataclass
class BenchConfig:
    device: str = "cpu"
    threads: int = 1
    seconds: float = 60.0
    chunk_ms: float = 20.0
    d_model: int = 128
    n_layer: int = 4
    d_state: int = 16
    batches: list[int] = field(default_factory=lambda: [256, 1024, 4096])
    steps: int = field(default=50, metadata={"help": "GPU: timed chunk steps per batch size"})
    out: str | None = field(default=None, metadata={"help": "write the results as JSON here"})


def make_model(cfg: BenchConfig, device: str) -> KeywordSpotter:
    torch.manual_seed(0)
    labels = [f"c{i}" for i in range(12)]
    encoder = MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, d_state=cfg.d_state, d_input=80)
    return KeywordSpotter(KWSConfig(labels=labels, encoder=encoder)).to(device).eval()


def bench_cpu(cfg: BenchConfig) -> dict:
    torch.set_num_threads(cfg.threads)
    model = make_model(cfg, "cpu")
    with torch.inference_mode():   # as audio.stream's loop (run_stream), the model made outside it
        return _time_cpu_stream(cfg, model)


def _time_cpu_stream(cfg: BenchConfig, model: KeywordSpotter) -> dict:
    sr = model.config.features.sample_rate
    chunk = int(cfg.chunk_ms * sr / 1000)
    wave = torch.randn(1, int(cfg.seconds * sr)) * 0.1
    state = model.init_stream(1)
    for i in range(0, 50 * chunk, chunk):                 # warm-up
        model.stream(wave[:, i: i + chunk], state)
    state, hist = model.init_stream(1), LatencyHistogram()
    t_all = time.perf_counter()
    for i in range(0, wave.shape[1], chunk):
        t0 = time.perf_counter()
        model.stream(wave[:, i: i + chunk], state).softmax(-1)
        hist.add(time.perf_counter() - t0)
    stream_s = time.perf_counter() - t_all
    t0 = time.perf_counter()
    model(wave).softmax(-1)
    offline_s = time.perf_counter() - t0
    return {"device": "cpu", "threads": cfg.threads, "parameters": model.num_parameters(), "chunk_ms": cfg.chunk_ms,
            "audio_s": cfg.seconds, "rtf": hist.sum / cfg.seconds, "p50_ms": 1e3 * hist.quantile(0.5),
            "p99_ms": 1e3 * hist.quantile(0.99), "stream_s": stream_s, "offline_s": offline_s,
            "stream_over_offline": stream_s / offline_s}


@torch.no_grad()
def bench_gpu(cfg: BenchConfig) -> list[dict]:
    model = make_model(cfg, "cuda")
    sr = model.config.features.sample_rate
    chunk = int(cfg.chunk_ms * sr / 1000)
    rows = []
    for b in cfg.batches:
        try:
            state = model.init_stream(b)
            x = torch.randn(b, chunk, device="cuda") * 0.1
            for _ in range(10):
                model.stream(x, state)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(cfg.steps):
                start.record()
                model.stream(x, state).softmax(-1)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            t = float(np.median(times))
            rows.append({"streams": b, "step_ms": 1e3 * t, "p99_step_ms": 1e3 * float(np.quantile(times, 0.99)),
                         "streams_at_rtf1": b * cfg.chunk_ms / 1e3 / t})
        except torch.OutOfMemoryError:
            rows.append({"streams": b, "error": "out of memory"})
            torch.cuda.empty_cache()
    return rows


def main(cfg: BenchConfig) -> dict:
    if cfg.device == "cpu":
        r = bench_cpu(cfg)
        print(f"CPU, {r['threads']} thread(s), {r['parameters']:,} parameters, {r['chunk_ms']:g} ms chunks, "
              f"{r['audio_s']:g} s of audio: RTF {r['rtf']:.4f}, chunk latency p50 {r['p50_ms']:.2f} ms "
              f"p99 {r['p99_ms']:.2f} ms; streaming {r['stream_s']:.2f} s vs offline forward {r['offline_s']:.2f} s "
              f"(x{r['stream_over_offline']:.1f})")
        result = {"cpu": r}
    else:
        rows = bench_gpu(cfg)
        print(f"GPU {torch.cuda.get_device_name()}, {cfg.chunk_ms:g} ms chunks, d_model {cfg.d_model}, "
              f"{cfg.n_layer} layers")
        print(f"{'streams':>8} {'step ms':>9} {'p99 ms':>8} {'streams at RTF 1':>17}")
        for r in rows:
            if "error" in r:
                print(f"{r['streams']:>8} {r['error']}")
            else:
                print(f"{r['streams']:>8} {r['step_ms']:>9.3f} {r['p99_step_ms']:>8.3f} {r['streams_at_rtf1']:>17,.0f}")
        result = {"gpu": rows, "name": torch.cuda.get_device_name()}
    if cfg.out:
        write_json_atomic(cfg.out, {"config": cfg.__dict__, **result})
    return result


if __name__ == "__main__":
    main_entry(main, BenchConfig, "python benchmarks/audio_stream.py")
