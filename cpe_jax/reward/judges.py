"""Chat judges: one interface for every backend that turns conversations into judge replies.

A judge is called with a batch of conversations (lists of `{"role", "content"}` messages) and
returns one `JudgeReply` per conversation. Every reply has one of three outcomes, never mixed up:
an `ANSWER` (parsed or not, it is data), a `ROW_ERROR` (the server refused that one conversation:
HTTP 400/413/422, e.g. longer than its context), or `NO_ANSWER` (connection refused or reset,
timeout, 429/5xx after the retry budget, an empty reply), which is stored nowhere and judged again
by a rerun. `FailureStreak` counts consecutive no-answers so a command can stop when the judge
is down. The GRM scorer (`reward/grm.py`) and the pairwise evaluation judge (`eval/winrate.py`)
are both built on this interface, so any backend serves both: a Python callable (tests,
PersonaWorld's programmatic teacher), an OpenAI-compatible HTTP server, or an in-framework Flax
model through the sampler.

`reward.judge_factory.build_judge` is the one factory of these judges.
"""

import concurrent.futures
import dataclasses
import functools
import logging
import os
import random
import threading
import time
from typing import Callable, Optional, Protocol, Sequence, Union

from cpe_jax.data.jsonl import JsonlAppender, read_finished_rows, write_jsonl_atomic
from cpe_jax.errors import UserError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = list  # list[Message]

log = logging.getLogger(__name__)


ANSWER, ROW_ERROR, NO_ANSWER = "answer", "row_error", "no_answer"
DEFAULT_MAX_CONSECUTIVE_FAILURES = 8


@dataclasses.dataclass
class JudgeReply:
    """One judge completion.

    `first_token_logprobs` maps candidate first tokens to their log-probabilities when the backend
    reports them (used for soft pairwise preferences); None when it does not. `outcome` is ANSWER,
    ROW_ERROR or NO_ANSWER; `error` is the server's message (row error) or why there is no answer.
    """

    text: str
    first_token_logprobs: Optional[dict] = None
    outcome: str = ANSWER
    error: str = ""

    @property
    def answered(self) -> bool:
        return self.outcome == ANSWER


class FailureStreak:
    """Consecutive NO_ANSWER outcomes; `tripped` once `limit` of them came in a row.

    An answer or a row error (the server is up) resets the count. Thread-safe, so the HTTP judge's
    workers can share one.
    """

    def __init__(self, limit=DEFAULT_MAX_CONSECUTIVE_FAILURES):
        if not isinstance(limit, int) or limit < 1:
            raise UserError(f"--max-consecutive-failures={limit!r} must be an integer >= 1")
        self.limit = limit
        self.count = 0
        self.last_error = ""
        self._lock = threading.Lock()

    def update(self, outcomes, messages=None):
        """Count `outcomes` (ANSWER / ROW_ERROR / NO_ANSWER, in row order; `messages` say why, for
        the stop message); returns `tripped`."""
        outcomes = list(outcomes)
        messages = list(messages) if messages is not None else [""] * len(outcomes)
        with self._lock:
            for outcome, message in zip(outcomes, messages):
                if outcome == NO_ANSWER:
                    self.count += 1
                    self.last_error = message
                else:
                    self.count = 0
        return self.tripped

    @property
    def tripped(self) -> bool:
        return self.count >= self.limit

    def reason(self):
        last = f" (last: {self.last_error})" if self.last_error else ""
        return f"{self.count} consecutive judge calls got no answer{last}"


class ChatJudge(Protocol):
    def __call__(
        self,
        conversations: Sequence[Conversation],
        *,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        want_logprobs: bool = False,
    ) -> list: ...


class CallableJudge:
    """Wrap `fn(conversation) -> str | JudgeReply` as a ChatJudge (tests, programmatic teachers).

    `fn` may also accept `temperature=` and `seed=`-free keyword arguments; only the conversation
    is passed, so a programmatic judge is deterministic by construction.
    """

    def __init__(self, fn: Callable[[Conversation], Union[str, JudgeReply]]):
        self.fn = fn

    def __call__(self, conversations, *, temperature=0.0, max_tokens=1024, want_logprobs=False):
        replies = []
        for conversation in conversations:
            out = self.fn(conversation)
            replies.append(out if isinstance(out, JudgeReply) else JudgeReply(text=str(out)))
        return replies


# ----------------------------------------------------------------------------------------------
# OpenAI-compatible HTTP judge: OpenAI itself, or vLLM / SGLang / any server speaking
# POST /v1/chat/completions.

_RETRYABLE_STATUS = frozenset({408, 409, 429})  # and every 5xx
ROW_ERROR_STATUS = frozenset({400, 413, 422})  # the server refuses this one conversation (too long, filtered)
_LOGPROB_CANDIDATES = 5


class AcrossHostsJudge:
    """A ChatJudge for a multi-host job in which every host passes the same conversations (eval,
    label, rm-eval): each host asks `judge` for its `host_share` of them, so judge load spreads
    over the hosts, and every host gets every reply, in order, to take the same decisions."""

    def __init__(self, judge: ChatJudge):
        self.judge = judge

    def __getattr__(self, attr):  # name, fn, ...: what describes the judge is the wrapped one's
        if attr == "judge":
            raise AttributeError(attr)
        return getattr(self.judge, attr)

    def __repr__(self):
        return repr(self.judge)

    def __call__(self, conversations, **kwargs):
        from cpe_jax.sharding import spread_over_hosts

        def work(share):
            return [dataclasses.asdict(reply) for reply in self.judge(share, **kwargs)]

        return [JudgeReply(**reply) for reply in spread_over_hosts(work, conversations)]


def backoff_delay(attempt, base, cap, retry_after=None, rng=random):
    """Seconds to wait before retry number `attempt` (0-based): base * 2**attempt, jittered, <= cap.

    The jitter draws from [delay/2, delay] so that many workers rate-limited together do not retry
    in lockstep; a server's Retry-After is honoured as a floor, still capped.
    """
    delay = min(cap, base * 2.0**attempt)
    delay = rng.uniform(delay / 2, delay)
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return delay


class HTTPJudge:
    """ChatJudge over an OpenAI-compatible server, with bounded concurrency and retries.

    Up to `max_concurrency` requests are in flight at once; replies keep the order of the
    conversations. 429, 408, 409, 5xx, timeouts and connection errors are retried up to
    `max_retries` times with jittered exponential backoff (base `backoff_base` s, at most
    `backoff_max` s). Once retries are exhausted, or when the server's answer is empty or not a
    chat completion, the reply is NO_ANSWER (`num_failed` counts them, each is logged); once
    `max_consecutive_failures` no-answers came in a row, the requests not sent yet are not sent
    (NO_ANSWER at once), so a dead server stops a command in one retry budget. HTTP 400/413/422
    is a ROW_ERROR carrying the server's message. Any other 4xx (wrong key, model name or URL)
    cannot be fixed by retrying and raises a one-line UserError.

    The API key is read from the environment variable `api_key_env` (None: a server without
    authentication); it is never logged and is scrubbed from error messages.
    """

    def __init__(
        self,
        model,
        *,
        base_url,
        api_key_env="OPENAI_API_KEY",
        max_concurrency=8,
        max_retries=5,
        timeout=60.0,
        backoff_base=0.5,
        backoff_max=30.0,
        max_consecutive_failures=DEFAULT_MAX_CONSECUTIVE_FAILURES,
    ):
        import openai

        if max_concurrency < 1 or max_retries < 0 or timeout <= 0 or backoff_base < 0 or backoff_max < 0:
            raise UserError(
                "HTTPJudge needs max_concurrency >= 1, max_retries >= 0, timeout > 0 and backoffs >= 0, got "
                f"max_concurrency={max_concurrency}, max_retries={max_retries}, timeout={timeout}, "
                f"backoff_base={backoff_base}, backoff_max={backoff_max}"
            )
        if api_key_env is None:
            api_key = "EMPTY"  # the placeholder vLLM and SGLang accept when they run without a key
        else:
            api_key = os.environ.get(api_key_env, "")
            if not api_key:
                raise UserError(
                    f"environment variable {api_key_env} is not set: it must hold the API key of the judge "
                    f"at {base_url} (use api_key_env=None for a server without authentication)"
                )
        self.model = model
        self.base_url = base_url
        self.max_concurrency = int(max_concurrency)
        self.max_retries = int(max_retries)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.num_failed = 0
        self.streak = FailureStreak(max_consecutive_failures)
        self._api_key = api_key
        self._lock = threading.Lock()
        self._sleep = time.sleep
        self._client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)

    def __repr__(self):
        return f"HTTPJudge(model={self.model!r}, base_url={self.base_url!r})"

    def __call__(self, conversations, *, temperature=0.0, max_tokens=1024, want_logprobs=False):
        conversations = list(conversations)
        if not conversations:
            return []
        request = functools.partial(
            self._complete, temperature=temperature, max_tokens=max_tokens, want_logprobs=want_logprobs
        )
        pool = concurrent.futures.ThreadPoolExecutor(min(self.max_concurrency, len(conversations)))
        try:
            return list(pool.map(request, conversations))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _complete(self, conversation, *, temperature, max_tokens, want_logprobs):
        if self.streak.tripped:  # the server is down: do not queue more work on it
            why = f"not sent, the server is down: {self.streak.last_error}"
            return JudgeReply(text="", outcome=NO_ANSWER, error=why)
        reply = self._attempts(conversation, temperature=temperature, max_tokens=max_tokens,
                               want_logprobs=want_logprobs)
        self.streak.update([reply.outcome], [reply.error])
        return reply

    def _attempts(self, conversation, *, temperature, max_tokens, want_logprobs):
        import openai

        extra = {"logprobs": True, "top_logprobs": _LOGPROB_CANDIDATES} if want_logprobs else {}
        reason = ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                completion = self._client.chat.completions.create(
                    model=self.model,
                    messages=conversation,
                    temperature=temperature,
                    max_tokens=max_tokens,
                    **extra,
                )
                return self._reply(completion, want_logprobs)
            except openai.APIConnectionError as e:  # includes timeouts
                reason = type(e).__name__
            except openai.APIStatusError as e:
                message = " ".join(str(e.message).split())[:300]
                if e.status_code in ROW_ERROR_STATUS:
                    return JudgeReply(text="", outcome=ROW_ERROR, error=self._scrub(f"HTTP {e.status_code}: {message}"))
                if not (e.status_code in _RETRYABLE_STATUS or e.status_code >= 500):
                    raise UserError(
                        self._scrub(f"judge {self.model!r} at {self.base_url} refused a request: {message}")
                    ) from None
                reason = f"HTTP {e.status_code}"
                retry_after = _retry_after_seconds(e.response.headers)
            if attempt < self.max_retries:
                self._sleep(backoff_delay(attempt, self.backoff_base, self.backoff_max, retry_after))
        return self._failed(f"no answer after {self.max_retries + 1} attempts (last: {reason})")

    def _reply(self, completion, want_logprobs):
        try:
            choice = completion.choices[0]
            text = choice.message.content or ""
        except (AttributeError, IndexError, TypeError):
            return self._failed("the server's answer is not a chat completion")
        if not text:
            return self._failed("the server's answer is empty")
        logprobs = None
        if want_logprobs:
            content = getattr(choice.logprobs, "content", None)
            if content:
                logprobs = {top.token: top.logprob for top in content[0].top_logprobs or []}
        return JudgeReply(text=text, first_token_logprobs=logprobs)

    def _failed(self, why):
        with self._lock:
            self.num_failed += 1
        why = self._scrub(why)
        log.warning(f"judge {self.model!r} at {self.base_url}: {why}; no answer (judged again by a rerun)")
        return JudgeReply(text="", outcome=NO_ANSWER, error=why)

    def _scrub(self, message):
        """Remove the API key from a message (servers sometimes echo it back)."""
        if len(self._api_key) >= 6:
            message = message.replace(self._api_key, "***")
        return message


def _retry_after_seconds(headers):
    """The Retry-After header in seconds, when the server sent one as a number."""
    try:
        return max(0.0, float(headers.get("retry-after")))
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------
# Row errors: what the server refused, kept beside a command's output so a rerun does not resend it.


class RowErrorLog:
    """`OUT.errors.jsonl`: one row per refused input row, `{"key", "id", "line", "error"}`.

    Read on start (those rows are skipped, counted and listed again, never resent; delete the file
    to retry them), appended and flushed as errors come, rewritten in input order by `finish`.
    With `skip=False` the first row error stops the command instead (UserError naming the row).
    """

    def __init__(self, path, *, skip=True):
        self.path, self.skip = path, skip
        self.rows = {row["key"]: row for _, row in read_finished_rows(
            path, lambda row: isinstance(row, dict) and "key" in row, "not a row error written by cpe-jax (fix or move the file)")}

    def __contains__(self, key):
        return key in self.rows

    def __len__(self):
        return len(self.rows)

    def add(self, key, row_id, line, error, where):
        """Record one refused row (or raise when not skipping); `where` names it in messages."""
        message = f"{where}: the judge refused this row ({error})"
        if not self.skip:
            raise UserError(message + "; pass --skip-row-errors to record it and go on")
        log.warning("%s; recorded in %s", message, self.path)
        row = {"key": key, "id": row_id, "line": line, "error": error}
        self.rows[key] = row
        with JsonlAppender(self.path) as f:
            f.write(row)

    def finish(self, order):
        """Rewrite the file in the order of `order` (keys), so reruns leave the same file."""
        if not self.rows:
            return
        rank = {key: i for i, key in enumerate(order)}
        rows = sorted(self.rows.values(), key=lambda r: rank.get(r["key"], len(rank)))
        write_jsonl_atomic(self.path, rows)

    def listing(self, limit=5):
        """'id 7 (line 7): HTTP 400: ...; ...' for the end-of-run summary."""
        rows = list(self.rows.values())
        text = "; ".join(f"id {r['id']} (line {r['line']}): {r['error']}" for r in rows[:limit])
        return text + (f"; and {len(rows) - limit} more" if len(rows) > limit else "")
