"""predict.py: samplers, grid, images and GIF; class-conditional sampling; its flags and their errors."""
import contextlib
import json
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

import driver
import predict
from conftest import ckpt, error_of, random_latent_diffusion, unet, vqvae
from diffusion.gaussian import GaussianDiffusion
from runtime.graphs import GraphedCall
from test_diffusion import MU, N, S, OracleEps


def test_predict_writes_grid_images_and_gif(trained_run, tmp_path):
    run, _ = trained_run
    predict.main(["--run", str(run), "--out", str(tmp_path), "--num", "3", "--sampler", "ddim", "--steps", "10",
                  "--repeat-times", "2", "--repeat-last", "5", "--gif-frames", "6", "--gif-xt"])
    assert (tmp_path / "samples.png").exists()
    assert sorted(p.name for p in (tmp_path / "samples" / "all").iterdir()) == [f"sub-00000{i}.png" for i in range(3)]
    assert Image.open(tmp_path / "samples" / "all" / "sub-000000.png").size == (32, 32)
    gif = Image.open(tmp_path / "denoise.gif")
    assert gif.n_frames == 6 + 2                          # main pass frames + one per repeat


def test_a_full_disk_where_no_atomic_write_says_so_is_one_line(trained_run, tmp_path, monkeypatch):
    """A manifest's line written in place that finds the disk full: one line, not a traceback; other OSErrors stay
    tracebacks (a bug, not the user's disk). A figure (samples.png) is written whole, and says so."""
    import errno
    import driver
    import export.figures
    import export.sample_set
    from conftest import error_of
    run, _ = trained_run
    flags = ["--run", str(run), "--out", str(tmp_path), "--num", "2", "--sampler", "ddim", "--steps", "3",
             "--repeat-times", "0", "--gif-frames", "2"]
    with monkeypatch.context() as m:
        m.setattr(export.sample_set, "_append", lambda *a, **k: (_ for _ in ()).throw(
            OSError(errno.ENOSPC, "No space left on device", "manifest.csv")))
        message = error_of(predict.main, flags)
        assert message == "error: could not write manifest.csv (No space left on device): free some space, then run " \
                          "the same command with --resume"
        assert "free some space; run the same command with --resume" in error_of(driver.main, ["sample", *flags])
        m.setattr(export.sample_set, "_append", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EACCES, "no")))
        with pytest.raises(PermissionError):
            predict.main(flags)
    monkeypatch.setattr(export.figures, "save_image", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, "No space left on device")))
    message = error_of(predict.main, flags)
    assert f"could not write {tmp_path / 'samples.png'} (No space left on device)" in message
    assert not list(tmp_path.glob(".samples.png*"))                           # no piece of it left behind


def test_a_set_stopped_as_its_first_batch_is_written_has_its_gif(trained_run, tmp_path, monkeypatch):
    """The GIF is of the first batch: written before that batch enters the manifest, so that a set resumed after it
    (which draws the batch no more) has one."""
    from export.sample_set import SampleSet
    run, _ = trained_run

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(SampleSet, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "2", "--sampler",
                                            "ddim", "--steps", "3", "--repeat-times", "0", "--gif-frames", "2"]))
    assert Image.open(tmp_path / "denoise.gif").n_frames == 2 and not list(tmp_path.glob(".*tmp*"))


def test_predict_every_sampler_and_eta_reach_the_images(trained_run, tmp_path):
    run, _ = trained_run
    outputs = {}
    for name, flags in {"dpmpp": ["--sampler", "dpmpp", "--steps", "10"], "ddim": ["--sampler", "ddim", "--steps", "10"],
                        "ddim-eta1": ["--sampler", "ddim", "--steps", "10", "--eta", "1"],
                        "dpmpp-sde": ["--sampler", "dpmpp-sde", "--steps", "10"]}.items():
        outputs[name] = predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path / name), "--num", "2",
                                                            "--repeat-times", "0", "--gif-frames", "3", *flags]))
        assert outputs[name].shape == (2, 1, 32, 32) and (tmp_path / name / "denoise.gif").exists()
    assert not torch.equal(outputs["ddim"], outputs["ddim-eta1"])  # --eta reaches the sampler
    assert not torch.equal(outputs["ddim"], outputs["dpmpp"])
    assert not torch.equal(outputs["dpmpp"], outputs["dpmpp-sde"])


def test_predict_ddpm_default_runs_the_full_chain(trained_run, tmp_path):
    run, _ = trained_run
    predict.main(["--run", str(run), "--out", str(tmp_path), "--num", "1", "--repeat-times", "1", "--gif-frames", "3"])
    assert Image.open(tmp_path / "denoise.gif").n_frames == 3 + 1


def test_predict_defaults_are_the_cards():
    card = predict.sampling_from_args(predict.parse_args([]))
    assert (card.sampler, card.steps, card.repeat_last, card.repeat_times) == ("ddpm", 1000, 30, 5)
    sample = predict.sampling_from_args(driver.parse(["sample"]))
    # the stochastic DPM-Solver++: the cost of its ODE (within 15% of DDPM-1000), finer detail (bench/README.md)
    assert (sample.sampler, sample.steps, sample.repeat_times) == ("dpmpp-sde", 20, 0)


def test_the_card_repeats_default_to_on_for_ddpm_only(trained_run, tmp_path, capsys):
    """`predict.py --sampler ddim --steps 50` makes 50 network calls, as the README says (it made 50 + 5 x 30)."""
    run, _ = trained_run
    ddim = predict.sampling_from_args(predict.parse_args(["--sampler", "ddim", "--steps", "50"]))
    assert ddim.repeat_times == 0 and ddim.calls(1000) == 50
    assert predict.sampling_from_args(predict.parse_args(["--sampler", "ddim", "--repeat-times", "2"])).repeat_times == 2
    predict.main(["--run", str(run), "--out", str(tmp_path), "--num", "1", "--sampler", "ddim", "--steps", "7"])
    assert "7 network calls per batch" in capsys.readouterr().out


@pytest.mark.parametrize("flags, message", [(["--num", "0"], "--num"), (["--steps", "-1"], "--steps"),
                                            (["--clip-x0", "wide"], "--clip-x0"),
                                            (["--repeat-last", "5000"], "--repeat-last"), (["--eta", "-1"], "--eta"),
                                            (["--eta", "1.5"], "--eta must be in [0, 1]"),
                                            (["--sampler", "ddim", "--steps", "2000"], "--steps 2000 exceeds"),
                                            (["--sampler", "ddim", "--steps", "2", "--guide-interval", "0,5"],
                                             "these samples are not guided")])
def test_predict_flag_errors(trained_run, flags, message):
    run, _ = trained_run
    assert message in error_of(predict.main, ["--run", str(run), *flags])


def test_conditional_run_generates_a_chosen_class_and_all_classes(trained_run, tmp_path):
    run, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "unet.pt").unlink()
    unet(copy, "--max-steps", "2", "--conditional", "--label-dropout", "0.2")
    saved = ckpt(copy / "unet.pt")
    assert saved["classes"] == ["AD", "NC"] and list(saved["config"]["conditions"]) == [2]
    assert saved["conditions"] == [{"name": "class", "kind": "category", "values": ["AD", "NC"], "low": 0.0, "high": 1.0}]
    assert "cond_emb.embed.0.weight" in saved["model"] and not any(k.startswith("cond_emb") for k in ckpt(run / "unet.pt")["model"])
    assert ckpt(copy / "latents.pt")["y"].tolist() == ([0] * 6 + [1] * 6) * 2  # train/{AD,NC} then test/{AD,NC}
    common = ["--run", str(copy), "--num", "2", "--sampler", "ddim", "--steps", "5", "--repeat-times", "0", "--gif-frames", "2"]
    one = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "ad"), "--class", "AD", "--guidance", "3"]))
    assert one.shape == (2, 1, 32, 32)
    both = predict.predict(predict.parse_args([*common, "--out", str(tmp_path / "all"), "--class", "all", "--num", "3"]))
    assert both.shape == (6, 1, 32, 32)
    width, height = Image.open(tmp_path / "all" / "samples.png").size
    assert width > 1.4 * height  # one row of 3 per class: 2 rows
    assert "not a class of this run: AD, NC" in error_of(predict.main, [*common, "--class", "MCI"])
    assert "--class all sweeps the classes" in error_of(predict.main, [*common, "--class", "all",
                                                                       "--sweep", "class=NC"])
    assert "--guidance" in error_of(predict.main, [*common, "--class", "AD", "--guidance", "-1"])
    # evaluate: every class at every guidance scale, against that class's held-out subjects
    evaluate = ["evaluate", "--features", "domain", "--classifier-steps", "0", "--steps", "3", "--holdout", "0.75"]
    driver.main([*evaluate, "--run", str(copy), "--out", str(tmp_path / "eval"), "--class", "all", "--guidance", "0,2",
                 "--cache-gb", "0"])  # the images decoded into the run's memory-mapped file, as training's are
    assert (copy / "images-32px-1ch.npy").is_file()
    rows = json.loads((tmp_path / "eval" / "metrics.json").read_text())["per_class"]
    assert [(r["class"], r["images"]) for r in rows] == [(c, k) for c in ("AD", "NC") for k in (
        "samples, w=0", "samples, w=2", "real (training)", "real (floor)", "real (held out)")]
    assert all(0 <= r["recognised"] <= 1 for r in rows) and "## Per class" in (tmp_path / "eval" / "report.md").read_text()
    assert "--guidance" in error_of(driver.main, [*evaluate, "--run", str(copy), "--class", "AD", "--guidance", "1,-2"])
    # the unconditional run refuses --class; the conditional one resumes conditional without being told (since
    # issue 29: before, resuming it without --conditional was refused)
    assert "without --conditional" in error_of(predict.main, ["--run", str(run), "--num", "1", "--class", "AD"])
    assert "without --conditional" in error_of(driver.main, [*evaluate, "--run", str(run), "--class", "AD"])
    unet(copy, "--max-steps", "3", "--resume")
    assert list(ckpt(copy / "unet.pt")["config"]["conditions"]) == [2] and ckpt(copy / "unet.pt")["args"]["label_dropout"] == 0.2


def test_predict_without_unet(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "vqvae.pt").write_bytes((run / "vqvae.pt").read_bytes())
    assert "no unet checkpoint" in error_of(predict.main, ["--run", str(tmp_path)])


def test_unet_from_another_vqvae_is_refused(trained_run, tmp_path):
    run, data = trained_run
    other = tmp_path / "other"
    vqvae(other, data, "--max-steps", "2", "--seed", "1")
    (other / "unet.pt").write_bytes((run / "unet.pt").read_bytes())
    assert "another VQ-VAE" in error_of(predict.main, ["--run", str(other), "--num", "1"])


def test_wrong_kind_of_checkpoint_is_refused(trained_run, tmp_path):
    run, _ = trained_run
    (tmp_path / "vqvae.pt").write_bytes((run / "vqvae.pt").read_bytes())
    (tmp_path / "unet.pt").write_bytes((run / "vqvae.pt").read_bytes())
    assert "not a unet checkpoint" in error_of(predict.main, ["--run", str(tmp_path)])


def test_the_grid_holds_at_most_64_enlarged_images_and_says_where_the_rest_are(trained_run, tmp_path, capsys):
    run, _ = trained_run
    images = predict.predict(predict.parse_args(["--run", str(run), "--out", str(tmp_path), "--num", "70", "--sampler", "ddim",
                                                 "--steps", "2", "--gif-frames", "2"]))
    assert len(images) == 70 and len(list((tmp_path / "samples" / "all").iterdir())) == 70
    assert Image.open(tmp_path / "samples.png").size == (8 * (128 + 2) + 2,) * 2   # 8 x 8 of 32-px images shown at 128 px
    assert "shows 64 of the 70 images" in capsys.readouterr().out
    assert Image.open(tmp_path / "denoise.gif").width == 512                     # 4 x 4 enlarged, then fitted to 512


# ----------------------------------------------------------------------------- the card's repeats, and guidance

def test_the_cards_repeats_keep_the_oracles_distribution():
    """DDPM-1000 and the card's 5 repeats (re-noised to step 29, denoised to 0 again) with the analytic oracle of data
    N(MU, S^2) keep the data's spread (measured: std -1.6%); denoising the sample again without re-noising it first
    (x_t = x) shrinks it at every repeat (-9%)."""
    d = GaussianDiffusion()
    torch.manual_seed(0)
    x_T = torch.randn(N, 1, 1, 1, dtype=torch.float64)
    card = predict.Sampling("ddpm", repeat_last=30, repeat_times=5, gif_frames=2)
    x, frames = predict.sample_latents(d, OracleEps(d, MU, S), x_T, card)
    assert abs(x.mean().item() - MU) < 0.015 and abs(x.std().item() / S - 1) < 0.04
    assert [caption for caption, _, _ in frames] == ["step 999", "step 0", *(f"repeat {r}/5" for r in range(1, 6))]


def test_each_repeat_renoises_to_step_repeat_last_minus_1_and_steps_down_to_0():
    """The network's calls: DDPM's 1000, then 30 per repeat at 29, 28, ..., 0, as many as `Sampling.calls` says. The
    oracle of data at the point 0 (s = 0) ends every pass exactly at 0, so what it is first called with in a repeat
    is the re-noise alone, q_sample to step 29: sqrt(1 - abar_29) eps (re-noised to step 30 it is 2.9% wider)."""
    d = GaussianDiffusion()
    oracle, seen = OracleEps(d, 0.0, 0.0), []

    def network(x_t, t):
        seen.append((int(t[0]), x_t))
        return oracle(x_t, t)
    card = predict.Sampling("ddpm", repeat_last=30, repeat_times=5, gif_frames=1)
    torch.manual_seed(0)
    x, _ = predict.sample_latents(d, network, torch.randn(8192, 1, 1, 1, dtype=torch.float64), card)
    steps = [t for t, _ in seen]
    assert steps == [*range(999, -1, -1), *[*range(29, -1, -1)] * 5] and len(steps) == card.calls(1000) == 1150
    renoised = torch.cat([x_t for t, x_t in seen[1000:] if t == 29]) / (1 - d.alphas_cumprod[29]).sqrt()
    assert len(renoised) == 5 * 8192 and abs(renoised.mean().item()) < 0.02 and abs(renoised.std().item() - 1) < 0.015
    assert x.abs().max() < 1e-9


class ConstantNetwork(torch.nn.Module):
    """A fake conditional UNet: `cond` in every latent of a sample whose conditions are given, `uncond` where none is
    (y None or NaN). Its parameter only says which device it is on."""

    def __init__(self, cond: float, uncond: float):
        super().__init__()
        self.cond, self.uncond, self.device_of = cond, uncond, torch.nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, y=None):
        given = torch.zeros(len(x_t), dtype=torch.bool) if y is None else ~y.isnan().all(1)
        return torch.where(given.view(-1, 1, 1, 1), self.cond, self.uncond).expand_as(x_t)


def test_predict_guides_in_its_interval_and_puts_the_guide_under_the_same_guidance(monkeypatch):
    """The denoiser `sample_batches` builds, with --guide-interval 5,12 of 20 steps and fake networks of constant
    outputs (UNet: 3 conditional, 1 not; guide: 2 and 0.5). Classifier-free guidance w = 2.5: 1 + 2.5 (3 - 1) = 6 in
    the interval, the conditional 3 outside (not 6: the interval reaches `Guided`). Autoguidance W = 2 of a conditional
    run: the guide under the same guidance, 0.5 + 2.5 (2 - 0.5) = 4.25, and 4.25 + 2 (6 - 4.25) = 7.75 (an unguided
    guide gives 0.5 + 2 (6 - 0.5) = 11.5); unconditional: 0.5 + 2 (1 - 0.5) = 1.5; outside, the UNet alone."""
    model = replace(random_latent_diffusion(), unet=ConstantNetwork(3.0, 1.0))
    denoisers = []
    monkeypatch.setattr(predict, "sample_latents", lambda diffusion, denoiser, x_T, sampling, bar:
                        denoisers.append(denoiser) or (x_T, []))
    guided = predict.Sampling("ddim", steps=2, batch_size=2, guide_interval=(5, 12))
    autoguided = replace(guided, autoguidance=2.0, guide=ConstantNetwork(2.0, 0.5))
    for sampling, labels, inside, outside in [(guided, torch.tensor([0, 1]), 6.0, 3.0),
                                              (autoguided, torch.tensor([0, 1]), 7.75, 3.0),
                                              (autoguided, None, 1.5, 1.0)]:
        predict.generate(model, sampling, 2, labels, guidance=2.5)
        x = torch.randn(2, *model.latent_shape)
        with torch.no_grad():
            outputs = [denoisers[-1](x, torch.full((2,), step)) for step in (4, 5, 12, 13)]
        assert [torch.unique(out).tolist() for out in outputs] == [[outside], [inside], [inside], [outside]]


# ----------------------------------------------------------------------------- the UNet's calls replayed from a graph

@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp", "dpmpp-sde"])
def test_graph_replayed_sampling_gives_the_eager_samples_and_frames(sampler):
    """Every sampler, unconditional and under guidance, and under autoguidance as well, over a last batch of another
    size: the bookkeeping of the CUDA-graph path (static inputs, one graph per shape, cloned outputs) gives the very
    samples and GIF frames of calling the UNets directly (the CPU replays by calling them again; on CUDA the graphs do)."""
    model = random_latent_diffusion()
    plain = predict.Sampling(sampler, steps=6, eta=0.5, repeat_last=4, repeat_times=2 if sampler == "ddpm" else 0,
                             clip_x0=2.0, batch_size=3, gif_frames=4)
    guide = predict.UNet(model.unet.cfg).eval().requires_grad_(False)   # random: another network than the UNet
    torch.nn.init.normal_(guide.out[-1].weight, std=0.2)
    autoguided = replace(plain, autoguidance=2.0, guide=guide)
    classes, samples = torch.tensor([0, 1, 1, 0, 1]), []
    for sampling, labels, guidance in [(plain, None, 1.0), (plain, classes, 2.5), (autoguided, None, 1.0),
                                       (autoguided, classes, 2.5)]:
        runs = []
        for replay_eagerly in (False, True):
            torch.manual_seed(1)
            runs.append(predict.generate(model, sampling, 5, labels, guidance, replay_eagerly=replay_eagerly))
        (eager, eager_frames, _), (graphed, graphed_frames, _) = runs
        assert eager.shape == (5, 1, 16, 16) and torch.equal(eager, graphed)
        assert len(eager_frames) == len(graphed_frames) == 4 + sampling.repeat_times
        for (caption, x0, xt), (caption_g, x0_g, xt_g) in zip(eager_frames, graphed_frames):
            assert caption == caption_g and torch.equal(x0, x0_g) and torch.equal(xt, xt_g)
        assert not torch.equal(eager_frames[0][1], eager_frames[-1][1])  # the frames are not one tensor overwritten
        samples.append(eager)
    assert not torch.allclose(samples[0], samples[2], atol=1e-3) and not torch.allclose(samples[1], samples[3], atol=1e-3)


def test_a_graphed_call_returns_outputs_the_next_replay_does_not_overwrite():
    calls = []

    def network(x, t):
        calls.append(len(x))
        return x * t.view(-1, 1, 1, 1)

    graphed = GraphedCall(network, replay_eagerly=True)
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([2.0, 3.0])
    first = graphed(x, t)
    x_before = x.clone()
    x.add_(1.0)                                              # the caller's input changes after the call
    second = graphed(x, t)
    assert torch.equal(first, x_before * t.view(-1, 1, 1, 1)) and torch.equal(second, x * t.view(-1, 1, 1, 1))
    third = graphed(x[:1], t[:1])                            # another batch size: a graph of its own
    assert torch.equal(third, second[:1]) and len(graphed.graphs) == 2
    assert calls == [2, 2, 2, 1, 1]                          # capture + replay, replay, capture + replay


def test_a_graph_is_captured_and_replayed_with_its_inputs_device_current(monkeypatch):
    """torch.cuda.graph captures on the current device's streams: a model on cuda:1 with cuda:0 current (predict
    --device cuda:1) would record an empty graph. On a CPU the capture replays eagerly, so this checks that the
    capture and every replay run inside `current_device` of the inputs' device, and that for cuda:1 that is
    torch.cuda.device(1); on two GPUs the test below compares the samples themselves."""
    from runtime import graphs
    inside = []

    @contextlib.contextmanager
    def recording(device):
        inside.append(device)
        yield
        inside.pop()

    monkeypatch.setattr(graphs, "current_device", recording)
    seen = []
    graphed = GraphedCall(lambda x: seen.append(list(inside)) or x * 2, replay_eagerly=True)
    x = torch.randn(2, 3)
    graphed(x)
    graphed(x)
    assert seen == [[x.device]] * 3                          # capture, its replay, a replay
    monkeypatch.undo()
    second = graphs.current_device(torch.device("cuda", 1))
    assert isinstance(second, torch.cuda.device) and second.idx == 1


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_graph_replayed_sampling_on_a_second_gpu_gives_the_eager_samples():
    model = random_latent_diffusion()
    for part in (model.vqvae, model.unet, model.diffusion):
        part.to("cuda:1")
    runs = []
    for cuda_graphs in (False, True):
        torch.manual_seed(1)
        sampling = predict.Sampling("ddim", steps=6, batch_size=3, gif_frames=2, cuda_graphs=cuda_graphs)
        runs.append(predict.generate(model, sampling, 5)[0])
    assert torch.cuda.current_device() == 0 and torch.allclose(runs[0], runs[1], atol=1e-5)


def test_a_gif_of_one_frame_shows_the_result():
    model = random_latent_diffusion()
    for sampler in ("ddim", "dpmpp"):
        x_T = torch.randn(2, *model.latent_shape)
        z, frames = predict.sample_latents(model.diffusion, model.unet, x_T, predict.Sampling(sampler, steps=5,
                                                                                              gif_frames=1))
        assert len(frames) == 1 and frames[0][0] == "step 0" and torch.equal(frames[0][1], z)


def test_sampling_batch_defaults_by_device(capsys):
    model = random_latent_diffusion()
    predict.generate(model, predict.Sampling("ddim", steps=2, gif_frames=2), 3)
    assert f"per batch, batches of up to {predict.DEFAULT_BATCH['cpu']})" in capsys.readouterr().out
    assert predict.sampling_from_args(predict.parse_args([])).batch_size is None
    assert predict.sampling_from_args(predict.parse_args(["--batch-size", "8"])).batch_size == 8
