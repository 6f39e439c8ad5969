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

    python benchmarks/run_benchmarks.py --out benchmarks/results/benchmarks.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The cells of the editors issue: zsRE, smollm2-135m, 2 threads. Authors' time on this machine,
# same model and data (train + edit + evaluate), from the issue text.
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


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bare_passes(record: dict, model_name: str, dataset: str, threads: int) -> dict[str, float]:
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
    plan = plan_data(ds, n_eval=turns * edits, n_train=train_turns * edits, seed=cfg["seed"])
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


def run_one(cell: dict, args: argparse.Namespace) -> dict:
    """Run one benchmark cell in this process and measure its bare passes."""
    from emsedit.plans import iteration_control, load_editor
    from emsedit.protocols import CellOptions, run_cell

    shape = f"{cell['turns']}x{cell['edits']}"
    opts = CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, protocol=cell["protocol"],
                       turns=cell["turns"], edits=cell["edits"], threads=args.threads,
                       pre_record=str(Path(args.workdir) / f"pre_{shape}.json"),
                       prefix_in=str(Path(args.workdir) / f"pre_{shape}.prefix.safetensors"))
    shared_t = json.loads(Path(opts.pre_record).read_text())["timings"]
    shared_s = shared_t["total"] - shared_t.get("load_model", 0.0)
    hp = load_editor(cell["editor"], {"steps": cell["steps"], **cell.get("set", {})})
    if cell.get("match_iterations"):
        hp = iteration_control(hp, cell["protocol"], cell["match_iterations"])
    start = time.perf_counter()
    record = run_cell(hp, opts)
    wall = time.perf_counter() - start
    measure_bare = cell.get("bare", True) and not args.no_bare
    bare = bare_passes(record, args.model, args.dataset, args.threads) if measure_bare else None
    t = record["timings"]
    run_s = t["total"] - t.get("load_model", 0.0) - t.get("evaluate_pre", 0.0)
    post, pre = record["metrics"]["post"], record["metrics"]["pre"]
    return {
        "cell": cell["id"], "wall_s": round(wall, 2), "run_s_excl_load": round(run_s, 2),
        "shared_evaluate_s": round(shared_s, 2), "run_plus_shared_s": round(run_s + shared_s, 2),
        "prefix_activations": record["config"].get("prefix_activations"),
        "timings": t, "peak_rss_mb": record["peak_rss_mb"], "bare_passes_s": bare,
        "ratio_to_bare": round(run_s / bare["total"], 3) if bare and bare["total"] else None,
        "authors_s": cell["authors_s"],
        "metrics": {"pre": {k: round(pre[k], 2) for k in ("efficacy", "generalization", "specificity")},
                    "post": {k: round(post[k], 2) for k in ("efficacy", "generalization", "specificity")}},
        "optimizer_steps": record["training"]["optimizer_steps"],
        "adam_iterations": record["training"]["adam_iterations"],
        "editor_overrides": {**cell.get("set", {}), **({"match_iterations": cell["match_iterations"]}
                                                         if cell.get("match_iterations") else {})},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results/benchmarks.json", help="where to write the numbers")
    parser.add_argument("--model", default="smollm2-135m", help="model config (default: smollm2-135m)")
    parser.add_argument("--dataset", default="zsre", help="dataset config (default: zsre)")
    parser.add_argument("--seed", type=int, default=0, help="edit-order seed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    parser.add_argument("--cells", nargs="*", help="only these cell ids")
    parser.add_argument("--workdir", default="benchmarks/results/work", help="scratch folder")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare-pass measurement (scores and run times only)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one cell in this process
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.one:
        cell = next(c for c in CELLS if c["id"] == args.one)
        print(json.dumps(run_one(cell, args)))
        return 0
    from emsedit.protocols import CellOptions, evaluate_cell
    from emsedit.records import write_json_atomic

    cells = [c for c in CELLS if not args.cells or c["id"] in args.cells
             or ("fidelity" in args.cells and c.get("fidelity"))]
    results = []
    for shape in sorted({(c["turns"], c["edits"]) for c in cells}):
        pre = Path(args.workdir) / f"pre_{shape[0]}x{shape[1]}.json"
        prefix = pre.with_suffix(".prefix.safetensors")
        if not (pre.exists() and prefix.exists()):
            opts = CellOptions(model=args.model, dataset=args.dataset, seed=args.seed, turns=shape[0],
                               edits=shape[1], threads=args.threads, prefix_out=str(prefix))
            write_json_atomic(pre, evaluate_cell(opts))
    for cell in cells:
        cmd = [sys.executable, __file__, "--one", cell["id"], "--model", args.model, "--dataset", args.dataset,
               "--seed", str(args.seed), "--threads", str(args.threads), "--workdir", args.workdir,
               *(["--no-bare"] if args.no_bare else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        bare = f"bare passes {r['bare_passes_s']['total']} s, ratio {r['ratio_to_bare']}" if r["bare_passes_s"] else "no bare passes"
        print(f"{r['cell']}: run {r['run_s_excl_load']} s (+ shared evaluation {r['shared_evaluate_s']} s; "
              f"{bare}), peak {r['peak_rss_mb']} MB, authors {r['authors_s']}; pre {r['metrics']['pre']} "
              f"post {r['metrics']['post']}, {r['adam_iterations']} Adam iterations", flush=True)
        _write(args.out, args.threads, results)
    return 0


def _write(out: str, threads: int, results: list[dict]) -> None:
    """The JSON so far (rewritten after every cell, so an interrupted benchmark keeps its cells)."""
    import os
    import platform

    import torch

    from emsedit.records import git_commit, write_json_atomic

    write_json_atomic(out, {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                        "torch": torch.__version__, "threads": threads},
                            "git_commit": git_commit(), "results": results})


if __name__ == "__main__":
    sys.exit(main())
