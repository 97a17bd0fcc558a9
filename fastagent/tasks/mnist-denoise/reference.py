"""Reference for mnist-denoise: learn each clean pixel from its 5x5 noisy neighbourhood with
gradient-boosted trees on 100k sampled pixels, clip to [0, 1]; trained on train + valid.

Run: python reference.py   (prints the validation RMSE of a train-only fit, writes submission.csv)
"""
import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view
from sklearn.ensemble import HistGradientBoostingRegressor

train, valid, test = (np.load(f"data/{s}.npz") for s in ("train", "valid", "test"))
K = 5


def patches(X):
    padded = np.pad(X, ((0, 0), (K // 2, K // 2), (K // 2, K // 2)), mode="constant")
    return sliding_window_view(padded, (K, K), axis=(1, 2)).reshape(-1, K * K)  # (N*28*28, 25)


def fit(X, Y):
    A, b = patches(X), Y.reshape(-1)
    take = np.random.default_rng(0).choice(len(A), 100_000, replace=False)
    return HistGradientBoostingRegressor(max_iter=150, learning_rate=0.15, random_state=0).fit(A[take], b[take])


predict = lambda model, X: np.clip(model.predict(patches(X)), 0, 1).reshape(X.shape)
model = fit(train["X"], train["y"])
print(f"validation rmse: {np.sqrt(np.mean((predict(model, valid['X']) - valid['y']) ** 2)):.4f}")
model = fit(np.concatenate([train["X"], valid["X"]]), np.concatenate([train["y"], valid["y"]]))
pred = predict(model, test["X"])
ids = [f"{i}_{r}_{c}" for i in test["id"] for r in range(28) for c in range(28)]
pd.DataFrame({"id": ids, "value": pred.reshape(-1)}).to_csv("submission.csv", index=False)
