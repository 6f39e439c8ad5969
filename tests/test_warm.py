"""The warm interpreter (emsedit/warm.py, EMSEDIT_WARM=1): records identical to a fresh process's,
errors and exit statuses passed through, a killed client stops its cell, and a server that cannot
start falls back to running in-process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from emsedit import cli
from test_cli_run import REPO_ROOT, env, run_args, strip  # noqa: F401  (the tiny model and dataset fixture)

pytestmark = pytest.mark.skipif(not (hasattr(os, "fork") and hasattr(os, "pidfd_open")),
                                reason="the warm server needs fork and pidfd_open (Linux)")


@pytest.fixture
def warm_env():
    """Environment of a client whose server lives in a fresh folder (short: a Unix socket path has at
    most ~107 bytes) and exits 3 s after its last cell."""
    runtime = Path(tempfile.mkdtemp(prefix="ew", dir="/tmp"))
    e = {**os.environ, "EMSEDIT_WARM": "1", "EMSEDIT_WARM_IDLE_S": "3", "XDG_RUNTIME_DIR": str(runtime),
         "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    yield e
    for log in runtime.glob("*.log"):  # wait for the server to go idle and exit
        deadline = time.monotonic() + 30
        while "exits" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
    shutil.rmtree(runtime, ignore_errors=True)


def _client(args, environ, **kw):
    return subprocess.run([sys.executable, "-m", "emsedit", *args], env=environ, capture_output=True,
                          text=True, timeout=300, **kw)


def _server_log(environ) -> str:
    logs = list(Path(environ["XDG_RUNTIME_DIR"]).glob("emsedit-warm-*.log"))
    return logs[0].read_text() if logs else ""


def test_warm_records_equal_a_fresh_process(env, warm_env, tmp_path):  # noqa: F811
    direct = tmp_path / "direct.json"
    assert cli.main(run_args(env, direct)) == 0
    for i in range(2):  # the first client starts the server, the second reuses it
        out = tmp_path / f"warm{i}.json"
        proc = _client(run_args(env, out), warm_env)
        assert proc.returncode == 0, proc.stderr
        assert strip(json.loads(out.read_text())) == strip(json.loads(direct.read_text()))
        assert "scoring the edited model" in proc.stderr  # the cell's log reached the client's stderr
    log = _server_log(warm_env)
    assert log.count("ready at") == 1 and log.count("cell ") == 2, log


def test_warm_user_error_is_one_line_with_status_2(env, warm_env, tmp_path):  # noqa: F811
    proc = _client([*run_args(env, tmp_path / "x.json"), "--steps", "0"], warm_env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("emsedit run: error:"), proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_killed_client_stops_its_cell(env, warm_env, tmp_path):  # noqa: F811
    out = tmp_path / "killed.json"
    assert _client([*run_args(env, tmp_path / "first.json")], warm_env).returncode == 0  # server up
    args = run_args(env, out)
    args[args.index("--turns") + 1] = "10"  # ~10 editing turns: time to kill it mid-cell
    client = subprocess.Popen([sys.executable, "-m", "emsedit", *args], env=warm_env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while str(out) not in _server_log(warm_env) and time.monotonic() < deadline:
        time.sleep(0.05)
    cell = int(_server_log(warm_env).split(f" {out}")[0].rsplit("cell ", 1)[1].split(":")[0])
    client.send_signal(signal.SIGTERM)
    assert client.wait(timeout=30) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 30
    while "went away" not in _server_log(warm_env) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert f"client of cell {cell} went away" in _server_log(warm_env)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{cell}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{cell}").exists(), "the cell outlived its client"
    assert not out.exists()


def test_unreachable_server_falls_back_to_in_process(env, tmp_path):  # noqa: F811
    environ = {**os.environ, "EMSEDIT_WARM": "1", "XDG_RUNTIME_DIR": str(tmp_path / "missing" / "dir"),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    out = tmp_path / "fallback.json"
    proc = _client(run_args(env, out), environ)
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and not (tmp_path / "missing").exists()


def test_help_never_goes_to_the_server(tmp_path):
    environ = {**os.environ, "EMSEDIT_WARM": "1", "XDG_RUNTIME_DIR": str(tmp_path)}
    proc = _client(["run", "--help"], environ)
    assert proc.returncode == 0 and "--editor" in proc.stdout
    assert not list(tmp_path.iterdir())  # no server, no lock, no socket


def test_one_server_per_checkout_interpreter_and_code(monkeypatch, tmp_path):
    """A cell reads configs from its server's checkout: another checkout, interpreter or library
    code gets another server."""
    from emsedit import config, records, warm

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    first = warm.socket_path()
    assert first.parent == tmp_path and first == warm.socket_path()
    monkeypatch.setattr(config, "REPO_ROOT", tmp_path / "other-checkout")
    assert warm.socket_path() != first
    monkeypatch.undo()
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    python = sys.executable
    monkeypatch.setattr(sys, "executable", "/another/python")
    assert warm.socket_path() != first
    monkeypatch.setattr(sys, "executable", python)
    assert warm.socket_path() == first
    monkeypatch.setattr(records, "code_digest", lambda: "0" * 16)
    assert warm.socket_path() != first
