"""Reference for car-mpg: gradient boosting on the numeric columns, origin one-hot and power-to-weight,
predicting log-MPG, trained on train + valid.

Run: python reference.py   (prints the validation RMSE of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingRegressor

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
target = "Miles_per_Gallon"
NUM = ["Cylinders", "Displacement", "Horsepower", "Weight_in_lbs", "Acceleration", "Year"]


def features(df):
    X = df[NUM].copy()
    for origin in ("USA", "Europe", "Japan"):
        X[origin] = (df["Origin"] == origin).astype(float)
    X["power_to_weight"] = df["Horsepower"] / df["Weight_in_lbs"]
    return X


def fit(df):
    model = HistGradientBoostingRegressor(max_iter=300, learning_rate=0.05, max_leaf_nodes=8,
                                          min_samples_leaf=5, random_state=0)
    return model.fit(features(df), np.log(df[target]))


model = fit(train)
pred = np.exp(model.predict(features(valid)))
print(f"validation rmse: {np.sqrt(np.mean((pred - valid[target]) ** 2)):.4f}")

model = fit(pd.concat([train, valid]))
pd.DataFrame({"id": test["id"], target: np.exp(model.predict(features(test)))}).to_csv("submission.csv", index=False)
