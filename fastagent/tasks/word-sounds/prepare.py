"""Materialize word-sounds: 15000 cmudict words with six 0/1 labels (does the pronunciation contain
the sound), sampled and split 60/20/20 with the seed."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import load_cmudict, split_frame, write_tables

SOUNDS = {"th": {"TH", "DH"}, "sh": {"SH"}, "ch": {"CH"}, "jh": {"JH"}, "ng": {"NG"}, "zh": {"ZH"}}


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    rows = [[w] + [int(bool(s & set(ph))) for s in SOUNDS.values()]
            for w, ph in load_cmudict().items() if len(w) >= 2]
    df = pd.DataFrame(rows, columns=["word"] + list(SOUNDS))
    df = df.iloc[np.random.default_rng(seed).choice(len(df), 15000, replace=False)]
    write_tables(workspace, answers, *split_frame(df, seed), targets=list(SOUNDS))
