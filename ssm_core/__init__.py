"""ssm_core: selective state space models (Mamba) and their pure-PyTorch reference ops.

Public API:
    selective_scan_ref, selective_scan          the scan (reference / dispatched to the fastest backend)
    causal_conv1d, selective_state_update       the other dispatched ops (see ssm_core.ops)
    Mamba, MambaState                           the mixer, mamba_ssm-compatible, streamable
    MambaConfig, MambaModel, MambaLM            the residual backbone and language model
    save_pretrained, from_pretrained            config.json + model.safetensors
    Mamba2, S4D, Attention                      the other mixers (MambaConfig.mixer "mamba2", "s4d", "attention")
    ssd_chunk_scan_ref, ssd_chunk_scan          Mamba-2's chunked SSD (reference / dispatched)
"""
from .attention import Attention, KVCache, hybrid_mixers
from .mamba import Mamba, MambaState

# The other mixers register themselves ("mamba2", "s4d", "attention") on import.
from .mamba2 import Mamba2, Mamba2State
from .model import (
                    MIXERS,
                    MambaConfig,
                    MambaLM,
                    MambaModel,
                    RMSNorm,
                    check_mixer_spec,
                    from_pretrained,
                    register_mixer,
                    save_pretrained,
)
from .ops import backend_for, causal_conv1d, selective_scan, selective_state_update, ssd_chunk_scan
from .reference import causal_conv1d_ref, selective_scan_ref, selective_state_update_ref, ssd_chunk_scan_ref
from .s4d import S4D, S4DState

__all__ = [
    "selective_scan_ref", "selective_scan", "causal_conv1d_ref", "causal_conv1d", "selective_state_update_ref",
    "selective_state_update", "backend_for", "Mamba", "MambaState", "MambaConfig", "MambaModel", "MambaLM",
    "RMSNorm", "MIXERS", "check_mixer_spec", "register_mixer", "save_pretrained", "from_pretrained",
    "Mamba2", "Mamba2State", "ssd_chunk_scan", "ssd_chunk_scan_ref", "S4D", "S4DState", "Attention", "KVCache",
    "hybrid_mixers",
]
