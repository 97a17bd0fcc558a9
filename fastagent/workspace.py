"""Per-episode workspaces and per-step snapshots in a content-addressed store.

    store = Store(Path("runs/x/store"), readonly=("data",))
    snap = store.snapshot(ws)              # -> snapshot id: the sha256 of the workspace's manifest
    store.restore(snap, Path("runs/x/ep1")) # a fresh, independent workspace as it was at `snap`
    store.read(snap, "train.py")            # bytes of one file in a snapshot, without restoring
    store.gc(keep=[snap])                   # drop every other snapshot and the objects only they used

Layout under the store root:
    objects/ab/abcdef...   one file per distinct content (sha256), mode 0444, never rewritten
    snapshots/<id>.json    manifest {relpath: [sha256, size, executable]} plus the empty dirs
    gc.lock                flock: snapshot()/put_bytes() hold it shared, gc() exclusive

Why this is copy-on-write and safe:
  - A snapshot's files live in objects/ under their content hash; later changes to a workspace make
    new objects and a new manifest, never touching earlier ones. The snapshot id is the hash of its
    manifest, so equal workspaces get equal ids (a content hash per snapshot).
  - restore() hard-links files under the read-only prefixes (the task's data: large, never written)
    and copies everything else. A hard link to a writable file would let an in-place write
    (`open("train.py", "w")`) through to the stored object and so alter every snapshot holding it;
    a copy cannot. The data links rely on the sandbox mounting those paths read-only; each
    snapshot() also checks that every linked object still has its recorded size and mtime and
    raises if one was written in place (verify() rehashes everything, for a full check).
  - The workspace is hostile (fastagent.safefs): snapshot() walks it with Caps (UnsafePath, a
    ValueError, when over: too many files, too deep, too many bytes, one file too big), opens every
    file beneath the workspace without following a link, and hashes the very bytes it copies into
    objects/ (a file changed between the hash and the copy cannot store wrong content under a
    hash). Symlinks, fifos, sockets and devices are not stored (dropped, never opened), so a link to
    hidden answers cannot smuggle them into a snapshot. Holes in sparse files stay holes in objects
    and in restored workspaces. Manifests are checked on load (no '..', absolute or NUL paths).
  - remove_workspace() is safefs.remove_tree: fd-based, never follows links, any depth or mode.
Objects and manifests are written to a temporary name and renamed, so concurrent snapshots from
several environments (threads or processes) sharing one store are safe. gc() is safe against
concurrent snapshot()/put_bytes() in any thread or process using a Store on the same root (the
gc.lock flock); it is not safe against a restore() or read() of a snapshot that gc() is deleting
(keep what is in use), nor against writers that bypass Store.

Cost: restoring a 10 MB workspace whose data is linked takes well under a millisecond per file;
copies run at memory speed (~2 GB/s here). `bench/suite_env.py` measures E2.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from fastagent import safefs
from fastagent.safefs import Caps, UnsafePath

_SHA = re.compile(r"[0-9a-f]{64}")
_NO_CAP = 1 << 62


@dataclass(frozen=True)
class Entry:
    """One file of a snapshot."""
    sha: str  # sha256 of the content
    size: int  # bytes
    executable: bool  # the owner-execute bit


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a regular file's content (trusted paths; the last component is not followed,
    a fifo or device is refused). For files in a workspace use safefs.copy_out / read_bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{safefs.safe_name(Path(path).name)!r} is not a regular file")
        h = hashlib.sha256()
        safefs.copy_fd_sparse(fd, None, _NO_CAP, hasher=h)
        return h.hexdigest()
    finally:
        os.close(fd)


def _check_sha(sha: str) -> str:
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise ValueError(f"{sha!r:.80} is not a sha256 hex digest")
    return sha


def _check_rel(rel: object) -> str:
    """A manifest path: relative, no empty, '.', '..' or NUL component."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\x00" in rel or \
            any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"bad path {rel!r:.200} in a manifest")
    return rel


def _check_doc(doc: object, snap: str) -> dict:
    """A loaded manifest, validated: it drives restore(), which writes where its paths say."""
    try:
        files, dirs = doc["files"], doc["dirs"]
        assert isinstance(files, dict) and isinstance(dirs, list)
        for rel, v in files.items():
            _check_rel(rel)
            sha, size, ex = v
            _check_sha(sha)
            assert isinstance(size, int) and size >= 0 and isinstance(ex, bool)
        for rel in dirs:
            _check_rel(rel)
    except (AssertionError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"snapshot {snap[:12]} has a corrupt manifest: {e}") from None
    return doc


class _GcLock:
    """Shared (snapshot, put) / exclusive (gc) lock: threads via a condition, processes via flock
    on one fd (taken shared by the first reader thread, released by the last)."""

    def __init__(self, path: Path) -> None:
        self._cv = threading.Condition()
        self._readers, self._writer = 0, False
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cv:
            while self._writer:
                self._cv.wait()
            if self._readers == 0:
                fcntl.flock(self._fd, fcntl.LOCK_SH)  # waits for another process's gc
            self._readers += 1
        try:
            yield
        finally:
            with self._cv:
                self._readers -= 1
                if self._readers == 0:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
                    self._cv.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cv:
            while self._writer or self._readers:
                self._cv.wait()
            self._writer = True
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            with self._cv:
                self._writer = False
                self._cv.notify_all()


def _write_new(path: Path, data: bytes, mode: int = 0o444) -> None:
    """Write a store file atomically (temp name + rename): readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


class Store:
    """A content-addressed store of workspace snapshots (see the module docstring)."""

    def __init__(self, root: Path | str, readonly: Sequence[str] = ("data",), caps: Caps | None = None) -> None:
        self.root = Path(root)
        self.readonly = tuple(p.strip("/") for p in readonly)
        self.caps = caps or Caps()  # default bounds of snapshot(); pass bigger ones for big task data
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._gc_lock = _GcLock(self.root / "gc.lock")
        self._manifests: dict[str, dict] = {}
        # (dev, ino) of each linked read-only object -> (sha, size, mtime_ns): lets snapshot() skip
        # rehashing data it linked itself and notice an object written in place.
        self._linked: dict[tuple[int, int], tuple[str, int, int]] = {}

    # --- objects ---
    def object_path(self, sha: str) -> Path:
        _check_sha(sha)
        return self.root / "objects" / sha[:2] / sha

    def _ingest(self, ws_fd: int, rel: str, max_bytes: int) -> tuple[str, int, bool]:
        """(sha, size, executable) of workspace file rel, copied into objects/ if new. The file is
        opened beneath the workspace (no link followed, regular files only); a new object is named
        by the hash of the bytes copied into it, not by an earlier read."""
        fd, st = safefs.open_regular(ws_fd, rel, allow_links=True)
        try:
            h = hashlib.sha256()
            size = safefs.copy_fd_sparse(fd, None, max_bytes, rel, hasher=h)
            sha = h.hexdigest()
            dst = self.object_path(sha)
            if not dst.exists():
                dst.parent.mkdir(exist_ok=True)
                tfd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
                try:
                    h = hashlib.sha256()
                    size = safefs.copy_fd_sparse(fd, tfd, max_bytes, rel, hasher=h)
                    os.fchmod(tfd, 0o444)
                finally:
                    os.close(tfd)
                sha = h.hexdigest()
                dst = self.object_path(sha)
                dst.parent.mkdir(exist_ok=True)
                os.replace(tmp, dst)  # atomic: a concurrent ingest of the same content wins or loses whole
            return sha, size, bool(st.st_mode & stat.S_IXUSR)
        finally:
            os.close(fd)

    def put_bytes(self, data: bytes) -> str:
        """Store a blob (e.g. a script version kept for Undo); return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        dst = self.object_path(sha)
        with self._gc_lock.shared():
            if not dst.exists():
                dst.parent.mkdir(exist_ok=True)
                _write_new(dst, data)
        return sha

    def get_bytes(self, sha: str) -> bytes:
        return self.object_path(sha).read_bytes()

    def _is_readonly(self, rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in self.readonly)

    # --- snapshots ---
    def snapshot(self, ws: Path | str, caps: Caps | None = None) -> str:
        """Record the workspace's current files; return the snapshot id (sha256 of the manifest).
        UnsafePath (a ValueError) if the workspace is over caps (default: the Store's)."""
        caps = caps or self.caps
        try:
            ws_fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):
            raise ValueError(f"workspace {ws} is not a directory") from None
        try:
            with self._gc_lock.shared():
                files, empty_dirs, _ = safefs.walk(ws_fd, caps)  # links, fifos, devices: dropped
                manifest: dict[str, list] = {}
                for rel, st in sorted(files):
                    sha = self._known_link(rel, st)
                    if sha is not None:
                        manifest[rel] = [sha, st.st_size, bool(st.st_mode & stat.S_IXUSR)]
                    else:
                        manifest[rel] = list(self._ingest(ws_fd, rel, caps.max_file_bytes))
                doc = {"files": manifest, "dirs": sorted(empty_dirs)}
                blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
                snap = hashlib.sha256(blob).hexdigest()
                path = self.root / "snapshots" / f"{snap}.json"
                if not path.exists():
                    _write_new(path, blob, 0o644)
        finally:
            os.close(ws_fd)
        with self._lock:
            self._manifests[snap] = doc
        return snap

    def _known_link(self, rel: str, st: os.stat_result) -> str | None:
        """The hash of a file that is a hard link to one of our objects, without reading it."""
        if not self._is_readonly(rel):
            return None
        rec = self._linked.get((st.st_dev, st.st_ino))
        if rec is None:
            return None
        sha, size, mtime_ns = rec
        if st.st_size != size or st.st_mtime_ns != mtime_ns:
            raise RuntimeError(f"store object {sha[:12]} (linked as {rel}) was modified in place: every "
                               f"snapshot holding it is corrupt; run read-only paths through the sandbox")
        try:  # still our object? (gc, here or in another process, may have removed it)
            ost = os.stat(self.object_path(sha))
        except FileNotFoundError:
            ost = None
        if ost is None or (ost.st_dev, ost.st_ino) != (st.st_dev, st.st_ino):
            with self._lock:
                self._linked.pop((st.st_dev, st.st_ino), None)
            return None
        return sha

    def manifest(self, snap: str) -> dict[str, Entry]:
        """The files of a snapshot: {relpath: Entry}."""
        return {rel: Entry(*v) for rel, v in self._load(snap)["files"].items()}

    def _load(self, snap: str) -> dict:
        doc = self._manifests.get(snap)
        if doc is not None:
            return doc
        path = self.root / "snapshots" / f"{snap}.json"
        if not isinstance(snap, str) or not _SHA.fullmatch(snap) or not path.is_file():
            raise ValueError(f"unknown snapshot {snap!r:.80} in store {self.root}")
        doc = _check_doc(json.loads(path.read_bytes()), snap)
        with self._lock:
            self._manifests[snap] = doc
        return doc

    def exists(self, snap: str) -> bool:
        if snap in self._manifests:
            return True
        return isinstance(snap, str) and bool(_SHA.fullmatch(snap)) and \
            (self.root / "snapshots" / f"{snap}.json").is_file()

    def read(self, snap: str, rel: str) -> bytes:
        """The content of file `rel` in snapshot `snap` (ValueError if it is not there)."""
        files = self._load(snap)["files"]
        if not isinstance(rel, str) or rel not in files:
            raise ValueError(f"file {safefs.safe_name(str(rel))!r} is not in snapshot {snap[:12]}")
        return self.object_path(files[rel][0]).read_bytes()

    def restore(self, snap: str, dest: Path | str) -> Path:
        """Materialize snapshot `snap` at dest (which must not exist or be empty); return dest."""
        doc, dest = self._load(snap), Path(dest)
        if dest.is_symlink() or (dest.exists() and any(dest.iterdir())):
            raise ValueError(f"restore target {dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        made: set[str] = set()
        for rel in doc["dirs"]:
            (dest / rel).mkdir(parents=True, exist_ok=True)
        for rel, (sha, size, executable) in doc["files"].items():
            parent = rel.rpartition("/")[0]
            if parent and parent not in made:  # one mkdir per directory, not per file
                (dest / parent).mkdir(parents=True, exist_ok=True)
                made.add(parent)
            self._materialize(sha, dest / rel, link=self._is_readonly(rel), executable=executable)
        return dest

    def _materialize(self, sha: str, dst: Path, link: bool, executable: bool) -> None:
        """dst is in a fresh directory tree we made (no agent has seen it): paths are safe here."""
        obj = self.object_path(sha)
        if link:
            try:
                os.link(obj, dst)
                st = os.stat(dst, follow_symlinks=False)
                with self._lock:
                    self._linked[(st.st_dev, st.st_ino)] = (sha, st.st_size, st.st_mtime_ns)
                return
            except OSError:  # another filesystem (EXDEV) or no links: fall back to a copy
                pass
        sfd = os.open(obj, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                          0o755 if executable else 0o644)
            try:
                safefs.copy_fd_sparse(sfd, dfd, _NO_CAP)  # holes stay holes
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def restore_file(self, snap: str, rel: str, ws: Path | str) -> None:
        """Put file `rel` of snapshot `snap` back into workspace ws: written beneath ws without
        following links (missing parents are made, a link in the way is UnsafePath), replacing
        the file whole (temp + rename), never writing in place."""
        entry = self.manifest(snap).get(rel) if isinstance(rel, str) else None
        if entry is None:
            raise ValueError(f"file {safefs.safe_name(str(rel))!r} is not in snapshot {snap[:12]}")
        sfd = os.open(self.object_path(entry.sha), os.O_RDONLY | os.O_CLOEXEC)
        try:
            safefs.write_from_fd(ws, rel, sfd, _NO_CAP, mode=0o755 if entry.executable else 0o644,
                                 make_parents=True)
        finally:
            os.close(sfd)

    def verify(self, snaps: Iterable[str] | None = None) -> list[str]:
        """Rehash every object used by the given snapshots (default: all); return the corrupt hashes."""
        if snaps is None:
            snaps = [p.stem for p in (self.root / "snapshots").glob("*.json")]
        shas = {v[0] for s in snaps for v in self._load(s)["files"].values()}
        return sorted(s for s in shas if not self.object_path(s).is_file()
                      or file_sha256(self.object_path(s)) != s)

    # --- collection ---
    def gc(self, keep: Iterable[str], keep_blobs: Iterable[str] = ()) -> tuple[int, int]:
        """Delete every snapshot not in keep and every object that no kept snapshot uses and that
        is not in keep_blobs (put_bytes blobs still needed, e.g. Undo versions); return
        (removed_objects, removed_snapshots). Every id in keep must exist (ValueError otherwise,
        before anything is deleted). Waits for running snapshot()/put_bytes() calls (all threads
        and processes using a Store here) and holds new ones off until it is done."""
        keep, blobs = set(keep), {_check_sha(b) for b in keep_blobs}
        with self._gc_lock.exclusive():
            live = set(blobs)
            for snap in keep:
                live.update(v[0] for v in self._load(snap)["files"].values())
            removed_snaps = 0
            for p in (self.root / "snapshots").iterdir():
                snap = p.name[:-5] if p.name.endswith(".json") else ""
                if snap not in keep:  # a manifest not kept, or a temp file left by a crash
                    p.unlink(missing_ok=True)
                    removed_snaps += bool(snap)
                    with self._lock:
                        self._manifests.pop(snap, None)
            removed_objs = 0
            for sub in (self.root / "objects").iterdir():
                for p in sub.iterdir():
                    if p.name not in live:
                        p.unlink(missing_ok=True)
                        removed_objs += not p.name.startswith(".tmp-")
            with self._lock:
                self._linked = {k: v for k, v in self._linked.items() if v[0] in live}
        return removed_objs, removed_snaps


def remove_workspace(ws: Path | str) -> None:
    """Delete a workspace directory whatever the job left in it (its linked objects stay in the
    store): safefs.remove_tree, which never follows a link and copes with any depth or mode."""
    safefs.remove_tree(ws)
