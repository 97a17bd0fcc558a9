"""Starter for penguins-size: one linear regression per target on bill length alone.

Run: python train.py   (prints the validation mean RMSLE, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression

TARGETS = ["body_mass_g", "flipper_length_mm"]
train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
features = ["bill_length_mm"]
# A handful of rows lack measurements: fill with the training mean.
fill = lambda df: df[features].fillna(train[features].mean())

sub, errs = pd.DataFrame({"id": test["id"]}), []
for target in TARGETS:
    model = LinearRegression().fit(fill(train), train[target])
    errs.append(np.sqrt(np.mean((np.log1p(model.predict(fill(valid))) - np.log1p(valid[target])) ** 2)))
    sub[target] = model.predict(fill(test))
print(f"validation rmsle: {np.mean(errs):.4f}")
sub.to_csv("submission.csv", index=False)
