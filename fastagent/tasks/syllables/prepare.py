"""Materialize syllables: 15000 cmudict words, label = number of vowel phonemes (capped at 6),
sampled and split 60/20/20 with the seed."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import load_cmudict, split_frame, write_tables


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    rows = [(w, min(6, sum(p[-1].isdigit() for p in ph))) for w, ph in load_cmudict().items() if len(w) >= 2]
    df = pd.DataFrame(rows, columns=["word", "syllables"])
    df = df.iloc[np.random.default_rng(seed).choice(len(df), 15000, replace=False)]
    write_tables(workspace, answers, *split_frame(df, seed), targets=["syllables"])
