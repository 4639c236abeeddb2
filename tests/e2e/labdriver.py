"""JupyterLab in headless Chromium for the end-to-end tests: a server on localhost, notebook copies, page probes.

Everything here waits on a condition with a deadline; nothing sleeps a fixed time. Failures raise `LabError`
naming what was expected and what the server or the page showed instead.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("Q3LAB_CHROMIUM", "/usr/bin/chromium")
# Flags that work on these machines (root, no GPU, no display, no outside network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STDERR_MIME = "application/vnd.jupyter.stderr"
# An error output (a traceback) or an exception line; plain warnings on stderr are reported, not failed.
_ERROR_TEXT = re.compile(r"Traceback|^\s*\w*(Error|Exception)\b", re.M)


class LabError(RuntimeError):
    """The server, the notebook copy or the page did not reach the state a test waits for."""


# ---------------------------------------------------------------------------------------------- notebooks

def set_parameters(src: Path, dest: Path, values: dict[str, object]) -> Path:
    """Copy notebook `src` to `dest` with `values` assigned in its `parameters` cell, outputs cleared.

    Each name must already be assigned in that cell: a renamed parameter fails here, not as a silently
    ignored override. Outputs and execution counts are cleared so that the page starts with empty prompts.
    """
    nb = nbformat.read(src, as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(cells) != 1:
        raise LabError(f"{src}: expected one cell tagged 'parameters', found {len(cells)}")
    lines = cells[0].source.splitlines()
    for name, value in values.items():
        hits = [i for i, line in enumerate(lines) if re.match(rf"{re.escape(name)}\s*=", line)]
        if len(hits) != 1:
            raise LabError(f"{src}: parameters cell assigns {name!r} {len(hits)} times, expected once:\n"
                           f"{cells[0].source}")
        lines[hits[0]] = f"{name} = {value!r}  # set by tests/e2e"
    cells[0].source = "\n".join(lines)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    dest.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, dest)
    return dest


def notebook_parameters(root: Path, **extra) -> dict:
    """Parameter values pointing a notebook copy at the synthetic checkpoint and prompts in `root`."""
    return dict(checkpoint=str(root / "ckpt"), prompts=str(root / "prompts.jsonl"),
                figures_dir=str(root / "figures"), out_dir=str(root / "out"), max_prompts=6, **extra)


# ------------------------------------------------------------------------------------------------- server

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (if another process takes it first, the server exits: no retries)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _settings(settings_dir: Path) -> None:
    # No news/update requests (no outside network), and every cell attached to the DOM so probes see them.
    files = {
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    }
    for rel, value in files.items():
        path = settings_dir / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@dataclass
class LabServer:
    """A JupyterLab server started from this interpreter's environment; `url(path)` opens a notebook."""

    proc: subprocess.Popen
    port: int
    token: str
    root: Path
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, notebook: str, workspace: str) -> str:
        """Open `notebook` in an empty workspace of its own (`reset`): no tab restored from another page."""
        return f"{self.base}/lab/workspaces/{workspace}/tree/{notebook}?reset&token={self.token}"

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def status(self) -> dict | None:
        """GET /api/status with the token; None while the server does not answer yet."""
        req = urllib.request.Request(f"{self.base}/api/status", headers={"Authorization": f"token {self.token}"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return None

    def stop(self, timeout: float = 15) -> None:
        """Shut the server down through its API (it stops its kernels), then end its process group."""
        if self.proc.poll() is None:
            req = urllib.request.Request(f"{self.base}/api/shutdown", method="POST",
                                         headers={"Authorization": f"token {self.token}"})
            try:
                urllib.request.urlopen(req, timeout=5).close()
                self.proc.wait(timeout)
            except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
                pass
        # Kernels left behind by a server that did not stop in time share its process group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout)
                break
            except subprocess.TimeoutExpired:
                continue


def start_lab(root: Path, state: Path, log: Path, timeout: float = 120) -> LabServer:
    """Start `jupyter lab` on 127.0.0.1 serving `root`; returns once /api/status answers (bounded by timeout).

    `state` holds a fresh Jupyter config/data/runtime and JupyterLab settings/workspaces, so the user's own
    settings, kernels and saved layouts play no part.
    """
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_DATA_DIR", "data"),
                     ("JUPYTER_RUNTIME_DIR", "runtime"), ("JUPYTERLAB_SETTINGS_DIR", "settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "workspaces"), ("IPYTHONDIR", "ipython")]:
        env[var] = str(state / sub)
        (state / sub).mkdir(parents=True, exist_ok=True)
    env.pop("JUPYTER_PATH", None)
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    _settings(state / "settings")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.port_retries=0",
           "--ServerApp.terminals_enabled=False", "--LabApp.extension_manager=readonly",
           # A server orphaned by a killed test run exits on its own once idle.
           "--ServerApp.shutdown_no_activity_timeout=900"]
    if os.geteuid() == 0:  # CI and these machines run as root
        cmd.append("--allow-root")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    server = LabServer(proc, port, token, root, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LabError(f"jupyter lab exited with status {proc.returncode} before answering on port {port}; "
                           f"log {log}:\n{server.log_tail()}")
        if server.status() is not None:
            return server
        try:  # the poll interval, cut short if the server exits
            proc.wait(0.25)
        except subprocess.TimeoutExpired:
            pass
    server.stop()
    raise LabError(f"jupyter lab did not answer /api/status on port {port} within {timeout:.0f} s; "
                   f"log {log}:\n{server.log_tail()}")


# --------------------------------------------------------------------------------------------------- page

# The page's state in one probe: kernel status, each code cell's prompt, error texts, dialogs.
_PROBE = """(panel) => {
  const cells = [...panel.querySelectorAll('.jp-Notebook .jp-Cell.jp-CodeCell')];
  const ind = panel.querySelector('.jp-Notebook-ExecutionIndicator');
  const stderr = [...panel.querySelectorAll('.jp-OutputArea-output[data-mime-type="%s"]')];
  const kernel = panel.querySelector('.jp-Toolbar-kernelName');
  return {
    status: ind ? ind.getAttribute('data-status') : null,
    kernel: kernel ? kernel.textContent.trim() : null,
    prompts: cells.map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || ''),
    stderr: stderr.map(e => e.textContent),
    dialogs: [...document.querySelectorAll('.jp-Dialog')].map(d => d.textContent.slice(0, 300)),
  };
}""" % STDERR_MIME


@dataclass
class RunResult:
    """What the page showed once every cell ran (or the run stopped at an error)."""

    prompts: list[str]
    errors: list[str]
    warnings: list[str]
    seconds: float


# Conditions on the probe's state `s`. The indicator reads 'idle' before a kernel is attached ('No Kernel').
_KERNEL_READY = "s.status === 'idle' && s.kernel && s.kernel !== 'No Kernel'"
_RUN_DONE = (r"s.status === 'idle' && (s.prompts.every(p => /^\[\d+\]:$/.test(p.trim())) || "
             r"s.stderr.some(t => /%s/m.test(t)))" % _ERROR_TEXT.pattern)


def _wait_state(page, panel, condition: str, what: str, timeout: float) -> dict:
    """Wait (polling the page, bounded) until `condition` holds on the probe's state or a dialog opens."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    js = f"(panel) => {{ const s = ({_PROBE})(panel); return (s.dialogs.length || ({condition})) ? s : null; }}"
    try:
        state = page.wait_for_function(js, arg=panel.element_handle(), polling=250,
                                       timeout=timeout * 1000).json_value()
    except PlaywrightTimeout:
        state = panel.evaluate(_PROBE)
        raise LabError(f"{what}: not reached after {timeout:.0f} s: kernel {state['kernel']!r} "
                       f"{state['status']!r}, prompts {state['prompts']}") from None
    if state["dialogs"]:
        raise LabError(f"{what}: a dialog opened instead: {state['dialogs']}")
    return state


def open_notebook(page, server: LabServer, name: str, timeout: float = 120):
    """Open notebook `name` in JupyterLab and wait until its kernel is idle; returns the panel's locator."""
    page.goto(server.url(name, workspace=f"e2e-{secrets.token_hex(4)}"))
    panel = page.locator(".jp-NotebookPanel")
    panel.wait_for(state="visible", timeout=timeout * 1000)
    if panel.count() != 1:  # menu commands act on the current notebook: there must be only this one
        raise LabError(f"{name}: expected one notebook open in a fresh workspace, found {panel.count()}")
    _wait_state(page, panel, _KERNEL_READY, f"{name}: kernel started and idle", timeout)
    return panel


def run_all(page, panel, name: str, timeout: float = 180) -> RunResult:
    """Run > Run All Cells from the menu bar; wait until the kernel is idle and every code cell has run
    (or an error output appeared, which stops Run All)."""
    panel.locator(".jp-Cell .jp-InputPrompt").first.click()  # the notebook becomes the current widget
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
    t0 = time.monotonic()
    state = _wait_state(page, panel, _RUN_DONE, f"{name}: Run All finished", timeout)
    errors = [t for t in state["stderr"] if _ERROR_TEXT.search(t)]
    return RunResult(state["prompts"], errors, [t for t in state["stderr"] if t not in errors],
                     time.monotonic() - t0)


# Every figure inside an element: the image sources joined, '' while there is none.
_FIGURES = "(el) => [...el.querySelectorAll('img')].map(i => i.src).join('|')"


def figure_sources(scope) -> str:
    """The sources of every image inside the locator `scope`, joined ('' when there is none)."""
    return scope.evaluate(_FIGURES)


def wait_figures_changed(page, scope, before: str, what: str, timeout: float = 30) -> str:
    """Wait until the images inside `scope` are there and differ from `before`; returns their sources."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    js = f"([el, b]) => {{ const v = ({_FIGURES})(el); return v && v !== b ? v : null; }}"
    try:
        return page.wait_for_function(js, arg=[scope.element_handle(), before], polling=100,
                                      timeout=timeout * 1000).json_value()
    except PlaywrightTimeout:
        raise LabError(f"{what}: the figure did not change within {timeout:.0f} s "
                       f"(still {figure_sources(scope)[:60]!r}...)") from None


# ------------------------------------------------------------------------------------------------ images

def image_stats(png: bytes) -> dict:
    """Distinct colours, the share of the most common colour, and a hash of the pixels of a PNG."""
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    colours = img.getcolors(maxcolors=img.width * img.height)
    top = max(n for n, _ in colours)
    return dict(size=img.size, colours=len(colours), top_share=top / (img.width * img.height),
                sha256=hashlib.sha256(img.tobytes()).hexdigest())


def check_not_blank(png: bytes, what: str, min_colours: int = 16, max_top_share: float = 0.98) -> dict:
    """Raise unless the screenshot shows something: enough distinct colours, not one colour almost everywhere."""
    stats = image_stats(png)
    if stats["colours"] < min_colours or stats["top_share"] > max_top_share:
        raise LabError(f"{what}: screenshot looks blank: {stats['colours']} colours (expected >= {min_colours}), "
                       f"most common colour covers {stats['top_share']:.1%} (expected <= {max_top_share:.0%})")
    return stats
