"""Materialize penguins-size: palmerpenguins' table, rows with both targets, split 60/20/20."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file, split_frame, write_tables

TARGETS = ["body_mass_g", "flipper_length_mm"]


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = pd.read_csv(package_file("palmerpenguins", "data/penguins.csv")).dropna(subset=TARGETS)
    write_tables(workspace, answers, *split_frame(df, seed, stratify="species"), targets=TARGETS)
