"""Snapshots and restores of the content-addressed workspace store.

Properties: a restore reproduces the snapshot byte for byte; equal contents give equal ids; a later
edit (by replacement or in place) never alters an earlier snapshot; linked data is detected if it is
written in place. Run: .venv/bin/pytest tests/test_workspace.py -q
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastagent import safefs
from fastagent.safefs import Caps, UnsafePath
from fastagent.workspace import Store, file_sha256, remove_workspace


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


# --- a hostile workspace (the trusted side reads what the agent's job left) ---

def test_links_fifos_and_sockets_are_never_stored_or_opened(tmp_path, monkeypatch):
    import socket
    secret = tmp_path / "answers.csv"
    secret.write_text("hidden")
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    os.symlink(secret, ws / "submission.csv")
    os.symlink("/proc/self/mem", ws / "mem")
    os.symlink(tmp_path, ws / "sub" / "up")  # a directory link: never descended
    os.mkfifo(ws / "pipe.csv")  # opening it for reading would block the snapshot forever
    monkeypatch.chdir(ws)
    s = socket.socket(socket.AF_UNIX)
    s.bind("sock")
    try:
        snap = store.snapshot(ws)
    finally:
        s.close()
    files = set(store.manifest(snap))
    assert files == {"data/train.csv", "train.py", "sub/deep/a.txt"}
    out = store.restore(snap, tmp_path / "r")
    assert sorted(os.listdir(out)) == ["data", "empty", "sub", "train.py"]
    assert store.verify() == []


def test_snapshot_enforces_caps(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    with pytest.raises(UnsafePath, match="more than 3 files"):
        store.snapshot(ws, caps=Caps(max_files=3))
    with pytest.raises(ValueError, match="'data/train.csv' is larger than 100 bytes"):
        store.snapshot(ws, caps=Caps(max_file_bytes=100))  # UnsafePath is a ValueError
    (ws / "a" / "b").mkdir(parents=True)
    with pytest.raises(UnsafePath, match="nested more than 1 directories"):
        Store(tmp_path / "store", caps=Caps(max_depth=1)).snapshot(ws)
    assert list((tmp_path / "store" / "snapshots").iterdir()) == []  # nothing half-recorded
    with open(ws / "huge.bin", "wb") as f:
        f.truncate(100 << 30)
    with pytest.raises(UnsafePath, match="huge.bin"):
        store.snapshot(ws)


def test_setuid_bits_never_come_back(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    os.chmod(ws / "train.py", 0o6755)
    out = store.restore(store.snapshot(ws), tmp_path / "r")
    assert stat.S_IMODE(os.stat(out / "train.py").st_mode) == 0o755


def test_sparse_files_stay_sparse_in_store_and_restore(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    with open(ws / "model.bin", "wb") as f:  # 200 MB apparent, 4 KiB of data
        f.seek(123 << 20)
        f.write(b"w" * 4096)
        f.truncate(200 << 20)
    snap = store.snapshot(ws)
    entry = store.manifest(snap)["model.bin"]
    assert entry.size == 200 << 20 and entry.sha == file_sha256(ws / "model.bin")
    assert os.stat(store.object_path(entry.sha)).st_blocks * 512 < 1 << 20
    out = store.restore(snap, tmp_path / "r")
    st = os.stat(out / "model.bin")
    assert st.st_size == 200 << 20 and st.st_blocks * 512 < 1 << 20
    assert file_sha256(out / "model.bin") == entry.sha


def test_undecodable_names_round_trip(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    bname = b"\xff\xfe.csv"
    with open(os.path.join(os.fsencode(ws), b"sub", bname), "wb") as f:
        f.write(b"odd")
    os.mkdir(os.path.join(os.fsencode(ws), b"dir\x80"))
    snap = store.snapshot(ws)
    out = store.restore(snap, tmp_path / "r")
    assert bname in os.listdir(os.fsencode(out / "sub")) and b"dir\x80" in os.listdir(os.fsencode(out))
    assert store.read(snap, "sub/" + os.fsdecode(bname)) == b"odd"
    assert Store(tmp_path / "store").snapshot(out) == snap  # reloaded manifest: same names, same id


def _forge(store: Store, doc: dict) -> str:
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    snap = hashlib.sha256(blob).hexdigest()
    (store.root / "snapshots" / f"{snap}.json").write_bytes(blob)
    return snap


@pytest.mark.parametrize("rel", ["../evil.py", "/tmp/evil.py", "a/../../evil.py", "a//b", "a\x00b", "."])
def test_forged_manifest_paths_are_rejected_on_load(tmp_path, rel):
    store = Store(tmp_path / "store")
    sha = store.put_bytes(b"evil")
    snap = _forge(store, {"files": {rel: [sha, 4, False]}, "dirs": []})
    with pytest.raises(ValueError, match="corrupt manifest"):
        Store(tmp_path / "store").restore(snap, tmp_path / "r" / "ws")
    assert not (tmp_path / "r" / "evil.py").exists() and not (tmp_path / "evil.py").exists()
    bad_sha = _forge(store, {"files": {"ok.py": ["../../x", 4, False]}, "dirs": []})
    with pytest.raises(ValueError, match="corrupt manifest"):
        Store(tmp_path / "store").manifest(bad_sha)


def test_read_and_restore_file_guard_their_inputs(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    snap = store.snapshot(ws)
    for bad in ("../../etc/passwd", "x" * 64, snap[:12]):
        with pytest.raises(ValueError, match="unknown snapshot"):
            store.read(bad, "train.py")
        assert not store.exists(bad)
    with pytest.raises(ValueError):
        store.get_bytes("../" + "0" * 61)
    # restore_file into a workspace whose job replaced a parent dir and the file with links
    secret = tmp_path / "outside"
    secret.mkdir()
    r = store.restore(snap, tmp_path / "r")
    safefs.remove_tree(r / "sub")
    os.symlink(secret, r / "sub")
    with pytest.raises(UnsafePath, match="'sub' is a symbolic link"):
        store.restore_file(snap, "sub/deep/a.txt", r)
    assert list(secret.iterdir()) == []
    os.unlink(r / "train.py")
    os.symlink(secret / "victim.py", r / "train.py")
    store.restore_file(snap, "train.py", r)  # the link is replaced by the file, not written through
    assert not (secret / "victim.py").exists() and not os.path.islink(r / "train.py")
    assert (r / "train.py").read_text() == "print('hello')\n"
    os.unlink(r / "sub")
    store.restore_file(snap, "sub/deep/a.txt", r)  # missing parents are made
    assert (r / "sub" / "deep" / "a.txt").read_text() == "a"


def test_remove_workspace_removes_what_rmtree_cannot(tmp_path):
    ws = _make_ws(tmp_path / "ws")
    fd = os.open(ws, os.O_RDONLY)
    for _ in range(sys.getrecursionlimit() + 100):  # shutil.rmtree recurses once per level
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    os.chmod(ws / "sub", 0)
    with pytest.raises(RecursionError):
        shutil.rmtree(ws)  # what close() used to do: it raised, and the files stayed
    remove_workspace(ws)
    assert not os.path.lexists(ws)


def test_gc_keeps_what_is_kept_and_drops_the_rest(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    s0 = store.snapshot(ws)
    (ws / "train.py").write_text("print('v1')\n")
    (ws / "big.bin").write_bytes(os.urandom(10_000))
    s1 = store.snapshot(ws)
    undo = store.put_bytes(b"an undo version")
    junk = store.put_bytes(b"no longer needed")
    with pytest.raises(ValueError, match="unknown snapshot"):
        store.gc(keep=[s0, "f" * 64])  # a typo in keep deletes nothing
    assert store.exists(s1)
    removed_objs, removed_snaps = store.gc(keep=[s0], keep_blobs=[undo])
    assert (removed_objs, removed_snaps) == (3, 1)  # v1 train.py, big.bin, junk; snapshot s1
    assert not store.exists(s1) and store.exists(s0)
    assert store.get_bytes(undo) == b"an undo version"
    with pytest.raises(FileNotFoundError):
        store.get_bytes(junk)
    assert _tree(store.restore(s0, tmp_path / "r0")) == {k: v for k, v in _tree(ws).items()
                                                        if k not in ("big.bin", "train.py")} | \
        {"train.py": b"print('hello')\n"}
    assert store.verify() == []
    assert store.gc(keep=[s0], keep_blobs=[undo]) == (0, 0)


def test_gc_then_snapshot_of_linked_data_reingests(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    r = store.restore(store.snapshot(ws), tmp_path / "r")  # data/train.csv is linked to its object
    store.gc(keep=[])  # every object goes, the workspace's link keeps its inode alive
    snap = store.snapshot(r)
    assert store.verify([snap]) == []
    assert store.read(snap, "data/train.csv") == (ws / "data" / "train.csv").read_bytes()


def test_gc_waits_for_running_snapshots(tmp_path):
    store, ws = Store(tmp_path / "store"), _make_ws(tmp_path / "ws")
    order = []
    with store._gc_lock.shared():  # as a snapshot() in progress holds it
        t = threading.Thread(target=lambda: (store.gc(keep=[]), order.append("gc")))
        t.start()
        time.sleep(0.2)
        order.append("snapshot done")
    t.join(10)
    assert order == ["snapshot done", "gc"]
    # another process's gc holds the flock exclusively: snapshot() here waits for it
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(0.5)")
    p = subprocess.Popen([sys.executable, "-c", code, str(store.root / "gc.lock")], stdout=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"locked"
    t0 = time.perf_counter()
    store.snapshot(ws)
    waited = time.perf_counter() - t0
    p.wait(10)
    assert waited > 0.1, waited  # it really waited for the other process (0.5 s minus start-up)


def test_gc_concurrent_with_snapshots_never_leaves_a_manifest_without_objects(tmp_path):
    store = Store(tmp_path / "store")
    wss = []
    for i in range(3):
        ws = _make_ws(tmp_path / f"ws{i}")
        (ws / "train.py").write_text(f"print({i})\n")
        wss.append(ws)
    keep = store.snapshot(wss[0])
    stop, snaps, errors = threading.Event(), [], []

    def snapshotter(ws):
        try:
            while not stop.is_set():
                snaps.append(store.snapshot(ws))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=snapshotter, args=(w,)) for w in wss[1:]]
    for t in threads:
        t.start()
    for _ in range(30):
        store.gc(keep=[keep])
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors and snaps
    for snap in set(snaps):  # whatever survived is whole
        if store.exists(snap):
            assert store.verify([snap]) == []
    assert store.verify([keep]) == []
