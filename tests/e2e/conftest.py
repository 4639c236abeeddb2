"""Browser tests: JupyterLab in headless Chromium, skipped unless Q3LAB_E2E=1 (what `make e2e` sets).

Fixtures: a synthetic checkpoint and prompt file, a temp folder of notebook copies served by one JupyterLab
server, and a Chromium page. Screenshots and the server log go to out/e2e/ (or $Q3LAB_E2E_OUT).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from labdriver import CHROMIUM, CHROMIUM_ARGS, REPO, start_lab

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("Q3LAB_E2E") == "1"


def pytest_collection_modifyitems(config, items):
    # Only tests that need the browser or the server are skipped; the harness's own unit tests always run.
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="browser test: run `make e2e` (sets Q3LAB_E2E=1)")
    for item in items:
        if HERE in Path(item.path).parents and {"page", "lab", "browser"} & set(item.fixturenames):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_out() -> Path:
    """Where screenshots and logs go; emptied at the start of a run."""
    out = Path(os.environ.get("Q3LAB_E2E_OUT", REPO / "out" / "e2e")).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@pytest.fixture(scope="session")
def lab_root(tmp_path_factory) -> Path:
    """The folder JupyterLab serves: notebooks/ (copies), ckpt/ (synthetic), prompts.jsonl, figures/, out/."""
    from q3lab.weights.synthetic import synth
    root = tmp_path_factory.mktemp("lab")
    synth(root / "ckpt", "tiny", seed=0, progress=False)
    # Prompts in the embedded sets' format (facts: expected; domains: domain), two per domain so that 05's
    # per-domain statistics have more than one prompt each; the synthetic tokenizer encodes any text.
    prompts = [{"prompt": "The capital of France is", "expected": " Paris", "domain": "facts"},
               {"prompt": "The capital of Italy is", "expected": " Rome", "domain": "facts"},
               {"prompt": "12 + 30 =", "expected": " 42", "domain": "math"},
               {"prompt": "7 * 6 =", "expected": " 42", "domain": "math"},
               {"prompt": "def main(", "expected": ")", "domain": "code"},
               {"prompt": "import os\nprint(", "expected": "os", "domain": "code"}]
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (root / "notebooks").mkdir()
    return root


@pytest.fixture(scope="session")
def lab(lab_root, e2e_out, tmp_path_factory):
    """One JupyterLab server for the session, serving lab_root."""
    server = start_lab(lab_root, tmp_path_factory.mktemp("jupyter_state"), e2e_out / "jupyterlab.log")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def browser():
    """Debian's Chromium driven by Playwright (Playwright's own browser builds cannot be downloaded here)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: `apt-get install -y chromium` (or set Q3LAB_CHROMIUM)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as pw:
        # launch() gives every run a fresh temporary profile (user-data-dir).
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, e2e_out, request):
    """A fresh browser context and page, 1400x1000, 30 s default timeout for each action.

    The browser console goes to out/e2e/<test>.console.log; an uncaught page error or a console error
    (a widget view that failed to render logs one) fails the test at teardown.
    """
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    ctx.set_default_timeout(30_000)
    pg = ctx.new_page()
    log, bad = [], []
    pg.on("console", lambda m: (log.append(f"console.{m.type}: {m.text}"),
                                m.type == "error" and bad.append(m.text)))
    pg.on("pageerror", lambda e: (log.append(f"pageerror: {e}"), bad.append(str(e))))
    yield pg
    ctx.close()
    (e2e_out / f"{request.node.name}.console.log").write_text("\n".join(log) + "\n")
    assert not bad, f"browser errors during {request.node.name}:\n" + "\n".join(bad)
