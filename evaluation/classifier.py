"""The domain classifier of `driver.py evaluate`: AD/NC and rotation, whose pooled features stand in for
Inception-v3 when its weights cannot be had, and whose class verdict scores class-conditional samples.

The network, its training on the run's training subjects, its cache (RUN/classifier.pt) and its accuracy on a class.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from modules import group_norm
from runtime.checkpoint import atomic_save, load_checkpoint
from runtime.process import progress


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    input_size: int = 64            # images are resized to this before the network
    width: int = 16                 # channels of the first of 4 stages (x1, x2, x4, x8)
    num_classes: int = 2            # the image folder's classes (AD, NC); 1 leaves only the rotation task


class SliceClassifier(nn.Module):
    """Small CNN for evaluation: class logits (AD/NC) and rotation logits (0/90/180/270 degrees).

    Inception-v3 weights cannot always be downloaded, so FID/KID can use `features` of this network
    instead, trained on the training images: the global average of every stage, concatenated, so coarse
    shape and fine texture both count (width * 15 numbers). The rotation task gives it anatomy to learn
    even when the classes are hard to tell apart or there is only one.
    """

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.num_features = cfg.width * 15
        widths, prev, stages = [cfg.width * m for m in (1, 2, 4, 8)], cfg.in_channels, []
        for i, w in enumerate(widths):
            # no normalisation in the first stage: it would make the features blind to brightness and contrast
            norm = (lambda c: nn.Identity()) if i == 0 else group_norm  # noqa: E731
            stages.append(nn.Sequential(nn.Conv2d(prev, w, 3, stride=2, padding=1), norm(w), nn.SiLU(),
                                        nn.Conv2d(w, w, 3, padding=1), norm(w), nn.SiLU()))
            prev = w
        self.stages = nn.ModuleList(stages)
        self.class_head = nn.Linear(prev, cfg.num_classes)
        self.rotation_head = nn.Linear(prev, 4)

    def _pooled(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-1] != self.cfg.input_size:
            x = F.interpolate(x, size=(self.cfg.input_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3)))
        return pooled

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] -> (B, num_features)."""
        return torch.cat(self._pooled(x), dim=1)

    def forward(self, x: torch.Tensor):
        """-> (class logits (B, num_classes), rotation logits (B, 4))."""
        last = self._pooled(x)[-1]
        return self.class_head(last), self.rotation_head(last)


def cached_classifier(path: Path, kind: str, key: dict, device, train: Callable[[], tuple["SliceClassifier", dict]]
                      ) -> SliceClassifier:
    """A SliceClassifier kept at `path`: loaded while the key it was saved with equals `key` (the data, split, steps
    ... that made it), else trained by `train()` (the model, and what else to save beside it) and saved."""
    if path.exists():
        ckpt = load_checkpoint(path, kind)
        if ckpt["key"] == key:
            model = SliceClassifier(ClassifierConfig(**ckpt["config"])).to(device).eval()
            model.load_state_dict(ckpt["model"])
            return model
    model, extra = train()
    atomic_save({"kind": kind, "key": key, "config": asdict(model.cfg), "model": model.state_dict(), **extra}, path)
    return model


def train_classifier(dataset, indices: list[int], num_classes: int, cfg: ClassifierConfig, steps: int,
                     device, seed: int = 0) -> SliceClassifier:
    """Class (AD/NC) + rotation classifier on the training images; AdamW, batch 64, random batches."""
    torch.manual_seed(seed)
    model = SliceClassifier(cfg).to(device)
    if steps == 0:
        return model.eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = DataLoader(Subset(dataset, indices), batch_size=64, shuffle=True, drop_last=len(indices) > 64)
    step, pbar = 0, progress(total=steps, desc="domain classifier", dynamic_ncols=True)
    while step < steps:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            k = torch.randint(0, 4, (len(x),), device=device)
            rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
            class_logits, _ = model(x)
            _, rotation_logits = model(rotated)
            loss = F.cross_entropy(rotation_logits, k) + (F.cross_entropy(class_logits, y) if num_classes > 1 else 0)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            pbar.update(1)
            if step == steps:
                break
    pbar.close()
    return model.eval()


@torch.no_grad()
def class_accuracy(model: SliceClassifier, images: torch.Tensor, labels: torch.Tensor, device) -> float:
    logits = torch.cat([model(x.to(device))[0].cpu() for x in images.split(256)])
    return (logits.argmax(1) == labels).float().mean().item()


def domain_classifier(run: Path, dataset, train_idx: list[int], key: dict, steps: int, device) -> SliceClassifier:
    """RUN/classifier.pt, trained on the training subjects once and reused while data and split are unchanged."""
    cfg = ClassifierConfig(in_channels=key["channels"], input_size=min(key["image_size"], 128),
                           num_classes=max(1, len(dataset.classes)))
    return cached_classifier(run / "classifier.pt", "classifier", {**key, "steps": steps}, device,
                             lambda: (train_classifier(dataset, train_idx, cfg.num_classes, cfg, steps, device),
                                      {"classes": list(dataset.classes)}))
