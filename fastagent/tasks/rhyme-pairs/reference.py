"""Reference for rhyme-pairs: hand-made pair features (letter edit distance, the same on the
consonant/vowel skeleton, difflib ratio, shared prefix and suffix lengths, letter-bigram overlap,
lengths, vowel groups) and gradient boosting; trained on train + valid.

Run: python reference.py   (prints the validation Pearson r of a train-only fit, writes submission.csv)
"""
import os
import re
from difflib import SequenceMatcher

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def pair_features(a, b):
    bigrams = lambda w: {w[i:i + 2] for i in range(len(w) - 1)}
    skeleton = lambda w: re.sub(r"[aeiouy]+", "V", w)  # vowel runs -> one symbol, like a vowel sound
    ga, gb, sa, sb = bigrams(a), bigrams(b), skeleton(a), skeleton(b)
    va, vb = re.findall(r"[aeiouy]+", a), re.findall(r"[aeiouy]+", b)
    longest = max(len(a), len(b))
    return [1 - edit_distance(a, b) / longest, edit_distance(a, b), longest,
            1 - edit_distance(sa, sb) / max(len(sa), len(sb)), SequenceMatcher(None, a, b).ratio(),
            len(os.path.commonprefix([a, b])), len(os.path.commonprefix([a[::-1], b[::-1]])),
            len(ga & gb) / max(1, len(ga | gb)), len(a), len(b), abs(len(a) - len(b)), len(va), len(vb),
            float(va[-1:] == vb[-1:]), float(va[:1] == vb[:1])]


features = lambda df: np.array([pair_features(a, b) for a, b in zip(df["word_a"], df["word_b"])])
model = lambda: HistGradientBoostingRegressor(max_iter=300, learning_rate=0.1, random_state=0)

m = model().fit(features(train), train["similarity"])
print(f"validation pearson: {np.corrcoef(m.predict(features(valid)), valid['similarity'])[0, 1]:.4f}")
both = pd.concat([train, valid])
m = model().fit(features(both), both["similarity"])
pd.DataFrame({"id": test["id"], "similarity": m.predict(features(test))}).to_csv("submission.csv", index=False)
