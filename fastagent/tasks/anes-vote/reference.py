"""Reference for anes-vote: logistic regression on every column plus the voter's distance to each
candidate on the left-right scale, trained on train + valid.

Run: python reference.py   (prints the validation accuracy of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))


def features(df):
    X = df.drop(columns=["id", "vote"], errors="ignore").copy()
    X["log_popul"] = np.log1p(X.pop("popul"))
    X["dist_clinton"] = (df["selfLR"] - df["ClinLR"]).abs()
    X["dist_dole"] = (df["selfLR"] - df["DoleLR"]).abs()
    return X


model = lambda: make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
m = model().fit(features(train), train["vote"])
print(f"validation accuracy: {(m.predict(features(valid)) == valid['vote']).mean():.4f}")
both = pd.concat([train, valid])
m = model().fit(features(both), both["vote"])
pd.DataFrame({"id": test["id"], "vote": m.predict(features(test))}).to_csv("submission.csv", index=False)
