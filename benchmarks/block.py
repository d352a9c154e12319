"""Mamba block: `ssm_core.Mamba(768)` on the Triton kernels against the official block's fast path
(mamba_ssm Mamba(768): mamba_inner_fn with causal-conv1d and the CUDA scan), same weights, one process.

    python -m benchmarks.block --out-dir $OUT

Times forward+backward at batch 8, L 8192 under bf16 autocast, and the one-token decode step at batch 1:
eager, and replayed from a CUDA graph (the step is a dozen small launches; a graph removes their CPU
overhead). Writes block.json and block.md under --out-dir.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton

from benchmarks.scan import load_anchor


@dataclass
class BlockBenchConfig:
    out_dir: str = field(default="bench_out", metadata={"help": "where block.json / block.md go"})
    anchor_dir: str = field(default=".bench", metadata={"help": "folder holding mamba_reference.py"})
    d_model: int = 768
    batch: int = 8
    seq_len: int = 8192
    rep_ms: int = 400


def time_fwd_bwd(model, x, rep_ms) -> float:
    params = [p for p in model.parameters()]
    dy = torch.randn_like(x)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = model(x)
        return torch.autograd.grad(y, params + [x], dy)

    return triton.testing.do_bench(step, rep=rep_ms, return_mode="median")


def graphed(step, warmup=3):
    """Capture `step` (no arguments, fixed buffers) in a CUDA graph; returns the replay function."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return g.replay


def main(cfg: BlockBenchConfig) -> dict:
    import ssm_core
    from ssm_core.io import write_json_atomic, write_text_atomic
    torch.manual_seed(0)
    dev = torch.cuda.get_device_name(0)
    anchor = load_anchor(cfg.anchor_dir)
    ours = ssm_core.Mamba(cfg.d_model).cuda()
    res: dict = dict(device=dev, d_model=cfg.d_model, batch=cfg.batch, seq_len=cfg.seq_len,
                     date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    x = torch.randn(cfg.batch, cfg.seq_len, cfg.d_model, device="cuda", requires_grad=True)
    res["project_fwd_bwd_ms"] = time_fwd_bwd(ours, x, cfg.rep_ms)
    if anchor is not None:
        ref = anchor.Mamba(d_model=cfg.d_model).cuda()
        ref.load_state_dict(ours.state_dict())  # parameter-compatible: same weights, same function
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            a, b = ours(x[:1, :2048]).double(), ref(x[:1, :2048]).double()
        res["rel_diff_vs_anchor"] = ((a - b).norm() / b.norm()).item()
        res["anchor_fwd_bwd_ms"] = time_fwd_bwd(ref, x, cfg.rep_ms)
    del x
    torch.cuda.empty_cache()

    # One-token decode at batch 1 (fp32 weights, as the anchor's step is usually run).
    x1 = torch.randn(1, 1, cfg.d_model, device="cuda")
    state = ours.init_state(1)
    with torch.no_grad():
        step = lambda: ours.stream(x1, state)  # noqa: E731
        res["project_step_ms"] = triton.testing.do_bench(step, rep=cfg.rep_ms, return_mode="median")
        res["project_step_graph_ms"] = triton.testing.do_bench(graphed(step), rep=cfg.rep_ms,
                                                               return_mode="median")
        if anchor is not None:
            conv_state = torch.zeros(1, ref.d_inner, ref.d_conv, device="cuda")
            ssm_state = torch.zeros(1, ref.d_inner, ref.d_state, device="cuda")
            astep = lambda: ref.step(x1, conv_state, ssm_state)  # noqa: E731
            res["anchor_step_ms"] = triton.testing.do_bench(astep, rep=cfg.rep_ms, return_mode="median")
            try:
                res["anchor_step_graph_ms"] = triton.testing.do_bench(graphed(astep), rep=cfg.rep_ms,
                                                                      return_mode="median")
            except Exception as e:  # report, do not hide: the anchor may not be capturable
                res["anchor_step_graph_error"] = repr(e)[:200]
    out = Path(cfg.out_dir)
    write_json_atomic(out / "block.json", res)
    lines = [(f"device: {dev}; Mamba(d_model={cfg.d_model}), bf16 autocast fwd+bwd at ({cfg.batch}, "
              f"{cfg.seq_len}); decode batch 1 fp32; medians (ms)"),
             "", "| measurement | project | anchor | ratio |", "|---|---|---|---|"]
    for name, p, a in (("block fwd+bwd", "project_fwd_bwd_ms", "anchor_fwd_bwd_ms"),
                       ("decode step, eager", "project_step_ms", "anchor_step_ms"),
                       ("decode step, project graphed vs anchor eager", "project_step_graph_ms",
                        "anchor_step_ms"),
                       ("decode step, both graphed", "project_step_graph_ms", "anchor_step_graph_ms")):
        pv, av = res.get(p), res.get(a)
        if pv is not None:
            ratio = f"{av:.3f} | {pv / av:.2f}" if av else "– | –"
            lines.append(f"| {name} | {pv:.3f} | {ratio} |")
    table = "\n".join(lines) + "\n"
    write_text_atomic(out / "block.md", table)
    print(res, flush=True)
    print(table, flush=True)
    return res


if __name__ == "__main__":
    from ssm_core.cli import main_entry
    main_entry(main, BlockBenchConfig, prog="python -m benchmarks.block")
