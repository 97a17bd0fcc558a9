"""Per-episode workspaces and per-step snapshots in a content-addressed store.

    store = Store(Path("runs/x/store"), readonly=("data",))
    snap = store.snapshot(ws)              # -> snapshot id: the sha256 of the workspace's manifest
    store.restore(snap, Path("runs/x/ep1")) # a fresh, independent workspace as it was at `snap`
    store.read(snap, "train.py")            # bytes of one file in a snapshot, without restoring

Layout under the store root:
    objects/ab/abcdef...   one file per distinct content (sha256), mode 0444, never rewritten
    snapshots/<id>.json    manifest {relpath: [sha256, size, executable]} plus the empty dirs

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
  - Symlinks are not stored (they are dropped, never followed), so a link to hidden answers cannot
    smuggle them into a snapshot.
Objects and manifests are written to a temporary name and renamed, so concurrent snapshots from
several environments (threads or processes) sharing one store are safe.

Cost: restoring a 10 MB workspace whose data is linked takes well under a millisecond per file;
copies run at memory speed (~2 GB/s here). `bench/suite_env.py` measures E2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One file of a snapshot."""
    sha: str  # sha256 of the content
    size: int  # bytes
    executable: bool  # the owner-execute bit


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's content."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _walk(root: Path) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """(relpath, stat) of every regular file under root and the relpaths of empty dirs; no symlinks."""
    files, empty_dirs, stack = [], [], [""]
    while stack:
        rel = stack.pop()
        n = 0
        with os.scandir(root / rel if rel else root) as it:
            for e in it:
                n += 1
                sub = f"{rel}/{e.name}" if rel else e.name
                if e.is_dir(follow_symlinks=False):
                    stack.append(sub)
                elif e.is_file(follow_symlinks=False):
                    files.append((sub, e.stat(follow_symlinks=False)))
        if n == 0 and rel:
            empty_dirs.append(rel)
    return files, empty_dirs


class Store:
    """A content-addressed store of workspace snapshots (see the module docstring)."""

    def __init__(self, root: Path | str, readonly: Sequence[str] = ("data",)) -> None:
        self.root = Path(root)
        self.readonly = tuple(p.strip("/") for p in readonly)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "snapshots").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._manifests: dict[str, dict] = {}
        # (dev, ino) of each linked read-only object -> (sha, size, mtime_ns): lets snapshot() skip
        # rehashing data it linked itself and notice an object written in place.
        self._linked: dict[tuple[int, int], tuple[str, int, int]] = {}

    # --- objects ---
    def object_path(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def _put(self, src: Path, sha: str) -> Path:
        """Copy src into the store as object `sha` unless it is already there."""
        dst = self.object_path(sha)
        if dst.exists():
            return dst
        dst.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
        os.close(fd)
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dst)  # atomic: a concurrent _put of the same content wins or loses whole
        return dst

    def put_bytes(self, data: bytes) -> str:
        """Store a blob (e.g. a script version kept for Undo); return its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        dst = self.object_path(sha)
        if not dst.exists():
            dst.parent.mkdir(exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dst.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)
            os.replace(tmp, dst)
        return sha

    def get_bytes(self, sha: str) -> bytes:
        return self.object_path(sha).read_bytes()

    def _is_readonly(self, rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in self.readonly)

    # --- snapshots ---
    def snapshot(self, ws: Path | str) -> str:
        """Record the workspace's current files; return the snapshot id (sha256 of the manifest)."""
        ws = Path(ws)
        if not ws.is_dir():
            raise ValueError(f"workspace {ws} is not a directory")
        files, empty_dirs = _walk(ws)
        manifest: dict[str, list] = {}
        for rel, st in sorted(files):
            sha = self._known_link(rel, st)
            if sha is None:
                sha = file_sha256(ws / rel)
                self._put(ws / rel, sha)
            manifest[rel] = [sha, st.st_size, bool(st.st_mode & stat.S_IXUSR)]
        doc = {"files": manifest, "dirs": sorted(empty_dirs)}
        blob = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        snap = hashlib.sha256(blob).hexdigest()
        path = self.root / "snapshots" / f"{snap}.json"
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
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
        return sha

    def manifest(self, snap: str) -> dict[str, Entry]:
        """The files of a snapshot: {relpath: Entry}."""
        return {rel: Entry(*v) for rel, v in self._load(snap)["files"].items()}

    def _load(self, snap: str) -> dict:
        doc = self._manifests.get(snap)
        if doc is not None:
            return doc
        path = self.root / "snapshots" / f"{snap}.json"
        if not path.is_file():
            raise ValueError(f"unknown snapshot {snap!r} in store {self.root}")
        doc = json.loads(path.read_bytes())
        with self._lock:
            self._manifests[snap] = doc
        return doc

    def exists(self, snap: str) -> bool:
        return snap in self._manifests or (self.root / "snapshots" / f"{snap}.json").is_file()

    def read(self, snap: str, rel: str) -> bytes:
        """The content of file `rel` in snapshot `snap` (ValueError if it is not there)."""
        files = self._load(snap)["files"]
        if rel not in files:
            raise ValueError(f"file {rel!r} is not in snapshot {snap[:12]}")
        return self.object_path(files[rel][0]).read_bytes()

    def restore(self, snap: str, dest: Path | str) -> Path:
        """Materialize snapshot `snap` at dest (which must not exist or be empty); return dest."""
        doc, dest = self._load(snap), Path(dest)
        if dest.exists() and any(dest.iterdir()):
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
        obj = self.object_path(sha)
        if link:
            try:
                os.link(obj, dst)
                st = os.stat(dst)
                self._linked[(st.st_dev, st.st_ino)] = (sha, st.st_size, st.st_mtime_ns)
                return
            except OSError:  # another filesystem (EXDEV) or no links: fall back to a copy
                pass
        shutil.copyfile(obj, dst)
        if executable:
            os.chmod(dst, 0o755)

    def restore_file(self, snap: str, rel: str, ws: Path | str) -> None:
        """Put file `rel` of snapshot `snap` back into workspace ws (replacing, never writing in place)."""
        entry = self.manifest(snap).get(rel)
        if entry is None:
            raise ValueError(f"file {rel!r} is not in snapshot {snap[:12]}")
        dst = Path(ws) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(f".{dst.name}.restore-tmp")
        shutil.copyfile(self.object_path(entry.sha), tmp)
        os.replace(tmp, dst)

    def verify(self, snaps: Iterable[str] | None = None) -> list[str]:
        """Rehash every object used by the given snapshots (default: all); return the corrupt hashes."""
        if snaps is None:
            snaps = [p.stem for p in (self.root / "snapshots").glob("*.json")]
        shas = {v[0] for s in snaps for v in self._load(s)["files"].values()}
        return sorted(s for s in shas if not self.object_path(s).is_file()
                      or file_sha256(self.object_path(s)) != s)


def remove_workspace(ws: Path | str) -> None:
    """Delete a workspace directory (its linked objects stay in the store)."""
    shutil.rmtree(ws, ignore_errors=True)
