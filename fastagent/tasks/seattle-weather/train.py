"""Starter for seattle-weather: a depth-2 decision tree on precipitation and wind.

Run: python train.py   (prints the validation accuracy, writes submission.csv)
"""
import pandas as pd
from sklearn.tree import DecisionTreeClassifier

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
features = ["precipitation", "wind"]

model = DecisionTreeClassifier(max_depth=2, random_state=0).fit(train[features], train["weather"])
print(f"validation accuracy: {(model.predict(valid[features]) == valid['weather']).mean():.4f}")
pd.DataFrame({"id": test["id"], "weather": model.predict(test[features])}).to_csv("submission.csv", index=False)
