"""Typed configuration objects loaded from the YAML files under ``config/``.

``load_yaml_dataclass`` is the one generic loader: it reads a YAML mapping (or takes a dict), rejects
unknown and missing keys with an error naming the file and the key, and builds the dataclass.
Dataclasses validate and normalise their own values in ``__post_init__``; any ``ValueError`` or
``TypeError`` raised there is re-raised as :class:`ConfigError` prefixed with the file name.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

__all__ = [
    "ConfigError",
    "load_yaml_dataclass",
    "ModelConfig",
    "MaterializeSpec",
    "default_config_dir",
    "find_config",
    "find_model_config",
]

T = TypeVar("T")

#: The repository root when running from a checkout (this file is ``<root>/emsedit/config.py``).
REPO_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration file or mapping is malformed: unknown/missing key or bad value."""


def load_yaml_dataclass(cls: type[T], path_or_dict: str | os.PathLike[str] | Mapping[str, Any]) -> T:
    """Build dataclass ``cls`` from a YAML file or a mapping, rejecting unknown and missing keys.

    Errors are :class:`ConfigError` and name the source (the file path, or ``<dict>``) and the key;
    an unknown key also gets a "did you mean" suggestion from the allowed keys.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if isinstance(path_or_dict, Mapping):
        source, data = "<dict>", dict(path_or_dict)
    else:
        source = str(path_or_dict)
        try:
            with open(path_or_dict, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: invalid YAML: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at top level, got {type(data).__name__}")
    init_fields = [f for f in dataclasses.fields(cls) if f.init]
    allowed = [f.name for f in init_fields]
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), allowed, n=1)
            did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
            raise ConfigError(
                f"{source}: unknown key {key!r} for {cls.__name__} "
                f"(allowed: {', '.join(allowed)}){did_you_mean}"
            )
    for f in init_fields:
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{source}: missing required key {f.name!r} for {cls.__name__}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


_DTYPES = ("float32", "bfloat16", "float16")
#: Prompt formats of the generated evaluation (:attr:`ModelConfig.prompt_format`).
PROMPT_FORMATS = ("plain", "chat")


@dataclass(frozen=True)
class MaterializeSpec:
    """Where a model that is not on disk yet can be built from: a GGUF file inside a Python package.

    YAML form: ``{from: <python package name>, gguf_file: <file name in the package dir>}``.
    """

    source: str
    gguf_file: str

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "MaterializeSpec":
        """Parse the YAML mapping, rejecting unknown or missing keys."""
        allowed = {"from", "gguf_file"}
        for key in data:
            if key not in allowed:
                raise ValueError(f"unknown key {key!r} in 'materialize' (allowed: from, gguf_file)")
        for key in sorted(allowed):
            if not isinstance(data.get(key), str) or not data[key]:
                raise ValueError(f"'materialize.{key}' must be a non-empty string")
        return cls(source=data["from"], gguf_file=data["gguf_file"])


@dataclass(frozen=True)
class ModelConfig:
    """Which causal LM to load, how, and which of its modules are edited (``config/models/*.yaml``).

    ``edit_modules`` keeps the raw patterns (``"{24..29}"`` ranges and ``"{10,12}"`` lists are
    expanded by :func:`emsedit.models.resolve_modules`, in pattern order). ``name_or_path`` is a hub
    id or a local directory; relative directories are resolved by :mod:`emsedit.models` against the
    working directory, then the repository root.
    """

    name: str
    name_or_path: str
    edit_modules: tuple[str, ...]
    dtype: str = "float32"
    materialize: MaterializeSpec | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    #: how prompts are given to the model in the generated evaluation (emsedit/generation.py):
    #: ``plain`` (the official prompt text, as the teacher-forced scores use it) or ``chat`` (the
    #: prompt as one user turn of the tokenizer's chat template, with the generation prompt)
    prompt_format: str = "plain"

    def __post_init__(self) -> None:
        for key in ("name", "name_or_path"):
            value = getattr(self, key)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{key!r} must be a non-empty string, got {value!r}")
        mods = self.edit_modules
        if isinstance(mods, str) or not isinstance(mods, (list, tuple)):
            raise ValueError(f"'edit_modules' must be a list of strings, got {mods!r}")
        if not mods or not all(isinstance(m, str) and m for m in mods):
            raise ValueError(f"'edit_modules' must be a non-empty list of non-empty strings, got {mods!r}")
        object.__setattr__(self, "edit_modules", tuple(mods))
        if self.dtype not in _DTYPES:
            raise ValueError(f"'dtype' must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if isinstance(self.materialize, Mapping):
            object.__setattr__(self, "materialize", MaterializeSpec.from_mapping(self.materialize))
        elif self.materialize is not None and not isinstance(self.materialize, MaterializeSpec):
            raise ValueError(f"'materialize' must be a mapping or null, got {self.materialize!r}")
        if not isinstance(self.trust_remote_code, bool):
            raise ValueError(f"'trust_remote_code' must be true or false, got {self.trust_remote_code!r}")
        if self.attn_implementation is not None and not isinstance(self.attn_implementation, str):
            raise ValueError("'attn_implementation' must be a string or null")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"'prompt_format' must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> "ModelConfig":
        """Load a model config from a YAML file (unknown keys are an error naming file and key)."""
        return load_yaml_dataclass(cls, path)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-serialisable form (for result records); the inverse of the loader."""
        out: dict[str, Any] = dataclasses.asdict(self)
        out["edit_modules"] = list(self.edit_modules)
        if self.materialize is not None:
            out["materialize"] = {"from": self.materialize.source, "gguf_file": self.materialize.gguf_file}
        return out


def default_config_dir() -> Path:
    """The ``config/`` directory: ``$EMSEDIT_CONFIG_DIR`` if set, else the repository's ``config/``."""
    env = os.environ.get("EMSEDIT_CONFIG_DIR")
    return Path(env) if env else REPO_ROOT / "config"


def find_config(kind: str, name_or_path: str | os.PathLike[str],
                config_dir: str | os.PathLike[str] | None = None) -> Path:
    """Resolve a config of one kind (``models``, ``datasets``, ``editors``) to its YAML file path.

    A value ending in ``.yaml``/``.yml`` or naming an existing file is taken as a path. Otherwise it
    is looked up as ``<config_dir>/<kind>/<name>.yaml`` (``config_dir`` defaults to
    :func:`default_config_dir`). Raises :class:`ConfigError` listing the available names.
    """
    what = kind[:-1] if kind.endswith("s") else kind
    raw = Path(name_or_path)
    if raw.suffix in (".yaml", ".yml") or raw.is_file():
        if not raw.is_file():
            raise ConfigError(f"{what} config file not found: {raw}")
        return raw
    folder = Path(config_dir) / kind if config_dir is not None else default_config_dir() / kind
    for suffix in (".yaml", ".yml"):
        candidate = folder / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in folder.glob("*.y*ml")) if folder.is_dir() else []
    close = difflib.get_close_matches(str(name_or_path), names, n=3)
    hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"no {what} config named {str(name_or_path)!r} in {folder} "
        f"(available: {', '.join(names) or 'none'}){hint}"
    )


def find_model_config(name_or_path: str | os.PathLike[str],
                      config_dir: str | os.PathLike[str] | None = None) -> Path:
    """:func:`find_config` for models; load with ``ModelConfig.from_yaml(find_model_config(x))``."""
    return find_config("models", name_or_path, config_dir)
