"""``run --save-editor DIR`` / ``run --load-editor DIR`` (issue 14.5): a trained editor written after
meta-training and reused without it gives the same results; archives that do not fit the requested
run are refused in one line before any long work; an archive holds only safetensors and JSON.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import emsedit.metrics as metrics
import emsedit.protocols as protocols
from emsedit import cli
from emsedit.acquire import sha256_of
from emsedit.config import ConfigError
from test_cli_run import _expect_user_error, env, run_args, strip, upper_only  # noqa: F401  (fixtures)

# The two editors of the round trip: EMSEdit sequential (one network per step, S = 2) and MALMEN
# with S = 2 (one network shared by both steps, the step-wise batch schedule).
EDITORS = {"emsedit": [], "malmen": ["--editor", "malmen", "--steps", "2"]}


def _args(env, out, editor, *extra):
    args = run_args(env, out)
    for i in range(0, len(EDITORS[editor]), 2):
        option, value = EDITORS[editor][i:i + 2]
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
    if "--load-editor" in extra:
        _drop_training_amount(args)
    return args + list(extra)


def _drop_training_amount(args):
    """A loaded editor is not trained: a run with --load-editor gives no training amount."""
    i = args.index("--train-turns")
    del args[i:i + 2]


def _run(args):
    """Run the CLI in-process; return the record and the per-example scores of every evaluation."""
    scores = []
    real = metrics.summarize

    def spy(edit, equiv, unrel, *a, **k):
        scores.append((list(edit), list(equiv), list(unrel)))
        return real(edit, equiv, unrel, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "summarize", spy)
        assert cli.main(args) == 0
    out = Path(args[args.index("--out") + 1])
    return json.loads(out.read_text()), scores


@pytest.fixture(scope="module")
def trained(env):
    """Per editor: the record and per-example scores of a run with --save-editor, and its archive."""
    out = {}
    for editor in EDITORS:
        folder = env["root"] / f"archive-{editor}"
        record, scores = _run(_args(env, env["root"] / f"trained-{editor}.json", editor,
                                    "--save-editor", str(folder)))
        out[editor] = (record, scores, folder)
    return out


# ---------------------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("editor", list(EDITORS))
def test_loaded_editor_gives_the_results_of_the_run_that_trained_it(env, trained, editor, tmp_path):
    record, scores, folder = trained[editor]
    assert record["training"]["optimizer_steps"] >= 1 and "train_total" in record["timings"]
    assert "editor_archive" not in record["config"]  # saving changes nothing in the record
    loaded, loaded_scores = _run(_args(env, tmp_path / "loaded.json", editor, "--load-editor", str(folder)))
    assert loaded_scores == scores  # per-example values, before and after editing, bit for bit
    assert loaded["metrics"] == record["metrics"]
    assert loaded["edit_order"] == record["edit_order"]
    # what the record says about the training it did not do: the archive's
    assert loaded["train_order"] == record["train_order"]
    assert loaded["training"] == record["training"]
    archive = loaded["config"].pop("editor_archive")
    meta = json.loads((folder / "editor.json").read_text())
    assert archive["path"] == str(folder)
    assert archive["tensors_sha256"] == sha256_of(folder / "editor.safetensors") == meta["tensors_sha256"]
    assert archive["training_data_sha256"] == meta["training"]["data_sha256"]
    assert archive["train_file"] == record["config"]["dataset"]["files"]["train"]
    expected_config = json.loads(json.dumps(record["config"]))
    del expected_config["dataset"]["files"]["train"]  # a loaded run reads no training data
    assert loaded["config"] == expected_config
    assert not [k for k in loaded["timings"] if k.startswith("train")]
    assert "load_editor" in loaded["timings"]
    assert (meta["editor"], meta["steps"]) == (editor, 2)
    assert meta["hypernetworks"] == {"emsedit": "per_step", "malmen": "shared"}[editor]


def test_saving_changes_no_result(env, trained, tmp_path):
    plain, _ = _run(run_args(env, tmp_path / "plain.json"))
    record, _, _ = trained["emsedit"]
    assert strip(record) == strip(plain)


def test_loaded_run_with_checkpoints(env, trained, tmp_path):
    """A loaded run checkpoints and finishes like one without (its resumable state is keyed by the
    archive too, so it never resumes a training run's state)."""
    record, scores, folder = trained["malmen"]
    ckpt = tmp_path / "ckpt"
    loaded, loaded_scores = _run(_args(env, tmp_path / "loaded.json", "malmen", "--load-editor", str(folder),
                                       "--checkpoint-dir", str(ckpt), "--checkpoint-every", "0"))
    assert loaded_scores == scores and loaded["metrics"] == record["metrics"]
    assert not ckpt.exists()


class _Killed(Exception):
    pass


def test_save_editor_after_a_resume(env, trained, tmp_path, monkeypatch):
    """Killed between meta-training and the archive write, the rerun resumes after training and
    writes the same archive (and the same record)."""
    record, _, folder = trained["emsedit"]
    real, writes = protocols.run_cell, 4  # 3 training turns, then the forced state before editing

    def killed(w):
        if w >= writes:
            raise _Killed

    monkeypatch.setattr(protocols, "run_cell", lambda hp, opts: real(hp, opts, after_checkpoint=killed))
    out, again = tmp_path / "out.json", tmp_path / "archive"
    args = _args(env, out, "emsedit", "--save-editor", str(again), "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--checkpoint-every", "0")
    with pytest.raises(_Killed):
        cli.main(args)
    assert not again.exists() and not out.exists()
    monkeypatch.setattr(protocols, "run_cell", real)
    resumed, _ = _run(args)
    assert strip(resumed) == strip(record)
    assert load_file(again / "editor.safetensors").keys() == load_file(folder / "editor.safetensors").keys()
    assert all((load_file(again / "editor.safetensors")[k] == v).all()
               for k, v in load_file(folder / "editor.safetensors").items())
    meta, meta_again = (json.loads((f / "editor.json").read_text()) for f in (folder, again))
    volatile = ("created", "git_commit")
    assert {k: v for k, v in meta_again.items() if k not in volatile} == {
        k: v for k, v in meta.items() if k not in volatile}


def test_archive_holds_only_safetensors_and_json(trained):
    for _, _, folder in trained.values():
        files = sorted(p.name for p in folder.iterdir())
        assert files == ["editor.json", "editor.safetensors"]  # no pickle, no temporary file left
        meta = json.loads((folder / "editor.json").read_text())
        assert meta["format"] == "emsedit-editor-archive" and meta["format_version"] == 1
        tensors = load_file(folder / "editor.safetensors")
        assert tensors and all(k.startswith("nets.") for k in tensors)
        assert any(k.endswith("norm.mean") for k in tensors) and any(k.endswith("norm.n") for k in tensors)
        networks = {k.split(".")[1] for k in tensors}
        assert networks == ({"0", "1"} if meta["hypernetworks"] == "per_step" else {"0"})
        assert [m["name"] for m in meta["modules"]] and all(len(m["shape"]) == 2 for m in meta["modules"])
        assert len(meta["training"]["data_sha256"]) == 64 and meta["training"]["train_order"]


# ---------------------------------------------------------------------------------------- refusals
@pytest.fixture
def watch(monkeypatch):
    """Counts model loads and evaluations: a refusal comes before both (or, for the checks that need
    the built editor, before any evaluation)."""
    calls = {"load_model": 0, "evaluate": 0}
    for name, key in (("load_model", "load_model"), ("evaluate_turns", "evaluate")):
        real = getattr(protocols, name)

        def counted(*a, _real=real, _key=key, **k):
            calls[_key] += 1
            return _real(*a, **k)
        monkeypatch.setattr(protocols, name, counted)
    return calls


def _copy(folder, tmp_path):
    target = tmp_path / "archive"
    shutil.copytree(folder, target)
    return target


def _edit_json(folder, change):
    path = folder / "editor.json"
    meta = json.loads(path.read_text())
    change(meta)
    path.write_text(json.dumps(meta))


PREFLIGHT = {  # refused before the model loads: (how to break the run or the archive, needle)
    "other-editor": (lambda env, f, t: (_args(env, t / "out.json", "malmen", "--load-editor", str(f))),
                     "editor differs: archive 'emsedit', this run 'malmen'"),
    "other-steps": (lambda env, f, t: _args(env, t / "out.json", "emsedit", "--steps", "1",
                                            "--load-editor", str(f)), "steps S differs: archive 2, this run 1"),
    "other-sharing": (lambda env, f, t: _args(env, t / "out.json", "emsedit", "--hypernetworks", "shared",
                                              "--load-editor", str(f)),
                      "hypernetwork sharing differs: archive 'per_step', this run 'shared'"),
    "other-hyperparameter": (lambda env, f, t: _args(env, t / "out.json", "emsedit", "--set", "eta=0.25",
                                                     "--load-editor", str(f)),
                             "hyperparameters differ: eta (archive 0.5, this run 0.25)"),
}


@pytest.mark.parametrize("case", list(PREFLIGHT))
def test_archive_for_another_run_is_refused_before_the_model_loads(env, trained, watch, tmp_path, capsys, case):
    make, needle = PREFLIGHT[case]
    args = make(env, trained["emsedit"][2], tmp_path)
    _expect_user_error(args, tmp_path / "out.json", capsys, needle)
    assert watch == {"load_model": 0, "evaluate": 0}


def _truncate(folder):
    path = folder / "editor.safetensors"
    path.write_bytes(path.read_bytes()[:-100])


def _flip_byte(folder):
    path = folder / "editor.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


BROKEN = {  # (how to break a copy of the archive, needle)
    "truncated-tensors": (_truncate, "editor.safetensors does not match the sha256 in editor.json"),
    "modified-tensors": (_flip_byte, "editor.safetensors does not match the sha256 in editor.json"),
    "missing-json": (lambda f: (f / "editor.json").unlink(), "editor.json is missing"),
    "missing-tensors": (lambda f: (f / "editor.safetensors").unlink(), "editor.safetensors is missing"),
    "truncated-json": (lambda f: (f / "editor.json").write_text((f / "editor.json").read_text()[:50]),
                       "editor.json is not readable JSON"),
    "foreign-json": (lambda f: (f / "editor.json").write_text('{"phase": "train"}'),
                     "not an emsedit editor archive"),
    "newer-format": (lambda f: _edit_json(f, lambda m: m.update(format_version=2)),
                     "archive format version 2; this code reads version 1"),
    "no-folder": (lambda f: shutil.rmtree(f), "no such folder"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_or_foreign_archive_is_refused_before_the_model_loads(env, trained, watch, tmp_path, capsys, case):
    folder = _copy(trained["emsedit"][2], tmp_path)
    breaker, needle = BROKEN[case]
    breaker(folder)
    out = tmp_path / "out.json"
    _expect_user_error(_args(env, out, "emsedit", "--load-editor", str(folder)), out, capsys, needle)
    assert watch == {"load_model": 0, "evaluate": 0}


def test_archive_for_other_modules_is_refused(env, trained, upper_only, watch, tmp_path, capsys):  # noqa: F811
    """Names (the same model config editing fewer modules) and shapes are checked on the model's
    architecture before its weights are loaded."""
    out = tmp_path / "out.json"
    args = _args(env, out, "emsedit", "--load-editor", str(trained["emsedit"][2]))
    args[args.index("--model") + 1] = upper_only
    _expect_user_error(args, out, capsys, "edited modules differ: only in the archive: ['model.layers.0.mlp.down_proj']")
    assert watch == {"load_model": 0, "evaluate": 0}

    folder = _copy(trained["emsedit"][2], tmp_path)
    _edit_json(folder, lambda m: m["modules"][1].update(shape=[7, 9]))
    _expect_user_error(_args(env, out, "emsedit", "--load-editor", str(folder)), out, capsys,
                       "module model.layers.1.mlp.down_proj has shape [7, 9] in the archive, [64, 32] in this run")
    assert watch == {"load_model": 0, "evaluate": 0}


@pytest.mark.parametrize("editor,options,needle", [
    ("emsedit", ["--save-editor", "--load-editor"], "--save-editor and --load-editor exclude each other"),
    ("ultraedit", ["--save-editor"], "--save-editor: editor 'ultraedit' is training-free"),
    ("ultraedit", ["--load-editor"], "--load-editor: editor 'ultraedit' is training-free"),
    ("emsedit", ["--save-editor"], "exists and is not a folder"),
    ("emsedit", ["--load-editor", "--train-file"], "--train-file and --load-editor exclude each other"),
    ("emsedit", ["--load-editor", "--train-prefix-in"], "--train-prefix-in and --load-editor exclude each other"),
])
def test_option_misuse_is_a_user_error(env, watch, tmp_path, capsys, editor, options, needle):
    out = tmp_path / "out.json"
    args = run_args(env, out)
    args[args.index("--editor") + 1] = editor
    if "--load-editor" in options:
        _drop_training_amount(args)
    for option in options:
        args += [option, str(tmp_path / option.strip("-"))]
    if "folder" in needle:
        (tmp_path / "save-editor").write_text("a file")
    _expect_user_error(args, out, capsys, needle)
    assert watch == {"load_model": 0, "evaluate": 0}
    assert not (tmp_path / "save-editor").is_dir()


def test_training_amounts_with_a_loaded_editor_are_refused(tmp_path):
    """A loaded editor is not trained, so an amount of training beside it is a contradiction, not a
    setting to ignore silently."""
    from emsedit.protocols import CellOptions

    with pytest.raises(ConfigError, match=r"^--train-turns and --load-editor exclude each other"):
        CellOptions(model="m", dataset="d", seed=0, edits=2, train_turns=3, load_editor=str(tmp_path))
