"""The shared editing machinery (``base``) and EMSEdit itself; the baselines live in ``baselines/``.

Editors are found by name through :mod:`emsedit.registry`, which reads each editor's declaration
(its class and label) from ``config/editors/<name>.yaml``.
"""

from __future__ import annotations

from emsedit.editors.base import Editor, NonFiniteError
from emsedit.editors.emsedit import EMSEdit

__all__ = ["Editor", "EMSEdit", "NonFiniteError"]
