"""Reuse what an edit cannot change: the transformer layers below the lowest edited layer.

Edits only touch modules inside layers ``L..`` of the model's layer list, so the output of layer
``L − 1`` for a given mini-batch is the same before and after any edit. :class:`PrefixCachedModel`
wraps a causal LM: the first forward pass of a mini-batch records that output; later passes of the
same mini-batch (the second MSBP step's caching, the edit loss of the step after, the evaluation after
editing) run layers ``0..L−1`` as stand-ins that return the recorded tensor, so only layers ``L..``
and the output head are computed. Results are identical to the plain model's.

Mini-batches are recognised by the identity of their ``input_ids`` tensor (turns are collated once
per run). The cache keeps at most ``max_bytes`` of activations; beyond that it stops recording.

Across processes: :meth:`PrefixCachedModel.export` returns the recorded activations keyed by the
content of each mini-batch (token ids and attention mask), and :meth:`PrefixCachedModel.preload`
accepts such a mapping, so a mini-batch with the same content replays it instead of running the lower
layers. The workflow's unedited-evaluation job writes them (:func:`save_shared`) for the cells that
edit and evaluate the same seeded requests (:func:`load_shared`).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

SHARED_FORMAT = "emsedit-prefix-activations/1"


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
        self._keys: dict[int, str] = {}  # id(input_ids) -> content key, for export
        self._preloaded: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self.hits = 0
        self.preloaded_hits = 0

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

    def export(self) -> dict[str, torch.Tensor]:
        """The recorded activations (tensor outputs only) keyed by mini-batch content."""
        out = {}
        for ident, (_ids, output) in self._cache.items():
            if isinstance(output, torch.Tensor) and ident in self._keys:
                out[self._keys[ident]] = output
        return out

    def preload(self, activations: dict[str, torch.Tensor]) -> None:
        """Make recorded activations (from :meth:`export`, maybe of another process) replayable."""
        self._preloaded.update(activations)

    def forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        if not self.enabled:
            return self.model(input_ids=input_ids, **kwargs)
        entry = self._cache.get(id(input_ids))
        if entry is None and self._preloaded:
            key = content_key(input_ids, kwargs.get("attention_mask"))
            shared = self._preloaded.get(key)
            if shared is not None:
                self.preloaded_hits += 1
                entry = (input_ids, shared.to(input_ids.device))
                self._cache[id(input_ids)] = entry
                self._keys[id(input_ids)] = key
                self._bytes += _nbytes(shared)
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
            self._keys[id(input_ids)] = content_key(input_ids, kwargs.get("attention_mask"))
            self._bytes += _nbytes(recorded[0])
        return result


def content_key(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> str:
    """A digest of a mini-batch's token ids, shape and attention mask."""
    h = hashlib.sha256(str(tuple(input_ids.shape)).encode())
    h.update(input_ids.detach().to("cpu", torch.int64).numpy().tobytes())
    if attention_mask is not None:
        h.update(attention_mask.detach().to("cpu", torch.int64).numpy().tobytes())
    return h.hexdigest()[:32]


def save_shared(path: str | Path, model: PrefixCachedModel, meta: dict[str, str], *,
                max_bytes: int) -> int:
    """Write the model's recorded activations for other processes; return how many were written.

    ``meta`` identifies what they were computed with (model name, lowest edited layer); a file that
    would exceed ``max_bytes`` is written empty, so workflows can always declare it as an output.
    """
    from safetensors.torch import save

    from emsedit.records import write_bytes_atomic

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.export().items()} if model.enabled else {}
    size = sum(_nbytes(t) for t in tensors.values())
    note = "complete"
    if size > max_bytes:
        tensors, note = {}, f"omitted: {size} bytes > limit {max_bytes}"
    header = {**meta, "format": SHARED_FORMAT, "lowest": str(model.lowest), "note": note}
    write_bytes_atomic(path, save(tensors, metadata=header))
    return len(tensors)


def read_shared_header(path: str | Path, meta: dict[str, str]) -> dict[str, str]:
    """The header of a :func:`save_shared` file, checked against ``meta`` (before any model loads).

    Raises ValueError for a file that is not one, or that was written for another model: its
    activations would be wrong here, not merely unused.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
    except SafetensorError as err:
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if header.get("format") != SHARED_FORMAT:
        raise ValueError(f"{path}: not a shared prefix-activation file (format {header.get('format')!r})")
    wrong = {k: (header.get(k), v) for k, v in meta.items() if header.get(k) != v}
    if wrong:
        raise ValueError(f"{path}: written for other settings (file vs this run: {wrong})")
    return header


def load_shared(path: str | Path, model: PrefixCachedModel, meta: dict[str, str]) -> int:
    """Preload activations written by :func:`save_shared`; return how many were loaded.

    Raises ValueError as :func:`read_shared_header` does, and when the lowest edited layer differs.
    """
    from safetensors.torch import load_file

    read_shared_header(path, {**meta, "lowest": str(model.lowest)})
    if not model.enabled:
        return 0
    tensors = load_file(str(path))
    model.preload(tensors)
    return len(tensors)
