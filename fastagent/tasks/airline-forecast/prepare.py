"""Materialize airline-forecast: sktime's bundled Airline series. The seed moves the forecast
origin back by 3 months per seed step (mod 4), so different seeds forecast different windows.
Time is the `month` column; ids are a random permutation and the test rows are shuffled, so
neither the id nor the row position says which month a test row is."""
from pathlib import Path

import numpy as np
import pandas as pd

from fastagent.tasks._prepare import package_file

HORIZON = 12


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    raw = pd.read_csv(package_file("sktime", "datasets/data/Airline/Airline.csv"))
    end = len(raw) - 3 * (seed % 4)
    df = pd.DataFrame({"id": np.random.default_rng(seed + 1).permutation(end), "month": range(end),
                       "date": raw["Date"][:end], "passengers": raw["Passengers"][:end]})
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    df.iloc[: end - 2 * HORIZON].to_csv(data / "train.csv", index=False)
    df.iloc[end - 2 * HORIZON: end - HORIZON].to_csv(data / "valid.csv", index=False)
    test = df.iloc[end - HORIZON:].sample(frac=1, random_state=seed)  # the horizon, in random order
    test[["id", "month", "date"]].to_csv(data / "test.csv", index=False)
    test[["id", "passengers"]].to_csv(answers / "test.csv", index=False)
