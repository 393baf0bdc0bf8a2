"""Image URLs whose servers misbehave: each fetch ends within its deadline, saying what happened in one line,
and Ctrl-C stops the media check at once. The servers are local (127.0.0.1) and stop by themselves."""

import http.server
import os
import signal
import threading
import time

import pytest
from helpers import picture, qa, write_json

from qwen_ft.data import fetch
from qwen_ft.data.media import MediaError, read_bytes
from qwen_ft.data.media_check import check_media
from qwen_ft.data.read import DataError, read_samples

SERVER_GIVES_UP_S = 10  # no handler runs longer than this, whatever the client does


class Hostile(http.server.BaseHTTPRequestHandler):
    """Serves /trickle-body, /trickle-headers, /loop, /gone, /huge and /ok.png (from the server's folder)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        path = self.path.split("?")[0]
        if path == "/trickle-body":  # headers at once, then a byte every 50 ms of a 1000-byte body
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.trickle(b"x" * 1000)
        elif path == "/trickle-headers":  # the status line, then a header a byte at a time that never ends
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.trickle(b"X-Slow: " + b"a" * 1000)
        elif path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif path == "/huge":  # says 1 GiB, and sends nothing
            self.send_response(200)
            self.send_header("Content-Length", str(2**30))
            self.end_headers()
        elif path == "/ok.png":
            body = (self.server.folder / "ok.png").read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.send_error(404)

    def trickle(self, data: bytes) -> None:
        ends = time.monotonic() + SERVER_GIVES_UP_S
        for byte in data:
            if time.monotonic() > ends:
                return
            try:
                self.wfile.write(bytes([byte]))
            except OSError:  # the client hung up
                return
            time.sleep(0.05)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """The base URL of a Hostile server on 127.0.0.1, shut down after the test."""
    picture(tmp_path, "ok.png")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hostile)
    httpd.daemon_threads = True
    httpd.folder = tmp_path
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize(
    "path, message",
    [
        ("/trickle-body", "timed out after 0.5 s"),
        ("/trickle-headers", "timed out after 0.5 s"),
        ("/loop", "redirects in a loop (or more than 10 of them)"),
        ("/gone", "HTTP 404 Not Found"),
        ("/huge", "larger than 64 MiB (1024 MiB)"),
    ],
)
def test_a_fetch_ends_by_its_deadline_and_says_what_happened(server, monkeypatch, path, message):
    monkeypatch.setattr(fetch, "DEADLINE_S", 0.5)
    began = time.monotonic()
    with pytest.raises(MediaError) as error:
        read_bytes(server + path)
    assert time.monotonic() - began < 5  # the 0.5 s deadline, and time to spare on a loaded machine (not 10 s)
    assert str(error.value) == f"'{server}{path}' cannot be fetched: {message}"
    assert fetch.under_way == set()


def test_a_good_url_is_fetched_and_a_slow_one_named_by_the_check(server, tmp_path, monkeypatch):
    monkeypatch.setattr(fetch, "DEADLINE_S", 0.5)
    samples = read_samples(write_json(tmp_path / "data.json", [qa(server + "/ok.png", "q", "a")]))
    check_media(samples)
    assert samples[0].image_sizes == [(112, 112)]
    data = write_json(
        tmp_path / "slow.json", [qa(server + "/ok.png", "q", "a"), qa(server + "/trickle-body", "q", "a")]
    )
    with pytest.raises(DataError) as error:
        check_media(read_samples(data))
    assert (
        str(error.value) == f"{data}: sample 1: image '{server}/trickle-body' cannot be fetched: timed out after 0.5 s"
    )


def test_ctrl_c_stops_the_check_at_once(server, tmp_path):
    """Three fetches that would take a minute each (the default deadline): Ctrl-C ends the check within a
    second or two, and the check's threads with it, so that the interpreter can exit."""
    urls = [f"{server}/trickle-body?{i}" for i in range(3)]
    samples = read_samples(write_json(tmp_path / "data.json", [qa(url, "q", "a") for url in urls]))
    before = set(threading.enumerate())
    ctrl_c = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    ctrl_c.start()
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            check_media(samples)
    finally:
        ctrl_c.cancel()
    assert time.monotonic() - began < 5  # not the 10 s a handler takes to give up
    for thread in set(threading.enumerate()) - before - {ctrl_c}:
        thread.join(timeout=2)
        assert not thread.is_alive(), thread.name
    assert fetch.under_way == set()
