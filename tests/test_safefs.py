"""Trusted-side access to hostile trees (fastagent.safefs): links are never followed, reads are
capped, fifos never block, walks stop at their caps, remove_tree removes anything a job can leave.

Every test builds the hostile tree itself (as an agent's job would) and checks what the trusted
side sees. Timings of the big cases are printed (-s), never asserted.
Run: .venv/bin/python -m pytest -q tests/test_safefs.py
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import pytest

from fastagent import safefs
from fastagent.safefs import Caps, UnsafePath


@pytest.fixture(params=["openat2", "openat-walk"])
def impl(request, monkeypatch):
    """Run a test through openat2 and through the portable per-component walk."""
    if request.param == "openat-walk":
        monkeypatch.setattr(safefs.files, "_have_openat2", False)
    else:
        monkeypatch.setattr(safefs.files, "_have_openat2", None)
    return request.param


@pytest.fixture
def fast_tmp(tmp_path):
    """A scratch dir on tmpfs when there is one: on this host's ext4 (online discard) each rmdir
    costs ~3.5 ms, so a 10,000-level chain would take 35 s to delete; the code path is the same."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tmp_path
    d = Path(tempfile.mkdtemp(prefix="fa-safefs-", dir=base))
    yield d
    safefs.remove_tree(d)
    shutil.rmtree(d, ignore_errors=True)


def _ws(tmp_path: Path) -> tuple[Path, Path]:
    """(workspace, answers file outside it)."""
    ws, answers = tmp_path / "ws", tmp_path / "answers.csv"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "f.txt").write_text("inside")
    (ws / "train.py").write_text("print(1)\n")
    answers.write_text("id,label\n1,secret\n")
    return ws, answers


def _no_host_path(msg: str, tmp_path: Path) -> None:
    assert str(tmp_path) not in msg and "/proc" not in msg, msg


@pytest.mark.parametrize("target", ["answers", "/proc/self/mem", "/etc/passwd", "chain", "dangling"])
def test_symlinked_file_is_refused(tmp_path, impl, target):
    ws, answers = _ws(tmp_path)
    if target == "answers":
        os.symlink(answers, ws / "submission.csv")
    elif target == "chain":  # a link to a link to a file inside the workspace
        os.symlink("train.py", ws / "l1")
        os.symlink("l1", ws / "submission.csv")
    elif target == "dangling":
        os.symlink("nowhere", ws / "submission.csv")
    else:
        os.symlink(target, ws / "submission.csv")
    for fn in (lambda: safefs.read_bytes(ws, "submission.csv", 1 << 20),
               lambda: safefs.copy_out(ws, "submission.csv", tmp_path / "copy.csv", 1 << 20),
               lambda: safefs.open_beneath(ws, "submission.csv")):
        with pytest.raises(UnsafePath, match="submission.csv' is a symbolic link: write a regular file") as e:
            fn()
        _no_host_path(str(e.value), tmp_path)
    assert not (tmp_path / "copy.csv").exists()


def test_symlinked_directory_in_the_middle_is_refused(tmp_path, impl):
    ws, answers = _ws(tmp_path)
    os.symlink(tmp_path, ws / "up")  # up/answers.csv would be the hidden file
    os.symlink("sub", ws / "alias")  # even a link that stays inside is refused
    for rel in ("up/answers.csv", "alias/f.txt"):
        with pytest.raises(UnsafePath, match="is a symbolic link .*use a real directory") as e:
            safefs.read_bytes(ws, rel, 100)
        _no_host_path(str(e.value), tmp_path)
    assert safefs.read_bytes(ws, "sub/f.txt", 100) == b"inside"
    assert safefs.read_bytes(ws, "./sub//f.txt", 100) == b"inside"


@pytest.mark.parametrize("rel", ["../answers.csv", "sub/../../answers.csv", "/etc/passwd", "a\x00b"])
def test_escapes_are_refused_before_any_syscall(tmp_path, impl, rel):
    ws, _ = _ws(tmp_path)
    with pytest.raises(UnsafePath, match="workspace|NUL"):
        safefs.open_beneath(ws, rel)


def test_missing_path_and_root_as_fd(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        safefs.read_bytes(ws, "sub/nope.txt", 10)
    _no_host_path(str(e.value), tmp_path)
    rfd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert safefs.read_text(rfd, "sub/f.txt", 100) == "inside"
        os.fstat(rfd)  # the caller's fd stays open
    finally:
        os.close(rfd)


def _in_thread(fn, timeout: float = 10.0):
    """Run fn in a thread; fail (instead of hanging the suite) if it blocks."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e
    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "blocked (a fifo opened for reading without a writer?)"
    return box


def test_fifo_never_blocks_and_is_refused(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    os.mkfifo(ws / "submission.csv")
    for fn in (lambda: safefs.read_bytes(ws, "submission.csv", 10),
               lambda: safefs.read_head(ws, "submission.csv", 10),
               lambda: safefs.copy_file(ws, "submission.csv", "copy.csv", 10)):
        box = _in_thread(fn)
        assert isinstance(box.get("error"), UnsafePath) and "named pipe" in str(box["error"])
    files, _, rejected = _in_thread(lambda: safefs.walk(ws))["value"]
    assert rejected == ["submission.csv"] and "submission.csv" not in dict(files)


def test_socket_is_refused_and_sanitized(tmp_path, impl, monkeypatch):
    ws, _ = _ws(tmp_path)
    monkeypatch.chdir(ws)  # AF_UNIX paths are short: bind relative to the workspace
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind("sock")
        with pytest.raises(UnsafePath, match="'sock' is a socket"):
            safefs.read_bytes(ws, "sock", 10)
        assert safefs.walk(ws)[2] == ["sock"]
        assert safefs.sanitize(ws) == ["sock"]
        assert not os.path.lexists(ws / "sock")
    finally:
        s.close()


def test_hard_links_need_allow_links(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    os.link(ws / "train.py", ws / "submission.csv")
    with pytest.raises(UnsafePath, match="hard link"):
        safefs.read_bytes(ws, "submission.csv", 100)
    assert safefs.read_bytes(ws, "submission.csv", 100, allow_links=True) == b"print(1)\n"


def test_reads_are_capped_and_text_is_valid_utf8(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    (ws / "big.txt").write_bytes(b"x" * 1000)
    with pytest.raises(UnsafePath, match="larger than 999 bytes"):
        safefs.read_bytes(ws, "big.txt", 999)
    assert safefs.read_bytes(ws, "big.txt", 1000) == b"x" * 1000
    assert safefs.read_head(ws, "big.txt", 10) == (b"x" * 10, True)
    assert safefs.read_head(ws, "big.txt", 1000) == (b"x" * 1000, False)
    (ws / "bad.txt").write_bytes(b"ok \xff\xfe \xed\xa0\x80 end")  # invalid UTF-8 and an encoded surrogate
    text = safefs.read_text(ws, "bad.txt", 100)
    text.encode("utf-8")  # raises on a lone surrogate
    assert text.startswith("ok ") and text.endswith(" end") and "\ufffd" in text
    with pytest.raises(UnsafePath, match="is a directory"):
        safefs.read_bytes(ws, "sub", 10)


def test_copy_out_hashes_exactly_what_it_wrote(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    data = os.urandom(300_000)
    (ws / "submission.csv").write_bytes(data)
    dest = tmp_path / "trusted.csv"
    sha = safefs.copy_out(ws, "submission.csv", dest, 1 << 20)
    assert dest.read_bytes() == data and sha == hashlib.sha256(data).hexdigest()
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    with pytest.raises(FileExistsError):  # O_EXCL: never overwrites (or follows a link at) dest
        safefs.copy_out(ws, "submission.csv", dest, 1 << 20)
    with pytest.raises(UnsafePath, match="larger than"):
        safefs.copy_out(ws, "submission.csv", tmp_path / "small.csv", 1000)


def test_copy_file_keeps_holes_and_replaces_links(tmp_path, impl):
    ws, answers = _ws(tmp_path)
    with open(ws / "sparse.bin", "wb") as f:  # 200 MB, 8 KiB of data in the middle
        f.seek(100 << 20)
        f.write(b"\x01" * 8192)
        f.truncate(200 << 20)
    os.chmod(ws / "sparse.bin", 0o4755)
    os.symlink(answers, ws / "copy.bin")  # the destination is a link to the answers
    t = time.perf_counter()
    safefs.copy_file(ws, "sparse.bin", "copy.bin", 256 << 20)
    print(f"\ncopy_file of a 200 MB sparse file: {(time.perf_counter() - t) * 1e3:.2f} ms")
    st = os.lstat(ws / "copy.bin")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 200 << 20
    assert st.st_blocks * 512 < 1 << 20, st.st_blocks  # holes stayed holes
    assert stat.S_IMODE(st.st_mode) == 0o755  # no setuid bit carried over
    assert answers.read_text() == "id,label\n1,secret\n"  # the link was replaced, not written through
    with open(ws / "copy.bin", "rb") as f:
        f.seek((100 << 20) - 1)
        assert f.read(8194) == b"\x00" + b"\x01" * 8192 + b"\x00"
    with pytest.raises(UnsafePath, match="larger than"):
        safefs.copy_file(ws, "sparse.bin", "small.bin", 100 << 20)
    os.symlink(tmp_path, ws / "out")
    with pytest.raises(UnsafePath, match="'out' is a symbolic link"):
        safefs.copy_file(ws, "train.py", "out/escaped.py", 1 << 20)
    assert not (tmp_path / "escaped.py").exists()
    assert not [n for n in os.listdir(ws) if n.endswith(".tmp")]  # no temp file left behind


def test_walk_lists_files_dirs_and_rejects_without_following(tmp_path, impl):
    ws, answers = _ws(tmp_path)
    (ws / "empty").mkdir()
    os.symlink(tmp_path, ws / "updir")  # a dir link: never descended
    os.symlink("/proc/self/mem", ws / "mem")
    name = os.fsdecode(b"\xff\xfe.csv")
    (ws / "sub" / name).write_bytes(b"odd")  # an undecodable name
    files, empty, rejected = safefs.walk(ws)
    assert sorted(r for r, _ in files) == sorted(["sub/f.txt", "train.py", f"sub/{name}"])
    assert empty == ["empty"] and sorted(rejected) == ["mem", "updir"]
    assert safefs.read_bytes(ws, f"sub/{name}", 10) == b"odd"  # the relpath round-trips
    assert os.fsencode(name) == b"\xff\xfe.csv"
    shown = safefs.safe_name(f"sub/{name}")
    shown.encode("utf-8")
    assert shown == "sub/\ufffd\ufffd.csv"


def test_walk_caps(tmp_path, impl):
    ws, _ = _ws(tmp_path)
    with pytest.raises(UnsafePath, match="more than 2 files"):
        safefs.walk(ws, Caps(max_files=2))
    with pytest.raises(UnsafePath, match="more than 10 bytes"):
        safefs.walk(ws, Caps(max_total_bytes=10))
    with pytest.raises(UnsafePath, match="'train.py' is larger than 5 bytes"):
        safefs.walk(ws, Caps(max_file_bytes=5))
    (ws / "a" / "b" / "c").mkdir(parents=True)
    with pytest.raises(UnsafePath, match="'a/b' is nested more than 1 directories deep"):
        safefs.walk(ws, Caps(max_depth=1))


def test_walk_rejects_a_100_gb_sparse_file_at_once(tmp_path):
    ws, _ = _ws(tmp_path)
    with open(ws / "huge.bin", "wb") as f:
        f.truncate(100 << 30)
    t = time.perf_counter()
    with pytest.raises(UnsafePath, match="'huge.bin' is larger than"):
        safefs.walk(ws)
    print(f"\nwalk refusing a 100 GB sparse file: {(time.perf_counter() - t) * 1e3:.2f} ms")


def test_wide_dir_stops_at_the_cap(fast_tmp):
    ws = fast_tmp / "wide"
    ws.mkdir()
    dfd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
    t = time.perf_counter()
    for i in range(100_000):
        os.close(os.open(f"f{i}", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=dfd))
    os.close(dfd)
    made = time.perf_counter() - t
    t = time.perf_counter()
    with pytest.raises(UnsafePath, match="more than 20000 files"):
        safefs.walk(ws)
    walked = time.perf_counter() - t
    t = time.perf_counter()
    with pytest.raises(UnsafePath, match="more than 20000 files"):
        safefs.sanitize(ws)
    sanitized = time.perf_counter() - t
    t = time.perf_counter()
    safefs.remove_tree(ws)
    removed = time.perf_counter() - t
    print(f"\n100,000 files: create {made:.2f} s, walk stops at the cap after {walked * 1e3:.1f} ms, "
          f"sanitize after {sanitized * 1e3:.1f} ms, remove_tree {removed:.2f} s")
    assert not os.path.lexists(ws)


def _chain(root: Path, depth: int) -> None:
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            nfd = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        os.close(os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_deep_chain_walk_stops_and_remove_tree_succeeds(fast_tmp):
    depth = 100_000 if str(fast_tmp).startswith("/dev/shm") else 10_000
    ws = fast_tmp / "deep"
    ws.mkdir()
    t = time.perf_counter()
    _chain(ws, depth)
    made = time.perf_counter() - t
    t = time.perf_counter()
    with pytest.raises(UnsafePath, match="nested more than 32 directories deep"):
        safefs.walk(ws)
    walked = time.perf_counter() - t
    t = time.perf_counter()
    safefs.remove_tree(ws)
    removed = time.perf_counter() - t
    print(f"\n{depth}-level chain: create {made:.2f} s, walk stops after {walked * 1e3:.1f} ms, "
          f"remove_tree {removed:.2f} s")
    assert not os.path.lexists(ws)


def test_sanitize_strips_bits_and_removes_specials(tmp_path, impl):
    ws, answers = _ws(tmp_path)
    outside = tmp_path / "suid-outside"
    outside.write_text("x")
    os.chmod(outside, 0o4755)
    os.chmod(ws / "train.py", 0o6755)  # setuid + setgid
    os.chmod(ws / "sub", 0o3777)  # setgid + sticky directory
    os.symlink(outside, ws / "link-to-suid")
    os.mkfifo(ws / "sub" / "fifo")
    changed = safefs.sanitize(ws)
    assert sorted(changed) == ["link-to-suid", "sub", "sub/fifo", "train.py"]
    assert stat.S_IMODE(os.stat(ws / "train.py").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(ws / "sub").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o4755  # the link's target was not touched
    assert not os.path.lexists(ws / "link-to-suid") and not os.path.lexists(ws / "sub" / "fifo")
    assert safefs.sanitize(ws) == []  # nothing left to do
    files, _, rejected = safefs.walk(ws)
    assert rejected == [] and all(not st.st_mode & 0o7000 for _, st in files)


def _nasty_tree(root: Path, outside: Path) -> None:
    """What a job can leave: unreadable/unwritable dirs, odd names, links out, fifos, deep dirs."""
    (root / "a" / "b" / "c").mkdir(parents=True)
    (root / "a" / "b" / "c" / "f").write_text("x")
    (root / os.fsdecode(b"\xff\xfe.csv")).write_text("odd")
    (root / "ro").mkdir()
    (root / "ro" / "kept").write_text("x")
    os.symlink(outside, root / "a" / "out")  # a link to a directory outside: must survive
    os.mkfifo(root / "a" / "b" / "fifo")
    _chain(root / "a", 100)
    os.chmod(root / "ro" / "kept", 0)
    os.chmod(root / "ro", 0o500)  # unwritable: its entries cannot be unlinked as is
    os.chmod(root / "a" / "b" / "c", 0)  # unreadable, unsearchable
    os.chmod(root / "a", 0)


def test_remove_tree_leaves_nothing_and_follows_nothing(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    ws = tmp_path / "ws"
    ws.mkdir()
    _nasty_tree(ws, outside)
    safefs.remove_tree(ws)
    assert not os.path.lexists(ws)
    assert (outside / "keep.txt").read_text() == "keep"
    safefs.remove_tree(ws)  # a missing path is fine
    (tmp_path / "file").write_text("x")
    os.symlink(outside, tmp_path / "dirlink")
    safefs.remove_tree(tmp_path / "file")
    safefs.remove_tree(tmp_path / "dirlink")  # removes the link, not what it points to
    assert not os.path.lexists(tmp_path / "file") and not os.path.lexists(tmp_path / "dirlink")
    assert (outside / "keep.txt").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to another uid")
def test_remove_tree_as_an_unprivileged_owner(tmp_path):
    """Without root's CAP_DAC_OVERRIDE, mode 000 and 0500 directories must be chmodded back."""
    uid = 65534
    base = Path(tempfile.mkdtemp(prefix="fa-safefs-uid-"))  # tmp_path's parents are 0700 root
    try:
        os.chmod(base, 0o755)
        outside, ws = base / "outside", base / "ws"
        outside.mkdir()
        ws.mkdir()
        _nasty_tree(ws, outside)
        for dirpath, dirnames, filenames in os.walk(base):
            for n in dirnames + filenames:
                os.chown(os.path.join(dirpath, n), uid, uid, follow_symlinks=False)
        os.chown(base, uid, uid)
        pid = os.fork()
        if pid == 0:  # the child: an ordinary user removing its own tree
            code = 1
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                safefs.remove_tree(ws)
                code = 0 if not os.path.lexists(ws) else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not os.path.lexists(ws) and outside.is_dir()
    finally:
        safefs.remove_tree(base)


def test_safe_name():
    assert safefs.safe_name("train.py") == "train.py"
    assert safefs.safe_name("a\nb\x1b[31m\u202ec\u200bd\x7f") == "a\\x0ab\\x1b[31m\\u202ec\\u200bd\\x7f"
    bad = os.fsdecode(b"x\xffy")
    assert safefs.safe_name(bad) == "x\ufffdy"
    assert safefs.safe_name("\ud800") == "\ufffd"  # a lone surrogate given directly
    for name in (bad, "\ud800", "a\x00b"):
        safefs.safe_name(name).encode("utf-8")
