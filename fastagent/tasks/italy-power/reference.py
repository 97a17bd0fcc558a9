"""Reference for italy-power: an RBF SVM on the raw 24 hourly values and their first differences,
trained on train + valid.

Run: python reference.py   (prints the validation accuracy of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.svm import SVC

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
features = lambda X: np.concatenate([X, np.diff(X, axis=1)], axis=1)

m = SVC(C=10).fit(features(train["X"]), train["y"])
print(f"validation accuracy: {(m.predict(features(valid['X'])) == valid['y']).mean():.4f}")
m = SVC(C=10).fit(features(np.concatenate([train["X"], valid["X"]])), np.concatenate([train["y"], valid["y"]]))
pd.DataFrame({"id": test["id"], "label": m.predict(features(test["X"]))}).to_csv("submission.csv", index=False)
