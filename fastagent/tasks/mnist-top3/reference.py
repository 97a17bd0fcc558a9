"""Reference for mnist-top3: PCA(50) + RBF SVM, guesses ranked by the one-vs-rest decision values;
trained on train + valid.

Run: python reference.py   (prints the validation MAP@3 of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
flat = lambda X: X.reshape(len(X), -1) / 255.0
model = lambda: make_pipeline(PCA(50, random_state=0), SVC(C=10, decision_function_shape="ovr"))
top3 = lambda m, X: m.classes_[np.argsort(-m.decision_function(flat(X)), axis=1)[:, :3]]


def map3(guesses, y):
    return np.mean([1 / (list(g).index(t) + 1) if t in g else 0 for g, t in zip(guesses, y)])


m = model().fit(flat(train["X"]), train["y"])
print(f"validation map@3: {map3(top3(m, valid['X']), valid['y']):.4f}")
m = model().fit(np.concatenate([flat(train["X"]), flat(valid["X"])]), np.concatenate([train["y"], valid["y"]]))
preds = [" ".join(map(str, g)) for g in top3(m, test["X"])]
pd.DataFrame({"id": test["id"], "predictions": preds}).to_csv("submission.csv", index=False)
