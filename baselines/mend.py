"""MEND as re-implemented in MALMEN and used by the EMSEdit repository (spec §7.1).

The shift is a sum of outer products of pseudo-keys and pseudo-gradients, ``ΔW = −lr·Σ k̃ g̃ᵀ``,
instead of the ridge solve; its meta-gradient is taken by autograd through ⟨Γ, ΔW(θ)⟩.
"""

from __future__ import annotations

import torch

from emsedit.editors.base import Editor, Shifts, StepCache
from emsedit.shifts import outer_shift


class MEND(Editor):
    """MEND: outer-product shift, KL locality loss, up to ``max_steps`` training turns."""

    shift = "outer"

    def _shift(self, step: int, name: str, keys: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
        net = self.nets[step][self.group_of[name]]
        idx = self.index_of[name]
        total = keys.new_zeros(keys.shape[1], grads.shape[1])
        for start in range(0, keys.shape[0], self.hp.chunk_size):
            pk, pg = net(keys[start:start + self.hp.chunk_size], grads[start:start + self.hp.chunk_size], idx)
            total = total + outer_shift(pk, pg, net.module_lr(idx))
        return total

    def predict(self, step: int, cache: StepCache) -> Shifts:
        with torch.no_grad():
            return {n: self._shift(step, n, cache.keys[n], cache.grads[n]) for n in self.modules}

    def accumulate_metagrad(self, step: int, cache: StepCache, shifts: Shifts, gammas: Shifts) -> None:
        for name in self.modules:
            keys, grads = cache.keys[name], cache.grads[name]
            net = self.nets[step][self.group_of[name]]
            idx = self.index_of[name]
            for start in range(0, keys.shape[0], self.hp.chunk_size):
                pk, pg = net(keys[start:start + self.hp.chunk_size], grads[start:start + self.hp.chunk_size], idx)
                (gammas[name] * outer_shift(pk, pg, net.module_lr(idx))).sum().backward()
