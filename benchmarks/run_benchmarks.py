"""Speed and memory benchmark of the editors on the offline model; writes its numbers to a JSON file.

For each benchmark cell it runs, in a fresh process, one experiment cell exactly as the workflow
does (meta-train, edit, evaluate; the unedited scores and the unedited lower layers' activations on
the eval requests come from a shared ``evaluate --prefix-out`` job, timed separately and reported as
``shared_evaluate_s``), then, in the same process, times the bare transformer passes of a plain run:
forward + backward on the edit prompts at every step, forward + backward for the edit loss, the KL
passes of KL-trained editors, and full forward passes for the final evaluation, one pass per LM
mini-batch as a plain implementation runs them (the run itself joins mini-batches into passes of
``PASS_ROWS`` prompts and reuses the unedited lower layers, so it can be faster than these). It reports the run's
wall time split by phase, its peak RSS, the ratio run / bare passes, and run + shared evaluation
(what one cell costs when nothing else shares that evaluation job).

Compute floors (``benchmarks/floor.py``): it measures fp32 matmul throughput at ``--threads`` just before
and just after each timed job, in that job's process (``matmul_gflops`` of each floor block; these shared
machines' rate drifts by tens of percent within minutes, so one measurement at the start misstates later
jobs' floors; ``machine.matmul_gflops`` is the start's), and counts the passes of the shared evaluation (in
this process) and of each cell's run (in its fresh process) with hooks on the model they load; each cell's
``floor`` block gives, for both, ``measured_s`` (``timings.total`` − ``load_model``, as ``shared_evaluate_s``
/ ``run_s_excl_load``), ``floor_s`` (unavoidable FLOPs at the higher of the job's two rates: a floor that
never flatters the job), their ``ratio``, the FLOPs by part and the counts.
``executed_flops`` (skip with ``--no-executed``): the cell run a second time, untimed, with torch's FLOP
counter on: the FLOPs its run executed (transformer, editor networks, outside modules), ``executed_s``
(those at the measured throughput), ``executed_over_floor`` (work beyond the floor: hypernetworks,
weight gradients, masked attention pairs) and ``measured_over_executed`` (how fast that work ran).
``wall_s`` stays the fresh process's wall time; ``--quick`` runs all of this on a tiny model in seconds.

    python benchmarks/run_benchmarks.py --out benchmarks/results/benchmarks.json
    python benchmarks/run_benchmarks.py --quick      # tiny model: benchmarks/results/quick.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The cells of the editors issue: zsRE, smollm2-135m, 2 threads. Authors' time on this machine,
# same model and data (train + edit + evaluate), from the issue text; the official code re-run on
# this machine kind, interleaved with these cells, took 140.2-140.5, 334.7-339.9 and 137.7-146.0 s
# (docs/parity.md, "Wall time against make bench").
CELLS = [
    {"id": "emsedit_seq_10x20_S2", "editor": "emsedit", "protocol": "sequential", "turns": 10, "edits": 20,
     "steps": 2, "authors_s": (130, 160)},
    {"id": "rledit_seq_10x20_S1", "editor": "rledit", "protocol": "sequential", "turns": 10, "edits": 20,
     "steps": 1, "authors_s": (330, 330)},
    {"id": "malmen_batch_256_S1", "editor": "malmen", "protocol": "batch", "turns": 1, "edits": 256,
     "steps": 1, "authors_s": (140, 140)},
    {"id": "malmen_batch_256_S2", "editor": "malmen", "protocol": "batch", "turns": 1, "edits": 256,
     "steps": 2, "authors_s": None},
    {"id": "emsedit_batch_256_S2", "editor": "emsedit", "protocol": "batch", "turns": 1, "edits": 256,
     "steps": 2, "authors_s": None},
]
# The fidelity issue's cells: the shared-network Adam repeats (quirk 22) on and off, the
# iteration-matched control, and RLEdit's KL backward with and without the official revert; scores
# matter here, so the bare passes are not measured ("bare": False).
# `make bench` runs them too; `--cells fidelity` runs only them.
_NO_REPEATS = {"shared_net_adam_repeats": False}
_KL_AT_EDITED = {"kl_backward_reverted": False}
FIDELITY = [
    {"id": "malmen_batch_256_S2_no_repeats", "editor": "malmen", "protocol": "batch", "turns": 1, "edits": 256,
     "steps": 2, "set": _NO_REPEATS},
    {"id": "malmen_batch_256_S1_iterations_of_S2", "editor": "malmen", "protocol": "batch", "turns": 1,
     "edits": 256, "steps": 1, "match_iterations": 2},
    {"id": "emsedit_batch_256_S2_no_repeats", "editor": "emsedit", "protocol": "batch", "turns": 1, "edits": 256,
     "steps": 2, "set": _NO_REPEATS},
    {"id": "malmen_seq_10x20_S2", "editor": "malmen", "protocol": "sequential", "turns": 10, "edits": 20, "steps": 2},
    {"id": "malmen_seq_10x20_S2_no_repeats", "editor": "malmen", "protocol": "sequential", "turns": 10, "edits": 20,
     "steps": 2, "set": _NO_REPEATS},
    # RLEdit's KL term back-propagated at W + ΔW instead of after the official `.data` revert
    {"id": "rledit_seq_10x20_S1_kl_not_reverted", "editor": "rledit", "protocol": "sequential", "turns": 10,
     "edits": 20, "steps": 1, "set": _KL_AT_EDITED},
    {"id": "rledit_seq_10x20_S2", "editor": "rledit", "protocol": "sequential", "turns": 10, "edits": 20, "steps": 2},
    {"id": "rledit_seq_10x20_S2_kl_not_reverted", "editor": "rledit", "protocol": "sequential", "turns": 10,
     "edits": 20, "steps": 2, "set": _KL_AT_EDITED},
]
CELLS += [{"authors_s": None, "bare": False, "fidelity": True, **c} for c in FIDELITY]
# `--quick`: the whole path (shared evaluation, fresh-process cells, bare passes, floors) on a tiny
# 4-layer Llama whose two upper layers are edited, and a 40 + 40 request dataset; seconds per cell.
_TINY = {"rank": 8, "lr": 100}
QUICK_CELLS = [
    {"id": "quick_emsedit_seq_2x4_S2", "editor": "emsedit", "protocol": "sequential", "turns": 2, "edits": 4,
     "steps": 2, "set": _TINY},
    {"id": "quick_rledit_seq_2x4_S1", "editor": "rledit", "protocol": "sequential", "turns": 2, "edits": 4,
     "steps": 1, "set": _TINY},
    {"id": "quick_malmen_batch_8_S1", "editor": "malmen", "protocol": "batch", "turns": 1, "edits": 8,
     "steps": 1, "set": _TINY},
]
QUICK_CELLS = [{"authors_s": None, "quick": True, **c} for c in QUICK_CELLS]


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_passes(record: dict, model_name: str, dataset: str, threads: int,
                data_dir: str = "resources/data") -> dict[str, float]:
    """Seconds of the transformer passes the cell cannot avoid, measured on its own batches."""
    import torch

    from emsedit.config import ModelConfig
    from emsedit.losses import cross_entropy
    from emsedit.models import answer_forward, load_model, resolve_modules
    from emsedit.config import find_config
    from emsedit.plans import build_turns, load_dataset_config, pick, plan_data

    torch.set_num_threads(threads)
    cfg = record["config"]
    model_cfg = ModelConfig.from_yaml(find_config("models", model_name))
    model, tok = load_model(model_cfg)
    modules = resolve_modules(model, list(model_cfg.edit_modules))
    ds = load_dataset_config(dataset)
    edits, turns, steps = cfg["edits"], cfg["turns"], cfg["steps"]
    train_turns = cfg["train_turns"]
    plan = plan_data(ds, n_eval=turns * edits, n_train=train_turns * edits, seed=cfg["seed"], data_dir=data_dir)
    eval_turns = build_turns(pick(plan.eval_requests, plan.edit_order), tok, edits, split="eval",
                             lm_batch_size=4, old_label_pad=0)
    train = build_turns(pick(plan.train_requests, plan.train_order), tok, edits, split="train",
                        lm_batch_size=4, old_label_pad=0) if train_turns else []

    def fwd_bwd(batches):
        for b in batches:
            logits, s = answer_forward(model, b)
            cross_entropy(logits, s.labels).backward()
        for m in modules.values():
            m.weight.grad = None

    def fwd(batches):
        with torch.no_grad():
            for b in batches:
                answer_forward(model, b)

    kind = cfg["editor"]["schedule"]
    kl = cfg["loss"] == "kl"
    out = {"edit_cache": steps * sum(_time(lambda t=t: fwd_bwd(t.edit)) for t in eval_turns),
           "evaluate_post": sum(_time(lambda t=t: fwd(t.edit + t.equiv + t.unrel)) for t in eval_turns)}
    train_s = 0.0
    for i, t in enumerate(train):
        cache = steps * _time(lambda: fwd_bwd(t.edit))
        if kind == "rollout":
            loss = _time(lambda: fwd_bwd(t.equiv)) + (_time(lambda: (fwd(t.unrel), fwd_bwd(t.unrel))) if kl else 0)
        elif kind == "rollout_backtrack":
            memory = train[max(0, i - cfg["editor"]["back_depth"] + 1): i + 1]
            loss = steps * sum(_time(lambda m=m: fwd_bwd(m.equiv)) + (_time(lambda m=m: (fwd(m.unrel), fwd_bwd(m.unrel))) if kl else 0)
                               for m in memory)
        else:  # batch schedule: every step has its own loss passes
            loss = steps * (_time(lambda: fwd_bwd(t.equiv)) + (_time(lambda: (fwd(t.unrel), fwd_bwd(t.unrel))) if kl else 0))
        train_s += cache + loss
    out["train"] = train_s
    out["total"] = sum(out.values())
    return {k: round(v, 3) for k, v in out.items()}


@contextmanager
def throughput_around(args: argparse.Namespace) -> Iterator[list[float]]:
    """The matmul throughput (GFLOP/s at ``args.threads``, the model's MLP shapes) measured just before
    and just after the job inside: a list that holds both once the job is done."""
    from benchmarks.floor import matmul_gflops

    shapes = matmul_shape(args.model)
    rates = [round(matmul_gflops(args.threads, **shapes), 2)]
    yield rates
    rates.append(round(matmul_gflops(args.threads, **shapes), 2))


@contextmanager
def counted_setup() -> Iterator[dict]:
    """Count the transformer passes of the cell run inside: patches ``emsedit.protocols._setup`` (what
    :func:`evaluate_cell` and :func:`run_cell` load their model with) to hook
    :func:`benchmarks.floor.count_passes` on the model it returns. Yields a dict that holds, once the
    model is loaded, ``counts`` (:class:`benchmarks.floor.PassCounts`), ``config`` (the HF config) and
    ``model`` (as the cell uses it)."""
    from benchmarks.floor import count_passes
    from emsedit import protocols

    original = protocols._setup
    found: dict = {}
    with ExitStack() as hooks:
        def setup(opts):
            model_cfg, model, tokenizer, modules, load_s = original(opts)
            found["counts"] = hooks.enter_context(count_passes(model))
            found["config"] = model.config
            found["model"] = model
            return model_cfg, model, tokenizer, modules, load_s

        protocols._setup = setup
        try:
            yield found
        finally:
            protocols._setup = original


def counted_floor(found: dict, measured_s: float, rates: list[float]) -> dict:
    """The floor block of a counted job, without its seconds: measured seconds, the matmul throughput
    measured around the job (:func:`throughput_around`), FLOPs, counts."""
    from benchmarks.floor import floor_flops

    return {"measured_s": round(measured_s, 3), "matmul_gflops": rates,
            "flops": floor_flops(found["counts"], found["config"]), "counts": found["counts"].summary()}


def with_floor_seconds(block: dict) -> dict:
    """A :func:`counted_floor` block with ``floor_s`` and ``ratio`` (measured / floor) at the higher
    of the throughputs measured around the job."""
    from benchmarks.floor import floor_seconds

    floor_s = floor_seconds(block["flops"], max(block["matmul_gflops"]))
    return {"measured_s": block["measured_s"], "matmul_gflops": block["matmul_gflops"],
            "floor_s": float(f"{floor_s:.4g}"),
            "ratio": round(block["measured_s"] / floor_s, 2) if floor_s > 0 else None,
            "flops": block["flops"], "counts": block["counts"]}


# The metric views the workflow's default config computes (config.yaml eval_metrics).
METRICS = "teacher_forced"


def cell_hparams(cell: dict):
    """The cell's editor hyperparameters (with its overrides and iteration control)."""
    from emsedit.plans import iteration_control, load_editor

    hp = load_editor(cell["editor"], {"steps": cell["steps"], **cell.get("set", {})})
    if cell.get("match_iterations"):
        hp = iteration_control(hp, cell["protocol"], cell["match_iterations"])
    return hp


def training_turns(cell: dict) -> int:
    """How many training turns of ``edits`` requests the cell meta-trains on (0: training-free)."""
    from emsedit.protocols import CellOptions, resolve_train_turns
    from emsedit.registry import editor_class

    hp = cell_hparams(cell)
    schedule = editor_class(hp.name).resolve_schedule(hp, cell["protocol"])
    return resolve_train_turns(schedule, hp, CellOptions(model="", dataset="", seed=0, turns=cell["turns"],
                                                         edits=cell["edits"]))


def counted_for(counted: Path, model: str) -> bool:
    """Whether a shared job's counted-floor file exists, is for ``model`` and holds the throughput
    measured around that job (older files do not: the job is rerun)."""
    if not counted.exists():
        return False
    block = json.loads(counted.read_text())
    return block.get("model") == model and "matmul_gflops" in block


def shared_training_file(workdir: str, edits: int, turns: int) -> Path:
    """The shared training-activation file of ``turns`` turns of ``edits`` (as the workflow's
    ``share_training`` job writes it for the cells of one order)."""
    return Path(workdir) / f"train_{turns}xN{edits}.safetensors"


def run_one(cell: dict, args: argparse.Namespace) -> dict:
    """Run one benchmark cell in this process (its passes counted) and measure its bare passes."""
    from emsedit.protocols import CellOptions, run_cell

    shape = f"{cell['turns']}x{cell['edits']}"
    hp = cell_hparams(cell)
    train = shared_training_file(args.workdir, cell["edits"], args.cell_train_turns)
    opts = CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, protocol=cell["protocol"],
                       turns=cell["turns"], edits=cell["edits"], threads=args.threads, data_dir=args.data_dir,
                       pre_record=str(Path(args.workdir) / f"pre_{shape}.json"),
                       prefix_in=str(Path(args.workdir) / f"pre_{shape}.prefix.safetensors"),
                       train_prefix_in=str(train) if train.exists() else None, metrics=METRICS)
    shared_t = json.loads(Path(opts.pre_record).read_text())["timings"]
    shared_s = shared_t["total"] - shared_t.get("load_model", 0.0)
    with throughput_around(args) as rates, counted_setup() as found:
        start = time.perf_counter()
        record = run_cell(hp, opts)
        wall = time.perf_counter() - start
    measure_bare = cell.get("bare", True) and not args.no_bare
    bare = bare_passes(record, args.model, args.dataset, args.threads, args.data_dir) if measure_bare else None
    executed = None if args.no_executed else executed_flops(hp, opts)
    t = record["timings"]
    run_s = t["total"] - t.get("load_model", 0.0) - t.get("evaluate_pre", 0.0)
    post, pre = record["metrics"]["post"], record["metrics"]["pre"]
    return {
        "cell": cell["id"], "wall_s": round(wall, 2), "run_s_excl_load": round(run_s, 2),
        "shared_evaluate_s": round(shared_s, 2), "run_plus_shared_s": round(run_s + shared_s, 2),
        "prefix_activations": record["config"].get("prefix_activations"),
        "train_activations": record["config"].get("train_activations"),
        "timings": t, "peak_rss_mb": record["peak_rss_mb"], "bare_passes_s": bare,
        "ratio_to_bare": round(run_s / bare["total"], 3) if bare and bare["total"] else None,
        "authors_s": cell["authors_s"],
        "metrics": {"pre": {k: round(pre[k], 2) for k in ("efficacy", "generalization", "specificity")},
                    "post": {k: round(post[k], 2) for k in ("efficacy", "generalization", "specificity")}},
        "optimizer_steps": record["training"]["optimizer_steps"],
        "adam_iterations": record["training"]["adam_iterations"],
        "editor_overrides": {**cell.get("set", {}), **({"match_iterations": cell["match_iterations"]}
                                                         if cell.get("match_iterations") else {})},
        "floor": {"run": counted_floor(found, run_s, rates)},  # main adds shared_evaluate and the seconds
        "executed_flops": executed,  # main adds the seconds at the measured throughput
    }


def executed_flops(hp, opts) -> dict[str, int]:
    """The FLOPs the cell's run executes, by part (:func:`benchmarks.floor.executed_split`): the cell
    run once more with torch's FLOP counter on (untimed: counting slows every op down)."""
    from benchmarks.floor import count_executed, executed_split
    from emsedit.protocols import run_cell

    with counted_setup() as found, count_executed() as executed:
        run_cell(hp, opts)
    return executed_split(executed, found["model"])


def with_executed_seconds(flops: dict[str, int], run: dict) -> dict:
    """Executed FLOPs with their seconds at the run's throughput (``executed_s``, as its floor), executed /
    floor FLOPs and measured seconds / ``executed_s`` (how fast the run's executed work ran)."""
    executed_s = flops["total"] / (max(run["matmul_gflops"]) * 1e9)
    floor = run["flops"]["total"]
    return {**flops, "executed_s": float(f"{executed_s:.4g}"),
            "executed_over_floor": round(flops["total"] / floor, 2) if floor else None,
            "measured_over_executed": round(run["measured_s"] / executed_s, 2) if executed_s else None}


def matmul_shape(model_name: str) -> dict[str, int]:
    """``hidden`` and ``inner`` (MLP width) of the model from its HF config, for the throughput
    measurement; {} (SmolLM2's shapes) when the config cannot be read without loading the model."""
    from transformers import AutoConfig

    from emsedit.config import ModelConfig, find_config
    from emsedit.models import resolve_name_or_path

    from benchmarks.floor import layer_sizes

    try:
        sizes = layer_sizes(AutoConfig.from_pretrained(
            resolve_name_or_path(ModelConfig.from_yaml(find_config("models", model_name)))))
    except (OSError, ValueError):
        return {}
    return {"hidden": sizes["hidden"], "inner": sizes["inner"]}


def quick_setup(workdir: Path) -> tuple[str, str, str]:
    """``--quick``'s model and dataset, written once under ``workdir``: a tiny random 4-layer Llama
    (layers 2-3's mlp.down_proj edited, so layers 0-1 are shared lower layers) and 40 + 40 zsRE requests
    in its vocabulary (emsedit.tiny.tiny_zsre_records). Returns (model yaml, dataset yaml, data dir)."""
    import yaml

    from emsedit.tiny import make_tiny_llama, make_tokenizer, tiny_zsre_records

    root = (workdir / "tiny").resolve()
    model_dir, data = root / "tiny-llama-4", root / "data"
    if not (model_dir / "config.json").is_file():
        tokenizer = make_tokenizer("llama")
        make_tiny_llama(tokenizer, seed=0, n_layers=4).save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
    model_yaml = root / "tiny-llama-4.yaml"
    model_yaml.write_text(yaml.safe_dump({"name": "tiny-llama-4", "name_or_path": str(model_dir),
                                          "edit_modules": ["model.layers.{2..3}.mlp.down_proj"],
                                          "dtype": "float32"}, sort_keys=False))
    data.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, offset in (("train", 0), ("eval", 40)):
        records = tiny_zsre_records(40, offset)
        path = data / f"tiny_zsre_{split}.json"
        path.write_text(json.dumps(records, indent=1))
        files[split] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "url": None}
    dataset_yaml = root / "tiny-zsre.yaml"
    dataset_yaml.write_text(yaml.safe_dump({"name": "tiny-zsre", "kind": "zsre", **files}))
    return str(model_yaml), str(dataset_yaml), str(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="where to write the numbers (default: benchmarks/results/benchmarks.json; "
                        "with --quick, benchmarks/results/quick.json)")
    parser.add_argument("--model", default="smollm2-135m", help="model config (default: smollm2-135m)")
    parser.add_argument("--dataset", default="zsre", help="dataset config (default: zsre)")
    parser.add_argument("--seed", type=int, default=0, help="edit-order seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--cells", nargs="*", help="only these cell ids")
    parser.add_argument("--workdir", help="scratch folder (default: benchmarks/results/work; with --quick, "
                        "benchmarks/results/quick-work)")
    parser.add_argument("--data-dir", default="resources/data", help="where the dataset files are")
    parser.add_argument("--quick", action="store_true",
                        help="the quick cells on a tiny model and dataset (seconds): checks the whole path")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-pass measurement (scores and run times only)")
    parser.add_argument("--no-executed", action="store_true",
                        help="skip counting the FLOPs each run executes (a second, untimed run of every cell)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one cell in this process
    parser.add_argument("--cell-train-turns", type=int, default=0, help=argparse.SUPPRESS)  # internal: its shared file
    args = parser.parse_args()
    args.out = args.out or f"benchmarks/results/{'quick' if args.quick else 'benchmarks'}.json"
    args.workdir = args.workdir or f"benchmarks/results/{'quick-work' if args.quick else 'work'}"
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.one:
        cell = next(c for c in CELLS + QUICK_CELLS if c["id"] == args.one)
        print(json.dumps(run_one(cell, args)))
        return 0
    from benchmarks.floor import matmul_gflops
    from emsedit.protocols import CellOptions, evaluate_cell, share_training
    from emsedit.records import write_json_atomic

    if args.quick:
        args.model, args.dataset, args.data_dir = quick_setup(Path(args.workdir))
    shapes = matmul_shape(args.model)
    gflops = matmul_gflops(args.threads, **shapes)
    matmul = {"matmul_gflops": round(gflops, 2),
              "matmul_shape": {"rows": 320, "hidden": shapes.get("hidden", 576), "inner": shapes.get("inner", 1536)}}
    print(f"matmul throughput: {gflops:.1f} GFLOP/s at {args.threads} threads "
          f"(fp32 F.linear, {matmul['matmul_shape']})", flush=True)
    pool = QUICK_CELLS if args.quick else CELLS
    cells = [c for c in pool if not args.cells or c["id"] in args.cells
             or ("fidelity" in args.cells and c.get("fidelity"))]
    results = []
    for shape in sorted({(c["turns"], c["edits"]) for c in cells}):
        pre = Path(args.workdir) / f"pre_{shape[0]}x{shape[1]}.json"
        prefix = pre.with_suffix(".prefix.safetensors")
        counted = pre.with_suffix(".floor.json")  # the shared job's counted floor (FLOPs, no seconds)
        fresh = (pre.exists() and prefix.exists() and counted_for(counted, args.model)
                 and json.loads(pre.read_text())["config"].get("eval_metrics", {}).get("views") == METRICS.split(","))
        if not fresh:
            opts = CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, turns=shape[0],
                               edits=shape[1], threads=args.threads, prefix_out=str(prefix), data_dir=args.data_dir,
                               metrics=METRICS)
            with throughput_around(args) as rates, counted_setup() as found:
                record = evaluate_cell(opts)
            write_json_atomic(pre, record)
            t = record["timings"]
            write_json_atomic(counted, {"model": args.model,
                                        **counted_floor(found, t["total"] - t.get("load_model", 0.0), rates)})
    # The workflow's share_training job: one file per edits-per-turn, covering the most training turns of
    # its cells (each cell replays the prefix it needs)
    train_turns = {}
    for cell in cells:
        train_turns[cell["edits"]] = max(train_turns.get(cell["edits"], 0), training_turns(cell))
    shared_training = {}
    for edits, turns in sorted(train_turns.items()):
        if not turns:
            continue
        out = shared_training_file(args.workdir, edits, turns)
        counted = out.with_suffix(".floor.json")
        if not (out.exists() and counted_for(counted, args.model)):
            opts = CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, edits=edits, train_turns=turns,
                               threads=args.threads, data_dir=args.data_dir)
            with throughput_around(args) as rates, counted_setup() as found:
                done = share_training(opts, str(out))
            write_json_atomic(counted, {"model": args.model, "mini_batches": done["mini_batches"],
                                        **counted_floor(found, done["lower_layers"], rates)})
        shared_training[edits] = json.loads(counted.read_text())
    for cell in cells:
        cmd = [sys.executable, __file__, "--one", cell["id"], "--model", args.model, "--dataset", args.dataset,
               "--cell-train-turns", str(train_turns.get(cell["edits"], 0)),
               "--seed", str(args.seed), "--threads", str(args.threads), "--workdir", args.workdir,
               "--data-dir", args.data_dir, *(["--no-bare"] if args.no_bare else []),
               *(["--no-executed"] if args.no_executed else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        shared = json.loads((Path(args.workdir) / f"pre_{cell['turns']}x{cell['edits']}.floor.json").read_text())
        r["floor"] = {"shared_evaluate": with_floor_seconds(shared), "run": with_floor_seconds(r["floor"]["run"])}
        if r["executed_flops"]:
            r["executed_flops"] = with_executed_seconds(r["executed_flops"], r["floor"]["run"])
        if r["train_activations"]:  # the shared training job (its seconds: computing the lower layers)
            r["floor"]["shared_training"] = with_floor_seconds(shared_training[cell["edits"]])
            r["shared_training_s"] = r["floor"]["shared_training"]["measured_s"]
        bare = f"bare passes {r['bare_passes_s']['total']} s, ratio {r['ratio_to_bare']}" if r["bare_passes_s"] else "no bare passes"
        fl = r["floor"]
        print(f"{r['cell']}: run {r['run_s_excl_load']} s (+ shared evaluation {r['shared_evaluate_s']} s; "
              f"{bare}), peak {r['peak_rss_mb']} MB, authors {r['authors_s']}; pre {r['metrics']['pre']} "
              f"post {r['metrics']['post']}, {r['adam_iterations']} Adam iterations; floor: run "
              f"{fl['run']['floor_s']} s (measured / floor {fl['run']['ratio']}), shared evaluation "
              f"{fl['shared_evaluate']['floor_s']} s (ratio {fl['shared_evaluate']['ratio']})", flush=True)
        if r["executed_flops"]:
            ex = r["executed_flops"]
            print(f"  executed {ex['total'] / 1e9:.1f} GFLOP ({ex['executed_over_floor']}x the floor's; transformer "
                  f"{ex['transformer'] / 1e9:.1f}, editor networks {ex['editor_networks'] / 1e9:.1f}, outside modules "
                  f"{ex['outside_modules'] / 1e9:.1f}), {ex['executed_s']} s at the measured throughput: the run took "
                  f"{ex['measured_over_executed']}x that", flush=True)
        _write(args.out, args.threads, results, matmul)
    return 0


def _write(out: str, threads: int, results: list[dict], matmul: dict | None = None) -> None:
    """The JSON so far (rewritten after every cell, so an interrupted benchmark keeps its cells)."""
    import os
    import platform

    import torch

    from emsedit.records import git_commit, write_json_atomic

    write_json_atomic(out, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "torch": torch.__version__, "threads": threads, **(matmul or {})},
                            "git_commit": git_commit(), "results": results})


if __name__ == "__main__":
    sys.exit(main())
