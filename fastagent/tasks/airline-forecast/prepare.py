"""Materialize airline-forecast: sktime's bundled Airline series. The seed moves the forecast
origin back by 3 months per seed step (mod 4), so different seeds forecast different windows."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file

HORIZON = 12


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    raw = pd.read_csv(package_file("sktime", "datasets/data/Airline/Airline.csv"))
    end = len(raw) - 3 * (seed % 4)
    df = pd.DataFrame({"id": range(end), "date": raw["Date"][:end], "passengers": raw["Passengers"][:end]})
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    df.iloc[: end - 2 * HORIZON].to_csv(data / "train.csv", index=False)
    df.iloc[end - 2 * HORIZON: end - HORIZON].to_csv(data / "valid.csv", index=False)
    df.iloc[end - HORIZON:][["id", "date"]].to_csv(data / "test.csv", index=False)
    df.iloc[end - HORIZON:][["id", "passengers"]].to_csv(answers / "test.csv", index=False)
