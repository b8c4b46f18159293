"""SSIM between an image and its round trip through a 336-px vision tower's resolution (SPEC §3).

A = the image resized to 768x768 (bilinear), B = A resized to 336x336 and back (bilinear), both
8-bit grayscale; ssim = scikit-image's structural_similarity(A, B) with its defaults (7x7 uniform
window, sample covariance, K1 = 0.01, K2 = 0.03, data range 255). `ssim_reference` is that, verbatim;
`ssim_torch` is the same arithmetic batched in torch (a GPU when there is one).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class SSIMSettings:
    size: int = 768
    low: int = 336
    win_size: int = 7
    k1: float = 0.01
    k2: float = 0.03


def ssim_pair(image: Image.Image, settings: SSIMSettings = SSIMSettings()) -> tuple[np.ndarray, np.ndarray]:
    """The two 8-bit grayscale images SPEC §3 compares (PIL resizes: part of the definition)."""
    a = image.convert("RGB").resize((settings.size, settings.size), Image.BILINEAR)
    b = a.resize((settings.low, settings.low), Image.BILINEAR).resize((settings.size, settings.size), Image.BILINEAR)
    return np.asarray(a.convert("L")), np.asarray(b.convert("L"))


def ssim_reference(image: Image.Image, settings: SSIMSettings = SSIMSettings()) -> float:
    from skimage.metrics import structural_similarity

    a, b = ssim_pair(image, settings)
    return float(
        structural_similarity(a, b, win_size=settings.win_size, K1=settings.k1, K2=settings.k2, data_range=255)
    )


def ssim_torch(a, b, settings: SSIMSettings = SSIMSettings()):
    """Batched SSIM of uint8 grayscale tensors (N, H, W), as scikit-image computes it.

    scikit-image filters with a uniform window (reflect padding) and averages the SSIM map after
    cropping (win_size - 1) / 2 pixels on each side, which is exactly the map of a "valid" 7x7 box
    filter: avg_pool2d without padding. float64 keeps it within 1e-9 of the reference.
    """
    import torch
    import torch.nn.functional as F

    x = a.to(torch.float64).unsqueeze(1)
    y = b.to(torch.float64).unsqueeze(1)
    w = settings.win_size
    cov_norm = w * w / (w * w - 1)  # sample covariance
    c1, c2 = (settings.k1 * 255) ** 2, (settings.k2 * 255) ** 2

    def box(t):
        return F.avg_pool2d(t, w, stride=1)

    ux, uy = box(x), box(y)
    vx = cov_norm * (box(x * x) - ux * ux)
    vy = cov_norm * (box(y * y) - uy * uy)
    vxy = cov_norm * (box(x * y) - ux * uy)
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))
