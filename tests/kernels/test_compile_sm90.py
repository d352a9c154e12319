"""The backward kernels compile for an H100 (sm_90) on a machine without one: Triton compiles ahead of time
with the ptxas its wheel ships, so a kernel edit that the CPU interpreter accepts but the GPU compiler would
refuse (a type the interpreter lets pass, a layout it cannot lower) fails here, in CI, not on the device.
They are the kernels with the most code paths (the scan's lane exchange, the conv and SSD's copies of their
shared sums, on and off); the interpreter tests check what they compute.

The compile runs in a child process: tests/conftest.py sets TRITON_INTERPRET=1 for this one, which makes
every @triton.jit function an interpreted one.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from ..helpers import child_env

SCRIPT = r'''
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.conv as conv
import kernels.scan as scan
import kernels.ssd as ssd


def build(i):
    """jobs[i]'s fn for sm_90 with its constexprs; every pointer fp32, every other argument i32."""
    fn, consts, warps = jobs[i]
    names = fn.arg_names
    sig = {n: "constexpr" if n in consts else "*fp32" if n.endswith("_ptr") else "i32" for n in names}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()})
    assert triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps,
                                                                           "num_stages": 3}).asm["cubin"]
    return f"ok {fn.__name__} {consts}"


jobs = [(conv._conv_bwd_kernel, dict(K=4, HAS_INIT=False, HAS_BIAS=True, SILU=True, LANES_T=4, BLOCK_T=8,
                                     BLOCK_D=32, DETERMINISTIC=det), 4) for det in (False, True)]
jobs += [(scan._scan_bwd_kernel, dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, SOFTPLUS=True, HAS_RESET=False,
                                      HAS_KIN=False, LANE_EXCHANGE=exchange, BLOCK_D=16, BLOCK_T=4, LANES=2,
                                      SPT=8, SPAN_CHUNKS=16), 1)
         for exchange in (False, True)]   # N = 16 in blocks of 16 channels: 2 lanes a channel, 8 states each
tiles = dict(Q=256, BM=64, BP=64, BN=64)      # SSDConfig's defaults at head dim 64, d_state 64
jobs += [(ssd._bwd_dx, dict(HAS_D=True, D_HDIM=d_hdim, **tiles), 4) for d_hdim in (False, True)]
jobs += [(ssd._bwd_db, dict(HPP=8, **tiles), 4), (ssd._bwd_dc, dict(HPP=8, HPP2=8, **tiles), 8)]
# One compile per CPU at a time (each is single-threaded); forked workers inherit `jobs` (a jitted function
# does not pickle) and need no importable main.
with ProcessPoolExecutor(os.cpu_count(), mp_context=multiprocessing.get_context("fork")) as pool:
    for line in pool.map(build, range(len(jobs))):
        print(line)
'''


def test_backward_kernels_compile_for_sm90(tmp_path):
    pytest.importorskip("triton.backends.nvidia", reason="this Triton has no NVIDIA backend")
    env = child_env(TRITON_CACHE_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 8, proc.stdout
