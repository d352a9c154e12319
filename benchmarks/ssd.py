"""Mamba-2 chunked SSD: the project's Triton kernel (kernels.ssd_chunk_scan) against the official Triton SSD
(mamba_ssm's mamba_chunk_scan_combined), side by side in one process, plus a correctness sweep on the GPU.

    # on the device, with the anchor copied into .bench/ (see ../shared/bench/README.md)
    python -m benchmarks.ssd --out-dir $OUT

1. Correctness: the Triton kernel (fp32 and bf16 inputs) and the anchor vs the PyTorch reference
   (ssm_core.ssd_chunk_scan_ref in fp32 on the GPU): output, final state and every gradient, ragged L,
   groups, D per head and per channel, z gating, initial state.
2. Timing (the mixers' benchmark shapes): headdim 64, 24 heads (d_inner 1536), one group, d_state 64 and 128,
   chunk 256, bf16 x/dt/B/C, fp32 A/D/dt_bias, dt_softplus; forward and forward+backward medians
   (triton.testing.do_bench), ratio project / anchor, and the relative difference of the two outputs.
Writes ssd.json and ssd.md under --out-dir.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.scan import load_anchor, time_scan

# (batch, L) x d_state, as the issue asks.
SHAPES = [f"{b},{L},{n}" for n in (64, 128) for b, L in ((8, 8192), (8, 2048), (1, 65536), (1, 262144))]


@dataclass
class SSDBenchConfig:
    out_dir: str = field(default="bench_out", metadata={"help": "where ssd.json / ssd.md go"})
    anchor_dir: str = field(default=".bench", metadata={"help": "folder holding mamba_reference.py"})
    shapes: list[str] = field(default_factory=lambda: list(SHAPES), metadata={"help": "batch,L,d_state shapes"})
    nheads: int = 24
    headdim: int = 64
    chunk_size: int = 256
    rep_ms: int = 100
    check: bool = field(default=True, metadata={"help": "run the correctness sweep first"})
    variants: bool = field(default=False, metadata={"help": "last, time alternative kernel settings (tuning "
                                                              "information) at --variant-shapes"})
    variant_shapes: list[str] = field(default_factory=list, metadata={"help": "batch,L,d_state shapes for "
                                                                      "--variants (default: the first of --shapes)"})
    kernels: bool = field(default=False, metadata={"help": "also profile one forward+backward per shape: GPU ms "
                                                             "per kernel, project and anchor (torch.profiler)"})


# Alternative kernels.SSDConfig fields timed with --variants (the defaults are the table's).
VARIANTS = {"warps_bwd_dx=8": {"warps_bwd_dx": 8}, "warps_bwd_db=8": {"warps_bwd_db": 8},
            "warps_bwd_dc=4": {"warps_bwd_dc": 4}, "heads_per_program=4": {"heads_per_program": 4},
            "heads_per_program=24": {"heads_per_program": 24}, "state_block=256": {"state_block": 256}}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def sweep_inputs(b, L, h, p, g, n, dtype, D_hdim, gated, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    t = dict(x=r(b, L, h, p).to(dtype), dt=(r(b, L, h) - 1).to(dtype), A=-torch.rand(h, generator=gen, device=device) - 0.5,
             B=r(b, L, g, n).to(dtype), C=r(b, L, g, n).to(dtype), D=r(h, p) if D_hdim else r(h),
             dt_bias=r(h) * 0.3, initial_states=r(b, h, p, n))
    if gated:
        t["z"] = r(b, L, h, p).to(dtype)
    return {k: v.requires_grad_() for k, v in t.items()}


# b, L, h, p, g, n, chunk, D per channel, z gating, dtypes. Few cases: each is a fresh Triton compile.
CHECK_CASES = [(2, 777, 8, 64, 2, 128, 256, True, True, (torch.float32, torch.bfloat16)),
               (1, 400, 2, 32, 1, 256, 128, False, False, (torch.bfloat16,)),
               # 70 chunks: the state passes' groups of chunks, the last one ragged
               (1, 2230, 4, 64, 1, 64, 32, False, True, (torch.float32, torch.bfloat16))]


def correctness(anchor=None, device="cuda", cases=CHECK_CASES) -> list[dict]:
    """Every output and gradient of the kernel (and of the anchor, if given) vs the fp32 reference."""
    from kernels import ssd_chunk_scan
    from ssm_core import ssd_chunk_scan_ref
    rows = []
    for i, (b, L, h, p, g, n, Q, Dh, gated, dtypes) in enumerate(cases):
        for dtype in dtypes:
            t = sweep_inputs(b, L, h, p, g, n, dtype, Dh, gated, seed=i, device=device)
            ref_t = {k: v.detach().float().requires_grad_() for k, v in t.items()}
            y0, H0 = ssd_chunk_scan_ref(**ref_t, chunk_size=Q, dt_softplus=True, return_final_states=True)
            gy, gH = torch.randn_like(y0), torch.randn_like(H0)
            g0 = torch.autograd.grad((y0 * gy).sum() + (H0 * gH).sum(), list(ref_t.values()))
            impls = {"project": ssd_chunk_scan}
            if anchor is not None:
                impls["anchor"] = anchor.mamba_chunk_scan_combined
            for name, fn in impls.items():
                try:
                    y, H = fn(**t, chunk_size=Q, dt_softplus=True, return_final_states=True)
                    grads = torch.autograd.grad((y.float() * gy).sum() + (H.float() * gH).sum(), list(t.values()))
                except Exception as e:  # e.g. a tile that does not fit: record it, go on with the others
                    rows.append(dict(impl=name, case=[b, L, h, p, g, n, Q, Dh, gated], dtype=str(dtype).split(".")[-1],
                                     error=f"{type(e).__name__}: {str(e)[:300]}"))
                    print(f"[check] {name} {rows[-1]['case']} FAILED: {rows[-1]['error']}", flush=True)
                    continue
                errs = {"y": rel(y, y0), "final_state": rel(H, H0)}
                errs.update({f"d{k}": rel(a, b_) for k, a, b_ in zip(t, grads, g0)})
                nan = any(not torch.isfinite(v).all() for v in (y, H, *grads))
                rows.append(dict(impl=name, case=[b, L, h, p, g, n, Q, Dh, gated], dtype=str(dtype).split(".")[-1],
                                 max_rel_err=max(errs.values()), errs=errs, nonfinite=nan))
                print(f"[check] {name:8s} {rows[-1]['case']} {rows[-1]['dtype']}: max rel err "
                      f"{rows[-1]['max_rel_err']:.2e} (worst {max(errs, key=errs.get)}){' NONFINITE' if nan else ''}",
                      flush=True)
    return rows


def bench_inputs(b, L, h, p, n):
    gen = torch.Generator(device="cuda").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda")  # noqa: E731
    bf = torch.bfloat16
    t = dict(x=r(b, L, h, p).to(bf), dt=(r(b, L, h) - 1).to(bf), A=-torch.rand(h, generator=gen, device="cuda") - 0.5,
             B=r(b, L, 1, n).to(bf), C=r(b, L, 1, n).to(bf), D=r(h), dt_bias=r(h) * 0.3)
    return {k: v.requires_grad_() for k, v in t.items()}


def main(cfg: SSDBenchConfig) -> dict:
    from ssm_core.cli import UserError
    from ssm_core.io import write_json_atomic, write_text_atomic
    if not torch.cuda.is_available():
        raise UserError("benchmarks.ssd needs a CUDA GPU")
    from kernels import ssd_chunk_scan
    anchor = load_anchor(cfg.anchor_dir)
    dev = torch.cuda.get_device_name(0)
    result = dict(device=dev, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), config=vars(cfg))
    out = Path(cfg.out_dir)
    if cfg.check:
        result["correctness"] = correctness()
        write_json_atomic(out / "ssd.json", result)
    rows = []
    for spec in cfg.shapes:
        b, L, n = (int(v) for v in spec.split(","))
        t = bench_inputs(b, L, cfg.nheads, cfg.headdim, n)
        kw = dict(chunk_size=cfg.chunk_size, dt_softplus=True)
        ours = lambda _kw=kw, **a: ssd_chunk_scan(**a, **_kw)  # noqa: E731
        row = dict(batch=b, L=L, d_state=n)
        try:
            row["project"] = time_scan(ours, t, cfg.rep_ms, out_like="x")
            if anchor is not None:
                anc = lambda _kw=kw, **a: anchor.mamba_chunk_scan_combined(**a, **_kw)  # noqa: E731
                row["anchor"] = time_scan(anc, t, cfg.rep_ms, out_like="x")
                with torch.no_grad():
                    row["rel_diff_vs_anchor"] = rel(ours(**t), anc(**t))
                # The gradients too, at the timed shape (the two kernels round differently in bf16).
                dy = torch.randn_like(t["x"])
                g_ours = torch.autograd.grad(ours(**t), list(t.values()), dy)
                g_anc = torch.autograd.grad(anc(**t), list(t.values()), dy)
                row["grad_rel_diff_vs_anchor"] = {f"d{k}": rel(a, b_) for k, a, b_ in zip(t, g_ours, g_anc)}
            if cfg.kernels:
                row["kernels_project"] = kernel_times(ours, t)
                if anchor is not None:
                    row["kernels_anchor"] = kernel_times(anc, t)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        rows.append(row)
        print(f"[bench] {row}", flush=True)
        result["rows"] = rows
        write_json_atomic(out / "ssd.json", result)
        del t
        torch.cuda.empty_cache()
    table = markdown(result)
    write_text_atomic(out / "ssd.md", table)
    print(table, flush=True)
    if cfg.variants:
        result["variants"] = time_variants(cfg)
        write_json_atomic(out / "ssd.json", result)
    return result


def kernel_times(fn, t: dict, iters: int = 5) -> dict[str, float]:
    """GPU ms of each kernel (by name, summed over its launches) per forward+backward, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile
    leaves, dout = list(t.values()), torch.randn_like(t["x"])
    torch.autograd.grad(fn(**t), leaves, dout)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            torch.autograd.grad(fn(**t), leaves, dout)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0)
        if us > 0:
            out[e.key[:80]] = round(us / 1e3 / iters, 4)
    out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
    print(f"[kernels] total {sum(out.values()):.3f} ms: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()),
          flush=True)
    return out


def time_variants(cfg: SSDBenchConfig) -> list[dict]:
    from kernels import SSDConfig, ssd_chunk_scan
    results = []
    for spec in cfg.variant_shapes or cfg.shapes[:1]:
        b, L, n = (int(v) for v in spec.split(","))
        t = bench_inputs(b, L, cfg.nheads, cfg.headdim, n)

        def timed(inputs, config=None):
            fn = lambda **a: ssd_chunk_scan(**a, chunk_size=cfg.chunk_size, dt_softplus=True,  # noqa: E731
                                            config=config)
            return time_scan(fn, inputs, cfg.rep_ms, out_like="x")

        res = {"shape": [b, L, n], "default": timed(t)}
        print(f"[variant] {spec} default: {res['default']}", flush=True)
        for name, settings in VARIANTS.items():
            try:
                res[name] = timed(t, SSDConfig(**settings))
            except Exception as e:  # e.g. a setting that does not compile: note it, go on
                res[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            print(f"[variant] {spec} {name}: {res[name]}", flush=True)
        results.append(res)
        del t
        torch.cuda.empty_cache()
    return results


def markdown(result: dict) -> str:
    c = result["config"]
    lines = [f"device: {result['device']}, {result['date']}; {c['nheads']} heads x headdim {c['headdim']}, one group, "
             f"chunk {c['chunk_size']}, bf16, dt_softplus, D on; medians (ms); ratio = project / anchor", "",
             "| batch | L | d_state | fwd project | fwd anchor | fwd ratio | fwd+bwd project | fwd+bwd anchor | "
             "fwd+bwd ratio | rel diff y | max rel diff grads |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result.get("rows", []):
        p, a = r.get("project"), r.get("anchor")
        if "error" in r or p is None:
            lines.append(f"| {r['batch']} | {r['L']} | {r['d_state']} | failed: {r.get('error', '')[:120]} |")
        elif a:
            lines.append(f"| {r['batch']} | {r['L']} | {r['d_state']} | {p['fwd_ms']:.3f} | {a['fwd_ms']:.3f} | "
                         f"{p['fwd_ms'] / a['fwd_ms']:.2f} | {p['fwd_bwd_ms']:.3f} | {a['fwd_bwd_ms']:.3f} | "
                         f"{p['fwd_bwd_ms'] / a['fwd_bwd_ms']:.2f} | {r['rel_diff_vs_anchor']:.1e} | "
                         f"{max(r['grad_rel_diff_vs_anchor'].values()):.1e} |")
        else:
            lines.append(f"| {r['batch']} | {r['L']} | {r['d_state']} | {p['fwd_ms']:.3f} | – | – | "
                         f"{p['fwd_bwd_ms']:.3f} | – | – | – | – |")
    if result.get("correctness"):
        lines += ["", "Correctness vs the fp32 PyTorch reference (max relative error over y, final state, all grads):",
                  "", "| impl | b, L, h, p, g, N, chunk, D per channel, z | dtype | max rel err |", "|---|---|---|---|"]
        for r in result["correctness"]:
            if "error" in r:
                lines.append(f"| {r['impl']} | {', '.join(map(str, r['case']))} | {r['dtype']} | failed: {r['error'][:120]} |")
                continue
            lines.append(f"| {r['impl']} | {', '.join(map(str, r['case']))} | {r['dtype']} | {r['max_rel_err']:.1e}"
                         f"{' (non-finite!)' if r['nonfinite'] else ''} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from ssm_core.cli import main_entry
    main_entry(main, SSDBenchConfig, prog="python -m benchmarks.ssd")
