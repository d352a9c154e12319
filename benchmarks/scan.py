"""Selective scan: the project's Triton kernel against the official CUDA kernel (mamba_ssm's
selective_scan_fn), side by side in one process, on the issue's anchor shapes.

    # on the device, with the anchor copied into .bench/ (see ../shared/bench/README.md)
    python -m benchmarks.scan --out-dir $OUT

For each shape (bf16 u/delta/z/B/C, fp32 A/D/bias, delta_softplus, D and z on): forward and forward+backward
medians (triton.testing.do_bench), the peak memory a forward+backward allocates beyond its inputs, the
ratio project/anchor, and the exp floor: B*D*L*N exponentials at this device's measured exp2 rate.
The first shape is timed twice and the first timing dropped: on a freshly started device it ran 1.4x
slow (2.88 instead of 2.03 ms, H100, 2026-11-24). Writes scan.json and scan.md under --out-dir.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl

ANCHOR_SHAPES = [(8, 1536, 16, 2048), (8, 1536, 16, 8192), (1, 1536, 16, 65536), (1, 1536, 16, 262144),
                 (2, 1536, 64, 16384)]


@dataclass
class ScanBenchConfig:
    out_dir: str = field(default="bench_out", metadata={"help": "where scan.json / scan.md go"})
    anchor_dir: str = field(default=".bench", metadata={"help": "folder holding mamba_reference.py"})
    shapes: list[str] = field(default_factory=lambda: [",".join(map(str, s)) for s in ANCHOR_SHAPES],
                              metadata={"help": "batch,dim,N,L shapes"})
    variants: bool = field(default=False, metadata={"help": "also time alternative tile configs (tuning)"})
    rep_ms: int = field(default=400, metadata={"help": "do_bench repetition budget per timing (ms)"})


def load_anchor(anchor_dir: str):
    """The official kernels, or None (with the reason printed) when they are not there."""
    path = Path(anchor_dir)
    if not (path / "mamba_reference.py").is_file():
        print(f"[bench] no anchor at {path}/mamba_reference.py: timing the project kernel alone", flush=True)
        return None
    sys.path.insert(0, str(path.resolve()))
    import mamba_reference
    return mamba_reference.load()


@triton.jit
def _exp2_rate_kernel(x_ptr, out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    acc = tl.zeros([BLOCK], tl.float32)
    for _ in range(ITERS):
        x = tl.exp2(x) - 1.0  # a dependent chain per element; many elements in flight per SM
        acc += x
    tl.store(out_ptr + offs, acc)


def exp2_rate() -> float:
    """Exponentials per second this device sustains (Triton exp2 -> MUFU.EX2)."""
    block, iters = 1024, 4096
    n = block * torch.cuda.get_device_properties(0).multi_processor_count * 16
    x = torch.rand(n, device="cuda") * -0.5
    out = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: _exp2_rate_kernel[(n // block,)](x, out, ITERS=iters, BLOCK=block,
                                                                          num_warps=8), return_mode="median")
    return n * iters / (ms * 1e-3)


def make_inputs(b, d, n, L, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    bf = torch.bfloat16
    t = dict(u=r(b, d, L).to(bf), delta=(r(b, d, L) * 0.5).to(bf),
             A=-torch.rand(d, n, generator=g, device="cuda") - 0.1,
             B=r(b, n, L).to(bf), C=r(b, n, L).to(bf), D=r(d), z=r(b, d, L).to(bf), delta_bias=r(d) * 0.3)
    for v in t.values():
        v.requires_grad_()
    return t


def time_scan(fn, t: dict, rep_ms: int, backward: bool = True, out_like: str = "u") -> dict:
    """Forward ms, forward+backward ms and the peak bytes a forward+backward allocates beyond its inputs.
    The upstream gradient is random, shaped like input `out_like` (the output's shape)."""
    leaves = list(t.values())
    dout = torch.randn_like(t[out_like])

    def fwd():
        with torch.no_grad():
            return fn(**t)

    def fwd_bwd():
        return torch.autograd.grad(fn(**t), leaves, dout)

    if not backward:
        return dict(fwd_ms=triton.testing.do_bench(fwd, rep=rep_ms, return_mode="median"))
    fwd_bwd()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = fwd_bwd()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del grads
    return dict(fwd_ms=triton.testing.do_bench(fwd, rep=rep_ms, return_mode="median"),
                fwd_bwd_ms=triton.testing.do_bench(fwd_bwd, rep=rep_ms, return_mode="median"),
                peak_extra_mb=peak / 2 ** 20)


def check_against_anchor(ours, anchor, t) -> float:
    """Relative difference of the two kernels' outputs (both bf16): a sanity check that the timed calls
    compute the same function."""
    with torch.no_grad():
        a, b = ours(**t).double(), anchor(**t).double()
    return ((a - b).norm() / b.norm()).item()


def variants(b, d, n, L):
    """Tuning sweep around the default: states per lane (BLOCK_D follows), backward chunk, segment count;
    each timed forward+backward, as {name: ScanConfig}."""
    import kernels
    out = {"default": kernels.default_config(d, L, n, batch=b)}
    for spt in (4, 8, 16):
        for btb in (4, 8):
            for ppsm in (4.0, 8.0, 16.0):
                cfg = kernels.default_config(d, L, n, batch=b, states_per_thread=spt, block_t_bwd=btb,
                                             programs_per_sm=ppsm)
                out.setdefault(f"bd{cfg.block_d} btb{cfg.block_t_bwd} seg{cfg.seg_chunks}", cfg)
    return out


def main(cfg: ScanBenchConfig) -> list[dict]:
    import kernels
    from ssm_core.io import write_json_atomic, write_text_atomic
    if not torch.cuda.is_available():
        from ssm_core.cli import UserError
        raise UserError("benchmarks.scan needs a CUDA GPU")
    anchor = load_anchor(cfg.anchor_dir)
    dev = torch.cuda.get_device_name(0)
    rate = exp2_rate()
    print(f"[bench] {dev}: exp2 {rate / 1e12:.2f} T/s", flush=True)
    rows = []
    ours = lambda **kw: kernels.selective_scan(**kw, delta_softplus=True)  # noqa: E731
    anc = None if anchor is None else lambda **kw: anchor.selective_scan_fn(**kw, delta_softplus=True)  # noqa: E731
    for i, spec in enumerate(cfg.shapes):
        b, d, n, L = (int(v) for v in spec.split(","))
        t = make_inputs(b, d, n, L)
        floor_ms = b * d * L * n / rate * 1e3
        for _ in range(2 if i == 0 else 1):   # warm-up: the first timing of a fresh device is dropped
            row = dict(shape=[b, d, n, L], exp_floor_ms=floor_ms, project=time_scan(ours, t, cfg.rep_ms))
            if anc is not None:
                row["anchor"] = time_scan(anc, t, cfg.rep_ms)
        if anc is not None:
            row["rel_diff_vs_anchor"] = check_against_anchor(ours, anc, t)
        if cfg.variants:
            row["variants"] = {}
            for name, vc in variants(b, d, n, L).items():
                fn = lambda _vc=vc, **kw: kernels.selective_scan(**kw, delta_softplus=True, config=_vc)  # noqa: E731
                t0 = time.time()
                row["variants"][name] = r = time_scan(fn, t, cfg.rep_ms // 2)
                print(f"[bench]   {spec} {name}: fwd {r['fwd_ms']:.3f} fwd+bwd {r.get('fwd_bwd_ms', 0):.3f} "
                      f"peak {r.get('peak_extra_mb', 0):.0f} ({time.time() - t0:.0f}s)", flush=True)
        rows.append(row)
        print(f"[bench] {row}", flush=True)
        del t
        torch.cuda.empty_cache()
    out = Path(cfg.out_dir)
    write_json_atomic(out / "scan.json", dict(device=dev, exp2_per_s=rate, rows=rows,
                                              date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())))
    table = markdown(rows, dev, rate)
    write_text_atomic(out / "scan.md", table)
    print(table, flush=True)
    return rows


def markdown(rows, dev, rate) -> str:
    lines = [f"device: {dev}; exp2 rate {rate / 1e12:.2f} T/s; bf16, softplus, D and z on; medians (ms)", "",
             "| B, D, N, L | exp floor | fwd project | fwd anchor | fwd ratio | fwd+bwd project "
             "| fwd+bwd anchor "
             "| fwd+bwd ratio | fwd+bwd / floor (project, anchor) | peak extra MiB (project, anchor) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, a = r["project"], r.get("anchor")
        f = r["exp_floor_ms"]
        shape = ", ".join(map(str, r["shape"]))
        if a:
            lines.append(f"| {shape} | {f:.3f} | {p['fwd_ms']:.3f} | {a['fwd_ms']:.3f} | "
                         f"{p['fwd_ms'] / a['fwd_ms']:.2f} | {p['fwd_bwd_ms']:.3f} | {a['fwd_bwd_ms']:.3f} | "
                         f"{p['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f} | {p['fwd_bwd_ms'] / f:.1f}, "
                         f"{a['fwd_bwd_ms'] / f:.1f} | {p['peak_extra_mb']:.0f}, {a['peak_extra_mb']:.0f} |")
        else:
            lines.append(f"| {shape} | {f:.3f} | {p['fwd_ms']:.3f} | – | – | {p['fwd_bwd_ms']:.3f} | – | – | "
                         f"{p['fwd_bwd_ms'] / f:.1f}, – | {p['peak_extra_mb']:.0f}, – |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from ssm_core.cli import main_entry
    main_entry(main, ScanBenchConfig, prog="python -m benchmarks.scan")
