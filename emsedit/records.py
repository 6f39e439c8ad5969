"""Result records: provenance (versions, commit, code digest, memory), schema check and atomic writing."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from emsedit.config import REPO_ROOT

SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "result.schema.yaml"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries that change numbers."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "transformers", "numpy", "emsedit-repro"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def git_commit() -> str | None:
    """The project's git commit (with ``-dirty`` when the tree has changes), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}-dirty" if dirty else head


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 (first 16 hex digits) of the library code: every ``.py`` file of the ``emsedit`` and
    ``baselines`` packages, by relative path and content. Unlike the git commit, it ignores changes
    elsewhere (docs, tests, workflow) and sees uncommitted edits, so two records with the same digest
    were made by the same editing and evaluation code."""
    digest = hashlib.sha256()
    for path in sorted(p for package in ("emsedit", "baselines") for p in (REPO_ROOT / package).rglob("*.py")):
        digest.update(path.relative_to(REPO_ROOT).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0), 1)


def gpu_peak_mb() -> float | None:
    """``torch.cuda.max_memory_allocated`` in MiB when this process used CUDA, else None."""
    torch = sys.modules.get("torch")  # never import torch just to say it was not used
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return round(torch.cuda.max_memory_allocated() / (1024.0 * 1024.0), 1)


def provenance() -> dict[str, Any]:
    """The fields every record carries besides its content."""
    return {
        "peak_rss_mb": peak_rss_mb(),
        "gpu_peak_mb": gpu_peak_mb(),
        "versions": versions(),
        "git_commit": git_commit(),
        "code_digest": code_digest(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def validate_record(record: dict[str, Any]) -> None:
    """Check a record against ``workflow/schemas/result.schema.yaml`` (jsonschema)."""
    if "jsonschema" not in sys.modules:
        # jsonschema's optional URI format checker imports rfc3987_syntax, which builds a Lark
        # grammar at import time (~3 s per process, i.e. per experiment cell). Our schemas use no
        # `format` keywords, so that module is hidden; jsonschema skips the checker it would serve.
        sys.modules.setdefault("rfc3987_syntax", None)
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    jsonschema.validate(record, schema)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes to a temporary file in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes files private; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Write JSON atomically (see :func:`write_bytes_atomic`); NaN and infinity are refused."""
    write_bytes_atomic(path, (json.dumps(payload, indent=1, allow_nan=False) + "\n").encode())


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Validate and atomically write one result record."""
    validate_record(record)
    write_json_atomic(path, record)
