"""RLEdit (spec §7.3): a lifelong MALMEN meta-trained on a rollout with memory backtracking.

The schedule ``rollout_backtrack`` lives in the base class. Each step has its own hypernetwork
(rank ⌊r/s⌋). RLEdit's ``reg_coef`` term carries no gradient in the official code, so it is not
modelled; ``loss: l2`` swaps the KL term for EMSEdit's norm term instead. As in the official code,
the KL term is back-propagated with the step's edit reverted (``kl_backward_reverted``).
"""

from __future__ import annotations

from emsedit.editors.base import Editor


class RLEdit(Editor):
    """RLEdit with the EMSEdit repository's settings (``config/editors/rledit.yaml``)."""
