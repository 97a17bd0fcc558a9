"""A client for any OpenAI-compatible chat endpoint, and an expert that drives episodes with it.

    from fastagent.expert.teacher import Teacher, TeacherExpert, TeacherError
    teacher = Teacher.from_url("http://host:8000/v1", model="default")
    teacher.wait_ready(timeout_s=180)              # polls {base_url}/models; returns the served names
    text = teacher([{"role": "user", "content": "hi"}])          # the reply's content, a str
    expert = TeacherExpert(teacher, ["use gradient boosting", "add features"])
    response = expert(build_messages(description, history))     # one agent turn, in the format

`python -m fastagent.expert --expert=http://host:8000/v1 --teacher_model=NAME` uses TeacherExpert
in place of the scripted expert: the teacher writes every turn, the environment runs and scores it,
and the recorded prompt of each turn is the policy's own (the ideas and the format reminder the
teacher is given live only in the teacher's copy of the messages).

Requests are plain urllib (no `openai` package); `$OPENAI_API_KEY`, when set, is sent as a Bearer
token. What an attempt can meet, and what happens:
  - connection refused or reset, timeouts, HTTP 408/429 and 5xx: retried with exponential backoff
    (backoff_s * 2**i, each wait at most MAX_BACKOFF_S, or the server's Retry-After within that
    bound), `retries` times after the first attempt;
  - any other HTTP 4xx: fails at once, with the server's own error message;
  - a malformed reply (not JSON, no `choices`, `choices` empty, `message.content` missing or not a
    string) or one over MAX_REPLY_BYTES: retried like a 5xx, then fails;
  - every failure raises TeacherError (a ValueError) naming the URL, what went wrong on the last
    attempt, the number of attempts, and what to check.
The content comes back with a trailing <|endoftext|> / <|im_end|> removed and cut before the first
stop string (in case the server ignored `stop`).

Not guaranteed: the quality of what the teacher writes (TeacherExpert retries a reply that does not
parse once, then returns whatever the second reply is); that `seed` makes replies reproducible
(servers may ignore it); a hard bound on one attempt's time against a hostile server: timeout_s
bounds the connection and each read, and reading the body stops once timeout_s has passed (so an
attempt takes at most about 2 x timeout_s), but a server that drips its status line and headers a
byte at a time can stretch one attempt further. No streaming, no tool calls, no batching.
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable

from fastagent.actions import SECTIONS, ParseError, parse_response

MAX_REPLY_BYTES = 8 << 20  # an untrusted endpoint: never read more of one reply than this
MAX_ERROR_BYTES = 64 << 10  # of an HTTP error's body, for its message
MAX_BACKOFF_S = 30.0  # the longest single wait between attempts (Retry-After included)
END_TOKENS = ("<|endoftext|>", "<|im_end|>")  # stripped from the end of a reply

HINT_DOWN = "is the server running, and is the URL right? check --expert=URL"
HINT_SLOW = "the server is overloaded or stuck: raise timeout_s or lower max_tokens"
HINT_BUSY = "the server is failing or overloaded: check its log, or try again later"
HINT_API = "is --expert=URL an OpenAI-compatible base URL (usually ending in /v1)?"


class TeacherError(ValueError):
    """The teacher endpoint could not give a usable reply; the message says why and what to check."""


class _Failure(Exception):
    """One failed attempt: what went wrong, a hint for the user, and whether another try may help."""

    def __init__(self, what: str, hint: str, retry: bool, status: int = 0, retry_after: float = 0.0):
        super().__init__(what)
        self.what, self.hint, self.retry, self.status, self.retry_after = what, hint, retry, status, retry_after


# ----------------------------------------------------------------------------- one HTTP request

def _read_capped(resp, limit: int, deadline: float, truncate: bool = False) -> bytes:
    """At most `limit` bytes of a response body, read before `deadline` (time.monotonic()).

    Over the limit: a _Failure, or with truncate=True the first `limit` bytes. read1 returns what
    one socket read gives, so a body dripped slowly is still stopped at the deadline.
    """
    length = resp.headers.get("Content-Length", "") if resp.headers else ""
    if not truncate and length.strip().isdigit() and int(length) > limit:
        raise _Failure(f"the reply is {int(length)} bytes, over the {limit}-byte cap", HINT_API, retry=True)
    read = getattr(resp, "read1", None) or resp.read
    chunks, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise _Failure("the reply did not arrive in full within timeout_s", HINT_SLOW, retry=True)
        chunk = read(64 << 10)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            if truncate:
                return b"".join(chunks)[:limit]
            raise _Failure(f"the reply is over the {limit}-byte cap", HINT_API, retry=True)


def _error_message(body: bytes) -> str:
    """The server's error message from an error body (OpenAI, FastAPI or plain text), one short line."""
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        obj = None
    text = body.decode("utf-8", "replace")
    if isinstance(obj, dict):
        err = obj.get("error", obj.get("detail", obj.get("message")))
        if isinstance(err, dict):
            err = err.get("message", err)
        text = err if isinstance(err, str) else json.dumps(err)[:1000]
    text = " ".join(text.split())
    return text[:300] + ("..." if len(text) > 300 else "")


def _hint_4xx(status: int) -> str:
    if status in (401, 403):
        return "the server refused the API key: set $OPENAI_API_KEY"
    if status == 404:
        return "check --teacher_model (the served names are listed at URL/models) and that the URL ends in /v1"
    if status in (400, 413, 422):
        return "the server rejected the request: is the prompt longer than its context, or max_tokens too large?"
    return HINT_API


def _http_failure(e: urllib.error.HTTPError, deadline: float) -> _Failure:
    """An HTTP error status as a _Failure: 408/429/5xx may be retried, other statuses not."""
    body = b""
    if e.fp is not None:
        try:
            body = _read_capped(e, MAX_ERROR_BYTES, deadline, truncate=True)
        except (_Failure, OSError, http.client.HTTPException):
            pass
    msg = _error_message(body)
    what = f"HTTP {e.code}" + (f": {msg}" if msg else "")
    if e.code in (408, 429) or e.code >= 500:
        after = (e.headers.get("Retry-After", "") if e.headers else "").strip()
        return _Failure(what, HINT_BUSY, retry=True, status=e.code,
                        retry_after=float(after) if after.isdigit() else 0.0)
    return _Failure(what, _hint_4xx(e.code), retry=False, status=e.code)


def _http(url: str, data: bytes | None, timeout_s: float, limit: int = MAX_REPLY_BYTES) -> bytes:
    """POST data as JSON (GET when None) and return the body, or raise _Failure for this attempt."""
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    key = os.environ.get("OPENAI_API_KEY", "")
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if data is None else "POST")
    deadline = time.monotonic() + timeout_s
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return _read_capped(resp, limit, deadline)
    except urllib.error.HTTPError as e:
        raise _http_failure(e, deadline) from None
    except urllib.error.URLError as e:  # connection refused, unknown host, timeout while connecting
        if isinstance(e.reason, TimeoutError):
            raise _Failure(f"no answer within timeout_s={timeout_s:g} s", HINT_SLOW, retry=True) from None
        raise _Failure(f"could not connect ({e.reason})", HINT_DOWN, retry=True) from None
    except TimeoutError:  # socket.timeout is TimeoutError: no answer to the request in time
        raise _Failure(f"no answer within timeout_s={timeout_s:g} s", HINT_SLOW, retry=True) from None
    except (http.client.HTTPException, OSError) as e:  # reset, closed mid-reply, garbled status line
        raise _Failure(f"the connection failed ({type(e).__name__}: {e})", HINT_DOWN, retry=True) from None


# ----------------------------------------------------------------------------- chat completions

def _content(body: bytes) -> str:
    """choices[0].message.content of a chat completion body, or a _Failure saying what is missing."""
    try:
        reply = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested absurdly deep
        raise _Failure(f"the reply is not JSON (it starts {body[:60]!r})", HINT_API, retry=True) from None
    if not isinstance(reply, dict) or "choices" not in reply:
        err = reply.get("error") if isinstance(reply, dict) else None
        detail = f" but an error: {_error_message(json.dumps(err).encode())}" if err else ""
        raise _Failure(f"the reply has no 'choices'{detail}", HINT_API, retry=True)
    choices = reply["choices"]
    if not isinstance(choices, list) or not choices:
        raise _Failure("the reply's 'choices' is empty or not a list", HINT_API, retry=True)
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = choice.get("message")
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, str):
        why = f" (finish_reason {choice.get('finish_reason')!r})" if choice.get("finish_reason") else ""
        hint = "a reasoning model may have spent max_tokens thinking: raise max_tokens" if why else HINT_API
        raise _Failure(f"choices[0].message.content is {type(content).__name__}, not text{why}", hint, retry=True)
    return content


def _clean(text: str, stop: list[str]) -> str:
    """text cut before the first stop string, without trailing end-of-turn tokens."""
    for s in stop:
        if s and s in text:
            text = text[:text.index(s)]
    while text.endswith(END_TOKENS):
        text = text[:-len(next(t for t in END_TOKENS if text.endswith(t)))]
    return text


def _with_retries(url: str, attempt: Callable[[], str], retries: int, backoff_s: float) -> str:
    """attempt(), tried 1 + retries times while its _Failure allows a retry; TeacherError at the end."""
    for i in range(retries + 1):
        try:
            return attempt()
        except _Failure as f:
            last = f
            if not f.retry or i == retries:
                break
            time.sleep(min(MAX_BACKOFF_S, max(backoff_s * 2 ** i, f.retry_after)))
    n = i + 1
    raise TeacherError(f"teacher {url}: {last.what} (after {n} attempt{'s' if n > 1 else ''}); {last.hint}")


def _check_settings(max_tokens: int, timeout_s: float, retries: int, backoff_s: float) -> None:
    if not (isinstance(max_tokens, int) and max_tokens >= 1):
        raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not (isinstance(retries, int) and retries >= 0):
        raise ValueError(f"retries must be an integer >= 0, got {retries!r}")
    if not backoff_s >= 0:
        raise ValueError(f"backoff_s must be >= 0, got {backoff_s!r}")


def chat_completion(base_url: str, messages: list[dict[str, str]], *, model: str = "default",
                    max_tokens: int = 1024, temperature: float = 0.7, stop: str | list[str] | None = None,
                    timeout_s: float = 120.0, retries: int = 3, backoff_s: float = 1.0,
                    seed: int | None = None) -> str:
    """The content of one chat completion from POST {base_url}/chat/completions.

    Transient failures are retried `retries` times with exponential backoff; see the module
    docstring for what is retried. Raises TeacherError when no usable reply came, ValueError for
    settings that make no sense.
    """
    _check_settings(max_tokens, timeout_s, retries, backoff_s)
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"teacher URL {base_url!r} must start with http:// or https://, "
                         f"e.g. http://localhost:8000/v1")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    payload: dict = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
    if stops:
        payload["stop"] = stops
    if seed is not None:
        payload["seed"] = seed
    url = base_url.rstrip("/") + "/chat/completions"
    data = json.dumps(payload).encode()
    return _with_retries(url, lambda: _clean(_content(_http(url, data, timeout_s)), stops), retries, backoff_s)


def _model_names(body: bytes) -> list[str]:
    """The model ids of a /models reply ({"data": [{"id": ...}, ...]}); [] for anything else."""
    try:
        data = json.loads(body).get("data")
    except (ValueError, RecursionError, AttributeError):
        return []
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


@dataclass
class Teacher:
    """A chat model behind an OpenAI-compatible endpoint, with its sampling and retry settings."""
    base_url: str  # e.g. http://host:8000/v1 (the part before /chat/completions)
    model: str = "default"  # the served model name
    max_tokens: int = 1024  # tokens per reply
    temperature: float = 0.7
    stop: list[str] | None = None  # stop strings (cut from the reply)
    timeout_s: float = 120.0  # per attempt
    retries: int = 3  # attempts after the first one, for transient failures
    backoff_s: float = 1.0  # the first wait between attempts; doubled each time
    seed: int | None = None  # sent when set; servers may ignore it

    @classmethod
    def from_url(cls, url: str, model: str = "default", **settings) -> Teacher:
        """A Teacher for a base URL as a user writes it: a trailing / or /chat/completions is dropped,
        and /v1 is added to a URL with no path (http://host:8000)."""
        parts = urllib.parse.urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"teacher URL {url!r} is not http(s)://host[:port]/path, "
                             f"e.g. http://localhost:8000/v1")
        path = parts.path.rstrip("/")
        path = path[:-len("/chat/completions")] if path.endswith("/chat/completions") else path
        base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path or "/v1", parts.query, ""))
        return cls(base, model=model, **settings)

    def __call__(self, messages: list[dict[str, str]]) -> str:
        """The teacher's reply to the chat messages."""
        return chat_completion(self.base_url, messages, model=self.model, max_tokens=self.max_tokens,
                               temperature=self.temperature, stop=self.stop, timeout_s=self.timeout_s,
                               retries=self.retries, backoff_s=self.backoff_s, seed=self.seed)

    def wait_ready(self, timeout_s: float = 180.0) -> list[str]:
        """Poll {base_url}/models until the server answers; return the model names it serves.

        Raises TeacherError when it does not answer within timeout_s, refuses the API key, or lists
        models without self.model. A server that answers without a model list is ready ([]).
        """
        url = self.base_url.rstrip("/") + "/models"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                names = _model_names(_http(url, None, min(5.0, max(0.1, deadline - time.monotonic()))))
                break
            except _Failure as f:
                if f.status in (401, 403):
                    raise TeacherError(f"teacher {url}: {f.what}; {f.hint}") from None
                if not f.retry:
                    return []  # it answered (e.g. 404: no /models route)
                last = f
            if time.monotonic() >= deadline:
                raise TeacherError(f"teacher {url}: not ready after {timeout_s:g} s (last: {last.what}); "
                                   f"{last.hint}")
            time.sleep(0.25)
        if names and self.model not in names:
            raise TeacherError(f"teacher {self.base_url} does not serve model {self.model!r}; it serves "
                               f"{', '.join(map(repr, names[:10]))}: pass --teacher_model=NAME")
        return names


# ----------------------------------------------------------------------------- the teacher as expert

FORMAT_REMINDER = ("Format reminder: every response has these parts, in this order: "
                   + ", ".join(f"{s}:" for s in SECTIONS) + " (the tool's arguments as one JSON object).")


def _with_ideas(first_user: str, ideas: list[str]) -> str:
    lines = "\n".join(f"- {idea.strip()}" for idea in ideas)
    return f"{first_user}\n\nIdeas worth trying first:\n{lines}"


class TeacherExpert:
    """Writes each agent turn with a teacher model, seeded with a few ideas (the ML-Agent paper's
    exploration-enriched expert). The caller's messages are never changed."""

    def __init__(self, teacher: Callable[[list[dict[str, str]]], str], ideas: list[str],
                 allowed: set[str] | None = None):
        """teacher: messages -> reply (a Teacher); ideas: the 1-3 ideas this episode starts from;
        allowed: the action names the environment accepts (default: all), for the parse check."""
        if not isinstance(ideas, list) or not all(isinstance(i, str) and i.strip() for i in ideas):
            raise ValueError(f"ideas must be a list of non-empty strings, got {ideas!r}")
        self.teacher, self.ideas, self.allowed = teacher, list(ideas), allowed

    def teacher_messages(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        """The teacher's copy of the policy's messages: the format reminder at the end of the system
        prompt, the ideas at the end of the first user message."""
        own = [dict(m) for m in messages]
        system = next((m for m in own if m.get("role") == "system"), None)
        if system is None:
            own.insert(0, {"role": "system", "content": FORMAT_REMINDER})
        else:
            system["content"] = f"{system.get('content', '')}\n\n{FORMAT_REMINDER}"
        if self.ideas:
            user = next((m for m in own if m.get("role") == "user"), None)
            if user is None:
                own.append({"role": "user", "content": _with_ideas("", self.ideas).lstrip()})
            else:
                user["content"] = _with_ideas(user.get("content", ""), self.ideas)
        return own

    def __call__(self, messages: list[dict[str, str]]) -> str:
        """The teacher's response to the policy's prompt; asked once more if it does not parse."""
        own = self.teacher_messages(messages)
        text = self.teacher(own)
        parsed = parse_response(text, allowed=self.allowed)
        if not isinstance(parsed, ParseError):
            return text
        retry = own + [{"role": "assistant", "content": text},
                       {"role": "user", "content": f"Your response could not be parsed: {parsed.message}. "
                                                   f"Answer again in the format."}]
        return self.teacher(retry)
