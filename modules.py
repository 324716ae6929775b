"""Networks and diffusion math: VQ-VAE, time-conditioned UNet and its condition embedding, GaussianDiffusion (and DDIM
inversion), guidance, EMA. Stage 1's losses and its discriminator are in losses/.

Nothing here touches files or the command line; `train.py` and `predict.py` use these pieces.
Shapes in comments are (B, C, H, W). Run the tests with `python -m pytest tests/test_modules.py`.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------- building blocks

def group_norm(channels: int, min_width: int = 1) -> nn.GroupNorm:
    """GroupNorm with 32 groups where the width allows (BatchNorm broke the original at batch 1), each of at least
    `min_width` channels. A group of one channel removes that channel's spatial mean: the UNet's narrow levels take
    groups of 4 (`UNetConfig.min_group_width`), as ADM's 128 channels in 32 groups have."""
    groups = math.gcd(min(32, max(1, channels // min_width)), channels)
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with a residual path, conditioned on an embedding if given.

    scale_shift: the embedding scales and shifts the second normalised activation, norm(h) * (1 + s) + b
    (Dhariwal & Nichol 2021). Otherwise it is added to h before that norm, which GroupNorm cancels exactly
    when a group is one channel (32 channels or fewer): the older form, kept for older checkpoints.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int = 0, dropout: float = 0.0, scale_shift: bool = True,
                 min_group_width: int = 1):
        super().__init__()
        self.norm1 = group_norm(in_ch, min_group_width)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.scale_shift = scale_shift
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch) if emb_dim else None
        self.norm2 = group_norm(out_ch, min_group_width)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if self.emb is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + self.emb(F.silu(emb))[:, :, None, None])
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions, residual."""

    def __init__(self, channels: int, head_dim: int = 32, min_group_width: int = 1):
        super().__init__()
        self.heads = max(1, channels // head_dim)
        self.norm = group_norm(channels, min_group_width)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x, emb=None):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)                           # (B, HW, C)
        # the 1x1 convolutions as matmuls over the positions: the same weights, a faster kernel on CPUs
        qkv = F.linear(h, self.qkv.weight.flatten(1), self.qkv.bias)
        q, k, v = qkv.view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, HW, d)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, H * W, C)
        h = F.linear(h, self.proj.weight.flatten(1), self.proj.bias)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 convolution: halves H and W (learned, unlike the original's max-pool)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# ----------------------------------------------------------------------------- VQ-VAE

@dataclass
class VQVAEConfig:
    in_channels: int = 1            # 1 grayscale, 3 RGB
    image_size: int = 256
    channels: int = 64              # width of the first level
    channel_mult: tuple = (1, 2, 2, 4)  # one level each; len - 1 downsamplings (4 levels: factor 8)
    num_res_blocks: int = 2
    latent_channels: int = 4
    codebook_size: int = 4096
    beta: float = 0.25              # commitment weight (van den Oord et al. 2017); the original used 1
    min_group_width: int = 1        # channels per GroupNorm group at least (group_norm): 1, groups as they were
    regularisation: str = "vq"      # the latent's: "vq" the codebook (the card), "kl" a Gaussian posterior (KL-f8)
    kl_weight: float = 1e-6         # of the KL term, in LDM's units (GaussianPosterior); "kl" only

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def latent_shape(self) -> tuple:
        s = self.image_size // self.factor
        return (self.latent_channels, s, s)


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (van den Oord et al. 2017).

    Loss = ||sg[z] - e||^2 (codebook) + beta * ||z - sg[e]||^2 (commitment). Reported per batch:
    perplexity exp(H(code frequencies)) and usage, the fraction of codes chosen at least once.
    Dead codes are restarted from random encoder outputs of the current batch (as in Jukebox,
    Dhariwal et al. 2020) rather than replacing the codebook loss by an EMA codebook: the card asks
    for the codebook loss, and a restart fixes exactly what goes wrong with it at small budgets,
    codes that are never chosen and so never receive a gradient. Usage is tracked as an exponential
    moving average of per-code counts, all-reduced under DDP so every rank restarts the same codes.
    """

    chunk_bytes = 32 * 2 ** 20  # the most memory `nearest` gives one block of distances (rows x K, float32)
    stat_names = ("perplexity", "usage")

    def __init__(self, num_codes: int, dim: int, beta: float = 0.25,
                 usage_decay: float = 0.95, dead_threshold: float = 1e-2):
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.usage_decay, self.dead_threshold = usage_decay, dead_threshold
        self.codebook = nn.Parameter(torch.empty(num_codes, dim).uniform_(-1 / num_codes, 1 / num_codes))
        # EMA of how often each code is chosen per batch; zero at first, so the first training batch
        # restarts every code from encoder outputs (a data-dependent initialisation)
        self.register_buffer("usage", torch.zeros(num_codes))

    @torch.no_grad()
    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of flat (N, dim), in float32 whatever the autocast.

        argmin_k ||z - e_k||^2 = argmin_k ||e_k||^2 - 2 z.e_k (||z||^2 is the same for every code; left out,
        its float32 round-off no longer blurs near-ties), over chunks of rows: one (N, K) matrix of distances
        would be 268 MB per batch at 256x256 with K = 4096; a chunk stays under `chunk_bytes`.
        """
        with torch.autocast(flat.device.type, enabled=False):  # autocast would run the matmul in bf16
            flat, book = flat.float(), self.codebook.float()
            book_sq = book.pow(2).sum(1)[None]                                   # (1, K)
            rows = max(1, self.chunk_bytes // (4 * self.num_codes))
            return torch.cat([torch.addmm(book_sq, chunk, book.t(), alpha=-2).argmin(1) for chunk in flat.split(rows)])

    def forward(self, z: torch.Tensor):
        """z (B, D, h, w) -> (z_q with straight-through gradient, vq loss, indices (B, h, w), stats)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        idx = self.nearest(flat)
        z_q = self.codebook[idx].view(B, h, w, D).permute(0, 3, 1, 2).to(z.dtype)
        codebook_loss = F.mse_loss(z_q.float(), z.detach().float())
        commitment_loss = F.mse_loss(z.float(), z_q.detach().float())
        loss = codebook_loss + self.beta * commitment_loss
        # per-code counts; bincount would read its output size back from the GPU and break torch.compile
        counts = torch.zeros(self.num_codes, device=idx.device).index_add_(0, idx, torch.ones_like(idx, dtype=torch.float))
        if self.training:
            self._track_and_restart(counts, flat.detach())
        probs = counts / counts.sum()
        stats = {
            "perplexity": torch.exp(-(probs * torch.log(probs + 1e-10)).sum()),
            "usage": (counts > 0).float().mean(),  # fraction of the codebook chosen in this batch
        }
        z_q = z + (z_q - z).detach()  # straight-through: decoder gradient flows to the encoder
        return z_q, loss, idx.view(B, h, w), stats

    @torch.no_grad()
    def _track_and_restart(self, counts: torch.Tensor, flat: torch.Tensor):
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
        self.usage.mul_(self.usage_decay).add_(counts, alpha=1 - self.usage_decay)
        dead = (self.usage < self.dead_threshold)[:, None]
        # a candidate for every code, kept only where the code is dead: no host-device sync per step
        pick = torch.randint(0, flat.shape[0], (self.num_codes,), device=flat.device)
        new = flat[pick].float() + 1e-3 * torch.randn(self.num_codes, self.dim, device=flat.device)
        if distributed:
            dist.broadcast(new, 0)
        self.codebook.data.copy_(torch.where(dead, new.to(self.codebook.dtype), self.codebook.data))
        self.usage.masked_fill_(dead[:, 0], 1.0)


class GaussianPosterior(nn.Module):
    """The KL-regularised latent of LDM's KL autoencoders (Rombach et al. 2022, KL-f8), in place of the quantiser.

    The encoder gives every latent element a mean and a log-variance. In training the decoder gets a sample
    z = mean + sigma * eps (Kingma & Welling 2014) and the loss gains weight * KL(q(z|x) || N(0, I)), summed over the
    latent and divided by the image's pixels: LDM sums its reconstruction loss over the pixels where we average it, so
    their weight (1e-6) means here what it meant there. In eval mode z is the mean, so nothing random is drawn.
    Reported per batch: the KL per latent element (nats) and the posterior's mean sigma.
    """

    stat_names = ("kl_per_element", "sigma")

    def __init__(self, weight: float, pixels: int):
        super().__init__()
        self.weight, self.pixels = weight, pixels

    def forward(self, moments: torch.Tensor):
        """moments (B, 2D, h, w) -> (z (B, D, h, w), weighted KL loss, stats)."""
        mean, logvar = moments.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        sigma = torch.exp(0.5 * logvar)
        z = mean + sigma * torch.randn_like(mean) if self.training else mean
        kl = 0.5 * (mean.square() + sigma.square() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        stats = {"kl_per_element": kl / mean[0].numel(), "sigma": sigma.mean()}
        return z.to(moments.dtype), self.weight * kl / self.pixels, stats


class Encoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = [cfg.channels * m for m in cfg.channel_mult]
        res_block = partial(ResBlock, min_group_width=cfg.min_group_width)
        layers = [nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)]
        prev = ch[0]
        for level, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                layers.append(res_block(prev, c))
                prev = c
            if level < len(ch) - 1:
                layers.append(Downsample(prev))
        moments = 2 if cfg.regularisation == "kl" else 1  # a mean and a log-variance each, or z
        layers += [res_block(prev, prev), group_norm(prev, cfg.min_group_width), nn.SiLU(),
                   nn.Conv2d(prev, moments * cfg.latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        ch = [cfg.channels * m for m in cfg.channel_mult][::-1]
        res_block = partial(ResBlock, min_group_width=cfg.min_group_width)
        layers = [nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1), res_block(ch[0], ch[0])]
        prev = ch[0]
        for level, c in enumerate(ch):
            for _ in range(cfg.num_res_blocks):
                layers.append(res_block(prev, c))
                prev = c
            if level < len(ch) - 1:
                layers.append(Upsample(prev))
        layers += [group_norm(prev, cfg.min_group_width), nn.SiLU(), nn.Conv2d(prev, cfg.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        return self.net(z)


class VQVAE(nn.Module):
    """Image (B, C, S, S) in [-1, 1] <-> latent (B, 4, S/f, S/f).

    `encode` returns the pre-quantisation z, which is what stage 2 diffuses; `decode` quantises
    first, so a latent from the sampler goes through the same codebook as during training, or, with
    quantise=False, hands z to the decoder as it is (CompVis' `force_not_quantize`). With the KL
    regularisation (`cfg.regularisation == "kl"`) there is no codebook: `encode` returns the posterior's
    mean and `decode` hands z to the decoder as it is, either way.
    """

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        if cfg.regularisation not in ("vq", "kl"):
            raise ValueError(f"regularisation must be 'vq' or 'kl', got {cfg.regularisation!r}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        if cfg.regularisation == "vq":
            self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels, cfg.beta)
        else:
            self.quantizer = None
            self.posterior = GaussianPosterior(cfg.kl_weight, cfg.in_channels * cfg.image_size ** 2)
        self.decoder = Decoder(cfg)

    @property
    def stat_names(self) -> tuple:
        """The names of the stats `forward` reports: the quantiser's or the posterior's."""
        return (self.quantizer or self.posterior).stat_names

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        return h if self.quantizer is not None else h[:, :self.cfg.latent_channels]  # a KL latent's mean

    def quantize(self, z: torch.Tensor):
        """z -> (z_q, vq loss, codes (B, h, w), stats); a KL latent has no codebook: z as it is, codes None."""
        if self.quantizer is None:
            return z, z.new_zeros(()), None, {}
        return self.quantizer(z)

    def decode(self, z: torch.Tensor, quantise: bool = True) -> torch.Tensor:
        return self.decoder(self.quantize(z)[0] if quantise else z)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's last convolution weight: G_L of the adaptive GAN weight (Esser et al. 2021, eq. 7)."""
        return self.decoder.net[-1].weight

    def forward(self, x: torch.Tensor):
        """x -> (reconstruction, the latent's loss (vq or KL), stats)."""
        if self.quantizer is None:
            z, loss, stats = self.posterior(self.encoder(x))
        else:
            z, loss, _, stats = self.quantize(self.encode(x))
        return self.decoder(z), loss, stats


# ----------------------------------------------------------------------------- UNet

@dataclass
class UNetConfig:
    in_channels: int = 4            # latent channels
    latent_size: int = 32
    channels: int = 128
    channel_mult: tuple = (1, 2, 2, 4)  # 4 down blocks and 4 up blocks
    num_res_blocks: int = 2
    attention_levels: tuple = (2, 3)   # self-attention at the two lowest resolutions
    dropout: float = 0.0
    conditions: tuple = ()          # one entry per condition: its number of categories, or 0 for a continuous one
    scale_shift_norm: bool = True   # how res blocks take the embedding (ResBlock); False in older checkpoints
    min_group_width: int = 4        # channels per GroupNorm group at least (group_norm); 1 in older checkpoints

    def __post_init__(self):
        self.conditions = tuple(self.conditions)  # a list after a JSON round trip

    @classmethod
    def from_saved(cls, config: dict) -> "UNetConfig":
        """The config of a checkpoint; one written before a field existed gets the behaviour it was trained with.
        A class-conditional UNet written before `conditions` existed (`num_classes` N) has one condition of N
        categories; its class table loads under the new name (`UNet._rename_class_table`)."""
        config = {"scale_shift_norm": False, "min_group_width": 1, **config}
        num_classes = config.pop("num_classes", 0)
        if num_classes and "conditions" not in config:
            config["conditions"] = (num_classes,)
        return cls(**config)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer steps t (B,) -> (B, dim) (Vaswani et al. 2017; Ho et al. 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FourierCovariate(nn.Module):
    """A continuous covariate c (scaled to [0, 1] by the training set's range) -> (B, emb_dim): Fourier features
    [c, sin(2^k pi c), cos(2^k pi c)], k = 0..frequencies-1 (the positional encoding of Mildenhall et al. 2020),
    then a small MLP. Its last layer starts at zero, and a missing value (NaN) gets the learned `null`, zero at
    first: at initialisation the covariate adds nothing, given or not."""

    def __init__(self, emb_dim: int, frequencies: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(frequencies), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(1 + 2 * frequencies, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)
        self.null = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        missing = c.isnan()[:, None]
        c = torch.where(missing, 0.0, c[:, None]).float()
        angles = c * self.freqs
        emb = self.mlp(torch.cat([c, angles.sin(), angles.cos()], dim=1))
        return torch.where(missing, self.null.to(emb.dtype), emb)


class ConditionEmbedding(nn.Module):
    """The conditions of a UNet -> one embedding (B, emb_dim) added to the time embedding: the sum of one term per
    condition, a table per category (its last row, index n, the "not given" null) and a FourierCovariate per
    continuous covariate. Conditions arrive as one float tensor y (B, K): a category's index or a covariate's
    scaled value, NaN where the condition is not given (dropped in training, missing in the table, or not asked
    for when sampling). Each term depends on its own column only, so any subset of conditions can be given.
    The null rows start at zero: a condition not given adds nothing at initialisation."""

    def __init__(self, conditions: tuple, emb_dim: int):
        super().__init__()
        self.sizes = tuple(conditions)
        self.embed = nn.ModuleList()
        for n in self.sizes:
            if n:
                table = nn.Embedding(n + 1, emb_dim)
                nn.init.zeros_(table.weight[n:].data)
                self.embed.append(table)
            else:
                self.embed.append(FourierCovariate(emb_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        terms = []
        for k, (n, embed) in enumerate(zip(self.sizes, self.embed)):
            column = y[:, k]
            if n:  # the index, or the null row n where the category is not given (or out of range)
                valid = (column >= 0) & (column < n)
                column = torch.where(valid, column, float(n)).long()
            terms.append(embed(column))
        return torch.stack(terms).sum(0)


def as_conditions(y: torch.Tensor | None, batch: int, count: int, device) -> torch.Tensor:
    """The conditions of a batch as the float (B, K) tensor the UNet takes (NaN: not given): None gives none, and
    a (B,) tensor of class indices (the form before several conditions existed) is the one condition."""
    if y is None:
        return torch.full((batch, count), float("nan"), device=device)
    return (y[:, None] if y.dim() == 1 else y).float()


class TimestepSequential(nn.Sequential):
    """Sequential whose layers all take (x, emb)."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb)
        return x


class UNet(nn.Module):
    """eps-predicting UNet on latents (Ho et al. 2020; layout of Dhariwal & Nichol 2021).

    4 down levels (res blocks, then strided-conv downsampling after all but the last), a bottleneck
    of res block -> self-attention -> res block, 4 up levels consuming the skips, and the timestep
    embedding (sinusoid -> MLP, plus the conditions', `ConditionEmbedding`) scaling and shifting every res block.
    Output has the input's shape.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_emb = ConditionEmbedding(cfg.conditions, emb_dim) if cfg.conditions else None
        self._register_load_state_dict_pre_hook(self._rename_class_table)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        res_block = partial(ResBlock, emb_dim=emb_dim, dropout=cfg.dropout, scale_shift=cfg.scale_shift_norm,
                            min_group_width=cfg.min_group_width)
        attention = partial(Attention, min_group_width=cfg.min_group_width)
        self.down = nn.ModuleList()
        skips, prev = [ch], ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                block = [res_block(prev, ch * mult)]
                prev = ch * mult
                if level in cfg.attention_levels:
                    block.append(attention(prev))
                self.down.append(TimestepSequential(*block))
                skips.append(prev)
            if level < len(cfg.channel_mult) - 1:
                self.down.append(TimestepSequential(Downsample(prev)))
                skips.append(prev)

        self.mid = TimestepSequential(res_block(prev, prev), attention(prev), res_block(prev, prev))

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                block = [res_block(prev + skips.pop(), ch * mult)]
                prev = ch * mult
                if level in cfg.attention_levels:
                    block.append(attention(prev))
                if level > 0 and i == cfg.num_res_blocks:
                    block.append(Upsample(prev))
                self.up.append(TimestepSequential(*block))

        self.out = nn.Sequential(group_norm(prev, cfg.min_group_width), nn.SiLU(),
                                 nn.Conv2d(prev, cfg.in_channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)  # start as the zero predictor: stable first steps
        nn.init.zeros_(self.out[-1].bias)

    def compile_blocks(self, **compile_kwargs) -> "UNet":
        """torch.compile each down, middle and up block in place (regional compilation), not the whole model.

        The blocks repeat, so the first step compiles in a fraction of the time of a whole-model compile,
        and in place the state_dict keeps its names (no `_orig_mod.` prefix). Keyword arguments go to
        `nn.Module.compile` (e.g. mode="max-autotune-no-cudagraphs"). Returns self.

        The blocks share one `forward`, and dynamo keeps at most `recompile_limit` (default 8) compiled
        versions of a function; past it, it runs the rest eagerly with only a warning. The `full` UNet has
        18 blocks of distinct shapes, each needed with and without gradients, so the limit is raised (for the
        whole process) to 4 per block: without that, 10 of its 24 blocks ran uncompiled.
        """
        blocks = [*self.down, self.mid, *self.up]
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(blocks))
        for block in blocks:
            block.compile(**compile_kwargs)
        return self

    @staticmethod
    def _rename_class_table(state_dict, prefix, *args):
        """A checkpoint written before `conditions` existed names its class table `class_emb`."""
        if prefix + "class_emb.weight" in state_dict:
            state_dict[prefix + "cond_emb.embed.0.weight"] = state_dict.pop(prefix + "class_emb.weight")

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C, h, w), t (B,) integer steps, y (B, K) conditions (NaN: not given; see ConditionEmbedding), or
        (B,) class indices, or None for none -> (B, C, h, w)."""
        emb = self.time_mlp(timestep_embedding(t, self.cfg.channels))
        if self.cond_emb is not None:
            emb = emb + self.cond_emb(as_conditions(y, len(x), len(self.cfg.conditions), x.device)).to(emb.dtype)
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            h = block(h, emb)
            hs.append(h)
        h = self.mid(h, emb)
        for block in self.up:
            h = block(torch.cat([h, hs.pop()], dim=1), emb)
        return self.out(h)


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule: str, num_steps: int) -> torch.Tensor:
    """float64 betas: "linear" 1e-4..0.02 scaled to num_steps (Ho et al. 2020), or "cosine"
    (Nichol & Dhariwal 2021, eq. 17, betas clipped at 0.999)."""
    if schedule == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64)
    if schedule == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(num_steps + 1, dtype=torch.float64) / num_steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown noise schedule {schedule!r} (use 'linear' or 'cosine')")


class GaussianDiffusion(nn.Module):
    """The DDPM forward process and its reverse steps (Ho et al. 2020), eps-parameterised.

    Steps are indexed t = 0..T-1, t = 0 the last reverse step (x_0 is the data). `alphas_cumprod[t]`
    is abar_t. The network is passed in, called as `model(x_t, t)`, and predicts eps.
    Constants are computed in float64 and cast to the sample's dtype when used.
    """

    # EDM's log-normal training noise levels (Karras et al. 2022, table 1: P_mean -1.2, P_std 1.2 for sigma_data 0.5),
    # for unit-variance latents: the same sigma / sigma_data, so P_mean moves by ln 2
    LOGNORMAL_MEAN, LOGNORMAL_STD = -1.2 + math.log(2.0), 1.2

    def __init__(self, num_steps: int = 1000, schedule: str = "linear", loss_type: str = "mse",
                 prediction: str = "eps", min_snr_gamma: float | None = None, timestep_sampling: str = "uniform"):
        super().__init__()
        if loss_type not in ("mse", "smooth_l1"):
            raise ValueError(f"unknown loss {loss_type!r} (use 'mse' or 'smooth_l1')")
        if prediction not in ("eps", "v"):
            raise ValueError(f"unknown prediction {prediction!r} (use 'eps' or 'v')")
        if timestep_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"unknown timestep sampling {timestep_sampling!r} (use 'uniform' or 'lognormal')")
        self.timestep_sampling = timestep_sampling
        self.num_steps, self.schedule, self.loss_type, self.prediction = num_steps, schedule, loss_type, prediction
        self.min_snr_gamma = min_snr_gamma
        self._cast = {}
        betas = make_betas(schedule, num_steps)
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            # eq. 7: beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t, and the posterior mean coefficients
            "posterior_variance": betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod),
            "posterior_mean_coef1": betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod),
            "posterior_mean_coef2": (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        }
        log_sigma = 0.5 * torch.log((1 - alphas_cumprod) / alphas_cumprod)  # increasing in t
        buffers["log_sigma_boundaries"] = (log_sigma[1:] + log_sigma[:-1]) / 2  # between steps t and t + 1
        for name, value in buffers.items():
            self.register_buffer(name, value, persistent=False)

    def config(self) -> dict:
        return {"num_steps": self.num_steps, "schedule": self.schedule, "loss_type": self.loss_type,
                "prediction": self.prediction, "min_snr_gamma": self.min_snr_gamma,
                "timestep_sampling": self.timestep_sampling}

    def _apply(self, fn, *args, **kwargs):
        self._cast = {}  # the buffers move or change dtype: the copies `_coef` keeps are stale
        return super()._apply(fn, *args, **kwargs)

    def _coef(self, name: str, t, x: torch.Tensor) -> torch.Tensor:
        """Buffer `name` at t, shaped (B or 1, 1, 1, 1) against x, in x's dtype and device.

        t: a (B,) tensor of steps, or one step as a Python int, as the samplers pass it. The buffer is cast
        to x's device and dtype once and kept, so a tensor t costs one gather and an int t a view, no
        kernel at all (the float64 gather and cast of every coefficient of every step was a stream of
        tiny kernels). It keeps x's number of dimensions, unlike a 0-dim tensor or a Python float, so a
        float32 coefficient times a bf16 network output (autocast) still promotes to float32.
        """
        key = (name, x.device, x.dtype)
        if key not in self._cast:
            self._cast[key] = getattr(self, name).to(x.device, x.dtype)
        table, shape = self._cast[key], (-1, *([1] * (x.dim() - 1)))
        return (table[t:t + 1] if isinstance(t, int) else table[t]).view(shape)

    @staticmethod
    def _steps(t, x: torch.Tensor) -> torch.Tensor:
        """t as the (B,) tensor of steps the network takes (from a Python int: a fill, no host-device copy)."""
        return t if torch.is_tensor(t) else torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (Ho et al. 2020, eq. 4)."""
        return self._coef("sqrt_alphas_cumprod", t, x0) * x0 + self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0)  (Ho et al. 2020, eq. 6-7)."""
        mean = self._coef("posterior_mean_coef1", t, x_t) * x0 + self._coef("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._coef("posterior_variance", t, x_t)

    def predict_x0(self, x_t, t, eps):
        """x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), eq. 4 solved for x0."""
        return (x_t - self._coef("sqrt_one_minus_alphas_cumprod", t, x_t) * eps) / self._coef("sqrt_alphas_cumprod", t, x_t)

    def predict_x0_eps(self, model, x_t, t):
        """(x0, eps) from the network's output: eps itself, or v = sqrt(abar) eps - sqrt(1 - abar) x0
        (Salimans & Ho 2022), for which x0 = sqrt(abar) x_t - sqrt(1 - abar) v. With v an error in the
        output stays an error of the same size in x0 at high noise, where eps would divide it by sqrt(abar)."""
        out = model(x_t, self._steps(t, x_t))
        if self.prediction == "eps":
            return self.predict_x0(x_t, t, out), out
        a, b = self._coef("sqrt_alphas_cumprod", t, x_t), self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        return a * x_t - b * out, b * x_t + a * out

    def p_sample(self, model, x_t, t, noise=None, clip_x0: float | None = None):
        """One ancestral step x_t -> x_{t-1} with variance beta~_t ("fixed small"), Ho et al. 2020, Alg. 2.

        Returns (x_{t-1}, predicted x0). x_t is never clamped; clip_x0, if given, clips only the
        predicted x0 to [-clip_x0, clip_x0]. No noise is added at t = 0.
        """
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean, var = self.q_posterior(x0, x_t, t)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = float(t > 0) if isinstance(t, int) else (t > 0).to(x_t.dtype).view(-1, *([1] * (x_t.dim() - 1)))
        return mean + nonzero * var.sqrt() * noise, x0

    def ddim_step(self, model, x_t, t, t_prev, eta: float = 0.0, noise=None, clip_x0: float | None = None):
        """x_t -> x_{t_prev} (t_prev < t, or -1 for the data) by Song et al. 2021, eq. 12.

        eta = 0 is the deterministic DDIM; eta = 1 with consecutive steps is DDPM's "fixed small".
        Returns (x_{t_prev}, predicted x0).
        """
        x0, eps = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x_t - self._coef("sqrt_alphas_cumprod", t, x_t) * x0) / self._coef("sqrt_one_minus_alphas_cumprod", t, x_t)
        a_t = self._coef("alphas_cumprod", t, x_t)
        a_prev = self._coef("alphas_cumprod_prev", t_prev + 1, x_t)  # abar_{t_prev}, with abar_{-1} = 1
        sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma ** 2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)
        return x_prev, x0

    def ddim_inversion(self, model, x0: torch.Tensor, start: int, steps: int | None = None):
        """The data x0 -> x_start along the deterministic DDIM path walked backwards (DDIM inversion: Song et al. 2021,
        sec. 4.3, eq. 12 with eta = 0 read as an ODE; Dhariwal & Nichol 2021, Mokady et al. 2023), at the timesteps
        that `sample_steps("ddim", steps, start)` visits, in the opposite order: x_{t_prev} -> x_t is
        sqrt(abar_t) x0_hat + sqrt(1 - abar_t) eps_hat with the network's (x0_hat, eps_hat) at (x_{t_prev}, t_prev),
        which stands in for its values at the unknown x_t (from the data, t_prev = -1, at step 0). DDIM sampling
        from the result retraces the path: exactly where eps_hat is constant along it, up to the step size elsewhere.
        Yields (t, x_t) at every timestep, the last at `start`."""
        ts = self.ddim_timesteps(start, steps)[::-1]
        x = x0
        for t_prev, t in zip([-1] + ts[:-1], ts):
            x0_hat, eps_hat = self.predict_x0_eps(model, x, max(t_prev, 0))
            a_t = self._coef("alphas_cumprod", t, x)
            x = a_t.sqrt() * x0_hat + (1 - a_t).sqrt() * eps_hat
            yield t, x

    def ddim_timesteps(self, start: int, steps: int | None) -> list[int]:
        """The steps DDIM and DPM-Solver++ visit from `start` down to 0: `steps` of them, evenly spaced (default 50)."""
        n = min(steps or 50, start + 1)
        return torch.linspace(start, 0, n).round().long().unique_consecutive().tolist()

    def dpmpp_2m_step(self, model, x_t, t, t_prev, x0_before=None, h_before=None, clip_x0: float | None = None,
                      eta: float = 0.0, noise=None):
        """x_t -> x_{t_prev} by DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), for 10-25 steps; with eta = 1 by its
        stochastic form, SDE-DPM-Solver++(2M) (the same paper's SDE solver with the 2M data prediction).

        The diffusion ODE is solved exactly in the log-SNR lambda = log(alpha / sigma) (alpha = sqrt(abar),
        sigma = sqrt(1 - abar)) with the data prediction D held linear over the step: D = (1 + 1/2r) x0 -
        1/2r x0_before, r = h_before / h, h = lambda_prev - lambda_t. Without a previous step it is the
        first-order update (DDIM), and so are the last two steps, into t = 0 and into the data (where it returns
        the predicted x0), as the solver's authors do at few steps: near t = 0 lambda jumps (h / h_before about
        4 at 20 linear steps) and the linear extrapolation of x0 overshoots (with the Gaussian oracle, the
        std of the samples +25% at 20 steps, against -3.7% with the first-order final steps).
        eta >= 0 scales the noise as k-diffusion's `sample_dpmpp_2m_sde` does: x_{t_prev} = sigma_prev / sigma_t
        e^{-eta h} x_t + alpha_prev (1 - e^{-(1 + eta) h}) D + sigma_prev sqrt(1 - e^{-2 eta h}) noise; eta = 0 is the
        ODE above, and with eta = 1 (`sample_steps`' "dpmpp-sde") the first-order step is DDPM's ancestral step
        (DDIM's at eta = 1).
        Returns (x_{t_prev}, predicted x0, h); pass that x0 and h as x0_before and h_before to the next step.
        t and t_prev: Python ints (as `sample_steps` passes them: the order is chosen on the host) or (B,)
        tensors (then per sample by `torch.where`, never reading the steps back from the device; into the
        data abar_{-1} = 1 makes h infinite and the update return x0 exactly).
        """
        x0, _ = self.predict_x0_eps(model, x_t, t)
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
        if isinstance(t_prev, int) and t_prev < 0:
            return x0, x0, None
        a_t, a_prev = self._coef("alphas_cumprod", t, x_t), self._coef("alphas_cumprod_prev", t_prev + 1, x_t)
        h = 0.5 * (torch.log(a_prev / (1 - a_prev)) - torch.log(a_t / (1 - a_t)))
        d = x0
        if x0_before is not None:
            r = h / (2 * h_before)
            if not isinstance(t_prev, int):
                r = torch.where((t_prev > 0).view(-1, *([1] * (x_t.dim() - 1))), r, 0.0)
            if not isinstance(t_prev, int) or t_prev > 0:
                d = x0 + (x0 - x0_before) * r  # (1 + 1/2r) x0 - 1/2r x0_before
        if eta == 0:  # apart: into the data (t_prev = -1 in a tensor) h is infinite, and 0 * h would be NaN
            return ((1 - a_prev) / (1 - a_t)).sqrt() * x_t - a_prev.sqrt() * torch.expm1(-h) * d, x0, h
        x_prev = (((1 - a_prev) / (1 - a_t)).sqrt() * torch.exp(-eta * h) * x_t
                  - a_prev.sqrt() * torch.expm1(-(1 + eta) * h) * d)
        noise = torch.randn_like(x_t) if noise is None else noise
        return x_prev + (1 - a_prev).sqrt() * (-torch.expm1(-2 * eta * h)).sqrt() * noise, x0, h

    def sample_steps(self, model, x_T, sampler: str = "ddpm", steps: int | None = None,
                     start: int | None = None, eta: float = 0.0, clip_x0: float | None = None):
        """Run the reverse process from x_T at step `start` (default T-1) down to data.

        Yields (t, x_{t-1}, predicted x0) after every network call, so callers can keep frames.
        "ddpm": every step start..0. "ddim", "dpmpp" (DPM-Solver++(2M)) and "dpmpp-sde" (its stochastic form,
        SDE-DPM-Solver++(2M)): `steps` evenly spaced steps of start..0, then into the data; eta is DDIM's noise
        (0: deterministic, 1: DDPM-like). The steps go to the step methods as Python ints: no step
        reads anything back from the device, and the coefficients are views of tables cast once.
        """
        start = self.num_steps - 1 if start is None else start
        if sampler == "ddpm":
            ts = list(range(start, -1, -1))
        elif sampler in ("ddim", "dpmpp", "dpmpp-sde"):
            ts = self.ddim_timesteps(start, steps)
        else:
            raise ValueError(f"unknown sampler {sampler!r} (use 'ddpm', 'ddim', 'dpmpp' or 'dpmpp-sde')")
        x = x_T
        x0_before = h_before = None
        for t, t_prev in zip(ts, ts[1:] + [-1]):
            if sampler == "ddpm":
                x, x0 = self.p_sample(model, x, t, clip_x0=clip_x0)
            elif sampler == "ddim":
                x, x0 = self.ddim_step(model, x, t, t_prev, eta=eta, clip_x0=clip_x0)
            else:
                x, x0, h = self.dpmpp_2m_step(model, x, t, t_prev, x0_before, h_before, clip_x0=clip_x0,
                                              eta=1.0 if sampler == "dpmpp-sde" else 0.0)
                x0_before, h_before = x0, h
            yield t, x, x0

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma weight per step (Hang et al. 2023): min(SNR, gamma) / SNR for the eps target and
        min(SNR, gamma) / (SNR + 1) for v, SNR = abar / (1 - abar); all ones when min_snr_gamma is None."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape, device=t.device)
        abar = self.alphas_cumprod.to(t.device)[t]
        snr = abar / (1 - abar)
        return (snr.clamp(max=self.min_snr_gamma) / (snr if self.prediction == "eps" else snr + 1)).float()

    def sample_timesteps(self, batch: int, device) -> torch.Tensor:
        """Training steps t: uniform over 0..T-1 (Ho et al. 2020), or "lognormal": ln sigma_t normal with
        (LOGNORMAL_MEAN, LOGNORMAL_STD), sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022), each draw taken
        to the step nearest in ln sigma. Either way the loss's weight per step is left as it is."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, self.num_steps, (batch,), device=device)
        boundaries = self.log_sigma_boundaries
        draw = self.LOGNORMAL_MEAN + self.LOGNORMAL_STD * torch.randn(batch, device=device, dtype=boundaries.dtype)
        return torch.searchsorted(boundaries, draw)

    def loss(self, model, x0, t=None, noise=None, y=None):
        """Simple loss (Ho et al. 2020, eq. 14) on the eps or v target: MSE, or smooth-L1 as the original used,
        per sample weighted by `loss_weight(t)` (min-SNR-gamma if set), averaged over the batch; the steps t drawn
        by `sample_timesteps` unless given."""
        B = x0.shape[0]
        if t is None:
            t = self.sample_timesteps(B, x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        target = noise
        if self.prediction == "v":
            target = self._coef("sqrt_alphas_cumprod", t, x0) * noise - self._coef("sqrt_one_minus_alphas_cumprod", t, x0) * x0
        x_t = self.q_sample(x0, t, noise)
        pred = model(x_t, t) if y is None else model(x_t, t, y)
        error = F.mse_loss if self.loss_type == "mse" else F.smooth_l1_loss
        per_sample = error(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return (self.loss_weight(t) * per_sample).mean()


# ----------------------------------------------------------------------------- conditioning and guidance

def drop_conditions(y: torch.Tensor, p: float) -> torch.Tensor:
    """Each condition of each sample (y (B, K), NaN: not given) dropped to "not given" with probability p, each on
    its own: one network learns the model under every subset of its conditions at once, the unconditional one
    included, as classifier-free guidance needs (Ho & Salimans 2022)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, float("nan"), y)


class Guided(nn.Module):
    """A conditional UNet under classifier-free guidance (Ho & Salimans 2022), called as model(x_t, t):

    out = out(x_t, t, null) + w * (out(x_t, t, y) - out(x_t, t, null)), so w = 0 is the unconditional
    network and w = 1 the conditional one. y (B, K): the conditions given (NaN where one is not: guidance then
    pushes towards the subset given), or (B,) class indices; null: no condition given. Both halves run in one
    batch. Every sampler works with it, for the eps and the v output alike: x0 and eps are linear in the output.
    With an `interval` (first, last) of steps, w applies there only and the conditional network alone elsewhere
    (`guided_within`).
    """

    def __init__(self, unet: "UNet", y: torch.Tensor, guidance: float, interval: tuple[int, int] | None = None):
        super().__init__()
        self.unet, self.guidance, self.interval = unet, guidance, interval  # unet: the UNet, or a callable standing in
        self.y = as_conditions(y, len(y), 1, y.device)
        self.null = torch.full_like(self.y, float("nan"))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.guidance == 1:
            return self.unet(x_t, t, self.y)
        if self.guidance == 0 and self.interval is None:
            return self.unet(x_t, t, self.null)
        cond, uncond = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([self.y, self.null])).chunk(2)
        return guided_within(self.interval, t, uncond + self.guidance * (cond - uncond), cond)


class Autoguided(nn.Module):
    """A denoiser guided by a weaker version of itself (autoguidance: Karras et al. 2024, "Guiding a Diffusion Model
    with a Bad Version of Itself", eq. 2), called as model(x_t, t):

    out = guide(x_t, t) + w * (main(x_t, t) - guide(x_t, t)), so w = 1 is the main network alone. The guide makes
    the main network's errors, only larger (here: the same UNet earlier in its training), so stepping away from it
    removes part of them, without the loss of variety that guidance by a condition brings. Both are called with the
    same x_t and t; as for `Guided`, x0 and eps are linear in the output, so every sampler works with it. With an
    `interval` (first, last) of steps, w applies there only and the main network alone elsewhere (`guided_within`)."""

    def __init__(self, main, guide, weight: float, interval: tuple[int, int] | None = None):
        super().__init__()
        self.main, self.guide, self.weight = main, guide, weight  # callables: a UNet, a `Guided` one, a graphed call
        self.interval = interval

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        guide, main = self.guide(x_t, t), self.main(x_t, t)
        return guided_within(self.interval, t, guide + self.weight * (main - guide), main)


def guided_within(interval: tuple[int, int] | None, t: torch.Tensor, guided: torch.Tensor,
                  unguided: torch.Tensor) -> torch.Tensor:
    """Guidance in a limited interval of steps (Kynkaanniemi et al. 2024, "Applying Guidance in a Limited Interval
    Improves Sample and Distribution Quality in Diffusion Models"): the guided output where first <= t <= last, the
    guided network alone elsewhere, per sample of t (B,); everywhere without an interval. The guiding network is
    still called outside the interval: skipping it would read t back from the device at every step."""
    if interval is None:
        return guided
    first, last = interval
    inside = ((t >= first) & (t <= last)).view(-1, *[1] * (guided.dim() - 1))
    return torch.where(inside, guided, unguided)


# ----------------------------------------------------------------------------- EMA of the weights

class EMA:
    """Exponential moving average of the weights (and a copy of the buffers) for sampling, in `.module`.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates (as latent-diffusion does),
    so the random initial weights are forgotten within a short run; the first update copies. n is a
    Python int (`.updates`), so the weight is worked out on the host and an update is one fused
    `_foreach_lerp_` over all parameters that never waits for the GPU (torch's AveragedModel keeps n on
    the device and reads it back every step). Make it after any channels_last conversion of the model:
    with both sides in one layout the fused kernel applies; otherwise it is still correct, only slower.
    A checkpoint holds `ema.module.state_dict()` and `ema.updates`.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module):
        params, averaged = list(model.parameters()), list(self.module.parameters())
        if self.updates == 0:
            torch._foreach_copy_(averaged, params)
        else:
            n = self.updates
            torch._foreach_lerp_(averaged, params, 1 - min(self.decay, (1 + n) / (10 + n)))
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.updates += 1
