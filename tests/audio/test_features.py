import numpy as np
import pytest
import soundfile as sf
import torch

from audio.features import FeatureConfig, LogMel, StreamingLogMel, load_audio
from ssm_core.cli import UserError


def test_default_frontend_is_16k_25ms_10ms_80mels():
    cfg = FeatureConfig()
    assert (cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.n_mels) == (16000, 400, 160, 80)
    assert LogMel(cfg)(torch.randn(2, 16000)).shape == (2, cfg.num_frames(16000), 80) == (2, 98, 80)


def test_cepstra_keep_the_spectral_envelope_and_drop_the_fine_structure():
    """features.n_cepstra: a ripple along the mel axis faster than the cepstra kept (a voice's harmonics)
    leaves the features unchanged, a slower one (an envelope, a formant) changes them; all of them kept is
    an orthonormal map; and out-of-range values are refused."""
    from audio.model import KeywordSpotter, KWSConfig
    n = 80
    model = KeywordSpotter(KWSConfig(labels=["a", "b"], features=FeatureConfig(n_cepstra=20)))
    assert model.encoder.config.d_input == 20 and model.config.features.dim == 20
    mels = torch.randn(3, 7, n)
    ripple = lambda k: torch.cos(torch.pi * k * (torch.arange(n) + 0.5) / n)   # the DCT-II's k-th basis
    base = model.to_cepstra(mels)
    assert base.shape == (3, 7, 20)
    for k in (20, 31, 79):
        torch.testing.assert_close(model.to_cepstra(mels + 2 * ripple(k)), base, atol=1e-4, rtol=0)
    for k in (0, 3, 19):
        assert (model.to_cepstra(mels + 2 * ripple(k)) - base).abs().max() > 1.0
    full = KeywordSpotter(KWSConfig(labels=["a", "b"], features=FeatureConfig(n_cepstra=n)))
    torch.testing.assert_close(full.to_cepstra(mels).norm(dim=-1), mels.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert KeywordSpotter(KWSConfig(labels=["a", "b"])).to_cepstra(mels) is mels      # 0: the log-mel itself
    for bad in (-1, 81):
        with pytest.raises(ValueError, match="--n-cepstra: expected 0 \\(off\\) to the number of mels \\(80\\), got "):
            FeatureConfig(n_cepstra=bad)


@pytest.mark.parametrize("chunks", [[1] * 50 + [3000], [37] * 200, [160] * 60, [399, 401, 1600, 7], [16000]])
def test_streaming_frames_equal_offline_frames(chunks):
    torch.manual_seed(0)
    wave = torch.randn(2, sum(chunks))
    fe = LogMel(FeatureConfig())
    offline = fe(wave)
    stream, parts, pos = StreamingLogMel(fe, batch_size=2), [], 0
    for n in chunks:
        parts.append(stream.push(wave[:, pos: pos + n]))
        pos += n
        assert stream.pending.shape[1] < fe.cfg.win_length + n   # the carried overlap stays bounded
    streamed = torch.cat(parts, dim=1)
    assert streamed.shape == offline.shape
    torch.testing.assert_close(streamed, offline, atol=1e-4, rtol=1e-5)


def test_streaming_frontend_copes_with_a_reused_chunk_buffer():
    """A live source (a microphone callback) refills one buffer: the carried samples must be a copy."""
    torch.manual_seed(0)
    wave = torch.randn(1, 3200)
    fe = LogMel(FeatureConfig())
    stream, buf, parts = StreamingLogMel(fe), torch.empty(1, 320), []
    for pos in range(0, 3200, 320):
        buf.copy_(wave[:, pos: pos + 320])
        parts.append(stream.push(buf))
    torch.testing.assert_close(torch.cat(parts, dim=1), fe(wave), atol=1e-4, rtol=1e-5)


def test_load_audio_downmixes_and_resamples(tmp_path):
    t = np.arange(8000) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 440 * t), np.zeros_like(t)], axis=1).astype(np.float32) * 0.5
    sf.write(tmp_path / "a.flac", stereo, 8000)
    wave = load_audio(tmp_path / "a.flac", 16000)
    assert wave.shape == (16000,)
    # down-mix averages the channels: peak 0.25; resampled 440 Hz tone keeps its frequency
    assert abs(float(wave.abs().max()) - 0.25) < 0.02
    spectrum = np.abs(np.fft.rfft(wave.numpy()))
    assert abs(int(spectrum.argmax()) - 440) <= 1


def test_bad_audio_files_give_one_line_errors(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    (tmp_path / "junk.wav").write_bytes(b"this is not audio" * 10)
    sf.write(tmp_path / "low.wav", np.zeros(800, np.float32), 800)
    for name, what in [("empty.wav", "empty"), ("junk.wav", "cannot read"), ("low.wav", "cannot be resampled"),
                       ("missing.wav", "no such")]:
        with pytest.raises(UserError, match=what) as e:
            load_audio(tmp_path / name, 16000)
        assert "\n" not in str(e.value) and name in str(e.value)
