"""ssm_core.model: the residual backbone and the LM: streaming and step decoding equal to forward, RC
equivariance, persistence, residual dtypes, configuration validation."""
import dataclasses
import json
import math

import pytest
import torch

from ssm_core import MambaConfig, MambaLM, MambaModel
from ssm_core.model import Block

from .helpers import rel, stream

DNA_COMPLEMENT = [3, 2, 1, 0, 4, 5]  # A C G T N pad -> T G C A N pad


def test_lm_stream_and_step_decode_equal_forward():
    torch.manual_seed(3)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=3, vocab_size=11)).eval()
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full = lm(ids)
        assert (stream(lm, ids, [1]) - full).abs().max().item() <= 1e-5
        assert (stream(lm, ids, [7, 2, 64]) - full).abs().max().item() <= 1e-5


def test_continuous_input_model_streams():
    torch.manual_seed(4)
    m = MambaModel(MambaConfig(d_model=16, n_layer=2, d_input=5)).eval()
    x = torch.randn(3, 30, 5)
    with torch.no_grad():
        assert (stream(m, x, [4, 1]) - m(x)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("bidirectional", [False, True])
def test_rc_equivariant_lm(bidirectional):
    torch.manual_seed(5)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=6, rc_equivariant=True,
                             bidirectional=bidirectional, complement_map=DNA_COMPLEMENT)).eval()
    comp = torch.tensor(DNA_COMPLEMENT)
    ids = torch.randint(0, 5, (2, 50))
    with torch.no_grad():
        out, out_rc = lm(ids), lm(comp[ids].flip(1))
    # logits on the reverse complement = reversed logits with complemented token axis
    assert (out_rc - out.flip(1)[..., comp]).abs().max().item() <= 1e-5
    assert (out_rc - out).abs().max().item() > 1e-3  # and the check is not vacuous


def test_bidirectional_model_sees_the_future_and_refuses_to_stream():
    torch.manual_seed(6)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5, bidirectional=True)).eval()
    ids = torch.randint(0, 5, (1, 20))
    ids2 = ids.clone()
    ids2[0, -1] = (ids[0, -1] + 1) % 5
    with torch.no_grad():
        assert (lm(ids)[0, 0] - lm(ids2)[0, 0]).abs().max() > 0  # position 0 depends on the last token
    with pytest.raises(ValueError, match="bidirectional model .* cannot stream"):
        lm.init_state(1)


def test_causal_model_does_not_see_the_future():
    lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=5)).eval()
    ids = torch.randint(0, 5, (1, 20))
    ids2 = ids.clone()
    ids2[0, 10:] = (ids[0, 10:] + 1) % 5
    with torch.no_grad():
        assert torch.equal(lm(ids)[0, :10], lm(ids2)[0, :10])


def test_save_and_load_pretrained_round_trip(tmp_path):
    torch.manual_seed(7)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=6, rc_equivariant=True,
                             complement_map=DNA_COMPLEMENT, tie_embeddings=False))
    ids = torch.randint(0, 6, (2, 15))
    lm.save_pretrained(tmp_path / "m")
    lm.save_pretrained(tmp_path / "m")  # overwriting replaces atomically
    back = MambaLM.from_pretrained(tmp_path / "m")
    assert back.config == lm.config
    assert torch.equal(back(ids), lm(ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers
    with pytest.raises(ValueError, match="holds a MambaLM, not a MambaModel"):
        MambaModel.from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MambaLM.from_pretrained(tmp_path)


def test_tied_embeddings_share_storage():
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=7))
    assert lm.head_weight() is lm.backbone.embedding.weight


def test_out_proj_rescaled_by_depth():
    torch.manual_seed(0)
    deep = MambaModel(MambaConfig(d_model=64, n_layer=16, vocab_size=5))
    bound = 1 / math.sqrt(128) / math.sqrt(16)  # kaiming_uniform(a=sqrt 5) bound, / sqrt(n_layer)
    w = deep.layers[0].mixer.out_proj.weight
    assert w.abs().max() <= bound * 1.0001 and w.abs().max() > bound * 0.9


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(8)
    cfg = MambaConfig(d_model=16, n_layer=2, vocab_size=5)
    a = MambaLM(cfg)
    b = MambaLM(MambaConfig(**{**cfg.to_dict(), "gradient_checkpointing": True}))
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 5, (2, 12))
    a(ids).sum().backward()
    b(ids).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_model=16, n_layer=1), "set vocab_size"),
    (dict(d_model=16, n_layer=2, vocab_size=5, mixer=["mamba"] * 3), "got 3 names for n_layer=2"),
    (dict(d_model=16, n_layer=1, vocab_size=5, mixer="nope"), "unknown mixer 'nope'"),
    (dict(d_model=16, n_layer=1, vocab_size=5, rc_equivariant=True), "complement_map"),
    (dict(d_model=15, n_layer=1, vocab_size=2, rc_equivariant=True, complement_map=[1, 0]), "must be even"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MambaConfig(**kwargs)


def test_model_rejects_wrong_input_kind():
    m = MambaModel(MambaConfig(d_model=16, n_layer=1, vocab_size=5))
    with pytest.raises(ValueError, match="input_ids: expected integer tensor"):
        m(torch.randn(2, 5))
    c = MambaModel(MambaConfig(d_model=16, n_layer=1, d_input=3))
    with pytest.raises(ValueError, match=r"d_input=3"):
        c(torch.randn(2, 5, 4))


def test_atomic_outputs_get_normal_permissions(tmp_path):
    from ssm_core.io import DIR_MODE, FILE_MODE, write_json_atomic
    write_json_atomic(tmp_path / "m.json", {"a": 1})
    MambaLM(MambaConfig(d_model=8, n_layer=1, vocab_size=4)).save_pretrained(tmp_path / "model")
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == FILE_MODE
    assert (tmp_path / "model").stat().st_mode & 0o777 == DIR_MODE
    assert (tmp_path / "model" / "config.json").stat().st_mode & 0o777 == FILE_MODE


def test_mixer_pattern_is_repeated_over_the_layers():
    cfg = MambaConfig(d_model=16, n_layer=4, vocab_size=5, mixer="mamba, attention")
    assert cfg.layer_mixers() == ["mamba", "attention", "mamba", "attention"]
    assert MambaConfig(d_model=16, n_layer=3, vocab_size=5, mixer=["mamba"]).layer_mixers() == ["mamba"] * 3


def _block_dtypes(model, run) -> set:
    """{(input dtype, output dtype)} of every Block called while run() runs."""
    seen = set()
    hooks = [m.register_forward_hook(lambda _m, args, out: seen.add((args[0].dtype, out.dtype)))
             for m in model.modules() if isinstance(m, Block)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("variant", [{}, dict(bidirectional=True), dict(gradient_checkpointing=True),
                                     dict(rc_equivariant=True, complement_map=DNA_COMPLEMENT)],
                         ids=["causal", "bidirectional", "checkpointing", "rc_equivariant"])
def test_residual_in_fp32_sets_the_residual_dtype_of_a_bf16_model(variant):
    torch.manual_seed(9)
    cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=6, **variant)
    fp32_res = MambaLM(cfg).to(torch.bfloat16)                  # the default: float32 residual stream
    bf16_res = MambaLM(dataclasses.replace(cfg, residual_in_fp32=False)).to(torch.bfloat16)
    bf16_res.load_state_dict(fp32_res.state_dict())
    ids = torch.randint(0, 5, (2, 40))
    out = {}

    def train_step(model):   # training mode with a backward: the checkpointing variant recomputes
        def run():
            out[model] = model(ids)
            out[model].float().square().mean().backward()
        return run

    assert _block_dtypes(fp32_res, train_step(fp32_res)) == {(torch.float32, torch.float32)}
    assert _block_dtypes(bf16_res, train_step(bf16_res)) == {(torch.bfloat16, torch.bfloat16)}
    assert all(torch.isfinite(p.grad).all() for p in bf16_res.parameters())
    logits = out[bf16_res]
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert rel(logits, out[fp32_res]) < 0.03     # both bf16 models; measured ~0.005


def test_without_residual_in_fp32_autocast_keeps_the_embeddings_dtype():
    """fp32 parameters under bf16 autocast: a token embedding gives float32 (so the stream stays float32, as
    in mamba_ssm), a continuous input's Linear projection gives bf16 (so the stream is bf16)."""
    torch.manual_seed(13)
    lm = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=5, residual_in_fp32=False))
    enc = MambaModel(MambaConfig(d_model=16, n_layer=2, d_input=3, residual_in_fp32=False))
    with torch.autocast("cpu", torch.bfloat16):
        assert _block_dtypes(lm, lambda: lm(torch.randint(0, 5, (2, 10)))) == {(torch.float32, torch.float32)}
        assert _block_dtypes(enc, lambda: enc(torch.randn(2, 10, 3))) == {(torch.bfloat16, torch.bfloat16)}


@pytest.mark.parametrize("mixer", ["mamba", "mamba,attention"])
def test_stream_equals_forward_without_residual_in_fp32(mixer):
    torch.manual_seed(10)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=11, mixer=mixer, residual_in_fp32=False)).eval()
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full = lm(ids)
        for sizes in ([1], [7, 2, 64]):   # the CPU step path (residual added in out_proj) and the chunked scan
            assert (stream(lm, ids, sizes) - full).abs().max().item() <= 1e-5


def test_bf16_stream_keeps_the_bf16_residual(monkeypatch):
    torch.manual_seed(11)
    lm = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=11, mixer="mamba,attention",
                             residual_in_fp32=False)).to(torch.bfloat16).eval()
    seen, block_stream = set(), Block.stream

    def recording(self, residual, state):
        out = block_stream(self, residual, state)
        seen.add((residual.dtype, out[0].dtype))
        return out

    monkeypatch.setattr(Block, "stream", recording)
    ids = torch.randint(0, 11, (2, 41))
    with torch.no_grad():
        full, streamed = lm(ids), stream(lm, ids, [1, 7, 20])
    assert seen == {(torch.bfloat16, torch.bfloat16)}
    assert streamed.dtype == torch.bfloat16 and rel(streamed, full) < 0.03


def test_config_saved_without_residual_in_fp32_loads(tmp_path):
    torch.manual_seed(12)
    assert MambaConfig.from_dict({"d_model": 16, "n_layer": 1, "vocab_size": 5}).residual_in_fp32 is True
    lm = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5))
    lm.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    del meta["config"]["residual_in_fp32"]          # as written before the option existed
    path.write_text(json.dumps(meta))
    back = MambaLM.from_pretrained(tmp_path / "old")
    ids = torch.randint(0, 5, (2, 9))
    assert back.config.residual_in_fp32 is True and torch.equal(back(ids), lm(ids))
    MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=5, residual_in_fp32=False)).save_pretrained(tmp_path / "new")
    assert MambaLM.from_pretrained(tmp_path / "new").config.residual_in_fp32 is False


def test_atomic_folder_replaces_on_success_and_leaves_nothing_on_error(tmp_path):
    from ssm_core.io import DIR_MODE, atomic_folder
    out = tmp_path / "model"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]        # no temporary folder left
    assert (out / "old.txt").read_text() == "old"                          # the old folder untouched
    with atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert (out.stat().st_mode & 0o777) == DIR_MODE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
