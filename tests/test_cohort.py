"""`sample --cohort`: each sample under the conditions of a training scan drawn at random, so that a synthetic set's
class, age and sex follow the training cohort's together."""
import csv
import json
import shutil

import torch

import predict
from conditions.cohort import draw
from conftest import ckpt, error_of


def manifest(folder):
    return list(csv.DictReader(open(folder / "samples" / "manifest.csv")))


def test_draw_picks_rows_of_the_cohort_by_its_own_seed():
    cohort = torch.tensor([[0.0, 1.0], [1.0, float("nan")], [2.0, 0.0]])
    drawn = draw(cohort, 300, seed=0)
    assert drawn.shape == (300, 2)
    assert all(any(torch.equal(row.nan_to_num(-1), c.nan_to_num(-1)) for c in cohort) for row in drawn)  # rows whole
    counts = torch.bincount(drawn[:, 0].long(), minlength=3)
    assert counts.min() > 70                                            # uniform over scans: about 100 each
    assert torch.equal(draw(cohort, 300, seed=0).nan_to_num(-1), drawn.nan_to_num(-1))
    assert not torch.equal(draw(cohort, 300, seed=1).nan_to_num(-1), drawn.nan_to_num(-1))


def test_a_cohort_set_draws_each_samples_class_age_and_sex_together_from_a_training_subject(conditioned_run, tmp_path):
    run, data = conditioned_run
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}   # AD0 ... of training
    table = {r["participant_id"]: r for r in csv.DictReader(open(data / "participants.csv"))}
    subject_of = {(s[:2], table[s]["age"], table[s]["sex"]): s for s in table}   # each subject's values are its own
    common = ["--run", str(run), "--cohort", "--num", "30", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
              "--batch-size", "8"]
    predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "a")]))
    rows = manifest(tmp_path / "a")
    drawn = [subject_of.get((r["file"].split("/")[0], f"{float(r['age']):g}", r["sex"])) for r in rows]
    assert None not in drawn and set(drawn) <= trained and len(set(drawn)) >= 4    # no held-out subject, no mixture
    assert {r["row"] for r in rows} == {"cohort"}
    assert json.loads((tmp_path / "a" / "samples" / "sampling.json").read_text())["rows"][0][1].keys() == {"drawn"}
    tsv = list(csv.DictReader(open(tmp_path / "a" / "samples" / "participants.tsv"), delimiter="\t"))
    assert [(t["age"], t["sex"]) for t in tsv] == [(r["age"], r["sex"]) for r in rows]
    # resumed after losing its last batch: the same draws; another seed draws others
    kept = rows[:24]
    with open(tmp_path / "a" / "samples" / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "a"), "--resume"]))
    assert [(r["file"], r["age"], r["sex"]) for r in manifest(tmp_path / "a")] == [(r["file"], r["age"], r["sex"])
                                                                                   for r in rows]
    predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "b"), "--seed", "1"]))
    assert [r["age"] for r in manifest(tmp_path / "b")] != [r["age"] for r in rows]


def test_cohort_is_refused_with_chosen_values_on_an_unconditional_run_and_with_a_changed_table(conditioned_run,
                                                                                                trained_run, tmp_path):
    run, data = conditioned_run
    base = ["--run", str(run), "--cohort", "--num", "2", "--steps", "2", "--out", str(tmp_path / "x")]
    assert "leave out --class, --set and --sweep" in error_of(predict.main, [*base, "--set", "sex=F"])
    unconditional, _ = trained_run
    assert "is unconditional" in error_of(predict.main, ["--run", str(unconditional), "--cohort", "--num", "2",
                                                         "--steps", "2", "--out", str(tmp_path / "y")])
    original = (data / "participants.csv").read_text()
    (data / "participants.csv").write_text(original.replace(",55,", ",56,"))
    try:
        assert "changed since this run was trained" in error_of(predict.main, base)
    finally:
        (data / "participants.csv").write_text(original)
    shutil.rmtree(tmp_path / "x", ignore_errors=True)
