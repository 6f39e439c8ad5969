"""Hypernetwork checkpoints: safetensors for tensors plus a small JSON, both written atomically.

A checkpoint lives in a folder whose name encodes the whole experiment key, so two cells can never
share one. ``state.safetensors`` holds the editor's tensors (networks with normaliser statistics,
Adam state, pending gradients, edited weights); ``state.json`` holds progress and counters. The JSON
is written last and names the tensor file's sha256, so a torn write is detected and ignored.
The same pair, under the stem ``editor``, is a reusable trained editor (:mod:`emsedit.editor_archive`).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from emsedit.records import write_bytes_atomic


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(folder: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                    stem: str = "state") -> None:
    """Write tensors and metadata atomically into ``folder`` (``<stem>.safetensors``, ``<stem>.json``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}.safetensors"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    payload = {**meta, "tensors_sha256": _sha256(target)}
    write_bytes_atomic(folder / f"{stem}.json", json.dumps(payload, indent=1, sort_keys=True).encode())


def load_checkpoint(folder: str | Path, *,
                    stem: str = "state") -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Read a checkpoint; None when there is none or it is incomplete (torn write)."""
    folder = Path(folder)
    meta_path, tensor_path = folder / f"{stem}.json", folder / f"{stem}.safetensors"
    if not (meta_path.exists() and tensor_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("tensors_sha256") != _sha256(tensor_path):
        return None
    return load_file(tensor_path), meta
