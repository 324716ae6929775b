"""What a UNet is conditioned on: the class folders and the columns of a participants table, joined to each image
by its subject, and the values asked for when sampling (`--set`, `--sweep`).

A participants table is a CSV or TSV with one row per subject (BIDS `participants.tsv`, found at the data folder's
root on its own; any other with `--labels FILE`). Its subject column (`participant_id`, else `--subject-column`)
is matched to the subject of each image as the run's layout names it, with or without BIDS' `sub-` prefix. A
column whose values are all numbers is a continuous covariate, scaled to [0, 1] by the training subjects' range;
any other is a category (`name:category` or `name:continuous` says which). Missing values (`n/a`, empty), subjects
the table lacks and categories the run does not know are "not given" (NaN): that condition is left unconditioned
for them, never guessed, and counted in the one-line report.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from runtime.errors import BadInputError

CLASS = "class"                                         # the condition of the class folders (AD, NC ...)
MISSING = {"", "n/a", "na", "nan", "none", "null"}      # missing values, compared in lower case
KINDS = ("category", "continuous")


def condition_list(text: str) -> list[str]:
    """--condition: 'group,age,sex:category' -> ['group', 'age', 'sex:category']."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        kind = name.partition(":")[2]
        if kind and kind not in KINDS:
            raise argparse.ArgumentTypeError(f"{name!r}: the kind after ':' is 'category' or 'continuous'")
    if not names or len({n.partition(":")[0] for n in names}) < len(names):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated column names, got {text!r}")
    return names


@dataclass
class Condition:
    """One condition of a UNet, saved in its checkpoint: a category (its values, in index order) or a continuous
    covariate (the training subjects' range [low, high], mapped to [0, 1])."""
    name: str
    kind: str
    values: list[str] = field(default_factory=list)
    low: float = 0.0
    high: float = 1.0

    @property
    def size(self) -> int:
        """What the UNet's config holds for it: the number of categories, 0 for a continuous covariate."""
        return len(self.values) if self.kind == "category" else 0

    def encode(self, text: str | None) -> float:
        """A table's value as the UNet takes it: a category's index, a covariate scaled; NaN when it is missing or an
        unknown category."""
        if text is None or text.strip().lower() in MISSING:
            return math.nan
        if self.kind == "category":
            return float(self.values.index(text.strip())) if text.strip() in self.values else math.nan
        number = _number(text)
        return math.nan if number is None else (number - self.low) / ((self.high - self.low) or 1.0)

    def parse(self, text: str) -> float:
        """A value asked for by --set or --sweep, checked: a known category, or a number (a warning outside the
        training range, where the model has seen nobody; an error beyond ten times its width from it, where the
        covariate's embedding only extrapolates: 1e39 gave NaN images, 1e41 a crash)."""
        if self.kind == "category":
            if text not in self.values:
                raise BadInputError(f"{self.name}={text}: {self.name} is one of {', '.join(self.values)} in this run")
        elif _number(text) is None:
            raise BadInputError(f"{self.name}={text}: {self.name} is a number in this run")
        elif not -10 <= self.encode(text) <= 11:
            raise BadInputError(f"{self.name}={text} is far outside the training subjects' range {self.low:g}-"
                                f"{self.high:g}: nothing can be said of it")
        elif not self.low <= _number(text) <= self.high:
            print(f"warning: {self.name}={text} is outside the training subjects' range {self.low:g}-{self.high:g}")
        return self.encode(text)

    def decode(self, value: float) -> str | None:
        """`encode` undone: the value as a table writes it (a category's name, a covariate in its units), None for NaN."""
        if math.isnan(value):
            return None
        if self.kind == "category":
            return self.values[int(value)]
        return f"{self.low + value * (self.high - self.low):.6g}"

    def describe(self) -> str:
        return f"{self.name} ({'/'.join(self.values)})" if self.kind == "category" else \
               f"{self.name} ({self.low:g}-{self.high:g})"


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------- the participants table

@dataclass
class Table:
    """A participants table read whole: {subject: {column: value}}, with the file's name, hash and subject column."""
    file: str
    sha1: str
    subject_column: str
    rows: dict[str, dict[str, str]]

    @property
    def columns(self) -> list[str]:
        return list(next(iter(self.rows.values())))

    def row(self, subject: str) -> dict[str, str] | None:
        return self.rows.get(_subject_key(subject))

    def record(self) -> dict:
        """What a run saves of it: which file, which version of it, joined on which column."""
        return {"file": self.file, "sha1": self.sha1, "subject_column": self.subject_column}


def _subject_key(subject: str) -> str:
    """A subject as tables and file names both name it: BIDS' `sub-` prefix left out, so `sub-01` matches `01`."""
    subject = subject.strip()
    return subject[4:] if subject.startswith("sub-") else subject


def find_table(data_folder: Path, labels: str | None) -> Path | None:
    """--labels FILE, else the data folder's own participants.tsv (BIDS), else None; as an absolute path, which the run
    saves, so that it is found again from any working directory."""
    if labels:
        return Path(os.path.abspath(labels))
    own = Path(os.path.abspath(data_folder)) / "participants.tsv"
    return own if own.is_file() else None


def saved_table(record: dict, data_folder: Path, labels: str | None = None) -> Table:
    """The participants table a run trained with: --labels FILE where given (where it is now: its contents must be
    the run's, by the hash it saved), else where it was (a run before 2026-12-07 saved the path as typed, relative to
    the working directory of then; found changed, it is returned as it is, for the caller to refuse or warn), else
    the file of its name in the data folder with the run's contents (a BIDS participants.tsv moved with its images,
    --data NEW). Not found: one line."""
    if labels:
        table = read_table(Path(os.path.abspath(labels)), record["subject_column"])
        if table.sha1 != record["sha1"]:
            raise BadInputError(f"--labels {labels} is not the participants table this run trained with "
                                f"({record['file']}): their contents differ")
        return table
    saved, beside_data = Path(record["file"]), Path(os.path.abspath(data_folder)) / Path(record["file"]).name
    if saved.is_file():
        return read_table(saved, record["subject_column"])
    with contextlib.suppress(BadInputError):  # another file of that name: not this run's table
        table = read_table(beside_data, record["subject_column"]) if beside_data.is_file() else None
        if table is not None and table.sha1 == record["sha1"]:
            return table
    raise BadInputError(f"this run's participants table {saved} is not there (nor in {data_folder}): give --labels "
                        f"FILE, where it is now (it is checked to be the table the run trained with)")


def read_table(path: Path, subject_column: str | None = None,
               fix: str = "name the subjects' column with --subject-column") -> Table:
    """A CSV or TSV (by its name; otherwise sniffed) with a header row and one row per subject; `fix`: what to do
    where its subject column is missing."""
    if not path.is_file():
        raise BadInputError(f"participants table {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInputError(f"participants table {path} is not UTF-8 text") from None
    delimiter = {".tsv": "\t", ".csv": ","}.get(path.suffix.lower())
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:4096], delimiters=",\t;").delimiter
        except csv.Error:
            raise BadInputError(f"cannot tell the columns of {path} apart: name it .csv or .tsv") from None
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    columns = [c.strip() for c in reader.fieldnames or []]
    twice = sorted({c for c in columns if columns.count(c) > 1 and c})
    if twice:
        raise BadInputError(f"participants table {path} has two columns named {', '.join(map(repr, twice))}: which "
                            "one is meant? rename one")
    rows = [{c.strip(): (v or "").strip() for c, v in row.items() if c is not None} for row in reader]
    if not rows:
        raise BadInputError(f"participants table {path} has no rows")
    column = subject_column or "participant_id"
    if column not in columns:
        other = next((name for d, name in (("\t", "tabs"), (",", "commas")) if d != delimiter and len(columns) == 1
                      and d in columns[0]), None)  # a CSV saved as participants.tsv: one column of every name
        raise BadInputError(f"participants table {path} has no column {column!r} (its columns: {', '.join(columns)}); "
                            + (f"its columns are parted by {other}, and a {path.suffix} file's may not be: save it "
                               f"with the other separator or the other suffix" if other else fix))
    by_subject = {}
    for row in rows:
        key = _subject_key(row[column])
        if key in by_subject and by_subject[key] != row:
            differ = [c for c in columns if by_subject[key].get(c) != row.get(c)]
            raise BadInputError(f"participants table {path} has two different rows for subject {row[column]!r} (in "
                                f"{', '.join(map(repr, differ[:4]))}{' ...' if len(differ) > 4 else ''}): it takes one "
                                f"row per subject, so a table of visits or scans (ADNI's search CSV, ADNIMERGE) needs "
                                f"one row chosen for each, e.g. the baseline visit's (volumes/README.md, ADNI's "
                                f"tables)")
        by_subject[key] = row
    return Table(str(path), hashlib.sha1(raw).hexdigest(), column, by_subject)


# ----------------------------------------------------------------------------- conditions of a training set

def build_conditions(names: list[str], table: Table | None, subjects: list[str], classes: list[str]) -> list[Condition]:
    """The conditions `names` (from --condition), as the training subjects define them: `class` the class folders;
    a table column a category of the values it takes, or a covariate with their range."""
    conditions = []
    for spec in names:
        name, _, kind = spec.partition(":")
        if name == CLASS:
            conditions.append(Condition(CLASS, "category", list(classes)))
            continue
        if table is None:
            raise BadInputError(f"--condition {name}: no participants table (give --labels FILE, or put a "
                                f"participants.tsv in the data folder)")
        if name not in table.columns:
            raise BadInputError(f"--condition {name}: {table.file} has no column {name!r} (its columns: "
                                f"{', '.join(table.columns)}; the class folders are 'class')")
        given = [row[name] for row in (table.row(s) for s in set(subjects)) if row and row[name].lower() not in MISSING]
        if not given:
            raise BadInputError(f"--condition {name}: no training subject has a value of it in {table.file}")
        numbers = [_number(v) for v in given]
        words = sorted({v for v, n in zip(given, numbers) if n is None})
        if not kind and words and len(words) < sum(n is not None for n in numbers):  # mostly numbers: a typo, or 90+
            raise BadInputError(f"--condition {name}: {table.file} holds numbers and {', '.join(map(repr, words[:3]))}"
                                f"{' ...' if len(words) > 3 else ''} in it: correct those, write them n/a, or say "
                                f"{name}:category (every value a category) or {name}:continuous")
        kind = kind or ("continuous" if not words else "category")
        if kind == "continuous":
            if any(n is None for n in numbers):
                bad = next(v for v, n in zip(given, numbers) if n is None)
                raise BadInputError(f"--condition {name}:continuous: {table.file} holds {bad!r} in it, not a number")
            conditions.append(Condition(name, kind, low=min(numbers), high=max(numbers)))
        else:
            conditions.append(Condition(name, kind, sorted(set(given))))
    return conditions


def condition_matrix(conditions: list[Condition], table: Table | None, subjects: list[str], class_labels: torch.Tensor,
                     ) -> tuple[torch.Tensor, str]:
    """(y (N, K) float, NaN where not given; a one-line report) for N images of `subjects` with `class_labels`."""
    columns, notes = [], []
    rows = {s: table.row(s) for s in set(subjects)} if table is not None else {}
    for c in conditions:
        if c.name == CLASS:
            columns.append(class_labels.float())
            continue
        values = [rows[s][c.name] if rows[s] else None for s in subjects]
        column = torch.tensor([c.encode(v) for v in values], dtype=torch.float32)
        per_subject = {s: (v, e) for s, v, e in zip(subjects, values, column.tolist()) if rows[s]}
        missing = sum(1 for v, _ in per_subject.values() if v is None or v.strip().lower() in MISSING)
        unknown = sum(1 for _, e in per_subject.values() if math.isnan(e)) - missing
        notes.append(f"{c.name}: {missing} n/a" + (f", {unknown} unknown" if unknown else ""))
        columns.append(column)
    y = torch.stack(columns, dim=1) if columns else torch.zeros(len(subjects), 0)
    report = "conditions " + ", ".join(c.describe() for c in conditions)
    if table is not None:
        absent = sorted(s for s, row in rows.items() if row is None)
        slices = sum(1 for s in subjects if rows[s] is None)
        report += (f" from {table.file} (subjects by {table.subject_column}): {len(rows) - len(absent)} of {len(rows)} "
                   f"subjects in the table" + (f"; {len(absent)} not ({slices} images, unconditioned on its columns: "
                                               f"{', '.join(absent[:3])}{' ...' if len(absent) > 3 else ''})"
                                               if absent else "") + "; per subject " + ", ".join(notes))
    return y, report


# ----------------------------------------------------------------------------- the values asked for when sampling

def asked_values(conditions: list[Condition], settings: list[str]) -> torch.Tensor:
    """--set NAME=VALUE ... -> the (K,) conditions vector, NaN where none is set."""
    y = torch.full((len(conditions),), math.nan)
    for name, value in (_pair(s) for s in settings):
        k = _index(conditions, name)
        y[k] = conditions[k].parse(value)
    return y


def sweep_rows(conditions: list[Condition], base: torch.Tensor, sweep: str | None) -> list[tuple[str, torch.Tensor]]:
    """--sweep NAME=V1,V2,... -> [(caption, conditions vector)] one per value, the --set values kept in each; without a
    sweep one row of `base`. `NAME=all` sweeps every category of NAME."""
    if sweep is None:
        return [("", base)]
    name, values = _pair(sweep)
    k = _index(conditions, name)
    if values == "all" and conditions[k].kind == "category":
        values = ",".join(conditions[k].values)
    rows = []
    for value in values.split(","):
        y = base.clone()
        y[k] = conditions[k].parse(value)
        rows.append((f"{name}={value}", y))
    return rows


def _pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise BadInputError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def _index(conditions: list[Condition], name: str) -> int:
    names = [c.name for c in conditions]
    if name not in names:
        known = ", ".join(names) or "none: it was trained unconditional"
        raise BadInputError(f"{name!r} is not a condition of this run (its conditions: {known})")
    return names.index(name)


def saved_conditions(ckpt: dict) -> list[Condition]:
    """The conditions a UNet checkpoint was trained with; a class-conditional one written before tables existed has
    the class folders (`classes`)."""
    if "conditions" in ckpt:
        return [Condition(**c) for c in ckpt["conditions"]]
    if ckpt["config"].get("num_classes"):
        return [Condition(CLASS, "category", list(ckpt.get("classes") or []))]
    return []


def to_saved(conditions: list[Condition]) -> list[dict]:
    return [asdict(c) for c in conditions]


def subjects_of(paths: list[str], subject: Callable[[str], str]) -> list[str]:
    """The subject of each path by the run's rules, each worked out once."""
    owners = {p: subject(p) for p in set(paths)}
    return [owners[p] for p in paths]
