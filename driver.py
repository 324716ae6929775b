"""Command line of the project: one subcommand per stage, flags grouped, presets `tiny` and `full`.

    python driver.py demo                                   # whole pipeline on the embedded demo data
    python driver.py train-vqvae --run RUN [--data PATH]    # stage 1
    python driver.py train-unet  --run RUN                  # stage 2
    python driver.py train-decoder --run RUN                # optional: the decoder fine-tuned alone, for detail
    python driver.py sample      --run RUN                  # new images (predict.py with fast defaults)
    python driver.py evaluate    --run RUN                  # FID/KID/SWD/MS-SSIM on held-out subjects, report.md
    python driver.py counterfactual --run RUN --input PATH --set group=NC   # "what if": the input under other conditions
    python driver.py ema         --run RUN --sigma-rel best # sample from the EMA length chosen after training

Without --data the embedded MNI152 demo data is used and the preset defaults to `tiny`
(64x64 -> 4x16x16); with --data it defaults to `full` (256x256 -> 4x32x32). Any flag overrides
the preset. `python driver.py SUBCOMMAND --help` lists every flag with its defaults.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path


def _interrupted_while_starting(*_):
    print("interrupted while starting: nothing was written", file=sys.stderr)
    sys.exit(130)


if __name__ == "__main__":  # Ctrl-C while torch and the rest load (seconds): one line, not an import's traceback
    signal.signal(signal.SIGINT, _interrupted_while_starting)

import torch.distributed as dist  # noqa: E402 (after the handler above)

import predict
import train
import evaluation
import volumes
from losses import stage1
from evaluation import ema_lengths
from conditions import counterfactual
from conditions.table import condition_list
from export.sample_set import SAMPLES_LOCK
from runtime.checkpoint import load_checkpoint, read_config, run_lock
from runtime.errors import BadInputError, Interrupted, disk_full
from runtime.flags import Parser, fraction, non_negative, positive, positive_ints, seed
from runtime.process import is_first_on_machine, is_main_process
from runtime.signals import Terminated, sigterm_as_ctrl_c
from volumes.demo import DEFAULT_DEMO_ROOT
from volumes.run_data import DataConfig, check_same_files, stage1_data

# Preset values of the flags that default to None (below, and stage 1's losses' in losses/stage1.py); a flag given
# on the command line wins.
PRESETS = {
    "vqvae": {
        "tiny": dict(image_size=64, vq_channels=16, vq_mult=[1, 2, 4], vq_res_blocks=1, codebook_size=2048,
                     batch_size=8, lr=1e-3, warmup=50, cooldown=0.2, max_steps=2400, sample_every=800, save_every=800,
                     adversarial_weight=0.0, adversarial_start=1200, discriminator_layers=1, clamped_loss=True),
        "full": dict(image_size=256, vq_channels=64, vq_mult=[1, 2, 2, 4], vq_res_blocks=2, codebook_size=4096,
                     batch_size=16, lr=2e-4, warmup=500, cooldown=0.0, epochs=20, sample_every=2000, save_every=2000,
                     adversarial_weight=0.0, adversarial_start=10000, discriminator_layers=3, clamped_loss=True),
    },
    "decoder": {  # tiny: as measured on ADNI 64x64 (bench/README.md): 1500 steps sharpened the samples more than 500,
        # and a PatchGAN of 16x16 patches at 0.1 sharpened them further, where one of 70x70 (the whole slice) drew
        # speckles; full: a fifth of its stage-1 rate, the anchors' 0.01 and pix2pix's 70x70 patches, unmeasured
        "tiny": dict(batch_size=8, lr=2e-4, warmup=0, cooldown=0.2, max_steps=1500, sample_every=500, save_every=250,
                     adversarial_weight=0.1, adversarial_start=0, discriminator_layers=1, clamped_loss=True),
        "full": dict(batch_size=16, lr=4e-5, warmup=0, cooldown=0.2, max_steps=5000, sample_every=1000, save_every=1000,
                     adversarial_weight=0.01, adversarial_start=0, discriminator_layers=3, clamped_loss=True),
    },
    "unet": {
        "tiny": dict(unet_channels=32, unet_mult=[1, 2, 2, 2], unet_res_blocks=1, batch_size=64, lr=1e-3,
                     warmup=200, cooldown=0.0, ema_decay=0.999, max_steps=1500, sample_every=500, save_every=500),
        "full": dict(unet_channels=128, unet_mult=[1, 2, 2, 4], unet_res_blocks=2, batch_size=64, lr=1e-4,
                     warmup=1000, cooldown=0.0, ema_decay=0.9999, epochs=300, sample_every=5000, save_every=5000),
    },
}

# A resumed run is the run it saved (README, "Resuming a run"): every flag not given comes back from it, and a flag
# given again with another value is refused, except these, which may change on resume and otherwise come back:
CHANGEABLE = {"max_steps", "epochs",                                 # the length (given either, neither comes back)
              "lr", "warmup", "cooldown", "adversarial_lr",           # the learning-rate schedule
              "log_every", "sample_every", "save_every", "tensorboard",  # the records
              "deterministic", "skip_nonfinite",                      # how steps run, and what stops them
              "data"}                                                 # the same files moved elsewhere (checked)
# and these, which belong to this command and machine and never come back from the run (--labels: where the table is
# now, checked to be the run's; the run's record knows where it was last):
THIS_COMMAND = {"run", "resume", "max_minutes", "device", "workers", "cache_gb", "precision", "channels_last",
                "compile", "slow_cpu_ok", "demo_dir", "labels"}
LENGTH = {"max_steps", "epochs"}
EVALUATE_LOCK = ".evaluate.lock"  # in evaluate's --out (the run folder by default), held while it evaluates
# What a run written before a flag existed trained with, where known: given again on --resume, the flag must agree
# (a flag missing here is left to its default or the preset, and not checked).
BEFORE_THE_FLAG = {"cooldown": 0.0, "clamped_loss": False, "discriminator_channels": 64, "discriminator_layers": 3,
                   "regularisation": "vq", "kl_weight": 1e-6,
                   # stage 1's losses (2026-11-25: none but MSE before; 2026-12-03: the perceptual network VGG16,
                   # the base loss MSE; 2026-12-05: the adversarial weight adaptive), stage 2's post-hoc EMA and
                   # conditions (2026-12-03; a table of sessions 2026-12-07)
                   "adversarial_weight": 0.0, "perceptual_weight": 0.0, "laplacian_weight": 0.0,
                   "frequency_weight": 0.0, "reconstruction_loss": "mse", "perceptual_network": "vgg16",
                   "adversarial_weighting": "adaptive", "posthoc_ema": 0, "condition": None, "labels": None,
                   "subject_column": None, "session_column": None}


def preset_help(stage: str, name: str, text: str) -> str:
    tiny, full = (PRESETS[stage][preset].get(name, "from --epochs" if name == "max_steps" else "none")
                  for preset in ("tiny", "full"))
    return f"{text} (default: tiny {tiny}, full {full})"


def add_common(p: argparse.ArgumentParser, stage: str):
    """Flags shared by the training commands: train-vqvae, train-decoder, train-unet."""
    ph = lambda name, text: preset_help(stage, name, text)  # noqa: E731
    # run and data
    p.add_argument("--run", "--run-dir", dest="run", default="runs/demo",
                   help="run folder read and written by every stage (default: %(default)s); under torchrun write "
                        "--run-dir, since torchrun's own parser takes --run for an abbreviation of its --run-path")
    p.add_argument("--data", default=None, help="image folder, ADNI layout PATH/{train,test}/{AD,NC}/*.jpeg or PATH/CLASS/*; "
                                                "the same with NIfTI volumes (*.nii[.gz]), or a BIDS tree; "
                                                "default: the embedded MNI152 demo data; stage 2: stage 1's, or the "
                                                "same files moved to PATH")
    p.add_argument("--preset", choices=["tiny", "full"], default=None,
                   help="size preset (default: tiny without --data, full with --data; stage 2: stage 1's)")
    p.add_argument("--cache-gb", type=non_negative(float), default=8.0,
                   help="images are decoded once into memory if they fit in this many GB, else into a memory-mapped "
                        "RUN/images-*.npy (default: %(default)s)")
    p.add_argument("--workers", type=positive(int), default=None,
                   help="image decoding threads and loader workers (default: the CPUs this process may use, shared "
                        "among torchrun's processes)")
    # optimisation
    p.add_argument("--batch-size", type=positive(int), default=None, help=ph("batch_size", "batch size"))
    p.add_argument("--lr", type=positive(float), default=None, help=ph("lr", "AdamW learning rate"))
    p.add_argument("--warmup", type=non_negative(int), default=None,
                   help=ph("warmup", "linear learning-rate warm-up steps"))
    p.add_argument("--cooldown", type=fraction, default=None,
                   help=ph("cooldown", "fraction of the run's steps at its end over which the learning rate falls "
                                       "linearly to zero; with --max-minutes the end is estimated from the speed"))
    p.add_argument("--grad-accum", type=positive(int), default=1,
                   help="micro-batches per optimizer step: the update of a K-times larger batch in the memory of one (default: %(default)s)")
    p.add_argument("--grad-clip", type=positive(float), default=1.0, help="gradient-norm clipping (default: %(default)s)")
    p.add_argument("--max-steps", type=positive(int), default=None, help=ph("max_steps", "optimizer steps to train (wins over --epochs)"))
    p.add_argument("--epochs", type=positive(int), default=None, help=ph("epochs", "epochs to train when --max-steps is not given"))
    p.add_argument("--max-minutes", type=positive(float), default=None,
                   help="stop cleanly, with a checkpoint, after this much wall-clock time of training, counted from "
                        "its first step (loading data and encoding latents come before; default: no limit)")
    p.add_argument("--seed", type=seed, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels only, no TF32: a resumed run then ends with the very weights of an "
                        "uninterrupted one (slower on GPUs)")
    p.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose gradient is NaN/inf instead of stopping the run (stops after 20 in a row)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available; under torchrun the rank's GPU)")
    # speed
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="autocast precision; fp16 adds a GradScaler (default: %(default)s = bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC memory format for the convolutions (default: on for CUDA, off on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (slower start, faster steps)")
    # records
    p.add_argument("--log-every", type=positive(int), default=50, help="steps between log lines and CSV rows (default: %(default)s)")
    p.add_argument("--sample-every", type=positive(int), default=None, help=ph("sample_every", "steps between image grids"))
    p.add_argument("--save-every", type=positive(int), default=None, help=ph("save_every", "steps between checkpoints"))
    p.add_argument("--resume", action="store_true",
                   help="continue from the run's checkpoint, with the run's own settings (README, 'Resuming a run')")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write the logged values and the grids to RUN/tensorboard (needs `pip install tensorboard`)")
    p.add_argument("--slow-cpu-ok", action="store_true",
                   help="train the full preset on a CPU even when the first step says it would take more than an hour")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-vqvae", help="stage 1: train the VQ-VAE on images")
    add_common(p, "vqvae")
    # the images, saved in DataConfig; stage 2 and `evaluate` inherit them
    p.add_argument("--demo-dir", default=str(DEFAULT_DEMO_ROOT), help="where the demo data is built once (default: %(default)s)")
    p.add_argument("--image-size", type=positive(int), default=None, help=preset_help("vqvae", "image_size", "images are resized to SIZE x SIZE"))
    p.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1 grayscale, 3 RGB as the original (default: %(default)s)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="leave out images that cannot be read, and report how many and which (default: stop at the "
                        "first, naming it)")
    p.add_argument("--vq-channels", type=positive(int), default=None, help=preset_help("vqvae", "vq_channels", "width of the first level"))
    p.add_argument("--vq-mult", type=positive_ints, default=None,
                   help=preset_help("vqvae", "vq_mult", "width multipliers, one level each"))
    p.add_argument("--vq-res-blocks", type=positive(int), default=None, help=preset_help("vqvae", "vq_res_blocks", "res blocks per level"))
    p.add_argument("--codebook-size", type=positive(int), default=None, help=preset_help("vqvae", "codebook_size", "codebook entries"))
    p.add_argument("--vq-min-group-width", type=positive(int), default=1,
                   help="channels per GroupNorm group at least; 1 keeps 32 groups, one channel each at 32 channels or "
                        "fewer, as every earlier VQ-VAE (default: %(default)s; bench/README.md, issue 32)")
    p.add_argument("--regularisation", choices=["vq", "kl"], default="vq",
                   help="the latent's: vq, the card's codebook, or kl, a Gaussian posterior and LDM's KL term in its "
                        "place (Rombach et al. 2022's KL-f8; --codebook-size then unused) (default: %(default)s; "
                        "bench/README.md, issue 32)")
    p.add_argument("--kl-weight", type=positive(float), default=1e-6,
                   help="with --regularisation kl, the KL term's weight in LDM's units (default: %(default)s, theirs)")
    p.add_argument("--holdout", type=float, default=0.0,
                   help="fraction of subjects left out of training, for evaluation; stage 2 inherits it (default: %(default)s, the card's all data)")
    p.add_argument("--holdout-seed", type=seed, default=0, help="seed of that subject split (default: %(default)s)")
    volumes.add_arguments(p)
    stage1.add_arguments(p, "vqvae", preset_help)
    p.set_defaults(func=train.train_vqvae, stage="vqvae")

    p = sub.add_parser("train-decoder", help="optional, after stage 1 or 2: fine-tune the VQ-VAE's decoder alone for "
                                             "finer detail; its latents, and a UNet trained on them, stay valid")
    add_common(p, "decoder")
    stage1.add_arguments(p, "decoder", preset_help)
    p.set_defaults(func=train.train_decoder, stage="decoder")

    p = sub.add_parser("train-unet", help="stage 2: train the denoising UNet on the VQ-VAE's latents")
    add_common(p, "unet")
    p.add_argument("--unet-channels", type=positive(int), default=None, help=preset_help("unet", "unet_channels", "width of the first level"))
    p.add_argument("--unet-mult", type=positive_ints, default=None,
                   help=preset_help("unet", "unet_mult", "width multipliers of the 4 levels"))
    p.add_argument("--unet-res-blocks", type=positive(int), default=None, help=preset_help("unet", "unet_res_blocks", "res blocks per level"))
    p.add_argument("--ema-decay", type=float, default=None, help=preset_help("unet", "ema_decay", "EMA decay of the sampling weights"))
    p.add_argument("--posthoc-ema", type=int, default=0, metavar="EVERY",
                   help="keep EDM2's two power-function EMAs (sigma_rel 0.05 and 0.10) and save them every EVERY steps "
                        "and with each checkpoint, to RUN/ema_snapshots/, so that `driver.py ema` can choose the EMA "
                        "length after training (2 x the UNet's size per snapshot) (default: 0, off)")
    p.add_argument("--schedule", choices=["linear", "cosine"], default="linear", help="noise schedule (default: %(default)s, the original's)")
    p.add_argument("--diffusion-steps", type=positive(int), default=1000, help="diffusion steps T (default: %(default)s)")
    p.add_argument("--prediction", choices=["eps", "v"], default="v",
                   help="UNet target: v (Salimans & Ho 2022) stays stable when under-trained; eps as Ho et al. (default: %(default)s)")
    p.add_argument("--loss", choices=["mse", "smooth_l1"], default="mse", help="eps loss (default: %(default)s; the original used smooth_l1)")
    p.add_argument("--conditional", action="store_true",
                   help="condition the UNet on the class folders (AD, NC ...), for `--class` at sampling: `class` "
                        "added to --condition's names (default: unconditional)")
    p.add_argument("--condition", type=condition_list, default=None,
                   help="NAME,...: condition the UNet on these columns of the participants table (numbers: continuous "
                        "covariates, text: categories; NAME:category or NAME:continuous says which) and `class`, the class "
                        "folders; sample with --set NAME=VALUE (default: unconditional, or `class` with --conditional)")
    p.add_argument("--labels", default=None,
                   help="participants table, CSV or TSV, one row per subject, or per scan with --session-column "
                        "(default: the data folder's participants.tsv)")
    p.add_argument("--subject-column", default=None,
                   help="the table's column of subject IDs, matched to the images' subjects (default: participant_id)")
    p.add_argument("--session-column", default=None,
                   help="a table of sessions, a row per scan or visit: its column naming each row's scan by a folder "
                        "or a part of the file name, for values that change between scans, e.g. 'Image Data ID' of "
                        "ADNI's search CSV (default: session_id where the table has it; a BIDS tree's "
                        "sub-*_sessions.tsv are read with its participants.tsv)")
    p.add_argument("--label-dropout", type=float, default=0.1,
                   help="probability that a condition is dropped (not given) in training, for each condition of each "
                        "image on its own, so that the network learns every subset of its conditions, the unconditional "
                        "model included, for classifier-free guidance (default: %(default)s)")
    p.add_argument("--min-snr-gamma", type=positive(float), default=None,
                   help="weight each step's loss by min(SNR, gamma) / SNR (eps) or / (SNR + 1) (v), Hang et al. 2023; "
                        "5 is the paper's choice (default: off, the plain average)")
    p.add_argument("--timestep-sampling", choices=["uniform", "lognormal"], default="uniform",
                   help="how training draws the noise step t: uniform (Ho et al.), or lognormal: ln sigma_t normal as "
                        "EDM's (Karras et al. 2022), fewer very noisy steps, sharper fine detail and a worse coarse "
                        "level on ADNI 64x64 (bench/README.md; default: %(default)s)")
    p.set_defaults(func=train.train_unet, stage="unet")

    p = sub.add_parser("sample", help="generate images, a grid and a GIF from a trained run (predict.py)")
    predict.add_arguments(p, sampler="dpmpp-sde", steps=20)
    p.set_defaults(func=predict.predict, stage=None)

    p = sub.add_parser("evaluate", help="FID, KID, SWD, MS-SSIM and VQ-VAE fidelity on held-out subjects; metrics.json, report.md")
    evaluation.add_arguments(p)
    p.set_defaults(func=evaluate, stage=None)

    p = sub.add_parser("ema", help="sample from a post-hoc EMA length (train-unet --posthoc-ema): a number, the best "
                                   "of `evaluate --ema-lengths`, or none")
    ema_lengths.add_arguments(p)

    p = sub.add_parser("counterfactual", help="the input slice as it would look under other conditions (--set), or a "
                                              "region filled in (--mask); a heat map of what changed")
    counterfactual.add_arguments(p)
    p.set_defaults(func=counterfactual.counterfactual, stage=None)

    p = sub.add_parser("demo", help="the whole pipeline on the embedded demo data with the tiny preset")
    p.add_argument("--run", default="runs/demo", help="run folder (default: %(default)s)")
    p.add_argument("--demo-dir", default=str(DEFAULT_DEMO_ROOT), help="where the demo data is built once (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu, cuda ... (default: cuda if available)")
    p.set_defaults(func=demo, stage=None)
    parser.commands = sub.choices  # name -> its parser (given_flags)
    return parser


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the flags left at None from the preset; --epochs given alone is not overridden by max_steps."""
    if args.preset is None:
        args.preset = "full" if args.data else "tiny"
    for name, value in PRESETS[args.stage][args.preset].items():
        if name == "max_steps" and args.epochs is not None:
            continue
        if getattr(args, name, None) is None:
            setattr(args, name, value)
    if args.max_steps is None and args.epochs is None:
        args.epochs = 1
    return args


def check_sizes(args: argparse.Namespace):
    """Sizes the networks and fractions the split cannot take, as one-line errors before anything runs."""
    if args.stage == "vqvae":
        if not 0 <= args.holdout < 1:
            raise BadInputError(f"--holdout is the fraction of subjects held out, in [0, 1), got {args.holdout}")
        factor = 2 ** (len(args.vq_mult) - 1)
        if args.image_size % (8 * factor):  # stage 2's UNet halves the latent three times
            raise BadInputError(f"--image-size {args.image_size} does not fit: the VQ-VAE divides it by {factor} and "
                                f"the UNet halves that 3 times, so it must be a multiple of {8 * factor}")
    elif args.stage == "unet":
        if not 0 <= args.label_dropout < 1:
            raise BadInputError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
        if len(args.unet_mult) != 4:
            raise BadInputError(f"the UNet has 4 levels, one width multiplier each (got --unet-mult {args.unet_mult})")
        if args.schedule == "linear" and args.diffusion_steps <= 20:
            raise BadInputError(f"--diffusion-steps {args.diffusion_steps} is too few for --schedule linear: its last "
                                f"beta, 0.02 x 1000 / T, must stay below 1 (T above 20), or the last step destroys all "
                                f"signal; take more steps, or --schedule cosine")
        if not 0 <= args.ema_decay < 1:
            raise BadInputError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
        if args.posthoc_ema < 0:
            raise BadInputError(f"--posthoc-ema EVERY must be 0 (off) or a number of steps, got {args.posthoc_ema}")


def resolve(args: argparse.Namespace, given: set[str]) -> argparse.Namespace:
    """Every flag of a stage, resolved once: stage 1's values a stage 2 or `train-decoder` inherits (its preset, image
    size, channels, held-out subjects, data), then on --resume the run's own settings (`keep_the_runs_settings`), then the preset,
    then the checks. `given`: the flags typed on the command line. The stages read `args` and never change it."""
    if args.stage in ("unet", "decoder"):
        stage1_args, args.data_config = stage1_data(Path(args.run), args.data)
        args.preset = args.preset or stage1_args.get("preset")
        data = args.data_config
        args.data, args.image_size, args.channels = data.root, data.image_size, data.channels
        args.holdout, args.holdout_seed, args.skip_bad_images = data.holdout, data.holdout_seed, data.skip_bad_images
    if "labels" in given:  # saved as found from here, so that it is found again from anywhere
        args.labels = os.path.abspath(args.labels)
    resumed = args.resume and (Path(args.run) / f"{args.stage}.pt").exists()
    if resumed:
        keep_the_runs_settings(args, given)
    apply_preset(args)
    check_sizes(args)
    if args.stage == "vqvae" and not resumed:
        args.data_config = DataConfig.from_args(args)
    args.data_config.refuse_inside(args.run, "--run")
    return args


def keep_the_runs_settings(args: argparse.Namespace, given: set[str]):
    """A resumed run is the run it saved: each flag not given comes back from the checkpoint's copy of the flags
    (RUN/config.json may hold those of a later attempt that stopped before it saved anything; it is read only for a
    checkpoint without them), and stage 1's data from the data config in vqvae.pt (which also knows how its folder
    was read); a flag given again must agree with the run, unless it is CHANGEABLE (or THIS_COMMAND's, which never
    comes back). Stage 2's data is stage 1's, resolved before. A flag newer than the run comes back as
    BEFORE_THE_FLAG says, or is left to the preset."""
    ckpt = load_checkpoint(Path(args.run) / f"{args.stage}.pt", args.stage)
    own = ckpt.get("args")
    if own is None:
        own = read_config(Path(args.run)).get(f"train-{args.stage}")
    own = own or {}
    flags = {action.dest for action in build_parser().commands[args.command]._actions} - {"help"}
    own = {name: own[name] if name in own else BEFORE_THE_FLAG.get(name, _UNKNOWN) for name in flags}
    table = ckpt.get("labels") or {}  # the columns a table was read by, where they were defaults (stage 1's, BIDS')
    own.update({name: table[name] for name in ("subject_column", "session_column") if table.get(name)})
    if args.stage == "vqvae":
        vq_ckpt = load_checkpoint(Path(args.run) / "vqvae.pt", "vqvae")
        saved = DataConfig.from_checkpoint(vq_ckpt)
        own.update(saved.flags())
    for name, value in own.items():
        if name in THIS_COMMAND or (args.stage != "vqvae" and name == "data"):
            continue  # this command's own; stage 2's data is stage 1's, resolved before
        if name in given:
            if value is not _UNKNOWN and name not in CHANGEABLE and _plain(getattr(args, name)) != _plain(value):
                flag = "--" + name.replace("_", "-")
                raise BadInputError(f"{flag} {_shown(getattr(args, name))} differs from this run's {_shown(value)}: a "
                                    f"resumed run keeps the settings it was started with; leave {flag} out, or train "
                                    f"a new --run")
        elif value is not _UNKNOWN and not (name in LENGTH and LENGTH & given):
            setattr(args, name, value)
    if args.stage == "vqvae":
        table = saved.layout.class_table or saved.layout.scan_table
        if "labels" in given and args.labels != table:  # train-unet's may move; stage 1 saved its own classes, or
            # whose each scan is
            what = "scans' subjects" if saved.layout.scan_table else "classes"
            raise BadInputError(f"--labels {args.labels}: a resumed stage 1 keeps the {what} it read when it began "
                                f"(from {table or 'no table given'}); leave --labels out")
        args.data_config = dataclasses.replace(saved, root=args.data)
        check_same_files(args.data_config, vq_ckpt, Path(args.run))


_UNKNOWN = object()  # a flag the run's config.json does not hold (a run written before the flag existed)


def _plain(value):
    """A flag's value as config.json holds it (tuples are lists there)."""
    return json.loads(json.dumps(value))


def _shown(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)


def given_flags(argv: list[str] | None) -> set[str]:
    """The flags typed on the command line (their argparse dests): the command line parsed again, every default
    suppressed (argparse keeps a parser's arguments in its `_actions`)."""
    parser = build_parser()
    for command in parser.commands.values():
        for action in command._actions:
            action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command", "func", "stage"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag in ("run", "out"):
        if getattr(args, flag, None) == "":  # Path("") is the current folder
            raise BadInputError(f"--{flag} is empty (an unset variable?): name a folder")
    if args.stage:
        resolve(args, given_flags(argv))
    elif args.command == "evaluate":
        _, args.data_config = stage1_data(Path(args.run), args.data)
    elif args.command == "counterfactual":  # how the run reads an image; its data folder need not be at hand
        args.data_config = DataConfig.of_run(args.run)
    return args


def demo(args):
    """Demo data -> VQ-VAE -> UNet -> predict, tiny preset; re-running continues or skips finished stages."""
    device = ["--device", args.device] if args.device else []

    def common(stage: str) -> list[str]:  # a stage that saved a checkpoint is continued (or skipped, if finished)
        return ["--run", args.run, *device] + (["--resume"] if (Path(args.run) / f"{stage}.pt").exists() else [])

    stages = [  # each stage's flags are resolved when it starts, after the stage before it wrote the run folder
        ("train-vqvae", lambda: train.train_vqvae(parse(["train-vqvae", "--demo-dir", args.demo_dir,
                                                          *common("vqvae")]))),
        ("train-unet", lambda: train.train_unet(parse(["train-unet", *common("unet")]))),
        ("predict", lambda: predict.predict(predict.parse_args(["--run", args.run] + device))),
    ]
    times = {}
    for name, run_stage in stages:
        t0 = time.perf_counter()
        run_stage()
        times[name] = time.perf_counter() - t0
    print("demo finished: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))
    print(f"samples: {args.run}/samples.png   denoising GIF: {args.run}/denoise.gif")


def evaluate(args):
    from evaluation.evaluate import evaluate  # the metrics load here, not for every command
    from evaluation.sample_folder import sample_set_folder
    screened = sample_set_folder(Path(args.samples)) if args.samples and args.withhold_flagged else None
    # two into one folder would mix their report.md, metrics.json and figures; a set that --withhold-flagged changes
    # is held from its reading to its withholding, so that no `sample` (nor another evaluate) changes it in between
    with run_lock(Path(args.out or args.run), create=True, lock=EVALUATE_LOCK, doing="evaluating into"), \
            (run_lock(screened.parent, lock=SAMPLES_LOCK, doing="writing a sample set into") if screened else
             contextlib.nullcontext()):
        return evaluate(args)


def how_to_continue(argv: list[str] | None) -> str:
    """The hint after an interruption: `demo` resumes by itself, the training commands and `sample` with --resume,
    the others (`evaluate`, `ema`, `counterfactual`) start over."""
    command = (argv if argv is not None else sys.argv[1:])[:1]
    if command == ["demo"]:
        return "run the same demo command again to continue (it resumes by itself)"
    if command and (command[0].startswith("train-") or command[0] == "sample"):
        return "run the same command with --resume to continue"
    return "run the same command again (it starts over)"


def main(argv: list[str] | None = None):
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:  # loaded: Ctrl-C is KeyboardInterrupt again
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with sigterm_as_ctrl_c():  # a scheduler's SIGTERM outside a training loop: as Ctrl-C, not a silent -15
        try:
            args = parse(argv)
            if is_main_process():  # under torchrun, once
                print("config: " + " ".join(f"{k}={v}" for k, v in sorted(vars(args).items()) if k != "func"))
            writes_run = args.stage is not None or args.command in ("ema", "demo")  # the training commands, and these
            starts_run = args.stage is not None or args.command == "demo"  # these may make the run folder
            if starts_run and Path(args.run).is_file():
                raise BadInputError(f"--run {args.run} is a file, not a run folder: give a folder")
            with run_lock(Path(args.run), create=starts_run) if writes_run else contextlib.nullcontext():
                args.func(args)
        except BadInputError as e:
            sys.exit(f"error: {e}" if is_first_on_machine() else 1)  # under torchrun, once per machine
        except OSError as e:
            if disk_full(e) is None:
                raise
            sys.exit(f"error: {disk_full(e)}; {how_to_continue(argv)}" if is_first_on_machine() else 1)
        except Interrupted as e:  # SIGINT/SIGTERM during training: a checkpoint was written (all ranks stop together)
            if is_main_process():
                print(f"stopped: {e}; {how_to_continue(argv)}", file=sys.stderr)
            sys.exit(130)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (Terminated), outside a training loop: sampling ...
            what, status = ("SIGTERM received", 143) if isinstance(e, Terminated) else ("interrupted", 130)
            if is_first_on_machine():
                print(f"{what}; each file written is whole (a sample set's, a checkpoint): {how_to_continue(argv)}",
                      file=sys.stderr)
            sys.exit(status)
        finally:
            if dist.is_initialized():  # under torchrun
                dist.destroy_process_group()


if __name__ == "__main__":
    main()
