"""`sample --cohort`: each sample under the conditions of a training scan drawn at random, so that a synthetic set's
class, age and sex follow the training cohort's together (`--cohort-from held-out`: a held-out scan's)."""
import csv
import json
import math
import shutil

import pytest
import torch

import predict
from conditions.cohort import Cohort, at_training_values, draw, parse_bins, run_cohort, usable
from conditions.table import Condition, saved_conditions
from conftest import ckpt, conditioned_data, error_of, unet, vqvae
from runtime.errors import BadInputError

nan = float("nan")


def manifest(folder):
    return list(csv.DictReader(open(folder / "samples" / "manifest.csv")))


def test_draw_picks_rows_of_the_cohort_by_its_own_seed_over_scans_or_subjects():
    scans = Cohort(torch.tensor([[0.0, 1.0], [1.0, float("nan")], [2.0, 0.0]]), ["a", "b", "c"])
    drawn = draw(scans, 300, seed=0)
    assert drawn.shape == (300, 2)
    assert all(any(torch.equal(row.nan_to_num(-1), c.nan_to_num(-1)) for c in scans.y) for row in drawn)  # rows whole
    counts = torch.bincount(drawn[:, 0].long(), minlength=3)
    assert counts.min() > 70                                            # uniform over scans: about 100 each
    assert torch.equal(draw(scans, 300, seed=0).nan_to_num(-1), drawn.nan_to_num(-1))
    assert not torch.equal(draw(scans, 300, seed=1).nan_to_num(-1), drawn.nan_to_num(-1))
    # a subject of 9 scans and one of 1: over scans 10% are the second's, over subjects half
    many = Cohort(torch.arange(10.0)[:, None], ["often"] * 9 + ["once"])
    once = lambda unit: (draw(many, 2000, 0, unit)[:, 0] == 9).float().mean().item()  # noqa: E731
    assert 0.06 < once("scan") < 0.14 and 0.45 < once("subject") < 0.55


def test_a_scan_of_no_value_or_of_values_the_unet_did_not_train_on_is_not_drawn():
    age, sex = Condition("age", "continuous", low=60, high=80), Condition("sex", "category", ["F", "M"])
    scans = [("s1", torch.tensor([0.5, 0.0])), ("s2", torch.tensor([nan, nan])),      # no value: unconditional
             ("s3", torch.tensor([1.9, 1.0])),                                         # age 98: never trained on
             ("s4", torch.tensor([nan, 1.0])), ("s4", torch.tensor([1.0, 1.0]))]
    cohort, line = usable(scans, [age, sex])
    assert cohort.subjects == ["s1", "s4", "s4"] and torch.equal(cohort.y[0], scans[0][1])
    assert "3 training scans of 2 subjects (1 lack age: drawn with it open)" in line
    assert "left out: 1 with no value, 1 with values the UNet did not train on" in line
    assert "the values of 3 scans are one subject's alone" in line
    assert "none of the 2 training scans" in str(pytest.raises(BadInputError, usable, scans[1:3], [age, sex]).value)


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
    assert json.loads((tmp_path / "a" / "samples" / "sampling.json").read_text())["rows"][0][1]["unit"] == "scan"
    from evaluation.sample_folder import cohort_from
    assert cohort_from(tmp_path / "a") == "training" and cohort_from(tmp_path) is None
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
    by_subject = [*common[:3], "subject", *common[3:]]                  # --cohort subject: other draws
    message = error_of(predict.main, [*by_subject, "--out", str(tmp_path / "a"), "--resume"])
    assert "the conditions --cohort drew (the run's data or table, --cohort's unit, --cohort-from or --cohort-bins, " \
           "--seed or --num differ)" in message


def test_cohort_is_refused_with_chosen_values_on_an_unconditional_run_and_with_a_changed_table(conditioned_run,
                                                                                                trained_run, tmp_path):
    run, data = conditioned_run
    base = ["--run", str(run), "--cohort", "--num", "2", "--steps", "2", "--out", str(tmp_path / "x")]
    assert "--sweep asks for rows of chosen ones" in error_of(predict.main, [*base, "--sweep", "sex=all"])
    assert "picks categories only (leave out --set age=...)" in error_of(predict.main, [*base, "--set", "age=70"])
    assert "--guidance 0 ignores them" in error_of(predict.main, [*base, "--guidance", "0"])
    assert "both choose the class: give it once" in error_of(predict.main, [*base, "--class", "all", "--set",
                                                                           "class=AD"])
    from conditions.cohort import among
    group, sex = Condition("class", "category", ["AD", "NC"]), Condition("sex", "category", ["F", "M"])
    men_of_nc = Cohort(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), ["a", "b"])    # an AD woman, an NC man
    with pytest.raises(BadInputError, match=r"no training scan has the values asked for \(sex=F, class=NC\)"):
        among(men_of_nc, torch.tensor([1.0, 0.0]), [group, sex], "sex=F, class=NC")    # which row of --class all
    assert "without those sample reads neither" in error_of(predict.main, [*base[:1], str(run), "--labels", "x.csv"])
    moved = tmp_path / "moved"                                       # a folder of other files: not the run's data
    shutil.copytree(data, moved)
    next(moved.rglob("*.jpeg")).unlink()
    assert "does not hold the files this run's stage 1 trained on" in error_of(predict.main,
                                                                               [*base, "--data", str(moved)])
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


def test_a_sub_cohort_draws_the_scans_of_a_class_with_their_own_ages(conditioned_run, tmp_path):
    """--cohort --class AD: AD scans alone, each with its own age and sex (the AD subjects' ages, 55-85), not the
    cohort's; --set sex=F the women's scans of either class."""
    run, data = conditioned_run
    table = {r["participant_id"]: r for r in csv.DictReader(open(data / "participants.csv"))}
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    common = ["--run", str(run), "--cohort", "--num", "16", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2"]
    predict.predict(predict.parse_args([*common, "--class", "AD", "--out", str(tmp_path / "ad")]))
    rows = manifest(tmp_path / "ad")
    ad = {(f"{float(table[s]['age']):g}", table[s]["sex"]) for s in trained if s.startswith("AD")}
    assert {r["file"].split("/")[0] for r in rows} == {"AD"} and {r["row"] for r in rows} == {"cohort class=AD"}
    assert {(f"{float(r['age']):g}", r["sex"]) for r in rows} <= ad and len({r["age"] for r in rows}) > 1
    predict.predict(predict.parse_args([*common, "--set", "sex=F", "--out", str(tmp_path / "f")]))
    women = manifest(tmp_path / "f")
    assert {r["sex"] for r in women} == {"F"} and {r["file"].split("/")[0] for r in women} == {"AD", "NC"}


def test_a_cohort_of_every_class_draws_as_many_of_each_from_its_own_scans_with_independent_noise(conditioned_run,
                                                                                                 tmp_path):
    """--cohort --class all: --num per class in its class folder, each class's ages and sexes its own scans' (row 0
    drawn as --cohort --class AD draws), the rows' noise independent unless asked; resumed, the same draws."""
    run, data = conditioned_run
    table = {r["participant_id"]: r for r in csv.DictReader(open(data / "participants.csv"))}
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    common = ["--run", str(run), "--cohort", "--num", "8", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
              "--batch-size", "4"]
    predict.predict(predict.parse_args([*common, "--class", "all", "--out", str(tmp_path / "all")]))
    rows = manifest(tmp_path / "all")
    for name in ("AD", "NC"):
        mine = [r for r in rows if r["file"].startswith(f"{name}/")]
        own = {(f"{float(table[s]['age']):g}", table[s]["sex"]) for s in trained if s.startswith(name)}
        assert len(mine) == 8 and {r["row"] for r in mine} == {f"cohort class={name}"}
        assert {(f"{float(r['age']):g}", r["sex"]) for r in mine} <= own
    settings = json.loads((tmp_path / "all" / "samples" / "sampling.json").read_text())
    assert settings["batch_seeds"] == "SeedSequence(seed, batch, row)"              # a dataset: no twins across rows
    predict.predict(predict.parse_args([*common, "--class", "AD", "--out", str(tmp_path / "ad")]))
    assert [r["age"] for r in manifest(tmp_path / "ad")] == [r["age"] for r in rows[:8]]
    predict.predict(predict.parse_args([*common, "--class", "NC", "--out", str(tmp_path / "nc")]))
    assert [r["age"] for r in manifest(tmp_path / "nc")] != [r["age"] for r in rows[8:]]   # row 1 draws apart
    predict.predict(predict.parse_args([*common, "--class", "all", "--out", str(tmp_path / "all"), "--resume"]))
    assert manifest(tmp_path / "all") == rows
    predict.predict(predict.parse_args([*common, "--class", "all", "--row-noise", "shared", "--out",
                                        str(tmp_path / "shared")]))
    assert json.loads((tmp_path / "shared" / "samples" / "sampling.json").read_text())["batch_seeds"] == \
        "SeedSequence(seed, batch)"


def test_a_cohort_from_held_out_draws_the_held_out_subjects_values_alone(conditioned_run, tmp_path):
    """--cohort-from held-out: each sample at the values of a subject stage 1 held out (never one of training's),
    saved with the set and on its card; resumed from the training scans it is refused; without --cohort, and on a run
    that held out nobody, refused."""
    run, data = conditioned_run
    table = {r["participant_id"]: r for r in csv.DictReader(open(data / "participants.csv"))}
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    held = set(table) - trained
    ages = [float(table[s]["age"]) for s in trained]
    inside = {s for s in held if min(ages) <= float(table[s]["age"]) <= max(ages)}   # the UNet's range
    values = lambda subjects: {(s[:2], f"{float(table[s]['age']):g}", table[s]["sex"]) for s in subjects}  # noqa: E731
    assert inside and values(inside).isdisjoint(values(trained))        # the fixture can tell them apart
    common = ["--run", str(run), "--cohort", "--num", "16", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
              "--batch-size", "8", "--out", str(tmp_path / "h")]
    predict.predict(predict.parse_args([*common, "--cohort-from", "held-out"]))
    rows = manifest(tmp_path / "h")
    assert {(r["file"].split("/")[0], f"{float(r['age']):g}", r["sex"]) for r in rows} == values(inside)
    assert json.loads((tmp_path / "h" / "samples" / "sampling.json").read_text())["rows"][0][1]["from"] == "held-out"
    card = (tmp_path / "h" / "samples" / "dataset_card.md").read_text()
    assert "at the values of a held-out scan picked at random" in card and "--cohort-from held-out`" in card
    from evaluation.report import condition_utility_section
    from evaluation.sample_folder import cohort_from
    assert cohort_from(tmp_path / "h") == "held-out"                  # evaluate --utility says what it tests on
    assert "tested on those subjects' images: its rows know the spread" in "\n".join(
        condition_utility_section([], 2, str(tmp_path / "h"), held_out_values=True).report)
    message = error_of(predict.main, [*common, "--resume"])                  # the training scans' draws: others
    assert "the conditions --cohort drew" in message and "--cohort-from" in message
    assert "give --cohort" in error_of(predict.main, [*common[:2], *common[3:], "--cohort-from", "held-out"])
    whole = tmp_path / "whole"                                               # stage 1 of --holdout 0
    vqvae(whole, data, "--max-steps", "1")
    with pytest.raises(BadInputError, match=r"this run held out none \(train-vqvae --holdout 0\)"):
        run_cohort(whole, [Condition("class", "category", ["AD", "NC"])], None, part="held-out")


def test_cohort_bins_move_a_covariate_to_its_bins_middle_and_count_the_values_still_one_subjects():
    age, sex = Condition("age", "continuous", low=60, high=80), Condition("sex", "category", ["F", "M"])
    scaled = lambda years: (years - 60) / 20                                          # noqa: E731
    scans = [("s1", torch.tensor([scaled(72.4), 0.0])), ("s2", torch.tensor([scaled(74.9), 0.0])),
             ("s3", torch.tensor([scaled(75.0), 1.0])), ("s4", torch.tensor([nan, 1.0])),
             ("s5", torch.tensor([scaled(60.0), 1.0]))]
    cohort, line = usable(scans, [age, sex], bins={"age": 5})
    years = age.in_units(cohort.y[:, 0]).tolist()
    assert [round(v, 4) for v in years[:3] + years[4:]] == [72.5, 72.5, 77.5, 62.5] and math.isnan(years[3])
    assert torch.equal(cohort.y[:, 1], torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0]))      # a category as it was
    assert "age in bins of 5 (their middles); the values of 3 scans are one subject's alone" in line  # s1, s2 share
    assert "the values of 5 scans" in usable(scans, [age, sex])[1]                    # exact: each its own
    assert parse_bins(["age=2.5"], [age, sex]) == {"age": 2.5}
    for wrong, said in (("sex=5", "'sex' is not a covariate of this run (its covariates: age"),
                        ("height=5", "'height' is not a covariate"), ("age=0", "the width is a positive number"),
                        ("age=-5", "positive number"), ("age=five", "positive number"), ("age=inf", "positive"),
                        ("age=25", "wider than the training scans' age, 60-80 (its bins' middles would lie outside")):
        assert said in str(pytest.raises(BadInputError, parse_bins, [wrong], [age, sex]).value)
    assert "names age twice" in str(pytest.raises(BadInputError, parse_bins, ["age=5", "age=2"], [age, sex]).value)
    assert "finer than the float32 values of age hold over 60-80: a width of at least 0.00122" in str(
        pytest.raises(BadInputError, parse_bins, ["age=0.001"], [age, sex]).value)
    one_age = Condition("age", "continuous", low=70, high=70)
    assert "has one value, 70: nothing to bin" in str(pytest.raises(BadInputError, parse_bins, ["age=5"],
                                                                    [one_age]).value)
    edge, line = usable([("s1", torch.tensor([scaled(61.0), 0.0])), ("s2", torch.tensor([scaled(79.0), 0.0]))],
                        [age, sex], bins={"age": 15})
    assert [round(v, 4) for v in age.in_units(edge.y[:, 0]).tolist()] == [67.5, 82.5]   # [60, 75), [75, 90)
    assert "(1 of age outside 60-80, the training range: the UNet extrapolates there)" in line


@pytest.mark.parametrize("low, high, width, values", [
    (55.0, 91.9, 0.1, [55.0 + k / 10 for k in range(370)]),             # ages to a tenth: 55.3 stays in [55.3, 55.4)
    (800000.0, 1900000.0, 1000.0, [800000.0 + 1000 * k for k in range(0, 1101, 7)]),   # a volume in mm^3
    (0.0001, 0.0009, 0.00005, [0.0001 + 0.00005 * k for k in range(16)])])              # a small-unit measure
def test_a_binned_value_read_back_from_its_float32_scaling_stays_in_the_bin_its_table_text_is_in(low, high, width,
                                                                                                   values):
    c = Condition("x", "continuous", low=low, high=high)
    scans = [(f"s{k}", torch.tensor([c.encode(f"{v:.6g}")])) for k, v in enumerate(values)]
    cohort, _ = usable(scans, [c], bins={"x": width})
    middles = c.in_units(cohort.y[:, 0].double()).tolist()
    expected = [(math.floor(round(v / width, 6)) + 0.5) * width for v in values]     # each value is a bin's lower end
    assert max(abs(m - e) for m, e in zip(middles, expected)) < width / 100


def test_a_cohort_set_with_binned_ages_is_drawn_labelled_and_recorded_at_the_bins_middles(conditioned_run, tmp_path,
                                                                                         capsys):
    run, data = conditioned_run
    table = {r["participant_id"]: r for r in csv.DictReader(open(data / "participants.csv"))}
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    middles = {(s[:2], f"{(float(table[s]['age']) // 10 + 0.5) * 10:g}", table[s]["sex"]) for s in trained}
    common = ["--run", str(run), "--cohort", "--num", "16", "--sampler", "ddim", "--steps", "2", "--gif-frames", "2",
              "--out", str(tmp_path / "b")]
    predict.predict(predict.parse_args([*common, "--cohort-bins", "age=10"]))
    assert "age in bins of 10 (their middles)" in capsys.readouterr().out
    rows = manifest(tmp_path / "b")
    assert {(r["file"].split("/")[0], f"{float(r['age']):g}", r["sex"]) for r in rows} <= middles
    tsv = list(csv.DictReader(open(tmp_path / "b" / "samples" / "participants.tsv"), delimiter="\t"))
    assert {t["age"] for t in tsv} <= {"55", "65", "75", "85"}                        # no patient's own age
    assert json.loads((tmp_path / "b" / "samples" / "sampling.json").read_text())["rows"][0][1]["bins"] == {"age": 10}
    card = (tmp_path / "b" / "samples" / "dataset_card.md").read_text()
    assert "`sample --cohort --cohort-bins age=10`" in card and "age moved to the middle of its bin of 10" in card
    assert "--cohort-bins" in error_of(predict.main, [*common, "--resume"])           # exact ages: other draws
    assert "give --cohort" in error_of(predict.main, [*common[:2], *common[3:], "--cohort-bins", "age=10"])


def test_a_held_out_scan_equal_to_a_training_scan_or_of_a_category_training_never_had_is_left_out(tmp_path):
    """Held-out AD2 has training AD0's class, age and sex (a sample drawn there is at a training patient's values);
    held-out NC3's sex is U where training had F and M (drawn open, it would be labelled blank): both left out, said."""
    data = conditioned_data(tmp_path / "data")                                  # the conditioned run's, edited
    table = (data / "participants.csv").read_text()
    (data / "participants.csv").write_text(table.replace("AD2,75,F", "AD2,55,F").replace("NC3,80,M", "NC3,80,U"))
    run = tmp_path / "run"
    vqvae(run, data, "--max-steps", "1", "--holdout", "0.25")
    unet(run, "--max-steps", "1", "--condition", "class,age,sex", "--labels", str(data / "participants.csv"))
    trained = {p.split("/")[-1].split("_")[0] for p in ckpt(run / "latents.pt")["paths"]}
    assert {"AD2", "NC3"}.isdisjoint(trained) and {"AD0", "NC1"} <= trained      # the split these subjects give
    saved = ckpt(run / "unet.pt")
    conditions = saved_conditions(saved)
    with pytest.raises(BadInputError) as refused:
        run_cohort(run, conditions, saved["labels"], part="held-out")
    assert "none of the 2 held-out scans can be drawn (left out: 1 with a category the UNet never saw (sex 'U'), " \
           "1 at a training scan's own values, a covariate among them)" in str(refused.value)
    cohort, line = run_cohort(run, conditions, saved["labels"])                      # the training scans: as before
    assert len(cohort.y) == 6 and "left out" not in line
    by_class = [c for c in conditions if c.name == "class"]                          # a class alone is many patients'
    cohort, line = run_cohort(run, by_class, None, part="held-out")
    assert len(cohort.y) == 2 and "left out" not in line


def test_a_held_out_scan_is_left_out_where_its_given_values_are_a_training_scans_own_a_covariate_among_them():
    group, age, sex = (Condition("class", "category", ["AD", "NC"]), Condition("age", "continuous", low=60, high=80),
                       Condition("sex", "category", ["F", "M"]))
    scaled = lambda years: (years - 60) / 20                                          # noqa: E731
    training = torch.tensor([[0.0, scaled(72.5), 0.0], [1.0, scaled(62.0), 0.0]])   # AD 72.5 F, NC 62 F (exact)
    held = torch.tensor([[0.0, scaled(72.5), 0.0],      # AD 72.5 F: a training patient's own
                         [0.0, scaled(72.5), nan],      # sex left open: the UNet learned AD 72.5 open from the same
                         [0.0, nan, 0.0],               # AD F, age open: categories alone are many patients'
                         [1.0, scaled(72.5), 0.0],      # NC 72.5 F: nobody's
                         [1.0, scaled(61.2), 0.0]])     # NC 61.2 F: nobody's
    at = lambda y: at_training_values(y, training, [group, age, sex]).tolist()       # noqa: E731
    assert at(held) == [True, True, False, False, False]
    binned_held = usable([(f"h{k}", row) for k, row in enumerate(held)], [group, age, sex], "held-out", {"age": 5},
                         training)                       # 61.2 -> 62.5, never a training age; 72.4 -> 72.5 would be
    assert len(binned_held[0].y) == 3 and "left out: 2 at a training scan's own values" in binned_held[1]
