"""The page of `mtkit serve` in a real browser: `mtkit serve` on a free loopback port, headless Chromium
opening /?text=..., and the DOM it ends with checked against what POST /v1/translate answers."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import DATA, untrained_checkpoint

pytest.importorskip("fastapi", reason="mtkit serve needs FastAPI: pip install fastapi uvicorn")
pytest.importorskip("uvicorn", reason="mtkit serve needs uvicorn: pip install fastapi uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason=(
    "no chromium or chromium-browser on PATH (Debian/Ubuntu: apt-get install chromium)"))

FALLBACK = "Zwei junge Männer spielen Fußball auf einer grünen Wiese."
MAX_LINES = 3  # the server's --max-lines: one line more is an error the page must show


def german_sentence() -> str:
    """The first sentence of Multi30k's German validation set, or a fixed one without Multi30k."""
    path = DATA / "val.de.gz"
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as f:
            return f.readline().strip()
    return FALLBACK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of a GET, or of a POST of `body`."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of `mtkit serve` with an untrained model (its output is gibberish, but the same
    for the page and for a direct request)."""
    work = tmp_path_factory.mktemp("page")
    ckpt = untrained_checkpoint(work)
    port = free_port()
    log = (work / "serve.log").open("wb")
    # one thread each: the model is tiny, and the machine may be shared
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "mtkit", "serve", "-m", str(ckpt), "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--max-lines", str(MAX_LINES)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mtkit serve exited with {proc.returncode}:\n{(work / 'serve.log').read_text()}")
            try:
                if request(f"{base}/health")[0] == 200:
                    break
            except OSError:  # not listening yet
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mtkit serve not healthy within 30 s:\n{(work / 'serve.log').read_text()}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Page(HTMLParser):
    """What the tests read of a page's DOM: the translations, the attention maps, body's data-state
    and the status line."""

    def __init__(self):
        super().__init__()
        self.translations: list[str] = []
        self.maps: list[dict[str, str]] = []
        self.state = None
        self.status = ""
        self._inside: str | None = None  # "translation" or "status": where text goes now

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "body":
            self.state = a.get("data-state")
        elif tag == "li" and "translation" in classes:
            self.translations.append("")
            self._inside = "translation"
        elif a.get("id") == "status":
            self._inside = "status"
        elif tag == "canvas" and "attention-map" in classes:
            self.maps.append(a)

    def handle_endtag(self, tag):
        if tag in ("li", "p"):
            self._inside = None

    def handle_data(self, data):
        if self._inside == "translation":
            self.translations[-1] += data
        elif self._inside == "status":
            self.status += data


def browse(base: str, text: str, work: Path) -> Page:
    """The DOM of /?text=TEXT once the page has translated it, as headless Chromium dumps it."""
    url = f"{base}/?text={urllib.parse.quote(text)}"
    # virtual time stands still while the page's requests are open, so the dump waits for the answer
    cmd = [CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", f"--user-data-dir={work}", "--virtual-time-budget=20000", "--dump-dom", url]
    done = subprocess.run(cmd, capture_output=True, timeout=90)
    # bytes, decoded here: a text-mode pipe would turn a "\r" in a translation into "\n"
    dom = done.stdout.decode("utf-8")
    assert done.returncode == 0 and dom, (f"chromium failed ({done.returncode}): "
                                          f"{done.stderr.decode(errors='replace')[-2000:]}")
    page = Page()
    page.feed(dom)
    page.close()
    return page


def test_page_shows_the_translations_and_every_head(server, tmp_path):
    lines = [german_sentence(), "", "Ein Hund läuft über die Straße."]  # an empty line stays a line
    status, answer = request(f"{server}/v1/translate", {"text": lines, "attention": True})
    assert status == 200, answer
    record = answer["attention"][0][0]
    page = browse(server, "\n".join(lines), tmp_path)
    assert page.state == "done", f"the page did not finish: {page.status!r}"
    assert page.translations == answer["translations"]
    # the default view: every head of the last layer of the encoder-decoder attention
    assert len(page.maps) == record["heads"]
    assert [m["data-head"] for m in page.maps] == [str(h) for h in range(record["heads"])]
    assert {(m["data-kind"], m["data-layer"]) for m in page.maps} == {("cross", str(record["layers"] - 1))}


def test_page_shows_the_servers_error(server, tmp_path):
    lines = [german_sentence()] * (MAX_LINES + 1)
    status, answer = request(f"{server}/v1/translate", {"text": lines, "attention": True})
    assert status >= 400 and answer["error"]
    page = browse(server, "\n".join(lines), tmp_path)
    assert page.state == "error"
    assert answer["error"] in page.status
    assert page.translations == [] and page.maps == []
