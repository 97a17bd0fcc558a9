"""Reference for word-sounds: character 1-4-grams with word-boundary markers (TF-IDF), one logistic
regression per sound; trained on train + valid.

Run: python reference.py   (prints the validation mean AUC of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

SOUNDS = ["th", "sh", "ch", "jh", "ng", "zh"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
marked = lambda df: "<" + df["word"] + ">"


def fit_predict(fit_df, pred_df):
    vec = TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True)
    X, Xp = vec.fit_transform(marked(fit_df)), vec.transform(marked(pred_df))
    return {s: LogisticRegression(C=10, max_iter=2000).fit(X, fit_df[s]).predict_proba(Xp)[:, 1] for s in SOUNDS}


pred = fit_predict(train, valid)
print(f"validation auc: {np.mean([roc_auc_score(valid[s], pred[s]) for s in SOUNDS]):.4f}")
pd.DataFrame({"id": test["id"], **fit_predict(pd.concat([train, valid]), test)}).to_csv("submission.csv", index=False)
