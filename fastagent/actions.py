"""The agent's action space, the response parser and the MLAgentBench-style prompt builder.

    from fastagent.actions import parse_response, build_messages, ParseError
    parsed = parse_response(llm_text)            # never raises on any text: ParseError or Parsed
    if isinstance(parsed, ParseError): print(parsed.message)   # the observation the agent sees
    msgs = build_messages(task_description, history, k=3)      # [{"role": ..., "content": ...}]

Action names and JSON argument names match MLAgentBench's defaults, plus "Edit Script Segment",
an edit whose new lines the policy writes itself (no second model needed).

Response format (one turn):
    Reflection: ...
    Research Plan and Status: ...
    Fact Check: ...
    Thought: ...
    Action: <one action name>
    Action Input: {"arg": "value", ...}

What the parser accepts (lenient) and what is a format error:
  - Only `Action:` and `Action Input:` are required; the four reasoning sections are parsed when
    present and reported, and are required only with parse_response(..., require_sections=True).
  - Section headers may be wrapped in markdown (`**Action:**`, `### Thought:`) and any case.
  - The action name is matched ignoring case, surrounding quotes/backticks and extra spaces.
    If the text holds several `Action:` lines the first one counts; anything from a line starting
    with `Observation:` on is ignored (a model imagining the environment's answer).
  - Action Input: the first `{...}` after the header; code fences and text after the object are
    ignored; raw newlines/tabs inside strings are accepted; if JSON fails, a Python literal
    (single quotes, True/False/None) is accepted.
  - Integer arguments: a JSON integer or a string of plain ASCII decimal digits (optional sign,
    optional surrounding spaces), at most 9 digits. Floats, bools, NaN/Infinity, "+-5", "1²",
    "١٢" (non-ASCII digits) and longer numbers are format errors.
  - String arguments may not hold lone surrogates (no file or tokenizer can take them) or control
    characters; the free-text arguments (CONTENT_ARGS: new_content, edit_instruction, ...) may hold
    \n, \t and \r.
  - Format errors: no `Action:` line; an unknown action name; no `Action Input:` or no object in
    it; an object that neither JSON nor a Python literal can read; a missing required argument;
    an argument name the action does not take; an argument of the wrong type or with a character
    above.
  - Not format errors: a well-formed action that fails (missing file, a path outside the workspace
    or into read-only data, a bad line range, more than 100 lines to inspect). fastagent.env
    reports those as invalid actions.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

SECTIONS = ("Reflection", "Research Plan and Status", "Fact Check", "Thought", "Action", "Action Input")
MAX_INSPECT_LINES = 100
MAX_INT_DIGITS = 9  # an integer argument (a line number) has at most this many digits
CONTENT_ARGS = ("new_content", "edit_instruction", "things_to_look_for", "final_answer")  # free text
_INT = re.compile(r"[ \t]*[+-]?[0-9]{1,%d}[ \t]*" % MAX_INT_DIGITS)  # plain ASCII decimal only
_BAD_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")  # controls, lone surrogates
_BAD_CONTENT_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")  # \t \n \r allowed


@dataclass(frozen=True)
class ActionSpec:
    """One tool: its name, arguments {name: description} and what it returns."""
    name: str
    description: str
    args: dict[str, str]
    returns: str
    int_args: tuple[str, ...] = ()  # arguments that must be integers
    optional: tuple[str, ...] = ()  # arguments that may be left out
    needs_helper: bool = False  # calls the helper model (hidden from the prompt without one)


ACTIONS: dict[str, ActionSpec] = {s.name: s for s in [
    ActionSpec("List Files", "List the files and folders in a directory of the workspace.",
               {"dir_path": 'a relative path to a directory, e.g. "." or "data"'},
               "the names in that directory (folders end with /), or an error"),
    ActionSpec("Copy File", "Copy a file to a new name in the workspace.",
               {"source": "relative path of an existing file", "destination": "relative path of the copy"},
               "a confirmation, or an error"),
    ActionSpec("Undo Edit Script", "Revert the last edit made to a script by an edit action.",
               {"script_name": "relative path of the script to revert"},
               "the script's content after the revert, or an error if it has no edit to undo"),
    ActionSpec("Execute Script", "Run a python script in the workspace and see what it prints. "
               "If it writes the submission file, the submission is scored.",
               {"script_name": "relative path of an existing python script"},
               "the script's output (long output is cut in the middle), or an error"),
    ActionSpec("Final Answer", "End the task once you are done improving the submission.",
               {"final_answer": "a short summary of what you did and the final result"},
               "nothing: the episode ends"),
    ActionSpec("Understand File", "Have an assistant read a whole file and answer what to look for.",
               {"file_name": "relative path of an existing file",
                "things_to_look_for": "what to find or summarize in the file"},
               "the assistant's description of what was asked, or an error", needs_helper=True),
    ActionSpec("Inspect Script Lines", f"Show numbered lines of a script (at most {MAX_INSPECT_LINES} "
               "at a time), e.g. to read a short script whole or debug a part of it.",
               {"script_name": "relative path of an existing script",
                "start_line_number": "first line to show (1-based)",
                "end_line_number": "last line to show (inclusive)"},
               "the requested lines, or an error", int_args=("start_line_number", "end_line_number")),
    ActionSpec("Edit Script (AI)", "Describe an edit in words; an assistant rewrites the script and "
               "saves it. Check the diff; use Undo Edit Script if it is wrong.",
               {"script_name": "relative path of the script (created empty if missing)",
                "edit_instruction": "a precise step-by-step description of the change",
                "save_name": "relative path to save the edited script to"},
               "a unified diff of the change, or an error", needs_helper=True),
    ActionSpec("Edit Script Segment", "Replace lines start_line_number..end_line_number of a script "
               "with new_content, written by you. Use end_line_number = start_line_number - 1 to "
               "insert before a line without removing any; a missing script is created.",
               {"script_name": "relative path of the script",
                "start_line_number": "first line to replace (1-based)",
                "end_line_number": "last line to replace (inclusive)",
                "new_content": "the new lines, as one string with \\n between lines",
                "save_name": "optional: relative path to save to (default: script_name)"},
               "a unified diff of the change, or an error",
               int_args=("start_line_number", "end_line_number"), optional=("save_name",)),
]}


@dataclass(frozen=True)
class Parsed:
    """A well-formed response: the action, its checked arguments, and the reasoning sections."""
    action: str
    args: dict[str, Any]
    sections: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ParseError:
    """A malformed response; `message` is the observation shown to the agent."""
    message: str
    sections: dict[str, str] = field(default_factory=dict)


_HEADER = re.compile(
    r"^[ \t>#*_]*(" + "|".join(re.escape(s) for s in sorted(SECTIONS, key=len, reverse=True))
    + r")[ \t*_]*:[ \t*_]*", re.IGNORECASE | re.MULTILINE)
_OBSERVATION = re.compile(r"^[ \t>#*_]*Observation[ \t*_]*:", re.IGNORECASE | re.MULTILINE)
_CANON = {s.lower(): s for s in SECTIONS}
_NAMES = {re.sub(r"\s+", " ", n.lower()): n for n in ACTIONS}


def split_sections(text: str) -> dict[str, str]:
    """{section name: text} for each header present; the first occurrence of each counts."""
    cut = _OBSERVATION.search(text)
    if cut:
        text = text[:cut.start()]
    heads = list(_HEADER.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(heads):
        name = _CANON[m.group(1).lower()]
        # Action Input runs to the end: its JSON may hold code with lines that look like headers.
        end = len(text) if name == "Action Input" or i + 1 == len(heads) else heads[i + 1].start()
        if name not in out:
            out[name] = text[m.end():end].strip()
    return out


class _LongInt(str):
    """A JSON integer too long to be an argument, kept as its digits (int() of 5,000 digits raises)."""


def _parse_int(digits: str) -> int | _LongInt:
    return int(digits) if len(digits) <= 2 * MAX_INT_DIGITS else _LongInt(digits)


_JSON = json.JSONDecoder(strict=False, parse_int=_parse_int)


def _read_object(text: str) -> dict | str:
    """The first {...} in text as a dict, or a message saying why there is none."""
    start = text.find("{")
    if start < 0:
        return "Action Input has no JSON object: write it as {\"argument\": \"value\", ...}"
    try:
        obj, _ = _JSON.raw_decode(text, start)
    except (ValueError, RecursionError, MemoryError) as e:  # JSONDecodeError is a ValueError
        obj = _read_literal(text[start:])
        if obj is None:
            where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
            msg = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
            return f"Action Input is not a valid JSON object ({msg}{where})"
    if not isinstance(obj, dict):
        return "Action Input must be a JSON object ({...})"
    return obj


def _read_literal(text: str) -> dict | None:
    """A Python dict literal (single quotes etc.) at the start of text, cut at its closing brace."""
    if len(text) > 100_000:
        return None  # ast on huge adversarial text is slow and may recurse deeply
    depth, quote, i = 0, "", 0
    while i < len(text):  # find the matching brace, skipping quoted strings
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                break
        i += 1
    try:
        obj = ast.literal_eval(text[:i + 1])
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def _check_args(spec: ActionSpec, args: dict) -> dict | str:
    """Arguments with integers converted, or a message naming what is wrong."""
    usage = ", ".join(f'"{a}"' for a in spec.args)
    unknown = [k for k in args if k not in spec.args]
    if unknown:
        return f"{spec.name} takes no argument {ascii(unknown[0])[:80]}; its arguments are {usage}"
    missing = [a for a in spec.args if a not in args and a not in spec.optional]
    if missing:
        return f"{spec.name} needs argument {missing[0]!r}; its arguments are {usage}"
    out: dict[str, Any] = {}
    for k, v in args.items():
        if k in spec.int_args:
            n = _as_int(v)
            if n is None:
                return (f"argument {k!r} of {spec.name} must be an integer of at most {MAX_INT_DIGITS} "
                        f"plain digits (0-9, optional sign), got {_describe(v)}")
            out[k] = n
        elif not isinstance(v, str) or isinstance(v, _LongInt):
            return f"argument {k!r} of {spec.name} must be a string, got {_describe(v)}"
        else:
            bad = (_BAD_CONTENT_CHARS if k in CONTENT_ARGS else _BAD_CHARS).search(v)
            if bad:
                what = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
                return (f"argument {k!r} of {spec.name} holds {what} ({ascii(bad.group())} at "
                        f"character {bad.start()}); write plain text")
            out[k] = v
    return out


def _as_int(v: Any) -> int | None:
    """v as an integer argument, or None: an int of <= MAX_INT_DIGITS digits or such a decimal string."""
    if isinstance(v, _LongInt):
        return None
    if isinstance(v, int) and not isinstance(v, bool):
        return v if abs(v) < 10 ** MAX_INT_DIGITS else None
    if isinstance(v, str) and _INT.fullmatch(v):
        return int(v)
    return None


def _describe(v: Any) -> str:
    """A short, printable description of an argument value (never a huge or recursive repr)."""
    if isinstance(v, _LongInt):
        return f"an integer of {len(v.lstrip('-'))} digits"
    if isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 10 ** 40:
        return "a huge int"  # str() of a huge one (e.g. a long hex literal) may even raise
    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
        text = str(v)
        return f"{type(v).__name__} {ascii(text[:60])}" + ("..." if len(text) > 60 else "")
    return type(v).__name__


def parse_response(text: str, require_sections: bool = False,
                   allowed: set[str] | None = None) -> Parsed | ParseError:
    """Parse one LLM turn. Never raises: a malformed turn gives a ParseError with the reason.

    `allowed` restricts the action names (e.g. without the helper-model actions); default: all.
    """
    try:
        return _parse(text, require_sections, allowed)
    except Exception as e:  # a last guard: the fuzz tests assert it is never reached
        return ParseError(f"the response could not be parsed (internal parser error {type(e).__name__}); "
                          f"write 'Action: <name>' and 'Action Input: {{...}}'")


def _parse(text: str, require_sections: bool, allowed: set[str] | None) -> Parsed | ParseError:
    if not isinstance(text, str):
        return ParseError(f"the response must be text, got {type(text).__name__}")
    sections = split_sections(text)
    if require_sections:
        missing = [s for s in SECTIONS if s not in sections]
        if missing:
            return ParseError(f"the response is missing the section '{missing[0]}:'", sections)
    if "Action" not in sections:
        return ParseError("no 'Action:' line found: end the response with 'Action: <name>' and "
                          "'Action Input: {...}'", sections)
    raw_name = sections["Action"].split("\n", 1)[0].strip().strip("`'\"*_ .").strip()
    name = _NAMES.get(re.sub(r"\s+", " ", raw_name.lower()))
    names = allowed if allowed is not None else set(ACTIONS)
    if name is None or name not in names:
        valid = ", ".join(n for n in ACTIONS if n in names)
        return ParseError(f"unknown action {raw_name[:80]!r}; valid actions: {valid}", sections)
    if "Action Input" not in sections:
        return ParseError(f"no 'Action Input:' found after 'Action: {name}'", sections)
    args = _read_object(sections["Action Input"])
    if isinstance(args, str):
        return ParseError(args, sections)
    args = _check_args(ACTIONS[name], args)
    if isinstance(args, str):
        return ParseError(args, sections)
    return Parsed(name, args, sections)


# --- prompts ---

def tools_prompt(names: list[str] | None = None) -> str:
    """The tools list, one compact entry per action: what it does, its JSON arguments, what comes back.

    Compact on purpose (515 SmolLM2 tokens for the seven tools without a helper, against 686 for
    MLAgentBench-style usage blocks): every prompt of expert data, SFT, RL and evaluation carries it, and on a CPU the
    prompt's prefill is most of the cost of a step."""
    lines = []
    for spec in (ACTIONS[n] for n in (names or list(ACTIONS))):
        args = ", ".join(f'"{a}": {d}' for a, d in spec.args.items())
        lines.append(f"- {spec.name}: {spec.description} Input: {{{args}}}. Returns {spec.returns}.")
    return "\n".join(lines)


FORMAT_PROMPT = """Reflection: what the last observation means, and what went wrong if something did
Research Plan and Status: your high-level plan, updated; mark what is done and the results so far
Fact Check: each claim in the plan, and whether an observation confirmed it or it is a guess
Thought: what you will do now and why
Action: the name of exactly one tool from the list
Action Input: the tool's arguments as one JSON object"""


def system_prompt(names: list[str] | None = None) -> str:
    """The system prompt: the role, the tools with their argument names, and the response format."""
    return ("You are an ML engineer improving a machine-learning solution in a workspace. "
            "You can use these tools:\n\n" + tools_prompt(names) +
            "\n\nEvery response must have exactly these parts, in this order:\n" + FORMAT_PROMPT +
            "\n\nThe environment then answers with 'Observation:' and the tool's result.")


def task_prompt(description: str) -> str:
    """The first user message: the task, and how to work on it."""
    return ("Task:\n" + description.strip() + "\n\n"
            "Work step by step: look at the files, run the starter script to get a baseline, then "
            "improve it. The score comes from a hidden evaluator on the submission file the script "
            "writes, not from what the script prints. Only trust results you have observed. Use "
            "one action per response. When you are done, use Final Answer.")


@dataclass(frozen=True)
class Turn:
    """One past step of an episode: what the agent wrote and what it observed."""
    response: str
    observation: str


def build_messages(description: str, history: list[Turn], k: int = 3, max_obs_chars: int = 4000,
                   names: list[str] | None = None) -> list[dict[str, str]]:
    """Chat messages for the next step: system, task, then the last k steps (older ones elided)."""
    if k < 0:
        raise ValueError(f"k (steps of history kept) must be >= 0, got {k}")
    first = task_prompt(description)
    kept = history[-k:] if k else []
    if len(history) > len(kept):
        first += (f"\n\n({len(history) - len(kept)} earlier steps are not shown; the Research Plan and "
                  f"Status of your last response summarizes them.)")
    msgs = [{"role": "system", "content": system_prompt(names)}, {"role": "user", "content": first}]
    for turn in kept:
        obs = turn.observation
        if len(obs) > max_obs_chars:
            half = max_obs_chars // 2
            obs = f"{obs[:half]}\n[... {len(obs) - 2 * half} characters cut ...]\n{obs[-half:]}"
        msgs.append({"role": "assistant", "content": turn.response})
        msgs.append({"role": "user", "content": f"Observation:\n```\n{obs}\n```"})
    return msgs
