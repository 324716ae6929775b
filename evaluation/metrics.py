"""Image-set metrics: FID and KID (torchmetrics), SWD, MS-SSIM diversity, reconstruction PSNR/SSIM.

Pure functions of image tensors (B, C, H, W) in [-1, 1]; nothing here reads or writes files.
`evaluation/evaluate.py` (python driver.py evaluate) and the benchmarks in bench/ call them.

    FID   Heusel et al. 2017, on the features of `feature_network` (Inception-v3 or the domain classifier)
    KID   Binkowski et al. 2018, same features, unbiased MMD with the cubic polynomial kernel
    SWD   Karras et al. 2018: sliced Wasserstein distance between 7x7 patches of each Laplacian-pyramid level
    MS-SSIM diversity   Odena et al. 2017: mean MS-SSIM of random pairs within one set (lower = more varied)
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.image import (MultiScaleStructuralSimilarityIndexMeasure, PeakSignalNoiseRatio,
                                StructuralSimilarityIndexMeasure)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from evaluation.classifier import SliceClassifier
from losses.reconstruction import laplacian_pyramid as _laplacian_pyramid  # the same bands as stage 1's Laplacian L1 loss
from runtime.checkpoint import fingerprint


# ----------------------------------------------------------------------------- feature networks for FID / KID

class ClassifierFeatures(nn.Module):
    """The domain classifier's pooled features, in the form torchmetrics' FID/KID accept as `feature`."""

    def __init__(self, classifier: SliceClassifier, steps: int | None = None):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features
        self.input_size = classifier.cfg.input_size  # images are resized to this before the network
        trained = f", {steps} training steps" if steps is not None else ""  # FID and KID depend on them: recorded
        self.name = (f"domain classifier ({classifier.num_features} features{trained}, weights "
                     f"{fingerprint(classifier.state_dict())})")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float())


class InceptionFeatures(nn.Module):
    """The FID Inception-v3 (torch-fidelity's port of the TensorFlow graph, via torchmetrics): 2048 pool features.

    Its weights are downloaded once into the torch hub cache; `weights_path` reads a local copy instead
    (pt_inception-2015-12-05 from torch-fidelity's releases) for machines without internet.
    """

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=weights_path)
        self.num_features = 2048
        self.input_size = 299  # torchmetrics resizes every image to 299x299
        self.name = "Inception-v3 (FID weights, pool 2048)"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # the network expects uint8 RGB
        return self.net(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x)


def inception_or_none(weights_path: str | None = None) -> InceptionFeatures | None:
    """Inception-v3 if its weights load (cache, download or file); otherwise None, with one line saying why."""
    try:
        return InceptionFeatures(weights_path)
    except Exception as e:  # no internet and no cache: any failure means "not available here"
        print(f"Inception-v3 weights could not be loaded ({type(e).__name__}: {str(e)[:80]}); "
              f"using the domain feature network instead")
        return None


# ----------------------------------------------------------------------------- distribution metrics

def _batches(images: torch.Tensor, batch_size: int, device):
    for chunk in images.split(batch_size):
        yield chunk.to(device)


class SetScorer:
    """FID and KID of image sets against one fixed reference set (its features are extracted once)."""

    def __init__(self, features: nn.Module, reference: torch.Tensor, device="cpu", batch_size: int = 64):
        self.batch_size, self.device, self.reference_size = batch_size, device, len(reference)
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False).to(device)
        self.kid = KernelInceptionDistance(feature=features, reset_real_features=False,
                                           subsets=100, subset_size=2).to(device)
        for x in _batches(reference, batch_size, device):
            self.fid.update(x, real=True)
            self.kid.update(x, real=True)

    def __call__(self, images: torch.Tensor) -> dict:
        """{'fid', 'kid', 'kid_std'} of `images` against the reference."""
        if len(images) < 2:
            raise ValueError("FID/KID need at least 2 images")
        # subsets of half the smaller set (at most 1000, as Binkowski et al.): whole sets would give every subset the same value
        self.kid.subset_size = max(2, min(1000, self.reference_size // 2, len(images) // 2))
        for x in _batches(images, self.batch_size, self.device):
            self.fid.update(x, real=False)
            self.kid.update(x, real=False)
        with torch.random.fork_rng(devices=[]):  # torchmetrics draws KID's subsets from the global generator:
            torch.manual_seed(0)                 # seeded, so that a row's KID does not depend on what ran before it
            kid, kid_std = self.kid.compute()
        result = {"fid": self.fid.compute().item(), "kid": kid.item(), "kid_std": kid_std.item()}
        self.fid.reset()
        self.kid.reset()
        return result


def _patches(level: torch.Tensor, per_image: int, generator: torch.Generator) -> torch.Tensor:
    """`per_image` random 7x7 neighbourhoods of every image -> (N * per_image, C * 49)."""
    n, c, h, w = level.shape
    ys = torch.randint(0, h - 6, (n, per_image), generator=generator)
    xs = torch.randint(0, w - 6, (n, per_image), generator=generator)
    offsets = torch.arange(7)
    rows = (ys[..., None] + offsets)[..., :, None].expand(n, per_image, 7, 7)  # (N, P, 7, 7)
    cols = (xs[..., None] + offsets)[..., None, :].expand(n, per_image, 7, 7)
    idx = torch.arange(n)[:, None, None, None].expand_as(rows)
    patches = level.permute(0, 2, 3, 1)[idx, rows, cols]  # (N, P, 7, 7, C)
    return patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c * 49)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, patches_per_image: int = 128, projections: int = 128,
                       repeats: int = 4, seed: int = 0) -> dict:
    """SWD between image sets a and b (Karras et al. 2018, sec. 5), x 1e3 as in the paper.

    For every Laplacian-pyramid level: random 7x7 patches of each image, each set's patches normalised
    per channel, then the mean over 4 x 128 random unit directions of the 1-D Wasserstein-1 distance between the
    projected patch sets. The patch positions depend only on `seed` and the set size, so the distance is
    symmetric and exactly 0 for identical sets. Sets of different sizes are compared at the smaller one's: the
    larger gives that many images drawn at random (by `seed`), not its first ones, which may be one class or
    subject. Returns {'swd': mean over levels, 'swd_<res>': per level}.
    """
    n = min(len(a), len(b))
    g = torch.Generator().manual_seed(seed)
    a, b = (x if len(x) == n else x[torch.randperm(len(x), generator=g)[:n].sort().values] for x in (a, b))
    pyr_a, pyr_b = _laplacian_pyramid(a.float().cpu()), _laplacian_pyramid(b.float().cpu())
    result = {}
    for level_a, level_b in zip(pyr_a, pyr_b):
        descriptors = []
        for level in (level_a, level_b):
            d = _patches(level, patches_per_image, torch.Generator().manual_seed(seed))
            c = level.shape[1]
            d = d.view(len(d), c, 49)
            d = (d - d.mean(dim=(0, 2), keepdim=True)) / (d.std(dim=(0, 2), keepdim=True) + 1e-8)
            descriptors.append(d.view(len(d), -1))
        g, distances = torch.Generator().manual_seed(seed + 1), []
        for _ in range(repeats):
            directions = F.normalize(torch.randn(descriptors[0].shape[1], projections, generator=g), dim=0)
            pa = (directions.T @ descriptors[0].T).sort(dim=1).values  # (projections, patches): sort along rows, fast
            pb = (directions.T @ descriptors[1].T).sort(dim=1).values
            distances.append((pa - pb).abs().mean())
        result[f"swd_{level_a.shape[-1]}"] = 1e3 * torch.stack(distances).mean().item()
    result["swd"] = sum(result.values()) / len(result)
    return result


def ms_ssim_metric(image_size: int, device="cpu") -> MultiScaleStructuralSimilarityIndexMeasure:
    """MS-SSIM (Wang et al. 2003) with as many of the 5 standard scales as the image size allows."""
    scales = max((n for n in range(1, 6) if image_size // max(1, n - 1) ** 2 > 10 and 2 ** n <= image_size), default=1)
    betas = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)[:scales]
    betas = tuple(b / sum(betas) for b in betas)
    return MultiScaleStructuralSimilarityIndexMeasure(data_range=2.0, betas=betas, normalize="relu").to(device)


def ms_ssim_diversity(images: torch.Tensor, pairs: int = 500, seed: int = 0, device="cpu") -> float:
    """Mean MS-SSIM of random distinct pairs within one set; near 1 means near-identical images (mode collapse)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, len(images), (pairs,), generator=g)
    j = (i + torch.randint(1, len(images), (pairs,), generator=g)) % len(images)  # never i itself
    metric = ms_ssim_metric(images.shape[-1], device)
    for start in range(0, pairs, 64):
        metric.update(images[i[start:start + 64]].float().to(device), images[j[start:start + 64]].float().to(device))
    return metric.compute().item()


# ----------------------------------------------------------------------------- VQ-VAE fidelity

@torch.no_grad()
def reconstruction_metrics(vqvae, images: torch.Tensor, batch_size: int = 64, device="cpu") -> tuple[dict, torch.Tensor]:
    """PSNR, SSIM, codebook use and perplexity of the VQ-VAE on `images` (a KL latent has no codebook: those two are
    left out); also returns the reconstructions."""
    psnr = PeakSignalNoiseRatio(data_range=2.0).to(device)
    ssim = StructuralSimilarityIndexMeasure(data_range=2.0).to(device)
    counts = torch.zeros(vqvae.cfg.codebook_size, device=device)
    recons = []
    for x in _batches(images, batch_size, device):
        z_q, _, idx, _ = vqvae.quantize(vqvae.encode(x.float()))
        recon = vqvae.decoder(z_q).float().clamp(-1, 1)
        psnr.update(recon, x.float())
        ssim.update(recon, x.float())
        if idx is not None:
            counts += torch.bincount(idx.flatten(), minlength=len(counts)).float()
        recons.append(recon.cpu())
    metrics = {"psnr": psnr.compute().item(), "ssim": ssim.compute().item()}
    if counts.sum() > 0:
        p = counts / counts.sum()
        metrics.update(codebook_used=(counts > 0).float().mean().item(),
                       perplexity=math.exp(-(p * torch.log(p + 1e-10)).sum().item()))
    return metrics, torch.cat(recons)
