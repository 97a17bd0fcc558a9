"""Starter for gunpoint: logistic regression on the series' mean, spread, and peak position.

Run: python train.py   (prints the validation log loss, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
features = lambda X: np.stack([X.mean(1), X.std(1), X.argmax(1) / X.shape[1]], axis=1)

model = LogisticRegression(max_iter=1000).fit(features(train["X"]), train["y"])
print(f"validation log_loss: {log_loss(valid['y'], model.predict_proba(features(valid['X']))[:, 1]):.4f}")
sub = pd.DataFrame({"id": test["id"], "point": model.predict_proba(features(test["X"]))[:, 1]})
sub.to_csv("submission.csv", index=False)
