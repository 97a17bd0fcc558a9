"""Materialize car-mpg: vega_datasets' cars.json, rows with a known MPG, split 60/20/20 with the seed."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file, split_frame, write_tables


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = pd.read_json(package_file("vega_datasets", "_data/cars.json"))
    df = df.dropna(subset=["Miles_per_Gallon"])
    df["Year"] = pd.to_datetime(df["Year"]).dt.year
    write_tables(workspace, answers, *split_frame(df, seed), targets=["Miles_per_Gallon"])
