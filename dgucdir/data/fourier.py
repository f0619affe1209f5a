"""The two-stage Fourier domain augmentation and the phase image, batched on any device.

The original implementation works per image in numpy float64 on the CPU. Here one batched
call does the whole batch in float32 on the batch's own device (cuFFT on a GPU), with
*real-input* FFTs: the images are real, so half of each spectrum suffices.

The centred low-frequency phase-mix window is not symmetric about the zero frequency for even
sides (it covers -w/2 but not +w/2), so the mixed spectrum Z is not Hermitian and the reference
takes ``real(ifft2(Z))``. That equals ``irfft2`` of the Hermitian part ``(Z(k) + conj(Z(-k)))/2``,
which on the half spectrum is ``A(k) * (exp(i*phi_W(k)) + exp(i*phi_W'(k))) / 2`` where phi_W
mixes the phase inside the window W and phi_W' inside the mirrored window -W. So the real-FFT
path is exact, not an approximation.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..config import AugmentConfig

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
# Pillow's convert("L"): L = (19595 R + 38470 G + 7471 B + 0x8000) >> 16, i.e. ITU-R 601 weights in
# 16-bit fixed point, *rounded*. Every intermediate is an integer below 2**24, so exact in float32.
PIL_L_WEIGHTS = (19595, 38470, 7471)
PIL_L_ROUND = 1 << 15
# float32 FFT round trips land up to ~1e-4 below an integer (measured up to 512x512); without
# this guard truncation would turn an unchanged 255 into 254 and lambda = 0 would not be identity.
ROUNDOFF_GUARD = 1e-3


def window_mask_1d(n: int, w: int, device: torch.device) -> torch.Tensor:
    """Boolean mask over *unshifted* frequency indices of the centred window of side ``w``.

    In fftshift coordinates the window is rows round((n-w)/2) .. round((n+w)/2)-1; Python's
    round() (half to even) matches numpy's, which the original uses.
    """
    shifted = torch.zeros(n, dtype=torch.bool, device=device)
    shifted[round((n - w) / 2) : round((n + w) / 2)] = True
    return torch.fft.ifftshift(shifted)


@functools.lru_cache(maxsize=32)
def phase_window(H: int, W: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the phase mix acts on the half spectrum (H, W//2+1), flattened.

    Returns (indices, in window, in mirrored window): the entries inside the window W or the
    mirrored window -W, and for each whether it lies in W and in -W (as 0/1 floats). Only these
    few entries need angles; everywhere else the output phase is the view's own.
    """
    rows, cols = window_mask_1d(H, w, device), window_mask_1d(W, w, device)
    win = rows[:, None] & cols[None, :]
    mirrored = torch.roll(torch.flip(win, (0, 1)), shifts=(1, 1), dims=(0, 1))  # win[-i, -j]
    half = W // 2 + 1
    a, b = win[:, :half].flatten(), mirrored[:, :half].flatten()
    idx = (a | b).nonzero().squeeze(1)
    return idx, a[idx].float(), b[idx].float()


def magnitude(f: torch.Tensor) -> torch.Tensor:
    """|f| of a complex tensor, through hypot on the real view (about 2x faster than .abs() on a CPU)."""
    r = torch.view_as_real(f)
    return torch.hypot(r[..., 0], r[..., 1])


def with_magnitude(f: torch.Tensor, mag_f: torch.Tensor, new_mag: torch.Tensor | float) -> torch.Tensor:
    """new_mag * exp(i * angle(f)), in real arithmetic (no angle, no cos/sin).

    Where f = 0 its angle is 0 (as numpy's), so the result is the real number new_mag.
    """
    zero = mag_f == 0
    scale = torch.where(zero, 0.0, new_mag / mag_f)  # where() drops the inf of x/0 instead of spreading it
    out = torch.view_as_real(f) * scale.unsqueeze(-1)
    if zero.any():
        out[..., 0] = torch.where(zero, new_mag, out[..., 0])
    return torch.view_as_complex(out)


@dataclass(frozen=True)
class FourierAugment:
    """Amplitude mix + low-frequency phase mix with a partner view, and phase images.

    alpha: amplitude mix strength, lambda_a ~ U(0, alpha).
    hpf_range: side of the centred low-frequency window where the phase is mixed (0: off).
    hpf_alpha: phase mix strength, lambda_p ~ U(0, hpf_alpha), or exactly hpf_alpha if hpf_fixed.
    phase_amplitude: the constant amplitude of the phase image.
    """

    alpha: float = 1.0
    hpf_range: int = 50
    hpf_alpha: float = 0.4
    hpf_fixed: bool = False
    phase_amplitude: float = 50000.0

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> "FourierAugment":
        return cls(cfg.alpha, cfg.hpf_range, cfg.hpf_alpha, cfg.hpf_fixed, cfg.phase_amplitude)

    def sample_lambdas(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draws (lambda_a, lambda_p) per sample on the CPU, reproducibly from ``generator``."""
        lam_a = torch.rand(n, generator=generator) * self.alpha
        lam_p = torch.rand(n, generator=generator) * self.hpf_alpha
        if self.hpf_fixed:
            lam_p = torch.full((n,), self.hpf_alpha)
        return lam_a, lam_p

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def mix(self, x: torch.Tensor, p: torch.Tensor, lam_a: torch.Tensor, lam_p: torch.Tensor,
            quantize: bool = True) -> torch.Tensor:
        """Mixes views ``x`` with partners ``p`` (B,C,H,W in [0,255]); returns integer-valued float32.

        ``quantize=False`` returns the real inverse transform before clipping and truncation.
        """
        return self._mix_spectra(torch.fft.rfft2(x.float()), torch.fft.rfft2(p.float()), lam_a, lam_p,
                                 x.shape[-2:], quantize)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def mix_with_partner(self, x: torch.Tensor, partner: torch.Tensor, lam_a: torch.Tensor,
                         lam_p: torch.Tensor) -> torch.Tensor:
        """As :meth:`mix` with ``p = x[partner]``, transforming the batch once instead of twice."""
        fx = torch.fft.rfft2(x.float())
        return self._mix_spectra(fx, fx[partner], lam_a, lam_p, x.shape[-2:], True)

    def _mix_spectra(self, fx: torch.Tensor, fp: torch.Tensor, lam_a: torch.Tensor, lam_p: torch.Tensor,
                     size: tuple[int, int], quantize: bool) -> torch.Tensor:
        B = fx.shape[0]
        H, W = size
        lam_a = lam_a.to(fx.device, torch.float32).view(B, 1, 1, 1)
        mag_x = magnitude(fx)
        amp = torch.lerp(mag_x, magnitude(fp), lam_a)  # (1 - lam_a) |F(x)| + lam_a |F(p)|
        spec = with_magnitude(fx, mag_x, amp)
        w = min(self.hpf_range, H, W)
        if w > 0:
            idx, in_win, in_mirror = phase_window(H, W, w, fx.device)
            flat = spec.flatten(-2)
            phase_x = fx.flatten(-2)[..., idx].angle()
            delta = lam_p.to(fx.device, torch.float32).view(B, 1, 1) * (fp.flatten(-2)[..., idx].angle() - phase_x)
            ones = torch.ones_like(phase_x)
            mixed = (torch.polar(ones, phase_x + delta * in_win) + torch.polar(ones, phase_x + delta * in_mirror)) / 2
            flat[..., idx] = amp.flatten(-2)[..., idx] * mixed
        out = torch.fft.irfft2(spec, s=(H, W))
        return out.add_(ROUNDOFF_GUARD).clamp_(0, 255).trunc_() if quantize else out

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def phase_image(self, x: torch.Tensor) -> torch.Tensor:
        """Grayscale phase-only reconstruction of ``x`` (B,3,H,W in [0,255]) as 3 equal channels.

        The training proxy of the original: PIL's "L" grayscale of the view, its phase with a
        constant amplitude, back to pixels, clipped and truncated to uint8 levels.
        """
        return self._phase_only(grayscale(x)).unsqueeze(1).expand(-1, 3, -1, -1)

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def color_phase_image(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel phase-only reconstruction of ``x`` (B,3,H,W): what the original clusters."""
        return self._phase_only(x.float())

    def _phase_only(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.fft.rfft2(x)
        spec = with_magnitude(f, magnitude(f), self.phase_amplitude)
        return torch.fft.irfft2(spec, s=tuple(x.shape[-2:])).add_(ROUNDOFF_GUARD).clamp_(0, 255).trunc_()


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")`` of integer-valued (B,3,H,W) images, bit for bit, as float32 (B,H,W)."""
    x = x.float()
    wr, wg, wb = PIL_L_WEIGHTS
    return torch.div(wr * x[:, 0] + wg * x[:, 1] + wb * x[:, 2] + PIL_L_ROUND, 1 << 16, rounding_mode="floor")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of [0,255] images (B,3,H,W)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x.float() - mean) / std
