"""Starter for anes-vote: logistic regression on age, education and income.

Run: python train.py   (prints the validation accuracy, writes submission.csv)
"""
import pandas as pd
from sklearn.linear_model import LogisticRegression

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))
features = ["age", "educ", "income"]

model = LogisticRegression(max_iter=1000).fit(train[features], train["vote"])
print(f"validation accuracy: {(model.predict(valid[features]) == valid['vote']).mean():.4f}")
pd.DataFrame({"id": test["id"], "vote": model.predict(test[features])}).to_csv("submission.csv", index=False)
