"""Fetching an image URL within a deadline that no server can stretch, and that Ctrl-C cuts short.

urllib's timeout bounds each read from the socket, not the fetch: a server that sends a byte every few
seconds, in its headers or its body, holds a fetch for as long as it likes. Here a fetch has one
deadline for the whole of it (connecting, redirects, headers and body). When it passes, a timer shuts
the fetch's sockets down, which ends whatever read is waiting on them at once. abort() does the same to
every fetch under way, so that Ctrl-C during the media check stops it at once, not when the slowest
server is done. urllib does the rest as before: proxies (http_proxy, https_proxy), TLS, redirects.
"""

import http.client
import socket
import ssl
import threading
import urllib.error
import urllib.request
from functools import cache, partial

DEADLINE_S = 60.0  # a whole fetch: connecting, redirects, headers and body, however slowly they come
MAX_BYTES = 64 * 2**20  # a larger body is refused (by its Content-Length, or once that much has come)


class FetchError(Exception):
    """A URL that could not be fetched; str() says what happened, in one line."""


class Deadline:
    """The sockets of one fetch, shut down when its time is up or when abort() is called."""

    def __init__(self, seconds: float):
        self.sockets: list[socket.socket] = []  # duplicates of the fetch's sockets: shutdown acts on the connection
        self.ended: str | None = None  # why the fetch was cut short
        self.lock = threading.Lock()
        self.timer = threading.Timer(seconds, self.end, (f"timed out after {seconds:g} s",))
        self.timer.daemon = True

    def __enter__(self) -> "Deadline":
        with under_way_lock:
            under_way.add(self)
        self.timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self.timer.cancel()
        with under_way_lock:
            under_way.discard(self)
        with self.lock:
            for sock in self.sockets:
                sock.close()
            self.sockets.clear()

    def watch(self, sock: socket.socket) -> None:
        """Shut this socket down when the fetch ends early. A duplicate is kept, as TLS takes the original over."""
        with self.lock:
            self.sockets.append(sock.dup())
            if self.ended:
                shut_down(self.sockets[-1])

    def end(self, why: str) -> None:
        with self.lock:
            if self.ended is None:
                self.ended = why
                for sock in self.sockets:
                    shut_down(sock)


under_way: set[Deadline] = set()
under_way_lock = threading.Lock()


def abort() -> None:
    """End every fetch under way, in any thread (their callers get a FetchError)."""
    with under_way_lock:
        deadlines = list(under_way)
    for deadline in deadlines:
        deadline.end("stopped")


def shut_down(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by its fetch
        pass


class WatchedHTTPConnection(http.client.HTTPConnection):
    """A connection that gives its socket to its fetch's Deadline as soon as it is connected."""

    deadline: Deadline

    def connect(self):
        super().connect()
        self.deadline.watch(self.sock)


class WatchedHTTPSConnection(http.client.HTTPSConnection, WatchedHTTPConnection):
    """The same over TLS: in this order, the socket is watched before the TLS handshake, which a server can
    stretch too."""


def connection(connection_class, deadline: Deadline, host: str, **options):
    made = connection_class(host, **options)
    made.deadline = deadline
    return made


@cache
def tls_context() -> ssl.SSLContext:
    return ssl.create_default_context()


class HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, request):
        return self.do_open(partial(connection, WatchedHTTPConnection, self.deadline), request)


class HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, request):
        make = partial(connection, WatchedHTTPSConnection, self.deadline)
        return self.do_open(make, request, context=tls_context())


def fetch(url: str) -> bytes:
    """The body of an http(s) URL, fetched within DEADLINE_S in all and at most MAX_BYTES long;
    FetchError saying what happened otherwise ("timed out after 60 s", "HTTP 404 Not Found", ...)."""
    deadline = Deadline(DEADLINE_S)
    opener = urllib.request.build_opener(HTTPHandler(deadline), HTTPSHandler(deadline))
    problem = None
    with deadline:
        try:
            with opener.open(url, timeout=DEADLINE_S) as response:
                declared = response.headers.get("Content-Length", "")
                if declared.isdigit() and int(declared) > MAX_BYTES:
                    raise FetchError(f"larger than {MAX_BYTES // 2**20} MiB ({int(declared) / 2**20:.0f} MiB)")
                data = response.read(MAX_BYTES + 1)
        except urllib.error.HTTPError as e:
            e.close()
            # urllib gives up after 10 redirects, or 4 to the same address: its message spans three lines.
            problem = (
                "redirects in a loop (or more than 10 of them)" if 300 <= e.code < 400 else f"HTTP {e.code} {e.reason}"
            )
        except urllib.error.URLError as e:
            reason = e.reason
            problem = reason.strerror or str(reason) if isinstance(reason, OSError) else str(reason)
            if isinstance(reason, TimeoutError):  # connecting took the whole deadline
                problem = f"timed out after {DEADLINE_S:g} s"
        except TimeoutError:  # one read waited the whole deadline
            problem = f"timed out after {DEADLINE_S:g} s"
        except (OSError, http.client.HTTPException, ValueError) as e:  # a connection cut, a malformed response
            problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    if deadline.ended:  # whatever the read saw: a cut connection, or a body cut short
        raise FetchError(deadline.ended)
    if problem:
        raise FetchError(problem)
    if len(data) > MAX_BYTES:
        raise FetchError(f"larger than {MAX_BYTES // 2**20} MiB")
    return data
