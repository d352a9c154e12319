"""Training-time augmentation of keyword clips, batched on the training device: speed perturbation, time
shift, background-noise mixing, mel-axis warp (VTLP-like) and SpecAugment."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def time_shift(wave: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each clip by up to +-max_shift samples, filling with zeros."""
    if max_shift <= 0:
        return wave
    b, n = wave.shape
    shift = torch.randint(-max_shift, max_shift + 1, (b, 1), device=wave.device)
    src = torch.arange(n, device=wave.device) - shift
    valid = (src >= 0) & (src < n)
    return torch.gather(wave, 1, src.clamp(0, n - 1)) * valid


def speed_perturb(wave: torch.Tensor, max_change: float, groups: int = 4) -> torch.Tensor:
    """Resample each of `groups` slices of the batch by its own factor in [1 - max_change, 1 + max_change]
    (Kaldi-style speed perturbation: tempo and pitch move together, a cheap stand-in for new speakers), then
    cut or zero-pad back to the clip length. Factors are multiples of 1/20 so the polyphase filter stays small."""
    if max_change <= 0:
        return wave
    import torchaudio.functional as AF
    n = wave.shape[1]
    steps = max(1, int(max_change * 20))
    out = []
    for part in wave.chunk(groups):
        new = 20 + int(torch.randint(-steps, steps + 1, ()))
        if new != 20:
            part = AF.resample(part, 20, new)[:, :n]
            part = F.pad(part, (0, n - part.shape[1]))
        out.append(part)
    return torch.cat(out)


def mix_noise(wave: torch.Tensor, bank: torch.Tensor, prob: float, snr_db: list[float]) -> torch.Tensor:
    """Add a random cut of the noise bank to a share `prob` of the clips, at a random SNR."""
    b, n = wave.shape
    if bank.numel() <= n or prob <= 0:
        return wave
    start = torch.randint(0, bank.numel() - n, (b, 1), device=wave.device)
    noise = bank[start + torch.arange(n, device=wave.device)]
    snr = torch.empty(b, 1, device=wave.device).uniform_(*snr_db)
    p_sig = wave.pow(2).mean(1, keepdim=True).clamp_min(1e-6)   # silent clips get noise at a fixed level
    p_noise = noise.pow(2).mean(1, keepdim=True).clamp_min(1e-8)
    scale = torch.sqrt(p_sig / (p_noise * 10 ** (snr / 10)))
    use = (torch.rand(b, 1, device=wave.device) < prob).float()
    return wave + use * scale * noise


def freq_warp(feats: torch.Tensor, max_change: float) -> torch.Tensor:
    """Stretch or squeeze each example's mel axis by a factor in [1 - max_change, 1 + max_change] (linear
    interpolation between bins, edge bin repeated): a vocal-tract-length change moves the formants this way
    while leaving the timing alone. feats (b, frames, mels)."""
    if max_change <= 0:
        return feats
    b, _, m = feats.shape
    alpha = 1 + (torch.rand(b, 1, device=feats.device) * 2 - 1) * max_change
    pos = (torch.arange(m, device=feats.device, dtype=feats.dtype) / alpha).clamp(0, m - 1)   # (b, mels)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=m - 1)
    frac = (pos - lo).unsqueeze(1)
    lo_v, hi_v = (feats.gather(2, i.unsqueeze(1).expand(-1, feats.shape[1], -1)) for i in (lo, hi))
    return torch.lerp(lo_v, hi_v, frac)


def spec_augment(feats: torch.Tensor, freq_mask: int, time_mask: int) -> torch.Tensor:
    """Two frequency and two time masks per example (set to 0, the normalised mean)."""
    import torchaudio.functional as AF
    x = feats.transpose(1, 2).unsqueeze(1)          # (b, 1, mels, frames)
    for _ in range(2):
        if freq_mask > 0:
            x = AF.mask_along_axis_iid(x, freq_mask, 0.0, axis=2)
        if time_mask > 0:
            x = AF.mask_along_axis_iid(x, time_mask, 0.0, axis=3)
    return x.squeeze(1).transpose(1, 2)
