"""losses/: stage 1's reconstruction, perceptual and adversarial terms on constructed cases with known answers, and
the discriminator's training beside the VQ-VAE."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.adversarial import (ADAPTIVE_WEIGHT_FALLBACK, DiscriminatorConfig, PatchDiscriminator, adaptive_weight,
                                adversarial_factor, generator_adversarial_loss, hinge_d_loss, least_squares_d_loss,
                                least_squares_g_loss, non_saturating_d_loss, start_step)
from losses.perceptual import VGGPerceptualLoss, perceptual_loss
from runtime.errors import BadInputError
from runtime.checkpoint import fingerprint
from losses.reconstruction import as_shown, base_loss, focal_frequency_loss, laplacian_l1
from modules import VQVAE, VQVAEConfig


def test_hinge_and_non_saturating_losses_match_closed_forms():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-3.0, 0.0, 1.0, -0.5])
    # hinge: relu(1 - real) = (0, 0.5, 2), mean 5/6; relu(1 + fake) = (0, 1, 2, 0.5), mean 7/8
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 7 / 8))
    # at zero logits the cross-entropy is log 2 on each side; hinge is 1 on each side
    zeros = torch.zeros(5)
    assert non_saturating_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert hinge_d_loss(zeros, zeros).item() == pytest.approx(1.0)
    expected = 0.5 * (sum(math.log1p(math.exp(-r)) for r in real.tolist()) / 3
                      + sum(math.log1p(math.exp(f)) for f in fake.tolist()) / 4)
    assert non_saturating_d_loss(real, fake).item() == pytest.approx(expected)
    # a discriminator that is confidently right costs nothing under hinge, almost nothing under cross-entropy
    assert hinge_d_loss(torch.full((4,), 5.0), torch.full((4,), -5.0)).item() == 0.0
    assert non_saturating_d_loss(torch.full((4,), 20.0), torch.full((4,), -20.0)).item() < 1e-8
    assert generator_adversarial_loss(fake).item() == pytest.approx(-(-3.0 + 0.0 + 1.0 - 0.5) / 4)
    assert [adversarial_factor(s, 100) for s in (0, 99, 100, 5000)] == [0.0, 0.0, 1.0, 1.0]


def test_adaptive_weight_is_the_ratio_of_gradient_norms_at_the_last_layer():
    w = torch.tensor([1.0, 2.0, 2.0], requires_grad=True)
    a, b = torch.tensor([3.0, 0.0, 4.0]), torch.tensor([0.0, 1.0, 0.0])
    rec_loss, gan_loss = (w * a).sum(), 2 * (w * b).sum()     # gradients a (norm 5) and 2b (norm 2)
    assert adaptive_weight(rec_loss, gan_loss, w).item() == pytest.approx(5 / (2 + 1e-4))
    assert adaptive_weight(rec_loss, gan_loss, w).requires_grad is False
    assert adaptive_weight(1e9 * rec_loss, gan_loss, w).item() == 1e4                     # clamped
    assert w.grad is None                                                                  # nothing accumulated


def test_adaptive_weight_is_zero_for_a_perfect_reconstruction_and_falls_back_when_frozen():
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1, codebook_size=16)
    model, disc = VQVAE(cfg), PatchDiscriminator(DiscriminatorConfig(channels=8, num_layers=1))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    recon, _, _ = model(x)
    gan_loss = generator_adversarial_loss(disc(recon))
    assert adaptive_weight(F.mse_loss(recon, x), gan_loss, model.last_layer).item() > 0
    # a perfect reconstruction: the MSE's gradient, 2 (recon - x) / n, is exactly zero
    assert adaptive_weight(F.mse_loss(recon, recon.detach()), gan_loss, model.last_layer).item() == 0.0
    # a frozen decoder: no gradient can be taken, the documented fallback (0: the GAN term is switched off)
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    recon, _, _ = model(x)
    frozen = adaptive_weight(F.mse_loss(recon, x), generator_adversarial_loss(disc(recon)), model.last_layer)
    assert frozen.item() == ADAPTIVE_WEIGHT_FALLBACK == 0.0
    with torch.no_grad():  # losses computed without grad: the same fallback
        recon, _, _ = model(x)
        assert adaptive_weight(F.mse_loss(recon, x), recon.mean(), model.last_layer).item() == 0.0


@pytest.mark.parametrize("cfg, size, patches", [(DiscriminatorConfig(), 256, 30), (DiscriminatorConfig(), 64, 6),
                                                (DiscriminatorConfig(channels=8, num_layers=2, norm="none",
                                                                     spectral_norm=True), 32, 6)])
def test_patch_discriminator_gives_patch_logits_and_no_batchnorm(cfg, size, patches):
    disc = PatchDiscriminator(cfg)
    with torch.no_grad():
        logits = disc(torch.randn(2, 1, size, size))
    assert logits.shape == (2, 1, patches, patches)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in disc.modules()) == (cfg.norm == "group")
    assert any("parametrizations" in name for name, _ in disc.named_parameters()) == cfg.spectral_norm
    with pytest.raises(ValueError):
        PatchDiscriminator(DiscriminatorConfig(norm="batch"))


def test_the_discriminator_starts_from_pytorchs_initialisation_and_an_older_one_is_recorded_as_dcgans():
    """DCGAN's N(0, 0.02) left the `tiny` PatchGAN at chance on ADNI slices for 1,500 steps in 8 of 8 draws, PyTorch's
    own learned in 8 of 8 (bench/README); a discriminator saved before the config named its initialisation had DCGAN's,
    and says so."""
    import contextlib

    from losses.adversarial import Adversary, AdversaryConfig
    from runtime.process import Runtime
    torch.manual_seed(0)
    first = {init: PatchDiscriminator(DiscriminatorConfig(init=init)).net[0].weight for init in ("default", "dcgan")}
    fan_in = 1 * 4 * 4  # one channel, 4x4 kernels: PyTorch draws U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 0.144
    assert first["default"].std().item() == pytest.approx(1 / math.sqrt(3 * fan_in), rel=0.1)
    assert first["default"].abs().max().item() <= 1 / math.sqrt(fan_in)
    assert first["dcgan"].std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError):
        PatchDiscriminator(DiscriminatorConfig(init="xavier"))

    rt = Runtime(torch.device("cpu"), contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False), False)
    config = AdversaryConfig(weight=0.01, start=0, loss="least-squares", weighting="fixed", lr=1e-3,
                             discriminator=DiscriminatorConfig(in_channels=1, channels=8, num_layers=3),
                             log_every=10, max_minutes=None)
    new = Adversary(config, rt, None, max_steps=10).state()
    assert new["disc_config"]["init"] == "default"
    old = {**new, "step": 5, "disc_config": {k: v for k, v in new["disc_config"].items() if k != "init"}}
    resumed = Adversary(config, rt, old, max_steps=10)
    assert resumed.state()["disc_config"]["init"] == "dcgan"
    assert all(torch.equal(a, b) for a, b in zip(resumed.disc.state_dict().values(), new["discriminator"].values()))


def test_the_reconstruction_loss_sees_the_clamped_image_and_still_pushes_where_it_is_wrong():
    x = torch.tensor([-1.0, -1.0, 0.5, 0.0])                           # background, background, tissue, tissue
    recon = torch.tensor([-1.3, -0.8, 1.4, -1.2], requires_grad=True)
    shown = as_shown(recon)
    assert torch.equal(shown, recon.detach().clamp(-1, 1))
    F.mse_loss(shown, x).backward()
    # d/dr mean((clamp(r) - x)^2) with the clamp passed straight through: 2 (clamp(r) - x) / n
    assert torch.allclose(recon.grad, torch.tensor([0.0, 0.1, 0.25, -0.5]))
    # below -1 on a background pixel is exact (plain MSE would pull it back up); a pixel clamped on the wrong side
    # of its target still gets its gradient (a plain clamp would give 0 there and leave it stuck)


def test_laplacian_l1_counts_an_error_equally_at_every_octave():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 64, 64) * 2 - 1
    assert laplacian_l1(x, x.clone()).item() == 0.0
    # a constant shift lives only in the low-pass residual, a pixel checkerboard only in the finest band
    # (the 5-tap binomial filter's response at Nyquist is 0): both cost their amplitude, while MSE costs its square
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    checkerboard = ((yy + xx) % 2 * 2 - 1).float()
    for a in (0.5, 0.05):
        assert laplacian_l1(x + a, x).item() == pytest.approx(a, rel=1e-4)
        assert laplacian_l1(x + a * checkerboard, x).item() == pytest.approx(a, rel=1e-4)
    recon = x.clone().requires_grad_(True)
    laplacian_l1(recon + 0.1 * torch.randn_like(x), x).backward()     # differentiable
    assert recon.grad is not None and recon.grad.abs().sum() > 0


def test_perceptual_loss_loads_a_local_vgg16_file_or_is_a_one_line_error(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers
    for path in (None, str(tmp_path / "missing.pth")):                  # never a run that says it had the term
        message = str(pytest.raises(BadInputError, perceptual_loss, path).value)
        assert "VGG16 weights" in message and "--perceptual-network random" in message and "\n" not in message
    torch.manual_seed(0)   # random weights stand in for ImageNet's: this checks loading and the distance's form
    features = make_layers(cfgs["D"])   # torchvision.models.vgg16().features, without building its classifier
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, tmp_path / "vgg16.pth")
    loss = perceptual_loss(str(tmp_path / "vgg16.pth"))
    assert torch.equal(loss.features[0].weight, features[0].weight)
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    recon = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert loss(x, x.clone()).item() == 0.0
    value = loss(recon, x)
    value.backward()
    assert value.item() > 0 and recon.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in loss.parameters())


def test_the_perceptual_networks_weights_are_saved_with_the_run_and_must_be_the_same_on_resume(adni_folder, tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    import driver
    from conftest import SMALL_VQ, ckpt, error_of
    weights = tmp_path / "vgg16.pth"

    def save_weights(seed):  # random weights stand in for ImageNet's, as above
        torch.manual_seed(seed)
        torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, weights)

    def stage1(*extra):
        driver.main(["train-vqvae", "--run", str(tmp_path / "run"), "--data", str(adni_folder), "--preset", "tiny",
                     *SMALL_VQ, "--perceptual-weight", "0.1", "--perceptual-network", "vgg16", *extra])

    save_weights(0)
    stage1("--max-steps", "2", "--vgg-weights", str(weights))
    saved = ckpt(tmp_path / "run" / "vqvae.pt")["perceptual_fingerprint"]
    assert saved == fingerprint(perceptual_loss(str(weights)).features.state_dict())
    save_weights(1)                                                  # the same path, other weights: refused
    message = error_of(stage1, "--max-steps", "4", "--resume")
    assert "perceptual network's weights are not those this run trained with" in message and saved in message
    assert ckpt(tmp_path / "run" / "vqvae.pt")["step"] == 2
    save_weights(0)
    stage1("--max-steps", "4", "--resume")
    assert ckpt(tmp_path / "run" / "vqvae.pt")["perceptual_fingerprint"] == saved


# ----------------------------------------------------------------------------- the brain-MRI anchors' recipe

def test_least_squares_losses_match_their_closed_forms_and_gradients():
    real = torch.tensor([2.0, 0.5, -1.0], requires_grad=True)
    fake = torch.tensor([-3.0, 0.0, 1.0, -0.5], requires_grad=True)
    d = least_squares_d_loss(real, fake)
    # (E[(D(x) - 1)^2] + E[D(x_rec)^2]) / 2 = ((1 + 0.25 + 4) / 3 + (9 + 0 + 1 + 0.25) / 4) / 2
    assert d.item() == pytest.approx(0.5 * (5.25 / 3 + 10.25 / 4))
    d.backward()
    assert torch.allclose(real.grad, (real.detach() - 1) / 3) and torch.allclose(fake.grad, fake.detach() / 4)
    fake.grad = None
    g = least_squares_g_loss(fake)
    assert g.item() == pytest.approx(0.5 * (16 + 1 + 0 + 2.25) / 4)
    g.backward()
    assert torch.allclose(fake.grad, (fake.detach() - 1) / 4)                # pulls every logit towards "real"
    assert least_squares_d_loss(torch.ones(3), torch.zeros(3)).item() == 0.0  # the optimal discriminator
    assert least_squares_g_loss(torch.ones(3)).item() == 0.0


def test_the_adversarial_start_is_a_step_or_a_fraction_of_the_run():
    import argparse

    from runtime.flags import step_or_fraction
    assert [start_step(s, 2400) for s in (1200, 0, 0.25, 0.0)] == [1200, 0, 600, 0]
    assert step_or_fraction("1200") == 1200 and isinstance(step_or_fraction("1200"), int)
    assert step_or_fraction("0.25") == 0.25
    for bad in ("1.5", "-3", "soon"):
        with pytest.raises(argparse.ArgumentTypeError):
            step_or_fraction(bad)


def test_a_resumed_discriminator_takes_the_learning_rate_given_now_not_the_one_its_optimizer_saved():
    """--adversarial-lr and --lr are CHANGEABLE on resume: the optimizer's saved state must not bring the old rate
    back."""
    import contextlib
    from dataclasses import replace

    import driver
    from losses.adversarial import Adversary, AdversaryConfig
    from losses.stage1 import Stage1LossConfig
    from runtime.process import Runtime
    rt = Runtime(torch.device("cpu"), contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False), False)
    config = AdversaryConfig(weight=0.01, start=0, loss="least-squares", weighting="fixed", lr=1e-3,
                             discriminator=DiscriminatorConfig(in_channels=1, channels=8, num_layers=1),
                             log_every=10, max_minutes=None)
    saved = {**Adversary(config, rt, None, max_steps=10).state(), "step": 5}
    assert saved["disc_optimizer"]["param_groups"][0]["lr"] == 1e-3
    for rates, expected in ((["--adversarial-lr", "2e-4", "--lr", "1e-3"], 2e-4), (["--lr", "5e-4"], 5e-4)):
        given = Stage1LossConfig.from_args(driver.parse(["train-vqvae", "--adversarial-weight", "0.01", *rates]))
        assert given.adversary.lr == expected                                     # --adversarial-lr, else --lr
        resumed = Adversary(replace(config, lr=given.adversary.lr), rt, saved, 10)
        assert [g["lr"] for g in resumed.optimizer.param_groups] == [expected] * len(resumed.optimizer.param_groups)


def test_a_fractional_start_under_max_minutes_is_that_fraction_of_the_minutes(monkeypatch):
    """--max-minutes ends a run by the clock (its --max-steps is then only a bound), so a fraction of the steps may
    never come: the start is the first log step after that fraction of the minutes, and is saved as a step."""
    import contextlib
    from dataclasses import replace

    import losses.adversarial as adversarial
    from runtime.process import Runtime
    clock = [1000.0]
    monkeypatch.setattr(adversarial.time, "monotonic", lambda: clock[0])
    rt = Runtime(torch.device("cpu"), contextlib.nullcontext(), torch.amp.GradScaler("cpu", enabled=False), False)
    config = adversarial.AdversaryConfig(weight=0.01, start=0.25, loss="least-squares", weighting="fixed", lr=1e-3,
                                         discriminator=DiscriminatorConfig(in_channels=1, channels=64, num_layers=3),
                                         log_every=10, max_minutes=8.0)
    adversary = adversarial.Adversary(config, rt, None, max_steps=10 ** 9)
    assert adversary.start == 250_000_000                       # a quarter of the bound: never, by the clock
    for step, minutes in ((10, 1.0), (15, 2.5), (19, 2.9), (20, 3.0)):
        clock[0] = 1000.0 + 60 * minutes
        adversary.after_step(step, taken=True)
        assert adversary.start == (21 if step == 20 else 250_000_000)  # 2 minutes passed at step 15, checked at 20
    assert adversary.state()["adversarial_start"] == 21
    # without --max-minutes the fraction is of the steps, as before
    assert adversarial.Adversary(replace(config, max_minutes=None), rt, None, max_steps=2400).start == 600


def test_the_loss_config_holds_the_resolved_flags_and_no_adversary_at_weight_0():
    import driver
    from losses.adversarial import AdversaryConfig
    from losses.stage1 import Stage1LossConfig
    tiny = Stage1LossConfig.from_args(driver.parse(["train-vqvae"]))           # the preset's: MSE, clamped, no GAN
    assert tiny == Stage1LossConfig(reconstruction_loss="mse", clamped_loss=True, laplacian_weight=0.0,
                                    frequency_weight=0.0, perceptual_weight=0.0, perceptual_network="vgg16",
                                    vgg_weights=None, adversary=None)
    given = Stage1LossConfig.from_args(driver.parse([
        "train-vqvae", "--channels", "3", "--lr", "1e-3", "--log-every", "5", "--max-minutes", "8",
        "--reconstruction-loss", "l1", "--no-clamped-loss", "--laplacian-weight", "0.5", "--frequency-weight", "0.25",
        "--perceptual-weight", "0.1", "--perceptual-network", "random", "--vgg-weights", "vgg16.pth",
        "--adversarial-weight", "0.1", "--adversarial-start", "0.25", "--adversarial-loss", "least-squares",
        "--adversarial-weighting", "fixed", "--discriminator-channels", "16", "--discriminator-layers", "1"]))
    assert given == Stage1LossConfig(
        reconstruction_loss="l1", clamped_loss=False, laplacian_weight=0.5, frequency_weight=0.25,
        perceptual_weight=0.1, perceptual_network="random", vgg_weights="vgg16.pth",
        adversary=AdversaryConfig(weight=0.1, start=0.25, loss="least-squares", weighting="fixed", lr=1e-3,
                                  discriminator=DiscriminatorConfig(in_channels=3, channels=16, num_layers=1),
                                  log_every=5, max_minutes=8.0))


def test_the_base_loss_is_mse_or_l1():
    x, recon = torch.zeros(1, 1, 2, 2), torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    assert base_loss(recon, x, "mse").item() == pytest.approx((0.25 + 0.25 + 1) / 4)
    assert base_loss(recon, x, "l1").item() == pytest.approx(2.0 / 4)
    with pytest.raises(ValueError):
        base_loss(recon, x, "huber")


def test_the_reconstruction_loss_l1_alone_is_the_mean_absolute_error_and_mse_is_still_logged():
    from dataclasses import replace

    from losses.stage1 import ReconstructionLoss, Stage1LossConfig
    config = Stage1LossConfig(reconstruction_loss="l1", clamped_loss=False, laplacian_weight=0.0, frequency_weight=0.0,
                              perceptual_weight=0.0, perceptual_network="random", vgg_weights=None, adversary=None)
    x, recon = torch.zeros(1, 1, 2, 2), torch.tensor([0.5, -0.5, 1.0, 0.0]).view(1, 1, 2, 2)
    rec, mse, adversarial = ReconstructionLoss(config, None, None, max_steps=10)(recon, x, None)
    assert rec.item() == pytest.approx(2.0 / 4) and mse.item() == pytest.approx(1.5 / 4)  # |e| mean, e^2 mean
    assert adversarial.item() == 0.0
    config = replace(config, reconstruction_loss="mse")
    assert ReconstructionLoss(config, None, None, max_steps=10)(recon, x, None)[0].item() == pytest.approx(1.5 / 4)


def textured(n=2, size=64, seed=0):
    """Ellipses filled with fine texture on black, (n, 1, size, size) in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    inside = ((xx / 0.7) ** 2 + (yy / 0.8) ** 2 < 1).float()
    return (inside * (0.3 + 0.4 * torch.rand(n, 1, size, size, generator=g)) - (1 - inside)).clamp(-1, 1)


def test_the_random_perceptual_term_is_zero_for_the_image_and_dislikes_blur_more_than_a_brightness_shift():
    loss = perceptual_loss(None, "random")
    assert isinstance(loss, VGGPerceptualLoss) and all(not p.requires_grad for p in loss.parameters())
    again = VGGPerceptualLoss(None)                                            # the same fixed draw every time
    assert torch.equal(loss.features[0].weight, again.features[0].weight)
    x = textured()
    blurred = F.avg_pool2d(x, 3, 1, 1)
    shifted = (x + 0.1).clamp(-1, 1)
    assert loss(x, x.clone()).item() == 0.0
    assert loss(blurred, x).item() > 2 * loss(shifted, x).item()
    # the same holds for the pixel losses only the other way round: MSE finds the shift as bad as the blur
    assert F.mse_loss(shifted, x) > 0.3 * F.mse_loss(blurred, x)
    recon = blurred.clone().requires_grad_(True)
    loss(recon, x).backward()
    assert recon.grad.abs().sum() > 0


def test_the_perceptual_distance_compares_unit_feature_vectors_so_no_pair_is_more_than_2_per_tap_apart():
    """LPIPS' form (Zhang et al. 2018, eq. 1): each tap's features are unit vectors over channels. After a ReLU they
    are non-negative, so two of them are at most sqrt(2) apart: at most 2 per tap and position, 10 for the 5 taps,
    whatever the images' contrast. Raw features grow with it (white against black: about 50)."""
    loss = perceptual_loss(None, "random")
    white, black = torch.ones(1, 1, 32, 32), -torch.ones(1, 1, 32, 32)
    x = textured(2, 32)
    for a, b in ((white, black), (x, -x), (x, torch.rand_like(x) * 2 - 1), (3 * x, -3 * x)):
        assert 0 < loss(a, b).item() <= 2 * len(VGGPerceptualLoss.LAYERS)


def test_the_focal_frequency_loss_weights_the_hardest_frequency_most():
    x = textured(1, 16)
    yy, xx = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    checkerboard = ((yy + xx) % 2 * 2 - 1).float()                             # all at the Nyquist frequency
    a, b = 0.5, 0.25
    recon = x + a * checkerboard + b                                          # errors a (Nyquist) and b (DC)
    # orthonormal FFT: the two errors are a sqrt(N) and b sqrt(N); their squared distances a^2 N and b^2 N, weighted
    # 1 and b / a (each distance's root over the largest): mean over the N frequencies a^2 + b^3 / a
    assert focal_frequency_loss(recon, x).item() == pytest.approx(a ** 2 + b ** 3 / a, rel=1e-5)
    assert focal_frequency_loss(x, x.clone()).item() == 0.0
    # alpha = 0: every frequency weighted 1, the plain squared spectrum distance = the MSE (Parseval)
    assert focal_frequency_loss(recon, x, alpha=0).item() == pytest.approx(F.mse_loss(recon, x).item(), rel=1e-5)
    assert focal_frequency_loss(textured(1, 16, seed=1), x).item() > 0
    # a gradient that favours the hardest frequency: the Nyquist error gets 1 / (b / a) = 2x the push per unit error
    recon = recon.clone().requires_grad_(True)
    focal_frequency_loss(recon, x).backward()
    nyquist = (recon.grad * checkerboard).sum() / a
    dc = recon.grad.sum() / b
    assert nyquist.item() == pytest.approx(2 * dc.item(), rel=1e-4)


# ----------------------------------------------------------------------------- the recipe in train-vqvae

def test_a_fixed_weight_adversarial_term_changes_nothing_before_its_start_and_resumes_with_every_new_setting(
        adni_folder, tmp_path):
    from conftest import SMALL_VQ, ckpt, error_of

    import driver

    def stage1(run, *extra):
        driver.main(["train-vqvae", "--run", str(run), "--data", str(adni_folder), "--preset", "tiny", *SMALL_VQ,
                     "--deterministic", "--reconstruction-loss", "l1", "--frequency-weight", "0.1", *extra])

    recipe = ["--adversarial-weight", "0.05", "--adversarial-weighting", "fixed", "--adversarial-loss", "least-squares",
              "--adversarial-start", "0.5", "--perceptual-network", "random", "--perceptual-weight", "0.1",
              "--discriminator-channels", "8", "--discriminator-layers", "2"]
    plain = ["--perceptual-network", "random", "--perceptual-weight", "0.1"]
    stage1(tmp_path / "plain", "--max-steps", "4", *plain)
    stage1(tmp_path / "gan", "--max-steps", "4", *recipe)

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # its start: 0.5 of the 4-step run, step 2. Before it every update is the base loss's (the checkpoint of step 2,
    # kept as vqvae.prev.pt), from it on the term counts
    assert same(ckpt(tmp_path / "plain" / "vqvae.prev.pt")["model"], ckpt(tmp_path / "gan" / "vqvae.prev.pt")["model"])
    gan_ckpt = ckpt(tmp_path / "gan" / "vqvae.pt")
    assert not same(ckpt(tmp_path / "plain" / "vqvae.pt")["model"], gan_ckpt["model"])
    assert gan_ckpt["adversarial_start"] == 2 and "discriminator" not in ckpt(tmp_path / "plain" / "vqvae.pt")
    assert gan_ckpt["disc_config"]["channels"] == 8 and gan_ckpt["discriminator"]["net.0.weight"].shape[0] == 8
    assert gan_ckpt["disc_config"]["num_layers"] == 2 and gan_ckpt["discriminator"]["net.9.weight"].shape[0] == 1
    # resumed longer without the flags, the run is the run it saved: every new setting comes back, the start step too
    stage1(tmp_path / "gan", "--max-steps", "8", "--resume")
    resumed = ckpt(tmp_path / "gan" / "vqvae.pt")
    assert resumed["step"] == 8 and resumed["adversarial_start"] == 2
    assert {k: resumed["args"][k] for k in ("reconstruction_loss", "frequency_weight", "adversarial_weighting",
                                            "adversarial_loss", "adversarial_start", "perceptual_network")} == {
        "reconstruction_loss": "l1", "frequency_weight": 0.1, "adversarial_weighting": "fixed",
        "adversarial_loss": "least-squares", "adversarial_start": 0.5, "perceptual_network": "random"}
    for flag, value in (("--reconstruction-loss", "mse"), ("--adversarial-weighting", "adaptive"),
                        ("--perceptual-network", "vgg16"), ("--adversarial-start", "0.25"),
                        ("--discriminator-channels", "64"), ("--discriminator-layers", "3")):
        message = error_of(driver.main, ["train-vqvae", "--run", str(tmp_path / "gan"), "--resume", "--max-steps", "5",
                                         flag, value])
        assert flag in message and "differs from this run's" in message
    # a run from before --discriminator-channels trained with 64, and is refused another width on resume
    from runtime.checkpoint import atomic_save
    saved = ckpt(tmp_path / "gan" / "vqvae.pt")                    # its flags, as such a run saved them
    saved["args"].pop("discriminator_channels")
    atomic_save(saved, tmp_path / "gan" / "vqvae.pt")
    message = error_of(driver.main, ["train-vqvae", "--run", str(tmp_path / "gan"), "--resume", "--max-steps", "9",
                                     "--discriminator-channels", "8"])
    assert "--discriminator-channels 8 differs from this run's 64" in message
    # and one from before --discriminator-layers with 3, the only depth there was
    saved["args"].pop("discriminator_layers")
    atomic_save(saved, tmp_path / "gan" / "vqvae.pt")
    message = error_of(driver.main, ["train-vqvae", "--run", str(tmp_path / "gan"), "--resume", "--max-steps", "9",
                                     "--discriminator-channels", "64", "--discriminator-layers", "2"])
    assert "--discriminator-layers 2 differs from this run's 3" in message
