"""Faults and hostile inputs: kill -9 and resume, signals, NaN, a full disk, damaged or crafted
checkpoints, and image folders no one should have to clean by hand. Nothing may be lost or trusted."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import driver
import predict
import train
from conftest import SMALL_UNET, SMALL_VQ, ckpt, error_of, unet, write_blob_images  # noqa: F401
from dataset import BadInputError, load_slices

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- kill -9, signals

def command(stage: str, run: Path, data: Path, *extra) -> list[str]:
    flags = ([f"--data={data}", "--preset", "tiny", *SMALL_VQ] if stage == "vqvae" else SMALL_UNET)
    return [sys.executable, str(REPO / "driver.py"), f"train-{stage}", "--run", str(run), *flags,
            "--save-every", "2", "--deterministic", *extra]


def start_and_wait_for_checkpoint(cmd: list[str], ckpt_path: Path) -> subprocess.Popen:
    """Start a training process and return once it has written its first checkpoint."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not ckpt_path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 180 s"
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def blobs(tmp_path_factory):
    data = tmp_path_factory.mktemp("faults") / "adni"
    rng = np.random.default_rng(1)
    for label in ("AD", "NC"):
        write_blob_images(data / "train" / label, [f"{label}{i}" for i in range(3)], 3, rng)
    return data


@pytest.mark.parametrize("stage", ["vqvae", "unet"])
def test_kill_9_then_resume_ends_with_the_weights_of_an_uninterrupted_run(stage, blobs, tmp_path):
    runs = {name: tmp_path / name for name in ("killed", "straight")}
    if stage == "unet":  # both runs start from the same trained VQ-VAE
        subprocess.run(command("vqvae", runs["killed"], blobs, "--max-steps", "2"), check=True, capture_output=True)
        runs["straight"].mkdir()
        shutil.copy(runs["killed"] / "vqvae.pt", runs["straight"] / "vqvae.pt")
    path = runs["killed"] / f"{stage}.pt"
    victim = start_and_wait_for_checkpoint(command(stage, runs["killed"], blobs, "--max-steps", "100000"), path)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = ckpt(path)["step"]   # the last checkpoint before the kill, complete (atomic rename)
    end = str(killed_at + 4)
    subprocess.run(command(stage, runs["killed"], blobs, "--max-steps", end, "--resume"), check=True, capture_output=True)
    subprocess.run(command(stage, runs["straight"], blobs, "--max-steps", end), check=True, capture_output=True)

    resumed, straight = ckpt(path), ckpt(runs["straight"] / f"{stage}.pt")
    assert resumed["step"] == straight["step"] == killed_at + 4
    for part in ("model", "ema") if stage == "unet" else ("model",):
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name} differs after kill -9 and --resume"
    assert resumed["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    for i, state in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["exp_avg"], state["exp_avg"])
    if stage == "unet":
        assert resumed["latent_scale"] == straight["latent_scale"] and resumed["ema_updates"] == straight["ema_updates"]


@pytest.mark.parametrize("sig, stage", [(signal.SIGINT, "vqvae"), (signal.SIGTERM, "unet")])
def test_sigint_and_sigterm_save_a_checkpoint_and_say_how_to_resume(sig, stage, blobs, tmp_path):
    run = tmp_path / "run"
    if stage == "unet":
        subprocess.run(command("vqvae", run, blobs, "--max-steps", "2"), check=True, capture_output=True)
    path = run / f"{stage}.pt"
    proc = start_and_wait_for_checkpoint(command(stage, run, blobs, "--max-steps", "100000"), path)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step = ckpt(path)["step"]
    assert f"{signal.Signals(sig).name} received: saved {path} at step {step}; run the same command with --resume" in err
    subprocess.run(command(stage, run, blobs, "--max-steps", str(step + 2), "--resume"), check=True, capture_output=True)
    assert ckpt(path)["step"] == step + 2


# ----------------------------------------------------------------------------- NaN, full disk, damaged files

def nan_at_call(monkeypatch, which: int):
    """Make the diffusion loss NaN (gradients included) at its `which`-th call."""
    from modules import GaussianDiffusion
    original, calls = GaussianDiffusion.loss, []

    def loss(self, *args, **kwargs):
        calls.append(1)
        value = original(self, *args, **kwargs)
        return value * float("nan") if len(calls) == which else value

    monkeypatch.setattr(GaussianDiffusion, "loss", loss)


def fresh_unet_run(trained_run, tmp_path) -> Path:
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    return copy


def test_a_nan_loss_stops_without_writing_poisoned_weights(trained_run, tmp_path, monkeypatch):
    run = fresh_unet_run(trained_run, tmp_path)
    nan_at_call(monkeypatch, 3)
    message = error_of(unet, run, "--max-steps", "4")
    assert "loss became nan before step 4" in message and "--skip-nonfinite" in message
    saved = ckpt(run / "unet.pt")
    assert saved["step"] == 2 and all(t.isfinite().all() for t in saved["model"].values())


def test_skip_nonfinite_skips_the_step_and_finishes_with_finite_weights(trained_run, tmp_path, monkeypatch, capsys):
    run = fresh_unet_run(trained_run, tmp_path)
    nan_at_call(monkeypatch, 3)
    unet(run, "--max-steps", "4", "--skip-nonfinite")
    saved = ckpt(run / "unet.pt")
    assert saved["step"] == 4 and saved["ema_updates"] == 3   # the skipped step did not reach the EMA either
    assert all(t.isfinite().all() for part in ("model", "ema") for t in saved[part].values())
    assert "1 non-finite steps skipped" in capsys.readouterr().out


def test_skip_nonfinite_stops_a_diverged_run(trained_run, tmp_path, monkeypatch):
    run = fresh_unet_run(trained_run, tmp_path)
    from modules import GaussianDiffusion
    original = GaussianDiffusion.loss
    monkeypatch.setattr(GaussianDiffusion, "loss", lambda self, *a, **k: original(self, *a, **k) * float("inf"))
    assert "20 steps in a row" in error_of(unet, run, "--max-steps", "40", "--skip-nonfinite", "--save-every", "100")
    assert not (run / "unet.pt").exists()


def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_checkpoint(trained_run, tmp_path, monkeypatch):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "unet.pt").read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"\0" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    message = error_of(unet, copy, "--max-steps", "6", "--resume")
    assert f"could not write {copy / 'unet.pt'} (No space left on device); the previous file is unchanged" in message
    assert (copy / "unet.pt").read_bytes() == before
    assert not [p for p in copy.iterdir() if ".tmp" in p.name]   # no partial file left behind


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "unet.pt"
    train.atomic_save({"kind": "unet", "step": 2, "config": {}}, path)
    script = (f"import os, signal, sys, torch; sys.path.insert(0, {str(REPO)!r}); import train\n"
              "def dies(obj, f, *a, **k):\n    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"torch.save = dies\ntrain.atomic_save({{'kind': 'unet', 'step': 4}}, train.Path({str(path)!r}))\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert train.load_checkpoint(path, "unet")["step"] == 2
    partial = [p.name for p in tmp_path.iterdir() if p.name.startswith(".unet.pt.tmp")]
    assert len(partial) == 1   # the killed write's file; --resume removes it:
    args = driver.parse(["train-unet", "--run", str(tmp_path), "--resume"])
    assert train.prepare_run(args, path, "unet", {})["step"] == 2 and not (tmp_path / partial[0]).exists()


def test_a_truncated_checkpoint_is_named_with_the_last_good_one(trained_run, tmp_path):
    run, _ = trained_run
    path = run / "unet.pt"
    assert ckpt(train.previous(path))["step"] == 2   # kept at the save of step 4
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damaged = copy / "unet.pt"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = error_of(predict.main, ["--run", str(copy), "--num", "1"])
    assert f"cannot load checkpoint {damaged}, it is damaged" in message
    assert f"the last good one is {copy / 'unet.prev.pt'} (step 2): move it to unet.pt" in message
    train.previous(damaged).unlink()
    assert "no earlier checkpoint" in error_of(unet, copy, "--max-steps", "6", "--resume")


# ----------------------------------------------------------------------------- checkpoints that must not be trusted

class RunsCode:
    """Unpickling this calls Path.touch: any callable could be there instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    marker = tmp_path / "code-ran"
    torch.save({"kind": "unet", "payload": RunsCode(marker)}, copy / "unet.pt")
    message = error_of(predict.main, ["--run", str(copy), "--num", "1"])
    assert "refused to load" in message and "weights_only" in message
    assert not marker.exists()


def test_checkpoints_of_another_kind_preset_or_version_give_clear_errors(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copy(run / "vqvae.pt", copy / "unet.pt")
    assert "is not a unet checkpoint (it holds 'vqvae')" in error_of(predict.main, ["--run", str(copy), "--num", "1"])
    shutil.copy(run / "unet.pt", copy / "unet.pt")
    assert "different config (channels: 8 in the checkpoint, 16 now" in error_of(
        unet, copy, "--max-steps", "6", "--resume", "--unet-channels", "16")
    old = ckpt(run / "unet.pt")
    old["config"]["num_steps"] = 1000          # an earlier layout kept the diffusion settings here
    torch.save(old, copy / "unet.pt")
    assert "written by another version of this project" in error_of(predict.main, ["--run", str(copy), "--num", "1"])


# ----------------------------------------------------------------------------- command-line values

@pytest.mark.parametrize("flags, expected", [
    (["train-vqvae", "--image-size", "48"], "must be a multiple of 32"),   # tiny VQ-VAE /4, then the UNet /8
    (["train-vqvae", "--image-size", "0"], "must be positive"),
    (["train-vqvae", "--max-steps", "-3"], "must be positive"),
    (["train-unet", "--diffusion-steps", "0"], "must be positive"),
    (["sample", "--num", "0"], "--num must be positive"),
])
def test_bad_values_on_the_command_line_are_one_line_errors(flags, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        driver.main([*flags[:1], "--run", str(tmp_path / "run"), *flags[1:]])
    assert e.value.code != 0
    message = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in message and "\n" not in message


# ----------------------------------------------------------------------------- hostile image folders

def write_file(path: Path, kind: str, size: tuple[int, int], seed: int) -> bool:
    """One file of `kind`; returns whether it is a readable image."""
    rng = np.random.default_rng(seed)
    w, h = size
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "zero-byte":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_text("subject,age\n002_S_0295,72\n")
    elif kind == "truncated jpeg":
        Image.fromarray(rng.integers(0, 256, (h + 16, w + 16), dtype=np.uint8)).save(path, format="JPEG")
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "16-bit":
        Image.fromarray(rng.integers(0, 4096, (h, w)).astype(np.uint16)).save(path, format="PNG")
    else:  # a PIL mode: L, RGB, RGBA, LA, P, 1
        img = Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
        img = img.convert(kind) if kind != "P" else img.convert("RGB").quantize(16)
        img.save(path, format="JPEG" if path.suffix == ".jpeg" else "PNG")
    return kind not in ("zero-byte", "not an image", "truncated jpeg")


KINDS = ["L", "RGB", "RGBA", "LA", "P", "1", "16-bit", "zero-byte", "not an image", "truncated jpeg"]
files = st.lists(st.tuples(st.sampled_from(KINDS), st.sampled_from(["AD", "NC", "NC/deeper/still"]),
                           st.tuples(st.integers(1, 300), st.integers(1, 300))), min_size=1, max_size=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=files, channels=st.sampled_from([1, 3]))
def test_fuzzed_folders_load_in_range_and_in_shape_or_name_the_bad_file(files, channels, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    good, bad = [], []
    for i, (kind, folder, size) in enumerate(files):
        ext = ".jpeg" if kind in ("L", "RGB", "truncated jpeg", "zero-byte") else ".png"
        path = root / "train" / folder / f"s{i}_{i}{ext}"
        (good if write_file(path, kind, size, seed=i) else bad).append(str(path))

    if bad:
        with pytest.raises(BadInputError, match="cannot read image") as e:
            load_slices(root, 32, channels, workers=1)
        assert any(name in str(e.value) for name in bad)
    if not good:
        with pytest.raises(BadInputError, match="none of the"):
            load_slices(root, 32, channels, workers=1, skip_bad=True)
        return
    dataset = load_slices(root, 32, channels, workers=1, skip_bad=True)
    assert sorted(dataset.skipped) == sorted(bad) and sorted(p for p, _ in dataset.samples) == sorted(good)
    for i in range(len(dataset)):
        x, _ = dataset[i]
        assert x.shape == (channels, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_hidden_folders_symlink_loops_odd_names_and_huge_images(tmp_path):
    root = tmp_path / "data"
    for name in ("AD/a_1.png", "NC/b_1.png", "NC/nested/deeper/c_1.png", ".ipynb_checkpoints/d_1.png", "NC/.e_1.png"):
        write_file(root / name, "L", (20, 20), seed=0)
    odd = os.fsencode(root / "AD") + b"/\xff\xfe_subject_2.png"   # not valid UTF-8
    write_file(Path(os.fsdecode(odd)), "L", (20, 20), seed=1)
    Image.new("L", (4000, 4000), 200).save(root / "AD" / "huge_3.png")
    os.symlink(root / "NC", root / "NC" / "nested" / "loop")        # NC/nested/loop -> NC
    os.symlink(root / "NC" / "b_1.png", root / "AD" / "linked_4.png")

    dataset = load_slices(root, 32, 1, workers=2)
    names = sorted(os.path.relpath(p, root) for p, _ in dataset.samples)
    assert dataset.classes == ["AD", "NC"]                                  # not .ipynb_checkpoints
    assert names == sorted(["AD/a_1.png", os.fsdecode(odd)[len(str(root)) + 1:], "AD/huge_3.png", "AD/linked_4.png",
                            "NC/b_1.png", "NC/nested/deeper/c_1.png"])       # the loop listed nothing twice
    huge = dataset[names.index("AD/huge_3.png")][0]
    assert huge.shape == (1, 32, 32) and torch.allclose(huge, torch.full_like(huge, 200 / 127.5 - 1))
    (root / "AD" / "broken_5.png").write_bytes(b"\x89PNG")
    message = str(pytest.raises(BadInputError, load_slices, root, 32, 1).value)
    assert "broken_5.png" in message
    Path(os.fsdecode(odd)).write_bytes(b"")
    print(str(pytest.raises(BadInputError, load_slices, root, 32, 1).value))  # a non-UTF-8 name prints


def test_16_bit_and_transparent_images_keep_their_contrast(tmp_path):
    from dataset import load_image
    ramp = np.tile(np.linspace(0, 4095, 256), (8, 1)).astype(np.uint16)    # 12 bits used, as MRI exports do
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    pixels = np.asarray(load_image(str(tmp_path / "ramp.png"), "L"), dtype=float)
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 1   # PIL alone: almost all 255
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[:4, :, 3], rgba[4:, :, 3] = 255, 255, 0              # white; the lower half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    pixels = np.asarray(load_image(str(tmp_path / "rgba.png"), "L"))
    assert (pixels[:4] == 255).all() and (pixels[4:] == 0).all()


def test_skip_bad_images_trains_both_stages_on_the_readable_ones(tmp_path, capsys):
    from conftest import vqvae
    data = tmp_path / "adni"
    rng = np.random.default_rng(0)
    for label in ("AD", "NC"):
        write_blob_images(data / "train" / label, [f"{label}{i}" for i in range(2)], 3, rng)
    (data / "train" / "NC" / "corrupt_9.jpeg").write_bytes(b"\xff\xd8\xff\xe0 cut here")
    message = error_of(vqvae, tmp_path / "a", data, "--max-steps", "2")
    assert "cannot read image" in message and "corrupt_9.jpeg" in message
    vqvae(tmp_path / "b", data, "--max-steps", "2", "--skip-bad-images")
    assert "left out 1 unreadable image(s) of 13: " in capsys.readouterr().out
    unet(tmp_path / "b", "--max-steps", "2", "--conditional")               # inherits the flag from stage 1
    latents = ckpt(tmp_path / "b" / "latents.pt")
    assert len(latents["z"]) == 12 and latents["y"].tolist() == [0] * 6 + [1] * 6
