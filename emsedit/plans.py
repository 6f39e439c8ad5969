"""What a cell runs on: editor and dataset configs, the requests and their seeded orders, turns.

* :func:`load_editor`, :func:`iteration_control`, :func:`load_dataset_config` — configurations;
* :func:`plan_data` — a dataset's eval and train requests and the seeded permutations every cell of a
  seed shares (:func:`write_order` writes them once for the workflow);
* :func:`pick`, :func:`build_turns` — requests in an order, cut into collated turns.

Running a cell on a plan is :mod:`emsedit.protocols`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import yaml

from emsedit.acquire import obtain_dataset, sha256_of
from emsedit.batching import make_turn
from emsedit.config import ConfigError, find_config
from emsedit.data import EditRequest, Turn
from emsedit.hparams import EditorHParams
from emsedit.registry import declaration, editor_class, load_class
from emsedit.schemas import read_requests


# ----------------------------------------------------------------------------- configuration
def load_dataset_config(name_or_path: str) -> dict[str, Any]:
    """A dataset config (``config/datasets/*.yaml``) as a dict, with its kind checked."""
    path = find_config("datasets", name_or_path)
    data = yaml.safe_load(path.read_text()) or {}
    if data.get("kind") not in ("zsre", "counterfact"):
        raise ConfigError(f"{path}: kind must be zsre or counterfact, got {data.get('kind')!r}")
    for split in ("train", "eval"):
        if not isinstance(data.get(split), dict) or "file" not in data[split]:
            raise ConfigError(f"{path}: missing {split}.file")
    return data


def load_editor(name_or_path: str, overrides: dict[str, Any]) -> EditorHParams:
    """Editor hyperparameters from ``config/editors`` (or a YAML path) with command-line overrides
    applied; the editor's declaration is read too, so its class is known by name afterwards."""
    decl = declaration(name_or_path)
    hp = decl.hp.with_overrides(overrides, source=f"editor {decl.name} overrides") if overrides else decl.hp
    load_class(decl).check_hparams(hp)
    return hp


def iteration_control(hp: EditorHParams, protocol: str, steps: int) -> EditorHParams:
    """``run --match-iterations S``: the editor at S = 1 with the Adam iterations it receives at S."""
    if steps < 1:
        raise ConfigError(f"--match-iterations must be >= 1, got {steps}")
    try:
        return editor_class(hp.name).iteration_matched(hp, protocol, steps)
    except ValueError as err:
        raise ConfigError(f"--match-iterations: {err}") from None


# ----------------------------------------------------------------------------- data and orders
@dataclass
class DataPlan:
    """The requests of a cell and the seeded orders in which they are used."""

    kind: str
    eval_requests: list[EditRequest]
    train_requests: list[EditRequest]
    edit_order: list[int]  # file indices
    train_order: list[int]  # file indices
    files: dict[str, dict[str, str]] = field(default_factory=dict)


def seeded_order(requests: Sequence[EditRequest], n: int, seed: int, stream: int, what: str) -> list[int]:
    """The first ``n`` file indices of a seeded permutation of ``requests``."""
    if n > len(requests):
        raise ConfigError(f"{what}: {n} requests needed but the file has only {len(requests)} usable ones")
    perm = np.random.default_rng([seed, stream]).permutation(len(requests))[:n]
    return [requests[i].index for i in perm]


def _data_file(dataset: dict[str, Any], split: str, override: str | None, data_dir: str) -> Path:
    return Path(override) if override else obtain_dataset(dataset, split, data_dir=data_dir)


def plan_data(
    dataset: dict[str, Any],
    *,
    n_eval: int,
    n_train: int,
    seed: int,
    eval_file: str | None = None,
    train_file: str | None = None,
    order_file: str | None = None,
    data_dir: str = "resources/data",
    cap_train_to: int = 0,
) -> DataPlan:
    """Read the eval (and, when needed, train) requests and fix the seeded edit and train orders.

    With ``cap_train_to`` = k > 0, a training demand larger than the train file is cut to whole
    turns of k requests (the official code caps its training loop at the loader's length).
    """
    kind = dataset["kind"]
    target = dataset.get("zsre_target", "alt")
    eval_path = _data_file(dataset, "eval", eval_file, data_dir)
    eval_requests = read_requests(eval_path, kind, zsre_target=target)
    files = {"eval": {"path": str(eval_path), "sha256": sha256_of(eval_path)}}
    train_requests: list[EditRequest] = []
    if n_train:
        train_path = _data_file(dataset, "train", train_file, data_dir)
        train_requests = read_requests(train_path, kind, zsre_target=target)
        files["train"] = {"path": str(train_path), "sha256": sha256_of(train_path)}
        if cap_train_to and n_train > len(train_requests):
            n_train = len(train_requests) // cap_train_to * cap_train_to
    if order_file:
        order = json.loads(Path(order_file).read_text())
        if order.get("eval_sha256") not in (None, files["eval"]["sha256"]):
            raise ConfigError(f"{order_file}: written for another eval file (sha256 differs)")
        if len(order["edit_order"]) < n_eval:
            raise ConfigError(f"{order_file}: holds {len(order['edit_order'])} edits, {n_eval} needed")
        edit_order = [int(i) for i in order["edit_order"][:n_eval]]
    else:
        edit_order = seeded_order(eval_requests, n_eval, seed, 0, f"eval file {eval_path}")
    train_order = seeded_order(train_requests, n_train, seed, 1, "train file") if n_train else []
    return DataPlan(kind, eval_requests, train_requests, edit_order, train_order, files)


def pick(requests: Sequence[EditRequest], order: Sequence[int]) -> list[EditRequest]:
    """Requests by file index, in the given order."""
    by_index = {r.index: r for r in requests}
    missing = [i for i in order if i not in by_index]
    if missing:
        raise ConfigError(f"edit order names records {missing[:5]} that the file does not have")
    return [by_index[i] for i in order]


def build_turns(requests: Sequence[EditRequest], tokenizer: Any, edits: int, *, split: str,
                lm_batch_size: int, old_label_pad: int, device: torch.device | str = "cpu") -> list[Turn]:
    """Cut requests into turns of ``edits``, collate each (spec §4.3) and put it on ``device``."""
    turns = [
        make_turn(requests[i:i + edits], tokenizer, split=split, lm_batch_size=lm_batch_size,
                  old_label_pad=old_label_pad)
        for i in range(0, len(requests), edits)
    ]
    if torch.device(device).type != "cpu":
        for turn in turns:
            for kind in ("edit", "equiv", "unrel"):
                setattr(turn, kind, [b.to(device) for b in getattr(turn, kind)])
    return turns


def write_order(dataset_name: str, n: int, seed: int, out: str, *, eval_file: str | None = None,
                train_n: int = 0, data_dir: str = "resources/data") -> dict[str, Any]:
    """The seeded edit order of a dataset as a JSON file (every cell of a seed reads the same one)."""
    from emsedit.records import write_json_atomic

    dataset = load_dataset_config(dataset_name)
    plan = plan_data(dataset, n_eval=n, n_train=train_n, seed=seed, eval_file=eval_file, data_dir=data_dir)
    payload = {
        "dataset": dataset["name"], "seed": seed, "n": n, "eval_file": plan.files["eval"]["path"],
        "eval_sha256": plan.files["eval"]["sha256"], "edit_order": plan.edit_order,
        "train_order": plan.train_order,
    }
    write_json_atomic(out, payload)
    return payload
