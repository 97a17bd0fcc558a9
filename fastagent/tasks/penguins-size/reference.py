"""Reference for penguins-size: ridge regression per target on species, sex and island one-hots plus
bill measurements and their species interactions, predicting log targets; trained on train + valid.

Run: python reference.py   (prints the validation mean RMSLE of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import Ridge

TARGETS = ["body_mass_g", "flipper_length_mm"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
NUM = ["bill_length_mm", "bill_depth_mm"]


def features(df):
    num = df[NUM].fillna(train[NUM].mean())
    num = (num - train[NUM].mean()) / train[NUM].std()
    X = pd.concat([num, pd.get_dummies(df[["species", "island"]]).astype(float)], axis=1)
    X["male"] = (df["sex"] == "male").astype(float)
    X["female"] = (df["sex"] == "female").astype(float)
    for sp in ("Adelie", "Chinstrap", "Gentoo"):
        for c in NUM:
            X[f"{c}_{sp}"] = num[c] * (df["species"] == sp)
    return X.reindex(columns=sorted(X.columns), fill_value=0.0)


def fit_predict(fit_df, pred_df, target):
    cols = features(fit_df).columns
    model = Ridge(alpha=1.0).fit(features(fit_df), np.log1p(fit_df[target]))
    return np.expm1(model.predict(features(pred_df).reindex(columns=cols, fill_value=0.0)))


errs = [np.sqrt(np.mean((np.log1p(fit_predict(train, valid, t)) - np.log1p(valid[t])) ** 2)) for t in TARGETS]
print(f"validation rmsle: {np.mean(errs):.4f}")
both = pd.concat([train, valid])
sub = pd.DataFrame({"id": test["id"], **{t: fit_predict(both, test, t) for t in TARGETS}})
sub.to_csv("submission.csv", index=False)
