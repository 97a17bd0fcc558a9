"""Reference for name-origin: character 1-4-grams with start/end markers (TF-IDF), multinomial
logistic regression; trained on train + valid.

Run: python reference.py   (prints the validation log loss of a train-only fit, writes submission.csv)
"""
import pandas as pd
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.pipeline import make_pipeline

REGIONS = ["english", "romance", "germanic", "slavic", "asian", "mideast"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
marked = lambda df: "<" + df["name"].str.lower() + ">"
model = lambda: make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 4), sublinear_tf=True),
                              LogisticRegression(C=5, max_iter=2000))

m = model().fit(marked(train), train["region"])
print(f"validation log_loss: {log_loss(valid['region'], m.predict_proba(marked(valid)), labels=m.classes_):.4f}")
both = pd.concat([train, valid])
m = model().fit(marked(both), both["region"])
sub = pd.DataFrame(m.predict_proba(marked(test)), columns=m.classes_)[REGIONS]
sub.insert(0, "id", test["id"].to_numpy())
sub.to_csv("submission.csv", index=False)
