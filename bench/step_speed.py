"""Training-step throughput of both models for both presets on this machine (median of timed steps).

    python bench/step_speed.py [--device cpu] [--steps 5]

Times one optimizer step (forward, backward, AdamW) at the presets' batch sizes on random data,
so it measures the models, not the data loading. bf16 autocast on CUDA, fp32 on CPU, as in training.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from driver import PRESETS  # noqa: E402
from modules import VQVAE, GaussianDiffusion, UNet, UNetConfig, VQVAEConfig  # noqa: E402
from throughput import timed  # noqa: E402


def time_steps(step, steps, device):
    step()  # the first step warms up allocators and kernels
    return statistics.median(timed(step, device) for _ in range(steps))


def train_step(model, autocast, loss_fn):
    """One AdamW step on loss_fn() (forward under autocast, backward, update), as a closure to time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        with autocast:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (default: %(default)s)")
    parser.add_argument("--presets", default="tiny,full")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every case (default: the presets')")
    args = parser.parse_args()
    device = torch.device(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'})")
    for preset in args.presets.split(","):
        p = PRESETS["vqvae"][preset]
        cfg = VQVAEConfig(image_size=p["image_size"], channels=p["vq_channels"], channel_mult=tuple(p["vq_mult"]),
                          num_res_blocks=p["vq_res_blocks"], codebook_size=p["codebook_size"])
        model = VQVAE(cfg).to(device)
        x = torch.rand(args.batch or p["batch_size"], 1, cfg.image_size, cfg.image_size, device=device) * 2 - 1
        def vq_loss():
            recon, codebook_loss, _ = model(x)
            return F.mse_loss(recon.float(), x) + codebook_loss
        sec = time_steps(train_step(model, autocast, vq_loss), args.steps, device)
        n = sum(q.numel() for q in model.parameters())
        print(f"{preset:5s} VQ-VAE {n / 1e6:6.2f}M params  batch {len(x):3d} at {cfg.image_size}x{cfg.image_size}: "
              f"{sec:7.3f} s/step  {len(x) / sec:8.1f} img/s")

        u = PRESETS["unet"][preset]
        ucfg = UNetConfig(latent_size=cfg.latent_shape[1], channels=u["unet_channels"],
                          channel_mult=tuple(u["unet_mult"]), num_res_blocks=u["unet_res_blocks"])
        unet, diffusion = UNet(ucfg).to(device), GaussianDiffusion().to(device)
        z = torch.randn(args.batch or u["batch_size"], *cfg.latent_shape, device=device)
        sec = time_steps(train_step(unet, autocast, lambda: diffusion.loss(unet, z)), args.steps, device)
        n = sum(q.numel() for q in unet.parameters())
        print(f"{preset:5s} UNet   {n / 1e6:6.2f}M params  batch {len(z):3d} at {tuple(cfg.latent_shape)}: "
              f"{sec:7.3f} s/step  {len(z) / sec:8.1f} latents/s")

if __name__ == "__main__":
    main()
