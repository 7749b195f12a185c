"""Photometric augmentations of a batch on its device, each sample with its own numbers.

torchvision's functional colour ops (``transforms.v2.functional``: adjust_brightness, adjust_contrast,
adjust_saturation, adjust_hue, rgb_to_grayscale, gaussian_blur) on float images in [0, 1], with the
factor, op order and sigma given per sample as tensors, so a batch of differently jittered views is
a few batched ops: no host sync, no loop over samples. Multi-crop (``multicrop.py``) uses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)  # ColorJitter's op ids (its fn_idx)


def _each(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] per-sample numbers -> [B, 1, 1, 1] in ``like``'s dtype."""
    return values.to(like.dtype).view(-1, 1, 1, 1)


def grey(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 1, H, W]: ITU-R 601-2 luma, torchvision's weights and summation order."""
    r, g, b = images.unbind(dim=1)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(1)


def blend(images: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    """ratio * images + (1 - ratio) * other, clamped to [0, 1]; ``ratio`` [B]."""
    ratio = _each(ratio, images)
    return (images * ratio + other * (1.0 - ratio)).clamp(0.0, 1.0)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (images * _each(factor, images)).clamp(0.0, 1.0)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma."""
    return blend(images, grey(images).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the luma image."""
    return blend(images, grey(images), factor)


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] rgb in [0, 1] -> hsv, h in [0, 1) (grey pixels: h = s = 0)."""
    r, g, _ = images.unbind(dim=1)
    high, low = images.amax(dim=1), images.amin(dim=1)  # [B, H, W]
    flat = high == low
    span = high - low
    s = span / torch.where(flat, torch.ones_like(high), high)
    rc, gc, bc = ((high.unsqueeze(1) - images) / torch.where(flat, torch.ones_like(span), span).unsqueeze(1)).unbind(1)
    h = torch.where(high == r, bc - gc, torch.where(high == g, 2.0 + rc - bc, 4.0 + gc - rc))
    return torch.stack((torch.remainder(h / 6.0, 1.0), s, high), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] hsv -> rgb in [0, 1]."""
    h, s, v = hsv.unbind(dim=1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    f = h6 - sector
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * f)).clamp(0.0, 1.0)
    t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0)
    i = torch.remainder(sector, 6.0)  # the sector, 0 .. 5 (as floats: no table on the host to copy)
    r = torch.where((i == 0) | (i == 5), v, torch.where(i == 1, q, torch.where(i == 4, t, p)))
    g = torch.where(i == 0, t, torch.where((i == 1) | (i == 2), v, torch.where(i == 3, q, p)))
    b = torch.where((i == 0) | (i == 1), p, torch.where(i == 2, t, torch.where((i == 3) | (i == 4), v, q)))
    return torch.stack((r, g, b), dim=1)


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` [B] (in turns, [-0.5, 0.5])."""
    h, s, v = rgb_to_hsv(images).unbind(dim=1)
    h = torch.remainder(h + shift.to(h.dtype).view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=1))


def colour_jitter(images: torch.Tensor, on: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision ``ColorJitter`` per sample: where ``on`` [B], the four ops (ids above) in the
    sample's ``order`` [B, 4] with its ``factors`` [B, 4] (brightness, contrast, saturation, hue
    shift). Each slot computes every op for the whole batch and keeps the scheduled one (4 x 4 op
    evaluations; a gather of the samples per op would need their counts on the host)."""
    ops = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    order = order.long()
    for slot in range(4):
        out = images
        for op_id, op in enumerate(ops):
            chosen = (on & (order[:, slot] == op_id)).view(-1, 1, 1, 1)
            out = torch.where(chosen, op(images, factors[:, op_id]), out)
        images = out
    return images


def greyscale(images: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """``rgb_to_grayscale(num_output_channels=3)`` where ``on`` [B]."""
    return torch.where(on.view(-1, 1, 1, 1), grey(images).expand_as(images), images)


def blur_kernel_size(sigma_max: float, side: int) -> int:
    """The odd kernel covering 3 sigma_max on each side, within what reflect padding allows on a side x side image."""
    half = min(math.ceil(3.0 * sigma_max), side - 1)
    return 2 * max(half, 0) + 1


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """[B] sigmas -> [B, size] normalized 1-D Gaussians over offsets -size//2 .. size//2 (torchvision's kernel)."""
    offsets = torch.arange(size, dtype=sigma.dtype, device=sigma.device) - size // 2
    return torch.softmax(-0.5 * (offsets / sigma.clamp_min(1e-6)[:, None]) ** 2, dim=1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, on: torch.Tensor, size: int) -> torch.Tensor:
    """``gaussian_blur(kernel_size=size, sigma)`` where ``on`` [B], each sample its own ``sigma`` [B]:
    reflect padding, the separable kernel as two grouped convolutions (one group per sample and channel)."""
    if size <= 1:
        return images
    b, c, h, w = images.shape
    kernels = gaussian_kernels(sigma.to(images.dtype), size).repeat_interleave(c, dim=0)  # [B C, K]
    half = size // 2
    x = F.pad(images, (half, half, half, half), mode="reflect").reshape(1, b * c, h + 2 * half, w + 2 * half)
    x = F.conv2d(x, kernels.view(b * c, 1, size, 1), groups=b * c)  # vertical
    x = F.conv2d(x, kernels.view(b * c, 1, 1, size), groups=b * c)  # horizontal
    return torch.where(on.view(-1, 1, 1, 1), x.view(b, c, h, w), images)
