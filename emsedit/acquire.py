"""Getting a dataset file into the data folder, sha256-checked: local copy → mirror → download.

:func:`obtain` looks for a file in this order and stops at the first copy whose sha256 matches:

1. ``data_dir/file`` already present;
2. a mirror folder (the ``mirror`` argument, else the environment variable ``EMSEDIT_DATA_MIRROR``),
   searched as ``mirror/file`` and then ``mirror/*/file`` (the shared mirror keeps ``zsre/`` and
   ``counterfact/`` subfolders);
3. a download from the spec's ``url`` (urllib, with a timeout).

A candidate is written to a temporary file inside ``data_dir`` while it is hashed and only moved into
place (``os.replace``) once verified, so a half-written or wrong file never takes the real name.
When the spec's ``sha256`` is null (the paper-scale files whose checksum is not known), nothing can
be verified: the first copy found is used and a warning says so.

Command line: ``python -m emsedit fetch --dataset zsre``.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "AcquireError",
    "FileSpec",
    "MIRROR_ENV",
    "obtain",
    "obtain_dataset",
    "sha256_of",
    "main",
]

#: Environment variable naming the mirror folder when no ``mirror`` argument is given.
MIRROR_ENV = "EMSEDIT_DATA_MIRROR"

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

log = logging.getLogger(__name__)


class AcquireError(RuntimeError):
    """A dataset file could not be obtained; the message names the file and everything tried."""


@dataclass(frozen=True)
class FileSpec:
    """What identifies one dataset file: its name in the data folder, checksum and source URL."""

    file: str
    sha256: str | None
    url: str | None

    @classmethod
    def from_mapping(cls, spec: Mapping[str, Any] | FileSpec) -> FileSpec:
        """Validate a ``{file, sha256, url}`` mapping (``sha256``/``url`` may be null)."""
        if isinstance(spec, FileSpec):
            return spec
        if not isinstance(spec, Mapping):
            raise AcquireError(f"a file spec must be a mapping with file/sha256/url, got {spec!r}")
        unknown = sorted(set(spec) - {"file", "sha256", "url"})
        if unknown:
            raise AcquireError(f"file spec {dict(spec)!r}: unknown key(s) {unknown}")
        name = spec.get("file")
        if not isinstance(name, str) or not name or name in (".", ".."):
            raise AcquireError(f"file spec {dict(spec)!r}: 'file' must be a non-empty file name")
        if "/" in name or "\\" in name or os.sep in name:
            raise AcquireError(f"file spec for {name!r}: 'file' must be a bare file name, not a path")
        digest = spec.get("sha256")
        if digest is not None:
            if not isinstance(digest, str) or not _SHA256_RE.match(digest.lower()):
                raise AcquireError(f"{name}: 'sha256' must be 64 hex digits or null, got {digest!r}")
            digest = digest.lower()
        url = spec.get("url")
        if url is not None and (not isinstance(url, str) or not url):
            raise AcquireError(f"{name}: 'url' must be a non-empty string or null, got {url!r}")
        return cls(file=name, sha256=digest, url=url)


def sha256_of(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _copy_hashing(src: BinaryIO, dst: BinaryIO) -> str:
    """Stream ``src`` into ``dst`` and return the sha256 of what was copied."""
    digest = hashlib.sha256()
    for chunk in iter(lambda: src.read(_CHUNK), b""):
        digest.update(chunk)
        dst.write(chunk)
    return digest.hexdigest()


class _Attempt:
    """Stages one candidate into a temp file in ``data_dir`` and moves it into place if verified."""

    def __init__(self, spec: FileSpec, target: Path):
        self.spec = spec
        self.target = target

    def install(self, source: BinaryIO, origin: str, tried: list[str]) -> bool:
        """Copy ``source`` to the target atomically if its checksum matches; log the outcome."""
        fd, tmp_name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.spec.file}.", suffix=".tmp")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                got = _copy_hashing(source, out)
                out.flush()
                os.fsync(out.fileno())
            if self.spec.sha256 is not None and got != self.spec.sha256:
                tried.append(f"{origin}: checksum mismatch (expected {self.spec.sha256}, got {got})")
                return False
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.target)
        finally:
            if tmp.exists():
                tmp.unlink()
        if self.spec.sha256 is None:
            warnings.warn(
                f"{self.spec.file}: no sha256 configured, so the copy from {origin} is used unverified "
                f"(its sha256 is {got})",
                stacklevel=3,
            )
        log.info("%s: obtained from %s", self.spec.file, origin)
        return True


def _mirror_candidates(mirror: Path, name: str) -> list[Path]:
    """``mirror/name`` first, then ``mirror/<sub>/name`` for each subfolder in name order."""
    found = []
    if (mirror / name).is_file():
        found.append(mirror / name)
    for sub in sorted(p for p in mirror.iterdir() if p.is_dir()):
        if (sub / name).is_file():
            found.append(sub / name)
    return found


def obtain(
    file_spec: Mapping[str, Any] | FileSpec,
    *,
    data_dir: str | Path = "resources/data",
    mirror: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """Make sure ``data_dir/<file>`` holds the file with the spec's sha256 and return its path.

    ``file_spec`` has ``file`` (name), ``sha256`` (hex, or null when unknown) and ``url`` (or null).
    Tries the existing copy, then the mirror (argument, else ``$EMSEDIT_DATA_MIRROR``), then the URL;
    raises :class:`AcquireError` listing every attempt when none yields a verified copy.
    """
    spec = FileSpec.from_mapping(file_spec)
    folder = Path(data_dir)
    target = folder / spec.file
    tried: list[str] = []

    # (1) Already in place?
    if target.is_file():
        got = sha256_of(target)
        if spec.sha256 is None:
            warnings.warn(
                f"{spec.file}: no sha256 configured, so the existing {target} is used unverified "
                f"(its sha256 is {got})",
                stacklevel=2,
            )
            return target
        if got == spec.sha256:
            return target
        tried.append(f"existing {target}: checksum mismatch (expected {spec.sha256}, got {got})")
    else:
        tried.append(f"existing {target}: not present")

    folder.mkdir(parents=True, exist_ok=True)
    attempt = _Attempt(spec, target)

    # (2) Mirror.
    mirror_dir = mirror if mirror is not None else os.environ.get(MIRROR_ENV) or None
    if mirror_dir is None:
        tried.append(f"mirror: none given (no mirror argument, {MIRROR_ENV} unset)")
    elif not Path(mirror_dir).is_dir():
        tried.append(f"mirror {mirror_dir}: no such directory")
    else:
        candidates = _mirror_candidates(Path(mirror_dir), spec.file)
        if not candidates:
            tried.append(f"mirror {mirror_dir}: no {spec.file} in it or its subfolders")
        for candidate in candidates:
            try:
                with open(candidate, "rb") as src:
                    if attempt.install(src, f"mirror copy {candidate}", tried):
                        return target
            except OSError as exc:
                tried.append(f"mirror copy {candidate}: cannot be read ({exc})")

    # (3) Download.
    if spec.url is None:
        tried.append("download: no url configured")
    else:
        request = urllib.request.Request(spec.url, headers={"User-Agent": "emsedit-acquire"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if attempt.install(response, f"download {spec.url}", tried):
                    return target
        except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
            tried.append(f"download {spec.url}: failed ({exc})")

    raise AcquireError(f"{spec.file}: could not obtain a verified copy. Tried: " + "; ".join(tried))


def obtain_dataset(
    dataset_cfg: Mapping[str, Any],
    split: str,
    *,
    data_dir: str | Path = "resources/data",
    mirror: str | Path | None = None,
    timeout: float = 60.0,
) -> Path:
    """Obtain one split's file of a dataset config (``config/datasets/*.yaml`` loaded as a dict).

    ``split`` is a key of the config holding a file spec, normally ``"train"`` or ``"eval"``.
    """
    name = dataset_cfg.get("name", "<unnamed dataset>")
    spec = dataset_cfg.get(split)
    if not isinstance(spec, Mapping):
        splits = sorted(k for k, v in dataset_cfg.items() if isinstance(v, Mapping) and "file" in v)
        raise AcquireError(f"dataset {name}: no file spec for split {split!r} (has {splits})")
    return obtain(spec, data_dir=data_dir, mirror=mirror, timeout=timeout)
