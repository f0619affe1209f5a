"""FourierAugment against an independent numpy float64 implementation of the method's formulas."""

import numpy as np
import pytest
import torch
from PIL import Image

from dgucdir.data.fourier import FourierAugment, grayscale, normalize
from dgucdir.data.manifest import Manifest


def ref_mix(x, p, lam_a, lam_p, w):
    """Per image, HWC-free numpy float64: full FFT, fftshift window, real part, clip, truncate."""
    fx, fp = np.fft.fft2(x), np.fft.fft2(p)
    amp = (1 - lam_a) * np.abs(fx) + lam_a * np.abs(fp)
    phx = np.fft.fftshift(np.angle(fx), axes=(-2, -1))
    php = np.fft.fftshift(np.angle(fp), axes=(-2, -1))
    H, W = x.shape[-2:]
    if w > 0:
        r0, r1 = int(np.round((H - w) / 2)), int(np.round((H + w) / 2))
        c0, c1 = int(np.round((W - w) / 2)), int(np.round((W + w) / 2))
        phx[..., r0:r1, c0:c1] = (1 - lam_p) * phx[..., r0:r1, c0:c1] + lam_p * php[..., r0:r1, c0:c1]
    out = np.real(np.fft.ifft2(amp * np.exp(1j * np.fft.ifftshift(phx, axes=(-2, -1)))))
    return np.trunc(np.clip(out, 0, 255)), amp


def pil_gray(x):
    """Pillow itself: convert('L') of a CHW image, as the original does before its phase image."""
    return np.asarray(Image.fromarray(x.transpose(1, 2, 0).astype(np.uint8)).convert("L"), np.float64)


def ref_phase_image(x, amplitude=50000.0):
    out = np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(np.fft.fft2(pil_gray(x))))))
    return np.trunc(np.clip(out, 0, 255))


def ref_color_phase_image(x, amplitude=50000.0):
    """The original's phase_img_getter: per-channel FFT of the colour image, constant amplitude."""
    out = np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(np.fft.fft2(x, axes=(-2, -1)))), axes=(-2, -1)))
    return np.trunc(np.clip(out, 0, 255))


def _check(x, p, w):
    aug = FourierAugment(hpf_range=w)
    lam_a = np.array([0.0, 0.35, 0.9, 1.0])[: len(x)]
    lam_p = np.array([0.0, 0.4, 0.1, 0.25])[: len(x)]
    got = aug.mix(torch.tensor(x), torch.tensor(p), torch.tensor(lam_a), torch.tensor(lam_p)).numpy()
    phase = aug.phase_image(torch.tensor(x)).numpy()
    color = aug.color_phase_image(torch.tensor(x)).numpy()
    for i in range(len(x)):
        want, _ = ref_mix(x[i], p[i], lam_a[i], lam_p[i], w)
        assert np.abs(got[i] - want).max() <= 1
        if lam_a[i] > 0:
            # off by one only where truncation sits on an integer boundary; at lambda = 0 every
            # value is an integer in exact arithmetic and the float64 reference often lands just below
            assert np.mean(got[i] != want) < 0.01
        want_phase = ref_phase_image(x[i])
        assert np.abs(phase[i] - want_phase[None]).max() <= 1
        assert (phase[i][0] == phase[i][1]).all() and (phase[i][1] == phase[i][2]).all()
        assert np.abs(color[i] - ref_color_phase_image(x[i])).max() <= 1
        assert np.mean(color[i] != ref_color_phase_image(x[i])) < 0.01


@pytest.mark.parametrize("H, W, w", [(64, 64, 50), (64, 64, 14), (33, 40, 10), (31, 31, 7), (48, 37, 20), (20, 24, 0)])
def test_matches_numpy_reference_on_random_images(H, W, w):
    rng = np.random.default_rng(H * W + w)
    x = rng.integers(0, 256, (4, 3, H, W)).astype(np.float64)
    p = rng.integers(0, 256, (4, 3, H, W)).astype(np.float64)
    _check(x, p, w)


def test_matches_numpy_reference_on_demo_images(demo_manifest):
    m = Manifest.load(demo_manifest)
    imgs = []
    for name in ("ink", "neon", "photo", "sketch"):
        dom = m.domain(name)
        rec = dom.samples()[0]
        import io
        imgs.append(np.asarray(Image.open(io.BytesIO(dom.read_image_bytes(rec))).convert("RGB"), np.float64).transpose(2, 0, 1))
    x = np.stack(imgs)
    _check(x, x[[1, 2, 3, 0]], 14)
    _check(x[:, :, :, :57], x[[3, 0, 1, 2], :, :, :57], 21)  # non-square, odd width


def test_grayscale_is_pillows_convert_L_bit_for_bit():
    """Pillow rounds (since 7.0); a floor, as the project once had, differs on about half the pixels."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (4, 3, 37, 41)).astype(np.float64)
    x[0, :, 0, :3] = [[0, 255, 100]] * 3  # extremes and a grey whose float weights land on 99.99999
    got = grayscale(torch.tensor(x)).numpy()
    for i in range(len(x)):
        assert np.array_equal(got[i], pil_gray(x[i]))
    floor = (299 * x[:, 0] + 587 * x[:, 1] + 114 * x[:, 2]) // 1000
    assert np.mean(floor != got) > 0.3  # the test can tell rounding from flooring


def test_flat_images_with_exactly_zero_coefficients():
    """A constant image has no energy off the zero frequency: angle(0) = 0 there, never NaN."""
    rng = np.random.default_rng(3)
    x = np.full((2, 3, 24, 24), 200.0)
    x[1] = 17.0
    p = rng.integers(0, 256, (2, 3, 24, 24)).astype(np.float64)
    _check(np.concatenate([x, p]), np.concatenate([p, x]), 8)


def test_zero_lambdas_return_the_input_exactly():
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.integers(0, 256, (3, 3, 50, 64)), dtype=torch.float32)
    p = torch.tensor(rng.integers(0, 256, (3, 3, 50, 64)), dtype=torch.float32)
    out = FourierAugment(hpf_range=30).mix(x, p, torch.zeros(3), torch.zeros(3))
    assert torch.equal(out, x)


@pytest.mark.parametrize("size, w", [(32, 0), (33, 7)])
def test_output_amplitude_is_the_mixed_amplitude_before_clipping(size, w):
    """Before clipping, |F(out)| = (1-l)|F(x)| + l|F(p)|. The phase mix leaves the amplitude alone
    when the window is symmetric about the zero frequency (odd size and side)."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0, 255, (2, 3, size, size))
    p = rng.uniform(0, 255, (2, 3, size, size))
    lam = np.array([0.3, 0.7])
    aug = FourierAugment(hpf_range=w)
    out = aug.mix(torch.tensor(x), torch.tensor(p), torch.tensor(lam), torch.tensor([0.4, 0.2]), quantize=False)
    for i in range(2):
        _, amp = ref_mix(x[i], p[i], lam[i], 0.0, 0)
        got = np.abs(np.fft.fft2(out[i].double().numpy()))
        assert np.abs(got - amp).max() / amp.max() < 1e-5


def test_sampled_lambdas_are_in_range_and_fixed_option():
    gen = torch.Generator().manual_seed(0)
    lam_a, lam_p = FourierAugment(alpha=0.6, hpf_alpha=0.4).sample_lambdas(1000, gen)
    assert 0 <= lam_a.min() and lam_a.max() <= 0.6 and lam_a.max() > 0.55
    assert 0 <= lam_p.min() and lam_p.max() <= 0.4
    _, fixed = FourierAugment(hpf_alpha=0.3, hpf_fixed=True).sample_lambdas(5, gen)
    assert torch.allclose(fixed, torch.full((5,), 0.3))


def test_normalize_uses_imagenet_statistics():
    x = torch.full((1, 3, 2, 2), 255.0)
    out = normalize(x)
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225]))
