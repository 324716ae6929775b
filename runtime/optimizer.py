"""The optimizer every trained network uses (both stages and stage 1's discriminator): AdamW with the fused kernel,
and loading its saved state in the weights' memory layout."""
from __future__ import annotations

import torch


def adamw(params, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused kernel (one pass over all parameters) where this torch has one for the device:
    CUDA, and the CPU since torch 2.4 (3.4x faster there than the default for-each kernel, bench/README.md)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel for these parameters' device in this torch
        return torch.optim.AdamW(params, lr=lr, **kwargs)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict):
    """Load a saved optimizer state, each weight's moments in that weight's memory layout. A saved state keeps the
    layout it was written in (NHWC from a GPU run), and the fused and for-each AdamW kernels walk a weight's storage
    and its moments' side by side: moments in another layout would update the wrong elements (a GPU run resumed on
    a CPU, or with --no-channels-last). So the model is placed in its layout first (`place_model`), then this."""
    optimizer.load_state_dict(state)
    for p, moments in optimizer.state.items():
        for name, value in moments.items():
            if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                moments[name] = torch.empty_like(p, dtype=value.dtype).copy_(value)
