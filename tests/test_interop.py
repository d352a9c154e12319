"""ssm_core.interop: mamba_ssm's MambaLMHeadModel folders load as our MambaLM and ours save as theirs, with
logits equal to mamba_ssm's own model (its pure-PyTorch path on the CPU, from ../shared/bench)."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from ssm_core import MambaConfig, MambaLM, from_pretrained, save_pretrained
from ssm_core.interop import config_from_mamba_ssm


@pytest.fixture(scope="module")
def mamba_lm_cls(mamba_ssm_cpu):
    """mamba_ssm's MambaLMHeadModel and MambaConfig on the CPU. The hub / transformers imports it makes are
    for downloading and generation only, so stand-ins are enough; its Triton RMSNorm runs only on CUDA, so
    the module's forward is mamba_ssm's own reference (rms_norm_ref)."""
    hub = types.ModuleType("huggingface_hub")
    hub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
    stubs = {"huggingface_hub": {"PyTorchModelHubMixin": hub.PyTorchModelHubMixin},
             "transformers": {},
             "transformers.generation": {"GenerateDecoderOnlyOutput": object, "TextStreamer": object},
             "transformers.utils": {"WEIGHTS_NAME": "pytorch_model.bin", "CONFIG_NAME": "config.json"},
             "transformers.utils.hub": {"cached_file": None}}
    for name, attrs in stubs.items():
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__dict__.update(attrs)
            sys.modules[name] = mod
    import mamba_ssm.ops.triton.layer_norm as ln
    from mamba_ssm.models.config_mamba import MambaConfig as RefConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    ln.RMSNorm.forward = lambda self, x, **k: ln.rms_norm_ref(x, self.weight, self.bias, eps=self.eps, upcast=True)
    return MambaLMHeadModel, RefConfig


def _ref_from_folder(mamba_lm_cls, folder):
    """What a mamba_ssm user does with our folder: MambaConfig(**config.json), strict state-dict load."""
    cls, RefConfig = mamba_lm_cls
    meta = json.loads((folder / "config.json").read_text())
    meta["fused_add_norm"] = False          # the Triton fused kernel is CUDA-only; same arithmetic
    ref = cls(RefConfig(**meta))
    if (folder / "model.safetensors").is_file():
        from safetensors.torch import load_file
        sd = load_file(str(folder / "model.safetensors"))
    else:
        sd = torch.load(folder / "pytorch_model.bin", weights_only=True)
    ref.load_state_dict(sd, strict=True)
    return ref.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_mamba_ssm_folder_loads_with_equal_logits(mamba_lm_cls, tmp_path, tie):
    cls, RefConfig = mamba_lm_cls
    torch.manual_seed(0)
    ref = cls(RefConfig(d_model=32, n_layer=2, vocab_size=12, ssm_cfg={"d_state": 8, "expand": 2},
                        fused_add_norm=False, tie_embeddings=tie)).eval()
    with torch.no_grad():     # move the weights away from their init so that every parameter matters
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(str(tmp_path))      # mamba_ssm's own writer: config.json + pytorch_model.bin
    ours = from_pretrained(tmp_path).eval()
    assert isinstance(ours, MambaLM) and ours.config.vocab_size == 16   # padded to a multiple of 8, as theirs
    x = torch.randint(7, 12, (2, 50))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["pytorch_model.bin", "model.safetensors"])
def test_save_as_mamba_ssm_gives_equal_logits_in_mamba_ssm(mamba_lm_cls, tmp_path, weights):
    torch.manual_seed(1)
    ours = MambaLM(MambaConfig(d_model=48, n_layer=3, vocab_size=12, d_state=4, expand=1, tie_embeddings=False)).eval()
    out = save_pretrained(ours, tmp_path / "export", format="mamba_ssm", weights=weights)
    assert sorted(p.name for p in out.iterdir()) == sorted(["config.json", weights])
    ref = _ref_from_folder(mamba_lm_cls, out)
    x = torch.randint(7, 12, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x), rtol=1e-5, atol=1e-5)
        back = from_pretrained(out).eval()             # and it reads back as ours, exactly
        torch.testing.assert_close(back(x), ours(x), rtol=0, atol=0)


def test_formats_that_cannot_convert_are_refused(tmp_path):
    rc = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=12, rc_equivariant=True,
                             complement_map=list(range(12))))
    with pytest.raises(ValueError, match="rc_equivariant"):
        save_pretrained(rc, tmp_path / "rc", format="mamba_ssm")
    assert not (tmp_path / "rc").exists()
    with pytest.raises(ValueError, match="d_intermediate"):
        config_from_mamba_ssm({"d_model": 8, "n_layer": 1, "vocab_size": 12, "d_intermediate": 32})
    with pytest.raises(ValueError, match="Mamba2"):
        config_from_mamba_ssm({"d_model": 8, "n_layer": 1, "vocab_size": 12, "ssm_cfg": {"layer": "Mamba2"}})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"d_model": 8, "n_layer": 1, "vocab_size": 12}))
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        from_pretrained(tmp_path / "bad")
    torch.save({"backbone.embedding.weight": torch.zeros(3, 8)}, tmp_path / "bad" / "pytorch_model.bin")
    with pytest.raises(ValueError, match="do not match"):
        from_pretrained(tmp_path / "bad")


def test_one_task_training_step_has_mamba_ssm_gradients_and_init(mamba_lm_cls, tmp_path):
    """The selective-copying loss of one batch and the gradient of every parameter equal mamba_ssm's
    MambaLMHeadModel on the same weights, and a freshly initialised model has mamba_ssm's init statistics:
    the check that our Mamba-1 trains as the paper's would (docs/seeds.md)."""
    import torch.nn.functional as F

    from ssm_core.tasks import TaskConfig, selective_copy_batch
    cls, RefConfig = mamba_lm_cls
    torch.manual_seed(0)
    ref = cls(RefConfig(d_model=32, n_layer=2, vocab_size=16, ssm_cfg={"d_state": 16}, fused_add_norm=False,
                        pad_vocab_size_multiple=8)).double()
    ref.save_pretrained(str(tmp_path))
    ours = from_pretrained(tmp_path).double()
    x, y = selective_copy_batch(TaskConfig(seq_len=64, n_memorize=4, n_tokens=14), 4, torch.Generator().manual_seed(0))
    losses = []
    for logits in (ours(x), ref(x).logits):
        losses.append(F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    theirs = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        g = theirs[name].grad     # the names are mamba_ssm's (lm_head.weight is tied to the embedding)
        assert (p.grad - g).norm() <= 1e-5 * g.norm(), name

    # Init: same shapes, and per parameter the same mean and spread (creation order differs, so not the same
    # numbers), over the models of several seeds.
    def stats(make):
        rows = []
        for seed in range(4):
            torch.manual_seed(seed)
            rows.append({n: (p.mean().item(), p.std().item() if p.numel() > 1 else 0.0)
                         for n, p in make().named_parameters()})
        return {n: [sum(r[n][i] for r in rows) / len(rows) for i in (0, 1)] for n in rows[0]}
    cfg = RefConfig(d_model=64, n_layer=2, vocab_size=24, ssm_cfg={"d_state": 16}, fused_add_norm=False)
    a, b = stats(lambda: cls(cfg)), stats(lambda: MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=24)))
    assert sorted(a) == sorted(b)
    for n in a:
        assert abs(a[n][0] - b[n][0]) <= 0.1 * a[n][1] + 1e-3 and abs(a[n][1] - b[n][1]) <= 0.1 * a[n][1] + 1e-6, n


def test_training_step_benchmark_against_the_official_block(mamba_ssm_cpu, shared_dir, tmp_path):
    """benchmarks/mamba_ssm_step (the GPU check of docs/seeds.md) at CPU size: same loss and gradients."""
    from benchmarks.mamba_ssm_step import StepConfig, main
    r = main(StepConfig(seq_len=48, n_memorize=4, batch_size=2, d_model=32, device="cpu",
                        anchor_dir=str(shared_dir / "bench"), out=str(tmp_path / "step.json")))
    assert r["loss_rel_diff"] < 1e-6 and r["max_grad_rel_diff"] < 1e-4 and len(r["grad_rel_diff"]) == 22
    assert json.loads((tmp_path / "step.json").read_text())["max_grad_rel_diff"] == r["max_grad_rel_diff"]
