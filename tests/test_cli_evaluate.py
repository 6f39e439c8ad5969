"""`python -m emsedit evaluate` and `order`: the unedited baseline record on a tiny model."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from emsedit.cli import main
from emsedit.records import validate_record
from emsedit.tiny import save_tiny_model

ROOT = Path(__file__).resolve().parent.parent
WORDS = ["red", "blue", "green", "stone", "river", "cloud", "piano", "tiger"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("evaluate")
    model_yaml = save_tiny_model(tmp / "model", style="llama", seed=0)
    records = [{"src": f"What is the colour of item {i}?", "ans": WORDS[i % 8],
                "rephrase": f"Which colour has item {i}?", "loc": f"nq question: where is item {i}",
                "loc_ans": WORDS[(i + 3) % 8]} for i in range(30)]
    data = tmp / "zsre.json"
    data.write_text(json.dumps(records))
    cf = [{"prompt": f"The word of item {i} is", "subject": f"item {i}", "target_new": WORDS[i % 8],
           "ground_truth": WORDS[(i + 1) % 8], "rephrase_prompt": f"Item {i} has the word",
           "locality_prompt": f"The word of thing {i} is", "locality_ground_truth": WORDS[(i + 2) % 8]}
          for i in range(30)]
    cf_path = tmp / "cf.json"
    cf_path.write_text(json.dumps(cf))
    return {"tmp": tmp, "model": model_yaml, "zsre": data, "cf": cf_path}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the command line in this process (fast) and capture its exit status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(list(args))
    return subprocess.CompletedProcess(args, status, "", err.getvalue())


def test_cli_runs_as_a_module(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "order_module.json"
    proc = subprocess.run([sys.executable, "-m", "emsedit", "order", "--dataset", "zsre", "--n", "5", "--seed", "0",
                           "--out", str(out), "--eval-file", str(setup["zsre"])], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(out.read_text())["edit_order"]) == 5


@pytest.mark.parametrize("dataset,key", [("zsre", "zsre"), ("counterfact", "cf")])
def test_evaluate_writes_a_valid_record(setup: dict[str, Path], dataset: str, key: str) -> None:
    out = setup["tmp"] / f"record_{dataset}.json"
    proc = _cli("evaluate", "--model", str(setup["model"]), "--dataset", dataset, "--n", "12", "--seed", "3",
                "--out", str(out), "--eval-file", str(setup[key]), "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    validate_record(record)
    assert record["kind"] == "evaluate" and len(record["edit_order"]) == 12
    pre = record["metrics"]["pre"]
    assert pre["counts"]["efficacy"] == 12
    assert pre["protocol"] == ("teacher_forced_token_acc" if dataset == "zsre" else "prob_new_gt_old")
    assert abs(pre["average"] - (pre["efficacy"] + pre["generalization"] + pre["specificity"]) / 3) < 1e-9
    assert record["timings"]["total"] > 0 and record["peak_rss_mb"] > 0


def test_order_is_seeded_and_a_prefix(setup: dict[str, Path]) -> None:
    outs = []
    for n, seed in ((10, 1), (20, 1), (10, 2)):
        out = setup["tmp"] / f"order_{n}_{seed}.json"
        proc = _cli("order", "--dataset", "zsre", "--n", str(n), "--seed", str(seed), "--out", str(out),
                    "--eval-file", str(setup["zsre"]))
        assert proc.returncode == 0, proc.stderr
        outs.append(json.loads(out.read_text())["edit_order"])
    assert outs[1][:10] == outs[0]  # a longer order extends a shorter one of the same seed
    assert outs[2] != outs[0]


def test_user_errors_are_one_line_and_write_nothing(setup: dict[str, Path]) -> None:
    out = setup["tmp"] / "never.json"
    cases = [
        ("--dataset", "zsrE"),                       # misspelt dataset name
        ("--eval-file", str(setup["tmp"] / "missing.json")),  # missing data file
    ]
    for flag, value in cases:
        args = {"--dataset": "zsre", "--eval-file": str(setup["zsre"]), flag: value}
        proc = _cli("evaluate", "--model", str(setup["model"]), "--n", "4", "--seed", "0", "--out", str(out),
                    *[x for kv in args.items() for x in kv])
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr
        assert not out.exists()
    proc = _cli("evaluate", "--model", str(setup["model"]), "--dataset", "zsre", "--n", "100", "--seed", "0",
                "--out", str(out), "--eval-file", str(setup["zsre"]))
    assert proc.returncode == 2 and "30" in proc.stderr  # asks for more requests than the file has
