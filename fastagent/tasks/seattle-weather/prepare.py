"""Materialize seattle-weather: vega_datasets' seattle-weather.csv, days split 60/20/20 (stratified)."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file, split_frame, write_tables


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = pd.read_csv(package_file("vega_datasets", "_data/seattle-weather.csv"))
    write_tables(workspace, answers, *split_frame(df, seed, stratify="weather"), targets=["weather"])
