"""Run one experiment in its own workspace and commit what it made under `results/<name>/`.

    python benchmarks/experiment.py run --cwd CLONE --name power -- dvc repro
    python benchmarks/experiment.py collect --cwd CLONE --name power      # again, from the saved log

`run` executes the command in `--cwd` (a clone of this repository with the experiment's
params.yaml) under `/usr/bin/time -v`, logging every output line with a timestamp to
`CLONE/experiment-<name>.log`, then collects. `collect` writes `--results/<name>/`:

- `params.yaml` — the complete params file the experiment ran;
- `metrics/*.json` — what its stages wrote for `dvc metrics show`;
- `report.md` and the `figures/` it links (from `reports/`), when the run made a report;
- `files/` — any `--extra` files of the workspace (e.g. `data/lds/lds.png`);
- `run.json` — command, exit code, wall time, peak RSS of the largest process (`/usr/bin/time -v`),
  CPU model (`lscpu`), cores, torch, the commit (and whether code or params differed from it),
  per stage the MLflow run's duration and peak RSS;
- `README.md` — generated from the above: the differences from the commit's `params.yaml`, the
  command that reproduces it, cost and machine, the verdicts and the files.

Nothing in a results folder is written by hand; no machine path goes into it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- running
def run(args) -> int:
    cwd = Path(args.cwd).resolve()
    log = cwd / f"experiment-{args.name}.log"
    rusage = log.with_suffix(".time")
    cmd = list(args.command)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise SystemExit("experiment run: give the command after --")
    timed = ["/usr/bin/time", "-v", "-o", str(rusage), *cmd] if Path("/usr/bin/time").exists() else cmd
    start = time.time()
    with open(log, "w") as out:
        out.write(f"{start:.3f} $ {' '.join(cmd)}\n")
        proc = subprocess.Popen(timed, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        for line in proc.stdout:
            out.write(f"{time.time():.3f} {line}")
            out.flush()
        rc = proc.wait()
        out.write(f"{time.time():.3f} exit {rc}\n")
    collect(args)
    return rc


# ----------------------------------------------------------------------------- reading what happened
def read_log(log: Path) -> dict:
    """Command, start, end, exit code and per-stage wall times from a timestamped log."""
    lines = log.read_text(errors="replace").splitlines()
    first = re.match(r"([\d.]+) \$ (.*)", lines[0]) if lines else None
    last = re.match(r"([\d.]+) exit (-?\d+)", lines[-1]) if lines else None
    stages, order = {}, []
    for line in lines:
        m = re.match(r"([\d.]+) Running stage '([^']+)'", line)
        if m:
            order.append((m.group(2), float(m.group(1))))
    end = float(last.group(1)) if last else (float(lines[-1].split()[0]) if lines else 0.0)
    for i, (name, t) in enumerate(order):
        stages[name] = round((order[i + 1][1] if i + 1 < len(order) else end) - t, 1)
    return {"command": first.group(2) if first else None, "started": float(first.group(1)) if first else None,
            "ended": end, "exit_code": int(last.group(2)) if last else None, "stage_wall_s": stages}


def peak_rss_gib(rusage: Path) -> float | None:
    if not rusage.is_file():
        return None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", rusage.read_text())
    return round(int(m.group(1)) / 2 ** 20, 3) if m else None


def cpu_seconds(rusage: Path) -> float | None:
    """User + system CPU seconds of the command and everything it ran (`/usr/bin/time -v`)."""
    if not rusage.is_file():
        return None
    text = rusage.read_text()
    parts = [re.search(rf"{kind} time \(seconds\): ([\d.]+)", text) for kind in ("User", "System")]
    return round(sum(float(m.group(1)) for m in parts if m), 1) if all(parts) else None


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        return m.group(1).strip() if m else platform.processor()
    except FileNotFoundError:
        return platform.processor()


def git(cwd: Path, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


def mlflow_stages(db: Path, since: float | None) -> dict:
    """Per MLflow run of this experiment (started after `since`): duration and peak RSS."""
    if not db.is_file():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("select run_uuid, name, start_time, end_time, status from runs").fetchall()
        rss = dict(con.execute("select run_uuid, value from latest_metrics where key = 'peak_rss_gib'").fetchall())
    finally:
        con.close()
    out = {}
    for run_id, name, start, end, status in sorted(rows, key=lambda r: r[2] or 0):
        if since is not None and (start or 0) / 1000 < since:
            continue
        out[name] = {"status": status, "duration_s": round(((end or start) - start) / 1000, 1) if start else None,
                     "peak_rss_gib": rss.get(run_id)}
    return out


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat(v, key + "."))
        else:
            out[key] = v
    return out


def param_differences(cwd: Path) -> list[str]:
    """`key: committed → ran` for every params value that differs from the commit's params.yaml."""
    committed = yaml.safe_load(git(cwd, "show", "HEAD:params.yaml") or "{}")
    ran = yaml.safe_load((cwd / "params.yaml").read_text())
    a, b = flat(committed), flat(ran)
    return [f"`{k}`: {json.dumps(a.get(k))} → {json.dumps(b.get(k))}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


# ----------------------------------------------------------------------------- writing the folder
def collect(args) -> Path:
    cwd = Path(args.cwd).resolve()
    out = Path(args.results) / args.name
    log = cwd / f"experiment-{args.name}.log"
    if not log.is_file():
        raise SystemExit(f"{log}: missing; run the experiment with `benchmarks/experiment.py run` first")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "metrics").mkdir(parents=True)
    shutil.copy(cwd / "params.yaml", tmp / "params.yaml")
    for f in sorted((cwd / "metrics").glob("*.json")):
        shutil.copy(f, tmp / "metrics" / f.name)
    report = cwd / (args.report or "reports/report.md")
    if report.is_file() and not args.no_report:
        shutil.copy(report, tmp / "report.md")
        for link in sorted(set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report.read_text()))):
            (tmp / link).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(report.parent / link, tmp / link)
    for extra in args.extra or []:
        dest = tmp / "files" / extra
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cwd / extra, dest)
    facts = read_log(log)
    dirty = git(cwd, "status", "--porcelain", "--untracked-files=no", "--", "mda", "stages", "dvc.yaml")
    info = {
        "name": args.name, "command": facts["command"], "exit_code": facts["exit_code"],
        "wall_s": round(facts["ended"] - facts["started"], 1) if facts["started"] else None,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(facts["started"])) if facts["started"] else None,
        "peak_rss_gib": peak_rss_gib(log.with_suffix(".time")),
        "peak_rss_note": "/usr/bin/time -v over the command: the largest single process",
        "cpu_s": cpu_seconds(log.with_suffix(".time")),
        "cpu_note": "user + system seconds of the whole command; cpu_s / wall_s near the thread count means the "
                    "cores were the experiment's, lower means it shared them (other work ran beside it)",
        "cpu_model": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": _torch_version(), "commit": git(cwd, "rev-parse", "HEAD"),
        "code_differs_from_commit": bool(dirty),
        "params_differ_from_commit": param_differences(cwd),
        "stage_wall_s": facts["stage_wall_s"],
        "mlflow_runs": mlflow_stages(cwd / "mlflow.db", facts["started"]),
    }
    (tmp / "run.json").write_text(json.dumps(info, indent=1) + "\n")
    (tmp / "README.md").write_text(readme(info, tmp, args.note))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"collected {out}")
    return out


def _torch_version() -> str | None:
    try:
        import torch
        return torch.__version__
    except ImportError:
        return None


def readme(info: dict, folder: Path, note: str | None) -> str:
    runs = info["mlflow_runs"]
    biggest = max(((n, r["peak_rss_gib"]) for n, r in runs.items() if r.get("peak_rss_gib") is not None),
                  key=lambda x: x[1], default=None)
    lines = [f"# Experiment `{info['name']}`", "",
             "Generated by `benchmarks/experiment.py collect`; nothing here is written by hand.", ""]
    if note:
        lines += [note, ""]
    lines += ["**Differences from the commit's `params.yaml`:** " +
              ("; ".join(info["params_differ_from_commit"]) if info["params_differ_from_commit"] else "none (the default)"),
              "",
              "| | |", "|---|---|",
              f"| command | `{info['command']}` (in a clone at the commit, with `params.yaml` from this folder) |",
              f"| exit code | {info['exit_code']} |",
              (f"| wall time | {info['wall_s']:,.0f} s ({info['wall_s'] / 60:.1f} min)"
               + (f"; CPU {info['cpu_s']:,.0f} s ({info['cpu_s'] / info['wall_s']:.2f} cores busy on average)"
                  if info.get("cpu_s") else "") + " |") if info["wall_s"] else "| wall time | — |",
              f"| peak RSS | {info['peak_rss_gib']} GiB (largest process, `/usr/bin/time -v`)"
              + (f"; largest stage: `{biggest[0]}` {biggest[1]} GiB (MLflow `peak_rss_gib`)" if biggest else "") + " |",
              f"| CPU | {info['cpu_model']}, {info['cpus']} cores; torch {info['torch']}, Python {info['python']} |",
              f"| commit | `{info['commit']}`" + (" (code differed from it)" if info["code_differs_from_commit"] else "")
              + " |", f"| started (UTC) | {info['started_utc']} |", ""]
    ev = folder / "metrics" / "evaluate.json"
    if ev.is_file():
        verdicts = json.loads(ev.read_text()).get("verdicts") or {}
        if verdicts:
            lines += ["## Verdicts (`metrics/evaluate.json`)", ""] + [f"- {c}: **{s}**" for c, s in verdicts.items()] + [""]
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "README.md")
    lines += ["## Files", ""] + [f"- [`{f}`]({f})" for f in files] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="verb", required=True)
    for verb in ("run", "collect"):
        p = sub.add_parser(verb)
        p.add_argument("--cwd", required=True, help="the experiment's workspace (a clone)")
        p.add_argument("--name", required=True, help="results/<name>/")
        p.add_argument("--results", default=str(ROOT / "results"), help="where results folders go")
        p.add_argument("--extra", nargs="*", help="workspace files to copy under files/")
        p.add_argument("--note", help="one paragraph for the README (what the experiment is)")
        p.add_argument("--no-report", action="store_true", help="do not copy reports/report.md")
        p.add_argument("--report", help="the report to copy instead of reports/report.md (e.g. reports/smda/report.md)")
        if verb == "run":
            p.add_argument("command", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    return run(args) if args.verb == "run" else (collect(args) and 0)


if __name__ == "__main__":
    sys.exit(main())
