"""MLflow run lifecycle, on rank 0 only.

Other ranks get a tracker whose methods do nothing: one MLflow run per job, not per GPU, and no
concurrent SQLite schema creation. Metrics are reduced across ranks by the caller beforehand.
A resumed job passes the run id from its checkpoint and continues the same run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Config, flatten
from .errors import first_line, space_error
from .extras import MissingExtraError, require
from .file_lock import exclusive
from .metrics_log import METRICS_FILE, MetricsLog, mlflow_key, write_tracking_info

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


SQLITE = "sqlite:///"


def tracking_uri(cfg: Config) -> str:
    """Config first, then MLFLOW_TRACKING_URI, then one SQLite store in ``tracking.store`` for all runs."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"{SQLITE}{Path(cfg.tracking.store).resolve() / 'mlruns.db'}"


def run_name(cfg: Config) -> str:
    """``tracking.run_name``, else what tells runs apart in a list: output folder, training domains, seed."""
    return cfg.tracking.run_name or (f"{Path(cfg.train.output_dir).name}:{'+'.join(cfg.data.train_domains)}"
                                     f":seed{cfg.train.seed}")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def dali_version() -> str:
    """The installed DALI's version, whichever CUDA build it is (the cu12 and cu13 extras differ in name),
    or "none" on a node without DALI (a run fed by another image source)."""
    try:
        from nvidia.dali import __version__
    except ModuleNotFoundError:
        return "none"
    return __version__


def run_tags(cfg: Config, world_size: int, precision: str, manifest_sha256: str) -> dict[str, str]:
    """What a run is, for searching and grouping: domains, seed, world, precision, data, code, SLURM ids."""
    from importlib.metadata import version

    commit = _git("rev-parse", "HEAD")
    tags = {
        "dgucdir.train_domains": ",".join(cfg.data.train_domains),
        "dgucdir.eval_domains": ",".join(cfg.data.eval_domains),
        "dgucdir.seed": str(cfg.train.seed),
        "dgucdir.world_size": str(world_size),
        "dgucdir.precision": precision,
        "dgucdir.manifest_sha256": manifest_sha256,
        "dgucdir.version": version("dgucdir"),
        "dgucdir.torch": version("torch"),
        "dgucdir.dali": dali_version(),
    }
    if commit:  # MLflow's own git tag looks at sys.argv[0], the venv's script: not the code that ran
        tags["mlflow.source.git.commit"] = commit
        tags["dgucdir.git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no")))
    for env, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def sqlite_folder(uri: str) -> Path | None:
    """The folder of a SQLite store's file, None for any other kind of store."""
    return Path(uri[len(SQLITE):]).parent if uri.startswith(SQLITE) else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Holds an exclusive lock on a file beside a SQLite store, a no-op for any other store.

    MLflow creates a SQLite store's tables, and an experiment, on first use without a lock of its own:
    two jobs started together on a fresh store (two seeds of a sweep, two `dgucdir select` streams)
    both find no tables, and the second fails with "duplicate column name"."""
    folder = sqlite_folder(uri)
    if folder is None:
        yield
        return
    with exclusive(folder / f"{Path(uri[len(SQLITE):]).name}.lock"):  # also creates the folder, which SQLite does not
        yield


def use_store(mlflow: Any, uri: str) -> None:
    """Points MLflow at ``uri`` and lets it create the store's tables, one job at a time."""
    with store_lock(uri):
        mlflow.set_tracking_uri(uri)
        mlflow.MlflowClient(uri).search_experiments(max_results=1)  # the first client creates the tables


def experiment_for(mlflow: Any, uri: str, name: str) -> str:
    """The id of experiment ``name`` (created if new, with its artifacts beside a SQLite store); under the
    store's lock, so that two jobs starting together create it once."""
    with store_lock(uri):
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        folder = sqlite_folder(uri)  # artifacts beside the store, never in the current folder
        artifacts = (folder / "mlartifacts").as_uri() if folder is not None else None
        return mlflow.create_experiment(name, artifact_location=artifacts)


def start_sweep_run(cfg: Config, uri: str, sweep_id: str, jobs: list[list[str]]) -> str:
    """Creates (and ends) the parent run of a sweep; the jobs' runs become its children. Returns its id."""
    import mlflow

    use_store(mlflow, uri)
    experiment_id = experiment_for(mlflow, uri, cfg.tracking.experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"sweep {sweep_id}",
                          tags={"dgucdir.sweep": sweep_id, "dgucdir.sweep_parent": "true"}) as run:
        mlflow.log_params({k: str(v) for k, v in flatten(cfg).items()})
        mlflow.log_text("\n".join(" ".join(o) for o in jobs) + "\n", "sweep_jobs.txt")
    return run.info.run_id


def log_posthoc(cfg: Config, checkpoint: Path, metrics: dict[str, float], files: list[Path], tag: str) -> str:
    """Logs an evaluation made after training into the run that trained ``checkpoint`` (prefix posthoc/).

    The metrics are logged at the checkpoint's global step, so they line up with the run's curves.
    Returns the run id.
    """
    import time

    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .checkpoint import META, read_shared
    from .errors import CheckpointError

    shared = read_shared(checkpoint)
    run_id, step = shared[META].get("mlflow_run_id"), shared["progress"]["global_step"]
    uri = tracking_uri(cfg)
    if not run_id:
        raise CheckpointError(f"{checkpoint}: trained without MLflow tracking; no run to log into")
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CheckpointError(f"{checkpoint}: its run {run_id} is not in {uri} (set MLFLOW_TRACKING_URI or "
                              "tracking.uri to the store it was trained with)") from None
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(f"posthoc/{k.replace('@', '_at_')}", float(v), now, step)
                                      for k, v in metrics.items()])
    for f in files:
        client.log_artifact(run_id, str(f), f"posthoc/{tag}")
    return run_id


class Tracker:
    """The run's MLflow mirror, on rank 0. Every metric goes to the run folder's ``metrics.jsonl`` first;
    every MLflow call is retried a few times, then warned about and skipped: a store that fails costs
    tracking, never a training step or a checkpoint (``dgucdir track-resend`` fills the gaps later)."""

    RETRIES = 3
    RETRY_WAIT_S = 0.5
    PAUSE_S = 60.0

    def __init__(self, cfg: Config, active: bool, run_dir: Path | None = None) -> None:
        self.cfg = cfg
        self.active = active and cfg.tracking.enabled
        self.run_id: str | None = None
        self.uri = tracking_uri(cfg)
        self._mlflow: Any = None
        self.run_dir = run_dir
        self.metrics = MetricsLog(run_dir / METRICS_FILE) if active and run_dir is not None else None
        self.failures: list[str] = []  # what did not reach MLflow
        self._paused_until = 0.0
        self.ended = False

    def _guarded(self, what: str, call: Callable[[], Any], even_if_paused: bool = False) -> Any:
        """``call()`` with a bounded retry; on its last failure a warning, None, and training goes on. After
        a failure the store is left alone for ``PAUSE_S`` (calls in that time are skipped and counted), so a
        store that is down costs a run seconds, not a retry at every log step."""
        if time.monotonic() < self._paused_until and not even_if_paused:
            self.failures.append(what)
            return None
        for attempt in range(self.RETRIES):
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds, all of them bookkeeping
                if attempt + 1 < self.RETRIES:
                    time.sleep(self.RETRY_WAIT_S * (attempt + 1))
                    continue
                full = space_error(exc)
                reason = f"no space left ({full})" if full is not None else first_line(exc)
                log.warning("MLflow: %s failed %d times (%s); training goes on%s", what, self.RETRIES, reason,
                            f", every metric is in {self.metrics.path}" if self.metrics else "")
                self.failures.append(what)
                self._paused_until = time.monotonic() + self.PAUSE_S
                return None

    def start(self, run_id: str | None = None) -> str | None:
        """Starts a new run, or continues ``run_id`` (from a checkpoint); a store that cannot be reached
        leaves the run untracked (its metrics still in the run folder)."""
        if self.active:
            self.run_id = self._guarded("starting the run", lambda: self._start(run_id))
            self.active = self.run_id is not None
        if self.metrics is not None:
            self._guarded_local(lambda: write_tracking_info(self.run_dir, self.uri, self.run_id))
        return self.run_id if self.active else run_id

    @staticmethod
    def _guarded_local(call: Callable[[], Any]) -> None:
        try:
            call()
        except OSError as exc:
            log.warning("cannot write the run folder's tracking record (%s)", exc)

    def _start(self, run_id: str | None) -> str:
        import mlflow  # imported here: ~1.5 s, and only rank 0 needs it

        logging.getLogger("alembic").setLevel(logging.WARNING)
        self._mlflow = mlflow
        use_store(mlflow, self.uri)
        name = self.cfg.tracking.experiment
        experiment_id = experiment_for(mlflow, self.uri, name)
        run = None
        if run_id is not None:
            try:
                run = mlflow.start_run(run_id=run_id)
                log.info("MLflow: continuing run %s in %s", run_id, self.uri)
            except mlflow.exceptions.MlflowException as exc:
                log.warning("MLflow: cannot continue run %s in %s (%s); starting a new run", run_id, self.uri,
                            str(exc).splitlines()[0])
        if run is None:
            tc = self.cfg.tracking
            tags = {f"dgucdir.{k}": v for k, v in (("sweep", tc.sweep), ("group", tc.group)) if v}
            if tc.parent_run_id:
                tags["mlflow.parentRunId"] = tc.parent_run_id
            run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name(self.cfg), tags=tags)
            mlflow.log_params({k: str(v) for k, v in flatten(self.cfg).items()})
            log.info("MLflow: run %s (experiment %r) in %s", run.info.run_id, name, self.uri)
        return run.info.run_id

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            self._guarded("setting tags", lambda: self._mlflow.set_tags(tags))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """To the run folder first, then to MLflow."""
        if self.metrics is not None:
            self.metrics.append(metrics, step)
        if self.active:
            values = {mlflow_key(k): float(v) for k, v in metrics.items()}
            self._guarded(f"logging metrics at step {step}", lambda: self._mlflow.log_metrics(values, step=step))

    def log_artifacts(self, paths: list[Path], subdir: str | None = None) -> None:
        """Copies of files the run folder keeps anyway."""
        if self.active:
            for p in paths:
                self._guarded(f"logging artifact {p.name}", lambda p=p: self._mlflow.log_artifact(str(p),
                                                                                               artifact_path=subdir))

    def log_model(self, encoder: torch.nn.Module) -> str | None:
        """The trained encoder as an MLflow model (pytorch flavour, with a pyfunc face); returns its URI.

        ``mlflow.pytorch.load_model(uri)`` gives back the :class:`~dgucdir.model.encoder.Encoder`
        (``.pooled(x)``: the 2048-d retrieval features) on any machine: the package's code travels
        with the model, and the weights are saved from a CPU copy so they load without a GPU. The
        URI is also the run's tag ``dgucdir.model_uri``.
        """
        if not self.active:
            return None
        import copy

        import torch

        try:
            mlflow_pytorch = require("mlflow.pytorch", "mlflow", "the MLflow model of the encoder")
        except MissingExtraError as exc:  # the encoder is in encoder.safetensors and the run's artifacts anyway
            log.warning("%s; the encoder is logged as model/encoder.safetensors only", exc)
            return None

        import dgucdir

        # pickle, not MLflow's default pt2 (a traced graph of forward only): the loaded model keeps
        # the Encoder's methods (.pooled), which retrieval needs. MLflow warns on every pickle save
        # and recommends pt2; the choice is deliberate, so the warning is held back.
        mlflow_pytorch_log = logging.getLogger("mlflow.pytorch")
        level = mlflow_pytorch_log.level
        mlflow_pytorch_log.setLevel(logging.ERROR)
        try:
            info = self._guarded("logging the MLflow model", lambda: mlflow_pytorch.log_model(
                copy.deepcopy(encoder).cpu().eval(), name="encoder", serialization_format="pickle",
                code_paths=[str(Path(dgucdir.__file__).parent)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pyyaml"]))
        finally:
            mlflow_pytorch_log.setLevel(level)
        if info is None:
            return None
        self._mlflow.set_tag("dgucdir.model_uri", info.model_uri)
        return info.model_uri

    def log_images(self, paths: list[Path], step: int) -> None:
        """PNG pictures as MLflow images keyed by file stem, so the UI shows them per step."""
        if self.active:
            from PIL import Image

            def log_one(p: Path) -> None:
                with Image.open(p) as img:
                    self._mlflow.log_image(img.convert("RGB"), key=p.stem, step=step)

            for p in paths:
                self._guarded(f"logging image {p.name}", lambda p=p: log_one(p))

    def end(self, status: str = "FINISHED") -> None:
        """Ends the run (later log calls are dropped: MLflow would silently open a new run for them), and says
        plainly when tracking failed and where the metrics are."""
        if self.ended:
            return
        self.ended = True
        if self.active:
            self._guarded("ending the run", lambda: self._mlflow.active_run() is not None and
                          self._mlflow.end_run(status=status), even_if_paused=True)
        self.active = False
        if self.failures and self.metrics is not None:
            log.warning("MLflow tracking failed %d time(s) in this run (first: %s); every metric is in %s; "
                        "send the store what it missed with: dgucdir track-resend %s", len(self.failures),
                        self.failures[0], self.metrics.path, self.run_dir)
