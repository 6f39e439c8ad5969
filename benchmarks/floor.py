"""Compute floors of benchmark cells: the transformer FLOPs a cell cannot avoid, over this machine's
measured matmul throughput.

Three parts, all standard library + torch:

* :func:`matmul_gflops` — fp32 throughput of ``F.linear`` on the shapes of the model's MLP
  projections (``(rows × hidden) @ (hidden × inner)`` and back), at a given torch thread count.
* :func:`count_passes` — a context manager that hooks the model a cell uses (a
  :class:`emsedit.prefix_cache.PrefixCachedModel` or a plain HF causal LM) and counts, for every
  forward pass through the transformer, what it actually computed (:class:`PassCounts`).
* :func:`floor_flops` / :func:`floor_seconds` — the floor from those counts and the HF model config.
* :func:`count_executed` / :func:`executed_split` — what a job actually executed instead: the FLOPs
  of every matmul and attention kernel it ran (torch's ``FlopCounterMode``, forward and backward),
  split into the transformer, the editors' networks (hypernetworks) and the algebra outside any
  module (ridge solves, weight updates). Executed over floor says how much work beyond the floor a
  job does; measured time over executed FLOPs at the measured throughput, how fast it runs that work.

**The floor** (FLOPs of a job, i.e. of everything done in one process while the counter was on):

* *lower layers* (``0 .. L−1``, below the lowest edited layer ``L``, which no edit changes): once per
  distinct prompt whose lower layers this process actually computed — ``L × (2 · P_layer · n +
  4 · q_dim · pairs)`` per distinct prompt of ``n`` real tokens, summed. A prompt is its unpadded
  token ids (for a KV-cached generation step: the whole sequence so far, of which only the new
  tokens are computed). Prompts whose lower layers were replayed (the prefix cache, or activations
  shared by another job) cost nothing here; computing the same prompt twice counts once.
* *upper layers* (``L ..``), every pass that ran them: forward ``2 · P_layer · tokens + 4 · q_dim ·
  pairs`` per layer, on the pass's real (attention-mask = 1) tokens. A pass run with grad enabled (a
  backward may follow) adds the activation gradients of the layers *above* ``L``: ``2 · P_layer ·
  tokens + 8 · q_dim · pairs`` per layer — every weight but the edited ones is frozen, so weight
  gradients of frozen weights are not needed, and the edited modules' own weight gradients (an
  outer product, needed by some passes only) and the backward inside layer ``L`` are left out: this
  is a lower bound. (The usual "backward = 2 × forward" rule, i.e. ×3 in all, counts the weight
  gradients of every weight; it would give ``3 · n_upper`` layer-forwards per grad pass instead of
  ``2 · n_upper − 1``.)
* *output head*: ``2 · hidden · vocab`` per row it actually projected (the suite evaluates it at
  answer positions only), and the same again for its input gradient in a grad pass (it is frozen).

``P_layer`` is a decoder layer's linear parameters (Llama-style: q, k, v, o and the gated MLP's
gate, up, down; GPT-2: c_attn, c_proj and the two MLP matrices), ``q_dim`` = heads × head dim and
``pairs`` the causal (query, key) pairs of real tokens: ``m·c + m(m+1)/2`` for a row of ``m`` new
tokens after ``c`` cached ones. Embedding lookups, norms, rotary embeddings, softmax and the
editors' own hypernetworks are not counted. The floor over the measured throughput is
:func:`floor_seconds`; a measured time over it says how far a job is from "only the matmuls it
cannot avoid, at this machine's matmul speed".
"""

from __future__ import annotations

import hashlib
import math
import statistics
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PassCounts", "count_executed", "count_passes", "executed_split", "floor_flops", "floor_seconds",
           "layer_sizes", "matmul_gflops"]


# ----------------------------------------------------------------------------- throughput
def matmul_gflops(threads: int, *, hidden: int = 576, inner: int = 1536, rows: int = 320, repeats: int = 5,
                  seconds: float = 0.2) -> float:
    """Measured fp32 matmul throughput in GFLOP/s with ``torch.set_num_threads(threads)``.

    The shapes are those of the model's MLP projections on one joined pass: ``rows`` = 16 prompts
    of ~20 tokens (``PASS_ROWS``), ``F.linear`` of a (rows × hidden) block by an (inner × hidden)
    weight (up / gate projection) alternating with a (rows × inner) block by a (hidden × inner) weight
    (down projection), outputs allocated each call as in the model. These are most of a layer's
    FLOPs (SmolLM2: 3 of the 3.5 M linear parameters per layer); the attention projections are
    smaller and the vocabulary projection larger matmuls, which run at a somewhat different rate. After
    a warm-up, a loop long enough to take ~``seconds`` is timed ``repeats`` times and the median
    rate is returned. The previous thread count is restored.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(rows, hidden, generator=gen)
        up = torch.randn(inner, hidden, generator=gen)
        h = torch.randn(rows, inner, generator=gen)
        down = torch.randn(hidden, inner, generator=gen)
        per_iteration = 2 * (2 * rows * hidden * inner)

        def loop(n: int) -> float:
            start = time.perf_counter()
            for _ in range(n):
                F.linear(x, up)
                F.linear(h, down)
            return time.perf_counter() - start

        with torch.inference_mode():
            loop(5)  # warm-up: thread pool, allocator, kernel choice
            n = 1
            while (took := loop(n)) < seconds / 8:
                n *= 2
            n = max(1, math.ceil(n * seconds / took))
            rates = [per_iteration * n / loop(n) for _ in range(max(1, repeats))]
        return statistics.median(rates) / 1e9
    finally:
        torch.set_num_threads(previous)


def floor_seconds(flops: float | Mapping[str, float], gflops: float) -> float:
    """Seconds ``flops`` (a number, or a :func:`floor_flops` result: its ``total``) take at ``gflops``."""
    total = flops["total"] if isinstance(flops, Mapping) else flops
    if not gflops > 0:
        raise ValueError(f"throughput must be positive, got {gflops} GFLOP/s")
    return float(total) / (gflops * 1e9)


# ----------------------------------------------------------------------------- model sizes
def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
        if value is not None:
            return value
    return None


def layer_sizes(config: Any) -> dict[str, int]:
    """Sizes the floor needs from an HF model config (object or dict): ``hidden``, ``inner`` (MLP width), ``layers``,
    ``vocab``, ``q_dim`` (heads × head dim) and ``layer_params`` (a decoder layer's linear parameters).

    Llama-style configs (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
    ``num_attention_heads``, optional ``num_key_value_heads`` / ``head_dim``, ``vocab_size``) are read
    as a gated MLP (gate, up, down); GPT-2 style (``n_embd``, ``n_layer``, ``n_head``, optional
    ``n_inner``, default 4 × n_embd) as c_attn + c_proj and a two-matrix MLP. Anything else: ValueError.
    """
    vocab = _get(config, "vocab_size")
    if _get(config, "hidden_size") is not None and _get(config, "intermediate_size") is not None:
        d, inner = int(_get(config, "hidden_size")), int(_get(config, "intermediate_size"))
        layers, heads = _get(config, "num_hidden_layers"), _get(config, "num_attention_heads")
        if layers is None or heads is None or vocab is None:
            raise ValueError("a Llama-style config needs num_hidden_layers, num_attention_heads and vocab_size")
        kv_heads = int(_get(config, "num_key_value_heads") or heads)
        head_dim = int(_get(config, "head_dim") or d // int(heads))
        q_dim, kv_dim = int(heads) * head_dim, kv_heads * head_dim
        params = d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * inner
        return {"hidden": d, "inner": inner, "layers": int(layers), "vocab": int(vocab), "q_dim": q_dim,
                "layer_params": params}
    if _get(config, "n_embd") is not None and _get(config, "n_layer") is not None:
        d = int(_get(config, "n_embd"))
        inner = int(_get(config, "n_inner") or 4 * d)
        if vocab is None:
            raise ValueError("a GPT-2 style config needs vocab_size")
        return {"hidden": d, "inner": inner, "layers": int(_get(config, "n_layer")), "vocab": int(vocab), "q_dim": d,
                "layer_params": 4 * d * d + 2 * d * inner}
    raise ValueError("unsupported model config for the compute floor: need Llama-style fields (hidden_size, "
                     "intermediate_size, num_hidden_layers, num_attention_heads, vocab_size) or GPT-2 style "
                     "(n_embd, n_layer, vocab_size)")


# ----------------------------------------------------------------------------- pass counter
class PassCounts:
    """What the transformer computed while :func:`count_passes` was on.

    ``passes``: one dict per forward pass of the causal LM — ``rows``, ``tokens`` (real new tokens),
    ``pairs`` (causal attention pairs of those tokens), ``lower`` (its layers ``0..L−1`` ran),
    ``upper`` (its layers ``L..`` ran), ``grad`` (grad was enabled), ``head_rows`` (rows the
    output head projected). ``lower``: digest of each distinct prompt whose lower layers ran ->
    (tokens, pairs) computed for it (the fewest, if it ran more than once).
    """

    def __init__(self, lowest: int, n_layers: int) -> None:
        self.lowest = lowest
        self.n_layers = n_layers
        self.passes: list[dict[str, Any]] = []
        self.lower: dict[bytes, tuple[int, int]] = {}
        self.lower_rows = 0  # rows whose lower layers ran, repeats included
        self.lower_tokens_computed = 0  # their tokens, repeats included
        self.unknown_context = 0  # cached steps whose earlier tokens were not seen (keyed uniquely)

    def summary(self) -> dict[str, int]:
        """Totals over the passes (JSON-ready); what :func:`floor_flops` reads."""
        upper = [p for p in self.passes if p["upper"]]
        grad = [p for p in upper if p["grad"]]
        return {
            "lowest": self.lowest, "layers": self.n_layers,
            "passes": len(self.passes), "lower_passes": sum(p["lower"] for p in self.passes),
            "upper_passes": len(upper), "grad_passes": len(grad),
            "lower_prompts": len(self.lower), "lower_tokens": sum(t for t, _ in self.lower.values()),
            "lower_pairs": sum(p for _, p in self.lower.values()),
            "lower_rows_computed": self.lower_rows, "lower_tokens_computed": self.lower_tokens_computed,
            "upper_tokens": sum(p["tokens"] for p in upper), "upper_pairs": sum(p["pairs"] for p in upper),
            "upper_tokens_grad": sum(p["tokens"] for p in grad), "upper_pairs_grad": sum(p["pairs"] for p in grad),
            "head_rows": sum(p["head_rows"] for p in self.passes),
            "head_rows_grad": sum(p["head_rows"] for p in self.passes if p["grad"]),
            "unknown_context": self.unknown_context,
        }


def _causal_lm(model: nn.Module) -> nn.Module:
    from emsedit.prefix_cache import PrefixCachedModel

    return model.model if isinstance(model, PrefixCachedModel) else model


def _layers_and_lowest(model: nn.Module, lm: nn.Module, edit_modules: Sequence[str] | None
                       ) -> tuple[nn.ModuleList, int]:
    """The decoder layer list and the lowest edited layer (0: no lower layers known)."""
    from emsedit.prefix_cache import PrefixCachedModel, find_layer_list

    if isinstance(model, PrefixCachedModel) and model.enabled:
        return model.layers, model.lowest
    if edit_modules is None:  # load_model leaves only the edited weights trainable
        edit_modules = [name for name, m in lm.named_modules()
                        if getattr(getattr(m, "weight", None), "requires_grad", False) and name]
    found = find_layer_list(lm, list(edit_modules)) if edit_modules else None
    if found:
        return found
    n_layers = _get(lm.config, "num_hidden_layers", "n_layer")
    for _name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (n_layers is None or len(module) == n_layers):
            return module, 0
    raise ValueError(f"no decoder layer list found in {type(lm).__name__}")


def _digest(seq: list[int]) -> bytes:
    return hashlib.blake2b(array("q", seq).tobytes(), digest_size=16).digest()


def _unpacked(ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed row (sequences back to back, each one's positions counting up by 1) as right-padded
    rows and their attention mask, so that each sequence counts as its own prompt."""
    pos = positions.reshape(-1).to("cpu")
    starts = [0] + [i for i in range(1, len(pos)) if int(pos[i]) != int(pos[i - 1]) + 1]
    bounds = list(zip(starts, starts[1:] + [len(pos)]))
    width = max(b - a for a, b in bounds)
    rows = ids.new_zeros(len(bounds), width)
    mask = torch.zeros(len(bounds), width, dtype=torch.long)
    for r, (a, b) in enumerate(bounds):
        rows[r, :b - a] = ids[0, a:b]
        mask[r, :b - a] = 1
    return rows, mask


@contextmanager
def count_passes(model: nn.Module, *, edit_modules: Sequence[str] | None = None) -> Iterator[PassCounts]:
    """Count what every forward pass through ``model``'s transformer computes (see :class:`PassCounts`).

    ``model`` is a :class:`~emsedit.prefix_cache.PrefixCachedModel` (its ``lowest`` splits lower from
    upper layers) or a plain HF causal LM (split at the lowest layer holding ``edit_modules``, by
    default the modules whose weight requires grad; none: every layer is upper). Hooks go on the
    causal LM (the pass's ids and attention mask; generation calls it directly, bypassing the prefix
    cache), on the original first decoder layer (lower layers ran: a replayed pass swaps them for a
    stand-in and does not call it; an early-stopped pass of :meth:`PrefixCachedModel.warm` runs
    only them), on the first upper layer and on the output head (rows it projected). All are removed
    on exit, also on error.
    """
    lm = _causal_lm(model)
    layers, lowest = _layers_and_lowest(model, lm, edit_modules)
    counts = PassCounts(lowest, len(layers))
    state: dict[str, Any] = {"pass": None, "inputs": None, "last": None, "unknown": 0}

    def new_pass(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        if ids is None:  # inputs_embeds: token counts from the mask or the embeddings' shape
            embeds = kwargs.get("inputs_embeds")
            shape = tuple(embeds.shape[:2]) if embeds is not None else (0, 0)
        else:
            shape = tuple(ids.shape)
        positions = kwargs.get("position_ids")
        if ids is not None and mask is None and isinstance(positions, torch.Tensor) and ids.shape[0] == 1:
            ids, mask = _unpacked(ids, positions)  # a packed row: one row per sequence in it
            shape = tuple(ids.shape)
        rows, width = shape
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            new = mask[:, -width:].bool() if width else mask[:, :0].bool()
            context = mask[:, :mask.shape[1] - width].sum(1)
        else:
            new = torch.ones(rows, width, dtype=torch.bool)
            context = torch.zeros(rows, dtype=torch.long)
        m = new.sum(1).to("cpu", torch.long)
        c = context.to("cpu", torch.long)
        record = {"rows": rows, "tokens": int(m.sum()), "pairs": int((m * c + m * (m + 1) // 2).sum()),
                  "lower": False, "upper": False, "grad": torch.is_grad_enabled(), "head_rows": 0}
        counts.passes.append(record)
        state["pass"] = record
        cached = mask.shape[1] - width if isinstance(mask, torch.Tensor) and mask.dim() == 2 else 0
        state["inputs"] = (ids, new, m, c, cached)  # cached: positions already in the KV cache

    def lm_pre(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        new_pass(args, kwargs)

    def lower_pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
        record = state["pass"]
        if record is None or record["lower"]:
            return
        record["lower"] = True
        ids, new, m, c, past = state["inputs"]  # past: positions in the KV cache before this pass
        if ids is None:
            return
        last = state["last"]
        known_context = past == 0 or (last is not None and last[0] == past and len(last[1]) == len(ids))
        if not known_context:
            counts.unknown_context += 1
        seqs = []
        rows_ids = ids.to("cpu").tolist()
        rows_new = new.to("cpu").tolist()
        for r, (row, keep) in enumerate(zip(rows_ids, rows_new)):
            tokens = [t for t, k in zip(row, keep) if k]
            seq = (last[1][r] + tokens) if past and known_context else tokens
            seqs.append(seq)
            n = int(m[r])
            if n == 0:
                continue
            counts.lower_rows += 1
            counts.lower_tokens_computed += n
            key = _digest(seq) if known_context else _digest([-1 - counts.unknown_context, r, *seq])
            cost = (n, int(n * c[r] + n * (n + 1) // 2))
            old = counts.lower.get(key)
            counts.lower[key] = cost if old is None else min(old, cost)
        # a KV-cached step continues these sequences; the key width is the full mask width
        state["last"] = (past + ids.shape[1], seqs)

    def upper_pre(_module: nn.Module, _args: tuple[Any, ...]) -> None:
        record = state["pass"]
        if record is not None:
            record["upper"] = True
            record["grad"] = torch.is_grad_enabled()

    def head_post(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
        record = state["pass"]
        if record is None:  # the head called outside a pass of the causal LM
            record = {"rows": 0, "tokens": 0, "pairs": 0, "lower": False, "upper": False,
                      "grad": torch.is_grad_enabled(), "head_rows": 0}
            counts.passes.append(record)
        if isinstance(output, torch.Tensor) and output.dim():
            record["head_rows"] += output.numel() // max(1, output.shape[-1])

    originals = list(layers)  # not stand-ins: the counter is entered outside any replay
    handles = [lm.register_forward_pre_hook(lm_pre, with_kwargs=True)]
    try:
        if lowest > 0:
            handles.append(originals[0].register_forward_pre_hook(lower_pre))
        handles.append(originals[lowest].register_forward_pre_hook(upper_pre))
        head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
        if head is not None:
            handles.append(head.register_forward_hook(head_post))
        yield counts
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- floor
def floor_flops(counts: PassCounts | Mapping[str, int], model_config: Any) -> dict[str, int]:
    """The FLOPs a counted job cannot avoid (module docstring), by part, and their ``total``.

    ``counts`` is a :class:`PassCounts` or its :meth:`~PassCounts.summary`; ``model_config`` the HF
    config of the model (``model.config``) or a dict of its fields.
    """
    s = counts.summary() if isinstance(counts, PassCounts) else counts
    size = layer_sizes(model_config)
    lowest, n_layers = int(s["lowest"]), int(s.get("layers", size["layers"]))
    upper = n_layers - lowest
    p, q = size["layer_params"], size["q_dim"]
    head = 2 * size["hidden"] * size["vocab"]
    parts = {
        "lower": lowest * (2 * p * s["lower_tokens"] + 4 * q * s["lower_pairs"]),
        "upper_forward": upper * (2 * p * s["upper_tokens"] + 4 * q * s["upper_pairs"]),
        "upper_backward": max(0, upper - 1) * (2 * p * s["upper_tokens_grad"] + 8 * q * s["upper_pairs_grad"]),
        "head_forward": head * s["head_rows"],
        "head_backward": head * s["head_rows_grad"],
    }
    parts["total"] = sum(parts.values())
    return parts


# ----------------------------------------------------------------------------- executed FLOPs
def _cpu_attention_formulas() -> dict[Any, Any]:
    """FLOP formulas for the CPU attention kernels that torch's counter leaves out (it knows the CUDA
    ones): full (query × key) products, as torch counts every attention kernel (the kernel with an
    explicit mask computes the masked pairs too)."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    formulas: dict[Any, Any] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        def forward(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
            return fc.sdpa_flop_count(query, key, value)

        formulas[aten._scaled_dot_product_flash_attention_for_cpu] = forward
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        def backward(grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None,
                     **kwargs: Any) -> int:
            return fc.sdpa_backward_flop_count(grad_out, query, key, value)

        formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    return formulas


@contextmanager
def count_executed() -> Iterator[dict[str, Any]]:
    """Count the FLOPs of every matmul and attention kernel run inside (forward and backward).

    Yields a dict filled on a normal exit with ``total`` and ``by_roots``: FLOPs by the set of
    outermost modules active when each op ran (modules named by their class, as torch's module
    tracker names modules called from outside any other; the empty set: outside every module).
    Split it with :func:`executed_split`. Counting slows the job down (a dispatch per op): time the
    job in another run.
    """
    from torch.utils.flop_counter import FlopCounterMode

    class _ByRoots(FlopCounterMode):
        # Per op, not per module: torch's per-module totals count an op for every module its
        # tracker thinks active, and in a backward the tracker keeps a module whose inputs need no
        # gradient (the transformer's ids, a hypernetwork's detached keys) active to the end of the
        # backward. (Private torch API, pinned with torch 2.13.0; tests/test_floor.py checks it.)
        def _count_flops(self, func_packet: Any, out: Any, args: Any, kwargs: Any) -> Any:
            if func_packet in self.flop_registry:
                n = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                roots = frozenset(p.split(".", 1)[0] for p in self.mod_tracker.parents if p != "Global")
                by_roots[roots] = by_roots.get(roots, 0) + int(n)
            return out

    found: dict[str, Any] = {}
    by_roots: dict[frozenset[str], int] = {}
    with _ByRoots(display=False, custom_mapping=_cpu_attention_formulas()):
        yield found
    found["total"] = sum(by_roots.values())
    found["by_roots"] = by_roots


def executed_split(executed: Mapping[str, Any], model: nn.Module) -> dict[str, int]:
    """A :func:`count_executed` result by part: ``transformer`` (ops inside ``model``: a root named by a
    class of its modules that torch.nn does not define, the model itself or its layers),
    ``editor_networks`` (ops inside any other root: the editors' hypernetworks, a bare ``nn.Linear``;
    they take precedence, since a backward through the transformer into a hypernetwork leaves the
    transformer marked active), ``outside_modules`` (the editors' algebra outside any module: ridge
    solves, weight updates; its backward inside a backward through the transformer counts as
    transformer) and ``total``."""
    classes = {type(m).__name__ for m in model.modules() if not type(m).__module__.startswith("torch.")}
    parts = {"transformer": 0, "editor_networks": 0, "outside_modules": 0}
    for roots, n in executed["by_roots"].items():
        part = ("editor_networks" if roots - classes else "transformer" if roots else "outside_modules")
        parts[part] += n
    return {**parts, "total": int(executed["total"])}
