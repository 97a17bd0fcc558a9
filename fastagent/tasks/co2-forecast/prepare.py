"""Materialize co2-forecast: statsmodels' weekly Mauna Loa CO2 averaged per month (gaps
interpolated). The seed moves the forecast origin back by 6 months per seed step (mod 10), so
different seeds forecast different windows. Time is the `month` column; ids are a random
permutation and the test rows are shuffled, so neither the id nor the row position says which
month a test row is."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import package_file

HORIZON = 24


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    raw = pd.read_csv(package_file("statsmodels", "datasets/co2/co2.csv"), dtype={"date": str})
    raw["date"] = pd.to_datetime(raw["date"], format="%Y%m%d")
    monthly = raw.set_index("date")["co2"].resample("MS").mean().interpolate()
    end = len(monthly) - 6 * (seed % 10)
    df = pd.DataFrame({"id": np.random.default_rng(seed + 1).permutation(end), "month": range(end),
                       "date": monthly.index[:end].strftime("%Y-%m"), "co2": monthly.to_numpy()[:end].round(3)})
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    df.iloc[: end - 2 * HORIZON].to_csv(data / "train.csv", index=False)
    df.iloc[end - 2 * HORIZON: end - HORIZON].to_csv(data / "valid.csv", index=False)
    test = df.iloc[end - HORIZON:].sample(frac=1, random_state=seed)  # the horizon, in random order
    test[["id", "month", "date"]].to_csv(data / "test.csv", index=False)
    test[["id", "co2"]].to_csv(answers / "test.csv", index=False)
