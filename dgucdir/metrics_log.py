"""The run folder's own record of every logged metric (``metrics.jsonl``), and re-sending it to MLflow.

The run folder is the source of truth; MLflow mirrors it. Every metric the trainer logs is appended
here (one JSON line per step: ``{"step": s, "metrics": {...}}``, flushed) *before* MLflow is told, so
a tracking store that fails (full, locked, down) loses nothing: ``dgucdir track-resend RUN_DIR``
sends the store what it is missing. A step logged again after a resume keeps its last value, as in
MLflow's own history.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TRACKING_FILE = "tracking.json"  # {"uri": ..., "run_id": ...}: which MLflow run mirrors this folder


def mlflow_key(name: str) -> str:
    """MLflow refuses '@' in metric names."""
    return name.replace("@", "_at_")


class MetricsLog:
    """Appends metric lines to a run folder's ``metrics.jsonl``; a failed write is a warning, never a stop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failed = False

    def append(self, metrics: dict[str, float], step: int) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "metrics": {k: float(v) for k, v in metrics.items()}}) + "\n")
        except OSError as exc:
            if not self.failed:
                log.warning("cannot append to %s (%s); metrics go to MLflow only", self.path, exc)
            self.failed = True


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """{MLflow key: {step: last value}} from a ``metrics.jsonl``; a torn last line (a kill mid-write) is skipped."""
    history: dict[str, dict[int, float]] = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for name, value in record["metrics"].items():
            history.setdefault(mlflow_key(name), {})[int(record["step"])] = float(value)
    return history


def write_tracking_info(run_dir: Path, uri: str, run_id: str | None) -> None:
    (run_dir / TRACKING_FILE).write_text(json.dumps({"uri": uri, "run_id": run_id}, indent=1) + "\n")


def resend(run_dir: Path, uri: str | None = None) -> tuple[str, int]:
    """Sends the MLflow run of ``run_dir`` every (metric, step) of its ``metrics.jsonl`` that the store lacks
    (value differences included). Returns (run id, number of values sent)."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .errors import UserError

    metrics_file, info_file = run_dir / METRICS_FILE, run_dir / TRACKING_FILE
    if not metrics_file.is_file() or not info_file.is_file():
        raise UserError(f"{run_dir}: no {METRICS_FILE} and {TRACKING_FILE} (not a run folder of dgucdir train?)")
    info = json.loads(info_file.read_text())
    uri = uri or info["uri"]
    client = MlflowClient(uri)
    run_id = info.get("run_id")
    if run_id is None:
        raise UserError(f"{run_dir}: the run never reached MLflow ({uri}); its metrics are in {metrics_file}")
    try:
        client.get_run(run_id)
    except MlflowException as exc:
        raise UserError(f"{run_dir}: run {run_id} is not in {uri} ({str(exc).splitlines()[0]})") from None
    now = int(time.time() * 1000)
    missing = []
    for key, values in read_metrics(metrics_file).items():
        stored = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        missing += [Metric(key, v, now, s) for s, v in sorted(values.items()) if stored.get(s) != v]
    for start in range(0, len(missing), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=missing[start:start + 1000])
    return run_id, len(missing)
