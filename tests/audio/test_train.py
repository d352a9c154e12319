import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from audio import augment, evaluate, stream, synth, train
from audio.data import SILENCE, UNKNOWN, ClipDataset, build_splits, label_names, resolve_root
from audio.model import load_model
from ssm_core import MambaConfig
from ssm_core.cli import UserError, run


def make_speech_commands(root, words=("yes", "no", "cat", "dog"), per_word=10):
    """A miniature folder in the Speech Commands layout."""
    rng = np.random.default_rng(0)
    val, test = [], []
    for w in words:
        (root / w).mkdir(parents=True)
        for i in range(per_word):
            sf.write(root / w / f"spk{i}_nohash_0.wav", 0.1 * rng.standard_normal(12000).astype(np.float32), 16000)
            (val if i == 0 else test if i == 1 else []).append(f"{w}/spk{i}_nohash_0.wav")
    (root / "validation_list.txt").write_text("\n".join(val) + "\n")
    (root / "testing_list.txt").write_text("\n".join(test) + "\n")
    (root / "_background_noise_").mkdir()
    sf.write(root / "_background_noise_" / "white.wav", 0.1 * rng.standard_normal(48000).astype(np.float32), 16000)
    return root


def test_speech_commands_splits_and_label_sets(tmp_path):
    root = make_speech_commands(tmp_path / "sc")
    labels = label_names(root, "12")
    assert labels[:2] == ["yes", "no"] and labels[-2:] == [SILENCE, UNKNOWN]
    splits = build_splits(root, labels, seed=0)
    train_labels = [labels[it.label] for it in splits["train"]]
    assert train_labels.count("yes") == 8 and train_labels.count("no") == 8   # lists hold out 2 per word
    assert train_labels.count(UNKNOWN) == train_labels.count(SILENCE) == 2    # ~10% each of the split
    assert {labels[it.label] for it in splits["testing"]} >= {"yes", "no"}
    wave, _ = ClipDataset(splits["train"])[0]
    assert wave.shape == (16000,) and wave[12000:].abs().max() == 0           # padded to one second
    assert label_names(root, "35") == ["cat", "dog", "no", "yes"]
    # torchaudio.datasets.SPEECHCOMMANDS download layout is found from its root
    ta = tmp_path / "ta"
    (ta / "SpeechCommands").mkdir(parents=True)
    root.rename(ta / "SpeechCommands" / "speech_commands_v0.02")
    assert resolve_root(ta) == ta / "SpeechCommands" / "speech_commands_v0.02"
    with pytest.raises(UserError, match="not in the Speech Commands layout"):
        resolve_root(tmp_path)


@pytest.fixture(scope="module")
def tiny_synth(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synth")
    return cache, synth.ensure_dataset(synth.synth_config("tiny", seed=0), cache, progress=False)


def test_synthetic_dataset_is_cached_and_voice_disjoint(tiny_synth):
    cache, root = tiny_synth
    cfg = synth.synth_config("tiny", seed=0)
    assert synth.ensure_dataset(cfg, cache, progress=False) == root          # cached: the second call reuses it
    val, test = ((root / f"{s}_list.txt").read_text().split() for s in ("validation", "testing"))
    assert test and all(cfg.test_voices[0].replace("+", "_") in f for f in test)
    assert val and all(cfg.val_voices[0].replace("+", "_") in f for f in val)
    train_files = {f"{w}/{p.name}" for w in cfg.words for p in (root / w).glob("*.wav")} - set(test) - set(val)
    assert len(train_files) == len(cfg.words) * len(cfg.train_voices)
    assert not any(v.replace("+", "_") in f for v in cfg.test_voices + cfg.val_voices for f in train_files)
    wave, sr = sf.read(root / test[0])
    assert sr == 16000 and wave.shape == (16000,) and np.abs(wave).max() > 0.05
    # the same config names the same folder; another config another one
    assert root.name == f"synth-{cfg.key()}" != f"synth-{synth.synth_config('tiny', seed=1).key()}"


def test_synthesis_in_worker_processes_makes_the_same_set(tiny_synth, tmp_path, monkeypatch):
    """The full set is synthesised in a process pool; the clips must not depend on it. (Two worker
    processes whatever the machine's CPU count, so the pool is used on a one-CPU machine too.) Each worker
    takes the words in chunks, in any order: the set is byte-equal to the one built in this process because
    every word sounds the same whatever was spoken before it (tests/audio/test_generalisation.py)."""
    _, root = tiny_synth
    in_process = synth._speech_pool
    monkeypatch.setattr(synth, "_speech_pool", lambda n: in_process(n, min_jobs=1, workers=2))
    cfg = synth.synth_config("tiny", seed=0)
    pooled = synth.ensure_dataset(cfg, tmp_path, progress=False)
    files = sorted(p.relative_to(root) for p in root.rglob("*.wav"))
    assert len(files) >= 40 and files == sorted(p.relative_to(pooled) for p in pooled.rglob("*.wav"))
    for split in ("validation", "testing"):
        assert (root / f"{split}_list.txt").read_text() == (pooled / f"{split}_list.txt").read_text()
    assert all((root / f).read_bytes() == (pooled / f).read_bytes() for f in files)


def test_clip_writer_writes_what_one_by_one_writes_and_raises_a_failed_write(tmp_path):
    """The set's clips are written on threads (synth._ClipWriter): the files must be those of writing them one
    by one, with more clips than may wait at once, and a write that fails must fail the build."""
    rng = np.random.default_rng(0)
    clips = [rng.uniform(-1.2, 1.2, 1600).astype(np.float32) for _ in range(40)]
    with synth._ClipWriter(threads=3, pending=4) as writer:
        for i, clip in enumerate(clips):
            writer.write(tmp_path / "threaded" / f"w{i % 3}" / f"{i}.wav", clip)
    for i, clip in enumerate(clips):
        sf.write(str(tmp_path / "direct.wav"), clip, synth.SAMPLE_RATE, subtype="PCM_16")
        assert (tmp_path / "threaded" / f"w{i % 3}" / f"{i}.wav").read_bytes() == (tmp_path / "direct.wav").read_bytes()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(OSError), synth._ClipWriter() as writer:
        writer.write(tmp_path / "a_file" / "x.wav", clips[0])       # its folder is a file


def test_train_then_evaluate_then_stream_a_long_file(tiny_synth, tmp_path, capsys):
    cache, out = tiny_synth[0], tmp_path / "run"
    common = ["--synth-size", "tiny", "--synth-cache", str(cache)]
    assert run(train.main, train.AudioTrainConfig,
               [*common, "--output-dir", str(out), "--max-steps", "2", "--batch-size", "8", "--model.d_model", "16",
                "--model.n_layer", "1", "--val-every", "2", "--accelerator", "cpu"], prog="audio.train") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and 0 <= metrics["testing"]["accuracy"] <= 1
    assert len(metrics["testing"]["confusion"]) == 12 and (out / "confusion.png").stat().st_size > 1000
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "model" / "model.safetensors").is_file()
    # the Lightning checkpoint and the exported folder hold the same model
    a, b = load_model(out / "checkpoints" / "last.ckpt"), load_model(out / "model")
    x = torch.randn(1, 8000)
    torch.testing.assert_close(a(x), b(x))

    assert run(evaluate.main, evaluate.EvalConfig, ["--model", str(out), *common, "--output-dir",
                                                    str(tmp_path / "eval")], prog="audio.evaluate") == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["testing"]["clips"] == \
        metrics["testing"]["clips"]

    wav = tmp_path / "demo.wav"
    assert run(synth.main, synth.DemoConfig, ["--output-wav", str(wav), "--seconds", "12"], prog="audio.synth") == 0
    events = json.loads(wav.with_suffix(".json").read_text())["events"]
    assert len(events) >= 3 and all(e["word"] in synth.KEYWORDS for e in events)
    capsys.readouterr()
    assert run(stream.main, stream.StreamConfig, ["--model", str(out / "model"), "--wav", str(wav),
                                                  "--threshold", "0.2"], prog="audio.stream") == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("summary: audio 12.00 s, real-time factor")


def test_empty_heldout_folder_fails_before_training(tiny_synth, tmp_path, capsys):
    cache, _ = tiny_synth
    empty = tmp_path / "heldout"            # the Speech Commands layout, without a clip
    (empty / "yes").mkdir(parents=True)
    for f in ("validation_list.txt", "testing_list.txt"):
        (empty / f).write_text("")
    out = tmp_path / "run"
    assert run(train.main, train.AudioTrainConfig,
               ["--synth-size", "tiny", "--synth-cache", str(cache), "--output-dir", str(out), "--max-steps", "2",
                "--accelerator", "cpu", "--heldout", f"[{empty}]"], prog="audio.train") == 2
    assert f"--heldout {empty}: no clips" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()          # no training ran


def test_residual_in_fp32_flag_reaches_the_exported_model(tiny_synth, tmp_path):
    out = tmp_path / "run"
    assert run(train.main, train.AudioTrainConfig,
               ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]), "--output-dir", str(out),
                "--max-steps", "1", "--batch-size", "8", "--model.d_model", "16", "--model.n_layer", "1",
                "--val-every", "1", "--accelerator", "cpu", "--model.residual_in_fp32", "false"], prog="audio.train") == 0
    model = load_model(out / "model")
    assert model.config.encoder.residual_in_fp32 is False and model.encoder.config.residual_in_fp32 is False
    # the run wrote its resolved configuration (the training engines it found named: espeak-ng and Pico, and
    # Piper where the `voices` extra is installed), and --config of it gives the same config
    from ssm_core.cli import parse_config
    again = parse_config(train.AudioTrainConfig, ["--config", str(out / "config.yaml")])
    assert again.model.residual_in_fp32 is False and again.model.d_model == 16 and again.optim.lr == 2e-3
    assert again == parse_config(train.AudioTrainConfig, ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]),
                                 "--output-dir", str(out), "--max-steps", "1", "--batch-size", "8",
                                 "--model.d_model", "16", "--model.n_layer", "1", "--val-every", "1",
                                 "--accelerator", "cpu", "--model.residual_in_fp32", "false",
                                 "--synth-engines", f"[{', '.join(synth.available_engines(tiny_synth[0]))}]"])
    assert again.synth_engines[:2] == ["espeak", "pico"]


def test_train_config_errors(tmp_path, capsys):
    assert run(train.main, train.AudioTrainConfig, ["--data", str(tmp_path / "nope")], prog="audio.train") == 2
    assert "no such folder" in capsys.readouterr().err
    assert run(train.main, train.AudioTrainConfig, ["--snr-db", "20", "0"], prog="audio.train") == 2
    assert "--snr-db" in capsys.readouterr().err
    for old, new in (("--n-mels", "--features.n_mels"), ("--d-model", "--model.d_model"), ("--lr", "--optim.lr")):
        assert run(train.main, train.AudioTrainConfig, [old, "8"], prog="audio.train") == 2
        assert f"{old}: moved to {new}" in capsys.readouterr().err
    assert run(train.main, train.AudioTrainConfig, ["--model.bidirectional"], prog="audio.train") == 2
    assert "--model.bidirectional: the encoder must be causal to stream" in capsys.readouterr().err


def test_seed_fixes_the_initial_weights(tiny_synth, tmp_path):
    """Two runs with the same --seed train the same model (the weights are drawn after seeding)."""
    argv = ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]), "--max-steps", "1", "--batch-size", "8",
            "--model.d_model", "8", "--model.n_layer", "1", "--val-every", "1", "--accelerator", "cpu"]
    for name in ("a", "b"):
        assert run(train.main, train.AudioTrainConfig, [*argv, "--output-dir", str(tmp_path / name)],
                   prog="audio.train") == 0
    a, b = load_model(tmp_path / "a" / "model"), load_model(tmp_path / "b" / "model")
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_kws_module_does_not_decay_a_log(tmp_path):
    """The shared recipe: Mamba's A_log and D, norms and biases get no weight decay (audio decayed A_log)."""
    from audio.lightning_module import KWSModule
    from audio.model import KWSConfig
    from ssm_core.training import parameter_groups
    kws = KWSConfig(labels=["a", "b"], encoder=MambaConfig(d_model=16, n_layer=1, d_input=80))
    module = KWSModule(kws.to_dict(), {}, {"lr": 1e-3, "weight_decay": 0.05})
    decay, no_decay = parameter_groups(module.model, 0.05)
    names = {id(p): n for n, p in module.model.named_parameters()}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert "encoder.layers.0.mixer.A_log" in kept and "encoder.layers.0.mixer.D" in kept and "head.bias" in kept
    assert "head.weight" in {names[id(p)] for p in decay["params"]}


def test_waveform_augmentation_stays_float32_under_bf16_autocast():
    """Under bf16-mixed the resampler's convolution returned bfloat16 waves, which cuFFT rejects in the room
    and channel filters after it ("Unsupported dtype BFloat16" on the GPU) and which quantise the audio."""
    from audio.lightning_module import KWSModule
    from audio.model import KWSConfig
    cfg = train.AudioTrainConfig()
    kws = KWSConfig(labels=["a", "b"], encoder=MambaConfig(d_model=16, n_layer=1, d_input=80))
    module = KWSModule(kws.to_dict(), {f: getattr(cfg, f) for f in train.AUGMENT_FIELDS}, {"lr": 1e-3})
    module.noise_bank = torch.randn(40000) * 0.1
    torch.manual_seed(0)
    wave = torch.randn(8, 16000) * 0.1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert all(module.augment_wave(wave).dtype == torch.float32 for _ in range(10))


def test_flat_exports_of_before_still_load():
    from audio.model import KWSConfig
    old = {"labels": ["a", "b"], "features": {"n_mels": 40}, "d_model": 24, "n_layer": 1, "d_state": 8,
           "d_conv": 4, "expand": 2, "mixer": "mamba", "residual_in_fp32": False, "label_frames": 10}
    cfg = KWSConfig.from_dict(old)
    assert (cfg.encoder.d_model, cfg.encoder.d_input, cfg.encoder.residual_in_fp32) == (24, 40, False)


def test_full_synthetic_set_holds_out_its_test_voices():
    cfg = synth.SynthConfig()
    splits = [set(cfg.train_voices), set(cfg.val_voices), set(cfg.test_voices)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # neither the variant nor the gbcwmd accent of a test voice is heard in training
    train_parts = {part for v in cfg.train_voices for part in v.split("+")}
    assert not any(v.split("+")[1] in train_parts for v in cfg.test_voices)
    assert "en-gb-x-gbcwmd" not in train_parts


def test_speed_perturb_and_freq_warp():
    torch.manual_seed(0)
    wave = torch.randn(8, 1600)
    assert torch.equal(augment.speed_perturb(wave, 0.0), wave)
    out = augment.speed_perturb(wave, 0.2, groups=8)
    assert out.shape == wave.shape and not torch.equal(out, wave)
    # a group resampled by 20 -> 20 + k keeps its first sample and plays the clip slower (k > 0) or faster
    tone = torch.sin(torch.arange(1600) * 0.05).expand(2, -1)
    slow = torch.cat([augment.speed_perturb(tone[:1], 0.2, groups=1) for _ in range(20)])
    assert (slow[:, :800] - tone[0, :800]).abs().amax(1).max() > 0.1    # some draw changed the tone

    feats = torch.randn(4, 30, 80)
    assert torch.equal(augment.freq_warp(feats, 0.0), feats)
    ramp = torch.arange(80.0).expand(4, 30, 80)
    warped = augment.freq_warp(ramp, 0.1)
    # each example's bins are a linear map i -> i / alpha of the ramp, alpha in [0.9, 1.1], clamped at the top
    slope = warped[:, 0, 1] - warped[:, 0, 0]
    assert ((slope >= 1 / 1.1 - 1e-5) & (slope <= 1 / 0.9 + 1e-5)).all()
    assert torch.allclose(warped[:, :, :40], slope[:, None, None] * torch.arange(40.0), atol=1e-4)
    assert (warped <= 79).all()
    # the same warp at a fixed factor (benchmarks/audio_heldout_probe.py), and the fixed-factor resampling
    torch.testing.assert_close(augment.warp_mel_axis(ramp, 1.25)[:, :, :60], (torch.arange(60.0) / 1.25).expand(4, 30, 60))
    assert torch.equal(augment.stretch(wave, 20, 20), wave)
    slower = augment.stretch(tone, 25, 20)
    assert slower.shape == tone.shape and torch.allclose(slower[:, :1000], torch.sin(torch.arange(1000) * 0.04), atol=0.02)


def test_heldout_probe_rows_and_errors(tiny_model_dir, tmp_path, capsys):
    """benchmarks/audio_heldout_probe.py: its untransformed row is audio.evaluate's accuracy on the same clips,
    smoothing to every cepstrum changes nothing, each transform is a row; a missing folder is one line."""
    from benchmarks.audio_heldout_probe import ProbeConfig
    from benchmarks.audio_heldout_probe import main as probe
    root = make_speech_commands(tmp_path / "sc")
    argv = ["--heldout", str(root), "--model", str(tiny_model_dir), "--stretches", "[0.9]", "--warps", "[1.1]",
            "--cepstra", "[80, 13]", "--unknown-bias", "[2]", "--out", str(tmp_path / "probe.json")]
    assert run(probe, ProbeConfig, argv, prog="probe") == 0
    saved = json.loads((tmp_path / "probe.json").read_text())
    rows = {r["transform"]: r for r in saved["rows"]}
    assert list(rows) == ["none", "stretch 0.9", "warp 1.1", "cepstra 80", "cepstra 13", "unknown bias -2"]
    model = load_model(tiny_model_dir)
    items = build_splits(root, model.labels, seed=0)["testing"]
    assert rows["none"]["accuracy"] == pytest.approx(evaluate.evaluate_items(model, ClipDataset(items))["accuracy"])
    assert rows["cepstra 80"]["accuracy"] == rows["none"]["accuracy"]
    keywords = sum(not model.labels[it.label].startswith("_") for it in items)
    misses = saved["misses"]
    assert misses["keyword_clips_wrong"] == round((1 - rows["none"]["keyword_accuracy"]) * keywords)
    assert misses["called_unknown"] <= misses["keyword_clips_wrong"] >= misses["right_word_second"]
    assert "| unknown bias -2 |" in capsys.readouterr().out
    assert run(probe, ProbeConfig, ["--heldout", str(tmp_path / "nope")], prog="probe") == 2
    assert capsys.readouterr().err.strip() == f"probe: error: --heldout {tmp_path / 'nope'}: no such folder"


def test_phone_loss_trains_a_head_that_the_export_leaves_out(tiny_synth, tmp_path, capsys):
    """--phone-loss: espeak-ng's phones of each clip's word as CTC targets of a training-only head."""
    from torch.utils.data import default_collate

    from audio.data import phone_targets
    from audio.engines import word_phones
    from audio.lightning_module import KWSModule
    from audio.model import KWSConfig
    assert word_phones("stop") == ["s", "t", "ɑː", "p"]             # the length mark stays with its vowel
    root = tiny_synth[1]
    items = build_splits(root, label_names(root, "12"))["train"]
    inventory, phones = phone_targets(items)
    assert set(phones) == {"cat", *synth.KEYWORDS} and min(min(p) for p in phones.values()) == 1
    ds = ClipDataset(items, phones=phones)
    lengths = {it.label: ds[i][3] for i, it in enumerate(items)}
    assert lengths[label_names(root, "12").index(SILENCE)] == 0 and lengths[0] == len(word_phones("yes"))
    wave, label, targets, n = ds[0]
    assert targets.shape == (ds.max_phones,) and targets[n:].eq(0).all() and targets[:n].gt(0).all()

    # the CTC term is added to the class loss and reaches the encoder; the optimiser trains the head too
    kws = KWSConfig(labels=label_names(root, "12"), encoder=MambaConfig(d_model=16, n_layer=1, d_input=80))
    augment = {k: 0.0 for k in train.AUGMENT_FIELDS} | {"snr_db": [0.0, 20.0], "freq_mask": 0, "time_mask": 0}
    batch = default_collate([ds[i] for i in range(6)])
    losses = {}
    for weight in (0.0, 0.5):
        torch.manual_seed(0)
        module = KWSModule(kws.to_dict(), augment, {"lr": 1e-3}, phone_loss=weight, n_phones=len(inventory))
        module.log = lambda *a, **k: None
        torch.manual_seed(1)
        losses[weight] = module.training_step(batch if weight else batch[:2], 0)
    torch.manual_seed(1)
    ctc = module.phone_ctc(module.model.encoder(module.model.features(torch.cat([batch[0].roll(1, 0), batch[0]], 1))),
                           batch[2], batch[3])
    assert torch.isfinite(ctc) and ctc > 0
    assert torch.allclose(losses[0.5], losses[0.0] + 0.5 * ctc, rtol=1e-4)
    losses[0.5].backward()
    assert module.phone_head.weight.grad.abs().sum() > 0
    assert module.model.encoder.layers[0].mixer.in_proj.weight.grad.abs().sum() > 0
    trained = {id(p) for p in module.optimized_module().parameters()}
    assert {id(p) for p in module.phone_head.parameters()} <= trained
    assert {id(p) for p in module.model.parameters()} <= trained

    # a run: the checkpoint's optimiser holds the head's state, the exported model has no head
    out = tmp_path / "run"
    assert run(train.main, train.AudioTrainConfig,
               ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]), "--output-dir", str(out),
                "--max-steps", "2", "--batch-size", "8", "--model.d_model", "16", "--model.n_layer", "1",
                "--val-every", "2", "--accelerator", "cpu", "--phone-loss", "0.5"], prog="audio.train") == 0
    assert f"phone loss 0.5 over {len(inventory)} phones of {len(phones)} words" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    exported = load_model(out / "model")
    assert len(ckpt["optimizer_states"][0]["state"]) == len(list(exported.parameters())) + 2    # + head's 2
    assert not any("phone" in k for k in exported.state_dict())
    assert run(train.main, train.AudioTrainConfig, ["--phone-loss", "-1"], prog="audio.train") == 2
    assert "--phone-loss: expected 0 to 10, got -1.0" in capsys.readouterr().err


def test_non_keyword_frames_loss_covers_every_frame_of_clips_without_a_keyword():
    """--non-keyword-frames: a keyword posterior anywhere in an `_unknown_` clip costs; a keyword clip's frames
    before its label frames, and the second clip's first label_frames, are free."""
    from audio.lightning_module import KWSModule
    from audio.model import KWSConfig
    labels = ["yes", "no", SILENCE, UNKNOWN]
    kws = KWSConfig(labels=labels, encoder=MambaConfig(d_model=8, n_layer=1, d_input=80), label_frames=3)
    module = KWSModule(kws.to_dict(), {}, {"lr": 1e-3}, non_keyword_frames=1.0)
    t1, frames = 10, 20
    y = torch.tensor([3, 0])                   # clip 0: `_unknown_` (its prefix: clip 1, "yes"); clip 1: "yes"
    right = torch.full((2, frames, 4), -5.0)
    right[0, :, 3] = 5.0                       # the `_unknown_` clip says `_unknown_` wherever it is scored
    right[1, :t1, 3] = 5.0                     # (sequence 1's prefix is clip 0)
    assert module.non_keyword_loss(right, y, t1) < 1e-3
    wrong = right.clone()
    wrong[0, t1 + 5, :] = torch.tensor([5.0, -5, -5, -5])         # "yes" in the middle of the `_unknown_` word
    assert module.non_keyword_loss(wrong, y, t1) > 0.5
    free = right.clone()
    free[1, t1:frames - 3] = torch.tensor([-5.0, 5, -5, -5])     # the keyword clip's frames before its label
    free[0, t1: t1 + 3] = torch.tensor([5.0, -5, -5, -5])        # the grace frames after the prefix "yes"
    assert module.non_keyword_loss(free, y, t1) < 1e-3
    only_keywords = torch.tensor([0, 1])
    assert module.non_keyword_loss(right, only_keywords, t1) == 0            # nothing to score: 0, not NaN


def test_deterministic_runs_are_bit_identical(tiny_synth, tmp_path, monkeypatch):
    """--deterministic (the GPU recipe's setting): torch's deterministic algorithms, warn-only, for the run
    (its kernels' backward then sums in a fixed order: tests/kernels/test_deterministic.py); two runs of one
    seed export the same bytes. torch fills fresh memory with NaN in this mode, so a read of memory nothing
    wrote would show here too."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)   # Lightning sets it; restored after the test
    models = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        assert run(train.main, train.AudioTrainConfig,
                   ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]), "--output-dir", str(out),
                    "--max-steps", "3", "--batch-size", "8", "--model.d_model", "16", "--model.n_layer", "1",
                    "--val-every", "3", "--accelerator", "cpu", "--deterministic", "true"], prog="audio.train") == 0
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        models.append((out / "model" / "model.safetensors").read_bytes())
    assert models[0] == models[1]
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"   # cuBLAS's reproducible workspace


def test_ema_weights_are_validated_and_exported(tiny_synth, tmp_path):
    """--ema-decay: the checkpoints' state_dict and the exported model are the moving average, which differs
    from the raw weights kept beside it (from which --resume continues: tests/test_resume.py)."""
    out = tmp_path / "run"
    assert run(train.main, train.AudioTrainConfig,
               ["--synth-size", "tiny", "--synth-cache", str(tiny_synth[0]), "--batch-size", "8", "--max-steps", "4",
                "--model.d_model", "8", "--model.n_layer", "1", "--val-every", "2", "--accelerator", "cpu",
                "--ema-decay", "0.5", "--output-dir", str(out)], prog="audio.train") == 0
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    average, raw = last["state_dict"], last["current_model_state"]
    assert average.keys() == raw.keys() and not torch.equal(average["model.head.weight"], raw["model.head.weight"])
    best = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
    exported = load_model(out / "model").state_dict()
    assert all(torch.equal(exported[k], best["model." + k]) for k in exported)
    assert run(train.main, train.AudioTrainConfig, ["--ema-decay", "1"], prog="audio.train") == 2
    # benchmarks/audio_ema_pair.py: both sets of weights of last.ckpt on the run's test voices
    from benchmarks.audio_ema_pair import PairConfig
    from benchmarks.audio_ema_pair import main as pair
    assert run(pair, PairConfig, ["--run", str(out), "--threads", "1", "--out", str(tmp_path / "pair.json")],
               prog="pair") == 0
    accuracy = json.loads((tmp_path / "pair.json").read_text())["accuracy"]["espeak (held-out voices)"]
    items = build_splits(tiny_synth[1], load_model(out / "model").labels, seed=0)["testing"]
    assert accuracy["average"] == evaluate.evaluate_items(load_model(out / "checkpoints" / "last.ckpt"),
                                                          ClipDataset(items))["accuracy"]
    assert run(pair, PairConfig, ["--run", str(tmp_path)], prog="pair") == 2
