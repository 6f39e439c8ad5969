"""What every record says about where it came from: the library code's digest, memory, and the
aggregate rule's refusal to mix records of different code."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

from emsedit import records

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "workflow" / "scripts"))
import aggregation  # noqa: E402


@pytest.fixture
def library(tmp_path, monkeypatch) -> Path:
    """A copy of the library code in a scratch 'repository' that code_digest() reads."""
    for package in ("emsedit", "baselines"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.md").write_text("a")
    monkeypatch.setattr(records, "REPO_ROOT", tmp_path)
    records.code_digest.cache_clear()
    yield tmp_path
    records.code_digest.cache_clear()


def test_code_digest_follows_library_code_only(library: Path) -> None:
    first = records.code_digest()
    assert len(first) == 16 and int(first, 16) >= 0
    (library / "docs" / "notes.md").write_text("b")  # not library code
    records.code_digest.cache_clear()
    assert records.code_digest() == first
    editor = library / "baselines" / "malmen.py"
    editor.write_text(editor.read_text() + "\n# a change\n")
    records.code_digest.cache_clear()
    changed = records.code_digest()
    assert changed != first
    (library / "emsedit" / "new_module.py").write_text("")  # a new file counts, even empty
    records.code_digest.cache_clear()
    assert records.code_digest() not in (first, changed)


def test_code_digest_follows_the_documented_rule(library: Path) -> None:
    """The documented rule, computed here by hand: sorted relative paths with their contents' sha256."""
    expected = hashlib.sha256()
    files = sorted(p for pkg in ("emsedit", "baselines") for p in (library / pkg).rglob("*.py"))
    for path in files:
        expected.update(path.relative_to(library).as_posix().encode() + b"\0")
        expected.update(hashlib.sha256(path.read_bytes()).digest())
    assert records.code_digest() == expected.hexdigest()[:16]


def test_provenance_carries_digest_commit_and_memory() -> None:
    prov = records.provenance()
    assert prov["code_digest"] == records.code_digest()
    assert prov["peak_rss_mb"] > 10  # this test process holds more than 10 MiB
    assert prov["gpu_peak_mb"] is None  # CPU-only here: CUDA was never initialised
    assert set(prov) >= {"versions", "git_commit", "created"}


def test_peak_rss_units(monkeypatch) -> None:
    """ru_maxrss is KiB on Linux and bytes on macOS; both come out as MiB."""
    class Usage:
        ru_maxrss = 3 * 1024 * 1024
    monkeypatch.setattr(records.resource, "getrusage", lambda who: Usage)
    monkeypatch.setattr(records.sys, "platform", "linux")
    assert records.peak_rss_mb() == 3072.0
    monkeypatch.setattr(records.sys, "platform", "darwin")
    assert records.peak_rss_mb() == 3.0


def test_mixed_code_is_refused_with_the_cells_and_the_command() -> None:
    aggregation.check_one_code({"a.json": "1" * 16, "b.json": "1" * 16}, current="2" * 16)  # one code
    with pytest.raises(aggregation.RecordError) as err:
        aggregation.check_one_code({"a.json": "1" * 16, "b.json": "2" * 16, "c.json": None}, current="2" * 16)
    message = str(err.value)
    assert "\n" not in message
    assert "--forcerun a.json c.json`" in message and "b.json" not in message
    assert "allow_mixed_code: true" in message and "current code: " + "2" * 16 in message


def test_aggregate_checks_code_unless_allowed(tmp_path) -> None:
    """Two records that differ only in code_digest: refused, and accepted with allow_mixed_code."""
    import dataclasses
    import json

    import yaml

    sys.path.insert(0, str(ROOT / "tests" / "workflow_fixtures"))
    import grid
    from synthetic_records import record

    config = yaml.safe_load((ROOT / ".test" / "config.yaml").read_text())
    cells = grid.unique_cells(grid.expand(config))[:2]
    membership = []
    for cell, digest in zip(cells, ("a" * 16, records.code_digest())):
        path = tmp_path / cell.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**record(cell, config, 1.0), "code_digest": digest}))
        membership.append({**dataclasses.asdict(cell), "study": "main", "path": str(path)})
    schema = yaml.safe_load((ROOT / "workflow" / "schemas" / "result.schema.yaml").read_text())
    with pytest.raises(aggregation.RecordError, match="allow_mixed_code"):
        aggregation.aggregate(membership, schema)
    frame = aggregation.aggregate(membership, schema, allow_mixed_code=True)
    assert sorted(frame["code_digest"]) == sorted(["a" * 16, records.code_digest()])
