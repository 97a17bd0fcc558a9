"""The actions of fastagent.env: what each MLAgentBench action does to a hostile workspace.

Used by fastagent/env.py (Env._begin calls ACT[name](env, pending, args)); not a public API. Every
agent-given path is checked here (relative, inside the workspace, not into read-only task data)
and every open goes through fastagent.safefs: no symlink is followed, only regular files are read,
every read is capped (the MAX_* constants below). An action fills pending.observation, sets
pending.changed (the workspace may differ: snapshot it) or pending.job (Execute Script: the
arguments of the sandbox run), and raises ActionError for what the agent asked wrongly
(reward kind invalid_action) or HelperError when the helper model fails (corner_case).
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Any

from fastagent import safefs
from fastagent.actions import MAX_INSPECT_LINES, Parsed, ParseError
from fastagent.safefs import UnsafePath, kind_of, safe_name

SUBMISSION = "submission.csv"
MAX_OBS_CHARS = 6000  # longest observation returned by one action (head and tail kept)
MAX_READ_CHARS = 12000  # most of a file sent to the helper model by Understand File
MAX_SCAN_BYTES = 1 << 20  # Inspect Script Lines reads at most this much of a file to find its lines
MAX_EDIT_BYTES = 1 << 20  # largest file the edit actions (and Undo) read and rewrite
MAX_COPY_BYTES = safefs.Caps().max_file_bytes  # largest file Copy File copies
MAX_SUBMISSION_BYTES = 64 << 20  # largest submission.csv that is scored
MAX_LIST_NAMES = 1000  # names shown by List Files (the rest are counted)


class ActionError(Exception):
    """The action failed because of what the agent asked for (reward kind invalid_action)."""


class HelperError(Exception):
    """The helper model failed: not the agent's fault (reward kind corner_case)."""


@dataclass
class Pending:
    """A step between its start (parse, act, submit) and its end (wait, score, snapshot)."""
    text: str
    t0: float
    parsed: Parsed | ParseError
    observation: str = ""
    kind: str = "no_score"
    reason: str = ""
    changed: bool = False
    job: dict[str, Any] | None = None  # Execute Script: the pool.submit arguments (trusted side)
    undo: dict[str, list[str | None]] = field(default_factory=dict)  # the undo stacks before the step
    future: Any = None  # concurrent.futures.Future of the script run
    script: str = ""
    timings: dict[str, float] = field(default_factory=dict)

def _cut(text: str, limit: int = MAX_OBS_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


MAX_DIFF_LINES = 2000  # difflib is superlinear: a changed region longer than this gets a summary
_HUNK = re.compile(r"@@ -(\d+)(,\d+)? \+(\d+)(,\d+)? @@")


def _diff(old: str, new: str, name: str) -> str:
    """A unified diff. Short files: difflib's own. Longer ones: of the changed region only, common
    leading and trailing lines cut first (linear time), so a one-line edit of a 1 MB file costs what
    the line does (the hunks may then align repeated lines differently from difflib's)."""
    a, b = old.splitlines(True), new.splitlines(True)
    if len(a) + len(b) <= MAX_DIFF_LINES:
        return _cut("".join(difflib.unified_diff(a, b, f"a/{name}", f"b/{name}"))) if a != b else "(no change)"
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
        suf += 1
    if a == b:
        return "(no change)"
    lo, keep = max(0, pre - 3), max(0, suf - 3)  # 3 lines of context, as unified_diff gives
    a_mid, b_mid = a[lo:len(a) - keep], b[lo:len(b) - keep]
    if len(a_mid) + len(b_mid) > MAX_DIFF_LINES:
        return (f"(diff not shown: lines {pre + 1}-{len(a) - suf} ({len(a) - pre - suf} lines) became "
                f"{len(b) - pre - suf} new lines, too many to show; Inspect Script Lines shows them)")
    out = []
    for line in difflib.unified_diff(a_mid, b_mid, f"a/{name}", f"b/{name}"):
        m = _HUNK.match(line)  # hunk line numbers are relative to the cut region: shift them back
        out.append(f"@@ -{int(m[1]) + lo}{m[2] or ''} +{int(m[3]) + lo}{m[4] or ''} @@{line[m.end():]}" if m else line)
    return _cut("".join(out))


def _extract_code(text: str) -> str:
    """The first fenced code block of a helper's answer, or the whole answer."""
    start = text.find("```")
    if start < 0:
        return text
    body_start = text.find("\n", start)
    end = text.find("```", body_start + 1) if body_start >= 0 else -1
    return text[body_start + 1:end] if end >= 0 else text[body_start + 1:]

def _rel(env, rel: str, what: str, write: bool = False) -> str:
    """The normalized workspace-relative form of an agent-given path; ActionError if it leaves
    the workspace (absolute, '..') or, for a write, names the workspace or read-only task data."""
    parts = [q for q in rel.strip().split("/") if q not in ("", ".")]
    if not rel.strip() or "\x00" in rel:
        raise ActionError(f"{what} is empty or invalid")
    if rel.strip().startswith("/") or ".." in parts:
        raise ActionError(f"{what} {safe_name(rel)!r} is outside the workspace: use a relative path "
                          f"inside it (no leading '/', no '..')")
    relp = "/".join(parts)
    if write and not relp:
        raise ActionError(f"{what} {safe_name(rel)!r} is a directory, not a file name")
    if write and any(relp == r or relp.startswith(r + "/") for r in env.store.readonly):
        raise ActionError(f"{what} {safe_name(rel)!r} is read-only (task data)")
    return relp


def _lstat(env, rel: str) -> os.stat_result | None:
    """lstat of rel in the workspace (never following a link on the way), None if missing."""
    parent, _, name = rel.rpartition("/")
    try:
        fd = safefs.open_beneath(env.ws, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        return os.stat(name, dir_fd=fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None
    finally:
        os.close(fd)


def _file(env, rel: str, what: str) -> str:
    """rel of an existing regular file (not a link, fifo, device, directory)."""
    relp = _rel(env, rel, what)
    st = _lstat(env, relp)
    if st is None:
        raise ActionError(f"{what} {safe_name(rel)!r} does not exist")
    if not stat.S_ISREG(st.st_mode):
        raise ActionError(f"{what} {safe_name(rel)!r} is {kind_of(st.st_mode)}, not a regular file")
    return relp


def _target(env, rel: str, what: str) -> tuple[str, bool]:
    """(rel of a file to write, whether it exists); ActionError for a directory, link or special."""
    relp = _rel(env, rel, what, write=True)
    st = _lstat(env, relp)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ActionError(f"{what} {safe_name(rel)!r} is {kind_of(st.st_mode)}, not a file name to write")
    return relp, st is not None


def _read_old(env, relp: str, exists: bool) -> bytes:
    """The content of a file an edit replaces (b"" if new); ActionError above MAX_EDIT_BYTES."""
    if not exists:
        return b""
    try:
        return safefs.read_bytes(env.ws, relp, MAX_EDIT_BYTES, allow_links=True)
    except UnsafePath as e:
        raise ActionError(f"{e} (edits take files of at most {MAX_EDIT_BYTES} bytes)") from None


def _write(env, relp: str, old: bytes, exists: bool, text: str) -> None:
    """Replace a file (new inode), remembering its old content for Undo Edit Script."""
    data = text.encode()  # fails (UnicodeError) before anything is written
    _replace(env, relp, data)
    env.st.undo.setdefault(relp, []).append(env.store.put_bytes(old) if exists else None)


def _replace(env, relp: str, data: bytes) -> None:
    """Write by replacing: a new file renamed over the old (its folders made if missing), never an
    in-place write, never through a link."""
    safefs.write_bytes(env.ws, relp, data, make_parents=True)


def _ask(env, prompt: str) -> str:
    try:
        return str(env.helper(prompt))
    except Exception as e:  # any helper failure (HTTP, model) is not the agent's fault
        raise HelperError(f"the helper model failed: {type(e).__name__}: {e}"[:500]) from None


# --- actions: each fills p.observation and sets p.changed / p.job; errors raise ActionError ---


def list_files(env, p: Pending, a: dict) -> None:
    relp = _rel(env, a["dir_path"] or ".", "dir_path")
    try:
        fd = safefs.open_beneath(env.ws, relp or ".", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        raise ActionError(f"dir_path {safe_name(a['dir_path'])!r} is not a directory") from None
    names, more = [], 0
    try:
        with os.scandir(fd) as it:  # names only: lstat-free, never following a link
            for e in it:
                if len(names) >= MAX_LIST_NAMES:
                    more += 1
                    if more >= 100_000:
                        break
                    continue
                kind = "/" if e.is_dir(follow_symlinks=False) else "" if e.is_file(follow_symlinks=False) \
                    else " [symbolic link]" if e.is_symlink() else " [not a regular file]"
                names.append(safe_name(e.name) + kind)
    finally:
        os.close(fd)
    tail = f"\n[... and {more}{'+' if more >= 100_000 else ''} more entries]" if more else ""
    p.observation = _cut("\n".join(sorted(names)) + tail or "(empty directory)")


def copy_file(env, p: Pending, a: dict) -> None:
    src = _file(env, a["source"], "source")
    dst, _ = _target(env, a["destination"], "destination")
    parent = dst.rpartition("/")[0]
    safefs.makedirs(env.ws, parent)  # make the destination's folders, as the edits do
    safefs.copy_file(env.ws, src, dst, MAX_COPY_BYTES)
    p.observation, p.changed = f"File {safe_name(src)} copied to {safe_name(dst)}.", True


def undo_edit_script(env, p: Pending, a: dict) -> None:
    relp, exists = _target(env, a["script_name"], "script_name")
    stack = env.st.undo.get(relp)
    if not stack:
        raise ActionError(f"there is no edit of {safe_name(a['script_name'])!r} to undo")
    old = stack[-1]
    if old is None:  # the edit created the file
        if exists:
            parent = relp.rpartition("/")[0]
            fd = safefs.open_beneath(env.ws, parent or ".", os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.unlink(relp.rpartition("/")[2], dir_fd=fd)
            finally:
                os.close(fd)
        p.observation = f"Undid the edit: {safe_name(relp)} did not exist before it and is removed."
    else:
        data = env.store.get_bytes(old)  # at most MAX_EDIT_BYTES: an edit read it with that cap
        _replace(env, relp, data)
        p.observation = _cut(f"Undid the last edit. Content of {safe_name(relp)} now:\n"
                             f"{data.decode('utf-8', 'replace')}")
    stack.pop()
    p.changed = True


def execute_script(env, p: Pending, a: dict) -> None:
    rel = _file(env, a["script_name"], "script_name")
    if not rel.endswith(".py"):
        raise ActionError(f"script_name {safe_name(a['script_name'])!r} is not a python script (.py)")
    ro = [env.ws / r for r in env.store.readonly if _lstat(env, r) is not None]
    p.script, p.changed = rel, True
    p.job = dict(workspace=env.ws, script=rel, args=[], readonly=ro)


def final_answer(env, p: Pending, a: dict) -> None:
    p.observation = "The episode has ended."


def understand_file(env, p: Pending, a: dict) -> None:
    rel = _file(env, a["file_name"], "file_name")
    head, longer = safefs.read_head(env.ws, rel, 4 * MAX_READ_CHARS, allow_links=True)
    text = head.decode("utf-8", "replace")
    longer = longer or len(text) > MAX_READ_CHARS
    note = f"\n[only the first {MAX_READ_CHARS} characters shown]" if longer else ""
    prompt = (f"Read this file, {safe_name(rel)}:\n```\n{text[:MAX_READ_CHARS]}\n```{note}\n\n"
              f"Then describe the following, citing line content where useful, and say plainly when "
              f"something is not in the file: {a['things_to_look_for']}")
    p.observation = _cut(_ask(env, prompt))


def inspect_script_lines(env, p: Pending, a: dict) -> None:
    rel = _file(env, a["script_name"], "script_name")
    start, end = a["start_line_number"], a["end_line_number"]
    if start < 1 or end < start:
        raise ActionError(f"need 1 <= start_line_number <= end_line_number, got {start} and {end}")
    if end - start + 1 > MAX_INSPECT_LINES:
        raise ActionError(f"at most {MAX_INSPECT_LINES} lines at a time; asked for {end - start + 1}")
    head, longer = safefs.read_head(env.ws, rel, MAX_SCAN_BYTES, allow_links=True)
    lines = head.decode("utf-8", "replace").splitlines()
    if longer:  # the last line may be cut: only lines before it are known whole
        lines = lines[:-1]
        if end > len(lines):
            raise ActionError(f"{safe_name(rel)} is too large to scan to line {end}: its first "
                              f"{MAX_SCAN_BYTES} bytes hold {len(lines)} whole lines")
    if start > max(len(lines), 1):
        raise ActionError(f"{safe_name(rel)} has only {len(lines)} lines")
    count = f"more than {len(lines)}" if longer else str(len(lines))
    shown = "\n".join(f"{i:4d} | {lines[i - 1]}" for i in range(start, min(end, len(lines)) + 1))
    p.observation = _cut(f"Lines {start}-{min(end, len(lines))} of {safe_name(rel)} ({count} lines):\n{shown}")


def edit_script_ai(env, p: Pending, a: dict) -> None:
    src, src_exists = _target(env, a["script_name"], "script_name")
    dst, dst_exists = _target(env, a["save_name"], "save_name")
    src_bytes = _read_old(env, src, src_exists)
    old = src_bytes.decode("utf-8", "replace")
    base_bytes = src_bytes if dst == src else _read_old(env, dst, dst_exists)
    prompt = (f"Here is a python script, {safe_name(src)}:\n```python\n{old}\n```\n\n"
              f"Rewrite it following this instruction, and change nothing else:\n{a['edit_instruction']}\n\n"
              f"Answer with the complete new script in one ```python code block.")
    new = _extract_code(_ask(env, prompt))
    _write(env, dst, base_bytes, dst_exists, new)
    p.observation, p.changed = (f"Saved {safe_name(dst)}. Diff:\n"
                                f"{_diff(base_bytes.decode('utf-8', 'replace'), new, safe_name(dst))}"), True


def edit_script_segment(env, p: Pending, a: dict) -> None:
    src, src_exists = _target(env, a["script_name"], "script_name")
    dst, dst_exists = _target(env, a.get("save_name") or a["script_name"], "save_name")
    src_bytes = _read_old(env, src, src_exists)
    lines = src_bytes.decode("utf-8", "replace").splitlines(True)
    start, end = a["start_line_number"], a["end_line_number"]
    if not (1 <= start <= len(lines) + 1 and start - 1 <= end <= len(lines)):
        raise ActionError(f"lines {start}-{end} are not a valid range of {safe_name(src)} ({len(lines)} "
                          f"lines): need 1 <= start <= {len(lines) + 1} and start-1 <= end <= {len(lines)}")
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    seg = a["new_content"]
    if seg and not seg.endswith("\n"):
        seg += "\n"
    new = "".join(lines[:start - 1]) + seg + "".join(lines[end:])
    base_bytes = src_bytes if dst == src else _read_old(env, dst, dst_exists)
    _write(env, dst, base_bytes, dst_exists, new)
    p.observation, p.changed = (f"Saved {safe_name(dst)}. Diff:\n"
                                f"{_diff(base_bytes.decode('utf-8', 'replace'), new, safe_name(dst))}"), True

# Action name -> its implementation: fn(env, pending, checked arguments).
ACT = {
    "List Files": list_files,
    "Copy File": copy_file,
    "Undo Edit Script": undo_edit_script,
    "Execute Script": execute_script,
    "Final Answer": final_answer,
    "Understand File": understand_file,
    "Inspect Script Lines": inspect_script_lines,
    "Edit Script (AI)": edit_script_ai,
    "Edit Script Segment": edit_script_segment,
}
