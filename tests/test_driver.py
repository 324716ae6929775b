"""driver.py: presets, help, the demo's order of stages, flags resolved once, and every bad command line's
one-line error (before anything is written)."""
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

import driver
from conftest import ckpt, error_of, unet, vqvae
from runtime.checkpoint import atomic_save

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


def test_stage_2_inherits_stage_1s_data_and_preset_without_rewriting_its_own_flags(trained_run):
    run, data = trained_run
    args = driver.parse(["train-unet", "--run", str(run)])
    assert (args.preset, args.image_size, args.data_config.image_size, args.data_config.root) == ("tiny", 32, 32, str(data))
    assert driver.parse(["evaluate", "--run", str(run), "--data", "/elsewhere"]).data_config.root == "/elsewhere"


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
        (tmp_path / "run").mkdir()
        atomic_save({"kind": "vqvae", "args": {"preset": a.preset}, "data_config": asdict(a.data_config)}, tmp_path / "run" / "vqvae.pt")
    monkeypatch.setattr(train, "train_vqvae", stage1)
    monkeypatch.setattr(train, "train_unet", lambda a: calls.append(("unet", a.preset, a.resume, a.data)))
    monkeypatch.setattr(predict, "predict", lambda a: calls.append(("predict", a.sampler, a.steps, predict.sampling_from_args(a).repeat_times)))
    driver.main(["demo", "--run", str(tmp_path / "run"), "--demo-dir", str(tmp_path / "demo")])
    assert calls == [("vqvae", "tiny", True, None), ("unet", "tiny", True, None), ("predict", "ddpm", 1000, 5)]


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


def test_the_command_line_loads_the_metrics_only_for_evaluate():
    """torchmetrics imports transformers where it is installed (about 2 s here, more on a cold disk): the training
    and sampling commands must not pay for it. Fails if driver.py imports evaluation.evaluate at the top."""
    code = "import sys, driver; driver.build_parser(); print('torchmetrics' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
