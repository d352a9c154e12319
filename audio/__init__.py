"""audio: streaming keyword spotting with a causal Mamba encoder.

    audio.features   log-mel front-end (offline and exact streaming form), audio file I/O
    audio.model      KeywordSpotter: front-end -> ssm_core.MambaModel -> per-frame class logits; load_model
    audio.data       Speech Commands folders (and the torchaudio download): splits, label sets
    audio.synth      the embedded default dataset spoken by espeak-ng; `python -m audio.synth` demo streams
    audio.train      `python -m audio.train`      (Lightning)
    audio.evaluate   `python -m audio.evaluate`   accuracy, macro-F1, confusion matrix PNG
    audio.stream     `python -m audio.stream`     chunked inference from a file or a microphone
"""
from .features import FeatureConfig, LogMel, StreamingLogMel, load_audio
from .model import KeywordSpotter, KWSConfig, load_model

__all__ = ["FeatureConfig", "KWSConfig", "KeywordSpotter", "LogMel", "StreamingLogMel", "load_audio", "load_model"]
