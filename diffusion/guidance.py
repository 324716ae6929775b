"""Guidance: a denoiser steered at sampling time, called as model(x_t, t) like the UNet it wraps, so every sampler
of `diffusion/gaussian.py` works with it. Classifier-free guidance by the conditions (`Guided`, trained for by
`drop_conditions`), autoguidance by a weaker version of the network (`Autoguided`), and either limited to an
interval of steps (`guided_within`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from modules import UNet, as_conditions


def drop_conditions(y: torch.Tensor, p: float) -> torch.Tensor:
    """Each condition of each sample (y (B, K), NaN: not given) dropped to "not given" with probability p, each on
    its own: one network learns the model under every subset of its conditions at once, the unconditional one
    included, as classifier-free guidance needs (Ho & Salimans 2022)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, float("nan"), y)


class Guided(nn.Module):
    """A conditional UNet under classifier-free guidance (Ho & Salimans 2022), called as model(x_t, t):

    out = out(x_t, t, null) + w * (out(x_t, t, y) - out(x_t, t, null)), so w = 0 is the unconditional
    network and w = 1 the conditional one. y (B, K): the conditions given (NaN where one is not: guidance then
    pushes towards the subset given), or (B,) class indices; null: no condition given. Both halves run in one
    batch. Every sampler works with it, for the eps and the v output alike: x0 and eps are linear in the output.
    With an `interval` (first, last) of steps, w applies there only and the conditional network alone elsewhere
    (`guided_within`).
    """

    def __init__(self, unet: UNet, y: torch.Tensor, guidance: float, interval: tuple[int, int] | None = None):
        super().__init__()
        self.unet, self.guidance, self.interval = unet, guidance, interval  # unet: the UNet, or a callable standing in
        self.y = as_conditions(y, len(y), 1, y.device)
        self.null = torch.full_like(self.y, float("nan"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1:
            return self.unet(x_t, t, self.y)
        if self.guidance == 0 and self.interval is None:
            return self.unet(x_t, t, self.null)
        cond, uncond = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.y, self.null])).chunk(2)
        return guided_within(self.interval, t, uncond + self.guidance * (cond - uncond), cond)


class Autoguided(nn.Module):
    """A denoiser guided by a weaker version of itself (autoguidance: Karras et al. 2024, "Guiding a Diffusion Model
    with a Bad Version of Itself", eq. 2), called as model(x_t, t):

    out = guide(x_t, t) + w * (main(x_t, t) - guide(x_t, t)), so w = 1 is the main network alone. The guide makes
    the main network's errors, only larger (here: the same UNet earlier in its training), so stepping away from it
    removes part of them, without the loss of variety that guidance by a condition brings. Both are called with the
    same x_t and t; as for `Guided`, x0 and eps are linear in the output, so every sampler works with it. With an
    `interval` (first, last) of steps, w applies there only and the main network alone elsewhere (`guided_within`)."""

    def __init__(self, main, guide, weight: float, interval: tuple[int, int] | None = None):
        super().__init__()
        self.main, self.guide, self.weight = main, guide, weight  # callables: a UNet, a `Guided` one, a graphed call
        self.interval = interval

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide, main = self.guide(x_t, t), self.main(x_t, t)
        return guided_within(self.interval, t, guide + self.weight * (main - guide), main)


def guided_within(interval: tuple[int, int] | None, t: torch.Tensor, guided: torch.Tensor,
                  unguided: torch.Tensor) -> torch.Tensor:
    """Guidance in a limited interval of steps (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models"): the guided output where first <= t <= last, the
    guided network alone elsewhere, per sample of t (B,); everywhere without an interval. The guiding network is
    still called outside the interval: skipping it would read t back from the device at every step."""
    if interval is None:
        return guided
    first, last = interval
    inside = ((t >= first) & (t <= last)).view(-1, *[1] * (guided.dim() - 1))
    return torch.where(inside, guided, unguided)
