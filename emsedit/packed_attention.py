"""Attention of a packed pass computed per prompt, not over the whole packed row.

A packed pass (:func:`emsedit.batching.packed_rows`) runs the real tokens of up to ``PASS_ROWS``
prompts back to back in one (1 × T) row. transformers' ``sdpa`` attention reads the position resets
as a block-diagonal mask and computes every one of the T × T scores, of which the prompts' own
causal pairs are a few percent (zsRE: ~3,600 of 121,000 per pass of 20 prompts): on the CPU that
attention took 3.9 s of a 35 s unedited evaluation whose whole attention arithmetic is 0.1 s.

:func:`segment_attention` runs the passes inside it with the ``emsedit_segments`` attention instead:
the row's queries, keys and values are gathered into (prompts × longest prompt) right-padded blocks,
attended with plain causal SDPA (a real query never sees a padded key: padding comes after it), and
the real positions scattered back. Values agree with the masked attention to float rounding (the
kernel adds the scores in other blocks), so results move in their last bits only. Models whose
attention is not ``sdpa`` (eager, flash), or whose sliding window is shorter than a prompt of the
pass, keep the masked path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

__all__ = ["NAME", "segment_attention"]

#: The attention implementation a packed pass runs with.
NAME = "emsedit_segments"


class _Layout:
    """Where the prompts of a packed row of ``total`` tokens lie: ``index`` (prompts · longest
    entries, prompt by prompt) into the row with a zero row appended, pointing at that zero row where
    a prompt is shorter than the longest; ``real``, the real entries of that block in row order."""

    def __init__(self, lengths: Sequence[int], device: torch.device) -> None:
        self.total, self.prompts, self.width = int(sum(lengths)), len(lengths), max(lengths)
        n = torch.tensor(list(lengths), device=device)
        cols = torch.arange(self.width, device=device)
        real = cols[None, :] < n[:, None]
        starts = torch.cumsum(n, 0) - n
        self.index = torch.where(real, starts[:, None] + cols[None, :], self.total).reshape(-1)
        self.real = real.reshape(-1).nonzero().squeeze(1)


_LAYOUT: ContextVar[_Layout | None] = ContextVar("emsedit_packed_layout", default=None)


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``emsedit_segments`` attention: (1, heads, T, dim) in, (1, T, heads, dim) out (as HF's
    attention functions return it), each prompt of the packed row attending to itself only."""
    layout = _LAYOUT.get()
    if layout is None or query.shape[0] != 1 or not query.shape[2] == key.shape[2] == layout.total:
        raise RuntimeError(f"the {NAME} attention ran outside a packed pass of its layout (query "
                           f"{tuple(query.shape)}, key {tuple(key.shape)}); use segment_attention()")

    def blocks(x: torch.Tensor) -> torch.Tensor:  # (1, h, T, d) -> (prompts, h, longest, d)
        gathered = F.pad(x, (0, 0, 0, 1)).index_select(2, layout.index)
        return gathered.view(x.shape[1], layout.prompts, layout.width, x.shape[3]).transpose(0, 1)

    out, _ = sdpa_attention_forward(module, blocks(query), blocks(key), blocks(value), None, dropout=dropout,
                                    scaling=scaling, is_causal=True)  # (prompts, longest, h, d)
    return out.flatten(0, 1).index_select(0, layout.real)[None], None  # (1, T, h, d)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """The mask of a packed pass: none (the segments are the mask)."""
    return None


AttentionInterface.register(NAME, _attention)
AttentionMaskInterface.register(NAME, _no_mask)


@contextmanager
def segment_attention(model: nn.Module, lengths: Sequence[int], device: torch.device) -> Iterator[None]:
    """Run the passes of ``model`` inside over a packed row of prompts of these ``lengths`` with
    per-prompt attention. A model whose attention is not ``sdpa``, or whose sliding window is shorter
    than the longest prompt (the blocks attend causally, without a window), is left as it is."""
    config = getattr(model, "config", None)  # the prefix cache shows its model's config as its own
    previous = getattr(config, "_attn_implementation", None)
    window = getattr(config, "sliding_window", None)
    if previous not in ("sdpa", NAME) or (window is not None and window < max(lengths)):
        yield
        return
    token = _LAYOUT.set(_Layout(lengths, device))
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
        _LAYOUT.reset(token)
