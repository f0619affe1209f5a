"""The checks a training job can only make once it knows its data and its world size.

``load_config`` validates what a config says on its own; :func:`validate_runtime` is the one
place for what depends on the packed dataset and the number of processes, run by every rank
before anything is built, so a job that cannot run stops with one clear error and writes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .config import Config, ConfigError
from .data.manifest import Manifest


def validate_runtime(cfg: Config, manifest: Manifest, world: int) -> int:
    """Raises ConfigError (or DataError) for a job that cannot run; returns the per-rank batch size."""
    manifest.check_domains(cfg.data.train_domains, "data.train_domains")
    manifest.check_domains(cfg.data.eval_domains, "data.eval_domains")
    rank_batch = check_before_launch(cfg, world)
    n_train = sum(manifest.domain(d).count for d in cfg.data.train_domains)
    if cfg.loss.cluster and cfg.loss.num_clusters > n_train:
        raise ConfigError(f"loss.num_clusters={cfg.loss.num_clusters}: only {n_train} training images to cluster")
    return rank_batch


log = logging.getLogger(__name__)

MOCO_V2_SOURCE = ("moco_v2_800ep_pretrain.pth.tar from https://github.com/facebookresearch/moco "
                  "(README, 'Models')")


def moco_init_path(cfg: Config, must_exist: bool = True) -> str | None:
    """The MoCo v2 weights to start from, None for random init; a clear error when they are missing
    (``must_exist=False``: a warning only, for a dry run prepared where the file is not)."""
    value = cfg.model.moco_init
    if value is None or value.lower() == "none":
        return None
    if value == "required":
        raise ConfigError(f"model.moco_init: this config starts from MoCo v2 ImageNet weights, as the paper does; "
                          f"download {MOCO_V2_SOURCE} and pass model.moco_init=PATH (or model.moco_init=none to "
                          "train from random weights, which is not the paper's setting)")
    if not Path(value).is_file():
        message = f"model.moco_init: {value} does not exist (expected {MOCO_V2_SOURCE})"
        if must_exist:
            raise ConfigError(message)
        log.warning("%s: the job will fail unless it exists where the job runs", message)
    return value


def check_before_launch(cfg: Config, world: int, weights_must_exist: bool = True) -> int:
    """The checks that need no data: world-size splits and the initial weights (`dgucdir submit` runs
    them before a job waits in the queue; a dry run only warns about missing weights). Returns the
    per-rank batch."""
    moco_init_path(cfg, weights_must_exist)
    return check_world_split(cfg, world)


def check_world_split(cfg: Config, world: int) -> int:
    """The checks that need only the world size (also made by `dgucdir submit` before a job queues)."""
    group = cfg.model.bn_group
    if group is not None and (group < 1 or world % group):
        raise ConfigError(f"model.bn_group={group} must divide the world size {world} (null: all ranks)")
    n_domains = len(cfg.data.train_domains)
    batch = cfg.train.batch_size
    if batch % (n_domains * world):
        raise ConfigError(f"train.batch_size={batch} must be divisible by n_domains x world_size = "
                          f"{n_domains} x {world} = {n_domains * world}")
    rank_batch = batch // world
    per_queue = rank_batch if cfg.loss.shared_queue else rank_batch // n_domains
    if cfg.loss.queue_size % (world * per_queue):
        raise ConfigError(f"loss.queue_size={cfg.loss.queue_size} must be divisible by world_size x per-rank batch "
                          f"per {'step' if cfg.loss.shared_queue else 'domain'} = {world} x {per_queue} = "
                          f"{world * per_queue}")
    return rank_batch
