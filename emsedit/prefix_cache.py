"""Reuse what an edit cannot change: the transformer layers below the lowest edited layer.

Edits only touch modules inside layers ``L..`` of the model's layer list, so the output of layer
``L − 1`` for a given mini-batch is the same before and after any edit. :class:`PrefixCachedModel`
wraps a causal LM: the first forward pass of a mini-batch records that output; later passes of the
same mini-batch (the second MSBP step's caching, the edit loss of the step after, the evaluation after
editing) run layers ``0..L−1`` as stand-ins that return the recorded tensor, so only layers ``L..``
and the output head are computed. Results are identical to the plain model's.

Mini-batches are recognised by the identity of their ``input_ids`` tensor (turns are collated once
per run). The cache keeps at most ``max_bytes`` of activations; beyond that it stops recording.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn


def find_layer_list(model: nn.Module, module_names: list[str]) -> tuple[nn.ModuleList, int] | None:
    """The ModuleList holding all edited modules and the lowest edited layer index, or None."""
    found: tuple[str, int] | None = None
    lowest = None
    for name in module_names:
        parts = name.split(".")
        hit = None
        for i in range(len(parts) - 1, 0, -1):
            parent = ".".join(parts[:i])
            if parts[i].isdigit() and isinstance(model.get_submodule(parent), nn.ModuleList):
                hit = (parent, int(parts[i]))
                break
        if hit is None or (found is not None and hit[0] != found[0]):
            return None
        found = hit
        lowest = hit[1] if lowest is None else min(lowest, hit[1])
    if found is None or not lowest:
        return None
    return model.get_submodule(found[0]), lowest


class _Replay(nn.Module):
    """Stands in for a lower layer: returns the recorded output of the last lower layer."""

    def __init__(self, output: Any) -> None:
        super().__init__()
        self.output = output

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.output


def _detach(output: Any) -> Any:
    with torch.inference_mode(False):
        if isinstance(output, torch.Tensor):
            return output.detach().clone()
        if isinstance(output, tuple):
            return tuple(_detach(o) for o in output)
    return output


def _nbytes(output: Any) -> int:
    if isinstance(output, torch.Tensor):
        return output.numel() * output.element_size()
    if isinstance(output, tuple):
        return sum(_nbytes(o) for o in output)
    return 0


class PrefixCachedModel(nn.Module):
    """A causal LM whose unedited lower layers are computed once per mini-batch."""

    def __init__(self, model: nn.Module, module_names: list[str], *, max_bytes: int = 2 << 30) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        found = find_layer_list(model, module_names)
        self.layers, self.lowest = found if found else (None, 0)
        self.max_bytes = max_bytes
        self._cache: dict[int, tuple[torch.Tensor, Any]] = {}
        self._bytes = 0
        self.hits = 0

    @property
    def enabled(self) -> bool:
        return self.layers is not None

    @contextmanager
    def _replaying(self, output: Any) -> Iterator[None]:
        original = [self.layers[i] for i in range(self.lowest)]
        stand_in = _Replay(output)
        try:
            for i in range(self.lowest):
                self.layers[i] = stand_in
            yield
        finally:
            for i, layer in enumerate(original):
                self.layers[i] = layer

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.model(input_ids=input_ids, **kwargs)
        entry = self._cache.get(id(input_ids))
        if entry is not None and entry[0] is input_ids:
            self.hits += 1
            with self._replaying(entry[1]):
                return self.model(input_ids=input_ids, **kwargs)
        if self._bytes >= self.max_bytes:
            return self.model(input_ids=input_ids, **kwargs)
        recorded: list[Any] = []
        handle = self.layers[self.lowest - 1].register_forward_hook(
            lambda _m, _i, out: recorded.append(_detach(out)))
        try:
            result = self.model(input_ids=input_ids, **kwargs)
        finally:
            handle.remove()
        if recorded:
            self._cache[id(input_ids)] = (input_ids, recorded[0])
            self._bytes += _nbytes(recorded[0])
        return result
