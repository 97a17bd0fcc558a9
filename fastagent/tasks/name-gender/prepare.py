"""Materialize name-gender: 12000 gendered first names from gender-guesser's list, female = F or ?F,
sampled and split 60/20/20 (stratified) with the seed."""
from pathlib import Path

import numpy as np

from fastagent.tasks._prepare import load_names, split_frame, write_tables


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = load_names()
    df = df[df["gender"].isin(["M", "F", "?M", "?F"])]
    df = df.assign(female=df["gender"].str.endswith("F").astype("int64"))[["name", "female"]]
    df = df.iloc[np.random.default_rng(seed).choice(len(df), 12000, replace=False)]
    write_tables(workspace, answers, *split_frame(df, seed, stratify="female"), targets=["female"])
