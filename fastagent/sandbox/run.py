"""Run agent Python code in the warm, forked interpreter exactly as `python` would.

`python script.py ARGS`, `python -c CODE` and `python -m MOD` run as __main__ with sys.argv set,
fresh stdio, default signal handlers, numpy reseeded from the OS, the traceback `python` prints
(without the runner's frames) and the same exit codes; at the end non-daemon threads are joined and
the job's own atexit hooks and finalizers run. sys.stdout and sys.stderr write framed records into
one "mux" pipe, so the supervisor can merge them in exact order and still keep them apart (see
mux_write). The job can write anything into that pipe: the supervisor takes it as output only
(never as status) and stops unframing at the first malformed frame. Used by fastagent/sandbox/child.py inside the sandbox; not a public API.
"""

from __future__ import annotations

import atexit
import builtins
import importlib.machinery
import io
import os
import runpy
import signal
import struct
import sys
import threading
import traceback
import types
import weakref

# The mux pipe carries framed writes (tag, length, data) from the job's sys.stdout and sys.stderr,
# so their relative order survives; raw writes to fds 1 and 2 (C code, subprocesses) go through two
# plain pipes and are merged by arrival. A frame never holds more than FRAME_DATA bytes.
MUX_OUT, MUX_ERR = 1, 2
FRAME = struct.Struct("!BI")
FRAME_DATA = 4096 - FRAME.size  # a frame fits in PIPE_BUF, so each write is atomic
_CHILD_FILE = os.path.join(os.path.dirname(__file__), "child.py")


def mux_write(fd: int, tag: int, data: bytes) -> None:
    for i in range(0, len(data), FRAME_DATA):
        chunk = data[i:i + FRAME_DATA]
        os.write(fd, FRAME.pack(tag, len(chunk)) + chunk)


class _MuxRaw(io.RawIOBase):
    """sys.stdout / sys.stderr of a Python job: frames into the mux pipe; fileno() is the real fd."""

    def __init__(self, mux_fd: int, tag: int, fd: int):
        super().__init__()
        self.mux_fd, self.tag, self.fd = mux_fd, tag, fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        mux_write(self.mux_fd, self.tag, bytes(data))
        return len(data)


def python_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """Parse `python [-u] [-B] (-c CODE | -m MOD | SCRIPT) ARGS...` into (kind, target, argv[0]
    and args) for running in this warm interpreter; None for anything else (exec'd instead)."""
    if not argv or argv[0] not in ("python", "python3", sys.executable):
        return None
    rest = argv[1:]
    while rest and rest[0] in ("-u", "-B"):
        rest = rest[1:]
    if not rest:
        return None
    if rest[0] == "-c" and len(rest) > 1:
        return "code", rest[1], ["-c", *rest[2:]]
    if rest[0] == "-m" and len(rest) > 1:
        return "module", rest[1], [rest[1], *rest[2:]]
    if rest[0].startswith("-"):
        return None
    return "script", rest[0], rest


def reset_interpreter(spec: dict, plan: dict, argv0_args: list[str], kind: str, target: str,
                       mux_fd: int) -> None:
    """Make the forked interpreter look like a fresh `python ...` to the job's code."""
    os.environ.clear()
    os.environ.update(spec["env"])  # the supervisor merged the plan's base environment in
    unbuffered = "-u" in spec["argv"][1:3]
    def stream(raw, **kw) -> io.TextIOWrapper:
        buffered = io.BufferedReader(raw) if raw.readable() else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffered, encoding="utf-8", **kw)

    sys.stdin = sys.__stdin__ = stream(io.FileIO(0, "r", closefd=False))
    sys.stdout = sys.__stdout__ = stream(_MuxRaw(mux_fd, MUX_OUT, 1), write_through=unbuffered)
    sys.stderr = sys.__stderr__ = stream(_MuxRaw(mux_fd, MUX_ERR, 2), errors="backslashreplace",
                                         line_buffering=True)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.argv = argv0_args
    path = [p for p in sys.path[1:] if p not in plan["strip_sys_path"]]
    first = os.path.dirname(os.path.abspath(target)) if kind == "script" else os.getcwd()
    sys.path[:] = [first, *path]
    sys.dont_write_bytecode = True  # keep __pycache__ out of the workspace
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy from the OS; a fork would repeat the zygote's
        sys.modules["numpy"].random.seed()
    _reset_exit_hooks()


def _reset_exit_hooks() -> None:
    """Keep only the exit hooks that matter to the job's own code. The preloads registered ~130
    weakref finalizers (torch op libraries) whose teardown costs ~70 ms of pure in-memory cleanup
    that nobody outside this process can observe; the job's own finalizers and hooks still run."""
    atexit._clear()
    for name, attr in (("logging", "shutdown"), ("multiprocessing.util", "_exit_function")):
        if name in sys.modules:
            atexit.register(getattr(sys.modules[name], attr))
    for info in weakref.finalize._registry.values():
        info.atexit = False
    weakref.finalize._registered_with_atexit = False


def _print_exception(exc: BaseException) -> None:
    """Print the traceback the way `python script.py` would, without the runner's own frames."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename in (__file__, runpy.__file__, "<frozen runpy>", _CHILD_FILE):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def _run_script(path: str) -> None:
    """Run a file as `python path` does: a fresh __main__ module, sys.argv[0] left as given."""
    if not os.path.isfile(path):  # a directory or zip with __main__.py
        runpy.run_path(path, run_name="__main__")
        return
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __builtins__=builtins, __cached__=None, __spec__=None,
                         __loader__=importlib.machinery.SourceFileLoader("__main__", path))
    sys.modules["__main__"] = main
    exec(code, main.__dict__)


def run_python(kind: str, target: str) -> int:
    """Run the job's Python code as __main__; return the exit code `python` would have."""
    code = 0
    try:
        if kind == "script":
            if not os.path.exists(target):
                print(f"{sys.executable}: can't open file {os.path.abspath(target)!r}: "
                      f"[Errno 2] No such file or directory", file=sys.stderr)
                return 2
            _run_script(os.path.abspath(target))
        elif kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            main = types.ModuleType("__main__")
            main.__builtins__ = builtins
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except BaseException as e:  # noqa: BLE001 - anything the job raises ends it like `python` does
        _print_exception(e)
        code = 1
    return code


def finish_python(code: int) -> None:
    """Interpreter shutdown as `python` does it: join threads, run atexit hooks, flush, exit."""
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a failing hook does not change the exit code
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken stream must not block the exit
            pass
    os._exit(code & 0xFF)
