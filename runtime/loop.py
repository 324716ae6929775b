"""The training loop every stage shares (`train.py`'s `train_vqvae`, `train_decoder` and `train_unet`): a stage hands
`train_loop` a `Stage` (its model, optimizer, batches and loss, its grid, its checkpoint entries), and the loop takes
the optimizer steps (`optimizer_step`: gradient accumulation, fp16 scaling, clipping, skipping non-finite steps) at
the learning rate's schedule (`LearningRateFactor`: warm-up, then a cooldown that --max-minutes may bring sooner),
logs the stats averaged over ranks to a CSV, the console and TensorBoard, draws grids, checks for NaN, writes
checkpoints and stops at the end, at --max-minutes or at SIGINT/SIGTERM, all ranks at the same step.

Run its tests with `python -m pytest tests/test_train.py`.
"""
from __future__ import annotations

import contextlib
import csv
import io
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn as nn
from torchvision.utils import make_grid

from export.figures import save_figure, save_png
from runtime.checkpoint import atomic_save, atomic_write, load_weights, plain_args, write_config
from runtime.errors import BadInputError
from runtime.optimizer import load_optimizer
from runtime.process import Runtime, any_rank, mean_over_ranks, progress, restore_rng, rng_states
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


def restore_training(resume: dict | None, model: nn.Module, optimizer, rt: Runtime, lr: float, path: Path) -> int:
    """Load a checkpoint's (`path`'s) weights, optimizer and fp16 GradScaler state; returns its step (0 without one).
    `lr` (--lr, or the resumed run's own when not given) is the base learning rate from here on."""
    if resume is None:
        return 0
    load_weights(model, resume["model"], path)
    load_weights(optimizer, resume["optimizer"], path, "optimizer", load=load_optimizer)
    for group in optimizer.param_groups:  # the warm-up schedule scales initial_lr
        group["initial_lr"] = lr
    if rt.scaler.is_enabled() and resume.get("scaler"):
        rt.scaler.load_state_dict(resume["scaler"])
    return resume["step"]


def total_steps(args, items: int, world: int) -> int:
    """--max-steps, else --epochs of this rank's shard of `items` in optimizer steps (of --grad-accum batches each,
    counted over all the epochs: 11 batches an epoch at --grad-accum 4 make 13 steps in 5 epochs, not 10)."""
    if args.max_steps is not None:
        return args.max_steps
    return max(1, args.epochs * max(1, items // world // args.batch_size) // args.grad_accum)


# ----------------------------------------------------------------------------- records and stops

RENAMED = {"latents_per_s": "img_per_s"}   # the log's columns of before 2026-12-08: stage 2's speed counts latents


class MetricLog:
    """Appends one CSV row per log interval and redraws the loss curve from the whole CSV. It holds the run's own
    history: resumed at step `resumed_at`, the rows of later steps (logged by an attempt that stopped before it
    saved them) go; a new run moves an earlier run's log aside (`*.replaced.csv`) rather than append to it."""

    def __init__(self, csv_path: Path, fields: list[str], resumed_at: int | None = None):
        self.csv_path, self.fields = csv_path, fields
        rows = []
        if csv_path.exists() and resumed_at is None:
            csv_path.replace(csv_path.with_suffix(".replaced.csv"))
        elif csv_path.exists():
            with open(csv_path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resumed_at]
        text = io.StringIO()
        writer = csv.writer(text)
        writer.writerow(fields)
        # a column the run's log lacked stays empty; one renamed since is carried over
        writer.writerows([r.get(k, r.get(RENAMED[k], "") if k in RENAMED else "") for k in fields] for r in rows)
        atomic_write(csv_path, lambda f: f.write(text.getvalue().encode()))

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
            ax.plot(steps, [float(r[k] or "nan") for r in rows], label=k)
        ax.set(xlabel="step", ylabel="loss", yscale="log", title=title)
        ax.legend()
        fig.tight_layout()
        save_figure(fig, png)  # written whole: a full disk leaves the previous curve
        plt.close(fig)


def ensure_finite(loss: float, step: int, ckpt_path: Path, stage: Stage):
    """Stop before a NaN/inf loss or weight can reach a checkpoint; the last one written stays as it was."""
    if not math.isfinite(loss) or not all(p.isfinite().all() for p in stage.model.parameters()):
        what = f"the loss became {loss}" if not math.isfinite(loss) else "a weight became NaN/inf"
        raise BadInputError(f"{what} before step {step}; stopped without saving (the last good checkpoint, if any, "
                            f"is {ckpt_path}); {what_to_try(stage, skip=True)}")


def what_to_try(stage: Stage, skip: bool = False) -> str:
    """The hint after a NaN/inf: a lower --lr (and `skip`: --skip-nonfinite). A stage that trains a discriminator
    beside its model (stage 1's adversarial loss) names its --adversarial-lr too, first where the discriminator is
    NaN/inf itself: one blown up by its own rate makes the loss or its gradient NaN at every step after, whatever --lr,
    and skipping those steps cannot mend it (it learns nothing on a skipped step). The same on every rank (DDP
    replicates the discriminator); asked only once the run stops."""
    discriminator = stage.payload().get("discriminator")
    if discriminator is not None and first_nonfinite(discriminator):
        return "try a lower --adversarial-lr or --lr (the discriminator's weights are NaN/inf too)"
    rate = "--lr" if discriminator is None else "--lr or --adversarial-lr"
    return f"try a lower {rate}" + (", or --skip-nonfinite to skip such steps" if skip else "")


LEARNED = ("model", "optimizer", "ema", "posthoc_ema", "discriminator", "disc_optimizer")  # what a checkpoint learned


def ensure_finite_state(state: dict, step: int, ckpt_path: Path, rt: Runtime):
    """Stop before a checkpoint holding a NaN/inf anywhere (a discriminator, an EMA, an optimizer's moments: the model's
    loss and weights are checked at every log step) is written; the last one written stays as it was. Every rank
    stops (the post-hoc EMA is rank 0's alone)."""
    where = first_nonfinite(state)
    if any_rank(where is not None, rt):
        rate = "--adversarial-lr" if where and where.startswith(("discriminator", "disc_")) else "--lr"
        raise BadInputError(f"{where or 'what another process holds'} became NaN/inf by step {step}; stopped without "
                            f"saving (the last good checkpoint, if any, is {ckpt_path}); try a lower {rate}")


def first_nonfinite(value, name: str = "") -> str | None:
    """The name (`discriminator/conv.weight`) of the first floating-point tensor in nested dicts and lists that holds
    a NaN or an infinity, or None."""
    if isinstance(value, torch.Tensor):
        return name if value.is_floating_point() and not value.isfinite().all() else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else ()
    return next((found for key, item in items if (found := first_nonfinite(item, f"{name}/{key}".lstrip("/")))), None)


class NonfiniteSkips:
    """--skip-nonfinite's count of skipped steps; `limit` of them in a row means the run has diverged: stop. No
    checkpoint is written after `before_save` or more in a row: the weights kept from before them give NaN/inf on
    every batch since (a rate that blew them up without making them NaN); a checkpoint in the run is left out, the
    last one (the run's end) stops it."""

    def __init__(self, ckpt_path: Path, limit: int = 20, before_save: int = 5,
                 hint: Callable[[], str] = lambda: "try a lower --lr"):  # what to try, when the run diverged
        self.ckpt_path, self.limit, self.before_save, self.hint = ckpt_path, limit, before_save, hint
        self.total = self.in_a_row = 0

    def savable(self, step: int, last: bool, rt: Runtime) -> bool:
        if self.in_a_row < self.before_save:
            return True
        skipped = f"the {self.in_a_row} steps up to step {step} had a NaN/inf gradient"
        if last:
            raise BadInputError(f"{skipped}: the run diverged; stopped without saving (the last good checkpoint, if "
                                f"any, is {self.ckpt_path}); {self.hint()}")
        rt.log(f"{skipped}: no checkpoint at step {step} (the run goes on; {self.limit} in a row stop it)")
        return False

    def count(self, stats, step: int) -> bool:
        """True if the step was taken (its stats count), False if it was skipped."""
        if stats is not None:
            self.in_a_row = 0
            return True
        self.total += 1
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            raise BadInputError(f"{self.limit} steps in a row up to step {step} had a NaN/inf gradient: the run "
                                f"diverged; stopped without saving (the last good checkpoint, if any, is "
                                f"{self.ckpt_path}); {self.hint()}")
        return False

    def note(self) -> str:
        return f" | {self.total} non-finite steps skipped" if self.total else ""


# ----------------------------------------------------------------------------- the loop both stages share

@dataclass
class Stage:
    """What a training stage hands the shared loop: the parts in which the stages differ."""
    name: str                               # "vqvae", "decoder" or "unet": RUN/<name>.pt, RUN/log_<name>.csv
    model: nn.Module                        # the unwrapped model: saved, checked for NaN
    train_model: nn.Module                  # the same under DDP / torch.compile: runs the batches
    optimizer: torch.optim.Optimizer
    batches: Iterator                       # this rank's micro-batches, endlessly
    loss: Callable                          # micro-batch -> (loss, stats tensor, one value per name in `stats`)
    stats: tuple[str, ...]                  # what the log shows; `plot` of them are drawn as curves
    draw: Callable[[], tuple]               # (images in [-1, 1], per row) of what the model makes now (rank 0)
    grid: str                               # grid file prefix: RUN/<grid>_step0000100.png
    payload: Callable[[], dict]             # the stage's own checkpoint entries: kind, config, ...
    on_save: Callable[[int], None] = lambda step: None  # rank 0, before each checkpoint: the post-hoc EMA's snapshot
    after_step: Callable[[int, bool], None] = lambda step, taken: None  # after each step (its number, whether it
                                                                        # was taken, not skipped): the EMA update
    plot: tuple[str, ...] = ("loss",)
    derived: Callable[[dict], dict] = lambda values: {}  # logged values computed from the means (PSNR)
    unit: str = "img"


def trains_further(args, step: int, max_steps: int, resume: dict | None) -> bool:
    """Whether a run at `step` would take a step: before its length, and before its cooldown's end (train_loop's
    own test, asked before anything is built)."""
    lr_factor = LearningRateFactor(args.warmup, args.cooldown, max_steps, resume.get("lr_schedule") if resume else None)
    return step < max_steps and not lr_factor.finished(step)


def train_loop(stage: Stage, args, rt: Runtime, step: int, max_steps: int, resume: dict | None):
    """Train `stage` from `step` to `max_steps`, or with a cooldown until the learning rate reaches zero: every step
    one optimizer update; once in a while log the mean stats (all ranks agree on them and on stopping), draw a
    grid (rank 0), save a checkpoint or stop. Ends with a checkpoint, the grid and the loss curve; raises
    Interrupted after a SIGINT/SIGTERM."""
    run = Path(args.run)
    ckpt_path = run / f"{stage.name}.pt"
    lr_factor = LearningRateFactor(args.warmup, args.cooldown, max_steps, resume.get("lr_schedule") if resume else None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(stage.optimizer, lr_factor, last_epoch=step - 1)
    if args.warmup >= max_steps and step < max_steps:
        rt.log(f"warning: --warmup {args.warmup} is as long as the run ({max_steps} steps) or longer: the learning "
               f"rate never reaches --lr {args.lr:g}")
    per_step = args.batch_size * args.grad_accum * rt.world
    if rt.main:
        log = MetricLog(run / f"log_{stage.name}.csv", ["step", *stage.stats, *stage.derived({}), "lr",
                                                         f"{stage.unit}_per_s"], resumed_at=step if resume else None)
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    start = (step, time.monotonic())

    def save(step: int, last: bool = False):  # every rank checks the state and gathers the random states; rank 0 writes
        if not skips.savable(step, last, rt):
            return
        state = {**stage.payload(), "model": stage.model.state_dict(), "optimizer": stage.optimizer.state_dict()}
        ensure_finite_state({k: state[k] for k in LEARNED if state.get(k) is not None}, step, ckpt_path, rt)
        rng = rng_states(rt)
        if rt.main:  # what goes with the checkpoint first: a kill between the two leaves the one before, whole
            stage.on_save(step)
            atomic_save({**state, "scaler": rt.scaler.state_dict(), "rng": rng, "step": step, "args": plain_args(args),
                         "lr_schedule": lr_factor.state()},
                        ckpt_path, keep_previous=True)

    sums, n_sum, t0 = torch.zeros(len(stage.stats), device=rt.device), 0, time.perf_counter()
    pbar = progress(total=max_steps, initial=step, desc=stage.name, dynamic_ncols=True, disable=not rt.main, quiet=True)
    trains = step < max_steps and not lr_factor.finished(step)
    board = tensorboard(run, stage.name, step if resume else None) if args.tensorboard and rt.main and trains else None
    first_step = time.perf_counter()
    if resume:
        restore_rng(resume.get("rng"), rt)
    skips, stop = NonfiniteSkips(ckpt_path, hint=lambda: what_to_try(stage)), StopRequests()
    stage.model.train()
    with stop:
        while step < max_steps and not lr_factor.finished(step):
            # one optimizer step; no host-device sync unless --skip-nonfinite
            lr = scheduler.get_last_lr()[0]  # the rate this step takes (the log's)
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
                if n_sum == 0:  # every step since the last log skipped (--skip-nonfinite, the same on every rank)
                    values = dict.fromkeys(stage.stats, math.nan)
                ensure_finite(values["loss"] if n_sum else 0.0, step, ckpt_path, stage)
                values.update(stage.derived(values))
                per_s = n_sum * per_step / (time.perf_counter() - t0)
                if rt.main:
                    log.append({"step": step, **{k: f"{v:.5g}" for k, v in values.items()}, "lr": f"{lr:.2e}",
                                f"{stage.unit}_per_s": f"{per_s:.1f}"})
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
                finished = step >= max_steps or lr_factor.finished(step)  # where the run ended anyway
                rt.log(f"{stop.signal} received at step {step}" if stop.signal else
                       f"--max-minutes {args.max_minutes} reached at step {step}"
                       + (", the run's last" if finished else "; continue with --resume"))
                break
            if step % args.save_every == 0 and step < max_steps and not lr_factor.finished(step):
                save(step)
        pbar.close()
        if lr_factor.finished(step) and step < max_steps:  # a resumed run may find it so before its first step
            rt.log(f"the learning rate reached zero at step {lr_factor.end} (--cooldown, where --max-minutes ran out): "
                   f"the run is finished; a longer --max-steps plans a new cooldown to train it further")

        # the end: checkpoint, grid and loss curve; a resumed run with nothing left to train leaves its checkpoints be
        if resume and step == start[0] and not stop.signal:
            rt.log(f"{ckpt_path} is at step {step}, where this run ends: nothing to train (a longer --max-steps or "
                   f"--epochs trains it further)")
            return
        save(step, last=True)  # still under `stop`: a SIGTERM while it writes lets it finish
    if rt.main:
        draw_grid(stage, run / f"{stage.grid}_{stage.name}.png", board if step % args.sample_every else None, step)
        if board:
            board.close()
        log.plot(run / f"loss_{stage.name}.png", stage.plot, f"{stage.name} training")
        print(f"saved {ckpt_path} (step {step}); grids {run / stage.grid}_*.png")
    stop.raise_if_stopped(ckpt_path, step)


def draw_grid(stage: Stage, path: Path, board, step: int):
    """The stage's grid as a PNG (written whole), and in TensorBoard with --tensorboard."""
    images, per_row = stage.draw()
    grid = make_grid(images.clamp(-1, 1), nrow=per_row, normalize=True, value_range=(-1, 1))
    save_png(grid, path)
    if board:  # a tag of its own: TensorBoard keeps a tag for one kind of data (vqvae/recon is a logged value)
        board.add_image(f"{stage.name}/grid_{stage.grid}", grid, step)


def tensorboard(run: Path, name: str, resumed_at: int | None):
    """--tensorboard: a SummaryWriter into RUN/tensorboard/<stage> (an optional package: a one-line error without it).
    Resumed at a checkpoint's step, it purges what an interrupted attempt logged after that step, as the CSV log drops
    those rows; a new run moves an earlier run's events aside (<stage>.replaced), as the CSV log does."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise BadInputError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    folder = run / "tensorboard" / name
    if resumed_at is None and folder.exists():
        shutil.rmtree(folder.with_suffix(".replaced"), ignore_errors=True)
        folder.rename(folder.with_suffix(".replaced"))
    return SummaryWriter(str(folder), purge_step=None if resumed_at is None else resumed_at + 1)


def too_slow(args, rt: Runtime, seconds: float, steps_left: int):
    """The full preset on a CPU: stop with the estimate from the timed first step, unless --slow-cpu-ok."""
    hours = seconds * steps_left / 3600  # each rank timed its own step: they decide together
    if any_rank(rt.device.type == "cpu" and args.preset == "full" and hours > 1 and not args.slow_cpu_ok, rt):
        raise BadInputError(f"the full preset on this CPU would take about {hours:.1f} hours ({steps_left} more steps "
                            f"at {seconds:.1f} s, timed on the first; no checkpoint was saved): use --preset tiny, a "
                            f"GPU, or --slow-cpu-ok to train it here anyway")


def start_stage(args, rt: Runtime, name: str, header: str):
    """The run folder's config.json gets this stage's flags; the header line says what is trained where."""
    if rt.main:
        Path(args.run).mkdir(parents=True, exist_ok=True)
        write_config(Path(args.run), f"train-{name}", args)
    rt.log(header)
