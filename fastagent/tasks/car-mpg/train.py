"""Starter for car-mpg: linear regression on the car's weight alone.

Run: python train.py   (prints the validation RMSE, writes submission.csv)
"""
import numpy as np
import pandas as pd
from sklearn.linear_model import LinearRegression

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
features, target = ["Weight_in_lbs"], "Miles_per_Gallon"

model = LinearRegression().fit(train[features], train[target])
rmse = np.sqrt(np.mean((model.predict(valid[features]) - valid[target]) ** 2))
print(f"validation rmse: {rmse:.4f}")

pd.DataFrame({"id": test["id"], target: model.predict(test[features])}).to_csv("submission.csv", index=False)
