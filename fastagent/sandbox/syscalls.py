"""Thin ctypes wrappers over the Linux calls the sandbox needs and Python 3.11 lacks.

Namespaces (unshare), mounts (mount, umount2, pivot_root, and the new mount API: open_tree,
move_mount, mount_setattr), capabilities (capset, bounding set, securebits), prctl, Landlock and a
seccomp filter. Every wrapper raises OSError with the errno on failure. Used by
fastagent/sandbox/zygote.py and fastagent/sandbox/child.py; not a public API.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_L = ctypes.c_long

# clone/unshare flags
NEWNS, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET = (0x20000, 0x4000000, 0x8000000, 0x10000000,
                                                   0x20000000, 0x40000000)
# mount(2) flags
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
MNT_DETACH = 2
# new mount API
OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH = 4
ATTR_RDONLY, ATTR_NOSUID, ATTR_NODEV, ATTR_NOEXEC, ATTR_IDMAP = 1, 2, 4, 8, 0x100000
# prctl
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_KEEPCAPS, PR_CAPBSET_DROP = 1, 4, 8, 24
PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT = 28, 38, 36, 47
PR_SET_SECCOMP, PR_CAP_AMBIENT_CLEAR_ALL = 22, 4
# securebits: root gets no special treatment and that cannot be undone
SECBITS_LOCKED_NOROOT = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20

_NR = {  # syscalls without a glibc wrapper on older systems; the new ones share numbers across arches
    "open_tree": 428, "move_mount": 429, "mount_setattr": 442,
    "landlock_create_ruleset": 444, "landlock_add_rule": 445, "landlock_restrict_self": 446,
}


def _err(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


def _check(ret: int, what: str) -> int:
    if ret < 0:
        raise _err(what)
    return ret


def _syscall(name: str, *args) -> int:
    conv = [_L(a) if isinstance(a, int) else a for a in args]
    return _check(_libc.syscall(_L(_NR[name]), *conv), name)


def _b(path) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(src, target, fstype=None, flags: int = 0, data: str | None = None) -> None:
    ret = _libc.mount(_b(src), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data))
    _check(ret, f"mount {fstype or ''} {src} on {target}")


def umount2(target, flags: int = 0) -> None:
    _check(_libc.umount2(_b(target), ctypes.c_int(flags)), f"umount {target}")


def pivot_root(new_root, put_old) -> None:
    _check(_libc.pivot_root(_b(new_root), _b(put_old)), "pivot_root")


def open_tree(path, flags: int = OPEN_TREE_CLONE | AT_RECURSIVE) -> int:
    """A detached copy of the mount tree at path (close the fd to drop it)."""
    return _syscall("open_tree", AT_FDCWD, _b(path), flags | os.O_CLOEXEC)


def move_mount(fd: int, target) -> None:
    """Attach a detached tree from open_tree at target."""
    _syscall("move_mount", fd, b"", AT_FDCWD, _b(target), MOVE_MOUNT_F_EMPTY_PATH)


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path_or_fd, attr_set: int, attr_clr: int = 0, recursive: bool = True,
                  userns_fd: int = 0) -> None:
    """Set mount attributes (read-only, nosuid, idmap...) on a path or a detached tree fd."""
    attr = _MountAttr(attr_set, attr_clr, 0, userns_fd)
    flags = AT_RECURSIVE if recursive else 0
    if isinstance(path_or_fd, int):
        dfd, path, flags = path_or_fd, b"", flags | AT_EMPTY_PATH
    else:
        dfd, path = AT_FDCWD, _b(path_or_fd)
    _syscall("mount_setattr", dfd, path, flags, ctypes.byref(attr), ctypes.sizeof(attr))


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(_libc.prctl(ctypes.c_int(option), _L(arg2), _L(arg3), _L(0), _L(0)), f"prctl {option}")


def set_pdeathsig(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capset(effective: int, permitted: int) -> None:
    hdr = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    data = (_CapData * 2)()
    for i in range(2):
        data[i].effective = (effective >> (32 * i)) & 0xFFFFFFFF
        data[i].permitted = (permitted >> (32 * i)) & 0xFFFFFFFF
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def _read_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


_LAST_CAP = _read_last_cap()  # read once in the zygote: jobs may not see this file


def last_cap() -> int:
    return _LAST_CAP


def raise_all_caps() -> None:
    """Make every permitted capability effective (after setresuid with PR_SET_KEEPCAPS)."""
    full = (1 << (last_cap() + 1)) - 1
    _capset(full, full)


def drop_all_caps() -> None:
    """Empty the bounding, ambient, effective and permitted sets, and make uid 0 ordinary for good,
    so neither this process nor anything it execs can hold a capability again."""
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    prctl(PR_SET_SECUREBITS, SECBITS_LOCKED_NOROOT)
    for cap in range(last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap)
    _capset(0, 0)
    prctl(PR_SET_NO_NEW_PRIVS, 1)


def collapse_huge_pages() -> int:
    """Back the big anonymous regions (heap, arenas) with 2 MiB pages (MADV_HUGEPAGE, then
    MADV_COLLAPSE, Linux >= 6.1). fork() then copies one page-table entry per 2 MiB instead of 512,
    which makes forking the preloaded zygote about 3x cheaper; children split a huge page only
    where they write. Returns the bytes collapsed (0 where the kernel cannot)."""
    madvise = _libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    huge, done = 2 << 20, 0
    with open("/proc/self/maps") as f:
        regions = [line.split() for line in f]
    for parts in regions:
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if not parts[1].startswith("rw") or (len(parts) > 5 and parts[5] != "[heap]"):
            continue
        start, end = -(-lo // huge) * huge, hi // huge * huge
        if end - start >= huge:
            madvise(start, end - start, 14)  # MADV_HUGEPAGE
            if madvise(start, end - start, 25) == 0:  # MADV_COLLAPSE
                done += end - start
    return done


# ---------------------------------------------------------------- Landlock (fallback layer)

LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_REMOVE_DIR, LL_REMOVE_FILE, LL_MAKE_CHAR, LL_MAKE_DIR, LL_MAKE_REG = 16, 32, 64, 128, 256
LL_MAKE_SOCK, LL_MAKE_FIFO, LL_MAKE_BLOCK, LL_MAKE_SYM, LL_REFER, LL_TRUNCATE = (
    512, 1024, 2048, 4096, 8192, 16384)
LL_IOCTL_DEV = 32768
LL_NET_BIND_TCP, LL_NET_CONNECT_TCP = 1, 2
LL_SCOPE_ABSTRACT_UNIX, LL_SCOPE_SIGNAL = 1, 2
LL_READ = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR


def landlock_abi() -> int:
    """Landlock ABI version of the running kernel, 0 when Landlock is unavailable."""
    try:
        return _syscall("landlock_create_ruleset", None, 0, 1)  # LANDLOCK_CREATE_RULESET_VERSION
    except OSError:
        return 0


def landlock_fs_rights(abi: int) -> int:
    """Every filesystem right this ABI knows (the ruleset handles them all: denied unless granted)."""
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= LL_REFER
    if abi >= 3:
        rights |= LL_TRUNCATE
    if abi >= 5:
        rights |= LL_IOCTL_DEV
    return rights


def landlock_restrict(rules: list[tuple[str, str]], abi: int) -> None:
    """Confine this process and its future children to `rules`, each (path, "read" | "write" |
    "list"): read-only below the path, full access below it, or listing that directory (and those
    below) only; nothing elsewhere. Also no TCP (ABI >= 4), and no signals or abstract unix sockets
    leaving the domain (ABI >= 6)."""
    handled = landlock_fs_rights(abi)
    net = (LL_NET_BIND_TCP | LL_NET_CONNECT_TCP) if abi >= 4 else 0
    scoped = (LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL) if abi >= 6 else 0
    size = 8 if abi < 4 else (16 if abi < 6 else 24)
    buf = ctypes.create_string_buffer(struct.pack("QQQ", handled, net, scoped)[:size], size)
    ruleset = _syscall("landlock_create_ruleset", buf, size, 0)
    file_rights = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | (LL_TRUNCATE if abi >= 3 else 0) | (
        LL_IOCTL_DEV if abi >= 5 else 0)
    access = {"read": LL_READ, "write": handled, "list": LL_READ_DIR}
    try:
        for path, kind in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                allowed = access[kind] if os.path.isdir(path) else access[kind] & file_rights
                rule = struct.pack("=Qi", allowed & handled, fd)  # landlock_path_beneath_attr (packed)
                if allowed:
                    _syscall("landlock_add_rule", ruleset, 1, ctypes.create_string_buffer(rule, 12), 0)
            finally:
                os.close(fd)
        prctl(PR_SET_NO_NEW_PRIVS, 1)
        _syscall("landlock_restrict_self", ruleset, 0)
    finally:
        os.close(ruleset)


# ---------------------------------------------------------------- seccomp (fallback network block)

def _bpf(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("HBBI", code, jt, jf, k & 0xFFFFFFFF)


_AUDIT_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # (arch id, socket nr)


def seccomp_deny_inet() -> bool:
    """Make socket() fail with EACCES for every family but AF_UNIX (1), so no IP, netlink or
    packet socket can be opened; io_uring (which can open sockets itself) and x32 calls are refused
    too. Returns False on an architecture this filter does not know."""
    arch = _AUDIT_ARCH.get(platform.machine())
    if arch is None:
        return False
    audit_arch, nr_socket = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    allow, kill, deny = 0x7FFF0000, 0x80000000, 0x00050000 | 13  # SECCOMP_RET_ERRNO | EACCES
    prog = b"".join([
        _bpf(ld, 4), _bpf(jeq, audit_arch, 1, 0), _bpf(ret, kill),  # 0-2: foreign arch: kill
        _bpf(ld, 0), _bpf(jge, 0x40000000, 4, 0),  # 3-4: x32 calls: deny
        _bpf(jeq, 425, 3, 0),  # 5: io_uring_setup: deny
        _bpf(jeq, nr_socket, 0, 3),  # 6: not socket(): allow
        _bpf(ld, 16), _bpf(jeq, 1, 1, 0),  # 7-8: socket(AF_UNIX, ...): allow
        _bpf(ret, deny), _bpf(ret, allow)])  # 9, 10
    n = len(prog) // 8
    buf = ctypes.create_string_buffer(prog, len(prog))

    class _Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = _Fprog(n, ctypes.addressof(buf))
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(_libc.prctl(ctypes.c_int(PR_SET_SECCOMP), _L(2), ctypes.byref(fprog), _L(0), _L(0)),
           "seccomp")
    return True
