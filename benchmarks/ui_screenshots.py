"""Screenshots of `mlflow ui` on a finished project, for the README (not a CI test).

    .venv/bin/python benchmarks/ui_screenshots.py           # this project -> docs/screenshots/
    .venv/bin/python benchmarks/ui_screenshots.py --project /tmp/run --out docs/screenshots

The project must have finished a pipeline run (`lmforge run`): its `mlflow.db` (the
sqlite store of `tracking.uri` in params.yaml) holds the experiment `tracking.experiment`,
the pipeline's parent run with one child run per stage, and the registered model
`register.model_name`. The script starts a real `mlflow ui` on that store on a free
127.0.0.1 port (its own process group, working directory a temporary folder, stopped at the
end, also on error), finds the runs through the MLflow client over HTTP, and drives headless
Chromium (the Debian package: `apt-get install chromium`) over the DevTools protocol
(the `websockets` client Prefect brings): it stores the UI's preferences (the
model-training sidebar, the MLflow Assistant panel shut), loads each page, waits until it
shows its content (the runs, the run's description, the plot, the model's versions),
expands the pipeline run's stage runs, and captures it:

    experiment.png   the experiment's runs table          /#/experiments/<id>/runs
    run.png          a stage run (finetune, else evaluate) /#/experiments/<id>/runs/<run>
    artifacts.png    that run's first PNG artifact         .../runs/<run>/artifacts/<path>
    model.png        the registered model's versions      /#/models/<name>

A PNG over `--max-kb` is re-encoded with a 256-colour palette (Pillow), which keeps UI
screenshots legible at a fraction of the size.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from local_http import answers, free_port  # benchmarks/: the script's folder

BIN = Path(sys.executable).parent
SQLITE = "sqlite:///"
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Headless Chromium on a machine without network: every background service off, else it
# waits on them and the screenshot never comes.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
# What the UI keeps in localStorage (key_v<version>: JSON): the MLflow Assistant panel stays
# shut (a local server opens it on first load), and the sidebar is the model-training one.
UI_PREFERENCES = {
    "mlflow.assistant.panelOpen_v1": False,
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": True,
    "mlflow.workflowType_v1": "machine_learning",
}
STAGE_PREFERENCE = ("finetune", "evaluate", "pretrain")


class ScreenshotError(RuntimeError):
    """Something the user can fix: printed without a traceback."""


@dataclass(frozen=True)
class Project:
    """What the screenshots need from a finished project's params.yaml."""

    root: Path
    tracking_uri: str
    experiment: str
    model_name: str


@dataclass(frozen=True)
class Targets:
    """The MLflow objects to show, found through the running UI's REST API."""

    experiment_id: str
    parent_name: str
    run_id: str
    run_name: str
    plot: str | None  # artifact path of a PNG of that run
    model_name: str


@dataclass(frozen=True)
class Shot:
    """One page to render, and how to know it has."""

    file: str
    route: str  # the part after /#
    ready: str  # a JS expression, true once the page shows its content
    height: int
    action: str | None = None  # JS run once ready (e.g. a click)...
    after: str | None = None  # ...and true once it took effect


def load_project(root: Path) -> Project:
    """The tracking store, experiment and model name of the project at `root`."""
    params_file = root / "params.yaml"
    if not params_file.is_file():
        raise ScreenshotError(f"{root} is not an lmforge project: no params.yaml (use --project)")
    params: dict[str, Any] = yaml.safe_load(params_file.read_text()) or {}
    tracking = params.get("tracking") or {}
    uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking.get("uri", "sqlite:///mlflow.db")
    if not uri.startswith(SQLITE):
        raise ScreenshotError(
            f"tracking URI {uri} is not a local sqlite store: this script starts its own"
            " `mlflow ui` on the project's mlflow.db (open a team server's UI directly)"
        )
    db = Path(uri[len(SQLITE) :])
    db = db if db.is_absolute() else root / db
    if not db.is_file():
        raise ScreenshotError(
            f"no MLflow store at {db}: run the pipeline first (`lmforge run --preset ci`)"
        )
    return Project(
        root=root,
        tracking_uri=SQLITE + str(db),
        experiment=tracking.get("experiment", "lmforge"),
        model_name=(params.get("register") or {}).get("model_name", "lmforge-gpt"),
    )


def find_chromium(explicit: str | None) -> str:
    """The Chromium executable: `--chromium`, else the first of CHROMIUM_NAMES on PATH."""
    if explicit:
        if not (shutil.which(explicit) or Path(explicit).is_file()):
            raise ScreenshotError(f"--chromium {explicit}: no such executable")
        return shutil.which(explicit) or explicit
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    raise ScreenshotError(
        "Chromium not found on PATH: install it (Debian/Ubuntu, as root:"
        " `apt-get update && apt-get install chromium`) or pass --chromium PATH"
    )


def local_artifact_root(project: Project) -> str | None:
    """The parent folder of the experiment's local artifact location (e.g. <root>/mlruns).

    Passed to `mlflow ui` as `--default-artifact-root`, so the server agrees with the store
    on where artifacts live. Existing runs keep their own absolute artifact URIs, which the
    UI serves either way. None when the experiment is missing or its artifacts are remote.
    """
    from mlflow import MlflowClient

    exp = MlflowClient(project.tracking_uri).get_experiment_by_name(project.experiment)
    if exp is None:
        return None
    location = exp.artifact_location
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme not in ("", "file"):
        return None
    path = Path(urllib.parse.unquote(parsed.path))
    if not path.exists():
        print(f"warning: artifact folder {path} is missing: plots will not show", file=sys.stderr)
    return str(path.parent)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group, SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def mlflow_ui(project: Project, workdir: Path, startup_s: float) -> Iterator[str]:
    """A real `mlflow ui` on the project's store; yields its base URL, stops it at the end."""
    port = free_port()
    mlflow_bin = BIN / "mlflow"
    cmd = [str(mlflow_bin)] if mlflow_bin.is_file() else [sys.executable, "-m", "mlflow"]
    cmd += ["ui", "--backend-store-uri", project.tracking_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    artifact_root = local_artifact_root(project)
    if artifact_root:
        cmd += ["--default-artifact-root", artifact_root]
    log = workdir / "mlflow-ui.log"
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("ab") as out:
        # its own session: one process group, so uvicorn's workers stop with it; cwd a
        # scratch folder, so the server creates nothing in the project
        proc = subprocess.Popen(
            cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + startup_s
        while not answers(port, "/health"):
            if proc.poll() is not None or time.monotonic() > deadline:
                what = "exited" if proc.poll() is not None else f"did not answer in {startup_s}s"
                raise ScreenshotError(
                    f"`{' '.join(cmd)}` {what}; its log:\n{log.read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def first_png(client: Any, run_id: str, path: str = "", depth: int = 3) -> str | None:
    """The artifact path of the first .png under `path` of the run (breadth first)."""
    entries = client.list_artifacts(run_id, path or None)
    for entry in entries:
        if not entry.is_dir and entry.path.lower().endswith(".png"):
            return entry.path
    if depth > 0:
        for entry in entries:
            if entry.is_dir:
                found = first_png(client, run_id, entry.path, depth - 1)
                if found:
                    return found
    return None


def pick_run(children: list[Any], stage: str | None) -> Any:
    """The child run to show: `stage` if given, else the first of STAGE_PREFERENCE there is."""
    by_name = {run.info.run_name: run for run in children}
    wanted = (stage,) if stage else STAGE_PREFERENCE
    for name in wanted:
        if name in by_name:
            return by_name[name]
    if stage:
        raise ScreenshotError(f"the latest pipeline run has no '{stage}' run: {sorted(by_name)}")
    return children[0]


def find_targets(base_url: str, project: Project, stage: str | None) -> Targets:
    """The experiment, the latest pipeline run's stage run, its plot and the registered model."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(base_url)
    exp = client.get_experiment_by_name(project.experiment)
    if exp is None:
        raise ScreenshotError(
            f"no experiment '{project.experiment}' in {project.tracking_uri}: run the pipeline"
            " first (`lmforge run --preset ci`)"
        )
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        raise ScreenshotError(f"experiment '{project.experiment}' has no runs: run the pipeline")
    parent = next((r for r in parents if r.info.status == "FINISHED"), parents[0])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    run = pick_run(children, stage) if children else parent
    try:
        client.get_registered_model(project.model_name)
    except MlflowException as e:
        raise ScreenshotError(
            f"no registered model '{project.model_name}': the register stage did not register"
            " one (its quality gate; see reports/register.json)"
        ) from e
    return Targets(
        experiment_id=exp.experiment_id,
        parent_name=parent.info.run_name,
        run_id=run.info.run_id,
        run_name=run.info.run_name,
        plot=first_png(client, run.info.run_id),
        model_name=project.model_name,
    )


def has_text(*texts: str) -> str:
    """A JS test: the page shows every one of `texts`."""
    return " && ".join(f"document.body.innerText.includes({json.dumps(t)})" for t in texts)


IMAGE_SHOWN = "[...document.images].some(i => i.complete && i.naturalWidth > 200)"
# the [+] before the parent run's name: show its stage runs
EXPAND_ROWS = "document.querySelector('button[data-component-id*=runnamecellrenderer]')?.click()"


def shots(t: Targets, height: int) -> list[Shot]:
    """The pages to render, as MLflow 3's hash routes (server/js routes.tsx)."""
    run = f"/experiments/{t.experiment_id}/runs/{t.run_id}"
    pages = [
        Shot(
            "experiment.png",
            f"/experiments/{t.experiment_id}/runs",
            has_text(t.parent_name),
            height,
            action=EXPAND_ROWS,
            after=has_text(t.run_name),
        ),
        # taller: the description (the stage summary), metrics and params
        Shot("run.png", run, has_text(t.run_name, "Description"), height * 7 // 4),
    ]
    if t.plot:
        route = f"{run}/artifacts/{urllib.parse.quote(t.plot)}"
        pages.append(Shot("artifacts.png", route, IMAGE_SHOWN, height))
    model = urllib.parse.quote(t.model_name, safe="")
    pages.append(Shot("model.png", f"/models/{model}", has_text(t.model_name, "Version"), height))
    return pages


class Browser:
    """Headless Chromium driven over the DevTools protocol (one page, a fresh profile)."""

    def __init__(self, chromium: str, tmp: Path, width: int, timeout: float) -> None:
        self.width, self.timeout, self._id = width, timeout, 0
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=tmp))
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
        cmd += ["--remote-debugging-port=0", f"--window-size={width},900", "about:blank"]
        self.log = tmp / "chromium.log"
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self.ws = self._connect(profile / "DevToolsActivePort")
        except BaseException:
            stop(self.proc)
            raise

    def _connect(self, port_file: Path) -> Any:
        """The page's DevTools websocket (Chromium writes its port to `port_file`)."""
        from websockets.sync.client import connect

        deadline = time.monotonic() + self.timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ScreenshotError(
                    f"Chromium did not start; its log:\n{self.log.read_text()[-2000:]}"
                )
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        return connect(
            pages[0]["webSocketDebuggerUrl"], max_size=None, proxy=None, ping_interval=None
        )

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=self.timeout))
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise ScreenshotError(f"Chromium: {method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        """Load `url` afresh (a hash route after about:blank is a full load of the app)."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def wait_for(self, expression: str, what: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.evaluate(
            f"(() => {{ try {{ return !!({expression}) }} catch (e) {{ return false }} }})()"
        ):
            if time.monotonic() > deadline:
                raise ScreenshotError(f"{what} did not render in {self.timeout}s")
            time.sleep(0.5)

    def viewport(self, height: int) -> None:
        """The page's size in CSS pixels (at scale 1: one pixel per pixel of the PNG)."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )

    def capture(self, out: Path) -> None:
        out.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        stop(self.proc)


def prime(browser: Browser, base_url: str) -> None:
    """Set the UI's stored preferences on the server's origin, before the app first loads."""
    browser.goto(f"{base_url}/health")  # same origin, not the app (which would store its own)
    sets = "; ".join(
        f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))})"
        for k, v in UI_PREFERENCES.items()
    )
    browser.evaluate(sets)


def take(browser: Browser, base_url: str, shot: Shot, out: Path, settle_s: float) -> None:
    """Load the shot's page, wait until it shows what it should, and write the PNG."""
    url = f"{base_url}/#{shot.route}"
    browser.viewport(shot.height)
    browser.goto(url)
    browser.wait_for(shot.ready, url)
    if shot.action:
        browser.evaluate(shot.action)
        browser.wait_for(shot.after or "true", f"{url} after {shot.action}")
    time.sleep(settle_s)  # charts and images fade in
    browser.capture(out)


def shrink(png: Path, max_kb: int) -> None:
    """Re-encode a PNG over `max_kb` with a 256-colour palette (skipped without Pillow)."""
    if png.stat().st_size <= max_kb * 1024:
        return
    try:
        from PIL import Image
    except ImportError:
        print(f"warning: {png} is over {max_kb} KB and Pillow is missing", file=sys.stderr)
        return
    with Image.open(png) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(png, optimize=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--project", type=Path, default=Path("."), help="finished project root")
    p.add_argument("--out", type=Path, default=Path("docs/screenshots"), help="PNG folder")
    p.add_argument("--stage", help="the stage run to show (default: finetune, else evaluate)")
    p.add_argument("--chromium", help="Chromium executable (default: chromium on PATH)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    p.add_argument("--settle", type=float, default=2.0, help="seconds after a page rendered")
    p.add_argument("--shot-timeout", type=float, default=120.0, help="seconds per page")
    p.add_argument("--startup", type=float, default=180.0, help="seconds for `mlflow ui` to start")
    p.add_argument("--max-kb", type=int, default=400, help="palette-encode PNGs over this")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[Path]:
    """Start the UI, take every screenshot, stop the UI; returns the PNGs written."""
    chromium = find_chromium(args.chromium)
    project = load_project(args.project.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="ui-shots-") as scratch:
        tmp = Path(scratch)
        with mlflow_ui(project, tmp, args.startup) as base_url:
            targets = find_targets(base_url, project, args.stage)
            print(f"run: {targets.run_name} {targets.run_id}; plot: {targets.plot}")
            browser = Browser(chromium, tmp, args.width, args.shot_timeout)
            try:
                prime(browser, base_url)
                for shot in shots(targets, args.height):
                    png = args.out / shot.file
                    take(browser, base_url, shot, png, args.settle)
                    shrink(png, args.max_kb)
                    print(f"{png}  ({png.stat().st_size // 1024} KB)  #{shot.route}")
                    written.append(png)
            finally:
                browser.close()
    return written


def main(argv: list[str] | None = None) -> None:
    try:
        run(parse_args(argv))
    except ScreenshotError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
