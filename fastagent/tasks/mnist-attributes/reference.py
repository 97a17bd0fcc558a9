"""Reference for mnist-attributes: one RBF SVM per attribute on PCA(50) of the full-resolution
pixels, scored by its decision value; trained on train + valid.

Run: python reference.py   (prints the validation mean AUC of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.svm import SVC

COLUMNS = ["odd", "prime", "large", "loop"]
train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
flat = lambda X: X.reshape(len(X), -1) / 255.0
pca = PCA(50, random_state=0).fit(flat(train["X"]))
Xtr, Xva, Xte = (pca.transform(flat(d["X"])) for d in (train, valid, test))

aucs, sub = [], pd.DataFrame({"id": test["id"]})
for j, col in enumerate(COLUMNS):
    m = SVC(C=10).fit(Xtr, train["y"][:, j])
    aucs.append(roc_auc_score(valid["y"][:, j], m.decision_function(Xva)))
    m = SVC(C=10).fit(np.concatenate([Xtr, Xva]), np.concatenate([train["y"][:, j], valid["y"][:, j]]))
    sub[col] = 1 / (1 + np.exp(-m.decision_function(Xte)))
print(f"validation auc: {np.mean(aucs):.4f}")
sub.to_csv("submission.csv", index=False)
