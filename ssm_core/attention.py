"""Causal multi-head attention as a mixer, for hybrid stacks (Jamba-style: one attention layer per several
Mamba layers, for recall and in-context tasks). Parameter names as mamba_ssm's MHA (`in_proj`, `out_proj`).

Attention goes through `torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels
on GPU; `attend` pads head_dim so that they apply). Positions: rotary embeddings (RoPE) by default; a hybrid
can set `rotary=False` and rely on the Mamba layers for order, as Jamba does.

Streaming keeps a KV cache. Its memory is what makes attention different from the SSM mixers, whose state is
a constant size: per attention layer the cache holds keys and values for every past token,

    2 * batch * cached_tokens * num_heads * head_dim * bytes_per_element

where cached_tokens = tokens seen so far (grows without bound), or min(tokens seen, window) with a sliding
`window`. E.g. d_model 768 (12 heads x 64), bf16, batch 1: 3 KiB per token per layer, 3 GiB at 1M tokens.
A window W bounds it at 3 KiB * W and makes `forward` and `stream` attend to the last W tokens only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .mamba2 import check_mixer_input
from .model import MambaConfig, register_mixer

# Most score elements one masked attention call of `stream` may materialise (2^28: 1 GiB in float32).
STREAM_SCORES = 1 << 28
# SDPA's flash and memory-efficient kernels need head_dim to be a multiple of 8 (16 bytes in half precision);
# for any other head_dim PyTorch falls back to its math kernel, which materialises every (query, key) score:
# a one-head d_model 78 layer at batch 64 x 8192 tokens asked for 16 GiB at once. `attend` pads to it.
SDPA_HEAD_MULTIPLE = 8


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           is_causal: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention(q, k, v) with head_dim padded by zero columns to SDPA_HEAD_MULTIPLE, so
    that the memory-efficient kernels apply: zero columns change no score and give zero output columns (cut
    off), and the scale stays 1/sqrt(the true head_dim). Exact."""
    d = q.shape[-1]
    pad = -d % SDPA_HEAD_MULTIPLE
    if pad == 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          scale=d ** -0.5)[..., :d]


@dataclass
class KVCache:
    """Streaming state of one attention mixer. Not updated in place: `stream` returns the new cache."""
    k: torch.Tensor  # (batch, num_heads, cached_tokens, head_dim), rotary already applied
    v: torch.Tensor  # (batch, num_heads, cached_tokens, head_dim)
    pos: int = 0     # tokens consumed so far (the absolute position of the next token)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() + self.v.numel() * self.v.element_size()


def rotary(x: torch.Tensor, pos: torch.Tensor, base: float) -> torch.Tensor:
    """RoPE on x (b, h, T, d) at absolute positions pos (T,): rotate pairs (x_i, x_{i+d/2})."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]                      # (T, half)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:2 * half]
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
    return torch.cat([out, x[..., 2 * half:]], dim=-1) if x.shape[-1] % 2 else out


class Attention(nn.Module):
    def __init__(self, d_model: int, num_heads: int | None = None, head_dim: int | None = None,
                 window: int | None = None, rotary: bool = True, rotary_base: float = 10000.0,
                 bias: bool = False, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        num_heads = num_heads if num_heads is not None else max(1, d_model // 64)
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"Attention num_heads: expected a positive integer, got {num_heads!r}")
        if head_dim is None:
            if d_model % num_heads:
                raise ValueError(f"Attention num_heads: {num_heads} must divide d_model={d_model} "
                                 "(or set head_dim)")
            head_dim = d_model // num_heads
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"Attention window: expected a positive integer or None, got {window!r}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads, self.head_dim = d_model, num_heads, head_dim
        self.window, self.use_rotary, self.rotary_base, self.layer_idx = window, rotary, rotary_base, layer_idx
        self.in_proj = nn.Linear(d_model, 3 * num_heads * head_dim, bias=bias, **fk)
        self.out_proj = nn.Linear(num_heads * head_dim, d_model, bias=bias, **fk)

    def _qkv(self, x: torch.Tensor, start: int):
        b, T, _ = x.shape
        q, k, v = self.in_proj(x).view(b, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.use_rotary:
            pos = torch.arange(start, start + T, device=x.device)
            q, k = rotary(q, pos, self.rotary_base), rotary(k, pos, self.rotary_base)
        return q, k, v

    def _mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Boolean (T, S) mask, True = may attend: causal, and within the window when one is set."""
        diff = q_pos[:, None] - k_pos[None, :]
        keep = diff >= 0
        if self.window is not None:
            keep &= diff < self.window
        return keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, L, d_model) -> (batch, L, d_model)."""
        check_mixer_input(x, self.d_model)
        L = x.shape[1]
        q, k, v = self._qkv(x, 0)
        if self.window is None or self.window >= L:
            o = attend(q, k, v, is_causal=True)
        else:
            pos = torch.arange(L, device=x.device)
            o = attend(q, k, v, attn_mask=self._mask(pos, pos))
        return self.out_proj(o.transpose(1, 2).reshape(x.shape[0], L, -1))

    def init_state(self, batch_size: int, device=None, dtype=None) -> KVCache:
        p = self.in_proj.weight
        empty = torch.zeros(batch_size, self.num_heads, 0, self.head_dim,
                            device=device if device is not None else p.device,
                            dtype=dtype if dtype is not None else p.dtype)
        return KVCache(k=empty, v=empty.clone(), pos=0)

    def stream(self, x: torch.Tensor, state: KVCache) -> tuple[torch.Tensor, KVCache]:
        """Consume a chunk x (batch, T, d_model): its queries attend to the cache plus the chunk (causally);
        the cache then keeps every token, or the last `window` ones. Returns (y, new cache)."""
        check_mixer_input(x, self.d_model)
        if state.k.shape[0] != x.shape[0]:
            raise ValueError(f"state: built for batch {state.k.shape[0]}, got x with batch {x.shape[0]}")
        b, T, _ = x.shape
        q, k, v = self._qkv(x, state.pos)
        k = torch.cat([state.k, k.to(state.k.dtype)], dim=2)
        v = torch.cat([state.v, v.to(state.v.dtype)], dim=2)
        S = k.shape[2]
        q_pos = torch.arange(state.pos, state.pos + T, device=x.device)
        k_pos = torch.arange(state.pos + T - S, state.pos + T, device=x.device)
        kq, vq = k.to(q.dtype), v.to(q.dtype)
        if T == 1 and (self.window is None or S <= self.window):
            o = attend(q, kq, vq)
        else:
            # A masked SDPA materialises the (b, heads, queries, keys) scores and the mask: with a long cache
            # (an induction stream at 2^20 tokens, chunks of 8192) that is tens of GiB at once. The chunk's
            # queries are independent of each other, so they go in blocks that keep it under STREAM_SCORES.
            block = max(1, STREAM_SCORES // (b * self.num_heads * S))
            o = torch.cat([attend(q[:, :, i:i + block], kq, vq, attn_mask=self._mask(q_pos[i:i + block], k_pos))
                           for i in range(0, T, block)], dim=2)
        if self.window is not None and S > self.window:
            k, v = k[:, :, S - self.window:], v[:, :, S - self.window:]
        y = self.out_proj(o.transpose(1, 2).reshape(b, T, -1))
        return y, KVCache(k=k, v=v, pos=state.pos + T)


def hybrid_mixers(n_layer: int, every: int = 8, base: str = "mamba", other: str = "attention") -> list[str]:
    """A per-layer mixer list for MambaConfig.mixer: `other` at every `every`-th layer (the last of each group
    of `every`), `base` elsewhere. hybrid_mixers(8) == ["mamba"] * 7 + ["attention"] (Jamba's 1:7 ratio)."""
    if n_layer < 1 or every < 1:
        raise ValueError(f"hybrid_mixers: n_layer and every must be >= 1, got {n_layer}, {every}")
    return [other if i % every == every - 1 else base for i in range(n_layer)]


@register_mixer("attention")
def _attention_mixer(cfg: MambaConfig, d_model: int, layer_idx: int) -> nn.Module:
    return Attention(d_model, layer_idx=layer_idx, **cfg.mixer_options.get("attention", {}))
