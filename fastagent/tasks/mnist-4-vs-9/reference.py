"""Reference for mnist-4-vs-9: full-resolution pixels -> PCA(40) -> RBF SVM with Platt-scaled
probabilities, trained on train + valid.

Run: python reference.py   (prints the validation log loss of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
flat = lambda X: X.reshape(len(X), -1) / 255.0
model = lambda: make_pipeline(PCA(40, random_state=0), SVC(C=10, probability=True, random_state=0))

m = model().fit(flat(train["X"]), train["y"])
print(f"validation log_loss: {log_loss(valid['y'], m.predict_proba(flat(valid['X']))[:, 1]):.4f}")
m = model().fit(np.concatenate([flat(train["X"]), flat(valid["X"])]), np.concatenate([train["y"], valid["y"]]))
pd.DataFrame({"id": test["id"], "nine": m.predict_proba(flat(test["X"]))[:, 1]}).to_csv("submission.csv", index=False)
