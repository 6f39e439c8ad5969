"""A warm interpreter for experiment cells: no import tax per cell (opt-in, ``EMSEDIT_WARM=1``).

A cell's process spends ~3–5 s importing torch and transformers and ~1 s tearing them down, about
as long as a small cell computes. With ``EMSEDIT_WARM=1``, ``python -m emsedit run|evaluate|share-training`` is a
thin client instead (standard library only, ~0.1 s):

* A *server* per (interpreter, checkout, library code digest) imports the heavy modules once, runs no torch
  operation itself, and listens on a Unix socket. The first client starts it (under a lock, so
  concurrent jobs start one server); it exits after ``IDLE_S`` seconds without work.
* For each cell the client sends its arguments, working directory, environment and its
  stdin/stdout/stderr file descriptors. The server forks a child, which takes over those
  descriptors (its output goes straight to the job's log), runs the CLI exactly as a fresh process
  would, and exits; the server sends the exit status back, and the client exits with it.
* So Snakemake still sees one process per cell, with its own command, log and benchmark (wall time;
  the benchmark's memory columns then measure the thin client, the record's ``peak_rss_mb`` the
  cell). A killed client (Ctrl-C, ``scancel``, a Snakemake timeout) closes the socket, and the
  server then kills the child: the cell stops as a killed process would, its checkpoint stays, and
  a rerun resumes from it. Nothing is shared between cells but the imported modules: each cell is a
  fresh fork with its own state, so records are identical to a fresh process's (tested).
* Anything unusual (no ``fork``/``pidfd`` on this platform, a server that cannot start, ``--help``)
  falls back to running in this process.

The server's log is the socket path with ``.log``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = ("run", "evaluate", "share-training")  # the commands that load a model; the others are quick anyway
IDLE_S = float(os.environ.get("EMSEDIT_WARM_IDLE_S", 600))  # the server exits after this long without a cell
START_TIMEOUT_S = 180.0  # how long a client waits for a starting server
KILL_GRACE_S = 10.0  # SIGTERM, then SIGKILL after this long, for a child whose client went away
_HEADER_MAX = 1 << 20


def enabled(argv: list[str]) -> bool:
    """Whether this command line should go to the warm server."""
    return (os.environ.get("EMSEDIT_WARM") == "1" and bool(argv) and argv[0] in COMMANDS
            and not {"-h", "--help"} & set(argv) and hasattr(os, "fork") and hasattr(os, "pidfd_open")
            and hasattr(socket, "send_fds"))


def socket_path() -> Path:
    """One server per interpreter, checkout and library code: a code change starts a new server, and
    two checkouts never share one (a cell reads its configs from its server's checkout)."""
    from emsedit.config import REPO_ROOT
    from emsedit.records import code_digest

    key = hashlib.sha256(f"{sys.executable}\0{REPO_ROOT}\0{code_digest()}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    return folder / f"emsedit-warm-{os.getuid()}-{key}.sock"  # a long folder (> ~80 chars) cannot bind: in-process


# --------------------------------------------------------------------------------------- client
def run_remote(argv: list[str]) -> int | None:
    """Run the command line in a child of the warm server; its exit status, or None when the server
    cannot be reached (the caller then runs it in-process)."""
    path = socket_path()
    sock = _connect(path) or _start_and_connect(path)
    if sock is None:
        return None
    with sock:
        header = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(sock, [len(header).to_bytes(4, "big") + header], [0, 1, 2])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # the server sees the socket close and stops the cell; exit as a killed process would
            signal.signal(sig, lambda signum, frame: os._exit(128 + signum))
        status = _recv_exact(sock, 4)
    if status is None:  # the server died under us: report it, do not rerun silently
        print("emsedit: the warm server stopped before the cell finished (see "
              f"{path}.log); rerun without EMSEDIT_WARM=1 to run in-process", file=sys.stderr)
        return 1
    return int.from_bytes(status, "big", signed=True)


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
        return sock
    except OSError:
        sock.close()
        return None


def _start_and_connect(path: Path) -> socket.socket | None:
    """Start the server (one client at a time, under a lock) and wait until it accepts."""
    try:
        lock = open(f"{path}.lock", "a")
    except OSError:
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        sock = _connect(path)  # another client may have started it meanwhile
        if sock is not None:
            return sock
        path.unlink(missing_ok=True)  # a stale socket of a server that died
        with open(f"{path}.log", "a") as log:
            server = subprocess.Popen([sys.executable, "-m", "emsedit.warm", str(path)], stdin=subprocess.DEVNULL,
                                      stdout=log, stderr=log, start_new_session=True, close_fds=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and server.poll() is None:
            sock = _connect(path)
            if sock is not None:
                return sock
            time.sleep(0.05)
    return None


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


# --------------------------------------------------------------------------------------- server
def serve(path: Path) -> None:
    """Import what the cells need, then fork one child per request until idle for ``IDLE_S``."""
    import emsedit.cli  # noqa: F401  the heavy imports, once
    import emsedit.protocols  # noqa: F401

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(tmp))
    os.chmod(tmp, 0o600)  # this user's cells only
    listener.listen(64)
    os.replace(tmp, path)  # appears only once it accepts
    inode = os.stat(path).st_ino
    print(f"{time.strftime('%H:%M:%S')} warm server {os.getpid()} ready at {path}", flush=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, ("accept", None))
    children: dict[int, dict] = {}  # pid -> {"conn", "pidfd", "killed_at"}
    idle_since = time.monotonic()
    try:
        while True:
            for key, _ in sel.select(timeout=1.0):
                kind, pid = key.data
                if kind == "accept":
                    conn, _ = listener.accept()
                    child = _fork_cell(conn, listener, sel)
                    if child is None:
                        conn.close()
                        continue
                    pid, pidfd, argv = child
                    print(f"{time.strftime('%H:%M:%S')} cell {pid}: {' '.join(argv)}", flush=True)
                    children[pid] = {"conn": conn, "pidfd": pidfd, "killed_at": None}
                    sel.register(pidfd, selectors.EVENT_READ, ("exit", pid))
                    sel.register(conn, selectors.EVENT_READ, ("client", pid))
                elif kind == "exit":
                    _finish(pid, children.pop(pid), sel)
                    idle_since = time.monotonic()
                elif kind == "client" and children[pid]["killed_at"] is None:
                    # the client sends nothing after its request: readable means it went away
                    sel.unregister(children[pid]["conn"])
                    os.kill(pid, signal.SIGTERM)
                    children[pid]["killed_at"] = time.monotonic()
                    print(f"{time.strftime('%H:%M:%S')} client of cell {pid} went away: stopping it", flush=True)
            now = time.monotonic()
            for pid, child in children.items():
                if child["killed_at"] is not None and now - child["killed_at"] > KILL_GRACE_S:
                    os.kill(pid, signal.SIGKILL)
            if not children and now - idle_since > IDLE_S:
                break
    finally:
        try:  # remove the socket file unless a newer server has replaced it
            if os.stat(path).st_ino == inode:
                path.unlink()
        except OSError:
            pass
        print(f"{time.strftime('%H:%M:%S')} warm server {os.getpid()} exits", flush=True)


def _fork_cell(conn: socket.socket, listener: socket.socket,
               sel: selectors.BaseSelector) -> tuple[int, int, list[str]] | None:
    """Read one request and fork its child; (pid, pidfd, argv), or None for a malformed request."""
    try:
        conn.settimeout(10.0)
        data, fds, _, _ = socket.recv_fds(conn, 4 + _HEADER_MAX, 3)
        size = int.from_bytes(data[:4], "big")
        while len(data) < 4 + size:
            more = conn.recv(4 + size - len(data))
            if not more:
                raise OSError("request cut short")
            data += more
        request = json.loads(data[4:4 + size])
        conn.settimeout(None)
    except (OSError, ValueError) as err:
        print(f"{time.strftime('%H:%M:%S')} bad request: {err}", flush=True)
        return None
    if len(fds) != 3:
        for fd in fds:
            os.close(fd)
        return None
    pid = os.fork()
    if pid == 0:  # the cell: a fresh process in all but its imports
        try:
            sel.close()
            listener.close()
            conn.close()
            for target, fd in zip((0, 1, 2), fds):
                os.dup2(fd, target)
                os.close(fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            sys.argv = ["emsedit", *request["argv"]]
            from emsedit.cli import main

            status = main(request["argv"])
        except SystemExit as exit_:  # argparse's own errors
            status = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
            status = 1
        flush_and_exit(status)
    for fd in fds:
        os.close(fd)
    return pid, os.pidfd_open(pid), request["argv"]


def _finish(pid: int, child: dict, sel: selectors.BaseSelector) -> None:
    """Reap a child and send its exit status to its client (if it is still there)."""
    sel.unregister(child["pidfd"])
    os.close(child["pidfd"])
    _, wait_status = os.waitpid(pid, 0)
    status = os.waitstatus_to_exitcode(wait_status)
    status = 128 - status if status < 0 else status  # killed by a signal: as a shell reports it
    conn = child["conn"]
    if child["killed_at"] is None:
        sel.unregister(conn)
        try:
            conn.sendall(int(status).to_bytes(4, "big", signed=True))
        except OSError:
            pass
    conn.close()


def flush_and_exit(status: int) -> None:
    """Exit without the interpreter's teardown (~1 s with torch loaded); output is flushed first."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
