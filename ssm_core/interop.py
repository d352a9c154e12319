"""Checkpoint interop with mamba_ssm's `MambaLMHeadModel` folder format.

    from_pretrained(folder)                               # reads either format (ours or mamba_ssm's)
    save_pretrained(model, folder, format="mamba_ssm")    # config.json + pytorch_model.bin for mamba_ssm

mamba_ssm's folder is a `config.json` holding its `MambaConfig` fields (d_model, n_layer, vocab_size, ssm_cfg,
rms_norm, residual_in_fp32, pad_vocab_size_multiple, tie_embeddings, ...) and the state dict in
`pytorch_model.bin` (what `MambaLMHeadModel.from_pretrained` reads) or `model.safetensors`. Its parameter
names are ours already (backbone.embedding, backbone.layers.i.{norm,mixer.*}, backbone.norm_f, lm_head): the
conversion is the config, the vocabulary padding (mamba_ssm rounds vocab_size up to a multiple of
pad_vocab_size_multiple) and the tied head, which mamba_ssm stores as a key of its own.

Only what both sides can express converts: Mamba-1 mixers, RMSNorm, no MLP (d_intermediate 0), no attention
layers, a causal model (mamba_ssm has no bidirectional or RC-equivariant wrapper). Anything else is a
ValueError naming the field, never a model that silently computes something else.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

# Our own config.json has a "class" key; mamba_ssm's has its config fields at the top level.
_MAMBA_SSM_REQUIRED = ("d_model", "n_layer", "vocab_size")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# mamba_ssm's Mamba(...) keyword arguments that our Mamba takes under the same name. Those that only pick a
# kernel (use_fast_path) are dropped; the rest are either weight shapes or initialisation settings.
_MIXER_KWARGS = ("dt_min", "dt_max", "dt_init", "dt_scale", "dt_init_floor", "conv_bias", "bias")
_SHAPE_KWARGS = ("d_state", "d_conv", "expand", "dt_rank")
MAMBA_SSM_NORM_EPS = 1e-5   # MixerModel's norm_epsilon: not a field of mamba_ssm's MambaConfig


def is_mamba_ssm_config(meta: dict) -> bool:
    return "class" not in meta and all(k in meta for k in _MAMBA_SSM_REQUIRED)


def padded_vocab(vocab_size: int, multiple: int) -> int:
    return vocab_size + (-vocab_size) % max(1, multiple)


def config_from_mamba_ssm(meta: dict, where: str = "config.json") -> dict:
    """mamba_ssm's config.json fields -> the fields of our MambaConfig (ValueError for what we cannot
    represent). Plain data: this module sits below ssm_core.model, which builds the model from it."""
    if meta.get("d_intermediate", 0):
        raise ValueError(f"{where}: d_intermediate={meta['d_intermediate']} (a gated MLP per block) is not supported")
    if meta.get("attn_layer_idx"):
        raise ValueError(f"{where}: attention layers (attn_layer_idx={meta['attn_layer_idx']}) are not supported")
    if not meta.get("rms_norm", True):
        raise ValueError(f"{where}: rms_norm=false (LayerNorm blocks) is not supported; only RMSNorm")
    ssm = dict(meta.get("ssm_cfg") or {})
    layer = ssm.pop("layer", "Mamba1")
    if layer != "Mamba1":
        raise ValueError(f"{where}: ssm_cfg.layer={layer!r} is not supported; only Mamba1")
    ssm.pop("use_fast_path", None)
    shape = {k: ssm.pop(k) for k in _SHAPE_KWARGS if k in ssm}
    mixer = {k: ssm.pop(k) for k in _MIXER_KWARGS if k in ssm}
    if ssm:
        raise ValueError(f"{where}: unknown ssm_cfg fields {sorted(ssm)}")
    vocab = padded_vocab(int(meta["vocab_size"]), int(meta.get("pad_vocab_size_multiple", 8)))
    return dict(d_model=int(meta["d_model"]), n_layer=int(meta["n_layer"]), vocab_size=vocab,
                mixer="mamba", mixer_options={"mamba": mixer} if mixer else {},
                tie_embeddings=bool(meta.get("tie_embeddings", True)),
                residual_in_fp32=bool(meta.get("residual_in_fp32", True)),
                norm_eps=MAMBA_SSM_NORM_EPS, **shape)


def config_to_mamba_ssm(cfg) -> dict:
    """Our MambaConfig -> mamba_ssm's config.json fields (ValueError for what mamba_ssm cannot represent)."""
    if cfg.vocab_size is None:
        raise ValueError("mamba_ssm format: the model must take token ids (vocab_size set)")
    if not cfg.streamable:
        raise ValueError("mamba_ssm format: bidirectional / rc_equivariant models have no mamba_ssm equivalent")
    if set(cfg.layer_mixers()) != {"mamba"}:
        raise ValueError(f"mamba_ssm format: every layer must be a Mamba mixer, got {sorted(set(cfg.layer_mixers()))}")
    if not cfg.selective:
        raise ValueError("mamba_ssm format: the time-invariant ablation (selective=False) has no mamba_ssm equivalent")
    if abs(cfg.norm_eps - MAMBA_SSM_NORM_EPS) > 1e-12:
        raise ValueError(f"mamba_ssm format: norm_eps must be {MAMBA_SSM_NORM_EPS} (mamba_ssm's fixed value), "
                         f"got {cfg.norm_eps}")
    extra = dict(cfg.mixer_options.get("mamba", {}))
    unknown = set(extra) - set(_MIXER_KWARGS)
    if unknown or set(cfg.mixer_options) - {"mamba"}:
        raise ValueError(f"mamba_ssm format: mixer options {sorted(unknown | (set(cfg.mixer_options) - {'mamba'}))} "
                         "have no mamba_ssm equivalent")
    ssm_cfg = {"layer": "Mamba1", "d_state": cfg.d_state, "d_conv": cfg.d_conv, "expand": cfg.expand, **extra}
    if cfg.dt_rank != "auto":
        ssm_cfg["dt_rank"] = int(cfg.dt_rank)
    # pad_vocab_size_multiple 1: the vocabulary as it is, so mamba_ssm's logits are ours column for column
    # (padding would add tokens that a softmax over mamba_ssm's logits would count).
    return {"d_model": cfg.d_model, "d_intermediate": 0, "n_layer": cfg.n_layer, "vocab_size": cfg.vocab_size,
            "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
            "residual_in_fp32": cfg.residual_in_fp32, "fused_add_norm": True, "pad_vocab_size_multiple": 1,
            "tie_embeddings": cfg.tie_embeddings}


def read_state_dict(directory: Path, map_location) -> dict[str, torch.Tensor]:
    """The weights of a mamba_ssm folder: model.safetensors, else pytorch_model.bin (loaded with
    weights_only=True: tensors only, no code runs)."""
    st, pt = directory / WEIGHT_FILES[0], directory / WEIGHT_FILES[1]
    if st.is_file():
        from safetensors.torch import load_file
        return load_file(str(st), device=str(map_location))
    if pt.is_file():
        try:
            sd = torch.load(pt, map_location=map_location, weights_only=True)
        except Exception as e:   # torch raises several types for a corrupt or non-tensor pickle
            raise ValueError(f"{pt}: not a readable state dict ({str(e).splitlines()[0]})") from None
        if not isinstance(sd, dict):
            raise ValueError(f"{pt}: expected a state dict, got {type(sd).__name__}")
        return sd
    raise FileNotFoundError(f"{directory}: mamba_ssm config.json but no {' or '.join(WEIGHT_FILES)}")


def load_mamba_ssm(model, directory: str | Path, map_location="cpu"):
    """Fill `model` (the MambaLM that ssm_core.model built from `config_from_mamba_ssm`) with the weights of
    a mamba_ssm MambaLMHeadModel folder."""
    directory = Path(directory)
    sd = read_state_dict(directory, map_location)
    if model.config.tie_embeddings:
        head = sd.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, sd.get("backbone.embedding.weight", head)):
            raise ValueError(f"{directory}: tie_embeddings is true but lm_head.weight differs from the embedding")
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:   # a tensor of the wrong shape
        raise ValueError(f"{directory}: weights do not match config.json ({str(e).splitlines()[-1].strip()})") from None
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]})")
    return model.to(map_location)


def write_mamba_ssm(model, directory: Path, weights: str = "pytorch_model.bin") -> None:
    """Write config.json and the weights of `model` (a MambaLM) into the existing folder `directory`."""
    if not hasattr(model, "head_weight"):   # a MambaLM (duck-typed: this module sits below ssm_core.model)
        raise ValueError(f"mamba_ssm format: needs a MambaLM (a model with its LM head), got {type(model).__name__}")
    if weights not in WEIGHT_FILES:
        raise ValueError(f"mamba_ssm format: weights must be one of {WEIGHT_FILES}, got {weights!r}")
    meta = config_to_mamba_ssm(model.config)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        # mamba_ssm ties by assigning the same Parameter, so its state dict (and its strict load) has both
        # keys; safetensors refuses shared storage, hence a copy there.
        emb = sd["backbone.embedding.weight"]
        sd["lm_head.weight"] = emb.clone() if weights.endswith("safetensors") else emb
    (directory / "config.json").write_text(json.dumps(meta, indent=4))
    if weights.endswith("safetensors"):
        from safetensors.torch import save_file
        save_file(sd, str(directory / weights), metadata={"format": "pt"})
    else:
        torch.save(sd, directory / weights)
