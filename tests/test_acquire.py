"""Tests for getting dataset files: local copy → mirror → download, sha256-checked (emsedit.acquire)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import json
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from emsedit.acquire import MIRROR_ENV, AcquireError, obtain, obtain_dataset
from emsedit.cli import main
from emsedit.schemas import read_requests

REPO = Path(__file__).resolve().parents[1]
SHARED_MIRROR = REPO.parent / "shared" / "data"

GOOD = json.dumps([{"src": "q?", "ans": "a", "rephrase": "r?", "loc": "nq question: l", "loc_ans": "b"}]).encode()
BAD = b'[{"tampered": true}]'
GOOD_SHA = hashlib.sha256(GOOD).hexdigest()
BAD_SHA = hashlib.sha256(BAD).hexdigest()
NAME = "tiny.json"


class _Server:
    """A threaded HTTP server on 127.0.0.1 serving one folder and counting requests."""

    def __init__(self, folder: Path):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.requests.append(self.path)
                super().do_GET()

        handler = functools.partial(Handler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[_Server, Path]]:
    folder = tmp_path / "served"
    folder.mkdir()
    with _Server(folder) as server:
        yield server, folder


@pytest.fixture(autouse=True)
def no_env_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MIRROR_ENV, raising=False)


def spec(url: str | None, sha: str | None = GOOD_SHA) -> dict:
    return {"file": NAME, "sha256": sha, "url": url}


def leftovers(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir()) if data_dir.exists() else []


def test_present_and_valid_is_used_as_is(tmp_path: Path, served: tuple[_Server, Path]) -> None:
    server, folder = served
    (folder / NAME).write_bytes(GOOD)
    data = tmp_path / "data"
    data.mkdir()
    (data / NAME).write_bytes(GOOD)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(BAD)  # would fail if it were looked at
    path = obtain(spec(f"{server.url}/{NAME}"), data_dir=data, mirror=mirror)
    assert path == data / NAME and path.read_bytes() == GOOD
    assert server.requests == []


def test_mirror_copy_from_subfolder_via_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            served: tuple[_Server, Path]) -> None:
    server, _ = served
    mirror = tmp_path / "mirror"
    (mirror / "zsre").mkdir(parents=True)
    (mirror / "zsre" / NAME).write_bytes(GOOD)
    monkeypatch.setenv(MIRROR_ENV, str(mirror))
    data = tmp_path / "data"
    path = obtain(spec(f"{server.url}/{NAME}"), data_dir=data)
    assert path.read_bytes() == GOOD
    assert leftovers(data) == [NAME]
    assert server.requests == []


def test_mirror_argument_wins_and_bad_candidate_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_mirror, arg_mirror = tmp_path / "env", tmp_path / "arg"
    env_mirror.mkdir()  # empty: obtaining would fail if this one were used
    monkeypatch.setenv(MIRROR_ENV, str(env_mirror))
    (arg_mirror / "a").mkdir(parents=True)
    (arg_mirror / "b").mkdir()
    (arg_mirror / NAME).write_bytes(BAD)  # top level first: wrong checksum, then subfolders in order
    (arg_mirror / "a" / NAME).write_bytes(BAD)
    (arg_mirror / "b" / NAME).write_bytes(GOOD)
    data = tmp_path / "data"
    path = obtain(spec(None), data_dir=data, mirror=arg_mirror)
    assert path.read_bytes() == GOOD and leftovers(data) == [NAME]


def test_download(tmp_path: Path, served: tuple[_Server, Path]) -> None:
    server, folder = served
    (folder / NAME).write_bytes(GOOD)
    data = tmp_path / "data"
    path = obtain(spec(f"{server.url}/{NAME}"), data_dir=data, mirror=tmp_path / "no-such-mirror")
    assert path.read_bytes() == GOOD
    assert server.requests == [f"/{NAME}"]
    assert leftovers(data) == [NAME]


def test_wrong_local_copy_is_replaced(tmp_path: Path, served: tuple[_Server, Path]) -> None:
    server, folder = served
    (folder / NAME).write_bytes(GOOD)
    data = tmp_path / "data"
    data.mkdir()
    (data / NAME).write_bytes(BAD)
    path = obtain(spec(f"{server.url}/{NAME}"), data_dir=data)
    assert path.read_bytes() == GOOD and leftovers(data) == [NAME]


def test_checksum_mismatch_everywhere_leaves_nothing(tmp_path: Path, served: tuple[_Server, Path]) -> None:
    server, folder = served
    (folder / NAME).write_bytes(BAD)
    mirror = tmp_path / "mirror"
    (mirror / "counterfact").mkdir(parents=True)
    (mirror / "counterfact" / NAME).write_bytes(BAD)
    data = tmp_path / "data"
    url = f"{server.url}/{NAME}"
    with pytest.raises(AcquireError) as info:
        obtain(spec(url), data_dir=data, mirror=mirror)
    message = str(info.value)
    assert message.startswith(f"{NAME}: could not obtain a verified copy")
    assert f"mirror copy {mirror / 'counterfact' / NAME}: checksum mismatch (expected {GOOD_SHA}, got {BAD_SHA})" in message
    assert f"download {url}: checksum mismatch (expected {GOOD_SHA}, got {BAD_SHA})" in message
    assert leftovers(data) == []  # no half-written or wrong file, no temp file


def test_missing_everywhere(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with pytest.raises(AcquireError) as info:
        obtain(spec(None), data_dir=data)
    message = str(info.value)
    assert NAME in message and "not present" in message
    assert f"mirror: none given (no mirror argument, {MIRROR_ENV} unset)" in message
    assert "download: no url configured" in message
    with pytest.raises(AcquireError, match=r"mirror .*: no tiny\.json in it or its subfolders"):
        obtain(spec(None), data_dir=data, mirror=tmp_path)


def test_download_failure_is_reported(tmp_path: Path, served: tuple[_Server, Path]) -> None:
    server, _ = served
    url = f"{server.url}/absent.json"
    with pytest.raises(AcquireError, match=rf"download {url}: failed \(HTTP Error 404"):
        obtain(spec(url), data_dir=tmp_path / "data")
    assert leftovers(tmp_path / "data") == []


def test_unknown_sha_warns_and_is_not_verified(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(BAD)
    data = tmp_path / "data"
    with pytest.warns(UserWarning, match="no sha256 configured"):
        path = obtain(spec(None, sha=None), data_dir=data, mirror=mirror)
    assert path.read_bytes() == BAD
    with pytest.warns(UserWarning, match="existing .* is used unverified"):
        obtain(spec(None, sha=None), data_dir=data)


@pytest.mark.parametrize("bad", [
    {"file": "../x.json", "sha256": GOOD_SHA, "url": None},
    {"file": NAME, "sha256": "abc", "url": None},
    {"file": NAME, "sha256": GOOD_SHA, "url": None, "extra": 1},
    {"sha256": GOOD_SHA, "url": None},
])
def test_bad_specs(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(AcquireError):
        obtain(bad, data_dir=tmp_path)


def test_obtain_dataset_and_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / NAME).write_bytes(GOOD)
    cfg = {"name": "tiny", "kind": "zsre", "train": spec(None), "eval": spec(None)}
    data = tmp_path / "data"
    assert obtain_dataset(cfg, "eval", data_dir=data, mirror=mirror) == data / NAME
    with pytest.raises(AcquireError, match=r"dataset tiny: no file spec for split 'test'"):
        obtain_dataset(cfg, "test", data_dir=data, mirror=mirror)
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    fetch = ["fetch", "--dataset", str(cfg_file)]
    assert main([*fetch, "--data-dir", str(tmp_path / "d2"), "--mirror", str(mirror)]) == 0
    assert f"{tmp_path / 'd2' / NAME}" in capsys.readouterr().out
    assert main([*fetch, "--data-dir", str(tmp_path / "d3")]) == 2  # no mirror, no url: a user error


@pytest.mark.skipif(not SHARED_MIRROR.is_dir(), reason=f"shared data mirror {SHARED_MIRROR} is not present")
def test_real_mirror_files_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The default configs' four real files come from the shared mirror, verify and parse."""
    monkeypatch.setenv(MIRROR_ENV, str(SHARED_MIRROR))
    data = tmp_path / "data"
    counts = {}
    for name in ("zsre", "counterfact"):
        cfg = yaml.safe_load((REPO / "config" / "datasets" / f"{name}.yaml").read_text(encoding="utf-8"))
        for split in ("train", "eval"):
            path = obtain_dataset(cfg, split, data_dir=data)  # no mirror argument: the env var is used
            assert path.parent == data
            with pytest.warns(UserWarning) if path.name == "zsre_mend_train-1k.json" else _no_warning():
                reqs = read_requests(path, cfg["kind"])
            counts[path.name] = len(reqs)
            assert all(r.prompt and r.target and r.rephrases and r.loc_prompts for r in reqs)
            assert all((r.old_target is None) == (cfg["kind"] == "zsre") for r in reqs)
    assert counts == {
        "zsre_mend_train-1k.json": 998,  # 1,000 records, 2 with an empty `alt` skipped
        "zsre_mend_eval_portability_gpt4.json": 1037,
        "counterfact-train.json": 10000,
        "counterfact-edit.json": 10000,
    }
    first = read_requests(data / "zsre_mend_eval_portability_gpt4.json", "zsre")[0]
    assert first.loc_prompts == ("nq question: what is the name of the last episode of spongebob?",)


@contextlib.contextmanager
def _no_warning() -> Iterator[None]:
    """Assert that no warning is raised inside the block."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
