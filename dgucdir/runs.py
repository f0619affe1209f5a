"""`dgucdir runs`: the results table researchers paste into papers, read from MLflow with its search API.

One row per training split (the runs' ``dgucdir.train_domains`` tag, and ``dgucdir.group`` where a
run has one, e.g. an ablation variant), one column per ordered pair of
unseen domains plus their mean, each cell the mean ± std over the split's runs (seeds) of the
metric's last logged value. A sweep's parent run (``dgucdir submit``) gets the table and the
picture as artifacts.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .extras import pyplot

PARENT_TAG = "dgucdir.sweep_parent"


def metric_key(pair: str, metric: str) -> str:
    """The MLflow key the Trainer logs, e.g. ('photo_to_sketch', 'P@1') -> 'eval/photo_to_sketch/P_at_1'."""
    return f"eval/{pair}/{metric.replace('@', '_at_')}"


@dataclass
class RunResult:
    run_id: str
    name: str
    split: str  # training domains, '+'-joined
    seed: str
    pairs: dict[str, float]  # 'q_to_g' and 'mean' -> last value of the metric
    curve: list[tuple[int, float]]  # (step, mean metric) over the run


@dataclass
class RunsTable:
    metric: str
    runs: list[RunResult]
    unfinished: list[str] = field(default_factory=list)  # "name (status)" of evaluated runs left out

    def columns(self) -> list[str]:
        pairs = sorted({p for r in self.runs for p in r.pairs if p != "mean"})
        return [*pairs, "mean"]

    def cells(self) -> dict[str, dict[str, tuple[float, float, int]]]:
        """split -> column -> (mean, std, n) over the split's runs, in percent."""
        by_split: dict[str, list[RunResult]] = defaultdict(list)
        for r in self.runs:
            by_split[r.split].append(r)
        out: dict[str, dict[str, tuple[float, float, int]]] = {}
        for split, runs in sorted(by_split.items()):
            out[split] = {}
            for col in self.columns():
                values = [100 * r.pairs[col] for r in runs if col in r.pairs]
                if values:
                    out[split][col] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                                       len(values))
        return out

    def markdown(self) -> str:
        cols = self.columns()
        rows = [f"| training domains ({self.metric}, mean ± std over seeds) | "
                + " | ".join(c.replace("_to_", " → ") for c in cols) + " | runs |",
                "|" + "---|" * (len(cols) + 2)]
        for split, cells in self.cells().items():
            n = max(c[2] for c in cells.values())
            rows.append(f"| {split} | " + " | ".join(f"{cells[c][0]:.2f} ± {cells[c][1]:.2f}" if c in cells else "—"
                                                    for c in cols) + f" | {n} |")
        if self.unfinished:
            rows.append(f"\nLeft out, not finished (their last evaluation is not their final one): "
                        f"{', '.join(self.unfinished)}")
        return "\n".join(rows) + "\n"

    def to_json(self) -> str:
        return json.dumps({"metric": self.metric, "table": {s: {c: {"mean": m, "std": sd, "n": n}
                                                                 for c, (m, sd, n) in cells.items()}
                                                             for s, cells in self.cells().items()},
                           "runs": [{"run_id": r.run_id, "name": r.name, "split": r.split, "seed": r.seed,
                                     "pairs": r.pairs} for r in self.runs]}, indent=1)

    def picture(self, path: Path) -> Path:
        """Left: the mean metric over steps per run; right: the final mean per split with its std."""
        plt = pyplot("the --png picture")

        fig, (curves, bars) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in self.runs:
            if r.curve:
                steps, values = zip(*r.curve)
                curves.plot(steps, [100 * v for v in values], marker="o", label=r.name)
        curves.set(xlabel="global step", ylabel=f"mean {self.metric} (%)", title="unseen-domain retrieval over training")
        curves.legend(fontsize=7)
        cells = self.cells()
        splits = list(cells)
        bars.bar(range(len(splits)), [cells[s]["mean"][0] for s in splits],
                 yerr=[cells[s]["mean"][1] for s in splits], capsize=4)
        bars.set_xticks(range(len(splits)), splits, rotation=20, fontsize=8)
        bars.set(ylabel=f"mean {self.metric} (%)", title="final, mean ± std over seeds")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path


def collect(uri: str, metric: str, experiment: str | None = None, sweep: str | None = None) -> RunsTable:
    """The finished evaluations of the runs in ``uri`` (one experiment, or all; one sweep, or all)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(f"no MLflow experiment {experiment!r} in {uri}")
        experiment_ids = [found.experiment_id]
    else:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`dgucdir.sweep` = '{sweep}'" if sweep else ""
    results, unfinished = [], []
    for run in client.search_runs(experiment_ids, filter_string=query, max_results=10000):
        tags, metrics = run.data.tags, run.data.metrics
        if tags.get(PARENT_TAG) == "true" or metric_key("mean", metric) not in metrics:
            continue
        if run.info.status != "FINISHED":  # running, stopped or failed: its last value is an earlier epoch's
            unfinished.append(f"{run.info.run_name} ({run.info.status})")
            continue
        pairs = {k.split("/")[1]: v for k, v in metrics.items()
                 if k.startswith("eval/") and k.endswith("/" + metric.replace("@", "_at_"))}
        curve = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric_key("mean", metric))]
        split = tags.get("dgucdir.train_domains", "?").replace(",", "+")
        if tags.get("dgucdir.group"):
            split = f"{split} [{tags['dgucdir.group']}]"
        results.append(RunResult(run.info.run_id, run.info.run_name, split, tags.get("dgucdir.seed", "?"), pairs,
                                 sorted(curve)))
    if not results:
        where = f"sweep {sweep!r}" if sweep else f"experiment {experiment!r}" if experiment else "any experiment"
        left = f" ({len(unfinished)} evaluated but not finished: {', '.join(sorted(unfinished))})" if unfinished else ""
        raise UserError(f"no finished, evaluated runs in {where} of {uri}{left}")
    return RunsTable(metric, sorted(results, key=lambda r: (r.split, r.seed, r.name)), sorted(unfinished))


def parent_run(uri: str, sweep: str) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.`dgucdir.sweep` = '{sweep}' and tags.`{PARENT_TAG}` = 'true'")
    return found[0].info.run_id if found else None


def report(uri: str, metric: str, experiment: str | None, sweep: str | None, png: Path | None) -> RunsTable:
    """The table (and picture); for a sweep, both are also logged to its parent run."""
    if png is not None:
        pyplot("the --png picture")  # before reading the store
    table = collect(uri, metric, experiment, sweep)
    if png is not None:
        table.picture(png)
    parent = parent_run(uri, sweep) if sweep else None
    if parent is not None:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        client.log_text(parent, table.markdown(), f"results_{metric.replace('@', '_at_')}.md")
        if png is not None:
            client.log_artifact(parent, str(png))
    return table
