"""Trusted-side access to hostile directory trees (agent workspaces): no link is ever followed.

Every byte, name and inode in a workspace is hostile: the agent's code wrote it, and the trusted
side (root, outside the sandbox) reads it afterwards to snapshot, show and score it. Use these
functions instead of open()/Path.read_bytes()/shutil on anything under a workspace:

    fd = open_beneath(ws, "sub/train.py")          # O_RDONLY fd, or UnsafePath / FileNotFoundError
    text = read_text(ws, "train.py", 1 << 20)      # regular file, <= 1 MiB, valid UTF-8
    sha = copy_out(ws, "submission.csv", dest, 64 << 20)  # trusted copy + sha256 of exactly it
    files, empty_dirs, rejected = walk(ws, Caps())  # bounded, iterative, never follows links
    changed = sanitize(ws)                          # drop links/fifos/devices, strip setuid bits
    remove_tree(ws)                                 # always succeeds, whatever the job left

What is guaranteed (Linux; the fd-based parts also on other POSIX systems):
  - No symlink is followed, anywhere in a path: openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
    RESOLVE_NO_MAGICLINKS) (syscall 437, via ctypes, Linux >= 5.6), else a per-component openat walk
    with O_NOFOLLOW. A path never leaves its root: "..", absolute paths and NUL are refused before
    any syscall. The root itself is trusted and may be reached through links.
  - Only regular files are read: the type is checked on an O_PATH fd before the real open (so a
    fifo never blocks and a device is never opened) and again with fstat after it. Reads stop at
    max_bytes + 1 whatever st_size says; st_size is only used to refuse early.
  - walk/sanitize/remove_tree are iterative over directory fds (no recursion, no path re-resolution
    through links), bounded by Caps (walk, sanitize) and fine with 100,000 levels (remove_tree).
  - Names: relpaths are os.fsdecode'd (surrogateescape), so an undecodable name such as
    b"\\xff\\xfe.csv" round-trips through walk -> open_beneath; safe_name() turns one into valid
    UTF-8 for observations (replacement characters, control characters escaped).
  - UnsafePath messages name the workspace-relative path (through safe_name) and say what to do;
    they never contain host paths.

What is not guaranteed:
  - A process still writing the tree while we read it can change a file between two reads; each
    function reads one fd once (copy_out hashes exactly what it wrote), but walk's stat results
    may be stale. Run these after the job's processes are gone (the sandbox kills them).
  - Between the O_PATH type check and the real open an entry can be swapped for a device node by a
    concurrent process holding CAP_MKNOD; the open then uses O_NONBLOCK|O_NOCTTY and the fstat
    check refuses it, but a driver's open() side effect could happen. The sandbox denies mknod.
  - Immutable/append-only inode flags (chattr +i, needs CAP_LINUX_IMMUTABLE) are not cleared.
  - Hard links are not links to follow: a hard link is the file. read_bytes refuses st_nlink > 1
    by default (a link to a file the agent should not see cannot be told apart from the file);
    pass allow_links=True for files the trusted side itself linked (read-only task data).
"""

from fastagent.safefs.files import (Caps, UnsafePath, copy_fd_sparse, copy_file, copy_out, kind_of, makedirs, open_beneath,
                                    open_regular, read_bytes, read_head, read_text, safe_name, write_bytes,
                                    write_from_fd)
from fastagent.safefs.tree import remove_tree, sanitize, walk

__all__ = ["Caps", "UnsafePath", "copy_fd_sparse", "copy_file", "copy_out", "kind_of", "open_beneath", "open_regular",
           "makedirs", "read_bytes", "read_head", "read_text", "remove_tree", "safe_name", "sanitize", "walk",
           "write_bytes", "write_from_fd"]
