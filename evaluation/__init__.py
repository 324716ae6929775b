"""The `driver.py evaluate` command (evaluate.py), its metrics (metrics.py), domain classifier (classifier.py) and
what it writes and prints (report.py), what it reads of a --samples folder (sample_folder.py); its optional parts in
files of their own (memorisation, utility, conditions, ema_lengths).

The command's flags live here, so that driver.py builds its parser without importing the metrics: torchmetrics
imports transformers wherever that is installed, a few seconds that every other command would pay for nothing.
"""
from __future__ import annotations

import argparse

import predict
from evaluation.ema_lengths import ema_lengths_arg
from runtime.flags import non_negative, seed


def add_arguments(p: argparse.ArgumentParser):
    # the sampler and its flags (--run, --num, --seed, ...), as `driver.py sample`
    predict.add_arguments(p, sampler="dpmpp-sde", steps=20, num=None, for_evaluate=True,
                          num_help="images to generate, per class and scale with --class (default: as many as the "
                                   "held-out floor half B, of the class with --class)")
    p.add_argument("--data", default=None, help="image folder (default: the one the run was trained on)")
    p.add_argument("--holdout", type=float, default=0.1,
                   help="fraction of subjects held out, used only when the run held none out (default: %(default)s)")
    p.add_argument("--holdout-seed", type=seed, default=0,
                   help="seed of that split, same condition (default: %(default)s)")
    p.add_argument("--labels", default=None,
                   help="where the run's participants table is now, if it moved (checked to be the one it trained "
                        "with; default: where it was, or the data folder's file of its name)")
    p.add_argument("--cache-gb", type=non_negative(float), default=8.0,
                   help="images are decoded once into memory if they fit in this many GB, else into the memory-mapped "
                        "RUN/images-*.npy that training builds (default: %(default)s)")
    p.add_argument("--samples", default=None, help="score the images in this folder instead of sampling the run's UNet")
    p.add_argument("--withhold-flagged", action="store_true",
                   help="leave the samples the memorisation check flags out of the --samples set: files deleted, "
                        "manifest rows moved into its withheld.csv, not drawn again by sample --resume (default: off)")
    p.add_argument("--features", choices=["auto", "inception", "domain"], default="auto",
                   help="FID/KID features: Inception-v3 if its weights load, else the domain classifier (default: %(default)s)")
    p.add_argument("--inception-weights", default=None, help="local copy of the FID Inception weights (pt_inception-2015-12-05)")
    p.add_argument("--classifier-steps", type=int, default=1000,
                   help="training steps of the domain classifier; 0 keeps it random (default: %(default)s)")
    p.add_argument("--ema-lengths", type=ema_lengths_arg, default=None, metavar="auto|S,...",
                   help="score the samples of post-hoc EMAs of these lengths sigma_rel (auto: 0.01 to 0.25) beside the "
                        "run's own EMA: a curve of FID and each SWD band against the length, for `driver.py ema`; needs "
                        "a run trained with --posthoc-ema (default: off)")
    p.add_argument("--utility", type=int, default=None, metavar="N",
                   help="train on synthetic, test on real: the AD/NC classifier trained on N generated slices per class "
                        "(at each --guidance scale above 0), on N real ones, and on both, each tested on the held-out "
                        "subjects; needs a run trained with --conditional; on a run conditioned on a participants "
                        "table, its conditions too: the condition network trained on N real slices, on N samples at "
                        "their values, and on both; with --samples, N of the set's own images per class, by their "
                        "class folders (default: off)")
