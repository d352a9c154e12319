"""Several engines, held-out engine sets, channel augmentation, the threshold sweep, the streaming
evaluation and the shipped model."""
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import augment, engines, heldout, ship, stream, stream_eval, synth
from audio.data import KEYWORDS, build_splits
from audio.features import save_audio
from audio.model import KWSConfig, export_model, load_model
from ssm_core.cli import UserError, run

from .audio_helpers import tiny_model

LABELS12 = KEYWORDS + ["_silence_", "_unknown_"]


def test_voices_name_their_engine_and_clips_keep_it():
    assert engines.split_voice("en-us+m1") == ("espeak", "en-us+m1")
    assert engines.split_voice("piper:joe/2") == ("piper", "joe/2")
    assert engines.split_voice("pico:en-GB/1") == ("pico", "en-GB/1")
    with pytest.raises(UserError, match="unknown engine 'festival'"):
        engines.split_voice("festival:kal")
    for voice in ("en-us+m1", "piper:joe/2", "flite:slt", "pico:en-US/2"):
        assert synth.clip_engine(f"yes/{synth.clip_name(voice, 160, 50)}") == engines.engine_of(voice)
    # the full set's training engines: espeak-ng always, Piper only when asked; tests and validation voices
    # are espeak-ng's held-out ones either way
    assert synth.synth_config("full", 0).engines() == ["espeak"]
    assert synth.synth_config("full", 0, ["espeak", "piper"]).engines() == ["espeak", "piper"]
    full = synth.synth_config("full", 0, ["espeak", "pico", "piper"])
    assert full.engines() == ["espeak", "pico", "piper"]
    assert sum(engines.engine_of(v) == "pico" for v in full.train_voices) == 6     # 2 voices x 3 pitches
    with pytest.raises(UserError, match="--synth-engines"):
        synth.synth_config("full", 0, ["piper"])


def test_a_word_sounds_the_same_whatever_was_spoken_before(tmp_path):
    """espeak-ng's wave generator keeps state from one utterance to the next (its pitch flutter's position)
    and seeds its noise from the clock, and Pico reads some memory before writing it: each espeak-ng word now
    comes from a fresh, seeded engine and Pico's memory is filled first. (What that buys: a set built by a pool
    of workers is byte-equal to one built in one process, test_synthesis_in_worker_processes_makes_the_same_set.)"""
    # (en-us+caleb: a variant that draws from the C library's rand() as well as espeak-ng's own generator;
    # Piper, whose sampling noise comes from a generator seeded per session, where the `voices` extra is)
    cases = [("yes", "en-us"), ("backward", "en-us+caleb"), ("left", "pico:en-US/1")]
    for word, voice in cases + ([("no", "piper:joe/2")] if engines.piper_available() else []):
        first = engines.say(word, voice, 115, 20)[0]
        engines.say("marvin", "en-us+m7", 160, 50)
        engines.say("seven", "pico:en-GB/2", 220, 80)
        engines.say("cat", voice, 160, 50)   # the same voice, another word: the state a session would carry
        np.random.rand(300_000)   # (freed memory of another size: what a block Pico reads held before)
        assert np.array_equal(engines.say(word, voice, 115, 20)[0], first), voice
    # a word the cache did not hold is returned as the cache will give it later (16-bit FLAC)
    made = synth.speak("left", "pico:en-US/1", 160, 50, tmp_path / "words")
    assert np.array_equal(synth.speak("left", "pico:en-US/1", 160, 50, tmp_path / "words"), made)


def f0_hz(wave: np.ndarray, rate: int) -> float:
    """The pitch of the loudest 64 ms of a voiced sound, by autocorrelation (60-400 Hz)."""
    n = int(0.064 * rate)
    loud = np.argmax(np.convolve(wave ** 2, np.ones(n), "valid"))
    x = wave[loud: loud + n] - wave[loud: loud + n].mean()
    ac = np.correlate(x, x, "full")[n - 1:]
    lo, hi = rate // 400, rate // 60
    return rate / (lo + int(np.argmax(ac[lo:hi])))


def test_pico_speaks_at_its_rates_and_pitches():
    """SVOX Pico (py-nanotts): slower rates are longer, the voice instances are other pitches, nothing clips."""
    slow, sr = engines.pico_say("seven", "en-US", 115, 50)
    fast, _ = engines.pico_say("seven", "en-US", 220, 50)
    assert sr == 16000 and slow.dtype == np.float32 and slow.size > 1.4 * fast.size
    assert np.abs(slow).max() < 0.999                                      # volume 0.5: no clipped samples
    base, low, high = (f0_hz(engines.pico_say("four", f"en-GB/{k}", 160, 50)[0], sr) for k in range(3))
    assert low < 0.8 * base and high > 1.2 * base
    for bad in ("en-AU", "en-US/3", "en-US/x"):
        with pytest.raises(UserError, match=f"pico: unknown voice '{bad}'"):
            engines.pico_say("yes", bad, 160, 50)


def test_word_cache_serves_engines_that_are_not_installed(tmp_path, monkeypatch):
    """A GPU host without the `voices` extra builds the Piper part of the set from a copied word cache."""
    word = np.linspace(-0.5, 0.5, 4000, dtype=np.float32)
    folder = synth.word_cache_dir(tmp_path) / "piper~joe_3"
    folder.mkdir(parents=True)
    sf.write(str(folder / "yes_160_50.flac"), word, 16000, format="FLAC", subtype="PCM_16")
    monkeypatch.setattr(synth, "say", lambda *a: pytest.fail("the cached word must not be synthesised"))
    assert np.allclose(synth.speak("yes", "piper:joe/3", 160, 50, tmp_path), word, atol=1e-4)
    monkeypatch.setattr(synth, "pico_available", lambda: False)
    assert synth.available_engines(tmp_path) == ["espeak", "piper"]
    assert "piper" not in synth.available_engines(tmp_path / "empty") or engines.piper_available()


def test_training_engines_resolve_to_what_is_installed(tmp_path, monkeypatch, capsys):
    from audio import train
    monkeypatch.setattr(synth, "piper_available", lambda: False)
    monkeypatch.setattr(train, "ensure_dataset", lambda cfg, cache: cfg)      # the set's config, not the set
    cfg = train.AudioTrainConfig(synth_cache=str(tmp_path), output_dir=str(tmp_path / "run"))
    assert train.dataset_root(cfg).engines() == ["espeak", "pico"] and cfg.synth_engines == ["espeak", "pico"]
    assert "from espeak and pico only; pip install 'long-ssm[voices]'" in capsys.readouterr().out
    cfg = train.AudioTrainConfig(synth_cache=str(tmp_path), synth_engines=["espeak", "piper"])
    with pytest.raises(UserError, match="--synth-engines piper: needs the `voices` extra"):
        train.dataset_root(cfg)
    (synth.word_cache_dir(tmp_path) / "piper~joe_0").mkdir(parents=True)
    (synth.word_cache_dir(tmp_path) / "piper~joe_0" / "yes_160_50.flac").write_bytes(b"")
    assert train.dataset_root(cfg).engines() == ["espeak", "piper"]
    monkeypatch.setattr(synth, "pico_available", lambda: False)
    cfg = train.AudioTrainConfig(synth_cache=str(tmp_path), synth_engines=["espeak", "pico"])
    with pytest.raises(UserError, match=r"--synth-engines pico: needs py-nanotts \(pip install py-nanotts\)"):
        train.dataset_root(cfg)


def test_heldout_folder_is_one_engine_in_the_testing_split(tmp_path):
    cfg = heldout.HeldoutConfig(output_dir=str(tmp_path / "h"), voices=["en-us+f5"], words=["yes", "no", "cat"],
                                rates=[130, 160, 190], pitches=[50], noise_seconds=2.0)
    root = heldout.build_heldout(cfg, progress=False)
    splits = build_splits(root, LABELS12)
    assert not splits["train"] and not splits["validation"] and splits["testing"]
    assert {it.label for it in splits["testing"]} >= {0, LABELS12.index("_silence_")}
    from audio.train import heldout_name
    assert heldout_name(root) == "espeak"
    with pytest.raises(UserError, match="exists and is not empty"):
        heldout.build_heldout(cfg, progress=False)


def test_room_channel_and_mic_hiss():
    torch.manual_seed(0)
    sr, n = 16000, 16000
    wave = torch.randn(16, n) * 0.1
    for fn in (lambda w: augment.room_reverb(w, 0.0, sr), lambda w: augment.channel(w, 0.0, 0.5, sr),
               lambda w: augment.mic_noise(w, 0.0, [10, 40])):
        assert torch.equal(fn(wave), wave)
    # a click in a room rings on after it
    click = torch.zeros(4, n)
    click[:, 1000] = 1.0
    wet = augment.room_reverb(click, 1.0, sr)
    assert (wet[:, 1000 + sr // 20:].pow(2).sum(1) > 1e-3).all()
    # a telephone line keeps 300-3400 Hz: white noise loses nearly all its energy outside that band
    phone = augment.channel(wave, 1.0, 1.0, sr)
    spec = torch.fft.rfft(phone).abs().pow(2)
    f = torch.fft.rfftfreq(n, 1 / sr)
    outside = spec[:, (f < 150) | (f > 5000)].sum(1) / spec.sum(1)
    assert (outside < 0.02).all()
    # microphone hiss at 10 dB SNR: noise power a tenth of the signal's
    hissed = augment.mic_noise(wave, 1.0, [10.0, 10.0])
    ratio = (hissed - wave).pow(2).mean(1) / wave.pow(2).mean(1)
    assert torch.allclose(ratio, torch.full_like(ratio, 0.1), rtol=0.1)


def test_threshold_sweep_equals_one_detector_per_threshold_and_refractory_blocks_restarts():
    rng = np.random.default_rng(0)
    labels = ["yes", "no", "_unknown_"]
    post = rng.dirichlet([0.3, 0.3, 0.3], size=400)
    thresholds = np.array([0.3, 0.5, 0.7])
    for refractory in (0, 30):
        sweep = stream.Detector(labels, ["yes", "no"], lambda i: i * 0.01, 3, thresholds, refractory)
        found = sweep.update_all(post) + sweep.flush_all()
        for i, thr in enumerate(thresholds):
            single = stream.Detector(labels, ["yes", "no"], lambda i: i * 0.01, 3, thr, refractory)
            assert [d for j, d in found if j == i] == single.update(post) + single.flush()
    starts = [d.start for j, d in found if j == 0]
    assert len(starts) > 2 and np.diff(starts).min() >= 0.3 - 1e-9      # 30 frames of 10 ms


def test_scorer_counts_hits_misses_and_false_alarms_per_threshold():
    D = stream.Detection
    sc = stream_eval.Scorer(2, tolerance=1.0)
    sc.keyword("yes", 1.0, 2.0)
    sc.keyword("no", 5.0, 6.0)
    noise = stream_eval.NOISE_SEGMENT
    for what, start, end in (("yes", 1.0, 2.0), ("yet", 2.0, 2.8), (noise, 2.8, 5.0), ("no", 5.0, 6.0)):
        sc.spoken(what, start, end)
    sc.detections([(0, D("yes", 2.5, 2.9, 0.9)),       # inside the tolerance after its clip: a hit
                   (0, D("yes", 2.7, 2.9, 0.9)),       # the same word again: a false alarm
                   (1, D("yes", 3.5, 3.9, 0.9)),       # too late: a false alarm, and "yes" is missed
                   (0, D("no", 3.0, 3.1, 0.9))], now=4.0)   # before "no" was spoken: a false alarm
    assert list(sc.hits) == [1, 0] and list(sc.false_alarms) == [2, 1] and list(sc.misses) == [0, 0]
    # each false alarm blamed on what was playing when it started
    assert {c: n.tolist() for c, n in sc.causes.items()} == {
        "yet -> yes": [1, 0], f"{noise} -> yes": [0, 1], f"{noise} -> no": [1, 0]}
    sc.detections([(1, D("no", 5.5, 6.2, 0.8))], now=20.0)  # "yes" closed long ago, "no" now too
    assert list(sc.hits) == [1, 1] and list(sc.misses) == [1, 1]
    sc.keyword("go", 19.5, 20.5)                       # cut by the end of the stream: not counted
    sc.detections([(0, D("go", 19.8, 20.0, 0.9))], now=20.0)
    sc.close(20.0)
    assert list(sc.hits) == [1, 1] and list(sc.misses) == [1, 1] and list(sc.false_alarms) == [2, 1]


def test_threshold_sweep_is_increasing_and_reaches_past_0_99():
    """Each threshold once (arange's float steps had repeated 0.9), and fine steps near 1, where a confident
    model's operating point at a few false alarms an hour lies."""
    t = stream_eval.THRESHOLDS
    assert np.all(np.diff(t) > 0) and t[0] == 0.3 and {0.9, 0.99, 0.995, 0.999} <= set(t.tolist())


def test_streaming_evaluation_writes_curve_and_operating_point(tmp_path):
    root = heldout.build_heldout(heldout.HeldoutConfig(
        output_dir=str(tmp_path / "h"), voices=["en-us+f5"], words=["yes", "no", "cat"], rates=[160],
        pitches=[50], noise_seconds=2.0), progress=False)
    model_dir = tmp_path / "m"
    export_model(tiny_model(labels=LABELS12), model_dir)
    out = tmp_path / "eval"
    assert run(stream_eval.main, stream_eval.StreamEvalConfig,
               ["--model", str(model_dir), "--heldout", str(root), "--hours", str(2 / 60), "--output-dir", str(out)],
               prog="audio.stream_eval") == 0
    result = json.loads((out / "stream_eval.json").read_text())
    assert (out / "stream_eval.png").stat().st_size > 1000
    assert result["keywords_spoken"] > 5 and abs(result["hours"] - 2 / 60) < 1e-3
    miss, fa = np.array(result["miss_rate"]), np.array(result["false_alarms_per_hour"])
    assert ((0 <= miss) & (miss <= 1)).all() and (fa >= 0).all()
    assert miss[0] <= miss[-1] and fa[0] >= fa[-1]          # the lowest threshold finds most and errs most
    op = result["operating_point"]
    assert op["threshold"] in result["thresholds"]
    assert set(result["resident_memory"]) == {"after_1_min_mb", "at_end_mb"}
    # the causes add up to the false alarms at every threshold, and name a stream segment and a keyword
    causes = result["false_alarms_by_cause"]
    assert np.allclose(np.sum(list(causes.values()) or [[0] * fa.size], 0), fa * result["hours"])
    assert all(c.split(" -> ")[0] in {"yes", "no", "cat", stream_eval.NOISE_SEGMENT} for c in causes)


def fake_run(tmp_path):
    run_dir = tmp_path / "run"
    export_model(tiny_model(labels=LABELS12), run_dir / "model")
    (run_dir / "metrics.json").write_text(json.dumps({"labels": LABELS12, "steps": 3, "accuracy_by_engine": {
        "espeak (held-out voices)": 0.5, "flite": 0.25}}))
    (run_dir / "config.yaml").write_text("seed: 0\nsynth_engines: [espeak, piper]\nfreq_warp: 0.15\n")
    ev = tmp_path / "stream_eval.json"
    ev.write_text(json.dumps({"hours": 1.0, "heldout": "x/flite", "keywords_spoken": 500, "smooth_ms": 150.0,
                              "refractory_ms": 1000.0, "operating_point": {
                                  "threshold": 0.85, "miss_rate": 0.05, "false_alarms_per_hour": 1.0}}))
    return run_dir, ev


def test_ship_writes_model_card_and_operating_point_that_stream_uses(tmp_path, monkeypatch, capsys):
    run_dir, ev = fake_run(tmp_path)
    out = tmp_path / "pkg" / "kws"
    args = ["--run", str(run_dir), "--stream-eval", str(ev), "--output", str(out)]
    assert run(ship.main, ship.ShipConfig, args, prog="audio.ship") == 0
    assert {p.name for p in out.iterdir()} == ship.SHIPPED_FILES
    card = (out / "MODEL_CARD.md").read_text()
    assert "never heard a human recording" in card and "| flite | 0.250 |" in card and "threshold 0.85" in card
    assert run(ship.main, ship.ShipConfig, args, prog="audio.ship") == 2            # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert run(ship.main, ship.ShipConfig, [*args, "--overwrite"], prog="audio.ship") == 0
    (out / "notes.txt").write_text("mine")
    assert run(ship.main, ship.ShipConfig, [*args, "--overwrite"], prog="audio.ship") == 2
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()

    # audio.stream without --model uses the shipped folder and its operating point
    import audio.model as model_mod
    monkeypatch.setattr(model_mod, "SHIPPED_MODEL", out)
    wav = tmp_path / "stereo44k.wav"
    sf.write(str(wav), np.random.default_rng(0).standard_normal((44100, 2)).astype(np.float32) * 0.1, 44100)
    seen = {}
    real = stream.Detector.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        seen["threshold"], seen["refractory"] = self.threshold, self.refractory
    monkeypatch.setattr(stream.Detector, "__init__", spy)
    assert run(stream.main, stream.StreamConfig, ["--wav", str(wav)], prog="audio.stream") == 0
    captured = capsys.readouterr()
    assert seen == {"threshold": 0.85, "refractory": 100}
    assert "down-mixed from 2 channels to mono and resampled from 44100 Hz to 16000 Hz" in captured.err
    assert "summary: audio 1.00 s" in captured.out
    assert "note: threshold 0.85 is the shipped model's operating point" in captured.err
    # A threshold the user gave is theirs: no note about it.
    assert run(stream.main, stream.StreamConfig, ["--wav", str(wav), "--threshold", "0.5"], prog="audio.stream") == 0
    assert "operating point" not in capsys.readouterr().err
    monkeypatch.setattr(model_mod, "SHIPPED_MODEL", tmp_path / "nothing")
    assert run(stream.main, stream.StreamConfig, ["--wav", str(wav)], prog="audio.stream") == 2
    assert "no shipped model" in capsys.readouterr().err


def test_shipped_model_accuracy_on_voices_generated_now():
    """Regression guard of the model in the package: keywords spoken now by espeak-ng's held-out voices
    (never in its training set), clean, one per second. (Its accuracy there was 0.962 on the full test
    split; a model that lost its words would fall far below 0.9.)"""
    from audio.model import SHIPPED_MODEL
    torch.set_num_threads(1)
    model = load_model(SHIPPED_MODEL)
    cfg = synth.SynthConfig()
    rng = np.random.default_rng(0)
    waves, labels = [], []
    for voice in cfg.test_voices:
        for word in KEYWORDS:
            w = synth.speak(word, voice, 160, 50)[: 12000]
            clip = np.zeros(16000, np.float32)
            start = int(rng.integers(800, 13600 - w.size))
            clip[start:start + w.size] = w
            waves.append(clip)
            labels.append(model.labels.index(word))
    with torch.no_grad():
        pred = model.clip_scores(model(torch.from_numpy(np.stack(waves)))).argmax(-1).numpy()
    accuracy = float((pred == np.array(labels)).mean())
    assert accuracy >= 0.9, f"shipped model: {accuracy:.3f} on 30 clean clips of the held-out espeak voices"


def test_kws_config_survives_ship_roundtrip(tmp_path):
    run_dir, ev = fake_run(tmp_path)
    out = ship.ship(ship.ShipConfig(run=str(run_dir), stream_eval=str(ev), output=str(tmp_path / "o")))
    a, b = load_model(run_dir / "model"), load_model(out)
    assert isinstance(b.config, KWSConfig) and b.labels == a.labels
    x = torch.randn(1, 8000)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    save_audio(tmp_path / "x.wav", x[0].numpy(), 16000)


def test_engine_balance_shares_and_weights():
    from audio import train
    from audio.data import Item
    from ssm_core.training import weighted_draw
    counts = {"espeak": 900, "piper": 100}
    assert train.engine_shares(counts, 0) == pytest.approx({"espeak": 0.9, "piper": 0.1})
    assert train.engine_shares(counts, 1) == pytest.approx({"espeak": 0.5, "piper": 0.5})
    assert train.engine_shares(counts, 0.5) == pytest.approx({"espeak": 0.75, "piper": 0.25})   # 30 : 10
    assert train.engine_shares({"espeak": 7}, 1) == {"espeak": 1.0}
    # 90 espeak-ng clips, 10 Piper ones and 25 of silence (cut from a noise file: no engine)
    clip = lambda voice, k: Item(f"/set/yes/{synth.clip_name(voice, 100 + k, 50)}", 0)
    items = ([clip("en-us+m1", k) for k in range(90)] + [clip("piper:joe/1", k) for k in range(10)]
             + [Item("/set/_background_noise_/pink.wav", 10, offset=k) for k in range(25)])
    split = lambda epoch: ({k: share for k, (share, _) in epoch.items()}, {k: n for k, (_, n) in epoch.items()})
    weights, epoch = train.engine_weights(items, 1.0)
    shares, clips = split(epoch)
    assert shares == pytest.approx({"espeak": 0.4, "piper": 0.4, "_silence_": 0.2})
    assert clips == {"espeak": 90, "piper": 10, "_silence_": 25}
    w = torch.tensor(weights, dtype=torch.float64)
    assert w[90:100].sum() / w.sum() == pytest.approx(0.4) and w[100:].sum() / w.sum() == pytest.approx(0.2)
    # drawn by EpochBatches' rule: each Piper clip 0.4 x 125 / 10 = 5 times an epoch
    drawn = torch.bincount(weighted_draw(w, len(items), torch.Generator().manual_seed(0)), minlength=len(items))
    assert (drawn[90:100] == 5).all() and drawn.sum() == len(items)
    # balance 0 and a single engine: no weights (the epochs of a run without the flag), the shares by counts
    weights, epoch = train.engine_weights(items, 0.0)
    assert weights is None and split(epoch)[0] == pytest.approx({"espeak": 0.72, "piper": 0.08, "_silence_": 0.2})
    weights, epoch = train.engine_weights(items[:90], 1.0)
    assert weights is None and epoch == {"espeak": (1.0, 90)}


def test_engine_balance_flag(tmp_path, monkeypatch, capsys):
    """Its bad values are one line; on a set of two engines the training clips are drawn by the weights."""
    from audio import train
    for value in ("1.5", "-0.1"):
        assert run(train.main, train.AudioTrainConfig, ["--engine-balance", value], prog="audio.train") == 2
        assert f"--engine-balance: expected 0 to 1, got {float(value)}" in capsys.readouterr().err
    assert run(train.main, train.AudioTrainConfig, ["--engine-balance", "1", "--data", str(tmp_path)],
               prog="audio.train") == 2
    assert "--engine-balance: only for the embedded synthetic set" in capsys.readouterr().err
    # the tiny set with the Piper voice's words from a word cache (a tone each), trained one step
    cfg = synth.synth_config("tiny", 0, ["espeak", "piper"])
    folder = synth.word_cache_dir(tmp_path / "cache") / "piper~joe_0"
    folder.mkdir(parents=True)
    tone = (0.3 * np.sin(np.arange(8000) / 7)).astype(np.float32)
    for word in cfg.words:
        sf.write(str(folder / f"{word}_160_50.flac"), tone, 16000, format="FLAC", subtype="PCM_16")
    monkeypatch.setattr(synth, "piper_available", lambda: False)
    from ssm_core import training
    samplers = []
    monkeypatch.setattr(train, "EpochBatches", lambda *a, **kw: samplers.append(training.EpochBatches(*a, **kw))
                        or samplers[-1])
    assert run(train.main, train.AudioTrainConfig,
               ["--synth-size", "tiny", "--synth-cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"),
                "--max-steps", "1", "--batch-size", "8", "--model.d_model", "16", "--model.n_layer", "1",
                "--val-every", "1", "--accelerator", "cpu", "--engine-balance", "1",
                "--synth-engines", "[espeak, piper]"], prog="audio.train") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "shares of an epoch" in x)
    # 30 keyword clips + 3 `_unknown_` ones (2 espeak-ng voices, 1 Piper) and 4 of silence
    assert line == ("audio.train: shares of an epoch (--engine-balance 1): espeak 0.446 (22 clips), "
                    "piper 0.446 (11 clips), _silence_ 0.108 (4 clips)")
    w = samplers[0].weights
    piper = [i for i, it in enumerate(samplers[0].trainer.train_dataloader.dataset.items) if "piper~" in it.path]
    assert len(w) == 37 and len(piper) == 11 and float(w[piper].sum() / w.sum()) == pytest.approx(33 / 37 / 2)
