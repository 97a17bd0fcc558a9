"""fastagent.kernels: fused ops for RL on LLMs (token log-probs + entropy, GAE, PPO loss).

Triton on CUDA, C++ (OpenMP) on CPU, pure-torch references as the fallback.
"""
