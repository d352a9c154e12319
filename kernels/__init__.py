"""Fused Triton kernels for the selective SSM: the ops `ssm_core.ops` dispatches CUDA tensors to.

    selective_scan          Mamba-1 scan, fused forward + backward (ssm_core.selective_scan_ref semantics)
    causal_conv1d           depthwise causal conv with carried tail, forward + backward
    selective_state_update  one decoding step, state updated in place
    rms_norm                RMSNorm, fp32 inside, any input and output dtype
    mamba_inner             the whole selective Mamba block (projections, conv, scan) as one autograd function
    ssd_chunk_scan          Mamba-2's chunked SSD, forward + backward

ScanConfig and SSDConfig are the launch configurations (frozen; passed as `config=`). No nn.Modules here and
no imports from ssm_core or the task packages (tests/test_layering.py checks); tests compare against
ssm_core.reference.
"""
from .conv import causal_conv1d
from .mamba_inner import mamba_inner
from .norm import rms_norm
from .scan import ScanConfig, default_config, selective_scan
from .ssd import SSDConfig, ssd_chunk_scan
from .state_update import selective_state_update

__all__ = ["selective_scan", "causal_conv1d", "selective_state_update", "ScanConfig", "default_config",
           "ssd_chunk_scan", "SSDConfig", "mamba_inner", "rms_norm"]
