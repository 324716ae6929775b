"""Stage 1's loss of a reconstruction, as `train-vqvae` and `train-decoder` train with it: the terms of losses/ that
the run's flags switch on, summed, and the discriminator that learns beside them; those flags (`add_arguments`), and
their values, read once from the resolved command line (`Stage1LossConfig.from_args`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from losses.adversarial import LOSSES, WEIGHTINGS, Adversary, AdversaryConfig, DiscriminatorConfig
from losses.perceptual import NETWORKS, perceptual_loss
from losses.reconstruction import BASE_LOSSES, as_shown, base_loss, focal_frequency_loss, laplacian_l1
from runtime.checkpoint import fingerprint
from runtime.errors import BadInputError
from runtime.flags import non_negative, positive, step_or_fraction
from runtime.process import Runtime

# The stage-1 losses' defaults: train-vqvae's are MSE alone; train-decoder's, the brain-MRI anchors' recipe (L1, a
# perceptual term, a least-squares GAN at a fixed weight; MONAI's tutorials, Pinaya et al. 2022) with the random
# VGG16, the one perceptual network that sharpened the finest band here, at CompVis' LPIPS weight 1.0, which beat
# 0.25 on three training seeds (bench/README.md).
STAGE1_LOSSES = {
    "vqvae": dict(reconstruction_loss="mse", perceptual_weight=0.0, perceptual_network="vgg16", adversarial_loss="hinge",
                  adversarial_weighting="adaptive"),
    "decoder": dict(reconstruction_loss="l1", perceptual_weight=1.0, perceptual_network="random",
                    adversarial_loss="least-squares", adversarial_weighting="fixed"),
}


@dataclass(frozen=True)
class Stage1LossConfig:
    """The stage-1 losses' settings (`add_arguments`' flags), resolved once from the command line (`from_args`)."""
    reconstruction_loss: str        # --reconstruction-loss, one of BASE_LOSSES
    clamped_loss: bool              # --clamped-loss: the error of the output clamped as shown (`as_shown`)
    laplacian_weight: float         # --laplacian-weight (0: off)
    frequency_weight: float         # --frequency-weight (0: off)
    perceptual_weight: float        # --perceptual-weight (0: off)
    perceptual_network: str         # --perceptual-network, one of NETWORKS
    vgg_weights: str | None         # --vgg-weights: the local file of --perceptual-network vgg16
    adversary: AdversaryConfig | None  # the adversarial patch term, None where --adversarial-weight is 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Stage1LossConfig":
        """The flags of `add_arguments`, and the run's --lr, --channels, --log-every and --max-minutes the
        discriminator needs, from a stage's arguments as driver.py resolved them (presets filled in)."""
        adversary = None
        if args.adversarial_weight > 0:
            adversary = AdversaryConfig(
                weight=args.adversarial_weight, start=args.adversarial_start, loss=args.adversarial_loss,
                weighting=args.adversarial_weighting, lr=args.adversarial_lr or args.lr,
                discriminator=DiscriminatorConfig(in_channels=args.channels, channels=args.discriminator_channels,
                                                  num_layers=args.discriminator_layers),
                log_every=args.log_every, max_minutes=args.max_minutes)
        return cls(reconstruction_loss=args.reconstruction_loss, clamped_loss=args.clamped_loss,
                   laplacian_weight=args.laplacian_weight, frequency_weight=args.frequency_weight,
                   perceptual_weight=args.perceptual_weight, perceptual_network=args.perceptual_network,
                   vgg_weights=args.vgg_weights, adversary=adversary)


class ReconstructionLoss:
    """Stage 1's loss of a reconstruction, but the codebook's, by its flags: the base loss (MSE or L1, on the output
    clamped as shown with --clamped-loss) + Laplacian L1 + the focal frequency loss + the perceptual term + the
    adversarial patch term, whose discriminator (`Adversary`) learns after each step."""

    def __init__(self, config: Stage1LossConfig, rt: Runtime, resume: dict | None, max_steps: int):
        self.config = config
        self.adversary = Adversary(config.adversary, rt, resume, max_steps) if config.adversary else None
        self.perceptual = (perceptual_loss(config.vgg_weights, config.perceptual_network)
                           if config.perceptual_weight > 0 else None)
        self.perceptual_fingerprint = None
        if self.perceptual is not None:
            self.perceptual.to(rt.device)
            # the network's weights shape the run as its flags do: saved with it, and the same ones on resume
            self.perceptual_fingerprint = fingerprint(self.perceptual.features.state_dict())
            saved = (resume or {}).get("perceptual_fingerprint")
            if saved is not None and saved != self.perceptual_fingerprint:
                raise BadInputError(f"the perceptual network's weights are not those this run trained with (fingerprint "
                                    f"{self.perceptual_fingerprint}, saved {saved}): give --vgg-weights the same file")

    def __call__(self, recon: torch.Tensor, x: torch.Tensor, last_layer) -> tuple[torch.Tensor, ...]:
        """(the reconstruction's loss, its MSE, logged as `recon` and PSNR whatever the base loss, the adversarial term)."""
        c = self.config
        recon = as_shown(recon.float()) if c.clamped_loss else recon.float()
        mse = F.mse_loss(recon, x)
        rec = mse if c.reconstruction_loss == "mse" else base_loss(recon, x, c.reconstruction_loss)
        if c.laplacian_weight > 0:
            rec = rec + c.laplacian_weight * laplacian_l1(recon, x)
        if c.frequency_weight > 0:
            rec = rec + c.frequency_weight * focal_frequency_loss(recon, x)
        if self.perceptual is not None:
            rec = rec + c.perceptual_weight * self.perceptual(recon, x)
        adversarial = (self.adversary.generator_loss(x, recon, rec, last_layer) if self.adversary
                       else torch.zeros_like(rec))
        return rec, mse, adversarial

    def after_step(self, step: int, taken: bool):
        if self.adversary:
            self.adversary.after_step(step, taken)

    def state(self) -> dict:
        return {**(self.adversary.state() if self.adversary else {}),
                **({"perceptual_fingerprint": self.perceptual_fingerprint} if self.perceptual_fingerprint else {})}


def add_arguments(p: argparse.ArgumentParser, stage: str, preset_help: Callable[[str, str, str], str]):
    """The flags of the losses of the reconstruction (VQGAN's additions to MSE, Esser et al. 2021, and the brain-MRI
    anchors'), shared by train-vqvae and train-decoder, each with its own defaults (STAGE1_LOSSES); `preset_help(stage,
    name, text)` adds the presets' values of a flag to its help (driver.py)."""
    d = STAGE1_LOSSES[stage]
    p.add_argument("--adversarial-weight", type=non_negative(float), default=None,
                   help=preset_help(stage, "adversarial_weight", "weight of the adversarial patch loss (PatchGAN; "
                                    "times the adaptive weight of Esser et al. eq. 7 unless --adversarial-weighting fixed; "
                                    "VQGAN uses 0.8 adaptive, MONAI's brain-MRI tutorials 0.01 fixed); 0 switches it off"))
    p.add_argument("--adversarial-start", type=step_or_fraction, default=None,
                   help=preset_help(stage, "adversarial_start", "step from which the discriminator learns and its loss "
                                    "counts, or a fraction of the run's steps (0.25: a quarter in)"))
    p.add_argument("--adversarial-loss", choices=list(LOSSES), default=d["adversarial_loss"],
                   help="the discriminator's and generator's losses: hinge (VQGAN), non-saturating, least-squares "
                        "(LSGAN, as MONAI) (default: %(default)s)")
    p.add_argument("--adversarial-weighting", choices=list(WEIGHTINGS), default=d["adversarial_weighting"],
                   help="the adversarial term's weight: adaptive (--adversarial-weight times Esser et al.'s eq. 7) or "
                        "fixed (--adversarial-weight alone) (default: %(default)s)")
    p.add_argument("--adversarial-lr", type=positive(float), default=None,
                   help="the discriminator's AdamW learning rate (default: --lr, as VQGAN)")
    p.add_argument("--discriminator-channels", type=positive(int), default=64,
                   help="width of the PatchGAN's first layer, doubled per layer up to 8x: 64 is VQGAN's and MONAI's; "
                        "its cost grows with the square, which counts on a CPU (default: %(default)s)")
    p.add_argument("--discriminator-layers", type=int, choices=range(6), metavar="L", default=None,
                   help=preset_help(stage, "discriminator_layers", "the PatchGAN's stride-2 layers L: each of its "
                                    "outputs judges a patch of 9 * 2^L - 2 pixels, 3 the 70x70 of pix2pix and VQGAN at "
                                    "256 px, about a quarter of the slice as 1's 16x16 is at 64 px"))
    p.add_argument("--clamped-loss", action=argparse.BooleanOptionalAction, default=None,
                   help=preset_help(stage, "clamped_loss", "measure the reconstruction error on the output clamped to "
                                    "[-1, 1], as it is shown, so the background may sit below -1 instead of rippling "
                                    "around it (bench/README.md)"))
    p.add_argument("--reconstruction-loss", choices=list(BASE_LOSSES), default=d["reconstruction_loss"],
                   help="the pixel loss of the reconstruction: mse, or l1 as the brain-MRI anchors (default: %(default)s)")
    p.add_argument("--frequency-weight", type=non_negative(float), default=0.0,
                   help="weight of the focal frequency loss (Jiang et al. 2021: the spectrum's hardest frequencies count "
                        "most; no network) (default: %(default)s)")
    p.add_argument("--laplacian-weight", type=non_negative(float), default=0.0,
                   help="weight of the Laplacian-pyramid L1 loss (an error counts alike at every octave) (default: %(default)s)")
    p.add_argument("--perceptual-weight", type=non_negative(float), default=d["perceptual_weight"],
                   help="weight of the perceptual loss (LPIPS form) (default: %(default)s)")
    p.add_argument("--perceptual-network", choices=list(NETWORKS), default=d["perceptual_network"],
                   help="its weights: vgg16 (ImageNet, from --vgg-weights) or random (a fixed random draw, Liu et al. "
                        "2021; needs no file) (default: %(default)s)")
    p.add_argument("--vgg-weights", default=None,
                   help="local torchvision vgg16 state dict for the perceptual loss (it cannot be downloaded offline)")
