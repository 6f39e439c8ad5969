"""MEND as re-implemented in MALMEN and used by the EMSEdit repository (spec §7.1).

The shift is a sum of outer products of pseudo-keys and pseudo-gradients, ``ΔW = −lr·Σ k̃ g̃ᵀ``,
instead of the ridge solve. As for the ridge editors, the rows of every module of one shape group
go through the group's network together (each row carries its module's index), in chunks of
``chunk_size`` rows; the meta-gradient is taken by autograd through ⟨Γ, ΔW(θ)⟩, written per row as
``−lr_m · ⟨k̃_i, Γ_m g̃_i⟩`` so no chunk forms a d_in × d_out matrix.
"""

from __future__ import annotations

import torch

from emsedit.editors.base import Editor, Shifts, StepCache
from emsedit.shifts import outer_shift


class MEND(Editor):
    """MEND: outer-product shift, KL locality loss, up to ``max_steps`` training turns."""

    shift = "outer"

    def predict(self, step: int, cache: StepCache) -> Shifts:
        shifts = {}
        with torch.no_grad():
            for group in self.groups:
                net = self.nets[step][group]
                names, keys, grads, idx = self._group_rows(group, cache)
                pseudo = self._network_outputs(step, group, cache, keys.shape[0],
                                               lambda sl: net(keys[sl], grads[sl], idx[sl]))
                sizes = [cache.keys[n].shape[0] for n in names]
                pks = torch.cat([pk for pk, _ in pseudo]).split(sizes)
                pgs = torch.cat([pg for _, pg in pseudo]).split(sizes)
                for name, pk, pg in zip(names, pks, pgs):
                    shifts[name] = outer_shift(pk, pg, net.module_lr(self.index_of[name]))
        return {name: shifts[name] for name in self.modules}

    def accumulate_metagrad(self, step: int, cache: StepCache, shifts: Shifts, gammas: Shifts) -> None:
        for group in self.groups:
            net = self.nets[step][group]
            names, keys, grads, idx = self._group_rows(group, cache)
            for sl, (pk, pg) in self._metagrad_chunks(step, group, cache, keys.shape[0],
                                                      lambda sl: net(keys[sl], grads[sl], idx[sl])):
                rows = idx[sl]
                projected = torch.empty_like(pk)  # Γ_m g̃_i of each row's module m
                for name in names:
                    mine = rows == self.index_of[name]
                    if mine.any():
                        projected[mine] = pg[mine] @ gammas[name].T
                lr = net.lr.weight[rows, 0]
                (-(lr * (pk * projected).sum(-1))).sum().backward()
