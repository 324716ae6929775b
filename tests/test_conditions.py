"""Conditions from a participants table (the join, the scaling, what is missing), sampling with --set and --sweep, and
counterfactuals (DDIM inversion, masks, the NIfTI map in the input's space)."""
import csv
import json
import math
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

import driver
import predict
from conditions.participants import find_table, read_table, saved_table
from conditions.table import Condition, asked_values, build_conditions, condition_matrix, subjects_of
from conftest import SMALL_UNET, blob, ckpt, conditioned_data, disk_full, error_of, vqvae, write_volume
from runtime.errors import BadInputError
from runtime.models import load_run
from volumes.layouts import Layout
from volumes.reader import Slicing, read_volume_slice, to_volume
from volumes.run_data import DataConfig, split_files

nan = math.nan


# ----------------------------------------------------------------------------- the table and its join

def test_a_bids_roots_participants_tsv_is_found_and_joined_by_participant_id(tmp_path):
    root = tmp_path / "bids"
    for s in ("01", "02", "03", "04"):
        write_volume(root / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz", blob(seed=int(s)))
    (root / "participants.tsv").write_text("participant_id\tage\tsex\tsite\n"
                                           "sub-01\t61.5\tF\tA\nsub-02\tn/a\tM\tB\nsub-03\t80\tF\tA\n")  # no sub-04
    table = read_table(find_table(root, None))
    paths = sorted(str(p) for p in root.rglob("*.nii.gz"))
    subjects = subjects_of(paths, Layout().subject)
    conditions = build_conditions(["age", "sex"], table, subjects, classes=["all"])
    assert conditions == [Condition("age", "continuous", low=61.5, high=80.0), Condition("sex", "category", ["F", "M"])]
    y, report = condition_matrix(conditions, table, subjects, torch.zeros(4))
    expected = torch.tensor([[0.0, 0], [nan, 1], [1, 0], [nan, nan]])
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.nan_to_num(), expected.nan_to_num())
    assert "3 of 4 subjects in the table; 1 not (1 images" in report and "sub-04" in report
    assert "age: 1 n/a" in report and "sex: 0 n/a" in report


def test_a_csv_names_its_subject_column_and_a_coded_column_can_be_a_category(tmp_path):
    table_file = tmp_path / "clinical.csv"
    table_file.write_text("Subject,sex,group\n002_S_0295,1,AD\n002_S_0413,2,NC\n")
    assert "--subject-column" in str(pytest.raises(Exception, read_table, table_file).value)
    table = read_table(table_file, "Subject")
    subjects = ["002_S_0295", "002_S_0413", "002_S_0413"]          # ADNI IDs, as the layout names them
    numbers = build_conditions(["sex"], table, subjects, [])
    assert numbers == [Condition("sex", "continuous", low=1.0, high=2.0)]
    coded = build_conditions(["sex:category", "group", "class"], table, subjects, ["AD", "NC"])
    assert [(c.name, c.kind, c.values) for c in coded] == [("sex", "category", ["1", "2"]),
                                                           ("group", "category", ["AD", "NC"]),
                                                           ("class", "category", ["AD", "NC"])]
    y, _ = condition_matrix(coded, table, subjects, torch.tensor([1, 0, 0]))
    assert y.tolist() == [[0, 0, 1], [1, 1, 0], [1, 1, 0]]
    assert "no column 'age'" in str(pytest.raises(Exception, build_conditions, ["age"], table, subjects, []).value)
    assert "--labels" in str(pytest.raises(Exception, build_conditions, ["age"], None, subjects, []).value)


def test_a_column_of_numbers_with_a_few_words_or_a_column_named_twice_is_refused(tmp_path):
    table_file = tmp_path / "participants.tsv"
    table_file.write_text("participant_id\tage\tgroup\nsub-01\t71\tAD\nsub-02\t75.5\tNC\nsub-03\t90+\tNC\n")
    table, subjects = read_table(table_file), ["sub-01", "sub-02", "sub-03"]
    message = str(pytest.raises(Exception, build_conditions, ["age"], table, subjects, []).value)
    assert "numbers and '90+'" in message and "age:category" in message     # not a category of 71/75.5/90+
    assert build_conditions(["age:category"], table, subjects, [])[0].values == ["71", "75.5", "90+"]
    assert build_conditions(["group"], table, subjects, [])[0].kind == "category"   # words only: a category
    table_file.write_text("participant_id\tage\tage\nsub-01\t71\t72\n")
    assert "two columns named 'age'" in str(pytest.raises(Exception, read_table, table_file).value)


def test_a_table_of_visits_or_a_csv_saved_as_tsv_is_refused_saying_why(tmp_path):
    """ADNI's tables as they come: a row per scan (the search CSV), or comma-separated under a .tsv name."""
    visits = tmp_path / "search.csv"
    visits.write_text("Image Data ID,Subject,Group,Age\nI1,002_S_0295,CN,84.8\nI2,002_S_0295,CN,85.3\n")
    message = str(pytest.raises(Exception, read_table, visits, "Subject").value)
    assert "two different rows for subject '002_S_0295' (in 'Image Data ID', 'Age')" in message
    assert "one row per subject" in message and "baseline" in message
    visits.write_text("Image Data ID,Subject,Group,Age\nI1,002_S_0295,CN,84.8\nI1,002_S_0295,CN,84.8\n")
    assert read_table(visits, "Subject").row("002_S_0295")["Age"] == "84.8"           # the same row twice: one
    saved_as_tsv = tmp_path / "participants.tsv"
    saved_as_tsv.write_text("participant_id,group\n002_S_0295,CN\n")
    message = str(pytest.raises(Exception, read_table, saved_as_tsv).value)
    assert "parted by commas, and a .tsv file's may not be" in message
    saved_as_tsv.write_text("subject\tgroup\n002_S_0295\tCN\n")                      # a TSV, another column
    assert "--subject-column" in str(pytest.raises(Exception, read_table, saved_as_tsv).value)


def test_a_tables_subjects_match_the_files_with_or_without_bids_sub_prefix(tmp_path):
    """A table of `01` joins images of `sub-01`, and a table of `sub-01` images named `01`."""
    age = Condition("age", "continuous", low=60.0, high=80.0)
    for table_ids, file_ids in ((["01", "02"], ["sub-01", "sub-02"]), (["sub-01", "sub-02"], ["01", "02"])):
        table_file = tmp_path / "participants.tsv"
        table_file.write_text(f"participant_id\tage\n{table_ids[0]}\t60\n{table_ids[1]}\t80\n")
        y, report = condition_matrix([age], read_table(table_file), [file_ids[1], file_ids[0]], torch.zeros(2))
        assert y.tolist() == [[1.0], [0.0]] and "2 of 2 subjects in the table" in report


def test_a_run_s_table_is_found_in_the_data_folder_only_with_the_contents_it_trained_with(tmp_path):
    """The table moved with the data (--data NEW) is found by its name there; another file of that name is not it."""
    table_file = tmp_path / "old" / "participants.csv"
    table_file.parent.mkdir()
    table_file.write_text("participant_id,age\nAD0,60\nNC0,70\n")
    record = read_table(table_file).record()
    table_file.unlink()
    moved = tmp_path / "new"
    moved.mkdir()
    (moved / "participants.csv").write_text("participant_id,age\nAD0,61\nNC0,70\n")  # one age edited
    message = str(pytest.raises(BadInputError, saved_table, record, moved).value)
    assert "is not there" in message and "give --labels FILE" in message
    (moved / "participants.csv").write_text("participant_id,age\nAD0,60\nNC0,70\n")
    assert saved_table(record, moved).row("AD0")["age"] == "60"


def test_a_value_the_run_does_not_know_is_not_given_in_training_and_refused_at_sampling(capsys):
    sex, age = Condition("sex", "category", ["F", "M"]), Condition("age", "continuous", low=60.0, high=80.0)
    assert math.isnan(sex.encode("X")) and math.isnan(sex.encode("n/a")) and math.isnan(age.encode("NA"))
    assert age.encode("70") == 0.5 and sex.encode("M") == 1.0
    assert "one of F, M" in str(pytest.raises(Exception, sex.parse, "X").value)
    assert "a number" in str(pytest.raises(Exception, age.parse, "old").value)
    assert age.parse("90") == 1.5 and "outside the training subjects' range 60-80" in capsys.readouterr().out
    for absurd in ("1e39", "1e41", "-500", "inf"):                    # NaN images, a crash, nothing to say of them
        assert "far outside" in str(pytest.raises(Exception, age.parse, absurd).value) or absurd == "inf"
    assert "a number" in str(pytest.raises(Exception, age.parse, "inf").value)


# ----------------------------------------------------------------------------- a run conditioned on a table

def test_a_run_saves_its_conditions_scaled_by_its_training_subjects_and_keeps_them_on_resume(conditioned_run, tmp_path):
    run, data = conditioned_run
    saved = ckpt(run / "unet.pt")
    held = {s for s in {p.name.split("_")[0] for p in data.rglob("*.jpeg")}} - {
        p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    ages = {f"{label}{i}": 50 + 10 * i + (5 if label == "AD" else 0) for label in ("AD", "NC") for i in range(4)}
    trained = [a for s, a in ages.items() if s not in held]
    assert len(held) == 2 and list(saved["config"]["conditions"]) == [2, 0, 2]
    assert saved["conditions"][1] == {"name": "age", "kind": "continuous", "values": [], "low": min(trained),
                                      "high": max(trained)}
    assert saved["labels"]["file"] == str(data / "participants.csv") and saved["labels"]["subject_column"] == "participant_id"
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    driver.main(["train-unet", "--run", str(copy), "--max-steps", "3", "--resume"])
    assert ckpt(copy / "unet.pt")["conditions"] == saved["conditions"] and ckpt(copy / "unet.pt")["step"] == 3
    assert "--condition" in error_of(driver.main, ["train-unet", "--run", str(copy), "--resume", "--condition", "age"])
    (data / "participants.csv").write_text((data / "participants.csv").read_text() + "extra,70,F\n")
    try:
        assert "changed since this run started" in error_of(driver.main, ["train-unet", "--run", str(copy),
                                                                          "--max-steps", "4", "--resume"])
    finally:
        (data / "participants.csv").write_text("\n".join((data / "participants.csv").read_text().splitlines()[:-1]) + "\n")
    fresh = tmp_path / "fresh"                                # a new stage 2: the table is read before encoding
    shutil.copytree(run, fresh, ignore=shutil.ignore_patterns("unet*.pt", "latents.pt", "condition_net.pt"))
    assert "has no column 'weight'" in error_of(driver.main, ["train-unet", "--run", str(fresh), *SMALL_UNET,
                                                              "--max-steps", "2", "--condition", "weight",
                                                              "--labels", str(data / "participants.csv")])
    assert not (fresh / "latents.pt").exists()


def test_a_table_typed_relative_or_moved_is_found_again_by_its_contents(conditioned_run, tmp_path, monkeypatch):
    run, data = conditioned_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("unet*.pt", "condition_net.pt"))
    (tmp_path / "tables").mkdir()
    shutil.copy(data / "participants.csv", tmp_path / "tables" / "p.csv")
    monkeypatch.chdir(tmp_path)
    # --conditional with --condition: both (class was dropped); the table typed relative is saved absolute
    driver.main(["train-unet", "--run", "run", *SMALL_UNET, "--max-steps", "2", "--conditional", "--condition", "age",
                 "--labels", "tables/p.csv"])
    saved = ckpt(copy / "unet.pt")
    assert [c["name"] for c in saved["conditions"]] == ["class", "age"]
    assert saved["labels"]["file"] == str(tmp_path / "tables" / "p.csv")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    driver.main(["train-unet", "--run", str(copy), "--max-steps", "3", "--resume"])
    (tmp_path / "tables" / "p.csv").rename(tmp_path / "q.csv")
    resume = ["train-unet", "--run", str(copy), "--max-steps", "4", "--resume"]
    assert "give --labels FILE" in error_of(driver.main, resume)
    assert "is not there" in error_of(driver.main, ["evaluate", "--run", str(copy), "--out", str(tmp_path / "ev")])
    assert not (tmp_path / "ev").exists()  # refused before sampling, nothing written
    (tmp_path / "other.csv").write_text((tmp_path / "q.csv").read_text().replace(",5", ",6"))
    assert "contents differ" in error_of(driver.main, ["train-unet", "--run", str(copy), "--max-steps", "4", "--resume",
                                                       "--labels", str(tmp_path / "other.csv")])
    driver.main(["train-unet", "--run", str(copy), "--max-steps", "4", "--resume", "--labels", str(tmp_path / "q.csv")])
    plain = tmp_path / "plain"                                            # a run of no table has none to move
    shutil.copytree(copy, plain, ignore=shutil.ignore_patterns("unet*.pt"))
    driver.main(["train-unet", "--run", str(plain), *SMALL_UNET, "--max-steps", "2"])
    assert "trained without a participants table" in error_of(
        driver.main, ["train-unet", "--run", str(plain), "--resume", "--labels", str(tmp_path / "q.csv")])
    assert ckpt(copy / "unet.pt")["step"] == 4 and ckpt(copy / "unet.pt")["labels"]["file"] == str(tmp_path / "q.csv")
    # a run of before saved the path as typed; a BIDS participants.tsv moves with its data (--data NEW)
    moved = tmp_path / "moved_data"
    moved.mkdir()
    shutil.copy(tmp_path / "q.csv", moved / "q.csv")
    record = {**ckpt(copy / "unet.pt")["labels"], "file": "q.csv"}
    assert saved_table(record, moved).file == str(moved / "q.csv")
    with pytest.raises(BadInputError, match="contents differ"):
        saved_table({**record, "sha1": "0" * 40}, moved, str(moved / "q.csv"))


def test_a_sweep_draws_every_row_from_the_same_noise(conditioned_run, tmp_path):
    run, _ = conditioned_run
    common = ["--run", str(run), "--num", "2", "--sampler", "ddim", "--steps", "3", "--gif-frames", "2", "--set", "sex=F"]
    unguided = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "a"), "--sweep", "age=55,75",
                                                   "--guidance", "0"]))
    assert unguided.shape == (4, 1, 32, 32) and torch.equal(unguided[:2], unguided[2:])  # w = 0: the condition ignored
    guided = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "b"), "--sweep", "age=55,75",
                                                 "--guidance", "3"]))
    assert not torch.equal(guided[:2], guided[2:])
    other_noise = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "d"), "--sweep", "age=55,75",
                                                      "--guidance", "0", "--seed", "7"]))
    # the same noise under both: guidance moves the samples far less than other noise does (0.07 against 0.34)
    assert (guided[:2] - unguided[:2]).abs().mean() < 0.5 * (other_noise[:2] - unguided[:2]).abs().mean()
    width, height = Image.open(tmp_path / "b" / "samples.png").size
    assert height > 1.5 * 32 * 2 and width < 3 * height                      # two captioned rows of two
    classes = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "c"), "--class", "all"]))
    assert classes.shape == (4, 1, 32, 32)
    # each row its own noise: a set of independent samples, whose manifest gives each row its own seeds
    independent = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "e"), "--sweep", "age=55,75",
                                                      "--guidance", "0", "--row-noise", "independent"]))
    assert torch.equal(independent[:2], unguided[:2]) and not torch.equal(independent[2:], unguided[2:])
    seeds = [row["seed"] for row in csv.DictReader(open(tmp_path / "e" / "samples" / "manifest.csv"))]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    assert "not a condition of this run" in error_of(predict.main, [*common, "--set", "weight=3"])
    assert "one of F, M" in error_of(predict.main, [*common, "--set", "sex=X"])


def test_guidance_given_a_subset_of_the_conditions_leaves_the_others_open(conditioned_run):
    run, _ = conditioned_run
    model = load_run(run, "cpu")
    rows = predict.asked_rows(model, run, ["age=60"], "class=all")
    assert [caption for caption, _ in rows] == ["class=AD", "class=NC"]
    low, high = model.conditions[1].low, model.conditions[1].high
    for k, (_, y) in enumerate(rows):
        assert y[0] == k and y[1] == pytest.approx((60 - low) / (high - low)) and y[2].isnan()


# ----------------------------------------------------------------------------- counterfactuals

def test_a_counterfactual_at_strength_0_is_the_reconstruction_and_a_mask_confines_the_change(conditioned_run, tmp_path):
    run, data = conditioned_run
    image = next((data / "AD").iterdir())
    base = ["counterfactual", "--run", str(run), "--input", str(image), "--set", "class=NC", "--steps", "10"]
    still, difference = driver.counterfactual.counterfactual(driver.parse([*base, "--strength", "0",
                                                                           "--out", str(tmp_path / "zero")]))
    assert difference.abs().max() == 0
    for name in ("counterfactual.png", "counterfactual_image.png", "difference.npy", "counterfactual.json"):
        assert (tmp_path / "zero" / name).exists()
    moved, difference = driver.counterfactual.counterfactual(driver.parse([*base, "--out", str(tmp_path / "half")]))
    assert difference.abs().max() > 0.01
    record = json.loads((tmp_path / "half" / "counterfactual.json").read_text())
    assert record["strength"] == 0.5 and record["set"] == ["class=NC"] and record["inversion"] == "DDIM"
    assert os.path.isabs(record["run"]) and os.path.isabs(record["input"])   # traced from any working directory
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[10:20, 10:20] = 255                                   # the top-left quarter's middle, in a 40-px image
    Image.fromarray(mask).save(tmp_path / "mask.png")
    _, inside = driver.counterfactual.counterfactual(driver.parse([*base, "--mask", str(tmp_path / "mask.png"),
                                                                   "--out", str(tmp_path / "masked")]))
    region = torch.zeros(32, 32, dtype=torch.bool)
    region[7:17, 7:17] = True                                  # the mask at 32 px: 8:16, and its blurred edge
    assert inside[~region].abs().max() == 0 and inside[8:16, 8:16].abs().max() > 0.01
    filled, _ = driver.counterfactual.counterfactual(driver.parse(["counterfactual", "--run", str(run), "--input",
                                                                   str(image), "--mask", str(tmp_path / "mask.png"),
                                                                   "--steps", "4", "--out", str(tmp_path / "fill")]))
    assert json.loads((tmp_path / "fill" / "counterfactual.json").read_text())["strength"] == 1.0
    assert "say what to change" in error_of(driver.main, ["counterfactual", "--run", str(run), "--input", str(image)])


def test_a_counterfactual_of_one_image_has_a_twin_under_its_own_conditions_and_a_fill_has_none(conditioned_run,
                                                                                               tmp_path):
    """The twin is the counterfactual whose conditions did not change: its drift is what --set class=AD gives from
    --from class=AD, whose effect is 0; --set class=NC's effect is counterfactual - twin, signed, in effect.npy and
    effect.nii.gz; a fill (--mask alone) changes no condition and leaves no effect of an earlier command behind."""
    run, data = conditioned_run
    scan = write_volume(tmp_path / "scan.nii.gz", blob(shape=(24, 24, 12)))
    base = ["counterfactual", "--run", str(run), "--input", str(scan), "--steps", "4", "--from", "class=AD"]
    record = lambda out: json.loads((out / "counterfactual.json").read_text())  # noqa: E731
    driver.main([*base, "--set", "class=NC", "--out", str(tmp_path / "nc")])
    driver.main([*base, "--set", "class=AD", "--out", str(tmp_path / "ad")])
    nc, ad = record(tmp_path / "nc"), record(tmp_path / "ad")
    assert nc["mean_abs_drift"] == pytest.approx(ad["mean_abs_difference"], rel=1e-5) == ad["mean_abs_drift"]
    assert ad["mean_abs_effect"] == 0 and nc["mean_abs_effect"] > 0.001
    effect = np.load(tmp_path / "nc" / "effect.npy")
    assert effect.min() < 0 < effect.max() and np.abs(effect).mean() == pytest.approx(nc["mean_abs_effect"], rel=1e-5)
    in_grid = nib.load(tmp_path / "nc" / "effect.nii.gz").get_fdata()
    assert in_grid.shape == (24, 24, 12) and np.abs(in_grid).max() > 0
    mask = tmp_path / "mask.png"
    half = np.zeros((40, 40), np.uint8)
    half[:, :20] = 255
    Image.fromarray(half).save(mask)
    image = str(next((data / "AD").iterdir()))
    noised = ["counterfactual", "--run", str(run), "--input", image, "--mask", str(mask), "--noise", "--steps", "4",
              "--from", "class=AD"]                # the context noised afresh at each step: the same for the twin
    driver.main([*noised, "--set", "class=AD", "--out", str(tmp_path / "same")])
    assert record(tmp_path / "same")["mean_abs_effect"] == 0 and record(tmp_path / "same")["mean_abs_drift"] > 0
    driver.main(["counterfactual", "--run", str(run), "--input", image, "--mask", str(mask), "--steps", "2",
                 "--out", str(tmp_path / "nc")])
    assert "mean_abs_effect" not in record(tmp_path / "nc")
    assert not {"effect.npy", "effect.nii.gz"} & {q.name for q in (tmp_path / "nc").iterdir()}


def test_a_counterfactual_refuses_a_strength_above_1_and_a_slice_of_a_2d_image(conditioned_run, tmp_path):
    """Strength is a fraction of the diffusion's steps (above 1: steps that do not exist); --slice picks a slice of a
    volume, and an image has none: neither may be ignored."""
    run, data = conditioned_run
    image = next((data / "AD").iterdir())
    base = ["counterfactual", "--run", str(run), "--input", str(image), "--set", "class=NC", "--steps", "2",
            "--out", str(tmp_path / "cf")]
    assert "--strength must be in [0, 1]" in error_of(driver.main, [*base, "--strength", "1.5"])
    assert "--slice picks a slice of a NIfTI volume" in error_of(driver.main, [*base, "--slice", "3"])
    assert not (tmp_path / "cf").exists()


def test_a_counterfactual_stopped_while_it_writes_leaves_no_record_of_an_earlier_one(conditioned_run, tmp_path,
                                                                                     monkeypatch):
    """counterfactual.json says which command made the files beside it: written last, and an earlier one removed
    first, so that new images never sit beside the record of other settings."""
    from conditions import counterfactual as cf
    run, data = conditioned_run
    base = ["counterfactual", "--run", str(run), "--input", str(next((data / "AD").iterdir())), "--steps", "2",
            "--out", str(tmp_path)]
    driver.main([*base, "--set", "class=NC"])
    assert json.loads((tmp_path / "counterfactual.json").read_text())["set"] == ["class=NC"]
    monkeypatch.setattr(cf, "panel", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit):
        driver.main([*base, "--set", "class=AD"])
    assert (tmp_path / "counterfactual_image.png").exists() and not (tmp_path / "counterfactual.json").exists()


def test_a_counterfactual_leaves_no_file_of_an_earlier_one_it_did_not_write_again(conditioned_run, tmp_path):
    """A NIfTI input's map, or the files of --input held-out, are not left beside the record of a later command that
    writes none of them into the same folder (found by review: an old subject's difference.nii.gz beside a PNG's)."""
    run, data = conditioned_run
    scan = write_volume(tmp_path / "scan.nii.gz", blob(shape=(24, 24, 12)))
    out = tmp_path / "cf"
    base = ["counterfactual", "--run", str(run), "--steps", "2", "--set", "class=NC", "--out", str(out)]
    driver.main([*base, "--input", str(scan)])
    assert (out / "difference.nii.gz").exists()
    driver.main([*base, "--input", str(next((data / "AD").iterdir()))])
    assert not (out / "difference.nii.gz").exists() and (out / "difference.npy").exists()
    (out / "voxelwise.npz").write_bytes(b"an earlier test's maps")    # this one of 1 subject runs no test
    driver.main([*base, "--input", "held-out", "--num", "1"])
    assert sorted(p.name for p in out.iterdir()) == ["counterfactual.json", "counterfactual.png", "counterfactuals.csv",
                                                     "effects.npy", "examples.png"]
    driver.main([*base, "--input", str(scan)])
    assert not {"counterfactuals.csv", "effects.npy", "examples.png"} & {p.name for p in out.iterdir()}


@pytest.mark.parametrize("name", ["counterfactual.png", "difference.npy", "difference.nii.gz"])
def test_a_counterfactual_that_finds_the_disk_full_leaves_the_earlier_file_as_it_was(name, conditioned_run, tmp_path,
                                                                                     monkeypatch):
    """Each file is written whole: its writer cut short (a full disk) leaves the earlier command's file as it was, and
    no piece of the new one, with one line to say so."""
    import matplotlib.figure
    run, _ = conditioned_run
    scan = write_volume(tmp_path / "scan.nii.gz", blob(shape=(24, 24, 12)))
    out = tmp_path / "cf"
    base = ["counterfactual", "--run", str(run), "--input", str(scan), "--steps", "2", "--out", str(out)]
    driver.main([*base, "--set", "class=NC"])
    before = (out / name).read_bytes()

    def half_a_volume(self, file_map=None, dtype=None):  # nib.save's and to_bytes' writer alike
        image = (file_map or self.file_map)["image"]
        disk_full(image.fileobj or image.filename)
    writers = {"counterfactual.png": (matplotlib.figure.Figure, "savefig", lambda self, fp, **kw: disk_full(fp)),
               "difference.npy": (np, "save", lambda fp, *args, **kw: disk_full(fp)),
               "difference.nii.gz": (nib.Nifti1Image, "to_file_map", half_a_volume)}
    monkeypatch.setattr(*writers[name])
    message = error_of(driver.main, [*base, "--set", "class=AD"])
    assert f"could not write {out / name} (No space left on device); the previous file is unchanged" in message
    assert (out / name).read_bytes() == before and not list(out.glob(".*"))


def test_a_counterfactual_keeps_the_inputs_own_conditions_that_set_does_not_change(conditioned_run, tmp_path,
                                                                                   monkeypatch):
    from conditions import counterfactual as cf
    run, data = conditioned_run
    seen = {}
    monkeypatch.setattr(cf, "counterfactual_latents", lambda model, z0, source, targets, *rest: seen.update(
        source=source.cpu(), target=targets[0].cpu(), twin=targets[1].cpu()) or [z0, z0])
    image = next((data / "AD").iterdir())
    cf.counterfactual(driver.parse(["counterfactual", "--run", str(run), "--input", str(image), "--from", "class=AD",
                                    "--from", "age=71", "--from", "sex=F", "--set", "class=NC", "--steps", "2",
                                    "--out", str(tmp_path / "cf")]))
    conditions = load_run(run, "cpu").conditions
    asked = lambda *settings: asked_values(conditions, list(settings))[None]  # noqa: E731
    assert torch.equal(seen["source"], asked("class=AD", "age=71", "sex=F"))
    assert torch.equal(seen["target"], asked("class=NC", "age=71", "sex=F"))   # NC at 71, not NC of any age or sex
    assert torch.equal(seen["twin"], seen["source"])                              # its twin: under its own


def test_counterfactuals_of_the_held_out_subjects_invert_each_image_under_its_own_values_beside_its_twin(
        conditioned_run, tmp_path, monkeypatch):
    """--input held-out: every image of the subjects stage 1 held out, inverted under its own class, age and sex (from
    the run's table) and denoised twice from that latent: with --set's value in place of its own, and under its own
    (its twin). The images that have --set's value already are left out; the CSV and the record say which image was
    which; at strength 0 nothing changes."""
    from conditions import counterfactual as cf
    run, data = conditioned_run
    seen = []
    monkeypatch.setattr(cf, "counterfactual_latents", lambda model, z0, source, targets, *rest: seen.append(
        (source.cpu(), [t.cpu() for t in targets])) or [z0, z0])
    out = tmp_path / "held"
    record = cf.counterfactual(driver.parse(["counterfactual", "--run", str(run), "--input", "held-out", "--set",
                                             "class=NC", "--steps", "2", "--out", str(out)]))
    table = {line.split(",")[0]: line.split(",")[1:] for line in (data / "participants.csv").read_text().split()[1:]}
    rows = list(csv.DictReader(open(out / "counterfactuals.csv")))
    split, _ = split_files(DataConfig.of_run(run))
    held = sorted(os.path.relpath(p, data) for p, _ in split["held-out"])
    assert len(held) == 6 and sorted(r["file"] for r in rows) == [f for f in held if f.startswith("AD")]
    assert all([r["own_age"], r["own_sex"]] == [f"{float(table[r['subject']][0]):g}", table[r["subject"]][1]]
               for r in rows)
    assert all(r["to_class"] == "NC" and r["own_class"] == r["class"] == "AD" and r["to_age"] == r["own_age"]
               for r in rows)
    conditions = load_run(run, "cpu").conditions
    source = torch.cat([s for s, _ in seen])
    to, twin = (torch.cat(parts) for parts in zip(*[t for _, t in seen]))
    own = torch.stack([asked_values(conditions, [f"class={r['class']}", f"age={table[r['subject']][0]}",
                                                 f"sex={table[r['subject']][1]}"]) for r in rows])
    assert torch.allclose(source, own) and torch.equal(twin, source) and torch.equal(to[:, 1:], source[:, 1:])
    assert to[:, 0].tolist() == [conditions[0].values.index("NC")] * 3
    effects = np.load(out / "effects.npy")
    assert effects.shape == (3, 32, 32) and not effects.any()                 # z0 back twice: no effect, no drift
    assert record["images"] == 3 and record["left_out_with_those_values"] == 3 and record["input"] == "held-out"
    assert record["data"] == str(data.resolve()) and record["holdout"] == 0.25 and record["set"] == ["class=NC"]
    assert record["subjects"] == 1 and json.loads((out / "counterfactual.json").read_text()) == record
    assert record["voxelwise"]["subjects"] == 1 and "1 subjects" in record["voxelwise"]["skipped"]  # test: 6 or more
    for name in ("counterfactual.png", "examples.png"):
        assert (out / name).stat().st_size > 0

    monkeypatch.undo()
    base = ["counterfactual", "--run", str(run), "--input", "held-out", "--shift", "age=10", "--steps", "2"]
    moved = cf.counterfactual(driver.parse([*base, "--num", "4", "--out", str(tmp_path / "age")]))
    rows = list(csv.DictReader(open(tmp_path / "age" / "counterfactuals.csv")))
    assert len(rows) == moved["images"] == 4 and moved["left_out_with_those_values"] == 0
    assert all(float(r["to_age"]) == float(r["own_age"]) + 10 and r["to_class"] == r["own_class"] for r in rows)
    age = next(c for c in conditions if c.name == "age")
    assert moved["beyond_training_range"] == sum(float(r["to_age"]) > age.high for r in rows)
    effects = np.load(tmp_path / "age" / "effects.npy").astype(np.float32)
    assert np.allclose(np.abs(effects).mean((1, 2)), [float(r["mean_abs_effect"]) for r in rows], atol=1e-3)
    assert moved["mean_abs_effect"] > 0 and moved["mean_abs_drift"] > 0
    still = cf.counterfactual(driver.parse([*base, "--strength", "0", "--out", str(tmp_path / "zero")]))
    assert still["mean_abs_effect"] == still["mean_abs_drift"] == 0


def test_counterfactuals_of_the_held_out_subjects_refuse_one_images_flags_and_a_run_without_them(conditioned_run,
                                                                                                 trained_run, tmp_path):
    run, data = conditioned_run
    base = ["counterfactual", "--run", str(run), "--input", "held-out", "--steps", "2", "--out", str(tmp_path / "cf")]
    for flag in (["--from", "class=AD"], ["--slice", "3"], ["--mask", str(next((data / "AD").iterdir()))]):
        assert f"{flag[0]} is for one --input image" in error_of(driver.main, [*base, "--set", "class=NC", *flag])
    assert "say what to change the held-out images to" in error_of(driver.main, base)
    assert "nothing can be said of it" in error_of(driver.main, [*base, "--shift", "age=1000"])
    assert "--num must be positive" in error_of(driver.main, [*base, "--set", "class=NC", "--num", "0"])
    for flag in ("--permutations", "--classifier-steps"):
        assert "must be 0 (none) or more" in error_of(driver.main, [*base, "--set", "class=NC", flag, "-1"])
    for flips in ("10", "200000"):  # none could reach 0.05; hours for nothing
        assert f"--permutations {flips}: fewer than 19" in error_of(driver.main, [*base, "--set", "class=NC",
                                                                                 "--permutations", flips])
    one = ["counterfactual", "--run", str(run), "--input", str(next((data / "AD").iterdir())), "--set", "class=NC"]
    for flag in (["--num", "4"], ["--data", str(data)], ["--labels", str(data / "participants.csv")],
                 ["--permutations", "100"], ["--classifier-steps", "10"]):
        assert f"{flag[0]} is for --input held-out" in error_of(driver.main, [*one, *flag])
    unconditional, _ = trained_run  # trained with --holdout 0
    assert "held out none" in error_of(driver.main, ["counterfactual", "--run", str(unconditional), "--input",
                                                     "held-out", "--set", "x=1", "--out", str(tmp_path / "u")])
    assert not (tmp_path / "cf").exists()


def test_a_counterfactual_shift_moves_the_inputs_own_covariate(conditioned_run, tmp_path, monkeypatch):
    """--shift age=10 with --from age=71: denoised at 81, the other values kept; refused without the own value, beside
    --set of the same name, for a category and for a shift of 0."""
    from conditions import counterfactual as cf
    run, data = conditioned_run
    seen = {}
    monkeypatch.setattr(cf, "counterfactual_latents", lambda model, z0, source, targets, *rest: seen.update(
        source=source.cpu(), target=targets[0].cpu()) or [z0] * len(targets))
    base = ["counterfactual", "--run", str(run), "--input", str(next((data / "AD").iterdir())), "--steps", "2",
            "--out", str(tmp_path / "cf")]
    cf.counterfactual(driver.parse([*base, "--from", "class=AD", "--from", "age=71", "--shift", "age=10"]))
    conditions = load_run(run, "cpu").conditions
    assert torch.allclose(seen["target"], asked_values(conditions, ["class=AD", "age=81"])[None], equal_nan=True)
    assert torch.allclose(seen["source"], asked_values(conditions, ["class=AD", "age=71"])[None], equal_nan=True)
    assert "give it, --from age=VALUE" in error_of(driver.main, [*base, "--shift", "age=10"])
    assert "give one" in error_of(driver.main, [*base, "--from", "age=71", "--set", "age=80", "--shift", "age=10"])
    assert "is a category" in error_of(driver.main, [*base, "--from", "sex=F", "--shift", "sex=1"])
    assert "a number other than 0" in error_of(driver.main, [*base, "--from", "age=71", "--shift", "age=0"])
    image = Image.open(next((data / "AD").iterdir())).convert("L")
    Image.new("L", image.size, 255).save(tmp_path / "mask.png")
    record = cf.counterfactual(driver.parse([*base, "--from", "age=71", "--shift", "age=10", "--mask",
                                             str(tmp_path / "mask.png")])) and json.loads(
        (tmp_path / "cf" / "counterfactual.json").read_text())
    assert record["strength"] == 0.5 and record["inversion"] == "DDIM"     # a change, not a fill from noise


def test_held_out_images_without_an_own_value_of_what_changes_are_left_out_not_changed_from_open():
    """An image with group n/a (or a category the run does not know, NaN alike) set to NC would be changed from an
    open value: left out and counted, for --set as for --shift (found by review: pooled into the effect); one at NC
    already has no effect."""
    from conditions.counterfactual_set import left_out
    nan = float("nan")
    own = torch.tensor([[0.0, 0.5], [1.0, 0.5], [nan, 0.5], [0.0, nan]])   # group (AD 0, NC 1), age
    unchanged, unknown = left_out(own, torch.tensor([1.0, nan]), torch.zeros(2))              # --set group=NC
    assert unchanged.tolist() == [False, True, False, False] and unknown.tolist() == [False, False, True, False]
    unchanged, unknown = left_out(own, torch.tensor([nan, nan]), torch.tensor([0.0, 0.1]))    # --shift age=...
    assert unchanged.tolist() == [False] * 4 and unknown.tolist() == [False, False, False, True]


def test_a_covariate_of_one_training_value_decodes_what_it_encodes_and_shifts():
    """Training ages all 70: the scale's unit is 1 year (encode divides by 1), and decode multiplies by the same (found
    by review: it multiplied by 0, so every shifted or asked age read back as 70)."""
    from conditions.counterfactual import shifted
    from conditions.table import asked_shifts
    age = Condition("age", "continuous", low=70.0, high=70.0)
    assert age.decode(age.encode("80")) == "80" and age.in_units(torch.tensor([10.0])).item() == 80
    to = shifted([age], asked_values([age], ["age=70"])[None], asked_values([age], [])[None],
                 asked_shifts([age], ["age=10"]), ["age=10"])
    assert age.decode(to[0, 0].item()) == "80"


def test_counterfactuals_of_many_held_out_subjects_are_tested_voxel_wise_and_read_back(tmp_path, monkeypatch):
    """Six held-out subjects or more: the voxel-wise test writes its maps and its record, and each image's change of
    age is read back by the condition network, trained on the training subjects alone and cached in the run."""
    from conditions import counterfactual as cf
    data = conditioned_data(tmp_path / "data", per_class=6)
    run, out = tmp_path / "run", tmp_path / "cf"
    vqvae(run, data, "--max-steps", "2", "--holdout", "0.5")
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--condition", "age",
                 "--labels", str(data / "participants.csv")])
    import evaluation.conditions
    trained_on, train = [], evaluation.conditions.train_condition_net
    monkeypatch.setattr(evaluation.conditions, "train_condition_net", lambda dataset, indices, *rest, **kw: (
        trained_on.append([dataset.samples[i][0] for i in indices]) or train(dataset, indices, *rest, **kw)))
    base = ["counterfactual", "--run", str(run), "--input", "held-out", "--shift", "age=10", "--steps", "2",
            "--permutations", "100", "--out", str(out)]
    record = cf.counterfactual(driver.parse([*base, "--classifier-steps", "3"]))
    tested = record["voxelwise"]
    assert tested["subjects"] == 6 and tested["positions"] == ["all"] and "skipped" not in tested
    with np.load(out / "voxelwise.npz") as maps:
        assert maps["t"].shape == maps["p_fwe"].shape == (1, 32, 32) and list(maps["positions"]) == ["all"]
        assert int((maps["p_fwe"] < 0.05).sum()) == tested["significant_voxels"]
        assert int((~np.isnan(maps["t"])).sum()) == tested["voxels_tested"] > 0
    assert (out / "voxelwise.png").stat().st_size > 0
    age = record["read_back"]["conditions"]["age"]
    rows = list(csv.DictReader(open(out / "counterfactuals.csv")))
    assert age["images"] == len(rows) == record["images"] and age["mean_abs_asked_change"] == pytest.approx(10)
    seen = [float(r["read_age"]) - float(r["twin_read_age"]) for r in rows]
    assert age["read_along_asked"] == pytest.approx(np.mean(seen), abs=1e-3)
    held_out = {r["subject"] for r in rows}
    assert len(trained_on) == 1 and not held_out & {os.path.basename(p).split("_")[0] for p in trained_on[0]}
    assert ckpt(run / "condition_net.pt")["key"]["steps"] == 3
    again = cf.counterfactual(driver.parse(base))       # no --classifier-steps: the cached reader, whatever its steps
    assert len(trained_on) == 1 and again["read_back"]["steps"] == 3
    # each image's readings land in its own row: a reader that reads the images' places in what it is given
    monkeypatch.setattr(evaluation.conditions, "read_back", lambda net, images, *rest: torch.arange(len(images)) * 1.0)
    cf.counterfactual(driver.parse(base))
    rows = list(csv.DictReader(open(out / "counterfactuals.csv")))
    assert [float(r["read_age"]) for r in rows] == [float(r["twin_read_age"]) for r in rows] == list(range(len(rows)))


def test_a_read_back_counts_categories_read_as_asked_and_covariates_change_in_units():
    """A category: the share read as asked, of counterfactuals, twins and inputs. A covariate: the change read against
    the change asked image by image, so that --set's changes of either sign do not cancel (found by review: an age
    set to 70 from 60 and from 80, read perfectly, came out as 0 read of 0 asked)."""
    from conditions.read_back import category_entry, covariate_entry
    read = {"counterfactual": torch.tensor([1.0, 1, 0, 1]), "twin": torch.tensor([0.0, 1, 0, 0]),
            "input": torch.tensor([0.0, 0, 0, 1])}
    entry = category_entry(read, torch.ones(4), torch.zeros(4))          # all four AD (0) -> NC (1)
    assert entry == {"counterfactuals_read_as_asked": 0.75, "twins_read_as_asked": 0.25,
                     "inputs_read_as_their_own": 0.75}
    age = Condition("age", "continuous", low=50.0, high=90.0)
    was = torch.tensor([age.encode(v) for v in ("60", "80", "66")])
    to = torch.full((3,), age.encode("70"))                              # --set age=70: +10, -10, +4
    perfect = {"counterfactual": torch.tensor([70.0, 70, 70]), "twin": torch.tensor([60.0, 80, 66]),
               "input": torch.tensor([61.0, 77, 66])}
    entry = covariate_entry(age, perfect, to, was)
    assert entry["mean_abs_asked_change"] == pytest.approx(8) and entry["read_along_asked"] == pytest.approx(8)
    assert entry["slope_read_on_asked"] == pytest.approx(1) and entry["r_read_asked"] == pytest.approx(1)
    assert entry["reader_mae_on_inputs"] == pytest.approx(4 / 3)
    half = {**perfect, "counterfactual": torch.tensor([65.0, 75, 68])}  # half of each change read
    entry = covariate_entry(age, half, to, was)
    assert entry["read_along_asked"] == pytest.approx(4) and entry["slope_read_on_asked"] == pytest.approx(0.5)
    shifted = covariate_entry(age, half, was + 10 / age.width, was)      # --shift age=10: r undefined
    assert shifted["mean_abs_asked_change"] == pytest.approx(10) and shifted["r_read_asked"] is None


def test_counterfactuals_of_the_held_out_subjects_find_moved_data_and_large_sets(conditioned_run, tmp_path,
                                                                                 monkeypatch):
    """--data says where the run's data is now (checked to be stage 1's files), as for evaluate; a data set too large
    for memory is read through the run's disk cache (found by review: no --data, and a crash past 8 GiB)."""
    from functools import partial
    import dataset
    from conditions import counterfactual_set
    from runtime.checkpoint import atomic_save
    run, data = conditioned_run
    copy, moved = tmp_path / "run", tmp_path / "moved"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("counterfactual*"))
    shutil.copytree(data, moved)
    vq = ckpt(copy / "vqvae.pt")
    vq["data_config"]["root"] = vq["data"] = str(tmp_path / "gone")
    atomic_save(vq, copy / "vqvae.pt")
    base = ["counterfactual", "--run", str(copy), "--input", "held-out", "--set", "class=NC", "--steps", "2",
            "--num", "1", "--labels", str(moved / "participants.csv")]
    assert "does not exist" in error_of(driver.main, [*base, "--out", str(tmp_path / "a")])
    monkeypatch.setattr(counterfactual_set, "load_slices", partial(dataset.load_slices, cache_gb=1e-6))
    record = driver.counterfactual.counterfactual(driver.parse([*base, "--data", str(moved), "--out",
                                                                str(tmp_path / "b")]))
    assert record["images"] == 1 and record["data"] == str(moved.resolve())
    assert list(copy.glob("images-*px-*ch.npy"))                            # decoded into the run's disk cache


def test_a_slice_map_goes_back_to_its_voxels_in_the_input_volumes_grid(tmp_path):
    """A volume stored in LPS order with its axes permuted: the bright voxel of the chosen slice, found in the image
    the run reads, is put back by to_volume on that very voxel, in a volume of the input's shape and affine."""
    voxels = blob(shape=(20, 24, 16), seed=1) * 0.5
    voxels[7, 15, 9] = 1000.0                                                 # the marker, in stored order
    affine = np.array([[0, -1.2, 0, 10], [-1.0, 0, 0, 5], [0, 0, 1.5, -3], [0, 0, 0, 1]])  # stored y -> L, x -> P
    path = write_volume(tmp_path / "sub-1.nii.gz", voxels, affine)
    ornt = nib.io_orientation(affine)
    ras = nib.apply_orientation(voxels, ornt)
    marker_ras = np.unravel_index(ras.argmax(), ras.shape)
    slicing = Slicing(axis="coronal", percentiles=(0.0, 100.0), crop_foreground=True)
    image, geometry = read_volume_slice(path, 64, slicing, int(marker_ras[1]))
    bright = (image[0] == image[0].max()).float()                            # where the marker shows in the image
    back = to_volume(bright, geometry)
    assert back.shape == voxels.shape and np.allclose(back.affine, affine)
    found = np.unravel_index(np.asarray(back.dataobj).argmax(), voxels.shape)
    assert found == (7, 15, 9)
    assert "--slice 24" in str(pytest.raises(Exception, read_volume_slice, path, 64, slicing, 24).value)


def test_an_unconditional_checkpoint_written_before_conditions_existed_still_samples(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    old = ckpt(copy / "unet.pt")
    del old["conditions"], old["labels"], old["config"]["conditions"]
    old["config"]["num_classes"] = 0
    torch.save(old, copy / "unet.pt")
    images = predict.predict(predict.parse_args(["--run", str(copy), "--num", "2", "--sampler", "ddim", "--steps", "2",
                                                 "--gif-frames", "2"]))
    assert images.shape == (2, 1, 32, 32) and images.isfinite().all()
    assert "trained unconditional" in error_of(predict.main, ["--run", str(copy), "--num", "1", "--set", "age=3"])


# ----------------------------------------------------------------------------- evaluate: the conditions read back

def test_a_covariate_the_table_gives_no_held_out_subject_is_not_read_back_and_the_rest_is_checked(conditioned_run,
                                                                                                     tmp_path):
    from runtime.checkpoint import atomic_save
    run, data = shutil.copytree(conditioned_run[0], tmp_path / "run"), conditioned_run[1]
    table = tmp_path / "participants.csv"
    table.write_text("\n".join(line if i == 0 else ",".join([line.split(",")[0], "n/a", line.split(",")[2]])
                               for i, line in enumerate((data / "participants.csv").read_text().splitlines())) + "\n")
    saved = ckpt(run / "unet.pt")
    saved["labels"] = {**saved["labels"], "file": str(table)}          # the run's table, with no age at all now
    atomic_save(saved, run / "unet.pt")
    driver.main(["evaluate", "--run", str(run), "--features", "domain", "--classifier-steps", "3", "--steps", "2",
                 "--guidance", "2", "--num", "4", "--out", str(tmp_path / "eval")])
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert [(r["condition"], r["images"], r["count"]) for r in metrics["per_condition"] if r["condition"] == "age"] == [
        ("age", "not checked: held-out images with a value", 0)]
    assert [r["images"] for r in metrics["per_condition"] if r["condition"] == "sex"] == ["real (held out)",
                                                                                       "samples, w=2"]
    # the condition network learned this table's values, not those of one it was trained on before
    assert ckpt(run / "condition_net.pt")["key"]["table"] == read_table(table, saved["labels"]["subject_column"]).sha1


def test_the_check_scores_a_perfect_reading_and_ignores_conditions_not_given():
    from evaluation.conditions import agreement, condition_losses
    age, sex = Condition("age", "continuous", low=60.0, high=80.0), Condition("sex", "category", ["F", "M"])
    truth = torch.tensor([61.0, 70.0, 79.0])
    assert agreement(truth * 2, truth, age)["r"] == pytest.approx(1.0)            # r reads the trend ...
    assert agreement(truth * 2, truth, age)["mae"] == pytest.approx(70.0)         # ... MAE the error
    assert agreement(-truth, truth, age)["r"] == pytest.approx(-1.0)
    assert agreement(torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 0.0]), sex)["recognised"] == pytest.approx(2 / 3)
    # outputs: 2 logits for sex, then 1 value for age; a NaN condition adds no loss
    outputs = torch.tensor([[5.0, -5.0, 0.5], [0.0, 0.0, 0.0]])
    y = torch.tensor([[0.0, 0.5], [nan, nan]])
    assert condition_losses(outputs, y, [sex, age]).item() == pytest.approx(
        torch.nn.functional.cross_entropy(outputs[:1, :2], torch.tensor([0])).item(), abs=1e-6)


def test_a_sets_images_are_read_back_against_the_values_its_manifest_gives_not_the_held_out_ones(monkeypatch,
                                                                                                  tmp_path):
    from types import SimpleNamespace
    import evaluation.conditions as checks
    age, sex = Condition("age", "continuous", low=60.0, high=80.0), Condition("sex", "category", ["F", "M"])

    class Reader(torch.nn.Module):  # reads age (scaled) as the image's mean, and sex M where it is positive
        def forward(self, x):
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([m, -m, m], 1), None  # outputs: age, then sex's two logits

    monkeypatch.setattr(checks, "condition_net", lambda *args: Reader())
    images = torch.tensor([0.2, 0.5, 0.9, -0.3]).view(4, 1, 1, 1).expand(4, 1, 4, 4)  # read: 64, 70, 78, 54; M M M F
    drawn = torch.tensor([[0.25, 1.0], [0.5, 1.0], [1.0, 0.0], [nan, 0.0]])  # 65, 70, 80, not given; M M F F
    held_out = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.2, 1.0], [0.3, 1.0]])
    args = SimpleNamespace(classifier_steps=0, num=None, guidance=[1.0])
    rows, figures = checks.condition_check(args, tmp_path, [age, sex], None, held_out, [(x, 0) for x in images], [],
                                           [0, 1, 2, 3], {}, "cpu", tmp_path, drawn=(images, drawn))
    assert [(r["condition"], r["images"], r["count"]) for r in rows] == [
        ("age", "real (held out)", 4), ("age", "the set", 3), ("sex", "real (held out)", 4), ("sex", "the set", 4)]
    assert rows[1]["mae"] == pytest.approx((1 + 0 + 2) / 3)
    assert rows[1]["r"] == pytest.approx(torch.corrcoef(torch.tensor([[64.0, 70, 78], [65.0, 70, 80]]))[0, 1].item())
    assert rows[3]["recognised"] == pytest.approx(3 / 4) and rows[2]["recognised"] == pytest.approx(1 / 4)
    assert figures == []  # nothing generated, no sweep


def test_evaluate_reads_each_table_condition_back_from_samples_and_draws_a_sweep(conditioned_run, tmp_path):
    run, _ = conditioned_run
    driver.main(["evaluate", "--run", str(run), "--features", "domain", "--classifier-steps", "3", "--steps", "2",
                 "--guidance", "0,2", "--num", "4", "--out", str(tmp_path), "--utility", "3"])
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert list(metrics).index("utility") < list(metrics).index("memorisation") < list(metrics).index("per_condition")
    # train on synthetic, test on real: the class folders' samples at w = 2, as the classifier's training set
    assert [(r["training set"], r["per_class"]) for r in metrics["utility"]] == [
        ("real", [3, 3]), ("synthetic, w=2", [3, 3]), ("real + synthetic, w=2", [6, 6])]
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["auc"] <= 1 for r in metrics["utility"])
    # and the table's conditions, beside the classifier's class: age and sex, real, synthetic and both at w = 2
    assert [(r["condition"], r["training set"]) for r in metrics["utility_conditions"]] == [
        (c, s) for s in ("real", "synthetic, w=2", "real + synthetic, w=2") for c in ("age", "sex")]
    assert metrics["utility_conditions_images"] == 3 and all(r["tested"] == 6 for r in metrics["utility_conditions"])
    order = [list(metrics).index(key) for key in ("utility", "utility_conditions", "memorisation")]
    assert order == sorted(order)
    assert "## Train on synthetic, test on real: the table's conditions" in (tmp_path / "report.md").read_text()
    assert "## Train on synthetic, test on real" in (tmp_path / "report.md").read_text()
    rows = [(r["condition"], r["images"]) for r in metrics["per_condition"]]
    assert rows == [(c, k) for c in ("age", "sex") for k in ("real (held out)", "samples, w=0", "samples, w=2")]
    assert all("mae" in r for r in metrics["per_condition"] if r["condition"] == "age")
    assert all(0 <= r["recognised"] <= 1 for r in metrics["per_condition"] if r["condition"] == "sex")
    assert metrics["sweeps"] == ["eval_sweep_age.png"] and (tmp_path / "eval_sweep_age.png").exists()
    assert "## Conditions" in (tmp_path / "report.md").read_text() and (run / "condition_net.pt").exists()
