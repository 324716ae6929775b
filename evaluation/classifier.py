"""The domain classifier of `driver.py evaluate`: AD/NC and rotation, whose pooled features stand in for
Inception-v3 when its weights cannot be had, and whose class verdict scores class-conditional samples.

Training and caching it (RUN/classifier.pt) is in evaluation/evaluate.py; this file holds the network.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from modules import group_norm
from runtime.checkpoint import atomic_save, load_checkpoint


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
