"""Perceptual terms of stage 1: distances between deep features of the reconstruction and of the image.

Every brain-MRI first stage the field publishes uses one (LPIPS in MONAI's tutorials and Pinaya et al. 2022), and
each downloads its network's weights, which cannot be had here. So the VGG16 form of LPIPS takes either a local copy
of ImageNet weights (`vgg16`) or random ones (`random`): Liu et al. 2021 found the features of randomly initialised
deep networks to work as perceptual losses on par with pretrained VGG for structured outputs (super-resolution
among them). Random weights are drawn from a fixed seed, so a run's term is the same on every rank and on resume.

The random VGG16 makes a `tiny` stage-1 step about 5x dearer on a CPU. Cheaper random networks were tried and lost
(bench/README.md, "Cheaper perceptual networks"): VGG16 to relu3_3 or whole, each at a quarter of the width, left
the reconstructions' finest band far worse than `tiny`'s in the same minutes, where the full-width random VGG16 cut it
at equal steps. Random features seem to need the width.

So a third network is trained, on the run's own training slices (`slices`): a small CNN that tells each slice crop
from blurred, resampled and noised copies of it, whose features must therefore see the finest band. It is trained
once at the start of stage 1 (seconds on a CPU) and kept in the run folder, so a resumed run and every rank use the
same one. Never the evaluation's domain classifier: a loss on the features FID is measured with would grade its own
homework.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.functional import gaussian_blur

from runtime.checkpoint import atomic_save, load_checkpoint
from runtime.errors import BadInputError

NETWORKS = ("vgg16", "random", "slices")
RANDOM_SEED = 0


class FeatureDistance(nn.Module):
    """LPIPS's distance (Zhang et al. 2018, eq. 1, uniform layer weights: their "baseline") on a network's taps:
    each tap unit-normalised over channels, squared differences summed over channels and averaged over positions,
    summed over taps. (recon, x) in [-1, 1] -> a scalar. Subclasses give `_taps`."""

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def forward(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        unit = lambda h: h / (h.norm(dim=1, keepdim=True) + 1e-10)  # noqa: E731
        return sum((unit(a) - unit(b)).pow(2).sum(1).mean() for a, b in zip(self._taps(recon), self._taps(x)))


class VGGPerceptualLoss(FeatureDistance):
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
                taps.append(h)
        return taps



# ----------------------------------------------------------------------------- a network trained on the run's slices

DEGRADATIONS = ("none", "blur", "resample", "noise")
TRAIN_STEPS, TRAIN_BATCH, CROP = 400, 32, 64


class SliceFeatures(FeatureDistance):
    """LPIPS-style distance on the features of a small CNN trained on the run's own slices (`train_slice_features`):
    three stages of two 3x3 convolutions (16, 32, 64 channels), the first at full resolution, where the finest band
    lives, the others at 1/2 and 1/4; a tap after each stage. No normalisation, so brightness and contrast count.
    Fully convolutional: trained on crops, applied to whole images of any size."""

    WIDTHS = (16, 32, 64)

    def __init__(self, channels: int = 1):
        super().__init__()
        stages, prev = [], channels
        for i, width in enumerate(self.WIDTHS):
            stages.append(nn.Sequential(nn.Conv2d(prev, width, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU(),
                                        nn.Conv2d(width, width, 3, padding=1), nn.SiLU()))
            prev = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Linear(prev, len(DEGRADATIONS))  # which degradation a crop went through
        for m in self.stages.modules():  # He et al. 2015: PyTorch's default shrinks a slice's faint degradations to
            if isinstance(m, nn.Conv2d):  # nothing by the head, and the network never learns (25%, chance)
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps, h = [], x.float()
        for stage in self.stages:
            h = stage(h)
            taps.append(h)
        return taps

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self._taps(x)[-1].mean(dim=(2, 3)))


def degrade(x: torch.Tensor, kinds: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Copies of x (B, C, H, W) in [-1, 1], each through DEGRADATIONS[kinds[i]]: unchanged; a Gaussian blur of sigma
    0.5-1.2 pixels; halved and brought back (bilinear, antialiased); Gaussian noise of 1-3% of the range. The
    strengths are drawn once per batch from g. The three are what a first stage does to the finest band."""
    out, sigma, noise = x.clone(), 0.5 + 0.7 * torch.rand((), generator=g).item(), 0.02 + 0.04 * torch.rand((), generator=g).item()
    for kind, change in ((1, lambda v: gaussian_blur(v, kernel_size=5, sigma=sigma)),
                         (2, lambda v: F.interpolate(F.interpolate(v, scale_factor=0.5, mode="bilinear", antialias=True),
                                                     size=v.shape[-2:], mode="bilinear")),
                         (3, lambda v: v + noise * torch.randn(v.shape, generator=g))):
        chosen = kinds == kind
        if chosen.any():
            out[chosen] = change(x[chosen]).clamp(-1, 1)
    return out


def random_crops(x: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
    """One size x size crop of each image at a position drawn from g (the whole image if it is no larger)."""
    if x.shape[-1] <= size and x.shape[-2] <= size:
        return x
    top = torch.randint(x.shape[-2] - size + 1, (len(x),), generator=g).tolist()
    left = torch.randint(x.shape[-1] - size + 1, (len(x),), generator=g).tolist()
    return torch.stack([img[:, t:t + size, l:l + size] for img, t, l in zip(x, top, left)])


def train_slice_features(images: Callable[[int, torch.Generator], torch.Tensor], channels: int, seed: int,
                         device, steps: int | None = None) -> tuple[SliceFeatures, dict]:
    """Train SliceFeatures to tell which of DEGRADATIONS each crop of the run's training slices went through.
    images(n, g): n training slices drawn with g, (n, C, H, W) in [-1, 1] on the CPU. All randomness from `seed`,
    none from torch's global stream. Returns the frozen network and what its training measured: the accuracy on the
    last 50 batches, each scored before the step that learned from it (chance: 1 in 4)."""
    steps, g = steps or TRAIN_STEPS, torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SliceFeatures(channels)
    net.to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    started, right = time.monotonic(), []
    for step in range(steps):
        x = random_crops(images(TRAIN_BATCH, g), CROP, g)
        kinds = torch.randint(len(DEGRADATIONS), (len(x),), generator=g)
        logits = net.logits(degrade(x, kinds, g).to(device))
        loss = F.cross_entropy(logits, kinds.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - 50:
            right.append((logits.argmax(1).cpu() == kinds).float().mean().item())
    record = {"steps": steps, "batch": TRAIN_BATCH, "crop": CROP, "seed": seed,
              "accuracy": sum(right) / len(right), "seconds": round(time.monotonic() - started, 1)}
    return net.eval().requires_grad_(False), record


def slice_features(path: Path, images: Callable[[int, torch.Generator], torch.Tensor], channels: int, seed: int,
                   device, train: bool) -> SliceFeatures:
    """The run's `slices` network: trained and saved to path (RUN/perceptual.pt) if `train`, else loaded from it (a
    resumed run; the other ranks of a DDP run, after rank 0 has trained it)."""
    if train:
        net, record = train_slice_features(images, channels, seed, device)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save({"kind": "perceptual", "config": {"channels": channels}, "model": net.state_dict(), **record}, path)
        print(f"perceptual network: trained on this run's slices in {record['seconds']} s ({record['steps']} steps of "
              f"{TRAIN_BATCH} crops; tells a degradation apart {100 * record['accuracy']:.0f}% of the time, chance 25%); "
              f"saved to {path}")
        return net
    if not path.exists():
        raise BadInputError(f"{path} is missing: this run's perceptual network (--perceptual-network slices) is "
                            "trained when the run starts and kept there; a resumed run needs it")
    ckpt = load_checkpoint(path, "perceptual")
    net = SliceFeatures(ckpt["config"]["channels"])
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval().requires_grad_(False)

def perceptual_loss_or_none(weights_path: str | None, network: str = "vgg16") -> VGGPerceptualLoss | None:
    """The perceptual loss: `random` always; `vgg16` if its weights file loads, else None after one line saying so
    (train without it, or with `random`)."""
    if network == "random":
        return VGGPerceptualLoss(None)
    if weights_path is None:
        print("perceptual loss: off (no --vgg-weights file; ImageNet VGG16 weights cannot be downloaded here; "
              "--perceptual-network random needs none)")
        return None
    try:
        return VGGPerceptualLoss(weights_path)
    except Exception as e:  # missing, unreadable or not a vgg16 state dict: say which, and go on without it
        print(f"perceptual loss: off ({weights_path} did not load as VGG16 weights: {type(e).__name__}: {str(e)[:80]})")
        return None
