"""The Trainer: one entry point for one process, `accelerate launch` and SLURM tasks.

accelerate owns DDP, device placement and mixed precision; this module owns the method's
schedule: per-epoch cosine learning rate, clustering at the start of every epoch after the
warm-up, periodic checkpoints and retrieval evaluation, exact resume.

Exact resume works because every random draw of a step is a function of (seed, epoch, rank,
step) — DALI pipeline seeds, Fourier lambdas and partners, the shuffle-BN permutation — and
everything else that evolves (weights, optimizer, queues, cluster state, step counters) is in
the checkpoint. SIGTERM/SIGUSR1 stop the run at the next step where the ranks compare notes and
write a checkpoint; ``fit()`` then returns normally (a SLURM task ends cleanly, which preemption
and submitit requeueing rely on; `dgucdir train` exits ``EXIT_RESUMABLE``, 75).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from tqdm import tqdm

from . import dist
from .checkpoint import Checkpointer, StateFns, list_checkpoints
from .cluster import ClusterSlot, ClusterState, run_kmeans
from .cluster_features import training_features
from .config import Config, ConfigError, flatten, from_dict, to_dict, to_yaml
from .data.batches import Batch, concurrent_pipelines
from .data.manifest import Manifest
from .data.spec import ImageSource, PipelineSpec
from .errors import CheckpointError, CheckpointSpaceError, UserError
from .file_lock import FolderBusy, FolderLock
from .metric_window import MetricWindow
from .model.dgucdir import DGUCDIR
from .model.encoder import load_moco_v2
from .model.loading import save_encoder
from .numerics import apply_numerics
from .retrieval import EvalReport, evaluate
from .threads import ThreadBudget
from .runtime import moco_init_path, validate_runtime
from .seeding import ProcessRNG, derive_seed, seed_process
from .tracking import Tracker, run_tags

log = logging.getLogger(__name__)

RUN_INFO = "run.json"  # beside config.yaml: what data the run trained on (see write_run_info)


def estimated_checkpoint_bytes(core: torch.nn.Module) -> int:
    """The model's tensors (both encoders, queues) plus one optimizer buffer per trainable weight."""
    tensors = sum(t.numel() * t.element_size() for t in core.state_dict().values())
    return tensors + sum(p.numel() * p.element_size() for p in core.parameters() if p.requires_grad)


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Timestamped lines naming the rank; ranks other than 0 only speak up on warnings."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class StopRequested(Exception):
    """Raised at a stop check during clustering or evaluation, once every rank agreed to stop."""


class StopFlag:
    """Set by SIGTERM/SIGUSR1 on this rank; the Trainer agrees on it across ranks at sync steps."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("received %s: checkpoint and exit at the next sync step", signal.Signals(signum).name)
        self.requested = True


@dataclass
class Progress:
    """Where the run is; checkpointed with the model."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step_in_epoch, self.global_step = state["epoch"], state["step_in_epoch"], state["global_step"]


def cosine_lr(base: float, epoch: int, epochs: int, schedule: str) -> float:
    """MoCo's per-epoch cosine schedule: base * (1 + cos(pi * epoch / epochs)) / 2."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) if schedule == "cosine" else base


def build_model(cfg: Config, n_domains: int, rank_batch: int, device: torch.device) -> DGUCDIR:
    model = DGUCDIR(cfg.model, cfg.loss, n_domains, rank_batch, device, cfg.train.seed)
    moco_init = moco_init_path(cfg)
    if moco_init:
        load_moco_v2(model.encoder_q, moco_init)
        model.encoder_k.load_state_dict(model.encoder_q.state_dict())
    if cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def write_run_info(out_dir: Path, manifest: Manifest) -> None:
    """Records which data the run trains on, so tools can tell a run on other data (demo stale runs)."""
    (out_dir / RUN_INFO).write_text(json.dumps({"manifest": str(manifest.path.resolve()),
                                                "manifest_sha256": manifest.fingerprint()}, indent=1) + "\n")


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, overwrite: bool = False,
                 images: ImageSource | None = None) -> None:
        """``resume``: None (a new run), "latest" (the output folder's latest checkpoint) or a checkpoint path.

        ``images``: where training and evaluation images come from; default DALI pipelines on this rank's
        device (:class:`PipelineSpec`). The device check passes a torchvision decoder on nodes without DALI.

        A new run in a folder that already has checkpoints is refused unless ``overwrite``, which
        deletes them first: checkpoint rotation would otherwise delete the new run's own first.
        """
        self.cfg = cfg
        timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        # BatchNorm over the global batch keeps every rank's BN buffers equal (a rank 0 broadcast before each
        # evaluation covers BN groups): DDP's broadcast of them at every step would be pure traffic
        ddp = DistributedDataParallelKwargs(broadcast_buffers=cfg.model.bn != "paper")
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                                       kwargs_handlers=[timeout, ddp])
        self.rank, self.world = dist.rank(), dist.world_size()
        setup_logging(self.rank)
        self.numerics = apply_numerics(cfg.train.tf32, cfg.train.deterministic)
        self.peers = dist.peers()  # to name a lost rank when a collective fails
        # what this run really uses (config, else the launcher's choice): evaluation and clustering
        # embed under the same precision, and it is logged with the run
        self.precision = str(self.accelerator.mixed_precision)
        launcher = os.environ.get("ACCELERATE_MIXED_PRECISION")  # what `accelerate launch` asked for
        if launcher and cfg.train.mixed_precision and launcher != cfg.train.mixed_precision:
            log.warning("the launcher asked for mixed precision %r; train.mixed_precision=%r wins: training in %s",
                        launcher, cfg.train.mixed_precision, self.precision)
        self.device = self.accelerator.device
        self.manifest = Manifest.load(cfg.data.manifest)
        self.manifest_sha256 = self.manifest.fingerprint()  # kept in every checkpoint: a resume checks its data
        self.rank_batch = validate_runtime(cfg, self.manifest, self.world)
        self.out_dir = Path(cfg.train.output_dir)
        seed_process(cfg.train.seed, self.rank)
        if images is None:
            dali_threads = ThreadBudget.for_rank().apply(concurrent_pipelines(cfg), cfg.data.num_threads)
            images = PipelineSpec.for_device(cfg.data.image_size, dali_threads, self.device, self.rank, self.world)
        self.images = images
        self.loader = images.training_batches(cfg, self.manifest, self.rank_batch, self.device)
        model = build_model(cfg, len(cfg.data.train_domains), self.rank_batch, self.device)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                    momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core: DGUCDIR = self.accelerator.unwrap_model(self.model)
        self.progress = Progress()
        self.clusters = ClusterSlot(self.device)
        self.window = MetricWindow()
        self.last_report: EvalReport | None = None  # the latest evaluation run by this process
        self.eval_pending: str | None = None  # a scheduled evaluation a stop signal cut short
        self.resumed_on_other_data = False
        self.tracker = Tracker(cfg, self.rank == 0, self.out_dir)
        self.stop = StopFlag()
        shared = {"model": self.core, "optimizer": self.optimizer, "progress": self.progress, "clusters": self.clusters}
        if self.accelerator.scaler is not None:
            shared["scaler"] = self.accelerator.scaler
        per_rank = {"queues": StateFns(self.core.queues_state, self.core.load_queues_state), "rng": ProcessRNG()}
        if self.loader.bank is not None:  # sample ids only: a resume decodes them again
            per_rank["partner_bank"] = self.loader.bank
        self.checkpointer = Checkpointer(self.out_dir / "checkpoints", shared, per_rank, cfg.train.keep_checkpoints)
        if self.rank == 0:
            self.checkpointer.warn_if_short_of_space(estimated_checkpoint_bytes(self.core))
        self.folder_lock = self._own_output_folder()
        if resume is None:
            self._claim_output_folder(overwrite)
        run_id = self._resume(resume) if resume else None
        self.steps_per_epoch = min(self.loader.steps_per_epoch, cfg.train.max_steps_per_epoch or sys.maxsize)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
            write_run_info(self.out_dir, self.manifest)
        self.tracker.start(run_id)
        if self.tracker.active:  # rank 0 only: the tags cost two git calls and a manifest hash
            self.tracker.set_tags({**run_tags(cfg, self.world, self.precision, self.manifest_sha256),
                                   **self.numerics,
                                   **({"dgucdir.resumed_on_other_data": "true"} if self.resumed_on_other_data else {})})
        if self.rank == 0 and run_id is None:
            self.tracker.log_artifacts([self.out_dir / "config.yaml"])
        log.info("world size %d, %d samples per rank per step (%d per domain), %d steps per epoch, queue %.1f MiB per rank",
                 self.world, self.rank_batch, self.loader.per_domain, self.steps_per_epoch,
                 sum(q.memory_bytes() for q in (self.core.rgb_queue, self.core.phase_queue) if q is not None) / 2**20)
        if self.loader.bank is not None:
            log.info("Fourier partner bank: %d raw images per domain, %.1f MiB per rank on %s", self.loader.bank.slots,
                     self.loader.bank.memory_bytes() / 2**20, self.device)

    # ------------------------------------------------------------------ state
    def save_checkpoint(self) -> Path:
        """Reduces the open metric window first (its finiteness check guards every save), writes the
        checkpoint, and only then reports the window: bookkeeping never stands between a run and its save."""
        metrics = self._reduce_window()
        path = self.checkpointer.save(self.progress.global_step, {
            "world_size": self.world, "config": to_dict(self.cfg), "mlflow_run_id": self.tracker.run_id,
            "manifest_sha256": self.manifest_sha256})
        self._log_window(metrics)
        return path

    def _own_output_folder(self) -> FolderLock | None:
        """Rank 0 holds the run folder's lock for the run's life; every rank refuses when another live run has it
        (a second `dgucdir train` into the folder would interleave checkpoints and delete the other's)."""
        lock, refusal = None, None
        if self.rank == 0:
            try:
                lock = FolderLock(self.out_dir, "dgucdir train").acquire()
            except FolderBusy as exc:
                refusal = exc
        if dist.any_rank(refusal is not None):
            raise refusal or FolderBusy(f"{self.out_dir} is in use by another run (rank 0 says who)")
        return lock

    def close(self) -> None:
        """Ends the MLflow run if it is still open and releases the run folder (the end of :meth:`fit` does
        both; this is for a Trainer used without it, e.g. `bench train`)."""
        self.tracker.end("KILLED")  # a no-op once fit ended the run
        if self.folder_lock is not None:
            self.folder_lock.release()
        dist.destroy_batchnorm_groups()

    def _claim_output_folder(self, overwrite: bool) -> None:
        existing = list_checkpoints(self.checkpointer.root)
        if not existing:
            return
        if not overwrite:
            raise UserError(f"{self.checkpointer.root} already holds checkpoints ({existing[-1].name}): --resume to "
                            "continue that run, --overwrite to delete them and start over, or another "
                            "train.output_dir")
        dist.barrier()
        if self.rank == 0:
            log.warning("--overwrite: deleting %d checkpoint(s) in %s", len(existing), self.checkpointer.root)
            for path in existing:
                shutil.rmtree(path)
        dist.barrier()

    def _resume(self, resume: str) -> str | None:
        found = self.checkpointer.load(None if resume == "latest" else Path(resume))
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.checkpointer.root)
            return None
        path, meta = found
        self._check_same_data(path, meta.get("manifest_sha256"))
        if resume != "latest":
            self.checkpointer.set_aside_newer(path)
        self._warn_config_changes(path, meta["config"])
        p = self.progress
        log.info("resumed from %s: epoch %d, step %d (global step %d)", path, p.epoch, p.step_in_epoch, p.global_step)
        return meta["mlflow_run_id"]

    def _check_same_data(self, path: Path, saved: str | None) -> None:
        """Refuses to resume on other data than the checkpoint's, unless train.resume_on_other_data says to."""
        if saved is None or saved == self.manifest_sha256:
            return
        what = (f"{path} was trained on data with manifest sha256 {saved[:12]}…; {self.manifest.path} has "
                f"{self.manifest_sha256[:12]}… (re-packed or other data)")
        if not self.cfg.train.resume_on_other_data:
            raise CheckpointError(f"{what}: the partner bank and cluster tables would point at other images; "
                                  "resume with train.resume_on_other_data=true to go on anyway")
        log.warning("%s: going on, as train.resume_on_other_data=true asks", what)
        self.resumed_on_other_data = True

    def _warn_config_changes(self, path: Path, saved: dict) -> None:
        """Resuming under another config is allowed, but never silently: every changed key is named."""
        try:
            theirs = flatten(from_dict(saved))
        except ConfigError as exc:
            log.warning("resuming %s, whose saved config this version cannot read (%s)", path, exc)
            return
        mine = flatten(self.cfg)
        changed = sorted(k for k in mine if mine[k] != theirs.get(k))
        if changed:
            log.warning("resuming %s with a changed config: %s", path,
                        ", ".join(f"{k}: {theirs.get(k)!r} -> {mine[k]!r}" for k in changed))

    # ------------------------------------------------------------------ stopping
    def stop_agreed(self) -> bool:
        """Whether any rank received a stop signal (collective: every rank calls it at the same point)."""
        return dist.any_rank(self.stop.requested) if self.world > 1 else self.stop.requested

    def check_stop(self) -> None:
        """The stop check inside clustering and evaluation: raises :class:`StopRequested` once agreed."""
        if self.stop_agreed():
            raise StopRequested

    # ------------------------------------------------------------------ clustering
    @torch.no_grad()
    def compute_clusters(self) -> ClusterState:
        """k-means on the pooled features of the training images' colour phase images; each rank embeds its shard."""
        log.info("epoch %d: embedding the training images for k-means", self.progress.epoch)
        feats, _, domains, indices = training_features(self.core.encoder_q, self.cfg, self.manifest, self.images,
                                                       self.device, self.precision, self.check_stop)
        lc = self.cfg.loss
        result = run_kmeans(lc.kmeans, feats, lc.num_clusters, lc.kmeans_niter, lc.kmeans_nredo,
                            derive_seed(self.cfg.train.seed, "kmeans", self.progress.epoch),
                            lc.kmeans_max_points_per_centroid)
        sizes = torch.bincount(result.assignments, minlength=lc.num_clusters)
        log.info("epoch %d: k-means objective %.2f, local cluster sizes %s", self.progress.epoch, result.objective,
                 sizes.tolist())
        return ClusterState.from_local(result, domains, indices,
                                       [self.manifest.domain(d).count for d in self.cfg.data.train_domains])

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, tag: str) -> EvalReport:
        log.info("evaluating %s on the unseen domains", tag)
        dist.broadcast_buffers(self.core.encoder_q)  # the evaluated model is the checkpointed one on every rank
        report, files = evaluate(self.core.encoder_q, self.manifest, self.cfg.data.eval_domains, self.images,
                                 self.cfg.eval, self.device, self.out_dir / "eval" / tag,
                                 precision=self.precision, checkpoint=self.check_stop)
        self._check_ranks_agree(report)
        self.tracker.log_metrics({f"eval/{k}": v for k, v in report.flat_metrics().items()}, self.progress.global_step)
        self.tracker.log_artifacts([f for f in files if f.suffix != ".png"], f"eval/{tag}")
        self.tracker.log_images([f for f in files if f.suffix == ".png"], self.progress.global_step)
        log.info("retrieval on unseen domains after %s: %s", tag,
                 ", ".join(f"{k} {100 * v:.2f}" for k, v in report.mean().items()))
        self.last_report = report
        return report

    def _check_ranks_agree(self, report: EvalReport) -> None:
        """Every rank scores the same gathered features: a mismatch means a distributed bug."""
        values = torch.tensor(list(report.flat_metrics().values()), dtype=torch.float64, device=dist.comm_device())
        spread = dist.all_gather(values[None]).cpu()
        if not torch.equal(spread.min(0).values, spread.max(0).values):
            raise RuntimeError(f"ranks disagree on the retrieval metrics: {spread.tolist()}")

    # ------------------------------------------------------------------ training
    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One optimisation step; returns the step's losses and accuracies (device tensors, no sync)."""
        state = self.clusters.state if self._clusters_active() else None
        with self.accelerator.autocast():
            out = self.model(batch, state.targets(batch.domain, batch.index) if state is not None else None)
        self.accelerator.backward(out["loss"])
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    def _clusters_active(self) -> bool:
        return self.cfg.loss.cluster and self.progress.epoch >= self.cfg.train.warmup_epochs

    def _reduce_window(self) -> dict[str, float] | None:
        """The open metric window reduced across ranks (collective; None when it is empty)."""
        if not self.window.steps:
            return None
        metrics = self.window.reduce(self.progress.global_step, self.cfg.train.batch_size, self.loader.data_wait_s)
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        return metrics

    def _log_window(self, metrics: dict[str, float] | None) -> dict[str, float] | None:
        if metrics is not None:
            self.tracker.log_metrics(metrics, self.progress.global_step)
        return metrics

    def _report_window(self) -> dict[str, float] | None:
        """Reduces and logs the open metric window (collective; a no-op when it is empty)."""
        return self._log_window(self._reduce_window())

    def _should_stop(self) -> bool:
        """max_steps reached, or a stop signal on any rank.

        Signals are compared across ranks only at log steps (one tiny all-reduce every
        ``train.log_every`` steps, none with one process), so all ranks stop at the same step.
        """
        max_steps = self.cfg.train.max_steps
        if max_steps is not None and self.progress.global_step >= max_steps:
            return True
        if self.world == 1:
            return self.stop.requested
        return self.progress.global_step % self.cfg.train.log_every == 0 and dist.any_rank(self.stop.requested)

    def train_epoch(self) -> bool:
        """Runs the rest of the current epoch; False when stopped early (signal or max_steps)."""
        p = self.progress
        for group in self.optimizer.param_groups:
            group["lr"] = cosine_lr(self.cfg.optim.lr, p.epoch, self.cfg.train.epochs, self.cfg.optim.schedule)
        if self._clusters_active() and (self.clusters.state is None or p.step_in_epoch == 0):
            try:  # a stop before or during clustering: checkpoint where we are (clusters are recomputed)
                self.check_stop()
                self.clusters.state = self.compute_clusters()
            except StopRequested:
                log.warning("stopping before the epoch's clustering finished")
                self.save_checkpoint()
                return False
        bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {p.epoch}",
                   disable=self.rank != 0, unit="step", dynamic_ncols=True)
        self.window.reset(self.loader.data_wait_s)
        self.model.train()
        stopped = False
        for batch in self.loader.epoch(p.epoch, p.step_in_epoch, self.steps_per_epoch):
            self.window.add(self.train_step(batch))
            p.step_in_epoch += 1
            p.global_step += 1
            bar.update(1)
            if p.global_step % self.cfg.train.log_every == 0:
                metrics = self._report_window()
                bar.set_postfix(loss=f"{metrics['train/loss']:.3f}", lr=f"{metrics['train/lr']:.2e}",
                                sps=f"{metrics['train/samples_per_s']:.0f}")
            if self._should_stop():
                stopped = True
                break
        bar.close()
        if p.step_in_epoch >= self.steps_per_epoch:
            self._end_epoch(force_checkpoint=stopped)
            return not stopped and self.eval_pending is None
        self.save_checkpoint()
        return not stopped

    def _eval_due(self, epoch: int) -> bool:
        return epoch > 0 and (epoch % self.cfg.train.eval_every == 0 or epoch == self.cfg.train.epochs)

    def _eval_tag(self, epoch: int) -> str:
        return f"epoch_{epoch:04d}"

    def _end_epoch(self, force_checkpoint: bool = False) -> None:
        """Logs the epoch's last steps, checkpoints, then evaluates (a failed evaluation loses no training).

        A stop signal before or during the evaluation skips it (``eval_pending``): it is scheduled, so the
        resumed run redoes it first (:meth:`_redo_pending_eval`)."""
        self._report_window()
        p = self.progress
        p.epoch, p.step_in_epoch = p.epoch + 1, 0
        last = p.epoch == self.cfg.train.epochs
        if force_checkpoint or p.epoch % self.cfg.train.checkpoint_every == 0 or last:
            self.save_checkpoint()
        if self._eval_due(p.epoch):
            self._eval_or_stop(self._eval_tag(p.epoch))

    def _eval_or_stop(self, tag: str) -> bool:
        """Runs the evaluation ``tag`` unless a stop comes first or during it (then False and ``eval_pending``;
        the checkpoint was written before it, so the resumed run redoes it)."""
        try:
            self.check_stop()
            self.run_eval(tag)
            self.eval_pending = None
            return True
        except StopRequested:
            log.warning("stopping before the evaluation %s finished; a resumed run redoes it", tag)
            self.eval_pending = tag
            return False

    def _redo_pending_eval(self) -> bool:
        """A resumed run at an epoch boundary whose scheduled evaluation never completed (no report JSON:
        a kill, a stop or a full disk during it) redoes it first. False when stopped again."""
        p = self.progress
        tag = self._eval_tag(p.epoch)
        if p.step_in_epoch != 0 or not self._eval_due(p.epoch):
            return True
        done = dist.all_ranks((self.out_dir / "eval" / tag / "retrieval.json").is_file() or self.rank != 0)
        if done:
            return True
        log.info("the evaluation %s scheduled before the checkpoint did not complete: running it now", tag)
        return self._eval_or_stop(tag)

    def fit(self) -> bool:
        """Trains to the configured number of epochs; False when stopped before the end (resume later)."""
        self.stop.install()
        try:
            going = self._redo_pending_eval()
            while going and self.progress.epoch < self.cfg.train.epochs:
                going = self.train_epoch()
            finished = self.progress.epoch >= self.cfg.train.epochs and self.eval_pending is None
            if finished and self.rank == 0:  # the trained encoder, ready for `dgucdir eval`/search elsewhere
                self.tracker.log_artifacts([save_encoder(self.core.encoder_q, self.cfg,
                                                         self.out_dir / "encoder.safetensors")], "model")
                self.tracker.log_model(self.core.encoder_q)
            if not finished:
                log.info("stopped at epoch %d step %d; resume with --resume", self.progress.epoch,
                         self.progress.step_in_epoch)
            self.tracker.end("FINISHED" if finished else "KILLED")
            # leave together: a rank that exits while rank 0 still exports and logs tears the gloo
            # group down under it (seen as SIGABRT of rank 1 and a SIGTERM from torchrun to rank 0)
            dist.barrier()
            return finished
        except BaseException as exc:
            lost = dist.describe_lost_ranks(exc, self.peers, self.cfg.train.collective_timeout_s)
            if lost:  # the usual multi-node failure: one line that says which rank, not a gloo traceback
                log.error("rank %d (%s): %s; the job fails, and resumes from the last complete checkpoint "
                          "when started again", self.rank, self.peers[self.rank].host, lost)
            elif not isinstance(exc, CheckpointSpaceError):  # that one is its own one-line message
                log.exception("training failed on rank %d", self.rank)
            self.tracker.end("KILLED" if isinstance(exc, CheckpointSpaceError) else "FAILED")
            raise
        finally:
            self.close()
