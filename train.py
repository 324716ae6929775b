"""The two training stages: `train_vqvae(args)` (stage 1) and `train_unet(args)` (stage 2).

Both read and write one run folder (`args.run`); see DESIGN.md for its layout. They are called by
the command line in driver.py, on one device or, under torchrun, on many (DDP):

    python driver.py train-vqvae --run runs/demo     # stage 1: VQ-VAE on images
    python driver.py train-unet  --run runs/demo     # stage 2: UNet on the VQ-VAE's latents
    torchrun --standalone --nproc_per_node 4 driver.py train-vqvae --run runs/adni --data PATH

Under torchrun every process trains on its shard of each epoch (DistributedSampler); rank 0 alone
writes the run folder, builds the image and latent caches (the others wait) and logs the loss
averaged over ranks. One optimizer step = --grad-accum micro-batches of --batch-size on every rank.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
import pickle
import signal
import time
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset
from torchvision.utils import save_image
from tqdm import tqdm

from dataset import BadInputError, SliceFolders, demo_data_dir, load_slices, split_by_subject, uint8_images
from modules import VQVAE, GaussianDiffusion, UNet, UNetConfig, VQVAEConfig, drop_labels, ema_model


# ----------------------------------------------------------------------------- devices, precision and processes (torchrun)

def pick_device(args) -> torch.device:
    """--device, else CUDA if present; under torchrun each process takes the GPU of its LOCAL_RANK."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def setup_device(args) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """The device and the autocast context of --precision (auto: bf16 on CUDA, fp32 on CPU); TF32 on."""
    device = pick_device(args)
    precision = getattr(args, "precision", "auto")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BadInputError("--precision fp16 needs a CUDA device (its GradScaler); use bf16 or fp32 on the CPU")
    if getattr(args, "deterministic", False):  # bit-exact resume; TF32 and cuDNN autotuning off
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if precision == "fp32":
        return device, contextlib.nullcontext()
    return device, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@dataclass
class Runtime:
    """Where this process trains: device and precision, and its place among torchrun's processes."""
    device: torch.device
    autocast: contextlib.AbstractContextManager
    scaler: torch.amp.GradScaler    # active for fp16 only; a pass-through otherwise
    channels_last: bool
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, message: str):
        if self.main:
            tqdm.write(message)


def setup_runtime(args) -> Runtime:
    """Device and precision; under torchrun (WORLD_SIZE > 1) also the process group: NCCL on CUDA, gloo on CPU."""
    device, autocast = setup_device(args)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # rank 0 may spend a while alone building the caches while the others wait at a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    fp16 = getattr(autocast, "fast_dtype", None) == torch.float16
    channels_last = device.type == "cuda" if args.channels_last is None else args.channels_last
    return Runtime(device, autocast, torch.amp.GradScaler("cuda", enabled=fp16), channels_last, rank, world)


@contextlib.contextmanager
def main_rank_first(rt: Runtime):
    """Rank 0 runs the block first (builds a cache); the other ranks run it after, and find the cache."""
    if not rt.main:
        dist.barrier()
    yield
    if rt.main and rt.world > 1:
        dist.barrier()


def mean_over_ranks(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        dist.all_reduce(t)
        t = t / rt.world
    return t


def any_rank(flag: bool, rt: Runtime) -> bool:
    """True on every rank if it is True on one (so that all ranks stop at the same step)."""
    if rt.world == 1:
        return flag
    t = torch.tensor(float(flag), device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def wrap_model(model: torch.nn.Module, rt: Runtime, compile_model: bool) -> torch.nn.Module:
    """channels_last, DDP under torchrun, torch.compile if asked; checkpoints keep saving the unwrapped model."""
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    if rt.world > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if compile_model:
        model = torch.compile(model)
    return model


def adamw(params, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where this torch has one for the device:
    CUDA, and the CPU since torch 2.4 (3.4x faster there than the default for-each kernel, bench/README.md)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for these parameters' device in this torch
        return torch.optim.AdamW(params, lr=lr, **kwargs)


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


# ----------------------------------------------------------------------------- checkpoints, run folder, records

def previous(path: Path) -> Path:
    """Where atomic_save(keep_previous=True) keeps the checkpoint it replaced: RUN/unet.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj, path: Path, keep_previous: bool = False):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: at every moment
    `path` is the old file or the new one, whole. keep_previous: the old one stays as previous(path)
    (a hard link, no copy). A failed write (disk full) leaves `path` as it was and says so."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            link = path.with_name(f".{path.name}.prev{os.getpid()}")
            link.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # a file system without hard links: keep no previous one
                os.link(path, link)
                os.replace(link, previous(path))
        os.replace(tmp, path)
    except OSError as e:
        raise BadInputError(f"could not write {path} ({e.strerror or e}); "
                            f"{'the previous file is unchanged' if path.exists() else 'nothing was written'}") from None
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, kind: str) -> dict:
    """Load a checkpoint safely (weights_only=True: tensors and plain values only, never code) and check
    it is a `kind` checkpoint. A damaged file is named, with the previous checkpoint if that one loads."""
    if not path.exists():
        raise BadInputError(f"no {kind} checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # what weights_only refuses: Python objects, which can run code
        raise BadInputError(f"refused to load {path}: it holds Python objects, not only tensors and plain values "
                            f"(weights_only=True; such a file can run code when unpickled): {str(e).splitlines()[-1]}") from None
    except Exception as e:  # truncated or not a torch file at all
        raise BadInputError(f"cannot load checkpoint {path}, it is damaged or not a checkpoint "
                            f"({str(e).splitlines()[0]}); {_last_good(path, kind)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BadInputError(f"{path} is not a {kind} checkpoint (it holds {found!r})")
    return ckpt


def _last_good(path: Path, kind: str) -> str:
    """A sentence on the checkpoint before `path`, for the error about a damaged one."""
    prev = previous(path)
    if prev == path or not prev.exists():
        return "no earlier checkpoint is kept beside it"
    try:
        step = load_checkpoint(prev, kind).get("step")
    except BadInputError:
        return f"the previous one, {prev}, does not load either"
    return f"the last good one is {prev} (step {step}): move it to {path.name} to resume from there"


def model_config(cls, ckpt: dict, path: Path):
    """The model config saved in a checkpoint (cls.from_saved if it has one), or a clear error when the
    checkpoint comes from a version of this project with other fields."""
    try:
        return cls.from_saved(ckpt["config"]) if hasattr(cls, "from_saved") else cls(**ckpt["config"])
    except TypeError as e:
        raise BadInputError(f"{path} was written by another version of this project ({e}); "
                            f"train it again with this version") from None


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
    if os.environ.get("RANK", "0") == "0":  # a write cut short by kill -9 leaves its temporary file
        for partial in run.glob(f".{ckpt_path.name}.*"):
            print(f"removed {partial.name}, a checkpoint write that did not finish ({ckpt_path.name} is whole)")
            partial.unlink(missing_ok=True)
    ckpt = load_checkpoint(ckpt_path, kind)
    saved = {**ckpt["config"], **ckpt.get("diffusion", {})}  # a UNet's diffusion settings are part of its config
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
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


def ensure_finite(loss: float, step: int, ckpt_path: Path, model: torch.nn.Module | None = None):
    """Stop before a NaN/inf loss or weight can reach a checkpoint; the last one written stays as it was."""
    if not math.isfinite(loss) or (model is not None and not all(p.isfinite().all() for p in model.parameters())):
        what = f"the loss became {loss}" if not math.isfinite(loss) else "a weight became NaN/inf"
        raise BadInputError(f"{what} before step {step}; stopped without saving (the last good checkpoint, if any, "
                            f"is {ckpt_path}); try a lower --lr, or --skip-nonfinite to skip such steps")


def rng_states(rt: Runtime) -> list[dict]:
    """Every rank's random generator states (torch CPU, and CUDA if used), for an exact resume."""
    state = {"cpu": torch.get_rng_state()}
    if rt.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(rt.device)
    if rt.world == 1:
        return [state]
    states = [None] * rt.world
    dist.all_gather_object(states, state)
    return states


def restore_rng(saved: list[dict] | None, rt: Runtime):
    """Continue every rank's random stream where the checkpoint left it (same number of ranks only)."""
    if not saved or len(saved) != rt.world:
        rt.log(f"random states not restored ({'none saved' if not saved else f'{len(saved)} ranks saved, {rt.world} now'}): "
               f"the run continues correctly, but not bit-identically")
        return
    torch.set_rng_state(saved[rt.rank]["cpu"])
    if "cuda" in saved[rt.rank] and rt.device.type == "cuda":
        torch.cuda.set_rng_state(saved[rt.rank]["cuda"], rt.device)


def load_scaler(rt: Runtime, ckpt: dict):
    """The fp16 GradScaler's scale and counters, from a checkpoint of a run that used one."""
    if rt.scaler.is_enabled() and ckpt.get("scaler"):
        rt.scaler.load_state_dict(ckpt["scaler"])


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


def save_or_stop(step: int, max_steps: int, stopping: bool, args, rt: Runtime, save, stop: "StopRequests") -> bool:
    """The periodic checkpoint of a training loop (every rank joins in gathering the random states, rank 0
    writes; the last one is written after the loop) and, when stopping, why. True: leave the loop."""
    if step % args.save_every == 0 and step < max_steps and not stopping:
        rng = rng_states(rt)
        if rt.main:
            save(rng)
    if stopping:
        rt.log(f"{stop.signal} received at step {step}" if stop.signal else
               f"--max-minutes {args.max_minutes} reached at step {step}; continue with --resume")
    return stopping


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a checkpoint was written."""


class StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption) during training: the loop finishes its
    step, saves and stops; `.signal` names the first one received. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.signal = None
        self._before = {}

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._before[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._before.items():
            signal.signal(sig, handler)

    def raise_if_stopped(self, ckpt_path: Path, step: int):
        if self.signal:
            raise Interrupted(f"{self.signal} received: saved {ckpt_path} at step {step}; "
                              f"run the same command with --resume to continue")


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


# ----------------------------------------------------------------------------- data: images decoded once, batches per rank

def cpus_per_process() -> int:
    return max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def training_data(args, build_guard=contextlib.nullcontext):
    """The training images decoded once as uint8 (in memory, or memory-mapped in the run folder when
    larger than --cache-gb), demo data when no --data, minus held-out subjects if --holdout > 0."""
    root = args.data or demo_data_dir(args.demo_dir)
    dataset = load_slices(root, args.image_size, args.channels, args.cache_gb, args.workers or cpus_per_process(),
                          disk_cache=Path(args.run), build_guard=build_guard, skip_bad=args.skip_bad_images)
    if args.holdout > 0:
        train_idx, _ = split_by_subject([p for p, _ in dataset.samples], args.holdout, args.holdout_seed)
        dataset = Subset(dataset, train_idx)
    return dataset, str(root)


def dataset_labels(dataset) -> torch.Tensor:
    """The class labels of an InMemorySlices, or of a Subset of one (held-out subjects removed)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(dataset.indices)]
    return dataset.labels


def training_files(args) -> tuple[list[tuple[str, int]], list[str], str]:
    """(path, class index) of the training images (held-out subjects removed), the class names (the image
    folder's: AD, NC) and the data root, without decoding any image."""
    root = args.data or demo_data_dir(args.demo_dir)
    folders = SliceFolders(root, args.image_size, args.channels)
    samples = folders.samples
    if args.holdout > 0:
        train_idx, _ = split_by_subject([p for p, _ in samples], args.holdout, args.holdout_seed)
        samples = [samples[i] for i in train_idx]
    return samples, folders.classes, str(root)


def total_steps(args, steps_per_epoch: int) -> int:
    if args.max_steps is not None:
        return args.max_steps
    return args.epochs * steps_per_epoch


def index_batches(n: int, batch_size: int, rt: Runtime, seed: int, start: int = 0, device="cpu"):
    """This rank's batches of indices into n items, endlessly: each epoch a DistributedSampler order
    (set_epoch(epoch): new for every epoch, the same on every rank, which take disjoint shards), cut
    into batches; the last partial batch is dropped. `start` skips that many batches (a resumed run)."""
    sampler = DistributedSampler(range(n), num_replicas=rt.world, rank=rt.rank, shuffle=True, seed=seed,
                                 drop_last=rt.world > 1)
    per_epoch = max(1, len(sampler) // batch_size)  # a set smaller than a batch is one batch
    epoch, skip = divmod(start, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), device=device)
        for i in range(skip, per_epoch):
            yield order[i * batch_size:(i + 1) * batch_size]
        epoch, skip = epoch + 1, 0


class _Gather(Dataset):
    """dataset[index tensor] -> the uint8 batch of those images (for a DataLoader with batch_size=None)."""

    def __init__(self, images: torch.Tensor, index: torch.Tensor | None):
        self.images, self.index = images, index

    def __getitem__(self, idx):
        return self.images[idx if self.index is None else self.index[idx]]


def uint8_loader(dataset, batches, rt: Runtime, workers: int) -> DataLoader:
    """uint8 image batches for the index batches `batches`, pinned for the GPU. Worker processes only
    for a memory-mapped cache (they overlap its disk reads); in memory a gather beats the hand-over."""
    images, index, on_disk = uint8_images(dataset)
    return DataLoader(_Gather(images, index), sampler=batches, batch_size=None,
                      num_workers=min(workers, cpus_per_process()) if on_disk else 0,
                      pin_memory=rt.device.type == "cuda")


def to_unit(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """uint8 batch -> float in [-1, 1] on the device (v / 127.5 - 1, exactly the card's ToTensor + Normalize)."""
    x = x.to(rt.device, non_blocking=True).float().div_(127.5).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last) if rt.channels_last else x


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
    if args.image_size % (8 * cfg.factor):  # stage 2's UNet halves the latent three times
        raise BadInputError(f"--image-size {args.image_size} does not fit: the VQ-VAE divides it by {cfg.factor} and "
                            f"the UNet halves that 3 times, so it must be a multiple of {8 * cfg.factor}")
    resume = prepare_run(args, ckpt_path, "vqvae", asdict(cfg))
    torch.manual_seed(args.seed)
    rt = setup_runtime(args)
    device = rt.device

    # data: every rank decodes into memory; a memory-mapped cache on disk is built by rank 0 alone
    dataset, data_root = training_data(args, build_guard=lambda: main_rank_first(rt))
    per_epoch = max(1, len(dataset) // rt.world // (args.batch_size * args.grad_accum))
    max_steps = total_steps(args, per_epoch)

    # model and optimizer
    model = VQVAE(cfg).to(device)
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        load_scaler(rt, resume)
        step = resume["step"]
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own random stream after
    train_model = wrap_model(model, rt, args.compile)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_warmup(s, args.warmup), last_epoch=step - 1)
    if rt.main:
        run.mkdir(parents=True, exist_ok=True)
        write_config(run, "train-vqvae", args)
        log = MetricLog(run / "log_vqvae.csv", ["step", "loss", "recon", "vq", "psnr", "perplexity", "usage", "lr", "img_per_s"])
    n_params = sum(p.numel() for p in model.parameters())
    images_per_step = args.batch_size * args.grad_accum * rt.world
    rt.log(f"VQ-VAE {n_params / 1e6:.2f}M params, latent {cfg.latent_shape}, {len(dataset)} images from {data_root}, "
           f"steps {step} -> {max_steps} of {images_per_step} images ({rt.world} process(es)) on {device}")

    spread = torch.linspace(0, len(dataset) - 1, min(8, len(dataset))).long().tolist()  # several subjects, not one
    fixed = torch.stack([dataset[i][0] for i in spread]).to(device)

    def save(rng):
        atomic_save({"kind": "vqvae", "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scaler": rt.scaler.state_dict(), "rng": rng, "step": step, "config": asdict(cfg), "data": data_root,
                     "args": plain_args(args)},
                    ckpt_path, keep_previous=True)

    def save_recon_grid(path):
        model.eval()
        with torch.no_grad(), rt.autocast:
            recon = model(fixed)[0].float()
        model.train()
        save_image(torch.cat([fixed, recon]).clamp(-1, 1), path, nrow=len(fixed), normalize=True, value_range=(-1, 1))

    def loss_fn(batch):
        x = to_unit(batch, rt)
        with rt.autocast:
            recon, vq_loss, stats = train_model(x)
        recon_loss = F.mse_loss(recon.float(), x)
        loss = recon_loss + vq_loss
        return loss, torch.stack([loss, recon_loss, vq_loss, stats["perplexity"], stats["usage"]])

    # loop: no host-device sync inside a step; the loss is read every --log-every steps
    model.train()
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    batches = index_batches(len(dataset), args.batch_size, rt, args.seed, start=step * args.grad_accum)
    stream = iter(uint8_loader(dataset, batches, rt, args.workers or cpus_per_process()))
    sums, n_sum, t0 = torch.zeros(5, device=device), 0, time.perf_counter()
    pbar = tqdm(total=max_steps, initial=step, desc="vqvae", dynamic_ncols=True, disable=not rt.main)
    if resume:
        restore_rng(resume.get("rng"), rt)
    skips, stop = NonfiniteSkips(ckpt_path), StopRequests()
    with stop:
        while step < max_steps:
            stats = optimizer_step(train_model, optimizer, rt.scaler, [next(stream) for _ in range(args.grad_accum)],
                                   loss_fn, args.grad_clip, args.skip_nonfinite)
            scheduler.step()
            step += 1
            if skips.count(stats, step):
                sums += stats
                n_sum += 1
            pbar.update(1)
            at_log = step % args.log_every == 0 or step % args.save_every == 0 or step == max_steps
            stopping = any_rank(time.monotonic() > deadline or bool(stop.signal), rt) if at_log or rt.world == 1 else False

            if at_log or stopping:  # the loss and the weights are checked before any save
                loss_m, recon_m, vq_m, ppl, usage = mean_over_ranks(sums / max(n_sum, 1), rt).tolist()
                ensure_finite(loss_m, step, ckpt_path, model)
                psnr = 10 * math.log10(4.0 / max(recon_m, 1e-12))  # images span [-1, 1]: peak-to-peak 2
                ips = n_sum * images_per_step / (time.perf_counter() - t0)
                row = {"step": step, "loss": f"{loss_m:.5f}", "recon": f"{recon_m:.5f}", "vq": f"{vq_m:.5f}",
                       "psnr": f"{psnr:.2f}", "perplexity": f"{ppl:.1f}", "usage": f"{usage:.3f}",
                       "lr": f"{scheduler.get_last_lr()[0]:.2e}", "img_per_s": f"{ips:.1f}"}
                if rt.main:
                    log.append(row)
                pbar.set_postfix(loss=row["loss"], psnr=row["psnr"], usage=row["usage"])
                rt.log(f"step {step:>7d} | loss {loss_m:.4f} | recon {recon_m:.4f} | vq {vq_m:.4f} | psnr {psnr:5.2f} "
                       f"| ppl {ppl:7.1f} | usage {usage:.3f} | {ips:7.1f} img/s{skips.note()}")
                sums.zero_()
                n_sum, t0 = 0, time.perf_counter()
            if rt.main and step % args.sample_every == 0:
                save_recon_grid(run / f"recon_step{step:07d}.png")
            if save_or_stop(step, max_steps, stopping, args, rt, save, stop):
                break
    pbar.close()

    # checkpoint and records
    rng = rng_states(rt)
    if rt.main:
        save(rng)
        save_recon_grid(run / "recon_vqvae.png")
        log.plot(run / "loss_vqvae.png", ["loss", "recon", "vq"], "VQ-VAE training")
        print(f"saved {ckpt_path} (step {step}); reconstructions {run / 'recon_vqvae.png'}")
    stop.raise_if_stopped(ckpt_path, step)
    return ckpt_path


# ----------------------------------------------------------------------------- stage 2: UNet

@torch.no_grad()
def encode_dataset(vqvae: VQVAE, dataset, batch_size: int, rt: Runtime, workers: int) -> torch.Tensor:
    """Pre-quantisation latents z of every image, in dataset order: (N, 4, h, w) float32 on the CPU."""
    vqvae.eval()
    chunks = torch.arange(len(dataset)).split(batch_size)
    out = []
    for x in tqdm(uint8_loader(dataset, chunks, rt, workers), desc="encoding latents", dynamic_ncols=True):
        with rt.autocast:
            out.append(vqvae.encode(to_unit(x, rt)).float().cpu())
    return torch.cat(out)


def latent_cache(args, samples: list, data_root: str, vqvae: VQVAE, vq_fingerprint: str,
                 rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """RUN/latents.pt: the training images encoded once (by rank 0; the other ranks wait, then read it), with
    their class labels; reused while VQ-VAE, image files and holdout are unchanged (checked without decoding)."""
    path = Path(args.run) / "latents.pt"
    with main_rank_first(rt):
        if not rt.main:
            cache = load_checkpoint(path, "latents")
            return cache["z"].float(), cache["y"]
        key = {"vqvae": vq_fingerprint, "data": data_root, "image_size": args.image_size, "channels": args.channels,
               "holdout": args.holdout, "holdout_seed": args.holdout_seed, "count": len(samples),
               "files": hashlib.sha1(b"\n".join(os.fsencode(p) for p, _ in samples)).hexdigest()}
        if path.exists():
            cache = load_checkpoint(path, "latents")
            if cache["key"] == key and "y" in cache:
                print(f"latent cache {path}: {len(cache['z'])} latents reused")
                return cache["z"].float(), cache["y"]
        dataset, _ = training_data(args)
        z = encode_dataset(vqvae, dataset, 64, rt, args.workers or cpus_per_process())
        y = dataset_labels(dataset)  # of the images decoded: --skip-bad-images may have left some out
        atomic_save({"kind": "latents", "key": key, "z": z, "y": y}, path)
        print(f"latent cache {path}: {len(z)} latents written")
        return z, y


def unet_config(args, latent_shape, num_classes: int = 0) -> UNetConfig:
    return UNetConfig(in_channels=latent_shape[0], latent_size=latent_shape[1], channels=args.unet_channels,
                      channel_mult=tuple(args.unet_mult), num_res_blocks=args.unet_res_blocks, num_classes=num_classes)


def train_unet(args):
    """Stage 2: v- or eps-prediction UNet on scale * z, z the frozen VQ-VAE's pre-quantisation latents."""
    # setup: the frozen VQ-VAE of this run
    run = Path(args.run)
    ckpt_path = run / "unet.pt"
    vq_ckpt = load_checkpoint(run / "vqvae.pt", "vqvae")
    vq_cfg = model_config(VQVAEConfig, vq_ckpt, run / "vqvae.pt")
    # stage 2 sees exactly the images of stage 1: same folder, size, channels and held-out subjects
    for name, default in (("image_size", None), ("channels", 1), ("holdout", 0.0), ("holdout_seed", 0)):
        setattr(args, name, vq_ckpt["args"].get(name, default))
    args.skip_bad_images = args.skip_bad_images or vq_ckpt["args"].get("skip_bad_images", False)
    args.data = args.data or vq_ckpt["data"]
    if not 0 <= args.label_dropout < 1:
        raise BadInputError(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    samples, classes, data_root = training_files(args)
    cfg = unet_config(args, vq_cfg.latent_shape, num_classes=len(classes) if args.conditional else 0)
    if len(cfg.channel_mult) != 4 or vq_cfg.latent_shape[1] % 8:
        raise BadInputError(f"the UNet has 4 levels (got --unet-mult {args.unet_mult}) and needs a latent size "
                            f"divisible by 8 (got {vq_cfg.latent_shape[1]})")
    diffusion = GaussianDiffusion(args.diffusion_steps, args.schedule, args.loss, args.prediction, args.min_snr_gamma)
    diffusion_cfg = diffusion.config()
    chosen = {k: v for k, v in asdict(cfg).items() if k != "scale_shift_norm"}  # not a flag: a resumed run keeps its own
    resume = prepare_run(args, ckpt_path, "unet", {**chosen, **diffusion_cfg})
    if resume:
        cfg = model_config(UNetConfig, resume, ckpt_path)
    torch.manual_seed(args.seed)
    rt = setup_runtime(args)
    device = rt.device
    vqvae = VQVAE(vq_cfg).to(device).eval()  # frozen: eval mode, or its quantiser's restarts would draw random numbers
    vqvae.load_state_dict(vq_ckpt["model"])
    vqvae.requires_grad_(False)
    vq_fingerprint = fingerprint(vq_ckpt["model"])
    if resume and resume["vqvae_fingerprint"] != vq_fingerprint:
        raise BadInputError(f"{ckpt_path} was trained on another VQ-VAE than {run / 'vqvae.pt'}; "
                            f"train stage 2 afresh in a new --run")

    # data: the latent cache, scaled to unit variance (the scale is measured, saved and reused)
    z, labels = latent_cache(args, samples, data_root, vqvae, vq_fingerprint, rt)
    labels = labels.to(device)
    latent_scale = resume["latent_scale"] if resume else 1.0 / z.std().item()
    latents = (z * latent_scale).to(device)
    latent_absmax = resume["latent_absmax"] if resume else latents.abs().max().item()  # range for clipping x0
    per_epoch = max(1, len(latents) // rt.world // (args.batch_size * args.grad_accum))
    max_steps = total_steps(args, per_epoch)

    # model, EMA, optimizer
    model = UNet(cfg).to(device)
    diffusion = diffusion.to(device)
    ema = ema_model(model, args.ema_decay)
    optimizer = adamw(model.parameters(), args.lr, weight_decay=0.0)
    step = 0
    if resume:
        model.load_state_dict(resume["model"])
        ema.module.load_state_dict(resume["ema"])
        ema.n_averaged.fill_(resume["ema_updates"])
        optimizer.load_state_dict(resume["optimizer"])
        load_scaler(rt, resume)
        step = resume["step"]
    torch.manual_seed(args.seed + rt.rank)  # the same weights on every rank, its own noise and steps t after
    train_model = wrap_model(model, rt, args.compile)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_warmup(s, args.warmup), last_epoch=step - 1)
    if rt.main:
        write_config(run, "train-unet", args)
        log = MetricLog(run / "log_unet.csv", ["step", "loss", "lr", "img_per_s"])
    n_params = sum(p.numel() for p in model.parameters())
    latents_per_step = args.batch_size * args.grad_accum * rt.world
    conditioning = f"conditional on {classes}, labels dropped with p={args.label_dropout}" if cfg.num_classes else "unconditional"
    rt.log(f"UNet {n_params / 1e6:.2f}M params ({conditioning}) on latents {tuple(latents.shape[1:])}, {len(latents)} latents, "
           f"scale {latent_scale:.4f}, steps {step} -> {max_steps} of {latents_per_step} latents "
           f"({rt.world} process(es)) on {device}")

    def save(rng):
        atomic_save({"kind": "unet", "model": model.state_dict(), "ema": ema.module.state_dict(),
                     "ema_updates": int(ema.n_averaged), "optimizer": optimizer.state_dict(), "step": step,
                     "scaler": rt.scaler.state_dict(), "rng": rng,
                     "config": asdict(cfg), "diffusion": diffusion_cfg,
                     "latent_scale": latent_scale, "latent_absmax": latent_absmax, "latent_shape": list(vq_cfg.latent_shape),
                     "vqvae_fingerprint": vq_fingerprint, "classes": classes,
                     "args": plain_args(args)},
                    ckpt_path, keep_previous=True)

    def save_sample_grid(path):
        noise = torch.randn(8, *vq_cfg.latent_shape, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.no_grad(), rt.autocast:
            for _, _, x0 in diffusion.sample_steps(ema.module, noise, sampler="ddim", steps=50):
                pass
            images = vqvae.decode(x0 / latent_scale).float()
        save_image(images.clamp(-1, 1), path, nrow=8, normalize=True, value_range=(-1, 1))

    def loss_fn(idx):
        x0 = latents[idx]
        if rt.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        y = drop_labels(labels[idx], args.label_dropout, cfg.num_classes) if cfg.num_classes else None
        with rt.autocast:
            loss = diffusion.loss(train_model, x0, y=y)
        return loss, loss.detach()

    # loop: this rank's batches of the in-memory latents, a new order every epoch; no host-device sync per step
    model.train()
    deadline = time.monotonic() + 60 * args.max_minutes if args.max_minutes else math.inf
    batches = index_batches(len(latents), args.batch_size, rt, args.seed, start=step * args.grad_accum, device=device)
    sums, n_sum, t0 = torch.zeros((), device=device), 0, time.perf_counter()
    pbar = tqdm(total=max_steps, initial=step, desc="unet", dynamic_ncols=True, disable=not rt.main)
    if resume:
        restore_rng(resume.get("rng"), rt)
    skips, stop = NonfiniteSkips(ckpt_path), StopRequests()
    with stop:
        while step < max_steps:
            stats = optimizer_step(train_model, optimizer, rt.scaler, [next(batches) for _ in range(args.grad_accum)],
                                   loss_fn, args.grad_clip, args.skip_nonfinite)
            scheduler.step()
            step += 1
            if skips.count(stats, step):
                ema.update_parameters(model)
                sums += stats
                n_sum += 1
            pbar.update(1)
            at_log = step % args.log_every == 0 or step % args.save_every == 0 or step == max_steps
            stopping = any_rank(time.monotonic() > deadline or bool(stop.signal), rt) if at_log or rt.world == 1 else False

            if at_log or stopping:  # the loss and the weights are checked before any save
                loss_m = mean_over_ranks(sums / max(n_sum, 1), rt).item()
                ensure_finite(loss_m, step, ckpt_path, model)
                ips = n_sum * latents_per_step / (time.perf_counter() - t0)
                if rt.main:
                    log.append({"step": step, "loss": f"{loss_m:.5f}", "lr": f"{scheduler.get_last_lr()[0]:.2e}",
                                "img_per_s": f"{ips:.1f}"})
                pbar.set_postfix(loss=f"{loss_m:.4f}")
                rt.log(f"step {step:>7d} | loss {loss_m:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | {ips:7.1f} latents/s"
                       f"{skips.note()}")
                sums.zero_()
                n_sum, t0 = 0, time.perf_counter()
            if rt.main and step % args.sample_every == 0:
                save_sample_grid(run / f"samples_step{step:07d}.png")
            if save_or_stop(step, max_steps, stopping, args, rt, save, stop):
                break
    pbar.close()

    # checkpoint and records
    rng = rng_states(rt)
    if rt.main:
        save(rng)
        log.plot(run / "loss_unet.png", ["loss"], f"UNet training ({args.prediction} loss)")
        print(f"saved {ckpt_path} (step {step})")
    stop.raise_if_stopped(ckpt_path, step)
    return ckpt_path
