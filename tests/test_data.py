"""Trajectory store: SIGKILL crash safety with a real killed writer, corruption recovery, ShareGPT."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from hypothesis import given, settings, strategies as st

from fastagent.data import (HEADER, StepRecord, StoreError, TrajectoryWriter, episodes, export_sharegpt,
                            import_sharegpt, read_records, scan, to_sharegpt)


def make_record(i: int, episode: str = "e0", big: int = 0) -> StepRecord:
    prompt = [{"role": "system", "content": "You are a helpful ML research agent."},
              {"role": "user", "content": f"Task {i}: improve the score"}]
    return StepRecord(task="iris", episode=episode, step=i, prompt=prompt,
                      response=f"Thought: step {i}\nAction: List Files\nAction Input: {{\"dir_path\": \".\"}}" + "x" * big,
                      response_ids=list(range(i, i + 5)), action={"name": "List Files", "args": {"dir_path": "."}},
                      observation=f"train.py data/ ({i})", reward=0.5 - i, reward_parts={"kind": "no_score", "value": 0.0},
                      metric_before=0.9, metric_after=None if i % 2 else 0.91, snapshot=f"snap{i}",
                      timings={"generate": 0.1 * i}, meta={"ideas": ["use a random forest"]})


def test_roundtrip_and_append(tmp_path):
    path = tmp_path / "t.traj"
    recs = [make_record(i) for i in range(5)]
    with TrajectoryWriter(path) as w:
        w.extend(recs[:3])
    with TrajectoryWriter(path) as w:  # reopen and append
        w.extend(recs[3:])
    assert read_records(path) == recs


WRITER = textwrap.dedent("""
    import sys
    from fastagent.data import TrajectoryWriter, StepRecord
    w = TrajectoryWriter(sys.argv[1])
    i = 0
    while True:
        w.append(StepRecord(task="t", episode="e", step=i, prompt=[], response="y" * (i % 7919) * 37))
        print(i, flush=True)   # record i is fully written
        i += 1
""")


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_sigkill_mid_write_loses_at_most_the_record_being_written(tmp_path, delay):
    path = tmp_path / "killed.traj"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    acked = -1
    deadline = time.monotonic() + 60
    while acked < 20 and time.monotonic() < deadline:  # wait until it is really writing
        acked = int(proc.stdout.readline())
    time.sleep(delay)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    acked = max([acked] + [int(x) for x in proc.stdout.read().split()])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = read_records(path)
    steps = [r.step for r in recs]
    assert steps == list(range(len(steps))), "records must be a gap-free prefix"
    assert len(steps) >= acked + 1, "every acknowledged record survives"
    assert all(r.response == "y" * (r.step % 7919) * 37 for r in recs)
    _, problems = scan(path)
    assert len(problems) <= 1 and all("truncated" in p for _, p in problems)
    # a new writer cuts the torn tail and appends cleanly after the last intact record
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TrajectoryWriter(path) as w:
            w.append(make_record(99))
    recs2 = read_records(path, strict=True)
    assert [r.step for r in recs2] == steps + [99]


def test_truncated_file_reports_offset_and_keeps_prefix(tmp_path):
    path = tmp_path / "t.traj"
    with TrajectoryWriter(path) as w:
        w.extend(make_record(i) for i in range(4))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.warns(UserWarning, match=r"t\.traj: damaged record at byte offset \d+: truncated"):
        recs = read_records(path)
    assert [r.step for r in recs] == [0, 1, 2]
    with pytest.raises(StoreError, match="t.traj.*offset"):
        read_records(path, strict=True)


def test_corruption_in_the_middle_recovers_records_before_and_after(tmp_path):
    path = tmp_path / "c.traj"
    with TrajectoryWriter(path) as w:
        w.extend(make_record(i) for i in range(6))
    data = bytearray(path.read_bytes())
    # find the third frame and flip a payload byte
    offsets, pos = [], 0
    while pos < len(data):
        offsets.append(pos)
        pos += HEADER.size + HEADER.unpack_from(data, pos)[1]
    data[offsets[2] + HEADER.size + 5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"offset {offsets[2]}: checksum mismatch"):
        recs = read_records(path)
    assert [r.step for r in recs] == [0, 1, 3, 4, 5]


@settings(max_examples=40, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000), flip=st.integers(min_value=0, max_value=10_000))
def test_reader_never_raises_on_damage(tmp_path_factory, cut, flip):
    path = tmp_path_factory.mktemp("fuzz") / "f.traj"
    with TrajectoryWriter(path) as w:
        w.extend(make_record(i) for i in range(8))
    data = bytearray(path.read_bytes())
    data[flip % len(data)] ^= 0x5A
    path.write_bytes(bytes(data[: max(1, len(data) - cut % len(data))]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recs = read_records(path)
    assert all(r == make_record(r.step) for r in recs)  # whatever comes back is intact


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        read_records(tmp_path / "nope.traj")


def full_history_episode(n: int, name: str) -> list[StepRecord]:
    """Steps whose prompts are the full history, as a multi-turn sample reconstructs them."""
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": f"task {name}"}]
    out = []
    for i in range(n):
        r = make_record(i, episode=name)
        r.prompt = [dict(m) for m in msgs]
        out.append(r)
        msgs += [{"role": "assistant", "content": r.response}, {"role": "user", "content": r.observation}]
    return out


@pytest.mark.parametrize("per", ["step", "episode"])
def test_sharegpt_round_trip(tmp_path, per):
    recs = full_history_episode(4, "a") + full_history_episode(3, "b")
    path = tmp_path / "sft.json"
    n = export_sharegpt(recs, path, per=per)
    assert n == (7 if per == "step" else 2)
    samples = json.loads(path.read_text())
    for s in samples:  # what LLaMA-Factory's sharegpt reader expects
        roles = [t["from"] for t in s["conversations"]]
        assert roles[0] == "human" and roles[-1] == "gpt" and s["system"] == "sys"
        assert all(a != b for a, b in zip(roles, roles[1:])), "turns alternate"
    assert import_sharegpt(path) == recs


def test_sharegpt_import_of_foreign_data(tmp_path):
    foreign = [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "a1"},
                                  {"from": "human", "value": "obs"}, {"from": "gpt", "value": "a2"}]}]
    (tmp_path / "f.json").write_text(json.dumps(foreign))
    recs = import_sharegpt(tmp_path / "f.json")
    assert [r.response for r in recs] == ["a1", "a2"]
    assert recs[0].observation == "obs" and recs[1].prompt[-1] == {"role": "user", "content": "obs"}
    assert len(episodes(recs)) == 1
    (tmp_path / "bad.json").write_text(json.dumps([{"conversations": [{"from": "robot", "value": "x"}]}]))
    with pytest.raises(ValueError, match="unknown turn role 'robot'"):
        import_sharegpt(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="per must be"):
        to_sharegpt(recs, per="token")


def test_append_and_export_replace_lone_surrogates(tmp_path):
    # what a surrogateescape-decoded file name or a bad JSON escape gives: UTF-8 cannot hold it
    bad = "name-\udcff-\ud800"
    rec = make_record(0)
    rec.observation, rec.response = bad, bad
    rec.prompt = [{"role": "user", "content": bad}]
    rec.meta = {bad: [bad, {"k": bad}]}
    path = tmp_path / "s.traj"
    with TrajectoryWriter(path) as w:
        w.append(rec)
        w.append(make_record(1))  # the next record is unaffected
    got = read_records(path, strict=True)
    fixed = "name-\ufffd-\ufffd"
    assert got[0].observation == fixed and got[0].response == fixed and got[0].prompt[0]["content"] == fixed
    assert got[0].meta == {fixed: [fixed, {"k": fixed}]} and got[1] == make_record(1)
    assert export_sharegpt(got[:1] + [rec], tmp_path / "s.json") == 2
    assert fixed in (tmp_path / "s.json").read_text(encoding="utf-8")
