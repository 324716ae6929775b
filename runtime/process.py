"""Where a process computes: its device and precision, its place among torchrun's processes, its random states.

Under torchrun (WORLD_SIZE > 1) every process trains on its own shard; rank 0 alone writes files and builds
caches while the others wait (`main_rank_first`); logged values are means over ranks; stopping is agreed
by all ranks (`any_rank`), so they leave the loop at the same step.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from runtime.errors import BadInputError


# ----------------------------------------------------------------------------- device and precision

def pick_device(device: str | None = None) -> torch.device:
    """`device`, else CUDA if present; under torchrun each process takes the GPU of its LOCAL_RANK."""
    try:
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise BadInputError(f"--device {device}: not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda" and not device.index < torch.cuda.device_count():
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise BadInputError(f"--device {device}: this machine has {found}; use --device cpu, or another index")
    return device


def setup_device(device: str | None = None, precision: str = "auto",
                 deterministic: bool = False) -> tuple[torch.device, contextlib.AbstractContextManager]:
    """The device and the autocast context of `precision` (auto: bf16 on CUDA, fp32 on CPU).

    On CUDA also TF32 matmuls and cuDNN autotuning (it picks the fastest convolution kernels for the
    shapes it meets), unless `deterministic`: then deterministic kernels only, for a bit-exact resume.
    """
    device = pick_device(device)
    if device.type == "cuda":  # cuda:1 made current, so that streams, graphs and cuDNN's handles are its own
        torch.cuda.set_device(device)
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise BadInputError("--precision fp16 needs a CUDA device (its GradScaler); use bf16 or fp32 on the CPU")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if precision == "fp32":
        return device, contextlib.nullcontext()
    return device, torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


# ----------------------------------------------------------------------------- progress on a terminal and in a batch job

def progress(iterable=None, quiet: bool = False, **kwargs):
    """A tqdm bar on a terminal. In a batch job (standard error not a terminal) a bar would write a line per
    update into the job's log, so instead: a line at each quarter of the work, or nothing with `quiet` (the
    training loop, whose fixed log lines are the record)."""
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return Milestones(iterable, quiet=quiet, **kwargs)


class Milestones:
    """tqdm's interface for batch jobs: one line at 25, 50, 75 and 100% of `total`, no redrawn bar."""

    def __init__(self, iterable=None, total=None, desc: str = "", initial: int = 0, quiet: bool = False, **_):
        self.iterable, self.desc, self.n, self.quiet = iterable, desc, initial, quiet
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.quarter = 1 + (4 * initial // self.total if self.total else 0)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, k: int = 1):
        self.n += k
        if self.total and not self.quiet and self.quarter <= 4 and self.n >= self.quarter * self.total / 4:
            reached = min(4, 4 * self.n // self.total)  # one line, however many quarters this update crossed
            print(f"{self.desc}: {self.n}/{self.total} ({25 * reached}%)", file=sys.stderr, flush=True)
            self.quarter = reached + 1

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


# ----------------------------------------------------------------------------- torchrun processes

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

    @property
    def precision(self) -> str:
        """What the steps compute in, for the log: fp32, or bf16 / fp16 autocast."""
        dtype = getattr(self.autocast, "fast_dtype", None)
        return {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast"}.get(dtype, "fp32")

    def log(self, message: str):
        if self.main:
            tqdm.write(message)


def default_memory_format(device) -> torch.memory_format:
    """The layout the convolutions run in unless --channels-last says otherwise, in training and sampling alike: NHWC
    (channels_last) on CUDA, where cuDNN's convolutions prefer it; NCHW elsewhere."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def setup_runtime(device: str | None = None, precision: str = "auto", deterministic: bool = False,
                  channels_last: bool | None = None) -> Runtime:
    """Device and precision; under torchrun (WORLD_SIZE > 1) also the process group: NCCL on CUDA, gloo on CPU.
    channels_last None: the device's `default_memory_format`."""
    device, autocast = setup_device(device, precision, deterministic)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1 and not dist.is_initialized():  # (setup_device made this rank's GPU the current one)
        # rank 0 may spend a while alone building the caches while the others wait at a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    fp16 = getattr(autocast, "fast_dtype", None) == torch.float16
    if channels_last is None:
        channels_last = default_memory_format(device) == torch.channels_last
    return Runtime(device, autocast, torch.amp.GradScaler("cuda", enabled=fp16), channels_last, rank, world)


def is_main_process() -> bool:
    """Rank 0 under torchrun (or the only process), before or without a Runtime."""
    return os.environ.get("RANK", "0") == "0"


def is_first_on_machine() -> bool:
    """Local rank 0 under torchrun (or the only process): one process of each machine, which says what stopped it
    (every rank meets the same bad input; a machine whose files differ says so)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def cpus_per_process() -> int:
    """The CPUs this process may run on (a scheduler's `taskset` or cgroup affinity, not the machine's count), shared
    among the processes torchrun starts on this machine."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, usable // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


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


def same_on_every_rank(value: int, rt: Runtime) -> bool:
    """Whether a count is the same on every rank (every rank calls it)."""
    if rt.world == 1:
        return True
    t = torch.tensor([float(value), -float(value)], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t[0] == -t[1])


def place_model(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """The model on this process's device and in its final memory layout (NHWC where rt.channels_last). Call it
    before the model's optimizer is made and its state loaded: the optimizer's moments then share the weights'
    layout (runtime.optimizer.load_optimizer)."""
    model = model.to(rt.device)
    return model.to(memory_format=torch.channels_last) if rt.channels_last else model


def wrap_model(model: torch.nn.Module, rt: Runtime, compile_model: bool, cache_dir: str | None = None) -> torch.nn.Module:
    """torch.compile if asked, DDP under torchrun, around a model already placed (`place_model`); checkpoints keep
    saving the unwrapped model.

    Compilation: a model with `compile_blocks` (the UNet) compiles its repeated blocks one by one, in place
    (a shorter start than the whole graph, and the same state_dict keys); others are compiled whole.
    `cache_dir` keeps inductor's compiled kernels (e.g. in the run folder), so a resumed run does not pay again.
    """
    if compile_model:
        if cache_dir:
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        model = model.compile_blocks() if hasattr(model, "compile_blocks") else torch.compile(model)
    if rt.world > 1:
        model = DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    return model


# ----------------------------------------------------------------------------- random states

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


def check_processes(saved: list[dict] | None, rt: Runtime):
    """A run resumes on the number of processes it trained on (the length of its checkpoint's random states): its
    batch is per process, and its place in the data and its schedule are counted in steps of it (resumed on another
    number, a 1-epoch run on 2 processes trained 1.44 epochs on 1, at half the batch)."""
    if saved and len(saved) != rt.world:
        raise BadInputError(f"this run trained on {len(saved)} process(es) and is resumed on {rt.world}: its batch "
                            f"(--batch-size is per process), its place in the data and its schedule are those of "
                            f"{len(saved)}; resume it on {len(saved)} (torchrun --nproc_per_node {len(saved)}), or "
                            f"train a new --run")


def restore_rng(saved: list[dict] | None, rt: Runtime):
    """Continue every rank's random stream where the checkpoint left it (check_processes made sure it can)."""
    if not saved:
        rt.log("random states not restored (none saved): the run continues correctly, but not bit-identically")
        return
    torch.set_rng_state(saved[rt.rank]["cpu"])
    if "cuda" in saved[rt.rank] and rt.device.type == "cuda":
        torch.cuda.set_rng_state(saved[rt.rank]["cuda"], rt.device)
