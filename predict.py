"""Sampling: noise -> reverse diffusion in latent space -> VQ-VAE decoder; writes a grid, PNGs and a GIF.

    python predict.py --run RUN                              # the card's DDPM-1000 + final 30 steps repeated x5
    python predict.py --run RUN --sampler ddim --steps 50    # 20x fewer network calls
    python predict.py --run RUN --repeat-times 0             # plain DDPM-1000

Both models are rebuilt from RUN/vqvae.pt and RUN/unet.pt alone (the UNet's EMA weights are used).
Writes RUN/samples.png, RUN/samples/NNNN.png and RUN/denoise.gif, whose frames show the decoded
*predicted x0* as the noise is removed (`--gif-xt` puts the decoded x_t beside it).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from dataset import BadInputError
from modules import VQVAE, GaussianDiffusion, Guided, UNet, UNetConfig, VQVAEConfig
from train import fingerprint, load_checkpoint, model_config, setup_device


def add_arguments(p: argparse.ArgumentParser, sampler: str = "ddpm", steps: int = 1000, num: int | None = 16,
                  num_help: str = "number of images (default: %(default)s)", several_guidances: bool = False):
    p.add_argument("--run", default="runs/demo", help="run folder holding vqvae.pt and unet.pt (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--num", type=int, default=num, help=num_help)
    p.add_argument("--batch-size", type=int, default=64, help="images sampled at once (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp"], default=sampler,
                   help="reverse process: ddpm (Ho et al. 2020), ddim (Song et al. 2021), dpmpp = DPM-Solver++(2M) "
                        "(Lu et al. 2022) for 10-25 steps (default: %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="network calls; DDPM always uses all T (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM noise: 0 deterministic, 1 DDPM-like (default: %(default)s)")
    p.add_argument("--repeat-last", type=int, default=30, help="the card's repeated final steps: re-noise to this step ... (default: %(default)s)")
    p.add_argument("--repeat-times", type=int, default=5 if sampler == "ddpm" else 0,
                   help="... and denoise again this many times, 0 to switch off (default: %(default)s)")
    p.add_argument("--class", dest="class_name", default=None,
                   help="generate this class (AD, NC ...: the run's class folders) or 'all' for one grid row per class; "
                        "needs a run trained with --conditional (default: unconditional)")
    if several_guidances:
        p.add_argument("--guidance", type=scales, default=[0.0, 1.0, 2.0, 3.0, 5.0],
                       help="classifier-free guidance scales w with --class, comma-separated, one row each: "
                            "0 unconditional, 1 conditional, >1 stronger (default: 0,1,2,3,5)")
    else:
        p.add_argument("--guidance", type=float, default=3.0,
                       help="classifier-free guidance scale w with --class: 0 unconditional, 1 conditional, >1 stronger "
                            "(default: %(default)s)")
    p.add_argument("--clip-x0", default="auto",
                   help="clip predicted x0 to [-c, c]: a number, 'auto' (the training latents' range), or 'none' (default: %(default)s)")
    p.add_argument("--gif-frames", type=int, default=40, help="GIF frames of the main pass (default: %(default)s)")
    p.add_argument("--gif-xt", action="store_true", help="show the decoded x_t beside the predicted x0 in the GIF")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")


def scales(text: str) -> list[float]:
    """'0,1,3' -> [0.0, 1.0, 3.0] (argparse type of a list of guidance scales)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def load_models(run: Path, device):
    """(vqvae, EMA unet, diffusion, unet checkpoint) rebuilt from the run's two checkpoints."""
    unet_ckpt = load_checkpoint(run / "unet.pt", "unet")
    vq_ckpt = load_checkpoint(run / "vqvae.pt", "vqvae")
    if unet_ckpt["vqvae_fingerprint"] != fingerprint(vq_ckpt["model"]):
        raise BadInputError(f"{run / 'unet.pt'} was trained on another VQ-VAE than {run / 'vqvae.pt'}; "
                            f"run train-unet again for this VQ-VAE")
    vqvae = VQVAE(model_config(VQVAEConfig, vq_ckpt, run / "vqvae.pt")).to(device).eval()
    vqvae.load_state_dict(vq_ckpt["model"])
    if list(vqvae.cfg.latent_shape) != list(unet_ckpt["latent_shape"]):
        raise BadInputError(f"latent shape differs: VQ-VAE {vqvae.cfg.latent_shape}, UNet {unet_ckpt['latent_shape']}")
    unet = UNet(model_config(UNetConfig, unet_ckpt, run / "unet.pt")).to(device).eval()
    unet.load_state_dict(unet_ckpt["ema"])
    diffusion = GaussianDiffusion(**unet_ckpt["diffusion"]).to(device)
    return vqvae, unet, diffusion, unet_ckpt


@torch.no_grad()
def sample_latents(diffusion, unet, x_T, args, clip_x0, progress=None):
    """Reverse diffusion from x_T, then the card's repeated final steps.

    Returns the final latents and the GIF frames [(caption, x0, x_t)] at evenly spaced steps.
    Each repeat re-noises the current sample to step `repeat_last - 1` with q_sample (the forward
    process, so the marginal is the right one) and runs the reverse process down to data again.
    """
    calls = diffusion.num_steps if args.sampler == "ddpm" else min(args.steps, diffusion.num_steps)
    keep = set(torch.linspace(0, calls - 1, min(args.gif_frames, calls)).round().long().tolist())
    frames, x = [], x_T
    for i, (t, x, x0) in enumerate(diffusion.sample_steps(unet, x_T, args.sampler, args.steps, eta=args.eta, clip_x0=clip_x0)):
        if i in keep:
            frames.append((f"step {t}", x0, x))
        if progress:
            progress.update(1)
    for r in range(args.repeat_times):
        t_start = args.repeat_last - 1
        t = torch.full((len(x),), t_start, device=x.device, dtype=torch.long)
        x_t = diffusion.q_sample(x, t, torch.randn_like(x))
        for t, x, x0 in diffusion.sample_steps(unet, x_t, "ddpm", start=t_start, clip_x0=clip_x0):
            if progress:
                progress.update(1)
        frames.append((f"repeat {r + 1}/{args.repeat_times}", x0, x))
    return x, frames


@torch.no_grad()
def decode(vqvae, latents, latent_scale, batch_size=64):
    """Scaled latents -> images in [-1, 1]: z = latent / scale, quantised, decoded."""
    return torch.cat([vqvae.decode(z / latent_scale).float().clamp(-1, 1) for z in latents.split(batch_size)])


@torch.no_grad()
def generate(vqvae, unet, diffusion, ckpt, args, num, device, autocast, clip_x0, labels=None, guidance=1.0):
    """`num` images in [-1, 1] (CPU) with `args.sampler` / `args.steps` / repeats, in batches of args.batch_size;
    with `labels` (num class indices) under classifier-free guidance of scale `guidance`.

    Returns (images, latent GIF frames of the first batch, seconds). Prints the sampling time.
    """
    per_batch = (diffusion.num_steps if args.sampler == "ddpm" else args.steps) + args.repeat_times * args.repeat_last
    progress = tqdm(total=per_batch * math.ceil(num / args.batch_size), desc=f"sampling ({args.sampler})", dynamic_ncols=True)
    samples, frames, t0 = [], None, time.perf_counter()
    for start in range(0, num, args.batch_size):
        x_T = torch.randn(min(args.batch_size, num - start), *ckpt["latent_shape"], device=device)
        model = unet if labels is None else Guided(unet, labels[start:start + len(x_T)].to(device), guidance)
        with autocast:
            latents, batch_frames = sample_latents(diffusion, model, x_T, args, clip_x0, progress)
            samples.append(decode(vqvae, latents, ckpt["latent_scale"]).cpu())
        frames = frames or batch_frames
    progress.close()
    images, seconds = torch.cat(samples), time.perf_counter() - t0
    print(f"sampled {len(images)} images in {seconds:.1f} s ({seconds / len(images):.3f} s/image, "
          f"{per_batch} network calls per batch)")
    return images, frames, seconds


def gif_frame(x0_images, xt_images, caption: str) -> Image.Image:
    """A captioned grid of decoded x0 (and x_t beside it) as a PIL image at most 512 px wide (GIF size)."""
    nrow = math.ceil(math.sqrt(len(x0_images)))
    grid = make_grid(x0_images, nrow=nrow, normalize=True, value_range=(-1, 1))
    if xt_images is not None:
        grid = torch.cat([grid, make_grid(xt_images, nrow=nrow, normalize=True, value_range=(-1, 1))], dim=2)
    img = Image.fromarray((grid.permute(1, 2, 0) * 255).round().byte().cpu().numpy()).convert("L" if x0_images.shape[1] == 1 else "RGB")
    if img.width > 512:
        img = img.resize((512, round(img.height * 512 / img.width)), Image.BILINEAR)
    canvas = Image.new(img.mode, (img.width, img.height + 16))
    canvas.paste(img, (0, 16))
    ImageDraw.Draw(canvas).text((4, 2), caption + ("   predicted x0 | x_t" if xt_images is not None else "   predicted x0"),
                                fill="white")
    return canvas


def parse_clip(text: str, latent_absmax: float | None) -> float | None:
    """--clip-x0: 'auto' -> the training latents' largest |value|, 'none' -> None, else a positive number."""
    if text in ("auto", "none"):
        return latent_absmax if text == "auto" else None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise BadInputError(f"--clip-x0 must be 'auto', 'none' or a positive number, got {text!r}")
    return value


def check_sampling_flags(args, diffusion) -> None:
    """One-line errors for sampling flags that cannot work (shared by predict and evaluate)."""
    for name in ("batch_size", "steps", "repeat_last", "gif_frames"):
        if getattr(args, name) <= 0:
            raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.eta < 0:
        raise BadInputError(f"--eta must be 0 or more, got {args.eta}")
    if min(args.guidance if isinstance(args.guidance, list) else [args.guidance]) < 0:
        raise BadInputError(f"--guidance must be 0 or more, got {args.guidance}")
    if args.repeat_times < 0:
        raise BadInputError(f"--repeat-times must be 0 or more, got {args.repeat_times}")
    if diffusion is not None and args.repeat_times and args.repeat_last > diffusion.num_steps:
        raise BadInputError(f"--repeat-last {args.repeat_last} exceeds the {diffusion.num_steps} diffusion steps")


def class_labels(class_name: str | None, ckpt: dict, num: int, run: Path) -> torch.Tensor | None:
    """--class -> the label of each of the images (num per class for 'all'); None for unconditional sampling."""
    if class_name is None:
        return None
    classes = ckpt.get("classes") or []
    if not ckpt["config"].get("num_classes"):
        raise BadInputError(f"{run / 'unet.pt'} was trained without --conditional, so it cannot generate a chosen "
                            f"class; train stage 2 with `train-unet --conditional` for --class")
    if class_name == "all":
        return torch.arange(len(classes)).repeat_interleave(num)
    if class_name not in classes:
        raise BadInputError(f"--class {class_name!r} is not a class of this run: {', '.join(classes)} or all")
    return torch.full((num,), classes.index(class_name))


def predict(args):
    if args.num <= 0:
        raise BadInputError(f"--num must be positive, got {args.num}")
    check_sampling_flags(args, None)
    run, out = Path(args.run), Path(args.out or args.run)
    device, autocast = setup_device(args)
    vqvae, unet, diffusion, ckpt = load_models(run, device)
    scale = ckpt["latent_scale"]
    check_sampling_flags(args, diffusion)
    clip_x0 = parse_clip(args.clip_x0, ckpt.get("latent_absmax"))
    labels = class_labels(args.class_name, ckpt, args.num, run)
    torch.manual_seed(args.seed)
    images, gif_latents, _ = generate(vqvae, unet, diffusion, ckpt, args, len(labels) if labels is not None else args.num,
                                      device, autocast, clip_x0, labels, args.guidance)
    with torch.no_grad(), autocast:  # the GIF follows the first (at most 16) images
        gif = [gif_frame(decode(vqvae, x0[:16], scale).cpu(), decode(vqvae, xt[:16], scale).cpu() if args.gif_xt else None, caption)
               for caption, x0, xt in gif_latents]

    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    nrow = args.num if args.class_name == "all" else math.ceil(math.sqrt(len(images)))  # 'all': one row per class
    save_image(images, out / "samples.png", nrow=nrow, normalize=True, value_range=(-1, 1))
    for i, img in enumerate(images):
        save_image(img, out / "samples" / f"{i:04d}.png", normalize=True, value_range=(-1, 1))
    durations = [80] * (len(gif) - 1) + [2500]  # hold the last frame
    gif[0].save(out / "denoise.gif", save_all=True, append_images=gif[1:], duration=durations, loop=0)
    print(f"wrote {out / 'samples.png'}, {len(images)} images in {out / 'samples'}, {out / 'denoise.gif'} ({len(gif)} frames)")
    return images


def parse_args(argv=None) -> argparse.Namespace:
    """predict.py's flags with the card's defaults (DDPM-1000, final 30 steps repeated 5 times)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        predict(args)
    except BadInputError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
