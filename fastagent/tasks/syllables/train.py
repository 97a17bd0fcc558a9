"""Starter for syllables: linear regression on the word's length, rounded.

Run: python train.py   (prints the validation kappa, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression
from sklearn.metrics import cohen_kappa_score

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
features = lambda words: words.str.len().to_numpy().reshape(-1, 1)
predict = lambda model, words: np.clip(np.rint(model.predict(features(words))), 1, 6).astype(int)

model = LinearRegression().fit(features(train["word"]), train["syllables"])
kappa = cohen_kappa_score(valid["syllables"], predict(model, valid["word"]), weights="quadratic")
print(f"validation qwk: {kappa:.4f}")
pd.DataFrame({"id": test["id"], "syllables": predict(model, test["word"])}).to_csv("submission.csv", index=False)
