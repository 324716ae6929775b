"""Which files a data folder holds and whose they are, for dataset.py: the ImageFolder roots of a data folder
(train/ and test/, or the folder), the files each class folder gives (images, or NIfTI volumes with BIDS rules
for BIDS subtrees and trees), and the subject each file belongs to, which the hold-out split keeps whole.
`Layout` holds these rules and their settings; a run saves it, so that its files and held-out subjects stay its own.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torchvision import datasets

from conditions.participants import Table, read_table, scan_of, scan_subjects
from conditions.table import MISSING
from runtime.errors import BadInputError
from volumes.reader import VOLUME_SUFFIXES, is_volume, printable


LAYOUT_VERSION = 6   # the rules of new runs; see Layout
SPLITS = {"train": 0, "training": 0, "val": 1, "valid": 1, "validation": 1, "test": 2, "testing": 2}  # and their order
NOT_A_CLASS = {"__MACOSX"}   # what macOS's zip leaves beside the folders it packed


def find_image_roots(root: Path, version: int = LAYOUT_VERSION) -> list[Path]:
    """The ImageFolder roots under `root`: its split folders if it has any, else root itself. Split folders (layout
    version 3): train, val and test, or the same in other spellings (Train, training, validation ...), in that order;
    a split folder beside a folder of another name is an error (is it a class, or a split this code does not know?).
    Versions 1-2: train/ and test/ exactly, other folders beside them ignored."""
    if root.is_file():
        raise BadInputError(f"--data {root} is a file: give the folder of class folders (PATH/CLASS/*.png ...)")
    if not root.is_dir():
        raise BadInputError(f"data folder {root} does not exist")
    if version < 3:
        return [root / s for s in ("train", "test") if (root / s).is_dir()] or [root]
    folders = _folders(root)
    splits = sorted((f for f in folders if f.lower() in SPLITS), key=lambda f: (SPLITS[f.lower()], f))
    others = [f for f in folders if f not in splits]
    if splits and others:
        raise BadInputError(f"{printable(root)} holds the split folders {', '.join(splits)} and beside them "
                            f"{', '.join(others)}: put the class folders inside the split folders (or --data at one)")
    return [root / s for s in splits] or [root]


def _folders(directory, skip: set[str] = NOT_A_CLASS) -> list[str]:
    """The names of the folders in `directory`, sorted, without hidden ones and those in `skip`."""
    return sorted(e.name for e in os.scandir(directory)
                  if e.is_dir() and not e.name.startswith(".") and e.name not in skip)


def _walk(top: str):
    """The files under `top`, sorted, without hidden files and folders; a symbolic link to a folder is followed
    only once, so a link loop does not list the same files again and again."""
    visited = set()
    for folder, subfolders, files in os.walk(top, followlinks=True):
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in visited:  # reached again through a link: already listed
            subfolders[:] = []
            continue
        visited.add((st.st_dev, st.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        yield from (os.path.join(folder, f) for f in sorted(files) if not f.startswith("."))


def linked_folders(root: Path, skip: set[str] = frozenset()) -> list[tuple[Path, Path]]:
    """(link, the folder it leads to, resolved) for each symbolic link to a folder that the listing of `root` follows:
    not in hidden folders, nor in those of `skip` at the top; each folder read once, so that a link loop ends."""
    found, seen, todo = [], set(), [(root, True)]
    while todo:
        folder, top = todo.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:  # unreadable: the listing says so itself
            continue
        for entry in entries:
            if entry.name.startswith(".") or (top and entry.name in skip):
                continue
            try:
                if not entry.is_dir():
                    continue
                target = Path(entry.path).resolve() if entry.is_symlink() else None
            except (OSError, RuntimeError):  # a loop of links, or one unreadable: nothing the listing reads
                continue
            if target is not None:
                if target in seen:
                    continue
                seen.add(target)
                found.append((Path(entry.path), target))
            todo.append((entry.path, False))
    return found


# ----------------------------------------------------------------------------- which files

NOT_RAW = {"derivatives", "sourcedata"}   # BIDS folders of processed or original data, never training volumes
_ENTITY = re.compile(r"[A-Za-z0-9]+-[A-Za-z0-9]+")   # a BIDS key-label pair: space-MNI152NLin2009cAsym


def _is_bids_t1w(relative: str) -> bool:
    """Layout version 1: sub-*/[ses-*/]anat/*_T1w.nii[.gz], relative to a BIDS root."""
    parts = Path(relative).parts
    return (parts[0].startswith("sub-") and len(parts) in (3, 4) and parts[-2] == "anat"
            and (len(parts) == 3 or parts[1].startswith("ses-")) and parts[-1].endswith(("_T1w.nii", "_T1w.nii.gz")))


def file_stem(name: str) -> str:
    """A file name without its extension: `sub-01_T1w.nii.gz` -> sub-01_T1w, `002_S_0295_067.jpeg` -> 002_S_0295_067."""
    for suffix in VOLUME_SUFFIXES[::-1]:   # .nii.gz before .nii
        if name.lower().endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def parse_bids_name(name: str) -> tuple[dict[str, str], str]:
    """({entity: label}, suffix) of a BIDS file name: `sub-01_ses-2_run-1_T1w.nii.gz` -> ({sub: 01, ses: 2, run: 1},
    T1w)."""
    *pairs, suffix = file_stem(name).split("_")
    return dict(p.split("-", 1) for p in pairs if "-" in p), suffix


def entity_list(text: str) -> tuple[str, ...]:
    """--bids-entities: 'space-MNI152NLin2009cAsym,res-1' -> ('space-MNI152NLin2009cAsym', 'res-1')."""
    entities = tuple(e for e in text.split(",") if e)
    if not all(_ENTITY.fullmatch(e) for e in entities):
        raise argparse.ArgumentTypeError(f"expected ENTITY-LABEL,... (e.g. space-MNI152NLin2009cAsym), got {text!r}")
    return entities


def _plainest(paths: list[str], version: int = LAYOUT_VERSION) -> str:
    """Of several images of one subject and session, the one with the fewest BIDS entities; ties: the lowest run,
    then the name (a native-space image before its MNI-space copy, a plain T1w before a contrast-enhanced one).
    Version 4: a file that is there before a link to one that is not (DataLad's run-1 not fetched, run-2 fetched)."""
    def key(path):
        entities, _ = parse_bids_name(os.path.basename(path))
        run = entities.get("run", "0")
        missing = version >= 4 and not os.path.exists(path)
        return missing, len(entities), int(run) if run.isdigit() else 0, os.path.basename(path)
    return min(paths, key=key)


# ----------------------------------------------------------------------------- whose files

_BIDS_SUBJECT = re.compile(r"sub-[A-Za-z0-9]+")                 # at the start of a folder or file name
LATER_FIELDS = ("class_table", "class_subject_column", "subject_classes",  # Layout's, since 2026-12-07
                "scan_table", "scan_subject_column", "scan_column", "scan_subjects")  # 2026-12-07, later
ADNI_SUBJECT = re.compile(r"(?<!\d)\d{3}_S_\d{4}(?!\d)")       # site_S_participant: 002_S_0295
_OASIS_SUBJECT = re.compile(r"(?<![A-Za-z0-9])OAS\d_\d{4}(?!\d)")  # OASIS' OAS1_0001 (OAS1_0001_MR2: a visit)
_OASIS3_SUBJECT = re.compile(r"(?<![A-Za-z0-9])OAS3\d{4}(?!\d)")  # OASIS-3's OAS30001 (OAS30001_MR_d0129: a visit)
_SUBJECT_NUMBER = re.compile(r"^(?P<subject>.+)_(?P<number>\d+)$")  # <subject>_<slice or visit>


def subject_id(path: str, pattern: re.Pattern | None = None, root: str | None = None,
               version: int = LAYOUT_VERSION) -> str:
    """The subject a file (an image or a volume) belongs to, by the first rule that applies:
    `pattern` searched in the file name, or (version 4) where it holds a `/` in the file's path below `root` (its
    group `subject`, else group 1, else the whole match; a file it does not match is an error: a guess could put
    one subject on both sides of the hold-out); else a BIDS `sub-<label>` starting the file's name, or the name of its
    BIDS folder `sub-<label>/[ses-<label>/]anat/` (version 5: of any folder below `root`; never a folder higher up:
    the data folder itself may sit under one named sub-something); else ADNI's subject ID `\\d{3}_S_\\d{4}` in the
    file name (`ADNI_002_S_0295_MR_..._20060418.nii` -> 002_S_0295, so that visits stay together), then (version 3)
    in the names of its folders below `root` (dcm2niix's `002_S_0295/MPRAGE/<date>/I40966/x.nii`), then OASIS'
    `OAS1_0001` in the file name, and (version 4) OASIS-3's `OAS30001`; else `<subject>_<number>` of the name
    without its extension (version 5: where `<subject>` holds a digit, patient7_2 but not slice_078); else (version
    5) the first folder below its class folder (`AD/patient01/slice_078.png`, `NC/0295/visit1/T1.nii.gz`); else
    `<subject>_<number>` whatever its subject; else the file is a subject of its own, named (version 3) by its path
    relative to `root`, the data folder, so that the hold-out does not depend on where the folder is or how --data
    was written (version 2: the path)."""
    name = os.path.basename(path)
    if pattern is not None:  # version 4: a pattern with a `/` is for the path (NC/0295/visit1/T1.nii.gz)
        by_path = version >= 4 and "/" in pattern.pattern and root
        m = pattern.search(Path(os.path.relpath(path, root)).as_posix() if by_path else name)
        if m is None:
            raise BadInputError(f"--subject-pattern {pattern.pattern!r} does not match {printable(path)}: every file "
                                "needs its subject (a guess could leak a subject into the hold-out)")
        group = "subject" if "subject" in pattern.groupindex else 1 if pattern.groups else 0
        return m.group(group) or m.group(0)
    relative = os.path.relpath(path, root) if root is not None and version >= 3 else None
    folders = Path(relative).parts[:-1] if relative is not None else ()  # below the data folder, the class first
    parts = Path(path).parts
    bids = parts[-4:-2] if parts[-2:-1] == ("anat",) else ()  # sub-X/[ses-Y/]anat/FILE
    for part in (name, *reversed(bids), *(reversed(folders) if version >= 5 else ())):
        m = _BIDS_SUBJECT.match(part)
        if m:
            return m.group(0)
    for m in (ADNI_SUBJECT.search(n) for n in (name, *reversed(folders))):
        if m:
            return m.group(0)
    m = _OASIS_SUBJECT.search(name) if version >= 3 else None
    m = m or (_OASIS3_SUBJECT.search(name) if version >= 4 else None)
    if m:
        return m.group(0)
    m = _SUBJECT_NUMBER.match(file_stem(name))
    if m and (version < 5 or any(c.isdigit() for c in m.group("subject"))):  # patient7_2, not slice_078
        return m.group("subject")
    below = _below_class(folders) if version >= 5 else ()
    if below:  # AD/patient01/slice_078.png, NC/0295/visit1/T1.nii.gz
        return below[0]
    return m.group("subject") if m else relative or str(path)


def _below_class(folders: tuple[str, ...]) -> tuple[str, ...]:
    """Of a file's folders below the data folder ([split/]class/...), those below its class folder."""
    return folders[2:] if folders and folders[0].lower() in SPLITS else folders[1:]


def _subject_id_v1(path: str) -> str:
    """Layout version 1: a volume's BIDS `sub-<label>` file name prefix, else the volume itself; an image's
    `<subject>_<slice>`, else the image itself."""
    if is_volume(path):
        m = _BIDS_SUBJECT.match(Path(path).name)
        return m.group(0) if m else str(path)
    m = _SUBJECT_NUMBER.match(Path(path).stem)
    return m.group("subject") if m else str(path)


# ----------------------------------------------------------------------------- the layout, and the folder it lists

@dataclass
class Layout:
    """How a data folder is listed and whose each file is; saved in a run's DataConfig, so that a run keeps its
    files and its held-out subjects.

    Version 6, the rules of new runs: version 5's, and the held-out subjects drawn from every file the folder lists,
    readable or not (`DataConfig.listing`): with --skip-bad-images a file unreadable today, or only in one command,
    moves no subject between training and the held-out ones.

    Version 5: version 4's, a subject's folder below its class folder (`AD/patient01/x.png`)
    and a `sub-*` folder anywhere below the data folder give its files' subject (`subject_id`), and the hold-out is
    drawn within each class (`volumes/holdout.py`): no class is left out of training or of evaluation by chance.

    Version 4: version 3's, OASIS-3's subject IDs (`subject_id`), what a BIDS root's
    .bidsignore lists left out (`ignored`: dcm2bids' tmp_dcm2bids/ beside the sub-* folders, among others), and a
    fetched image of a session chosen before a link to one not fetched (`_plainest`).

    Version 3: version 2's, and split folders in any spelling (`find_image_roots`), a class
    folder that gives no file an error, macOS's __MACOSX never a class, a BIDS root that also holds images elsewhere
    than in sub-* (and BIDS' own folders) an error, and `subject_id`'s rules for ADNI folders, OASIS and a file of
    no subject by its path in the data folder.

    Version 2: a NIfTI volume with a `sub-*` folder above it (relative to its class folder, or to a BIDS root)
    follows BIDS rules: in an `anat` folder, with suffix `bids_suffix`, carrying every entity of `bids_entities`,
    and one per subject and session (the plainest, see `_plainest`) unless `bids_all`; a volume under
    derivatives/ or sourcedata/ is never taken; other volumes of a class folder are taken as they are. Subjects:
    `subject_id` with `subject_pattern`. Version 1, the rules of runs written before version 2: BIDS rules only at
    a BIDS root (`sub-*/[ses-*/]anat/*_T1w`, all of them), every volume of a class folder, and `_subject_id_v1`.

    Any version: with `class_column`, each file's class is its subject's value in that column of the data folder's
    participants.tsv (a BIDS tree's diagnosis), or of `class_table`, not its class folder. With `scan_subjects`, each
    file's subject is the subject of the scan its path names in `scan_table`, a table of scans (ADNI's search CSV: a
    patient's two scans are one subject though the file names hold scan IDs), as stage 1 found them (`whose_scans`)."""
    version: int = LAYOUT_VERSION
    subject_pattern: str | None = None
    bids_suffix: str = "T1w"
    bids_entities: tuple[str, ...] = ()
    bids_all: bool = False
    class_column: str | None = None        # the classes from this column of the folder's participants.tsv
    class_table: str | None = None         # ... or of this table (train-vqvae --labels), with its subjects in
    class_subject_column: str | None = None  # ... this column (--subject-column; default participant_id)
    classes_sha1: str | None = None        # ... each listed subject's, as stage 1 found them (`classes_from_table`)
    subject_classes: dict | None = field(default=None, repr=False)  # ... and the classes themselves (2026-12-07 on)
    scan_table: str | None = None          # whose each file is: its scan's subject in this table (--labels with
    scan_subject_column: str | None = None  # ... train-vqvae --session-column), subjects in this column,
    scan_column: str | None = None         # ... scans in this one ('Image Data ID'),
    scan_subjects: dict | None = field(default=None, repr=False)  # ... {scan: subject} as stage 1 found them

    def __post_init__(self):
        self.bids_entities = tuple(self.bids_entities)  # a list after a JSON round trip
        if self.version not in range(1, LAYOUT_VERSION + 1):
            raise BadInputError(f"unknown data layout version {self.version} (this code knows 1-{LAYOUT_VERSION})")
        if not all(_ENTITY.fullmatch(e) for e in self.bids_entities):
            raise BadInputError(f"--bids-entities takes ENTITY-LABEL pairs, not {','.join(self.bids_entities)}")
        try:
            self._pattern = re.compile(self.subject_pattern) if self.subject_pattern else None
        except re.error as e:
            raise BadInputError(f"--subject-pattern {self.subject_pattern!r} is not a regular expression: {e}") from None

    def saved(self) -> dict:
        """The layout as a run saves it: without the fields added on 2026-12-07 where unset, so that what a run saved
        before (a latent cache's key holds it) reads the same."""
        return {k: v for k, v in asdict(self).items() if v is not None or k not in LATER_FIELDS}

    def subject(self, path: str, root: str | None = None) -> str:
        """The subject `path`, a file under the data folder `root`, belongs to."""
        if self.scan_subjects is not None:
            return self._scan_owner(path, root)
        return subject_id(path, self._pattern, root, self.version) if self.version > 1 else _subject_id_v1(path)

    def _scan_owner(self, path: str, root: str | None) -> str:
        """The subject of the scan `path` names, by the table of scans stage 1 read; a file of none is an error (a
        file added since: a guess could put a patient on both sides of the hold-out)."""
        scan = scan_of(os.path.relpath(path, root) if root else path, self.scan_subjects, self.scan_table)
        if scan is None:
            raise BadInputError(f"{printable(path)} names no scan of {self.scan_table}'s {self.scan_column!r} as stage "
                                f"1 read it: whose is it? a run keeps the subjects it began with; train a new --run")
        return self.scan_subjects[scan]

    def select(self, files: list[str], top: str, root: str, bids_root: bool) -> list[str]:
        """Of the image and volume `files` found under `top` (a class folder, or the BIDS root `root` itself), those
        this layout takes, in their order."""
        if self.version == 1:
            return [f for f in files if _is_bids_t1w(os.path.relpath(f, root))] if bids_root else files
        plain, bids = [], []
        for f in files:
            if is_volume(f) and NOT_RAW & set(Path(os.path.relpath(f, root)).parts[:-1]):
                continue
            if is_volume(f) and any(p.startswith("sub-") for p in Path(os.path.relpath(f, top)).parts[:-1]):
                bids.append(f)
            elif not bids_root:  # a BIDS root holds nothing else worth training on
                plain.append(f)
        taken = set(plain + self._bids_choice(bids))
        return [f for f in files if f in taken]

    def _bids_choice(self, files: list[str]) -> list[str]:
        """The BIDS images taken: anatomy with the wanted suffix and entities, one per subject and session unless
        bids_all."""
        wanted = [tuple(e.split("-", 1)) for e in self.bids_entities]
        sessions = {}
        for f in files:
            entities, suffix = parse_bids_name(os.path.basename(f))
            if Path(f).parent.name == "anat" and suffix == self.bids_suffix and all(entities.get(k) == v for k, v in wanted):
                sessions.setdefault((os.path.dirname(f), entities.get("sub"), entities.get("ses")), []).append(f)
        if self.bids_all:
            return [f for group in sessions.values() for f in group]
        return [_plainest(group, self.version) for group in sessions.values()]


class ImageFolder(datasets.ImageFolder):
    """ImageFolder of images or NIfTI volumes (`kind`, never both) listed by a `Layout`, that ignores hidden files and
    folders (.DS_Store, .ipynb_checkpoints ...) and follows a symbolic link to a folder only once. A BIDS root (sub-*
    folders) is one class, "all"."""

    def __init__(self, root: str, layout: Layout, **kwargs):
        self.layout = layout  # before ImageFolder.__init__, which lists the files
        super().__init__(root, **kwargs)

    def find_classes(self, directory):
        folders = _folders(directory, NOT_A_CLASS if self.layout.version >= 3 else set())
        self.bids = any(name.startswith("sub-") for name in folders)
        classes = ["all"] if self.bids else folders
        if not classes:
            raise FileNotFoundError(f"no class folders in {printable(directory)}")
        self.ignore = bidsignore(directory) if self.bids and self.layout.version >= 4 else []
        if self.bids and self.layout.version >= 3:
            _refuse_data_beside_bids(directory, [f for f in folders if not f.startswith("sub-") and f not in BIDS_OWN],
                                     self.ignore)
        return classes, {name: i for i, name in enumerate(classes)}

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        samples, suffixes, found, others = [], tuple(datasets.folder.IMG_EXTENSIONS) + VOLUME_SUFFIXES, 0, []
        for name, label in sorted(class_to_idx.items()):
            top = directory if self.bids else os.path.join(directory, name)
            listed = list(_walk(top))
            files = [f for f in listed
                     if f.lower().endswith(suffixes) and not ignored(os.path.relpath(f, top), self.ignore)]
            taken = self.layout.select(files, top, directory, self.bids)
            other = [f for f in listed if not f.lower().endswith(suffixes)]
            if not taken and self.layout.version >= 3 and len(class_to_idx) > 1:
                raise BadInputError(f"class folder {printable(top)} (of {', '.join(class_to_idx)}) gives no image or "
                                    f"volume{self._left_out(files)}{_other_files(other)}: remove it, or fill it")
            samples += [(f, label) for f in taken]
            found, others = found + len(files), others + other
        if not samples:
            raise FileNotFoundError(f"no image files ({', '.join(suffixes)}) in the class folders of "
                                    f"{printable(directory)}{self._left_out(range(found))}{_other_files(others)}")
        volumes = [p for p, _ in samples if is_volume(p)]
        if 0 < len(volumes) < len(samples):
            image = next(p for p, _ in samples if not is_volume(p))
            raise BadInputError(f"{printable(directory)} mixes images ({printable(image)}) and NIfTI volumes "
                                f"({printable(volumes[0])}): keep one kind per data folder")
        self.kind = "volumes" if volumes else "images"
        return samples

    def _left_out(self, files) -> str:
        """Why files found were not taken, for an error: the BIDS rules (or nothing, where none was found)."""
        if not files:
            return ""
        wanted = "".join(f", with {e}" for e in self.layout.bids_entities)
        return (f" that the layout takes ({len(files)} found: BIDS volumes are taken from sub-*/[ses-*/]anat/ with "
                f"the suffix {self.layout.bids_suffix}{wanted}, --bids-suffix and --bids-entities, never from "
                "derivatives/)")


def classes_from_table(folders: list[ImageFolder], root: Path, layout: Layout) -> tuple[int, str, dict]:
    """--class-column: each ImageFolder's files relabelled by their subject's value in that column of the table
    (`class_table`, else root's participants.tsv; BIDS: subjects in participant_id), the classes its values among the
    listed subjects, sorted; a file whose subject has none (no row, n/a) is left out. A run's saved classes
    (`subject_classes`) stand in for a table no longer there. Returns (files left out, a hash of each listed
    subject's class, {subject: class}); the hash must be stage 1's (`classes_sha1`): other columns and rows may
    change, these classes may not."""
    column = layout.class_column
    path = Path(layout.class_table) if layout.class_table else root / "participants.tsv"
    owner = {p: layout.subject(p, str(root)) for f in folders for p, _ in f.samples}
    if layout.subject_classes is not None and not path.is_file():  # moved or gone: the classes stage 1 saved
        table, value = None, {p: layout.subject_classes.get(s, "") for p, s in owner.items()}
        where = f"the classes this run saved (of {path})"
    else:
        table = _class_table(path, column, layout.class_subject_column, root, layout.classes_sha1 is not None)
        value = {p: (table.row(s) or {}).get(column, "") for p, s in owner.items()}
        where = table.file
    known = {p: v for p, v in value.items() if v.lower() not in MISSING}
    classes = sorted(set(known.values()))
    if len(classes) < 2:
        listed = sorted(set(owner.values()))
        subjects = sorted(r[table.subject_column] for r in table.rows.values()) if table else []
        raise BadInputError(f"--class-column {column}: the listed subjects have {len(classes)} value(s) there "
                            f"({', '.join(classes) or 'none'}); classes need two or more"
                            + (f" (the files' subjects: {', '.join(listed[:3])} ...; the table's: "
                               f"{', '.join(subjects[:3])} ...: --subject-pattern names the files' subjects)"
                               if not known and subjects else ""))
    digest = hashlib.sha1("\n".join(sorted({f"{owner[p]}\t{v}" for p, v in known.items()})).encode()).hexdigest()
    if layout.classes_sha1 not in (None, digest):
        raise BadInputError(f"the classes {where}'s {column!r} gives the subjects changed since stage 1 (a "
                            "diagnosis corrected, a subject's row added or removed): restore it, or train a new --run")
    for f in folders:
        f.samples = f.imgs = [(p, classes.index(known[p])) for p, _ in f.samples if p in known]
        f.targets = [label for _, label in f.samples]
        f.classes, f.class_to_idx = classes, {name: i for i, name in enumerate(classes)}
    return len(value) - len(known), digest, {owner[p]: v for p, v in sorted(known.items())}


def whose_scans(paths: list[str], root: Path, layout: Layout) -> dict[str, str]:
    """{scan: subject} of the files at `paths` under the data folder `root`, by `layout.scan_table`, a table of scans
    with a row per scan (its scan column `scan_column`, its subjects `scan_subject_column`): each file's subject is
    its scan's, for the hold-out and the conditions. A file that names no scan there is an error: a guess could put
    one patient on both sides of the hold-out."""
    table = read_table(Path(layout.scan_table), layout.scan_subject_column, session_column=layout.scan_column)
    if not table.sessions:
        raise BadInputError(f"--session-column {layout.scan_column}: {table.file} has no such column (its columns: "
                            f"{', '.join(table.columns)})")
    found, unnamed = scan_subjects(table, [os.path.relpath(p, root) for p in paths])
    if unnamed:
        scan = next(iter(next(iter(table.sessions.values()))))
        raise BadInputError(f"{len(unnamed)} of the {len(paths)} files {'names' if len(unnamed) == 1 else 'name'} "
                            f"no scan of {table.file}'s "
                            f"{layout.scan_column!r} (such as {printable(unnamed[0])}; a scan there: {scan!r}), so "
                            f"whose they are is unknown: a scan names a folder of its files or a part of their names "
                            f"between underscores (ADNI's I218391 also the first number, 218391_78.jpeg); add their "
                            f"rows, or move the files out of --data")
    return found


def _class_table(path: Path, column: str, subject_column: str | None, root: Path, a_runs: bool) -> Table:
    """--class-column's table, refused in one line where it is missing or lacks the column; `a_runs`: the table of a
    run's stage 1 (one begun before 2026-12-07, which saved no classes), not of a new one."""
    if not path.is_file() and a_runs:
        raise BadInputError(f"{path}, the table this run's stage 1 read its classes from (--class-column {column}), is "
                            f"not there: restore it (a run begun before 2026-12-07 did not save its classes)")
    if not path.is_file():
        raise BadInputError(f"--class-column {column} reads the data folder's participants.tsv, and {root} has none: "
                            f"write one, tab-separated, a row per subject, with participant_id (the subjects as "
                            f"the files name them, e.g. 002_S_0295) and {column}, or give train-vqvae --labels "
                            f"FILE (volumes/README.md)" if path.parent == root and path.name == "participants.tsv"
                            else f"--class-column {column}: its table {path} is not there")
    table = read_table(path, subject_column, fix="--class-column's table has its subjects in participant_id (BIDS), "
                                                 "or in the column train-vqvae --subject-column names")
    if column not in table.columns:
        raise BadInputError(f"--class-column {column}: {table.file} has no such column (its columns: "
                            f"{', '.join(table.columns)})")
    return table


def _other_files(paths: list[str]) -> str:
    """What to say of files found that are neither images nor volumes, for an error: how many, one of them, and
    DICOM's way in."""
    if not paths:
        return ""
    dicom = any(p.lower().endswith(".dcm") for p in paths)
    return (f"; of the {len(paths)} other file{'s' * (len(paths) > 1)} there, such as {printable(paths[0])}, none is "
            "read" + ("; DICOM (.dcm) is read once converted to NIfTI, e.g. by dcm2niix" if dicom else ""))


BIDS_OWN = NOT_RAW | {"code", "stimuli", "phenotype"}   # a BIDS root's folders besides sub-*


def bidsignore(root: str) -> list[re.Pattern]:
    """The patterns of the BIDS root `root`'s .bidsignore, as regular expressions of paths relative to it (none
    without the file), read gitignore's way: a pattern with a `/` before its end is anchored at the root, one
    without matches at any depth; `*` and `?` stay within a folder name, `**/` spans folders, `[...]` is a class,
    and a trailing `/` is dropped (what names a folder names what it holds); `!` (un-ignoring) is not read."""
    path = os.path.join(root, ".bidsignore")
    lines = open(path, encoding="utf-8", errors="replace").read().splitlines() if os.path.isfile(path) else []
    return [_gitignore_regex(line.strip()) for line in lines if line.strip() and not line.startswith(("#", "!"))]


def _gitignore_regex(pattern: str) -> re.Pattern:
    pattern = pattern.rstrip("/")
    anchored = "/" in pattern
    text, i, parts = pattern.lstrip("/"), 0, []
    while i < len(text):
        if text.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif text.startswith("**", i):
            parts.append(".*")
            i += 2
        elif text[i] in "*?":
            parts.append("[^/]*" if text[i] == "*" else "[^/]")
            i += 1
        elif text[i] == "[" and "]" in text[i + 2:]:
            close = text.index("]", i + 2)
            parts.append("[^" + text[i + 2:close] + "]" if text[i + 1] == "!" else text[i:close + 1])
            i = close + 1
        else:
            parts.append(re.escape(text[i]))
            i += 1
    return re.compile(("" if anchored else "(?:.*/)?") + "".join(parts))


def ignored(relative: str, patterns: list[re.Pattern]) -> bool:
    """Whether a path relative to a BIDS root is one that `bidsignore` patterns list, or lies in a folder they list."""
    parts = Path(relative).parts
    return any(p.fullmatch("/".join(parts[:k])) for p in patterns for k in range(1, len(parts) + 1))


def _refuse_data_beside_bids(directory: str, folders: list[str], ignore: list[re.Pattern]):
    """A BIDS root is one class, its sub-* folders: images or volumes in `folders` beside them would be left out,
    unless its .bidsignore lists them (`ignore`)."""
    for name in folders:
        found = next((f for f in _walk(os.path.join(directory, name))
                      if f.lower().endswith(tuple(datasets.folder.IMG_EXTENSIONS) + VOLUME_SUFFIXES)
                      and not ignored(os.path.relpath(f, directory), ignore)), None)
        if found:
            raise BadInputError(f"{printable(directory)} holds BIDS sub-* folders and beside them {printable(found)}: "
                                "a data folder is a BIDS tree or class folders (which may hold BIDS subtrees), "
                                "not both")
