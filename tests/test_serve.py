"""`mtkit serve` over real HTTP: a server process on a free loopback port, an HTTP client, concurrent
requests, bad bodies, a client that goes away, a timeout, and SIGTERM with requests in flight."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ROOT, random_lines, untrained_checkpoint

pytest.importorskip("fastapi", reason='mtkit serve needs FastAPI and uvicorn (pip install "mtkit[serve]")')
pytest.importorskip("uvicorn", reason='mtkit serve needs FastAPI and uvicorn (pip install "mtkit[serve]")')
httpx = pytest.importorskip("httpx", reason="the tests' HTTP client (pip install httpx)")

ENV = {**os.environ, "PYTHONPATH": str(ROOT / "src")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m mtkit serve` on a free loopback port, up once /health answers 200."""

    def __init__(self, model: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()  # not a pipe: a full pipe nobody reads would block the server
        self.proc = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", "-m", str(model), "--port",
                                      str(self.port), *args], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=self.log)
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"server exited: {self.log.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("server not ready in 90 s")

    def post(self, body, timeout: float = 60, **kwargs) -> httpx.Response:
        if isinstance(body, (dict, list)):
            return httpx.post(f"{self.url}/v1/translate", json=body, timeout=timeout, **kwargs)
        return httpx.post(f"{self.url}/v1/translate", content=body, timeout=timeout,
                          headers={"content-type": "application/json"}, **kwargs)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.log.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return untrained_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(checkpoint):
    s = Server(checkpoint)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected(checkpoint):
    """What mtkit's own Translator gives for lines (with the checkpoint's beam size)."""
    from mtkit.translate import Translator

    translator = Translator.load(checkpoint, "cpu")
    return translator.translate


def test_translations_in_order_as_the_cli(server, expected):
    lines = random_lines(12, seed=1) + ["", "   "]
    response = server.post({"text": lines})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["translations"] == expected(lines)
    assert body["translations"][-2:] == ["", ""]  # empty lines stay empty, in place
    assert body["model"] == "untrained.pt" and body["time_ms"] > 0
    one = server.post({"text": lines[0]}).json()
    assert one["translations"] == [body["translations"][0]]


def test_models_health_and_docs(server):
    models = httpx.get(f"{server.url}/v1/models", timeout=5).json()["models"]
    assert models[0]["src_lang"] == "xx" and models[0]["layers"] == 2 and models[0]["heads"] == 2
    assert server.health()["status"] == "ok"
    docs = httpx.get(f"{server.url}/openapi.json", timeout=5).json()
    schema = docs["paths"]["/v1/translate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"text", "beam", "nbest", "attention"} <= set(schema["properties"])
    assert httpx.get(f"{server.url}/docs", timeout=5).status_code == 200


def test_nbest_beam_and_attention(server, checkpoint):
    from mtkit.translate import Translator

    line = "the small dog runs"
    body = server.post({"text": [line, ""], "beam": 2, "nbest": 2, "attention": True}).json()
    translator = Translator.load(checkpoint, "cpu", beam_size=2)
    (theirs, empty) = translator.run([line, ""], nbest=2)
    assert [[h["text"] for h in hyps] for hyps in body["nbest"]] == [[t for t, _ in theirs.nbest], [""]]
    (records,), no_records = body["attention"]
    assert no_records == []  # an empty line: nothing to show
    assert records == translator.attention(theirs)[0] | {}
    assert len(records["cross"]) == 2 and len(records["cross"][0]) == 2  # layers x heads
    assert len(records["encoder"][0][0]) == len(records["source_tokens"])


def test_concurrent_requests_share_batches(server, expected):
    lines = [line for line in random_lines(48, seed=2) if line]
    before = server.health()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda line: server.post({"text": line}).json()["translations"][0], lines))
    after = server.health()
    assert answers == expected(lines)  # each client its own translation, whatever it was batched with
    requests = after["requests"] - before["requests"]
    batches = after["batches"] - before["batches"]
    assert requests == len(lines) and batches < requests / 2, (requests, batches)


@pytest.mark.parametrize(("body", "status", "message"), [
    (b'{"text": ["a", 5]}', 422, "text[1]: expected a string, got int"),
    (b'{"text": "a", "beam": "4"}', 422, "beam: expected an integer"),
    (b'{"text": "a", "nbest": 9}', 422, "nbest: expected an integer from 1 to 3"),
    (b'{"text": "a", "attention": 1}', 422, "attention: expected true or false"),
    (b'{"txt": "a"}', 422, "txt: unknown field"),
    (b'{"beam": 2}', 422, "text: required"),
    (b'["a"]', 422, "body: expected a JSON object"),
    (b'{"text": "a"', 400, "body: not JSON"),
    (b'{"text": "\xff\xfe"}', 400, "body: invalid UTF-8 at byte 10"),
    (json.dumps({"text": ["a"] * 257}).encode(), 413, "text: 257 lines; at most 256"),
    (json.dumps({"text": "a" * (1 << 20)}).encode(), 413, "--max-body"),
])
def test_bad_bodies_get_a_json_error_naming_the_field(server, expected, body, status, message):
    response = server.post(body)
    assert response.status_code == status and message in response.json()["error"], response.text
    assert server.post({"text": "the dog"}).json()["translations"] == expected(["the dog"])  # still serving


def test_long_lines_are_translated_in_pieces_as_the_cli(server, expected):
    long = ", ".join(random_lines(30, seed=3))  # beyond the model's 64 positions
    assert server.post({"text": long}).json()["translations"] == expected([long])


def test_a_client_that_goes_away_leaves_no_work(server):
    busy = ThreadPoolExecutor(1).submit(server.post, {"text": random_lines(256, seed=4, longest=30)})
    time.sleep(0.3)  # the big request is decoding
    before = server.health()["dropped"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # send a request, then hang up
        body = json.dumps({"text": random_lines(200, seed=5, longest=30)}).encode()
        sock.sendall(b"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        time.sleep(0.1)
    assert busy.result().status_code == 200
    deadline = time.time() + 10
    while server.health()["dropped"] == before and time.time() < deadline:
        time.sleep(0.1)
    assert server.health()["dropped"] == before + 1


def test_a_request_past_its_timeout_gets_a_503(checkpoint):
    server = Server(checkpoint, "--timeout", "0.2")
    try:
        response = server.post({"text": random_lines(256, seed=6, longest=30)})  # about 2 s of decoding
        assert response.status_code == 503
        assert "timeout: no translation within 0.2 s (--timeout)" in response.json()["error"]
        assert server.health()["status"] == "ok"
    finally:
        assert server.stop() == 0


def test_sigterm_finishes_the_requests_in_flight_and_exits_0(checkpoint, expected):
    server = Server(checkpoint)
    batches = [random_lines(64, seed=10 + i, longest=20) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        in_flight = [pool.submit(server.post, {"text": lines}) for lines in batches]
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGTERM)
        answers = [f.result() for f in in_flight]
    assert [a.status_code for a in answers] == [200] * 4
    assert [a.json()["translations"] for a in answers] == [expected(lines) for lines in batches]
    assert server.proc.wait(timeout=60) == 0


def test_missing_fastapi_names_the_extra(monkeypatch, checkpoint):
    from mtkit.errors import UserError
    from mtkit.serve import ServeOptions, run

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(UserError, match=r'pip install "mtkit\[serve\]"'):
        run(checkpoint, ServeOptions())


def test_serve_binds_to_loopback_by_default():
    from mtkit.serve import ServeOptions

    assert ServeOptions().host == "127.0.0.1"
