"""What a person looks at after sampling: the grid of samples (`samples.png`), a sweep's captioned rows, and the frames
of the denoising GIF. Images smaller than TILE_MIN pixels are enlarged by a whole factor, each pixel a block, so that a
64x64 sample can be seen and nothing is invented. Figures are written whole (`save_png`, `save_rows`, and
`save_figure` for matplotlib's: the loss curves, the counterfactual's panel, the EMA curve).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image

from runtime.checkpoint import atomic_write


GRID_MAX = 64       # images in samples.png; all of them are in samples/
TILE_MIN = 128      # px: smaller images are enlarged (nearest neighbour) in the grid and the GIF, so a person can see them


def enlarged(images: torch.Tensor) -> torch.Tensor:
    """Images smaller than TILE_MIN pixels enlarged by a whole factor, each pixel a block (nothing invented)."""
    factor = math.ceil(TILE_MIN / images.shape[-1])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def save_png(images: torch.Tensor, path: Path, **grid):
    """torchvision's save_image (`grid`: its make_grid arguments), written whole: into a temporary file beside `path`,
    then renamed over it (atomic_write), so that a figure cut short by a kill or a full disk is never left."""
    atomic_write(path, lambda f: save_image(images, f, format="png", **grid))


def save_figure(fig, path: Path, dpi: int = 100):
    """A matplotlib figure as a PNG, written whole as `save_png` writes (atomic_write); the caller closes it."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def gif_frame(x0_images, xt_images, caption: str) -> Image.Image:
    """A captioned grid of decoded x0 (and x_t beside it) as a PIL image at most 512 px wide (GIF size)."""
    nrow = math.ceil(math.sqrt(len(x0_images)))
    grid = make_grid(enlarged(x0_images), nrow=nrow, normalize=True, value_range=(-1, 1))
    if xt_images is not None:
        grid = torch.cat([grid, make_grid(enlarged(xt_images), nrow=nrow, normalize=True, value_range=(-1, 1))], dim=2)
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().cpu().numpy()).convert("L" if x0_images.shape[1] == 1 else "RGB")
    if img.width > 512:
        img = img.resize((512, round(img.height * 512 / img.width)), Image.BILINEAR)
    canvas = Image.new(img.mode, (img.width, img.height + 16))
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), caption + ("   predicted x0 | x_t" if xt_images is not None else "   predicted x0"),
                                fill="white")
    return canvas


def save_rows(rows: list[tuple[str, torch.Tensor]], path: Path):
    """Rows of images (small ones enlarged), each captioned on its left: a sweep's grid."""
    tiles = [make_grid(enlarged(images), nrow=len(images), normalize=True, value_range=(-1, 1)) for _, images in rows]
    width = 8 + 7 * max(len(caption) for caption, _ in rows)
    canvas = Image.new("L", (width + max(t.shape[2] for t in tiles), sum(t.shape[1] for t in tiles)))
    top = 0
    for (caption, _), tile in zip(rows, tiles):
        canvas.paste(Image.fromarray((tile.mean(0) * 255).round().byte().numpy()), (width, top))
        ImageDraw.Draw(canvas).text((4, top + tile.shape[1] // 2 - 6), caption, fill=255)
        top += tile.shape[1]
    atomic_write(path, lambda f: canvas.save(f, format="PNG"))
