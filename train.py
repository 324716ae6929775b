"""The two training stages, `train_vqvae(args)` (stage 1) and `train_unet(args)` (stage 2), the optional fine-tune of
stage 1's decoder alone, `train_decoder(args)`, and the loop they share.

Both read and write one run folder (`args.run`); see DESIGN.md for its layout. The command line in
driver.py resolves every flag first (presets, what stage 2 inherits from stage 1), then calls them,
on one device or, under torchrun, on many (DDP):

    python driver.py train-vqvae --run runs/demo     # stage 1: VQ-VAE on images
    python driver.py train-unet  --run runs/demo     # stage 2: UNet on the VQ-VAE's latents
    python driver.py train-decoder --run runs/demo   # optional: the VQ-VAE's decoder fine-tuned alone, for detail
    torchrun --standalone --nproc_per_node 4 driver.py train-vqvae --run-dir runs/adni --data PATH

Under torchrun every process trains on its shard of each epoch (DistributedSampler); rank 0 alone
writes the run folder, builds the image and latent caches (the others wait) and logs the loss
averaged over ranks. One optimizer step = --grad-accum micro-batches of --batch-size on every rank.
"""
from __future__ import annotations

import contextlib
import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from torchvision.utils import make_grid, save_image

from conditions.table import (CLASS, build_conditions, condition_matrix, find_table, read_table, saved_conditions,
                              subjects_of, to_saved)
from dataset import (data_files_key, dataset_labels, dataset_paths, files_fingerprint, index_batches, subject_summary,
                     to_unit, training_data, training_files, uint8_loader)
from diffusion.gaussian import GaussianDiffusion
from diffusion.guidance import drop_conditions
from losses.stage1 import ReconstructionLoss
from modules import EMA, VQVAE, UNet, UNetConfig, VQVAEConfig
from predict import load_vqvae
from runtime.checkpoint import (atomic_save, checkpoint_to_resume, fingerprint, load_checkpoint, model_config,
                                plain_args, write_config)
from runtime.errors import BadInputError
from runtime.optimizer import adamw, load_optimizer
from runtime.posthoc_ema import PowerFunctionEMA, drop_snapshots_after
from runtime.process import (Runtime, any_rank, cpus_per_process, main_rank_first, mean_over_ranks, place_model,
                             progress, restore_rng, rng_states, setup_runtime, wrap_model)
from runtime.signals import StopRequests


# ----------------------------------------------------------------------------- one optimizer step

def optimizer_step(model, optimizer, scaler, micro_batches: list, loss_fn, grad_clip: float,
                   skip_nonfinite: bool = False) -> torch.Tensor | None:
    """One update from K micro-batches: the gradient of their mean loss (DDP all-reduces it once, on the
    last), unscaled if fp16, clipped, applied. loss_fn(batch) -> (loss, stats); returns the mean stats.

    skip_nonfinite: a step whose gradient norm is NaN/inf changes nothing and returns None (one host-device
    sync per step). Otherwise such a step reaches the weights, and the loss check before every save stops the run.
    """
    k = len(micro_batches)
    no_sync = getattr(model, "no_sync", None)  # DDP's: skip the all-reduce while accumulating
    stats = 0.0
    for i, batch in enumerate(micro_batches):
        with no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext():
            loss, batch_stats = loss_fn(batch)
            scaler.scale(loss / k).backward()
        stats = stats + batch_stats.detach() / k
    scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if skip_nonfinite and not torch.isfinite(norm).item():  # the same on every rank: gradients are all-reduced
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return stats


class LearningRateFactor:
    """The base learning rate's factor at each step: a linear warm-up, constant after it, and with --cooldown C a
    linear fall to zero over the last C of the run's steps (warmup-stable-decay; Hagele et al. 2024). At a constant
    rate the weights end wherever the optimizer's noise has them when the run stops, and the last checkpoint is what
    the next stage uses: some `tiny` VQ-VAEs ended in a loss spike (bench/README.md, where the `tiny` default C = 0.2
    was measured; the `full` VQ-VAE keeps C = 0 until it is measured over a run of its length). Stage 2 averages its
    weights (EMA) instead, and its presets keep C = 0.

    The fall ends at step `end`: the run's `length` (--max-steps or --epochs), or sooner where --max-minutes runs
    out, which the loop estimates again at every log step from the speed so far (`end_by`, the same on every rank);
    with a cooldown the run is over when the rate reaches zero there. The fall is counted from step 0, and a
    checkpoint keeps `state()`: a resumed run goes on where its schedule was, with the end its own deadline set
    (which a later --max-minutes may bring sooner, never later), unless it is given another length, which plans
    the fall anew.
    """

    def __init__(self, warmup: int, cooldown: float, length: int, saved: dict | None = None):
        self.warmup, self.cooldown, self.length = warmup, cooldown, length
        self.end = saved["end"] if saved and saved["length"] == length else length
        self.latest = self.end   # the latest the end may be: where it stood when this command began

    def __call__(self, step: int) -> float:
        factor = min(1.0, (step + 1) / max(1, self.warmup))
        if self.cooldown > 0:
            factor *= min(1.0, max(0.0, (self.end - step) / (self.cooldown * self.end)))
        return factor

    def end_by(self, deadline_step: int):
        """--max-minutes: the fall ends where the minutes are estimated to run out, never later than it would have."""
        self.end = min(self.latest, deadline_step)

    def finished(self, step: int) -> bool:
        """With a cooldown, the rate has reached zero: nothing is left to learn."""
        return self.cooldown > 0 and step >= self.end

    def state(self) -> dict:
        return {"end": self.end, "length": self.length}


def end_by_deadline(step: int, start: tuple[int, float], deadline: float, rt: Runtime) -> int:
    """The step at which --max-minutes will stop the run, at this command's speed so far (steps since `start`,
    (step, time)); the mean over ranks, so that every rank sets the same learning rate."""
    first_step, first_time = start
    now = time.monotonic()
    estimate = step + (step - first_step) / max(now - first_time, 1e-9) * max(deadline - now, 0.0)
    return round(mean_over_ranks(torch.tensor(float(estimate), device=rt.device), rt).item())


def restore_training(resume: dict | None, model: nn.Module, optimizer, rt: Runtime, lr: float) -> int:
    """Load a checkpoint's weights, optimizer and fp16 GradScaler state; returns its step (0 without one).
    `lr` (--lr, or the resumed run's own when not given) is the base learning rate from here on."""
    if resume is None:
        return 0
    model.load_state_dict(resume["model"])
    load_optimizer(optimizer, resume["optimizer"])
    for group in optimizer.param_groups:  # the warm-up schedule scales initial_lr
        group["initial_lr"] = lr
    if rt.scaler.is_enabled() and resume.get("scaler"):
        rt.scaler.load_state_dict(resume["scaler"])
    return resume["step"]


def total_steps(args, items: int, world: int) -> int:
    """--max-steps, else --epochs of this rank's shard of `items` in optimizer steps."""
    if args.max_steps is not None:
        return args.max_steps
    return args.epochs * max(1, items // world // (args.batch_size * args.grad_accum))


# ----------------------------------------------------------------------------- records and stops

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

    def plot(self, png: Path, keys: tuple[str, ...], title: str):
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


def ensure_finite(loss: float, step: int, ckpt_path: Path, model: nn.Module):
    """Stop before a NaN/inf loss or weight can reach a checkpoint; the last one written stays as it was."""
    if not math.isfinite(loss) or not all(p.isfinite().all() for p in model.parameters()):
        what = f"the loss became {loss}" if not math.isfinite(loss) else "a weight became NaN/inf"
        raise BadInputError(f"{what} before step {step}; stopped without saving (the last good checkpoint, if any, "
                            f"is {ckpt_path}); try a lower --lr, or --skip-nonfinite to skip such steps")


class NonfiniteSkips:
    """--skip-nonfinite's count of skipped steps; `limit` of them in a row means the run has diverged: stop."""

    def __init__(self, ckpt_path: Path, limit: int = 20):
        self.ckpt_path, self.limit = ckpt_path, limit
        self.total = self.in_a_row = 0

    def count(self, stats, step: int) -> bool:
        """True if the step was taken (its stats count), False if it was skipped."""
        if stats is not None:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise BadInputError(f"{self.limit} steps in a row up to step {step} had a NaN/inf gradient: the run diverged; "
                                f"stopped without saving (the last good checkpoint, if any, is {self.ckpt_path}); try a lower --lr")
        return False

    def note(self) -> str:
        return f" | {self.total} non-finite steps skipped" if self.total else ""


# ----------------------------------------------------------------------------- the loop both stages share

@dataclass
class Stage:
    """What a training stage hands the shared loop: the parts in which the two stages differ."""
    name: str                               # "vqvae" or "unet": RUN/<name>.pt, RUN/log_<name>.csv
    model: nn.Module                        # the unwrapped model: saved, checked for NaN
    train_model: nn.Module                  # the same under DDP / torch.compile: runs the batches
    optimizer: torch.optim.Optimizer
    batches: Iterator                       # this rank's micro-batches, endlessly
    loss: Callable                          # micro-batch -> (loss, stats tensor, one value per name in `stats`)
    stats: tuple[str, ...]                  # what the log shows; `plot` of them are drawn as curves
    draw: Callable[[], tuple]               # (images in [-1, 1], per row) of what the model makes now (rank 0)
    grid: str                               # grid file prefix: RUN/<grid>_step0000100.png
    payload: Callable[[], dict]             # the stage's own checkpoint entries: kind, config, ...
    on_save: Callable[[int], None] = lambda step: None  # rank 0, with each checkpoint: the post-hoc EMA's snapshot
    after_step: Callable[[int, bool], None] = lambda step, taken: None  # after each step (its number, whether it
                                                                        # was taken, not skipped): the EMA update
    plot: tuple[str, ...] = ("loss",)
    derived: Callable[[dict], dict] = lambda values: {}  # logged values computed from the means (PSNR)
    unit: str = "img"


def train_loop(stage: Stage, args, rt: Runtime, step: int, max_steps: int, resume: dict | None):
    """Train `stage` from `step` to `max_steps`, or with a cooldown until the learning rate reaches zero: every step
    one optimizer update; once in a while log the mean stats (all ranks agree on them and on stopping), draw a
    grid (rank 0), save a checkpoint or stop. Ends with a checkpoint, the grid and the loss curve; raises
    Interrupted after a SIGINT/SIGTERM."""
    run = Path(args.run)
    ckpt_path = run / f"{stage.name}.pt"
    lr_factor = LearningRateFactor(args.warmup, args.cooldown, max_steps, resume.get("lr_schedule") if resume else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(stage.optimizer, lr_factor, last_epoch=step - 1)
    per_step = args.batch_size * args.grad_accum * rt.world
    if rt.main:
        log = MetricLog(run / f"log_{stage.name}.csv", ["step", *stage.stats, *stage.derived({}), "lr", "img_per_s"])
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    start = (step, time.monotonic())

    def save(step: int):  # every rank joins in gathering the random states; rank 0 writes
        rng = rng_states(rt)
        if rt.main:
            atomic_save({**stage.payload(), "model": stage.model.state_dict(), "optimizer": stage.optimizer.state_dict(),
                         "scaler": rt.scaler.state_dict(), "rng": rng, "step": step, "args": plain_args(args),
                         "lr_schedule": lr_factor.state()},
                        ckpt_path, keep_previous=True)
            stage.on_save(step)

    sums, n_sum, t0 = torch.zeros(len(stage.stats), device=rt.device), 0, time.perf_counter()
    pbar = progress(total=max_steps, initial=step, desc=stage.name, dynamic_ncols=True, disable=not rt.main, quiet=True)
    board = tensorboard(run) if args.tensorboard and rt.main else None
    first_step = time.perf_counter()
    if resume:
        restore_rng(resume.get("rng"), rt)
    skips, stop = NonfiniteSkips(ckpt_path), StopRequests()
    stage.model.train()
    with stop:
        while step < max_steps and not lr_factor.finished(step):
            # one optimizer step; no host-device sync unless --skip-nonfinite
            stats = optimizer_step(stage.train_model, stage.optimizer, rt.scaler,
                                   [next(stage.batches) for _ in range(args.grad_accum)], stage.loss, args.grad_clip,
                                   args.skip_nonfinite)
            scheduler.step()
            step += 1
            taken = skips.count(stats, step)
            stage.after_step(step, taken)
            if taken:
                sums += stats
                n_sum += 1
            pbar.update(1)
            if first_step is not None:  # the full preset on a CPU takes days: say so before it starts in earnest
                too_slow(args, rt, time.perf_counter() - first_step, max_steps - step)
                first_step = None

            # once in a while: log the stats, the same on every rank; all ranks agree whether to stop
            at_log = (step % args.log_every == 0 or step % args.save_every == 0 or step == max_steps
                      or lr_factor.finished(step))
            stopping = any_rank(time.monotonic() > deadline or bool(stop.signal), rt) if at_log or rt.world == 1 else False
            if at_log and args.cooldown > 0 and deadline < math.inf:  # where --max-minutes will end the run
                lr_factor.end_by(end_by_deadline(step, start, deadline, rt))
            if at_log or stopping:  # the loss and the weights are checked before any save
                values = dict(zip(stage.stats, mean_over_ranks(sums / max(n_sum, 1), rt).tolist()))
                ensure_finite(values["loss"], step, ckpt_path, stage.model)
                values.update(stage.derived(values))
                lr, per_s = scheduler.get_last_lr()[0], n_sum * per_step / (time.perf_counter() - t0)
                if rt.main:
                    log.append({"step": step, **{k: f"{v:.5g}" for k, v in values.items()}, "lr": f"{lr:.2e}",
                                "img_per_s": f"{per_s:.1f}"})
                pbar.set_postfix(loss=f"{values['loss']:.4f}")
                for name, value in {**values, "lr": lr, f"{stage.unit}_per_s": per_s}.items() if board else ():
                    board.add_scalar(f"{stage.name}/{name}", value, step)
                rt.log(f"step {step:>7d} | " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())
                       + f" | lr {lr:.2e} | {per_s:7.1f} {stage.unit}/s{skips.note()}")
                sums.zero_()
                n_sum, t0 = 0, time.perf_counter()

            # once in a while: a grid (rank 0)
            if rt.main and step % args.sample_every == 0:
                draw_grid(stage, run / f"{stage.grid}_step{step:07d}.png", board, step)

            # once in a while: a checkpoint, or stop (the last checkpoint is written after the loop)
            if stopping:
                rt.log(f"{stop.signal} received at step {step}" if stop.signal else
                       f"--max-minutes {args.max_minutes} reached at step {step}; continue with --resume")
                break
            if step % args.save_every == 0 and step < max_steps and not lr_factor.finished(step):
                save(step)
    pbar.close()
    if lr_factor.finished(step) and step < max_steps:  # a resumed run may find it so before its first step
        rt.log(f"the learning rate reached zero at step {lr_factor.end} (--cooldown, where --max-minutes ran out): the "
               f"run is finished; a longer --max-steps plans a new cooldown to train it further")

    # the end: checkpoint, grid and loss curve
    save(step)
    if rt.main:
        draw_grid(stage, run / f"{stage.grid}_{stage.name}.png", board, step)
        if board:
            board.close()
        log.plot(run / f"loss_{stage.name}.png", stage.plot, f"{stage.name} training")
        print(f"saved {ckpt_path} (step {step}); grids {run / stage.grid}_*.png")
    stop.raise_if_stopped(ckpt_path, step)


def draw_grid(stage: Stage, path: Path, board, step: int):
    """The stage's grid as a PNG, and in TensorBoard with --tensorboard."""
    images, per_row = stage.draw()
    grid = make_grid(images.clamp(-1, 1), nrow=per_row, normalize=True, value_range=(-1, 1))
    save_image(grid, path)
    if board:
        board.add_image(f"{stage.name}/{stage.grid}", grid, step)


def tensorboard(run: Path):
    """--tensorboard: a SummaryWriter into RUN/tensorboard (an optional package: a one-line error without it)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(str(run / "tensorboard"))


def too_slow(args, rt: Runtime, seconds: float, steps_left: int):
    """The full preset on a CPU: stop with the estimate from the timed first step, unless --slow-cpu-ok."""
    hours = seconds * steps_left / 3600
    if rt.device.type == "cpu" and args.preset == "full" and hours > 1 and not args.slow_cpu_ok:
        raise BadInputError(f"the full preset on this CPU would take about {hours:.0f} hours ({steps_left} more steps at "
                            f"{seconds:.1f} s, timed on the first; nothing was saved): use --preset tiny, a GPU, or "
                            f"--slow-cpu-ok to train it here anyway")


def start_stage(args, rt: Runtime, name: str, header: str):
    """The run folder's config.json gets this stage's flags; the header line says what is trained where."""
    if rt.main:
        Path(args.run).mkdir(parents=True, exist_ok=True)
        write_config(Path(args.run), f"train-{name}", args)
    rt.log(header)


# ----------------------------------------------------------------------------- stage 1: VQ-VAE

def vqvae_config(args) -> VQVAEConfig:
    return VQVAEConfig(in_channels=args.channels, image_size=args.image_size, channels=args.vq_channels,
                       channel_mult=tuple(args.vq_mult), num_res_blocks=args.vq_res_blocks,
                       codebook_size=args.codebook_size, min_group_width=args.vq_min_group_width,
                       regularisation=args.regularisation, kl_weight=args.kl_weight)


def train_vqvae(args):
    """Stage 1: VQ-VAE with an MSE (or L1) reconstruction loss + codebook + 0.25 x commitment loss (or, with
    `--regularisation kl`, LDM's KL term in their place), optionally
    measured on the clamped output (`as_shown`), + Laplacian L1, the focal frequency loss, a perceptual loss and an
    adversarial patch loss (losses/: VQGAN's and the brain-MRI anchors' recipes for detail)."""
    # setup
    data, cfg = args.data_config, vqvae_config(args)
    resume = checkpoint_to_resume(Path(args.run) / "vqvae.pt", "vqvae", args.resume, asdict(cfg), VQVAEConfig)
    torch.manual_seed(args.seed)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)

    files_key = data_files_key(data)  # saved: a resumed run, stage 2 and `evaluate` check they read these files
    dataset, workers, fixed, max_steps = stage1_images(args, rt)

    # model and optimizer (the model in its memory layout before the optimizer state is loaded)
    model = place_model(VQVAE(cfg), rt)
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = restore_training(resume, model, optimizer, rt, args.lr)
    reconstruction = ReconstructionLoss(args, rt, resume, max_steps)
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own random stream after
    train_model = wrap_model(model, rt, args.compile, str(Path(args.run) / "compile_cache"))
    batches = index_batches(len(dataset), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum)
    stream = iter(uint8_loader(dataset, batches, workers, pin_memory=rt.device.type == "cuda"))

    def loss(batch):
        x = to_unit(batch, rt.device, rt.channels_last)
        with rt.autocast:
            recon, vq_loss, stats = train_model(x)
        rec, recon_loss, adversarial = reconstruction(recon, x, model.last_layer)
        total = rec + vq_loss + adversarial
        logged = [stats[name] for name in model.stat_names]
        return total, torch.stack([total, recon_loss, vq_loss, adversarial.detach(), *logged])

    start_stage(args, rt, "vqvae", f"VQ-VAE {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, latent "
                f"{cfg.latent_shape}, {len(dataset)} images from {data.folder()}, steps {step} -> {max_steps} of "
                f"{args.batch_size * args.grad_accum * rt.world} images ({rt.world} process(es)) on {rt.device}, {rt.precision}")
    train_loop(Stage("vqvae", model, train_model, optimizer, stream, loss,
                     ("loss", "recon", cfg.regularisation, "adversarial", *model.stat_names),
                     lambda: reconstruction_grid(model, model, fixed, rt), "recon",
                     payload=lambda: {"kind": "vqvae", "config": asdict(cfg), "data": data.saved()["root"],
                                      "data_config": data.saved(), "data_files": files_key,
                                      **reconstruction.state()},
                     after_step=reconstruction.after_step, plot=("loss", "recon", cfg.regularisation), derived=psnr),
               args, rt, step, max_steps, resume)


def stage1_images(args, rt: Runtime) -> tuple:
    """Stage 1's training images (held-out subjects removed: every rank decodes them into memory, or rank 0 alone
    into a memory-mapped cache on disk), the loader threads, 8 fixed images of several subjects for the grids, and
    the run's length in steps."""
    rt.log(subject_summary(args.data_config))
    workers = args.workers or cpus_per_process()
    dataset = training_data(args.data_config, args.cache_gb, workers, Path(args.run),
                            build_guard=lambda: main_rank_first(rt))
    spread = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).long().tolist()  # several subjects, not one
    fixed = torch.stack([dataset[i][0] for i in spread]).to(rt.device)
    return dataset, workers, fixed, total_steps(args, len(dataset), rt.world)


def reconstruction_grid(vqvae: VQVAE, trained: nn.Module, fixed: torch.Tensor, rt: Runtime) -> tuple:
    """A stage-1 grid: the fixed images above, their reconstructions below; `trained`, the part that learns, in
    eval mode for the pass."""
    trained.eval()
    with torch.no_grad(), rt.autocast:
        recon = vqvae(fixed)[0].float()
    trained.train()
    return torch.cat([fixed, recon]), len(fixed)


def psnr(values: dict) -> dict:
    """The logged PSNR of the logged mean MSE `recon` (images in [-1, 1]: peak-to-peak 2)."""
    return {"psnr": 10 * math.log10(4.0 / max(values.get("recon", 1.0), 1e-12))}


# ----------------------------------------------------------------------------- stage 1, optional: the decoder alone

def train_decoder(args):
    """The VQ-VAE's decoder fine-tuned alone on stage 1's images, its encoder and codebook frozen, so that the latents,
    and a UNet trained on them, stay as they were (as Stable Diffusion's ft-EMA and ft-MSE decoders were made). By
    default with the brain-MRI anchors' recipe (`tiny`'s PatchGAN with 16x16 patches), whose perceptual network and
    discriminator make a step of the whole first stage too dear on a CPU (bench/README.md). Writes RUN/decoder.pt,
    tied to RUN/vqvae.pt by its fingerprint; sampling, `evaluate` and stage 2's grids decode with it from then on
    (predict.load_vqvae)."""
    # setup
    run = Path(args.run)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)
    vqvae, vq_ckpt = load_vqvae(run, rt.device, finetuned=False)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    resume = checkpoint_to_resume(run / "decoder.pt", "decoder", args.resume, asdict(vqvae.cfg), VQVAEConfig)
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{run / 'decoder.pt'} was fine-tuned from another VQ-VAE than {run / 'vqvae.pt'}; move it "
                            f"away and run train-decoder again without --resume")
    torch.manual_seed(args.seed)
    dataset, workers, fixed, max_steps = stage1_images(args, rt)

    # the decoder learns; the encoder and the codebook stay frozen, in eval mode (load_vqvae)
    vqvae = place_model(vqvae, rt)
    decoder = vqvae.decoder.requires_grad_(True)
    optimizer = adamw(decoder.parameters(), args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = restore_training(resume, decoder, optimizer, rt, args.lr)
    reconstruction = ReconstructionLoss(args, rt, resume, max_steps)
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own random stream after
    train_model = wrap_model(decoder, rt, args.compile, str(run / "compile_cache"))
    batches = index_batches(len(dataset), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum)
    stream = iter(uint8_loader(dataset, batches, workers, pin_memory=rt.device.type == "cuda"))

    def loss(batch):
        x = to_unit(batch, rt.device, rt.channels_last)
        with torch.no_grad(), rt.autocast:
            z_q = vqvae.quantize(vqvae.encode(x))[0]
        with rt.autocast:
            recon = train_model(z_q)
        rec, recon_loss, adversarial = reconstruction(recon, x, vqvae.last_layer)
        total = rec + adversarial
        return total, torch.stack([total, recon_loss, adversarial.detach()])

    start_stage(args, rt, "decoder", f"the decoder of {run / 'vqvae.pt'} (step {vq_ckpt['step']}) alone, "
                f"{sum(p.numel() for p in decoder.parameters()) / 1e6:.2f}M params, {len(dataset)} images, steps "
                f"{step} -> {max_steps} of {args.batch_size * args.grad_accum * rt.world} images on {rt.device}, {rt.precision}")
    train_loop(Stage("decoder", decoder, train_model, optimizer, stream, loss, ("loss", "recon", "adversarial"),
                     lambda: reconstruction_grid(vqvae, decoder, fixed, rt), "decoded",
                     payload=lambda: {"kind": "decoder", "config": asdict(vqvae.cfg), "vqvae_fingerprint": vq_fingerprint,
                                      **reconstruction.state()},
                     after_step=reconstruction.after_step, plot=("loss", "recon"), derived=psnr),
               args, rt, step, max_steps, resume)


# ----------------------------------------------------------------------------- stage 2: UNet

@torch.no_grad()
def encode_dataset(vqvae: VQVAE, dataset, batch_size: int, rt: Runtime, workers: int) -> torch.Tensor:
    """Pre-quantisation latents z of every image, in dataset order: (N, 4, h, w) float32 on the CPU."""
    chunks = torch.arange(len(dataset)).split(batch_size)
    out = []
    for x in progress(uint8_loader(dataset, chunks, workers), desc="encoding latents", dynamic_ncols=True):
        with rt.autocast:
            out.append(vqvae.encode(to_unit(x, rt.device)).float().cpu())
    return torch.cat(out)


def latent_cache(args, samples: list, vqvae: VQVAE, vq_fingerprint: str, rt: Runtime
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """RUN/latents.pt: the training images encoded once (by rank 0; the other ranks wait, then read it), with
    their class labels and files; reused while the VQ-VAE, the data config and the image files (names, sizes,
    modification times) are unchanged, which is checked without decoding any image."""
    path = Path(args.run) / "latents.pt"
    data = args.data_config
    with main_rank_first(rt):
        if not rt.main:
            cache = load_checkpoint(path, "latents")
            return cache["z"].float(), cache["y"], cache["paths"]
        key = {"vqvae": vq_fingerprint, **data.saved(), "count": len(samples), "files": files_fingerprint(samples)}
        if path.exists():
            cache = load_checkpoint(path, "latents")
            if cache["key"] == key and "paths" in cache:
                print(f"latent cache {path}: {len(cache['z'])} latents reused")
                return cache["z"].float(), cache["y"], cache["paths"]
        workers = args.workers or cpus_per_process()
        dataset = training_data(data, args.cache_gb, workers, Path(args.run))
        z = encode_dataset(vqvae, dataset, 64, rt, workers)
        y, paths = dataset_labels(dataset), dataset_paths(dataset)  # of the images decoded: --skip-bad-images may
        atomic_save({"kind": "latents", "key": key, "z": z, "y": y, "paths": paths}, path)  # have left some out
        print(f"latent cache {path}: {len(z)} latents written")
        return z, y, paths


def unet_config(args, latent_shape, conditions: tuple = ()) -> UNetConfig:
    return UNetConfig(in_channels=latent_shape[0], latent_size=latent_shape[1], channels=args.unet_channels,
                      channel_mult=tuple(args.unet_mult), num_res_blocks=args.unet_res_blocks, conditions=conditions)


def training_conditions(args, resume: dict | None, classes: list[str], paths: list[str], labels: torch.Tensor):
    """(conditions, y (N, K) of the N training latents, NaN where not given, the participants table or None, a
    report line). Fresh: --condition's names (`class` with --conditional), defined by the training subjects; resumed:
    the run's own, with its own table, which must be unchanged."""
    data = args.data_config
    names = args.condition or ([CLASS] if args.conditional else [])
    subjects = subjects_of(paths, data.layout.subject)
    saved = resume.get("labels") if resume else None
    if resume:
        conditions = saved_conditions(resume)
        table = read_table(Path(saved["file"]), saved["subject_column"]) if saved else None
        if table and table.sha1 != saved["sha1"]:
            raise BadInputError(f"the participants table {table.file} changed since this run started; a resumed run "
                                f"keeps the values it trained on: restore it, or train a new --run")
    else:
        path = find_table(data.folder(), args.labels) if [n for n in names if n != CLASS] or args.labels else None
        table = read_table(path, args.subject_column) if path else None
        conditions = build_conditions(names, table, subjects, classes)
    y, report = condition_matrix(conditions, table, subjects, labels)
    return conditions, y, table, report


def train_unet(args):
    """Stage 2: v- or eps-prediction UNet on scale * z, z the frozen VQ-VAE's pre-quantisation latents."""
    # setup: the frozen VQ-VAE of this run, the UNet's config (driver.py checked stage 1 and the flags)
    run = Path(args.run)
    ckpt_path = run / "unet.pt"
    torch.manual_seed(args.seed)
    rt = setup_runtime(args.device, args.precision, args.deterministic, args.channels_last)
    vqvae, vq_ckpt = load_vqvae(run, rt.device)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    latent_shape = vqvae.cfg.latent_shape
    samples, classes = training_files(args.data_config, expand_volumes=False)  # the cache key's files: no volume is read
    diffusion = GaussianDiffusion(args.diffusion_steps, args.schedule, args.loss, args.prediction, args.min_snr_gamma,
                                  args.timestep_sampling)
    chosen = {k: v for k, v in asdict(unet_config(args, latent_shape)).items()  # not flags: a resumed run keeps its own
              if k not in ("scale_shift_norm", "min_group_width", "conditions")}
    resume = checkpoint_to_resume(ckpt_path, "unet", args.resume, {**chosen, **diffusion.config()},
                                  diffusion_defaults=GaussianDiffusion().config())
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{ckpt_path} was trained on another VQ-VAE than {run / 'vqvae.pt'}; "
                            f"train stage 2 afresh in a new --run")

    # data: the latent cache, scaled to unit variance (the scale is measured, saved and reused), and the conditions
    z, labels, paths = latent_cache(args, samples, vqvae, vq_fingerprint, rt)
    conditions, y, table, report = training_conditions(args, resume, classes, paths, labels)
    if conditions:
        rt.log(report)
    y = y.to(rt.device)
    cfg = model_config(UNetConfig, resume, ckpt_path) if resume else unet_config(args, latent_shape,
                                                                                 tuple(c.size for c in conditions))
    latent_scale = resume["latent_scale"] if resume else 1.0 / z.std().item()
    latents = (z * latent_scale).to(rt.device)
    latent_absmax = resume["latent_absmax"] if resume else latents.abs().max().item()  # range for clipping x0
    max_steps = total_steps(args, len(latents), rt.world)

    # model, EMA, optimizer (the model in its memory layout before the EMA copy and the optimizer state); seeded
    # here, so that the initial weights do not depend on whether the latent cache was written (a DataLoader draws its seed)
    torch.manual_seed(args.seed)
    model = place_model(UNet(cfg), rt)
    diffusion = diffusion.to(rt.device)
    ema = EMA(model, args.ema_decay)  # the sampling weights, in eval mode
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0)
    step = restore_training(resume, model, optimizer, rt, args.lr)
    if resume:
        ema.module.load_state_dict(resume["ema"])
        ema.updates = resume["ema_updates"]
    posthoc = PowerFunctionEMA(model) if args.posthoc_ema and rt.main else None  # EMA lengths chosen after training
    if posthoc and resume:
        posthoc.load_state_dict(resume["posthoc_ema"])
        drop_snapshots_after(run, step)  # drawn again, the same, from this checkpoint
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own noise and steps t after
    train_model = wrap_model(model, rt, args.compile, str(Path(args.run) / "compile_cache"))
    batches = index_batches(len(latents), args.batch_size, args.seed, rt.rank, rt.world, start=step * args.grad_accum,
                            device=rt.device)

    def loss(idx):
        x0 = latents[idx]
        if rt.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        given = drop_conditions(y[idx], args.label_dropout) if conditions else None
        with rt.autocast:
            value = diffusion.loss(train_model, x0, y=given)
        return value, value.detach()[None]

    def draw():  # 8 samples of the EMA weights, DDIM 50 steps, from fixed noise
        noise = torch.randn(8, *latent_shape, generator=torch.Generator().manual_seed(0)).to(rt.device)
        with torch.no_grad(), rt.autocast:
            for _, _, x0 in diffusion.sample_steps(ema.module, noise, sampler="ddim", steps=50):
                pass
            return vqvae.decode(x0 / latent_scale).float(), 8

    def after_step(step, taken):
        if taken:
            ema.update(model)
        if posthoc:
            posthoc.update(model, step)
            if step % args.posthoc_ema == 0:
                posthoc.snapshot(run)

    def payload():
        return {"kind": "unet", "ema": ema.module.state_dict(), "ema_updates": ema.updates,
                "posthoc_ema": posthoc.state_dict() if posthoc else None,
                "config": asdict(cfg), "diffusion": diffusion.config(), "latent_scale": latent_scale,
                "latent_absmax": latent_absmax, "latent_shape": list(latent_shape), "vqvae_fingerprint": vq_fingerprint,
                "classes": classes, "conditions": to_saved(conditions), "labels": table.record() if table else None}

    conditioning = (f"conditional on {', '.join(c.name for c in conditions)}, each dropped with p={args.label_dropout}"
                    if conditions else "unconditional")
    start_stage(args, rt, "unet", f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params ({conditioning}) "
                f"on latents {tuple(latents.shape[1:])}, {len(latents)} latents, scale {latent_scale:.4f}, steps {step} -> "
                f"{max_steps} of {args.batch_size * args.grad_accum * rt.world} latents ({rt.world} process(es)) on {rt.device}, {rt.precision}")
    train_loop(Stage("unet", model, train_model, optimizer, batches, loss, ("loss",), draw, "samples", payload,
                     on_save=lambda step: posthoc.snapshot(run) if posthoc else None, after_step=after_step,
                     unit="latents"),
               args, rt, step, max_steps, resume)
