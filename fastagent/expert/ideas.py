"""Candidate improvement ideas for a task, each a sentence a person would write AND an edit the
scripted expert can really make to the task's current script.

    from fastagent.expert.ideas import task_ideas, plan_edit
    ideas = task_ideas(task, workspace)          # >= 100 Idea(text, kind, params) for a bundled task
    edit = plan_edit(ideas[3], script_text)      # Edit(start, end, new_content, imports) or None

Ideas come from the starter script's shape (what kind of model it fits, how it builds features, how
it forecasts) and from the task's data (the columns of a table), never from its answers:
  - model:    swap the estimator for another family with given hyper-parameters
              (random forest, extra trees, gradient boosting, k-NN, SVM, MLP, regularised linear)
  - scale:    the same, behind a StandardScaler (make_pipeline)
  - features: append derived features to a `features(...)` function (raw values, summary
              statistics, differences, spectrum for arrays; letter counts, suffixes, vowel patterns
              for words), change an image pooling size, or add table columns
  - forecast: a trend forecaster's window, polynomial degree, a seasonal term, a log transform
`plan_edit` finds the lines to change by pattern, in whatever the script is now (earlier edits
included); it returns None when the idea no longer applies (the pattern is gone). The edit's
`imports` are the import lines the new code needs that the script lacks (the expert adds them as a
separate edit, or forgets them and recovers from the NameError).
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- the estimator catalogue

# hyper-parameter grids shared by a family's classifier and regressor
_FOREST = {"n_estimators": [100, 300], "max_depth": [None, 12], "min_samples_leaf": [1, 3]}
_EXTRA = {"n_estimators": [200, 400], "max_depth": [None, 16], "min_samples_leaf": [1, 2]}
_BOOST = {"max_iter": [100, 300], "learning_rate": [0.05, 0.1], "max_depth": [None, 6]}
_KNN = {"n_neighbors": [3, 7, 15], "weights": ["uniform", "distance"]}
# name -> (module, phrase, is_classifier, grid of hyper-parameters, takes random_state)
ESTIMATORS: dict[str, tuple[str, str, bool, dict[str, list], bool]] = {
    "RandomForestClassifier": ("sklearn.ensemble", "a random forest", True, _FOREST, True),
    "ExtraTreesClassifier": ("sklearn.ensemble", "extremely randomised trees", True, _EXTRA, True),
    "HistGradientBoostingClassifier": ("sklearn.ensemble", "gradient-boosted trees", True, _BOOST, True),
    "KNeighborsClassifier": ("sklearn.neighbors", "k-nearest neighbours", True, _KNN, False),
    "SVC": ("sklearn.svm", "an RBF support vector machine", True,
            {"C": [1.0, 10.0], "gamma": ["scale"], "probability": [True]}, True),
    "MLPClassifier": ("sklearn.neural_network", "a small neural network (MLP)", True,
                      {"hidden_layer_sizes": [(64,), (128,)], "alpha": [1e-4, 1e-2], "max_iter": [400]}, True),
    "LogisticRegression": ("sklearn.linear_model", "logistic regression", True,
                           {"C": [0.1, 1.0, 10.0], "max_iter": [3000]}, False),
    "RandomForestRegressor": ("sklearn.ensemble", "a random forest", False, _FOREST, True),
    "ExtraTreesRegressor": ("sklearn.ensemble", "extremely randomised trees", False, _EXTRA, True),
    "HistGradientBoostingRegressor": ("sklearn.ensemble", "gradient-boosted trees", False, _BOOST, True),
    "GradientBoostingRegressor": ("sklearn.ensemble", "classic gradient boosting", False,
                                  {"n_estimators": [100, 300], "learning_rate": [0.05, 0.1], "max_depth": [2, 3]}, True),
    "KNeighborsRegressor": ("sklearn.neighbors", "k-nearest neighbours", False, _KNN, False),
    "SVR": ("sklearn.svm", "an RBF support vector regressor", False, {"C": [1.0, 10.0, 100.0], "epsilon": [0.1]}, False),
    "Ridge": ("sklearn.linear_model", "ridge regression", False, {"alpha": [0.1, 1.0, 10.0]}, False),
    "MLPRegressor": ("sklearn.neural_network", "a small neural network (MLP)", False,
                     {"hidden_layer_sizes": [(64,), (128,)], "alpha": [1e-4, 1e-2], "max_iter": [800]}, True),
}
_BASE_PHRASE = {"LinearRegression": "the linear regression", "DecisionTreeClassifier": "the decision tree",
                "DecisionTreeRegressor": "the decision tree"}
_REGRESSORS = ("LinearRegression", "DecisionTreeRegressor", "Ridge", "Lasso")
_EST = re.compile(r"\b(" + "|".join(sorted({*ESTIMATORS, *_BASE_PHRASE, "Lasso"}, key=len, reverse=True))
                  + r")\((?:[^()]|\([^()]*\))*\)")
_ARG_WORDS = {"n_estimators": "{} trees", "max_depth": "max depth {}", "min_samples_leaf": "at least {} samples per leaf",
              "max_iter": "{} iterations", "learning_rate": "learning rate {}", "n_neighbors": "k = {}",
              "weights": "{} weights", "C": "C = {}", "alpha": "regularisation {}", "epsilon": "epsilon {}",
              "hidden_layer_sizes": "hidden layers {}"}


@dataclass(frozen=True)
class Idea:
    """One improvement idea: what a person would write, and the recipe the expert follows."""
    text: str  # the sentence
    kind: str  # model | scale | features | forecast
    params: tuple[tuple[str, Any], ...] = ()  # the recipe's parameters, as sorted (key, value) pairs

    def get(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)


@dataclass
class Edit:
    """Replace lines start..end (1-based, inclusive; end = start - 1 inserts) with new_content."""
    start: int
    end: int
    new_content: str
    imports: list[str] = field(default_factory=list)  # import lines the new code needs and the script lacks
    note: str = ""  # what the edit does, for the expert's reasoning


def _ctor(name: str, args: dict[str, Any]) -> str:
    kw = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"{name}({kw})"


def _arg_text(args: dict[str, Any]) -> str:
    parts = [_ARG_WORDS.get(k, k + " {}").format("no limit" if v is None else v) for k, v in args.items()
             if k not in ("random_state", "probability", "gamma")]
    return ", ".join(parts)


def estimator_in(script: str) -> tuple[str, int] | None:
    """(estimator class name, 1-based line) of the first estimator constructed outside imports."""
    for i, line in enumerate(script.splitlines(), 1):
        if line.lstrip().startswith(("from ", "import ", "#")):
            continue
        m = _EST.search(line)
        if m:
            return m.group(1), i
    return None


def _is_classifier(name: str) -> bool:
    return name in ESTIMATORS and ESTIMATORS[name][2] or (name not in ESTIMATORS and name not in _REGRESSORS
                                                         and not name.endswith("Regressor"))


def model_ideas(base: str, rng: random.Random) -> list[Idea]:
    clf = _is_classifier(base)
    old = _BASE_PHRASE.get(base) or f"the {ESTIMATORS.get(base, ('', base))[1].replace('a ', '', 1)}"
    templates = ["replace {old} with {new} ({args})", "try {new} instead of {old}: {args}",
                 "switch the model to {new} with {args}", "fit {new} ({args}) in place of {old}"]
    out = []
    for name, (_, phrase, is_clf, grid, seeded) in ESTIMATORS.items():
        if is_clf != clf:
            continue
        for values in itertools.product(*grid.values()):
            args = dict(zip(grid, values))
            if seeded:
                args["random_state"] = 0
            for scaled in (False, True):
                text = (f"retune {old}: {_arg_text(args)}" if name == base else
                        rng.choice(templates).format(old=old, new=phrase, args=_arg_text(args)))
                if scaled:
                    text = rng.choice(["standardise the features, then ", "scale every feature to zero mean "
                                       "and unit variance and ", "put a StandardScaler in front and "]) + text
                out.append(Idea(text, "scale" if scaled else "model",
                                tuple(sorted({"estimator": name, "args": tuple(args.items())}.items()))))
    return out


def plan_model(idea: Idea, script: str) -> Edit | None:
    found = estimator_in(script)
    if found is None:
        return None
    _, line_no = found
    line = script.splitlines()[line_no - 1]
    name, args = idea.get("estimator"), dict(idea.get("args"))
    new = _ctor(name, args)
    imports = [f"from {ESTIMATORS[name][0]} import {name}"]
    if idea.kind == "scale":
        new = f"make_pipeline(StandardScaler(), {new})"
        imports += ["from sklearn.pipeline import make_pipeline", "from sklearn.preprocessing import StandardScaler"]
    new_line = _EST.sub(lambda m: new, line, count=1)
    return Edit(line_no, line_no, new_line, _missing(script, imports), f"the model becomes {new}")


# ---------------------------------------------------------------- features(...) functions

_FEAT_DEF = re.compile(r"^(def features\((\w+)\):|features = lambda (\w+):)")
ARRAY_EXTRAS = {
    "raw": ("the raw values themselves", "np.asarray({x}, dtype=float).reshape(len({x}), -1)"),
    "stats": ("summary statistics (mean, std, min, max and the 10/25/50/75/90th percentiles)",
              "np.column_stack([_f.mean(1), _f.std(1), _f.min(1), _f.max(1), "
              "*np.percentile(_f, [10, 25, 50, 75, 90], axis=1)])"),
    "diff": ("statistics of the first differences (mean, std, mean absolute change, min, max)",
             "np.column_stack([_d.mean(1), _d.std(1), np.abs(_d).mean(1), _d.min(1), _d.max(1)])"),
    "fft": ("the magnitudes of the first 16 Fourier coefficients", "np.abs(np.fft.rfft(_f, axis=1))[:, :16]"),
}
WORD_EXTRAS = {
    "letters": ("counts of each letter a-z", "[[w.count(c) for c in 'abcdefghijklmnopqrstuvwxyz'] for w in _w]"),
    "suffix": ("indicators of common endings (-e, -y, -ed, -er, -ing, -ion, -al, -ic, -ly, -ous, -ate, -ment)",
               "[[w.endswith(s) for s in ('e', 'y', 'ed', 'er', 'ing', 'ion', 'al', 'ic', 'ly', 'ous', 'ate', 'ment')]"
               " for w in _w]"),
    "shape": ("the word's shape: length, vowel groups, consonant clusters and where the first vowel is",
              "[[len(w), len(re.findall(r'[aeiouy]+', w)), len(re.findall(r'[^aeiouy]+', w)), "
              "next((i for i, c in enumerate(w) if c in 'aeiouy'), len(w))] for w in _w]"),
    "last": ("one-hot codes of the last two letters", "[[w[-1:] == c for c in 'abcdefghijklmnopqrstuvwxyz'] + "
             "[w[-2:-1] == c for c in 'abcdefghijklmnopqrstuvwxyz'] for w in _w]"),
}
_POOL = re.compile(r"(\w+)\.reshape\(len\(\1\), (\d+), (\d+), (\d+), (\d+)\)\.mean\(axis=\(2, 4\)\)")


def features_def(script: str) -> tuple[int, int, str, bool] | None:
    """(first line, last line, argument name, is_lambda) of the script's `features` definition."""
    lines = script.splitlines()
    for i, line in enumerate(lines):
        m = _FEAT_DEF.match(line)
        if m:
            if m.group(3):
                return i + 1, i + 1, m.group(3), True
            end = i + 1
            while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
                end += 1
            while end > i + 1 and not lines[end - 1].strip():
                end -= 1
            return i + 1, end, m.group(2), False
    return None


def _is_words(script: str, start: int, end: int, arg: str) -> bool:
    body = "\n".join(script.splitlines()[start - 1:end])
    return arg in ("words", "names", "text", "w") or ".str" in body or "re." in body


def feature_ideas(script: str, rng: random.Random) -> list[Idea]:
    found = features_def(script)
    if found is None:
        return []
    start, end, arg, _ = found
    extras = WORD_EXTRAS if _is_words(script, start, end, arg) else ARRAY_EXTRAS
    templates = ["add {what} to the features", "extend the feature function with {what}",
                 "append {what} as extra features", "give the model {what} as well"]
    out = []
    for r in range(1, len(extras) + 1):
        for combo in itertools.combinations(extras, r):
            what = " and ".join(extras[k][0] for k in combo)
            for t in templates[:2] if r < 3 else templates[2:3]:
                out.append(Idea(t.format(what=what), "features", (("extras", combo), ("words", extras is WORD_EXTRAS))))
    m = _POOL.search(script)
    if m:
        side = int(m.group(2)) * int(m.group(3))
        for block in (b for b in range(1, side) if side % b == 0 and b != int(m.group(3))):
            what = "the raw pixels without pooling" if block == 1 else f"{block}x{block} average pooling"
            out.append(Idea(rng.choice(["use {what} instead", "change the image features to {what}"]).format(what=what),
                            "features", (("pool", block), ("side", side))))
    return out


def plan_features(idea: Idea, script: str) -> Edit | None:
    if idea.get("pool"):
        m = _POOL.search(script)
        if m is None:
            return None
        x, block, side = m.group(1), idea.get("pool"), idea.get("side")
        new = (f"{x}.reshape(len({x}), -1).astype(float)" if block == 1 else
               f"{x}.reshape(len({x}), {side // block}, {block}, {side // block}, {block}).mean(axis=(2, 4))")
        for i, line in enumerate(script.splitlines(), 1):
            if m.group(0) in line:
                return Edit(i, i, line.replace(m.group(0), new), [], f"pooling becomes {block}x{block}")
        return None
    found = features_def(script)
    if found is None or "base_features" in script:
        return None  # already extended once: one wrapper per script keeps it readable
    start, end, arg, is_lambda = found
    lines = script.splitlines()[start - 1:end]
    base = [lines[0].replace("features", "base_features", 1)] + lines[1:]
    words = idea.get("words")
    table = WORD_EXTRAS if words else ARRAY_EXTRAS
    body = [f"def features({arg}):"]
    if words:
        body.append(f"    _w = [str(w).lower() for w in {arg}]")
        parts = [f"np.asarray({table[k][1]}, dtype=float)" for k in idea.get("extras")]
    else:
        body.append(f"    _f = np.asarray({arg}, dtype=float).reshape(len({arg}), -1)")
        if "diff" in idea.get("extras"):
            body.append("    _d = np.diff(_f, axis=1)")
        parts = [table[k][1].format(x=arg) for k in idea.get("extras")]
    body.append(f"    return np.hstack([np.asarray(base_features({arg}), dtype=float).reshape(len({arg}), -1), "
                + ", ".join(parts) + "])")
    needs = ["import numpy as np"] + (["import re"] if words and "shape" in idea.get("extras") else [])
    content = "\n".join(base + ["", ""] + body) if not is_lambda else "\n".join(base + body)
    return Edit(start, end, content, _missing(script, needs), "features(...) gains " + ", ".join(idea.get("extras")))


# ---------------------------------------------------------------- table columns

_FEAT_LIST = re.compile(r"^(features(?:, \w+)? = )\[([^\]]*)\]")


def column_ideas(script: str, columns: dict[str, str], rng: random.Random) -> list[Idea]:
    """Ideas that add numeric columns of the table (columns: name -> dtype kind) to `features = [...]`."""
    lines = script.splitlines()
    hit = next((ln for ln in lines if _FEAT_LIST.match(ln)), None)
    if hit is None:
        return []
    used = set(re.findall(r"['\"]([^'\"]+)['\"]", _FEAT_LIST.match(hit).group(2)))
    spare = [c for c, k in columns.items() if k in "biuf" and c not in used and c != "id"]
    out = [Idea(f"use every numeric column as a feature ({', '.join(sorted(used | set(spare)))})", "columns",
                (("add", tuple(spare)),))] if spare else []
    for r in (1, 2):
        for combo in itertools.combinations(spare, r):
            what = " and ".join(f"'{c}'" for c in combo)
            out.append(Idea(rng.choice(["add the {w} column to the features", "the model should also see {w}",
                                        "include {w} as a feature"]).format(w=what), "columns", (("add", combo),)))
    return out


def plan_columns(idea: Idea, script: str) -> Edit | None:
    for i, line in enumerate(script.splitlines(), 1):
        m = _FEAT_LIST.match(line)
        if m:
            have = re.findall(r"['\"]([^'\"]+)['\"]", m.group(2))
            add = [c for c in idea.get("add") if c not in have]
            if not add:
                return None
            new = "[" + ", ".join(repr(c).replace("'", '"') for c in have + add) + "]"
            return Edit(i, i, line[:m.start(2) - 1] + new + line[m.end(2) + 1:], [], "columns added: " + ", ".join(add))
    return None


# ---------------------------------------------------------------- trend forecasters

_FORECAST = re.compile(r"^def forecast\((\w+), (\w+)\):")
_TAIL = re.compile(r"\.tail\((\d+)\)")
_POLYFIT = re.compile(r"np\.polyfit\((\w+)\[\"(\w+)\"\], \1\[\"(\w+)\"\], (\d+)\)")


def forecast_def(script: str) -> tuple[int, int, str, str, str, str] | None:
    """(first line, last line, history arg, times arg, time column, target column) of `def forecast`."""
    lines = script.splitlines()
    for i, line in enumerate(lines):
        m = _FORECAST.match(line)
        if m:
            end = i + 1
            while end < len(lines) and lines[end].startswith((" ", "\t")):
                end += 1
            body = "\n".join(lines[i:end])
            fit = _POLYFIT.search(body)
            if fit is None:
                return None
            return i + 1, end, m.group(1), m.group(2), fit.group(2), fit.group(3)
    return None


def forecast_ideas(script: str, rng: random.Random) -> list[Idea]:
    if forecast_def(script) is None:
        return []
    out = []
    for window, degree, season, log in itertools.product((24, 36, 48, 60, 96, 120, 180, 240, 360, 0), (1, 2, 3),
                                                        (False, True), (False, True)):
        span = "the whole history" if window == 0 else f"the last {window} months"
        parts = [f"fit a {['', 'linear', 'quadratic', 'cubic'][degree]} trend on {span}"]
        if season:
            parts.append(rng.choice(["add the mean residual of each calendar month as a seasonal term",
                                     "model the yearly seasonality with per-month offsets"]))
        if log:
            parts.append(rng.choice(["work on the log of the target", "fit in log space so growth is multiplicative"]))
        out.append(Idea(", ".join(parts), "forecast", (("degree", degree), ("log", log), ("season", season),
                                                       ("window", window))))
    return out


def plan_forecast(idea: Idea, script: str) -> Edit | None:
    found = forecast_def(script)
    if found is None:
        return None
    start, end, hist, times, tcol, ycol = found
    window, degree = idea.get("window"), idea.get("degree")
    y = f'np.log({"recent"}["{ycol}"])' if idea.get("log") else f'recent["{ycol}"]'
    body = [f"def forecast({hist}, {times}):",
            f'    recent = {hist}.sort_values("{tcol}")' + (f".tail({window})" if window else ""),
            f'    t0 = recent["{tcol}"].mean()  # centred times keep the polynomial fit well conditioned',
            f'    coef = np.polyfit(recent["{tcol}"] - t0, {y}, {degree})',
            f"    pred = np.polyval(coef, np.asarray({times}, dtype=float) - t0)"]
    if idea.get("season"):
        body += [f'    resid = {y} - np.polyval(coef, recent["{tcol}"] - t0)',
                 f'    season = resid.groupby(recent["{tcol}"].to_numpy() % 12).mean()',
                 f"    pred = pred + season.reindex(np.asarray({times}) % 12).fillna(0).to_numpy()"]
    body.append("    return np.exp(pred)" if idea.get("log") else "    return pred")
    return Edit(start, end, "\n".join(body), _missing(script, ["import numpy as np"]),
                f"forecast: degree {degree}, window {window or 'all'}, season {idea.get('season')}, log {idea.get('log')}")


# ---------------------------------------------------------------- the pool for a task

def _missing(script: str, imports: list[str]) -> list[str]:
    have = set(script.splitlines())
    return [imp for imp in dict.fromkeys(imports) if imp not in have]


PLANNERS = {"model": plan_model, "scale": plan_model, "features": plan_features, "columns": plan_columns,
            "forecast": plan_forecast}


def plan_edit(idea: Idea, script: str) -> Edit | None:
    """The edit that realises idea on the script as it is now, or None if it no longer applies."""
    return PLANNERS[idea.kind](idea, script)


def table_columns(workspace: Path) -> dict[str, str]:
    """Column name -> numpy dtype kind of data/train.csv in a task's pristine workspace, for the
    columns the test table has too (the target is not one of them); {} without such tables."""
    path, test = Path(workspace) / "data" / "train.csv", Path(workspace) / "data" / "test.csv"
    if not path.is_file() or not test.is_file():
        return {}
    import pandas as pd
    df, test_cols = pd.read_csv(path, nrows=200), set(pd.read_csv(test, nrows=1).columns)
    return {c: df[c].dtype.kind for c in df.columns if c in test_cols}


def task_ideas(script: str, columns: dict[str, str] | None = None, seed: int = 0) -> list[Idea]:
    """Every candidate idea for a starter script (and its table's columns), deduplicated by text,
    in a seeded order. Bundled training tasks get >= 100 each."""
    rng = random.Random(seed)
    ideas: list[Idea] = []
    found = estimator_in(script)
    if found:
        ideas += model_ideas(found[0], rng)
    ideas += feature_ideas(script, rng) + column_ideas(script, columns or {}, rng) + forecast_ideas(script, rng)
    unique = list({i.text: i for i in ideas}.values())
    rng.shuffle(unique)
    return unique
