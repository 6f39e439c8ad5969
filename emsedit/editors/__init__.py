"""The editor registry: editor name → class. Add an editor by adding one line here."""

from __future__ import annotations

from baselines.malmen import MALMEN
from baselines.mend import MEND
from baselines.rledit import RLEdit
from baselines.ultraedit import UltraEdit
from emsedit.editors.base import Editor, NonFiniteError
from emsedit.editors.emsedit import EMSEdit

REGISTRY: dict[str, type[Editor]] = {
    "emsedit": EMSEdit,
    "malmen": MALMEN,
    "mend": MEND,
    "rledit": RLEdit,
    "ultraedit": UltraEdit,
}


def editor_class(name: str) -> type[Editor]:
    """Look an editor up by name; an unknown name is an error listing the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown editor {name!r}; known editors: {sorted(REGISTRY)}") from None


__all__ = ["Editor", "EMSEdit", "NonFiniteError", "REGISTRY", "editor_class"]
