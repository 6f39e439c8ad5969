"""CUDA check (`make gpu-check`): one short cell of every editor on a GPU, with the default model in
bfloat16 and in float32; fails on any non-finite number in a record or any skipped non-finite step.

Run it on a machine with a GPU (this project's CI has none). It writes what it saw to
``benchmarks/results/gpu_check.json`` (per cell: scores, CUDA peak memory, host RSS, seconds) and
exits 1 if any cell failed, 2 if there is no CUDA device.

    python benchmarks/gpu_check.py [--device cuda:0] [--editors emsedit mend] [--dtypes bfloat16]

``--device cpu`` with a tiny model runs the same logic without a GPU (the test suite does this).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Short cells: every editor in the sequential protocol at S = 2 (shared networks, per-step networks
# and RLEdit's memory all run), and the batch protocol for the editors with a batch schedule.
CELLS = [{"protocol": "sequential", "turns": 2, "edits": 4, "steps": 2, "train_turns": 2},
         {"protocol": "batch", "turns": 1, "edits": 8, "steps": 2, "train_turns": 2}]
BATCH_EDITORS = {"emsedit", "malmen", "mend"}


def non_finite(value, where: str = "") -> list[str]:
    """Paths of every non-finite number inside a record (dicts, lists, numbers)."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


def problems(record: dict) -> list[str]:
    """What makes a record fail the check: non-finite numbers, skipped non-finite steps."""
    found = [f"non-finite {p}" for p in non_finite(record)]
    training = record.get("training") or {}
    for key in ("skipped_nonfinite", "editing_skipped_nonfinite"):
        if training.get(key):
            found.append(f"training.{key} = {training[key]}")
    return found


def model_yaml(model: str, dtype: str, folder: Path) -> str:
    """A copy of the model config in ``dtype``, its weights path made absolute."""
    import yaml

    from emsedit.config import ModelConfig
    from emsedit.models import materialize_model, resolve_name_or_path
    from emsedit.plans import find_config

    source = Path(find_config("models", model))
    cfg = ModelConfig.from_yaml(source)
    target = Path(resolve_name_or_path(cfg))
    if cfg.materialize is not None and not (target / "config.json").is_file():
        materialize_model(cfg)
    raw = yaml.safe_load(source.read_text())
    raw.update({"name": f"{raw['name']}-{dtype}", "dtype": dtype,
                "name_or_path": str(target) if target.exists() else raw["name_or_path"]})
    out = folder / f"{raw['name']}.yaml"
    out.write_text(yaml.safe_dump(raw))
    return str(out)


def check_cell(editor: str, cell: dict, model: str, args) -> dict:
    """Run one cell in this process and return what the check reports about it."""
    from emsedit.plans import load_editor
    from emsedit.protocols import CellOptions, run_cell

    opts = CellOptions(model=model, dataset=args.dataset, seed=0, protocol=cell["protocol"],
                       turns=cell["turns"], edits=cell["edits"], train_turns=cell["train_turns"],
                       threads=args.threads, device=args.device, data_dir=args.data_dir)
    hp = load_editor(editor, {"steps": cell["steps"]})
    start = time.perf_counter()
    row = {"editor": editor, "model": Path(model).stem, **{k: cell[k] for k in ("protocol", "turns", "edits", "steps")}}
    try:
        record = run_cell(hp, opts)
    except Exception as err:  # a failing cell is a finding of the check, not the end of it
        return {**row, "ok": False, "problems": [f"{type(err).__name__}: {err}"]}
    found = problems(record)
    return {**row, "ok": not found, "problems": found, "seconds": round(time.perf_counter() - start, 1),
            "post": {k: record["metrics"]["post"].get(k) for k in ("efficacy", "generalization", "specificity")},
            "gpu_peak_mb": record.get("gpu_peak_mb"), "peak_rss_mb": record.get("peak_rss_mb")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda)")
    parser.add_argument("--model", default="smollm2-135m", help="model config (default: smollm2-135m)")
    parser.add_argument("--dataset", default="zsre", help="dataset config (default: zsre)")
    parser.add_argument("--data-dir", default="resources/data", help="dataset files (default: resources/data)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="model dtypes to check")
    parser.add_argument("--editors", nargs="+", help="only these editors (default: every declared one)")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads (default: 4)")
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json", help="where to write the findings")
    args = parser.parse_args(argv)
    import torch

    from emsedit.records import git_commit, write_json_atomic
    from emsedit.registry import editor_names

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; run `make gpu-check` on a machine with a GPU", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.dtypes:
            model = model_yaml(args.model, dtype, Path(tmp))
            for editor in args.editors or editor_names():
                for cell in CELLS:
                    if cell["protocol"] == "batch" and editor not in BATCH_EDITORS:
                        continue
                    if args.device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    rows.append(check_cell(editor, cell, model, args))
                    r = rows[-1]
                    print(f"{dtype:8s} {editor:9s} {cell['protocol']:10s} {'ok' if r['ok'] else 'FAIL'} "
                          f"{r.get('post')} gpu {r.get('gpu_peak_mb')} MB {'; '.join(r['problems'])}", flush=True)
                    write_json_atomic(args.out, {"device": args.device, "torch": torch.__version__,
                                                 "cuda": torch.version.cuda, "git_commit": git_commit(),
                                                 "cells": rows})
    failed = [r for r in rows if not r["ok"]]
    print(f"gpu-check: {len(rows) - len(failed)}/{len(rows)} cells passed; findings in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
