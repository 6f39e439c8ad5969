"""The editor base class: it owns every loop of meta-learning model editing (spec §5–§7).

An editor turns the cached (key, value-gradient) rows of a turn of edit requests into weight shifts
of the edited modules. The base class owns:

* ``cache``    — forward/backward on the edit prompts at the current weights (spec §6.2);
* ``predict``  — rows → hypernetwork → per-token value changes → ridge shift (spec §6.5);
  a training step's prediction keeps its networks' graphs for that step's meta-gradient;
* ``apply``    — in-place add (or revert) of the shifts, with a finiteness guard;
* ``edit_turn`` — the MSBP inner loop: S times cache → predict → apply, never reverted (spec §5.2);
* the meta-update through the analytic ridge gradient (spec §6.6) and the optimiser step; the
  training schedules that drive them (``meta_train``) live in :mod:`emsedit.editors.schedules`;
* the locality term of the meta-loss: KL on locality prompts or the l2 norm of the weight change.

Subclasses are small: they choose hyperparameters, resolve protocol-dependent choices, and (MEND,
UltraEdit) replace the shift rule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from emsedit.batching import passes
from emsedit.config import ConfigError
from emsedit.data import MiniBatch, Turn
from emsedit.editors.schedules import TrainingSchedules
from emsedit.hparams import EditorHParams
from emsedit.hypernet import HyperNet, step_ranks
from emsedit.losses import (
    answer_log_probs,
    cross_entropy,
    kl_locality,
    l2_weight_change_grad,
)
from emsedit.models import (
    add_shift,
    answer_rows_many,
    grad_in_out,
    restore_weights,
    snapshot_weights,
    weight_shape,
)
from emsedit.shifts import ridge_metagrad, ridge_shift
from emsedit.timing import PhaseTimer
from emsedit.tracing import Tracer


def _versions(net: nn.Module) -> tuple[int, ...]:
    """Version counters of a network's parameters and buffers: any in-place change (an Adam step, a
    normaliser update, a loaded state) moves one."""
    return tuple(t._version for t in (*net.parameters(), *net.buffers()))


class _Kept(NamedTuple):
    """A training prediction's network outputs, kept with their graph for the meta-gradient."""

    cache: "StepCache"  # the rows they were computed on
    versions: tuple[int, ...]  # the network's version counters then (see _versions)
    outputs: list[Any]  # one per chunk, with grad
    size: int  # estimated bytes of saved activations


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses, gradients or shifts."""


@dataclass
class StepCache:
    """Keys and value-gradients of one MSBP step, per edited module (N × d_k and N × d_v)."""

    keys: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    minibatch_rows: list[int] = field(default_factory=list)  # answer rows contributed by each LM mini-batch


Shifts = dict[str, torch.Tensor]
CheckpointHook = Callable[[str, int], None]


class Editor(TrainingSchedules):
    """Base class of all editors; see the module docstring for what it owns."""

    trains: bool = True  # False for training-free editors (UltraEdit)
    shift: str = "ridge"  # the shift rule this class implements; the YAML's ``shift:`` must name it

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        hp: EditorHParams,
        *,
        protocol: str,
        seed: int,
        timer: PhaseTimer | None = None,
    ) -> None:
        if protocol not in ("sequential", "batch"):
            raise ValueError(f"unknown protocol {protocol!r}; expected sequential or batch")
        self.check_hparams(hp)
        self.model, self.modules, self.hp, self.protocol = model, modules, hp, protocol
        self.timer = timer or PhaseTimer()
        self.schedule = self.resolve_schedule(hp, protocol)
        self.hypernetworks = self.resolve_hypernetworks(hp, protocol)
        self.groups: dict[str, list[str]] = {}
        for name, module in modules.items():
            d_in, d_out = weight_shape(module)
            self.groups.setdefault(f"{d_in}x{d_out}", []).append(name)
        self.group_of = {n: g for g, names in self.groups.items() for n in names}
        self.index_of = {n: i for names in self.groups.values() for i, n in enumerate(names)}
        self.generator = torch.Generator().manual_seed(seed)  # CPU: the same init on any device
        self.device = next(iter(modules.values())).weight.device
        self.nets: list[nn.ModuleDict] = [nets.to(self.device) for nets in self.build_nets()]
        self.params = self._unique_params()
        self.adam_repeats = self._adam_repeats()
        # fused: one kernel over all parameters (~3x faster than the per-tensor loop on the CPU)
        self.opt = torch.optim.Adam(self.params, lr=hp.meta_lr, fused=True) if self.params else None
        self.originals = snapshot_weights(modules)
        self.stats = {"optimizer_steps": 0, "adam_iterations": 0, "skipped_nonfinite": 0, "train_turns": 0,
                      "losses": []}
        self.edit_stats = {"skipped_nonfinite": 0}
        self._nonfinite_in_row = 0
        self._keep_graphs = False  # set while a training step predicts (keeping_graphs)
        self._kept: dict[tuple[int, str], _Kept] = {}  # (step, group) -> kept prediction outputs
        self._kept_use = {"kept": 0, "recomputed": 0}  # meta-gradient chunks by source (tests read it)

    # ------------------------------------------------------------------ choices a subclass may make
    @classmethod
    def check_hparams(cls, hp: EditorHParams) -> None:
        """Reject hyperparameters this class cannot honour (before any model is loaded)."""
        if hp.shift != cls.shift:
            raise ConfigError(f"editor {hp.name!r}: shift={hp.shift!r}, but {cls.__name__} implements the "
                              f"{cls.shift!r} shift rule")

    @classmethod
    def resolve_schedule(cls, hp: EditorHParams, protocol: str) -> str:
        """The meta-training schedule; ``auto`` is resolved by subclasses that need it."""
        if hp.schedule == "auto":
            raise ValueError(f"editor {hp.name!r} does not resolve schedule=auto")
        return hp.schedule

    @classmethod
    def resolve_hypernetworks(cls, hp: EditorHParams, protocol: str) -> str:
        """Whether the S steps share one hypernetwork (``shared``) or have one each (``per_step``)."""
        if hp.hypernetworks == "auto":
            raise ValueError(f"editor {hp.name!r} does not resolve hypernetworks=auto")
        return hp.hypernetworks

    @classmethod
    def adam_iterations_per_turn(cls, hp: EditorHParams, protocol: str) -> int:
        """Adam iterations a hypernetwork parameter receives per training turn (per rollout for the
        rollout schedules, whose optimiser steps do not depend on S).

        The batch schedule takes one optimiser step per MSBP step; a network shared by S steps gets
        S iterations per optimiser step when ``shared_net_adam_repeats`` (quirk 22).
        """
        schedule, hypernetworks = cls.resolve_schedule(hp, protocol), cls.resolve_hypernetworks(hp, protocol)
        repeats = hp.steps if (hypernetworks == "shared" and hp.shared_net_adam_repeats) else 1
        return repeats * hp.adam_iterations_per_step * (hp.steps if schedule == "batch" else 1)

    @classmethod
    def iteration_matched(cls, hp: EditorHParams, protocol: str, steps: int) -> EditorHParams:
        """The control for "S = ``steps`` vs S = 1": this editor at S = 1 with as many Adam
        iterations per training turn as it receives at S = ``steps`` (it separates MSBP from the
        number of optimiser iterations, which sets the edit strength at short training lengths)."""
        if hp.steps != 1:
            raise ValueError(f"editor {hp.name!r}: an iteration-matched control runs S = 1, not S = {hp.steps}")
        if hp.adam_iterations_per_step != 1:
            raise ValueError(f"editor {hp.name!r}: an iteration-matched control sets adam_iterations_per_step "
                             f"itself (got {hp.adam_iterations_per_step})")
        target = cls.adam_iterations_per_turn(hp.with_overrides({"steps": steps}), protocol)
        return hp.with_overrides({"adam_iterations_per_step": target // cls.adam_iterations_per_turn(hp, protocol)})

    def build_nets(self) -> list[nn.ModuleDict]:
        """One ModuleDict (shape group → HyperNet) per step; shared steps reuse the same object."""
        ranks = step_ranks(self.hp.rank, self.hp.steps, self.hp.rank_decay)
        nets: list[nn.ModuleDict] = []
        for step in range(self.hp.steps):
            if self.hypernetworks == "shared" and nets:
                nets.append(nets[0])
                continue
            rank = self.hp.rank if self.hypernetworks == "shared" else ranks[step]
            nets.append(nn.ModuleDict({
                group: HyperNet(
                    *map(int, group.split("x")), len(names), rank=rank, n_blocks=self.hp.n_blocks,
                    init_lr=self.hp.lr, generator=self.generator,
                )
                for group, names in self.groups.items()
            }))
        return nets

    def _unique_params(self) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for step_nets in self.nets:
            for p in step_nets.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def _adam_repeats(self) -> list[int]:
        """Adam iterations each parameter receives per optimiser step (aligned with ``self.params``).

        The official code lists a network once per step slot that holds it, so a network shared by
        S steps stands S times in Adam's parameter list and one ``opt.step()`` updates it S times
        with the same gradient and state (quirk 22); ``shared_net_adam_repeats: false`` counts it
        once. ``adam_iterations_per_step`` multiplies the count (the iteration-matched control).
        """
        slots: dict[int, int] = {}
        for step_nets in self.nets:
            for p in step_nets.parameters():  # a ModuleDict yields each parameter once
                slots[id(p)] = slots.get(id(p), 0) + 1
        per_step = self.hp.adam_iterations_per_step
        return [(slots[id(p)] if self.hp.shared_net_adam_repeats else 1) * per_step for p in self.params]

    def distinct_nets(self) -> list[nn.ModuleDict]:
        """The step networks without repeats (a shared network appears once)."""
        out: list[nn.ModuleDict] = []
        for nets in self.nets:
            if all(nets is not seen for seen in out):
                out.append(nets)
        return out

    # ------------------------------------------------------------------ caching
    def cache(self, turn: Turn, step: int, *, update_norm: bool = True) -> StepCache:
        """Forward/backward on the turn's edit prompts at the current weights (spec §6.2)."""
        keys: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        grads: dict[str, list[torch.Tensor]] = {n: [] for n in self.modules}
        rows = []
        for group in passes(turn.edit):
            with Tracer(self.modules) as tracer:
                where: list[Any] = []  # the scored positions, in the layout the pass ran (packed or padded)
                loss = sum(cross_entropy(*answer) for answer in answer_rows_many(self.model, group, where=where))
                k, g = tracer.keys_and_grads(loss, where[0])
            rows.extend(int((b.labels != -100).sum()) for b in group)
            for n in self.modules:
                keys[n].append(k[n])
                grads[n].append(g[n])
        out = StepCache({n: torch.cat(v) for n, v in keys.items()},
                        {n: torch.cat(v) for n, v in grads.items()}, rows)
        if update_norm and self._all_finite([*out.keys.values(), *out.grads.values()]):
            self.update_normalisers(step, out)
        return out

    def update_normalisers(self, step: int, cache: StepCache) -> None:
        """Merge the step's rows into the normaliser of the network that step ``step`` uses."""
        for name in self.modules:
            net = self.nets[step][self.group_of[name]]
            net.norm.update(torch.cat([cache.keys[name], cache.grads[name]], dim=-1))

    # ------------------------------------------------------------------ shift rule (ridge by default)
    def _group_rows(self, group: str, cache: StepCache) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
        """The group's modules, and their key and gradient rows stacked with each row's module index."""
        names = self.groups[group]
        keys = torch.cat([cache.keys[n] for n in names])
        grads = torch.cat([cache.grads[n] for n in names])
        idx = torch.cat([torch.full((cache.keys[n].shape[0],), self.index_of[n], dtype=torch.long)
                         for n in names]).to(keys.device)
        return names, keys, grads, idx

    def values(self, step: int, group: str, keys: torch.Tensor, grads: torch.Tensor,
               idx: torch.Tensor) -> torch.Tensor:
        """Per-token value changes ``v_i = −lr_m·⟨k_i, k̃_i⟩·g̃_i`` (spec §6.5), in chunks of rows.

        Rows of all modules of one shape group pass through its network together; ``idx`` holds
        each row's module, which selects that module's scale, shift and learning rate.
        """
        net: HyperNet = self.nets[step][group]
        out = [self._values_chunk(net, keys[sl], grads[sl], idx[sl]) for sl in self._chunks(keys.shape[0])]
        return torch.cat(out) if out else keys.new_zeros(0, grads.shape[1])

    @staticmethod
    def _values_chunk(net: HyperNet, k: torch.Tensor, g: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        pk, pg = net(k, g, idx)
        lr = net.lr.weight[idx]  # rows × 1
        return -lr * (k * pk).sum(-1, keepdim=True) * pg

    def _chunks(self, rows: int) -> list[slice]:
        """The row chunks of ``chunk_size`` that go through a hypernetwork at once (as the official code)."""
        return [slice(start, start + self.hp.chunk_size) for start in range(0, rows, self.hp.chunk_size)]

    # ------------------------------------------------------------------ network outputs kept for the meta-gradient
    # Autograd state a training prediction may keep for its meta-gradient, all steps together. Within
    # it the meta-gradient reuses the prediction's forward instead of running it again (a quarter of
    # the networks' training FLOPs); beyond it, it recomputes the forward, as the official code does.
    # The same chunks through the same kernels either way: the gradients are bit for bit the same.
    keep_graph_bytes: int = 1 << 30

    @contextmanager
    def keeping_graphs(self) -> Iterator[None]:
        """Within: predictions keep their networks' autograd graphs (a training step's prediction)."""
        self._keep_graphs = True
        try:
            yield
        finally:
            self._keep_graphs = False

    def _network_outputs(self, step: int, group: str, cache: StepCache, rows: int,
                         forward: Callable[[slice], Any]) -> list[Any]:
        """``forward(chunk)`` over the group's rows, chunk by chunk, detached (no grad reaches the caller).

        Under :meth:`keeping_graphs` the chunks run with grad and their outputs are kept, graph and
        all, for :meth:`_kept_outputs` of the same step, group and cache, when their saved activations
        fit in ``keep_graph_bytes`` with what is already kept.
        """
        net: HyperNet = self.nets[step][group]
        size = rows * net.saved_bytes_per_row()
        held = sum(entry.size for key, entry in self._kept.items() if key != (step, group))
        keep = self._keep_graphs and held + size <= self.keep_graph_bytes
        self._kept.pop((step, group), None)
        with torch.set_grad_enabled(keep):
            outs = [forward(sl) for sl in self._chunks(rows)]
        if not keep:
            return outs
        self._kept[(step, group)] = _Kept(cache, _versions(net), outs, size)
        return [tuple(t.detach() for t in o) if isinstance(o, tuple) else o.detach() for o in outs]

    def _kept_outputs(self, step: int, group: str, cache: StepCache) -> list[Any] | None:
        """The outputs kept by the prediction of ``step`` on ``cache``, if the network has not changed
        since (its parameters and normaliser statistics, by their version counters); else None."""
        entry = self._kept.pop((step, group), None)
        if entry is None or entry.cache is not cache or entry.versions != _versions(self.nets[step][group]):
            return None
        return entry.outputs

    def _metagrad_chunks(self, step: int, group: str, cache: StepCache, rows: int,
                         forward: Callable[[slice], Any]) -> Iterator[tuple[slice, Any]]:
        """(chunk, network output with grad) for the meta-gradient: the prediction's kept output, or
        ``forward(chunk)`` run again."""
        kept = self._kept_outputs(step, group, cache)
        for i, sl in enumerate(self._chunks(rows)):
            self._kept_use["kept" if kept is not None else "recomputed"] += 1
            yield sl, (kept[i] if kept is not None else forward(sl))

    def drop_kept_graphs(self) -> None:
        """Free the autograd state of predictions whose meta-gradient was not taken (a skipped step)."""
        self._kept.clear()

    def predict(self, step: int, cache: StepCache) -> Shifts:
        """Weight shifts (d_in × d_out) of every edited module for one step, without grad."""
        shifts = {}
        with torch.no_grad():
            for group in self.groups:
                net: HyperNet = self.nets[step][group]
                names, keys, grads, idx = self._group_rows(group, cache)
                chunks = self._network_outputs(step, group, cache, keys.shape[0], lambda sl: self._values_chunk(
                    net, keys[sl], grads[sl], idx[sl]))
                values = (torch.cat(chunks) if chunks else keys.new_zeros(0, grads.shape[1])).split(
                    [cache.keys[n].shape[0] for n in names])
                for name, v in zip(names, values):
                    lam = net.module_lamda(self.index_of[name])
                    shifts[name] = ridge_shift(cache.keys[name], v, lam, self.hp.solver)
        return {name: shifts[name] for name in self.modules}

    def accumulate_metagrad(self, step: int, cache: StepCache, shifts: Shifts, gammas: Shifts) -> None:
        """Add the hypernetwork gradient of L given Γ = ∂L/∂ΔW per module (spec §6.6)."""
        for group in self.groups:
            net: HyperNet = self.nets[step][group]
            names, keys, grads, idx = self._group_rows(group, cache)
            dvs, lam_term = [], None
            for name in names:
                lam = net.module_lamda(self.index_of[name])
                dv, dlam = ridge_metagrad(cache.keys[name], shifts[name], gammas[name], lam.detach(),
                                          self.hp.solver)
                dvs.append(dv)
                lam_term = dlam * lam if lam_term is None else lam_term + dlam * lam
            dv_all = torch.cat(dvs)
            for sl, v in self._metagrad_chunks(step, group, cache, keys.shape[0], lambda sl: self._values_chunk(
                    net, keys[sl], grads[sl], idx[sl])):
                (dv_all[sl] * v).sum().backward()
            lam_term.backward()

    # ------------------------------------------------------------------ applying shifts
    def apply(self, shifts: Shifts, sign: int = 1) -> None:
        """Add (sign=+1) or subtract (sign=−1) the shifts in place."""
        for name, delta in shifts.items():
            add_shift(self.modules[name], delta, sign)

    def _all_finite(self, tensors: Iterable[torch.Tensor]) -> bool:
        # max and min propagate NaN and are ±inf when any entry is; cheaper than isfinite(t).all()
        # on the hypernetworks' tens of millions of gradient entries (no boolean copy).
        return all(bool(torch.isfinite(t.amax()) & torch.isfinite(t.amin())) for t in tensors if t.numel())

    def _nonfinite(self, where: str, stats: dict) -> None:
        stats["skipped_nonfinite"] += 1
        self._nonfinite_in_row += 1
        if self._nonfinite_in_row >= self.hp.max_nonfinite_in_row:
            raise NonFiniteError(
                f"{self._nonfinite_in_row} non-finite steps in a row ({where}); "
                f"giving up (max_nonfinite_in_row={self.hp.max_nonfinite_in_row})"
            )

    # ------------------------------------------------------------------ editing (inference)
    def edit_turn(self, turn: Turn) -> None:
        """Apply one turn of edits: S times cache → predict → apply, never reverted (spec §5.2)."""
        for step in range(self.hp.steps):
            with self.timer.phase("edit_cache"):
                cache = self.cache(turn, step, update_norm=self.hp.normalizer_update_at_eval)
            with self.timer.phase("edit_predict_shift"):
                shifts = self.predict(step, cache)
            with self.timer.phase("edit_apply"):
                if not self._all_finite(shifts.values()):
                    self._nonfinite(f"edit step {step + 1}", self.edit_stats)
                    continue
                self._nonfinite_in_row = 0
                self.apply(shifts)
            self.zero_lm_grads()

    # ------------------------------------------------------------------ losses
    def zero_lm_grads(self) -> None:
        for module in self.modules.values():
            module.weight.grad = None

    def _answers(self, batches: Sequence[MiniBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Logits at answer positions and their labels, per mini-batch of one joined pass."""
        return answer_rows_many(self.model, batches)

    def reference_log_probs(self, batches: Sequence[MiniBatch]) -> list[torch.Tensor]:
        """Answer-position log-probabilities at the current weights (the KL reference), one per
        mini-batch, in joined passes."""
        with torch.no_grad():
            return [answer_log_probs(*answer) for group in passes(batches) for answer in self._answers(group)]

    @staticmethod
    def weighted_passes(weighted: Sequence[tuple[Turn, float]], kind: str
                        ) -> list[tuple[list[MiniBatch], list[float]]]:
        """The ``kind`` mini-batches (``equiv``, ``unrel``) of several weighted turns, joined into
        passes of up to ``PASS_ROWS`` prompts across turns (RLEdit's remembered turns share passes),
        each with its mini-batches' weights."""
        batches = [b for turn, _ in weighted for b in getattr(turn, kind)]
        weights = [w for turn, w in weighted for _ in getattr(turn, kind)]
        out, done = [], 0
        for group in passes(batches):
            out.append((group, weights[done:done + len(group)]))
            done += len(group)
        return out

    @staticmethod
    def _weighted_sum(weights: Sequence[float], terms: Sequence[torch.Tensor]) -> torch.Tensor:
        """Σ w_b·term_b, summed per distinct weight first (``w·Σ term``), so a pass of one turn's
        mini-batches adds up exactly as ``weight * sum(terms)``."""
        total = None
        for w in dict.fromkeys(weights):
            part = w * sum(t for wt, t in zip(weights, terms) if wt == w)
            total = part if total is None else total + part
        return total

    def edit_loss(self, weighted: Sequence[tuple[Turn, float]]) -> float:
        """Σ over paraphrase mini-batches of weight × CE (each a mean over its answer tokens),
        back-propagated pass by pass."""
        total = 0.0
        for group, weights in self.weighted_passes(weighted, "equiv"):
            loss = self._weighted_sum(weights, [cross_entropy(*answer) for answer in self._answers(group)])
            if not torch.isfinite(loss):
                return math.nan
            loss.backward()
            total += loss.item()
        return total

    def kl_loss(self, weighted: Sequence[tuple[Turn, float]], refs: Sequence[torch.Tensor],
                backward_at: Shifts | None = None) -> float:
        """loc_coef · weight × KL(reference ‖ edited) over the turns' locality mini-batches,
        back-propagated pass by pass; ``refs`` holds one reference per mini-batch, in order
        (:meth:`reference_log_probs` of the same turns' ``unrel`` mini-batches).

        With ``backward_at`` (edited module → weight), each pass's forward runs at the current
        weights but its backward at ``backward_at``: the weights' data is swapped in place without
        autograd noticing (as the official RLEdit's ``.data`` revert before ``backward``), so the
        input-Jacobians of the edited layers use those weights while the weight gradients keep the
        forward's activations. The current weights are put back bit for bit after each backward.
        """
        total = 0.0
        edited = None
        if backward_at is not None:
            edited = snapshot_weights(self.modules)
        done = 0
        for group, weights in self.weighted_passes(weighted, "unrel"):
            answers = self._answers(group)
            kls = [kl_locality(r, *answer) for r, answer in zip(refs[done:done + len(group)], answers)]
            done += len(group)
            loss = self._weighted_sum([w * self.hp.loc_coef for w in weights], kls)
            if not torch.isfinite(loss):
                return math.nan
            if edited is None:
                loss.backward()
            else:
                self._swap_weight_data(backward_at)
                loss.backward()
                self._swap_weight_data(edited)
            total += loss.item()
        return total

    def _swap_weight_data(self, weights: Shifts) -> None:
        """Overwrite the edited modules' weight data without bumping autograd's version counter
        (``restore_weights`` copies into the parameter itself, which a pending backward refuses)."""
        with torch.no_grad():
            for name, w in weights.items():
                self.modules[name].weight.data.copy_(w)

    def add_l2_grad(self, eta: float) -> float:
        """Add ∂/∂W of ``eta·Σ‖W − W_orig‖²_F`` to the weight grads; return the term's value."""
        value = 0.0
        for name, module in self.modules.items():
            w = module.weight
            extra = l2_weight_change_grad(w.detach(), self.originals[name], eta).to(w.dtype)
            w.grad = extra if w.grad is None else w.grad + extra
            value += eta * float((w.detach().double() - self.originals[name].double()).square().sum())
        return value

    def weight_grads(self) -> Shifts:
        """Γ = ∂L/∂W of every edited module, in the (d_in, d_out) layout, float32."""
        return {n: grad_in_out(m).float() for n, m in self.modules.items()}

    # ------------------------------------------------------------------ the meta-update
    def clip(self) -> None:
        if self.params:
            torch.nn.utils.clip_grad_norm_(self.params, self.hp.max_grad_norm)

    def optimizer_step(self) -> None:
        """One optimiser step on the hypernetworks, unless their gradient is not finite.

        A step is ``adam_repeats`` Adam iterations per parameter on the same gradient, as the
        official duplicated parameter list gives (see :meth:`_adam_repeats`); iteration i leaves out
        the parameters that receive fewer than i + 1.
        """
        if self.opt is None:
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return
        if not self._all_finite(grads):
            self.opt.zero_grad(set_to_none=True)
            self._nonfinite("hypernetwork gradient", self.stats)
            return
        iterations = max(self.adam_repeats)
        for i in range(iterations):
            for p, repeats in zip(self.params, self.adam_repeats):
                if repeats == i:
                    p.grad = None  # Adam skips a parameter without a gradient
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.stats["optimizer_steps"] += 1
        self.stats["adam_iterations"] += iterations

    def restore_weights(self) -> None:
        """Put the original weights back (the official code reloads the model after training)."""
        restore_weights(self.modules, self.originals)
        self.zero_lm_grads()

    # ------------------------------------------------------------------ state for checkpoints
    def net_tensors(self) -> dict[str, torch.Tensor]:
        """The trained editor: every distinct step network's parameters and normaliser statistics,
        keyed ``nets.<network>.<state_dict key>`` (a shared network appears once)."""
        return {f"nets.{s}.{k}": v.detach()
                for s, nets in enumerate(self.distinct_nets()) for k, v in nets.state_dict().items()}

    def load_net_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`net_tensors` (other keys are ignored; a missing or misshapen one raises)."""
        for s, nets in enumerate(self.distinct_nets()):
            prefix = f"nets.{s}."
            nets.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything needed to resume: networks (with normalisers), Adam state, pending
        hypernetwork gradients and the edited weights."""
        out: dict[str, torch.Tensor] = self.net_tensors()
        for i, p in enumerate(self.params):
            if p.grad is not None:
                out[f"grad.{i}"] = p.grad.detach()
        if self.opt is not None:
            for i, st in self.opt.state_dict()["state"].items():
                for k, v in st.items():
                    out[f"opt.{i}.{k}"] = torch.as_tensor(v)
        for name, module in self.modules.items():
            out[f"weight.{name}"] = module.weight.detach()
        return {k: v.to("cpu", copy=True) for k, v in out.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of :meth:`state_tensors`."""
        self.load_net_tensors(tensors)
        for i, p in enumerate(self.params):
            g = tensors.get(f"grad.{i}")
            p.grad = None if g is None else g.to(p.device, copy=True)
        if self.opt is not None:
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith("opt."):
                    _, i, key = k.split(".", 2)
                    state.setdefault(int(i), {})[key] = v.clone()
            sd = self.opt.state_dict()
            sd["state"] = state
            self.opt.load_state_dict(sd)
        with torch.no_grad():
            for name, module in self.modules.items():
                module.weight.copy_(tensors[f"weight.{name}"])
