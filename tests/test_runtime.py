"""runtime/: checkpoints written atomically and loaded safely (damaged, crafted, of another kind or version),
a full disk, and the device and precision checks."""
import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import predict
from conftest import ckpt, error_of, touch, unet, vqvae
from runtime import process
from runtime.checkpoint import (REQUIRED, atomic_save, atomic_write, checkpoint_to_resume, fingerprint, load_checkpoint,
                                previous, remove_unfinished, write_config)
from runtime.errors import BadInputError
from runtime.process import Milestones
from runtime.signals import Terminated, sigterm_as_ctrl_c

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_a_ctrl_c_during_a_write_is_the_ctrl_c_not_the_writers_error_and_leaves_nothing(stop, tmp_path):
    """torch.save's file writer raises a RuntimeError ("unexpected pos") as a Ctrl-C unwinds it: the Ctrl-C goes on
    (exit 130 and the line to continue), not a traceback, and the half-written file is gone; a SIGTERM stays one."""
    def write(f):
        f.write(b"half")
        try:
            raise stop
        except KeyboardInterrupt:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    with pytest.raises(KeyboardInterrupt) as raised:
        atomic_write(tmp_path / "unet.pt", write)
    assert type(raised.value) is stop
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="another"):                  # a writer's own error stays what it is
        atomic_write(tmp_path / "unet.pt", lambda f: (_ for _ in ()).throw(RuntimeError("another")))


def _dies_of_sigterm():
    signal.raise_signal(signal.SIGTERM)
    time.sleep(10)


def test_sigterm_outside_training_is_a_ctrl_c_once_and_still_ends_a_forked_loader_worker():
    """SIGTERM raises Terminated (a KeyboardInterrupt: the same cleanup) once; a second, while the first unwinds, is
    ignored; a process forked meanwhile (a DataLoader worker) inherits the handler and still dies of SIGTERM at once,
    as the loader's shutdown expects; afterwards the handler before is back."""
    import multiprocessing
    before = signal.getsignal(signal.SIGTERM)
    with sigterm_as_ctrl_c():
        with pytest.raises(Terminated):
            signal.raise_signal(signal.SIGTERM)
            time.sleep(10)
        signal.raise_signal(signal.SIGTERM)                       # while unwinding: no second Terminated
        worker = multiprocessing.get_context("fork").Process(target=_dies_of_sigterm)
        worker.start()
        worker.join(30)
        assert worker.exitcode == -signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


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


def test_a_full_disk_leaves_the_runs_config_json_as_it_was(tmp_path, monkeypatch):
    write_config(tmp_path, "train-vqvae", argparse.Namespace(lr=1e-3, data="/data"))
    before = (tmp_path / "config.json").read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(BadInputError, match="could not write .*config.json .No space left on device.; the previous"):
        write_config(tmp_path, "train-unet", argparse.Namespace(lr=2e-4))
    assert (tmp_path / "config.json").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_a_kill_during_a_checkpoint_write_leaves_the_previous_one_whole(tmp_path):
    path = tmp_path / "unet.pt"
    atomic_save({**dict.fromkeys(REQUIRED["unet"], {}), "kind": "unet", "step": 2, "config": {}}, path)
    script = (f"import os, signal, sys, torch; sys.path.insert(0, {str(REPO)!r}); from runtime.checkpoint import atomic_save; from pathlib import Path\n"
              "def dies(obj, f, *a, **k):\n    f.write(b'half a checkpoint'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
              f"torch.save = dies\natomic_save({{'kind': 'unet', 'step': 4}}, Path({str(path)!r}))\n")
    assert subprocess.run([sys.executable, "-c", script]).returncode == -signal.SIGKILL
    assert load_checkpoint(path, "unet")["step"] == 2
    partial = [p.name for p in tmp_path.iterdir() if p.name.startswith(".unet.pt.tmp")]
    assert len(partial) == 1   # the killed write's file; --resume removes it:
    assert checkpoint_to_resume(path, "unet", resume=True, chosen={})["step"] == 2 and not (tmp_path / partial[0]).exists()


def test_writes_cut_short_of_a_latent_cache_or_a_snapshot_are_removed(trained_run, tmp_path):
    """kill -9 while the latent cache (GBs) or an EMA snapshot was written left its temporary file for good."""
    from runtime.posthoc_ema import SNAPSHOTS, drop_snapshots_after
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / ".latents.pt.tmp999").write_bytes(b"partial")
    unet(copy, "--max-steps", "6", "--resume")
    assert not (copy / ".latents.pt.tmp999").exists() and (copy / "latents.pt").exists()
    (copy / SNAPSHOTS).mkdir()
    (copy / SNAPSHOTS / ".step0000020.pt.tmp999").write_bytes(b"partial")
    (copy / SNAPSHOTS / "step0000010.pt").write_bytes(b"kept")
    drop_snapshots_after(copy, 10)
    assert [p.name for p in (copy / SNAPSHOTS).iterdir()] == ["step0000010.pt"]

def test_only_the_leftovers_of_writes_of_the_named_file_are_removed(tmp_path):
    """atomic_write leaves `.NAME.tmpPID` (the new file, part written) or `.NAME.prevPID` (the link to the old file,
    before it became NAME.prev) where kill -9 stopped it; NAME.prev itself is the last good checkpoint, kept."""
    touch(tmp_path, ["unet.pt", "unet.prev.pt", ".unet.pt.tmp41", ".unet.pt.prev41", ".latents.pt.prev41"])
    remove_unfinished(tmp_path, "unet.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".latents.pt.prev41", "unet.prev.pt", "unet.pt"]


def test_a_fingerprint_changes_with_any_weight_or_name_but_not_with_the_dicts_order():
    """It ties a latent cache and a UNet to one exact VQ-VAE: weights that differ anywhere are another model."""
    state = {"a.weight": torch.zeros(3), "b.weight": torch.zeros(2), "c.bias": torch.ones(1)}
    assert fingerprint(dict(reversed([(k, v.clone()) for k, v in state.items()]))) == fingerprint(state)
    for changed in ({**state, "c.bias": torch.full((1,), 2.0)}, {**state, "b.weight": torch.tensor([0.0, 1e-6])},
                    {**{k: v for k, v in state.items() if k != "c.bias"}, "c.weight": state["c.bias"]}):
        assert fingerprint(changed) != fingerprint(state)  # the last tensor in name order, or the middle one, or a name


def test_a_truncated_checkpoint_is_named_with_the_last_good_one(trained_run, tmp_path):
    run, _ = trained_run
    path = run / "unet.pt"
    assert ckpt(previous(path))["step"] == 2   # kept at the save of step 4
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    damaged = copy / "unet.pt"
    damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    message = error_of(predict.main, ["--run", str(copy), "--num", "1"])
    assert f"cannot load checkpoint {damaged}, it is damaged" in message
    assert f"the last good one is {copy / 'unet.prev.pt'} (step 2): move it to unet.pt" in message
    previous(damaged).unlink()
    assert "no earlier checkpoint" in error_of(unet, copy, "--max-steps", "6", "--resume")


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
    assert "--unet-channels 16 differs from this run's 8" in error_of(
        unet, copy, "--max-steps", "6", "--resume", "--unet-channels", "16")
    config, saved = json.loads((copy / "config.json").read_text()), ckpt(copy / "unet.pt")
    del config["train-unet"], saved["args"]["unet_channels"]   # no record of the flag: the model's config still refuses
    (copy / "config.json").write_text(json.dumps(config))
    torch.save(saved, copy / "unet.pt")
    assert "different config (channels: 8 in the checkpoint, 16 now" in error_of(
        unet, copy, "--max-steps", "6", "--resume", "--unet-channels", "16")
    old = ckpt(run / "unet.pt")
    old["config"]["num_steps"] = 1000          # an earlier layout kept the diffusion settings here
    torch.save(old, copy / "unet.pt")
    assert "written by another version of this project" in error_of(predict.main, ["--run", str(copy), "--num", "1"])


def test_empty_edited_or_mismatched_checkpoints_are_one_line_errors(trained_run, tmp_path):
    """An empty file (its EOFError has no message), a checkpoint missing an entry every one holds, and weights that
    do not fit the config beside them (a weight missing, one extra, another shape): one line each, to `sample` and
    to --resume, where they were tracebacks."""
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    sample = lambda: error_of(predict.main, ["--run", str(copy), "--num", "1"])  # noqa: E731
    resume = lambda: error_of(unet, copy, "--max-steps", "6", "--resume")        # noqa: E731
    (copy / "unet.pt").write_bytes(b"")
    assert f"cannot load checkpoint {copy / 'unet.pt'}, it is damaged or not a checkpoint (EOFError)" in sample()
    good = ckpt(run / "unet.pt")
    for edit in ("no ema", "a weight missing", "a weight extra", "another shape", "EMA of another shape"):
        saved = copy_of(good)
        name = next(iter(saved["model"]))
        if edit == "no ema":
            del saved["ema"]
        elif edit == "a weight missing":
            del saved["model"][name], saved["ema"][name]
        elif edit == "a weight extra":
            saved["model"]["bogus.weight"] = saved["ema"]["bogus.weight"] = torch.zeros(1)
        elif edit == "another shape":
            saved["model"][name] = saved["ema"][name] = torch.zeros(3, 1, 1, 1)
        else:
            saved["ema"][name] = torch.zeros(3, 1, 1, 1)
        torch.save(saved, copy / "unet.pt")
        for message in (sample(), resume()):
            assert ("lacks ema, which every unet checkpoint" in message if edit == "no ema" else
                    f"weights in {copy / 'unet.pt'} do not fit the model its config describes" in message), edit


def copy_of(checkpoint: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in checkpoint.items()}


def test_fp16_without_cuda_is_a_clear_error(adni_folder, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("fp16 is allowed on CUDA")
    msg = error_of(vqvae, tmp_path / "run", adni_folder, "--max-steps", "1", "--precision", "fp16", "--device", "cpu")
    assert "fp16 needs a CUDA device" in msg and not (tmp_path / "run" / "vqvae.pt").exists()


def test_the_log_says_what_a_run_computes_in(adni_folder, tmp_path, capsys):
    """fp32 on a CPU unless asked (bf16 there trained more steps a minute, samples no better: bench/README, "Training
    in bf16 on the CPU"); --precision bf16 is bf16 autocast, and the header line of the log says which."""
    assert process.setup_runtime("cpu").precision == "fp32"
    assert process.setup_runtime("cpu", "bf16").precision == "bf16 autocast"
    vqvae(tmp_path / "fp32", adni_folder, "--max-steps", "1", "--device", "cpu")
    assert "on cpu, fp32" in capsys.readouterr().out
    vqvae(tmp_path / "bf16", adni_folder, "--max-steps", "1", "--device", "cpu", "--precision", "bf16")
    assert "on cpu, bf16 autocast" in capsys.readouterr().out


def test_batch_job_progress_prints_each_quarter_once(capsys):
    for total, lines in [(8, ["2/8 (25%)", "4/8 (50%)", "6/8 (75%)", "8/8 (100%)"]), (2, ["1/2 (50%)", "2/2 (100%)"])]:
        bar = Milestones(total=total, desc="sampling")
        for _ in range(total):
            bar.update(1)
        assert capsys.readouterr().err.splitlines() == [f"sampling: {line}" for line in lines]


def test_a_second_command_on_a_run_in_training_stops_in_one_line(trained_run, tmp_path):
    from runtime.checkpoint import run_lock
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "unet.pt").read_bytes()
    with run_lock(copy):                                             # as a first command holds it while it trains
        message = error_of(unet, copy, "--max-steps", "6", "--resume")
        assert "another command is training or changing" in message and f"pid {os.getpid()}" in message
    assert (copy / "unet.pt").read_bytes() == before
    unet(copy, "--max-steps", "6", "--resume")                        # freed when the first one ends
    assert ckpt(copy / "unet.pt")["step"] == 6


def test_two_commands_started_at_once_on_a_new_run_do_not_both_go_on(trained_run, tmp_path):
    from runtime.checkpoint import run_lock
    _, data = trained_run
    new = tmp_path / "new" / "run"
    with run_lock(new, create=True):                                 # the first command made the folder and holds it
        assert error_of(vqvae, new, data, "--max-steps", "2").startswith("error: another command is training")
        assert [p.name for p in new.iterdir()] == [".lock"]          # the second wrote nothing
    assert not new.exists()                                          # made, left empty: removed again
    error_of(vqvae, new, tmp_path / "missing", "--max-steps", "2")   # bad input leaves no folder behind
    assert not new.exists()
    vqvae(new, data, "--max-steps", "2")
    assert ckpt(new / "vqvae.pt")["step"] == 2


def test_a_loader_worker_does_not_keep_the_run_locked_once_its_trainer_is_killed(tmp_path):
    """kill -9 of a trainer whose loader workers (forked while it held RUN/.lock) outlive it for a while: the run is
    free at once, so the scheduler's `--resume` that follows goes on (found by review: refused for about 5 s, naming
    the dead pid). The worker is forked as DataLoader forks it, and set up by its worker_init_fn."""
    from runtime.checkpoint import run_lock
    script = (
        "import multiprocessing, sys, time\n"
        "from pathlib import Path\n"
        "from dataset import _leave_stop_signals_to_the_trainer\n"
        "from runtime.checkpoint import run_lock\n"
        "def worker():\n"
        "    _leave_stop_signals_to_the_trainer(0)\n"
        "    time.sleep(60)\n"
        "with run_lock(Path(sys.argv[1])):\n"
        "    child = multiprocessing.get_context('fork').Process(target=worker)\n"
        "    child.start()\n"
        "    print(child.pid, flush=True)\n"
        "    time.sleep(60)\n")
    trainer = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parents[1])
    worker = int(trainer.stdout.readline())
    time.sleep(0.5)                                                  # the worker has run its worker_init_fn
    try:
        trainer.kill()
        trainer.wait()
        with run_lock(tmp_path):                                     # the worker still runs, and holds no lock
            os.kill(worker, 0)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_a_folder_whose_lock_cannot_be_written_stops_the_command_in_one_line(tmp_path):
    """A folder the user can read but not write (a shared set, a read-only mount: here, the lock's name taken by a
    folder, as root may write anywhere) is refused in one line naming the lock, not with a traceback."""
    from runtime.checkpoint import run_lock
    (tmp_path / ".samples.lock").mkdir()
    with pytest.raises(BadInputError, match=r"cannot write .*\.samples\.lock \(Is a directory\): .* must be a folder "
                                            r"you can write \(the command is writing a sample set into it\)"):
        with run_lock(tmp_path, lock=".samples.lock", doing="writing a sample set into"):
            pass


def _counts_agree(rank: int, store: str, counts: list[tuple[int, int]], out: str):
    """One of two gloo processes: whether each pair of counts (rank 0's, rank 1's) is the same on both."""
    import torch.distributed as dist
    from types import SimpleNamespace
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        rt = SimpleNamespace(world=2, device=torch.device("cpu"))
        answers = [process.same_on_every_rank(pair[rank], rt) for pair in counts]
        Path(f"{out}.{rank}").write_text(json.dumps(answers))
    finally:
        dist.destroy_process_group()


def test_the_ranks_find_out_together_whether_they_read_as_many_images(tmp_path):
    """--skip-bad-images left out a file on one rank only: each shard would hold other images than it counts on."""
    counts = [(7200, 7200), (7200, 7199), (0, 1), (5, 5)]
    torch.multiprocessing.spawn(_counts_agree, args=(str(tmp_path / "store"), counts, str(tmp_path / "answers")),
                                nprocs=2)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"answers.{rank}").read_text()) == [True, False, False, True]


def test_resume_on_a_run_that_is_not_there_says_it_starts_anew(tmp_path, capsys):
    """The demo resumes every stage whether it ran or not; a typo in --run must not start a new run without a word."""
    assert checkpoint_to_resume(tmp_path / "typo" / "vqvae.pt", "vqvae", True, {}) is None
    assert f"--resume: nothing to resume, {tmp_path / 'typo' / 'vqvae.pt'} does not exist" in capsys.readouterr().out
    assert checkpoint_to_resume(tmp_path / "new" / "vqvae.pt", "vqvae", False, {}) is None
    assert capsys.readouterr().out == ""


def test_a_device_that_is_not_there_is_refused_in_one_line():
    assert process.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(BadInputError, match="--device cuda:64: this machine has"):   # no GPU has 65
        process.pick_device("cuda:64")
    with pytest.raises(BadInputError, match="--device gpu: not a device"):
        process.pick_device("gpu")


@pytest.mark.parametrize("text", ['{"train-vqvae": {"lr": 1e-3},}', "[]"])
def test_a_config_json_edited_into_something_else_is_kept_aside_and_written_anew(tmp_path, text, capsys):
    (tmp_path / "config.json").write_text(text)
    write_config(tmp_path, "train-unet", argparse.Namespace(lr=2e-4, func=print))
    assert json.loads((tmp_path / "config.json").read_text()) == {"train-unet": {"lr": 2e-4}}
    assert (tmp_path / "config.json.bad").read_text() == text and "kept as config.json.bad" in capsys.readouterr().out


def test_one_rule_sets_the_memory_layout_of_training_and_of_sampling():
    """NHWC on CUDA, NCHW elsewhere, unless --channels-last says: the runtime of training and the UNet `sample` runs
    follow the same rule (a trained NHWC run sampled in NCHW would run cuDNN's slower kernels)."""
    from runtime.models import for_sampling
    from modules import UNet, UNetConfig
    assert process.default_memory_format("cuda") == process.default_memory_format(torch.device("cuda", 1)) == \
        torch.channels_last                                                     # no GPU needed to ask
    assert process.default_memory_format("cpu") == torch.contiguous_format
    assert process.setup_runtime("cpu").channels_last is False
    assert process.setup_runtime("cpu", channels_last=True).channels_last is True
    net = UNet(UNetConfig(latent_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)))
    net = for_sampling(net.to(memory_format=torch.channels_last), "cpu")   # a model saved from a GPU, sampled here
    assert net.conv_in.weight.is_contiguous() and not net.training
