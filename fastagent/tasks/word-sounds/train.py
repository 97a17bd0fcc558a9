"""Starter for word-sounds: per sound, logistic regression on the counts of single letters.

Run: python train.py   (prints the validation mean AUC, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

SOUNDS = ["th", "sh", "ch", "jh", "ng", "zh"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
vec = CountVectorizer(analyzer="char", ngram_range=(1, 1)).fit(train["word"])
Xtr, Xva, Xte = (vec.transform(d["word"]) for d in (train, valid, test))

sub, aucs = pd.DataFrame({"id": test["id"]}), []
for s in SOUNDS:
    model = LogisticRegression(max_iter=1000).fit(Xtr, train[s])
    aucs.append(roc_auc_score(valid[s], model.predict_proba(Xva)[:, 1]))
    sub[s] = model.predict_proba(Xte)[:, 1]
print(f"validation auc: {np.mean(aucs):.4f}")
sub.to_csv("submission.csv", index=False)
