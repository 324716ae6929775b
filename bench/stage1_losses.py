"""Stage-1 losses on a tiny VQ-VAE: does the Laplacian L1 loss, the PatchGAN, or both, sharpen reconstructions vs MSE alone?

    python bench/stage1_losses.py [--steps 200] [--size 32] [--gan-start 100] [--rows mse,mse+lap,mse+gan,mse+lap+gan]

Synthetic images (bright ellipses filled with a fine, low-amplitude texture: the kind of detail MSE blurs
away), the `tiny` preset's VQ-VAE (16 channels, x1/x2/x4: latents 4x smaller, 512 codes, AdamW 2e-3),
batch 8, CPU (32x32 by default so that four rows take minutes on 2 shared cores).
Each row trains from the same seed and batches; its reconstructions of 128 held-out images are scored by
PSNR and by SWD per Laplacian level against another 128 fresh images, beside the real-vs-real floor.
Also the reference for wiring the losses into stage 1: see `train_step`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.metrics import sliced_wasserstein  # noqa: E402
from losses.adversarial import (DiscriminatorConfig, PatchDiscriminator, adaptive_weight,  # noqa: E402
                                adversarial_factor, generator_adversarial_loss, hinge_d_loss)
from losses.reconstruction import laplacian_l1  # noqa: E402
from modules import VQVAE, VQVAEConfig  # noqa: E402


def textured_ellipses(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 1, size, size) in [-1, 1]: ellipses, smooth shading plus 3 random gratings of 2.5-4 px period (amplitude 0.25)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    a, b = 0.5 + 0.4 * torch.rand(n, 1, 1, generator=g), 0.5 + 0.4 * torch.rand(n, 1, 1, generator=g)
    inside = ((xx / a) ** 2 + (yy / b) ** 2 < 1).float()
    texture = torch.zeros(n, size, size)
    for _ in range(3):
        angle = torch.rand(n, 1, 1, generator=g) * torch.pi
        period = 2.5 + 1.5 * torch.rand(n, 1, 1, generator=g)            # pixels
        phase = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
        coord = (xx * torch.cos(angle) + yy * torch.sin(angle)) * (size / 2)
        texture += torch.sin(2 * torch.pi * coord / period + phase) / 3
    shading = 0.3 * (xx * torch.rand(n, 1, 1, generator=g) - yy * torch.rand(n, 1, 1, generator=g))
    return (inside * (0.2 + shading + 0.25 * texture) - (1 - inside)).clamp(-1, 1)[:, None]


def requires_grad(model: torch.nn.Module, flag: bool):
    for p in model.parameters():
        p.requires_grad_(flag)


def train_step(model, disc, opt_g, opt_d, x, step: int, lap_weight: float, disc_weight: float, disc_start: int) -> dict:
    """One stage-1 step: the generator (VQ-VAE) update, then the discriminator update on the detached reconstruction."""
    # generator: reconstruction + VQ + adaptive-weighted adversarial loss; D frozen so no gradient is spent on it
    recon, vq_loss, _ = model(x)
    rec_loss = F.mse_loss(recon, x) + (lap_weight * laplacian_l1(recon, x) if lap_weight else 0.0)
    loss, factor, lam = rec_loss + vq_loss, adversarial_factor(step, disc_start) if disc is not None else 0.0, 0.0
    if factor:
        requires_grad(disc, False)
        g_loss = generator_adversarial_loss(disc(recon))
        lam = adaptive_weight(rec_loss, g_loss, model.last_layer)
        loss = loss + disc_weight * factor * lam * g_loss
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    opt_g.step()
    # discriminator: real vs the reconstruction, detached so no gradient reaches the VQ-VAE
    if factor:
        requires_grad(disc, True)
        d_loss = factor * hinge_d_loss(disc(x), disc(recon.detach()))
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()
    return {"loss": loss.item(), "lambda": float(lam)}


def run_row(name: str, args, data: torch.Tensor, held: torch.Tensor, fresh: torch.Tensor) -> dict:
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(image_size=args.size, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, codebook_size=512))
    opt_g = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.99), weight_decay=0.0)
    disc = opt_d = None
    if "gan" in name:
        disc = PatchDiscriminator(DiscriminatorConfig(channels=16, num_layers=2))
        opt_d = torch.optim.AdamW(disc.parameters(), lr=2e-3, betas=(0.5, 0.9), weight_decay=0.0)
    g, t0, lams = torch.Generator().manual_seed(1), time.perf_counter(), []
    for step in range(args.steps):
        x = data[torch.randint(0, len(data), (8,), generator=g)]
        out = train_step(model, disc, opt_g, opt_d, x, step, args.lap_weight if "lap" in name else 0.0,
                         args.disc_weight, args.gan_start)
        lams.append(out["lambda"])
    model.eval()
    with torch.no_grad():
        recon = model(held)[0].clamp(-1, 1)
    psnr = 10 * torch.log10(4 / F.mse_loss(recon, held)).item()
    late = [v for v in lams[args.gan_start:] if v] or [0.0]
    return {"psnr": psnr, **sliced_wasserstein(recon, fresh), "seconds": time.perf_counter() - t0,
            "lambda": sum(late) / len(late)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=200, help="training steps per row (default: %(default)s)")
    p.add_argument("--size", type=int, default=32, help="image size (default: %(default)s)")
    p.add_argument("--gan-start", type=int, default=100, help="step the discriminator starts (default: %(default)s)")
    p.add_argument("--disc-weight", type=float, default=0.5, help="weight of the adaptive GAN term (default: %(default)s)")
    p.add_argument("--lap-weight", type=float, default=1.0, help="weight of the Laplacian L1 loss (default: %(default)s)")
    p.add_argument("--rows", default="mse,mse+lap,mse+gan,mse+lap+gan", help="comma-separated rows")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data, held, fresh = (textured_ellipses(n, args.size, seed) for n, seed in ((1024, 0), (128, 1), (128, 2)))
    floor = sliced_wasserstein(held, fresh)
    levels = [k for k in floor if k != "swd"]
    print(f"| row | PSNR dB | SWD x1e3 ({' / '.join(k[4:] + ' px' for k in levels)}) | mean lambda | s |")
    print("|---|---|---|---|---|")
    print(f"| real (floor) | | {' / '.join(f'{floor[k]:.1f}' for k in levels)} | | |")
    for name in args.rows.split(","):
        r = run_row(name, args, data, held, fresh)
        print(f"| {name} | {r['psnr']:.2f} | {' / '.join(f'{r[k]:.1f}' for k in levels)} | {r['lambda']:.3g} "
              f"| {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
