"""Command line: ``python -m emsedit <command>``; ``--help`` on each command explains every option.

Commands: ``fetch`` (obtain a dataset's files), ``materialize`` (write the offline model),
``tiny-model`` (a tiny random model for tests), ``order`` (a seeded edit order), ``evaluate`` (the
unedited baseline), ``share-training`` (the training requests' unedited lower layers, shared by the
cells of a seed) and ``run`` (meta-train, edit and evaluate one experiment cell). User mistakes
exit with status 2 and a one-line cause on stderr; a result is written only when the command
succeeds, atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Sequence

from emsedit.config import ConfigError
from emsedit.registry import editor_names

# Printing help or rejecting a bad option imports neither torch nor transformers: the commands import
# what they need when they run.


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that are the user's mistakes: one line on stderr, exit status 2."""
    from emsedit.acquire import AcquireError
    from emsedit.data import DataError
    from emsedit.models import ModelNotMaterializedError, ModuleResolutionError

    return (ConfigError, DataError, AcquireError, ModuleResolutionError, ModelNotMaterializedError, KeyError,
            FileNotFoundError)


def _key_values(items: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model config name in config/models (e.g. smollm2-135m) or a YAML path")
    p.add_argument("--dataset", required=True, help="dataset config name in config/datasets (zsre, counterfact) or a YAML path")
    p.add_argument("--seed", type=int, required=True, help="seed of the edit order (and of hypernetwork initialisation)")
    p.add_argument("--out", required=True, help="where to write the JSON result record")
    p.add_argument("--eval-file", help="edit/evaluate the requests of this file (any supported schema) instead of the configured eval split")
    p.add_argument("--order", dest="order_file", help="read the edit order from this file (written by `order`) instead of drawing it from --seed")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default="resources/data", help="where dataset files are kept (default: resources/data)")
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute the unedited lower layers on every pass (slower; same results)")
    p.add_argument("--tag", action="append", default=[], metavar="KEY=VALUE", help="label stored in config.tags (repeatable)")
    p.add_argument("--metric", action="append", default=[], metavar="SWITCH=BOOL",
                   help="metric switch: cf_oldlabel_pad_zero, cf_minibatch_truncation (true = the official code's "
                        "behaviour, the default; false = corrected)")
    p.add_argument("--metrics", metavar="VIEWS",
                   help="metric views, comma-separated: teacher_forced (the official scores, always; with portability "
                        "and locality against the unedited model) and generated (greedy answers: exact match and "
                        "contains). Default: teacher_forced,generated. A run's --pre record must have the same")
    p.add_argument("--generation-margin", type=int, metavar="N",
                   help="generated view: decode at most the gold answer's token count + N new tokens (default: 5); "
                        "the prompt format is the model config's prompt_format (plain or chat)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emsedit", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch", help="obtain a dataset's train and eval files (sha256-verified)")
    p.add_argument("--dataset", required=True, help="dataset config name or YAML path")
    p.add_argument("--mirror", help="mirror folder to copy from (default: $EMSEDIT_DATA_MIRROR)")
    p.add_argument("--data-dir", default="resources/data", help="where files are kept (default: resources/data)")

    p = sub.add_parser("materialize", help="write the offline model as fp32 safetensors (once)")
    p.add_argument("--model", required=True, help="model config name or YAML path")
    p.add_argument("--out", help="output folder (default: the config's name_or_path)")

    p = sub.add_parser("tiny-model", help="write a tiny random model and its config YAML (tests, tiny workflow)")
    p.add_argument("--out", required=True, help="output folder; DIR/model.yaml is its model config")
    p.add_argument("--style", default="llama", choices=("llama", "gpt2"), help="architecture (default: llama)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (default: 0)")

    p = sub.add_parser("order", help="write a seeded edit order shared by every cell of that seed")
    p.add_argument("--dataset", required=True, help="dataset config name or YAML path")
    p.add_argument("--n", type=int, required=True, help="number of edits in the order")
    p.add_argument("--seed", type=int, required=True, help="seed of the permutation")
    p.add_argument("--out", required=True, help="output JSON")
    p.add_argument("--eval-file", help="draw from this file instead of the configured eval split")
    p.add_argument("--data-dir", default="resources/data", help="where dataset files are kept")

    p = sub.add_parser("evaluate", help="score the unedited model on the first N requests of a seeded order")
    _add_common(p)
    p.add_argument("--n", type=int, required=True, help="number of requests")
    p.add_argument("--edits", type=int, help="requests per turn, to group mini-batches as the runs do (default: N)")
    p.add_argument("--prefix-out", help="also write the unedited lower layers' activations of these requests "
                                        "here (safetensors), for `run --prefix-in`")
    p.add_argument("--prefix-max-mb", type=float, default=512.0,
                   help="write an empty --prefix-out file when the activations exceed this size (default: 512)")

    p = sub.add_parser("share-training", help="write the unedited lower layers' activations of a seeded training "
                                              "order, replayed by every cell that meta-trains on a prefix of it")
    p.add_argument("--model", required=True, help="model config name in config/models or a YAML path")
    p.add_argument("--dataset", required=True, help="dataset config name in config/datasets or a YAML path")
    p.add_argument("--seed", type=int, required=True, help="seed of the training order (as the cells' --seed)")
    p.add_argument("--edits", type=int, required=True, help="requests per training turn (as the cells' --edits)")
    p.add_argument("--train-turns", type=int, required=True,
                   help="training turns to cover: the most any cell of this order uses (cells needing more "
                        "compute the rest themselves)")
    p.add_argument("--out", required=True, help="the safetensors file to write (for `run --train-prefix-in`)")
    p.add_argument("--train-file", help="the training requests of this file instead of the configured train split")
    p.add_argument("--prefix-max-mb", type=float, default=512.0,
                   help="write an empty file when the activations exceed this size (default: 512)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--data-dir", default="resources/data", help="where dataset files are kept (default: resources/data)")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1, ...")

    p = sub.add_parser("run", help="meta-train, edit and evaluate one experiment cell")
    _add_common(p)
    p.add_argument("--editor", required=True,
                   help=f"editor name: {', '.join(editor_names())} (config/editors), or an editor YAML path")
    p.add_argument("--protocol", choices=("sequential", "batch"), default="sequential", help="sequential (turns × edits) or batch (one turn)")
    p.add_argument("--turns", type=int, default=1, help="number of turns (1 for batch)")
    p.add_argument("--edits", type=int, required=True, help="edits per turn (the batch size in batch editing)")
    p.add_argument("--steps", type=int, help="S, MSBP steps per turn (default: the editor's; X² = 2)")
    p.add_argument("--loss", choices=("l2", "kl"), help="locality loss (default: the editor's)")
    p.add_argument("--hypernetworks", choices=("shared", "per_step"), help="one network for all steps or one per step (default: the editor's)")
    p.add_argument("--train-turns", type=int, help="training turns of `edits` requests (default: the editor's rule)")
    p.add_argument("--train-file", help="meta-train on this file instead of the configured train split")
    p.add_argument("--pre", dest="pre_record", help="reuse metrics.pre from this `evaluate` record (same order and edits)")
    p.add_argument("--prefix-in", help="replay the lower layers' activations written by `evaluate --prefix-out` "
                                       "(same model; mini-batches are matched by content)")
    p.add_argument("--train-prefix-in", help="replay the training requests' lower layers written by `share-training` "
                                             "(same model, tokenizer, seed, train file and --edits; else refused)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override an editor hyperparameter or switch (repeatable; see config/editors)")
    p.add_argument("--match-iterations", type=int, metavar="S",
                   help="control cell: run S = 1 with as many Adam iterations per training turn as this "
                        "editor receives at S (sets adam_iterations_per_step)")
    p.add_argument("--keep-graph-mb", type=float, default=1024.0, metavar="MB",
                   help="keep up to this many MiB of hypernetwork activations from a training step's prediction "
                        "for its meta-gradient instead of running the forward again (default: 1024; 0 = recompute, "
                        "as the official code: lower peak memory, same numbers)")
    p.add_argument("--curve", action="store_true", help="also evaluate after every turn (slow)")
    p.add_argument("--checkpoint-dir", help="save resumable state here; a rerun resumes from it")
    p.add_argument("--checkpoint-every", type=float, default=60.0, help="seconds between checkpoints (default: 60; 0 = every turn)")
    p.add_argument("--keep-checkpoint", action="store_true",
                   help="keep the resumable state after the record is written (default: remove it; "
                        "a MALMEN state is ~0.3 GB)")
    p.add_argument("--save-editor", metavar="DIR",
                   help="write the trained editor here after meta-training (hypernetworks with their normaliser "
                        "statistics as safetensors, and JSON); reuse it with --load-editor")
    p.add_argument("--load-editor", metavar="DIR",
                   help="skip meta-training: edit with the editor written by --save-editor (same editor, model, "
                        "edited modules, steps, sharing and hyperparameters, else refused)")
    return parser


def _cell_options(args: argparse.Namespace) -> Any:
    from emsedit.protocols import CellOptions

    from emsedit.metrics import MetricQuirks

    quirks: dict[str, bool] = {}
    for key, value in _key_values(args.metric, "--metric").items():
        if value.lower() not in ("true", "false"):
            raise ConfigError(f"--metric {key} must be true or false, got {value!r}")
        quirks[key] = value.lower() == "true"
    try:
        MetricQuirks.from_mapping(quirks)
    except ValueError as err:
        raise ConfigError(f"--metric: {err}") from None
    return CellOptions(
        model=args.model, dataset=args.dataset, seed=args.seed,
        protocol=getattr(args, "protocol", "sequential"), turns=getattr(args, "turns", 1),
        edits=args.edits or args.n if args.command == "evaluate" else args.edits,
        train_turns=getattr(args, "train_turns", None), eval_file=args.eval_file,
        train_file=getattr(args, "train_file", None), order_file=args.order_file,
        pre_record=getattr(args, "pre_record", None), threads=args.threads,
        prefix_out=getattr(args, "prefix_out", None), prefix_in=getattr(args, "prefix_in", None),
        train_prefix_in=getattr(args, "train_prefix_in", None),
        prefix_max_mb=getattr(args, "prefix_max_mb", 512.0),
        keep_graph_mb=getattr(args, "keep_graph_mb", 1024.0),
        curve=getattr(args, "curve", False), checkpoint_dir=getattr(args, "checkpoint_dir", None),
        checkpoint_every_s=getattr(args, "checkpoint_every", 60.0), data_dir=args.data_dir,
        tags=_key_values(args.tag, "--tag"), metric_quirks=quirks, prefix_cache=args.prefix_cache,
        device=args.device, save_editor=getattr(args, "save_editor", None),
        load_editor=getattr(args, "load_editor", None),
        **{key: getattr(args, key) for key in ("metrics", "generation_margin") if getattr(args, key) is not None},
    )


def _dispatch(args: argparse.Namespace) -> int:
    from emsedit import plans, protocols
    from emsedit.records import write_record

    if args.command == "fetch":
        from emsedit.acquire import obtain_dataset

        dataset = plans.load_dataset_config(args.dataset)
        for split in ("train", "eval"):
            print(obtain_dataset(dataset, split, data_dir=args.data_dir, mirror=args.mirror))
        return 0
    if args.command == "materialize":
        from emsedit.config import ModelConfig
        from emsedit.models import materialize_model

        cfg = ModelConfig.from_yaml(plans.find_config("models", args.model))
        print(materialize_model(cfg, args.out))
        return 0
    if args.command == "tiny-model":
        from emsedit.tiny import save_tiny_model

        print(save_tiny_model(args.out, style=args.style, seed=args.seed))
        return 0
    if args.command == "order":
        plans.write_order(args.dataset, args.n, args.seed, args.out, eval_file=args.eval_file,
                              data_dir=args.data_dir)
        return 0
    if args.command == "evaluate":
        if args.n < 1:
            raise ConfigError(f"--n must be >= 1, got {args.n}")
        opts = _cell_options(args)
        if args.n % opts.edits:
            raise ConfigError(f"--n {args.n} is not a multiple of --edits {opts.edits}")
        opts.turns = args.n // opts.edits
        write_record(args.out, protocols.evaluate_cell(opts))
        return 0
    if args.command == "share-training":
        if args.edits < 1 or args.train_turns < 1:
            raise ConfigError(f"--edits and --train-turns must be >= 1, got {args.edits} and {args.train_turns}")
        opts = protocols.CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, edits=args.edits,
                                     train_turns=args.train_turns, train_file=args.train_file, threads=args.threads,
                                     prefix_max_mb=args.prefix_max_mb, data_dir=args.data_dir, device=args.device)
        protocols.share_training(opts, args.out)
        return 0
    overrides: dict[str, Any] = _key_values(args.set, "--set")
    for key in ("steps", "loss", "hypernetworks"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    hp = plans.load_editor(args.editor, overrides)
    if args.match_iterations is not None:
        hp = plans.iteration_control(hp, args.protocol, args.match_iterations)
    opts = _cell_options(args)
    record = protocols.run_cell(hp, opts)
    write_record(args.out, record)
    if not getattr(args, "keep_checkpoint", False):
        protocols.discard_checkpoint(opts, record["config"])  # only once the record is on disk
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of each line (tests swap it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def configure_logging() -> None:
    """Send the library's ``log.info`` lines (phases, progress) to stderr with a time stamp, once;
    other libraries keep their own levels. In the workflow stderr is the job's log file."""
    if not sys.stderr.isatty():  # a log file: no carriage-return bars from transformers or the Hub
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    logger = logging.getLogger("emsedit")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    configure_logging()
    if getattr(args, "threads", None):
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        return _dispatch(args)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise  # an internal error keeps its traceback
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"emsedit {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
