"""fastagent.safefs.files: opening, reading and copying one file beneath a root, never through a link.

The primitives behind fastagent.safefs (see its docstring for what is and is not guaranteed):
open_beneath (openat2 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS, or an
O_NOFOLLOW per-component walk), the capped reads, copy_out and the sparse-aware copies. Import
them from fastagent.safefs.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

_CHUNK = 1 << 20
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_PATH = getattr(os, "O_PATH", 0)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_SEEK_DATA, _SEEK_HOLE = getattr(os, "SEEK_DATA", None), getattr(os, "SEEK_HOLE", None)
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x02, 0x04, 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (the unified syscall table)


class UnsafePath(ValueError):
    """A hostile or over-cap entry in a workspace; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class Caps:
    """Bounds on one workspace walk. Defaults: a task directory with its data and an agent's
    scripts, checkpoints and outputs fits well inside; an attack (100,000 files, a 100 GB sparse
    file, a 10,000-level chain) is refused after O(cap) work, not O(attack)."""
    max_files: int = 20_000  # entries of any type (files, dirs, links, ...): ~50 ms to lstat
    max_depth: int = 32  # directory nesting below the root; real projects stay under ~10
    max_total_bytes: int = 1 << 30  # sum of st_size (apparent size: holes count, they hash as zeros)
    max_file_bytes: int = 256 << 20  # one file's st_size: a model checkpoint of a small task


# --- names and paths ---

def safe_name(name: str) -> str:
    """`name` for an observation: valid UTF-8 (undecodable bytes -> U+FFFD), control, format
    and separator characters (newlines, bidi overrides, zero-width) escaped as \\xNN / \\uNNNN."""
    if any("\ud800" <= c <= "\udfff" for c in name):  # undecodable bytes (or stray surrogates)
        name = "".join("\ufffd" if "\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff" else c
                       for c in name)
        name = name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    text = name
    out = []
    for c in text:
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp"):
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return "".join(out)


def _parts(rel: str) -> list[str]:
    """The components of a relative path; UnsafePath for absolute paths, '..' and NUL."""
    if "\x00" in rel:
        raise UnsafePath(f"{safe_name(rel)!r} contains a NUL byte: use a plain file name")
    if rel.startswith("/"):
        raise UnsafePath(f"{safe_name(rel)!r} is an absolute path: use a path inside the workspace")
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafePath(f"{safe_name(rel)!r} contains '..': use a path inside the workspace")
    return parts


def _root_fd(root: str | Path | int) -> tuple[int, bool]:
    """(a directory fd for root, whether we opened it and must close it)."""
    if isinstance(root, int):
        return root, False
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC), True


# --- opening beneath a root ---

class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_syscall():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


_syscall = _load_syscall()
_have_openat2: bool | None = None  # decided by the first call


def _openat2(dirfd: int, rel: bytes, flags: int, mode: int) -> int:
    tmpfile = getattr(os, "O_TMPFILE", -1)  # includes O_DIRECTORY: test all of its bits
    if not flags & os.O_CREAT and flags & tmpfile != tmpfile:
        mode = 0  # openat2 refuses a mode without O_CREAT
    how = _OpenHow(flags | _CLOEXEC, mode,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(rel),
                  ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


def _walk_open(dirfd: int, parts: list[str], flags: int, mode: int, rel: str) -> int:
    """The portable path: one openat per component, each with O_NOFOLLOW."""
    fd = os.dup(dirfd)
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            try:
                nfd = os.open(name, (flags | os.O_NOFOLLOW | _CLOEXEC) if last else _DIR, mode, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    _explain(fd, name, "/".join(parts[:i + 1]), rel, last)
                raise
            os.close(fd)
            fd = nfd
            if last and flags & _O_PATH and stat.S_ISLNK(os.fstat(fd).st_mode):  # O_PATH opens links
                _explain(dirfd, "/".join(parts), rel, rel, True)
        return fd if parts else os.open(".", flags | _CLOEXEC, mode, dir_fd=fd)
    except BaseException:
        os.close(fd)
        raise


def _explain(dirfd: int, name: str, prefix: str, rel: str, last: bool) -> None:
    """Raise UnsafePath if `name` (in dirfd) is a symbolic link; else return (caller re-raises)."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except OSError:
        return
    if stat.S_ISLNK(st.st_mode):
        what = "" if prefix == rel else f" (in {safe_name(rel)!r})"
        fix = "write a regular file" if last else "use a real directory"
        raise UnsafePath(f"{safe_name(prefix)!r} is a symbolic link{what}: {fix}")


def _explain_path(rfd: int, parts: list[str], rel: str, err: OSError) -> OSError:
    """After openat2 refused rel: UnsafePath naming the first link on the path, else err."""
    try:
        os.close(_walk_open(rfd, parts, _O_PATH or os.O_RDONLY | os.O_NONBLOCK, 0, rel))
    except UnsafePath as e:
        return e
    except OSError as e:
        return e
    if err.errno in (errno.ELOOP, errno.EXDEV):  # the link was removed since: still refused
        return UnsafePath(f"{safe_name(rel)!r} is or passes a symbolic link: write a regular file")
    return OSError(err.errno, f"{safe_name(rel)}: {err.strerror}")


def open_beneath(root: str | Path | int, rel: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """An fd for `rel` under `root` that never follows a symlink or magic link and never leaves
    root. UnsafePath for links and escapes, FileNotFoundError for a missing path."""
    global _have_openat2
    parts = _parts(rel)
    rfd, owned = _root_fd(root)
    try:
        if _have_openat2 is not False and _syscall is not None:
            path = os.fsencode("/".join(parts) or ".")
            try:
                fd = _openat2(rfd, path, flags, mode)
                _have_openat2 = True
                return fd
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EPERM) and not _have_openat2:
                    _have_openat2 = False  # old kernel or a seccomp filter: use the walk
                elif e.errno in (errno.ELOOP, errno.EXDEV, errno.ENOTDIR):
                    raise _explain_path(rfd, parts, rel, e) from None
                elif e.errno == errno.ENOENT:
                    raise FileNotFoundError(e.errno, f"{safe_name(rel)} does not exist") from None
                else:
                    raise OSError(e.errno, f"{safe_name(rel)}: {e.strerror}") from None
        return _walk_open(rfd, parts, flags, mode, rel)
    finally:
        if owned:
            os.close(rfd)


def open_regular(root: str | Path | int, rel: str, *, allow_links: bool = False) -> tuple[int, os.stat_result]:
    """(O_RDONLY fd, its fstat) of regular file `rel` beneath root (see read_bytes for the checks)."""
    if _O_PATH:  # an O_PATH fd opens nothing: a fifo cannot block, a device's open() never runs
        pfd = open_beneath(root, rel, _O_PATH)
        try:
            _check_regular(os.fstat(pfd), rel, allow_links)
        finally:
            os.close(pfd)
    fd = open_beneath(root, rel, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        _check_regular(st, rel, allow_links)
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def kind_of(mode: int) -> str:
    """What a non-regular inode is, in words, for messages ("a symbolic link", "a named pipe", ...)."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(st: os.stat_result, rel: str, allow_links: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{safe_name(rel)!r} is {kind_of(st.st_mode)}: write a regular file")
    if st.st_nlink != 1 and not allow_links:
        raise UnsafePath(f"{safe_name(rel)!r} is a hard link ({st.st_nlink} names for one file): "
                         f"write a regular file of its own")


# --- reading and copying ---

def _read_capped(fd: int, limit: int) -> bytes:
    """At most `limit` bytes from fd's offset, whatever st_size says."""
    chunks, n = [], 0
    while n < limit:
        b = os.read(fd, min(_CHUNK, limit - n))
        if not b:
            break
        chunks.append(b)
        n += len(b)
    return b"".join(chunks)


def _too_big(rel: str, max_bytes: int) -> UnsafePath:
    return UnsafePath(f"{safe_name(rel)!r} is larger than {max_bytes} bytes: write a smaller file")


def read_bytes(root: str | Path | int, rel: str, max_bytes: int, *, allow_links: bool = False) -> bytes:
    """The content of regular file `rel` beneath root; UnsafePath if it is more than max_bytes."""
    fd, st = open_regular(root, rel, allow_links=allow_links)
    try:
        if st.st_size > max_bytes:
            raise _too_big(rel, max_bytes)
        data = _read_capped(fd, max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _too_big(rel, max_bytes)
    return data


def read_text(root: str | Path | int, rel: str, max_bytes: int, *, allow_links: bool = False) -> str:
    """read_bytes decoded as UTF-8 with replacement: always valid UTF-8, never a surrogate."""
    return read_bytes(root, rel, max_bytes, allow_links=allow_links).decode("utf-8", "replace")


def read_head(root: str | Path | int, rel: str, max_bytes: int, *,
              allow_links: bool = False) -> tuple[bytes, bool]:
    """(at most max_bytes from the start of regular file `rel`, whether the file is longer)."""
    fd, _ = open_regular(root, rel, allow_links=allow_links)
    try:
        data = _read_capped(fd, max_bytes + 1)
    finally:
        os.close(fd)
    return data[:max_bytes], len(data) > max_bytes


def copy_out(root: str | Path | int, rel: str, dest: Path, max_bytes: int, *,
             allow_links: bool = False) -> str:
    """Copy regular file `rel` into a new trusted file dest (O_EXCL, 0600); return the sha256 of
    exactly the bytes written, so a scorer reads a copy of what was hashed."""
    import hashlib
    data = read_bytes(root, rel, max_bytes, allow_links=allow_links)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return hashlib.sha256(data).hexdigest()


def copy_fd_sparse(src: int, dst: int | None, max_bytes: int, rel: str = "file", hasher=None) -> int:
    """Copy src (from offset 0) to dst (None: only hash): data extents are copied, holes stay
    holes (SEEK_DATA/SEEK_HOLE; a full copy where those are missing). `hasher` sees the logical
    content (holes as zeros). Returns the size; UnsafePath if src is over max_bytes. Reads at
    most the st_size seen at the start, and stops early if the file shrinks."""
    size = os.fstat(src).st_size
    if size > max_bytes:
        raise _too_big(rel, max_bytes)
    pos = 0  # logical content produced so far (data and zeros)
    while pos < size:
        data, hole = _extent(src, pos, size)
        if data > pos and hasher is not None:
            _hash_zeros(hasher, data - pos)
        pos = data
        if dst is not None and hasher is None:
            got = _copy_range(src, dst, pos, hole)
        else:
            got = _copy_chunks(src, dst, pos, hole, hasher)
        if got < hole:  # the file shrank under us: what we have is what we hash and keep
            pos = size = got
            break
        pos = hole
    if dst is not None:
        os.ftruncate(dst, pos)  # a trailing hole; also trims a dst that was longer
    return pos


def _copy_chunks(src: int, dst: int | None, pos: int, end: int, hasher) -> int:
    while pos < end:
        b = os.pread(src, min(_CHUNK, end - pos), pos)
        if not b:
            break
        if dst is not None:
            os.pwrite(dst, b, pos)
        if hasher is not None:
            hasher.update(b)
        pos += len(b)
    return pos


def _copy_range(src: int, dst: int, pos: int, end: int) -> int:
    """Copy [pos, end) in the kernel (copy_file_range), else by chunks; return where it stopped."""
    try:
        while pos < end:
            n = os.copy_file_range(src, dst, end - pos, pos, pos)
            if n == 0:
                return pos
            pos += n
        return pos
    except (OSError, AttributeError):  # EXDEV, ENOSYS, EINVAL on some filesystems
        return _copy_chunks(src, dst, pos, end, None)


def _extent(fd: int, pos: int, size: int) -> tuple[int, int]:
    """(start of the next data at or after pos, end of that data), clipped to size."""
    if _SEEK_DATA is None:
        return pos, size
    try:
        data = os.lseek(fd, pos, _SEEK_DATA)
        hole = os.lseek(fd, data, _SEEK_HOLE)
    except OSError as e:
        if e.errno == errno.ENXIO:  # no data after pos: the rest is a hole
            return size, size
        if e.errno == errno.EINVAL:  # filesystem without hole reporting
            return pos, size
        raise
    return min(data, size), min(hole, size)


_ZEROS = bytes(_CHUNK)


def _hash_zeros(hasher, n: int) -> None:
    while n > 0:
        k = min(n, _CHUNK)
        hasher.update(_ZEROS[:k] if k < _CHUNK else _ZEROS)
        n -= k


def copy_file(root: str | Path | int, src_rel: str, dst_rel: str, max_bytes: int) -> None:
    """Copy regular file src_rel to dst_rel inside one tree: streamed, sparse-aware, capped. The
    copy is written to a temporary name beside dst and renamed over it (a link at dst is replaced,
    never followed); dst's parent directories must exist and be real directories."""
    rfd, owned = _root_fd(root)
    try:
        sfd, st = open_regular(rfd, src_rel, allow_links=True)
        try:
            write_from_fd(rfd, dst_rel, sfd, max_bytes, mode=stat.S_IMODE(st.st_mode) & 0o755)
        finally:
            os.close(sfd)
    finally:
        if owned:
            os.close(rfd)


def write_from_fd(root: str | Path | int, dst_rel: str, src: int, max_bytes: int, *,
                  mode: int = 0o644, make_parents: bool = False) -> None:
    """Write the content of fd src (sparse-aware, capped) to dst_rel beneath root: a temporary
    file beside it renamed over it, so dst is replaced whole (a link there is replaced, not
    followed). Parents must be real directories; make_parents creates missing ones."""
    _replace_at(root, dst_rel, lambda dfd: copy_fd_sparse(src, dfd, max_bytes, dst_rel), mode, make_parents)


def write_bytes(root: str | Path | int, dst_rel: str, data: bytes, *, mode: int = 0o644,
                make_parents: bool = False) -> None:
    """Replace dst_rel beneath root by `data`, as write_from_fd does (never an in-place write,
    never through a link)."""
    _replace_at(root, dst_rel, lambda dfd: _write_all(dfd, data), mode, make_parents)


def makedirs(root: str | Path | int, rel_dir: str) -> None:
    """Create the missing directories of rel_dir beneath root; UnsafePath if a component is a link
    or not a directory."""
    os.close(_makedirs(root, _parts(rel_dir)))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _replace_at(root: str | Path | int, dst_rel: str, fill, mode: int, make_parents: bool) -> None:
    """fill(fd) a new temporary file beside dst_rel, then rename it over dst_rel."""
    parts = _parts(dst_rel)
    if not parts:
        raise UnsafePath(f"{safe_name(dst_rel)!r} is not a file name: name the destination file")
    pfd = (_makedirs(root, parts[:-1]) if make_parents else
           open_beneath(root, "/".join(parts[:-1]), os.O_RDONLY | os.O_DIRECTORY))
    name = parts[-1]
    tmp = f".{name[:100]}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        dfd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600,
                      dir_fd=pfd)
        try:
            try:
                fill(dfd)
                os.fchmod(dfd, mode & 0o777)
            finally:
                os.close(dfd)
            os.rename(tmp, name, src_dir_fd=pfd, dst_dir_fd=pfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=pfd)
            except OSError:
                pass
            raise
    finally:
        os.close(pfd)


def _makedirs(root: str | Path | int, parts: list[str]) -> int:
    """An fd of directory root/parts..., creating missing components; no link is followed."""
    rfd, owned = _root_fd(root)
    fd = os.dup(rfd)
    if owned:
        os.close(rfd)
    try:
        for i, name in enumerate(parts):
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            try:
                nfd = os.open(name, _DIR, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    _explain(fd, name, "/".join(parts[:i + 1]), "/".join(parts), False)
                raise
            os.close(fd)
            fd = nfd
        return fd
    except BaseException:
        os.close(fd)
        raise


# --- walking ---
