"""`dgucdir ablate`: each component of the method against its ablation, on the unseen domains, over seeds.

Every variant is the base config plus a few overrides, trained by `dgucdir train` in its own
process and output folder (so a finished variant is reused and an interrupted one resumes), and
scored by the retrieval report of its last epoch. The table is what a component has to earn its
place with: a variant that does as well without a component is a finding, reported as measured.

The runs are children of one MLflow parent run per ablation folder (a sweep, as `dgucdir submit`
makes), which gets the table, the bar chart and each variant's mean and std as metrics, so the
ablation is compared in the MLflow UI like any sweep and `dgucdir runs --sweep` shows it too.
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
from .extras import pyplot
from .runs import parent_run
from .tracking import start_sweep_run, tracking_uri

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
    "shard_order": ("each rank its fixed shard, buffer-shuffled (not a fresh global shuffle per epoch)",
                    ["data.order=shard"]),
    "shuffle_bn": ("MoCo shuffle-BN for the keys (not BatchNorm over the whole batch)", ["model.bn=shuffle"]),
    "spherical_kmeans": ("spherical k-means with k-means++ (not the original's Euclidean faiss k-means)",
                         ["loss.kmeans=spherical"]),
    "before_fidelity": ("the three together: the behaviour before data order, BatchNorm and k-means followed "
                        "the original", ["data.order=shard", "model.bn=shuffle", "loss.kmeans=spherical"]),
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

    def picture(self, path: Path) -> Path:
        """One bar chart per metric: each variant's mean with its std as error bar and its seeds as dots."""
        plt = pyplot("the ablation chart")

        fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
        for ax, metric in zip(axes, METRICS):
            for x, v in enumerate(self.variants):
                mean, std = v.stat(metric)
                ax.bar(x, mean, yerr=std, capsize=5, color="tab:blue" if v.name == "full" else "tab:gray")
                seeds = [100 * m[metric] for m in v.per_seed.values()]
                ax.plot([x] * len(seeds), seeds, "k.", markersize=6)
            ax.set_xticks(range(len(self.variants)), [v.name for v in self.variants], rotation=20, fontsize=8)
            ax.set(ylabel=f"mean {metric} over unseen pairs (%)", title=f"{metric}, mean ± std over seeds {self.seeds}")
        fig.suptitle(f"ablation of {self.config}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def metrics(self) -> dict[str, float]:
        """What the parent run logs: each variant's mean and std of each metric, in percent."""
        out = {}
        for v in self.variants:
            for metric in METRICS:
                key = f"ablation/{v.name}/{metric.replace('@', '_at_')}"
                out[f"{key}/mean"], out[f"{key}/std"] = v.stat(metric)
        return out

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
    pyplot("the ablation chart")  # before hours of training, not after
    sweep = f"ablate-{out.resolve().name}"  # `dgucdir runs --sweep` shows the same table from MLflow
    base = load_config(config, overrides)
    uri = tracking_uri(base)
    jobs = [[*VARIANTS[name][1], f"train.seed={seed}"] for name in variants for seed in seeds]
    parent = parent_run(uri, sweep) or start_sweep_run(base, uri, sweep, jobs)  # a rerun adds to the same one
    results = []
    for name in variants:
        result = VariantResult(name, VARIANTS[name][1])
        for seed in seeds:
            run_dir = out / f"{name}-seed{seed}"
            args = [*overrides, *result.overrides, f"train.seed={seed}", f"train.output_dir={run_dir}",
                    f"tracking.group={name}", f"tracking.sweep={sweep}", f"tracking.run_name={name}-seed{seed}",
                    f"tracking.parent_run_id={parent}"]
            cfg = load_config(config, args)  # a bad override fails here, before any training
            log.info("ablation %s, seed %d -> %s", name, seed, run_dir)
            subprocess.run([sys.executable, "-m", "dgucdir", "train", config, *args, "--resume"], check=True)
            result.per_seed[seed] = final_report(run_dir, cfg.train.epochs)
        results.append(result)
    ablation = Ablation(config, seeds, results, sweep)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "ablation.md", out / "ablation.json", out / "ablation.png"]
    files[0].write_text(ablation.markdown())
    files[1].write_text(ablation.to_json() + "\n")
    ablation.picture(files[2])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    for path in files:
        client.log_artifact(parent, str(path))
    for key, value in ablation.metrics().items():
        client.log_metric(parent, key, value)
    return ablation
