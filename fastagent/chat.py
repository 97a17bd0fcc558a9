"""The chat format every fastagent model is trained and prompted with, and its tokenization.

Framing is ChatML, which SmolLM2-Instruct and Qwen2.5 both know:

    <|im_start|>system\n{content}<|im_end|>\n
    <|im_start|>user\n{content}<|im_end|>\n
    <|im_start|>assistant\n{content}<|endoftext|><|im_end|>\n

Every assistant turn's content ends with TURN_END (`<|endoftext|>`), the ML-Agent paper's stop word,
and SFT trains the model to emit it. Generation stops on either STOP_STRINGS entry: `<|endoftext|>`
(a fine-tuned policy) or `<|im_end|>` (the instruct model before SFT ends turns with it natively).
Content that already ends with TURN_END (a generation that kept its stop string) is not doubled.
Environment observations go into user turns. Conversations are tokenized without a BOS token
(ChatML models use none), and special-token strings inside content are NOT escaped: an observation
containing a literal `<|im_end|>` becomes that special token. Lone surrogates (a str no UTF-8 text can
hold, e.g. a file name decoded with surrogateescape) are replaced by U+FFFD before tokenizing
(`scrub_text`), so tokenize_chat never raises on them; render_chat keeps them as given.

Use:
    text = render_chat(messages, add_generation_prompt=True)       # the prompt string
    ids, mask = tokenize_chat(tokenizer, messages)                  # SFT: mask=1 on agent tokens
    ids, _ = tokenize_chat(tokenizer, messages[:k], add_generation_prompt=True)   # RL prompt
    params = dict(stop_token_ids=stop_token_ids(tokenizer))        # for vLLM / HF generate

`tokenize_chat` tokenizes the text between assistant contents and each content separately, so the
prompt of turn k is a prefix of the ids of the whole conversation (the same ids in SFT and RL).
`CHAT_TEMPLATE` is the same format as a Jinja template; fastagent sets it as the tokenizer's
`chat_template`, so `tokenizer.apply_chat_template(..., tokenize=False)` equals `render_chat`.
"""

from __future__ import annotations

import re
from typing import Any

TURN_END = "<|endoftext|>"  # ends every assistant turn; the paper's stop word
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
STOP_STRINGS = (TURN_END, IM_END)
ROLES = ("system", "user", "assistant")

# Jinja twin of render_chat (tests assert they agree).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- set content = message['content'] -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- if content.endswith('<|endoftext|>') -%}{%- set content = content[:-13] -%}{%- endif -%}"
    "{{ '<|im_start|>assistant\\n' + content + '<|endoftext|><|im_end|>\\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
assert len(TURN_END) == 13  # the template's slice above


_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub_text(text: str) -> str:
    """text with every lone surrogate replaced by U+FFFD: always encodable as UTF-8."""
    return _SURROGATE.sub("\ufffd", text)


def _check(messages: list[dict[str, Any]]) -> None:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
                         f"got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be a dict with 'role' in {ROLES} and a str 'content'; "
                             f"got {m!r:.200}")


def _assistant_content(content: str) -> str:
    return content[: -len(TURN_END)] if content.endswith(TURN_END) else content


def _segments(messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, is_assistant_content) pieces, in order.

    Assistant pieces hold the content only; TURN_END follows each of them."""
    pieces: list[tuple[str, bool]] = []
    pending = ""  # untrained text since the last assistant content
    for m in messages:
        if m["role"] == "assistant":
            pieces.append((pending + f"{IM_START}assistant\n", False))
            pieces.append((_assistant_content(m["content"]), True))
            pending = f"{IM_END}\n"
        else:
            pending += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
    if add_generation_prompt:
        pending += f"{IM_START}assistant\n"
    pieces.append((pending, False))
    return pieces


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """The conversation as one string; with add_generation_prompt, ready for the assistant's turn."""
    _check(messages)
    return "".join(text + (TURN_END if trained else "")
                   for text, trained in _segments(messages, add_generation_prompt))


def _single_token_id(tokenizer: Any, token: str) -> int:
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"the tokenizer has no single token for {token!r} (it encodes to {ids}); "
                         f"fastagent's chat format needs a ChatML tokenizer with {TURN_END} and "
                         f"{IM_END} (SmolLM2, Qwen2.5) or a fastagent built-in model")
    return ids[0]


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Token ids that end an assistant turn: [id of TURN_END, id of IM_END]."""
    return [_single_token_id(tokenizer, TURN_END), _single_token_id(tokenizer, IM_END)]


def tokenize_chat(tokenizer: Any, messages: list[dict[str, Any]],
                  add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a loss mask of the same length.

    mask[i] is 1 exactly on the tokens of assistant contents and on the TURN_END token after each
    (SFT trains on agent turns only), 0 elsewhere. Decoding the ids gives render_chat(messages)."""
    _check(messages)
    turn_end = _single_token_id(tokenizer, TURN_END)
    pieces = _segments(messages, add_generation_prompt)
    encoded = tokenizer([scrub_text(text) for text, _ in pieces], add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    mask: list[int] = []
    for (_, trained), piece_ids in zip(pieces, encoded):
        ids += piece_ids
        mask += [int(trained)] * len(piece_ids)
        if trained:
            ids.append(turn_end)
            mask.append(1)
    return ids, mask
