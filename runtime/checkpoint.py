"""Checkpoints and the run folder: atomic saves that keep the previous file, safe loading with kind,
version and config checks, weight fingerprints, and RUN/config.json.

A checkpoint is one dict {"kind", "model", "optimizer", "step", "config", ...} of tensors and plain
values, loaded with torch.load(weights_only=True): a file holding Python objects is refused.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
from dataclasses import asdict, is_dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from runtime.errors import BadInputError
from runtime.process import is_main_process


def previous(path: Path) -> Path:
    """Where atomic_save(keep_previous=True) keeps the checkpoint it replaced: RUN/unet.prev.pt."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def atomic_save(obj, path: Path, keep_previous: bool = False):
    """torch.save to a temporary file in the same folder, fsync, then rename over `path`: at every moment
    `path` is the old file or the new one, whole. keep_previous: the old one stays as previous(path)
    (a hard link, no copy). A failed write (disk full) leaves `path` as it was and says so."""
    atomic_write(path, partial(torch.save, obj), keep_previous)


def atomic_write(path: Path, write: Callable[[BinaryIO], object], keep_previous: bool = False):
    """atomic_save's way for any file: `write(f)` into a temporary file, fsync, rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
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
    except RuntimeError as e:  # torch.save's writer failing as a Ctrl-C (or SIGTERM) unwinds it: that, not its echo
        if isinstance(e.__context__, KeyboardInterrupt):
            raise e.__context__ from None
        raise
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
    except Exception as e:  # truncated, empty, or not a torch file at all
        raise BadInputError(f"cannot load checkpoint {path}, it is damaged or not a checkpoint "
                            f"({(str(e).splitlines() or [type(e).__name__])[0]}); {_last_good(path, kind)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise BadInputError(f"{path} is not a {kind} checkpoint (it holds {found!r})")
    missing = [key for key in REQUIRED.get(kind, ()) if key not in ckpt]
    if missing:
        raise BadInputError(f"{path} lacks {', '.join(missing)}, which every {kind} checkpoint of this project holds: "
                            f"it was edited or damaged; {_last_good(path, kind)}")
    return ckpt


# what every checkpoint of a kind has held, from the first version on (tests/fixtures/run_dc30bb5)
REQUIRED = {"vqvae": ("model", "config", "optimizer", "step"),
            "unet": ("model", "config", "optimizer", "step", "ema", "diffusion", "latent_scale", "latent_shape",
                     "vqvae_fingerprint"),
            "decoder": ("model", "optimizer", "step", "vqvae_fingerprint")}


def load_weights(target, state: dict, path: Path | str, part: str = "model", load: Callable | None = None):
    """target.load_state_dict(state) (or `load(target, state)`), where a checkpoint's weights that do not fit (of
    another model, or edited: a missing or extra weight, another shape) are one line instead of torch's list."""
    try:
        (load or type(target).load_state_dict)(target, state)
    except (RuntimeError, KeyError, ValueError) as e:
        what = " ".join(line.strip() for line in str(e).splitlines())
        what = what if len(what) <= 300 else what[:300] + "..."
        raise BadInputError(f"the {part} weights in {path} do not fit the model its config describes ({what}): the "
                            "file was edited, or is of another model") from None


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


def checkpoint_to_resume(ckpt_path: Path, kind: str, resume: bool, chosen: dict, config_class=None,
                         diffusion_defaults: dict | None = None) -> dict | None:
    """Check the run folder before anything is written; return the checkpoint to resume, if any.

    Without `resume` an existing checkpoint is an error (nothing is overwritten by accident). With it, the
    temporary file of a write cut short is removed, and the saved config must equal `chosen` (the model's
    config and, for a UNet, its diffusion settings), read as `config_class` reads it where given: a field
    newer than the checkpoint takes the value the checkpoint was trained with, as does a diffusion setting newer
    than it from `diffusion_defaults`."""
    if ckpt_path.exists() and not resume:
        raise BadInputError(f"{ckpt_path} already exists: pass --resume to continue it, or use another --run")
    if not (resume and ckpt_path.exists()):
        if resume and is_main_process():  # a typo in --run would otherwise start a new run without a word
            print(f"--resume: nothing to resume, {ckpt_path} does not exist; the stage starts anew")
        return None
    if is_main_process():
        remove_unfinished(ckpt_path.parent, ckpt_path.name)
    ckpt = load_checkpoint(ckpt_path, kind)
    config = asdict(model_config(config_class, ckpt, ckpt_path)) if config_class else ckpt["config"]
    saved = {**config, **(diffusion_defaults or {}), **ckpt.get("diffusion", {})}  # a UNet's diffusion settings too
    diff = [f"{k}: {saved.get(k)!r} in the checkpoint, {v!r} now"
            for k, v in chosen.items() if _plain(saved.get(k)) != _plain(v)]
    if diff:
        raise BadInputError(f"cannot resume {ckpt_path}: it was trained with a different config ({'; '.join(diff)})")
    return ckpt


def _plain(value):
    return list(value) if isinstance(value, (tuple, list)) else value


def remove_unfinished(folder: Path, name: str = "*"):
    """Remove the temporary files that writes of `name` (a glob) in `folder` cut short by kill -9 left (atomic_write's
    `.NAME.tmpPID`, `.NAME.prevPID`): a latent cache's or a snapshot's may be as large as the file. Call it where no
    other process writes there (under the run's lock)."""
    for unfinished in [*folder.glob(f".{name}.tmp*"), *folder.glob(f".{name}.prev*")]:  # the file, a link to the last
        print(f"removed {unfinished}, a write that did not finish (the file it was to replace is whole)")
        unfinished.unlink(missing_ok=True)


def plain_args(args) -> dict:
    """The resolved flags as plain values, which a weights_only=True load accepts (tuples as lists, as in JSON)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in vars(args).items()
            if v is None or isinstance(v, (int, float, str, bool, list, tuple))}


HELD_LOCKS: set[int] = set()  # the descriptors of the run locks this process holds (`run_lock`)


def let_go_of_run_locks():
    """In a process forked from one that holds run locks (a loader worker): its copies of their descriptors closed, so
    that the lock ends with its holder (a kill -9 of the trainer left its workers holding RUN/.lock for seconds, and
    the `--resume` that followed at once was refused). Never unlocked here: the lock is the holder's, shared."""
    for fd in list(HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    HELD_LOCKS.clear()


@contextlib.contextmanager
def run_lock(run: Path, create: bool = False, lock: str = ".lock", doing: str = "training or changing"):
    """Held while a command trains or changes the run in `run` (rank 0 under torchrun): a second one (another
    terminal, a scheduler's retry while the first still runs) stops in one line instead of interleaving its
    checkpoints and logs with the first's. An advisory lock on RUN/.lock, freed when the command ends, however it
    ends. With `create` (a command that may start a run) a folder not there yet is made first, so that two commands
    started at once on a new run do not both go on; if it is still empty when the command ends (bad input stopped
    it), it is removed again. `lock` names the lock file, `doing` what its holder does (another lock in one folder:
    `sample` writing a set into a run folder while it trains). Without fcntl (Windows), no lock."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    made = create and fcntl is not None and is_main_process() and not run.exists()
    if made:
        try:
            run.mkdir(parents=True)
        except OSError as e:
            raise BadInputError(f"cannot make {run} ({e.strerror or e}): give a folder") from None
    if fcntl is None or not run.is_dir() or not is_main_process():
        yield
        return
    try:
        lock_file = open(run / lock, "a+")
    except OSError as e:  # a folder this user may read but not write (a shared set, a read-only mount)
        raise BadInputError(f"cannot write {run / lock} ({e.strerror or e}): {run} must be a folder you can write "
                            f"(the command is {doing} it)") from None
    try:
        with lock_file as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "its pid unknown"
                made = False  # the folder is the other command's
                raise BadInputError(f"another command is {doing} {run} ({holder}): wait for it, or stop it first"
                                    ) from None
            f.truncate(0)
            f.write(f"pid {os.getpid()}")
            f.flush()
            HELD_LOCKS.add(f.fileno())
            try:
                yield
            finally:
                HELD_LOCKS.discard(f.fileno())
                f.truncate(0)
                fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        if made and [p.name for p in run.iterdir()] == [lock]:
            (run / lock).unlink()
            run.rmdir()


def lock_holder(run: Path, lock: str = ".lock") -> str | None:
    """Who holds `run_lock(run, lock=lock)` now ("pid 123"), or None: asked by a command that reads what another
    writes, before it begins (it takes no lock itself, so that it may read a run folder it cannot write)."""
    try:
        import fcntl
        f = open(run / lock)
    except (ImportError, OSError):  # no fcntl (Windows), or no lock file: nobody holds it
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "its pid unknown"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def read_config(run: Path) -> dict:
    """RUN/config.json, the flags each stage of the run was last started with ({} where there is none). One that is not
    a JSON object (edited by hand) is kept beside as config.json.bad, with a warning, and read as none: the
    checkpoints, not this file, hold what a run trained with."""
    path = run / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:  # none yet (or another rank has just set a bad one aside)
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        config = None
    if isinstance(config, dict):
        return config
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_suffix(".json.bad"))
    print(f"warning: {path} is not a JSON object of flags (edited by hand?): kept as {path.name}.bad, and a new one "
          "written; the checkpoints hold the run's settings")
    return {}


def json_text(value) -> str:
    """`value` as strict JSON (RFC 8259), indented: a NaN or infinity (the correlation of one value, a score of no
    images) written null, where Python's json writes a bare NaN that jq and JavaScript refuse."""
    def finite(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: finite(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [finite(x) for x in v]
        return v
    return json.dumps(finite(value), indent=2, allow_nan=False) + "\n"


def write_config(run: Path, stage: str, args):
    """Merge this stage's resolved flags into RUN/config.json."""
    path = run / "config.json"
    config = read_config(run)
    config[stage] = {k: v for k, v in vars(args).items() if k != "func"}
    text = json.dumps(config, indent=2, default=lambda v: asdict(v) if is_dataclass(v) else str(v))
    atomic_write(path, lambda f: f.write(text.encode()))  # a full disk leaves the run's record as it was
