"""A learner's first run in a real browser: JupyterLab, Run All, save, reload (``make browser-check``).

    python tools/browser_check.py [00] [--out bench/out/browser] [--timeout 900]

Starts JupyterLab on 127.0.0.1 with a random token in a scratch copy of ``notebooks/<NN>_*/`` (fast mode:
``COURSE_FAST=1``; otherwise the learner's environment, progress bars on), opens the notebook in headless
Chromium (the OS package, ``/usr/bin/chromium``, through Playwright; never a downloaded browser build), runs
all cells, saves, reloads the page and fails on:

* a stopped run: a code cell without an execution count in the saved notebook (Run All stops at an error);
* an error box: an ``error`` output in the saved notebook;
* a widget error after the reload ("Error displaying widget", "model not found"), or an "IProgress not found"
  warning (ipywidgets missing).

``--plant-error`` checks the check: it plants a failing cell in the middle of the copy and passes only if the
run is then reported as stopped with an error box (``make browser-check NB=00 ARGS=--plant-error``).

Installs chromium with apt-get and playwright with pip when they are missing. Screenshots (after the run,
after the reload) and the saved notebook go to ``--out``. Not part of ``make test``.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
WIDGET_ERRORS = ("Error displaying widget", "model not found", "IProgress not found")


def ensure_tools() -> None:
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0:
            sys.exit(f"{CHROMIUM} is missing: sudo apt-get install chromium (the Debian package), then run again")
        print("installing chromium with apt-get ...", flush=True)
        if subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True)
            subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True)
    try:
        import playwright  # noqa: F401
    except ImportError:
        print("installing playwright with pip (the package only: the system chromium is used) ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], check=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_lab(root: Path, token: str, port: int, log) -> subprocess.Popen:
    settings = root.parent / "lab-settings"
    (settings / "@jupyterlab" / "apputils-extension").mkdir(parents=True, exist_ok=True)
    (settings / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True, exist_ok=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))  # render every cell, so the page text holds every output
    env = dict(os.environ, COURSE_FAST="1", JUPYTERLAB_SETTINGS_DIR=str(settings))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api/status?token={token}"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("jupyter lab exited at start-up; see its log") from None
            time.sleep(0.5)
    raise RuntimeError("jupyter lab did not answer within 120 s")


JS_STATE = """() => {
  const nb = window.jupyterapp.shell.currentWidget;
  if (!nb || !nb.content || !nb.sessionContext) return null;
  const cells = nb.content.widgets.filter(c => c.model.type === 'code');
  return {status: nb.sessionContext.session ? nb.sessionContext.session.kernel.status : 'none',
          pending: cells.filter(c => c.promptNode && c.promptNode.textContent.includes('*')).length,
          executed: cells.filter(c => c.model.executionCount !== null).length, cells: cells.length};
}"""


PLANTED = 'raise RuntimeError("planted by browser_check --plant-error")'


def plant_error(path: Path) -> int:
    """Insert a failing code cell in the middle of the notebook at ``path``; returns its cell index."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    at = len(nb.cells) // 2
    nb.cells.insert(at, nbformat.v4.new_code_cell(PLANTED))
    nbformat.write(nb, path)
    return at


def check(name: str, out: Path, timeout: float, planted: bool = False) -> int:
    from playwright.sync_api import sync_playwright

    folders = sorted(p for p in (ROOT / "notebooks").glob(f"{name}*/") if (p / f"{p.name}.ipynb").exists())
    if not folders:
        sys.exit(f"no learner notebook matches {name!r} in notebooks/")
    src = folders[0]
    out.mkdir(parents=True, exist_ok=True)
    problems, t0 = [], time.time()
    with tempfile.TemporaryDirectory(prefix="browser-check-") as tmp:
        root = Path(tmp) / "course"
        shutil.copytree(src, root / src.name)
        rel = f"{src.name}/{src.name}.ipynb"
        if planted:
            print(f"planted a failing cell at index {plant_error(root / rel)}", flush=True)
        token, port = secrets.token_hex(16), _free_port()
        with open(out / "jupyterlab.log", "w") as log:
            lab = start_lab(root, token, port, log)
            try:
                with sync_playwright() as p:
                    browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"], headless=True)
                    page = browser.new_page(viewport={"width": 1400, "height": 1000})
                    page.goto(f"http://127.0.0.1:{port}/lab/tree/{rel}?token={token}")
                    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget && "
                                           "window.jupyterapp.shell.currentWidget.sessionContext && "
                                           "window.jupyterapp.shell.currentWidget.sessionContext.session && "
                                           "window.jupyterapp.shell.currentWidget.sessionContext.session.kernel",
                                           timeout=180_000)
                    page.wait_for_function(f"() => ({JS_STATE})().status === 'idle'", timeout=180_000)
                    print(f"[{time.time() - t0:5.0f}s] {rel} open, kernel idle: Run All", flush=True)
                    page.evaluate("() => window.jupyterapp.commands.execute('notebook:run-all-cells')")
                    idle_since, state = None, None
                    while time.time() - t0 < timeout:
                        state = page.evaluate(JS_STATE)
                        busy = state["status"] != "idle" or state["pending"]
                        idle_since = None if busy else (idle_since or time.time())
                        if idle_since and time.time() - idle_since > 5:
                            break
                        time.sleep(1)
                    else:
                        problems.append(f"Run All did not finish within {timeout:.0f} s: {state}")
                    print(f"[{time.time() - t0:5.0f}s] run finished: {state}", flush=True)
                    page.screenshot(path=str(out / "after_run_all.png"), full_page=False)
                    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
                    time.sleep(3)
                    page.reload()
                    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
                    time.sleep(8)  # let outputs and widget views render
                    page.evaluate("() => { const n = document.querySelector('.jp-WindowedPanel-outer'); "
                                  "if (n) n.scrollTop = n.scrollHeight; }")
                    time.sleep(3)
                    text = page.evaluate("() => document.body.innerText")
                    page.screenshot(path=str(out / "after_reload.png"), full_page=False)
                    for needle in WIDGET_ERRORS:
                        if needle in text:
                            problems.append(f"after reload the page shows {needle!r} ({text.count(needle)}x)")
                    browser.close()
            finally:
                lab.terminate()
                try:
                    lab.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    lab.kill()
        saved = root / rel
        shutil.copy(saved, out / saved.name)
        import nbformat

        nb = nbformat.read(saved, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        not_run = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is None]
        if not_run:
            problems.append(f"stopped run: {len(not_run)} of {len(code)} code cells never ran "
                            f"(first: cell {not_run[0]})")
        for i, c in enumerate(nb.cells):
            for o in c.get("outputs", []):
                if o.get("output_type") == "error":
                    problems.append(f"error box in cell {i}: {o.get('ename')}: {o.get('evalue', '')[:150]}")
                text = o.get("text", "")
                if any(w in text for w in WIDGET_ERRORS):
                    problems.append(f"cell {i} printed a widget warning: {text.strip()[:150]}")
        state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
        for i, c in enumerate(nb.cells):
            for o in c.get("outputs", []):
                view = o.get("data", {}).get("application/vnd.jupyter.widget-view+json")
                if view and view.get("model_id") not in state:
                    problems.append(f"cell {i} saved a widget whose model is not saved: 'model not found' on reload")
        last = "".join(o.get("text", "") for o in (code[-1].get("outputs", []) if code else []))
    print(f"[{time.time() - t0:5.0f}s] {len(code)} code cells, {len(code) - len(not_run)} ran; last cell says:")
    print("    " + "\n    ".join(last.strip().splitlines() or ["(nothing)"]))
    print(f"screenshots and the saved notebook: {out}")
    if planted:
        caught = any(p.startswith("stopped run") for p in problems) and any("planted by" in p for p in problems)
        print(("SELF-CHECK PASSED: the planted error was reported" if caught else
               "SELF-CHECK FAILED: the planted error was not reported as a stopped run with its error box")
              + (":\n  - " + "\n  - ".join(problems) if problems else ""))
        return 0 if caught else 1
    if problems:
        print("BROWSER CHECK FAILED:\n  - " + "\n  - ".join(problems))
        return 1
    print("BROWSER CHECK PASSED: Run All reached the last cell, no error box, no widget error after reload")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", nargs="?", default="00", help="prefix of a notebooks/ folder (default 00)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "browser")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for Run All")
    parser.add_argument("--plant-error", action="store_true",
                        help="check the check: plant a failing cell; pass only if the run is reported stopped")
    args = parser.parse_args(argv)
    ensure_tools()
    return check(args.notebook, args.out, args.timeout, planted=args.plant_error)


if __name__ == "__main__":
    sys.exit(main())
