"""Starter for mnist-attributes: one logistic regression per attribute on 4x4-pooled images.

Run: python train.py   (prints the validation mean AUC, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

COLUMNS = ["odd", "prime", "large", "loop"]
train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))


def features(X):
    return X.reshape(len(X), 7, 4, 7, 4).mean(axis=(2, 4)).reshape(len(X), -1) / 255.0


sub = pd.DataFrame({"id": test["id"]})
aucs = []
for j, col in enumerate(COLUMNS):
    model = LogisticRegression(max_iter=100).fit(features(train["X"]), train["y"][:, j])
    aucs.append(roc_auc_score(valid["y"][:, j], model.predict_proba(features(valid["X"]))[:, 1]))
    sub[col] = model.predict_proba(features(test["X"]))[:, 1]
print(f"validation auc: {np.mean(aucs):.4f}")
sub.to_csv("submission.csv", index=False)
