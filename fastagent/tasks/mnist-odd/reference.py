"""Reference for mnist-odd: full-resolution pixels -> PCA(50) -> RBF SVM on the odd/even label,
scored by its decision value; trained on train + valid.

Run: python reference.py   (prints the validation AUC, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.svm import SVC

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
flat = lambda X: X.reshape(len(X), -1) / 255.0
X = np.concatenate([flat(train["X"]), flat(valid["X"])])
y = np.concatenate([train["y"], valid["y"]])

model = make_pipeline(PCA(50, random_state=0), SVC(C=10, gamma="scale"))
model.fit(flat(train["X"]), train["y"])
print(f"validation auc: {roc_auc_score(valid['y'], model.decision_function(flat(valid['X']))):.4f}")
model.fit(X, y)
odd = 1 / (1 + np.exp(-model.decision_function(flat(test["X"]))))  # squash scores into (0, 1)
pd.DataFrame({"id": test["id"], "odd": odd}).to_csv("submission.csv", index=False)
