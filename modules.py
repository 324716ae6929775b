"""Networks: the VQ-VAE (and its quantiser), the time-conditioned UNet and its condition embedding, and the EMA of
their weights. The diffusion math that trains and samples the UNet is in diffusion/, stage 1's losses and its
discriminator in losses/.

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
        while channels % self.heads:  # heads of equal width: the most that divide a width such as 100 (3 would not)
            self.heads -= 1
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
    latent_size: int = 32           # not read: the network takes any size; saved, as checkpoints have it
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
    return F.pad(torch.cat([torch.cos(args), torch.sin(args)], dim=1), (0, dim % 2))  # an odd dim: a zero column (ADM)


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
    """The denoising UNet on latents, predicting eps or v as its diffusion says (Ho et al. 2020; layout of Dhariwal &
    Nichol 2021).

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
