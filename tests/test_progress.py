"""A running cell says where it is: phase lines and progress lines in its log (stderr)."""

from __future__ import annotations

import logging

from emsedit import cli, progress
from test_cli_run import env, run_args  # noqa: F401  (the tiny model and dataset fixture)


def test_progress_logs_start_throttled_updates_and_end(caplog, monkeypatch) -> None:
    clock = iter([0.0, 1.0, 40.0, 50.0, 100.0, 130.0])  # start, then one reading per update/close
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="emsedit.progress"):
        with progress.Progress("meta-train x", 4) as bar:
            for _ in range(4):
                bar.update()  # at 1 s (too soon), 40 s (logged), 50 s (too soon), 100 s (done: left to close)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["meta-train x: 4 turns",
                     "meta-train x: 2/4 turns (50 %), 40.0 s, ~40 s left",
                     "meta-train x: 4/4 turns (100 %), 130.0 s"]


def test_resumed_and_disabled_progress(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="emsedit.progress"):
        progress.Progress("edit x", 5, initial=2).close()
        progress.Progress("evaluate", 3, unit="batches", enabled=False).update()
        progress.Progress("nothing", 0).close()
    assert [r.getMessage() for r in caplog.records] == ["edit x: 5 turns, resuming after 2",
                                                        "edit x: 2/5 turns (40 %), 0.0 s"]


def test_a_cell_logs_its_phases_and_turns(env, tmp_path, capsys, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line for every unit
    assert cli.main(run_args(env, tmp_path / "run.json")) == 0
    err = capsys.readouterr().err
    for expected in ("emsedit: model", "loaded in", "scoring the unedited model", "evaluate: ",
                     "meta-train emsedit: 3 turns", "meta-train emsedit: 1/3 turns", "meta-train emsedit: 3/3 turns",
                     "edit emsedit: 2 turns", "edit emsedit: 2/2 turns (100 %)", "scoring the edited model"):
        assert expected in err, f"{expected!r} not in the log:\n{err}"
    stamped = [line for line in err.splitlines() if line.strip()]
    assert all(line[:2].isdigit() and line[2] == ":" for line in stamped), err  # HH:MM:SS, no stray prints
