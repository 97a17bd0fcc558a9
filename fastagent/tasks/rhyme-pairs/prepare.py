"""Materialize rhyme-pairs: 12000 word pairs from cmudict (a third random, a third sharing the last
three letters, a third sharing the first three), target = 1 - phoneme edit distance / longer length;
split 60/20/20 with the seed."""
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import load_cmudict, split_frame, write_tables


def edit_distance(a: list[str], b: list[str]) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pron = {w: [p.rstrip("012") for p in ph] for w, ph in load_cmudict().items() if len(w) >= 4}
    words = sorted(pron)
    by_key = {k: defaultdict(list) for k in ("end", "start")}
    for w in words:
        by_key["end"][w[-3:]].append(w)
        by_key["start"][w[:3]].append(w)
    pairs = set()
    while len(pairs) < 12000:
        a = words[rng.integers(len(words))]
        kind = len(pairs) % 3
        pool = words if kind == 0 else by_key["end" if kind == 1 else "start"][a[-3:] if kind == 1 else a[:3]]
        b = pool[rng.integers(len(pool))]
        if a != b:
            pairs.add((a, b))
    rows = [(a, b, round(1 - edit_distance(pron[a], pron[b]) / max(len(pron[a]), len(pron[b])), 4))
            for a, b in sorted(pairs)]
    df = pd.DataFrame(rows, columns=["word_a", "word_b", "similarity"])
    write_tables(workspace, answers, *split_frame(df, seed), targets=["similarity"])
