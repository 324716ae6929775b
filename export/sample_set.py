"""A set of generated slices written as a dataset, batch by batch, with the record of how each one was made.

`python driver.py sample --run RUN --num 1000 --out DIR --format png|nifti|npz` writes under DIR/samples/:

    <class>/sub-000000.png ...   one file per sample; the folder is the class sampled by a class-conditional run, else
                                 `all`, so that `--data DIR/samples` reads the set back (every sample its own subject)
    participants.tsv             participant_id and the table conditions each sample was drawn at (a run conditioned
                                 on a participants table), so `train-unet --condition` reads them back too
    manifest.csv                 one row per sample: file, every condition, seed, sampler, steps, guidance ... and the
                                 fingerprints of the UNet and VQ-VAE that made it
    sampling.json                the settings of the whole set, which `--resume` must match
    withheld.csv                 the manifest rows of samples left out as possible copies of training patients
                                 (`evaluate --samples DIR --withhold-flagged`), their files deleted
    dataset_card.md              what the set is, how it was drawn, what was left out and what it was checked for
                                 (export/card.py), written when the set is whole and by evaluate --withhold-flagged
    checks.json                  what evaluate --withhold-flagged checked (the screen, --utility), for the card

Formats: `png` (8-bit, as the training images), `nifti` (volumes/writer.py: one slice, RAS, the training geometry),
`npz` (`image`, float32 (C, H, W) in [-1, 1], nothing rounded). Batch b of a row is drawn after
`torch.manual_seed(batch_seed(seed, b))` (the manifest's `seed`; sets with other --seed values share no batch), so a
sample can be made again from its row's settings, its seed, its batch's size and its place in the batch. A batch's
files are written first and its manifest rows after them, so an interrupted run leaves a manifest that lists only
whole files; `--resume` makes the batches it lacks. A folder that holds files but no sampling.json is not a set and
is never written into.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conditions.table import CLASS, Condition
from runtime.checkpoint import atomic_write, load_checkpoint, remove_unfinished
from runtime.errors import BadInputError
from volumes.run_data import run_geometry, stage1_data
from volumes.writer import SampleGeometry, read_slice, save_nifti, slice_volume

FORMATS = {"png": ".png", "nifti": ".nii.gz", "npz": ".npz"}
UNGROUPED = "all"      # the class folder of samples drawn without a class
SETTINGS = "sampling.json"
MANIFEST = "manifest.csv"
TABLE = "participants.tsv"
WITHHELD = "withheld.csv"
CARD = "dataset_card.md"   # export/card.py: what the set is, how it was drawn and checked
CHECKS = "checks.json"     # evaluate --withhold-flagged's record of what it checked, which the card shows
SAMPLES_LOCK = ".samples.lock"   # in --out, held while a set is written: two writers would interleave its manifest
FIGURES = ("samples.png", "denoise.gif")   # what `sample` writes into --out beside the set: its first samples shown
EARLIER_SAMPLE = re.compile(r"\d{4,}\.png")   # samples/0000.png: what predict.py wrote before sets (until 2026-12-03)
SEEDING = "SeedSequence(seed, batch)"   # sampling.json's `batch_seeds`; a set written before it: seed + batch
ROW_SEEDING = "SeedSequence(seed, batch, row)"   # --row-noise independent: each row of the set its own noise
FLAG_SETTINGS = {"sampler", "steps", "eta", "repeat_last", "repeat_times", "clip_x0", "batch_size", "num", "seed",
                 "format", "guidance"}  # settings of sampling.json that are `sample`'s flags of the same name


def batch_seed(seed: int, batch: int, seeding: str | None = SEEDING, row: int = 0) -> int:
    """The seed of a set's batch: drawn from numpy's SeedSequence of (seed, batch), so that the sets of --seed 0 and
    --seed 1 share no batch (with seed + batch, the sets of 1 and 0 shared all but one); every row of the set draws
    the same, unless `seeding` is ROW_SEEDING: rows after the first of (seed, batch, row). `seeding` None: seed +
    batch, the way of sets written before."""
    if seeding is None:
        return seed + batch
    entropy = [seed, batch, row] if seeding == ROW_SEEDING and row > 0 else [seed, batch]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class SampleSet:
    """The folder of one set of samples: what is written, and writing the rest.

    settings: everything that decides the samples (run fingerprints, sampler, seed, batch size, rows, format, num);
    rows: [(caption, conditions (K,) or None)] as predict.py samples them, or of (num, K) with each sample's own
    (--cohort); conditions: the run's."""

    def __init__(self, folder: Path, settings: dict, rows: list, conditions: list[Condition], record: dict,
                 geometry: SampleGeometry | None = None, resume: bool = False):
        self.folder, self.settings, self.rows, self.conditions = folder, settings, rows, conditions
        self.record, self.geometry = record, geometry or SampleGeometry()
        self.num, self.batch_size, self.suffix = settings["num"], settings["batch_size"], FORMATS[settings["format"]]
        self.width = _width(len(rows) * self.num)
        self.table_columns = [c.name for c in conditions if c.name != CLASS]
        fixed = ["file", "participant_id", "index", "row", "seed", "in_batch", "batch_count", *record]
        clash = sorted({c.name for c in conditions} & set(fixed))
        if clash:  # its values would be written over by the manifest's own column
            raise BadInputError(f"the run is conditioned on {', '.join(clash)}, which the manifest names a column of "
                                f"its own: rename that column of the participants table and train the UNet again")
        self.columns = fixed[:4] + [c.name for c in conditions] + fixed[4:]
        for folder in [self.folder, *(p for p in self.folder.iterdir() if p.is_dir())] if self.folder.is_dir() else []:
            remove_unfinished(folder)  # writes a kill cut short (the set's lock is held)
        self.withheld: set[int] = set()  # drawn and left out as possible copies: never written again (_resumed)
        written = self._resumed() if resume else None
        if written is None:
            self._start()
        self.written = written or set()

    # ------------------------------------------------------------------------- starting and resuming

    def _resumed(self) -> set[int] | None:
        """The samples of a set with these settings already drawn, whole batches of them: those its manifest lists
        whose files exist, and those withheld; None when there is nothing to resume."""
        path = self.folder / SETTINGS
        if not path.exists():
            print(f"--resume: nothing to resume in {self.folder}; starting the set")
            return None
        saved = json.loads(path.read_text())
        if "batch_seeds" not in saved and self.settings.get("batch_seeds") == ROW_SEEDING:
            raise BadInputError(f"{self.folder} was begun before --row-noise, with the rows' noise shared: --resume "
                                f"continues it so; leave --row-noise out, or leave --resume out to replace it")
        newer = {"batch_seeds", "geometry", "device"} - set(saved)  # a set from before these were saved: as it was
        self.settings = {k: v for k, v in self.settings.items() if k not in newer}
        differ = sorted(k for k in set(saved) | set(self.settings) if saved.get(k) != self.settings.get(k))
        if differ:
            shown = "; ".join("the conditions --cohort drew (the run's data or table, --cohort's unit, --cohort-from "
                              "or --cohort-bins, --seed or --num differ)" if _drawn(saved, self.settings, k) else
                              f"{k}: {saved.get(k)} then, {self.settings.get(k)} now" for k in differ)
            flags = all(k in FLAG_SETTINGS and isinstance(saved.get(k), (str, int, float)) for k in differ)
            again = " ".join(f"--{k.replace('_', '-')} {saved[k]}" for k in differ) if flags else ""  # the set's own
            raise BadInputError(f"{self.folder} was sampled with other settings ({shown}); --resume continues a set with "
                                f"the same run and flags{f' (give {again})' if again else ''}; leave --resume out to "
                                f"replace it, or pick another --out")
        left_out = withheld_rows(self.folder)
        withheld = self.withheld = {int(r["index"]) for r in left_out}  # drawn, and left out: not drawn again
        _remove_samples(self.folder, {r["file"] for r in left_out})  # a withholding cut short
        rows = [r for r in self._manifest_rows() if (self.folder / r["file"]).is_file()
                and int(r["index"]) not in withheld]
        listed = {int(r["index"]) for r in rows} | withheld
        rows = [r for r in rows if set(self._indices(*self._place(int(r["index"])))) <= listed]  # whole batches only
        self._rewrite(rows)
        print(f"--resume: {len(rows)} of {len(self.rows) * self.num} samples already written in {self.folder}"
              + (f" ({len(withheld)} more withheld, {WITHHELD})" if withheld else ""))
        return {int(r["index"]) for r in rows} | withheld

    def _manifest_rows(self) -> list[dict]:
        return manifest_rows(self.folder)

    def _start(self):
        """A new set: the sample files of an earlier set in this folder are replaced (those its manifest lists, and
        those of a batch an interruption kept out of it, by their names), other files left as they are (real scans
        a user put beside the samples); a folder with files that is not a set is refused."""
        if self.folder.exists() and not self.folder.is_dir():
            raise BadInputError(f"{self.folder} is a file: give --out a folder")
        is_set = (self.folder / SETTINGS).exists()
        files = [p for p in self.folder.rglob("*") if p.is_file()] if self.folder.is_dir() else []
        before_sets = [p for p in files if p.parent == self.folder and EARLIER_SAMPLE.fullmatch(p.name)]
        if not is_set and len(before_sets) < len(files):
            raise BadInputError(f"{self.folder} holds files but no {SETTINGS}: it is not a sample set, and nothing in "
                                f"it is replaced; pick another --out")
        old = self._manifest_rows() + withheld_rows(self.folder) if is_set else []
        old_settings = json.loads((self.folder / SETTINGS).read_text()) if is_set else None
        leftovers = _sample_files(self.folder, old_settings) if is_set else before_sets
        for path in {(self.folder / row["file"]).resolve() for row in old} | {p.resolve() for p in leftovers}:
            if self.folder.resolve() in path.parents:  # never a file outside the set, whatever a manifest says
                path.unlink(missing_ok=True)
        for sub in (self.folder.iterdir() if self.folder.is_dir() else []):
            if sub.is_dir() and not any(sub.iterdir()):
                sub.rmdir()
        if old:
            print(f"replacing the {len(old)} samples of an earlier set in {self.folder} (--resume would have continued it)")
        elif before_sets:
            print(f"replacing the {len(before_sets)} samples predict.py wrote into {self.folder} before sample sets")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadInputError(f"cannot make {self.folder} ({e.strerror or e}): give --out a folder") from None
        for stale in (WITHHELD, CHECKS, CARD):  # before the new settings: a kill between leaves none of them stale
            (self.folder / stale).unlink(missing_ok=True)
        _write_atomically(self.folder / SETTINGS, json.dumps(self.settings, indent=2) + "\n")
        self._rewrite([])

    def _rewrite(self, rows: list[dict]):
        """The manifest and participants table holding `rows` exactly (the table is made from the manifest)."""
        _write_atomically(self.folder / MANIFEST, _csv(self.columns, rows, ","))
        if self.table_columns:
            _write_atomically(self.folder / TABLE, _csv(["participant_id", *self.table_columns], rows, "\t", "n/a"))

    # ------------------------------------------------------------------------- writing

    def batches(self, row: int) -> set[int]:
        """The batches of `row` already written whole."""
        count = math.ceil(self.num / self.batch_size)
        return {b for b in range(count)
                if all(i in self.written for i in self._indices(row, b))}

    def _place(self, index: int) -> tuple[int, int]:
        """(row, batch) of sample `index`."""
        return index // self.num, index % self.num // self.batch_size

    def _indices(self, row: int, batch: int) -> range:
        start = row * self.num + batch * self.batch_size
        return range(start, min(start + self.batch_size, (row + 1) * self.num))

    def _conditions(self, index: int) -> torch.Tensor | None:
        """Sample `index`'s conditions (K,): its row's, or its own in a row of (num, K) (--cohort); None: none."""
        y = self.rows[index // self.num][1]
        return y[index % self.num] if y is not None and y.dim() == 2 else y

    def file(self, index: int) -> str:
        """The path of sample `index` in the folder: <class>/sub-NNNNNN<suffix>."""
        y = self._conditions(index)
        names = [c.name for c in self.conditions]
        sampled_class = y is not None and CLASS in names  # an unconditional row of a class-conditional run has none
        group = self.conditions[names.index(CLASS)].decode(float(y[names.index(CLASS)])) if sampled_class else None
        return f"{group or UNGROUPED}/{self._subject(index)}{self.suffix}"

    def _subject(self, index: int) -> str:
        return f"sub-{index:0{self.width}d}"

    def batch_seed(self, batch: int, row: int) -> int:
        """The seed of batch `batch` of row `row` (every row draws the same, unless --row-noise independent)."""
        return batch_seed(self.settings["seed"], batch, self.settings.get("batch_seeds"), row)

    def write(self, row: int, batch: int, images: torch.Tensor):
        """A batch's images (n, C, H, W) in [-1, 1]: its files, then its rows in the manifest and participants table."""
        caption = self.rows[row][0]
        entries = []
        for k, (index, image) in enumerate(zip(self._indices(row, batch), images)):
            if index in self.withheld:  # a batch drawn again (another of its files lost): its withheld sample stays out
                continue
            path = self.folder / self.file(index)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._save(image, path)
            y = self._conditions(index)
            values = {c.name: (c.decode(float(y[j])) if y is not None else None) for j, c in enumerate(self.conditions)}
            entries.append({"file": self.file(index), "participant_id": self._subject(index), "index": index,
                            "row": caption, **values, "seed": self.batch_seed(batch, row), "in_batch": k,
                            "batch_count": len(images), **self.record})
        _append(self.folder / MANIFEST, _csv(self.columns, entries, ",", header=False))
        if self.table_columns:
            _append(self.folder / TABLE, _csv(["participant_id", *self.table_columns], entries, "\t", "n/a", header=False))
        self.written.update(int(e["index"]) for e in entries)

    def _save(self, image: torch.Tensor, path: Path):
        """One sample's file, written whole and on disk before the manifest lists it (a power cut leaves no empty
        file listed)."""
        fmt = self.settings["format"]
        if fmt == "png":
            pixels = ((image.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            atomic_write(path, lambda f: picture.save(f, format="PNG"))
        elif fmt == "npz":
            atomic_write(path, lambda f: np.savez_compressed(f, image=image.float().numpy()))
        else:  # a NIfTI volume holds one channel: the mean of the (grey, replicated) channels
            save_nifti(slice_volume(image.float().mean(0).numpy(), self.geometry), path)

    def first(self, row: int, count: int) -> torch.Tensor:
        """The first `count` samples of `row`, read back from their files (the grid's images): (count, C, H, W); a
        withheld sample's place is taken by the next one, and a row whose samples were all withheld gives none."""
        kept = [i for i in range(row * self.num, (row + 1) * self.num) if i not in self.withheld][:count]
        return torch.stack([read_sample(self.folder / self.file(i)) for i in kept]) if kept else torch.empty(0)


def _drawn(saved: dict, settings: dict, key: str) -> bool:
    """Whether the setting `key` that differs is the rows of a --cohort set (then or now), shown as a hash."""
    rows = (saved.get(key) or []) + (settings.get(key) or []) if key == "rows" else []
    return any(isinstance(row, list) and isinstance(row[1], dict) and "drawn" in row[1] for row in rows)


def manifest_rows(folder: Path) -> list[dict]:
    """The rows of a set's manifest, without a last line cut off by an interruption (no newline at its end)."""
    path = folder / MANIFEST
    if not path.exists():
        return []
    text = path.read_text()
    text = text[:text.rfind("\n") + 1]
    return [r for r in csv.DictReader(io.StringIO(text)) if None not in r.values()]


def withheld_rows(folder: Path) -> list[dict]:
    """The manifest rows of the samples `withhold` left out of the set in `folder`."""
    path = folder / WITHHELD
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.is_file() else []


def withhold(folder: Path, why: dict[str, dict]) -> int:
    """Leaves samples out of the set in `folder` (a possible copy of a training patient, say): for each file, as
    the manifest names it, `why` (columns saying what flagged it). `sample`'s samples.png and denoise.gif beside
    the set, which show its first samples, are removed; its manifest row, with `why`, moves into withheld.csv, its
    row of participants.tsv goes, then its file is deleted (and a class folder left empty); `--resume` does not draw
    it again, and `evaluate --samples` counts it as drawn. Each step is written whole, and withholding again (or
    `--resume`) finishes one an interruption cut short. Returns how many samples the set has withheld in all."""
    rows, before = manifest_rows(folder), withheld_rows(folder)
    unknown = sorted(set(why) - {r["file"] for r in rows + before})
    if unknown:
        raise BadInputError(f"{folder}'s manifest lists no {unknown[0]}: not a sample of this set")
    already = {r["file"] for r in before}
    withheld = before + [{**r, **why[r["file"]]} for r in rows if r["file"] in why and r["file"] not in already]
    if len(withheld) > len(before):  # first the figures that may show them, the record, then the rows, the files
        shown = [folder.parent / f for f in FIGURES if folder.name == "samples" and (folder.parent / f).is_file()]
        for path in shown:
            path.unlink()
        if shown:
            print(f"removed {' and '.join(map(str, shown))}: they show the set's first samples, which may be among "
                  f"those withheld (`sample --resume` with the set's flags draws samples.png again, without them)")
        _write_atomically(folder / WITHHELD, _csv(list(dict.fromkeys(k for r in withheld for k in r)), withheld, ","))
    gone = {r["file"] for r in withheld}
    kept = [r for r in rows if r["file"] not in gone]
    _write_atomically(folder / MANIFEST, _csv(_columns(folder / MANIFEST, ","), kept, ","))
    if (folder / TABLE).is_file():
        gone_ids = {r["participant_id"] for r in withheld}
        table = list(csv.DictReader(io.StringIO((folder / TABLE).read_text()), delimiter="\t"))
        _write_atomically(folder / TABLE, _csv(_columns(folder / TABLE, "\t"),
                                               [r for r in table if r["participant_id"] not in gone_ids], "\t"))
    _remove_samples(folder, gone)
    return len(withheld)


def _remove_samples(folder: Path, names: set[str]):
    """The sample files `names` of the set in `folder` deleted (never a file outside it, whatever a manifest says),
    and the class folders that leaves empty: `--data` refuses an empty class folder."""
    for name in names:
        path = (folder / name).resolve()
        if folder.resolve() in path.parents:
            path.unlink(missing_ok=True)
            if path.parent != folder.resolve() and path.parent.is_dir() and not any(path.parent.iterdir()):
                path.parent.rmdir()


def _columns(path: Path, delimiter: str) -> list[str]:
    """The header of a CSV or TSV the set wrote."""
    return next(csv.reader(io.StringIO(path.read_text()), delimiter=delimiter))


def _width(count: int) -> int:
    """The digits of a set's sample numbers: sub-000000 ... for a set of `count` samples."""
    return max(6, len(str(count - 1)))


def _sample_files(folder: Path, settings: dict) -> list[Path]:
    """The files in `folder`'s class folders named as the set of `settings` names its samples, <class>/sub-NNNNNN
    <suffix> with its number of digits and below its count: a file of the user's beside them is not one (a set
    saved without these settings: none)."""
    if not {"rows", "num", "format"} <= set(settings):
        return []
    count = len(settings["rows"]) * settings["num"]
    name = re.compile(rf"sub-(\d{{{_width(count)}}}){re.escape(FORMATS[settings['format']])}")
    return [p for sub in folder.iterdir() if sub.is_dir() for p in sub.iterdir()
            if (m := name.fullmatch(p.name)) and int(m[1]) < count]


def saved_geometry(folder: Path) -> SampleGeometry | None:
    """The NIfTI geometry a set in `folder` was written with (its sampling.json), so that a resumed set keeps it even
    where the run's data folder is not at hand; None for no set, or one saved before the geometry was."""
    path = folder / SETTINGS
    saved = json.loads(path.read_text()).get("geometry") if path.is_file() else None
    return SampleGeometry(**saved) if saved else None


def nifti_geometry(run: Path, root: str | None = None) -> SampleGeometry:
    """The geometry of a run's samples as NIfTI: the one stage 1 saved (since 2026-12-08), else `run_geometry` of the
    run's data folder checked to hold stage 1's files (`root`, --data: where it is now). Neither: an error, not a
    header that would misstate the pixel size and intensity range the run was trained at."""
    saved = load_checkpoint(Path(run) / "vqvae.pt", "vqvae").get("sample_geometry")
    if saved is not None:
        geometry = SampleGeometry(**saved)
    else:
        try:
            _, data = stage1_data(run, root)
        except BadInputError as e:
            raise BadInputError(f"--format nifti gives each header the pixel size and intensity range of the run's "
                                f"training volumes, read from its data (a stage 1 older than 2026-12-08 did not save "
                                f"them): {e} (--data says where the data is now; or write --format png)") from e
        geometry = run_geometry(data)
    if not geometry.known:
        print("the run was trained on 2D images: the NIfTI header assumes 1 mm pixels in the axial plane")
    return geometry


def read_sample(path: Path) -> torch.Tensor:
    """A sample file of any format back to (C, H, W) float in [-1, 1]."""
    name = str(path).lower()
    if name.endswith(".npz"):
        with np.load(path) as f:
            return torch.from_numpy(f["image"])
    if name.endswith((".nii", ".nii.gz")):
        return torch.from_numpy(read_slice(path).copy())[None]
    pixels = torch.from_numpy(np.array(Image.open(path))).float() / 127.5 - 1
    return pixels[None] if pixels.dim() == 2 else pixels.permute(2, 0, 1)


def _csv(columns: list[str], rows: list[dict], delimiter: str, missing: str = "", header: bool = True) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, delimiter=delimiter, extrasaction="ignore", lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({k: missing if r.get(k) in (None, "") else r[k] for k in columns} for r in rows)  # "": read back
    return text.getvalue()


def _append(path: Path, text: str):
    """Lines appended and on disk before the next batch starts."""
    with open(path, "a") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _write_atomically(path: Path, text: str):
    atomic_write(path, lambda f: f.write(text.encode()))
