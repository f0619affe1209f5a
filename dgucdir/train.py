"""The Trainer: one entry point for one process, `accelerate launch` and SLURM tasks.

accelerate owns DDP, device placement and mixed precision; this module owns the method's
schedule: per-epoch cosine learning rate, clustering at the start of every epoch after the
warm-up, periodic retrieval evaluation, atomic checkpoints and exact resume.

Exact resume works because every random draw of a step is a function of (seed, epoch, rank,
step) — DALI pipeline seeds, Fourier lambdas and partners, the shuffle-BN permutation — and
everything else that evolves (weights, optimizer, queues, cluster state, step counters) is in
the checkpoint. SIGTERM/SIGUSR1 finish the current step, write a checkpoint and exit 0, which
is what SLURM preemption and submitit requeueing rely on.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed
from accelerate import Accelerator
from tqdm import tqdm

from . import checkpoint, dist
from .cluster import spherical_kmeans
from .config import Config, to_dict, to_yaml
from .data.fourier import FourierAugment, normalize
from .data.loader import Batch, MultiDomainLoader, derive_seed, per_rank_batch
from .data.manifest import Manifest
from .data.pipeline import PipelineSpec
from .model.dgucdir import DGUCDIR, ClusterTargets
from .model.encoder import load_moco_v2
from .retrieval import EvalReport, embed_local, evaluate
from .tracking import Tracker

log = logging.getLogger(__name__)


def setup_logging(rank: int, level: int = logging.INFO) -> None:
    """Timestamped lines naming the rank; ranks other than 0 only speak up on warnings."""
    logging.basicConfig(
        level=level if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )


class StopFlag:
    """Set by SIGTERM/SIGUSR1; checked (and agreed on by all ranks) after every step."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        log.warning("received %s: finishing this step, then checkpoint and exit", signal.Signals(signum).name)
        self.requested = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], device=dist.comm_device())
        if dist.is_distributed():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


@dataclass
class ClusterState:
    """Centroids of the phase-image features and each training sample's cluster, per domain."""

    centroids: torch.Tensor
    tables: list[torch.Tensor]

    def targets(self, batch: Batch) -> ClusterTargets:
        ids = torch.empty_like(batch.index)
        for d, table in enumerate(self.tables):
            sel = batch.domain == d
            ids[sel] = table[batch.index[sel]]
        return ClusterTargets(self.centroids, ids)


def cosine_lr(base: float, epoch: int, epochs: int, schedule: str) -> float:
    """MoCo's per-epoch cosine schedule: base * (1 + cos(pi * epoch / epochs)) / 2."""
    return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) if schedule == "cosine" else base


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None) -> None:
        self.cfg = cfg
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available())
        self.rank, self.world = dist.rank(), dist.world_size()
        setup_logging(self.rank)
        self.device = self.accelerator.device
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.rank_batch = per_rank_batch(cfg.train.batch_size, len(cfg.data.train_domains), self.world)
        self.manifest = Manifest.load(cfg.data.manifest)
        self.manifest.check_domains(cfg.data.train_domains, "data.train_domains")
        self.manifest.check_domains(cfg.data.eval_domains, "data.eval_domains")
        self._seed_everything()
        self.spec = PipelineSpec(cfg.data.image_size, self.rank, self.world,
                                 self.accelerator.local_process_index if self.device.type == "cuda" else None,
                                 cfg.data.num_threads)
        a = cfg.augment
        self.augment = FourierAugment(a.alpha, a.hpf_range, a.hpf_alpha, a.hpf_fixed, a.phase_amplitude)
        self.loader = MultiDomainLoader(self.manifest, cfg.data.train_domains, self.rank_batch, self.spec, self.augment,
                                        cfg.train.seed, self.device, cfg.data.shuffle_buffer, a.crop_scale_min, a.fourier)
        model = DGUCDIR(cfg.model, cfg.loss, len(cfg.data.train_domains), self.rank_batch, self.device, cfg.train.seed)
        if cfg.model.moco_init:
            load_moco_v2(model.encoder_q, cfg.model.moco_init)
            model.encoder_k.load_state_dict(model.encoder_q.state_dict())
        if cfg.model.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                    momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.core: DGUCDIR = self.accelerator.unwrap_model(self.model)
        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.clusters: ClusterState | None = None
        self.last_report: EvalReport | None = None  # the latest evaluation run by this process
        self.tracker = Tracker(cfg, self.rank == 0)
        self.stop = StopFlag()
        run_id = self._resume(resume) if resume else None
        self.steps_per_epoch = min(self.loader.steps_per_epoch, cfg.train.max_steps_per_epoch or sys.maxsize)
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.yaml").write_text(to_yaml(cfg))
        self.tracker.start(run_id)
        if self.rank == 0 and run_id is None:
            self.tracker.log_artifacts([self.out_dir / "config.yaml"])
        log.info("world size %d, %d samples per rank per step (%d per domain), %d steps per epoch, queue %.1f MiB per rank",
                 self.world, self.rank_batch, self.loader.per_domain, self.steps_per_epoch,
                 sum(q.memory_bytes() for q in (self.core.rgb_queue, self.core.phase_queue) if q is not None) / 2**20)

    # ------------------------------------------------------------------ state
    def _seed_everything(self) -> None:
        """Seeds by *global* rank, so GPU k of every node draws differently."""
        s = derive_seed(self.cfg.train.seed, "global", self.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def _rng_state(self) -> dict:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def _set_rng_state(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    def save_checkpoint(self) -> Path:
        scaler = self.accelerator.scaler
        shared = {
            "model": self.core.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "clusters": None if self.clusters is None else {"centroids": self.clusters.centroids.cpu(),
                                                             "tables": [t.cpu() for t in self.clusters.tables]},
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
            "world_size": self.world, "config": to_dict(self.cfg), "mlflow_run_id": self.tracker.run_id,
            "arch": self.cfg.model.arch, "feature_dim": self.core.feature_dim,
        }
        per_rank = {"queues": self.core.queues_state(), "rng": self._rng_state(),
                    "dali_seeds": [derive_seed(self.cfg.train.seed, self.epoch, self.rank, d)
                                   for d in self.cfg.data.train_domains]}
        return checkpoint.save(self.ckpt_dir, self.global_step, shared, per_rank, self.cfg.train.keep_checkpoints)

    def _resume(self, resume: str) -> str | None:
        explicit = None if resume == "latest" else Path(resume)
        found = checkpoint.load(self.ckpt_dir, explicit)
        if found is None:
            log.info("no checkpoint in %s: starting from scratch", self.ckpt_dir)
            return None
        path, shared, own = found
        if shared["world_size"] != self.world:
            raise RuntimeError(f"{path} was written by {shared['world_size']} ranks; this job has {self.world} "
                               "(the queue shards are per rank)")
        self.core.load_state_dict(shared["model"])
        self.optimizer.load_state_dict(shared["optimizer"])
        if shared["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(shared["scaler"])
        if shared["clusters"] is not None:
            c = shared["clusters"]
            self.clusters = ClusterState(c["centroids"].to(self.device), [t.to(self.device) for t in c["tables"]])
        self.epoch, self.step_in_epoch, self.global_step = shared["epoch"], shared["step_in_epoch"], shared["global_step"]
        self.core.load_queues_state(own["queues"])
        self._set_rng_state(own["rng"])
        log.info("resumed from %s: epoch %d, step %d (global step %d)", path, self.epoch, self.step_in_epoch,
                 self.global_step)
        return shared["mlflow_run_id"]

    # ------------------------------------------------------------------ clustering
    @torch.no_grad()
    def compute_clusters(self) -> ClusterState:
        """k-means on the pooled features of the training phase images; each rank embeds only its shard."""
        encoder = self.core.encoder_q
        was_training = encoder.training
        encoder.eval()
        transform = None if self.cfg.model.rgb_only else (lambda x: normalize(self.augment.phase_image(x)))
        feats, domains, indices = [], [], []
        for d, name in enumerate(self.cfg.data.train_domains):
            f, _, idx = embed_local(encoder, self.manifest.domain(name), self.spec, self.cfg.eval.batch_size,
                                    self.device, transform)
            feats.append(f)
            indices.append(idx)
            domains.append(torch.full_like(idx, d))
        encoder.train(was_training)
        lc = self.cfg.loss
        result = spherical_kmeans(torch.cat(feats), lc.num_clusters, lc.kmeans_niter, lc.kmeans_nredo,
                                  derive_seed(self.cfg.train.seed, "kmeans", self.epoch))
        triples = dist.gather_variable(torch.stack([torch.cat(domains), torch.cat(indices), result.assignments], 1))
        tables = []
        for d, name in enumerate(self.cfg.data.train_domains):
            rows = triples[triples[:, 0] == d]
            table = torch.full((self.manifest.domain(name).count,), -1, dtype=torch.long, device=self.device)
            table[rows[:, 1]] = rows[:, 2]
            tables.append(table)
        sizes = torch.bincount(result.assignments, minlength=lc.num_clusters)
        log.info("epoch %d: k-means objective %.2f, local cluster sizes %s", self.epoch, result.objective, sizes.tolist())
        return ClusterState(result.centroids, tables)

    # ------------------------------------------------------------------ evaluation
    def run_eval(self, tag: str) -> EvalReport:
        ec = self.cfg.eval
        out = self.out_dir / "eval" / tag
        report, files = evaluate(self.core.encoder_q, self.manifest, self.cfg.data.eval_domains, self.spec, ec.batch_size,
                                 ec.topk, ec.map_k, ec.chunk_size, self.device, out, ec.picture_queries, ec.picture_topk)
        self._check_ranks_agree(report)
        self.tracker.log_metrics({f"eval/{k}": v for k, v in report.flat_metrics().items()}, self.global_step)
        self.tracker.log_artifacts(files, f"eval/{tag}")
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
    def _log_step(self, sums: dict[str, torch.Tensor], count: int, lr: float, t_start: float, wait_start: float) -> None:
        names = sorted(sums)
        values = torch.stack([sums[n] / count for n in names]).float().to(dist.comm_device())
        values = dist.all_reduce_sum(values) / self.world
        elapsed = time.perf_counter() - t_start
        metrics = {f"train/{n}": float(v) for n, v in zip(names, values)}
        if not all(map(math.isfinite, metrics.values())):
            bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
            raise FloatingPointError(f"non-finite {', '.join(bad)} at global step {self.global_step}; "
                                     f"the last good state is the latest checkpoint in {self.ckpt_dir}")
        metrics["train/lr"] = lr
        metrics["train/samples_per_s"] = count * self.cfg.train.batch_size / max(elapsed, 1e-9)
        metrics["train/data_wait_fraction"] = (self.loader.data_wait_s - wait_start) / max(elapsed, 1e-9)
        self.tracker.log_metrics(metrics, self.global_step)

    def train_epoch(self) -> bool:
        """Runs the rest of the current epoch; False when stopped early (signal or max_steps)."""
        cfg = self.cfg
        lr = cosine_lr(cfg.optim.lr, self.epoch, cfg.train.epochs, cfg.optim.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        use_clusters = cfg.loss.cluster and self.epoch >= cfg.train.warmup_epochs
        if use_clusters and (self.clusters is None or self.step_in_epoch == 0):
            self.clusters = self.compute_clusters()
        bar = tqdm(total=self.steps_per_epoch, initial=self.step_in_epoch, desc=f"epoch {self.epoch}",
                   disable=self.rank != 0, unit="step", dynamic_ncols=True)
        sums: dict[str, torch.Tensor] = {}
        count, t_start, wait_start = 0, time.perf_counter(), self.loader.data_wait_s
        self.model.train()
        for batch in self.loader.epoch(self.epoch, self.step_in_epoch, self.steps_per_epoch):
            with self.accelerator.autocast():
                out = self.model(batch, self.clusters.targets(batch) if use_clusters else None)
            self.accelerator.backward(out["loss"])
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step_in_epoch += 1
            self.global_step += 1
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            count += 1
            if self.global_step % cfg.train.log_every == 0:
                self._log_step(sums, count, lr, t_start, wait_start)
                bar.set_postfix(loss=f"{float(sums['loss'] / count):.3f}", lr=f"{lr:.2e}",
                                sps=f"{count * cfg.train.batch_size / (time.perf_counter() - t_start):.0f}")
                sums, count, t_start, wait_start = {}, 0, time.perf_counter(), self.loader.data_wait_s
            bar.update(1)
            at_max = cfg.train.max_steps is not None and self.global_step >= cfg.train.max_steps
            if self.stop.any_rank() or at_max:
                bar.close()
                if self.step_in_epoch >= self.steps_per_epoch:
                    self._end_epoch(force_checkpoint=True)
                else:
                    self.save_checkpoint()
                return False
        bar.close()
        self._end_epoch()
        return True

    def _end_epoch(self, force_checkpoint: bool = False) -> None:
        finished = self.epoch + 1
        last = finished == self.cfg.train.epochs
        self.epoch, self.step_in_epoch = finished, 0
        if finished % self.cfg.train.eval_every == 0 or last:
            self.run_eval(f"epoch_{finished:04d}")
        if force_checkpoint or finished % self.cfg.train.checkpoint_every == 0 or last:
            self.save_checkpoint()

    def fit(self) -> bool:
        """Trains to the configured number of epochs; False when stopped early (resume later)."""
        self.stop.install()
        try:
            while self.epoch < self.cfg.train.epochs:
                if not self.train_epoch():
                    log.info("stopped at epoch %d step %d; resume with --resume", self.epoch, self.step_in_epoch)
                    self.tracker.end("KILLED")
                    return False
            self.tracker.end("FINISHED")
            return True
        except BaseException:
            log.exception("training failed on rank %d", self.rank)
            self.tracker.end("FAILED")
            raise

