"""The scripted expert: an episode-long plan that explores the workspace, realises 1-3 seeded ideas as
real edits of the current script, runs them in the sandbox, reads the printed validation score, keeps
what helps, undoes what does not, recovers from its own failed runs, and ends with a Final Answer.

    expert = ScriptedExpert(task, ideas, seed=7, max_steps=12)
    turns = expert.turns()                       # a generator of Turn(text, tags)
    turn = next(turns)                           # the first response
    turn = turns.send(observation)               # the next one, given what the environment said

It sees only what the agent would see: observations (file lists, numbered script lines, run output,
diffs). Its picture of the script comes from the lines it inspected plus the edits it made itself;
when an edit fails it inspects again. Every response is in the agent's format (Reflection, Research
Plan and Status, Fact Check, Thought, Action, Action Input) and its reasoning states what the last
observation showed and why the next action follows. Variety is deliberate and seeded: which
exploration steps it takes, the order of edits, whether it forgets an import or mistypes an argument
(then reads the error and fixes it), whether it undoes an idea that did not help (a dead end).
`Turn.tags` mark each step (explore, baseline, edit, run, recovery, dead_end, final) for the summary.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any, Generator

from fastagent.expert.ideas import Edit, Idea, plan_edit

SCRIPT = "train.py"
_SCORE = re.compile(r"validation ([^:\n]{1,40}): (-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)")
_LINE = re.compile(r"^\s*(\d+) \| ?(.*)$")
_NAME_ERROR = re.compile(r"NameError: name '(\w+)' is not defined")
_KWARG = re.compile(r"unexpected keyword argument '(\w+)'")
_TYPOS = {"n_estimators": "n_estimator", "max_depth": "maxdepth", "learning_rate": "learn_rate",
          "n_neighbors": "n_neighbours", "min_samples_leaf": "min_sample_leaf", "max_iter": "max_iters"}


@dataclass
class Turn:
    text: str  # the response, in the agent's format
    tags: list[str] = field(default_factory=list)  # explore | baseline | edit | run | recovery | dead_end | final


def score_in(observation: str) -> float | None:
    """The last 'validation <metric>: <value>' the script printed, if any."""
    found = _SCORE.findall(observation)
    return float(found[-1][1]) if found else None


def response(reflection: str, plan: str, facts: str, thought: str, action: str, args: dict[str, Any]) -> str:
    return (f"Reflection: {reflection}\nResearch Plan and Status: {plan}\nFact Check: {facts}\n"
            f"Thought: {thought}\nAction: {action}\nAction Input: {json.dumps(args, indent=4)}")


class ScriptedExpert:
    """One episode's expert (see the module docstring)."""

    def __init__(self, task: Any, ideas: list[Idea], seed: int, max_steps: int = 12, p_forget: float = 0.25,
                 p_typo: float = 0.12) -> None:
        self.task, self.ideas, self.max_steps = task, ideas, max_steps
        self.p_forget, self.p_typo = p_forget, p_typo  # how often it forgets an import / mistypes an argument
        self.rng = random.Random(seed)
        self.sign = 1 if task.direction == "max" else -1
        self.lines: list[str] = []  # the script as the expert believes it is
        self.steps = 0
        self.best: float | None = None  # best validation score seen
        self.status: list[str] = []  # plan items with their status, for Research Plan and Status
        self.facts: list[str] = []  # confirmed facts, for Fact Check
        self.metric_name = task.metric

    # --- text helpers ---
    def _plan(self) -> str:
        return "\n" + "\n".join(f"{i}. {s}" for i, s in enumerate(self.status, 1))

    def _facts(self) -> str:
        return ("\n" + "\n".join(f"- {f}" for f in self.facts[-3:])) if self.facts else "None yet: nothing has been observed."

    def _turn(self, reflection: str, thought: str, action: str, args: dict[str, Any], *tags: str) -> Turn:
        self.steps += 1
        return Turn(response(reflection, self._plan(), self._facts(), thought, action, args), list(tags))

    def _better(self, a: float, b: float | None) -> bool:
        return b is None or self.sign * (a - b) > 0

    def _pick(self, *options: str) -> str:
        return self.rng.choice(options)

    # --- the script as seen ---
    def _read_inspection(self, obs: str) -> None:
        got = {int(m.group(1)): m.group(2) for m in map(_LINE.match, obs.splitlines()[1:]) if m}
        if got:
            n = max(got)
            self.lines = [got.get(i, self.lines[i - 1] if i <= len(self.lines) else "") for i in range(1, n + 1)]

    def _apply(self, e: Edit) -> None:
        self.lines[e.start - 1:e.end] = e.new_content.split("\n")

    def _script(self) -> str:
        return "\n".join(self.lines) + "\n"

    def _import_edit(self, imports: list[str]) -> Edit:
        """Insert import lines after the last top-of-file import."""
        last = 0
        for i, line in enumerate(self.lines, 1):
            if line.startswith(("import ", "from ")):
                last = i
            elif line.strip() and not line.startswith(("#", '"""', "'")) and last:
                break
        if last == 0:  # after a module docstring if there is one
            last = next((i for i, ln in enumerate(self.lines[1:], 2) if ln.strip().endswith('"""')), 0) \
                if self.lines and self.lines[0].startswith('"""') else 0
        return Edit(last + 1, last, "\n".join(imports), [], "imports: " + ", ".join(imports))

    def _edit_args(self, e: Edit) -> dict[str, Any]:
        return {"script_name": SCRIPT, "start_line_number": e.start, "end_line_number": e.end,
                "new_content": e.new_content}

    # --- the episode ---
    def turns(self) -> Generator[Turn, str, None]:
        """Yield one Turn per step; send() each step's observation back in."""
        t = self.task
        self.status = ["Look at the files and read train.py [in progress]", "Run the starter for a baseline",
                       *[f"Idea: {i.text}" for i in self.ideas], "Submit the best version with Final Answer"]
        obs = ""
        if self.rng.random() < 0.85:
            obs = yield self._turn(self._pick("This is the first step, so there is nothing to reflect on yet.",
                                              "Nothing has been observed yet."),
                                   self._pick("Start by listing the workspace to see the script and the data.",
                                              "First find out which files exist."), "List Files", {"dir_path": "."},
                                   "explore")
            self.facts.append(f"The workspace holds: {', '.join(obs.split()[:8])}")
            if self.rng.random() < 0.3:
                obs = yield self._turn(f"The workspace has {len(obs.split())} entries, including a data folder.",
                                       "Check what the data folder holds before reading the script.",
                                       "List Files", {"dir_path": "data"}, "explore")
                self.facts.append(f"data/ holds: {', '.join(obs.split()[:6])}")
        end = self.rng.choice((40, 60, 100))
        obs = yield self._turn(self._pick("The listing shows train.py, the starter script.",
                                          "train.py is the script to improve.") if obs else
                               "Nothing observed yet; the task says train.py is the starter.",
                               "Read the whole script to see how it builds features, fits the model and "
                               "writes the submission.", "Inspect Script Lines",
                               {"script_name": SCRIPT, "start_line_number": 1, "end_line_number": end}, "explore")
        self._read_inspection(obs)
        self.status[0] = f"Look at the files and read train.py [done: {len(self.lines)} lines]"
        self.facts.append(f"train.py has {len(self.lines)} lines (confirmed by inspecting them)")
        if self.rng.random() < 0.8:
            obs = yield self._turn(f"train.py has {len(self.lines)} lines; it prints a validation {t.metric} "
                                   f"and writes submission.csv.",
                                   "Run the starter unchanged to get a baseline to compare every change with.",
                                   "Execute Script", {"script_name": SCRIPT}, "baseline", "run")
            self.best = score_in(obs)
            self.status[1] = (f"Run the starter for a baseline [done: validation {t.metric} {self.best}]"
                              if self.best is not None else "Run the starter for a baseline [it printed no score]")
            if self.best is not None:
                self.facts.append(f"The starter's validation {t.metric} is {self.best} (confirmed by running it)")
            last = f"The starter ran and printed validation {t.metric} {self.best}."
        else:
            self.status[1] = "Run the starter for a baseline [skipped: compare against the first change]"
            last = "The script is short and clear; I will compare changes against each other."
        for k, idea in enumerate(self.ideas):
            if self.max_steps - self.steps < 4:
                self.status[2 + k] += " [not tried: out of steps]"
                continue
            last = yield from self._try_idea(k, idea, last, final=k == len(self.ideas) - 1)
        self.status[-1] += " [now]"
        best = f"the best validation {t.metric} was {self.best}" if self.best is not None else "no run printed a score"
        yield self._turn(last, f"Every planned idea is tried; {best}. The submission on disk is from the last kept "
                         "version, so end here.", "Final Answer",
                         {"final_answer": f"Tried {len(self.ideas)} idea(s) on train.py; {best}. "
                                          f"Kept: {', '.join(s for s in self.status if 'kept' in s) or 'the starter'}."},
                         "final")

    def _try_idea(self, k: int, idea: Idea, last: str, final: bool) -> Generator[Turn, str, str]:
        """Realise one idea: edits (maybe with a forgotten import or a typo), a run, then keep or undo."""
        i = 2 + k
        e = plan_edit(idea, self._script())
        if e is None:
            self.status[i] += " [skipped: does not apply to the script as it is]"
            return last + " The next idea does not fit the script as it is now, so I skip it."
        forget = bool(e.imports) and self.rng.random() < self.p_forget
        typo = next((w for w in _TYPOS if f"{w}=" in e.new_content), None) if self.rng.random() < self.p_typo else None
        edits = 0
        if e.imports and not forget and self.rng.random() < 0.5:  # imports first, then the change
            imp = self._import_edit(e.imports)
            obs = yield self._turn(last, f"To try idea {i + 1} the script needs {', '.join(e.imports)}; add them "
                                   "at the top first.", "Edit Script Segment", self._edit_args(imp), "edit")
            self._apply(imp)
            edits, last = edits + 1, "The imports are in (the diff shows only added lines)."
            e = plan_edit(idea, self._script())
            e.imports = []
        content = e.new_content.replace(f"{typo}=", f"{_TYPOS[typo]}=", 1) if typo else e.new_content
        shown = Edit(e.start, e.end, content)
        obs = yield self._turn(last, f"Try idea {i + 1}: {e.note}. Lines {e.start}-{e.end} hold that "
                               "code, so replace exactly them.", "Edit Script Segment", self._edit_args(shown), "edit")
        if not obs.startswith("Saved"):
            self.status[i] += " [the edit failed]"
            return f"The edit was refused: {obs[:200]}"
        self._apply(shown)
        edits += 1
        if e.imports and not forget:
            imp = self._import_edit(e.imports)
            obs = yield self._turn("The diff shows the change as intended.", f"The new code uses "
                                   f"{', '.join(e.imports)}; add the import(s) after the existing ones.",
                                   "Edit Script Segment", self._edit_args(imp), "edit")
            self._apply(imp)
            edits += 1
        if self.rng.random() < 0.2:  # look at the result once before running it
            lo = max(1, e.start - 2)
            obs = yield self._turn("The edit was saved.", "Check the edited lines in context before running.",
                                   "Inspect Script Lines", {"script_name": SCRIPT, "start_line_number": lo,
                                                            "end_line_number": min(len(self.lines), lo + 12)}, "explore")
            self._read_inspection(obs)
        obs = yield self._turn("The edit is saved and the diff matches the plan.", "Run the script to see whether "
                               "the change improves the validation score.", "Execute Script", {"script_name": SCRIPT},
                               "run")
        for _ in range(2):  # at most two fixes of its own mistakes
            fix = self._fix_for(obs, e, typo)
            if fix is None:
                break
            why, edit = fix
            obs = yield self._turn(f"The run failed: {why}.", "Fix that mistake and run again.", "Edit Script Segment",
                                   self._edit_args(edit), "recovery", "edit")
            self._apply(edit)
            edits += 1
            typo = None
            obs = yield self._turn("The fix is saved.", "Run again to check the fix.", "Execute Script",
                                   {"script_name": SCRIPT}, "recovery", "run")
        return (yield from self._judge(i, idea, obs, edits, final))

    def _fix_for(self, obs: str, e: Edit, typo: str | None) -> tuple[str, Edit] | None:
        """A fix for the expert's own mistake that the run output shows, or None."""
        if "The script failed" not in obs:
            return None
        m = _NAME_ERROR.search(obs)
        if m and any(m.group(1) in imp for imp in e.imports):
            return f"NameError: {m.group(1)} is not imported", self._import_edit([imp for imp in e.imports
                                                                                 if imp not in self.lines])
        m = _KWARG.search(obs)
        if m and typo and m.group(1) == _TYPOS[typo]:
            for n, line in enumerate(self.lines, 1):
                if f"{_TYPOS[typo]}=" in line:
                    return (f"the argument '{m.group(1)}' does not exist; it is spelled '{typo}'",
                            Edit(n, n, line.replace(f"{_TYPOS[typo]}=", f"{typo}=")))
        if "contains NaN" in obs:
            load = next((n for n, ln in enumerate(self.lines, 1) if ln.startswith("train, valid, test =")), None)
            if load and "fillna(_med)" not in self._script():
                return ("the data has missing values the new model cannot take",
                        Edit(load + 1, load, "_med = train.median(numeric_only=True)\n"
                             "train, valid, test = (df.fillna(_med) for df in (train, valid, test))"))
        return None

    def _judge(self, i: int, idea: Idea, obs: str, edits: int, final: bool) -> Generator[Turn, str, str]:
        t = self.task
        score = score_in(obs) if "ran to the end" in obs else None
        if score is not None and self._better(score, self.best):
            before = self.best
            self.best = score
            self.status[i] += f" [kept: validation {t.metric} {score}]"
            self.facts.append(f"Idea {i + 1} gives validation {t.metric} {score} (confirmed by running it)")
            return (f"The change helped: validation {t.metric} is {score}" +
                    (f", better than {before}." if before is not None else "."))
        if score is not None and self.rng.random() < 0.2:
            self.status[i] += f" [tried: validation {t.metric} {score}, not better, kept anyway]"
            return f"Validation {t.metric} is {score}, not better than {self.best}, but close enough to build on."
        what = (f"validation {t.metric} {score} is not better than {self.best}" if score is not None else
                "the run did not finish with a score" + (" (time limit)" if "time limit" in obs else ""))
        self.status[i] += f" [dead end: {what}]"
        self.facts.append(f"Idea {i + 1}: {what} (confirmed by running it)")
        last = f"The idea did not help: {what}."
        for n in range(edits):
            if self.max_steps - self.steps < 2:
                break
            obs = yield self._turn(last, "Undo the edit so the script is back to the better version." if n == 0 else
                                   "Undo the remaining edit of this idea.", "Undo Edit Script", {"script_name": SCRIPT},
                                   "dead_end")
            content = obs.split(" now:\n", 1)[1] if " now:\n" in obs else None
            if content is not None:
                self.lines = content.rstrip("\n").split("\n")
            last = "The edit is undone; the script is as it was before it."
        if final and edits and self.max_steps - self.steps >= 2:  # the submission on disk is the worse run's
            obs = yield self._turn(last, "submission.csv still comes from the run that did not help; run the "
                                   "restored script so the submission matches the best version.", "Execute Script",
                                   {"script_name": SCRIPT}, "run")
            score = score_in(obs)
            last = (f"The restored script ran again and printed validation {t.metric} {score}." if score is not None
                    else "The restored script ran again.")
        return last
