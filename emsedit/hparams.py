"""Editor hyperparameters: one frozen dataclass, loaded from ``config/editors/<name>.yaml``.

Every key has the official implementation's value as its default (spec §9.1); each quirk of the
official code that changes numbers (spec §11) is a named switch whose default reproduces it.
Unknown keys and values outside their allowed set are rejected with the file and key named.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from emsedit.config import ConfigError


# Keys of an editor YAML that declare the editor (emsedit/registry.py) rather than set a hyperparameter.
DECLARATION_KEYS = ("class", "label")

_CHOICES: dict[str, tuple[str, ...]] = {
    "loss": ("kl", "l2"),
    "shift": ("ridge", "outer", "ultra"),
    "schedule": ("auto", "batch", "rollout", "rollout_backtrack", "none"),
    "hypernetworks": ("auto", "shared", "per_step"),
    "rank_decay": ("floor_div", "none"),
    "solver": ("auto", "primal", "dual"),
    "optimizer_step": ("rollout", "turn"),
}


@dataclass(frozen=True)
class EditorHParams:
    """Everything that defines an editor; see ``config/editors/*.yaml`` for what each key means."""

    name: str
    steps: int = 1  # S, the number of MSBP edit steps per turn ("X²" is steps: 2)
    loss: str = "kl"  # locality term of the meta-loss: KL on locality prompts, or l2 on ΔW
    shift: str = "ridge"  # ridge (MALMEN), outer (MEND), ultra (UltraEdit): must name the class's rule
    schedule: str = "batch"  # meta-training schedule (emsedit/editors/schedules.py): "batch" is the step-wise
    # schedule of MEND/MALMEN (an optimiser step per MSBP step), whatever the editing protocol; "auto"
    # lets the editor pick by protocol
    hypernetworks: str = "shared"  # one network for all steps, or one per step
    rank: int = 1024
    rank_decay: str = "floor_div"  # per-step networks get rank // s
    n_blocks: int = 4
    lr: float = 1e-6  # initial per-module edit learning rate
    meta_lr: float = 1e-5  # Adam learning rate of the hypernetworks
    loc_coef: float = 0.6  # weight of the KL locality loss
    eta: float = 0.5  # weight η of the l2 norm loss (reg_coef in the official EMSEdit config)
    max_grad_norm: float = 1.0
    n_epochs: int = 1  # passes over the training turns (rollouts restart from the original weights)
    chunk_size: int = 128  # rows pushed through the hypernetwork at once
    max_steps: int = 1  # TRAINING TURNS of the batch schedule (MALMEN/EMSEdit 1, MEND 100), not MSBP steps;
    # the official key name, kept because records carry it (the grid's train_turns overrides it)
    time_decay: float = 0.95  # RLEdit memory backtracking decay
    back_depth: int = 10  # RLEdit memory backtracking depth
    solver: str = "auto"  # ridge solve form; auto = the cheaper of two equal forms
    lm_batch_size: int = 4  # LM mini-batch for caching, losses and evaluation
    # --- switches: the defaults reproduce the official code (spec §11) ---
    optimizer_step: str = "rollout"  # one Adam step per training rollout (quirk 1); "turn" = per turn
    eta_applied_twice: bool = True  # sequential norm term multiplied by η twice (quirk 3)
    batch_train_revert: bool = True  # batch training reverts the edit between steps (quirk 5)
    normalizer_update_at_eval: bool = True  # normaliser statistics keep updating while editing (quirk 9)
    ultraedit_floor_div: bool = True  # UltraEdit drops the last partial mini-batch's gradients (quirk 13)
    shared_net_adam_repeats: bool = True  # a network shared by S steps gets S Adam iterations per step (quirk 22)
    kl_backward_reverted: bool = True  # RLEdit back-propagates its KL term with the edit reverted (issue 10.5)
    # --- controls (not quirks): 1 reproduces the official code ---
    adam_iterations_per_step: int = 1  # Adam iterations per optimiser step (same gradient, same state)
    max_nonfinite_in_row: int = 3  # fail after this many consecutive non-finite steps

    def __post_init__(self) -> None:
        for key, allowed in _CHOICES.items():
            value = getattr(self, key)
            if value not in allowed:
                raise ConfigError(f"editor {self.name!r}: {key}={value!r} is not one of {list(allowed)}")
        for key in ("steps", "rank", "n_blocks", "n_epochs", "chunk_size", "max_steps", "lm_batch_size",
                    "adam_iterations_per_step"):
            if getattr(self, key) < 1:
                raise ConfigError(f"editor {self.name!r}: {key} must be >= 1, got {getattr(self, key)}")

    def with_overrides(self, overrides: Mapping[str, Any], source: str = "override") -> "EditorHParams":
        """A copy with some keys replaced (values coerced to the field's type)."""
        return from_mapping(EditorHParams, {**dataclasses.asdict(self), **overrides}, source)


def _coerce(value: Any, default: Any, key: str, source: str) -> Any:
    """Coerce strings from the command line (``--set key=value``) to the default's type."""
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return bool(value)
    try:
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if isinstance(default, float):
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
            return out
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be a finite {type(default).__name__}, got {value!r}") from None
    return value


def from_mapping(cls: type, data: Mapping[str, Any], source: str) -> Any:
    """Build a frozen dataclass from a mapping, rejecting unknown keys and coercing types."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; known keys: {sorted(known)}")
    values = {}
    for key, value in data.items():
        f = known[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        values[key] = value if default is None else _coerce(value, default, key, source)
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(f"{source}: {err}") from None


def read_editor_yaml(path: str | Path) -> Any:
    """The parsed contents of an editor YAML (hyperparameters and declaration)."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"editor config {path} does not exist") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None


def editor_hparams(data: Any, path: str | Path) -> EditorHParams:
    """The hyperparameters in an editor YAML's contents; the ``name`` must match the file name."""
    path = Path(path)
    if isinstance(data, Mapping):  # the editor's declaration (class, label) is not a hyperparameter
        data = {k: v for k, v in data.items() if k not in DECLARATION_KEYS}
    hp = from_mapping(EditorHParams, data or {}, str(path))
    if hp.name != path.stem:
        raise ConfigError(f"{path}: name {hp.name!r} does not match the file name {path.stem!r}")
    return hp


def load_editor_hparams(path: str | Path) -> EditorHParams:
    """Read ``config/editors/<name>.yaml``'s hyperparameters."""
    return editor_hparams(read_editor_yaml(path), path)
