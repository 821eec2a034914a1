"""MLflow tracking shared by every stage: one run per stage, grouped by pipeline id.

- Store: sqlite at the repository root (`$DVC_ROOT` when DVC sets it, so runs made by
  `dvc exp run --temp/--queue` in a scratch copy still land in the user's store);
  `MLFLOW_TRACKING_URI` overrides. The file store is never used (MLflow 3 refuses it).
- Tags: `stage`, `pipeline_id` (shared by all stages launched by one `dvc repro` /
  `dvc exp run`), `dvc_exp` (the DVC experiment name, if any), `git_commit`, and where the
  run's process lives (`mda.host`, `mda.pid`, `mda.proc_start`).
- Several stages may log at once (`dvc queue start -j 2`, torchrun ranks): every write to a
  sqlite store holds an exclusive lock file next to it (`mlflow.db.lock`), so one process at a
  time migrates, creates or writes — sqlite's own busy timeout is never the only defence. A
  write that still finds the database locked (another tool writing without our lock) is
  retried with backoff; one that keeps failing stops the stage with one line.
- A run left RUNNING by a killed process (kill -9 leaves no chance to close it) is marked
  FAILED by the next stage that opens the store (tag `mda.killed`).
- Metrics logged step by step are buffered and written in batches.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from mda.core.errors import MdaError
from mda.core.provenance import flatten, git_commit, pipeline_id, process_tags, repo_root, tracking_uri, workspace_params

EXPERIMENT = "mda"
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""MLflow 3 opens an experiment of this kind on its runs table, not on the GenAI traces overview."""
PIPELINE_RUN_TAG = "mda.pipeline_run"
"""Tag of a pipeline's parent run (value: the pipeline id); every stage's run is nested under it."""
LOCK_TIMEOUT_S = 300.0
"""Longest wait for the store's lock file or a locked database before the stage gives up."""
FLUSH_EVERY_S = 5.0
FLUSH_ROWS = 500

T = TypeVar("T")


# ----------------------------------------------------------------------------- serialised store access
def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def _is_locked(err: Exception) -> bool:
    return "database is locked" in str(err) or "database table is locked" in str(err)


def _opened(client):
    client._tracking_client.store  # the store (and its schema migration) is created on first use
    return client


class Store:
    """An MLflow client whose every call runs under the store's lock file, with retries."""

    def __init__(self, uri: str | None = None):
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        self.uri = uri or tracking_uri()
        db = _sqlite_path(self.uri)
        self.lock_path = db.with_name(db.name + ".lock") if db else None
        if db:
            db.parent.mkdir(parents=True, exist_ok=True)
        # Opening a new (or older) sqlite store runs MLflow's schema migration: one at a time.
        self.client = self.call(lambda: _opened(MlflowClient(self.uri)))

    @contextmanager
    def _locked(self) -> Iterator[None]:
        if self.lock_path is None:
            yield
            return
        with open(self.lock_path, "a") as handle:
            deadline = time.monotonic() + LOCK_TIMEOUT_S
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise MdaError(f"{self.lock_path}: held by another process for over "
                                       f"{LOCK_TIMEOUT_S:.0f} s") from None
                    time.sleep(0.02)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """`fn(*args, **kwargs)` under the lock; a locked database is retried with backoff."""
        delay, deadline = 0.05, time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                with self._locked():
                    return fn(*args, **kwargs)
            except MdaError:
                raise
            except Exception as err:
                if not _is_locked(err) or time.monotonic() > deadline:
                    raise MdaError(f"MLflow store {self.uri}: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def experiment_id(self, name: str = EXPERIMENT) -> str:
        """The experiment's id, created if needed, marked as model training (`EXPERIMENT_KIND`) —
        also in stores made before the tag existed."""
        def get_or_create():
            key, kind = EXPERIMENT_KIND
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                artifacts = (repo_root() / "mlartifacts").resolve().as_uri()
                return self.client.create_experiment(name, artifact_location=artifacts, tags={key: kind})
            if exp.tags.get(key) != kind:
                self.client.set_experiment_tag(exp.experiment_id, key, kind)
            return exp.experiment_id
        return self.call(get_or_create)

    def pipeline_run(self, experiment_id: str, pipeline: str, name: str, tags: dict[str, str],
                     params: dict | None = None) -> str:
        """The parent run of pipeline `pipeline` (one `dvc repro` / `dvc exp run`): found by its
        tag, or created — under the store's lock, so two stages never make two."""
        def find_or_create():
            found = self.client.search_runs([experiment_id], filter_string=f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline}'",
                                            max_results=1)
            if found:
                return found[0].info.run_id, False
            run = self.client.create_run(experiment_id, run_name=name, tags={PIPELINE_RUN_TAG: pipeline, **tags})
            return run.info.run_id, True
        run_id, created = self.call(find_or_create)
        if created and params:
            StageRun(self, run_id).log_params(params)
        return run_id

    def mark_killed_runs(self, experiment_id: str) -> list[str]:
        """Runs still RUNNING whose process on this host is gone: set FAILED, tag `mda.killed`."""
        import psutil

        host = socket.gethostname()
        runs = self.call(self.client.search_runs, [experiment_id],
                         filter_string=f"attributes.status = 'RUNNING' and tags.`mda.host` = '{host}'")
        marked = []
        for run in runs:
            tags = run.data.tags
            try:
                alive = psutil.Process(int(tags["mda.pid"])).create_time() == float(tags["mda.proc_start"])
            except (KeyError, ValueError, psutil.Error):
                alive = False
            if not alive:
                self.call(self.client.set_tag, run.info.run_id, "mda.killed", "true")
                self.call(self.client.set_terminated, run.info.run_id, "FAILED")
                marked.append(run.info.run_id)
        return marked


class StageRun:
    """One MLflow run. Every write goes through the store's lock; step metrics are batched.
    `parent`: the pipeline's run, which holds what experiments are compared by."""

    def __init__(self, store: Store, run_id: str, parent: str | None = None):
        self.store, self.run_id, self.parent = store, run_id, parent
        self._pending: list = []
        self._last_flush = time.monotonic()

    def log_to_pipeline(self, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None) -> None:
        """Headline metrics and verdicts on the pipeline's parent run (one row per experiment)."""
        if self.parent:
            from mlflow.entities import Metric, RunTag

            now = int(time.time() * 1000)
            self.store.call(self.client.log_batch, self.parent,
                            metrics=[Metric(k, float(v), now, 0) for k, v in (metrics or {}).items()],
                            tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()])

    @property
    def client(self):
        return self.store.client

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if len(self._pending) >= FLUSH_ROWS or time.monotonic() - self._last_flush > FLUSH_EVERY_S:
            self.flush()

    def log_metric(self, key: str, value: float, step: int | None = None) -> None:
        self.log_metrics({key: value}, step)

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:1000], self._pending[1000:]  # MLflow's batch cap
            self.store.call(self.client.log_batch, self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.store.call(self.client.log_batch, self.run_id, params=items[i:i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.store.call(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def set_tag(self, key: str, value: str) -> None:
        self.set_tags({key: value})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.store.call(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.store.call(self.client.log_artifacts, self.run_id, str(directory), artifact_path)

    def log_dict(self, obj: dict, name: str) -> None:
        self.store.call(self.client.log_dict, self.run_id, obj, name)


def _run_tags(tags: dict[str, str]):
    from mlflow.entities import RunTag

    return [RunTag(k, str(v)) for k, v in tags.items()]


class NullRun:
    """What ranks other than 0 of a distributed stage log to: nothing (rank 0 logs the run)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def peak_rss_gib() -> float:
    """This process's peak resident set size so far, GiB, and that of its finished children
    (torchrun ranks): what `/usr/bin/time -v` reports as the maximum resident set size."""
    import resource

    kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    return round(kib / 2 ** 20, 3)  # Linux reports KiB


@contextmanager
def stage_run(stage: str, params: dict, run_name: str | None = None,
              tags: dict[str, str] | None = None) -> Iterator[StageRun]:
    """An MLflow run for one stage (or one retrain arm × seed), with its params logged.
    Ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block raises. Under torchrun only
    rank 0 logs."""
    if int(os.environ.get("RANK", "0")) > 0:
        yield NullRun()
        return
    store = Store()
    experiment_id = store.experiment_id()
    store.mark_killed_runs(experiment_id)
    pipeline, commit, exp = pipeline_id(), git_commit(), os.environ.get("DVC_EXP_NAME", "")
    common = {"pipeline_id": pipeline, "git_commit": commit, "dvc_exp": exp}
    parent = store.pipeline_run(experiment_id, pipeline, exp or f"repro {commit[:7]}",
                                {**common, "mda.role": "pipeline"}, workspace_params())
    # The parent runs from its first stage's start to its last stage's end: RUNNING while a stage
    # runs (with that stage's process, so a kill is detected), ended by each stage as it ends.
    store.call(store.client.update_run, parent, "RUNNING")
    store.call(store.client.log_batch, parent, tags=_run_tags({**process_tags()}))
    all_tags = {"stage": stage, **common, "mlflow.parentRunId": parent, **process_tags()}
    all_tags.update(tags or {})
    info = store.call(store.client.create_run, experiment_id, run_name=run_name or stage, tags=all_tags).info
    run = StageRun(store, info.run_id, parent)
    status = "FAILED"
    try:
        run.log_params(params)
        yield run
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        try:
            run.log_metric("peak_rss_gib", peak_rss_gib())
            run.flush()
        finally:
            store.call(store.client.set_terminated, info.run_id, status)
            store.call(store.client.set_terminated, parent, status)
