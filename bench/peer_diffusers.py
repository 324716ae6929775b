"""The peer pipeline for issue 4's quality benchmark: latent diffusion written with HuggingFace diffusers.

This is what a user would write instead of our code: a diffusers `VQModel` trained with a plain AdamW loop,
then a `UNet2DModel` trained on its scaled pre-quantisation latents with `DDPMScheduler` (epsilon prediction),
grad clipping and `EMAModel` as in diffusers' train_unconditional example, sampled with DDIM. Both models are
sized to within 20% of the parameters of our `tiny` preset, and each stage runs for a wall-clock budget, so
`bench/quality.py` can compare the two pipelines at equal time:

    from peer_diffusers import train_peer, sample_peer
    peer = train_peer(images, vq_minutes=5, unet_minutes=15)   # images (N, 1, 64, 64) in [-1, 1]
    samples = sample_peer(peer, num=1000, steps=100)           # (1000, 1, 64, 64) in [-1, 1], CPU

    python bench/peer_diffusers.py   # smoke check: parameter counts next to ours, a few seconds of training

Needs `pip install -r bench/requirements.txt`; nothing is downloaded (no from_pretrained).
"""
import math
import time

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel, VQModel
from diffusers.training_utils import EMAModel


def peer_models(image_size: int = 64, channels: int = 1) -> tuple[VQModel, UNet2DModel]:
    """VQModel (factor 4, latent 4 x S/4 x S/4) and UNet2DModel sized like our tiny preset."""
    # Diffusers' encoder and decoder each add a mid block (2 resnets + attention) at the lowest width and the
    # decoder has one resnet more per level, so widths (16, 32, 64) as ours would be 70% larger: the last
    # level is narrowed to 48 instead (+7%). 16 groups divide every width.
    vq = VQModel(in_channels=channels, out_channels=channels, sample_size=image_size,
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 block_out_channels=(16, 32, 48), layers_per_block=1, norm_num_groups=16,
                 latent_channels=4, vq_embed_dim=4, num_vq_embeddings=512)
    # Same layout as ours: 4 levels, attention at the two lowest resolutions and in the mid block.
    unet = UNet2DModel(sample_size=image_size // 4, in_channels=4, out_channels=4,
                       block_out_channels=(32, 64, 64, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    return vq, unet


def noise_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def warmup(optimizer, steps: int):
    """Linear learning-rate warm-up, then constant (as our train.py)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, steps)))


def batches(n: int, batch: int, device):
    """Endless random index batches, a new permutation every epoch (the last partial batch dropped)."""
    batch = min(batch, n)
    while True:
        order = torch.randperm(n, device=device)
        for i in range(0, n - batch + 1, batch):
            yield order[i:i + batch]


def train_peer(images: torch.Tensor, vq_minutes: float, unet_minutes: float, seed: int = 0,
               vq_batch: int = 32, vq_lr: float = 2e-3, unet_batch: int = 64, unet_lr: float = 1e-3,
               warmup_vq: int = 50, warmup_unet: int = 200, ema_decay: float = 0.999, device="cpu", log=print) -> dict:
    torch.manual_seed(seed)
    device = torch.device(device)
    images = images.float().to(device)
    vq, unet = peer_models(images.shape[-1], images.shape[1])
    vq, unet = vq.to(device), unet.to(device)

    # stage 1: VQModel. forward() returns DecoderOutput(sample, commit_loss); commit_loss is diffusers'
    # codebook + commitment loss (its legacy weighting: beta 0.25 on the codebook term), so add it.
    optimizer = torch.optim.AdamW(vq.parameters(), lr=vq_lr)
    scheduler = warmup(optimizer, warmup_vq)
    vq.train()
    vq_steps, deadline = 0, time.monotonic() + 60 * vq_minutes
    for idx in batches(len(images), vq_batch, device):
        if time.monotonic() > deadline:
            break
        x = images[idx]
        out = vq(x)
        loss = F.mse_loss(out.sample, x) + out.commit_loss.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        vq_steps += 1
        if vq_steps % 100 == 0:
            log(f"peer vq   step {vq_steps:6d} | loss {loss.item():.4f}")
    vq.eval().requires_grad_(False)

    # pre-quantisation latents, scaled to unit variance (not timed, as ours)
    with torch.no_grad():
        z = torch.cat([vq.encode(images[i:i + 64]).latents for i in range(0, len(images), 64)])
    scale = 1.0 / z.std().item()
    latents = z * scale

    # stage 2: UNet2DModel, as diffusers' train_unconditional example (epsilon target, clip 1.0, EMA warm-up;
    # AdamW betas / weight decay and the EMA's inv_gamma 1 / power 3/4 are that script's defaults)
    noise_sched = noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=unet_lr, betas=(0.95, 0.999), weight_decay=1e-6)
    scheduler = warmup(optimizer, warmup_unet)
    ema = EMAModel(unet.parameters(), decay=ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
    unet.train()
    unet_steps, deadline = 0, time.monotonic() + 60 * unet_minutes
    for idx in batches(len(latents), unet_batch, device):
        if time.monotonic() > deadline:
            break
        x0 = latents[idx]
        noise = torch.randn_like(x0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(x0),), device=device)
        pred = unet(noise_sched.add_noise(x0, noise, t), t).sample
        loss = F.mse_loss(pred, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(unet.parameters())
        unet_steps += 1
        if unet_steps % 100 == 0:
            log(f"peer unet step {unet_steps:6d} | loss {loss.item():.4f}")
    ema.copy_to(unet.parameters())  # sample with the EMA weights
    unet.eval().requires_grad_(False)
    log(f"peer done: {vq_steps} VQ steps in {vq_minutes} min, {unet_steps} UNet steps in {unet_minutes} min, "
        f"scale {scale:.4f}")
    return {"vqvae": vq, "unet": unet, "scale": scale, "vq_steps": vq_steps, "unet_steps": unet_steps,
            "vq_params": count(vq), "unet_params": count(unet)}


@torch.no_grad()
def sample_peer(peer: dict, num: int, seed: int = 0, steps: int = 100, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """num images (num, C, S, S) in [-1, 1] on the CPU: DDIM (eta 0) in latent space, then VQ decode."""
    vq, unet = peer["vqvae"].to(device).eval(), peer["unet"].to(device).eval()
    # from the training scheduler's config: keeps clip_sample=False (DDIM's own default would clip latents);
    # its default "leading" spacing starts at t = 1000 - 1000/steps, not 999
    scheduler = DDIMScheduler.from_config(noise_scheduler().config)
    scheduler.set_timesteps(steps, device=device)
    generator = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    out = []
    for start in range(0, num, batch_size):
        n = min(batch_size, num - start)
        x = torch.randn(n, *shape, generator=generator).to(device)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
        out.append(vq.decode(x / peer["scale"]).sample.clamp(-1, 1).float().cpu())  # decode quantises
    return torch.cat(out)


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from modules import VQVAE, UNet, UNetConfig, VQVAEConfig  # noqa: E402

    ours_vq = count(VQVAE(VQVAEConfig(in_channels=1, image_size=64, channels=16, channel_mult=(1, 2, 4),
                                      num_res_blocks=1, codebook_size=512)))
    ours_unet = count(UNet(UNetConfig(in_channels=4, latent_size=16, channels=32, channel_mult=(1, 2, 2, 2),
                                      num_res_blocks=1)))
    vq, unet = peer_models()
    for name, ours, peer in (("VQ-VAE", ours_vq, count(vq)), ("UNet", ours_unet, count(unet))):
        print(f"{name:6s} ours {ours / 1e6:.3f}M  peer {peer / 1e6:.3f}M  ({peer / ours - 1:+.1%})")

    # 64 random blobs in [-1, 1] stand in for brain slices
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    centre, radius = torch.rand(64, 2, 1, 1, generator=g) * 32 + 16, torch.rand(64, 1, 1, generator=g) * 10 + 6
    blobs = torch.exp(-((yy - centre[:, 0]) ** 2 + (xx - centre[:, 1]) ** 2) / (2 * radius ** 2))
    images = blobs[:, None] * 2 - 1
    t0 = time.monotonic()
    peer = train_peer(images, vq_minutes=0.2, unet_minutes=0.2)
    samples = sample_peer(peer, num=4, steps=10)
    print(f"samples {tuple(samples.shape)} {samples.dtype} range [{samples.min():.3f}, {samples.max():.3f}], "
          f"finite {bool(torch.isfinite(samples).all())}, {time.monotonic() - t0:.0f} s in all")
    assert samples.shape == (4, 1, 64, 64) and not math.isnan(samples.sum().item())
