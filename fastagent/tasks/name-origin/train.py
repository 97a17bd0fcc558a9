"""Starter for name-origin: multinomial logistic regression on the name's first and last letters.

Run: python train.py   (prints the validation log loss, writes submission.csv)
"""
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss

REGIONS = ["english", "romance", "germanic", "slavic", "asian", "mideast"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
LETTERS = list("abcdefghijklmnopqrstuvwxyz")


def features(df):
    name = df["name"].str.lower()
    first = pd.get_dummies(name.str[0]).reindex(columns=LETTERS, fill_value=0).add_prefix("first_")
    last = pd.get_dummies(name.str[-1]).reindex(columns=LETTERS, fill_value=0).add_prefix("last_")
    return pd.concat([first, last], axis=1).astype(float)


model = LogisticRegression(max_iter=1000).fit(features(train), train["region"])
proba = pd.DataFrame(model.predict_proba(features(valid)), columns=model.classes_)[REGIONS]
print(f"validation log_loss: {log_loss(valid['region'], proba[sorted(REGIONS)], labels=sorted(REGIONS)):.4f}")
sub = pd.DataFrame(model.predict_proba(features(test)), columns=model.classes_)[REGIONS]
sub.insert(0, "id", test["id"].to_numpy())
sub.to_csv("submission.csv", index=False)
