"""The real commands end to end, as a user runs them: the files each stage writes, kill -9 and --resume,
signals, torchrun with two processes, and a run written by an earlier version of this project."""
import csv
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
from PIL import Image

import driver
import predict
from conftest import SMALL_UNET, SMALL_VQ, ckpt, error_of, vqvae, write_blob_images
from modules import UNet, UNetConfig

REPO = Path(__file__).resolve().parents[1]


def test_train_vqvae_writes_checkpoint_grid_log_and_plot(trained_run):
    run, _ = trained_run
    for name in ("vqvae.pt", "recon_vqvae.png", "recon_step0000002.png", "log_vqvae.csv", "loss_vqvae.png", "config.json"):
        assert (run / name).exists(), name
    c = ckpt(run / "vqvae.pt")
    assert c["kind"] == "vqvae" and c["step"] == 4 and {"model", "optimizer", "config"} <= set(c)
    rows = list(csv.DictReader(open(run / "log_vqvae.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4]
    grid = Image.open(run / "recon_vqvae.png")
    assert grid.height > 2 * 32 and grid.height < 3 * 32   # originals above, reconstructions below


def test_train_unet_writes_checkpoint_with_scale_and_cache(trained_run):
    run, _ = trained_run
    c = ckpt(run / "unet.pt")
    assert c["kind"] == "unet" and c["step"] == 4
    z = ckpt(run / "latents.pt")["z"]
    assert z.shape == (24, 4, 16, 16)
    assert c["latent_scale"] == pytest.approx(1 / z.std().item(), rel=1e-5)
    assert {"ema", "latent_shape", "vqvae_fingerprint", "diffusion"} <= set(c)
    assert (run / "samples_step0000004.png").exists() and (run / "loss_unet.png").exists()


def command(stage: str, run: Path, data: Path, *extra) -> list[str]:
    flags = ([f"--data={data}", "--preset", "tiny", *SMALL_VQ] if stage == "vqvae" else SMALL_UNET)
    return [sys.executable, str(REPO / "driver.py"), f"train-{stage}", "--run", str(run), *flags,
            "--save-every", "2", "--deterministic", *extra]


def start_and_wait_for_checkpoint(cmd: list[str], ckpt_path: Path, session: bool = False) -> subprocess.Popen:
    """Start a training process (with `session`, as the leader of a process group of its own, as a terminal starts
    a command) and return once it has written its first checkpoint."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=session)
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


ADVERSARIAL = ["--adversarial-weight", "0.5", "--adversarial-start", "1"]   # the discriminator learns from step 1


@pytest.mark.parametrize("stage, extra", [("vqvae", []), ("vqvae", ADVERSARIAL), ("unet", [])],
                         ids=["vqvae", "vqvae-adversarial", "unet"])
def test_kill_9_then_resume_ends_with_the_weights_of_an_uninterrupted_run(stage, extra, blobs, tmp_path):
    runs = {name: tmp_path / name for name in ("killed", "straight")}
    if stage == "unet":  # both runs start from the same trained VQ-VAE
        subprocess.run(command("vqvae", runs["killed"], blobs, "--max-steps", "2"), check=True, capture_output=True)
        runs["straight"].mkdir()
        shutil.copy(runs["killed"] / "vqvae.pt", runs["straight"] / "vqvae.pt")
    path = runs["killed"] / f"{stage}.pt"
    victim = start_and_wait_for_checkpoint(command(stage, runs["killed"], blobs, "--max-steps", "100000", *extra), path)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = ckpt(path)["step"]   # the last checkpoint before the kill, complete (atomic rename)
    end = str(killed_at + 4)
    subprocess.run(command(stage, runs["killed"], blobs, "--max-steps", end, "--resume", *extra), check=True, capture_output=True)
    subprocess.run(command(stage, runs["straight"], blobs, "--max-steps", end, *extra), check=True, capture_output=True)

    resumed, straight = ckpt(path), ckpt(runs["straight"] / f"{stage}.pt")
    assert resumed["step"] == straight["step"] == killed_at + 4
    parts = {"unet": ("model", "ema"), "vqvae": ("model", "discriminator") if extra else ("model",)}[stage]
    for part in parts:
        for name, tensor in straight[part].items():
            assert torch.equal(resumed[part][name], tensor), f"{part}.{name} differs after kill -9 and --resume"
    assert resumed["optimizer"]["state"].keys() == straight["optimizer"]["state"].keys()
    for i, state in straight["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["exp_avg"], state["exp_avg"])
    if stage == "unet":
        assert resumed["latent_scale"] == straight["latent_scale"] and resumed["ema_updates"] == straight["ema_updates"]
    for i, state in straight.get("disc_optimizer", {}).get("state", {}).items():   # the discriminator's AdamW
        assert torch.equal(resumed["disc_optimizer"]["state"][i]["exp_avg"], state["exp_avg"])


# the images memory-mapped, read by two loader processes; a step of 8 batches, more than the loader holds ahead, so
# that the step the signal interrupts needs batches read after it
ON_DISK = ["--cache-gb", "0", "--workers", "2", "--grad-accum", "8"]


@pytest.mark.parametrize("sig, stage, extra", [(signal.SIGINT, "vqvae", []), (signal.SIGTERM, "unet", []),
                                               (signal.SIGINT, "vqvae", ON_DISK), (signal.SIGTERM, "vqvae", ON_DISK)],
                         ids=["sigint-vqvae", "sigterm-unet", "group-sigint-loader-workers",
                              "group-sigterm-loader-workers"])
def test_sigint_and_sigterm_save_a_checkpoint_and_say_how_to_resume(sig, stage, extra, blobs, tmp_path):
    """The signal to the process alone, or (with loader workers) to its whole group, as Ctrl-C in a terminal and
    many schedulers send it: the workers leave it to the trainer, which finishes its step and saves."""
    run = tmp_path / "run"
    if stage == "unet":
        subprocess.run(command("vqvae", run, blobs, "--max-steps", "2"), check=True, capture_output=True)
    path = run / f"{stage}.pt"
    proc = start_and_wait_for_checkpoint(command(stage, run, blobs, "--max-steps", "100000", *extra), path,
                                         session=bool(extra))
    if extra:
        time.sleep(1)   # the loader's workers are up
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    step = ckpt(path)["step"]
    assert f"{signal.Signals(sig).name} received: saved {path} at step {step}; run the same command with --resume" in err
    subprocess.run(command(stage, run, blobs, "--max-steps", str(step + 2), "--resume", *extra), check=True,
                   capture_output=True)
    assert ckpt(path)["step"] == step + 2


def test_a_sigterm_while_the_last_checkpoint_is_written_lets_it_finish(blobs, tmp_path):
    """The last save ran after the loop had given SIGINT and SIGTERM back to their defaults: a scheduler's SIGTERM
    there killed the run in the middle of the write (exit 143), and the steps since the save before were lost."""
    run = tmp_path / "run"
    script = f"""
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import driver, runtime.loop as loop
write = loop.atomic_save
def atomic_save(state, path, **kwargs):
    if state["step"] == 5:   # the last save (the others at 2 and 4)
        os.kill(os.getpid(), signal.SIGTERM)
    write(state, path, **kwargs)
loop.atomic_save = atomic_save
driver.main({command("vqvae", run, blobs, "--max-steps", "5")[2:]!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 130, done.stderr[-2000:]
    assert ckpt(run / "vqvae.pt")["step"] == 5 and "SIGTERM received: saved" in done.stderr


def test_a_sigterm_outside_training_stops_as_ctrl_c_does_and_the_sample_set_resumes(trained_run, tmp_path):
    """A scheduler's SIGTERM (a job's time limit) while `sample` draws: it killed the command silently (-15); now it
    unwinds as Ctrl-C does (each file whole), says how to continue and exits with 143, and --resume finishes the set."""
    run, _ = trained_run
    out = tmp_path / "set"
    cmd = [sys.executable, str(REPO / "driver.py"), "sample", "--run", str(run), "--out", str(out), "--num", "400",
           "--batch-size", "2", "--sampler", "ddim", "--steps", "3", "--gif-frames", "2", "--format", "npz"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    manifest, deadline = out / "samples" / "manifest.csv", time.monotonic() + 180
    while not (manifest.exists() and len(manifest.read_text().splitlines()) > 1):   # a batch written, 199 to come
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no sample after 180 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("SIGTERM received; each file written is whole (a sample set's, a "
                                            "checkpoint): run the same command with --resume to continue")
    assert 1 < len(manifest.read_text().splitlines()) < 401 and not list(out.rglob(".*tmp*"))
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(manifest.read_text().splitlines()) == 401 and len(list((out / "samples" / "all").glob("*.npz"))) == 400


def test_ctrl_c_while_the_command_starts_stops_it_in_one_line(tmp_path):
    """A second after it was typed, torch is still loading: Ctrl-C then says so, without an import's traceback."""
    proc = subprocess.Popen([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--run", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert not (tmp_path / "run").exists()


def torchrun(*args, cwd=REPO, script="driver.py") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(var, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_two_processes_write_one_run(adni_folder, tmp_path):
    run = tmp_path / "run"
    done = torchrun("train-vqvae", "--run-dir", str(run), "--data", str(adni_folder), "--preset", "tiny", *SMALL_VQ,
                    "--batch-size", "4", "--max-steps", "4", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "8 images (2 process(es))" in done.stdout + done.stderr
    done = torchrun("train-unet", "--run-dir", str(run), *SMALL_UNET, "--batch-size", "4", "--max-steps", "4",
                    "--grad-accum", "2", "--device", "cpu")
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stdout + done.stderr
    assert output.count("latents written") == 1  # rank 0 encodes; rank 1 waits and reads the file

    assert sorted(p.name for p in run.glob("*.pt")) == ["latents.pt", "unet.prev.pt", "unet.pt", "vqvae.prev.pt", "vqvae.pt"]
    assert not list(run.glob(".*tmp*"))
    for name in ("vqvae.pt", "unet.pt"):
        saved = ckpt(run / name)
        assert saved["step"] == 4 and not any(k.startswith(("module.", "_orig_mod.")) for k in saved["model"])
        assert len(saved["rng"]) == 2 and not torch.equal(saved["rng"][0]["cpu"], saved["rng"][1]["cpu"])  # each rank's
    assert saved["args"]["grad_accum"] == 2
    for csv_name in ("log_vqvae.csv", "log_unet.csv"):  # one row per log step, not one per rank
        steps = [line.split(",")[0] for line in (run / csv_name).read_text().splitlines()[1:]]
        assert steps == ["2", "4"]
    UNet(UNetConfig(**saved["config"])).load_state_dict(saved["model"])  # the unwrapped model


def test_torchrun_two_processes_train_and_resume_the_adversarial_patch_loss(adni_folder, tmp_path):
    """Stage 1's discriminator under DDP: the adaptive weight's autograd.grad through the wrapped VQ-VAE, the
    discriminator's own DDP step, rank 0 saving it unwrapped, and resuming it, all with two processes."""
    run, adversarial = tmp_path / "run", ["--adversarial-weight", "0.5", "--adversarial-start", "1"]
    base = ["train-vqvae", "--run-dir", str(run), "--data", str(adni_folder), "--preset", "tiny", *SMALL_VQ,
            "--batch-size", "4", "--device", "cpu", *adversarial]
    done = torchrun(*base, "--max-steps", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    saved = ckpt(run / "vqvae.pt")
    assert saved["step"] == 4 and not any(k.startswith("module.") for k in saved["discriminator"])
    assert len(saved["disc_optimizer"]["state"]) > 0  # the discriminator took steps
    with open(run / "log_vqvae.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["2", "4"] and float(rows[-1]["adversarial"]) != 0
    done = torchrun(*base, "--max-steps", "6", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = ckpt(run / "vqvae.pt")
    assert resumed["step"] == 6
    before, after = saved["discriminator"], resumed["discriminator"]
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the resumed discriminator learned on


@pytest.mark.parametrize("every, found", [("100", "posthoc_ema/profiles/0/"), ("2", "the post-hoc EMA")],
                         ids=["at-a-checkpoint", "at-a-snapshot"])
def test_torchrun_stops_every_process_when_what_rank_0_alone_holds_goes_nan(adni_folder, tmp_path, every, found):
    """The post-hoc EMA lives on rank 0 alone: its NaN found only there, before a checkpoint or before one of its own
    snapshots, left rank 1 waiting for it in the next collective (gloo: a traceback; NCCL: its two-hour timeout)."""
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2")
    script = tmp_path / "nan_posthoc.py"
    script.write_text(f"""import sys
sys.path.insert(0, {str(REPO)!r})
import driver, runtime.posthoc_ema as posthoc
update = posthoc.PowerFunctionEMA.update
def poisoned(self, model, step):
    update(self, model, step)
    for profile in self.profiles:
        profile[0].fill_(float("nan"))
posthoc.PowerFunctionEMA.update = poisoned
try:
    driver.main(sys.argv[1:])
except SystemExit as stopped:  # each rank's way out, for the test
    open({str(tmp_path)!r} + "/exit-" + __import__("os").environ["RANK"], "w").write(str(stopped.code))
    raise
""")
    done = torchrun("train-unet", "--run-dir", str(run), *SMALL_UNET, "--batch-size", "4", "--max-steps", "4",
                    "--posthoc-ema", every, "--device", "cpu", script=str(script))
    assert done.returncode != 0 and f"{found}" in done.stderr and "became NaN/inf by step 2" in done.stderr
    assert done.stderr.count("became NaN/inf by step 2") == 1 and "[rank1]: Traceback" not in done.stderr  # said once
    exits = {rank: (tmp_path / f"exit-{rank}").read_text() for rank in "01"}  # ... and both stop on the error
    assert "became NaN/inf by step 2" in exits["0"] and exits["1"] == "1"
    assert not (run / "unet.pt").exists()


def test_torchrun_two_processes_fine_tune_the_decoder_alone_and_resume(adni_folder, tmp_path):
    """train-decoder under DDP: the decoder wrapped alone beside the frozen encoder, the discriminator's own DDP step,
    rank 0 saving both unwrapped with each rank's random state, and resuming them, with two processes."""
    run = tmp_path / "run"
    vqvae(run, adni_folder, "--max-steps", "2")
    base = ["train-decoder", "--run-dir", str(run), "--batch-size", "4", "--log-every", "2", "--sample-every", "2",
            "--save-every", "2", "--workers", "1", "--device", "cpu",
            "--adversarial-weight", "0.01"]  # with a discriminator, which `tiny` leaves out by default
    done = torchrun(*base, "--max-steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps 0 -> 2 of 8 images" in done.stdout + done.stderr  # 4 a rank, two ranks
    saved, stage1 = ckpt(run / "decoder.pt"), ckpt(run / "vqvae.pt")["model"]
    assert saved["step"] == 2 and len(saved["rng"]) == 2
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in [*saved["model"], *saved["discriminator"]])
    assert any(not torch.equal(v, stage1[f"decoder.{k}"]) for k, v in saved["model"].items())  # it learned
    done = torchrun(*base, "--max-steps", "4", "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = ckpt(run / "decoder.pt")
    assert resumed["step"] == 4
    assert any(not torch.equal(saved["discriminator"][k], v) for k, v in resumed["discriminator"].items())
    with open(run / "log_decoder.csv") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["2", "4"]  # one row per log step, not one per rank


# ----------------------------------------------------------------------------- a run of an earlier version

OLD_RUN = Path(__file__).parent / "fixtures" / "run_dc30bb5"   # written by commit dc30bb5 (make.py beside it)


def test_a_run_written_before_the_redesign_samples_and_resumes_both_stages(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    for label in ("AD", "NC"):
        write_blob_images(data / "train" / label, [f"{label}{i}" for i in range(2)], 3, rng, size=(40, 40))
    images = predict.predict(predict.parse_args(["--run", str(run), "--num", "2", "--sampler", "ddim", "--steps", "3",
                                                 "--class", "NC", "--gif-frames", "2"]))
    assert images.shape == (2, 1, 32, 32) and images.isfinite().all()
    (run / "unet.pt").rename(tmp_path / "unet.pt")      # stage 1 trains further only with stage 2 moved away
    resume_vq = ["train-vqvae", "--run", str(run), "--data", str(data), "--preset", "tiny", *SMALL_VQ, "--max-steps",
                 "4", "--resume", "--deterministic"]
    for flag, value in (("--reconstruction-loss", "l1"), ("--perceptual-weight", "1.0"), ("--frequency-weight", "5.0")):
        message = error_of(driver.main, [*resume_vq, flag, value])      # losses the run never had: refused
        assert f"{flag} {value} differs from this run's" in message
    driver.main(resume_vq)
    assert ckpt(run / "vqvae.pt")["step"] == 4 and ckpt(run / "vqvae.pt")["args"]["reconstruction_loss"] == "mse"
    shutil.copy(OLD_RUN / "vqvae.pt", run / "vqvae.pt")   # stage 2 resumes on the VQ-VAE it was trained on
    (tmp_path / "unet.pt").rename(run / "unet.pt")
    resume_unet = ["train-unet", "--run", str(run), "--data", str(data), *SMALL_UNET, "--max-steps", "4", "--resume",
                   "--conditional", "--deterministic"]
    assert "--posthoc-ema 2 differs from this run's 0" in error_of(driver.main, [*resume_unet, "--posthoc-ema", "2"])
    driver.main(resume_unet)
    resumed = ckpt(run / "unet.pt")
    assert resumed["step"] == 4 and resumed["ema_updates"] == 4 and resumed["classes"] == ["AD", "NC"]


def test_a_batch_job_log_has_the_log_lines_and_no_progress_bar_lines(adni_folder, tmp_path):
    """Standard error not a terminal (a cluster job): no bar redrawn per step, one line per --log-every."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, str(REPO / "driver.py"), "train-vqvae", "--run", str(run), f"--data={adni_folder}",
                           "--preset", "tiny", *SMALL_VQ, "--max-steps", "6", "--log-every", "3"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    log = done.stdout + done.stderr
    assert "\r" not in log and "it/s" not in log
    assert [line.split("|")[0].split()[1] for line in log.splitlines() if line.startswith("step ")] == ["2", "3", "4", "6"]


# ----------------------------------------------------------------------------- a folder of NIfTI volumes

def test_both_stages_and_predict_on_a_folder_of_volumes(tmp_path, monkeypatch, capsys):
    import volumes.reader
    from conftest import blob, write_volume
    data = tmp_path / "volumes"
    for i, label in enumerate(("AD", "NC")):
        for k in range(3):
            write_volume(data / "train" / label / f"sub-{i}{k}.nii.gz", blob(shape=(24, 24, 12), seed=3 * i + k))
    run = tmp_path / "run"
    driver.main(["train-vqvae", "--run", str(run), f"--data={data}", "--preset", "tiny", *SMALL_VQ, "--max-steps", "2",
                 "--axis", "coronal"])
    assert ckpt(run / "vqvae.pt")["data_config"]["slicing"]["axis"] == "coronal"
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--conditional"])
    latents = ckpt(run / "latents.pt")
    assert len(latents["z"]) == len(latents["y"]) > 6 and set(latents["y"].tolist()) == {0, 1}   # several slices a volume
    (run / "unet.pt").unlink()
    monkeypatch.setattr(volumes.reader, "read_volume", lambda *a, **k: pytest.fail("a volume was read for a reused cache"))
    driver.main(["train-unet", "--run", str(run), *SMALL_UNET, "--max-steps", "2", "--conditional"])
    assert "latents reused" in capsys.readouterr().out
    images = predict.predict(predict.parse_args(["--run", str(run), "--num", "2", "--sampler", "ddim", "--steps", "3",
                                                 "--class", "AD", "--gif-frames", "2"]))
    assert images.shape == (2, 1, 32, 32) and (run / "denoise.gif").exists()


def test_a_run_on_volumes_resumed_with_only_resume_is_the_run_it_started(tmp_path):
    """--data DIR --axis coronal --holdout 0.2 --grad-accum 4, stopped by --max-minutes, then only --resume: the
    same data, axis, split and effective batch, so (with --deterministic) the weights of an uninterrupted run."""
    from conftest import blob, write_volume
    data = tmp_path / "volumes"
    for i, label in enumerate(("AD", "NC")):
        for k in range(5):
            write_volume(data / label / f"sub-{i}{k}.nii.gz", blob(shape=(20, 16, 20), seed=5 * i + k))
    # --cooldown 0: with a cooldown, --max-minutes would end the run where its rate reaches zero
    flags = [f"--data={data}", "--preset", "tiny", *SMALL_VQ, "--axis", "coronal", "--holdout", "0.2",
             "--grad-accum", "4", "--batch-size", "2", "--max-steps", "3", "--deterministic", "--cooldown", "0"]
    driver.main(["train-vqvae", "--run", str(tmp_path / "whole"), *flags])
    driver.main(["train-vqvae", "--run", str(tmp_path / "cut"), *flags, "--max-minutes", "0.0001"])
    assert ckpt(tmp_path / "cut" / "vqvae.pt")["step"] == 1
    driver.main(["train-vqvae", "--run", str(tmp_path / "cut"), "--resume"])
    whole, cut = ckpt(tmp_path / "whole" / "vqvae.pt"), ckpt(tmp_path / "cut" / "vqvae.pt")
    assert cut["step"] == 3 and cut["data_config"] == whole["data_config"]
    assert cut["data_config"]["root"] == str(data) and cut["data_config"]["slicing"]["axis"] == "coronal"
    assert (cut["args"]["grad_accum"], cut["args"]["batch_size"], cut["data_config"]["holdout"]) == (4, 2, 0.2)
    assert all(torch.equal(whole["model"][k], cut["model"][k]) for k in whole["model"])
    driver.main(["train-unet", "--run", str(tmp_path / "cut"), *SMALL_UNET, "--max-steps", "1"])   # stage 2 inherits it
    assert ckpt(tmp_path / "cut" / "latents.pt")["root"] == str(data)  # its key names the files, not their place
