"""HTTPJudge against a real OpenAI-compatible server on 127.0.0.1, scripted per request."""

import collections
import http.server
import json
import logging
import random
import threading
import time

import numpy as np
import pytest

from cpe_jax.errors import UserError
from cpe_jax.reward.grm import GRMScorer, parse_grm_output
from cpe_jax.reward.judges import (ANSWER, NO_ANSWER, ROW_ERROR, CallableJudge, FailureStreak, HTTPJudge, JudgeReply,
                                   backoff_delay)

API_KEY = "sk-test-7f3c9a1b2d4e5f60"
GRM_OK = "<critique>fine</critique>\n<scores>\nHelpfulness: 2\nPersonalization: 3\nNatural: 1\n</scores>"


class ScriptedServer:
    """Speaks POST /v1/chat/completions. `plan[key]` lists the actions for the successive requests
    whose last message is `key`: ("ok",), ("text", str), ("status", code, headers), ("hang", s),
    ("delay", s), ("logprobs", [(token, logprob), ...]), ("not_json",). Default: ("ok",)."""

    def __init__(self):
        self.plan = {}
        self.requests = collections.Counter()
        self.bodies = []
        self.auth_headers = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def next_action(self, key):
        with self.lock:
            self.requests[key] += 1
            actions = self.plan.get(key, [])
            return actions.pop(0) if actions else ("ok",)

    def _handler(self):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = body["messages"][-1]["content"]
                with server.lock:
                    server.bodies.append(body)
                    server.auth_headers.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                self.counted = True
                try:
                    self._act(server.next_action(key), key, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)
                finally:
                    self._leave()

            def _leave(self):
                # A request leaves the count before its reply is written: once the client has the
                # reply it may send its next request while this thread is still winding down.
                if getattr(self, "counted", False):
                    self.counted = False
                    with server.lock:
                        server.in_flight -= 1

            def _act(self, action, key, body):
                kind = action[0]
                if kind == "status":
                    code, headers = action[1], action[2] if len(action) > 2 else {}
                    # a careless server that echoes the credentials back in its error message
                    message = f"refused, credentials {self.headers.get('Authorization')}"
                    return self._send(code, {"error": {"message": message, "type": "error"}}, headers)
                if kind == "hang":
                    time.sleep(action[1])
                    return self._send(200, completion(body["model"], "too late"))
                if kind == "delay":
                    time.sleep(action[1])
                    return self._send(200, completion(body["model"], f"reply to {key}"))
                if kind == "not_json":
                    return self._send_raw(200, b"<html>hello</html>", "text/html")
                if kind == "text":
                    return self._send(200, completion(body["model"], action[1]))
                if kind == "logprobs":
                    return self._send(200, completion(body["model"], action[1][0][0], action[1]))
                return self._send(200, completion(body["model"], f"reply to {key}"))

            def _send(self, code, payload, headers=None):
                self._send_raw(code, json.dumps(payload).encode(), "application/json", headers)

            def _send_raw(self, code, data, content_type, headers=None):
                self._leave()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler


def completion(model, text, top=None):
    logprobs = None
    if top is not None:
        candidates = [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
        logprobs = {"content": [{"token": top[0][0], "logprob": top[0][1], "bytes": None, "top_logprobs": candidates}]}
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop", "logprobs": logprobs}
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


@pytest.fixture
def server():
    s = ScriptedServer()
    yield s
    s.close()


@pytest.fixture
def make_judge(server, monkeypatch):
    monkeypatch.setenv("JUDGE_TEST_KEY", API_KEY)

    def make(**kwargs):
        options = dict(base_url=server.base_url, api_key_env="JUDGE_TEST_KEY", timeout=0.3, backoff_base=0.01)
        options.update(kwargs)
        judge = HTTPJudge("judge-model", **options)
        judge.sleeps = []
        judge._sleep = judge.sleeps.append  # record the backoff instead of waiting it out
        return judge

    return make


def conv(key):
    return [{"role": "system", "content": "be a judge"}, {"role": "user", "content": key}]


def test_replies_keep_input_order_and_concurrency_is_bounded(server, make_judge):
    keys = [f"row {i}" for i in range(16)]
    for i, key in enumerate(keys):
        server.plan[key] = [("delay", 0.02 * (i % 4))]  # later rows often finish first
    replies = make_judge(max_concurrency=3)([conv(k) for k in keys])
    assert [r.text for r in replies] == [f"reply to {k}" for k in keys]
    assert all(isinstance(r, JudgeReply) and r.first_token_logprobs is None for r in replies)
    assert server.max_in_flight <= 3
    assert server.auth_headers[0] == f"Bearer {API_KEY}"
    assert server.bodies[0]["model"] == "judge-model" and server.bodies[0]["temperature"] == 0.0
    assert "logprobs" not in server.bodies[0]


def test_429_and_500_are_retried_with_bounded_backoff(server, make_judge):
    server.plan["a"] = [("status", 429), ("status", 500), ("status", 503), ("ok",)]
    judge = make_judge(max_retries=5, backoff_base=0.5, backoff_max=0.8)
    replies = judge([conv("a"), conv("b")])
    assert [r.text for r in replies] == ["reply to a", "reply to b"]
    assert server.requests == {"a": 4, "b": 1}
    assert len(judge.sleeps) == 3 and judge.num_failed == 0
    # attempt k waits in [d/2, d] with d = min(0.8, 0.5 * 2**k)
    for k, slept in enumerate(judge.sleeps):
        d = min(0.8, 0.5 * 2**k)
        assert d / 2 <= slept <= d


def test_retry_after_header_is_honoured_but_capped(server, make_judge):
    server.plan["a"] = [("status", 429, {"Retry-After": "2"}), ("status", 429, {"Retry-After": "100"}), ("ok",)]
    judge = make_judge(backoff_base=0.001, backoff_max=5.0)
    assert judge([conv("a")])[0].text == "reply to a"
    assert judge.sleeps[0] >= 2.0 and judge.sleeps[1] == 5.0


def test_hang_past_the_timeout_is_retried(server, make_judge):
    server.plan["slow"] = [("hang", 1.0), ("ok",)]
    judge = make_judge(timeout=0.3)
    assert judge([conv("slow")])[0].text == "reply to slow"
    assert server.requests["slow"] == 2 and len(judge.sleeps) == 1


def test_connection_refused_is_retried_then_fails_softly(make_judge, monkeypatch):
    dead = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    port = dead.server_address[1]
    dead.server_close()  # nothing listens on this port any more
    judge = make_judge(base_url=f"http://127.0.0.1:{port}/v1", max_retries=2)
    reply = judge([conv("x")])[0]
    assert reply.outcome == NO_ANSWER and "APIConnectionError" in reply.error
    assert judge.num_failed == 1 and len(judge.sleeps) == 2


def test_after_k_consecutive_no_answers_the_rest_is_not_sent(server, make_judge):
    for i in range(6):
        server.plan[f"r{i}"] = [("status", 503)] * 10
    judge = make_judge(max_retries=1, max_concurrency=1, max_consecutive_failures=3)
    replies = judge([conv(f"r{i}") for i in range(6)])
    assert [r.outcome for r in replies] == [NO_ANSWER] * 6
    assert sum(server.requests.values()) == 3 * 2  # three rows, two attempts each; the rest never sent
    assert "not sent" in replies[5].error and judge.streak.tripped


def test_an_answer_resets_the_failure_streak():
    streak = FailureStreak(2)
    assert not streak.update([NO_ANSWER, ROW_ERROR, NO_ANSWER, ANSWER, NO_ANSWER])
    assert streak.update([NO_ANSWER], ["HTTP 503"]) and "HTTP 503" in streak.reason()


def test_exhausted_retries_give_an_empty_reply_that_is_counted(server, make_judge, caplog):
    server.plan["bad"] = [("status", 500)] * 10
    judge = make_judge(max_retries=2)
    with caplog.at_level(logging.WARNING, logger="cpe_jax.reward.judges"):
        replies = judge([conv("good 1"), conv("bad"), conv("good 2")])
    assert [r.text for r in replies] == ["reply to good 1", "", "reply to good 2"]
    assert [r.outcome for r in replies] == [ANSWER, NO_ANSWER, ANSWER]
    assert server.requests["bad"] == 3 and judge.num_failed == 1
    assert "3 attempts" in caplog.text and "HTTP 500" in caplog.text
    result = GRMScorer(CallableJudge(lambda c: replies[1])).score([{"persona": "p", "question": "q", "response": "r"}])
    assert result.unanswered == [0] and result.num_invalid == 0  # no answer is no parse failure


@pytest.mark.parametrize("status", [400, 413, 422])
def test_row_errors_are_one_rows_outcome_with_the_servers_message(server, make_judge, status):
    server.plan["too long"] = [("status", status)]
    judge = make_judge()
    replies = judge([conv("ok"), conv("too long")])
    assert [r.outcome for r in replies] == [ANSWER, ROW_ERROR]
    assert replies[1].error.startswith(f"HTTP {status}") and API_KEY not in replies[1].error
    assert server.requests["too long"] == 1 and judge.sleeps == [] and not judge.streak.count


@pytest.mark.parametrize("status", [401, 403, 404])
def test_other_4xx_raise_a_user_error_without_retry_or_leaking_the_key(server, make_judge, caplog, status):
    server.plan["a"] = [("status", status)]
    judge = make_judge()
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(UserError) as err:
            judge([conv("a")])
    assert server.requests["a"] == 1 and judge.sleeps == []
    message = str(err.value)
    assert str(status) in message and "judge-model" in message and "\n" not in message
    assert API_KEY not in message and "***" in message  # the server echoed it; we scrubbed it
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chained request objects
    assert API_KEY not in caplog.text and API_KEY not in repr(judge)


def test_key_never_logged_on_soft_failures(server, make_judge, caplog):
    server.plan["a"] = [("status", 503)] * 3
    with caplog.at_level(logging.DEBUG):
        make_judge(max_retries=2)([conv("a")])
    assert "HTTP 503" in caplog.text and API_KEY not in caplog.text


def test_garbage_text_becomes_an_invalid_counted_judgement(server, make_judge):
    garbage = "Sure! I would rate it 5/5 overall. <scores> Helpfulness five"
    judge = make_judge()

    def route(conversations, **kwargs):
        # send every GRM prompt under one key the server scripts; keep everything else as is
        keys = ["garbage" if i == 1 else f"ok {i}" for i in range(len(conversations))]
        server.plan["garbage"] = [("text", garbage)]
        for k in keys:
            if k != "garbage":
                server.plan[k] = [("text", GRM_OK)]
        return judge([[*c[:-1], {"role": "user", "content": k}] for c, k in zip(conversations, keys)], **kwargs)

    rows = [{"persona": "p", "question": "q", "response": f"r{i}"} for i in range(3)]
    result = GRMScorer(route).score(rows)
    np.testing.assert_array_equal(result.valid, [True, False, True])
    assert result.num_invalid == 1 and np.isnan(result.scores["reward"][1])
    np.testing.assert_allclose(result.scores["reward"][[0, 2]], 0.35 * 2 + 0.40 * 3 + 0.25 * 1)


def test_non_completion_answer_fails_softly(server, make_judge):
    server.plan["a"] = [("not_json",)]
    server.plan["b"] = [("text", "")]
    judge = make_judge()
    replies = judge([conv("a"), conv("b")])
    assert [r.outcome for r in replies] == [NO_ANSWER, NO_ANSWER] and judge.num_failed == 2


def test_logprobs_of_the_first_token(server, make_judge):
    top = [("A", -0.1), ("B", -2.4), (" A", -5.0)]
    server.plan["pair"] = [("logprobs", top)]
    reply = make_judge()([conv("pair")], want_logprobs=True, temperature=0.0, max_tokens=1)[0]
    assert reply.text == "A"
    assert reply.first_token_logprobs == {"A": -0.1, "B": -2.4, " A": -5.0}
    body = server.bodies[0]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["max_tokens"] == 1


def test_logprobs_missing_from_the_server_give_none(server, make_judge):
    reply = make_judge()([conv("x")], want_logprobs=True)[0]
    assert reply.text == "reply to x" and reply.first_token_logprobs is None


def test_missing_api_key_is_a_user_error_naming_the_variable(monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    with pytest.raises(UserError, match="NO_SUCH_JUDGE_KEY"):
        HTTPJudge("m", base_url="http://127.0.0.1:9/v1", api_key_env="NO_SUCH_JUDGE_KEY")


def test_no_key_needed_for_an_open_server(server):
    judge = HTTPJudge("m", base_url=server.base_url, api_key_env=None, timeout=0.3)
    assert judge([conv("x")])[0].text == "reply to x"


def test_empty_batch_makes_no_request(server, make_judge):
    assert make_judge()([]) == [] and sum(server.requests.values()) == 0


def test_backoff_delay_bounds():
    rng = random.Random(0)
    for attempt in range(12):
        d = min(4.0, 0.5 * 2**attempt)
        for _ in range(20):
            assert d / 2 <= backoff_delay(attempt, 0.5, 4.0, rng=rng) <= d
    assert backoff_delay(0, 0.5, 4.0, retry_after=3.0, rng=rng) == 3.0
    assert backoff_delay(0, 0.5, 4.0, retry_after=60.0, rng=rng) == 4.0


def test_callable_judge_wraps_strings_and_replies():
    judge = CallableJudge(lambda c: JudgeReply("x", {"A": 0.0}) if c[-1]["content"] == "a" else "y")
    assert judge([conv("a"), conv("b")]) == [JudgeReply("x", {"A": 0.0}), JudgeReply("y")]
