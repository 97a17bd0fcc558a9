"""Who owns a workspace's files: hand it to the job's uid before a job, strip set-id bits after.

As root the sandbox runs every job as nobody (65534), never as uid 0, so that nothing a job
creates is root's on the host disk. Before each job the pool (in the submitting thread) lchowns
the workspace's directories and its writable regular files to nobody, so the job can write them;
the read-only paths (task data hard-linked from a store) and any file with other hard links are
left alone. After each job the supervisor clears setuid/setgid bits on whatever the job left (a
`chmod 6755` copy of a shell must not become a set-id program on the host; inside the sandbox
every mount is nosuid anyway). Both walks go through directory fds, never follow a symlink, and
stop after `limit` entries. The trusted side (root) still reads and writes everything.
Not a public API.
"""

from __future__ import annotations

import os
import stat

LIMIT = 100_000  # entries per walk; a job could create more, see the sandbox docstring
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _walk(root: str, skip: set[str], visit, limit: int) -> int:
    """Call visit(dir_fd, name, st) for root (dir_fd -1) and every entry below it, depth first,
    without following symlinks; skip the absolute paths in `skip`. Returns entries visited."""
    st = os.lstat(root)
    if not stat.S_ISDIR(st.st_mode):
        return 0
    visit(-1, root, st)
    count, stack = 1, [(os.open(root, _DIR_FLAGS), root)]
    try:
        while stack and count < limit:
            fd, path = stack.pop()
            try:
                names = os.listdir(fd)
                for name in names:
                    full = path + "/" + name
                    if full in skip:
                        continue
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                        visit(fd, name, st)
                        if stat.S_ISDIR(st.st_mode):
                            stack.append((os.open(name, _DIR_FLAGS, dir_fd=fd), full))
                    except OSError:
                        continue  # vanished or replaced meanwhile: never follow, just go on
                    count += 1
                    if count >= limit:
                        break
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)
    return count


def _setid(st: os.stat_result) -> bool:
    return bool(st.st_mode & (stat.S_ISUID | stat.S_ISGID)) and not stat.S_ISLNK(st.st_mode)


def _chmod(dir_fd: int, name: str, st: os.stat_result) -> None:
    mode = stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID)
    if dir_fd < 0:
        os.chmod(name, mode)
    else:
        os.chmod(name, mode, dir_fd=dir_fd)  # not a symlink (checked): no following


def give_to_job(workspace: str, uid: int, gid: int, readonly: list[str], limit: int = LIMIT) -> int:
    """lchown the workspace's directories and writable regular files to uid:gid (see the module
    docstring); set-id bits are cleared on the way. Returns the entries walked."""
    def visit(dir_fd: int, name: str, st: os.stat_result) -> None:
        mine = st.st_uid == uid and st.st_gid == gid
        wanted = stat.S_ISDIR(st.st_mode) or (stat.S_ISREG(st.st_mode) and st.st_nlink == 1
                                              and st.st_mode & stat.S_IWUSR)
        if wanted and not mine:
            if dir_fd < 0:
                os.chown(name, uid, gid, follow_symlinks=False)
            else:
                os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            st = os.stat(name, dir_fd=None if dir_fd < 0 else dir_fd, follow_symlinks=False)
        if _setid(st):
            _chmod(dir_fd, name, st)
    return _walk(workspace, set(readonly), visit, limit)


def strip_setid(workspace: str, readonly: list[str], limit: int = LIMIT) -> int:
    """Clear setuid/setgid bits below the workspace (after a job). Returns the entries walked."""
    def visit(dir_fd: int, name: str, st: os.stat_result) -> None:
        if _setid(st):
            _chmod(dir_fd, name, st)
    return _walk(workspace, set(readonly), visit, limit)
