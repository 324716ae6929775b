"""How stage 1 measures a reconstruction against its image: pixel losses, the Laplacian pyramid and the frequency
spectrum. Functions of (recon, x), both (B, C, H, W) in [-1, 1], returning scalars; differentiable in recon.

MSE alone blurs the finest band (bench/README.md: the reconstructions' SWD at the finest pyramid level is 3x that of
real images). The brain-MRI latent diffusion models (MONAI's tutorials, Pinaya et al. 2022) train their first stage
with L1, a perceptual loss and a small adversarial term; the terms here need no downloaded weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BASE_LOSSES = ("mse", "l1")


def as_shown(recon: torch.Tensor) -> torch.Tensor:
    """The reconstruction clamped to the image range [-1, 1], as it is shown and scored, with the gradient of the
    unclamped output (straight-through): the error of the image the user sees, with a push wherever it is wrong.

    Why: most of a brain slice is background at exactly -1. Under MSE on the raw output the decoder's background
    ripples around -1 by 1-5 grey levels (its codes there differ slightly), and the clamp at display cuts only
    the half below -1; the ripple is then most of what the finest pyramid band sees (bench/README.md). Measured
    on the clamped output, a background pixel at or below -1 is exact, so the decoder is free to sit below it.
    It does drift there (to a median of -1.3 by 1000 steps), which nothing sees: every image is clamped before
    it is shown or scored. Both presets use it (`--clamped-loss`): it brought the reconstructions' finest band
    closer to real at equal steps at 64 px (two seeds) and 256 px (one run); through stage 2 at equal budget
    one run gained and its rerun did not (bench/README.md).
    """
    return recon + (recon.clamp(-1, 1) - recon).detach()


def base_loss(recon: torch.Tensor, x: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    """The pixel loss the other terms are added to: `mse` (the card's), or `l1` (MONAI's and Pinaya et al.'s first
    stages), whose gradient does not fade as the error shrinks."""
    if kind not in BASE_LOSSES:
        raise ValueError(f"base loss must be one of {BASE_LOSSES}, got {kind!r}")
    return F.mse_loss(recon, x) if kind == "mse" else F.l1_loss(recon, x)


def laplacian_pyramid(x: torch.Tensor, min_size: int = 16) -> list[torch.Tensor]:
    """Band-pass levels, finest first, down to min_size, then the low-pass residual (Burt & Adelson 1983).

    Differentiable; also the pyramid of the SWD metric (evaluation/metrics.py), so loss and metric agree on the bands.
    """
    k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device) / 16
    kernel = (k[:, None] * k[None, :]).expand(x.shape[1], 1, 5, 5)
    blur = lambda img: F.conv2d(F.pad(img, (2, 2, 2, 2), mode="reflect"), kernel, groups=img.shape[1])  # noqa: E731
    levels = []
    while x.shape[-1] > min_size:
        down = blur(x)[..., ::2, ::2]
        up = torch.zeros_like(x)
        up[..., ::2, ::2] = down * 4  # zero-insertion upsampling, gain 4 restores the mean after blurring
        levels.append(x - blur(up))
        x = down
    levels.append(x)
    return levels


def laplacian_l1(recon: torch.Tensor, x: torch.Tensor, min_size: int = 16) -> torch.Tensor:
    """Sum over pyramid levels of the mean |L_j(recon) - L_j(x)| (Lap1, Bojanowski et al. 2018): a scalar.

    Why: a blurry reconstruction's error sits in the finest band, where detail has low amplitude, and MSE's
    gradient shrinks with the error (2e), so once the coarse image is right the fine band gets little push.
    Here each band enters through its absolute value: an error of amplitude a costs a at whichever level it
    sits (a constant shift and a pixel checkerboard alike), and its gradient does not fade as it shrinks.
    Computed in float32 whatever the autocast.
    """
    return sum((a - b).abs().mean() for a, b in zip(laplacian_pyramid(recon.float(), min_size),
                                                    laplacian_pyramid(x.float(), min_size)))


def focal_frequency_loss(recon: torch.Tensor, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """The focal frequency loss (Jiang et al. 2021, eq. 2-3): the squared distance of the two images' 2D spectra
    (orthonormal FFT), each frequency weighted by its own distance to the power alpha, scaled to [0, 1] per image
    and channel and detached. The frequencies the decoder gets most wrong, the hardest ones, count most; a blurry
    decoder's are the high ones. Needs no network. Computed in float32."""
    spectrum = lambda img: torch.fft.fft2(img.float(), norm="ortho")  # noqa: E731
    distance = (spectrum(recon) - spectrum(x)).abs() ** 2                               # (B, C, H, W)
    weight = distance.sqrt() ** alpha
    weight = (weight / weight.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)).detach()
    return (weight * distance).mean()
