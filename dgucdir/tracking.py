"""MLflow run lifecycle, on rank 0 only.

Other ranks get a tracker whose methods do nothing: one MLflow run per job, not per GPU, and no
concurrent SQLite schema creation. Metrics are reduced across ranks by the caller beforehand.
A resumed job passes the run id from its checkpoint and continues the same run.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .config import Config, flatten

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then a SQLite store in the output folder."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(cfg.train.output_dir).resolve() / 'mlruns.db'}"


class Tracker:
    def __init__(self, cfg: Config, active: bool) -> None:
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg)
        self._mlflow: Any = None

    def start(self, run_id: str | None = None) -> str | None:
        """Starts a new run, or continues ``run_id`` (from a checkpoint)."""
        if not self.active:
            return run_id
        import mlflow  # imported here: ~1.5 s, and only rank 0 needs it

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.uri)
        name = self.cfg.tracking.experiment
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None
            if self.uri.startswith("sqlite:///") and not self.cfg.tracking.uri and not os.environ.get("MLFLOW_TRACKING_URI"):
                artifacts = (Path(self.cfg.train.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = mlflow.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        if run_id is not None:
            run = mlflow.start_run(run_id=run_id)
            log.info("MLflow: continuing run %s in %s", run_id, self.uri)
        else:
            run = mlflow.start_run(experiment_id=experiment_id, run_name=self.cfg.tracking.run_name)
            mlflow.log_params({k: str(v) for k, v in flatten(self.cfg).items()})
            log.info("MLflow: run %s (experiment %r) in %s", run.info.run_id, name, self.uri)
        self.run_id = run.info.run_id
        return self.run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.active:
            self._mlflow.log_metrics({k.replace("@", "_at_"): float(v) for k, v in metrics.items()}, step=step)

    def log_artifacts(self, paths: list[Path], subdir: str | None = None) -> None:
        if self.active:
            for p in paths:
                self._mlflow.log_artifact(str(p), artifact_path=subdir)

    def end(self, status: str = "FINISHED") -> None:
        """Ends the run; later log calls are dropped (MLflow would silently open a new run for them)."""
        if self.active and self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)
        self.active = False
