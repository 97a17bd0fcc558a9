"""Build and load the C++ (OpenMP) CPU kernels in csrc/ on first use.

    from fastagent.kernels._cpp import load_cpp, try_load_cpp
    ext = load_cpp("logprob", ["logprob.cpp"])          # raises if the build fails
    ext = try_load_cpp("logprob", ["logprob.cpp"])      # None (and one warning) if it fails

Sources are file names in csrc/ (or absolute paths). Builds go to
`$FASTAGENT_CACHE/torch_extensions/<name>-<tag>` (default cache: ~/.cache/fastagent), where the tag
hashes the torch version, the Python version, this CPU's instruction-set flags (the code is built
with -march=native, so a home directory shared with an older CPU must not reuse the binary) and the
shared headers in csrc/ (common.h). The first build takes ~20 s; later loads are cached by torch
(it rebuilds when a source changes).
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

# csrc/ sits beside kernels/ in a checkout (editable install); a wheel ships it as fastagent/kernels/csrc.
CSRC = next((d for d in (Path(__file__).resolve().parent.parent / "csrc", Path(__file__).resolve().parent / "csrc")
             if d.is_dir()), Path(__file__).resolve().parent.parent / "csrc")
# -O3 and -march=native let GCC vectorize the row loops (`#pragma omp simd`); -fno-trapping-math
# lets it vectorize float->int conversions (measured: a 20x faster exp loop); -fno-math-errno lets
# it inline sqrt/log. No -ffast-math: the kernels rely on IEEE inf/nan behaviour.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", "-std=c++17"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType] = {}
_failed: dict[str, str] = {}


def cache_dir() -> Path:
    """Root of fastagent's build cache (FASTAGENT_CACHE or ~/.cache/fastagent)."""
    return Path(os.environ.get("FASTAGENT_CACHE", Path.home() / ".cache" / "fastagent"))


def cpu_flags() -> set[str] | None:
    """This CPU's instruction-set flags (/proc/cpuinfo), None where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return None
    return set(line.partition(":")[2].split())


def _build_tag() -> str:
    import torch

    known = cpu_flags()
    flags = " ".join(sorted(known)) if known is not None else platform.processor()
    # torch rebuilds when a listed source changes, not when a header it includes does: the headers'
    # contents are part of the key
    headers = "".join(h.read_text() for h in sorted(CSRC.glob("*.h")))
    key = f"{torch.__version__}|{sys.version_info[:2]}|{flags}|{headers}"
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def load_cpp(name: str, sources: list[str]) -> ModuleType:
    """Compile (once) and import the pybind11 extension `name` from `sources`; raises on failure."""
    if not sources:
        raise ValueError("load_cpp needs at least one source file")
    with _lock:
        if name in _loaded:
            return _loaded[name]
        from torch.utils.cpp_extension import load

        paths = [str(Path(s) if Path(s).is_absolute() else CSRC / s) for s in sources]
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise FileNotFoundError(f"C++ sources not found: {missing}")
        build_dir = cache_dir() / "torch_extensions" / f"{name}-{_build_tag()}"
        build_dir.mkdir(parents=True, exist_ok=True)
        module = load(name=f"fastagent_{name}", sources=paths, extra_cflags=CFLAGS,
                      extra_ldflags=LDFLAGS, build_directory=str(build_dir), verbose=False)
        _loaded[name] = module
        return module


def try_load_cpp(name: str, sources: list[str]) -> ModuleType | None:
    """load_cpp, but a failed build warns once per extension and returns None (callers fall back)."""
    if name in _failed:
        return None
    try:
        return load_cpp(name, sources)
    except Exception as exc:  # compiler missing, bad flags, ...: the torch reference still works
        _failed[name] = repr(exc)
        warnings.warn(f"fastagent: C++ kernel {name!r} could not be built ({exc!r:.300}); "
                      "falling back to the pure-torch reference", RuntimeWarning, stacklevel=2)
        return None
