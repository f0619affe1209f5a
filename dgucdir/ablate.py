"""`dgucdir ablate`: each component of the method against its ablation, on the unseen domains, over seeds.

Every variant is the base config plus a few overrides, trained by `dgucdir train` in its own
process and output folder (so a finished variant is reused and an interrupted one resumes), and
scored by the retrieval report of its last epoch. The table is what a component has to earn its
place with: a variant that does as well without a component is a finding, reported as measured.
"""

from __future__ import annotations

import json
import logging
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_config

log = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("the method as configured", []),
    "batch_partner": ("Fourier partner: another sample's augmented view, shared by both views",
                      ["augment.partner=shared_batch"]),
    "no_phase_mix": ("amplitude mix only (no low-frequency phase mix)", ["augment.hpf_range=0"]),
    "no_fourier": ("no Fourier mixing (phase images still used)", ["augment.fourier=false"]),
    "no_cluster": ("no cluster-wise contrastive loss", ["loss.cluster=false"]),
    "rgb_only": ("plain MoCo on RGB views: no phase branch, no Fourier, no clusters",
                 ["model.rgb_only=true", "augment.fourier=false", "loss.cluster=false"]),
}
STANDARD = ("full", "no_fourier", "no_phase_mix", "rgb_only", "no_cluster")  # the paper's ablations
METRICS = ("P@1", "mAP@All")


@dataclass
class VariantResult:
    name: str
    overrides: list[str]
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)  # seed -> mean metrics over pairs

    def stat(self, metric: str) -> tuple[float, float]:
        values = [100 * m[metric] for m in self.per_seed.values()]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass
class Ablation:
    config: str
    seeds: list[int]
    variants: list[VariantResult]
    sweep: str

    def markdown(self) -> str:
        full = next((v for v in self.variants if v.name == "full"), None)
        head = "| variant | what changes | " + " | ".join(f"{m} (mean ± std)" for m in METRICS)
        head += (" | " + " | ".join(f"Δ{m} vs full" for m in METRICS) if full else "") + " |"
        rows = [head, "|" + "---|" * (2 + len(METRICS) * (2 if full else 1))]
        for v in self.variants:
            cells = [f"{v.stat(m)[0]:.2f} ± {v.stat(m)[1]:.2f}" for m in METRICS]
            if full:
                cells += [f"{v.stat(m)[0] - full.stat(m)[0]:+.2f}" for m in METRICS]
            rows.append(f"| {v.name} | {' '.join(v.overrides) or VARIANTS[v.name][0]} | " + " | ".join(cells) + " |")
        return (f"Ablation of {self.config}, seeds {self.seeds}: mean over the ordered pairs of unseen domains "
                f"of the last epoch's retrieval (also: dgucdir runs --sweep {self.sweep})\n\n" + "\n".join(rows) + "\n")

    def to_json(self) -> str:
        return json.dumps({"config": self.config, "seeds": self.seeds,
                           "variants": [{"name": v.name, "overrides": v.overrides,
                                         "per_seed": {str(s): m for s, m in v.per_seed.items()}}
                                        for v in self.variants]}, indent=1)


def final_report(run_dir: Path, epochs: int) -> dict[str, float]:
    path = run_dir / "eval" / f"epoch_{epochs:04d}" / "retrieval.json"
    if not path.is_file():
        raise RuntimeError(f"{run_dir}: no evaluation of the last epoch at {path}")
    return json.loads(path.read_text())["mean"]


def run_ablation(config: str, overrides: list[str], variants: list[str], seeds: list[int], out: Path) -> Ablation:
    """Trains every (variant, seed) that has not finished yet, one after the other; returns the table."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    sweep = f"ablate-{out.resolve().name}"  # `dgucdir runs --sweep` shows the same table from MLflow
    results = []
    for name in variants:
        result = VariantResult(name, VARIANTS[name][1])
        for seed in seeds:
            run_dir = out / f"{name}-seed{seed}"
            args = [*overrides, *result.overrides, f"train.seed={seed}", f"train.output_dir={run_dir}",
                    f"tracking.group={name}", f"tracking.sweep={sweep}", f"tracking.run_name={name}-seed{seed}"]
            cfg = load_config(config, args)  # a bad override fails here, before any training
            log.info("ablation %s, seed %d -> %s", name, seed, run_dir)
            subprocess.run([sys.executable, "-m", "dgucdir", "train", config, *args, "--resume"], check=True)
            result.per_seed[seed] = final_report(run_dir, cfg.train.epochs)
        results.append(result)
    ablation = Ablation(config, seeds, results, sweep)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(ablation.markdown())
    (out / "ablation.json").write_text(ablation.to_json() + "\n")
    return ablation
