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
from typing import Callable

import torch

from .config import Config, ConfigError, flatten, load_config
from .data import demo as digits
from .data import shapes
from .data.manifest import Manifest
from .data.pack import pack, read_list
from .file_lock import exclusive
from .model.loading import baseline_encoder
from .retrieval import EvalReport, evaluate
from .train import RUN_INFO, Trainer

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class DemoSet:
    """A dataset rendered on this machine: no download, packed by the same path users take for PACS."""

    render: Callable[[Path], dict[str, Path]]  # writes images and one list per domain under a folder
    version: int  # of the renderer: bumped whenever the rendering changes, so old folders are rebuilt
    classes: int
    manifest: Path  # where its config expects it


DEMO_SETS: dict[str, DemoSet] = {
    "digits": DemoSet(digits.write_demo_images, digits.RENDER_VERSION, 10, Path("data/demo/shards/manifest.json")),
    "shapes": DemoSet(shapes.write_shape_images, 1, len(shapes.CLASSES), Path("data/shapes/shards/manifest.json")),
}
VERSION_FILE = "render_version"  # in the data folder: which renderer made it, e.g. "digits 2"


def demo_set_of(manifest: Path) -> str | None:
    """Which demo set a config's manifest path is the default place of, if any."""
    return next((name for name, s in DEMO_SETS.items() if Path(manifest) == s.manifest), None)


def build_demo_data(out: Path, force: bool = False, kind: str = "digits") -> Path:
    """Renders and packs demo set ``kind`` unless this renderer's version of it is already there.

    Returns the manifest path. The version file is written last, so an interrupted build is
    rebuilt rather than trusted.
    """
    with exclusive(out / ".build.lock"):  # trainings started together (--jobs) render it once
        return _build_unlocked(out, kind, force)


def _build_unlocked(out: Path, kind: str, force: bool) -> Path:
    demo_set = DEMO_SETS[kind]
    manifest = out / "shards" / "manifest.json"
    stamp = f"{kind} {demo_set.version}"
    version_file = out / VERSION_FILE
    if manifest.is_file() and not force:
        found = version_file.read_text().strip() if version_file.is_file() else "an unrecorded renderer"
        if found == stamp:
            log.info("%s demo data already at %s", kind, manifest)
            return manifest
        log.warning("demo data at %s was rendered by %s, this is %s: rendering again", out, found, stamp)
    version_file.unlink(missing_ok=True)
    lists = demo_set.render(out)
    domains = {d: read_list(d, p, out / "images", 0) for d, p in lists.items()}
    result = pack(domains, out / "shards", [str(i) for i in range(demo_set.classes)], shard_mb=1.0)
    version_file.write_text(stamp + "\n")
    log.info("%s demo data: %s images packed to %s", kind, result.counts, manifest)
    return manifest


def ensure_demo_data(cfg: Config, world_size: int) -> None:
    """Lets one process of `dgucdir train` on a demo config render missing or outdated demo data.

    Several processes would race on the same files, so they only get the usual "no manifest" error.
    """
    kind = demo_set_of(cfg.data.manifest)
    if kind and world_size == 1:
        build_demo_data(Path(cfg.data.manifest).parent.parent, kind=kind)


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
    build_demo_data(Path(cfg.data.manifest).parent.parent, kind=demo_set_of(cfg.data.manifest) or "digits")
    out = Path(cfg.train.output_dir)
    set_aside_stale_run(cfg, out)
    trainer = Trainer(cfg, resume="latest")
    if not trainer.fit():
        return None

    def evaluate_encoder(encoder: torch.nn.Module, tag: str) -> EvalReport:
        return evaluate(encoder, trainer.manifest, cfg.data.eval_domains, trainer.images, cfg.eval, trainer.device,
                        out / "eval" / tag, precision=trainer.precision)[0]

    # The last epoch was evaluated during fit(), unless this process resumed a finished run.
    trained = trainer.last_report or evaluate_encoder(trainer.core.encoder_q, "final")
    baseline = evaluate_encoder(baseline_encoder(cfg, "random").to(trainer.device), "random_init")
    return DemoResult(trained, baseline, out, trainer.tracker.uri) if trainer.rank == 0 else None
