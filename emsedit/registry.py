"""Editor declarations: an editor is its class file plus its YAML in ``config/editors/``.

Each ``config/editors/<name>.yaml`` declares, beside its hyperparameters, the class that implements
the editor and the label tables and claims print::

    class: baselines.malmen:MALMEN   # module:Class, imported when the editor is first used
    label: MALMEN                    # the paper's name

Everything that needs editor names reads them from here: the CLI's help, the workflow's grid and
wildcards (through the YAML files of its ``config_dir``), and the tables and claims (labels, and the
editor's default S and loss for "MALMEN²" and "EMSEdit (KL)"). The registry sits above both
``emsedit/editors/`` and ``baselines/``: it imports an editor's class by name, lazily, so reading
names and labels never imports torch, and nothing in ``emsedit/editors/`` imports ``baselines/``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emsedit.config import REPO_ROOT, ConfigError, default_config_dir, find_config
from emsedit.hparams import DECLARATION_KEYS, EditorHParams, editor_hparams, read_editor_yaml

if TYPE_CHECKING:
    from emsedit.editors.base import Editor

REPO_CONFIG_DIR = REPO_ROOT / "config"
# Declarations read so far, by name: an editor given as a YAML path (``run --editor my/x.yaml``)
# is then found by its name too (the record and the checkpoints know it by name).
_READ: dict[str, "EditorDeclaration"] = {}


@dataclass(frozen=True)
class EditorDeclaration:
    """What the suite knows of an editor without importing it."""

    name: str
    label: str  # the paper's name (tables, figures, claims)
    class_path: str  # "module:Class"
    hp: EditorHParams  # its hyperparameters as the YAML sets them
    path: Path

    @property
    def steps(self) -> int:
        """The editor's own S ("X²" is S = 2 for an editor whose own S is 1)."""
        return self.hp.steps

    @property
    def loss(self) -> str:
        """The editor's own locality loss."""
        return self.hp.loss


def read_declaration(path: str | os.PathLike[str]) -> EditorDeclaration:
    """The declaration in one editor YAML; a missing or malformed key is named with the file."""
    path = Path(path)
    data = read_editor_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys, got {type(data).__name__}")
    for key in ("name", *DECLARATION_KEYS):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ConfigError(f"{path}: missing or empty {key!r} (see emsedit/registry.py)")
    if ":" not in data["class"]:
        raise ConfigError(f"{path}: class must read 'module:Class', got {data['class']!r}")
    hp = editor_hparams(data, path)  # checks every hyperparameter too
    decl = EditorDeclaration(name=hp.name, label=data["label"], class_path=data["class"], hp=hp, path=path)
    _READ[decl.name] = decl
    return decl


def declaration(name_or_path: str | os.PathLike[str],
                config_dir: str | os.PathLike[str] | None = None) -> EditorDeclaration:
    """The declaration of an editor given by name (in ``<config_dir>/editors``) or YAML path."""
    return read_declaration(find_config("editors", name_or_path, config_dir))


def declarations(config_dir: str | os.PathLike[str] | None = None) -> dict[str, EditorDeclaration]:
    """Every editor declared in ``<config_dir>/editors`` (default: ``config/``), by name."""
    folder = Path(config_dir if config_dir is not None else default_config_dir()) / "editors"
    return {d.name: d for d in map(read_declaration, sorted(folder.glob("*.yaml")))}


def editor_names(config_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The names of the declared editors, sorted."""
    return sorted(declarations(config_dir))


def load_class(decl: EditorDeclaration) -> type["Editor"]:
    """Import the class a declaration names; a wrong module or class name is a :class:`ConfigError`."""
    from emsedit.editors.base import Editor

    module_name, _, class_name = decl.class_path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{decl.path}: class {decl.class_path!r}: no module {err.name!r}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Editor)):
        raise ConfigError(f"{decl.path}: class {decl.class_path!r} is not an Editor subclass")
    return cls


def editor_class(name_or_path: str | os.PathLike[str],
                 config_dir: str | os.PathLike[str] | None = None) -> type["Editor"]:
    """The class of an editor given by name or YAML path; an unknown name lists the known ones.

    A name already read from a YAML path (the command line's ``--editor PATH``) resolves to that file.
    """
    known = _READ.get(str(name_or_path)) if config_dir is None else None
    return load_class(known or declaration(name_or_path, config_dir))


def workflow_declarations(config_dir: str | os.PathLike[str]) -> dict[str, EditorDeclaration]:
    """The workflow's editors: the repository's ``config/editors``, then ``<config_dir>/editors``
    (which may add editors or replace one of the same name)."""
    out = declarations(REPO_CONFIG_DIR)
    if (Path(config_dir) / "editors").is_dir():
        out.update(declarations(config_dir))
    return out
