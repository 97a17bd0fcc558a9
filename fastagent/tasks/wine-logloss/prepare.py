"""Materialize wine-logloss: scikit-learn's bundled wine table, split 60/20/20 (stratified)."""
from pathlib import Path

from fastagent.tasks._prepare import split_frame, write_tables


def prepare(workspace: Path, answers: Path, seed: int) -> None:
    from sklearn.datasets import load_wine
    df = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    df.columns = [c.replace("/", "_") for c in df.columns]  # od280/od315_of_diluted_wines
    write_tables(workspace, answers, *split_frame(df, seed, stratify="cultivar"), targets=["cultivar"])
