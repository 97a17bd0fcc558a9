"""Snapshots and restores of the content-addressed workspace store.

Properties: a restore reproduces the snapshot byte for byte; equal contents give equal ids; a later
edit (by replacement or in place) never alters an earlier snapshot; linked data is detected if it is
written in place. Run: .venv/bin/pytest tests/test_workspace.py -q
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagent.workspace import Store, file_sha256


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_ws(ws: Path) -> Path:
    (ws / "data").mkdir(parents=True)
    (ws / "data" / "train.csv").write_bytes(b"x,y\n" + b"1,2\n" * 1000)
    (ws / "train.py").write_text("print('hello')\n")
    (ws / "sub" / "deep").mkdir(parents=True)
    (ws / "sub" / "deep" / "a.txt").write_text("a")
    (ws / "empty").mkdir()
    os.chmod(ws / "train.py", 0o755)
    return ws


def test_restore_reproduces_snapshot(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    snap = store.snapshot(ws)
    out = store.restore(snap, tmp_path / "r1")
    assert _tree(out) == _tree(ws)
    assert (out / "empty").is_dir()
    assert os.stat(out / "train.py").st_mode & 0o100  # executable bit kept
    assert store.snapshot(out) == snap  # content hash: same files, same id
    assert store.read(snap, "train.py") == b"print('hello')\n"
    assert store.manifest(snap)["data/train.csv"].sha == file_sha256(ws / "data" / "train.csv")


def test_data_is_linked_scripts_are_copied(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    out = store.restore(store.snapshot(ws), tmp_path / "r")
    assert os.stat(out / "data" / "train.csv").st_nlink >= 2  # hard link into the store
    assert os.stat(out / "train.py").st_nlink == 1  # private copy: in-place writes stay private


def test_later_edits_never_alter_earlier_snapshots(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    s0 = store.snapshot(ws)
    r = store.restore(s0, tmp_path / "r")
    with open(r / "train.py", "w") as f:  # in place, as an agent's script would
        f.write("print('changed')\n")
    (r / "new.txt").write_text("new")
    s1 = store.snapshot(r)
    assert s1 != s0
    assert store.read(s0, "train.py") == b"print('hello')\n"
    assert _tree(store.restore(s0, tmp_path / "again")) == _tree(ws)
    assert store.read(s1, "train.py") == b"print('changed')\n"
    assert store.verify() == []


def test_in_place_write_to_linked_data_is_detected(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    r = store.restore(store.snapshot(ws), tmp_path / "r")
    # Root ignores the 0444 mode: only the sandbox's read-only mount would stop this write.
    with open(r / "data" / "train.csv", "ab") as f:
        f.write(b"9,9\n")
    with pytest.raises(RuntimeError, match="modified in place"):
        store.snapshot(r)
    assert len(store.verify()) == 1


def test_restore_file_and_errors(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    snap = store.snapshot(ws)
    r = store.restore(snap, tmp_path / "r")
    (r / "train.py").write_text("broken")
    store.restore_file(snap, "train.py", r)
    assert (r / "train.py").read_text() == "print('hello')\n"
    with pytest.raises(ValueError, match="not empty"):
        store.restore(snap, r)
    with pytest.raises(ValueError, match="unknown snapshot"):
        store.restore("0" * 64, tmp_path / "x")
    with pytest.raises(ValueError, match="not in snapshot"):
        store.read(snap, "nope.py")


def test_symlinks_are_not_followed(tmp_path):
    secret = tmp_path / "answers.csv"
    secret.write_text("hidden")
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    (ws / "leak.csv").symlink_to(secret)
    out = store.restore(store.snapshot(ws), tmp_path / "r")
    assert not (out / "leak.csv").exists()


def test_store_reopens_from_disk(tmp_path):
    ws = _make_ws(tmp_path / "ws")
    snap = Store(tmp_path / "store").snapshot(ws)
    assert _tree(Store(tmp_path / "store").restore(snap, tmp_path / "r")) == _tree(ws)


names = st.text(alphabet="abcxyz_", min_size=1, max_size=6)
trees = st.dictionaries(st.lists(names, min_size=1, max_size=3).map("/".join), st.binary(max_size=300), max_size=6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=trees, second=trees)
def test_snapshots_round_trip_any_tree(tmp_path_factory, first, second):
    root = tmp_path_factory.mktemp("prop")
    store = Store(root / "store")
    snaps, written = [], []
    for i, tree in enumerate((first, second)):
        ws = root / f"ws{i}"
        ws.mkdir()
        for rel, data in tree.items():
            p = ws / rel
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):
                continue  # a file sits where this path needs a directory, or the reverse
        snaps.append(store.snapshot(ws))
        written.append(_tree(ws))
    for i, snap in enumerate(snaps):
        assert _tree(store.restore(snap, root / f"out{i}")) == written[i]
    assert (snaps[0] == snaps[1]) == (written[0] == written[1] and
                                      _dirs(root / "ws0") == _dirs(root / "ws1"))


def _dirs(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}
