"""Fixtures of the audio tests: tiny saved models and audio files, built once per session."""
from __future__ import annotations

import pytest

from audio.features import save_audio
from audio.model import export_model

from .audio_helpers import noise_wave, tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("kws") / "model"
    export_model(tiny_model(), d)
    return d


@pytest.fixture(scope="session")
def noise_wav(tmp_path_factory):
    p = tmp_path_factory.mktemp("wav") / "noise.wav"
    save_audio(p, noise_wave(3.3), 16000)
    return p
