"""Reuse what an edit cannot change: the transformer layers below the lowest edited layer.

Edits only touch modules inside layers ``L..`` of the model's layer list, so the output of layer
``L − 1`` for a given mini-batch is the same before and after any edit. :class:`PrefixCachedModel`
wraps a causal LM: the first forward pass of a mini-batch records that output; later passes of the
same mini-batch (the second MSBP step's caching, the edit loss of the step after, the evaluation after
editing) run layers ``0..L−1`` as stand-ins that return the recorded tensor, so only layers ``L..``
and the output head are computed.

:meth:`PrefixCachedModel.joined` serves a pass over several stacked mini-batches (up to
``PASS_ROWS`` prompts, grouped by :func:`emsedit.batching.passes`): it computes the unknown ones' lower
layers in one early-stopped pass (:meth:`PrefixCachedModel.warm`) over their real tokens packed into
one row (each prompt attends to itself only, positions counting from 0; padding is not computed and
the recorded tensors hold zeros there, which attention masks out and nothing scores). Right padding
used to cost ~55 % more tokens on zsRE (14,684 computed for 9,443 real in a 10 × 20 training order);
packed, the share-training job takes 14.4 s instead of 19.5 s at one thread. A model whose rows are
not right-padded gets the padded pass. The numbers agree with one pass per mini-batch to float
rounding (~1e-5), not bit for bit; every code path groups the same lists the same way (one turn's
mini-batches of one kind), so a run is bit-for-bit reproducible, with or without shared activations.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from emsedit.batching import joined_rows, packed_rows, passes
from emsedit.packed_attention import segment_attention

SHARED_FORMAT = "emsedit-prefix-activations/5"  # /5: attention per prompt in packed passes; /4: a small last pass joins the one before; /3: packed passes; /2: padded


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

    def __init__(self, model: nn.Module, module_names: list[str], *, max_bytes: int = 2 << 30,
                 pack: bool = True) -> None:
        super().__init__()
        self.model = model
        self.config = getattr(model, "config", None)
        found = find_layer_list(model, module_names)
        self.layers, self.lowest = found if found else (None, 0)
        self.max_bytes = max_bytes
        self.pack = pack
        self._cache: dict[int, tuple[torch.Tensor, Any]] = {}
        self._keys: dict[int, str] = {}  # id(input_ids) -> content key, for export
        self._preloaded: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._recording = True  # False while a joined pass runs without recorded pieces
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

    def _lookup(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Any:
        """The recorded (or preloaded) lower-layer output of this mini-batch, or None."""
        entry = self._cache.get(id(input_ids))
        if entry is not None and entry[0] is input_ids:
            return entry[1]
        if self._preloaded:
            key = content_key(input_ids, attention_mask)
            shared = self._preloaded.get(key)
            if shared is not None:
                self.preloaded_hits += 1
                shared = shared.to(input_ids.device)
                self._cache[id(input_ids)] = (input_ids, shared)
                self._keys[id(input_ids)] = key
                self._bytes += _nbytes(shared)
                return shared
        return None

    def warm(self, batches: Sequence[Any]) -> None:
        """Compute the lower layers of the mini-batches not yet known, in passes of ``PASS_ROWS`` prompts.

        ``batches`` are LM mini-batches (``input_ids``, ``attention_mask``). The passes are the
        consecutive groups of :func:`emsedit.batching.passes` over the whole list, whatever is already
        known, so a mini-batch's numbers depend only on the list it was warmed in.
        """
        if not self.enabled:
            return
        for chunk in passes(batches):
            known = [self._lookup(b.input_ids, b.attention_mask) is not None for b in chunk]
            if not all(known):
                self._record_lower(chunk, known)

    @contextmanager
    def joined(self, input_ids: torch.Tensor, batches: Sequence[Any], *, packed: bool = False) -> Iterator[None]:
        """Replay the mini-batches' lower layers in a pass over their row-wise concatenation.

        ``input_ids`` is that concatenation (right-padded to its width); the lower-layer outputs of
        the mini-batches are padded with zeros to that width (padding is masked from attention).
        With ``packed``, ``input_ids`` is their :func:`~emsedit.batching.packed_rows` row instead and
        the replayed outputs are their real tokens' back to back.
        """
        if not self.enabled:
            yield
            return
        self.warm(batches)
        pieces = [self._lookup(b.input_ids, b.attention_mask) for b in batches]
        if any(not isinstance(p, torch.Tensor) for p in pieces):  # not recorded (cache full): plain pass
            self._recording, recording = False, self._recording
            try:
                yield
            finally:
                self._recording = recording
            return
        if packed:
            joined = torch.cat([p[b.attention_mask.bool()] for p, b in zip(pieces, batches)])[None]
        else:
            width = input_ids.shape[1]
            joined = torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in pieces])
        self._cache[id(input_ids)] = (input_ids, joined)
        try:
            yield
        finally:
            del self._cache[id(input_ids)]

    def _record_lower(self, chunk: list[Any], known: list[bool]) -> None:
        """One pass of layers ``0..L−1`` over the chunk's mini-batches; store the unknown ones."""
        if self._bytes >= self.max_bytes:
            return
        packed = packed_rows(chunk) if self.pack else None
        if packed is not None:  # one row of the real tokens, each prompt attending to itself only
            ids, positions, lengths = packed
            with segment_attention(self.model, lengths, ids.device):
                hidden = self._lower_pass(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
            if not isinstance(hidden, torch.Tensor):
                return
            pieces = iter(hidden[0].split(lengths))
            for b, seen in zip(chunk, known):
                n, w = b.input_ids.shape
                rows = [next(pieces) for _ in range(n)]
                if not seen:  # padding positions hold zeros (masked from attention, never scored)
                    out = hidden.new_zeros(n, w, hidden.shape[-1])
                    for r, piece in enumerate(rows):
                        out[r, :piece.shape[0]] = piece
                    self._store(b.input_ids, b.attention_mask, out)
            return
        ids, mask = joined_rows(chunk, "input_ids", 0), joined_rows(chunk, "attention_mask", 0)
        hidden = self._lower_pass(input_ids=ids, attention_mask=mask)
        if not isinstance(hidden, torch.Tensor):
            return  # an unusual layer output: leave these mini-batches to the recording forward
        row = 0
        for b, seen in zip(chunk, known):
            n, w = b.input_ids.shape
            if not seen:
                self._store(b.input_ids, b.attention_mask, _detach(hidden[row:row + n, :w]))
            row += n

    def _lower_pass(self, **inputs: Any) -> Any:
        """The output of layer ``L − 1`` for ``inputs`` (a pass stopped there), or None if unusual."""
        recorded: list[Any] = []

        def stop(_module: nn.Module, _inputs: Any, output: Any) -> None:
            recorded.append(output)
            raise _LowerLayersDone

        handle = self.layers[self.lowest - 1].register_forward_hook(stop)
        try:
            with torch.no_grad():
                self.model(**inputs, logits_to_keep=1)
        except _LowerLayersDone:
            pass
        finally:
            handle.remove()
        hidden = recorded[0] if recorded else None
        if isinstance(hidden, tuple) and hidden and all(o is None for o in hidden[1:]):
            hidden = hidden[0]
        return hidden

    def _store(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, output: Any) -> None:
        self._cache[id(input_ids)] = (input_ids, output)
        self._keys[id(input_ids)] = content_key(input_ids, attention_mask)
        self._bytes += _nbytes(output)

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
        output = self._lookup(input_ids, kwargs.get("attention_mask"))
        if output is not None:
            self.hits += 1
            with self._replaying(output):
                return self.model(input_ids=input_ids, **kwargs)
        if self._bytes >= self.max_bytes or not self._recording:
            return self.model(input_ids=input_ids, **kwargs)
        recorded: list[Any] = []
        handle = self.layers[self.lowest - 1].register_forward_hook(
            lambda _m, _i, out: recorded.append(_detach(out)))
        try:
            result = self.model(input_ids=input_ids, **kwargs)
        finally:
            handle.remove()
        if recorded:
            self._store(input_ids, kwargs.get("attention_mask"), recorded[0])
        return result


TURN_KINDS = ("edit", "equiv", "unrel")  # a turn's mini-batch lists, in the order they are warmed


def warm_turns(model: nn.Module, turns: Sequence[Any], kinds: Sequence[str] = TURN_KINDS) -> None:
    """Compute the lower layers of the turns' mini-batches not yet known, in the canonical grouping.

    Each turn's ``kinds`` lists (edit, paraphrase, locality mini-batches) are warmed list by list, so a
    mini-batch's activations depend only on its own turn and list, whoever computes them (a cell while
    meta-training, or the ``share-training`` job for every cell of that order). No-op without a
    prefix cache.
    """
    if not isinstance(model, PrefixCachedModel) or not model.enabled:
        return
    for turn in turns:
        for kind in kinds:
            model.warm(getattr(turn, kind))


class _LowerLayersDone(Exception):
    """Raised by :meth:`PrefixCachedModel.warm`'s hook to stop a pass after the lower layers."""



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
    header = {**meta, "format": SHARED_FORMAT, "lowest": str(model.lowest), "note": note,
              "digest": _tensors_digest(tensors)}
    write_bytes_atomic(path, save(tensors, metadata=header))
    return len(tensors)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of the activations (names, shapes, dtypes, bytes): a damaged file is refused."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


def read_shared_header(path: str | Path, meta: dict[str, str], *, verify: bool = False) -> dict[str, str]:
    """The header of a :func:`save_shared` file, checked against ``meta`` (before any model loads).

    Raises ValueError for a file that is not one, or that was written for another model: its
    activations would be wrong here, not merely unused. ``verify`` also reads the activations and
    checks them against the digest in the header (a truncated or damaged file is refused).
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
    if verify:
        _read_verified(path, header)
    return header


def _read_verified(path: str | Path, header: dict[str, str]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except SafetensorError as err:
        raise ValueError(f"{path}: unreadable activations ({err})") from None
    if "digest" in header and _tensors_digest(tensors) != header["digest"]:
        raise ValueError(f"{path}: its activations do not match the digest in its header (damaged file)")
    return tensors


def load_shared(path: str | Path, model: PrefixCachedModel, meta: dict[str, str]) -> int:
    """Preload activations written by :func:`save_shared`; return how many were loaded.

    Raises ValueError as :func:`read_shared_header` does, when the lowest edited layer differs, and
    when the activations do not match the digest the writer put in the header (a damaged file).
    """
    header = read_shared_header(path, {**meta, "lowest": str(model.lowest)})
    if not model.enabled:
        return 0
    tensors = _read_verified(path, header)
    model.preload(tensors)
    return len(tensors)
