"""Talking to a server under test: HTTP calls, an in-thread uvicorn on a free loopback port, waiting."""

import json
import threading
import time
import urllib.error
import urllib.request

from cxrkeras import serving


def http(url, path, body=None, raw=None, method=None, headers=None):
    """(status, parsed JSON or text, headers) of one request."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            status, text, got = answer.status, answer.read(), answer.headers
    except urllib.error.HTTPError as e:
        status, text, got = e.code, e.read(), e.headers
    try:
        return status, json.loads(text), got
    except ValueError:
        return status, text.decode(), got


def start(app):
    """Run `app` with uvicorn on a free loopback port in a thread; returns (url, server, thread)."""
    server = serving.uvicorn_server(app, "127.0.0.1", 0, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, thread


def wait_for(condition, seconds=60):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)
