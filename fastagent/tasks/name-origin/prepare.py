"""Materialize name-origin: first names from gender-guesser's list whose recorded frequency lies at
least 75% in one of six language regions; sampled (up to 12000) and split 60/20/20 (stratified)."""
from pathlib import Path

import numpy as np

from fastagent.tasks._prepare import load_names, split_frame, write_tables

REGIONS = {
    "english": "great_britain ireland usa",
    "romance": "italy malta portugal spain france romania",
    "germanic": "the_netherlands east_frisia germany austria denmark norway sweden iceland",
    "slavic": "poland czech_republic slovakia bosnia croatia macedonia montenegro serbia slovenia "
              "bulgaria russia belarus ukraine",
    "asian": "china india japan korea vietnam",
    "mideast": "turkey arabia israel the_stans azerbaijan",
}


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = load_names()
    # Frequencies are log-like hex digits (1 rare .. 13 very common): 2**f approximates a count.
    counts = np.stack([(2.0 ** df[c.split()]).where(df[c.split()] > 0, 0).sum(axis=1)
                       for c in REGIONS.values()], axis=1)
    total = counts.sum(axis=1)
    share = counts.max(axis=1) / np.maximum(total, 1e-9)
    keep = (total > 0) & (share >= 0.75)
    df = df.loc[keep, ["name"]].assign(region=np.array(list(REGIONS))[counts[keep].argmax(axis=1)])
    n = min(12000, len(df))
    df = df.iloc[np.random.default_rng(seed).choice(len(df), n, replace=False)]
    write_tables(workspace, answers, *split_frame(df, seed, stratify="region"), targets=["region"])
