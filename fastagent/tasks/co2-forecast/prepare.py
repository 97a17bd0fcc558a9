"""Materialize co2-forecast: statsmodels' weekly Mauna Loa CO2 averaged per month (gaps
interpolated). The seed moves the forecast origin back by 6 months per seed step (mod 10), so
different seeds forecast different windows."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file

HORIZON = 24


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    raw = pd.read_csv(package_file("statsmodels", "datasets/co2/co2.csv"), dtype={"date": str})
    raw["date"] = pd.to_datetime(raw["date"], format="%Y%m%d")
    monthly = raw.set_index("date")["co2"].resample("MS").mean().interpolate()
    end = len(monthly) - 6 * (seed % 10)
    df = pd.DataFrame({"id": range(end), "date": monthly.index[:end].strftime("%Y-%m"),
                       "co2": monthly.to_numpy()[:end].round(3)})
    data = workspace / "data"
    data.mkdir(parents=True, exist_ok=True)
    answers.mkdir(parents=True, exist_ok=True)
    df.iloc[: end - 2 * HORIZON].to_csv(data / "train.csv", index=False)
    df.iloc[end - 2 * HORIZON: end - HORIZON].to_csv(data / "valid.csv", index=False)
    df.iloc[end - HORIZON:][["id", "date"]].to_csv(data / "test.csv", index=False)
    df.iloc[end - HORIZON:][["id", "co2"]].to_csv(answers / "test.csv", index=False)
