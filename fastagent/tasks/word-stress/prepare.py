"""Materialize word-stress: 15000 words of cmudict (two or more syllables), label = position of the
primary stress (capped at 4), sampled and split 60/20/20 with the seed."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import load_cmudict, split_frame, write_tables


def stress_position(phones):
    vowels = [p for p in phones if p[-1].isdigit()]
    return len(vowels), min(4, next(i for i, p in enumerate(vowels, 1) if p[-1] == "1"))


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    rows = []
    for word, phones in load_cmudict().items():
        if len(word) >= 3 and any(p.endswith("1") for p in phones):
            n, pos = stress_position(phones)
            if n >= 2:
                rows.append((word, pos))
    df = pd.DataFrame(rows, columns=["word", "stress"])
    df = df.iloc[np.random.default_rng(seed).choice(len(df), 15000, replace=False)]
    write_tables(workspace, answers, *split_frame(df, seed, stratify="stress"), targets=["stress"])
