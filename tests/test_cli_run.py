"""End-to-end tests of ``python -m emsedit run`` on a tiny saved model and a small fixture dataset:
determinism, resume after a fault at a checkpoint, user errors (exit 2, one line) and ``--help``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emsedit import cli
from emsedit.registry import editor_class
from emsedit.config import REPO_ROOT
from emsedit.tiny import save_tiny_model, tiny_zsre_records

torch.set_num_threads(1)

VOLATILE = ("timings", "created", "peak_rss_mb")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_yaml = save_tiny_model(root / "tiny-llama", style="llama", seed=0)
    data = root / "data"
    data.mkdir()
    files = {}
    for split, offset in (("train", 0), ("eval", 40)):
        path = data / f"tiny_zsre_{split}.json"
        path.write_text(json.dumps(tiny_zsre_records(40, offset), indent=1))
        files[split] = {"file": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                        "url": None}
    dataset_yaml = root / "tiny-zsre.yaml"
    dataset_yaml.write_text(yaml.safe_dump({"name": "tiny-zsre", "kind": "zsre", **files}))
    return {"root": root, "model": str(model_yaml), "dataset": str(dataset_yaml), "data": str(data)}


def run_args(env, out, *extra):
    return ["run", "--model", env["model"], "--dataset", env["dataset"], "--data-dir", env["data"],
            "--editor", "emsedit", "--seed", "3", "--turns", "2", "--edits", "4", "--train-turns", "3",
            "--threads", "1", "--set", "rank=8", "--set", "lr=100", "--out", str(out), *extra]


def strip(record):
    return {k: v for k, v in record.items() if k not in VOLATILE}


def subprocess_env(**extra):
    e = dict(os.environ)
    e.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra})
    return e


@pytest.fixture(scope="module")
def reference(env):
    """An uninterrupted run (in-process through the CLI entry point)."""
    out = env["root"] / "reference.json"
    assert cli.main(run_args(env, out)) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def reference_state(env, reference):
    """The final checkpoint of an uninterrupted run with checkpointing (its record must equal the
    run without checkpoints)."""
    out = env["root"] / "reference_ckpt.json"
    folder = env["root"] / "reference_ckpt"
    assert cli.main(run_args(env, out, "--checkpoint-dir", str(folder), "--checkpoint-every", "0",
                            "--keep-checkpoint")) == 0
    assert strip(json.loads(out.read_text())) == strip(reference)
    return _final_state(folder)


def test_checkpoint_removed_once_the_record_is_written(env, reference, tmp_path):
    out, folder = tmp_path / "run.json", tmp_path / "ckpt"
    assert cli.main(run_args(env, out, "--checkpoint-dir", str(folder), "--checkpoint-every", "0")) == 0
    assert strip(json.loads(out.read_text())) == strip(reference)
    assert not folder.exists()  # state and the then-empty folder are gone


def _final_state(folder):
    (state_dir,) = list(Path(folder).iterdir())
    meta = json.loads((state_dir / "state.json").read_text())
    return meta, load_file(state_dir / "state.safetensors")


# ---------------------------------------------------------------------------------------- determinism
def test_run_is_deterministic(env, reference, tmp_path):
    out = tmp_path / "again.json"
    assert cli.main(run_args(env, out)) == 0
    again = json.loads(out.read_text())
    assert strip(again) == strip(reference)
    # the record is a real run: training happened and the edits are measurable
    assert reference["kind"] == "run"
    assert reference["config"]["train_turns"] == 3 and reference["config"]["steps"] == 2
    assert len(reference["edit_order"]) == 8 and len(reference["train_order"]) == 12
    assert reference["training"]["optimizer_steps"] == 1  # one Adam step per rollout (quirk 1)
    assert reference["training"]["train_turns"] == 3
    assert reference["metrics"]["post"]["efficacy"] > reference["metrics"]["pre"]["efficacy"]


def test_thread_count_changes_a_record_by_float_rounding_at_most(env, reference, tmp_path):
    """--threads 2 gives the record of --threads 1 up to float rounding (the checkpoint key leaves
    threads out, so a run may resume with another thread count). Exact equality is machine-dependent:
    on an AVX-512 CPU (AMD EPYC, torch 2.13) torch's CPU attention kernel gives other last bits at 2
    threads for the same inputs, which moves the training losses by ~2e-7 relative; orders, configuration,
    training statistics and the scores stay equal."""
    out = tmp_path / "threads2.json"
    args = run_args(env, out)
    args[args.index("--threads") + 1] = "2"
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(1)  # run_cell set 2 for this process
    two = json.loads(out.read_text())
    assert (reference["config"]["threads"], two["config"]["threads"]) == (1, 2)
    two["config"]["threads"] = 1
    assert two["training"].pop("losses") == pytest.approx(reference["training"]["losses"], rel=1e-5, abs=1e-6)
    ref = strip(reference)
    ref["training"] = {k: v for k, v in reference["training"].items() if k != "losses"}
    assert strip(two) == ref


def test_recomputed_network_forward_gives_the_same_record(env, reference, tmp_path):
    """--keep-graph-mb 0 (the official recompute of the hypernetwork forward in the meta-gradient)
    gives the default run's record; only the setting itself, in the configuration, differs."""
    out = tmp_path / "recompute.json"
    assert cli.main(run_args(env, out, "--keep-graph-mb", "0")) == 0
    again = json.loads(out.read_text())
    assert (reference["config"]["keep_graph_mb"], again["config"]["keep_graph_mb"]) == (1024.0, 0.0)
    again["config"]["keep_graph_mb"] = 1024.0
    assert strip(again) == strip(reference)


def test_resume_key_leaves_out_the_kept_graph_bound(env, tmp_path):
    """A cell interrupted under one --keep-graph-mb resumes under another: the checkpoint folder's
    key leaves the bound out (kept graphs never outlive a training turn, so no checkpoint holds one)."""
    folders = []
    for value in ("0", "1024"):
        ckpt = tmp_path / f"ckpt{value}"
        assert cli.main(run_args(env, tmp_path / f"out{value}.json", "--checkpoint-dir", str(ckpt),
                                 "--checkpoint-every", "0", "--keep-checkpoint", "--keep-graph-mb", value)) == 0
        folders += [p.name for p in ckpt.iterdir()]
    assert len(folders) == 2 and folders[0] == folders[1]


def test_different_seed_changes_the_order(env, reference, tmp_path):
    out = tmp_path / "seed4.json"
    args = run_args(env, out)
    args[args.index("--seed") + 1] = "4"
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["edit_order"] != reference["edit_order"]


# ---------------------------------------------------------------------------------------- resume
# The CLI, with the process killed (exit 75) right after checkpoint write N: the test passes the hook
# to run_cell; the library reads nothing from the environment for it.
KILL_AFTER_CHECKPOINT = """
import os, sys
from emsedit import cli, protocols
n, real = int(sys.argv[1]), protocols.run_cell
protocols.run_cell = lambda hp, opts: real(hp, opts, after_checkpoint=lambda w: os._exit(75) if w >= n else None)
sys.exit(cli.main(sys.argv[2:]))
"""
# Per editor: extra CLI arguments, the schedule the record must show, and the checkpoint writes of a
# run with 3 training turns and 2 edit turns: one per training turn, a forced one at the start of
# editing, one per edit turn. UltraEdit is training-free: it has no training checkpoint at all (its
# first write is the start of editing), so its faults are in the editing phase only.
RESUME_EDITORS = {
    "emsedit": {"args": [], "schedule": "rollout", "hypernetworks": "per_step"},
    # MALMEN² (S = 2, one network shared by both steps), sequential protocol: its step-wise batch
    # schedule checkpoints after each training turn and the protocol after each of the 2 edit turns
    "malmen": {"args": ["--steps", "2", "--set", "lr=100"], "schedule": "batch", "hypernetworks": "shared"},
    "rledit": {"args": ["--set", "lr=100"], "schedule": "rollout_backtrack", "hypernetworks": "per_step"},
    "ultraedit": {"args": ["--set", "lr=1"], "schedule": "none", "hypernetworks": "per_step"},
}
SCHEDULE_METHODS = {"rollout": "_train_rollout", "batch": "_train_batch", "rollout_backtrack": "_train_backtrack"}
# (editor, fault after checkpoint write N, (phase, units) in the checkpoint, work left on resume)
RESUME_CASES = [
    ("emsedit", 1, ("train", 1), {"train": 2, "edit": 2}),  # after the first training turn
    ("emsedit", 5, ("edit", 1), {"train": 0, "edit": 1}),   # 4 = start of editing, 5 = first edit turn
    ("malmen", 1, ("train", 1), {"train": 2, "edit": 2}),
    ("malmen", 5, ("edit", 1), {"train": 0, "edit": 1}),
    ("rledit", 1, ("train", 1), {"train": 2, "edit": 2}),   # mid-rollout: memory turns and edited W
    ("rledit", 5, ("edit", 1), {"train": 0, "edit": 1}),
    ("ultraedit", 1, ("edit", 0), {"train": 0, "edit": 2}),  # write 1 is already in the editing phase
    ("ultraedit", 2, ("edit", 1), {"train": 0, "edit": 1}),
]


def editor_args(env, out, editor, *extra):
    args = run_args(env, out, *RESUME_EDITORS[editor]["args"], *extra)
    args[args.index("--editor") + 1] = editor
    return args


@pytest.fixture(scope="module")
def editor_references(env, reference, reference_state):
    """Per editor, lazily: the uninterrupted record and the final checkpoint of an uninterrupted run
    with checkpointing (whose record must equal the record without checkpoints)."""
    cache = {"emsedit": (reference, reference_state)}

    def get(editor):
        if editor not in cache:
            out = env["root"] / f"reference_{editor}.json"
            assert cli.main(editor_args(env, out, editor)) == 0
            record = json.loads(out.read_text())
            out_ckpt, folder = env["root"] / f"reference_{editor}_ckpt.json", env["root"] / f"ckpt_{editor}"
            assert cli.main(editor_args(env, out_ckpt, editor, "--checkpoint-dir", str(folder),
                                        "--checkpoint-every", "0", "--keep-checkpoint")) == 0
            assert strip(json.loads(out_ckpt.read_text())) == strip(record)
            cache[editor] = (record, _final_state(folder))
        return cache[editor]

    return get


@pytest.mark.parametrize("editor, fault_after, state_at_fault, work_left", RESUME_CASES,
                         ids=[f"{e}-fault{n}" for e, n, _, _ in RESUME_CASES])
def test_resume_after_fault_equals_uninterrupted(env, editor_references, tmp_path, monkeypatch,
                                                editor, fault_after, state_at_fault, work_left):
    """Fault right after checkpoint write N, then rerun the same command: the record and the final
    state equal an uninterrupted run's, and the rerun does only the work left."""
    reference, (ref_meta, ref_tensors) = editor_references(editor)
    spec = RESUME_EDITORS[editor]
    assert reference["config"]["editor"]["schedule"] == spec["schedule"]
    assert reference["config"]["hypernetworks"] == spec["hypernetworks"]
    assert reference["config"]["steps"] == (2 if editor in ("emsedit", "malmen") else 1)
    assert reference["config"]["train_turns"] == (0 if editor == "ultraedit" else 3)
    if editor == "ultraedit":  # training-free: the uninterrupted run's checkpoints never were in training
        assert reference["training"]["optimizer_steps"] == 0 and reference["training"]["train_turns"] == 0
    out = tmp_path / "resumed.json"
    args = editor_args(env, out, editor, "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_CHECKPOINT, str(fault_after), *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert not out.exists()
    state = json.loads(next((tmp_path / "ckpt").glob("*/state.json")).read_text())
    assert (state["phase"], state["units"]) == state_at_fault
    # resume, without the fault, counting the work the second process does
    cls = editor_class(editor)
    done = {"train": 0, "edit": 0}

    def counting(kind, real):
        def wrapper(self, *a, **k):
            done[kind] += 1
            return real(self, *a, **k)
        return wrapper

    for method in SCHEDULE_METHODS.values():
        monkeypatch.setattr(cls, method, counting("train", getattr(cls, method)))
    monkeypatch.setattr(cls, "edit_turn", counting("edit", cls.edit_turn))
    assert cli.main([*args, "--keep-checkpoint"]) == 0  # kept, to compare the final state below
    assert done == work_left
    resumed = json.loads(out.read_text())
    for key in ("metrics", "training", "edit_order", "train_order"):
        assert resumed[key] == reference[key], key
    assert strip(resumed)["config"] == strip(reference)["config"]
    # and the final state (hypernetworks, normalisers, Adam state, edited weights) is bit-identical
    meta, tensors = _final_state(tmp_path / "ckpt")
    assert (meta["phase"], meta["units"], meta["stats"]) == (ref_meta["phase"], ref_meta["units"], ref_meta["stats"])
    assert sorted(tensors) == sorted(ref_tensors)
    for key, value in ref_tensors.items():
        assert torch.equal(tensors[key], value), key


class _Killed(BaseException):
    """Stands in for the process exit at the fault checkpoint (in-process variant)."""


def test_resume_keeps_the_per_turn_curve(env, tmp_path, monkeypatch):
    """With --curve, a run resumed in the editing phase must report the same curve as an
    uninterrupted one (the curve entries of the turns edited before the fault are in the checkpoint)."""
    import emsedit.protocols as protocols

    ref_out = tmp_path / "ref.json"
    assert cli.main(run_args(env, ref_out, "--curve")) == 0
    reference = json.loads(ref_out.read_text())
    assert [c["turn"] for c in reference["metrics"]["curve"]] == [1, 2]

    out = tmp_path / "resumed.json"
    args = run_args(env, out, "--curve", "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "0")

    def killed(writes):
        if writes >= 5:  # after the first edit turn
            raise _Killed(writes)

    real = protocols.run_cell
    with monkeypatch.context() as m:
        m.setattr(protocols, "run_cell", lambda hp, opts: real(hp, opts, after_checkpoint=killed))
        with pytest.raises(_Killed):
            cli.main(args)
    assert not out.exists()
    assert cli.main(args) == 0
    resumed = json.loads(out.read_text())
    assert [c["turn"] for c in resumed["metrics"]["curve"]] == [1, 2]
    assert resumed["metrics"] == reference["metrics"]


# ------------------------------------------------------------------------- shared prefix activations
@pytest.fixture(scope="module")
def upper_only(env):
    """The tiny model with only its upper layer edited, so layer 0 is an unedited prefix."""
    cfg = yaml.safe_load(Path(env["model"]).read_text())
    cfg["edit_modules"] = ["model.layers.1.mlp.down_proj"]
    path = env["root"] / "tiny-llama-upper.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _evaluate_args(env, model, out, prefix, *extra):
    return ["evaluate", "--model", model, "--dataset", env["dataset"], "--data-dir", env["data"],
            "--seed", "3", "--n", "8", "--edits", "4", "--threads", "1", "--out", str(out),
            "--prefix-out", str(prefix), *extra]


def _run_upper(env, model, out, *extra):
    args = run_args(env, out, *extra)
    args[args.index("--model") + 1] = model
    return args


def test_shared_prefix_activations_are_replayed_and_change_nothing(env, upper_only, tmp_path):
    """`evaluate --prefix-out` then `run --pre --prefix-in`: every eval mini-batch's lower layers are
    replayed from the file, and the record equals the run that computed them itself."""
    pre, prefix = tmp_path / "pre.json", tmp_path / "pre.prefix.safetensors"
    assert cli.main(_evaluate_args(env, upper_only, pre, prefix)) == 0
    written = json.loads(pre.read_text())["config"]["prefix_activations"]["mini_batches"]
    assert written == 6  # 2 turns × (edit, paraphrase, locality), one mini-batch of 4 each
    plain, shared = tmp_path / "plain.json", tmp_path / "shared.json"
    assert cli.main(_run_upper(env, upper_only, plain, "--pre", str(pre))) == 0
    assert cli.main(_run_upper(env, upper_only, shared, "--pre", str(pre), "--prefix-in", str(prefix))) == 0
    plain, shared = json.loads(plain.read_text()), json.loads(shared.read_text())
    assert "prefix_activations" not in plain["config"]
    assert shared["config"].pop("prefix_activations") == {
        "path": str(prefix), "mini_batches": written, "replayed": written}
    assert strip(shared) == strip(plain)
    assert shared["metrics"]["post"]["efficacy"] > shared["metrics"]["pre"]["efficacy"]


def test_shared_prefix_over_the_size_limit_is_written_empty(env, upper_only, tmp_path):
    pre, prefix = tmp_path / "pre.json", tmp_path / "pre.prefix.safetensors"
    assert cli.main(_evaluate_args(env, upper_only, pre, prefix, "--prefix-max-mb", "0")) == 0
    assert json.loads(pre.read_text())["config"]["prefix_activations"]["mini_batches"] == 0
    assert prefix.exists() and load_file(prefix) == {}


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_shared_prefix_size_limit_must_be_finite(env, upper_only, tmp_path, capsys, value):
    pre, prefix = tmp_path / "pre.json", tmp_path / "pre.prefix.safetensors"
    capsys.readouterr()
    assert cli.main(_evaluate_args(env, upper_only, pre, prefix, "--prefix-max-mb", value)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--prefix-max-mb" in err[0], err
    assert not pre.exists() and not prefix.exists()


def test_shared_prefix_of_another_model_is_refused(env, upper_only, tmp_path, capsys):
    other = yaml.safe_load(Path(upper_only).read_text())
    other["name_or_path"] = str(Path(save_tiny_model(tmp_path / "other", style="llama", seed=1)).parent)
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text(yaml.safe_dump(other))
    pre, prefix = tmp_path / "pre.json", tmp_path / "pre.prefix.safetensors"
    assert cli.main(_evaluate_args(env, str(other_yaml), pre, prefix)) == 0
    out = tmp_path / "out.json"
    _expect_user_error(_run_upper(env, upper_only, out, "--prefix-in", str(prefix)), out, capsys,
                       "written for other settings")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_text("not a safetensors file")
    _expect_user_error(_run_upper(env, upper_only, out, "--prefix-in", str(garbage)), out, capsys,
                       "not a safetensors file")


# ------------------------------------------------------------------------ shared training activations
def _share_args(env, model, out, *extra, seed="3", edits="4", turns="4"):
    return ["share-training", "--model", model, "--dataset", env["dataset"], "--data-dir", env["data"],
            "--seed", seed, "--edits", edits, "--train-turns", turns, "--threads", "1", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def train_prefix(env, upper_only):
    """The training activations of 4 turns of 4 requests (cells below train on 3 of them)."""
    out = env["root"] / "train.prefix.safetensors"
    assert cli.main(_share_args(env, upper_only, out)) == 0
    return out


@pytest.mark.parametrize("editor,extra", [
    ("emsedit", []),                                              # rollout, l2: edit and paraphrase passes
    ("rledit", ["--set", "back_depth=2", "--steps", "2"]),       # backtracking, KL: memory passes join turns
    ("malmen", ["--protocol", "batch", "--turns", "1", "--edits", "4"]),  # batch, KL, one turn per step
])
def test_shared_training_activations_are_replayed_and_change_nothing(env, upper_only, train_prefix, tmp_path,
                                                                     editor, extra):
    """`share-training` then `run --train-prefix-in`: the training turns' lower layers are replayed, and
    the whole record equals the run that computed them itself."""
    plain, shared = tmp_path / "plain.json", tmp_path / "shared.json"
    args = _run_upper(env, upper_only, plain, *extra)
    args[args.index("--editor") + 1] = editor
    assert cli.main(args) == 0
    args[args.index("--out") + 1] = str(shared)
    assert cli.main([*args, "--train-prefix-in", str(train_prefix)]) == 0
    plain, shared = json.loads(plain.read_text()), json.loads(shared.read_text())
    info = shared["config"].pop("train_activations")
    per_turn = 3 if plain["config"]["loss"] == "kl" else 2  # edit, paraphrase (and locality) mini-batches
    assert info == {"path": str(train_prefix), "mini_batches": 4 * 3, "replayed": 3 * per_turn}, info
    assert strip(shared) == strip(plain)
    assert plain["training"]["train_turns"] >= 3


@pytest.mark.parametrize("change,needle", [
    ({"seed": "4"}, "another training order"),
    ({"edits": "2"}, "written for other settings"),
])
def test_shared_training_activations_of_another_order_are_refused(env, upper_only, tmp_path, capsys, change,
                                                                  needle):
    other = tmp_path / "other.safetensors"
    assert cli.main(_share_args(env, upper_only, other, **change)) == 0
    out = tmp_path / "out.json"
    _expect_user_error([*_run_upper(env, upper_only, out), "--train-prefix-in", str(other)], out, capsys, needle)


def test_damaged_shared_training_activations_are_refused(env, upper_only, train_prefix, tmp_path, capsys):
    data = train_prefix.read_bytes()
    out = tmp_path / "out.json"
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _expect_user_error([*_run_upper(env, upper_only, out), "--train-prefix-in", str(truncated)], out, capsys,
                       str(truncated))
    flipped = tmp_path / "flipped.safetensors"
    flipped.write_bytes(data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))  # the last tensor's bytes
    _expect_user_error([*_run_upper(env, upper_only, out), "--train-prefix-in", str(flipped)], out, capsys,
                       "digest")


def test_shared_training_activations_of_another_model_are_refused_before_it_loads(env, upper_only, tmp_path,
                                                                                  capsys, monkeypatch):
    other = yaml.safe_load(Path(upper_only).read_text())
    other["name_or_path"] = str(Path(save_tiny_model(tmp_path / "other", style="llama", seed=1)).parent)
    other_yaml = tmp_path / "other.yaml"
    other_yaml.write_text(yaml.safe_dump(other))
    prefix = tmp_path / "other.safetensors"
    assert cli.main(_share_args(env, str(other_yaml), prefix)) == 0
    from emsedit import protocols

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the file was checked")

    monkeypatch.setattr(protocols, "load_model", no_load)
    out = tmp_path / "out.json"
    _expect_user_error([*_run_upper(env, upper_only, out), "--train-prefix-in", str(prefix)], out, capsys,
                       "written for other settings")


# ---------------------------------------------------------------------------------------- user errors
def _expect_user_error(args, out, capsys, needle):
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    assert lines[0].startswith("emsedit run: error:") and needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}*"))  # no temporary file left either


@pytest.mark.parametrize("extra,needle", [
    (["--editor", "nosuch"], "nosuch"),
    (["--set", "rnak=8"], "rnak"),
    (["--set", "lr=nan"], "lr"),
    (["--set", "eta=inf"], "eta"),
    (["--set", "steps=-inf"], "steps"),
    (["--set", "optimizer_step=turns"], "optimizer_step"),
    (["--set", "steps=0"], "steps"),
    (["--set", "adam_iterations_per_step=0"], "adam_iterations_per_step"),
    (["--set", "shared_net_adam_repeats=maybe"], "shared_net_adam_repeats"),
    (["--set", "kl_backward_reverted=sometimes"], "kl_backward_reverted"),
    (["--set", "shift=outer"], "shift"),  # the YAML must name the rule the class implements
    (["--match-iterations", "0"], "--match-iterations"),
    (["--match-iterations", "2", "--steps", "2"], "S = 1"),  # a control runs S = 1
    (["--match-iterations", "2", "--steps", "1", "--set", "adam_iterations_per_step=3"], "adam_iterations_per_step"),
    (["--protocol", "batch"], "turns=2"),  # batch editing has one turn
    (["--edits", "0"], "edits"),
    (["--keep-graph-mb", "-1"], "--keep-graph-mb"),
    (["--keep-graph-mb", "nan"], "--keep-graph-mb"),
])
def test_config_errors_exit_2_with_one_line(env, tmp_path, capsys, extra, needle):
    out = tmp_path / "out.json"
    args = run_args(env, out)
    if extra[0] != "--set" and extra[0] in args:
        args[args.index(extra[0]) + 1] = extra[1]
    else:
        args.extend(extra)
    _expect_user_error(args, out, capsys, needle)


@pytest.mark.parametrize("which", ["eval-file", "dataset-file"])
def test_missing_data_file_exit_2_with_one_line(env, tmp_path, capsys, monkeypatch, which):
    """A missing data file is a user error named in one line, found before the model is loaded (a
    typo in a path must not cost a full model load)."""
    import emsedit.protocols as protocols

    monkeypatch.delenv("EMSEDIT_DATA_MIRROR", raising=False)
    loaded = []
    real_load = protocols.load_model
    monkeypatch.setattr(protocols, "load_model", lambda *a, **k: loaded.append(1) or real_load(*a, **k))
    out = tmp_path / "out.json"
    args = run_args(env, out)
    if which == "eval-file":
        needle = str(tmp_path / "nonexistent_eval.json")
        args += ["--eval-file", needle]
    else:
        spec = yaml.safe_load(Path(env["dataset"]).read_text())
        spec["eval"] = {"file": "missing_eval.json", "sha256": None, "url": None}
        dataset = tmp_path / "missing.yaml"
        dataset.write_text(yaml.safe_dump(spec))
        args[args.index("--dataset") + 1] = str(dataset)
        needle = "missing_eval.json"
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("emsedit run: error:") and needle in err
    assert not out.exists()
    assert not loaded, "the model was loaded before the data files were checked"
    assert len(err.strip().splitlines()) == 1, err


def test_user_error_exit_status_from_the_module(env, tmp_path):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-m", "emsedit", *run_args(env, out, "--set", "rnak=8")],
                          cwd=REPO_ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 2
    assert "rnak" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


# ---------------------------------------------------------------------------------------- help
@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["evaluate", "--help"], ["run", "--bogus"]])
def test_help_and_bad_options_import_no_torch(argv):
    """Help and a rejected option come from argparse before any heavy import (issue 11.1)."""
    code = ("import sys\nfrom emsedit import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
            "    print('exit', e.code)\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=subprocess_env(), timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert lines[-2] == f"exit {2 if '--bogus' in argv else 0}", proc.stdout + proc.stderr
    assert lines[-1] == "[]", proc.stdout


@pytest.mark.parametrize("command", ["fetch", "materialize", "tiny-model", "order", "evaluate", "run", None])
def test_help_works(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "--help" in text
    if command == "run":
        for option in ("--editor", "--steps", "--set", "--checkpoint-dir", "--checkpoint-every"):
            assert option in text
