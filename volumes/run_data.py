"""What a run's data is: `DataConfig`, the data folder (or the embedded demo data), how it is listed and whose each
file is (`Layout`, volumes/layouts.py), how volumes are sliced (`Slicing`, volumes/reader.py) and which subjects are
held out (volumes/holdout.py). driver.py resolves it once from train-vqvae's flags; stage 1 saves it in vqvae.pt, and
stage 2, `sample` and `evaluate` take it from there, so that a run keeps its files and its held-out subjects.

What follows from it without decoding an image: the training files (`training_files`; `split_files` with the
held-out ones), a line on the folder's subjects and the hold-out (`subject_summary`), the refusal of ADNI subject
folders as classes, and the hashes of the data files that a resumed or later stage checks (`data_files_key`,
`check_same_files`; `stage1_data`: a run's data, checked). `training_data` decodes the training images through
dataset.py's folders and caches.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

from torch.utils.data import Dataset, Subset

from conditions.participants import read_table, scan_rows
from dataset import SliceFolders, size_and_time, load_slices
from runtime.checkpoint import atomic_write, load_checkpoint
from runtime.errors import BadInputError
from volumes.demo import DEFAULT_DEMO_ROOT, demo_data_dir, rebuilt_demo
from volumes.holdout import split_by_subject, subjects_by_class
from volumes.layouts import ADNI_SUBJECT, BIDS_OWN, Layout, linked_folders, whose_scans
from volumes.reader import Slicing, is_volume, volume_span
from volumes.writer import SampleGeometry, training_geometry


@dataclass
class DataConfig:
    """Which images a run trains on, how they are listed and whose they are (`layout`), and how they are read
    (`slicing`). driver.py resolves it once: from the flags for stage 1, which saves it in vqvae.pt; stage 2 and
    `evaluate` inherit it from there."""
    root: str | None = None         # the image folder; None: the embedded demo data under demo_dir
    demo_dir: str = str(DEFAULT_DEMO_ROOT)
    image_size: int = 256
    channels: int = 1
    holdout: float = 0.0            # fraction of subjects left out of training, for evaluation
    holdout_seed: int = 0
    skip_bad_images: bool = False
    slicing: Slicing = field(default_factory=Slicing)  # NIfTI volumes only; saved as a plain dict
    layout: Layout = field(default_factory=Layout)     # which files, and whose; saved as a plain dict

    def __post_init__(self):
        if self.root == "":
            raise BadInputError("--data is empty (an unset variable?): name the data folder, or leave --data out for "
                                "the demo data")
        if isinstance(self.slicing, dict):  # rebuilt from a checkpoint: DataConfig(**asdict(config))
            self.slicing = Slicing(**self.slicing)
        if isinstance(self.layout, dict):
            self.layout = Layout(**self.layout)

    @classmethod
    def from_args(cls, args) -> "DataConfig":
        slicing = Slicing(args.axis, args.slices, args.volume_index, args.intensity_percentiles, args.crop_foreground)
        scans = args.session_column is not None  # --labels is a table of scans: whose each file is
        layout = Layout(subject_pattern=args.subject_pattern, bids_suffix=args.bids_suffix,
                        bids_entities=args.bids_entities, bids_all=args.bids_all, class_column=args.class_column,
                        class_table=None if scans else args.labels,
                        class_subject_column=None if scans else args.subject_column,
                        scan_table=args.labels if scans else None,
                        scan_subject_column=args.subject_column if scans else None,
                        scan_column=args.session_column)
        _refuse_table_flags(args)
        config = cls(args.data, args.demo_dir, args.image_size, args.channels, args.holdout, args.holdout_seed,
                     args.skip_bad_images, slicing, layout)
        if scans:  # whose each file is, as stage 1 finds it, saved: the split never moves with the table
            layout.scan_subjects = whose_scans([p for p, _ in _listed(config).samples], Path(config.folder()), layout)
        if args.class_column:  # the classes as stage 1 finds them, saved: a later command that finds others is refused
            listed = _listed(config)
            layout.classes_sha1, layout.subject_classes = listed.classes_sha1, listed.subject_classes
        return config

    def flags(self) -> dict:
        """{flag dest: value} of every flag from_args reads, as argparse gives them: from_args' inverse."""
        s, layout = self.slicing, self.layout
        return {"data": self.root, "demo_dir": self.demo_dir, "image_size": self.image_size, "channels": self.channels,
                "holdout": self.holdout, "holdout_seed": self.holdout_seed, "skip_bad_images": self.skip_bad_images,
                "axis": s.axis, "slices": s.slices, "volume_index": s.volume_index,
                "intensity_percentiles": s.percentiles, "crop_foreground": s.crop_foreground,
                "subject_pattern": layout.subject_pattern,
                "bids_suffix": layout.bids_suffix, "bids_entities": layout.bids_entities, "bids_all": layout.bids_all,
                "class_column": layout.class_column, "labels": layout.class_table or layout.scan_table,
                "subject_column": layout.class_subject_column or layout.scan_subject_column,
                "session_column": layout.scan_column}

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> "DataConfig":
        """The data config saved by stage 1; a checkpoint written before it was saved keeps it in its flags.
        What a run saved before a setting existed means what it did then: no foreground crop, layout version 1."""
        before = {"slicing": {"crop_foreground": False}, "layout": {"version": 1}}
        if "data_config" in ckpt:
            saved = dict(ckpt["data_config"])
            for name, then in before.items():
                saved[name] = {**then, **saved.get(name, {})}
            return cls(**saved)
        saved = ckpt["args"]
        return cls(ckpt["data"], saved.get("demo_dir", str(DEFAULT_DEMO_ROOT)), saved["image_size"],
                   saved.get("channels", 1), saved.get("holdout", 0.0), saved.get("holdout_seed", 0),
                   saved.get("skip_bad_images", False), **before)

    @classmethod
    def of_run(cls, run: Path) -> "DataConfig":
        """The data config of the run folder `run`, from its RUN/vqvae.pt."""
        return cls.from_checkpoint(load_checkpoint(Path(run) / "vqvae.pt", "vqvae"))

    def folder(self) -> Path:
        """The image folder (the demo data is built on first use, and again where its cache was cleared)."""
        return (rebuilt_demo(Path(self.root)) or Path(self.root)) if self.root else demo_data_dir(self.demo_dir)

    def subject(self) -> Callable[[str], str]:
        """Whose each file of the data folder is, by the run's layout: `subject()(path)`."""
        return partial(self.layout.subject, root=str(self.folder()))

    def strata(self, samples: list[tuple[str, int]], classes: list[str]) -> list[str] | None:
        """Each (path, class index) sample's class name, within which layout version 5 draws the hold-out (and
        `evaluate` its halves); None for runs of earlier versions, drawn from all classes at once."""
        return [classes[k] for _, k in samples] if self.layout.version >= 5 else None

    def split(self, samples: list[tuple[str, int]], classes: list[str]) -> tuple[list[int], list[int]]:
        """(train, held_out) indices of the (path, class index) `samples`: the run's held-out subjects."""
        return split_by_subject([p for p, _ in samples], self.holdout, self.holdout_seed, self.subject(),
                                self.strata(samples, classes), self.listing())

    def listing(self) -> tuple[list[str], list[str] | None] | None:
        """(paths, class names) of every file the folder lists, readable or not, from which layout version 6 draws
        the held-out subjects (`split_by_subject`); None for earlier runs, which drew from the files read."""
        if self.layout.version < 6:
            return None
        folders = _listed(self)
        return [p for p, _ in folders.samples], self.strata(folders.samples, folders.classes)

    def refuse_inside(self, folder: str | Path, flag: str):
        """A run or output folder inside the data folder where the listing looks: what is written there (grids,
        checkpoints, samples) would be listed as training images, a class of their own or among a class's, by the
        next command that reads it. A hidden folder (`.runs/`) and a BIDS root's own (`derivatives/`) are not read.
        The listing follows symbolic links to folders: a link there that leads into the folder, or to a folder
        holding it, is refused too."""
        if not self.root:
            return
        root, target = Path(self.root).resolve(), Path(folder).resolve()
        bids_root = root.is_dir() and any(p.name.startswith("sub-") and p.is_dir() for p in root.iterdir())
        if target.is_relative_to(root):
            parts = target.relative_to(root).parts
            if not (any(part.startswith(".") for part in parts) or (bids_root and parts and parts[0] in BIDS_OWN)):
                raise BadInputError(f"{flag} {folder} is inside the data folder {self.root}: what is written there "
                                    "would be read as training images; put it elsewhere (or in a hidden folder there, "
                                    ".runs/)")
        for link, linked in linked_folders(Path(self.root), BIDS_OWN if bids_root else set()):
            hidden = target.is_relative_to(linked) and any(p.startswith(".") for p in target.relative_to(linked).parts)
            if (target.is_relative_to(linked) and not hidden) or linked.is_relative_to(target):
                raise BadInputError(f"{flag} {folder} is read with the data folder {self.root} through its link {link} "
                                    f"-> {linked}: what is written there would be read as training images; put it "
                                    f"elsewhere, or move the link out of the data folder")

    def saved(self) -> dict:
        """The config as a run saves it, its folder as an absolute path (so that stage 2 finds it from anywhere)."""
        return {**asdict(self), "layout": self.layout.saved(), "root": os.path.abspath(self.folder())}


def _refuse_table_flags(args):
    """train-vqvae's --labels names the table of --class-column, or with --session-column a table of scans; neither
    given, or both, is refused in one line."""
    if args.session_column and not args.labels:
        raise BadInputError("train-vqvae --session-column names the scans' column of the table --labels gives, which "
                            "is not given")
    if args.session_column and args.subject_pattern:
        raise BadInputError("train-vqvae --subject-pattern names the files' subjects, and --session-column the table "
                            "of scans that does: give one")
    if args.session_column and args.class_column:
        raise BadInputError("train-vqvae --class-column reads a table of a row per subject, and --session-column "
                            "makes --labels a table of scans: give the classes as class folders, or as a table of a "
                            "row per subject (volumes/README.md, ADNI's tables)")
    if (args.labels or args.subject_column) and not (args.class_column or args.session_column):
        raise BadInputError("train-vqvae's --labels and --subject-column name the table of --class-column, or with "
                            "--session-column a table of scans, and neither is given (a UNet's conditions take "
                            "train-unet --labels)")


def _listed(data: DataConfig) -> SliceFolders:
    """The files of the data folder that its layout takes (no image is decoded)."""
    return SliceFolders(data.folder(), data.image_size, data.channels, slicing=data.slicing, layout=data.layout)


def training_files(data: DataConfig, expand_volumes: bool = True) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of the training images (held-out subjects removed) and the class names (the image
    folder's: AD, NC), without decoding any image. Volumes are read (not resized) to find their slices:
    one (volume path, class index) per slice; with expand_volumes=False one per volume file, without reading
    any (enough to key a cache: the files and the slicing in the data config decide the slices)."""
    samples, classes = split_files(data, expand_volumes)
    return samples["training"], classes


def split_files(data: DataConfig, expand_volumes: bool = True) -> tuple[dict[str, list[tuple[str, int]]], list[str]]:
    """({"training": (path, class index) ..., "held-out": ...}, class names): `training_files`' images and those of
    the held-out subjects (none for a run of --holdout 0), listed alike."""
    folders = _listed(data)
    samples = folders.samples
    if folders.volumes and expand_volumes:
        samples = [s for s in samples for _ in volume_span(s[0], data.slicing, data.skip_bad_images)]
    if data.holdout <= 0:
        return {"training": samples, "held-out": []}, folders.classes
    train_idx, held_idx = data.split(samples, folders.classes)
    return {"training": [samples[i] for i in train_idx], "held-out": [samples[i] for i in held_idx]}, folders.classes


def run_geometry(data: DataConfig) -> SampleGeometry:
    """Where the run's samples would sit as slices of its training volumes (volumes/writer.py), which stage 1 saves
    with the run so that `sample --format nifti` needs no data; for a run on 2D images the assumed one (axial, 1 mm
    pixels, 0-255)."""
    files, _ = training_files(data, expand_volumes=False)
    volumes = [path for path, _ in files if is_volume(path)]
    if not volumes:
        return SampleGeometry()
    return training_geometry(volumes, data.slicing, data.image_size, data.skip_bad_images)


def training_data(data: DataConfig, cache_gb: float, workers: int, disk_cache: Path,
                  build_guard=contextlib.nullcontext) -> Dataset:
    """The training images decoded once as uint8 (in memory, or memory-mapped under `disk_cache` when larger
    than cache_gb), held-out subjects removed."""
    dataset = load_slices(data.folder(), data.image_size, data.channels, cache_gb, workers, disk_cache=disk_cache,
                          build_guard=build_guard, skip_bad=data.skip_bad_images, slicing=data.slicing,
                          layout=data.layout)
    if data.holdout > 0:
        train_idx, _ = data.split(dataset.samples, dataset.classes)
        dataset = Subset(dataset, train_idx)
    return dataset


def subject_summary(data: DataConfig) -> str:
    """One line: the files the data folder holds, of how many subjects, files per subject (min, median, max), and
    the subjects and files the hold-out takes, and a warning for a class of one subject, which the hold-out takes
    whole or not at all (files named by class, AD_001.png ...); no image is decoded."""
    folders = _listed(data)
    paths = [p for p, _ in folders.samples]
    subject = data.subject()
    owners = [subject(p) for p in paths]
    per_subject = sorted(Counter(owners).values())
    kind = "volume" if folders.volumes else "image"
    line = (f"data: {_count(len(paths), kind)} of {_count(len(per_subject), 'subject')} ({kind}s per subject: min "
            f"{per_subject[0]}, median {statistics.median(per_subject):g}, max {per_subject[-1]})")
    if data.layout.scan_table:
        line += (f", each file its scan's subject in {os.path.basename(data.layout.scan_table)} ("
                 f"{data.layout.scan_subject_column or 'participant_id'!r} of {data.layout.scan_column!r})")
        line += class_disagreements(folders, data)
    if data.layout.class_column:
        left_out = f" ({_count(folders.unlabelled, kind)} of subjects without one left out)"
        table = os.path.basename(data.layout.class_table or "participants.tsv")
        line += (f", classes {', '.join(folders.classes)} from {table}'s {data.layout.class_column!r}"
                 f"{left_out if folders.unlabelled else ''}")
    if data.holdout == 0:
        return line + "; nothing held out"
    _, held_idx = data.split(folders.samples, folders.classes)
    held = {owners[i] for i in held_idx}
    line += f"; held out: {_count(len(held), 'subject')}"
    groups = subjects_by_class(owners, [folders.classes[k] for _, k in folders.samples])
    if len(folders.classes) > 1:
        line += " (" + ", ".join(f"{'+'.join(k)} {len(held & set(s))} of {len(s)}" for k, s in groups.items()) + ")"
    line += f", {_count(len(held_idx), kind)}"
    subjects_of_class = {}
    for owner, (_, label) in zip(owners, folders.samples):
        subjects_of_class.setdefault(folders.classes[label], set()).add(owner)
    alone = [name for name, subjects in subjects_of_class.items() if len(subjects) == 1 and len(folders.classes) > 1]
    if alone:
        fate = "leaves all of it in training" if data.layout.version >= 5 else "takes all of it or none"
        line += (f"; WARNING: class {', '.join(alone)} is one subject by the naming rules, so the hold-out {fate}: if "
                 "its files are of several people, name them with --subject-pattern")
    shared = {"+".join(k): len(s) for k, s in groups.items() if len(k) > 1}
    if shared and data.layout.scan_table:  # the table says whose: a diagnosis that changed between scans
        n = sum(shared.values())
        line += (f"; {_count(n, 'subject')} of the table of scans {'have' if n > 1 else 'has'} files in more than one "
                 f"class ({', '.join(f'{k} {n}' for k, n in shared.items())}): a diagnosis that changed between scans")
    elif shared and data.layout.version >= 5:  # a folder's name, e.g. AD/001 and NC/001
        n = sum(shared.values())
        line += (f"; WARNING: {_count(n, 'subject')} by the naming rules {'have' if n > 1 else 'has'} files in more "
                 f"than one class ({', '.join(f'{k} {n}' for k, n in shared.items())}): right for a person whose "
                 "diagnosis changed between scans, wrong where each class numbers its own folders (AD/001 and NC/001 "
                 r"two people): then name them with --subject-pattern, e.g. '([^/]+/[^/]+)/[^/]+$' (class/folder)")
    root = str(data.folder())
    unnamed = sum(owner in (path, os.path.relpath(path, root)) for owner, path in zip(owners, paths))
    if unnamed:  # NC/0295/visit1/T1.nii.gz and NC/0295/visit2/T1.nii.gz: two subjects
        line += (f"; WARNING: {unnamed} of the {_count(len(paths), kind)} carry no subject ID the naming rules know "
                 "(BIDS sub-*, ADNI 002_S_0295, OASIS, NAME_<number>, a folder below the class folder) and are each "
                 "a subject of their own, so the hold-out may split one person's scans: if some are of one person, "
                 "name them with --subject-pattern")
    return line


def class_disagreements(folders: SliceFolders, data: DataConfig) -> str:
    """'; WARNING: ...' where a column of the run's table of scans names the class folders (ADNI's Group: AD, CN) and
    some files' scans are of another class there (a patient's later scan sorted by the diagnosis of the first), else
    nothing. The class folders decide the class the run trains on; the table is not read where it is gone."""
    layout, classes = data.layout, set(folders.classes)
    if len(classes) < 2 or not Path(layout.scan_table).is_file():
        return ""
    table = read_table(Path(layout.scan_table), layout.scan_subject_column, session_column=layout.scan_column)
    rows = scan_rows(table, [os.path.relpath(p, data.folder()) for p, _ in folders.samples])
    for column in sorted(table.session_columns):
        given = [(row.get(column, "").strip(), folders.classes[k], path)
                 for row, (path, k) in zip(rows, folders.samples) if row]
        if len({value for value, _, _ in given} & classes) < 2:  # not a column of these classes
            continue
        other = [(value, folder, path) for value, folder, path in given if value in classes and value != folder]
        if other:
            value, folder, path = other[0]
            return (f"; WARNING: {len(other)} of the files sit in a class folder other than their scan's {column!r} in "
                    f"{os.path.basename(layout.scan_table)} (e.g. {os.path.relpath(path, data.folder())}: {column} "
                    f"{value}): the run trains each as its folder says; if the folders were sorted by another scan's "
                    f"diagnosis, sort them by each scan's")
    return ""


def refuse_subject_folders_as_classes(data: DataConfig):
    """A new stage 1 whose class folders are ADNI subjects (ADNI/002_S_0295/...: an ADNI download as LONI delivers
    it, unsorted) would learn a class per person and hold none of them out: refused, with the ways to give the run
    its classes. No image is decoded."""
    folders = _listed(data)
    if data.layout.class_column or len(folders.classes) < 2:
        return
    if all(ADNI_SUBJECT.fullmatch(name) for name in folders.classes):
        named = ", ".join(folders.classes[:3]) + (" ..." if len(folders.classes) > 3 else "")
        raise BadInputError(f"the class folders of {data.folder()} are ADNI subjects ({named}), each a class of its "
                            f"own: a download before it is sorted by diagnosis. Sort the subjects' folders into class "
                            f"folders (AD/002_S_0295/...), or give --data the folder above (one class, named after "
                            f"this folder), or --class-column COLUMN with --labels FILE, a table of each subject's "
                            f"class (volumes/README.md)")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("s" if n != 1 else "")


def data_files_key(data: DataConfig, contents: bool = False) -> dict:
    """Hashes of every file the layout takes from the data folder (before the hold-out), no image decoded: "sha1" of
    their paths relative to the folder and their sizes (the same for a copy of the data elsewhere, another when a
    file is added, removed, renamed or changes size), "times" of those and their modification times, and with
    `contents` (stage 1 saves it) "contents" of every byte, in the same order. A file rewritten at its size (the
    preprocessing run again) keeps "sha1" and changes "times": `check_same_files` then compares the contents."""
    folder = data.folder()
    entries = sorted((os.fsencode(os.path.relpath(p, folder)), *size_and_time(p), p) for p, _ in _listed(data).samples)
    names, times = hashlib.sha1(), hashlib.sha1()
    for relative, size, mtime, _ in entries:
        names.update(relative + f"|{size}\n".encode())
        times.update(relative + f"|{size}|{mtime}\n".encode())
    key = {"files": len(entries), "sha1": names.hexdigest(), "times": times.hexdigest()}
    if contents:
        every_byte = hashlib.sha1()
        for relative, size, _, path in entries:
            every_byte.update(relative + b"\n")
            with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:  # a link to nothing: its name alone
                while chunk := f.read(1 << 20):
                    every_byte.update(chunk)
        key["contents"] = every_byte.hexdigest()
    return key


def stage1_data(run: Path, root: str | None = None) -> tuple[dict, DataConfig]:
    """Stage 1's checkpoint args and data config, which stage 2, `evaluate` and `sample --cohort` inherit (`root`,
    --data, may point the run at the same images in another place). No stage 1: the one-line error, before anything
    else is resolved."""
    vq_ckpt = load_checkpoint(Path(run) / "vqvae.pt", "vqvae")
    data = DataConfig.from_checkpoint(vq_ckpt)
    if root:
        data.root = root
    check_same_files(data, vq_ckpt, Path(run))
    return vq_ckpt["args"], data


def check_same_files(data: DataConfig, vq_ckpt: dict, run: Path):
    """The folder holds the files stage 1 trained on (their names and sizes, wherever the folder now is, and where
    their times changed, their contents), so that a resumed run, stage 2 and `evaluate` read the run's own data and
    its own held-out subjects. Contents found the same are noted in RUN/data_checked.json with the files' times, so
    that the next command does not read them again. A run written before stage 1 saved that key is not checked
    (before 2026-12-07: not its contents)."""
    trained_on = vq_ckpt.get("data_files")
    if trained_on is None:
        return
    found = data_files_key(data)
    if (found["files"], found["sha1"]) != (trained_on["files"], trained_on["sha1"]):
        raise BadInputError(f"{data.folder()} does not hold the files this run's stage 1 trained on ({found['files']} "
                            f"files there, {trained_on['files']} then, or their names or sizes differ); point --data "
                            f"at them")
    if "contents" not in trained_on or found["times"] == trained_on["times"]:
        return
    checked, folder = run / "data_checked.json", str(data.folder().resolve())  # copied, touched, or rewritten
    try:
        seen = json.loads(checked.read_text()) if checked.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        seen = {}  # written again below
    if isinstance(seen, dict) and seen.get(folder) == [found["times"], trained_on["contents"]]:
        return
    if data_files_key(data, contents=True)["contents"] != trained_on["contents"]:
        raise BadInputError(f"the files in {data.folder()} have the names and sizes of those this run's stage 1 "
                            f"trained on, but other contents (rewritten since?): point --data at the files it "
                            f"trained on, or train a new --run on these")
    text = json.dumps({**(seen if isinstance(seen, dict) else {}), folder: [found["times"], trained_on["contents"]]},
                      indent=2)
    with contextlib.suppress(BadInputError):  # a note to save reading them again: a run folder not ours to write
        atomic_write(checked, lambda f: f.write(text.encode()))
