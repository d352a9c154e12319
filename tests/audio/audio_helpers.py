"""Shared helpers of the audio tests (imported by conftest and the test modules)."""
from __future__ import annotations

import numpy as np
import torch

from audio.model import KeywordSpotter, KWSConfig
from ssm_core import MambaConfig

LABELS = ["yes", "no", "_silence_", "_unknown_"]


def tiny_model(seed: int = 0, d_model: int = 16, n_layer: int = 2, labels=LABELS) -> KeywordSpotter:
    """Random weights, but a non-trivial feature normalisation so every piece of the path is exercised."""
    torch.manual_seed(seed)
    encoder = MambaConfig(d_model=d_model, n_layer=n_layer, d_state=8, d_input=80)
    m = KeywordSpotter(KWSConfig(labels=list(labels), encoder=encoder))
    with torch.no_grad():
        m.feat_mean.uniform_(-8, -2)
        m.feat_std.uniform_(1, 3)
        m.head.weight.mul_(20)   # confident posteriors, so the streamed and offline ones differ visibly if wrong
    return m.eval()




def noise_wave(seconds: float, seed: int = 0, sr: int = 16000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    return (0.1 * rng.standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * 300 * t) * (t % 1.0 < 0.4)).astype(np.float32)
