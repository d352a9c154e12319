"""CPU benchmark of the fast path: the selective scan and one-layer streaming, side by side.

    scripts/venv-run python benchmarks/cpu.py --out bench_cpu.json

Scan, at (batch, dim, N, L) = (1, 512, 16, 4096) and (8, 256, 16, 1024), fp32, delta_softplus, D and z on,
forward and forward+backward: ssm_core's CPU path, ssm_core's plain reference, mamba_ssm's pure-PyTorch
`selective_scan_ref` (from ../shared/bench; its column is skipped when absent) and, forward only, a
chunked log-space scan (the alternative this path was measured against; see docs/cpu.md).
Streaming: `Mamba(d_model=256)`, one layer, one thread, per 20 ms chunk (2 frames at a 10 ms hop),
ours (`stream`, the 2 frames at once) beside mamba_ssm's `step` (its pure-PyTorch fallback, twice).

Every measurement runs in its own subprocess, so its peak memory is that process's resident high-water
mark above the level reached once the inputs exist. Times are wall clock: the minimum over --repeats
for the scan, median and p99 over --stream-iters for streaming. The load average is printed with them:
on a shared machine the ratios, measured in one run, are what to read.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = [(1, 512, 16, 4096), (8, 256, 16, 1024)]
SCAN_IMPLS = ["cpu", "reference", "mamba_ssm", "logspace"]
LABELS = {"cpu": "ssm_core CPU path", "reference": "ssm_core reference", "mamba_ssm": "mamba_ssm selective_scan_ref",
          "logspace": "chunked log-space (alt.)"}


def _load_anchor(bench_dir: str):
    """mamba_ssm's CPU pieces via ../shared/bench/mamba_reference.py, or None when it is absent."""
    path = Path(bench_dir) / "mamba_reference.py"
    if not path.is_file():
        return None
    sys.path.insert(0, str(path.parent))
    import mamba_reference
    return mamba_reference.load_cpu()


def logspace_scan(u, delta, A, B, C, D, z, delta_bias, T: int = 32):
    """The vectorised alternative: within a chunk of T steps, c_t = cumsum(dt*A) (<= 0 from the chunk
    start) and h_t = e^{c_t} (h_0 + sum_{s<=t} e^{-c_s} dt_s B_s u_s). Forward only; e^{-c} overflows
    once a chunk's decay passes ~88, so it needs small T or a guarded fallback to be safe in general."""
    import torch
    import torch.nn.functional as F
    b, d, L = u.shape
    dt = F.softplus(delta + delta_bias[:, None])
    w = dt * u
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)                       # (b, L, N)
    h = u.new_zeros(b, d, A.shape[1])
    y = u.new_empty(b, d, L)
    for s in range(0, L, T):
        e = min(L, s + T)
        E = (dt[:, :, s:e, None] * A[:, None]).cumsum(2).exp_()          # (b, d, T, N)
        hh = (w[:, :, s:e, None] * Bt[:, None, s:e]).div_(E).cumsum(2).add_(h[:, :, None]).mul_(E)
        y[:, :, s:e] = torch.matmul(Ct[:, None, s:e, None, :], hh.unsqueeze(-1)).view(b, d, e - s)
        h = hh[:, :, -1]
    return (y + u * D[:, None]) * F.silu(z)


def _scan_callable(impl: str, bench_dir: str):
    import ssm_core
    from ssm_core import cpu
    if impl == "cpu":
        return lambda u, delta, A, B, C, D, z, db: cpu.selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=db,
                                                                       delta_softplus=True)
    if impl == "reference":
        return lambda u, delta, A, B, C, D, z, db: ssm_core.selective_scan_ref(u, delta, A, B, C, D=D, z=z,
                                                                                delta_bias=db, delta_softplus=True)
    if impl == "logspace":
        return logspace_scan
    anchor = _load_anchor(bench_dir)
    if anchor is None:
        return None
    return lambda u, delta, A, B, C, D, z, db: anchor.selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=db,
                                                                         delta_softplus=True)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_scan(impl: str, shape, mode: str, repeats: int, threads: int, bench_dir: str, max_seconds: float) -> dict:
    import torch
    torch.set_num_threads(threads)
    fn = _scan_callable(impl, bench_dir)
    if fn is None:
        return {"skipped": "../shared/bench/mamba_reference.py absent"}
    b, d, n, L = shape
    g = torch.Generator().manual_seed(0)
    grad = mode == "fwd+bwd"
    u, delta, z = (torch.randn(b, d, L, generator=g).requires_grad_(grad) for _ in range(3))
    A = (-torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)).requires_grad_(grad)
    B, C = (torch.randn(b, n, L, generator=g).requires_grad_(grad) for _ in range(2))
    D = torch.ones(d, requires_grad=grad)
    db = torch.empty(d).uniform_(-6.9, -2.3, generator=g).requires_grad_(grad)   # dt in ~[0.001, 0.1]
    args = (u, delta, A, B, C, D, z, db)

    def once():
        if grad:
            y = fn(*args)
            y.backward(torch.ones_like(y))
        else:
            with torch.no_grad():
                fn(*args)

    base = _rss_mib()
    t0 = time.perf_counter()
    once()                                   # warm-up; sets the memory high-water mark
    times = [time.perf_counter() - t0]
    peak = _rss_mib() - base
    if times[0] * repeats < max_seconds:     # else (the slow loops) the one run is the measurement
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * min(times), "runs": len(times), "peak_mib": peak}


def child_stream(impl: str, iters: int, bench_dir: str) -> dict:
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 256)                      # one 20 ms chunk: 2 frames at a 10 ms hop
    if impl == "cpu":
        import ssm_core
        m = ssm_core.Mamba(256).eval()
        state = m.init_state(1)
        step = lambda: m.stream(x, state)  # noqa: E731
    else:
        anchor = _load_anchor(bench_dir)
        if anchor is None:
            return {"skipped": "../shared/bench/mamba_reference.py absent"}
        import mamba_ssm.modules.mamba_simple as ms
        ms.selective_state_update = None               # its pure-PyTorch fallback (no Triton on a CPU)
        m = anchor.Mamba(d_model=256).eval()
        conv, ssm = torch.zeros(1, m.d_inner, m.d_conv), torch.zeros(1, m.d_inner, m.d_state)
        step = lambda: [m.step(x[:, i:i + 1], conv, ssm) for i in range(2)]  # noqa: E731
    times = []
    with torch.inference_mode():
        for i in range(iters + 50):
            t0 = time.perf_counter()
            step()
            if i >= 50:
                times.append(time.perf_counter() - t0)
    times.sort()
    return {"median_ms": 1e3 * times[len(times) // 2], "p99_ms": 1e3 * times[int(0.99 * (len(times) - 1))],
            "min_ms": 1e3 * times[0], "iters": len(times)}


def _spawn(job: dict, timeout: float | None) -> dict:
    try:
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:   # mamba_ssm's autograd loop is quadratic in L (see docs/cpu.md)
        return {"timeout_s": timeout}
    if out.returncode != 0:
        raise RuntimeError(f"benchmark job {job} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(data: dict, plot: Path | None = None) -> str:
    """The markdown tables (and optionally a PNG of the speed-ups) for a results dict as --out writes it."""
    results, load = data["results"], data["load_average"]
    lines = [f"scan threads {data['threads']}; load average {load[0]:.1f} at start, {load[-1]:.1f} at end", "",
             "| shape (b, d, N, L) | pass | implementation | ms (min) | timed runs | peak MiB | mamba_ssm ref / this |",
             "|---|---|---|---|---|---|---|"]
    speedups = {}
    for r in results:
        if r["kind"] != "scan" or "skipped" in r:
            continue
        case = f"{tuple(r['shape'])} | {r['mode']} | {LABELS[r['impl']]}"
        if "timeout_s" in r:
            lines.append(f"| {case} | > {1e3 * r['timeout_s']:.0f} (stopped) | 0 | - | 1.0x |")
            continue
        anchor = next((q for q in results if q["kind"] == "scan" and q["impl"] == "mamba_ssm" and
                       q["shape"] == r["shape"] and q["mode"] == r["mode"] and "skipped" not in q), None)
        anchor_ms = None if anchor is None else anchor.get("ms", 1e3 * anchor.get("timeout_s", 0))
        ratio = f"{anchor_ms / r['ms']:.1f}x" if anchor_ms else "-"
        if anchor_ms:
            speedups[(LABELS[r["impl"]], f"{r['mode']} {tuple(r['shape'])}")] = anchor_ms / r["ms"]
            ratio = ("> " if "timeout_s" in anchor else "") + ratio
        lines.append(f"| {case} | {r['ms']:.1f} | {r['runs']} | {r['peak_mib']:.0f} | {ratio} |")
    lines += ["", "| Mamba(256) one layer, 1 thread, per 20 ms chunk (2 frames) | median ms | p99 ms | min ms |",
              "|---|---|---|---|"]
    for r in results:
        if r["kind"] == "stream" and "skipped" not in r:
            what = "ssm_core `Mamba.stream` (2 frames)" if r["impl"] == "cpu" else "mamba_ssm `Mamba.step` x 2"
            lines.append(f"| {what} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['min_ms']:.3f} |")
    if plot is not None and speedups:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ssm_core.io import save_figure_atomic
        cases = sorted({c for _, c in speedups})
        impls = [i for i in LABELS.values() if any(k[0] == i for k in speedups) and i != LABELS["mamba_ssm"]]
        fig, ax = plt.subplots(figsize=(8, 3.5))
        width = 0.8 / max(len(impls), 1)
        for j, impl in enumerate(impls):
            ax.bar([i + j * width for i in range(len(cases))], [speedups.get((impl, c), 0) for c in cases],
                   width, label=impl)
        ax.axhline(1, color="k", lw=0.8)
        ax.axhline(5, color="r", ls="--", lw=0.8, label="target 5x")
        ax.set_xticks([i + width * (len(impls) - 1) / 2 for i in range(len(cases))], cases, fontsize=8)
        ax.set_ylabel("speed-up over mamba_ssm selective_scan_ref")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure_atomic(fig, plot)
        lines += ["", f"wrote {plot}"]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--bench-dir", default=str(REPO.parent / "shared" / "bench"),
                   help="folder with mamba_reference.py (the mamba_ssm anchor)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the scan (streaming uses 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per scan measurement (min is reported)")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="a scan measurement whose warm-up x repeats would exceed this is timed once")
    p.add_argument("--skip-reference-backward", action="store_true",
                   help="leave out autograd through ssm_core's plain reference (minutes per run on 2 cores)")
    p.add_argument("--stream-iters", type=int, default=2000)
    p.add_argument("--timeout", type=float, default=None,
                   help="seconds after which a measurement is stopped and reported as '> timeout'")
    p.add_argument("--only", choices=["scan", "stream"], help="run only the scan or only the streaming rows")
    p.add_argument("--plot", type=Path, help="write a PNG of the speed-ups here")
    p.add_argument("--report", type=Path, help="only print the tables (and --plot) of a JSON written by --out")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.report:
        print(report(json.loads(a.report.read_text()), a.plot))
        return
    if a.child:
        job = json.loads(a.child)
        kind = job.pop("kind")
        print(json.dumps(child_scan(**job) if kind == "scan" else child_stream(**job)))
        return

    from tqdm import tqdm

    from ssm_core.io import write_json_atomic
    jobs = [dict(kind="scan", impl=i, shape=s, mode=m, repeats=a.repeats, threads=a.threads,
                 bench_dir=a.bench_dir, max_seconds=a.max_seconds)
            for s in SHAPES for m in ("fwd", "fwd+bwd") for i in SCAN_IMPLS
            if m == "fwd" or not (i == "logspace" or (i == "reference" and a.skip_reference_backward))]
    jobs = [dict(kind="stream", impl=i, iters=a.stream_iters, bench_dir=a.bench_dir) for i in ("cpu", "mamba_ssm")] + jobs
    jobs = [j for j in jobs if a.only is None or j["kind"] == a.only]
    load = [os.getloadavg()[0]]
    results = []
    for job in (bar := tqdm(jobs, desc="cpu benchmark", unit="job")):
        bar.set_postfix_str(f"{job['impl']} {job.get('mode', 'stream')} {job.get('shape', '')}")
        results.append({**job, **_spawn(job, a.timeout)})
        if a.out:   # as it goes: a long run that is stopped keeps what it measured
            write_json_atomic(a.out, {"load_average": load, "threads": a.threads, "results": results})
    load.append(os.getloadavg()[0])

    data = {"load_average": load, "threads": a.threads, "cpu_count": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "results": results}
    if a.out:
        write_json_atomic(a.out, data)
    print(report(data, a.plot))


if __name__ == "__main__":
    main()
