"""MALMEN (spec §7.2): ridge least-squares shift, KL locality loss, one shared hypernetwork.

Everything is the base class's: the ``batch`` schedule meta-trains on ``max_steps`` turns (one, as
the EMSEdit repository configures it), and "MALMEN²" is ``steps: 2`` with the same network reused.
"""

from __future__ import annotations

from emsedit.editors.base import Editor


class MALMEN(Editor):
    """MALMEN with the EMSEdit repository's settings (``config/editors/malmen.yaml``)."""
