"""`vitcircuits serve` over HTTP (no browser): the run summary, live attention, images, the file
route's path safety, security headers on every response, over-long requests, strict JSON, errors
and methods."""
from __future__ import annotations

import base64
import csv
import hashlib
import http.client
import inspect
import io
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.serve.demo_run import HOSTILE_FILES, add_hostile_files, demo_run
from vitcircuits.serve import RunState, make_server, serve
from vitcircuits.serve.server import MAX_PATH_CHARS, MAX_QUERY_CHARS

SECRET = "TOP-SECRET-do-not-serve-7f3a"


def start(state: RunState, **kwargs):
    server = make_server(state, port=0, quiet=True, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


def stop(server, thread) -> None:
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = demo_run(tmp_path_factory)
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text(SECRET)
    (run.parent / "secret.txt").write_text(SECRET)  # next to the run folder: reachable only by '..'
    for link, target in (("outside_link.txt", outside / "secret.txt"), ("outside_dir", outside), ("inside_link.json", run / "manifest.json")):
        if not (run / link).is_symlink():
            (run / link).symlink_to(target)
    add_hostile_files(run)
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    srv, thread = start(RunState(run_dir, device="cpu"))
    yield srv
    stop(srv, thread)


def get(server, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
    """Send ``path`` exactly as given (no client-side normalisation or encoding)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(server, request: bytes) -> tuple[int, dict, bytes]:
    """Send ``request`` byte for byte (what http.client refuses to send) and read the whole answer."""
    with socket.create_connection(server.server_address[:2], timeout=60) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("iso-8859-1").split("\r\n")
    return int(status_line.split()[1]), {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}, body


def strict_json(body: bytes):
    """``body`` parsed as strict JSON: NaN, Infinity and -Infinity are errors."""
    def refuse(constant):
        raise AssertionError(f"{constant} in JSON")
    return json.loads(body, parse_constant=refuse)


def csp_directives(csp: str) -> dict[str, str]:
    return {name: value for name, _, value in (d.strip().partition(" ") for d in csp.split(";"))}


def assert_locked_down(headers: dict) -> None:
    """What every response but the page carries: nosniff, and a policy with no script and an opaque origin."""
    directives = csp_directives(headers["content-security-policy"])
    assert headers["x-content-type-options"] == "nosniff"
    assert directives["default-src"] == directives["frame-ancestors"] == "'none'" and "script-src" not in directives
    assert directives["sandbox"] == ""  # no allow-scripts, no allow-same-origin


def get_json(server, path: str) -> dict:
    status, headers, body = get(server, path)
    assert status == 200, body
    assert headers["content-type"] == "application/json"
    return strict_json(body)


def test_binds_loopback_by_default(server):
    from vitcircuits.cli import commands as cli

    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(make_server).parameters["host"].default == "127.0.0.1"
    assert inspect.signature(cli.serve).parameters["host"].default == "127.0.0.1"
    assert server.server_address[0] == "127.0.0.1" and server.url.startswith("http://127.0.0.1:")


def test_page_is_self_contained(server):
    status, headers, body = get(server, "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    csp = headers["content-security-policy"]
    assert csp == server.page_csp and headers["x-content-type-options"] == "nosniff"
    scripts = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    assert len(scripts) == page.count("<script") == 1
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    directives = csp_directives(csp)
    assert directives["script-src"] == f"'sha256-{digest}'"  # the page's own script only: no 'unsafe-inline'
    assert directives["default-src"] == directives["frame-ancestors"] == directives["base-uri"] == "'none'"
    assert directives["connect-src"] == "'self'"
    for element in ('id="image-select"', 'id="image-canvas"', 'id="attention-panel"', 'id="query-label"', 'id="atlas-grid"',
                    'id="kernel-box"', 'id="circuits-table"', 'id="features-table"', 'id="error"'):
        assert element in page
    assert "http://" not in page and "https://" not in page and "src=" not in page and "@import" not in page  # nothing fetched from elsewhere
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "document.write" not in page


def test_api_run_matches_run_files(server, run_dir):
    from vitcircuits.heads.atlas import HeadAtlas

    run = get_json(server, "/api/run")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert run["live"] is True and run["reason"] == ""
    assert run["model_id"] == manifest["model"]["model_id"] == "bundled:cifar10-vit"
    assert (run["rows"], run["cols"], run["n_layers"], run["n_heads"]) == (8, 8, 4, 4)

    with open(run_dir / "overview" / "predictions.csv", newline="") as f:
        predictions = list(csv.DictReader(f))
    assert [(i["index"], i["id"], i["label"], i["prediction"]) for i in run["images"]] == [
        (int(r["image_index"]), r["image"], int(r["label"]), int(r["prediction"])) for r in predictions]
    assert run["images"][0]["label_name"] == "airplane"

    atlas = HeadAtlas.load(run_dir / "heads")
    assert [(r["layer"], r["head"], r["kind"]) for r in run["atlas"]] == [(r.layer, r.head, r.kind) for r in atlas.rows]
    assert np.allclose([r["modular_score"] for r in run["atlas"]], [r.modular_score for r in atlas.rows])
    assert np.allclose([r["neighbour_mass"] for r in run["atlas"]], [r.neighbour_mass for r in atlas.rows])
    kernels = np.array(run["kernels"], dtype=float)  # None (offsets outside the grid) becomes NaN
    assert kernels.shape == (4, 4, 2 * run["kernel_radius"] + 1, 2 * run["kernel_radius"] + 1)
    np.testing.assert_allclose(kernels, atlas.window(run["kernel_radius"]), rtol=1e-6, equal_nan=True)

    composition = json.loads((run_dir / "composition" / "circuits.json").read_text())
    circuits = composition["circuits"]
    assert len(run["circuits"]) == min(len(circuits), 200) and run["circuits"]
    assert run["edges"] == {"n": composition["n_edges"], "verdicts": composition["verdicts"], "rule": composition["rule"], "n_listed": len(circuits)}
    first, expected = run["circuits"][0], circuits[0]
    assert (first["senders"], first["receivers"], first["kind"], first["verdict"], first["read_at"], first["shuffle_reading"]) == (
        expected["senders"], expected["receivers"], expected["kind"], expected["verdict"], expected["read_at"], expected["shuffle_reading"])
    evidence = expected["evidence"]
    where = "patch" if "patch" in expected["read_at"] or not expected["read_at"] else "prefix"
    assert first["composes_at"] == where and first["composes_effect"] == pytest.approx(evidence["composes"][where]["effect"])
    assert first["weight_z"] == pytest.approx(evidence["weights"]["z"])
    assert first["matters_checked"] == (evidence["matters"] is not None)
    if evidence["matters"] is not None:
        assert first["matters_effect"] == pytest.approx(evidence["matters"]["effect"])

    features = json.loads((run_dir / "sae" / "features" / "features.json").read_text())
    assert run["features"]["hook"] == features["hook"]
    assert [r["feature"] for r in run["features"]["top"]] == [r["feature"] for r in features["top"]]
    assert run["features"]["figures"] and len(run["features"]["figures"]) == len(features["figures"])
    for figure in run["features"]["figures"] + run["files"]:
        status, _, _ = get(server, "/files/" + figure["path"])
        assert status == 200, figure


def test_attention_equals_patch_attention(server, run_dir):
    from vitcircuits.inputs import ImageOptions, ModelOptions
    from vitcircuits.plotting.attention import patch_attention

    data = get_json(server, "/api/attention?index=3&row=2&col=5")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    loaded = ModelOptions(**manifest["config"]["model"]).load()
    image = ImageOptions(**manifest["config"]["images"]).open(loaded).load([3])
    expected = patch_attention(loaded.model, image, (2, 5))
    got = np.array(data["attention"])
    assert (data["rows"], data["cols"], data["row"], data["col"]) == (8, 8, 2, 5)
    assert got.shape == (4, 4, 64)
    np.testing.assert_allclose(got, expected.reshape(4, 4, 64), rtol=1e-5, atol=1e-7)
    assert (got.sum(-1) <= 1 + 1e-5).all()  # prefix tokens dropped, not renormalised
    other = np.array(get_json(server, "/api/attention?index=3&row=7&col=0")["attention"])
    assert not np.allclose(other, got)


def test_image_is_the_preprocessed_image_upscaled(server):
    from PIL import Image

    from vitcircuits.plotting.figures import denormalize

    status, headers, body = get(server, "/api/image?index=0")
    assert status == 200 and headers["content-type"] == "image/png"
    image = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    assert image.shape == (256, 256, 3)  # 32 px upscaled 8x
    state = server.state
    with state.lock:
        expected = denormalize(state._image(0)[0], state.pre.mean, state.pre.std)
    assert np.abs(image[::8, ::8].astype(float) - expected * 255).max() <= 1


def test_files_route_serves_run_files_with_content_types(server, run_dir):
    for path, kind in (("manifest.json", "application/json"), ("overview/predictions.csv", "text/csv"), ("report.html", "text/html"),
                       ("heads/atlas.png", "image/png"), ("inside_link.json", "application/json")):
        status, headers, body = get(server, "/files/" + path)
        assert status == 200, (path, body)
        assert headers["content-type"].startswith(kind) and headers["x-content-type-options"] == "nosniff"
        assert body == (run_dir / path).read_bytes()
    status, _, body = get(server, "/files/no/such/file.png")
    assert status == 404 and "error" in json.loads(body)
    assert get(server, "/files/heads")[0] == 404  # a folder: no listing


@pytest.mark.parametrize("name", HOSTILE_FILES)
def test_run_files_that_could_run_script_are_sandboxed(server, run_dir, name):
    status, headers, body = get(server, "/files/" + name)
    assert status == 200 and body == (run_dir / name).read_bytes()
    assert_locked_down(headers)
    expected = {".html": "text/html", ".svg": "image/svg+xml"}.get(name[name.rfind("."):], "application/octet-stream")
    assert headers["content-type"].startswith(expected)  # no type guessed: .xml, .xhtml, .js … are bytes to download


@pytest.mark.parametrize("path, status", [
    ("/api/run", 200), ("/api/image?index=0", 200), ("/api/attention?index=0&row=1&col=1", 200), ("/files/manifest.json", 200),
    ("/files/heads/atlas.png", 200), ("/files/report.html", 200), ("/files/no/such.png", 404), ("/files/../secret.txt", 403),
    ("/nowhere", 404), ("/api/attention?index=abc&row=1&col=1", 400), ("/files/" + "a" * 2000, 404),
])
def test_every_response_but_the_page_is_locked_down(server, path, status):
    got, headers, _ = get(server, path)
    assert got == status
    assert_locked_down(headers)


def test_errors_outside_routing_are_locked_down_too(server):
    for status, headers, body in (get(server, "/api/run", method="POST"), get(server, "/api/run", headers={"Host": "attacker.example"}),
                                  raw(server, b"GET / HTTP/banana\r\n\r\n"), raw(server, b"NONSENSE\r\n\r\n")):
        assert status in (400, 403, 405) and set(strict_json(body)) == {"error"}
        assert_locked_down(headers)
    status, headers, body = raw(server, b"GET /api/run\r\nHost: 127.0.0.1\r\n\r\n")  # HTTP/0.9: http.server would send no headers
    assert status == 200 and strict_json(body)["run"] == "demo"
    assert_locked_down(headers)


@pytest.mark.parametrize("path, status", [
    ("/files/" + "a" * 300, 404),  # one name longer than the file system allows
    ("/files/" + "a/" * 3000, 404),  # a path longer than the file system allows
    ("/files/" + "%61" * 2000, 404), ("/" + "x" * (MAX_PATH_CHARS + 1), 404),
    ("/api/run?" + "x=1&" * MAX_QUERY_CHARS, 414), ("/api/attention?index=0&row=1&col=1&pad=" + "x" * MAX_QUERY_CHARS, 414),
])
def test_over_long_paths_and_queries_are_refused_quickly(server, path, status):
    start_s = time.monotonic()
    got, headers, body = get(server, path)
    assert got == status and time.monotonic() - start_s < 5
    error = strict_json(body)["error"]
    assert "\n" not in error and "internal error" not in error and len(error) < 300
    assert_locked_down(headers)


@pytest.mark.parametrize("target", [b"http://[x/api/run", b"//[x/api/run", b"/files/%zz", b"*"])
def test_request_targets_that_do_not_parse_as_urls_are_404(server, target):
    status, headers, body = raw(server, b"GET " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert 400 <= status < 500 and "internal error" not in strict_json(body)["error"]
    assert_locked_down(headers)


def test_json_is_strict_even_for_non_finite_numbers(server, monkeypatch):
    non_finite = {"attention": [float("nan"), float("inf"), -float("inf"), np.float32("nan"), 0.5]}
    monkeypatch.setattr(server.state, "attention", lambda index, row, col, step: non_finite)
    status, _, body = get(server, "/api/attention?index=0&row=1&col=1")
    assert status == 200 and strict_json(body) == {"attention": [None, None, None, None, 0.5]}


def test_request_lines_are_logged_escaped_and_cut(server, monkeypatch, caplog):
    monkeypatch.setattr(server, "quiet", False)
    with caplog.at_level(logging.INFO, logger="vitcircuits.serve.server"):
        raw(server, b"GET /\x1b[31mred\x07\x1b[0m" + b"y" * 5000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    messages = [r.getMessage() for r in caplog.records]
    assert messages and all("\x1b" not in m and "\x07" not in m and len(m) < 400 for m in messages)
    assert any("\\x1b[31mred\\x07" in m for m in messages)


@pytest.mark.parametrize("path", [
    "/files/../secret.txt", "/files/../manifest.json", "/files/heads/../../secret.txt", "/files/%2e%2e/secret.txt", "/files/%2E%2E/secret.txt",
    "/files/..%2fsecret.txt", "/files/heads%2f..%2f..%2fsecret.txt", "/files/%2e%2e/%2e%2e/etc/passwd", "/files/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/files//etc/passwd", "/files/%2fetc%2fpasswd", "/files/..\\secret.txt", "/files/..%5csecret.txt", "/files/C:%5cWindows%5cwin.ini",
    "/files/outside_link.txt", "/files/outside_dir/secret.txt", "/files/manifest.json%00.png", "/files/%ff%fe",
])
def test_files_route_refuses_paths_outside_the_run(server, path):
    status, headers, body = get(server, path)
    assert 400 <= status < 500, (path, status)
    assert headers["content-type"] == "application/json" and set(json.loads(body)) == {"error"}
    assert SECRET.encode() not in body and b"root:" not in body and b"model_id" not in body


@pytest.mark.parametrize("query, name", [
    ("/api/attention?index=abc&row=1&col=1", "index"), ("/api/attention?index=99999&row=1&col=1", "index"),
    ("/api/attention?index=0&row=8&col=1", "row"), ("/api/attention?index=0&row=1&col=-1", "col"),
    ("/api/attention?index=0&row=1", "col"), ("/api/attention?index=0&row=1.5&col=1", "row"), ("/api/attention?index=0&row=--1&col=1", "row"),
    ("/api/attention?index=0&index=1&row=1&col=1", "index"), ("/api/image", "index"), ("/api/image?index=", "index"),
    ("/api/image?index=%F0%9F%92%A5", "index"), ("/api/image?index=12345678901234567890", "index"),
    ("/api/atlas", "step"), ("/api/atlas?step=-3", "step"), ("/api/attention?index=0&row=1&col=1&step=x", "step"),
])
def test_bad_parameters_are_400_naming_the_parameter(server, query, name):
    status, headers, body = get(server, query)
    error = json.loads(body)["error"]
    assert status == 400 and headers["content-type"] == "application/json"
    assert error.startswith(name + ":") and "\n" not in error and "Traceback" not in error


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "BREW"])
def test_only_get_is_allowed(server, method):
    status, headers, body = get(server, "/api/run", method=method)
    assert status == 405 and headers["allow"] == "GET"
    if method != "HEAD":
        assert "GET" in json.loads(body)["error"]


def test_unknown_route_and_foreign_host(server):
    status, _, body = get(server, "/etc/passwd")
    assert status == 404 and json.loads(body)["error"].startswith("no such route")
    status, _, body = get(server, "/api/run", headers={"Host": "attacker.example:8765"})  # DNS rebinding
    assert status == 403 and "Host" in json.loads(body)["error"]
    with urllib.request.urlopen(server.url.replace("127.0.0.1", "localhost") + "api/run", timeout=60) as resp:
        assert resp.status == 200


def test_internal_errors_are_one_json_line_without_traceback(server, monkeypatch, capsys):
    def boom(*args):
        raise RuntimeError("secret detail\nsecond line")

    monkeypatch.setattr(server.state, "attention", boom)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(server.url + "api/attention?index=0&row=1&col=1", timeout=60)
    body = err.value.read().decode()
    assert err.value.code == 500 and err.value.headers["Content-Type"] == "application/json"
    assert json.loads(body) == {"error": "internal error (RuntimeError); details are in the server log"}
    assert "Traceback" not in body and "secret detail" not in body


def test_without_a_model_the_run_is_still_served(run_dir, tmp_path_factory):
    state = RunState(run_dir, model="bundled:no-such-organism", device="cpu")
    assert not state.live and "no-such-organism" in state.reason
    srv, thread = start(state)
    try:
        run = get_json(srv, "/api/run")
        assert run["live"] is False and "no-such-organism" in run["reason"] and len(run["atlas"]) == 16 and run["images"]
        assert (run["rows"], run["cols"], run["n_layers"], run["n_heads"]) == (8, 8, 4, 4)
        status, _, body = get(srv, "/api/attention?index=0&row=1&col=1")
        assert status == 503 and "live attention is unavailable" in json.loads(body)["error"]
        assert get(srv, "/api/image?index=0")[0] == 503
        assert get(srv, "/files/manifest.json")[0] == 200
    finally:
        stop(srv, thread)


def test_circuits_from_a_hand_written_run_keep_null_fields_null(tmp_path):
    from tests.test_report import circuits_document

    document = circuits_document()
    document["circuits"][0]["evidence"]["attribution"] = float("nan")  # json writes NaN; the page gets null
    (tmp_path / "composition").mkdir()
    (tmp_path / "composition" / "circuits.json").write_text(json.dumps(document))
    state = RunState(tmp_path, device="cpu")
    assert not state.live
    supported, weak, none = state.summary["circuits"]
    edges = state.summary["edges"]
    assert edges["verdicts"] == {"supported": 1, "weak": 40, "none": 247} and (edges["n"], edges["n_listed"]) == (288, 3)
    assert (supported["composes_at"], supported["composes_effect"], supported["composes_null_q95"]) == ("prefix", 0.0312, 0.0121)
    assert supported["matters_checked"] and supported["matters_effect"] == 0.25 and supported["attribution"] is None
    assert weak["composes_at"] == "patch" and weak["silent"] and not weak["matters_checked"] and weak["matters_effect"] is None
    assert weak["weight_z"] is None and weak["attribution"] is None
    assert none["composes_at"] == "patch" and none["matters_checked"] and none["matters_null_q95"] is None
    assert "NaN" not in json.dumps(state.summary)


def test_cli_registers_serve(tmp_path):
    from vitcircuits.cli import app

    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "--no-browser" in result.output and "--port" in result.output
    missing = CliRunner().invoke(app, ["serve", str(tmp_path / "missing"), "--no-browser", "--port", "0"])
    assert missing.exit_code == 2 and "error:" in missing.output and "Traceback" not in missing.output


def test_steps_of_a_run_without_dynamics_are_unavailable_in_one_line(server):
    assert get_json(server, "/api/run")["steps"] == []
    for path in ("/api/atlas?step=5", "/api/attention?index=0&row=1&col=1&step=5"):
        status, _, body = get(server, path)
        assert status == 503 and json.loads(body)["error"].startswith("step 5: this run ")
