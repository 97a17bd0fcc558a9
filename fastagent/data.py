"""Trajectory store: crash-safe append-only msgpack records, readers that recover, ShareGPT export.

One record = one agent step (`StepRecord`). A file is a sequence of frames:

    magic b"FAT1" | payload length (u32 LE) | crc32 of payload (u32 LE) | msgpack payload

Each frame goes to the file in one `write()` on an O_APPEND descriptor, so a writer killed with SIGKILL
mid-write leaves at most one torn frame at the end; every earlier frame is intact. The reader checks
length and checksum of every frame; on a torn or corrupted frame it warns with the file and byte offset,
keeps every intact record before it, and resynchronises on the next magic to recover intact records
after it. A writer that reopens a file with a torn tail cuts the tail off before appending.
Strings are stored as UTF-8; a lone surrogate (which UTF-8 cannot hold) is stored as U+FFFD, so
append() never raises on any str.

Use:
    with TrajectoryWriter("runs/x/expert.traj") as w:
        w.append(StepRecord(task="iris", episode="e0", step=0, ...))
    records = read_records("runs/x/expert.traj")
    export_sharegpt(records, "sft.json")          # the format LLaMA-Factory reads (the paper's SFT)
    records2 = import_sharegpt("sft.json")
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Iterator

import msgpack

from fastagent.chat import scrub_text

MAGIC = b"FAT1"
HEADER = struct.Struct("<4sII")  # magic, payload length, crc32
MAX_RECORD = 1 << 30  # a length above this is corruption, not a record


@dataclass
class StepRecord:
    """One agent step: the state it started from, what the agent said and did, what came back."""

    task: str  # task name
    episode: str  # episode id (steps of one episode share it)
    step: int  # step index within the episode, from 0
    prompt: list[dict[str, str]]  # chat messages the model saw: [{"role": ..., "content": ...}]
    response: str  # the model's text for this turn
    response_ids: list[int] = field(default_factory=list)  # its token ids (empty for text-only teachers)
    action: dict[str, Any] = field(default_factory=dict)  # parsed action {"name", "args"}; {} on a format error
    observation: str = ""  # what the environment answered
    reward: float = 0.0  # the scalar reward
    reward_parts: dict[str, Any] = field(default_factory=dict)  # every component of the reward
    metric_before: float | None = None  # task score before the step
    metric_after: float | None = None  # task score after it (None: no new score)
    snapshot: str = ""  # id of the workspace snapshot the step started from (the RL state)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: generate, execute, score, ...
    source: str = "expert"  # expert | policy | import
    meta: dict[str, Any] = field(default_factory=dict)  # anything else (ideas seeded, model name, ...)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StepRecord":
        known = {f.name for f in fields(cls)}
        rec = cls(**{k: v for k, v in d.items() if k in known})
        extra = {k: v for k, v in d.items() if k not in known}
        if extra:  # fields written by a newer version survive in meta rather than being dropped
            rec.meta = {**rec.meta, **extra}
        return rec


class StoreError(ValueError):
    """A trajectory file that cannot be read: names the file and the byte offset."""


def _scrub(obj: Any) -> Any:
    """obj with every lone surrogate in its strings (keys too) replaced by U+FFFD."""
    if isinstance(obj, str):
        return scrub_text(obj)
    if isinstance(obj, dict):
        return {_scrub(k): _scrub(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_scrub(v) for v in obj]
    return obj


def encode(record: StepRecord | dict[str, Any]) -> bytes:
    """One frame. Strings that UTF-8 cannot hold (lone surrogates) are stored with U+FFFD instead."""
    obj = asdict(record) if isinstance(record, StepRecord) else record
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except UnicodeEncodeError:  # rare: scrub only then, the common path stays one packb
        payload = msgpack.packb(_scrub(obj), use_bin_type=True)
    return HEADER.pack(MAGIC, len(payload), zlib.crc32(payload)) + payload


def _frames(buf: bytes) -> Iterator[tuple[int, dict | None, str]]:
    """Yield (offset, record or None, problem) for every frame; resync after a bad one."""
    pos, n = 0, len(buf)
    while pos < n:
        problem = ""
        if n - pos < HEADER.size:
            problem = f"truncated header ({n - pos} bytes at end of file)"
        else:
            magic, length, crc = HEADER.unpack_from(buf, pos)
            start, end = pos + HEADER.size, pos + HEADER.size + length
            if magic != MAGIC:
                problem = "bad magic (not a record boundary)"
            elif length > MAX_RECORD:
                problem = f"implausible record length {length}"
            elif end > n:
                problem = f"truncated record: needs {length} payload bytes, file has {n - start}"
            elif zlib.crc32(buf[start:end]) != crc:
                problem = "checksum mismatch"
            else:
                try:
                    yield pos, msgpack.unpackb(buf[start:end], raw=False, strict_map_key=False), ""
                    pos = end
                    continue
                except Exception as e:  # a checksum-valid frame that fails to decode is still corrupt
                    problem = f"undecodable payload ({e})"
        yield pos, None, problem
        nxt = buf.find(MAGIC, pos + 1)
        pos = n if nxt < 0 else nxt


def scan(path: str | Path) -> tuple[list[dict[str, Any]], list[tuple[int, str]]]:
    """Read every intact record of a file. Returns (records as dicts, [(offset, problem), ...])."""
    buf = Path(path).read_bytes()
    records, problems = [], []
    for offset, rec, problem in _frames(buf):
        if rec is None:
            problems.append((offset, problem))
        else:
            records.append(rec)
    return records, problems


def read_records(path: str | Path, strict: bool = False) -> list[StepRecord]:
    """Records of a file, oldest first. A damaged region warns (or raises if strict) with file and
    offset; every intact record before and after it is still returned."""
    path = Path(path)
    if not path.exists():
        raise StoreError(f"trajectory file {path} does not exist")
    dicts, problems = scan(path)
    for offset, problem in problems:
        msg = f"{path}: damaged record at byte offset {offset}: {problem}; recovered the intact records around it"
        if strict:
            raise StoreError(msg)
        warnings.warn(msg, stacklevel=2)
    return [StepRecord.from_dict(d) for d in dicts]


class TrajectoryWriter:
    """Append-only writer. `fsync=True` also survives power loss (SIGKILL safety needs no fsync)."""

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path, self.fsync = Path(path), fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size:
            good = self._good_prefix()
            if good < self.path.stat().st_size:
                warnings.warn(f"{self.path}: cut a torn tail at byte offset {good} before appending", stacklevel=2)
                os.truncate(self.path, good)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _good_prefix(self) -> int:
        """Offset after the last intact frame, but only cut a damaged TAIL: a damaged middle stays."""
        buf = self.path.read_bytes()
        end = 0
        for offset, rec, _ in _frames(buf):
            if rec is not None:
                _, length, _ = HEADER.unpack_from(buf, offset)
                end = offset + HEADER.size + length
        return end

    def append(self, record: StepRecord | dict[str, Any]) -> None:
        frame = memoryview(encode(record))
        while frame:  # one write() almost always; loop only on a short write
            frame = frame[os.write(self.fd, frame):]
        if self.fsync:
            os.fsync(self.fd)

    def extend(self, records: Iterable[StepRecord | dict[str, Any]]) -> None:
        for r in records:
            self.append(r)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "TrajectoryWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------- episodes and the states pool

def episodes(records: Iterable[StepRecord]) -> list[list[StepRecord]]:
    """Group records by episode (first-seen order), each sorted by step."""
    groups: dict[str, list[StepRecord]] = {}
    for r in records:
        groups.setdefault(r.episode, []).append(r)
    return [sorted(g, key=lambda r: r.step) for g in groups.values()]


# ---------------------------------------------------------------- ShareGPT (LLaMA-Factory) export

_TO_SHAREGPT = {"user": "human", "assistant": "gpt", "tool": "observation"}
_FROM_SHAREGPT = {v: k for k, v in _TO_SHAREGPT.items()}
_META_FIELDS = ("task", "episode", "step", "response_ids", "action", "reward", "reward_parts",
                "metric_before", "metric_after", "snapshot", "timings", "source", "meta")


def _sharegpt_sample(prompt: list[dict[str, str]], turns: list[tuple[str, str]], steps: list[dict]) -> dict:
    sample: dict[str, Any] = {"conversations": []}
    for m in prompt:
        if m["role"] == "system":
            sample["system"] = m["content"]
        else:
            sample["conversations"].append({"from": _TO_SHAREGPT[m["role"]], "value": m["content"]})
    gpt_turns = []
    for role, text in turns:
        gpt_turns += [len(sample["conversations"])] if role == "gpt" else []
        sample["conversations"].append({"from": role, "value": text})
    # ignored by LLaMA-Factory; lets import restore every field. "turn" marks which gpt turns are steps
    # (in a per-step sample the earlier gpt turns are history only).
    sample["fastagent"] = {"steps": [m | {"turn": t} for m, t in zip(steps, gpt_turns)]}
    return sample


def to_sharegpt(records: Iterable[StepRecord], per: str = "step") -> list[dict[str, Any]]:
    """ShareGPT samples (LLaMA-Factory's `formatting: sharegpt`, columns conversations/system).

    per="step": one sample per step: the exact prompt the model saw plus its response (exact when
    prompts keep only the last K steps of history, as MLAgentBench's do). per="episode": one
    multi-turn sample per episode built from the first prompt, then response / observation turns
    (compact; exact when each prompt is the full history). Per-step samples carry earlier agent turns
    as history: train them with LLaMA-Factory's `mask_history: true` so only the last turn is learned."""
    if per not in ("step", "episode"):
        raise ValueError(f"per must be 'step' or 'episode', got {per!r}")
    out = []
    for ep in episodes(records):
        if per == "step":
            for r in ep:
                meta = {k: getattr(r, k) for k in _META_FIELDS} | {"observation": r.observation}
                out.append(_sharegpt_sample(r.prompt, [("gpt", r.response)], [meta]))
        else:
            turns = []
            for i, r in enumerate(ep):
                turns.append(("gpt", r.response))
                if i + 1 < len(ep):  # a sample must end with a gpt turn; the last observation goes to meta
                    turns.append(("human", r.observation))
            metas = [{k: getattr(r, k) for k in _META_FIELDS} | {"observation": r.observation} for r in ep]
            out.append(_sharegpt_sample(ep[0].prompt, turns, metas))
    return out


def from_sharegpt(samples: list[dict[str, Any]]) -> list[StepRecord]:
    """Records from ShareGPT samples (ours or anyone's: without our metadata, each gpt turn becomes a
    step of a new episode whose prompt is everything before it)."""
    records = []
    for n, sample in enumerate(samples):
        if not isinstance(sample, dict) or not isinstance(sample.get("conversations"), list):
            raise ValueError(f"ShareGPT sample {n} has no 'conversations' list")
        msgs = [{"role": "system", "content": sample["system"]}] if sample.get("system") else []
        metas = {m["turn"]: m for m in sample.get("fastagent", {}).get("steps", [])}
        turns = sample["conversations"]
        for i, turn in enumerate(turns):
            role = _FROM_SHAREGPT.get(turn.get("from"), turn.get("from"))
            if role not in ("user", "assistant", "tool"):
                raise ValueError(f"ShareGPT sample {n}: unknown turn role {turn.get('from')!r}")
            if role == "assistant" and (i in metas or not metas):
                nxt = turns[i + 1]["value"] if i + 1 < len(turns) else ""  # the environment's answer
                meta = metas.get(i) or {"task": "", "episode": f"import-{n}", "source": "import",
                                        "step": sum(t.get("from") == "gpt" for t in turns[:i])}
                rec = StepRecord(prompt=[dict(m) for m in msgs], response=turn["value"],
                                 **{k: v for k, v in meta.items() if k not in ("observation", "turn")})
                rec.observation = meta.get("observation", nxt)
                records.append(rec)
            msgs.append({"role": role, "content": turn["value"]})
    return records


def export_sharegpt(records: Iterable[StepRecord], path: str | Path, per: str = "step") -> int:
    """Write ShareGPT JSON (atomically). Returns the number of samples."""
    samples = to_sharegpt(records, per=per)
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_scrub(samples), ensure_ascii=False, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return len(samples)


def import_sharegpt(path: str | Path) -> list[StepRecord]:
    try:
        samples = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected a ShareGPT list of samples") from None
    if not isinstance(samples, list):
        raise ValueError(f"{path}: expected a JSON list of ShareGPT samples, got {type(samples).__name__}")
    return from_sharegpt(samples)


# ---------------------------------------------------------------- SFT samples and batches
# One SFT sample per step: the prompt exactly as the policy saw it (already windowed to the last
# history_k steps), then the expert's turn. Only that last turn is a target; earlier assistant turns
# in the prompt are context (each is trained as its own step's sample). So the sample's ids start
# with the RL/eval prompt's ids: tokenize_chat(tok, prompt, add_generation_prompt=True).
# numpy and torch are imported inside the functions: the store above must stay light to import.

from fastagent.chat import tokenize_chat  # noqa: E402

def sft_sample(tokenizer: Any, record: StepRecord) -> tuple[list[int], list[int]]:
    """(ids, mask) of one step; mask is 1 on the last assistant turn (content + <|endoftext|>) only."""
    ids, mask = tokenize_chat(tokenizer, [*record.prompt, {"role": "assistant", "content": record.response}])
    end = len(mask)
    while end and not mask[end - 1]:  # the turn's closing <|im_end|>\n
        end -= 1
    start = end
    while start and mask[start - 1]:  # back to the start of the last trained run: the response
        start -= 1
    return ids, [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


def sft_samples(records: Iterable[StepRecord], tokenizer: Any,
                max_seq_len: int) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(samples, n_dropped): one (ids, mask) per record; a sample longer than max_seq_len is dropped
    and counted, never cut (a cut prompt would differ from what the policy saw)."""
    samples, dropped = [], 0
    for r in records:
        ids, mask = sft_sample(tokenizer, r)
        if len(ids) > max_seq_len:
            dropped += 1
        else:
            samples.append((ids, mask))
    return samples, dropped


def sft_steps_per_epoch(n_samples: int, batch_size: int) -> int:
    """Optimizer steps per pass over n_samples (the last batch is filled from the epoch's start)."""
    return -(-n_samples // batch_size)


def sft_batch(lengths: list[int], batch_size: int, micro_batch_size: int, world: int, rank: int,
              seed: int, epoch: int, step: int) -> tuple[list[int], list[list[int]]]:
    """(the step's global sample indices, this rank's micro-batches of indices), deterministic in
    (seed, epoch, step), so a resumed run needs only the cursor.

    Each epoch is one permutation of the samples (seeded by (seed, epoch)); step s takes
    batch_size of it (the last batch wraps around to the permutation's start). Inside the step the
    samples are sorted by length and cut into groups of world * micro_batch_size; group j is
    micro-batch j on every rank (rank r takes every world-th sample of it), so micro-batches hold
    similar lengths (little padding) and every rank runs the same number of forward/backward passes
    on about the same number of tokens (FSDP's collectives run in lockstep)."""
    import numpy as np

    n = len(lengths)
    if batch_size % (world * micro_batch_size):
        raise ValueError(f"batch_size ({batch_size}) must be a multiple of world size x micro_batch_size "
                         f"({world} x {micro_batch_size})")
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    take = [int(perm[(step * batch_size + i) % n]) for i in range(batch_size)]
    ordered = sorted(take, key=lambda i: (lengths[i], i))
    group = world * micro_batch_size
    micro = [ordered[g:g + group][rank::world] for g in range(0, batch_size, group)]
    return take, micro


def sft_collate(samples: list[tuple[list[int], list[int]]], idx: list[int], pad_id: int) -> dict[str, Any]:
    """One micro-batch, right-padded to its longest sample.

    input_ids, labels (B, T) int64 (labels = ids where trained, -100 elsewhere: what HF's loss
    takes); attention_mask (B, T) or None when no sample is padded (the lean loop passes none:
    right padding under causal attention needs none);
    rows (N,) flat indices b * T + t of the positions whose NEXT token is trained and targets (N,)
    those tokens: the only hidden states the loss needs; n_tokens, n_trained (host ints)."""
    import torch

    seqs = [samples[i] for i in idx]
    t = max(len(ids) for ids, _ in seqs)
    input_ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), t), -100, dtype=torch.long)
    attn = torch.zeros((len(seqs), t), dtype=torch.long)
    rows: list[int] = []
    for b, (ids, mask) in enumerate(seqs):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        m = torch.tensor(mask, dtype=torch.bool)
        labels[b, : len(ids)] = torch.where(m, torch.tensor(ids), -100)
        attn[b, : len(ids)] = 1
        rows += [b * t + i - 1 for i in range(1, len(ids)) if mask[i]]
    rows_t = torch.tensor(rows, dtype=torch.long)
    return {"input_ids": input_ids, "labels": labels,
            "attention_mask": None if bool(attn.all()) else attn,
            "rows": rows_t, "targets": input_ids.view(-1)[rows_t + 1],
            "n_tokens": sum(len(ids) for ids, _ in seqs), "n_trained": len(rows)}
