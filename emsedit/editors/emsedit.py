"""EMSEdit (spec §7.5): multi-step backpropagation with an l2 weight-norm locality loss.

Sequential protocol: S step-specific hypernetworks (rank ⌊r/s⌋), meta-trained on a rollout of
training turns with one loss at each turn's final weights. Batch protocol: one hypernetwork shared by
the S steps, updated after every step ("step-wise hypernetwork updating").
"""

from __future__ import annotations

from emsedit.editors.base import Editor


class EMSEdit(Editor):
    """The paper's editor; everything else is the shared machinery."""

    def resolve_schedule(self) -> str:
        if self.hp.schedule != "auto":
            return self.hp.schedule
        return "rollout" if self.protocol == "sequential" else "batch"

    def resolve_sharing(self) -> str:
        if self.hp.hypernetworks != "auto":
            return self.hp.hypernetworks
        return "per_step" if self.protocol == "sequential" else "shared"
