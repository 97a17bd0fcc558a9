"""Reference for seattle-weather: gradient boosting on the measurements plus the date (year, day of
year: the station's labelling changed over the years); trained on train + valid.

Run: python reference.py   (prints the validation accuracy of a train-only fit, writes submission.csv)
"""
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier

train, valid, test = (pd.read_csv(f"data/{s}.csv") for s in ("train", "valid", "test"))


def features(df):
    date = pd.to_datetime(df["date"])
    X = df[["precipitation", "temp_max", "temp_min", "wind"]].copy()
    X["year"], X["doy"] = date.dt.year, date.dt.dayofyear
    X["range"] = X["temp_max"] - X["temp_min"]
    return X


model = lambda: HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, max_depth=4, random_state=0)
m = model().fit(features(train), train["weather"])
print(f"validation accuracy: {(m.predict(features(valid)) == valid['weather']).mean():.4f}")
both = pd.concat([train, valid])
m = model().fit(features(both), both["weather"])
pd.DataFrame({"id": test["id"], "weather": m.predict(features(test))}).to_csv("submission.csv", index=False)
