"""Running experiment cells: the unedited baseline, and sequential / batch editing runs.

A cell is one (editor, model, dataset, protocol, turns, edits, steps, loss, seed, …) combination;
:func:`evaluate_cell` and :func:`run_cell` each return one result record (see
``workflow/schemas/result.schema.yaml``). Sequential editing applies ``turns`` turns of ``edits``
requests, S steps each, and evaluates once after the last turn over all edits (spec §5.2); batch
editing is the same with one turn (spec §5.3). What a cell runs on (configs, requests, seeded
orders, turns) is planned by :mod:`emsedit.plans`; resumable state is written by a checkpointer here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from emsedit import editor_archive
from emsedit.checkpoints import load_checkpoint, save_checkpoint
from emsedit.config import ConfigError, ModelConfig, find_config
from emsedit.data import Turn
from emsedit.hparams import EditorHParams
from emsedit.evaluation import METRIC_VIEWS, EvalSettings, Probes, build_probes, evaluate_views
from emsedit.generation import DEFAULT_MARGIN
from emsedit.metrics import MetricQuirks, evaluate_turns
from emsedit.models import load_model, resolve_modules, tokenizer_digest
from emsedit.plans import DataPlan, build_turns, load_dataset_config, pick, plan_data
from emsedit.prefix_cache import PrefixCachedModel, load_shared, read_shared_header, save_shared, warm_turns
from emsedit.progress import Progress
from emsedit.records import provenance
from emsedit.registry import editor_class
from emsedit.timing import PhaseTimer

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- cells
@dataclass
class CellOptions:
    """Everything a run needs besides the editor's hyperparameters."""

    model: str
    dataset: str
    seed: int
    protocol: str = "sequential"
    turns: int = 1
    edits: int = 10
    train_turns: int | None = None
    eval_file: str | None = None
    train_file: str | None = None
    order_file: str | None = None
    pre_record: str | None = None
    prefix_out: str | None = None  # evaluate: write the lower layers' activations here (shared)
    prefix_in: str | None = None  # run: replay the lower layers' activations from this file
    prefix_max_mb: float = 512.0  # evaluate / share-training: write an empty file instead beyond this size
    train_prefix_in: str | None = None  # run: replay the training requests' lower layers from this file
    threads: int | None = None
    curve: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every_s: float = 60.0
    data_dir: str = "resources/data"
    tags: dict[str, str] = field(default_factory=dict)
    metric_quirks: dict[str, bool] = field(default_factory=dict)
    prefix_cache: bool = True  # compute the layers below the lowest edited one once per mini-batch
    device: str = "auto"  # "auto": CUDA when available, else CPU; or any torch device string
    save_editor: str | None = None  # run: write the trained editor here (emsedit/editor_archive.py)
    load_editor: str | None = None  # run: load a trained editor from here instead of meta-training
    metrics: str = ",".join(METRIC_VIEWS)  # metric views (emsedit/evaluation.py): teacher_forced[,generated]
    generation_margin: int = DEFAULT_MARGIN  # generated view: new tokens beyond the gold answer's count
    keep_graph_mb: float = 1024.0  # run: hypernetwork activations a training prediction keeps for its
    # meta-gradient (Editor.keep_graph_bytes); 0 = run the forward again, as the official code (same numbers)

    @property
    def torch_device(self) -> torch.device:
        """The device the model, the batches and the hypernetworks live on."""
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def old_label_pad(self) -> int:
        """Pad value of CounterFact old_labels: 0 reproduces the official code, -100 goes with the
        corrected metric (``cf_oldlabel_pad_zero: false``)."""
        flag = str(self.metric_quirks.get("cf_oldlabel_pad_zero", True)).lower()
        return -100 if flag in ("false", "0", "no") else 0

    def __post_init__(self) -> None:
        if self.protocol not in ("sequential", "batch"):
            raise ConfigError(f"protocol must be sequential or batch, got {self.protocol!r}")
        if self.protocol == "batch" and self.turns != 1:
            raise ConfigError(f"batch editing has one turn; got turns={self.turns}")
        for key in ("turns", "edits"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not (math.isfinite(self.prefix_max_mb) and self.prefix_max_mb >= 0):
            raise ConfigError(f"--prefix-max-mb must be a finite number >= 0, got {self.prefix_max_mb}")
        if not (math.isfinite(self.keep_graph_mb) and self.keep_graph_mb >= 0):
            raise ConfigError(f"--keep-graph-mb must be a finite number >= 0, got {self.keep_graph_mb}")
        if self.save_editor and self.load_editor:
            raise ConfigError("--save-editor and --load-editor exclude each other (a loaded editor is not trained)")
        if self.load_editor:
            ignored = [flag for flag, value in (("--train-turns", self.train_turns), ("--train-file", self.train_file),
                                                ("--train-prefix-in", self.train_prefix_in)) if value is not None]
            if ignored:
                raise ConfigError(f"{', '.join(ignored)} and --load-editor exclude each other "
                                  "(a loaded editor is not trained; its archive records its training)")
        EvalSettings(self.metrics, margin=self.generation_margin)  # unknown views or a bad margin: ConfigError

    def eval_settings(self, model_cfg: ModelConfig) -> EvalSettings:
        """The metric views and generation settings of this cell on this model."""
        return EvalSettings(self.metrics, model_cfg.prompt_format, self.generation_margin)


def _setup(opts: CellOptions) -> tuple[ModelConfig, Any, Any, dict[str, torch.nn.Module], float]:
    if opts.threads:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    model_cfg = ModelConfig.from_yaml(find_config("models", opts.model))
    start = time.perf_counter()
    model, tokenizer = load_model(model_cfg, device=opts.torch_device)
    modules = resolve_modules(model, list(model_cfg.edit_modules))
    if opts.prefix_cache:
        model = PrefixCachedModel(model, list(modules))
    return model_cfg, model, tokenizer, modules, time.perf_counter() - start


def _base_config(opts: CellOptions, model_cfg: ModelConfig, dataset: dict[str, Any], plan: DataPlan,
                 quirks: MetricQuirks) -> dict[str, Any]:
    return {
        "model": model_cfg.to_dict(),
        "dataset": {**dataset, "files": plan.files},
        "protocol": opts.protocol,
        "turns": opts.turns,
        "edits": opts.edits,
        "seed": opts.seed,
        "threads": torch.get_num_threads(),
        "device": str(opts.torch_device),
        "metric_quirks": quirks.as_dict(),
        "eval_metrics": opts.eval_settings(model_cfg).as_dict(),
        "old_label_pad": opts.old_label_pad,
        "tags": dict(opts.tags),
    }


def evaluate_cell(opts: CellOptions) -> dict[str, Any]:
    """Score the unedited model on the first turns × edits requests of the seeded order."""
    timer = PhaseTimer()
    dataset = load_dataset_config(opts.dataset)
    quirks = MetricQuirks.from_mapping(opts.metric_quirks)
    plan = plan_data(dataset, n_eval=opts.turns * opts.edits, n_train=0, seed=opts.seed,
                     eval_file=opts.eval_file, order_file=opts.order_file, data_dir=opts.data_dir)
    model_cfg, model, tokenizer, _modules, load_s = _setup(opts)
    timer.add("load_model", load_s)
    turns = build_turns(pick(plan.eval_requests, plan.edit_order), tokenizer, opts.edits, split="eval",
                        lm_batch_size=4, old_label_pad=opts.old_label_pad, device=opts.torch_device)
    probes = build_probes(turns, tokenizer, lm_batch_size=4, device=opts.torch_device)
    with timer.phase("evaluate_pre"):
        pre = evaluate_views(model, tokenizer, turns, probes, plan.kind, quirks, opts.eval_settings(model_cfg),
                             timer=timer, phase="generate_pre")
    shared = {}
    if opts.prefix_out:
        if not isinstance(model, PrefixCachedModel):
            raise ConfigError("writing shared prefix activations needs the prefix cache (drop --no-prefix-cache)")
        with timer.phase("write_prefix"):
            written = save_shared(opts.prefix_out, model, _prefix_meta(model_cfg),
                                  max_bytes=int(opts.prefix_max_mb * 2**20))
        shared = {"prefix_activations": {"path": opts.prefix_out, "mini_batches": written}}
    return {
        "schema_version": 1,
        "kind": "evaluate",
        "config": {**_base_config(opts, model_cfg, dataset, plan, quirks), **shared},
        "edit_order": plan.edit_order,
        "metrics": {"pre": pre},
        "timings": timer.as_dict(),
        **provenance(),
    }


def _prefix_meta(model_cfg: ModelConfig) -> dict[str, str]:
    """What shared prefix activations depend on besides the token ids."""
    return {"model": model_cfg.name, "name_or_path": model_cfg.name_or_path, "dtype": model_cfg.dtype}


def _preload_prefix(opts: CellOptions, model: Any, model_cfg: ModelConfig) -> dict[str, Any]:
    """Preload shared prefix activations when given; return what the record says about them."""
    if not opts.prefix_in:
        return {}
    if not isinstance(model, PrefixCachedModel):
        raise ConfigError("--prefix-in needs the prefix cache (drop --no-prefix-cache)")
    try:
        loaded = load_shared(opts.prefix_in, model, _prefix_meta(model_cfg))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--prefix-in: {err}") from None
    return {"prefix_activations": {"path": opts.prefix_in, "mini_batches": loaded}}


def _preload_train_prefix(opts: CellOptions, model: Any, model_cfg: ModelConfig, plan: DataPlan,
                          hp: EditorHParams) -> dict[str, Any]:
    """Preload shared training activations when given; return what the record says about them."""
    if not opts.train_prefix_in:
        return {}
    if not isinstance(model, PrefixCachedModel):
        raise ConfigError("--train-prefix-in needs the prefix cache (drop --no-prefix-cache)")
    try:
        loaded = load_shared(opts.train_prefix_in, model,
                             _train_prefix_meta(model_cfg, plan, opts.edits, hp.lm_batch_size))
    except (OSError, ValueError) as err:
        raise ConfigError(f"--train-prefix-in: {err}") from None
    return {"train_activations": {"path": opts.train_prefix_in, "mini_batches": loaded}}


def _train_prefix_meta(model_cfg: ModelConfig, plan: DataPlan, edits: int, lm_batch_size: int) -> dict[str, str]:
    """What shared training activations depend on besides the token ids: the model and tokenizer, the
    train file, and the turn structure (the canonical grouping follows turns and mini-batches)."""
    return {**_prefix_meta(model_cfg), "split": "train", "tokenizer": tokenizer_digest(model_cfg),
            "train_sha256": plan.files["train"]["sha256"], "edits": str(edits), "lm_batch_size": str(lm_batch_size)}


def share_training(opts: CellOptions, out: str, *, lm_batch_size: int = 4) -> dict[str, float]:
    """Write the lower layers' activations of the first ``opts.train_turns`` training turns of the seeded
    training order (``share-training``); return how many mini-batches were written (``mini_batches``)
    and the seconds spent loading the model (``load_model``) and computing them (``lower_layers``).

    Every cell of this model, dataset, seed and turn structure that meta-trains on a prefix of that
    order replays them (``run --train-prefix-in``): its record is the one it would compute itself.
    """
    if not opts.train_turns or opts.train_turns < 1:
        raise ConfigError(f"--train-turns must be >= 1, got {opts.train_turns}")
    dataset = load_dataset_config(opts.dataset)
    plan = plan_data(dataset, n_eval=0, n_train=opts.train_turns * opts.edits, seed=opts.seed,
                     train_file=opts.train_file, data_dir=opts.data_dir, cap_train_to=opts.edits)
    if not opts.prefix_cache:
        raise ConfigError("share-training needs the prefix cache (drop --no-prefix-cache)")
    model_cfg, model, tokenizer, _modules, load_s = _setup(opts)
    turns = build_turns(pick(plan.train_requests, plan.train_order), tokenizer, opts.edits, split="train",
                        lm_batch_size=lm_batch_size, old_label_pad=opts.old_label_pad, device=opts.torch_device)
    start = time.perf_counter()
    with Progress("training activations", len(turns)) as bar:
        for turn in turns:
            warm_turns(model, [turn])
            bar.update()
    meta = {**_train_prefix_meta(model_cfg, plan, opts.edits, lm_batch_size),
            "train_order": json.dumps(plan.train_order)}
    written = save_shared(out, model, meta, max_bytes=int(opts.prefix_max_mb * 2**20))
    layers_s = time.perf_counter() - start
    log.info("%d training turns of %d: %d mini-batches written to %s (model %.1f s, layers %.1f s)",
             len(turns), opts.edits, written, out, load_s, layers_s)
    return {"mini_batches": written, "load_model": load_s, "lower_layers": layers_s}


def _check_train_prefix(opts: CellOptions, plan: DataPlan, model_cfg: ModelConfig, lm_batch_size: int) -> None:
    """Refuse a ``--train-prefix-in`` file written for another model, tokenizer, train file, turn
    structure or training order (one line, before the model loads)."""
    path = opts.train_prefix_in
    try:
        header = read_shared_header(path, _train_prefix_meta(model_cfg, plan, opts.edits, lm_batch_size), verify=True)
        order = [int(i) for i in json.loads(header.get("train_order", "null"))]
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"--train-prefix-in: {err}") from None
    common = min(len(order), len(plan.train_order))
    if order[:common] != plan.train_order[:common]:
        raise ConfigError(f"--train-prefix-in: {path}: written for another training order (seed or train file)")


def resolve_train_turns(editor_schedule: str, hp: EditorHParams, opts: CellOptions) -> int:
    """How many training turns of ``edits`` requests meta-training uses (0 for training-free)."""
    if editor_schedule == "none":
        return 0
    if opts.train_turns is not None:
        return opts.train_turns
    return hp.max_steps if editor_schedule == "batch" else opts.turns


def _checkpoint_folder(opts: CellOptions, config: dict[str, Any]) -> Path | None:
    if not opts.checkpoint_dir:
        return None
    # replayed activations and kept network graphs change no result, threads at most the last bits
    # (torch's CPU attention splits its work by thread count on some CPUs), and the metrics are
    # computed after the last edit, so a resume may differ in them
    key = json.dumps({k: v for k, v in config.items()
                      if k not in ("threads", "prefix_activations", "train_activations", "eval_metrics",
                                   "keep_graph_mb")},
                     sort_keys=True, default=str)
    return Path(opts.checkpoint_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


def discard_checkpoint(opts: CellOptions, config: dict[str, Any]) -> None:
    """Remove a finished cell's resumable state, and ``--checkpoint-dir`` itself when left empty."""
    folder = _checkpoint_folder(opts, config)
    if folder is None:
        return
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


class _Checkpointer:
    """Saves the editor's state after units of work, at most every ``every_s`` seconds."""

    def __init__(self, folder: Path | None, editor: Any, timer: PhaseTimer, every_s: float,
                 after_write: Callable[[int], None] | None = None) -> None:
        self.folder, self.editor, self.timer, self.every_s = folder, editor, timer, every_s
        self.after_write = after_write
        self.last = time.perf_counter()
        self.writes = 0
        self.curve: list[dict[str, Any]] = []  # per-turn scores so far (kept across a resume)

    def __call__(self, phase: str, units: int, *, force: bool = False) -> None:
        if self.folder is None:
            return
        if not force and time.perf_counter() - self.last < self.every_s:
            return
        meta = {"phase": phase, "units": units, "stats": self.editor.stats,
                "edit_stats": self.editor.edit_stats, "timings": dict(self.timer.seconds),
                "curve": self.curve}
        save_checkpoint(self.folder, self.editor.state_tensors(), meta)
        self.last = time.perf_counter()
        self.writes += 1
        if self.after_write is not None:
            self.after_write(self.writes)


def run_cell(hp: EditorHParams, opts: CellOptions, *,
             after_checkpoint: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Meta-train, edit and evaluate one cell; return its result record.

    ``after_checkpoint(n)`` is called after the n-th checkpoint write (the resume tests kill the
    process there)."""
    timer = PhaseTimer()
    dataset = load_dataset_config(opts.dataset)
    quirks = MetricQuirks.from_mapping(opts.metric_quirks)
    cls = editor_class(hp.name)
    archive = editor_archive.preflight(cls, hp, opts)  # a trained editor to load: nothing to train
    train_turns = 0 if archive else resolve_train_turns(cls.resolve_schedule(hp, opts.protocol), hp, opts)
    plan = plan_data(dataset, n_eval=opts.turns * opts.edits, n_train=train_turns * opts.edits,
                     seed=opts.seed, eval_file=opts.eval_file, train_file=opts.train_file,
                     order_file=opts.order_file, data_dir=opts.data_dir,
                     cap_train_to=opts.edits if opts.train_turns is None else 0)
    train_turns = len(plan.train_order) // opts.edits
    if opts.prefix_in:  # a wrong file is reported before the model loads
        try:
            read_shared_header(opts.prefix_in, _prefix_meta(ModelConfig.from_yaml(find_config("models", opts.model))),
                               verify=True)
        except (OSError, ValueError) as err:
            raise ConfigError(f"--prefix-in: {err}") from None
    if opts.pre_record:  # unedited scores of other metric views are refused before the model loads
        _check_pre_views(opts)
    if opts.train_prefix_in and train_turns:
        _check_train_prefix(opts, plan, ModelConfig.from_yaml(find_config("models", opts.model)), hp.lm_batch_size)
    model_cfg, model, tokenizer, modules, load_s = _setup(opts)
    timer.add("load_model", load_s)
    log.info("%s: model %s loaded in %.1f s; %d edit turns of %d, %d training turns", hp.name,
             model_cfg.name, load_s, opts.turns, opts.edits, train_turns)
    with timer.phase("load_prefix"):
        shared = _preload_prefix(opts, model, model_cfg)
        train_shared = _preload_train_prefix(opts, model, model_cfg, plan, hp) if train_turns else {}
    editor = cls(model, modules, hp, protocol=opts.protocol, seed=opts.seed, timer=timer)
    editor.keep_graph_bytes = int(opts.keep_graph_mb * 2**20)
    if archive:
        with timer.phase("load_editor"):
            editor_archive.load_into(editor, opts.load_editor, archive)
    collate = {"lm_batch_size": hp.lm_batch_size, "old_label_pad": opts.old_label_pad,
               "device": opts.torch_device}
    eval_turns = build_turns(pick(plan.eval_requests, plan.edit_order), tokenizer, opts.edits,
                             split="eval", **collate)
    train = build_turns(pick(plan.train_requests, plan.train_order), tokenizer, opts.edits,
                        split="train", **collate) if train_turns else []
    probes = build_probes(eval_turns, tokenizer, lm_batch_size=hp.lm_batch_size, device=opts.torch_device)
    settings = opts.eval_settings(model_cfg)

    config = _base_config(opts, model_cfg, dataset, plan, quirks)
    config.update({
        "editor": {**dataclasses.asdict(hp), "schedule": editor.schedule, "hypernetworks": editor.hypernetworks},
        "steps": hp.steps, "loss": hp.loss, "hypernetworks": editor.hypernetworks,
        "train_turns": train_turns,
        "keep_graph_mb": opts.keep_graph_mb,
        **shared,
        **train_shared,
        **(editor_archive.record_fields(opts.load_editor, archive) if archive else {}),
    })

    pre = _pre_metrics(opts, plan, model, tokenizer, eval_turns, probes, quirks, settings, timer)

    folder = _checkpoint_folder(opts, config)
    save = _Checkpointer(folder, editor, timer, opts.checkpoint_every_s, after_checkpoint)
    phase, units = "train", 0
    restored = load_checkpoint(folder) if folder else None
    if restored is not None:
        tensors, meta = restored
        editor.load_state_tensors(tensors)
        editor.stats, editor.edit_stats = meta["stats"], meta["edit_stats"]
        phase, units = meta["phase"], meta["units"]
        save.curve = list(meta.get("curve", []))
        for k, v in meta["timings"].items():
            timer.add(k, v)

    if archive and phase == "train":
        phase, units = "edit", 0  # loaded: no meta-training, no training timings
    replayed_before_training = getattr(model, "preloaded_hits", 0)
    with timer.phase("train_total") if not archive else contextlib.nullcontext():
        if phase == "train":
            editor.meta_train(train, on_turn_done=save, start=units)
            phase, units = "edit", 0
            save("edit", 0, force=True)
    replayed_in_training = getattr(model, "preloaded_hits", 0) - replayed_before_training
    if opts.save_editor:
        _save_trained(opts, editor, model_cfg, plan, timer, units, folder)
    curve = save.curve
    with timer.phase("edit_total"), Progress(f"edit {hp.name}", len(eval_turns), initial=units) as bar:
        for t, turn in enumerate(eval_turns):
            if t < units:
                continue
            editor.edit_turn(turn)
            if opts.curve:
                with timer.phase("evaluate_curve"):
                    curve.append({"turn": t + 1, **evaluate_turns(model, eval_turns[:t + 1], plan.kind,
                                                                  quirks, progress=False, per_request=False)})
            save("edit", t + 1)
            bar.update()
    log.info("scoring the edited model")
    with timer.phase("evaluate_post"):
        post = evaluate_views(model, tokenizer, eval_turns, probes, plan.kind, quirks, settings,
                              reference=pre["locality_reference"], timer=timer, phase="generate_post")
    if shared:
        shared["prefix_activations"]["replayed"] = model.preloaded_hits - replayed_in_training
    if train_shared:
        train_shared["train_activations"]["replayed"] = replayed_in_training

    metrics: dict[str, Any] = {"pre": pre, "post": post}
    if opts.curve:
        metrics["curve"] = curve
    return {
        "schema_version": 1,
        "kind": "run",
        "config": config,
        "edit_order": plan.edit_order,
        "train_order": archive["training"]["train_order"] if archive else plan.train_order,
        "metrics": metrics,
        "training": {**editor.stats, "editing_skipped_nonfinite": editor.edit_stats["skipped_nonfinite"]},
        "timings": timer.as_dict(),
        **provenance(),
    }


def _save_trained(opts: CellOptions, editor: Any, model_cfg: ModelConfig, plan: DataPlan, timer: PhaseTimer,
                  edited_turns: int, checkpoint: Path | None) -> None:
    """``--save-editor``: write the editor as meta-training left it, before its first edit."""
    if edited_turns:  # resumed after some edits: the run that trained wrote the archive
        if not Path(opts.save_editor, f"{editor_archive.STEM}.json").exists():
            raise ConfigError(f"--save-editor: the checkpoint resumed from is past the first edit, so the "
                              f"trained editor can no longer be saved (remove {checkpoint} to train again)")
        return
    with timer.phase("save_editor"):
        editor_archive.save_editor(opts.save_editor, editor, model=model_cfg.name, protocol=opts.protocol,
                                   plan=plan, edits=opts.edits, seed=opts.seed)


def _check_pre_views(opts: CellOptions) -> None:
    """A ``--pre`` record must hold this run's metric views (locality after editing needs its
    unedited outputs) computed with the same generation settings."""
    want = opts.eval_settings(ModelConfig.from_yaml(find_config("models", opts.model))).as_dict()
    have = json.loads(Path(opts.pre_record).read_text())["config"].get("eval_metrics")
    if have != want:
        raise ConfigError(f"{opts.pre_record}: evaluated with other metric views or generation settings ({have} vs "
                          f"this run's {want}); evaluate again with this run's --metrics and --generation-margin")


def _pre_metrics(opts: CellOptions, plan: DataPlan, model: Any, tokenizer: Any, eval_turns: list[Turn],
                 probes: Probes, quirks: MetricQuirks, settings: EvalSettings, timer: PhaseTimer) -> dict[str, Any]:
    """The unedited model's scores (with the unedited outputs locality is scored against): reused
    from an ``evaluate`` record when given, else computed."""
    if opts.pre_record:
        record = json.loads(Path(opts.pre_record).read_text())
        if record.get("edit_order") != plan.edit_order:
            raise ConfigError(f"{opts.pre_record}: its edit order differs from this run's")
        if record["config"].get("edits") != opts.edits:
            raise ConfigError(f"{opts.pre_record}: evaluated with {record['config'].get('edits')} edits "
                              f"per turn, this run uses {opts.edits}")
        if record["config"].get("metric_quirks") != quirks.as_dict():
            raise ConfigError(f"{opts.pre_record}: evaluated with other metric switches")
        return record["metrics"]["pre"]
    log.info("scoring the unedited model")
    with timer.phase("evaluate_pre"):
        return evaluate_views(model, tokenizer, eval_turns, probes, plan.kind, quirks, settings, timer=timer,
                              phase="generate_pre")
