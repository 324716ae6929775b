"""Perceptual terms of stage 1: distances between deep features of the reconstruction and of the image.

Every brain-MRI first stage the field publishes uses one (LPIPS in MONAI's tutorials and Pinaya et al. 2022), and
each downloads its network's weights, which cannot be had here. So the VGG16 form of LPIPS takes either a local copy
of ImageNet weights (`vgg16`) or random ones (`random`): Liu et al. 2021 found the features of randomly initialised
deep networks to work as perceptual losses on par with pretrained VGG for structured outputs (super-resolution
among them). Random weights are drawn from a fixed seed, so a run's term is the same on every rank and on resume.

The random VGG16 makes a `tiny` stage-1 step about 5x dearer on a CPU. Cheaper random networks were tried and lost
(bench/README.md, "Cheaper perceptual networks"): VGG16 to relu3_3 or whole, each at a quarter of the width, left
the reconstructions' finest band far worse than `tiny`'s in the same minutes, where the full-width random VGG16 cut it
at equal steps. Random features seem to need the width. A small CNN trained on the run's own slices to tell them from
blurred, resampled and noised copies lost at every weight as well (bench/README.md, "A perceptual network trained on
the run's own slices"; it lived in commit e6a7e40): blind to the artefacts it was not trained on. The full-width
network on a random 32x32 window of each 64x64 image, a quarter of its cost, lost too (bench/README.md, "The
perceptual term on crops"; it lived in commit 727bfff).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from runtime.errors import BadInputError

NETWORKS = ("vgg16", "random")
RANDOM_SEED = 0


class VGGPerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features (Zhang et al. 2018, eq. 1, uniform layer weights: their "baseline"):
    features after relu1_2 ... relu5_3, unit-normalised over channels, squared differences averaged over
    positions, summed over layers. (recon, x) in [-1, 1], any channel count -> a scalar.

    weights_path: a local copy of torchvision's vgg16 state dict (`torch.save(torchvision.models.vgg16(
    weights="DEFAULT").state_dict(), path)` on a machine with internet; only its `features.*` entries are used);
    None: torchvision's initialisation drawn from RANDOM_SEED. Frozen; lives on the caller's device.
    """

    LAYERS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in vgg16.features

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers  # vgg16's convolutions, without its 100M-weight head
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)
            self.features = make_layers(cfgs["D"])[:self.LAYERS[-1] + 1]
            for m in self.features.modules():  # torchvision VGG's own initialisation
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.zeros_(m.bias)
        if weights_path is not None:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
            self.features.load_state_dict({k[len("features."):]: v for k, v in state.items()
                                           if k.startswith("features.") and int(k.split(".")[1]) <= self.LAYERS[-1]})
        self.features.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406])[None, :, None, None])
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225])[None, :, None, None])

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x.float().expand(-1, 3, -1, -1) if x.shape[1] == 1 else x.float()) + 1) / 2  # grey -> RGB in [0, 1]
        h, taps = (x - self.mean) / self.std, []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.LAYERS:
                taps.append(h / (h.norm(dim=1, keepdim=True) + 1e-10))
        return taps

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return sum((a - b).pow(2).sum(1).mean() for a, b in zip(self._taps(recon), self._taps(x)))


def perceptual_loss(weights_path: str | None, network: str = "vgg16") -> VGGPerceptualLoss:
    """The perceptual loss: `random` always; `vgg16` from its weights file, or a one-line error (a run that asked for
    the term and trained without it would say in its record that it had one)."""
    if network == "random":
        return VGGPerceptualLoss(None)
    instead = "--perceptual-network random needs none, --perceptual-weight 0 turns the term off"
    if weights_path is None:
        raise BadInputError("the perceptual term needs ImageNet VGG16 weights as a local --vgg-weights file (they "
                            f"cannot be downloaded here); {instead}")
    try:
        return VGGPerceptualLoss(weights_path)
    except Exception as e:  # missing, unreadable or not a vgg16 state dict: say which
        raise BadInputError(f"--vgg-weights {weights_path} did not load as VGG16 weights ({type(e).__name__}: "
                            f"{str(e)[:80]}); {instead}") from None
