"""driver.py: presets, help, the demo's order of stages, flags resolved once, and every bad command line's
one-line error (before anything is written)."""
import json
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import driver
from conftest import ckpt, error_of, unet, vqvae
from runtime.checkpoint import atomic_save
from runtime.errors import BadInputError
from volumes.run_data import DataConfig

REPO = Path(__file__).resolve().parents[1]


def test_missing_data_folder(tmp_path):
    msg = error_of(vqvae, tmp_path / "run", tmp_path / "nowhere", "--max-steps", "1")
    assert "does not exist" in msg and not (tmp_path / "run" / "vqvae.pt").exists()


def test_folder_without_images(tmp_path):
    (tmp_path / "data" / "AD").mkdir(parents=True)
    assert "no images" in error_of(vqvae, tmp_path / "run", tmp_path / "data", "--max-steps", "1")


def test_corrupt_image_named(adni_folder, tmp_path):
    (adni_folder / "test" / "NC" / "bad_80.jpeg").write_bytes(b"garbage")
    assert "bad_80.jpeg" in error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "1")


def test_train_unet_without_vqvae(tmp_path, capsys):
    assert "no vqvae checkpoint" in error_of(unet, tmp_path / "run", "--max-steps", "1")
    assert "config:" not in capsys.readouterr().out   # stage 1 is checked before a preset is chosen and printed


def test_stage_2_inherits_stage_1s_data_and_preset_without_rewriting_its_own_flags(trained_run, tmp_path):
    run, data = trained_run
    args = driver.parse(["train-unet", "--run", str(run)])
    assert (args.preset, args.image_size, args.data_config.image_size, args.data_config.root) == ("tiny", 32, 32, str(data))
    elsewhere = tmp_path / "elsewhere"                   # the same files in another place (they are checked)
    shutil.copytree(data, elsewhere)
    assert driver.parse(["evaluate", "--run", str(run), "--data", str(elsewhere)]).data_config.root == str(elsewhere)


def test_errors_print_one_line_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--run", str(tmp_path / "r"),
                           "--data", str(tmp_path / "missing")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and proc.stderr.strip().startswith("error:")


def test_help_documents_defaults():
    for command in ("train-vqvae", "train-unet", "sample", "demo"):
        proc = subprocess.run([sys.executable, str(REPO / "driver.py"), command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "default" in proc.stdout
    out = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--help"], capture_output=True, text=True).stdout
    assert "tiny 2048, full 4096" in out.replace("\n", " ").replace("  ", " ") or "tiny 2048" in out


def test_demo_data_is_the_default(tmp_path):
    driver.main(["train-vqvae", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo"),
                 "--max-steps", "1", "--batch-size", "4", "--vq-channels", "8"])
    c = ckpt(tmp_path / "run" / "vqvae.pt")
    assert "mni152-demo" in c["data"] and c["config"]["image_size"] == 64 and c["config"]["codebook_size"] == 2048


def test_demo_runs_the_three_stages_in_order_with_the_tiny_preset(monkeypatch, tmp_path):
    import predict
    import train
    calls = []
    def stage1(a):  # what stage 2 inherits: the preset and the data config, read from vqvae.pt
        calls.append(("vqvae", a.preset, a.resume, a.data))
        (tmp_path / "run").mkdir(exist_ok=True)  # as start_stage makes it: the lock made it first
        atomic_save({"kind": "vqvae", "model": {}, "config": {}, "optimizer": {}, "step": 1,
                     "args": {"preset": a.preset}, "data_config": asdict(a.data_config)}, tmp_path / "run" / "vqvae.pt")
    monkeypatch.setattr(train, "train_vqvae", stage1)
    monkeypatch.setattr(train, "train_unet", lambda a: calls.append(("unet", a.preset, a.resume, a.data)))
    monkeypatch.setattr(predict, "predict", lambda a: calls.append(("predict", a.sampler, a.steps, predict.sampling_from_args(a).repeat_times)))
    driver.main(["demo", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo")])
    assert calls == [("vqvae", "tiny", False, None), ("unet", "tiny", False, None), ("predict", "ddpm", 1000, 5)]
    calls.clear()                     # run again: the stage that saved a checkpoint is resumed, the others start
    driver.main(["demo", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo")])
    assert calls == [("vqvae", "tiny", True, None), ("unet", "tiny", False, None), ("predict", "ddpm", 1000, 5)]


@pytest.mark.parametrize("flags, expected", [
    (["train-vqvae", "--image-size", "48"], "must be a multiple of 32"),   # tiny VQ-VAE /4, then the UNet /8
    (["train-vqvae", "--image-size", "0"], "must be positive"),
    (["train-vqvae", "--max-steps", "-3"], "must be positive"),
    (["train-unet", "--diffusion-steps", "0"], "must be positive"),
    (["sample", "--num", "0"], "--num must be positive"),
    (["train-vqvae", "--lr", "nan"], "must be positive, got nan"),       # nan <= 0 is False
    (["train-vqvae", "--lr", "inf"], "must be positive, got inf"),
    (["train-vqvae", "--vq-mult", "0,0,0"], "integers of 1 or more"),      # was a convolution's RuntimeError
    (["train-vqvae", "--warmup", "-5"], "must be 0 or more"),
    (["train-vqvae", "--cache-gb", "-1"], "must be 0 or more"),
    (["train-vqvae", "--perceptual-weight", "-1"], "must be 0 or more"),
    (["train-vqvae", "--holdout-seed", "-1"], "must be in 0 .. 2^63 - 1"),  # was numpy's traceback
    (["train-vqvae", "--seed", "99999999999999999999"], "must be in 0 .. 2^63 - 1"),
    (["sample", "--seed", "-1"], "must be in 0 .. 2^63 - 1"),
    (["evaluate", "--holdout-seed", "-1"], "must be in 0 .. 2^63 - 1"),
    (["train-vqvae", "--run", ""], "--run is empty"),                      # was the current folder
])
def test_bad_values_on_the_command_line_are_one_line_errors(flags, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        driver.main([*flags[:1], "--run", str(tmp_path / "run"), *flags[1:]])
    assert e.value.code != 0
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in message and "\n" not in message


def test_the_ends_of_a_flags_range_are_taken_and_what_lies_beyond_them_is_refused(capsys):
    """--cache-gb 0 (never in memory: the disk cache), --warmup 0, --cooldown 0 and 1 parse; a cooldown below 0 or
    above 1 is refused (parsed only: a value let through would start a training run on the demo data)."""
    args = driver.parse(["train-vqvae", "--cache-gb", "0", "--warmup", "0", "--cooldown", "0"])
    assert (args.cache_gb, args.warmup, args.cooldown) == (0, 0, 0)
    assert driver.parse(["train-vqvae", "--cooldown", "1"]).cooldown == 1
    for value in ("-0.1", "1.5"):
        with pytest.raises(SystemExit):
            driver.parse(["train-vqvae", "--cooldown", value])
        assert f"must be in [0, 1], got {value}" in capsys.readouterr().err


def test_the_command_line_loads_the_metrics_only_for_evaluate():
    """torchmetrics imports transformers where it is installed (about 2 s here, more on a cold disk): the training
    and sampling commands must not pay for it. Fails if driver.py imports evaluation.evaluate at the top."""
    code = "import sys, driver; driver.build_parser(); print('torchmetrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ----------------------------------------------------------------------------- a resumed run is the run it saved

@pytest.fixture
def stage1_run(adni_folder, tmp_path):
    """A 1-step stage 1 started with non-default settings of every kind."""
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "1", "--holdout", "0.25", "--grad-accum", "2", "--laplacian-weight", "0.5",
          "--seed", "3", "--cooldown", "0")
    return run, adni_folder


def test_a_resumed_run_takes_every_setting_it_was_not_given_from_the_run(stage1_run):
    run, data = stage1_run
    args = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    assert (args.data, args.data_config.root, args.data_config.holdout, args.grad_accum, args.laplacian_weight,
            args.seed, args.image_size, args.vq_channels) == (str(data), str(data), 0.25, 2, 0.5, 3, 32, 8)
    assert args.max_steps == 1 and args.batch_size == 8 and args.workers is None   # this machine's own


def test_without_its_config_json_a_run_resumes_with_the_flags_its_checkpoint_saved(stage1_run):
    run, data = stage1_run
    (run / "config.json").unlink()
    args = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    assert (args.grad_accum, args.laplacian_weight, args.seed, args.cooldown, args.slices) == (2, 0.5, 3, 0.0, None)


def test_a_resumed_run_is_the_one_its_checkpoint_saved_not_a_later_attempt_that_saved_nothing(stage1_run):
    run, data = stage1_run
    config = json.loads((run / "config.json").read_text())      # as `--resume --lr 0.5 --max-steps 200` writes it
    config["train-vqvae"].update(lr=0.5, max_steps=200, log_every=7)  # before a NaN stops it with nothing saved
    (run / "config.json").write_text(json.dumps(config))
    args = driver.parse(["train-vqvae", "--run", str(run), "--resume"])
    saved = ckpt(run / "vqvae.pt")["args"]
    assert (args.lr, args.max_steps, args.log_every) == (saved["lr"], 1, saved["log_every"]) != (0.5, 200, 7)


@pytest.mark.parametrize("flag, value", [("--grad-accum", "4"), ("--batch-size", "4"), ("--holdout", "0.5"),
                                         ("--laplacian-weight", "0"), ("--adversarial-weight", "0.1"), ("--seed", "0"),
                                         ("--axis", "coronal"), ("--no-clamped-loss", None), ("--preset", "full"),
                                         ("--image-size", "64"), ("--codebook-size", "64"),
                                         ("--vq-min-group-width", "4")])
def test_a_setting_of_the_run_given_again_with_another_value_is_refused_in_one_line(stage1_run, flag, value):
    run, data = stage1_run
    before = (run / "vqvae.pt").read_bytes()
    command = ["train-vqvae", "--run", str(run), "--resume", flag, *([value] if value else [])]
    message = error_of(driver.main, command)
    assert flag.replace("--no-", "--") in message and "differs from this run's" in message
    assert (run / "vqvae.pt").read_bytes() == before


def test_what_may_change_on_resume_is_honoured_and_a_setting_given_again_unchanged_is_fine(stage1_run):
    run, data = stage1_run
    args = driver.parse(["train-vqvae", "--run", str(run), "--resume", "--max-steps", "9", "--lr", "5e-4",
                         "--log-every", "3", "--workers", "1", "--device", "cpu", "--max-minutes", "2",
                         "--grad-accum", "2", "--holdout", "0.25", "--data", str(data), "--seed", "3"])
    assert (args.max_steps, args.lr, args.log_every, args.workers, args.max_minutes, args.grad_accum) == \
        (9, 5e-4, 3, 1, 2, 2)


def test_every_setting_documented_as_changeable_takes_a_new_value_on_resume(stage1_run, tmp_path):
    """Each name in driver.CHANGEABLE, given with a value other than the run's, is honoured, not refused. Stage 1's
    --labels is the exception it documents (its classes are the run's); stage 2's moves: tests/test_conditions.py."""
    run, data = stage1_run
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)
    new = {"max_steps": ("9", 9), "epochs": ("3", 3), "lr": ("5e-4", 5e-4), "warmup": ("3", 3),
           "cooldown": ("0.5", 0.5), "adversarial_lr": ("3e-4", 3e-4), "log_every": ("3", 3), "sample_every": ("3", 3),
           "save_every": ("3", 3), "tensorboard": (None, True), "deterministic": (None, True),
           "skip_nonfinite": (None, True), "data": (str(moved), str(moved))}
    assert set(new) == driver.CHANGEABLE - {"labels"}             # a name added to CHANGEABLE needs a value here
    saved = ckpt(run / "vqvae.pt")["args"]
    for name, (text, value) in new.items():
        flag = "--" + name.replace("_", "-")
        args = driver.parse(["train-vqvae", "--run", str(run), "--resume", flag, *([text] if text else [])])
        assert getattr(args, name) == value != saved[name], name


def test_a_resumed_run_or_stage_2_on_a_folder_without_the_runs_files_is_refused(stage1_run, tmp_path):
    run, data = stage1_run
    moved = tmp_path / "moved"
    shutil.copytree(data, moved)                                  # the same files elsewhere: fine
    resumed = driver.parse(["train-vqvae", "--run", str(run), "--resume", "--data", str(moved)])
    assert resumed.data_config.root == str(moved)
    assert driver.parse(["train-unet", "--run", str(run), "--data", str(moved)]).data_config.root == str(moved)
    shutil.copy(moved / "train" / "AD" / "trainAD0_67.jpeg", moved / "train" / "AD" / "new_1.jpeg")
    for command in (["train-vqvae", "--resume"], ["train-unet"], ["evaluate"]):
        message = error_of(driver.main, [*command, "--run", str(run), "--data", str(moved)])
        assert "does not hold the files this run's stage 1 trained on" in message and "25 files" in message


def test_stage_2_does_not_offer_the_flags_it_inherits_from_stage_1():
    out = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-unet", "--help"], capture_output=True,
                         text=True).stdout
    offered = set(re.findall(r"--[a-z-]*[a-z]", out))
    assert not offered & {"--image-size", "--channels", "--skip-bad-images", "--demo-dir", "--holdout", "--axis"}
    assert {"--data", "--cache-gb", "--channels-last"} <= offered


@pytest.mark.parametrize("flag, value", [("--ema-decay", "0.9"), ("--conditional", None), ("--batch-size", "4"),
                                         ("--schedule", "cosine"), ("--unet-channels", "16")])
def test_stage_2_resumed_with_another_setting_is_refused_in_one_line(trained_run, tmp_path, flag, value):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    message = error_of(driver.main, ["train-unet", "--run", str(run), "--resume", flag, *([value] if value else [])])
    assert flag in message and "differs from this run's" in message


def test_an_interrupted_command_says_how_to_continue_it():
    assert driver.how_to_continue(["train-vqvae", "--run", "r"]) == "run the same command with --resume to continue"
    assert "demo command again" in driver.how_to_continue(["demo", "--run", "r"])   # demo has no --resume: it resumes
    assert "--resume" in driver.how_to_continue(["sample", "--run", "r"])          # a sample set continues
    for command in ("evaluate", "ema", "counterfactual"):                            # no --resume: they start over
        assert driver.how_to_continue([command, "--run", "r"]) == "run the same command again (it starts over)"


def test_a_run_or_output_folder_inside_the_data_or_on_a_file_is_refused(trained_run, adni_folder, tmp_path):
    """What a run writes inside the data folder (grids, checkpoints, samples) would be read as training images."""
    inside = error_of(vqvae, adni_folder / "AD" / "run1", adni_folder, "--max-steps", "1")
    assert f"--run {adni_folder / 'AD' / 'run1'} is inside the data folder" in inside
    assert not (adni_folder / "AD" / "run1").exists()                    # nothing left behind
    run, data = trained_run
    message = error_of(driver.main, ["sample", "--run", str(run), "--num", "1", "--out", str(Path(data) / "gen")])
    assert "--out" in message and "is inside the data folder" in message
    (tmp_path / "file").write_text("")
    assert "is a file, not a run folder" in error_of(vqvae, tmp_path / "file", adni_folder, "--max-steps", "1")


def test_a_link_in_the_data_folder_into_the_run_or_output_folder_or_above_it_is_refused(adni_folder, tmp_path):
    """The listing follows links to folders: a run reached through one had its grids read as training images by the
    next command, since the check compared the paths alone."""
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)                              # a set written by `sample` before
    (adni_folder / "train" / "AD" / "more").symlink_to(run / "samples")
    message = error_of(vqvae, run, adni_folder, "--max-steps", "1")
    assert f"--run {run} is read with the data folder {adni_folder} through its link {adni_folder}/train/AD/more" \
           in message and not (run / "vqvae.pt").exists()
    data = DataConfig(root=str(adni_folder))
    with pytest.raises(BadInputError, match="through its link"):      # sample --out into the linked folder
        data.refuse_inside(run / "samples", "--out")
    (adni_folder / "train" / "AD" / "more").unlink()
    (tmp_path / "scratch").mkdir()
    (adni_folder / "test" / "NC" / "scratch").symlink_to(tmp_path / "scratch")   # a folder the run would be in
    with pytest.raises(BadInputError, match="through its link"):
        data.refuse_inside(tmp_path / "scratch" / "new_run", "--run")
    data.refuse_inside(tmp_path / "scratch" / ".runs" / "r", "--run")  # a hidden folder is not listed
    data.refuse_inside(run, "--run")                                   # a link elsewhere is fine


def test_the_unet_s_ema_decay_and_a_linear_schedule_of_too_few_steps_are_refused(stage1_run):
    run, _ = stage1_run
    for value in ("1", "1.5", "-0.1"):
        assert "--ema-decay must be in [0, 1)" in error_of(driver.main, ["train-unet", "--run", str(run),
                                                                          "--ema-decay", value])
    assert "--diffusion-steps 20 is too few for --schedule linear" in error_of(  # beta_T = 1: abar_T = 0
        driver.main, ["train-unet", "--run", str(run), "--diffusion-steps", "20"])


@pytest.mark.parametrize("argv", [["train-vqvae", "--lr", "nan"], ["train-unet", "--max-steps", "0"],
                                  ["sample", "--seed", "-1"], ["train-vqvae", "--no-such-flag"]])
def test_a_bad_flag_is_one_line_not_the_usage_of_every_flag(argv, capsys):
    with pytest.raises(SystemExit) as e:
        driver.main(argv)
    printed = capsys.readouterr().err
    assert e.value.code == 2 and printed.count("\n") == 1 and printed.startswith("error: ") and "usage" not in printed


def test_under_torchrun_one_process_per_machine_says_what_stopped_them_all(monkeypatch, tmp_path, capsys):
    bad = ["train-vqvae", "--run", str(tmp_path / "run"), "--data", str(tmp_path / "missing")]
    monkeypatch.setenv("LOCAL_RANK", "1")                  # rank 1 of a machine: exits as rank 0 does, silent
    with pytest.raises(SystemExit) as stopped:
        driver.main(bad)
    assert stopped.value.code == 1 and "error" not in capsys.readouterr().err
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert "does not exist" in error_of(driver.main, bad)
