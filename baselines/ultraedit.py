"""UltraEdit (spec §7.4): training-free, lifelong normalisation and a fixed-lr ridge shift.

Each step s keeps its own running normaliser N_s over [k; g] for every shape group, updated with
every turn. With (k̂, ĝ) = N_s([k; g]): ``v_i = −lr·‖k̂_i‖²·ĝ_i`` and ``ΔW = (KᵀK + I)⁻¹KᵀV``.
With ``ultraedit_floor_div: true`` (the official bug) the value-gradients of the last, partial LM
mini-batch are replaced by zeros when the number of edits is not a multiple of the mini-batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from emsedit.editors.base import Editor, Shifts, StepCache
from emsedit.hparams import EditorHParams
from emsedit.hypernet import RunningNorm
from emsedit.shifts import ridge_shift


class _Normalisers(nn.Module):
    """UltraEdit's per-group state: only a normaliser, so it can stand where a HyperNet would."""

    def __init__(self, key_dim: int, value_dim: int) -> None:
        super().__init__()
        self.key_dim, self.value_dim = key_dim, value_dim
        self.norm = RunningNorm(key_dim + value_dim)


class UltraEdit(Editor):
    """UltraEdit: no hypernetwork, no meta-training."""

    shift = "ultra"
    trains = False

    @classmethod
    def resolve_schedule(cls, hp: EditorHParams, protocol: str) -> str:
        return "none"

    @classmethod
    def resolve_hypernetworks(cls, hp: EditorHParams, protocol: str) -> str:
        return "per_step"

    def build_nets(self) -> list[nn.ModuleDict]:
        return [
            nn.ModuleDict({g: _Normalisers(*map(int, g.split("x"))) for g in self.groups})
            for _ in range(self.hp.steps)
        ]

    def _grads_with_quirk(self, cache: StepCache, name: str) -> torch.Tensor:
        grads = cache.grads[name]
        size = self.hp.lm_batch_size
        n_edits = getattr(self, "_turn_size", 0)
        if self.hp.ultraedit_floor_div and n_edits % size != 0 and cache.minibatch_rows:
            grads = grads.clone()
            grads[grads.shape[0] - cache.minibatch_rows[-1]:] = 0.0
        return grads

    def predict(self, step: int, cache: StepCache) -> Shifts:
        shifts = {}
        with torch.no_grad():
            for name in self.modules:
                state = self.nets[step][self.group_of[name]]
                keys = cache.keys[name]
                grads = self._grads_with_quirk(cache, name)
                z = state.norm(torch.cat([keys, grads], dim=-1))
                k_hat, g_hat = z.split([state.key_dim, state.value_dim], dim=-1)
                values = -self.hp.lr * k_hat.square().sum(-1, keepdim=True) * g_hat
                shifts[name] = ridge_shift(keys, values, 0.0, self.hp.solver)
        return shifts

    def cache(self, turn, step, *, update_norm=True):  # type: ignore[override]
        """As the base class, but the lifelong normalisers always learn (they are UltraEdit's design)."""
        self._turn_size = len(turn.requests)
        return super().cache(turn, step, update_norm=True)
