"""`dgucdir demo`, the main job: build the demo data, train on two domains, evaluate on the two unseen ones.

The demo is meant to be run again and again (after an interruption, after an update), so it
resumes a run in place only when that run was trained with the same settings on the same data;
otherwise the old run is renamed aside (never deleted) and a new one starts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, ConfigError, flatten, load_config
from .data.demo import RENDER_VERSION, VERSION_FILE, mark_render_version, read_render_version, write_demo_images
from .data.manifest import Manifest
from .data.pack import pack, read_list
from .model.loading import baseline_encoder
from .retrieval import EvalReport, evaluate
from .train import RUN_INFO, Trainer

log = logging.getLogger(__name__)

DEMO_MANIFEST = Path("data/demo/shards/manifest.json")  # where configs/demo.yaml expects the demo


def build_demo_data(out: Path, force: bool = False) -> Path:
    """Renders and packs the demo dataset unless this renderer's version is already there.

    Returns the manifest path. The version file is written last, so an interrupted build is
    rebuilt rather than trusted.
    """
    manifest = out / "shards" / "manifest.json"
    if manifest.is_file() and not force:
        found = read_render_version(out)
        if found == RENDER_VERSION:
            log.info("demo data already at %s", manifest)
            return manifest
        log.warning("demo data at %s was rendered by version %d, this is version %d: rendering again",
                    out, found, RENDER_VERSION)
    (out / VERSION_FILE).unlink(missing_ok=True)
    lists = write_demo_images(out)
    domains = {d: read_list(d, p, out / "images", 0) for d, p in lists.items()}
    result = pack(domains, out / "shards", [str(i) for i in range(10)], shard_mb=1.0)
    mark_render_version(out)
    log.info("demo data: %s images packed to %s", result.counts, manifest)
    return manifest


def ensure_demo_data(cfg: Config, world_size: int) -> None:
    """Lets one process of `dgucdir train configs/demo.yaml` render missing or outdated demo data.

    Several processes would race on the same files, so they only get the usual "no manifest" error.
    """
    if Path(cfg.data.manifest) == DEMO_MANIFEST and world_size == 1:
        build_demo_data(DEMO_MANIFEST.parent.parent)


def stale_reasons(cfg: Config, out: Path) -> list[str]:
    """Why the run in ``out`` cannot be resumed under ``cfg``: changed settings, other data; [] if it can."""
    saved = out / "config.yaml"
    if not saved.is_file():
        return []
    try:
        theirs, mine = flatten(load_config(saved)), flatten(cfg)
        reasons = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    except ConfigError:
        reasons = ["a config this version no longer reads"]
    info = out / RUN_INFO
    trained_on = json.loads(info.read_text()).get("manifest_sha256") if info.is_file() else None
    if trained_on != Manifest.load(cfg.data.manifest).fingerprint():
        reasons.append("other data (the demo was rendered again since)" if trained_on else "unrecorded data")
    return reasons


def set_aside_stale_run(cfg: Config, out: Path) -> None:
    """Renames a run in ``out`` that was trained with other settings or other data to ``<out>.stale-<time>``."""
    reasons = stale_reasons(cfg, out)
    if not reasons:
        return
    stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(stale)
    log.warning("%s was trained with other settings (%s): moved it to %s and starting over", out,
                "; ".join(reasons), stale)


@dataclass
class DemoResult:
    trained: EvalReport
    random_init: EvalReport  # the same architecture with random weights: the baseline to beat
    out_dir: Path
    tracking_uri: str

    def markdown(self) -> str:
        lines = ["## Retrieval between unseen domains, trained encoder\n", self.trained.markdown(),
                 "## Mean over ordered pairs: trained vs the same encoder with random weights\n",
                 "| metric | trained | random init |", "|---|---|---|"]
        base = self.random_init.mean()
        lines += [f"| {name} | {100 * v:.2f} | {100 * base[name]:.2f} |" for name, v in self.trained.mean().items()]
        lines += [f"\nTables and pictures: {self.out_dir.resolve() / 'eval'}", f"MLflow store: {self.tracking_uri}",
                  f"Open it with: mlflow ui --backend-store-uri {self.tracking_uri}"]
        return "\n".join(lines) + "\n"


def run_demo(cfg: Config) -> DemoResult | None:
    """Builds the data, trains (resuming a compatible run), evaluates trained vs random weights.

    Returns None when training was stopped before its end (a signal), and on ranks other than 0.
    """
    build_demo_data(Path(cfg.data.manifest).parent.parent)
    out = Path(cfg.train.output_dir)
    set_aside_stale_run(cfg, out)
    trainer = Trainer(cfg, resume="latest")
    if not trainer.fit():
        return None

    def evaluate_encoder(encoder: torch.nn.Module, tag: str) -> EvalReport:
        return evaluate(encoder, trainer.manifest, cfg.data.eval_domains, trainer.spec, cfg.eval, trainer.device,
                        out / "eval" / tag, precision=trainer.precision)[0]

    # The last epoch was evaluated during fit(), unless this process resumed a finished run.
    trained = trainer.last_report or evaluate_encoder(trainer.core.encoder_q, "final")
    baseline = evaluate_encoder(baseline_encoder(cfg, "random").to(trainer.device), "random_init")
    return DemoResult(trained, baseline, out, trainer.tracker.uri) if trainer.rank == 0 else None
