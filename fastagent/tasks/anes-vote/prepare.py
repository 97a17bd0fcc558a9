"""Materialize anes-vote: statsmodels' anes96 table, split 60/20/20 (stratified on vote) with the seed."""
from pathlib import Path

import pandas as pd

from fastagent.tasks._prepare import package_file, split_frame, write_tables

COLUMNS = ["popul", "TVnews", "selfLR", "ClinLR", "DoleLR", "PID", "age", "educ", "income", "vote"]


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    df = pd.read_csv(package_file("statsmodels", "datasets/anes96/anes96.csv"), sep="\t")
    df.columns = [c.strip("'") for c in df.columns]  # the file quotes its header names
    df = df[COLUMNS].astype({"vote": "int64"})
    write_tables(workspace, answers, *split_frame(df, seed, stratify="vote"), targets=["vote"])
