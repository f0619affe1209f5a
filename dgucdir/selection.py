"""`dgucdir select`: choose a setting from a grid without looking at the unseen domains.

The unseen domains are the test set of domain generalisation: a setting chosen by their retrieval
figures is tuned on the test set, and its figures say nothing about domains still unseen. The
protocol here is DomainBed's *training-domain validation*, adapted to retrieval:

1. the grid is written down before anything runs (the ``--grid`` options, saved with the result);
2. every grid point is trained for every seed exactly as configured, with the code stamped as in
   `dgucdir ablate` (a point trained by other code is refused);
3. its last checkpoint is scored by retrieval *between the training domains*, with their labels,
   on their images (`dgucdir eval CKPT --domains <training domains>`): labels the training never
   used, of domains it did see;
4. the point with the best mean score over seeds is chosen; ties go to the earlier point of the
   grid, so listing the paper's value first keeps it unless another value is better.

The unseen-domain evaluations that training writes into each run folder are never read here. The
chosen setting is then measured on the unseen domains, against its ablations, with `dgucdir ablate`.
"""

from __future__ import annotations

import itertools
import json
import logging
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .ablate import check_stamps, code_version, train_all
from .checkpoint import list_checkpoints
from .config import ConfigError, load_config

log = logging.getLogger(__name__)


def grid_points(grid: list[str]) -> list[list[str]]:
    """``["augment.hpf_range=2;4", "train.epochs=80;200"]`` -> every combination as a list of overrides,
    in grid order (the first option varies slowest). Values are separated by ``;`` (as `dgucdir submit
    --sweep`), so a list value such as ``[a,b]`` stays one value."""
    axes = []
    for option in grid:
        key, sep, values = option.partition("=")
        choices = [v.strip() for v in values.split(";") if v.strip()]
        if not sep or not key.strip() or not choices:
            raise ConfigError(f"--grid {option!r}: expected KEY=VALUE1;VALUE2;...")
        axes.append([f"{key.strip()}={v}" for v in choices])
    return [list(point) for point in itertools.product(*axes)]


def point_name(point: list[str]) -> str:
    """A folder name for a grid point: ``augment.hpf_range=4`` -> ``hpf_range-4``."""
    parts = [f"{key.rsplit('.', 1)[-1]}-{value}" for key, value in (o.split("=", 1) for o in point)]
    name = "_".join(parts) or "as-configured"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


@dataclass
class Candidate:
    point: list[str]
    scores: dict[int, float] = field(default_factory=dict)  # seed -> training-domain score, in percent

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores.values())

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores.values()) if len(self.scores) > 1 else 0.0


def choose(points: list[list[str]], seeds: list[int], score: Callable[[list[str], int], float]
           ) -> tuple[list[Candidate], Candidate]:
    """Scores every (point, seed) with ``score`` and returns every candidate and the best by mean score
    (the earliest on a tie)."""
    candidates = [Candidate(point, {seed: score(point, seed) for seed in seeds}) for point in points]
    best = max(candidates, key=lambda c: c.mean)  # max keeps the first of equal maxima
    return candidates, best


def training_domain_score(run_dir: Path, train_domains: list[str], metric: str) -> float:
    """Retrieval between the training domains of a run's last checkpoint: the mean of ``metric`` over
    their ordered pairs, in percent (evaluated once per checkpoint, then read back: the report is kept
    under the checkpoint's name, so a run trained further is scored again)."""
    checkpoints = list_checkpoints(run_dir / "checkpoints")
    if not checkpoints:
        raise RuntimeError(f"{run_dir}: no checkpoint to score")
    out = run_dir / "select_eval" / checkpoints[-1].name
    report = out / "retrieval.json"  # written atomically: present means complete
    if not report.is_file():
        subprocess.run([sys.executable, "-m", "dgucdir", "eval", str(checkpoints[-1]), "--domains", *train_domains,
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
    mean = json.loads(report.read_text())["mean"]
    if metric not in mean:
        raise ConfigError(f"--metric {metric}: the report has {', '.join(mean)}")
    return 100 * mean[metric]


def run_selection(config: str, overrides: list[str], grid: list[str], seeds: list[int], out: Path,
                  metric: str = "mAP@All", concurrent: int = 1) -> tuple[list[Candidate], Candidate]:
    """Trains (``concurrent`` at a time) and scores every grid point and seed (finished ones are reused),
    writes selection.md/.json."""
    points = grid_points(grid)
    for point in points:
        load_config(config, [*overrides, *point])  # a bad grid value fails here, before any training
    train_domains = load_config(config, overrides).data.train_domains

    def run(point: list[str], seed: int) -> tuple[Path, list[str]]:
        run_dir = out / f"{point_name(point)}-seed{seed}"
        return run_dir, [*overrides, *point, f"train.seed={seed}", f"train.output_dir={run_dir}",
                         f"tracking.group={point_name(point)}", f"tracking.run_name={run_dir.name}"]

    current = code_version()
    check_stamps([run(point, seed)[0] for point in points for seed in seeds], current)
    train_all(config, [run(point, seed) for point in points for seed in seeds], current, concurrent)
    candidates, best = choose(points, seeds,
                              lambda point, seed: training_domain_score(run(point, seed)[0], train_domains, metric))
    out.mkdir(parents=True, exist_ok=True)
    (out / "selection.md").write_text(selection_markdown(config, candidates, best, seeds, metric, train_domains))
    (out / "selection.json").write_text(json.dumps({
        "config": config, "overrides": overrides, "grid": grid, "seeds": seeds, "metric": metric, "code": current,
        "scored_on": train_domains, "chosen": best.point,
        "candidates": [{"point": c.point, "scores": c.scores} for c in candidates]}, indent=1) + "\n")
    return candidates, best


def selection_markdown(config: str, candidates: list[Candidate], best: Candidate, seeds: list[int], metric: str,
                       train_domains: list[str]) -> str:
    rows = [f"| setting | {metric} between the training domains (mean ± std) | per seed |", "|---|---|---|"]
    for c in candidates:
        mark = " **(chosen)**" if c is best else ""
        rows.append(f"| {' '.join(c.point) or 'as configured'}{mark} | {c.mean:.2f} ± {c.std:.2f} | "
                    + " / ".join(f"{c.scores[s]:.2f}" for s in seeds) + " |")
    return (f"Selection on {config}, seeds {seeds}: scored by retrieval between the training domains "
            f"{', '.join(train_domains)} (never the unseen ones).\n\n" + "\n".join(rows)
            + f"\n\nChosen: {' '.join(best.point) or 'as configured'}\n")
