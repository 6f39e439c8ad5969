"""`make gpu-check` (benchmarks/gpu_check.py) runs its logic on CPU with the tiny model: every cell
passes when nothing is wrong, and a non-finite number or a skipped step fails the check."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from test_cli_run import env  # noqa: F401  (the tiny model and dataset fixture)

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_problems_finds_non_finite_values_and_skipped_steps() -> None:
    ok = {"metrics": {"post": {"efficacy": 1.0, "curve": [0.5, 1.0]}}, "training": {"skipped_nonfinite": 0}}
    assert gpu_check.problems(ok) == []
    bad = {"metrics": {"post": {"efficacy": float("nan"), "curve": [0.5, float("inf")]}},
           "training": {"skipped_nonfinite": 2, "editing_skipped_nonfinite": 0}}
    assert gpu_check.problems(bad) == ["non-finite metrics.post.efficacy", "non-finite metrics.post.curve[1]",
                                       "training.skipped_nonfinite = 2"]


def test_gpu_check_logic_on_cpu(env, tmp_path) -> None:  # noqa: F811
    out = tmp_path / "gpu_check.json"
    status = gpu_check.main(["--device", "cpu", "--model", env["model"], "--dataset", env["dataset"],
                             "--data-dir", env["data"], "--dtypes", "float32", "bfloat16",
                             "--editors", "malmen", "ultraedit", "--threads", "1", "--out", str(out)])
    cells = json.loads(out.read_text())["cells"]
    assert [(c["model"].rsplit("-", 1)[-1], c["editor"], c["protocol"]) for c in cells] == [
        (dtype, editor, protocol) for dtype in ("float32", "bfloat16")
        for editor, protocol in (("malmen", "sequential"), ("malmen", "batch"), ("ultraedit", "sequential"))]
    assert status == 0, [c["problems"] for c in cells]
    assert all(c["ok"] and c["gpu_peak_mb"] is None and c["peak_rss_mb"] > 0 for c in cells)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: nothing to refuse")
def test_gpu_check_refuses_without_cuda(capsys) -> None:
    assert gpu_check.main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
