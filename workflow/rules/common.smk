# Helpers shared by every stage: config validation, the experiment grid, wildcard constraints and
# the small named functions the rules call instead of lambdas.

import os
import re
import shlex
import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

SCRIPTS_DIR = Path(workflow.basedir) / "workflow" / "scripts"
sys.path.insert(0, str(SCRIPTS_DIR))
import grid  # noqa: E402  (workflow/scripts/grid.py: expands the compact grids into cells)
import studies  # noqa: E402  (workflow/scripts/studies.py: each study's tables, figures and claims)

sys.path.insert(0, str(workflow.basedir))
from emsedit import registry  # noqa: E402  (editor declarations: config/editors/<name>.yaml)

CONFIG_SCHEMA = Path(workflow.basedir) / "workflow" / "schemas" / "config.schema.yaml"


def config_error_message(cfg):
    """The first schema violation of a config, phrased as 'config key a.b[0].c: what is wrong'."""
    import jsonschema

    with open(CONFIG_SCHEMA) as fh:
        schema = yaml.safe_load(fh)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schema).iter_errors(cfg)
    )
    if error is None:
        return None
    # "x is not valid under any of the given schemas" -> the alternative that says why (e.g. the enum)
    while error.context:
        specific = [e for e in error.context if e.validator not in ("type", "oneOf", "anyOf")]
        error = specific[0] if specific else error.context[0]
        if error.validator not in ("oneOf", "anyOf"):
            break
    key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return f"invalid config key {key.lstrip('.') or '(top level)'}: {error.message}"


def validate_config():
    """Validate `config` against the schema (filling in defaults); the error names the key."""
    message = config_error_message(config)
    if message:
        raise WorkflowError(message)
    validate(config, schema=str(CONFIG_SCHEMA))


validate_config()

# Shell commands call `python -m emsedit`. Without --sdm conda, `python` (and the notebook runner,
# papermill) must be the environment's own: the folder of config `python`, or of the interpreter
# running Snakemake, goes first on PATH. PYTHONPATH gets the checkout, so the CLI imports this
# repository's emsedit even from another working directory (--directory .test).
PYTHON_BIN = os.path.dirname(config["python"] or sys.executable)
# (braces doubled: Snakemake formats the prefix like a shell command)
_pythonpath = f"export PYTHONPATH={shlex.quote(workflow.basedir)}${{{{PYTHONPATH:+:$PYTHONPATH}}}}; "
_path = f"export PATH={shlex.quote(PYTHON_BIN)}:$PATH; "
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    _path = ""
# Model jobs fork from one warm interpreter per machine when the config asks (emsedit/warm.py): an
# execution detail with the same records, so it travels in the environment, not in the commands
# (changing it reruns nothing).
_warm = "export EMSEDIT_WARM=1; " if config["warm_interpreter"] else "unset EMSEDIT_WARM; "
shell.prefix(f"set -euo pipefail; {_path}{_pythonpath}{_warm}")
CONFIG_DIR = Path(config["config_dir"])
# The editors: those of the repository's config/editors, plus any declared in <config_dir>/editors
# (an editor is its class file and its YAML; see emsedit/registry.py).
EDITORS = registry.workflow_declarations(CONFIG_DIR)


def _named_config(kind, name):
    return CONFIG_DIR / kind / f"{name}.yaml"


def check_names():
    """Reject a model, dataset, editor or study name that is not declared, naming the config key it
    came from."""
    tiny = set(config["tiny_models"])

    def check(kind, names, key, family=True):
        for name in names:
            if kind == "models" and name in tiny:
                continue
            if kind == "models" and family and name in config["model_by_protocol"]:
                per_protocol = config["model_by_protocol"][name].values()
                check(kind, per_protocol, f"model_by_protocol.{name}", family=False)
                continue
            path = _named_config(kind, name)
            if kind == "editors":  # the repository's editors and those of <config_dir>/editors
                if name in EDITORS:
                    continue
                where, known = f"config/editors/{name}.yaml or {path}", sorted(EDITORS)
            else:
                if path.is_file():
                    continue
                where, known = path, sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
                if kind == "models":
                    known += sorted(tiny)
            raise WorkflowError(
                f"invalid config key {key}: unknown {kind[:-1]} {name!r} "
                f"(no {where}; known: {', '.join(known) or 'none'})"
            )

    for study in config["studies"]:
        if study not in studies.STUDIES:
            raise WorkflowError(
                f"invalid config key studies.{study}: unknown study {study!r} "
                f"(declared in workflow/scripts/studies.py: {', '.join(studies.STUDIES)})"
            )
    for variant, spec in config["variants"].items():
        check("editors", spec, f"variants.{variant}")
    check("models", config["models"], "models")
    check("datasets", config["datasets"], "datasets")
    for study, spec in config["studies"].items():
        check("models", spec.get("models", []), f"studies.{study}.models")
        check("datasets", spec.get("datasets", []), f"studies.{study}.datasets")
        for i, entry in enumerate(spec["grids"]):
            for kind, key in (("models", "model"), ("datasets", "dataset"), ("editors", "editor")):
                if key in entry:
                    names = entry[key] if isinstance(entry[key], list) else [entry[key]]
                    check(kind, names, f"studies.{study}.grids[{i}].{key}")


check_names()

try:
    ROWS = grid.expand(config)
except grid.GridError as err:
    raise WorkflowError(f"invalid config: {err}")
CELLS = grid.unique_cells(ROWS)
CELL_BY_PATH = {cell.path: cell for cell in CELLS}
STUDIES = set(config["studies"])


def _alternatives(names):
    """A regex matching exactly the given names (or nothing when there are none)."""
    names = sorted(set(names))
    return "|".join(re.escape(n) for n in names) if names else "(?!x)x"


TINY_MODELS_RE = _alternatives(config["tiny_models"])
CONFIG_MODELS_RE = _alternatives(
    {c.model for c in CELLS} - set(config["tiny_models"])
) if CELLS else "(?!x)x"

# Tables and figures come from the study declarations (workflow/scripts/studies.py).
TABLES = studies.TABLES
FIGURES = studies.FIGURES
TABLE_FORMATS = ["csv", "md", "tex"]
# Tracked inputs that live in the repository (absolute, so `--directory .test` still finds them).
REFERENCE_DIR = Path(workflow.basedir) / "resources" / "reference"
REFERENCE_FILES = sorted(str(p) for p in REFERENCE_DIR.glob("paper_*.csv"))
RESULT_SCHEMA = str(Path(workflow.basedir) / "workflow" / "schemas" / "result.schema.yaml")
FIGURE_FORMATS = ["png", "pdf"]


wildcard_constraints:
    dataset=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    model=r"[A-Za-z0-9][A-Za-z0-9._-]*",
    protocol="|".join(grid.PROTOCOLS),
    figure=_alternatives(FIGURES),
    editor=_alternatives(EDITORS),
    loss="|".join(grid.LOSSES),
    hypernetworks="|".join(grid.HYPERNETWORKS),
    variant=_alternatives(config["variants"]),
    steps=r"\d+",
    iterations=r"own|S\d+",
    turns=r"\d+",
    edits=r"\d+",
    train_turns=r"\d+|default",
    seed=r"\d+",
    n=r"\d+",


# --- names and paths --------------------------------------------------------------------------


def model_yaml(model):
    """The model config the CLI is given: a tiny model's own model.yaml, else <config_dir>/models/M.yaml."""
    if model in config["tiny_models"]:
        return f"resources/models/{model}/model.yaml"
    return str(_named_config("models", model))


def editor_arg(wildcards):
    """The editor the CLI is given: its name for the repository's own editors, else its YAML path."""
    decl = EDITORS[wildcards.editor]
    return decl.name if decl.path.parent == registry.REPO_CONFIG_DIR / "editors" else str(decl.path)


def dataset_yaml(dataset):
    return str(_named_config("datasets", dataset))


def model_arg(wildcards):
    return model_yaml(wildcards.model)


def dataset_arg(wildcards):
    return dataset_yaml(wildcards.dataset)


def tiny_model_style(wildcards):
    return config["tiny_models"][wildcards.model]["style"]


def dataset_files(wildcards):
    """The dataset's train and eval files as fetch writes them (resources/data/<file>)."""
    with open(dataset_yaml(wildcards.dataset)) as fh:
        spec = yaml.safe_load(fh)
    try:
        return [f"resources/data/{spec[split]['file']}" for split in ("train", "eval")]
    except (KeyError, TypeError) as err:
        raise WorkflowError(f"{dataset_yaml(wildcards.dataset)}: needs train.file and eval.file ({err})")


def mirror_option(wildcards):
    """`--mirror DIR` from config data_mirror or env EMSEDIT_DATA_MIRROR; empty when neither is set."""
    mirror = config["data_mirror"] or os.environ.get("EMSEDIT_DATA_MIRROR", "")
    return f"--mirror {shlex.quote(mirror)}" if mirror else ""


def manifest_path(dataset):
    return f"results/data/{dataset}/manifest.sha256"


def dataset_manifest(wildcards):
    return manifest_path(wildcards.dataset)


def model_dir(model):
    return f"resources/models/{model}"


def n_from_cell(wildcards):
    return int(wildcards.turns) * int(wildcards.edits)


def unedited_inputs(wildcards):
    """Inputs of the unedited-model evaluation: the edit order, the model and the data."""
    return {
        "order": grid.ORDER_PATTERN.format(dataset=wildcards.dataset, n=wildcards.n, seed=wildcards.seed),
        "model": model_dir(wildcards.model),
        "data": manifest_path(wildcards.dataset),
    }


def run_inputs(wildcards):
    """Inputs of one experiment cell: its edit order, the shared unedited scores and lower-layer
    activations (of its eval requests, and of its training requests when it trains), model and data."""
    n = n_from_cell(wildcards)
    train_prefix = train_prefix_path(cell_of(wildcards))
    return {
        **({"train_prefix": train_prefix} if train_prefix else {}),
        "order": grid.ORDER_PATTERN.format(dataset=wildcards.dataset, n=n, seed=wildcards.seed),
        "pre": grid.PRE_PATTERN.format(
            dataset=wildcards.dataset, model=wildcards.model, n=n, edits=wildcards.edits, seed=wildcards.seed
        ),
        "prefix": grid.PREFIX_PATTERN.format(
            dataset=wildcards.dataset, model=wildcards.model, n=n, edits=wildcards.edits, seed=wildcards.seed
        ),
        "model": model_dir(wildcards.model),
        "data": manifest_path(wildcards.dataset),
    }


def training_turns(cell):
    """How many training turns a cell meta-trains on (0: training-free; grid.training_turns), from its
    editor declaration and variant overrides."""
    hp = EDITORS[cell.editor].hp
    overrides = grid.variant_overrides(config, cell.variant, cell.editor)
    return grid.training_turns(cell, str(overrides.get("schedule", hp.schedule)),
                               int(overrides.get("max_steps", hp.max_steps)))


def _training_shares():
    """Per (dataset, model, edits, seed): the most training turns any of its cells uses. Off (empty)
    when share_prefix_mb is 0."""
    shares = {}
    if not config["share_prefix_mb"]:
        return shares
    for cell in CELLS:
        turns = training_turns(cell)
        key = (cell.dataset, cell.model, cell.edits, cell.seed)
        if turns:
            shares[key] = max(turns, shares.get(key, 0))
    return shares


TRAINING_SHARES = _training_shares()


def train_prefix_path(cell):
    """The shared training-activation file a cell replays, or None (training-free, or sharing off)."""
    key = (cell.dataset, cell.model, cell.edits, cell.seed)
    if key not in TRAINING_SHARES or not training_turns(cell):
        return None
    return grid.TRAIN_PREFIX_PATTERN.format(dataset=cell.dataset, model=cell.model, edits=cell.edits,
                                            seed=cell.seed, train_turns=TRAINING_SHARES[key])


def cell_of(wildcards):
    """The grid cell a run_cell job computes."""
    return CELL_BY_PATH[grid.RUN_PATTERN.format(**{k: wildcards[k] for k in grid.CELL_KEYS})]


def share_training_inputs(wildcards):
    """Inputs of the shared training-activation job: the model and the data."""
    return {"model": model_dir(wildcards.model), "data": manifest_path(wildcards.dataset)}


def train_prefix_option(wildcards, input):
    """`--train-prefix-in FILE` when the cell replays shared training activations."""
    return f"--train-prefix-in {shlex.quote(input.train_prefix)}" if "train_prefix" in input.keys() else ""


def run_options(wildcards):
    """Optional CLI flags of a cell: hypernetwork sharing, training amount, iteration-matched control,
    variant overrides, tags, metric views."""
    opts = []
    if wildcards.hypernetworks != "default":
        opts += ["--hypernetworks", wildcards.hypernetworks]
    if wildcards.train_turns != "default":
        opts += ["--train-turns", wildcards.train_turns]
    if wildcards.iterations != grid.OWN_ITERATIONS:
        opts += ["--match-iterations", wildcards.iterations.removeprefix("S")]
    if wildcards.variant != grid.FAITHFUL:
        for key, value in grid.variant_overrides(config, wildcards.variant, wildcards.editor).items():
            opts += ["--set", f"{key}={value}"]
    opts += ["--tag", f"variant={wildcards.variant}", "--metrics", metric_views()]
    return " ".join(shlex.quote(o) for o in opts)


def metric_views():
    """Config eval_metrics as `--metrics` takes it (an order's evaluate and run jobs must agree)."""
    return ",".join(config["eval_metrics"])


def metrics_option(wildcards):
    """`--metrics VIEWS` of the unedited-evaluation job."""
    return f"--metrics {shlex.quote(metric_views())}"


def checkpoint_dir(wildcards, output):
    """A job-private folder for resumable meta-training state: kept when a job is interrupted, removed
    by the job once its record is written (a default run would otherwise leave ~45 GB)."""
    stem = output[0].removeprefix("results/runs/").removesuffix(".json")
    return f"results/checkpoints/{stem}"


def rule_resources(rule, *, threads=None):
    """Resources of a rule from config `resources`, the one place they are declared. A model job's
    `threads` is also its `cpus_per_task`: SLURM gets as many CPUs as the CLI will use (a dry run
    shows them here, while it caps `{threads}` in the command at its one core)."""
    resources = dict(config["resources"].get(rule, {}))
    if threads is not None:
        resources["cpus_per_task"] = threads
    return resources


# --- what the grid asks for ---------------------------------------------------------------------


def all_run_records():
    return [cell.path for cell in CELLS]


def membership_table():
    """One row per (study, variant label, cell): the aggregation's map from records to tables."""
    return grid.membership_records(ROWS)


def enabled_tables():
    return [t for t, study in TABLES.items() if study in STUDIES]


def enabled_figures():
    return [f for f, fig in FIGURES.items() if all(t in enabled_tables() for t in fig.tables)]


def table_outputs(name):
    return [f"results/tables/{name}.{ext}" for ext in TABLE_FORMATS]


def table_report_outputs():
    """The tables rule's outputs; each CSV goes into the HTML report."""
    outputs = []
    for name in enabled_tables():
        csv = f"results/tables/{name}.csv"
        outputs.append(report(csv, caption="../report/table.rst", category="Tables", labels={"table": name}))
        outputs += [f"results/tables/{name}.{ext}" for ext in TABLE_FORMATS if ext != "csv"]
    return outputs


def figure_inputs(wildcards):
    return [f"results/tables/{t}.csv" for t in FIGURES[wildcards.figure].tables]


def figure_caption(wildcards):
    return FIGURES[wildcards.figure].caption


TABLE_DESCRIPTIONS = studies.TABLE_DESCRIPTIONS


def final_outputs():
    """Everything the default target builds: tables, figures and the claims report."""
    outputs = []
    for name in enabled_tables():
        outputs += table_outputs(name)
    for name in enabled_figures():
        outputs += [f"results/figures/{name}.{ext}" for ext in FIGURE_FORMATS]
    if CELLS:
        outputs += ["results/claims.md", "results/claims.html", "results/claims.csv"]
    return outputs
