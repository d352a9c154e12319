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
