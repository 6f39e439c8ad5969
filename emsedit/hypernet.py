"""The running normaliser and the residual low-rank hypernetwork (method spec §6.3, §6.4).

A hypernetwork serves one *shape group*: all edited modules whose weight has the same (d_in, d_out).
Its input is a row ``[k ; g]`` (a key and a value-gradient captured at one answer token); its output
is the pseudo-key and pseudo-gradient ``(k~, g~)`` in the normalised space.
"""

from __future__ import annotations

import torch
from torch import nn

_EPS32 = torch.finfo(torch.float32).eps


class RunningNorm(nn.Module):
    """Per-dimension running mean and standard deviation, merged batch by batch (spec §6.4).

    The statistics are buffers, so they travel with ``state_dict`` (checkpoints keep them).
    ``std`` starts at 1 as in the EMSEdit code; ``var`` is the population variance.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x`` (m × dim) into the statistics."""
        m = x.shape[0]
        if m == 0:
            return
        x = x.to(self.mean.dtype)
        batch_mean = x.mean(0)
        batch_var = x.var(0, unbiased=False)
        n = float(self.n)
        total = n + m
        delta = batch_mean - self.mean
        m2 = self.var * n + batch_var * m + delta.square() * (n * m / total)
        self.mean += delta * (m / total)
        self.var.copy_(m2 / max(total, 1.0))
        self.std.copy_(torch.sqrt(m2 / (total - 1.0 + 1e-8)))
        self.n.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` with the current statistics."""
        return (x - self.mean) / (self.std + _EPS32)


class HyperBlock(nn.Module):
    """One residual low-rank block: ``h + scale[m]·clamp_min(h A B + c, 0) + shift[m]``.

    ``A ~ N(0, 1)``, ``B = 0`` and ``c = 0`` at initialisation, so the block is the identity. The clamp
    (not relu) lets gradient reach ``B`` and ``c`` at the zero pre-activation of the first step.
    """

    def __init__(self, dim: int, rank: int, n_modules: int, generator: torch.Generator) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(dim, rank, generator=generator))
        self.B = nn.Parameter(torch.zeros(rank, dim))
        self.c = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Embedding(n_modules, dim)
        self.shift = nn.Embedding(n_modules, dim)
        nn.init.ones_(self.scale.weight)
        nn.init.zeros_(self.shift.weight)

    def forward(self, h: torch.Tensor, module_idx: torch.Tensor) -> torch.Tensor:
        z = torch.clamp(h @ self.A @ self.B + self.c, min=0)
        return h + self.scale(module_idx) * z + self.shift(module_idx)


class HyperNet(nn.Module):
    """The hypernetwork of one shape group: normaliser, blocks and per-module ``lr`` and ``λ``."""

    def __init__(
        self,
        key_dim: int,
        value_dim: int,
        n_modules: int,
        *,
        rank: int,
        n_blocks: int,
        init_lr: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        self.key_dim, self.value_dim = key_dim, value_dim
        dim = key_dim + value_dim
        self.norm = RunningNorm(dim)
        self.blocks = nn.ModuleList(
            HyperBlock(dim, rank, n_modules, generator) for _ in range(n_blocks)
        )
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)
        nn.init.constant_(self.lr.weight, init_lr)
        nn.init.zeros_(self.lamda.weight)
        self.rank = rank

    def forward(
        self, keys: torch.Tensor, grads: torch.Tensor, module_idx: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map raw (keys, value-gradients) to (pseudo-keys, pseudo-grads).

        ``module_idx`` is the module of every row (an int), or one index per row (a long tensor),
        so rows of several modules of this shape group go through the network in one pass.
        """
        h = self.norm(torch.cat([keys, grads], dim=-1))
        if isinstance(module_idx, torch.Tensor):
            idx = module_idx.to(h.device)
        else:
            idx = torch.full((h.shape[0],), module_idx, dtype=torch.long, device=h.device)
        for block in self.blocks:
            h = block(h, idx)
        return h.split([self.key_dim, self.value_dim], dim=-1)

    def saved_bytes_per_row(self) -> int:
        """About what autograd saves per input row for a backward through the network: per block its
        input, the low-rank activation, the pre-activation, the gathered scale and the clamped output
        (``4 · dim + rank`` values), plus the row's key, pseudo-key and pseudo-gradient."""
        dim = self.key_dim + self.value_dim
        size = self.blocks[0].A.element_size() if len(self.blocks) else 4
        return size * (len(self.blocks) * (4 * dim + self.rank) + 3 * dim)

    def module_lr(self, module_idx: int) -> torch.Tensor:
        """The learned edit learning rate of one module (a 0-d tensor with grad)."""
        return self.lr.weight[module_idx, 0]

    def module_lamda(self, module_idx: int) -> torch.Tensor:
        """The learned log ridge coefficient λ of one module (a 0-d tensor with grad)."""
        return self.lamda.weight[module_idx, 0]


def step_ranks(rank: int, steps: int, decay: str) -> list[int]:
    """Rank of each step's hypernetwork: ``floor(rank / s)`` for s = 1..S, or ``rank`` throughout."""
    if decay == "floor_div":
        return [max(1, rank // s) for s in range(1, steps + 1)]
    if decay == "none":
        return [rank] * steps
    raise ValueError(f"unknown rank_decay {decay!r}; expected 'floor_div' or 'none'")
