"""A loopback OpenAI-compatible judge server with fault injection, run as a subprocess by tests.

`python tests/loopback_judge.py --port P [faults]` serves POST /v1/chat/completions on 127.0.0.1
and prints "ready" once it listens. It answers like vLLM: a GRM judgement (critique and scores
that depend only on the judged text) for plain requests, and a one-letter pairwise verdict with
first-token `logprobs` when the request asks for them. Faults:

  --die-after N      answer N requests, then exit at once on the next one (a server killed mid-run)
  --fail-first N     answer the first N requests with HTTP --status (429 or 503) and Retry-After 0
  --hang-first N     let the first N requests hang for --hang-seconds before answering
  a message containing REFUSE_ME gets HTTP 400 with vLLM's context-length message
  a message containing GARBLE gets an answer that is no judgement

`LoopbackJudge` starts and stops it from a test.
"""

import argparse
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time


def _digest(text):
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16)


def grm_answer(text):
    """A well-formed GRM judgement whose scores depend only on `text` (the whole prompt)."""
    h = _digest(text)
    scores = [(h >> (8 * k)) % 11 - 5 for k in range(3)]
    return (f"<critique>judged {h % 997}</critique>\n<scores>\nHelpfulness: {scores[0]}\n"
            f"Personalization: {scores[1]}\nNatural: {scores[2]}\n</scores>")


def pairwise_answer(text):
    """(verdict letter, first-token log-probs) that depend only on `text`."""
    p_a = 0.05 + 0.9 * ((_digest(text) % 1000) / 999)
    import math

    return ("A" if p_a >= 0.5 else "B"), {"A": math.log(p_a), "B": math.log(1 - p_a)}


class _State:
    def __init__(self, args):
        self.args = args
        self.count = 0
        self.lock = threading.Lock()


def _handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status, body, headers=()):
            data = json.dumps(body).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers:
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            a = state.args
            with state.lock:
                state.count += 1
                n = state.count
            if a.die_after is not None and n > a.die_after:
                os._exit(0)  # killed: this connection is reset, later ones are refused
            if n <= a.hang_first:
                time.sleep(a.hang_seconds)
            if n <= a.fail_first:
                return self._send(a.status, {"error": {"message": "server busy", "type": "overloaded"}},
                                  [("Retry-After", "0")])
            text = "\n".join(m["content"] for m in request["messages"])
            if "REFUSE_ME" in text:
                return self._send(400, {"object": "error", "type": "BadRequestError", "code": 400,
                                        "message": "This model's maximum context length is 64 tokens. However, "
                                                   "you requested 99 tokens in the messages."})
            logprobs = None
            if "GARBLE" in text:
                content = "I would rather not say."
            elif request.get("logprobs"):
                content, top = pairwise_answer(text)
                logprobs = {"content": [{"token": content, "logprob": top[content], "bytes": None,
                                         "top_logprobs": [{"token": t, "logprob": lp, "bytes": None}
                                                          for t, lp in top.items()]}]}
            else:
                content = grm_answer(text)
            self._send(200, {
                "id": f"cmpl-{n}", "object": "chat.completion", "created": 0, "model": request["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": logprobs, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            })

    return Handler


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackJudge:
    """Start the server in a subprocess on 127.0.0.1:`port` (`with LoopbackJudge(port, "--die-after", "8")`)."""

    def __init__(self, port, *faults):
        self.port, self.faults = port, [str(f) for f in faults]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, __file__, "--port", str(self.port), *self.faults],
                                        stdout=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            self.process.kill()
            raise RuntimeError(f"loopback judge did not start: {line!r}")
        return self

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdout.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--die-after", type=int)
    p.add_argument("--fail-first", type=int, default=0)
    p.add_argument("--status", type=int, default=503)
    p.add_argument("--hang-first", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=3.0)
    args = p.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), _handler(_State(args)))
    server.daemon_threads = True
    print("ready", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
