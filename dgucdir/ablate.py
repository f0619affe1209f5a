"""`dgucdir ablate`: each component of the method against its ablation, on the unseen domains, over seeds.

Every variant is the base config plus a few overrides, trained by `dgucdir train` in its own
process and output folder (so a finished variant is reused and an interrupted one resumes), and
scored by the retrieval report of its last epoch. The table is what a component has to earn its
place with: a variant that does as well without a component is a finding, reported as measured.

The runs are children of one MLflow parent run per ablation folder (a sweep, as `dgucdir submit`
makes), which gets the table, the bar chart and each variant's mean and std as metrics, so the
ablation is compared in the MLflow UI like any sweep and `dgucdir runs --sweep` shows it too.

Every row of a table comes from the same code: each run folder is stamped with a hash of the
package's source and shipped configs (and the git commit, for people), and a run stamped by other
code, or by none, is refused before any training, so an ablation can be stopped and continued
without mixing versions. ``--report`` writes the table, what it shows, the chart and the per-seed
figures as a section of a results file with the command, date, machine and commit.

With ``--report`` the per-seed file next to the report is also the *record* of the finished runs,
rewritten as each run finishes. A run the record holds for the same code, config and overrides is
not trained again even where its run folder is gone, so a report of hours of training can be built
on several machines (or a machine whose disk does not last) by keeping that small file, e.g. in git.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_config
from .errors import EXIT_RESUMABLE, UserError
from .extras import pyplot
from .file_lock import FolderLock
from .runs import parent_run
from .threads import CONCURRENT_RUNS
from .tracking import _git, start_sweep_run, tracking_uri

log = logging.getLogger(__name__)

VARIANTS: dict[str, tuple[str, list[str]]] = {
    "full": ("the method as configured", []),
    "batch_partner": ("Fourier partner: another sample's augmented view, shared by both views",
                      ["augment.partner=shared_batch"]),
    "bank_partner": ("Fourier partner: each view its own raw image, from the bank of images already decoded",
                     ["augment.partner=bank"]),
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
    code: dict = field(default_factory=dict)  # code_version() of every run in the table
    overrides: list[str] = field(default_factory=list)  # the command's, under every variant's own
    trained: dict[str, dict[str, str]] = field(default_factory=dict)  # run name -> when, where, which commit

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

    def findings(self) -> list[str]:
        """Each variant against full on mAP@All, stated plainly: ahead, behind or within 2 standard deviations."""
        full = next((v for v in self.variants if v.name == "full"), None)
        if full is None or len(self.seeds) < 2:
            return []
        lines = []
        f_mean, f_std = full.stat("mAP@All")
        for v in self.variants:
            if v is full:
                continue
            mean, std = v.stat("mAP@All")
            delta, bar = f_mean - mean, 2 * max(f_std, std)
            verdict = ("full is ahead by more than 2 standard deviations" if delta > bar else
                       "full is behind by more than 2 standard deviations" if -delta > bar else
                       "within 2 standard deviations: no measurable difference")
            lines.append(f"- full vs {v.name} ({VARIANTS[v.name][0]}): mAP@All {f_mean:.2f} vs {mean:.2f}, "
                         f"Δ {delta:+.2f} against 2 × std {bar:.2f}: {verdict}.")
        return lines

    def to_json(self) -> str:
        return json.dumps({"config": self.config, "overrides": self.overrides, "seeds": self.seeds, "code": self.code,
                           "variants": [{"name": v.name, "overrides": v.overrides,
                                         "per_seed": {str(s): m for s, m in v.per_seed.items()}}
                                        for v in self.variants],
                           "trained": self.trained}, indent=1)

    def provenance(self) -> str:
        """When and where the runs finished and which commits held their code, from ``trained``."""
        days = sorted({t["finished"][:10] for t in self.trained.values()})
        machines = sorted({t["machine"] for t in self.trained.values()})
        commits = sorted({t["commit"] for t in self.trained.values()})
        return (f"every run of the table by code {self.code.get('code')} (commit{'s' * (len(commits) > 1)} "
                f"{', '.join(commits)}), finished {days[0]}{f' to {days[-1]}' if len(days) > 1 else ''} on "
                f"{'; '.join(machines)}")


def final_report(run_dir: Path, epochs: int) -> dict[str, float]:
    path = run_dir / "eval" / f"epoch_{epochs:04d}" / "retrieval.json"
    if not path.is_file():
        raise RuntimeError(f"{run_dir}: no evaluation of the last epoch at {path}")
    return json.loads(path.read_text())["mean"]


STAMP = "ablation_code.json"


def report_assets(report: Path, config: str) -> tuple[Path, Path]:
    """Where a report keeps a config's per-seed figures (also the record of its finished runs) and chart."""
    assets = report.parent / "results" / f"ablation_{Path(config).stem}"
    return assets.with_suffix(".json"), assets.with_suffix(".png")


RunKey = tuple[str, int]  # (variant, seed)


@dataclass
class FinishedRun:
    metrics: dict[str, float]  # mean over the unseen pairs, last epoch
    trained: dict[str, str]  # finished (UTC time), machine (with --jobs), commit


def machine_description() -> str:
    import torch

    return (f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}, "
            + (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"))


def read_record(record: Path, config: str, overrides: list[str], current: dict) -> dict[RunKey, FinishedRun]:
    """The finished runs ``record`` holds for this code, config and overrides. A record of other code or
    another command holds none of this one's (said in the log); it is rewritten as this one's runs finish."""
    if not record.is_file():
        return {}

    def unreadable(exc: Exception) -> UserError:
        return UserError(f"{record}: not a record of finished runs ({exc!r}); move it away to start a new one")

    try:
        data = json.loads(record.read_text())
        origin = (data["code"]["code"], data["config"], data.get("overrides", []))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise unreadable(exc) from None
    if origin != (current["code"], config, overrides):
        log.warning("%s records code %s, %s %s; this is code %s, %s %s: none of its runs is reused", record,
                    origin[0], origin[1], origin[2], current["code"], config, overrides)
        return {}
    try:
        runs = {(v["name"], int(seed)): FinishedRun(m, data["trained"][f"{v['name']}-seed{seed}"])
                for v in data["variants"] for seed, m in v["per_seed"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise unreadable(exc) from None
    log.info("%s: %d finished runs of this code reused", record, len(runs))
    return runs


def write_record(record: Path, ablation: Ablation) -> None:
    """Replaces ``record`` in one rename, so an interruption leaves the old record or the new, never half."""
    record.parent.mkdir(parents=True, exist_ok=True)
    partial = record.with_name(record.name + ".partial")
    partial.write_text(ablation.to_json() + "\n")
    partial.replace(record)


def ablation_of(config: str, overrides: list[str], sweep: str, current: dict,
                results: dict[RunKey, FinishedRun]) -> Ablation:
    """The table of ``results``, variants in order of first appearance, seeds ascending."""
    variants: dict[str, VariantResult] = {}
    for (name, seed), run in sorted(results.items(), key=lambda item: item[0][1]):
        variants.setdefault(name, VariantResult(name, VARIANTS[name][1])).per_seed[seed] = run.metrics
    order = list(dict.fromkeys(name for name, _ in results))
    return Ablation(config, sorted({seed for _, seed in results}), [variants[n] for n in order], sweep, current,
                    overrides, {f"{name}-seed{seed}": run.trained for (name, seed), run in results.items()})


def code_fingerprint(root: Path = Path(__file__).parent) -> str:
    """A hash of the package's source and shipped configs: what decides a run's numbers (docs do not).

    A config counts by its parsed content, so a comment that names a result (the shipped configs
    say what was measured with them) does not turn that result into another code's."""
    import yaml

    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts):
        content = (json.dumps(yaml.safe_load(path.read_text()), sort_keys=True).encode() if path.suffix == ".yaml"
                   else path.read_bytes())
        digest.update(str(path.relative_to(root)).encode() + b"\0" + content + b"\0")
    return digest.hexdigest()[:16]


def code_version() -> dict[str, str | bool | None]:
    return {"code": code_fingerprint(), "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "."))}


def check_stamps(run_dirs: list[Path], current: dict) -> None:
    """Refuses, before any training, a run folder that other code (or no stamp) started: its numbers
    would sit in one table with this code's."""
    for run_dir in run_dirs:
        if not run_dir.exists():
            continue
        stamp = run_dir / STAMP
        theirs = json.loads(stamp.read_text()) if stamp.is_file() else None
        if theirs is None or theirs["code"] != current["code"]:
            what = (f"code {theirs['code']} (commit {theirs['commit']}{', modified' if theirs['dirty'] else ''})"
                    if theirs else "code this ablation did not record")
            raise UserError(f"{run_dir} was trained by {what}; this is code {current['code']} (commit "
                            f"{current['commit']}): move it away (or choose another --out) to train it again, so that "
                            "every row of the table comes from the same code")


def train_stamped(config: str, args: list[str], run_dir: Path, current: dict, concurrent: int = 1) -> None:
    """`dgucdir train CONFIG ARGS --resume` in its own process, its folder stamped with the code first
    (a finished run returns at once; an interrupted one resumes).

    With ``concurrent`` > 1 other runs share the machine: the run's thread budget takes its share of the
    cores, and its output goes to RUN_DIR/train.log instead of interleaving with theirs on the terminal."""
    if not (run_dir / STAMP).is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / STAMP).write_text(json.dumps(current, indent=1) + "\n")
    command = [sys.executable, "-m", "dgucdir", "train", config, *args, "--resume"]
    if concurrent == 1:
        status, where = CHILDREN.run(command), "above"
    else:
        log_file = run_dir / "train.log"
        with open(log_file, "a") as output:
            status = CHILDREN.run(command, stdout=output, stderr=subprocess.STDOUT,
                                  env={**os.environ, CONCURRENT_RUNS: str(concurrent)})
        where = f"in {log_file}"
    if status == EXIT_RESUMABLE:
        raise StoppedRun(f"{run_dir}: stopped with a checkpoint; run the same command again to go on")
    if status != 0:
        raise RuntimeError(f"{run_dir}: training failed (exit status {status}); its output is {where}")


class StoppedRun(UserError):
    """A training stopped by a signal, resumable: the ablation stops too, and resumes when run again."""

    exit_code = EXIT_RESUMABLE


class Children:
    """The trainings an ablation runs, so that a stop signal reaches them: SIGTERM, SIGINT or SIGUSR1 to
    `dgucdir ablate` is passed on to every running training (each checkpoints and exits 75) and no new
    one starts."""

    def __init__(self) -> None:
        self.running: set[subprocess.Popen] = set()
        self.lock = threading.Lock()
        self.stopping = threading.Event()

    def run(self, command: list[str], **kw) -> int:
        with self.lock:
            if self.stopping.is_set():
                return EXIT_RESUMABLE
            proc = subprocess.Popen(command, **kw)
            self.running.add(proc)
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.running.discard(proc)

    def forward(self, signum: int, frame: object) -> None:
        self.stopping.set()
        with self.lock:
            for proc in self.running:
                proc.send_signal(signum)
        log.warning("received %s: passed on to %d running training(s); no new one starts",
                    signal.Signals(signum).name, len(self.running))

    @contextlib.contextmanager
    def forwarding_signals(self) -> Iterator[None]:
        """Installs :meth:`forward` for the stop signals (main thread only), restoring the old handlers after."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
        before = {s: signal.signal(s, self.forward) for s in stops}
        self.stopping.clear()
        try:
            yield
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


CHILDREN = Children()


def train_all(config: str, jobs: list[tuple[Path, list[str]]], current: dict, concurrent: int = 1,
              finished: Callable[[Path], None] = lambda run_dir: None) -> None:
    """Trains every ``(run_dir, args)`` with `train_stamped`, ``concurrent`` at a time, in list order,
    calling ``finished(run_dir)`` as each one ends well.

    On a machine whose cores one small run cannot keep busy (the demo on a 2-core VM trained at 216
    samples/s alone, 126 + 133 as two runs with one core each), several at once finish a grid sooner.
    The first failure starts nothing new; the runs already going finish (they resume anyway) and the
    failure is raised. A stop signal is passed on to the running trainings (:class:`Children`)."""
    if concurrent < 1:
        raise ConfigError(f"--jobs {concurrent}: expected at least 1")

    def train(position: int, run_dir: Path, args: list[str]) -> None:
        log.info("run %d of %d: %s%s", position, len(jobs), run_dir,
                 f" (output in {run_dir / 'train.log'})" if concurrent > 1 else "")
        train_stamped(config, args, run_dir, current, concurrent)
        finished(run_dir)

    with CHILDREN.forwarding_signals():
        _train_all(jobs, concurrent, train)


def _train_all(jobs: list[tuple[Path, list[str]]], concurrent: int, train: Callable[[int, Path, list[str]], object]
               ) -> None:
    """``train(position, run_dir, args)`` for every job, ``concurrent`` at a time in list order; after the first
    failure no job starts (the ones running finish) and the failure is raised."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    queue = iter(enumerate(jobs, 1))
    running: set = set()
    failure: BaseException | None = None
    with ThreadPoolExecutor(max_workers=concurrent) as pool:
        def fill() -> None:
            while failure is None and len(running) < concurrent and not CHILDREN.stopping.is_set():
                job = next(queue, None)
                if job is None:
                    return
                position, (run_dir, args) = job
                running.add(pool.submit(train, position, run_dir, args))

        fill()
        while running:
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            running.difference_update(done)
            for future in done:
                if failure is None and future.exception() is not None:
                    failure = future.exception()
            fill()
    if failure is not None:
        raise failure
    if CHILDREN.stopping.is_set():
        raise StoppedRun("stopped by a signal before every run finished; run the same command again to go on")


def run_ablation(config: str, overrides: list[str], variants: list[str], seeds: list[int], out: Path,
                 concurrent: int = 1, record: Path | None = None) -> Ablation:
    """Trains every (variant, seed) that has not finished yet, ``concurrent`` at a time; returns the table.

    With a ``record`` (see the module's docstring) the runs it holds for this code are taken as finished,
    and it is rewritten with each run that finishes, keeping the runs of other variants and seeds it holds.
    The ablation owns ``out`` while it runs: a second one into it is refused."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    owner = FolderLock(out, "dgucdir ablate").acquire()
    try:
        return _run_ablation(config, overrides, variants, seeds, out, concurrent, record)
    finally:
        owner.release()


def _run_ablation(config: str, overrides: list[str], variants: list[str], seeds: list[int], out: Path,
                  concurrent: int, record: Path | None) -> Ablation:
    pyplot("the ablation chart")  # before hours of training, not after
    current = code_version()
    check_stamps([out / f"{name}-seed{seed}" for name in variants for seed in seeds], current)
    sweep = f"ablate-{out.resolve().name}"  # `dgucdir runs --sweep` shows the same table from MLflow
    base = load_config(config, overrides)
    uri = tracking_uri(base)
    jobs = [[*VARIANTS[name][1], f"train.seed={seed}"] for name in variants for seed in seeds]
    parent = parent_run(uri, sweep) or start_sweep_run(base, uri, sweep, jobs)  # a rerun adds to the same one
    recorded = read_record(record, config, overrides, current) if record else {}
    runs: dict[RunKey, tuple[Path, list[str], int]] = {}  # run folder, its args and its last epoch
    for name in variants:
        for seed in seeds:
            run_dir = out / f"{name}-seed{seed}"
            args = [*overrides, *VARIANTS[name][1], f"train.seed={seed}", f"train.output_dir={run_dir}",
                    f"tracking.group={name}", f"tracking.sweep={sweep}", f"tracking.run_name={name}-seed{seed}",
                    f"tracking.parent_run_id={parent}"]
            runs[name, seed] = run_dir, args, load_config(config, args).train.epochs  # a bad override fails here
    results = dict(recorded)
    key_of = {run_dir: key for key, (run_dir, _, _) in runs.items()}
    lock = threading.Lock()  # runs finish in --jobs threads

    machine = f"{machine_description()}, --jobs {concurrent}"

    def finished(run_dir: Path) -> None:
        key = key_of[run_dir]
        trained = {"finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
                   "commit": str(current["commit"]) + (" (modified)" if current["dirty"] else "")}
        with lock:
            results[key] = FinishedRun(final_report(run_dir, runs[key][2]), trained)
            if record:
                write_record(record, ablation_of(config, overrides, sweep, current, results))

    train_all(config, [(run_dir, args) for key, (run_dir, args, _) in runs.items() if key not in recorded],
              current, concurrent, finished)
    ablation = ablation_of(config, overrides, sweep, current, {key: results[key] for key in runs})
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


def write_report(report: Path, ablation: Ablation, out: Path, command: str) -> None:
    """Writes (or replaces) this config's section of ``report``: the command, date, machine and code, the
    table, what it shows, the chart (copied next to the report) and a link to the per-seed record."""
    import shutil

    name = Path(ablation.config).stem
    record, chart = report_assets(report, ablation.config)
    if not record.is_file():  # run_ablation keeps it, given the record
        write_record(record, ablation)
    shutil.copyfile(out / "ablation.png", chart)
    findings = ablation.findings() or ["- (one seed or no `full` row: nothing to compare)"]
    begin, end = f"<!-- ablation {name} -->", f"<!-- end ablation {name} -->"
    section = "\n".join([
        begin, f"## {ablation.config}", "", "```bash", command, "```", "",
        f"Measured: {ablation.provenance()}.", "",
        ablation.markdown(), "What it shows (mean mAP@All over the unseen pairs; 2 × the larger std as the bar):", "",
        *findings, "", f"![ablation of {ablation.config}](results/ablation_{name}.png)", "",
        f"Per-seed figures, also the record of finished runs a rerun continues from: "
        f"[results/ablation_{name}.json](results/ablation_{name}.json).", end])
    text = report.read_text() if report.is_file() else (
        "# Results\n\nGenerated by `make results` (`dgucdir ablate … --report docs/RESULTS.md` per set); "
        "do not edit by hand.\n\n")
    if begin in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    report.write_text(text)

