"""`driver.py counterfactual`: the input slice as it would look under other conditions, and a map of what changed.

    python driver.py counterfactual --run RUN --input scan.nii.gz --set group=NC      # "had this subject been NC"
    python driver.py counterfactual --run RUN --input slice.png --set age=85 --strength 0.6
    python driver.py counterfactual --run RUN --input slice.png --mask region.png     # the region filled in anew
    python driver.py counterfactual --run RUN --input scan.nii.gz --from age=71 --shift age=10   # ten years older
    python driver.py counterfactual --run RUN --input held-out --set group=NC   # every held-out one: counterfactual_set

The input (an image, or a slice of a NIfTI volume read as the run reads its training volumes) is encoded, taken to
noise level --strength (a fraction of the diffusion's steps) by DDIM inversion under the --from conditions (default:
none), denoised by DDIM under the --from conditions with those of --set changed, with classifier-free guidance, and
decoded (Sanchez et al. 2022,
"What is healthy?"). Inversion is deterministic: at strength 0 the result is the input's reconstruction, and with the
input's own conditions the path comes back near the input, so what changes is what the conditions change. --noise
adds fresh noise instead (SDEdit, Meng et al. 2022). With --mask the change stays in the mask (RePaint, Lugmayr et
al. 2022): after every step the latent outside it is put back to the input's own at that step (its inversion path,
or its noised latent with --noise), and the decoded image outside it is the reconstruction's. Without --set a mask
is filled in by the unconditioned model from pure noise (inpainting; --strength 1 and --noise unless given).

Writes OUT/counterfactual.png (input | reconstruction | counterfactual | |counterfactual - reconstruction| as a heat
map over the input), counterfactual_image.png, difference.npy, for a NIfTI input difference.nii.gz (the map put back
into the input's slice, in the input's grid and affine; zero elsewhere) and counterfactual.json with the run, input
and settings. The difference is taken to the reconstruction, not the input, so that the VQ-VAE's own error, which
any output of the run carries, is not counted as a change. A change of conditions (--set, --shift) has a *twin*
too, denoised from the same inverted latent under the --from conditions unchanged: counterfactual - twin is what the
change of conditions does alone, the *effect* (effect.npy, signed; effect.nii.gz), and twin - reconstruction what
inversion and denoising do by themselves, the *drift*; the panel shows the twin and the effect, the record both
means. A fill (--mask without --set) changes no condition, and has neither.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import predict
from conditions.counterfactual_set import HELD_OUT, ONE_FILES, asking, begin_writing, counterfactuals_of_held_out
from conditions.effect_test import MOST_FLIPS
from conditions.read_back import STEPS as READER_STEPS
from conditions.table import asked_shifts, asked_values
from dataset import card_transform
from diffusion.guidance import Guided
from export.figures import save_figure, save_png
from runtime.checkpoint import atomic_write
from runtime.errors import BadInputError
from runtime.flags import seed
from runtime.models import LatentDiffusion, load_run
from runtime.process import setup_device
from volumes.images import image_percentiles, load_image
from volumes.reader import is_volume, mask_slice, printable, read_volume_slice, to_volume
from volumes.writer import save_nifti

DEFAULT_STRENGTH = 0.5
PERMUTATIONS = 5000     # FSL randomise's default


def add_arguments(p: argparse.ArgumentParser):
    p.add_argument("--run", default="runs/demo", help="run folder holding vqvae.pt and unet.pt (default: %(default)s)")
    p.add_argument("--input", required=True,
                   help="an image, a NIfTI volume (then --slice picks the slice), or 'held-out': every image of the "
                        "subjects stage 1 held out, each under its own values, its change told apart from the "
                        "inversion's own (conditions/counterfactual_set.py)")
    p.add_argument("--num", type=int, default=None,
                   help="with --input held-out: at most this many images, spread over those of the held-out subjects "
                        "(of volumes: all images at slice positions every subject has, spread over them; default: "
                        "all)")
    p.add_argument("--data", default=None,
                   help="with --input held-out: the run's data folder, if it moved (checked to hold stage 1's files)")
    p.add_argument("--labels", default=None,
                   help="with --input held-out: the run's participants table, if it moved (checked to be the run's)")
    p.add_argument("--permutations", type=int, default=None,
                   help=f"with --input held-out: sign flips of the voxel-wise test over subjects, 0 for none "
                        f"(conditions/effect_test.py; default: {PERMUTATIONS})")
    p.add_argument("--classifier-steps", type=int, default=None,
                   help=f"with --input held-out: training steps of the network that reads each changed condition back "
                        f"from the counterfactuals and their twins, evaluate's, cached in the run folder; 0 for none "
                        f"(conditions/read_back.py; default: the cached one's, else {READER_STEPS})")
    p.add_argument("--slice", type=int, default=None,
                   help="the slice of a volume along the run's axis, RAS order from 0 (default: the middle of those the "
                        "run would take)")
    p.add_argument("--set", dest="set_values", action="append", default=[], metavar="NAME=VALUE",
                   help="the conditions to change to, e.g. --set group=NC (default: none)")
    p.add_argument("--shift", dest="shift_values", action="append", default=[], metavar="NAME=DELTA",
                   help="a covariate moved from the input's own value, e.g. --shift age=10: ten years older (the own "
                        "value: --from, or each held-out image's; default: none)")
    p.add_argument("--from", dest="from_values", action="append", default=[], metavar="NAME=VALUE",
                   help="the input's own conditions, under which it is inverted, and which the counterfactual keeps "
                        "where --set does not change them (default: none, the unconditioned model)")
    p.add_argument("--strength", type=float, default=None,
                   help=f"noise level, a fraction of the diffusion's steps: 0 gives the reconstruction back, 1 starts "
                        f"from noise (default: {DEFAULT_STRENGTH}; 1 for a mask without --set)")
    p.add_argument("--noise", action="store_true", default=None,
                   help="noise the input (SDEdit) instead of inverting it (default: inversion; noise for a mask "
                        "without --set)")
    p.add_argument("--mask", default=None, help="image or NIfTI mask (non-zero inside): change only this region")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default: %(default)s)")
    p.add_argument("--steps", type=int, default=50,
                   help="DDIM steps over the whole noise range; strength S takes S times as many (default: %(default)s)")
    p.add_argument("--seed", type=seed, default=0, help="random seed, for --noise (default: %(default)s)")
    predict.add_decoder_argument(p)
    p.add_argument("--out", default=None, help="output folder (default: RUN/counterfactual)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")


# ----------------------------------------------------------------------------- the input

def read_input(path: Path, data, index: int | None):
    """The input as the run's images are read: (1, C, S, S) in [-1, 1], and its SliceGeometry for a volume (else None)."""
    if not path.is_file():
        raise BadInputError(f"--input {printable(path)} does not exist")
    if is_volume(path):
        image, geometry = read_volume_slice(path, data.image_size, data.slicing, index)
        return (image * 2 - 1).expand(data.channels, -1, -1)[None], geometry
    if index is not None:
        raise BadInputError("--slice picks a slice of a NIfTI volume; the input is an image")
    image = load_image(str(path), "L" if data.channels == 1 else "RGB", image_percentiles(data.slicing, data.layout))
    image = card_transform(data.image_size, data.channels)(image)  # as the run read its training images
    return image[None], None


def read_mask(path: Path, geometry, image_size: int) -> torch.Tensor:
    """The mask (1, 1, S, S) of 0 and 1: an image (non-black inside), or a NIfTI mask of the input volume's grid."""
    if not path.is_file():
        raise BadInputError(f"--mask {printable(path)} does not exist")
    if is_volume(path):
        if geometry is None:
            raise BadInputError("a NIfTI --mask goes with a NIfTI --input (the same grid)")
        mask = mask_slice(path, geometry, image_size)
    else:
        mask = (card_transform(image_size, 1)(load_image(str(path), "L"))[0] > -1 + 1e-3).float()  # not black
    if not mask.any():
        raise BadInputError(f"--mask {printable(path)} is empty where the input's slice is")
    return mask[None, None]


# ----------------------------------------------------------------------------- the change

def counterfactual_latent(model: LatentDiffusion, z0: torch.Tensor, source: torch.Tensor, target: torch.Tensor,
                          strength: float, steps: int, guidance: float, noise: bool,
                          mask: torch.Tensor | None = None) -> torch.Tensor:
    """The scaled latents z0 (B, c, h, w) taken to step strength * (T - 1) (DDIM inversion under the conditions
    `source`, or noise), then DDIM-denoised under `target` with guidance; with `mask` (1 or B, 1, h, w) the latent
    outside it put back to the input's own after every step. source, target: (1, K) conditions for all, or (B, K);
    NaN where not given."""
    return counterfactual_latents(model, z0, source, [target], strength, steps, guidance, noise, mask)[0]


@torch.no_grad()
def counterfactual_latents(model: LatentDiffusion, z0: torch.Tensor, source: torch.Tensor, targets: list[torch.Tensor],
                           strength: float, steps: int, guidance: float, noise: bool,
                           mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """`counterfactual_latent` for each of `targets`, all denoised from the same inverted (or noised) latent: a
    counterfactual and its twin denoised under the input's own values then differ by what the conditions change alone,
    not by the inversion's own error."""
    diffusion, unet = model.diffusion, model.unet
    start = round(strength * (diffusion.num_steps - 1))
    if strength == 0:
        return [z0 for _ in targets]
    n = max(1, round(strength * steps))
    each = lambda y: y.expand(len(z0), -1)  # noqa: E731
    inverting = Guided(unet, each(source), 1.0) if unet.cfg.conditions else unet
    if noise:
        path = {}
        x_start = diffusion.q_sample(z0, start, torch.randn_like(z0))
    else:
        path = dict(diffusion.ddim_inversion(inverting, z0, start, n))
        x_start = path[start]
    ts, outs = diffusion.ddim_timesteps(start, n), []
    for target in targets:
        denoising = Guided(unet, each(target), guidance) if unet.cfg.conditions else unet
        x = x_start
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            x, _ = diffusion.ddim_step(denoising, x, t, t_prev)
            if mask is not None:
                own = z0 if t_prev < 0 else path.get(t_prev)
                if own is None:  # --noise: the input noised to this step afresh, as RePaint does, once for all targets
                    own = path[t_prev] = diffusion.q_sample(z0, t_prev, torch.randn_like(z0))
                x = mask * x + (1 - mask) * own
        outs.append(x)
    return outs


def counterfactual(args):
    """The command: read, change, write (see the module docstring); with --input held-out, of every held-out image
    (conditions/counterfactual_set.py)."""
    run, data, held_out = Path(args.run), args.data_config, args.input == HELD_OUT
    out = Path(args.out or run / ("counterfactual_held-out" if held_out else "counterfactual"))
    for where in [data] + ([replace(data, root=args.data)] if args.data else []):  # --data: where it is now
        where.refuse_inside(out, "--out" if args.out else "the output folder, in the run folder by default,")
    masked_fill = args.mask is not None and not args.set_values and not args.shift_values
    strength = args.strength if args.strength is not None else (1.0 if masked_fill else DEFAULT_STRENGTH)
    noise = args.noise if args.noise is not None else masked_fill
    if not 0 <= strength <= 1 or args.steps <= 0 or args.guidance < 0:
        raise BadInputError(f"--strength must be in [0, 1], --steps positive and --guidance 0 or more, got {strength}, "
                            f"{args.steps} and {args.guidance}")
    refuse_held_out_flags(args, held_out)
    if not args.set_values and not args.shift_values and args.mask is None:
        raise BadInputError("say what to change: --set NAME=VALUE or --shift NAME=DELTA (the conditions), or --mask "
                            "FILE (a region to fill in)")
    device, autocast = setup_device(args.device)
    model = load_run(run, device, finetuned=args.decoder == "fine-tuned")
    source = asked_values(model.conditions, args.from_values)[None].to(device)
    changed_to = asked_values(model.conditions, args.set_values)[None].to(device)
    shifts = asked_shifts(model.conditions, args.shift_values).to(device)
    both = [c.name for c, v, d in zip(model.conditions, changed_to[0], shifts) if not v.isnan() and d != 0]
    if both:
        raise BadInputError(f"{both[0]} is given to --set and to --shift: one says what it becomes, the other by how "
                            f"much it moves; give one")
    if not held_out:
        changed_to = shifted(model.conditions, source, changed_to, shifts, args.shift_values)
    target = torch.where(changed_to.isnan(), source, changed_to)  # what --set does not change stays as --from says
    how = {"run": str(run.resolve()), "unet_step": model.unet_step, "unet_fingerprint": model.fingerprint,  # recorded
           "decoder_fingerprint": model.decoder_fingerprint,  # RUN/decoder.pt's; None: stage 1's decoder
           "set": args.set_values, "shift": args.shift_values, "strength": strength,
           "inversion": "noise (SDEdit)" if noise else "DDIM",
           "guidance": args.guidance, "steps": args.steps, "seed": args.seed}
    if held_out:
        torch.manual_seed(args.seed)
        change = lambda z0, own, to: counterfactual_latents(model, z0, own, [to, own], strength,  # noqa: E731
                                                            args.steps, args.guidance, noise)
        return counterfactuals_of_held_out(args, run, out, model, changed_to[0].cpu(), shifts.cpu(), change, device,
                                           autocast, how)
    image, geometry = read_input(Path(args.input), data, args.slice)
    mask = read_mask(Path(args.mask), geometry, data.image_size) if args.mask else None

    conditioned = bool(args.set_values or args.shift_values)  # a change of conditions has a twin; a fill has none
    torch.manual_seed(args.seed)
    with torch.no_grad(), autocast:
        z0 = model.vqvae.encode(image.to(device)).float() * model.latent_scale
        recon = predict.decode(model.vqvae, z0, model.latent_scale).cpu()
        latent_mask = None if mask is None else (F.interpolate(mask, size=z0.shape[-2:], mode="area") > 0).float().to(device)
        latents = counterfactual_latents(model, z0, source, [target, source] if conditioned else [target], strength,
                                         args.steps, args.guidance, noise, latent_mask)
        changed, *twin = [predict.decode(model.vqvae, z, model.latent_scale).cpu() for z in latents]
    if mask is not None:  # outside the mask, exactly the reconstruction
        changed, *twin = [mask * x + (1 - mask) * recon for x in (changed, *twin)]
    difference = (changed - recon).abs().mean(1)[0]                     # (S, S), in image units of [-1, 1]
    effect = (changed - twin[0]).mean(1)[0] if twin else None           # signed: the change of conditions alone

    written = [name for name in ONE_FILES if (geometry is not None or not name.endswith(".nii.gz"))
               and (conditioned or not name.startswith("effect"))]
    begin_writing(out, written)
    save_png(changed, out / "counterfactual_image.png", normalize=True, value_range=(-1, 1))
    atomic_write(out / "difference.npy", lambda f: np.save(f, difference.numpy()))
    if twin:
        atomic_write(out / "effect.npy", lambda f: np.save(f, effect.numpy()))
    fill = f"fill under {', '.join(args.from_values)}" if args.from_values else "unconditioned fill"
    settings = asking(args) or fill
    panel(image, recon, changed, difference, mask, f"{settings}; strength {strength:g}, guidance {args.guidance:g}"
          f"{', noise' if noise else ''}", out / "counterfactual.png", twin[0] if twin else None, effect)
    record = {**how, "input": os.path.abspath(args.input), "slice": geometry.index if geometry else None,
              "from": args.from_values, "mask": args.mask and os.path.abspath(args.mask),
              "mean_abs_difference": difference.mean().item(), "max_abs_difference": difference.max().item()}
    if twin:
        record.update(mean_abs_effect=effect.abs().mean().item(), max_abs_effect=effect.abs().max().item(),
                      mean_abs_drift=(twin[0] - recon).mean(1).abs().mean().item())  # channels first, as held-out
    if geometry is not None:
        save_nifti(to_volume(difference, geometry), out / "difference.nii.gz")
        if twin:
            save_nifti(to_volume(effect, geometry), out / "effect.nii.gz")
    atomic_write(out / "counterfactual.json", lambda f: f.write(json.dumps(record, indent=2).encode()))
    told = (f", |effect| {record['mean_abs_effect']:.4f} against its twin's |drift| {record['mean_abs_drift']:.4f}"
            if twin else "")
    print(f"counterfactual ({settings}, strength {strength:g}): mean |difference| {record['mean_abs_difference']:.4f}"
          f"{told} (of the range 2); wrote {', '.join(written)} and counterfactual.json to {out}")
    return changed, difference


def shifted(conditions: list, source: torch.Tensor, changed_to: torch.Tensor, shifts: torch.Tensor,
            shift_values: list[str]) -> torch.Tensor:
    """One input's --set values (1, K) with each --shift covariate set to its own value (--from) moved by DELTA, checked
    as --set checks a value (a warning outside the training range, an error far beyond it)."""
    for k in shifts.nonzero().flatten().tolist():
        c = conditions[k]
        if source[0, k].isnan():
            raise BadInputError(f"--shift {c.name}=... moves the input's own {c.name}: give it, --from {c.name}=VALUE")
        changed_to[0, k] = c.parse(c.decode((source[0, k] + shifts[k]).item()))
    return changed_to


def refuse_held_out_flags(args, held_out: bool):
    """--input held-out changes many images, each under its own values: the flags of one image are refused with it,
    and --num without it."""
    if not held_out:
        for flag, given in (("--num", args.num is not None), ("--data", args.data), ("--labels", args.labels),
                            ("--permutations", args.permutations is not None),
                            ("--classifier-steps", args.classifier_steps is not None)):
            if given:
                raise BadInputError(f"{flag} is for --input held-out (which images, where the run's data and table "
                                    f"are now, the test over subjects, the reader); one --input image needs none")
        return
    one_image = [flag for flag, given in (("--from", args.from_values), ("--mask", args.mask),
                                          ("--slice", args.slice is not None)) if given]
    if one_image:
        raise BadInputError(f"--input held-out inverts each held-out image under its own values (its class and the "
                            f"run's table), and {', '.join(one_image)} is for one --input image: leave it out")
    if args.data_config.holdout <= 0:
        raise BadInputError("--input held-out changes the images of the subjects stage 1 held out, and this run held "
                            "out none (train-vqvae --holdout 0): give one --input image instead")
    if not args.set_values and not args.shift_values:
        raise BadInputError("--input held-out: say what to change the held-out images to, --set NAME=VALUE or "
                            "--shift NAME=DELTA")
    if args.num is not None and args.num <= 0:
        raise BadInputError(f"--num must be positive, got {args.num}")
    if args.permutations is None:
        args.permutations = PERMUTATIONS
    if args.permutations < 0 or (args.classifier_steps or 0) < 0:
        raise BadInputError(f"--permutations and --classifier-steps must be 0 (none) or more, got {args.permutations} "
                            f"and {args.classifier_steps}")
    if 0 < args.permutations < 19 or args.permutations > MOST_FLIPS:
        raise BadInputError(f"--permutations {args.permutations}: fewer than 19 sign flips give no p below 0.05, and "
                            f"more than {MOST_FLIPS:,} add nothing you need (p = 0.05 is then known to +-0.0007) for "
                            f"hours of time; 0 for no test")


def panel(image, recon, changed, difference, mask, title: str, path: Path, twin=None, effect=None):
    """input | reconstruction | [twin |] counterfactual | the difference as a heat map over the input [| the effect,
    counterfactual - twin, signed], side by side."""
    shown = lambda x: ((x[0].float().mean(0).clamp(-1, 1) + 1) / 2).numpy()  # noqa: E731
    images = [(image, "input"), (recon, "reconstruction"), *([(twin, "twin (its own conditions)")] if twin is not None
                                                             else []), (changed, "counterfactual")]
    fig, axes = plt.subplots(1, len(images) + 1 + (effect is not None), figsize=(3.25 * (len(images) + 1 +
                                                                                         (effect is not None)), 3.6))
    for ax, (img, name) in zip(axes, images):
        ax.imshow(shown(img), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
    heat_ax = axes[len(images)]
    difference = difference.numpy()
    heat_ax.imshow(shown(image), cmap="gray", vmin=0, vmax=1)
    top = max(float(difference.max()), 1e-8)
    heat = heat_ax.imshow(difference, cmap="hot", alpha=np.clip(difference / top, 0, 1), vmin=0, vmax=top)
    if mask is not None:
        heat_ax.contour(mask[0, 0].numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
    heat_ax.set_title("|counterfactual - reconstruction|")
    fig.colorbar(heat, ax=heat_ax, fraction=0.046)
    if effect is not None:
        bound = max(float(effect.abs().max()), 1e-8)
        signed = axes[-1].imshow(effect.numpy(), cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes[-1].set_title("effect: counterfactual - twin")
        fig.colorbar(signed, ax=axes[-1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
