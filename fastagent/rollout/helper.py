"""The helper model for Edit Script (AI) and Understand File, from the policy's own engine.

    env = Env(task, pool, root, helper=env_helper(cfg, engine, tokenizer))

With `helper_model="policy"` (the default) the two helper actions go to the same engine the policy
samples from, so a small model can use the whole action space alone; with an http(s) URL they go to
that OpenAI-compatible endpoint instead. The helper answers greedily (temperature 0): it is a tool, not
part of the sampled action, and its tokens are never trained on. It sees the weights the engine holds
(the policy's, up to the last sync), so it never refuses as stale.
"""

from __future__ import annotations

from typing import Any, Callable

from fastagent.chat import stop_token_ids, tokenize_chat
from fastagent.rollout.base import Engine, Sampling


def policy_helper(engine: Engine, tokenizer: Any, max_new_tokens: int = 1024,
                  max_prompt_tokens: int = 3072) -> Callable[[str], str]:
    """A callable prompt -> text answered by engine: the prompt is one user turn in the policy's chat
    format (cut to its last max_prompt_tokens tokens), the answer ends at the turn's end token."""
    room = getattr(engine, "max_model_len", None)  # the engine's own limit wins: prompt + answer must fit
    if room:
        max_new_tokens = min(max_new_tokens, max(room // 4, 1))
        max_prompt_tokens = min(max_prompt_tokens, room - max_new_tokens)
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens, stop_token_ids=tuple(stop_token_ids(tokenizer)))

    def helper(prompt: str) -> str:
        ids = tokenize_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)[0]
        out = engine.generate([ids[-max_prompt_tokens:]], sampling)[0][0]
        return tokenizer.decode(out.token_ids, skip_special_tokens=True)

    return helper


def env_helper(cfg: Any, engine: Engine | None, tokenizer: Any) -> Callable[[str], str] | str | None:
    """What Env(helper=...) gets for cfg.helper_model: the policy's engine ("policy"; None without an
    engine, which hides the two helper actions), or the endpoint URL."""
    if cfg.helper_model == "policy":
        if engine is None:
            return None
        limit = max(cfg.max_seq_len - cfg.max_new_tokens, 256)
        return policy_helper(engine, tokenizer, max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=limit)
    if cfg.helper_model.startswith(("http://", "https://")):
        return cfg.helper_model
    raise ValueError(f"helper_model must be 'policy' or an http(s) URL of an OpenAI-compatible endpoint, "
                     f"got {cfg.helper_model!r}")
