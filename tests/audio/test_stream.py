import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from audio import stream as stream_mod
from audio.features import load_audio, save_audio
from audio.model import load_model
from audio.stream import Detector, StreamConfig, run_stream
from ssm_core import MambaConfig, MambaLM
from ssm_core.cli import UserError, run

from ..helpers import REPO, child_env
from .audio_helpers import LABELS, noise_wave, tiny_model


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "audio.stream", *map(str, args)], cwd=REPO,
                          env=child_env(OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("chunk_ms", [10, 20, 130, 1000])
def test_streamed_posteriors_equal_offline_forward(tiny_model_dir, noise_wav, tmp_path, capsys, chunk_ms):
    out = tmp_path / "post.npy"
    summary = stream_mod.main(StreamConfig(model=str(tiny_model_dir), wav=str(noise_wav), chunk_ms=chunk_ms,
                                           dump_posteriors=str(out)))
    streamed = np.load(out)
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        offline = model(load_audio(noise_wav, 16000)[None]).softmax(-1)[0].numpy()
    assert streamed.shape == offline.shape == (model.config.features.num_frames(int(3.3 * 16000)), len(LABELS))
    assert np.abs(streamed - offline).max() <= 1e-4
    assert offline.max(1).mean() > 0.6          # confident posteriors: the comparison is not of near-uniform rows
    assert summary.audio_seconds == pytest.approx(3.3, abs=1e-3)
    assert "summary: audio 3.30 s, real-time factor" in capsys.readouterr().out


def test_stream_follows_changes_of_the_feature_normalisation():
    """The streaming path folds the normalisation into the encoder's input Linear (cached): changing the
    statistics in place, as audio.train does, must be seen by the next chunk."""
    model = tiny_model()
    wave = torch.from_numpy(noise_wave(0.5))[None]

    def check():
        with torch.inference_mode():
            state = model.init_stream(1)
            streamed = torch.cat([model.stream(wave[:, i:i + 320], state) for i in range(0, wave.shape[1], 320)], 1)
            torch.testing.assert_close(streamed, model(wave), rtol=1e-4, atol=1e-4)

    check()
    with torch.no_grad():
        model.feat_mean.copy_(torch.linspace(-6, -3, model.feat_mean.numel()))
        model.feat_std.mul_(1.5)
    check()


def test_detector_smooths_thresholds_and_times_events():
    labels = ["yes", "no", "_silence_"]
    post = np.tile([0.0, 0.0, 1.0], (100, 1))
    post[30:50] = [0.9, 0.05, 0.05]          # "yes" for 20 frames: smoothed >= 0.6 over frames 33-50
    post[70] = [0.0, 1.0, 0.0]               # a one-frame blip of "no": smoothing removes it
    det = Detector(labels, ["yes", "no"], frame_end=lambda i: i * 0.01, smooth_frames=5, threshold=0.6)
    found = det.update(post[:40]) + det.update(post[40:]) + det.flush()
    assert [d.keyword for d in found] == ["yes"]
    assert found[0].start == pytest.approx(0.33) and found[0].end == pytest.approx(0.50)
    assert found[0].score == pytest.approx(0.9)


class FakeInputStream:
    """Stands in for sounddevice.InputStream: hands out a prepared signal block by block, then nothing."""
    opened = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.wave = noise_wave(2.0, seed=3)[:, None]
        self.pos = 0
        FakeInputStream.opened.append(kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, frames):
        block = self.wave[self.pos: self.pos + frames]
        self.pos += frames
        return block, False


def test_mic_path_with_injected_input_stream(tiny_model_dir, capsys):
    cfg = StreamConfig(model=str(tiny_model_dir), mic=True, chunk_ms=40, jsonl=True, threshold=0.3)
    summary = stream_mod.main(cfg, open_stream=FakeInputStream)
    assert FakeInputStream.opened[-1]["samplerate"] == 16000 and FakeInputStream.opened[-1]["blocksize"] == 640
    assert summary.audio_seconds == pytest.approx(2.0) and summary.chunks == 50
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1]["type"] == "summary" and lines[-1]["audio_seconds"] == pytest.approx(2.0)
    assert all(line["type"] == "detection" and line["keyword"] in ("yes", "no") for line in lines[:-1])
    # The posteriors seen live equal the offline ones for the same samples.
    model = load_model(tiny_model_dir)
    det = Detector(model.labels, ["yes", "no"], lambda i: 0.0, 1, 0.5)
    chunks = (noise_wave(2.0, seed=3)[i: i + 640] for i in range(0, 32000, 640))
    _, live = run_stream(model, chunks, det, 40, keep_posteriors=True)
    with torch.no_grad():
        offline = model(torch.from_numpy(noise_wave(2.0, seed=3))[None]).softmax(-1)[0].numpy()
    assert np.abs(live - offline).max() <= 1e-4


def test_mic_missing_sounddevice_or_portaudio(tiny_model_dir, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sounddevice", None)          # not installed
    with pytest.raises(UserError, match=r"needs the sounddevice package"):
        stream_mod.open_sounddevice_stream(samplerate=16000)
    (tmp_path / "sounddevice.py").write_text("raise OSError('PortAudio library not found')\n")
    monkeypatch.delitem(sys.modules, "sounddevice")
    monkeypatch.syspath_prepend(str(tmp_path))                       # installed, but libportaudio2 is not
    with pytest.raises(UserError, match=r"PortAudio library is missing.*libportaudio2"):
        stream_mod.open_sounddevice_stream(samplerate=16000)


def test_bad_input_gives_one_line_and_exit_2(tiny_model_dir, noise_wav, tmp_path, capsys):
    empty, junk = tmp_path / "empty.wav", tmp_path / "junk.wav"
    save_audio(empty, np.zeros(0, np.float32), 16000)
    junk.write_bytes(b"RIFF not really")
    cut = tmp_path / "cut.wav"          # a recording cut short: its header announces more than it holds
    cut.write_bytes(Path(noise_wav).read_bytes()[:20000])
    lm_dir = tmp_path / "lm"
    MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=5)).save_pretrained(lm_dir)
    other_ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other_ckpt)
    cases = [
        (["--model", tiny_model_dir, "--wav", empty], "empty"),
        (["--model", tiny_model_dir, "--wav", junk], "cannot read audio"),
        (["--model", tiny_model_dir, "--wav", cut], "the file is truncated"),
        (["--model", other_ckpt, "--wav", noise_wav], "not an audio keyword-spotting checkpoint"),
        (["--model", lm_dir, "--wav", noise_wav], "not an audio keyword spotter"),
        (["--model", noise_wav, "--wav", noise_wav], "not a readable checkpoint"),
        (["--model", tiny_model_dir, "--wav", noise_wav, "--chunk-ms", "5"], "--chunk-ms"),
        (["--model", tiny_model_dir, "--wav", noise_wav, "--mic"], "exactly one input"),
    ]
    for args, expected in cases:      # in-process: the same code path as the command line, without start-up
        assert run(stream_mod.main, StreamConfig, [str(a) for a in args], prog="audio.stream") == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (args, err)
    # One through a real process: no traceback reaches the user. Here sounddevice is not installed (the
    # [mic] extra) or PortAudio is missing, so --mic must fail with one line.
    r = cli("--model", tiny_model_dir, "--mic")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "--mic" in lines[0] and "Traceback" not in r.stderr, r.stderr


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_an_hour_of_audio_streams_in_flat_memory():
    """3600 s of cheap synthetic audio in 4 s chunks: resident memory stays flat over the hour, and Python
    allocations over its last quarter (traced only there: tracing every allocation triples the time)."""
    torch.manual_seed(0)
    model = tiny_model(d_model=8, n_layer=1)
    chunk_s, seconds, traced_from = 4, 3600, 2700
    base = noise_wave(chunk_s, seed=1)

    def chunks(start, stop):
        for i in range(start // chunk_s, stop // chunk_s):
            yield base * (0.5 + 0.5 * np.sin(i / 7.0))

    det = Detector(model.labels, ["yes", "no"], lambda i: i * 0.01, 15, 0.6)
    state = model.init_stream(1)
    # Warm up (allocator pools, first-call caches), then measure the remaining 58 minutes.
    for c in chunks(0, 120):
        with torch.inference_mode():
            det.update(model.stream(torch.from_numpy(c)[None], state).softmax(-1)[0].numpy())
    rss0 = _rss_mb()
    untraced, _ = run_stream(model, chunks(120, traced_from), det, 1000.0 * chunk_s)
    tracemalloc.start()
    summary, kept = run_stream(model, chunks(traced_from, seconds), det, 1000.0 * chunk_s)
    py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    assert kept is None and untraced.audio_seconds + summary.audio_seconds == pytest.approx(seconds - 120)
    assert summary.chunks == (seconds - traced_from) // chunk_s
    assert _rss_mb() - rss0 < 25, "resident memory grew while streaming"
    # About 1.1 MB of chunk-sized buffers whatever the length; posteriors kept by mistake (19 kB a chunk) would
    # pass 3 MB within the traced quarter.
    assert py_peak < 3, "Python allocations grew while streaming"
