"""fastagent.safefs.tree: whole-tree operations on hostile trees: walk, sanitize, remove_tree.

Iterative over directory fds (no recursion, no path re-resolution through links); walk and
sanitize are bounded by Caps, remove_tree copes with any depth or width, mode-000 folders and
undecodable names. Import them from fastagent.safefs (see its docstring).
"""

from __future__ import annotations

import errno
import os
import stat
import uuid
from pathlib import Path

from fastagent.safefs.files import (_CLOEXEC, _DIR, _O_PATH, Caps, UnsafePath, _root_fd, _too_big, open_beneath,
                                    safe_name)


def _bounded(rfd: int, caps: Caps):
    """Every entry under directory fd rfd, depth first, never following a link: yields (fd of its
    directory, entry, relpath, lstat), then (fd, None, relpath, None) once a directory is done
    with the number of entries it had in place of the entry. Directories are descended after they
    are yielded. UnsafePath as soon as the entry count or the depth passes its cap."""
    count, stack = 0, [("", 0)]
    while stack:
        rel, depth = stack.pop()
        fd = open_beneath(rfd, rel, os.O_RDONLY | os.O_DIRECTORY) if rel else os.dup(rfd)
        n = 0
        try:
            with os.scandir(fd) as it:  # read lazily: a cap stops a huge directory early
                for e in it:
                    n += 1
                    count += 1
                    if count > caps.max_files:
                        raise UnsafePath(f"the workspace has more than {caps.max_files} files and "
                                         f"directories: delete some")
                    sub = f"{rel}/{e.name}" if rel else e.name
                    st = e.stat(follow_symlinks=False)
                    if stat.S_ISDIR(st.st_mode):
                        if depth + 1 > caps.max_depth:
                            raise UnsafePath(f"{safe_name(sub)!r} is nested more than "
                                             f"{caps.max_depth} directories deep: flatten it")
                        stack.append((sub, depth + 1))
                    yield fd, e, sub, st
            yield fd, None, rel, n
        finally:
            os.close(fd)


def walk(root: str | Path | int, caps: Caps = Caps()) -> tuple[list[tuple[str, os.stat_result]], list[str], list[str]]:
    """(regular files with their lstat, empty dirs, rejected entries: symlinks, fifos, sockets,
    devices), as relpaths under root, never following a link. Iterative over directory fds;
    UnsafePath as soon as a cap is passed (entry count, depth, total bytes, one file's size)."""
    files, empty, rejected = [], [], []
    rfd, owned = _root_fd(root)
    total = 0
    entries = _bounded(rfd, caps)
    try:
        for _, e, sub, st in entries:
            if e is None:  # a directory done: st is its entry count
                if st == 0 and sub:
                    empty.append(sub)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size > caps.max_file_bytes:
                    raise _too_big(sub, caps.max_file_bytes)
                total += st.st_size
                if total > caps.max_total_bytes:
                    raise UnsafePath(f"the workspace holds more than {caps.max_total_bytes}"
                                     f" bytes of files: delete some")
                files.append((sub, st))
            elif not stat.S_ISDIR(st.st_mode):
                rejected.append(sub)
    finally:
        entries.close()  # closes the directory fds it holds, also on a raise
        if owned:
            os.close(rfd)
    return files, empty, rejected


def sanitize(root: str | Path | int, caps: Caps = Caps()) -> list[str]:
    """Make a tree safe to keep: remove every entry that is not a regular file or directory
    (symlinks, fifos, sockets, devices) and strip setuid/setgid/sticky bits, never following a
    link; returns the relpaths removed or changed. UnsafePath beyond caps (entry count, depth)."""
    changed: list[str] = []
    rfd, owned = _root_fd(root)
    entries = _bounded(rfd, caps)
    try:
        _strip_bits(rfd, os.fstat(rfd), "", changed)
        for fd, e, sub, st in entries:
            if e is None:
                continue
            if stat.S_ISDIR(st.st_mode):
                _strip_at(fd, e.name, st, sub, changed, os.O_DIRECTORY)
            elif stat.S_ISREG(st.st_mode):
                _strip_at(fd, e.name, st, sub, changed, 0)
            else:
                os.unlink(e.name, dir_fd=fd)  # unlink never follows a link
                changed.append(sub)
    finally:
        entries.close()
        if owned:
            os.close(rfd)
    return changed


def _strip_at(dirfd: int, name: str, st: os.stat_result, rel: str, changed: list[str], kind: int) -> None:
    if not st.st_mode & 0o7000:
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | kind | _CLOEXEC,
                 dir_fd=dirfd)
    try:
        _strip_bits(fd, os.fstat(fd), rel, changed)
    finally:
        os.close(fd)


def _strip_bits(fd: int, st: os.stat_result, rel: str, changed: list[str]) -> None:
    if st.st_mode & 0o7000 and (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        os.fchmod(fd, stat.S_IMODE(st.st_mode) & 0o777)
        changed.append(rel or ".")


# --- removing ---

_MAX_FDS = 32  # directory fds held open at once by remove_tree; deeper subtrees are moved up


def remove_tree(path: str | Path) -> None:
    """Delete path and everything under it, never following a link: copes with any depth (deep
    subtrees are renamed up to the top level), any width, directories made unreadable or
    unwritable (their mode is restored first) and undecodable names. A missing path is fine."""
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    try:
        pfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except FileNotFoundError:
        return
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(name, dir_fd=pfd)
            return
        rfd = _open_dir_fixing(pfd, name)
        try:
            _empty_tree(rfd)
        finally:
            os.close(rfd)
        os.rmdir(name, dir_fd=pfd)
    finally:
        os.close(pfd)


def _open_dir_fixing(dirfd: int, name: str) -> int:
    """Open directory `name` (no link followed) and make it rwx for us, whatever its mode."""
    try:
        fd = os.open(name, _DIR, dir_fd=dirfd)
    except PermissionError:  # not root and mode 000: chmod through an O_PATH fd, then retry
        pfd = os.open(name, _O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC, dir_fd=dirfd)
        try:
            os.chmod(f"/proc/self/fd/{pfd}", 0o700)
        finally:
            os.close(pfd)
        fd = os.open(name, _DIR, dir_fd=dirfd)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o700 != 0o700:
        os.fchmod(fd, 0o700)
    return fd


def _scan_unlinking(fd: int) -> list[str]:
    """Unlink every non-directory in dir fd; return the names of its subdirectories."""
    subdirs = []
    with os.scandir(fd) as it:
        for e in it:
            if e.is_dir(follow_symlinks=False):
                subdirs.append(e.name)
            else:
                try:
                    os.unlink(e.name, dir_fd=fd)
                except FileNotFoundError:
                    pass
    return subdirs


def _empty_tree(rfd: int) -> None:
    """Delete everything in directory rfd, holding at most _MAX_FDS directory fds."""
    jobs = [None]  # None: rfd itself; else a directory moved up into rfd under that name
    while jobs:
        top = jobs.pop()
        fd0 = os.dup(rfd) if top is None else _open_dir_fixing(rfd, top)
        stack = [(fd0, top, _scan_unlinking(fd0))]  # (fd, its name in the parent, subdirs left)
        while stack:
            fd, name, subdirs = stack[-1]
            if subdirs:
                sub = subdirs.pop()
                if len(stack) >= _MAX_FDS:  # too deep: move it up and continue it later
                    moved = f".rm-{uuid.uuid4().hex}"
                    os.rename(sub, moved, src_dir_fd=fd, dst_dir_fd=rfd)
                    jobs.append(moved)
                    continue
                cfd = _open_dir_fixing(fd, sub)
                stack.append((cfd, sub, _scan_unlinking(cfd)))
                continue
            stack.pop()
            if name is None:  # rfd itself: the caller removes it
                os.close(fd)
                continue
            os.close(fd)  # before rmdir: a last close of a removed dir is slow (~2 ms on ext4)
            parent = stack[-1][0] if stack else rfd
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                cfd = _open_dir_fixing(parent, name)  # something appeared: go again
                stack.append((cfd, name, _scan_unlinking(cfd)))
