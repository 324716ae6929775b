"""Stage 1's adversarial patch loss: a PatchGAN discriminator, its losses, how its term is weighted, and `Adversary`,
which trains it beside the VQ-VAE (`train-vqvae --adversarial-weight W`).

Two recipes. VQGAN's (Esser et al. 2021): a hinge loss whose generator term is scaled by the adaptive weight at the
decoder's last layer (eq. 7). The brain-MRI anchors' (MONAI's 2D/3D latent diffusion tutorials, 0.01; Pinaya et
al. 2022, 0.005; BrLP 0.025): a least-squares loss (Mao et al. 2017) with a small *fixed* weight, switched on once
the reconstruction has settled (`--adversarial-start` as a fraction of the run). `--adversarial-weighting` picks.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import group_norm
from runtime.checkpoint import load_weights
from runtime.optimizer import adamw, load_optimizer
from runtime.process import Runtime, any_rank, place_model, wrap_model

LOSSES = ("hinge", "non-saturating", "least-squares")
BEFORE_INIT = {"init": "dcgan"}  # a discriminator saved before its config named the initialisation had DCGAN's
WEIGHTINGS = ("adaptive", "fixed")


@dataclass
class DiscriminatorConfig:
    in_channels: int = 1
    channels: int = 64              # width of the first layer, doubled per layer up to 8x
    num_layers: int = 3             # stride-2 convolutions L, patches of 9 * 2^L - 2 pixels: 3 gives 70x70 (pix2pix,
                                    # VQGAN at 256 px), 1 16x16 (`tiny` at 64 px; --discriminator-layers)
    norm: str = "group"             # "group" (GroupNorm, never BatchNorm: batches here can be 1) or "none"
    spectral_norm: bool = False     # spectral normalisation of every conv (Miyato et al. 2018); then use norm "none"
    init: str = "default"           # the convs' weights: PyTorch's own ("default") or "dcgan", N(0, 0.02) as pix2pix
                                    # and VQGAN, which on 64 px slices left it at chance for 1,500 steps (bench/README)


@dataclass(frozen=True)
class AdversaryConfig:
    """What `Adversary` trains with: the stage's flags, resolved once (`losses.stage1.Stage1LossConfig.from_args`)."""
    weight: float                   # --adversarial-weight: the generator term's weight, above 0 (0: no Adversary)
    start: int | float              # --adversarial-start: a step, or a fraction of the run (a float below 1)
    loss: str                       # --adversarial-loss, one of LOSSES
    weighting: str                  # --adversarial-weighting, one of WEIGHTINGS
    lr: float                       # the discriminator's constant AdamW rate: --adversarial-lr, else --lr
    discriminator: DiscriminatorConfig  # a new run's PatchGAN (a resumed one keeps the one it saved)
    log_every: int                  # --log-every: a start by the clock is checked, all ranks agreeing, at log steps
    max_minutes: float | None       # --max-minutes: a fractional start comes at that fraction of the minutes if sooner


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; VQGAN's NLayerDiscriminator): image (B, C, S, S) -> patch logits (B, 1, P, P),
    P = S / 2^num_layers - 2.

    4x4 convolutions, stride 2 for the first num_layers, then two of stride 1; LeakyReLU 0.2; each logit
    judges one overlapping patch (70x70 pixels with 3 layers), so the loss is about texture, not layout.
    """

    def __init__(self, cfg: DiscriminatorConfig):
        super().__init__()
        if cfg.norm not in ("group", "none"):
            raise ValueError(f"DiscriminatorConfig.norm must be 'group' or 'none', got {cfg.norm!r}")
        if cfg.init not in ("default", "dcgan"):
            raise ValueError(f"DiscriminatorConfig.init must be 'default' or 'dcgan', got {cfg.init!r}")
        self.cfg = cfg
        widths = [cfg.channels * min(2 ** i, 8) for i in range(cfg.num_layers + 1)]
        strides = [2] * cfg.num_layers + [1]
        layers, prev = [], cfg.in_channels
        for i, (w, s) in enumerate(zip(widths, strides)):
            normed = i > 0 and cfg.norm == "group"  # no norm on the first layer (pix2pix)
            layers += [self._conv(prev, w, s, bias=not normed), group_norm(w) if normed else nn.Identity(),
                       nn.LeakyReLU(0.2)]
            prev = w
        layers.append(self._conv(prev, 1, 1, bias=True))
        self.net = nn.Sequential(*layers)

    def _conv(self, in_ch: int, out_ch: int, stride: int, bias: bool) -> nn.Module:
        conv = nn.Conv2d(in_ch, out_ch, 4, stride=stride, padding=1, bias=bias)
        if self.cfg.init == "dcgan":
            nn.init.normal_(conv.weight, 0.0, 0.02)
        return nn.utils.parametrizations.spectral_norm(conv) if self.cfg.spectral_norm else conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017), halved as in VQGAN:
    (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]) / 2; logits of any shape, real and fake sizes may differ."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (cross-entropy) loss of the discriminator (Goodfellow et al. 2014), halved as in VQGAN's
    "vanilla": (E[softplus(-D(x))] + E[softplus(D(x_rec))]) / 2, i.e. -log sigmoid(D(x)) - log(1 - sigmoid(D(x_rec)))."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def least_squares_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares loss of the discriminator (LSGAN, Mao et al. 2017, eq. 2 with a = 0, b = 1), halved:
    (E[(D(x) - 1)^2] + E[D(x_rec)^2]) / 2, as MONAI's PatchAdversarialLoss("least_squares")."""
    return 0.5 * ((logits_real - 1).pow(2).mean() + logits_fake.pow(2).mean())


def least_squares_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Least-squares loss of the generator (Mao et al. 2017, eq. 2 with c = 1), halved: E[(D(x_rec) - 1)^2] / 2."""
    return 0.5 * (logits_fake - 1).pow(2).mean()


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-E[D(x_rec)]: VQGAN's generator loss, with either discriminator loss above."""
    return -logits_fake.mean()


D_LOSS = {"hinge": hinge_d_loss, "non-saturating": non_saturating_d_loss, "least-squares": least_squares_d_loss}
G_LOSS = {"hinge": generator_adversarial_loss, "non-saturating": generator_adversarial_loss,
          "least-squares": least_squares_g_loss}


def start_step(start: int | float, max_steps: int) -> int:
    """--adversarial-start: a step (an int), or a fraction of the run's steps (a float below 1)."""
    return round(start * max_steps) if isinstance(start, float) and start < 1 else int(start)


def adversarial_factor(step: int, start: int) -> float:
    """0 before `start`, 1 from it on: the discriminator and its loss stay off while reconstructions are still
    coarse, when it would win at once and its gradients would only add noise (VQGAN's disc_start)."""
    return 1.0 if step >= start else 0.0


ADAPTIVE_WEIGHT_FALLBACK = 0.0


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """lambda = ||grad_{G_L} L_rec|| / (||grad_{G_L} L_GAN|| + 1e-4), clamped to [0, max_weight], detached
    (Esser et al. 2021, eq. 7); G_L is the decoder's last weight (`VQVAE.last_layer`).

    It scales the adversarial gradient to the size of the reconstruction gradient at the decoder's output,
    so neither drowns the other whatever their raw scales. Both losses must still hold their graphs (it
    uses retain_graph; call it before loss.backward()).

    Fallback: returns ADAPTIVE_WEIGHT_FALLBACK = 0 when the gradients cannot be computed (the decoder is
    frozen, or the losses were computed without grad, e.g. in an evaluation pass): a GAN term that cannot be
    balanced is switched off rather than left unscaled, and a frozen decoder could not learn from it anyway.
    (VQGAN returns 0 in the same case.)
    """
    if not (last_layer.requires_grad and rec_loss.requires_grad and gan_loss.requires_grad):
        return torch.tensor(ADAPTIVE_WEIGHT_FALLBACK, device=last_layer.device)
    rec_grad, = torch.autograd.grad(rec_loss, last_layer, retain_graph=True, allow_unused=True)
    gan_grad, = torch.autograd.grad(gan_loss, last_layer, retain_graph=True, allow_unused=True)
    norm = lambda g: g.float().norm() if g is not None else torch.zeros((), device=last_layer.device)  # noqa: E731
    return (norm(rec_grad) / (norm(gan_grad) + 1e-4)).clamp(0.0, max_weight).detach()


# ----------------------------------------------------------------------------- training the discriminator

class Adversary:
    """Stage 1's optional adversarial patch loss: a PatchGAN discriminator with its own AdamW (betas 0.5, 0.9, as
    VQGAN), off before the start step (--adversarial-start, a step or a fraction of `max_steps`; with --max-minutes, a
    fraction starts at that fraction of the minutes if it comes sooner, the step resolved at the first log step after
    it, on which all ranks agree, and saved), its generator term
    weighted by --adversarial-weight, times the adaptive weight at the decoder's last layer (eq. 7) unless
    --adversarial-weighting fixed; the losses of --adversarial-loss. The discriminator learns after each VQ-VAE
    step, on that step's last real batch and its reconstructions (detached: no gradient reaches the VQ-VAE),
    unless --skip-nonfinite skipped that step. It counts the loop's steps, skipped ones too, so it starts at the
    loop's --adversarial-start; under fp16 its own GradScaler scales its loss and skips its non-finite steps."""

    def __init__(self, config: AdversaryConfig, rt: Runtime, resume: dict | None, max_steps: int):
        self.weight, self.rt = config.weight, rt
        self.adaptive = config.weighting == "adaptive"
        self.step = resume["step"] if resume else 0
        resume = resume if resume and "discriminator" in resume else None  # a run that trained without one starts one
        # a fraction is resolved once, at the run's start: a resumed run keeps its start step whatever its new length
        self.start = resume["adversarial_start"] if resume and "adversarial_start" in resume else \
            start_step(config.start, max_steps)
        fraction = isinstance(config.start, float) and config.start < 1
        self.start_by = (time.monotonic() + config.start * 60 * config.max_minutes  # a run that ends by the
                         if fraction and config.max_minutes and self.start > self.step else None)  # clock: its fraction
        self.check_every = config.log_every
        self.d_loss, self.g_loss = D_LOSS[config.loss], G_LOSS[config.loss]
        self.disc_config = (DiscriminatorConfig(**{**BEFORE_INIT, **resume["disc_config"]}) if resume else
                            config.discriminator)
        self.disc = place_model(PatchDiscriminator(self.disc_config), rt)
        self.optimizer = adamw(self.disc.parameters(), config.lr, weight_decay=0.0, betas=(0.5, 0.9))
        self.scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.scaler.is_enabled())
        if resume:
            resumed = "the checkpoint resumed"
            load_weights(self.disc, resume["discriminator"], resumed, "discriminator")
            load_weights(self.optimizer, resume["disc_optimizer"], resumed, "discriminator's optimizer",
                         load=load_optimizer)
            for group in self.optimizer.param_groups:  # a constant rate: --lr or --adversarial-lr, as resolved now
                group["lr"] = config.lr
            if self.scaler.is_enabled() and resume.get("disc_scaler"):
                self.scaler.load_state_dict(resume["disc_scaler"])
        self.train_disc = wrap_model(self.disc, rt, compile_model=False)
        self.batch = None

    def generator_loss(self, x: torch.Tensor, recon: torch.Tensor, rec_loss: torch.Tensor, last_layer) -> torch.Tensor:
        """The weighted adversarial term of the VQ-VAE's loss (0 before the start step); keeps the batch for
        `after_step`."""
        if not adversarial_factor(self.step, self.start):
            return torch.zeros((), device=x.device)
        self.batch = (x, recon.detach())
        self.disc.requires_grad_(False)  # the VQ-VAE's step: the discriminator judges, it does not learn
        with self.rt.autocast:
            g_loss = self.g_loss(self.disc(recon).float())
        self.disc.requires_grad_(True)
        return self.weight * (adaptive_weight(rec_loss, g_loss, last_layer) if self.adaptive else 1.0) * g_loss

    def after_step(self, step: int, taken: bool):
        """After each VQ-VAE step (the loop's `step` now): one discriminator step, from the start step on, unless
        the VQ-VAE's step was skipped (its reconstructions may hold NaN)."""
        self.step = step
        if (self.start_by is not None and step % self.check_every == 0
                and any_rank(time.monotonic() >= self.start_by, self.rt)):  # the fraction of --max-minutes is up
            self.start, self.start_by = min(self.start, step + 1), None
        if taken and self.batch is not None:
            with self.rt.autocast:
                logits = self.train_disc(torch.cat(self.batch)).float()
            loss = self.d_loss(*logits.chunk(2))
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.batch = None

    def state(self) -> dict:
        return {"discriminator": self.disc.state_dict(), "disc_optimizer": self.optimizer.state_dict(),
                "disc_scaler": self.scaler.state_dict(), "disc_config": asdict(self.disc_config),
                "adversarial_start": self.start}
