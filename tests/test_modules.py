"""The networks: the VQ-VAE and its quantiser and posterior, the UNet and its condition embedding, the EMA, checked
against closed forms, torch's own implementations and checkpoints of earlier versions (the diffusion math:
test_diffusion.py)."""
import dataclasses
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from torch.distributions import Normal, kl_divergence
from torch.optim.swa_utils import AveragedModel

from modules import EMA, VQVAE, ConditionEmbedding, GaussianPosterior, UNet, UNetConfig, VectorQuantizer, VQVAEConfig

TINY_VQ = VQVAEConfig(image_size=64, channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, codebook_size=512)
FULL_VQ = VQVAEConfig()
TINY_UNET = UNetConfig(latent_size=16, channels=32, channel_mult=(1, 2, 2, 2), num_res_blocks=1)
FULL_UNET = UNetConfig()


# ----------------------------------------------------------------------------- VQ-VAE

@pytest.mark.parametrize("cfg, latent", [(TINY_VQ, (4, 16, 16)), (FULL_VQ, (4, 32, 32))])
def test_vqvae_shapes(cfg, latent):
    model = VQVAE(cfg).eval()
    x = torch.rand(2, 1, cfg.image_size, cfg.image_size) * 2 - 1
    with torch.no_grad():
        z = model.encode(x)
        z_q, loss, idx, stats = model.quantize(z)
        out = model.decode(z)
    assert z.shape == (2, *latent) and cfg.latent_shape == latent
    assert z_q.shape == z.shape and idx.shape == (2, *latent[1:])
    assert out.shape == x.shape
    assert loss.ndim == 0 and 1 <= stats["perplexity"] <= cfg.codebook_size
    # decode quantises z first, or with quantise=False hands it to the decoder as it is
    with torch.no_grad():
        assert torch.equal(out, model.decoder(z_q)) and torch.equal(model.decode(z, quantise=False), model.decoder(z))
        assert not torch.allclose(model.decode(z, quantise=False), out)


def test_quantizer_returns_nearest_code():
    vq = VectorQuantizer(64, 4).eval()
    vq.codebook.data = torch.randn(64, 4)
    z = torch.randn(3, 4, 5, 5)
    z_q, _, idx, _ = vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    brute = torch.stack([((vq.codebook - v) ** 2).sum(1).argmin() for v in flat])
    assert torch.equal(idx.flatten(), brute)
    assert torch.allclose(z_q.permute(0, 2, 3, 1).reshape(-1, 4), vq.codebook[brute], atol=1e-6)


def todays_quantizer_stats(vq, z):
    """The quantiser's formulas before the sync-free rewrite (brute-force distances, bincount): codes, loss, stats."""
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).float()
    book = vq.codebook.float()
    idx = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ book.t() + book.pow(2).sum(1)[None]).argmin(1)
    z_q = vq.codebook[idx].view(z.shape[0], *z.shape[2:], z.shape[1]).permute(0, 3, 1, 2)
    loss = F.mse_loss(z_q, z) + vq.beta * F.mse_loss(z, z_q)
    counts = torch.bincount(idx, minlength=vq.num_codes).float()
    probs = counts / counts.sum()
    return idx, loss, counts, torch.exp(-(probs * torch.log(probs + 1e-10)).sum()), (counts > 0).float().mean()


@pytest.mark.parametrize("chunk_bytes", [VectorQuantizer.chunk_bytes, 4 * 512 * 7])  # one chunk; 7-row chunks
def test_quantizer_matches_todays_codes_losses_and_stats(chunk_bytes):
    torch.manual_seed(0)
    vq = VectorQuantizer(512, 4, usage_decay=0.5)
    vq.chunk_bytes = chunk_bytes
    vq.codebook.data = torch.randn(512, 4)
    z = torch.randn(3, 4, 9, 7)                         # 189 rows: 27 chunks of 7 in the second case
    idx, loss, counts, perplexity, usage = todays_quantizer_stats(vq, z)
    vq.usage.fill_(1.0)                                # nothing dead: the codebook stays as it is
    z_q, vq_loss, vq_idx, stats = vq(z)
    assert torch.equal(vq_idx.flatten(), idx)
    assert torch.allclose(vq_loss, loss, rtol=1e-6)
    assert torch.allclose(z_q, vq.codebook[idx].view(3, 9, 7, 4).permute(0, 3, 1, 2), atol=1e-6)
    assert torch.allclose(stats["perplexity"], perplexity, rtol=1e-6) and torch.equal(stats["usage"], usage)
    assert torch.allclose(vq.usage, 0.5 + 0.5 * counts)  # the usage EMA took today's counts


@pytest.mark.parametrize("chunk_bytes", [VectorQuantizer.chunk_bytes, 4 * 300 * 5, 4 * 300 * 1000])
def test_chunked_nearest_code_is_the_brute_force_argmin(chunk_bytes):
    torch.manual_seed(1)
    vq = VectorQuantizer(300, 4)
    vq.chunk_bytes = chunk_bytes
    vq.codebook.data = torch.randn(300, 4)
    flat = torch.randn(1001, 4)                        # chunks of 5 rows leave a remainder of 1
    brute = ((flat.double()[:, None] - vq.codebook.double()[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(vq.nearest(flat), brute)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # still float32 distances under autocast
        assert torch.equal(vq.nearest(flat), brute)


def test_quantizer_losses_are_codebook_plus_quarter_commitment():
    vq = VectorQuantizer(16, 4, beta=0.25).eval()
    vq.codebook.data = torch.randn(16, 4)
    z = torch.randn(2, 4, 3, 3)
    z_q, loss, _, _ = vq(z)
    mse = F.mse_loss(z_q, z)
    assert torch.allclose(loss, 1.25 * mse, rtol=1e-5)


def test_straight_through_gradient_reaches_encoder():
    model = VQVAE(TINY_VQ)
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    recon, vq_loss, _ = model(x)
    F.mse_loss(recon, x).backward()  # reconstruction loss alone: only the straight-through path links it to the encoder
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_dead_codes_are_restarted_from_encoder_outputs():
    vq = VectorQuantizer(32, 4, usage_decay=0.5, dead_threshold=0.1)
    vq.codebook.data = torch.full((32, 4), 100.0)      # far from the data: never chosen
    vq.codebook.data[0] = 0.0
    vq.usage.fill_(1.0)
    z = torch.randn(4, 4, 8, 8)
    for _ in range(5):
        vq(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    restarted = vq.codebook.data[1:]
    assert restarted.abs().max() < 10                  # moved to where the encoder outputs are
    assert torch.cdist(restarted, flat).min(1).values.max() < 0.01


def test_tiny_vqvae_overfits_a_handful_of_images():
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_size=32, channels=16, channel_mult=(1, 2), num_res_blocks=1, codebook_size=64)
    model = VQVAE(cfg)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    x = torch.stack([((xx / r) ** 2 + (yy / (r * 0.8)) ** 2 < 1).float() * 1.6 - 0.8 for r in (0.4, 0.6, 0.8, 0.9)])[:, None]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        recon, vq_loss, _ = model(x)
        loss = F.mse_loss(recon, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(F.mse_loss(recon, x).item())
    assert losses[-1] < losses[0] / 10


# ----------------------------------------------------------------------------- the KL-regularised latent

def test_the_posteriors_kl_term_is_the_closed_form_in_ldms_units():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    posterior = GaussianPosterior(weight=1e-3, pixels=100).eval()
    z, loss, stats = posterior(torch.cat([mean, logvar], 1))
    per_element = kl_divergence(Normal(mean, (0.5 * logvar).exp()), Normal(0.0, 1.0))  # torch's, not ours
    assert torch.equal(z, mean)                                          # eval: the mean, nothing drawn
    assert torch.allclose(loss, 1e-3 * per_element.sum() / 3 / 100, rtol=1e-5)  # summed per image, over its pixels
    assert torch.allclose(stats["kl_per_element"], per_element.mean(), rtol=1e-5)
    assert torch.allclose(stats["sigma"], (0.5 * logvar).exp().mean())
    assert posterior(torch.zeros(2, 8, 3, 3))[1] == 0                   # the prior itself costs nothing


def test_the_posterior_samples_its_gaussian_and_passes_gradients_to_mean_and_variance():
    torch.manual_seed(0)
    moments = torch.cat([torch.full((1, 1, 200, 200), 1.5), torch.full((1, 1, 200, 200), math.log(0.25))], 1)
    moments.requires_grad_(True)
    z, _, _ = GaussianPosterior(weight=0.0, pixels=1).train()(moments)
    assert abs(z.mean().item() - 1.5) < 0.01 and abs(z.std().item() - 0.5) < 0.01
    (z ** 2).sum().backward()                                           # the reparameterisation: both halves learn
    assert moments.grad[:, 0].abs().sum() > 0 and moments.grad[:, 1].abs().sum() > 0


def test_a_kl_vqvae_encodes_the_posterior_mean_and_decodes_without_a_codebook():
    torch.manual_seed(0)
    model = VQVAE(dataclasses.replace(TINY_VQ, regularisation="kl")).eval()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        moments, z = model.encoder(x), model.encode(x)
        assert moments.shape == (2, 8, 16, 16) and torch.equal(z, moments[:, :4])
        assert torch.equal(model.decode(z), model.decoder(z))
        assert torch.equal(model.decode(z, quantise=False), model.decoder(z))
        assert torch.equal(model(x)[0], model.decoder(z))               # eval: the mean is decoded
        model.train()
        assert not torch.equal(model(x)[0], model(x)[0])                # training: a sample each time
    assert not any("codebook" in name for name in model.state_dict())
    before_the_flag = {k: v for k, v in dataclasses.asdict(TINY_VQ).items() if k not in ("regularisation", "kl_weight")}
    assert VQVAE(TINY_VQ).cfg.regularisation == "vq" and VQVAEConfig(**before_the_flag).regularisation == "vq"
    with pytest.raises(ValueError, match="'vq' or 'kl'"):
        VQVAE(dataclasses.replace(TINY_VQ, regularisation="fsq"))


# ----------------------------------------------------------------------------- UNet

@pytest.mark.parametrize("cfg", [TINY_UNET, FULL_UNET, dataclasses.replace(TINY_UNET, channels=33),  # an odd width
                                 dataclasses.replace(TINY_UNET, channels=50)])   # attention at 100: not 3 heads
def test_unet_shape_and_time_dependence(cfg):
    torch.manual_seed(0)
    model = UNet(cfg).eval()
    nn.init.normal_(model.out[-1].weight, std=0.02)    # the output layer starts at zero; wake it up
    x = torch.randn(2, 4, cfg.latent_size, cfg.latent_size)
    with torch.no_grad():
        a = model(x, torch.tensor([0, 0]))
        b = model(x, torch.tensor([500, 500]))
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-4


def test_networks_use_groupnorm_not_batchnorm():
    for model in (VQVAE(TINY_VQ), UNet(TINY_UNET)):
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert any(isinstance(m, nn.GroupNorm) for m in model.modules())


def test_unet_attends_at_the_two_lowest_resolutions_and_bottleneck():
    from modules import Attention
    model = UNet(TINY_UNET)
    x = torch.randn(1, 4, 16, 16)
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for m in model.modules() if isinstance(m, Attention)]
    model(x, torch.tensor([3]))
    for h in hooks:
        h.remove()
    assert set(sizes) == {4, 2}  # levels 2 and 3 of 16 -> 8 -> 4 -> 2 (bottleneck at 2)


def test_the_embedding_reaches_res_blocks_of_32_channels_or_fewer():
    """GroupNorm(32) over 32 channels normalises each channel alone, so it cancels an added per-channel shift:
    the older additive embedding had no effect at all there (the `tiny` UNet's first level). Scale-shift has."""
    from modules import ResBlock
    torch.manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 64)
    for scale_shift, changes in ((True, True), (False, False)):
        block = ResBlock(32, 32, emb_dim=64, scale_shift=scale_shift).eval()
        with torch.no_grad():
            moved = (block(x, emb) - block(x, emb.flip(0))).abs().max()
        assert (moved > 1e-2) == changes, (scale_shift, moved)


def test_checkpoints_from_before_scale_shift_load_as_they_were_trained():
    old = UNetConfig(latent_size=8, channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1, scale_shift_norm=False)
    saved = {k: v for k, v in old.__dict__.items() if k != "scale_shift_norm"}   # as such checkpoints hold it
    state = UNet(old).state_dict()
    UNet(UNetConfig.from_saved(saved)).load_state_dict(state)
    with pytest.raises(RuntimeError, match="size mismatch"):
        UNet(UNetConfig(**saved)).load_state_dict(state)    # why from_saved exists


def test_the_unet_head_sees_each_channels_spatial_mean():
    """A GroupNorm group of one channel removes that channel's spatial mean, so a 32-channel head normalising each
    channel alone returned the same prediction for features that differ by a per-channel constant: the `tiny` UNet
    could not learn a latent's per-image mean (bench/README). Groups of 4 channels keep the differences."""
    torch.manual_seed(0)
    h, offset = torch.randn(2, 32, 8, 8), torch.zeros(1, 32, 1, 1)
    offset[0, 5] = 1.0
    for width, sees in ((4, True), (1, False)):
        head = UNet(UNetConfig(**{**TINY_UNET.__dict__, "min_group_width": width})).out.eval()
        nn.init.normal_(head[-1].weight)   # the head starts as the zero predictor
        with torch.no_grad():
            moved = (head(h + offset) - head(h)).mean((2, 3)).abs().max()
        assert (moved > 1e-2) == sees, (width, moved)


def test_min_group_width_leaves_unets_of_128_channels_or_more_as_they_were():
    """ADM's layout (the `full` preset) has groups of 4 channels or more already: its checkpoints are unchanged."""
    def groups(cfg):
        return [(m.num_groups, m.num_channels // m.num_groups) for m in UNet(cfg).modules() if isinstance(m, nn.GroupNorm)]
    assert groups(FULL_UNET) == groups(UNetConfig(min_group_width=1))
    assert min(width for _, width in groups(TINY_UNET)) == 4
    assert min(width for _, width in groups(UNetConfig(**{**TINY_UNET.__dict__, "min_group_width": 1}))) == 1


def test_a_vqvae_keeps_its_groups_unless_asked_for_wider_ones():
    """VQ-VAEs keep one-channel groups by default (every checkpoint so far); --vq-min-group-width widens them."""
    def widths(cfg):
        return {m.num_channels // m.num_groups for m in VQVAE(cfg).modules() if isinstance(m, nn.GroupNorm)}
    assert widths(TINY_VQ) == {1, 2} and widths(VQVAEConfig(**{**TINY_VQ.__dict__, "min_group_width": 4})) == {4}
    head = VQVAE(VQVAEConfig(**{**TINY_VQ.__dict__, "min_group_width": 4})).decoder.net[-3:].eval()
    torch.manual_seed(0)
    h, offset = torch.randn(2, 16, 8, 8), torch.zeros(1, 16, 1, 1)
    offset[0, 5] = 1.0
    with torch.no_grad():
        assert (head(h + offset) - head(h)).mean((2, 3)).abs().max() > 1e-2


def test_checkpoints_from_before_min_group_width_compute_as_they_were_trained():
    old = UNetConfig(**{**TINY_UNET.__dict__, "latent_size": 8, "min_group_width": 1})
    saved = {k: v for k, v in old.__dict__.items() if k != "min_group_width"}   # as such checkpoints hold it
    torch.manual_seed(0)
    trained = UNet(old).eval()
    nn.init.normal_(trained.out[-1].weight, std=0.1)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    for cfg, same in ((UNetConfig.from_saved(saved), True), (UNetConfig(**saved), False)):
        loaded = UNet(cfg).eval()
        loaded.load_state_dict(trained.state_dict())   # the same shapes either way: only from_saved computes the same
        with torch.no_grad():
            assert torch.allclose(loaded(x, t), trained(x, t), atol=1e-6) == same


def test_ema_warms_up_then_tracks_weights_with_the_given_decay():
    model = nn.Linear(2, 2)
    ema = EMA(model, decay=0.9)
    ema.update(model)                                  # first update copies
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)                                  # n = 1: decay min(0.9, 2 / 11)
    assert torch.allclose(ema.module.weight, model.weight - 2 / 11, atol=1e-6)
    for _ in range(100):                               # warm-up over: (1 + n) / (10 + n) > 0.9
        ema.update(model)
    before = ema.module.weight.clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * model.weight, atol=1e-6)
    assert ema.updates == 103 and not ema.module.training and not ema.module.weight.requires_grad


def averaged_model_ema(model, decay):
    """The EMA before the `EMA` class: torch's AveragedModel with the warm-up on a device-side count."""
    def ema_update(ema_params, params, num_averaged):
        weight = 1 - torch.clamp((1 + num_averaged) / (10 + num_averaged), max=decay)
        for e, p in zip(ema_params, params):
            e.lerp_(p, weight.to(e.dtype))
    return AveragedModel(model, multi_avg_fn=ema_update, use_buffers=True)


# "late": the model goes channels_last after the EMA copy is made (mixed layouts: the unfused path)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "late"])
def test_ema_equals_the_averaged_model_it_replaces(layout):
    torch.manual_seed(0)
    model = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,)))
    if layout == "channels_last":
        model.to(memory_format=torch.channels_last)
    ema, reference = EMA(model, decay=0.99), averaged_model_ema(model, decay=0.99)
    if layout == "late":
        model.to(memory_format=torch.channels_last)
    for _ in range(15):                                # through the warm-up and past the first copy
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update(model)
        reference.update_parameters(model)
    assert ema.updates == int(reference.n_averaged) == 15
    assert list(ema.module.state_dict()) == list(reference.module.state_dict())  # the checkpoint's "ema" keys
    for (name, a), b in zip(ema.module.state_dict().items(), reference.module.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name
    restored = EMA(model, decay=0.99)                  # a checkpoint's "ema" and "ema_updates" load back
    restored.module.load_state_dict(ema.module.state_dict())
    restored.updates = ema.updates
    ema.update(model)
    restored.update(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.parameters(), restored.module.parameters()))


SMALL_UNET = dict(latent_size=8, channels=32, channel_mult=(1, 1, 1, 1), num_res_blocks=1)


def test_a_condition_not_given_adds_nothing_at_initialisation():
    """The unconditioned path of a conditional UNet at initialisation is the UNet without conditions (same weights
    elsewhere): every null starts at zero, so neither training's dropped conditions nor sampling's open ones start
    from a random offset."""
    torch.manual_seed(0)
    conditional = UNet(UNetConfig(**SMALL_UNET, conditions=(2, 0, 3))).eval()
    plain = UNet(UNetConfig(**SMALL_UNET)).eval()
    plain.load_state_dict({k: v for k, v in conditional.state_dict().items() if not k.startswith("cond_emb.")})
    nn.init.normal_(conditional.out[-1].weight, std=0.1)
    nn.init.normal_(plain.out[-1].weight, std=0.1)
    plain.out[-1].weight.data.copy_(conditional.out[-1].weight)
    x, t = torch.randn(4, 4, 8, 8), torch.tensor([3, 200, 600, 999])
    nothing = torch.full((4, 3), float("nan"))
    with torch.no_grad():
        assert torch.equal(conditional(x, t, nothing), plain(x, t)) and torch.equal(conditional(x, t), plain(x, t))
        given = conditional(x, t, torch.tensor([[0, float("nan"), float("nan")]] * 4))
        assert (given - plain(x, t)).abs().max() > 1e-3                     # a category given does count


def test_each_condition_adds_its_own_term_whatever_the_others():
    """emb(y) is a sum of one term per column: switching one condition changes the embedding by the same amount
    whatever the others are, given or not (so guidance works for any subset of them)."""
    torch.manual_seed(0)
    embed = ConditionEmbedding((2, 0, 3), 16)
    for p in embed.parameters():
        nn.init.normal_(p)   # trained weights, nulls included
    nan = float("nan")
    a, b = torch.tensor([[1.0, 0.7, 2.0]]), torch.tensor([[nan, 0.7, 2.0]])
    c, d = torch.tensor([[1.0, nan, nan]]), torch.tensor([[nan, nan, nan]])
    assert torch.allclose(embed(a) - embed(b), embed(c) - embed(d), atol=1e-5)
    assert (embed(a) - embed(b)).abs().max() > 0.1
    near, far = embed(torch.tensor([[nan, 0.50, nan]])), embed(torch.tensor([[nan, 0.52, nan]]))
    assert 0 < (near - far).abs().max() < (near - embed(torch.tensor([[nan, 0.9, nan]]))).abs().max()
    assert torch.allclose(embed(torch.tensor([[7.0, nan, -1.0]])), embed(d))  # out of range: not given


def test_a_class_conditional_unet_written_before_conditions_existed_loads_as_one_condition():
    torch.manual_seed(0)
    new = UNet(UNetConfig(**SMALL_UNET, conditions=(2,), min_group_width=1)).eval()   # groups as they were then
    nn.init.normal_(new.out[-1].weight, std=0.1)
    old_state = {("class_emb.weight" if k == "cond_emb.embed.0.weight" else k): v for k, v in new.state_dict().items()}
    old_config = {**SMALL_UNET, "num_classes": 2, "scale_shift_norm": True}   # as such a checkpoint holds it
    loaded = UNet(UNetConfig.from_saved(old_config)).eval()
    loaded.load_state_dict(old_state)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 0])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), new(x, t, y)) and torch.equal(loaded(x, t), new(x, t))
    assert UNetConfig.from_saved({**SMALL_UNET}).conditions == ()


def test_compiled_blocks_give_the_same_output():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_size=8, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,))).eval()
    nn.init.normal_(unet.out[-1].weight, std=0.05)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    names = list(unet.state_dict())
    with torch.no_grad():
        eager = unet(x, t)
        unet.compile_blocks(backend="aot_eager")       # the tracing and graphs, without a C++ compiler on CI
        try:
            compiled = unet(x, t)
        except Exception as error:                     # noqa: BLE001 - whatever stops torch.compile on this machine
            pytest.skip(f"torch.compile cannot run here: {error}")
    assert torch.allclose(compiled, eager, atol=1e-5)
    assert all(block._compiled_call_impl is not None for block in [*unet.down, unet.mid, *unet.up])
    assert list(unet.state_dict()) == names            # compiled in place: checkpoints keep their keys


def test_every_block_of_the_full_unet_is_compiled(monkeypatch):
    """The full preset's layout (24 blocks, 18 shapes; narrow, to be quick): no block falls back to eager because
    dynamo's limit of compiled versions per function was reached (the blocks share one forward)."""
    monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)  # torch's default, whatever ran before
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)
    torch.manual_seed(0)
    unet = UNet(UNetConfig(latent_size=16, channels=8, channel_mult=(1, 2, 2, 4), num_res_blocks=2)).eval()
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([700])
    with torch.no_grad():
        eager = unet(x, t)
        compiled = unet.compile_blocks(backend="eager")(x, t)   # dynamo's tracing alone: the limit is dynamo's
    assert torch.allclose(compiled, eager, atol=1e-6)
