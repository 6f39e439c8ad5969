"""EMSEdit (spec §7.5): multi-step backpropagation with an l2 weight-norm locality loss.

Sequential protocol: S step-specific hypernetworks (rank ⌊r/s⌋), meta-trained on a rollout of
training turns with one loss at each turn's final weights. Batch protocol: one hypernetwork shared by
the S steps, updated after every step ("step-wise hypernetwork updating").
"""

from __future__ import annotations

from emsedit.editors.base import Editor
from emsedit.hparams import EditorHParams


class EMSEdit(Editor):
    """The paper's editor; everything else is the shared machinery."""

    @classmethod
    def resolve_schedule(cls, hp: EditorHParams, protocol: str) -> str:
        if hp.schedule != "auto":
            return hp.schedule
        return "rollout" if protocol == "sequential" else "batch"

    @classmethod
    def resolve_hypernetworks(cls, hp: EditorHParams, protocol: str) -> str:
        if hp.hypernetworks != "auto":
            return hp.hypernetworks
        return "per_step" if protocol == "sequential" else "shared"
