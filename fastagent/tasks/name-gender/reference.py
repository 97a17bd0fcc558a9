"""Reference for name-gender: character 1-4-grams with start/end markers (TF-IDF) and logistic
regression; trained on train + valid.

Run: python reference.py   (prints the validation AUC of a train-only fit, writes submission.csv)
"""
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
marked = lambda df: "<" + df["name"].str.lower() + ">"
model = lambda: make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True),
                              LogisticRegression(C=5, max_iter=2000))

m = model().fit(marked(train), train["female"])
print(f"validation auc: {roc_auc_score(valid['female'], m.predict_proba(marked(valid))[:, 1]):.4f}")
both = pd.concat([train, valid])
m = model().fit(marked(both), both["female"])
pd.DataFrame({"id": test["id"], "female": m.predict_proba(marked(test))[:, 1]}).to_csv("submission.csv", index=False)
