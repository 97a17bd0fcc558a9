"""Starter for name-gender: logistic regression on the name's last letter.

Run: python train.py   (prints the validation AUC, writes submission.csv)
"""
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
LETTERS = list("abcdefghijklmnopqrstuvwxyz")
last = lambda df: pd.get_dummies(df["name"].str[-1].str.lower()).reindex(columns=LETTERS, fill_value=0)

model = LogisticRegression(max_iter=1000).fit(last(train), train["female"])
print(f"validation auc: {roc_auc_score(valid['female'], model.predict_proba(last(valid))[:, 1]):.4f}")
pd.DataFrame({"id": test["id"], "female": model.predict_proba(last(test))[:, 1]}).to_csv("submission.csv", index=False)
