"""The report and the explorer in a real (headless) Chromium: no console errors, sections and
images present, clicking a patch renders live attention, traversal refused, atlas hover, and no
script from a run folder's own HTML or SVG."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time

import pytest

from tests.serve.demo_run import add_hostile_files, demo_run

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright; the browser is the system chromium)")

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM, reason="no Chromium found: set CHROMIUM_PATH or install chromium (e.g. apt-get install chromium)"),
]
TIMEOUT_MS = 60_000  # generous: the CI machine may be busy


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return demo_run(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh page recording console errors and uncaught page errors."""
    context = browser.new_context()
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.errors = []
    pg.on("console", lambda msg: pg.errors.append(f"console: {msg.text}") if msg.type == "error" else None)
    pg.on("pageerror", lambda err: pg.errors.append(f"page error: {err}"))
    yield pg
    context.close()


@contextlib.contextmanager
def serving(run_dir):
    """The explorer on ``run_dir`` in a background thread; yields its URL."""
    from vitcircuits.serve import RunState, make_server

    server = make_server(RunState(run_dir, device="cpu"), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.url
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture(scope="module")
def server_url(run_dir):
    with serving(run_dir) as url:
        yield url


def test_report_renders_without_errors(page, run_dir):
    page.goto((run_dir / "report.html").as_uri())
    page.wait_for_load_state("load")
    sections = ["model", "data", "heads", "composition", "attention"] + (["sae"] if (run_dir / "sae" / "metrics.json").exists() else [])
    for section in sections:
        assert page.locator(f"section#{section}").is_visible(), section
    images = page.eval_on_selector_all("img", "imgs => imgs.map(i => [i.complete, i.naturalWidth, i.alt])")
    assert images, "the report has no images"
    assert all(complete and width > 0 for complete, width, _ in images), [alt for c, w, alt in images if not (c and w > 0)]
    assert page.errors == []


def wait_until(page, expression: str) -> None:
    """Poll ``expression`` until true. The explorer's policy forbids eval, which ``page.wait_for_function`` needs."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        page.wait_for_timeout(100)


def _click_patch(page, row: int, col: int, rows: int, cols: int) -> None:
    canvas = page.locator("#image-canvas")
    box = canvas.bounding_box()
    canvas.click(position={"x": (col + 0.5) * box["width"] / cols, "y": (row + 0.5) * box["height"] / rows})
    page.wait_for_selector(f'#attention-panel[data-query="{row},{col}"][data-state="ready"]')
    assert page.locator("#query-label").text_content() == f"query row {row}, col {col}"


def test_clicking_a_patch_shows_live_attention(page, server_url):
    page.goto(server_url)
    page.wait_for_selector("#image-select option", state="attached")
    run = json.loads(page.request.get(server_url + "api/run").text())
    rows, cols = run["rows"], run["cols"]
    assert page.locator("#image-select option").count() == len(run["images"])
    page.wait_for_selector('#image-canvas[data-image="0"]')
    maps = "document.querySelectorAll('#attention-panel canvas.head-map')"
    _click_patch(page, 1, 2, rows, cols)
    assert page.evaluate(f"{maps}.length") == run["n_layers"] * run["n_heads"]
    first = page.evaluate(f"Array.from({maps}).map(c => c.toDataURL())")
    _click_patch(page, 6, 5, rows, cols)
    second = page.evaluate(f"Array.from({maps}).map(c => c.toDataURL())")
    assert first != second and len(set(second)) > 1
    page.select_option("#image-select", str(run["images"][5]["index"]))  # another image: same query, new maps
    page.wait_for_selector(f'#attention-panel[data-image="{run["images"][5]["index"]}"][data-query="6,5"][data-state="ready"]')
    assert page.evaluate(f"Array.from({maps}).map(c => c.toDataURL())") != second
    assert page.locator("#error").is_hidden()
    assert "Live attention: on" in page.locator("#live-status").text_content()
    assert page.errors == []


def test_traversal_is_refused_from_the_browser(page, server_url):
    page.goto(server_url)
    # Browsers resolve '..' and '%2e%2e' before sending; encoded slashes and raw paths in fetch reach the server as sent.
    for path in ("files/../manifest.json", "files/%2e%2e/manifest.json", "files/..%2fmanifest.json", "files/heads%2f..%2f..%2fsecret",
                 "files/%2fetc%2fpasswd", "files/..%5cmanifest.json"):
        response = page.request.get(server_url + path)
        assert 400 <= response.status < 500, (path, response.status)
        assert "model_id" not in response.text() and "root:" not in response.text()
    status = page.evaluate("fetch('/files/..%2f..%2fetc%2fpasswd').then(r => r.status)")
    assert status == 403
    assert page.request.get(server_url + "files/manifest.json").status == 200


def test_run_folder_html_and_svg_run_no_script(page, run_dir, server_url):
    add_hostile_files(run_dir)
    for name, shown in (("hostile/page.html", "p"), ("hostile/image.svg", "circle")):
        page.goto(server_url + "files/" + name)
        page.wait_for_load_state("load")
        page.wait_for_timeout(500)  # time for the script's fetch, had it run
        assert page.locator(shown).count() == 1, name  # rendered in the browser, not downloaded
        assert page.evaluate("window.name") == "", name  # the hostile script sets it
        assert page.evaluate("self.origin") == "null", name  # sandboxed: an opaque origin, not the explorer's


def test_hovering_an_atlas_cell_shows_its_kernel_and_kind(page, server_url):
    page.goto(server_url)
    page.wait_for_selector("#atlas-grid td.atlas-cell")
    run = json.loads(page.request.get(server_url + "api/run").text())
    for row in (run["atlas"][0], run["atlas"][-1]):
        name = f"L{row['layer']}H{row['head']}"
        page.hover(f'#atlas-grid td[data-head="{name}"]')
        page.wait_for_selector(f'#kernel-box[data-head="{name}"]')
        assert page.locator("#kernel-title").text_content() == f"{name} · {row['kind']}"
        assert page.locator("#kernel-box canvas").count() == 1
        assert f"{row['modular_score']:.3f}" in page.locator("#kernel-box").text_content()
    legend = page.locator("#atlas-legend").text_content()
    assert all(kind in legend for kind in ("modular", "directional", "self", "cls/sink", "global", "mixed"))
    circuits = page.locator("#circuits-table tr").count()
    assert circuits == len(run["circuits"]) + 1
    info = page.locator("#circuits-info").text_content()
    assert f"{run['edges']['n']} edges: {run['edges']['verdicts']['supported']} supported" in info and "composes and matters" in info
    assert "null q95" in page.locator("#circuits-table").text_content() and "NaN" not in page.locator("#circuits-table").text_content()
    if run["features"]:
        assert page.locator("#features-table tr").count() == len(run["features"]["top"]) + 1
        wait_until(page, "Array.from(document.querySelectorAll('#features-figures img')).every(i => i.complete && i.naturalWidth > 0)")
    assert page.errors == []


def test_without_a_model_the_page_says_why(page, run_dir):
    from vitcircuits.serve import RunState, make_server

    server = make_server(RunState(run_dir, model="bundled:no-such-organism", device="cpu"), port=0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page.goto(server.url)
        page.wait_for_selector("#live-status.warn")
        status = page.locator("#live-status").text_content()
        assert status.startswith("Live attention is unavailable") and "no-such-organism" in status
        assert page.locator("#image-select option").count() > 0 and page.locator("#atlas-grid td.atlas-cell").count() == 16
        assert page.errors == []
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_report_first_screen_table_of_contents_and_galleries(page, run_dir):
    """The summary fits the first screen with the run's own verdict counts; every contents link
    scrolls its section into view while the contents stay in view; galleries open on a click."""
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto((run_dir / "report.html").as_uri())
    page.wait_for_load_state("load")
    sections = page.eval_on_selector_all("main > section", "s => s.map(x => x.id)")
    links = page.eval_on_selector_all("#toc a", "a => a.map(x => x.getAttribute('href'))")
    assert sections[:3] == ["summary", "how-to-read", "verdicts"] and links == [f"#{s}" for s in sections]
    counts = json.loads((run_dir / "composition" / "circuits.json").read_text())["verdicts"]
    for verdict, count in counts.items():
        assert page.locator(f'#verdict-counts [data-verdict="{verdict}"] b').text_content() == str(count)
    key = page.locator("#summary .key-figure img")
    assert key.count() == 1
    box = key.bounding_box()
    assert box["height"] > 100 and box["y"] + box["height"] <= 800, "the summary figure fits the first screen"
    for section in reversed(sections):  # from the bottom up, so every click scrolls
        page.click(f'#toc a[href="#{section}"]')
        page.wait_for_function(f"location.hash === '#{section}'")
        top, bottom = page.evaluate(f"(() => {{ const r = document.getElementById('{section}').getBoundingClientRect(); return [r.top, r.bottom]; }})()")
        assert top < 800 and bottom > 0, (section, top, bottom)
        toc = page.locator("#toc").bounding_box()
        assert 0 <= toc["y"] < 50 and page.locator(f'#toc a[href="#{section}"]').is_visible(), "the contents stay in view"
    galleries = page.locator("details")
    assert galleries.count() >= 2
    assert page.eval_on_selector_all("details", "d => d.every(x => !x.open)")
    assert page.locator("#attention figure").count() == page.locator("#attention details figure").count() > 0, "attention-map grids"
    overlays = page.locator("#heads details figure")
    assert overlays.count() > 0 and all(alt.startswith("Layer ") for alt in overlays.evaluate_all("f => f.map(x => x.querySelector('img').alt)"))
    assert page.locator("#heads > figure").count() == 3, "the atlas figures stay open"
    assert page.locator("#sae figure").count() == page.locator("#sae details figure").count(), "SAE feature figures"
    first = page.locator("#attention details")
    assert not page.locator("#attention details img").first.is_visible()
    first.locator("summary").click()
    assert first.evaluate("d => d.open")
    page.wait_for_function("Array.from(document.querySelectorAll('#attention details img')).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#attention details img").first.is_visible()
    assert page.errors == []


@pytest.fixture(scope="module")
def dynamics_url(tmp_path_factory):
    """The explorer on a `vitcircuits dynamics` run of a tiny organism's checkpoint series."""
    from typer.testing import CliRunner

    from vitcircuits.cli import app
    from vitcircuits.organisms.shapes import ShapesOrganismConfig, train_shapes_organism

    root = tmp_path_factory.mktemp("dynamics")
    train_shapes_organism(ShapesOrganismConfig(epochs=2, batch_size=16, embed_dim=16, depth=2, num_heads=2, n_train=320, n_test=30,
                                               threads=1, checkpoints=5), root / "organism", progress=False)
    result = CliRunner().invoke(app, ["dynamics", "--checkpoints", str(root / "organism"), "--images", "bundled:shapes",
                                      "--out", str(root / "run"), "--device", "cpu", "--quick"])
    assert result.exit_code == 0, result.output
    with serving(root / "run") as url:
        yield url


def test_the_step_slider_shows_a_checkpoints_atlas_and_attention(page, dynamics_url):
    page.goto(dynamics_url)
    page.wait_for_selector("#image-select option", state="attached")
    run = json.loads(page.request.get(dynamics_url + "api/run").text())
    steps = run["steps"]
    assert page.locator("#step-box").is_visible() and page.locator("#step-label").text_content() == f"{steps[-1]} (last)"
    page.wait_for_selector('#image-canvas[data-image="0"]')
    maps = "Array.from(document.querySelectorAll('#attention-panel canvas.head-map')).map(c => c.toDataURL())"
    _click_patch(page, 3, 3, run["rows"], run["cols"])
    last = page.evaluate(maps)
    first_atlas = json.loads(page.request.get(dynamics_url + f"api/atlas?step={steps[0]}").text())["atlas"]
    page.locator("#step-slider").fill("0")  # fires input
    page.wait_for_selector(f'#step-label:text-is("{steps[0]}")')
    page.wait_for_selector('#attention-panel[data-state="ready"]')
    wait_until(page, f"JSON.stringify({maps}) !== {json.dumps(json.dumps(last))}")
    row = first_atlas[0]
    page.hover(f'#atlas-grid td[data-head="L{row["layer"]}H{row["head"]}"]')
    assert f"{row['modular_score']:.3f}" in page.locator("#kernel-box").text_content()
    assert page.locator("#error").is_hidden() and page.errors == []
