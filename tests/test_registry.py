"""Editors declare themselves once: a class file plus its YAML (class, label, defaults).

The strongest check copies MALMEN under a new name into a scratch working directory (its class
file and its YAML, nothing else) and runs it as a grid entry of the tiny workflow beside MALMEN
itself: the workflow plans it, the CLI imports its class from the declaration, and its record
equals MALMEN's apart from the name, while the tables' label comes from the YAML.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from emsedit.config import REPO_ROOT, ConfigError
from emsedit.registry import declaration, declarations, editor_class, read_declaration

sys.path.insert(0, str(REPO_ROOT / "workflow" / "scripts"))
import aggregation  # noqa: E402
import grid  # noqa: E402


def copy_editor(work: Path, name: str = "mymalmen", label: str = "MyMALMEN") -> Path:
    """MALMEN's class file as scratch_editors/<name>.py (class renamed) and its YAML under
    <work>/config/editors/<name>.yaml; returns the YAML path."""
    (work / "scratch_editors").mkdir(parents=True, exist_ok=True)
    source = (REPO_ROOT / "baselines" / "malmen.py").read_text().replace("class MALMEN(", "class MyMALMEN(")
    (work / "scratch_editors" / f"{name}.py").write_text(source)
    data = yaml.safe_load((REPO_ROOT / "config" / "editors" / "malmen.yaml").read_text())
    data.update(name=name, label=label, **{"class": f"scratch_editors.{name}:MyMALMEN"})
    path = work / "config" / "editors" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_first_import_of_a_baseline_needs_no_registry():
    """`import baselines.malmen` as the first import used to fail on a circular import."""
    code = "import baselines.malmen, emsedit.editors; assert not hasattr(emsedit.editors, 'REGISTRY')"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    for path in (REPO_ROOT / "emsedit" / "editors").glob("*.py"):
        text = path.read_text()
        assert "import baselines" not in text and "from baselines" not in text, path


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("label"), "missing or empty 'label'"),
    (lambda d: d.update({"class": "baselines.malmen"}), "must read 'module:Class'"),
    (lambda d: d.update({"class": "baselines.nosuch:X"}), "no module 'baselines.nosuch'"),
    (lambda d: d.update({"class": "baselines.malmen:Nope"}), "is not an Editor subclass"),
    (lambda d: d.update(rnak=8), "rnak"),
])
def test_bad_declaration_is_one_line_error_naming_the_file(tmp_path, change, message):
    data = yaml.safe_load((REPO_ROOT / "config" / "editors" / "malmen.yaml").read_text())
    data["name"] = "broken"
    change(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message) as err:
        editor_class(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_yaml_path_declares_a_new_editor(tmp_path, monkeypatch):
    path = copy_editor(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    decl = read_declaration(path)
    assert (decl.name, decl.label, decl.steps, decl.loss) == ("mymalmen", "MyMALMEN", 1, "kl")
    assert editor_class(path).__name__ == "MyMALMEN"
    assert editor_class("mymalmen").__name__ == "MyMALMEN"  # known by name once read from its path
    assert declaration("mymalmen", tmp_path / "config").path == path
    assert set(declarations(tmp_path / "config")) == {"mymalmen"}


def test_labels_come_from_the_declarations(tmp_path):
    copy_editor(tmp_path)
    try:
        aggregation.use_editors(tmp_path / "config")
        assert aggregation.editor_label("mymalmen", 2, "kl") == "MyMALMEN²"
        assert aggregation.editor_label("mymalmen", 1, "l2") == "MyMALMEN (L2)"
        assert aggregation.editor_label("emsedit", 2, "kl") == "EMSEdit (KL)"
    finally:
        aggregation.use_editors(REPO_ROOT / "config")


def test_a_copied_editor_runs_as_a_workflow_grid_entry(tmp_path):
    """A copy of MALMEN under a new name, declared only by its class file and YAML in a scratch
    working directory, is planned and run by the tiny workflow; its record equals MALMEN's on the
    same cell apart from the editor's name."""
    work = tmp_path / "work"
    shutil.copytree(REPO_ROOT / ".test", work, ignore=shutil.ignore_patterns("results", "logs", "resources", ".snakemake"))
    copy_editor(work)
    config = yaml.safe_load((REPO_ROOT / ".test" / "config.yaml").read_text())
    config["studies"]["main"]["grids"].append({"protocol": "batch", "editor": "mymalmen", "steps": 1, "loss": "kl"})
    config_path = work / "config.mymalmen.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    all_cells = grid.unique_cells(grid.expand(config))
    mine = [c for c in all_cells if c.editor == "mymalmen" and c.dataset == "tiny-zsre" and c.seed == 0
            and c.variant == "faithful"]
    assert len(mine) == 1
    twin = dataclasses.replace(mine[0], editor="malmen")
    assert twin in all_cells
    cells = [mine[0], twin]
    targets = [c.path for c in cells]
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO_ROOT / "Snakefile"), "--directory", str(work),
           "--configfile", str(config_path), "--cores", "2", *targets]
    res = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-6000:]
    records = {c.editor: json.loads((work / c.path).read_text()) for c in cells}
    ours, theirs = records["mymalmen"], records["malmen"]
    assert ours["config"]["editor"]["name"] == "mymalmen"
    assert ours["metrics"] == theirs["metrics"]
    assert ours["training"]["losses"] == theirs["training"]["losses"]
