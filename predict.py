"""Sampling: noise -> reverse diffusion in latent space -> VQ-VAE decoder; writes a grid, PNGs and a GIF.

    python predict.py --run RUN                              # the card's DDPM-1000 + final 30 steps repeated x5
    python predict.py --run RUN --sampler ddim --steps 50    # 20x fewer network calls
    python predict.py --run RUN --repeat-times 0             # plain DDPM-1000
    python predict.py --run RUN --autoguidance 2             # guided by the UNet at a quarter of its training
                                                             # (a run trained with --posthoc-ema)
    python predict.py --run RUN --set sex=F --sweep age=60,70,80 --guidance 2   # a conditional run: a row per age,
                                                             # every row from the same noise

    # a synthetic dataset, and the same set continued after an interruption
    python predict.py --run RUN --num 10000 --out DIR --format nifti --sampler dpmpp-sde --steps 20
    python predict.py --run RUN --num 10000 --out DIR --format nifti --sampler dpmpp-sde --steps 20 --resume

Both models are rebuilt from RUN/vqvae.pt and RUN/unet.pt alone (the UNet's EMA weights; the decoder of RUN/decoder.pt
where `train-decoder` wrote one, and RUN/ema_snapshots/ for --autoguidance), by runtime/models.py.
Writes (OUT: --out, default RUN) the samples batch by batch as a dataset that `--data OUT/samples` reads back,
OUT/samples/<class or all>/sub-NNNNNN.png (or .nii.gz, .npz) with OUT/samples/manifest.csv saying how each was made
(export/sample_set.py); then OUT/samples.png, a grid of the first ones, and OUT/denoise.gif, whose frames show the
decoded *predicted x0* of the first batch as the noise is removed (`--gif-xt` puts the decoded x_t beside it).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from conditions import cohort
from conditions.table import CLASS, asked_values, sweep_rows
from diffusion.gaussian import GaussianDiffusion
from diffusion.guidance import Autoguided, Guided
from export.card import write_card
from export.figures import GRID_MAX, enlarged, gif_frame, save_png, save_rows
from export.sample_set import (FORMATS, ROW_SEEDING, SAMPLES_LOCK, SEEDING, SampleSet, nifti_geometry,
                               saved_geometry)
from modules import VQVAE, UNet
from runtime.checkpoint import atomic_write, run_lock
from runtime.errors import BadInputError, disk_full
from runtime.flags import Parser, seed
from runtime.graphs import GraphedCall
from runtime.models import LatentDiffusion, load_guide, load_run
from runtime.process import default_memory_format, progress, setup_device
from runtime.signals import Terminated, sigterm_as_ctrl_c
from volumes.run_data import DataConfig


# Images sampled at once by default: on a GPU enough to keep it busy (a UNet call at batch 16 is launch-bound),
# on a CPU few enough that the first batch is soon done. Not yet chosen by a GPU measurement of our own.
DEFAULT_BATCH = {"cuda": 256, "cpu": 64}


def add_arguments(p: argparse.ArgumentParser, sampler: str = "ddpm", steps: int = 1000, num: int | None = 16,
                  num_help: str = "number of images (default: %(default)s)", for_evaluate: bool = False):
    p.add_argument("--run", default="runs/demo", help="run folder holding vqvae.pt and unet.pt (default: %(default)s)")
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    p.add_argument("--num", type=int, default=num, help=num_help)
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"images sampled at once (default: {DEFAULT_BATCH['cuda']} on CUDA, {DEFAULT_BATCH['cpu']} on the CPU)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "dpmpp", "dpmpp-sde"], default=sampler,
                   help="reverse process: ddpm (Ho et al. 2020), ddim (Song et al. 2021), dpmpp = DPM-Solver++(2M) "
                        "(Lu et al. 2022) for 10-25 steps, dpmpp-sde = its stochastic form SDE-DPM-Solver++(2M) at the "
                        "same cost (default: %(default)s)")
    p.add_argument("--steps", type=int, default=steps, help="network calls; DDPM always uses all T (default: %(default)s)")
    p.add_argument("--eta", type=float, default=0.0,
                   help="DDIM noise in [0, 1]: 0 deterministic, 1 DDPM-like (default: %(default)s)")
    p.add_argument("--repeat-last", type=int, default=30, help="the card's repeated final steps: re-noise to this step ... (default: %(default)s)")
    p.add_argument("--repeat-times", type=int, default=None,
                   help="... and denoise again this many times, 0 to switch off (default: 5 with --sampler ddpm, else 0)")
    p.add_argument("--class", dest="class_name", default=None,
                   help="generate this class (AD, NC ...: the run's class folders) or 'all' for one grid row per class; "
                        "needs a run trained with --conditional (default: unconditional)")
    if for_evaluate:  # several guidance scales, and none of the flags of what a sample set holds
        p.add_argument("--guidance", type=scales, default=[0.0, 1.0, 2.0, 3.0, 5.0],
                       help="classifier-free guidance scales w with --class, comma-separated, one row each: "
                            "0 unconditional, 1 conditional, >1 stronger (default: 0,1,2,3,5)")
    else:
        p.add_argument("--set", dest="set_values", action="append", default=[], metavar="NAME=VALUE",
                       help="a condition of a conditional run (--condition), e.g. --set age=75 --set sex=F; the conditions "
                            "not set are left open (default: none, unconditional sampling)")
        p.add_argument("--sweep", default=None, metavar="NAME=V1,V2,...",
                       help="one grid row per value (NAME=all: every category), every row from the same noise, so that "
                            "the rows differ by what the condition does")
        p.add_argument("--cohort", nargs="?", const="scan", choices=cohort.UNITS, default=None,
                       help="each sample under the conditions of a training scan picked at random (--seed), uniformly "
                            "over scans (`--cohort`, `--cohort scan`) or over subjects (`--cohort subject`): a set "
                            "whose class, age, sex ... follow the training cohort's, together; reads the run's data "
                            "folder and participants table; with --class X or --set NAME=CATEGORY, the scans of "
                            "that value alone (default: off)")
        p.add_argument("--cohort-from", choices=cohort.PARTS, default="training",
                       help="with --cohort: whose scans' conditions are drawn, the training subjects' or those stage 1 "
                            "held out (patients the UNet never saw; a scan whose values equal a training scan's is "
                            "left out, so that no sample is at a training patient's own age, sex and group) (default: "
                            "training)")
        p.add_argument("--cohort-bins", action="append", default=[], metavar="NAME=WIDTH",
                       help="with --cohort: each drawn value of covariate NAME moved to the middle of its WIDTH-wide "
                            "bin, e.g. age=5: [70, 75) -> 72.5, so that the set's labels carry no patient's exact "
                            "value (default: exact values)")
        p.add_argument("--data", default=None,
                       help="with --cohort or --format nifti: the run's data folder, if it moved (checked to hold "
                            "stage 1's files)")
        p.add_argument("--labels", default=None,
                       help="with --cohort: the run's participants table, if it moved (checked to be the run's)")
        p.add_argument("--guidance", type=float, default=3.0,
                       help="classifier-free guidance scale w with --class, --set, --sweep or --cohort: 0 "
                            "unconditional, 1 conditional, >1 stronger (default: %(default)s)")
        p.add_argument("--row-noise", choices=["shared", "independent"], default=None,
                       help="with several rows (--sweep, --class all): every row from the same noise, so that sample k "
                            "of each row is one draw under each row's conditions (shared), or each row from its own "
                            "(independent: independent samples, for a dataset that a --holdout will split) (default: "
                            "shared; independent for --cohort --class all, a dataset)")
        p.add_argument("--format", choices=list(FORMATS), default="png",
                       help="file format of the samples in OUT/samples/: png, nifti (a one-slice volume in the training "
                            "data's plane and spacing) or npz (float32) (default: %(default)s)")
        p.add_argument("--resume", action="store_true",
                       help="continue an interrupted set in OUT/samples/ with the same flags: the batches its manifest "
                            "lists are kept, the others drawn (default: a new set replaces it)")
    p.add_argument("--decode", choices=["quantised", "unquantised"], default="quantised",
                   help="the sampled latents through the VQ-VAE's quantiser, as it was trained, or straight into its decoder "
                        "(CompVis' force_not_quantize: a lower finest band and FID on the ADNI subset at 64 px, "
                        "bench/README.md) (default: %(default)s)")
    add_decoder_argument(p)
    p.add_argument("--autoguidance", type=float, default=1.0, metavar="W",
                   help="guide the UNet by itself earlier in its training (Karras et al. 2024): W x (UNet - guide) + guide, "
                        "so 1 is off and 2-3 sharpen; needs a run trained with --posthoc-ema, whose snapshots hold the "
                        "guide (default: %(default)s)")
    p.add_argument("--guide-at", type=float, default=0.25, metavar="F",
                   help="with --autoguidance: the guide is the run's snapshot at this fraction of its UNet steps (or at "
                        "this step, from 1 up), the last one kept at or before it (default: %(default)s)")
    p.add_argument("--guide-sigma-rel", type=float, default=None, metavar="S",
                   help="with --autoguidance: the guide's EMA length, reconstructed from the snapshots up to its step "
                        "(Karras et al. choose it apart from the main network's) (default: the snapshot's shorter profile, "
                        "0.05)")
    p.add_argument("--guide-interval", type=step_interval, default=None, metavar="FIRST,LAST",
                   help="apply the guidance (--autoguidance, --guidance) only at steps t from FIRST to LAST of the "
                        "training's T, the guided network alone elsewhere (Kynkaanniemi et al. 2024) (default: every step)")
    p.add_argument("--clip-x0", default="auto",
                   help="clip predicted x0 to [-c, c]: a number, 'auto' (the training latents' range), or 'none' (default: %(default)s)")
    p.add_argument("--gif-frames", type=int, default=40, help="GIF frames of the main pass (default: %(default)s)")
    p.add_argument("--gif-xt", action="store_true", help="show the decoded x_t beside the predicted x0 in the GIF")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay the UNet's call from a CUDA graph instead of launching its kernels one by one "
                        "(default: on)")


def add_decoder_argument(p: argparse.ArgumentParser):
    p.add_argument("--decoder", choices=["fine-tuned", "stage-1"], default="fine-tuned",
                   help="the decoder that turns latents into images: fine-tuned, RUN/decoder.pt where `train-decoder` "
                        "wrote one (sharper, and a little further from the input in PSNR: the perception-distortion "
                        "trade-off, losses/README.md), else stage 1's; or stage-1, the VQ-VAE's own, trained for the "
                        "pixel error alone (default: %(default)s)")


def scales(text: str) -> list[float]:
    """'0,1,3' -> [0.0, 1.0, 3.0] (argparse type of a list of guidance scales)."""
    try:
        return [float(w) for w in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def step_interval(text: str) -> tuple[int, int]:
    """'100,700' -> (100, 700): steps FIRST <= LAST, both 0 or more (argparse type of --guide-interval)."""
    try:
        first, last = (int(step) for step in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two steps FIRST,LAST, got {text!r}") from None
    if not 0 <= first <= last:
        raise argparse.ArgumentTypeError(f"expected steps 0 <= FIRST <= LAST, got {text!r}")
    return first, last


# ----------------------------------------------------------------------------- how to sample: settings, asked rows

@dataclass
class Sampling:
    """How to turn noise into latents: the sampler and its settings, resolved once (`sampling_from_args`, or
    built directly by `evaluate` and the benchmarks)."""
    sampler: str = "ddpm"               # ddpm, ddim, dpmpp or dpmpp-sde
    steps: int = 1000                   # network calls of ddim / dpmpp(-sde); ddpm always takes every step
    eta: float = 0.0                    # DDIM noise
    repeat_last: int = 30               # the card's repeats: re-noise to step repeat_last - 1 ...
    repeat_times: int = 0               # ... and denoise again, this many times
    clip_x0: float | None = None        # clip the predicted x0 to [-clip_x0, clip_x0]
    batch_size: int | None = None       # None: DEFAULT_BATCH of the device
    gif_frames: int = 40
    cuda_graphs: bool = True            # on CUDA, the UNet's calls replayed from a graph (runtime/graphs.py)
    quantise: bool = True               # decode the sampled latents through the quantiser (False: straight)
    autoguidance: float = 1.0           # W of autoguidance by `guide` (1: off)
    guide: UNet | None = None           # the run's UNet earlier in its training (--guide-at), for autoguidance
    guide_record: dict | None = None    # what guided: {autoguidance, guide_step, guide_sigma_rel}; None: nothing
    guide_interval: tuple[int, int] | None = None  # the steps (first, last) where guidance applies; None: all

    def calls(self, num_steps: int) -> int:
        """Network calls per batch: the main pass and the repeats."""
        main = num_steps if self.sampler == "ddpm" else min(self.steps, num_steps)
        return main + self.repeat_times * self.repeat_last


def sampling_from_args(args, model: LatentDiffusion | None = None) -> Sampling:
    """The sampling flags checked (one-line errors) and resolved: --repeat-times defaults to the card's 5 repeats
    for ddpm only; --clip-x0 'auto' is the run's latent range. Without `model`, only what needs no run is checked."""
    repeat_times = args.repeat_times if args.repeat_times is not None else (5 if args.sampler == "ddpm" else 0)
    for name in ("batch_size", "steps", "repeat_last", "gif_frames"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise BadInputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.eta <= 1:  # DDIM's range (Song et al. 2021, eq. 16): 1 is DDPM's posterior noise
        raise BadInputError(f"--eta must be in [0, 1], got {args.eta}")
    if min(args.guidance if isinstance(args.guidance, list) else [args.guidance]) < 0:
        raise BadInputError(f"--guidance must be 0 or more, got {args.guidance}")
    if repeat_times < 0:
        raise BadInputError(f"--repeat-times must be 0 or more, got {repeat_times}")
    if args.autoguidance <= 0 or args.guide_at <= 0 or (args.guide_sigma_rel is not None and args.guide_sigma_rel <= 0):
        raise BadInputError(f"--autoguidance, --guide-at and --guide-sigma-rel must be positive, got {args.autoguidance}, "
                            f"{args.guide_at} and {args.guide_sigma_rel}")
    clip_x0 = guide = guide_record = None
    if model is not None:
        if args.sampler != "ddpm" and args.steps > model.diffusion.num_steps:
            raise BadInputError(f"--steps {args.steps} exceeds the run's {model.diffusion.num_steps} diffusion steps")
        if repeat_times and args.repeat_last > model.diffusion.num_steps:
            raise BadInputError(f"--repeat-last {args.repeat_last} exceeds the {model.diffusion.num_steps} diffusion steps")
        clip_x0 = parse_clip(args.clip_x0, model.latent_absmax)
        if args.guide_interval and args.guide_interval[0] >= model.diffusion.num_steps:
            raise BadInputError(f"--guide-interval {args.guide_interval[0]},{args.guide_interval[1]} starts after the "
                                f"last of the {model.diffusion.num_steps} diffusion steps")
        if args.autoguidance != 1:
            guide, guide_record = load_guide(model, Path(args.run), args.guide_at, args.guide_sigma_rel)
            guide_record = {"autoguidance": args.autoguidance, **guide_record}
    return Sampling(args.sampler, args.steps, args.eta, args.repeat_last, repeat_times, clip_x0, args.batch_size,
                    args.gif_frames, args.cuda_graphs, args.decode == "quantised", args.autoguidance, guide, guide_record,
                    args.guide_interval)


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


def asked_rows(model: LatentDiffusion, run: Path, settings: list[str] = (), sweep: str | None = None,
               class_name: str | None = None) -> list[tuple[str, torch.Tensor]] | None:
    """--set, --sweep and --class -> [(caption, conditions (K,))], a row of images each (--class all and --sweep:
    one per value); None when nothing is asked for (unconditional sampling)."""
    if class_name is None and not settings and sweep is None:
        return None
    if class_name is not None and CLASS not in [c.name for c in model.conditions]:
        raise BadInputError(f"{run / 'unet.pt'} was trained without --conditional, so it cannot generate a chosen "
                            f"class; train stage 2 with `train-unet --conditional` for --class")
    if class_name is not None and any(s.partition("=")[0].strip() == CLASS for s in settings):
        raise BadInputError(f"--class {class_name} and --set {CLASS}=... both choose the class: give it once")
    if class_name not in (None, "all") and class_name not in model.classes:
        raise BadInputError(f"--class {class_name!r} is not a class of this run: {', '.join(model.classes)} or all")
    if class_name == "all":
        if sweep is not None:
            raise BadInputError(f"--class all sweeps the classes; it cannot be used with --sweep {sweep} (one sweep at "
                                f"a time: --class NAME --sweep {sweep} for one class)")
        sweep = f"{CLASS}=all"
    elif class_name is not None:
        settings = [*settings, f"{CLASS}={class_name}"]
    return sweep_rows(model.conditions, asked_values(model.conditions, list(settings)), sweep)


def cohort_rows(model: LatentDiffusion, run: Path, args) -> list[tuple[str, torch.Tensor]]:
    """--cohort -> [("cohort", conditions (num, K))]: one row whose every sample has the conditions of a training scan
    (--cohort-from held-out: a held-out one) drawn at random (conditions/cohort.py); with --class all, a row of --num
    per class, each drawn from that class's scans (a cohort balanced across the classes, each with its own ages,
    sexes ...)."""
    if not model.conditions:
        raise BadInputError(f"--cohort draws each sample's conditions from the training scans', and {run / 'unet.pt'} "
                            f"is unconditional; train stage 2 with --conditional or --condition")
    if args.sweep:
        raise BadInputError("--cohort draws each sample's values from a training scan, and --sweep asks for rows of "
                            "chosen ones: leave it out (--cohort --class X or --set NAME=CATEGORY draws from the scans "
                            "of that value, --cohort --class all as many of each class)")
    if args.guidance == 0:
        raise BadInputError("--cohort gives each sample a training scan's conditions, and --guidance 0 ignores them "
                            "(unconditional samples labelled as conditioned): give --guidance 1 or more")
    asked = asked_rows(model, run, args.set_values, None, args.class_name) or [("", None)]
    bins = cohort.parse_bins(args.cohort_bins, model.conditions)
    scans, line = cohort.run_cohort(run, model.conditions, model.labels, args.data, args.labels, args.cohort_from,
                                    bins)
    print(line)
    rows = []
    for k, (swept, wanted) in enumerate(asked):  # swept: "class=AD" of --class all
        named = swept or (f"{CLASS}={args.class_name}" if args.class_name else "")
        caption = ", ".join([*args.set_values, *([named] if named else [])])
        # a sub-cohort: the scans of these categories, their other values as they come
        pool = scans if wanted is None else cohort.among(scans, wanted, model.conditions, caption)
        drawn = cohort.draw(pool, args.num, args.seed, args.cohort, row=k)
        print(f"drew {args.num} from {len(pool.y)} scans{' with ' + caption if caption else ''}, uniformly over "
              f"{args.cohort}s: {cohort.proportions(drawn, model.conditions)}")
        rows.append((f"cohort {caption}".strip(), drawn))
    return rows


# ----------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample_latents(diffusion: GaussianDiffusion, unet, x_T: torch.Tensor, sampling: Sampling, bar=None):
    """Reverse diffusion from x_T, then the card's repeated final steps.

    Returns the final latents and the GIF frames [(caption, x0, x_t)] at evenly spaced steps.
    Each repeat re-noises the current sample to step `repeat_last - 1` with q_sample (the forward
    process, so the marginal is the right one) and runs the reverse process down to data again.
    """
    calls = sampling.calls(diffusion.num_steps) - sampling.repeat_times * sampling.repeat_last
    keep = set(torch.linspace(0, calls - 1, min(sampling.gif_frames, calls)).round().long().tolist())
    keep = {calls - 1} if sampling.gif_frames == 1 else keep  # one frame: the result, not the first step's guess
    frames, x = [], x_T
    steps = diffusion.sample_steps(unet, x_T, sampling.sampler, sampling.steps, eta=sampling.eta, clip_x0=sampling.clip_x0)
    for i, (t, x, x0) in enumerate(steps):
        if i in keep:
            frames.append((f"step {t}", x0, x))
        if bar:
            bar.update(1)
    for r in range(sampling.repeat_times):
        t_start = sampling.repeat_last - 1
        t = torch.full((len(x),), t_start, device=x.device, dtype=torch.long)
        x_t = diffusion.q_sample(x, t, torch.randn_like(x))
        for t, x, x0 in diffusion.sample_steps(unet, x_t, "ddpm", start=t_start, clip_x0=sampling.clip_x0):
            if bar:
                bar.update(1)
        frames.append((f"repeat {r + 1}/{sampling.repeat_times}", x0, x))
    return x, frames


@torch.no_grad()
def decode(vqvae: VQVAE, latents: torch.Tensor, latent_scale: float, batch_size: int = 64,
           quantise: bool = True) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]: z = latent / scale, quantised (or not: --decode), decoded."""
    return torch.cat([vqvae.decode(z / latent_scale, quantise).float().clamp(-1, 1) for z in latents.split(batch_size)])


def batch_size_of(sampling: Sampling, device) -> int:
    """The images sampled at once: --batch-size, or DEFAULT_BATCH of the device. Which images a seed gives depends
    on it, so a record names the resolved value."""
    return sampling.batch_size or DEFAULT_BATCH["cuda" if torch.device(device).type == "cuda" else "cpu"]


@torch.no_grad()
def sample_batches(model: LatentDiffusion, sampling: Sampling, num: int, labels: torch.Tensor | None = None,
                   guidance: float = 1.0, autocast=contextlib.nullcontext(), replay_eagerly: bool = False,
                   seeds: Callable[[int], int] | None = None, skip: set[int] = frozenset(), desc: str = ""):
    """`num` images in batches of sampling.batch_size: yields (batch index, images in [-1, 1] on the CPU, the latent
    GIF frames of the batch). With `labels` (the conditions (num, K), NaN where one is not given, or num class indices)
    under classifier-free guidance of scale `guidance`; with sampling.guide, under autoguidance too. The noise comes
    from torch's global generator, reseeded with `seeds(b)` before batch b when `seeds` is given, so that a batch can
    be drawn again alone; the batches in `skip` are not drawn. On CUDA (with sampling.cuda_graphs) the UNets' calls are
    replayed from CUDA graphs, one per network and batch shape; `replay_eagerly` runs that bookkeeping on any device
    (tests)."""
    device = next(model.unet.parameters()).device
    batch_size = batch_size_of(sampling, device)
    layout = default_memory_format(device)
    network, guide = model.unet, sampling.guide
    if replay_eagerly or (sampling.cuda_graphs and device.type == "cuda"):
        network = GraphedCall(model.unet, replay_eagerly)
        if guide is not None:
            guide = GraphedCall(guide, replay_eagerly)
    batches = [b for b in range(math.ceil(num / batch_size)) if b not in skip]
    bar = progress(total=sampling.calls(model.diffusion.num_steps) * len(batches), dynamic_ncols=True,
                   desc=f"sampling ({sampling.sampler}{', ' + desc if desc else ''})")
    for b in batches:
        if seeds is not None:
            torch.manual_seed(seeds(b))
        start = b * batch_size
        x_T = torch.randn(min(batch_size, num - start), *model.latent_shape, device=device).contiguous(memory_format=layout)
        y = None if labels is None else labels[start:start + len(x_T)].to(device)
        interval = sampling.guide_interval
        denoiser = network if y is None else Guided(network, y, guidance, interval)
        if guide is not None:  # autoguidance, the guide under the same conditions and scale
            denoiser = Autoguided(denoiser, guide if y is None else Guided(guide, y, guidance, interval),
                                  sampling.autoguidance, interval)
        with autocast:
            latents, frames = sample_latents(model.diffusion, denoiser, x_T, sampling, bar)
            images = decode(model.vqvae, latents, model.latent_scale, quantise=sampling.quantise).cpu()
        yield b, images, frames
    bar.close()


@torch.no_grad()
def generate(model: LatentDiffusion, sampling: Sampling, num: int, labels: torch.Tensor | None = None,
             guidance: float = 1.0, autocast=contextlib.nullcontext(), replay_eagerly: bool = False):
    """`num` images in [-1, 1] (on the CPU) from `sample_batches`, the noise drawn in turn from torch's global
    generator. Returns (images, latent GIF frames of the first batch, seconds). Prints the sampling time."""
    samples, frames, t0 = [], None, time.perf_counter()
    for _, images, batch_frames in sample_batches(model, sampling, num, labels, guidance, autocast, replay_eagerly):
        samples.append(images)
        frames = frames or batch_frames
    images, seconds = torch.cat(samples), time.perf_counter() - t0
    report_speed(model, sampling, len(images), seconds)
    return images, frames, seconds


def report_speed(model: LatentDiffusion, sampling: Sampling, count: int, seconds: float):
    device = next(model.unet.parameters()).device
    batch_size = batch_size_of(sampling, device)
    calls = sampling.calls(model.diffusion.num_steps) * (2 if sampling.guide is not None else 1)  # and the guide's
    print(f"sampled {count} images in {seconds:.1f} s ({seconds / max(count, 1):.3f} s/image, "
          f"{calls} network calls per batch, batches of up to {batch_size})")


# ----------------------------------------------------------------------------- what predict.py writes

RETURN_MAX = 4096   # predict() returns the images it drew when at most this many (tests, notebooks); all are on disk


def predict(args):
    """`python predict.py` / `driver.py sample`: samples of a trained run written batch by batch as a dataset with its
    manifest (export/sample_set.py), then a grid of the first ones and a GIF of the first batch."""
    if args.num <= 0:
        raise BadInputError(f"--num must be positive, got {args.num}")
    sampling_from_args(args)  # flags that need no run are checked before loading it
    run, out = Path(args.run), Path(args.out or args.run)
    if args.out:  # a run folder itself was refused inside its data by train-vqvae; --cohort --data: where it is now
        for data in [DataConfig.of_run(run)] + ([replace(DataConfig.of_run(run), root=args.data)] if args.data else []):
            data.refuse_inside(out, "--out")
    device, autocast = setup_device(args.device)
    model = load_run(run, device, finetuned=args.decoder == "fine-tuned")
    sampling = sampling_from_args(args, model)
    # resolved here: which images a seed gives depends on the batch size, and a resumed set must keep it
    sampling = replace(sampling, batch_size=batch_size_of(sampling, device))
    if (args.labels and not args.cohort) or (args.data and not (args.cohort or args.format == "nifti")):
        raise BadInputError("--data and --labels say where --cohort finds the run's data and table (--data also where "
                            "--format nifti finds the training volumes' geometry); without those sample reads neither")
    if (args.cohort_from != "training" or args.cohort_bins) and not args.cohort:
        raise BadInputError("--cohort-from and --cohort-bins say how --cohort draws: give --cohort")
    rows = (cohort_rows(model, run, args) if args.cohort else
            asked_rows(model, run, args.set_values, args.sweep, args.class_name) or [("", None)])
    if args.row_noise is None:  # the rows of a cohort are a dataset's classes, not one draw under each class
        args.row_noise = "independent" if args.cohort and len(rows) > 1 else "shared"
    geometry = None
    if args.format == "nifti":  # the set's own, resumed; else its training volumes'
        geometry = (args.resume and saved_geometry(out / "samples")) or nifti_geometry(run, args.data)
    settings, record = sample_record(args, run, model, sampling, rows)
    if geometry is not None:
        settings["geometry"] = asdict(geometry)
    with run_lock(out, create=True, lock=SAMPLES_LOCK, doing="writing a sample set into"):
        samples = SampleSet(out / "samples", settings, rows, model.conditions, record, geometry, args.resume)

        drawn, count, gif_latents, t0 = [], 0, None, time.perf_counter()
        if len(rows) > 1 and args.row_noise == "shared":
            print("the rows share their noise: sample k of each row is one draw under each row's conditions (for "
                  "independent samples: --row-noise independent)")
        for r, (caption, y) in enumerate(rows):  # by default from the same seeds: rows differ by their conditions only
            labels = None if y is None else y.expand(args.num, -1)  # --cohort's y: (num, K) already
            for b, images, frames in sample_batches(model, sampling, args.num, labels, args.guidance, autocast,
                                                    seeds=lambda b, r=r: samples.batch_seed(b, r),
                                                    skip=samples.batches(r), desc=caption):
                if (r, b) == (0, 0):  # before the batch enters the manifest: a set resumed after it has its GIF
                    gif_latents = frames
                    write_gif(model, gif_latents, args.gif_xt, sampling.quantise, autocast, out / "denoise.gif")
                samples.write(r, b, images)
                count += len(images)
                drawn = drawn + [images] if count <= RETURN_MAX else []  # on disk; kept in memory only for a few
        report_speed(model, sampling, count, time.perf_counter() - t0)
        write_card(samples.folder)  # the set is whole: what it is and how it was drawn, for whoever receives it

        if len(rows) > 1:  # one row per value, as many of each as fit in GRID_MAX, captioned
            per_row = min(args.num, max(1, GRID_MAX // len(rows)))
            grid = [(caption, samples.first(r, per_row)) for r, (caption, _) in enumerate(rows)]
            grid = [(caption, images) for caption, images in grid if len(images)]  # a row all withheld: none
            if grid:
                save_rows(grid, out / "samples.png")
            shown, gridded = per_row * len(rows), bool(grid)
        else:
            shown = min(GRID_MAX, args.num)
            if gridded := len(images := samples.first(0, shown)) > 0:
                save_png(enlarged(images), out / "samples.png", nrow=math.ceil(math.sqrt(shown)), normalize=True,
                         value_range=(-1, 1))
        total = len(rows) * args.num
        if shown < total and gridded:
            print(f"{out / 'samples.png'} shows {shown} of the {total} images; all of them are in {out / 'samples'}")
        if gif_latents is None:
            print(f"the first batch was drawn before --resume: {out / 'denoise.gif'} is the one written then"
                  if (out / "denoise.gif").exists() else "the first batch was drawn before --resume, by a command "
                  "stopped before it wrote denoise.gif (or the GIF went with withheld samples): none is written")
        kept = total - len(samples.withheld)
        print(f"wrote {out / 'samples.png' if gridded else 'no samples.png (every sample it would show is withheld)'}, "
              f"{kept} images as {args.format} in {out / 'samples'}"
              + (f" ({total - kept} more withheld)" if kept < total else "")
              + f" (manifest.csv says how each was made; {count} drawn now)")
        return torch.cat(drawn) if drawn else None


def generation_record(model: LatentDiffusion, sampling: Sampling) -> dict:
    """What decides the images `generate` makes, besides the seed and the conditions: the sampler and its settings,
    the batch size (the noise is drawn batch after batch), the kind of device (a GPU's random numbers and bf16 give
    other images than the CPU's) and the weights (the UNet's step and fingerprint, the post-hoc EMA length chosen by
    `driver.py ema`, the VQ-VAE's and the fine-tuned decoder's fingerprints)."""
    return {"sampler": sampling.sampler,
            "steps": model.diffusion.num_steps if sampling.sampler == "ddpm" else sampling.steps,
            "eta": sampling.eta if sampling.sampler == "ddim" else None, "repeat_last": sampling.repeat_last,
            "repeat_times": sampling.repeat_times, "clip_x0": sampling.clip_x0, "batch_size": sampling.batch_size,
            "device": next(model.unet.parameters()).device.type,
            "unet_step": model.unet_step, "unet_fingerprint": model.fingerprint,
            "vqvae_fingerprint": model.vqvae_fingerprint,
            "posthoc_ema_sigma_rel": model.posthoc_ema["sigma_rel"] if model.posthoc_ema else None,
            **({} if sampling.quantise else {"decode": "unquantised"}),  # a set from before --decode reads the same
            **({"decoder_fingerprint": model.decoder_fingerprint} if model.decoder_fingerprint else {}),  # likewise
            **(sampling.guide_record or {}),  # so does one from before --autoguidance
            **({"guide_interval": list(sampling.guide_interval)} if sampling.guide_interval else {})}  # and this


def sample_record(args, run: Path, model: LatentDiffusion, sampling: Sampling, rows: list) -> tuple[dict, dict]:
    """(the settings that decide a set of samples, which --resume must match; the record each manifest row carries)."""
    conditioned = any(y is not None for _, y in rows)
    if sampling.guide_interval and sampling.autoguidance == 1 and not (conditioned and args.guidance != 1):
        raise BadInputError("--guide-interval limits guidance to some steps, and these samples are not guided (no "
                            "--autoguidance, and no condition asked with a --guidance other than 1)")
    record = {"format": args.format, **generation_record(model, sampling),
              "guidance": args.guidance if conditioned else None, "run": str(run.resolve())}
    settings = {**{k: v for k, v in record.items() if k != "run"}, "num": args.num, "seed": args.seed,
                "batch_seeds": ROW_SEEDING if args.row_noise == "independent" else SEEDING,
                "rows": [[caption, row_record(args, model, y)] for caption, y in rows]}
    return settings, record


def row_record(args, model: LatentDiffusion, y: torch.Tensor | None) -> dict | None:
    """What sampling.json keeps of a row's conditions: None (unconditional), each condition's value, or of a --cohort
    row's (num, K) a hash of its draws and how they were drawn (the keys added since, only where set)."""
    if y is None:
        return None
    if y.dim() == 1:
        return {c.name: c.decode(float(v)) for c, v in zip(model.conditions, y)}
    return {"drawn": cohort.fingerprint(y), "unit": args.cohort,
            **({"from": args.cohort_from} if args.cohort_from != "training" else {}),
            **({"bins": cohort.parse_bins(args.cohort_bins, model.conditions)} if args.cohort_bins else {})}


def write_gif(model: LatentDiffusion, frames: list, with_xt: bool, quantise: bool, autocast, path: Path):
    """The denoising GIF of the first (at most 16) images: the decoded predicted x0 (and x_t) at each kept step."""
    with torch.no_grad(), autocast:
        gif = [gif_frame(decode(model.vqvae, x0[:16], model.latent_scale, quantise=quantise).cpu(),
                         decode(model.vqvae, xt[:16], model.latent_scale, quantise=quantise).cpu() if with_xt else None,
                         caption)
               for caption, x0, xt in frames]
    durations = [80] * (len(gif) - 1) + [2500]  # hold the last frame
    atomic_write(path, lambda f: gif[0].save(f, format="GIF", save_all=True, append_images=gif[1:],
                                              duration=durations, loop=0))


def parse_args(argv=None) -> argparse.Namespace:
    """predict.py's flags with the card's defaults (DDPM-1000, final 30 steps repeated 5 times)."""
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with sigterm_as_ctrl_c():  # a scheduler's SIGTERM: as Ctrl-C, not a silent -15
        try:
            predict(args)
        except BadInputError as e:
            sys.exit(f"error: {e}")
        except OSError as e:
            if disk_full(e) is None:
                raise
            sys.exit(f"error: {disk_full(e)}, then run the same command with --resume")
        except KeyboardInterrupt as e:
            what, status = ("SIGTERM received", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            print(f"{what}; the samples written are whole: the same command with --resume continues the set",
                  file=sys.stderr)
            sys.exit(status)


if __name__ == "__main__":
    main()
