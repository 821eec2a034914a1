"""Screenshots of a real `mlflow ui` over a project's store, in headless Chromium (issue 23).

    python benchmarks/mlflow_ui_screenshots.py --repo . --out benchmarks/results/mlflow-ui

Starts `python -m mda.core.mlflow_ui` over `<repo>/mlflow.db` in a fresh browser profile (so
nothing a person clicked before helps) and saves:
- `runs.png`: the address the launcher prints, as it opens — the `mda` runs table, one parent row
  per pipeline run;
- `arms.png`: the chart view with the retraining runs of the newest pipeline only
  (`tags.stage = 'retrain'`, every run shown), the charts searched for `--metric`
  (`target_score`): one line per arm and seed.
Needs Playwright (`pip install playwright`, not a project dependency) and a Chromium
(`--chromium`, default Debian's `/usr/bin/chromium`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def wait_for(url: str, timeout_s: float = 120.0) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2).read(1)
            return
        except OSError:
            time.sleep(1.0)
    raise SystemExit(f"error: {url}: the MLflow server did not answer in {timeout_s:.0f} s")


def newest_pipeline(repo: Path) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mda")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`mda.pipeline_run` != ''",
                                   order_by=["attributes.start_time DESC"], max_results=1)
    return parent.data.tags["pipeline_id"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", type=Path, default=Path("."))
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--port", type=int, default=5055)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--metric", default="target_score", help="the per-step metric whose chart arms.png shows")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright

    repo = args.repo.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo / 'mlflow.db'}"}
    server = subprocess.Popen([sys.executable, "-m", "mda.core.mlflow_ui", "--port", str(args.port)], cwd=repo,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)  # its own group: mlflow's workers stop with it
    try:
        url = server.stdout.readline().strip()
        wait_for(f"http://127.0.0.1:{args.port}/health")
        pipeline = newest_pipeline(repo)
        with sync_playwright() as pw, tempfile.TemporaryDirectory() as profile:
            browser = pw.chromium.launch_persistent_context(profile, executable_path=args.chromium, args=FLAGS,
                                                            viewport={"width": 1600, "height": 1000})
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("text=matching runs", timeout=90_000)
            landed = page.url
            close = page.get_by_role("button", name="Close")  # the assistant's side panel
            if close.count():
                close.first.click()
            # expand the newest pipeline's parent row: its stage runs nested under it
            page.get_by_role("gridcell").filter(has_text="repro").first.get_by_role("button").first.click()
            page.wait_for_timeout(4000)
            page.screenshot(path=str(args.out / "runs.png"))
            # the same page with the retrain runs of that pipeline, in the chart view (URL parameters
            # the UI itself writes when one types the filter and picks "Chart")
            query = f"tags.stage = 'retrain' and tags.pipeline_id = '{pipeline}'"
            page.goto(f"{url}&compareRunsMode=CHART&searchFilter={urllib.parse.quote(query)}")
            page.wait_for_selector("input[placeholder*='Search metric charts']", timeout=90_000)
            close = page.get_by_role("button", name="Close")
            if close.count():
                close.first.click()
            page.wait_for_timeout(2000)
            if not page.get_by_text("retrain-").count():  # the parent row stays expanded from the runs view
                page.get_by_role("gridcell").filter(has_text="repro").first.get_by_role("button").first.click()
            page.wait_for_selector("text=retrain-", timeout=30_000)  # the pipeline's retrain runs listed
            page.wait_for_timeout(2000)
            page.get_by_role("button", name="Toggle visibility of runs").click()  # the UI charts 10 runs at first
            show_all = page.get_by_text("Show all runs", exact=False)
            if show_all.count():
                show_all.first.click()
            else:
                page.keyboard.press("Escape")
            page.get_by_placeholder("Search metric charts").fill(args.metric)
            try:
                page.wait_for_selector(f"text={args.metric}", timeout=60_000)
            except Exception:
                page.screenshot(path=str(args.out / "failed.png"))  # what the page showed instead
                raise
            page.wait_for_timeout(5000)
            page.screenshot(path=str(args.out / "arms.png"))
            browser.close()
        (args.out / "screenshots.json").write_text(json.dumps(
            {"launcher_url": url, "landed_on": landed, "pipeline_id": pipeline,
             "mlflow": __import__("mlflow").__version__,
             "chromium": subprocess.run([args.chromium, "--version"], capture_output=True, text=True).stdout.strip()},
            indent=2) + "\n")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
