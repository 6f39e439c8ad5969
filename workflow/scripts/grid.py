"""The experiment grid: compact declarations in the config expanded into one row per cell.

Used by `workflow/rules/common.smk` (to build the DAG), by the aggregation script (to know which
study and variant each record belongs to) and by the tests (to write synthetic records at the
paths the workflow expects). It imports nothing heavier than the standard library.

A *cell* is one experiment = one job = one result record. Its key is the tuple of `CELL_KEYS`;
its path under `results/runs/` encodes the whole key, so adding a seed, an editor or a variant
only adds new paths and never touches finished ones.

A *membership* row says "this cell appears in study X under variant label V". Several rows can
point at one cell (the main table and the ablations share cells; a variant that changes nothing
for an editor reuses the faithful cell), and each cell is computed once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, asdict, replace
from typing import Any, Iterable

PROTOCOLS = ("sequential", "batch")
LOSSES = ("l2", "kl")
HYPERNETWORKS = ("default", "shared", "per_step")
FAITHFUL = "faithful"

# The keys a cell is identified by, in path order.
CELL_KEYS = (
    "dataset", "model", "protocol", "editor", "steps", "iterations", "loss", "hypernetworks",
    "turns", "edits", "train_turns", "variant", "seed",
)

# A cell's stem encodes its whole key, in path order; its record, log, benchmark and checkpoint folder
# all use it (written once here; workflow/rules/experiments.smk builds its paths from it).
CELL_STEM = (
    "{dataset}/{model}/{protocol}/"
    "{editor}_S{steps}_it{iterations}_{loss}_{hypernetworks}_T{turns}xN{edits}_train{train_turns}_{variant}_seed{seed}"
)
RUN_PATTERN = f"results/runs/{CELL_STEM}.json"
# A cell's Adam iterations: its own, or (an S = 1 control) as many as the editor receives at S = k.
OWN_ITERATIONS = "own"
ORDER_PATTERN = "results/orders/{dataset}/n{n}_seed{seed}.json"
# The unedited scores depend on how requests are grouped into turns (mini-batching follows turns),
# so they are keyed by edits per turn as well as by the number of requests.
PRE_STEM = "{dataset}/{model}/n{n}xN{edits}_seed{seed}"
PRE_PATTERN = f"results/pre/{PRE_STEM}.json"
# Beside it, the unedited lower layers' activations on those requests, replayed by the cells.
PREFIX_PATTERN = f"results/pre/{PRE_STEM}.prefix.safetensors"

# The unedited lower layers' activations of a seeded training order's first {train_turns} turns of {edits}
# requests, replayed by every cell of that model, dataset, seed and edits that meta-trains on a prefix of it.
TRAIN_PREFIX_STEM = "{dataset}/{model}/train{train_turns}xN{edits}_seed{seed}"
TRAIN_PREFIX_PATTERN = f"results/pre/{TRAIN_PREFIX_STEM}.train.safetensors"

# Keys a grid entry may set; each takes a scalar or a list (lists are crossed).
GRID_KEYS = (
    "dataset", "model", "protocol", "editor", "steps", "loss", "hypernetworks",
    "turns", "edits", "train_turns", "seed", "variant",
    "controls",  # true: each cell with S > 1 also gets its S = 1 iteration-matched control cell
)


class GridError(ValueError):
    """A grid declaration that cannot be expanded (names the config key at fault)."""


@dataclass(frozen=True)
class Cell:
    """One experiment cell; `variant` here is the variant whose settings it runs with."""

    dataset: str
    model: str
    protocol: str
    editor: str
    steps: int
    iterations: str  # OWN_ITERATIONS, or "S<k>": S = 1 with the Adam iterations of S = k (a control)
    loss: str
    hypernetworks: str
    turns: int
    edits: int
    train_turns: str  # an integer as text, or "default" (the editor's own amount)
    variant: str
    seed: int

    @property
    def n(self) -> int:
        """Number of edit requests the cell edits (turns x edits per turn)."""
        return self.turns * self.edits

    @property
    def path(self) -> str:
        return RUN_PATTERN.format(**asdict(self))

    @property
    def order_path(self) -> str:
        return ORDER_PATTERN.format(dataset=self.dataset, n=self.n, seed=self.seed)

    @property
    def pre_path(self) -> str:
        return PRE_PATTERN.format(dataset=self.dataset, model=self.model, n=self.n, edits=self.edits, seed=self.seed)

    @property
    def prefix_path(self) -> str:
        return PREFIX_PATTERN.format(dataset=self.dataset, model=self.model, n=self.n, edits=self.edits,
                                     seed=self.seed)


def training_turns(cell: Cell, schedule: str, max_steps: int) -> int:
    """How many training turns a cell meta-trains on (0: training-free), as `run` resolves them
    (emsedit.protocols.resolve_train_turns with the editor class's schedule) without importing the
    editor classes: the grid's own train_turns, else `max_steps` for the batch schedule and as many
    turns as it edits for a rollout (schedule `auto`: rollout when sequential, batch in batch editing)."""
    if schedule == "none":
        return 0
    if cell.train_turns != "default":
        return int(cell.train_turns)
    if schedule == "auto":
        schedule = "batch" if cell.protocol == "batch" else "rollout"
    return max_steps if schedule == "batch" else cell.turns


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _variant_editor_spec(config: dict, variant: str, editor: str) -> dict:
    """The variant's settings for one editor ({} when the variant leaves the editor as it is)."""
    spec = (config.get("variants") or {}).get(variant)
    if spec is None:
        raise GridError(f"variants: unknown variant {variant!r} (declared: {sorted(config.get('variants') or {})})")
    return spec.get(editor) or {}


def variant_overrides(config: dict, variant: str, editor: str) -> dict:
    """Editor hyperparameter overrides (`--set KEY=VALUE`) of a variant for an editor."""
    return dict(_variant_editor_spec(config, variant, editor).get("set") or {})


def resolve_variant(config: dict, cell: Cell) -> Cell:
    """Apply a variant to a cell: scale its training amount, and fall back to the faithful cell
    when the variant changes nothing for this editor (so that cell is computed once)."""
    if cell.variant == FAITHFUL:
        return cell
    spec = _variant_editor_spec(config, cell.variant, cell.editor)
    scale = spec.get("train_turns_scale", 1)
    fixed = (spec.get("train_turns") or {}).get(cell.protocol)
    if fixed is not None and cell.train_turns != "default":
        fixed = None  # a grid that declares its own training amount keeps it
    if not spec.get("set") and scale == 1 and fixed is None:
        return replace(cell, variant=FAITHFUL)
    train_turns = cell.train_turns if fixed is None else str(int(fixed))
    if scale != 1 and fixed is None:
        if train_turns == "default":
            raise GridError(
                f"variants.{cell.variant}.{cell.editor}.train_turns_scale needs an explicit train_turns "
                f"(cell {cell.path} has train_turns: default)"
            )
        train_turns = str(int(round(int(train_turns) * scale)))
    return replace(cell, train_turns=train_turns)


def _protocol_setting(config: dict, dataset: str, protocol: str, key: str) -> Any:
    settings = (config.get("settings") or {}).get(dataset, {}).get(protocol, {})
    if key in settings:
        return settings[key]
    if key == "train_turns":
        return "default"
    if key == "turns" and protocol == "batch":
        return 1
    raise GridError(f"settings.{dataset}.{protocol}.{key} is missing (needed by a grid that does not set {key!r})")


def expand_study(config: dict, study: str) -> list[dict]:
    """Membership rows of one study: dicts with study, variant (label), the cell, and the grid index."""
    spec = config["studies"][study]
    rows: list[dict] = []
    for index, entry in enumerate(spec.get("grids") or []):
        where = f"studies.{study}.grids[{index}]"
        unknown = set(entry) - set(GRID_KEYS)
        if unknown:
            raise GridError(f"{where}: unknown keys {sorted(unknown)} (allowed: {list(GRID_KEYS)})")
        base = {
            "dataset": spec.get("datasets", config["datasets"]),
            "model": spec.get("models", config["models"]),
            "seed": spec.get("seeds", config["seeds"]),
            "variant": spec.get("variants", list(config["variants"])),
            "hypernetworks": "default",
            "steps": 1,
        }
        controls = bool(entry.get("controls", False))
        entry = {k: v for k, v in entry.items() if k != "controls"}
        base.update(entry)
        missing = [k for k in ("protocol", "editor", "loss") if k not in base]
        if missing:
            raise GridError(f"{where}: missing {missing}")
        axes = {k: _as_list(v) for k, v in base.items()}
        names = list(axes)
        for combo in itertools.product(*(axes[k] for k in names)):
            d = dict(zip(names, combo))
            for key in ("turns", "edits", "train_turns"):
                if key not in d:
                    d[key] = _protocol_setting(config, d["dataset"], d["protocol"], key)
            if d["protocol"] == "batch" and int(d["turns"]) != 1:
                raise GridError(f"{where}: batch protocol has turns=1 (got {d['turns']})")
            # A model family can name a different model config per protocol (paper: gptj / gptj_seq).
            by_protocol = (config.get("model_by_protocol") or {}).get(d["model"], {})
            d["model"] = by_protocol.get(d["protocol"], d["model"])
            label = d["variant"]
            cell = Cell(
                dataset=str(d["dataset"]), model=str(d["model"]), protocol=d["protocol"],
                editor=d["editor"], steps=int(d["steps"]), iterations=OWN_ITERATIONS, loss=d["loss"],
                hypernetworks=d["hypernetworks"], turns=int(d["turns"]), edits=int(d["edits"]),
                train_turns=str(d["train_turns"]), variant=label, seed=int(d["seed"]),
            )
            versions = [cell]
            if controls and cell.steps > 1:
                versions.append(replace(cell, steps=1, iterations=f"S{cell.steps}"))
            for version in versions:
                rows.append({"study": study, "variant_label": label, "grid": index,
                             "cell": resolve_variant(config, version)})
    return rows


def expand(config: dict) -> list[dict]:
    """Membership rows of every study, in declaration order (duplicates within a study removed)."""
    rows, seen = [], set()
    for study in config.get("studies") or {}:
        for row in expand_study(config, study):
            key = (row["study"], row["variant_label"], row["cell"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def unique_cells(rows: Iterable[dict]) -> list[Cell]:
    """The distinct cells behind membership rows (each is one job)."""
    return list(dict.fromkeys(row["cell"] for row in rows))


def membership_records(rows: Iterable[dict]) -> list[dict]:
    """Flat dicts (one per membership row) for a table: study, variant label, cell keys, paths."""
    out = []
    for row in rows:
        cell = row["cell"]
        flat = {"study": row["study"], "variant_label": row["variant_label"], "grid": row["grid"]}
        flat.update(asdict(cell))
        flat.update({"n": cell.n, "path": cell.path, "pre_path": cell.pre_path})
        out.append(flat)
    return out
