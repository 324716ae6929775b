"""Values that change between a subject's scans (age at each visit): a table of sessions joined to each image by its
subject and the session its path names, a BIDS tree's sessions.tsv files, and a run that keeps them."""
import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import driver
from conditions.participants import (SESSION_ID, find_table, read_table, saved_table, scan_of, session_of,
                                     with_bids_sessions)
from conditions.table import Condition, build_conditions, condition_matrix, subjects_of
from conftest import SMALL_UNET, blob, ckpt, error_of, touch, unet, vqvae, write_blob_images, write_volume
from runtime.errors import BadInputError
from volumes.layouts import Layout
from volumes.run_data import DataConfig, _listed, subject_summary

nan = math.nan


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def bids_tree_with_sessions(root):
    """sub-01 scanned at M00, M12 and M24 (which its sessions.tsv lacks), sub-02 at M00 only and with no sessions.tsv,
    sub-03 in no table; a derivative's sessions.tsv, which is not the raw tree's."""
    for subject, sessions in (("01", ("M00", "M12", "M24")), ("02", ("M00",)), ("03", ("M00",))):
        for session in sessions:
            name = f"sub-{subject}_ses-{session}_T1w.nii.gz"
            anat = root / f"sub-{subject}" / f"ses-{session}" / "anat"
            write_volume(anat / name, blob(seed=len(session) + int(subject)))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t70\tF\nsub-02\t80\tM\n")
    (root / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-M00\t70.2\nses-M12\t71.3\n")
    derivative = root / "derivatives" / "old" / "sub-01" / "sub-01_sessions.tsv"
    derivative.parent.mkdir(parents=True)
    derivative.write_text("session_id\tage\nses-M00\t50\nses-M24\t99\n")


def test_a_bids_trees_sessions_tsv_gives_each_scan_its_own_age_over_the_participants(tmp_path):
    root = tmp_path / "bids"
    bids_tree_with_sessions(root)
    participants = read_table(find_table(root, None), session_column=SESSION_ID)  # participants.tsv has no sessions
    table = with_bids_sessions(participants)
    assert table.session_files == ["sub-01/sub-01_sessions.tsv"] and table.sha1 != participants.sha1
    paths = sorted(str(p) for p in root.rglob("sub-*_T1w.nii.gz"))  # sub-01 M00, M12, M24; sub-02 M00; sub-03 M00
    subjects = subjects_of(paths, Layout().subject)
    conditions = build_conditions(["age", "sex"], table, subjects, ["all"], paths, str(root))
    assert conditions == [Condition("age", "continuous", low=70.2, high=80.0), Condition("sex", "category", ["F", "M"])]
    y, report = condition_matrix(conditions, table, subjects, torch.zeros(5), paths, str(root))
    age = lambda years: (years - 70.2) / (80.0 - 70.2)  # noqa: E731
    # M24, which sub-01's sessions.tsv lacks: no age (not 70, the participants', nor 99, a derivative's); sex still F
    assert same(y, torch.tensor([[age(70.2), 0], [age(71.3), 0], [nan, 0], [1.0, 1], [nan, nan]]))
    assert "2 of 3 subjects in the table" in report  # sub-01's files alone have sessions: 2 of its 3 found
    assert "sessions by session_id: 2 of the 3 files of subjects with sessions found in the table (1 not" in report
    assert "e.g. sub-01/ses-M24/anat/sub-01_ses-M24_T1w.nii.gz, whose subject's sessions there are M00, M12" in report
    assert "per session age: 1 n/a" in report
    # without the paths (or a run of before, saved without sessions) each subject has one age: the participants'
    y, _ = condition_matrix(conditions, participants, subjects, torch.zeros(5))
    assert same(y[:, 0], torch.tensor([age(70), age(70), age(70), 1.0, nan]))
    # images of subjects without sessions alone (sub-01 held out, say): nothing to find, no error
    y, _ = condition_matrix(conditions, table, subjects[3:], torch.zeros(2), paths[3:], str(root))
    assert same(y, torch.tensor([[1.0, 1], [nan, nan]]))


def test_a_run_finds_its_sessions_again_and_a_run_of_before_reads_the_participants_alone(tmp_path):
    root = tmp_path / "bids"
    bids_tree_with_sessions(root)
    table = with_bids_sessions(read_table(root / "participants.tsv"))
    record = table.record()
    assert record["session_files"] == ["sub-01/sub-01_sessions.tsv"] and "session_column" not in record
    assert saved_table(record, root).sha1 == table.sha1
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    shutil.rmtree(root)
    assert saved_table(record, moved).sha1 == table.sha1                  # moved with its data (--data NEW)
    old = {k: v for k, v in record.items() if k != "session_files"}       # a record of before 2026-12-07
    assert saved_table({**old, "sha1": read_table(moved / "participants.tsv").sha1}, moved).sessions == {}
    # the participants.tsv moved away from its tree (--labels FILE): its sessions are the data folder's
    (tmp_path / "tables").mkdir()
    shutil.copy(moved / "participants.tsv", tmp_path / "tables" / "participants.tsv")
    assert saved_table(record, moved, str(tmp_path / "tables" / "participants.tsv")).sha1 == table.sha1
    (moved / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-M00\t70.2\nses-M12\t72\n")
    with pytest.raises(BadInputError, match="contents differ"):
        saved_table(record, moved, str(moved / "participants.tsv"))
    (moved / "sub-02" / "sub-02_sessions.tsv").write_text("age\n80\n")
    assert "has no column 'session_id'" in str(pytest.raises(BadInputError, with_bids_sessions,
                                                             read_table(moved / "participants.tsv")).value)


def adni_download(root):
    """LONI's layout: ADNI/<PTID>/<description>/<date>/<image id>/<file ending in the image id>."""
    scans = [("002_S_0295", "2006-04-18_08_20_30.0", "S13408", "I13722"),
             ("002_S_0295", "2007-05-25_07_40_11.0", "S32679", "I55286"),
             ("002_S_0295", "2008-07-23_12_11_47.0", "S53511", "I114209"),   # not in the table
             ("002_S_0413", "2006-05-02_12_35_03.0", "S14782", "I15025")]
    paths = []
    for ptid, date, series, image in scans:
        name = f"ADNI_{ptid}_MR_MPRAGE_br_raw_2006_1_{series}_{image}.nii"   # _1_: LONI's counter, no session
        path = root / "ADNI" / ptid / "MPRAGE" / date / image / name
        write_volume(path, blob(seed=len(paths)))
        paths.append(str(path))
    table = root / "search.csv"
    table.write_text("Image Data ID,Subject,Group,Sex,Age,Visit\nI13722,002_S_0295,CN,M,84.8,1\n"
                     "I55286,002_S_0295,CN,M,85.9,3\nI15025,002_S_0413,CN,F,76.3,1\n")
    return paths, table


def test_adni_search_csv_gives_each_scan_its_age_by_its_image_id_and_a_scan_it_lacks_no_value(tmp_path):
    paths, search = adni_download(tmp_path)
    assert "--session-column" in str(pytest.raises(BadInputError, read_table, search, "Subject").value)
    table = read_table(search, "Subject", session_column="Image Data ID")
    assert table.rows["002_S_0295"] == {"Subject": "002_S_0295"}          # every value is a scan's
    subjects = subjects_of(paths, Layout().subject)
    assert subjects == ["002_S_0295"] * 3 + ["002_S_0413"]
    conditions = build_conditions(["Age", "Sex"], table, subjects, ["all"], paths, str(tmp_path))
    assert conditions[0] == Condition("Age", "continuous", low=76.3, high=85.9)   # the scans', not the subjects'
    y, report = condition_matrix(conditions, table, subjects, torch.zeros(4), paths, str(tmp_path))
    age = lambda years: (years - 76.3) / (85.9 - 76.3)  # noqa: E731
    assert same(y, torch.tensor([[age(84.8), 1], [age(85.9), 1], [nan, nan], [0.0, 0]]))  # a scan it lacks: nothing
    assert "3 of the 4 files of subjects with sessions found in the table (1 not" in report
    assert "Age: 1 n/a, Sex: 1 n/a" in report
    # the same files gathered in one folder: the image ID is a part of the file's name
    flat = [str(tmp_path / "flat" / p.rsplit("/", 1)[1]) for p in paths]
    y_flat, _ = condition_matrix(conditions, table, subjects, torch.zeros(4), flat, str(tmp_path / "flat"))
    assert same(y_flat, y)


def test_a_table_of_sessions_that_names_no_file_or_one_file_twice_is_refused_saying_why(tmp_path):
    paths, search = adni_download(tmp_path)
    subjects = subjects_of(paths, Layout().subject)
    by_visit = read_table(search, "Subject", session_column="Visit")  # visit numbers name no file (not LONI's _1_)
    message = str(pytest.raises(BadInputError, condition_matrix, [Condition("Age", "continuous", low=70, high=90)],
                                by_visit, subjects, torch.zeros(4), paths, str(tmp_path)).value)
    assert "no image's path names one of its sessions (in Visit, such as '1'" in message
    assert "a folder of its images, or a part of their file names" in message
    twice = tmp_path / "twice.csv"  # a scan named by its image ID and its series ID, each a row
    twice.write_text("scan,Subject,Age\nI13722,002_S_0295,84.8\nS13408,002_S_0295,84.9\n")
    message = str(pytest.raises(BadInputError, condition_matrix, [Condition("Age", "continuous", low=70, high=90)],
                                read_table(twice, "Subject", session_column="scan"), subjects, torch.zeros(4),
                                paths, str(tmp_path)).value)
    assert "names sessions 'I13722' and 'S13408' of its subject" in message
    twice.write_text("scan,Subject,Age\nI13722,002_S_0295,84.8\nI13722,002_S_0295,84.9\n")
    assert "two different rows for subject '002_S_0295', session 'I13722' (in 'Age')" in str(
        pytest.raises(BadInputError, read_table, twice, "Subject", session_column="scan").value)
    twice.write_text("scan,Subject,Age\n,002_S_0295,84.8\n")
    assert "has no scan" in str(pytest.raises(BadInputError, read_table, twice, "Subject", session_column="scan").value)
    assert "--session-column Scan: " in str(pytest.raises(BadInputError, read_table, twice, "Subject",
                                                          session_column="Scan").value)


def test_a_table_with_a_session_id_column_is_one_of_sessions_on_its_own(tmp_path):
    """ClinicaDL's tables: participant_id, session_id and the values of each session; a table without session_id
    stays one of subjects."""
    clinica = tmp_path / "data.tsv"
    clinica.write_text("participant_id\tsession_id\tage\tdiagnosis\nsub-ADNI002S0295\tses-M00\t84.8\tCN\n"
                       "sub-ADNI002S0295\tses-M12\t85.8\tMCI\n")
    table = read_table(clinica, session_column=SESSION_ID)
    assert table.session_column == SESSION_ID and set(table.sessions["ADNI002S0295"]) == {"M00", "M12"}
    assert table.rows["ADNI002S0295"] == {"participant_id": "sub-ADNI002S0295"}   # every value is a session's
    subjects_only = tmp_path / "participants.tsv"
    subjects_only.write_text("participant_id\tage\nsub-01\t70\n")
    assert read_table(subjects_only, session_column=SESSION_ID).sessions == {}


def test_a_run_trains_on_each_sessions_age_keeps_its_sessions_on_resume_and_refuses_them_changed(tmp_path):
    data = tmp_path / "bids"
    bids_tree_with_sessions(data)
    (data / "participants.tsv").write_text("participant_id\tage\tsex\nsub-01\t70\tF\nsub-02\t80\tM\nsub-03\t75\tF\n")
    run = tmp_path / "run"
    vqvae(run, data, "--max-steps", "2")
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--condition", "age"])
    saved = ckpt(run / "unet.pt")
    assert saved["labels"]["session_files"] == ["sub-01/sub-01_sessions.tsv"]
    assert saved["conditions"][0]["low"] == 70.2 and saved["conditions"][0]["high"] == 80.0  # 70 is no scan's age
    driver.main(["train-unet", "--run", str(run), "--max-steps", "3", "--resume"])
    assert ckpt(run / "unet.pt")["step"] == 3
    (data / "sub-01" / "sub-01_sessions.tsv").write_text("session_id\tage\nses-M00\t70.2\nses-M12\t72\n")
    assert "changed since this run started" in error_of(driver.main, ["train-unet", "--run", str(run),
                                                                      "--max-steps", "4", "--resume"])
    assert "--session-column" in error_of(driver.main, ["train-unet", "--run", str(run), "--max-steps", "4",
                                                        "--resume", "--session-column", "visit"])


def test_a_run_on_adni_s_search_csv_resumes_twice_after_its_download_moved_with_the_csv_inside(tmp_path):
    """The table given with --labels inside the data folder: --data NEW finds it there, and the next resume too (the
    --labels typed when the run began is where the table was, not where it is)."""
    download = tmp_path / "download"
    adni_download(download)
    run = tmp_path / "run"
    vqvae(run, download, "--max-steps", "2")
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--condition", "Age",
                 "--labels", str(download / "search.csv"), "--subject-column", "Subject",
                 "--session-column", "Image Data ID"])
    assert ckpt(run / "unet.pt")["labels"]["session_column"] == "Image Data ID"
    download.rename(tmp_path / "moved")
    for step in (3, 4):
        driver.main(["train-unet", "--run", str(run), "--max-steps", str(step), "--resume", "--data",
                     str(tmp_path / "moved")])
        assert ckpt(run / "unet.pt")["step"] == step
    assert ckpt(run / "unet.pt")["labels"]["file"] == str(tmp_path / "moved" / "search.csv")


def test_labels_naming_a_bids_trees_participants_tsv_reads_its_sessions_too(tmp_path):
    """The images elsewhere (a copy, say), the table given with --labels: the sessions beside it are read with it."""
    data = tmp_path / "bids"
    bids_tree_with_sessions(data)
    tables = tmp_path / "tables"
    shutil.copytree(data, tables, ignore=shutil.ignore_patterns("*.nii.gz", "derivatives"))
    images = tmp_path / "images"
    shutil.copytree(data, images, ignore=shutil.ignore_patterns("*.tsv"))
    run = tmp_path / "run"
    vqvae(run, images, "--max-steps", "2")
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--condition", "age",
                 "--labels", str(tables / "participants.tsv")])
    saved = ckpt(run / "unet.pt")
    assert saved["labels"]["session_files"] == ["sub-01/sub-01_sessions.tsv"] and saved["conditions"][0]["low"] == 70.2


# ----------------------------------------------------------------------------- whose each scan is: stage 1's table

def scan_named_slices(root, images=False):
    """A prepared ADNI slice set, its files named by image ID (`13722_67.png`): patient 002_S_0295 scanned twice
    (I13722, I55286), 002_S_0413 once, and two NC patients, one scanned twice; empty files, or with `images` images;
    and ADNI's search CSV of those scans."""
    scans = {"AD": [("I13722", "002_S_0295", 84.8), ("I55286", "002_S_0295", 85.9), ("I15025", "002_S_0413", 76.3)],
             "NC": [("I20000", "002_S_0559", 70.1), ("I20007", "002_S_0559", 71.0), ("I30000", "002_S_0685", 90.5)]}
    for label, rows in scans.items():
        names = [image[1:] for image, _, _ in rows]
        if images:
            write_blob_images(root / "data" / label, names, 2, np.random.default_rng(0), size=(40, 40), ext="png")
        else:
            touch(root / "data" / label, [f"{name}_{k}.png" for name in names for k in (67, 68)])
    table = root / "search.csv"
    table.write_text("Image Data ID,Subject,Group,Age\n" + "".join(
        f"{image},{subject},{label},{age}\n" for label, rows in scans.items() for image, subject, age in rows))
    return root / "data", table


def refusal(fn, *args) -> str:
    return str(pytest.raises(BadInputError, fn, *args).value)


def scan_flags(data, table, *extra):
    return ["train-vqvae", "--data", str(data), "--labels", str(table), "--subject-column", "Subject",
            "--session-column", "Image Data ID", *extra]


def test_the_first_bare_number_of_a_file_name_is_adni_s_image_id_where_nothing_else_names_a_session(tmp_path):
    assert session_of("AD/218391_78.jpeg", {"I218391": {}}) == "I218391"
    assert session_of("AD/218391_78.jpeg", {"218391": {}, "78": {}}) is None      # bare sessions: counters, never
    loni = "ADNI_002_S_0295_MR_MPRAGE_br_raw_2006_1_S13408_I13722.nii"            # its I13722 first, not _1_
    assert session_of(loni, {"I13722": {}, "I1": {}, "I2006": {}}) == "I13722"
    assert session_of("218391_78.jpeg", {"I218391": {}, "I78": {}}) == "I218391"  # the first number, not the slice
    assert session_of("300000_78.jpeg", {"I78": {}}) is None
    assert session_of("AD/218391_78.jpeg", {"I218391": {}}, image_ids=False) is None
    _, search = scan_named_slices(tmp_path)                      # a run's table joins as it did when the run began
    record = read_table(search, "Subject", session_column="Image Data ID").record()
    assert record["image_ids"] is True and saved_table(record, tmp_path).image_ids
    before = {k: v for k, v in record.items() if k != "image_ids"}  # a run of before the rule: no bare numbers
    assert not saved_table(before, tmp_path).image_ids


def test_a_table_of_scans_keeps_each_patients_scans_on_one_side_of_the_hold_out_and_is_saved_with_the_run(tmp_path):
    data, table = scan_named_slices(tmp_path)
    patient = {"13722": "002_S_0295", "55286": "002_S_0295", "15025": "002_S_0413", "20000": "002_S_0559",
               "20007": "002_S_0559", "30000": "002_S_0685"}

    def splits_a_patient(config) -> list[bool]:  # for each of 8 hold-out seeds
        found = _listed(config)
        patients = [patient[Path(path).name.split("_")[0]] for path, _ in found.samples]
        split = []
        for seed in range(8):
            _, held = dataclasses.replace(config, holdout_seed=seed).split(found.samples, found.classes)
            trained = {p for i, p in enumerate(patients) if i not in held}
            split.append(bool(trained & {patients[i] for i in held}))
        return split

    by_name = driver.parse(["train-vqvae", "--data", str(data), "--holdout", "0.5"]).data_config
    assert "12 images of 6 subjects" in subject_summary(by_name)       # each scan a "subject"
    assert any(splits_a_patient(by_name))                       # ... and some seed splits a patient
    args = driver.parse(scan_flags(data, table, "--holdout", "0.5"))
    config = args.data_config
    assert config.layout.scan_subjects == {"I13722": "002_S_0295", "I15025": "002_S_0413", "I20000": "002_S_0559",
                                           "I20007": "002_S_0559", "I30000": "002_S_0685", "I55286": "002_S_0295"}
    summary = subject_summary(config)
    assert "12 images of 4 subjects" in summary and "search.csv ('Subject' of 'Image Data ID')" in summary
    assert "WARNING" not in summary                                  # every scan in the folder of its Group
    text = table.read_text()
    table.write_text(text.replace("I20007,002_S_0559,NC", "I20007,002_S_0559,AD"))   # its later scan: AD
    assert ("WARNING: 2 of the files sit in a class folder other than their scan's 'Group' in search.csv (e.g. "
            "NC/20007_67.png: Group AD)") in subject_summary(config)
    table.write_text(text.replace("I20007,002_S_0559,NC", "I20007,002_S_0559,MCI"))  # no class of the run's: not said
    assert "WARNING" not in subject_summary(config)
    table.write_text(text)
    assert not any(splits_a_patient(config))
    assert config.flags() == {name: getattr(args, name) for name in config.flags()}
    table.unlink()  # what stage 1 found is saved: the table moved or gone changes no subject
    saved = DataConfig.from_checkpoint({"data_config": config.saved()})
    assert saved == config and saved.subject()(str(data / "NC" / "20007_68.png")) == "002_S_0559"
    (data / "NC" / "40000_77.png").write_bytes(b"")  # a file stage 1 never saw names no scan
    assert "names no scan of" in refusal(saved.subject(), str(data / "NC" / "40000_77.png"))


def test_a_table_of_scans_that_leaves_a_file_unnamed_or_gives_a_scan_two_patients_is_refused(tmp_path):
    data, table = scan_named_slices(tmp_path)
    rows = table.read_text().splitlines()
    table.write_text("\n".join(r for r in rows if not r.startswith("I30000")) + "\n")
    message = refusal(driver.parse, scan_flags(data, table))
    assert "2 of the 12 files name no scan of" in message and "NC/30000_67.png" in message
    table.write_text("\n".join(rows + ["I30000,002_S_0295,NC,90.5"]) + "\n")
    assert "scan 'I30000' (Image Data ID) is of two subjects" in refusal(driver.parse,
                                                                          scan_flags(data, table))
    blank = [row if not row.startswith("I30000") else "I30000,,NC,90.5" for row in rows]  # whose? not one "" of all
    table.write_text("\n".join(blank) + "\n")
    assert "scan 'I30000' has no Subject: whose is it?" in refusal(driver.parse, scan_flags(data, table))
    table.write_text("\n".join(rows) + "\n")
    two = data / "NC" / "I30000_I15025.png"                           # two patients' scan IDs in one file's name
    (data / "NC" / "30000_67.png").rename(two)
    assert f"'NC/I30000_I15025.png' names scans 'I15025' and 'I30000' of {table}: which is it? rename the file" in \
        refusal(driver.parse, scan_flags(data, table))
    two.rename(data / "NC" / "30000_67.png")
    assert "names scans 'I1' and 'I2' of /ADNI {2024} {}/search.csv: which is it? rename the file" in refusal(
        scan_of, "NC/I1_I2.png", {"I1": "a", "I2": "b"}, "/ADNI {2024} {}/search.csv")   # braces in the table's path
    assert "give one" in refusal(driver.parse, scan_flags(data, table, "--subject-pattern", r"(\d+)_"))
    assert "--session-column names the scans' column" in refusal(driver.parse, [
        "train-vqvae", "--data", str(data), "--session-column", "Image Data ID"])
    assert "a table of scans" in refusal(driver.parse, scan_flags(
        data, table, "--class-column", "Group"))


def test_stage_2s_conditions_default_to_stage_1s_table_of_scans(tmp_path):
    data, table = scan_named_slices(tmp_path, images=True)
    run = tmp_path / "run"
    vqvae(run, data, "--max-steps", "2", *scan_flags(data, table)[3:])
    unet(run, "--max-steps", "2", "--condition", "Age")
    saved = ckpt(run / "unet.pt")
    assert saved["labels"]["session_column"] == "Image Data ID" and saved["labels"]["subject_column"] == "Subject"
    assert saved["conditions"][0]["low"] == 70.1 and saved["conditions"][0]["high"] == 90.5  # each scan's own age
    unet(run, "--max-steps", "3", "--resume", "--subject-column", "Subject", "--session-column", "Image Data ID")
    assert "--session-column Visit differs from this run's Image Data ID" in error_of(
        driver.main, ["train-unet", "--run", str(run), "--max-steps", "4", "--resume", "--session-column", "Visit"])
