"""The two training stages: `train_vqvae(args)` (stage 1) and `train_unet(args)` (stage 2).

Both read and write one run folder (`args.run`); see DESIGN.md for its layout. They are called by
the command line in driver.py:

    python driver.py train-vqvae --run runs/demo     # stage 1: VQ-VAE on images
    python driver.py train-unet  --run runs/demo     # stage 2: UNet on the VQ-VAE's latents
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from torchvision.utils import save_image
from tqdm import tqdm

from dataset import BadInputError, InMemorySlices, demo_data_dir, load_slices, split_by_subject
from modules import VQVAE, GaussianDiffusion, UNet, UNetConfig, VQVAEConfig, ema_model


# ----------------------------------------------------------------------------- small helpers

def setup_device(args) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """The device and the autocast context: bf16 on CUDA, full precision on CPU."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return device, torch.autocast("cuda", dtype=torch.bfloat16)
    return device, contextlib.nullcontext()


def atomic_save(obj, path: Path):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, kind: str) -> dict:
    """Load a checkpoint safely (weights_only=True) and check it is a `kind` checkpoint."""
    if not path.exists():
        raise BadInputError(f"no {kind} checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a checkpoint, or a pickle with code in it
        raise BadInputError(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BadInputError(f"{path} is not a {kind} checkpoint (it holds {found!r})")
    return ckpt


def fingerprint(state_dict: dict) -> str:
    """A short hash of a model's weights: ties a latent cache and a UNet to one exact VQ-VAE."""
    h = hashlib.sha1()
    for name, tensor in sorted(state_dict.items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_run(args, ckpt_path: Path, kind: str, model_config: dict) -> dict | None:
    """Check the run folder before anything is written; return the checkpoint to resume, if any."""
    run = Path(args.run)
    if ckpt_path.exists() and not args.resume:
        raise BadInputError(f"{ckpt_path} already exists: pass --resume to continue it, or use another --run")
    if not (args.resume and ckpt_path.exists()):
        return None
    ckpt = load_checkpoint(ckpt_path, kind)
    saved = {**ckpt["config"], **ckpt.get("diffusion", {})}  # a UNet's diffusion settings are part of its config
    diff = [f"{k}: {ckpt['config'].get(k)!r} in the checkpoint, {v!r} now"
            for k, v in model_config.items() if _plain(saved.get(k)) != _plain(v)]
    if diff:
        raise BadInputError(f"cannot resume {ckpt_path}: it was trained with a different config ({'; '.join(diff)})")
    run.mkdir(parents=True, exist_ok=True)
    return ckpt


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def write_config(run: Path, stage: str, args):
    """Merge this stage's resolved flags into RUN/config.json."""
    path = run / "config.json"
    config = json.loads(path.read_text()) if path.exists() else {}
    config[stage] = {k: v for k, v in vars(args).items() if k != "func"}
    path.write_text(json.dumps(config, indent=2, default=str))


def plain_args(args) -> dict:
    """The resolved flags as plain values, which a weights_only=True load accepts."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list))}


def ensure_finite(loss: float, step: int, ckpt_path: Path):
    """Stop before a NaN/inf loss can reach a checkpoint; the last one written stays as it was."""
    if not math.isfinite(loss):
        raise BadInputError(f"loss became {loss} before step {step}; stopped without saving "
                            f"(the last good checkpoint, if any, is {ckpt_path}); try a lower --lr")


def lr_warmup(step: int, warmup: int) -> float:
    """Linear warm-up to the base learning rate, then constant (EMA smooths the end of training)."""
    return min(1.0, (step + 1) / max(1, warmup))


class MetricLog:
    """Appends one CSV row per log interval and redraws the loss curve from the whole CSV."""

    def __init__(self, csv_path: Path, fields: list[str]):
        self.csv_path, self.fields = csv_path, fields
        if not csv_path.exists():
            with open(csv_path, "w", newline="") as f:
                csv.writer(f).writerow(fields)

    def append(self, row: dict):
        with open(self.csv_path, "a", newline="") as f:
            csv.writer(f).writerow([row[k] for k in self.fields])

    def plot(self, png: Path, keys: list[str], title: str):
        with open(self.csv_path) as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = [int(r["step"]) for r in rows]
        for k in keys:
            ax.plot(steps, [float(r[k]) for r in rows], label=k)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(png, dpi=100)
        plt.close(fig)


def training_data(args):
    """The training images (demo data when no --data), minus held-out subjects if --holdout > 0."""
    root = args.data or demo_data_dir(args.demo_dir)
    dataset = load_slices(root, args.image_size, args.channels, args.cache_gb, args.workers)
    if args.holdout > 0:
        train_idx, _ = split_by_subject([p for p, _ in dataset.samples], args.holdout, args.holdout_seed)
        dataset = Subset(dataset, train_idx)
    return dataset, str(root)


def loader_workers(dataset, workers: int) -> int:
    """0 for images already in memory (worker processes would only copy them), else at most the CPU count."""
    if isinstance(getattr(dataset, "dataset", dataset), InMemorySlices):
        return 0
    return min(workers, os.cpu_count() or 1)


def total_steps(args, steps_per_epoch: int) -> int:
    if args.max_steps is not None:
        return args.max_steps
    return args.epochs * steps_per_epoch


def forever(loader):
    """Batches from `loader`, epoch after epoch."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------- stage 1: VQ-VAE

def vqvae_config(args) -> VQVAEConfig:
    return VQVAEConfig(in_channels=args.channels, image_size=args.image_size, channels=args.vq_channels,
                       channel_mult=tuple(args.vq_mult), num_res_blocks=args.vq_res_blocks,
                       codebook_size=args.codebook_size)


def train_vqvae(args):
    """Stage 1: VQ-VAE with MSE reconstruction + codebook + 0.25 x commitment loss."""
    # setup
    run = Path(args.run)
    ckpt_path = run / "vqvae.pt"
    cfg = vqvae_config(args)
    if args.image_size % cfg.factor:
        raise BadInputError(f"--image-size {args.image_size} is not divisible by the VQ-VAE's factor {cfg.factor}")
    resume = prepare_run(args, ckpt_path, "vqvae", asdict(cfg))
    torch.manual_seed(args.seed)
    device, autocast = setup_device(args)

    # data
    dataset, data_root = training_data(args)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=len(dataset) >= args.batch_size,
                        num_workers=loader_workers(dataset, args.workers),
                        pin_memory=device.type == "cuda")
    max_steps = total_steps(args, len(loader))

    # model and optimizer
    model = VQVAE(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_warmup(s, args.warmup), last_epoch=step - 1)
    run.mkdir(parents=True, exist_ok=True)
    write_config(run, "train-vqvae", args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"VQ-VAE {n_params / 1e6:.2f}M params, latent {cfg.latent_shape}, {len(dataset)} images from {data_root}, "
          f"steps {step} -> {max_steps} on {device}")

    spread = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).long().tolist()  # several subjects, not one
    fixed = torch.stack([dataset[i][0] for i in spread]).to(device)
    log = MetricLog(run / "log_vqvae.csv", ["step", "loss", "recon", "vq", "psnr", "perplexity", "usage", "lr", "img_per_s"])

    def save():
        atomic_save({"kind": "vqvae", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "step": step, "config": asdict(cfg), "data": data_root,
                     "args": plain_args(args)},
                    ckpt_path)

    def save_recon_grid(path):
        model.eval()
        with torch.no_grad(), autocast:
            recon = model(fixed)[0].float()
        model.train()
        save_image(torch.cat([fixed, recon]).clamp(-1, 1), path, nrow=len(fixed), normalize=True, value_range=(-1, 1))

    # loop
    model.train()
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    batches = forever(loader)
    sums, n_sum, t0 = torch.zeros(5, device=device), 0, time.perf_counter()
    pbar = tqdm(total=max_steps, initial=step, desc="vqvae", dynamic_ncols=True)
    while step < max_steps:
        x = next(batches)[0].to(device, non_blocking=True)
        with autocast:
            recon, vq_loss, stats = model(x)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + vq_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        step += 1
        pbar.update(1)
        sums += torch.stack([loss, recon_loss, vq_loss, stats["perplexity"], stats["usage"]]).detach()
        n_sum += 1
        out_of_time = time.monotonic() > deadline

        if step % args.log_every == 0 or step % args.save_every == 0 or step == max_steps or out_of_time:  # check before saving
            loss_m, recon_m, vq_m, ppl, usage = (sums / n_sum).tolist()
            ensure_finite(loss_m, step, ckpt_path)
            psnr = 10 * math.log10(4.0 / max(recon_m, 1e-12))  # images span [-1, 1]: peak-to-peak 2
            ips = n_sum * args.batch_size / (time.perf_counter() - t0)
            row = {"step": step, "loss": f"{loss_m:.5f}", "recon": f"{recon_m:.5f}", "vq": f"{vq_m:.5f}",
                   "psnr": f"{psnr:.2f}", "perplexity": f"{ppl:.1f}", "usage": f"{usage:.3f}",
                   "lr": f"{scheduler.get_last_lr()[0]:.2e}", "img_per_s": f"{ips:.1f}"}
            log.append(row)
            pbar.set_postfix(loss=row["loss"], psnr=row["psnr"], usage=row["usage"])
            tqdm.write(f"step {step:>7d} | loss {loss_m:.4f} | recon {recon_m:.4f} | vq {vq_m:.4f} | psnr {psnr:5.2f} "
                       f"| ppl {ppl:7.1f} | usage {usage:.3f} | {ips:7.1f} img/s")
            sums.zero_()
            n_sum, t0 = 0, time.perf_counter()
        if step % args.sample_every == 0:
            save_recon_grid(run / f"recon_step{step:07d}.png")
        if step % args.save_every == 0:
            save()
        if out_of_time:
            tqdm.write(f"--max-minutes {args.max_minutes} reached at step {step}; continue with --resume")
            break
    pbar.close()

    # checkpoint and records
    save()
    save_recon_grid(run / "recon_vqvae.png")
    log.plot(run / "loss_vqvae.png", ["loss", "recon", "vq"], "VQ-VAE training")
    print(f"saved {ckpt_path} (step {step}); reconstructions {run / 'recon_vqvae.png'}")
    return ckpt_path


# ----------------------------------------------------------------------------- stage 2: UNet

@torch.no_grad()
def encode_dataset(vqvae: VQVAE, dataset, batch_size: int, workers: int, device, autocast) -> torch.Tensor:
    """Pre-quantisation latents z of every image, in dataset order: (N, 4, h, w) float32 on the CPU."""
    vqvae.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=loader_workers(dataset, workers))
    out = []
    for x, _ in tqdm(loader, desc="encoding latents", dynamic_ncols=True):
        with autocast:
            out.append(vqvae.encode(x.to(device)).float().cpu())
    return torch.cat(out)


def latent_cache(args, vqvae: VQVAE, vq_fingerprint: str, device, autocast) -> torch.Tensor:
    """RUN/latents.pt: the training images encoded once, reused while VQ-VAE, data and holdout are unchanged."""
    path = Path(args.run) / "latents.pt"
    dataset, data_root = training_data(args)
    key = {"vqvae": vq_fingerprint, "data": data_root, "image_size": args.image_size, "channels": args.channels,
           "holdout": args.holdout, "holdout_seed": args.holdout_seed, "count": len(dataset)}
    if path.exists():
        cache = load_checkpoint(path, "latents")
        if cache["key"] == key:
            print(f"latent cache {path}: {len(cache['z'])} latents reused")
            return cache["z"].float()
    z = encode_dataset(vqvae, dataset, 64, args.workers, device, autocast)
    atomic_save({"kind": "latents", "key": key, "z": z}, path)
    print(f"latent cache {path}: {len(z)} latents written")
    return z


def unet_config(args, latent_shape) -> UNetConfig:
    return UNetConfig(in_channels=latent_shape[0], latent_size=latent_shape[1], channels=args.unet_channels,
                      channel_mult=tuple(args.unet_mult), num_res_blocks=args.unet_res_blocks)


def train_unet(args):
    """Stage 2: eps-prediction UNet on scale * z, z the frozen VQ-VAE's pre-quantisation latents."""
    # setup: the frozen VQ-VAE of this run
    run = Path(args.run)
    ckpt_path = run / "unet.pt"
    vq_ckpt = load_checkpoint(run / "vqvae.pt", "vqvae")
    vq_cfg = VQVAEConfig(**vq_ckpt["config"])
    # stage 2 sees exactly the images of stage 1: same folder, size, channels and held-out subjects
    for name, default in (("image_size", None), ("channels", 1), ("holdout", 0.0), ("holdout_seed", 0)):
        setattr(args, name, vq_ckpt["args"].get(name, default))
    args.data = args.data or vq_ckpt["data"]
    cfg = unet_config(args, vq_cfg.latent_shape)
    if len(cfg.channel_mult) != 4 or vq_cfg.latent_shape[1] % 8:
        raise BadInputError(f"the UNet has 4 levels (got --unet-mult {args.unet_mult}) and needs a latent size "
                            f"divisible by 8 (got {vq_cfg.latent_shape[1]})")
    diffusion = GaussianDiffusion(args.diffusion_steps, args.schedule, args.loss, args.prediction)
    diffusion_cfg = diffusion.config()
    resume = prepare_run(args, ckpt_path, "unet", {**asdict(cfg), **diffusion_cfg})
    torch.manual_seed(args.seed)
    device, autocast = setup_device(args)
    vqvae = VQVAE(vq_cfg).to(device)
    vqvae.load_state_dict(vq_ckpt["model"])
    vqvae.requires_grad_(False)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{ckpt_path} was trained on another VQ-VAE than {run / 'vqvae.pt'}; "
                            f"train stage 2 afresh in a new --run")

    # data: the latent cache, scaled to unit variance (the scale is measured, saved and reused)
    z = latent_cache(args, vqvae, vq_fingerprint, device, autocast)
    latent_scale = resume["latent_scale"] if resume else 1.0 / z.std().item()
    latents = (z * latent_scale).to(device)
    latent_absmax = resume["latent_absmax"] if resume else latents.abs().max().item()  # range for clipping x0
    steps_per_epoch = max(1, len(latents) // args.batch_size)
    max_steps = total_steps(args, steps_per_epoch)

    # model, EMA, optimizer
    model = UNet(cfg).to(device)
    diffusion = diffusion.to(device)
    ema = ema_model(model, args.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        ema.module.load_state_dict(resume["ema"])
        ema.n_averaged.fill_(resume["ema_updates"])
        optimizer.load_state_dict(resume["optimizer"])
        step = resume["step"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_warmup(s, args.warmup), last_epoch=step - 1)
    write_config(run, "train-unet", args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"UNet {n_params / 1e6:.2f}M params on latents {tuple(latents.shape[1:])}, {len(latents)} latents, "
          f"scale {latent_scale:.4f}, steps {step} -> {max_steps} on {device}")
    log = MetricLog(run / "log_unet.csv", ["step", "loss", "lr", "img_per_s"])

    def save():
        atomic_save({"kind": "unet", "model": model.state_dict(), "ema": ema.module.state_dict(),
                     "ema_updates": int(ema.n_averaged), "optimizer": optimizer.state_dict(), "step": step,
                     "config": asdict(cfg), "diffusion": diffusion_cfg,
                     "latent_scale": latent_scale, "latent_absmax": latent_absmax, "latent_shape": list(vq_cfg.latent_shape),
                     "vqvae_fingerprint": vq_fingerprint,
                     "args": plain_args(args)},
                    ckpt_path)

    def save_sample_grid(path):
        noise = torch.randn(8, *vq_cfg.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), autocast:
            for _, _, x0 in diffusion.sample_steps(ema.module, noise, sampler="ddim", steps=50):
                pass
            images = vqvae.decode(x0 / latent_scale).float()
        save_image(images.clamp(-1, 1), path, nrow=8, normalize=True, value_range=(-1, 1))

    # loop: random batches of the in-memory latents, a new permutation every epoch
    model.train()
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    order, pos = torch.randperm(len(latents), device=device), 0
    sums, n_sum, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    pbar = tqdm(total=max_steps, initial=step, desc="unet", dynamic_ncols=True)
    while step < max_steps:
        if pos + args.batch_size > len(latents):
            order, pos = torch.randperm(len(latents), device=device), 0
        x0 = latents[order[pos:pos + args.batch_size]]
        pos += args.batch_size
        with autocast:
            loss = diffusion.loss(model, x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update_parameters(model)
        step += 1
        pbar.update(1)
        sums += loss.detach()
        n_sum += 1
        out_of_time = time.monotonic() > deadline

        if step % args.log_every == 0 or step % args.save_every == 0 or step == max_steps or out_of_time:  # check before saving
            loss_m = (sums / n_sum).item()
            ensure_finite(loss_m, step, ckpt_path)
            ips = n_sum * len(x0) / (time.perf_counter() - t0)
            log.append({"step": step, "loss": f"{loss_m:.5f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                        "img_per_s": f"{ips:.1f}"})
            pbar.set_postfix(loss=f"{loss_m:.4f}")
            tqdm.write(f"step {step:>7d} | loss {loss_m:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | {ips:7.1f} latents/s")
            sums.zero_()
            n_sum, t0 = 0, time.perf_counter()
        if step % args.sample_every == 0:
            save_sample_grid(run / f"samples_step{step:07d}.png")
        if step % args.save_every == 0:
            save()
        if out_of_time:
            tqdm.write(f"--max-minutes {args.max_minutes} reached at step {step}; continue with --resume")
            break
    pbar.close()

    # checkpoint and records
    save()
    log.plot(run / "loss_unet.png", ["loss"], "UNet training (eps loss)")
    print(f"saved {ckpt_path} (step {step})")
    return ckpt_path
