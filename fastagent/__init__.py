"""fastagent: train LLM agents that do ML engineering with step-wise RL (the ML-Agent method), fast.

Entry point: `torchrun --standalone --nproc_per_node=1 fastagent/train.py [--preset=cpu] [--field=value ...]`.
Library use: `fastagent.kernels` (fused log-prob / GAE / PPO ops), `fastagent.sandbox` (forked,
sandboxed process pool), `fastagent.data` (crash-safe trajectory store), `fastagent.config`.
"""

__version__ = "0.1.0"
