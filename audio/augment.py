"""Training-time augmentation of keyword clips, batched on the training device: speed perturbation, time
shift, background-noise mixing, mel-axis warp (VTLP-like), SpecAugment, and the channel: simulated rooms,
band-limited and telephone channels, microphone hiss."""
from __future__ import annotations

import math

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
    steps = max(1, int(max_change * 20))
    return torch.cat([stretch(part, 20 + int(torch.randint(-steps, steps + 1, ())), 20)
                      for part in wave.chunk(groups)])


def stretch(wave: torch.Tensor, new: int, old: int) -> torch.Tensor:
    """Clips (b, n) resampled from `old` to `new` samples a unit (new > old: slower and lower, as played at the
    same rate), cut or zero-padded back to n."""
    if new == old:
        return wave
    import torchaudio.functional as AF
    n = wave.shape[1]
    part = AF.resample(wave, old, new)[:, :n]
    return F.pad(part, (0, n - part.shape[1]))


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
    return warp_mel_axis(feats, 1 + (torch.rand(feats.shape[0], 1, device=feats.device) * 2 - 1) * max_change)


def warp_mel_axis(feats: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """feats (b, frames, mels) with mel bin k read from bin k / alpha (alpha (b, 1) or one number; > 1 moves
    the formants up, as a shorter vocal tract), linear between bins, the edge bin repeated."""
    b, _, m = feats.shape
    alpha = torch.as_tensor(alpha, dtype=feats.dtype, device=feats.device).expand(b, 1)
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


def _per_example(wave: torch.Tensor, prob: float) -> torch.Tensor:
    """(b, 1) mask: which examples of the batch an augmentation touches."""
    return (torch.rand(wave.shape[0], 1, device=wave.device) < prob).to(wave.dtype)


def room_reverb(wave: torch.Tensor, prob: float, sample_rate: int, rt60: tuple[float, float] = (0.1, 0.8),
                drr_db: tuple[float, float] = (-3.0, 15.0)) -> torch.Tensor:
    """Convolve a share `prob` of the clips with a synthetic room response: the direct path, then
    exponentially decaying noise whose RT60 (log-uniform in `rt60`) and direct-to-reverberant ratio
    (uniform in `drr_db`: a close microphone to one across a room) are drawn per clip.
    (An image-source simulator such as pyroomacoustics is CPU-bound per room; this stays batched on the
    training device, and the reverberant tail is what changes log-mel frames most.)"""
    if prob <= 0:
        return wave
    import torchaudio.functional as AF
    b, n = wave.shape
    length = int(rt60[1] * sample_rate)
    t = torch.arange(length, device=wave.device, dtype=wave.dtype) / sample_rate
    lo, hi = torch.log(torch.tensor(rt60, dtype=wave.dtype))
    rt = torch.exp(lo + (hi - lo) * torch.rand(b, 1, device=wave.device, dtype=wave.dtype))
    tail = torch.randn(b, length, device=wave.device, dtype=wave.dtype) * torch.exp(-6.9 * t / rt)
    tail[:, 0] = 0.0
    drr = drr_db[0] + (drr_db[1] - drr_db[0]) * torch.rand(b, 1, device=wave.device, dtype=wave.dtype)
    rir = tail / tail.norm(dim=1, keepdim=True) * 10 ** (-drr / 20)
    rir[:, 0] = 1.0
    wet = AF.fftconvolve(wave, rir)[:, :n]
    use = _per_example(wave, prob)
    return use * wet + (1 - use) * wave


def channel(wave: torch.Tensor, prob: float, telephone_prob: float, sample_rate: int) -> torch.Tensor:
    """A random microphone / transmission channel on a share `prob` of the clips, as a zero-phase filter in
    the frequency domain: band limits (low cut 50-400 Hz, high cut 2.5-8 kHz, log-uniform, soft edges), a
    spectral tilt of +-3 dB per octave and one resonance of +-6 dB. A share `telephone_prob` of those gets
    the telephone band (300-3400 Hz) and 8-bit mu-law companding instead."""
    if prob <= 0:
        return wave
    import torchaudio.functional as AF
    b, n = wave.shape
    dev, dt = wave.device, wave.dtype
    f = torch.fft.rfftfreq(n, 1 / sample_rate).to(dev, dt).clamp_min(1.0)
    logf = torch.log2(f)[None]

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(b, 1, device=dev, dtype=dt)

    phone = (torch.rand(b, 1, device=dev) < telephone_prob).to(dt)
    low = torch.where(phone > 0, torch.full_like(phone, 300.0), 2 ** uniform(math.log2(50), math.log2(400)))
    high = torch.where(phone > 0, torch.full_like(phone, 3400.0), 2 ** uniform(math.log2(2500), math.log2(8000)))
    # Soft edges: about 12 dB per third of an octave past each cut-off.
    band = torch.sigmoid((logf - torch.log2(low)) * 12) * torch.sigmoid((torch.log2(high) - logf) * 12)
    tilt = uniform(-3, 3) * (logf - math.log2(1000))
    peak_f, peak_db = uniform(math.log2(300), math.log2(5000)), uniform(-6, 6)
    gain_db = tilt + peak_db * torch.exp(-0.5 * ((logf - peak_f) / 0.5) ** 2)
    response = band * 10 ** (gain_db / 20)
    filtered = torch.fft.irfft(torch.fft.rfft(wave) * response, n)
    peak = filtered.abs().amax(1, keepdim=True).clamp_min(1e-4)
    companded = AF.mu_law_decoding(AF.mu_law_encoding(filtered / peak, 256), 256) * peak
    filtered = phone * companded + (1 - phone) * filtered
    use = _per_example(wave, prob)
    return use * filtered + (1 - use) * wave


def mic_noise(wave: torch.Tensor, prob: float, snr_db: list[float]) -> torch.Tensor:
    """The microphone's own hiss: white noise at a random SNR in `snr_db` on a share `prob` of the clips."""
    if prob <= 0:
        return wave
    snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand(wave.shape[0], 1, device=wave.device)
    p_sig = wave.pow(2).mean(1, keepdim=True).clamp_min(1e-6)
    noise = torch.randn_like(wave) * torch.sqrt(p_sig / 10 ** (snr / 10))
    return wave + _per_example(wave, prob) * noise
