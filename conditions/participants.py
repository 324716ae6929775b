"""The participants table a run's conditions come from, read whole and joined to each image by its subject, and by its
session in a table of sessions:

    python driver.py train-unet --run runs/demo_c --condition group,age,sex   # the data folder's participants.tsv
    python driver.py train-unet --run runs/adni --condition age --labels idaSearch.csv --session-column "Image Data ID"

`train-unet` reads it (`find_table`, `read_table`, `with_bids_sessions`); `--resume`, `evaluate` and `sample --cohort`
read it again, checked to be the run's by its hash (`saved_table`); `train-vqvae --class-column` takes its classes
from it (volumes/layouts.py). What a UNet makes of its columns is conditions/table.py's.

A participants table is a CSV or TSV with one row per subject (BIDS `participants.tsv`, found at the data folder's
root on its own; any other with `--labels FILE`). Its subject column (`participant_id`, else `--subject-column`)
is matched to the subject of each image as the run's layout names it, with or without BIDS' `sub-` prefix.

Values that change between a subject's scans (age at each visit) come from a table of sessions, a row per scan or
visit: one table with a session column (`session_id`, BIDS' and ClinicaDL's name, else `--session-column`, e.g.
`Image Data ID` of ADNI's search CSV), or the `sub-<label>/sub-<label>_sessions.tsv` files beside a BIDS
participants.tsv. A row's session names a folder of each of its images' paths, or a part of the file's name between
underscores (`ses-M12` of `sub-01_ses-M12_T1w.nii.gz`, `I13722` of ADNI's `..._S13408_I13722.nii`), with or without
BIDS' `ses-` prefix. A subject with sessions takes the columns they hold from its own session alone: where the table
lacks that session, they are not given.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from runtime.errors import BadInputError

SESSION_ID = "session_id"                               # the session column of BIDS' sessions.tsv, ClinicaDL's tables


@dataclass
class Table:
    """A participants table read whole: {subject: {column: value}}, with the file's name, hash and subject column. A
    table of sessions also holds {subject: {session: {column: value}}}: from the file's `session_column` (its subjects'
    rows then hold their subject column alone), or from the BIDS `session_files` beside it."""
    file: str
    sha1: str
    subject_column: str
    rows: dict[str, dict[str, str]]
    session_column: str | None = None
    sessions: dict[str, dict[str, dict[str, str]]] = field(default_factory=dict, repr=False)
    session_files: list[str] | None = None     # sub-*/sub-*_sessions.tsv, relative to the file's folder
    image_ids: bool = True      # a file name's first bare number may name ADNI's image ID I<number> (`session_of`);
    # False: as a run read its table before that rule (2026-12-07), when nothing did

    @functools.cached_property
    def session_columns(self) -> set[str]:
        """The columns its sessions hold: a subject with sessions takes them from its own session alone."""
        return {c for visits in self.sessions.values() for row in visits.values() for c in row}

    @property
    def columns(self) -> list[str]:
        names = dict.fromkeys(next(iter(self.rows.values()), {}))
        for row in (row for visits in self.sessions.values() for row in visits.values()):
            names.update(dict.fromkeys(row))
        return list(names)

    def row(self, subject: str) -> dict[str, str] | None:
        return self.rows.get(subject_key(subject))

    def record(self) -> dict:
        """What a run saves of it: which file, which version of it, joined on which column (and sessions on which)."""
        return {"file": self.file, "sha1": self.sha1, "subject_column": self.subject_column,
                **({"session_column": self.session_column} if self.session_column else {}),
                **({"session_files": self.session_files} if self.session_files is not None else {}),
                **({"image_ids": True} if self.image_ids else {})}

    def image_rows(self, subjects: list[str], paths: list[str] | None = None, root: str | None = None,
                   ) -> tuple[list[dict[str, str] | None], list[tuple[str, str | None]]]:
        """Each image's values: its subject's row; for a subject with sessions, the columns sessions hold from the
        session its path names (`paths`, relative to the data folder `root`) alone, not given where the table lacks
        that session (never another visit's, nor the participants' value of them); None for a subject the table
        lacks. With each image's visit: (subject, its session or None). No image's session found in a table of
        sessions is an error: its session values cannot name the files."""
        joined, rows, visits = {}, [], []
        for subject, path in zip(subjects, paths or [None] * len(subjects)):
            if (subject, path) not in joined:
                sessions = self.sessions.get(subject_key(subject), {})
                session = (session_of(os.path.relpath(path, root) if root else path, sessions, self.image_ids)
                           if path else None)
                row = self.row(subject)
                if sessions:
                    row = {c: v for c, v in (row or {}).items() if c not in self.session_columns}
                    row.update(sessions[session] if session is not None else {})
                joined[subject, path] = row, (subject_key(subject), session)
            rows.append(joined[subject, path][0])
            visits.append(joined[subject, path][1])
        ours = [session for subject, session in visits if subject in self.sessions]  # images of subjects with some
        if ours and all(session is None for session in ours):
            subject = next(iter(self.sessions))
            column = self.session_column or SESSION_ID
            raise BadInputError(f"{self.file}: no image's path names one of its sessions (in {column}, such as "
                                f"{next(iter(self.sessions[subject]))!r} of subject {subject!r}; an image: "
                                f"{paths[0]!r}): a session names a folder of its images, or a part of their file "
                                f"names between underscores")
        return rows, visits


def subject_key(subject: str) -> str:
    """A subject as tables and file names both name it: BIDS' `sub-` prefix left out, so `sub-01` matches `01`."""
    subject = subject.strip()
    return subject[4:] if subject.startswith("sub-") else subject


def _session_key(session: str) -> str:
    """A session as tables and paths both name it: BIDS' `ses-` prefix left out, so `ses-M12` matches `M12`."""
    session = session.strip()
    return session[4:] if session.startswith("ses-") else session


def session_of(relative: str, sessions: dict, image_ids: bool = True, named: str = "sessions {} of its subject",
               fix: str = "rename its folder, or leave the other out of the table") -> str | None:
    """Which of a subject's `sessions` the image at `relative` (its path in the data folder) belongs to: the one a
    folder of the path names, or a part of the file's name between underscores (a number only as BIDS' `ses-<n>`:
    LONI's file names hold bare counters, `_1_`), else, where none does and with `image_ids`, ADNI's image ID
    `I<number>` that the first bare number of the file's name writes (prepared slice sets name `I218391`'s slices
    `218391_78.jpeg`); or None; two are an error, which `named` (its {} the two) and `fix` word. `sessions` may be any
    dict keyed by sessions (`scan_subjects`: every scan of a table, of any subject)."""
    parts = Path(relative).parts
    words = parts[-1].split(".")[0].split("_")
    names = {*parts[:-1], parts[-1], *(p for p in words if p.startswith("ses-") or not p.isdigit())}
    found = sorted({_session_key(n) for n in names} & sessions.keys())
    number = next((p for p in words if p.isdigit()), None)
    if not found and image_ids and f"I{number}" in sessions:
        found = [f"I{number}"]
    if len(found) > 1:
        raise BadInputError(f"{relative!r} names {named.replace('{}', ' and '.join(map(repr, found)), 1)}: which "
                            f"is it? {fix}")
    return found[0] if found else None


def scan_of(relative: str, scans: dict, table: str | Path) -> str | None:
    """The scan of a table of scans (`table`, keys of `scans`) the file at `relative` names (`session_of`), or None;
    two are an error."""
    return session_of(relative, scans, named=f"scans {{}} of {table}",
                      fix="rename the file or its folder so that it names one")


def scan_subjects(table: Table, relatives: list[str]) -> tuple[dict[str, str], list[str]]:
    """Whose each file is, by a table of scans (train-vqvae --labels with --session-column, ADNI's search CSV): {scan:
    subject} of the scans the files at `relatives` (paths in the data folder) name (`session_of` among every scan of
    the table), and the files that name none. A scan of two subjects in the table is an error."""
    owner = {}
    for subject, scans in table.sessions.items():
        for scan in scans:
            if not subject:
                raise BadInputError(f"{table.file}: scan {scan!r} has no {table.subject_column}: whose is it? every "
                                    f"row of a table of scans names its subject")
            if owner.setdefault(scan, subject) != subject:
                raise BadInputError(f"{table.file}: scan {scan!r} ({table.session_column}) is of two subjects, "
                                    f"{owner[scan]!r} and {subject!r}: a table of scans names each scan once, by an "
                                    f"ID of its own (ADNI's Image Data ID); visits named alike for every subject "
                                    f"(M00, M12) are sessions, for train-unet --labels")
    found, unnamed = {}, []
    for relative in relatives:
        scan = scan_of(relative, owner, table.file)
        if scan is None:
            unnamed.append(relative)
        else:
            found[scan] = owner[scan]
    return dict(sorted(found.items())), unnamed


def scan_rows(table: Table, relatives: list[str]) -> list[dict[str, str] | None]:
    """Each file's row of a table of scans, by the scan the file at `relative` names (None: it names none)."""
    rows = {scan: row for scans in table.sessions.values() for scan, row in scans.items()}
    return [rows.get(scan_of(relative, rows, table.file)) for relative in relatives]


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
    --data NEW). Not found: one line. A table of sessions is read as the run read it (`Table.record`)."""
    def read(path: Path) -> Table:
        table = replace(read_table(path, record["subject_column"], session_column=record.get(
            "session_column")), image_ids=record.get("image_ids", False))  # as the run joined it
        if record.get("session_files") is None:
            return table
        beside = all((path.parent / f).is_file() for f in record["session_files"])  # else the table moved alone
        return with_bids_sessions(table, None if beside else Path(os.path.abspath(data_folder)))

    if labels:
        table = read(Path(os.path.abspath(labels)))
        if table.sha1 != record["sha1"]:
            raise BadInputError(f"--labels {labels} is not the participants table this run trained with "
                                f"({record['file']}): their contents differ")
        return table
    saved, beside_data = Path(record["file"]), Path(os.path.abspath(data_folder)) / Path(record["file"]).name
    if saved.is_file():
        return read(saved)
    with contextlib.suppress(BadInputError):  # another file of that name: not this run's table
        table = read(beside_data) if beside_data.is_file() else None
        if table is not None and table.sha1 == record["sha1"]:
            return table
    raise BadInputError(f"this run's participants table {saved} is not there (nor in {data_folder}): give --labels "
                        f"FILE, where it is now (it is checked to be the table the run trained with)")


def read_table(path: Path, subject_column: str | None = None,
               fix: str = "name the subjects' column with --subject-column", session_column: str | None = None,
               ) -> Table:
    """A CSV or TSV (by its name; otherwise sniffed) with a header row and one row per subject, or with
    `session_column` one row per session (`SESSION_ID` only where the table has it); `fix`: what to do where its
    subject column is missing."""
    raw, delimiter, columns, rows = _read_rows(path, "participants table")
    column = subject_column or "participant_id"
    if column not in columns:
        other = next((name for d, name in (("\t", "tabs"), (",", "commas")) if d != delimiter and len(columns) == 1
                      and d in columns[0]), None)  # a CSV saved as participants.tsv: one column of every name
        raise BadInputError(f"participants table {path} has no column {column!r} (its columns: {', '.join(columns)}); "
                            + (f"its columns are parted by {other}, and a {path.suffix} file's may not be: save it "
                               f"with the other separator or the other suffix" if other else fix))
    if session_column not in columns and session_column not in (None, SESSION_ID):
        raise BadInputError(f"--session-column {session_column}: {path} has no such column (its columns: "
                            f"{', '.join(columns)})")
    if session_column in columns:  # its subjects' own rows hold no values: every value is a session's
        sessions = _rows_by(rows, column, session_column, path)
        by_subject = {subject: {column: next(iter(visits.values()))[column]} for subject, visits in sessions.items()}
        return Table(str(path), hashlib.sha1(raw).hexdigest(), column, by_subject, session_column, sessions)
    return Table(str(path), hashlib.sha1(raw).hexdigest(), column, _rows_by(rows, column, None, path))


def _read_rows(path: Path, what: str) -> tuple[bytes, str, list[str], list[dict[str, str]]]:
    """A CSV or TSV's bytes, delimiter, columns and rows (values stripped); `what` it is, for its errors."""
    if not path.is_file():
        raise BadInputError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise BadInputError(f"{what} {path} is not UTF-8 text") from None
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
        raise BadInputError(f"{what} {path} has two columns named {', '.join(map(repr, twice))}: which one is meant? "
                            "rename one")
    rows = [{c.strip(): (v or "").strip() for c, v in row.items() if c is not None} for row in reader]
    if not rows:
        raise BadInputError(f"{what} {path} has no rows")
    return raw, delimiter, columns, rows


def _rows_by(rows: list[dict[str, str]], subject_column: str, session_column: str | None, path: Path) -> dict:
    """{subject: row}, or with `session_column` {subject: {session: row}}; the same row twice is one, two different
    rows of one subject (of one session) an error naming the columns they differ in."""
    keyed = {}
    for row in rows:
        subject = subject_key(row[subject_column])
        if session_column is not None and not _session_key(row[session_column]):
            raise BadInputError(f"{path}: a row of subject {row[subject_column]!r} has no {session_column}: every row "
                                f"of a table of sessions names its session")
        if session_column:
            place, key = keyed.setdefault(subject, {}), _session_key(row[session_column])
        else:
            place, key = keyed, subject
        if key in place and place[key] != row:
            differ = [c for c in row if place[key].get(c) != row.get(c)]
            which = f"subject {row[subject_column]!r}" + (f", session {row[session_column]!r}" if session_column
                                                          else "")
            raise BadInputError(f"{path} has two different rows for {which} (in {', '.join(map(repr, differ[:4]))}"
                                f"{' ...' if len(differ) > 4 else ''}): " + (
                                    "which is it? leave one out" if session_column else
                                    "it takes one row per subject, so a table of visits or scans (ADNI's search CSV, "
                                    "ADNIMERGE) needs one row chosen for each, e.g. the baseline visit's; or, for "
                                    "values that change between scans (age), train-unet --session-column names the "
                                    "column of each row's scan (volumes/README.md, ADNI's tables)"))
        place[key] = row
    return keyed


def with_bids_sessions(table: Table, root: Path | None = None) -> Table:
    """A BIDS participants.tsv with the sessions of its tree: each `sub-<label>/sub-<label>_sessions.tsv` of its
    folder (or of `root`, where the run's tree is when the table was moved from it; `derivatives/` and the like are
    not read), a row per session in `session_id`, whose columns a subject with such a file takes from them alone.
    The hash covers every file read; without such files the table is returned as it is."""
    root = root or Path(table.file).parent
    files = sorted(root.glob("sub-*/sub-*_sessions.tsv"))
    files = [f for f in files if f.name == f"{f.parent.name}_sessions.tsv"]
    if not files or table.sessions:
        return table
    sessions, digest = {}, hashlib.sha1(table.sha1.encode())
    for f in files:
        raw, _, columns, rows = _read_rows(f, "sessions table")
        if SESSION_ID not in columns:
            raise BadInputError(f"sessions table {f} has no column {SESSION_ID!r} (its columns: {', '.join(columns)}): "
                                f"BIDS names each row's session there, ses-<label>")
        subject = subject_key(f.parent.name)
        sessions[subject] = _rows_by([{**r, "participant_id": subject} for r in rows], "participant_id", SESSION_ID,
                                     f)[subject]
        digest.update(f"{f.relative_to(root).as_posix()}\0".encode() + hashlib.sha1(raw).digest())
    return Table(table.file, digest.hexdigest(), table.subject_column, table.rows, sessions=sessions,
                 session_files=[f.relative_to(root).as_posix() for f in files], image_ids=table.image_ids)
