"""Stage 1's loss of a reconstruction, as `train-vqvae` and `train-decoder` train with it: the terms of losses/ that
the run's flags switch on, summed, and the discriminator that learns beside them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from losses.adversarial import Adversary
from losses.perceptual import perceptual_loss
from losses.reconstruction import as_shown, base_loss, focal_frequency_loss, laplacian_l1
from runtime.checkpoint import fingerprint
from runtime.errors import BadInputError
from runtime.process import Runtime


class ReconstructionLoss:
    """Stage 1's loss of a reconstruction, but the codebook's, by its flags: the base loss (MSE or L1, on the output
    clamped as shown with --clamped-loss) + Laplacian L1 + the focal frequency loss + the perceptual term + the
    adversarial patch term, whose discriminator (`Adversary`) learns after each step."""

    def __init__(self, args, rt: Runtime, resume: dict | None, max_steps: int):
        self.args = args
        self.adversary = Adversary(args, rt, resume, max_steps) if args.adversarial_weight > 0 else None
        self.perceptual = (perceptual_loss(args.vgg_weights, args.perceptual_network)
                           if args.perceptual_weight > 0 else None)
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
        a = self.args
        recon = as_shown(recon.float()) if a.clamped_loss else recon.float()
        mse = F.mse_loss(recon, x)
        rec = mse if a.reconstruction_loss == "mse" else base_loss(recon, x, a.reconstruction_loss)
        if a.laplacian_weight > 0:
            rec = rec + a.laplacian_weight * laplacian_l1(recon, x)
        if a.frequency_weight > 0:
            rec = rec + a.frequency_weight * focal_frequency_loss(recon, x)
        if self.perceptual is not None:
            rec = rec + a.perceptual_weight * self.perceptual(recon, x)
        adversarial = (self.adversary.generator_loss(x, recon, rec, last_layer) if self.adversary
                       else torch.zeros_like(rec))
        return rec, mse, adversarial

    def after_step(self, step: int, taken: bool):
        if self.adversary:
            self.adversary.after_step(step, taken)

    def state(self) -> dict:
        return {**(self.adversary.state() if self.adversary else {}),
                **({"perceptual_fingerprint": self.perceptual_fingerprint} if self.perceptual_fingerprint else {})}
