"""Reusable trained editors: ``run --save-editor DIR`` and ``run --load-editor DIR`` (issue 14.5).

An archive is a folder holding the pair :func:`emsedit.checkpoints.save_checkpoint` writes, under
the stem ``editor``: ``editor.safetensors`` (every distinct step network's parameters and normaliser
statistics, :meth:`Editor.net_tensors`) and ``editor.json`` (format and version, the editor's name,
resolved hyperparameters, schedule, hypernetwork sharing and S, the model's name, the edited modules
with their (d_in, d_out) shapes, the training data with a digest of it, the training statistics,
and the tensor file's sha256). Nothing is pickled.

A load is checked against the requested run before any data or weights are read
(:func:`preflight`: folder, format, editor, model, S, sharing, schedule, every hyperparameter, the
tensor file's integrity, and the edited modules' names and shapes in the model's architecture built
on the meta device), and again once the editor is built (:func:`load_into`: modules, tensor names,
shapes and dtypes). Each refusal is a one-line :class:`~emsedit.config.ConfigError` naming what
differs. Training-free editors (UltraEdit) have nothing to save: both options are refused for them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from emsedit.acquire import sha256_of
from emsedit.checkpoints import load_checkpoint, save_checkpoint
from emsedit.config import ConfigError, ModelConfig, find_config
from emsedit.hparams import EditorHParams
from emsedit.models import resolve_modules, resolve_name_or_path, weight_shape
from emsedit.records import git_commit, versions

if TYPE_CHECKING:
    from torch import nn

    from emsedit.editors.base import Editor
    from emsedit.plans import DataPlan

FORMAT = "emsedit-editor-archive"
FORMAT_VERSION = 1
STEM = "editor"  # editor.safetensors + editor.json


def training_data_digest(train_sha256: str | None, train_order: list[int], edits: int) -> str:
    """sha256 of what meta-training saw: the train file's sha256, its indices in order, turn size."""
    key = json.dumps({"train_sha256": train_sha256, "train_order": list(train_order), "edits_per_turn": edits},
                     sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _identity(cls: type[Editor], hp: EditorHParams, protocol: str, model: str) -> dict[str, Any]:
    """What an archive must agree on with the run that loads it (all known before the model loads)."""
    return {"editor": hp.name, "model": model, "steps": hp.steps,
            "hypernetworks": cls.resolve_hypernetworks(hp, protocol),
            "schedule": cls.resolve_schedule(hp, protocol),
            "hparams": json.loads(json.dumps(dataclasses.asdict(hp)))}


def _modules(modules: dict[str, nn.Module]) -> list[dict[str, Any]]:
    return [{"name": n, "shape": list(weight_shape(m))} for n, m in modules.items()]


def _check_modules(where: str, meta: dict[str, Any], modules: dict[str, nn.Module]) -> None:
    archived, here = meta.get("modules") or [], _modules(modules)
    names, here_names = [m.get("name") for m in archived], [m["name"] for m in here]
    if names != here_names:
        only_archive = [n for n in names if n not in here_names]
        only_here = [n for n in here_names if n not in names]
        detail = "; ".join([*([f"only in the archive: {only_archive}"] if only_archive else []),
                            *([f"only in this run: {only_here}"] if only_here else [])])
        raise ConfigError(f"{where}: edited modules differ: {detail or 'same modules, another order'}")
    for a, b in zip(archived, here):
        if a.get("shape") != b["shape"]:
            raise ConfigError(f"{where}: module {b['name']} has shape {a.get('shape')} in the archive, "
                              f"{b['shape']} in this run")


def _skeleton_modules(model_cfg: ModelConfig) -> dict[str, nn.Module] | None:
    """The edited modules of the model's architecture built on the meta device (no weights are read);
    None for a local model that is not on disk (loading it says what to do)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    target = resolve_name_or_path(model_cfg)
    if Path(target).is_absolute() and not (Path(target) / "config.json").is_file():
        return None
    config = AutoConfig.from_pretrained(target, trust_remote_code=model_cfg.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=model_cfg.trust_remote_code)
    return resolve_modules(model, list(model_cfg.edit_modules))


def save_editor(folder: str | Path, editor: Editor, *, model: str, protocol: str, plan: DataPlan,
                edits: int, seed: int) -> None:
    """Write the trained editor (call it right after meta-training, before any edit)."""
    train_file = plan.files.get("train")
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        **_identity(type(editor), editor.hp, protocol, model),
        "protocol": protocol,
        "modules": _modules(editor.modules),
        "training": {
            "data_sha256": training_data_digest(train_file and train_file["sha256"], plan.train_order, edits),
            "train_file": train_file, "train_order": list(plan.train_order), "edits_per_turn": edits,
            "train_turns": len(plan.train_order) // edits, "seed": seed, "stats": editor.stats,
        },
        "versions": versions(), "git_commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    save_checkpoint(folder, {k: v.to("cpu", copy=True) for k, v in editor.net_tensors().items()}, meta,
                    stem=STEM)


def preflight(cls: type[Editor], hp: EditorHParams, opts: Any) -> dict[str, Any] | None:
    """Refuse what cannot work before any long work; return the archive's JSON when loading."""
    if not cls.trains:
        for option in ("save_editor", "load_editor"):
            if getattr(opts, option):
                raise ConfigError(f"--{option.replace('_', '-')}: editor {hp.name!r} is training-free; "
                                  "it has no trained state to save or load")
    if opts.save_editor and Path(opts.save_editor).exists() and not Path(opts.save_editor).is_dir():
        raise ConfigError(f"--save-editor {opts.save_editor}: exists and is not a folder")
    if not opts.load_editor:
        return None
    folder = Path(opts.load_editor)
    where = f"--load-editor {folder}"
    if not folder.is_dir():
        raise ConfigError(f"{where}: no such folder")
    json_path, tensor_path = folder / f"{STEM}.json", folder / f"{STEM}.safetensors"
    for path in (json_path, tensor_path):
        if not path.is_file():
            raise ConfigError(f"{where}: {path.name} is missing (not an editor archive, or an incomplete one)")
    try:
        meta = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ConfigError(f"{where}: {json_path.name} is not readable JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{where}: {json_path.name} is not an emsedit editor archive "
                          f"(written by `run --save-editor`)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{where}: archive format version {meta.get('format_version')!r}; "
                          f"this code reads version {FORMAT_VERSION}")
    model_cfg = ModelConfig.from_yaml(find_config("models", opts.model))
    want = _identity(cls, hp, opts.protocol, model_cfg.name)
    for key, what in (("editor", "editor"), ("model", "model"), ("steps", "steps S"),
                      ("hypernetworks", "hypernetwork sharing"), ("schedule", "training schedule")):
        if meta.get(key) != want[key]:
            raise ConfigError(f"{where}: {what} differs: archive {meta.get(key)!r}, this run {want[key]!r}")
    have = meta.get("hparams") or {}
    keys = sorted(k for k in {*have, *want["hparams"]} if have.get(k) != want["hparams"].get(k))
    if keys:
        raise ConfigError(f"{where}: hyperparameters differ: " + ", ".join(
            f"{k} (archive {have.get(k)!r}, this run {want['hparams'].get(k)!r})" for k in keys))
    if sha256_of(tensor_path) != meta.get("tensors_sha256"):
        raise ConfigError(f"{where}: {tensor_path.name} does not match the sha256 in {json_path.name} "
                          "(truncated or modified)")
    skeleton = _skeleton_modules(model_cfg)
    if skeleton is not None:
        _check_modules(where, meta, skeleton)
    return meta


def load_into(editor: Editor, folder: str | Path, meta: dict[str, Any]) -> None:
    """Check the edited modules and tensors against the built editor, then load the networks and
    the training statistics into it."""
    where = f"--load-editor {folder}"
    _check_modules(where, meta, editor.modules)
    try:
        restored = load_checkpoint(folder, stem=STEM)
    except (OSError, ValueError, SafetensorError) as err:
        raise ConfigError(f"{where}: unreadable archive ({err})") from None
    if restored is None:
        raise ConfigError(f"{where}: {STEM}.safetensors changed while loading (sha256 differs)")
    tensors, _ = restored
    expected = editor.net_tensors()
    wrong = sorted(k for k in {*tensors, *expected} if k not in tensors or k not in expected
                   or tensors[k].shape != expected[k].shape or tensors[k].dtype != expected[k].dtype)
    if wrong:
        k = wrong[0]
        got = f"{tuple(tensors[k].shape)} {tensors[k].dtype}" if k in tensors else "absent"
        need = f"{tuple(expected[k].shape)} {expected[k].dtype}" if k in expected else "absent"
        raise ConfigError(f"{where}: {len(wrong)} tensor(s) differ from this editor's networks, "
                          f"first {k}: archive {got}, this run {need}")
    editor.load_net_tensors(tensors)
    editor.stats = json.loads(json.dumps(meta["training"]["stats"]))


def record_fields(folder: str | Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What a run's ``config`` says about the loaded editor (the training it did not do itself)."""
    training = meta["training"]
    return {
        "editor_archive": {
            "path": str(folder), "tensors_sha256": meta["tensors_sha256"],
            "format_version": meta["format_version"], "training_data_sha256": training["data_sha256"],
            "train_file": training["train_file"], "edits_per_turn": training["edits_per_turn"],
            "seed": training["seed"], "created": meta.get("created"), "git_commit": meta.get("git_commit"),
        },
        "train_turns": training["train_turns"],
    }
