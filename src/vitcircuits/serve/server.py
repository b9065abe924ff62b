"""The explorer's HTTP server: routing, query checking, the run-folder file route and JSON errors.

Routes (GET only; every other method gets 405):

* ``/``: the explorer page;
* ``/api/run``: the run summary (:meth:`RunState._summarise`);
* ``/api/image?index=I``: the preprocessed image as PNG;
* ``/api/attention?index=I&row=R&col=C[&step=S]``: every head's attention from one query patch
  (of checkpoint ``S`` of a dynamics run);
* ``/api/atlas?step=S``: the head atlas of checkpoint ``S`` of a dynamics run;
* ``/files/<path>``: a file inside the run folder, nothing outside it.

Every error is ``{"error": "one line"}`` with a 4xx/5xx status; tracebacks go to the log only.
JSON is strict: a non-finite number is sent as ``null``, never as ``NaN`` or ``Infinity``.

Every response carries ``X-Content-Type-Options: nosniff`` and a Content-Security-Policy. The page
gets :func:`page_csp`: scripts only by the hash of its own inline script, requests to this server
only. Every other response (API, images, errors, run files) gets :data:`SANDBOX_CSP`: no script
at all, and ``sandbox``, which gives a document an opaque origin of its own.

Run files are served in the browser under that sandbox, not as attachments. A run folder may come
from someone else, and its ``.html``, ``.svg`` or ``.xml`` could carry script. Sandboxed, such a
file renders but runs nothing and cannot act as this origin, so it cannot read the API. Sending
files as attachments would be just as safe, but then the report and the figures that the page
links would download instead of opening. Types not in :data:`CONTENT_TYPES` are sent as
``application/octet-stream``; the server does not guess them.

Paths longer than :data:`MAX_PATH_CHARS` are answered 404 and query strings longer than
:data:`MAX_QUERY_CHARS` 414, before any file system call.

Why the standard library (``http.server``) and not a web framework: no new dependency to install
or keep updated, a small attack surface that fits in this file, and a local single-user tool needs
nothing more. It binds 127.0.0.1 by default and answers loopback ``Host`` headers only there.
"""
from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import os
import re
import webbrowser
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path, PurePosixPath, PureWindowsPath
from urllib.parse import parse_qs, unquote

from vitcircuits.serve.state import RunState, Unavailable, finite, one_line

log = logging.getLogger(__name__)

CONTENT_TYPES = {
    ".png": "image/png", ".json": "application/json", ".csv": "text/csv; charset=utf-8", ".html": "text/html; charset=utf-8",
    ".txt": "text/plain; charset=utf-8", ".md": "text/plain; charset=utf-8", ".log": "text/plain; charset=utf-8", ".svg": "image/svg+xml",
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".tsv": "text/tab-separated-values; charset=utf-8",
}
"""The types run files are sent as, by suffix; any other file is ``application/octet-stream``."""
LOCKED = "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
SANDBOX_CSP = f"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; {LOCKED}; sandbox"
"""Every response but the page: no script, no requests but images, and an opaque origin."""
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
MAX_PATH_CHARS = 1024
MAX_QUERY_CHARS = 1024
LOG_CHARS = 300


class HTTPError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def page_html() -> str:
    return resources.files("vitcircuits.serve").joinpath("page.html").read_text(encoding="utf-8")


def page_csp(page: str) -> str:
    """The page's policy: its inline scripts allowed by their sha256, nothing else run or fetched but this server's routes."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
                      for body in re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL))
    return f"default-src 'none'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; {LOCKED}"


def int_param(params: dict[str, list[str]], name: str, upper: int | None) -> int:
    """The integer query parameter ``name`` in ``0..upper-1`` (``upper`` None: any non-negative)."""
    values = params.get(name)
    if not values:
        raise HTTPError(400, f"{name}: missing query parameter")
    if len(values) > 1:
        raise HTTPError(400, f"{name}: given more than once")
    text = values[0].strip()
    if not re.fullmatch(r"-?[0-9]{1,12}", text):
        raise HTTPError(400, f"{name}: expected an integer, got {values[0][:40]!r}")
    value = int(text)
    if value < 0 or (upper is not None and value >= upper):
        raise HTTPError(400, f"{name}: {value} is out of range" + (f" 0..{upper - 1}" if upper is not None else ""))
    return value


def safe_run_file(root: Path, raw: str) -> Path:
    """The file that the raw (still percent-encoded) path ``raw`` names inside ``root``.

    Refused with 403: backslashes (raw or encoded), NUL, absolute or drive paths, any ``..``
    segment (raw or encoded), and anything whose resolved path (symlinks followed) is not inside
    the resolved ``root``. Missing files and folders, and names too long for the file system, are 404."""
    if "\\" in raw or "%5c" in raw.lower():
        raise HTTPError(403, "backslashes are not allowed in file paths")
    try:
        rel = unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise HTTPError(400, "the file path is not valid UTF-8 once decoded") from None
    if not rel:
        raise HTTPError(404, "no file named")
    if "\\" in rel or "\x00" in rel:
        raise HTTPError(403, "forbidden characters in file path")
    if rel.startswith("/") or PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).anchor:
        raise HTTPError(403, "absolute file paths are not allowed")
    if any(part == ".." for part in rel.split("/")):
        raise HTTPError(403, "'..' is not allowed in file paths")
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as err:  # symlink loops
        raise HTTPError(403, f"cannot resolve the path ({type(err).__name__})") from None
    if not resolved.is_relative_to(root):
        raise HTTPError(403, "the path leaves the run folder")
    try:
        found = resolved.is_file()
    except OSError:  # a name too long for the file system …
        found = False
    if not found:
        raise HTTPError(404, f"no such file in the run folder: {rel[:200]}")
    return resolved


class ExplorerServer(ThreadingHTTPServer):
    """A threading HTTP server that holds the :class:`RunState` its handlers answer from."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: RunState, quiet: bool = False) -> None:
        self.state = state
        self.quiet = quiet
        page = page_html()
        self.page, self.page_csp = page.encode("utf-8"), page_csp(page)
        super().__init__(address, ExplorerHandler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


class ExplorerHandler(BaseHTTPRequestHandler):
    server: ExplorerServer
    server_version = "vitcircuits-serve"
    timeout = 60  # seconds a connection may stay silent before it is dropped
    sys_version = ""
    error_content_type = "application/json"

    def __getattr__(self, name: str):
        # Any HTTP method other than GET (POST, PUT, HEAD, OPTIONS, made-up ones) is answered 405.
        if name.startswith("do_") and name != "do_GET":
            return self._method_not_allowed
        raise AttributeError(name)

    def _method_not_allowed(self) -> None:
        self._send_json({"error": f"method {self.command} not allowed; only GET"}, 405, extra={"Allow": "GET"})

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Errors raised by the request parsing of ``http.server`` (bad request line, long URI …) as JSON too."""
        try:
            text = message or HTTPStatus(code).phrase
        except ValueError:
            text = "error"
        self.close_connection = True
        self._send_json({"error": " ".join(str(text).split())}, code)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        if not self.server.quiet:
            log.info("%s %s", self.address_string(), one_line((format % args)[:LOG_CHARS]))

    def do_GET(self) -> None:
        try:
            self._check_host()
            # Split by hand: urlsplit reads a leading '//' as a host name and raises on '//['.
            path, _, query = self.path.partition("?")
            if len(path) > MAX_PATH_CHARS:
                raise HTTPError(404, f"no such route or file: the path is longer than {MAX_PATH_CHARS} characters")
            if len(query) > MAX_QUERY_CHARS:
                raise HTTPError(414, f"the query string is longer than {MAX_QUERY_CHARS} characters")
            params = parse_qs(query, keep_blank_values=True)
            if path == "/":
                self._send(self.server.page, "text/html; charset=utf-8", csp=self.server.page_csp)
            elif path == "/api/run":
                self._send_json(self.server.state.summary)
            elif path == "/api/image":
                self._send(self.server.state.image_png(self._index(params)), "image/png")
            elif path == "/api/attention":
                index = self._index(params)
                summary = self.server.state.summary
                row, col = int_param(params, "row", summary["rows"]), int_param(params, "col", summary["cols"])
                step = int_param(params, "step", None) if "step" in params else None
                self._send_json(self.server.state.attention(index, row, col, step))
            elif path == "/api/atlas":
                self._send_json(self.server.state.atlas_at(int_param(params, "step", None)))
            elif path.startswith("/files/"):
                # The path is still percent-encoded and un-normalised: safe_run_file judges what was sent.
                self._send_file(safe_run_file(self.server.state.root, path[len("/files/"):]))
            else:
                raise HTTPError(404, f"no such route: {path[:200]}")
        except HTTPError as err:
            self._send_json({"error": str(err)}, err.status)
        except Unavailable as err:
            self._send_json({"error": str(err)}, 503)
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as err:  # noqa: BLE001 - the client gets one line; the traceback goes to the log
            log.exception("error answering GET %s", one_line(self.path[:LOG_CHARS]))
            self._send_json({"error": f"internal error ({type(err).__name__}); details are in the server log"}, 500)

    def _check_host(self) -> None:
        """On a loopback address, only loopback Host headers are answered (blocks DNS rebinding)."""
        bound = self.server.server_address[0]
        try:
            loopback = ipaddress.ip_address(bound).is_loopback
        except ValueError:
            loopback = bound == "localhost"
        if not loopback:
            return
        hosts = self.headers.get_all("Host") or []
        host = hosts[0].strip() if len(hosts) == 1 else ""
        name = host[1:].split("]", 1)[0] if host.startswith("[") else host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        if name.lower() not in LOOPBACK_NAMES:
            raise HTTPError(403, "unexpected Host header; open the explorer at its printed URL")

    def _index(self, params: dict[str, list[str]]) -> int:
        index = int_param(params, "index", None)
        if index not in self.server.state.image_indices:
            raise HTTPError(400, f"index: no image with index {index} in this run's image list")
        return index

    def _send_json(self, obj: object, status: int = 200, extra: dict | None = None) -> None:
        self._send(json.dumps(finite(obj), allow_nan=False).encode("utf-8"), "application/json", status, extra)

    def _send_file(self, path: Path) -> None:
        """A run file, streamed (shards and checkpoints can be large), as its type from :data:`CONTENT_TYPES`."""
        try:
            file = path.open("rb")
        except OSError as err:
            raise HTTPError(403 if isinstance(err, PermissionError) else 404, f"cannot read the file ({err.strerror or type(err).__name__})") from None
        with file:
            size = os.fstat(file.fileno()).st_size
            try:
                self._send_head(200, CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream"), size)
                self.connection.sendfile(file, 0, size)  # never more than Content-Length, even if the file grows meanwhile
            except (BrokenPipeError, ConnectionResetError):
                pass

    def _send(self, body: bytes, content_type: str, status: int = 200, extra: dict | None = None, csp: str = SANDBOX_CSP) -> None:
        try:
            self._send_head(status, content_type, len(body), csp, extra)
            if self.command != "HEAD":
                self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send_head(self, status: int, content_type: str, length: int, csp: str = SANDBOX_CSP, extra: dict | None = None) -> None:
        """The status line and headers that every response carries (a policy, nosniff, no caching) plus ``extra``."""
        if self.request_version == "HTTP/0.9":  # http.server would send the body alone, without these headers
            self.request_version = "HTTP/1.0"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", csp)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()


def make_server(state: RunState, host: str = "127.0.0.1", port: int = 8765, quiet: bool = False) -> ExplorerServer:
    """A bound (not yet serving) server; ``port=0`` picks a free port (see ``server.url``)."""
    return ExplorerServer((host, port), state, quiet=quiet)


def serve(run_dir: str | Path, model: str | None = None, images: str | None = None, host: str = "127.0.0.1", port: int = 8765,
          device: str = "auto", open_browser: bool = True) -> None:
    """Load the run (and its model, if it can), print the URL and serve until interrupted."""
    state = RunState(run_dir, model=model, images=images, device=device)
    server = make_server(state, host, port)
    print(f"vitcircuits explorer for {state.root} at {server.url}", flush=True)
    if not state.live:
        print(f"live attention unavailable: {state.reason}", flush=True)
    if open_browser:
        webbrowser.open(server.url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
