"""A real chat-completions server for the tests, on 127.0.0.1 and a free port, in a thread.

It speaks the OpenAI protocol (`POST /v1/chat/completions`), answers "<name> is a test entity."
for the entity named in the prompt, counts requests per entity, and can be scripted per entity
to misbehave: answer slowly, with 429 or 500, malformed JSON, a body cut short, an empty or a
truncated (`finish_reason: length`) answer, or 401.
"""

from __future__ import annotations

import json
import re
import socket
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NAME_PATTERN = re.compile(r"Name: (.+)")


class ChatServer:
    """Start with `start()`, stop with `stop()`; `script[name]` is a list of actions consumed per request."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.script: dict[str, list[str]] = {}
        self.default_action = "ok"
        self.delay_s = 0.0
        self.slow_s = 2.0
        self.retry_after = "0"
        self.answer_words = 0  # filler words appended to each answer, to mimic a real description's length
        self.authorizations: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> ChatServer:
        handler = type("Handler", (_Handler,), {"chat": self})
        self._server = _QuietServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def next_action(self, name: str) -> str:
        with self.lock:
            self.requests[name] += 1
            actions = self.script.get(name)
            return actions.pop(0) if actions else self.default_action


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request (the kill -9 test) resets its connection: expected, not an error."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    chat: ChatServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path != "/v1/chat/completions":
            self._send(404, {"error": {"message": "not found"}})
            return
        request = json.loads(body)
        prompt = request["messages"][-1]["content"]
        match = NAME_PATTERN.search(prompt)
        name = match.group(1).strip() if match else "?"
        self.chat.authorizations.append(self.headers.get("Authorization", ""))
        with self.chat.lock:
            self.chat.in_flight += 1
            self.chat.max_in_flight = max(self.chat.max_in_flight, self.chat.in_flight)
        try:
            words = " ".join(message["content"] for message in request["messages"])
            self._act(self.chat.next_action(name), name, request, words)
        finally:
            with self.chat.lock:
                self.chat.in_flight -= 1

    def _act(self, action: str, name: str, request: dict[str, Any], prompt: str) -> None:
        if self.chat.delay_s:
            time.sleep(self.chat.delay_s)
        if action == "slow":
            time.sleep(self.chat.slow_s)
        if action in ("429", "500", "401"):
            headers = {"Retry-After": self.chat.retry_after} if action == "429" else {}
            self._send(int(action), {"error": {"message": f"scripted {action}"}}, headers)
        elif action == "malformed":
            self._send_raw(200, b'{"choices": [{"message": ')
        elif action == "cut":
            self._send_cut()
        elif action == "no_content":
            self._send(200, {"choices": []})
        else:
            filler = " lorem" * self.chat.answer_words
            text = {"empty": "", "length": f"{name} is a"}.get(action, f"{name} is a test entity.{filler}")
            finish = "length" if action == "length" else "stop"
            self._send(200, _completion(request["model"], text, finish, prompt))
            with self.chat.lock:
                self.chat.completed[name] += 1

    def _send(self, status: int, record: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self._send_raw(status, json.dumps(record).encode(), headers)

    def _send_raw(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _send_cut(self) -> None:
        """Promise 500 bytes, send 20, and drop the connection: a body cut short."""
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "500")
        self.end_headers()
        self.wfile.write(b'{"choices": [{"messa')
        self.wfile.flush()
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)


def _completion(model: str, text: str, finish: str, prompt: str) -> dict[str, Any]:
    return {"id": "chatcmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                      "total_tokens": len(prompt.split()) + len(text.split())}}
