"""Submit dgucdir training to SLURM through submitit (`dgucdir submit`, `python -m launch.slurm`).

One task per GPU (nodes x gpus_per_node tasks). Each task exports the torch.distributed
environment from submitit's JobEnvironment (MASTER_ADDR = the job's first host, MASTER_PORT
derived from the job id, RANK, LOCAL_RANK, WORLD_SIZE) and runs the same Trainer as
`dgucdir train` - there is no second training loop. accelerate picks the environment up.

Preemption and time limits:
- `scontrol requeue` / preemption sends SIGTERM: the Trainer finishes its step, writes a
  checkpoint and exits 0; SLURM starts the job again, which resumes from that checkpoint and
  continues the same MLflow run.
- Before the time limit SLURM sends USR2 (submitit's signal): every rank stops at the same step
  boundary and checkpoints; then rank 0 hands over to submitit, which calls `checkpoint()`
  (a DelayedSubmission of the same job) and requeues it.

Examples:
  python -m launch.slurm configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar --nodes 2 --gpus-per-node 8 --partition gpu --time 1440
  python -m launch.slurm configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar --dry-run --nodes 2 --gpus-per-node 8
  python -m launch.slurm configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar --domain-pairs --sweep "train.seed=0;1;2"
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import logging
import os
import shlex
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

import submitit

from dgucdir.config import Config, ConfigError, load_config, resolve_config_path
from dgucdir.runtime import check_before_launch
from dgucdir.tracking import start_sweep_run, tracking_uri

log = logging.getLogger("dgucdir.launch")


class TrainJob:
    """The picklable job submitit runs on every task."""

    def __init__(self, config: str, overrides: Sequence[str]) -> None:
        self.config = str(resolve_config_path(config).resolve())  # the nodes may start elsewhere
        self.overrides = list(overrides)

    def __call__(self) -> dict:
        from dgucdir.train import Trainer

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        os.environ.setdefault("LOCAL_WORLD_SIZE", str(env.local_world_size))
        cfg = load_config(self.config, self.overrides)
        trainer = Trainer(cfg, resume="latest")
        requeue_handler = signal.getsignal(signal.SIGUSR2)  # submitit's: checkpoint() + requeue
        usr2 = {"received": False}

        def on_usr2(signum: int, frame: object) -> None:
            usr2["received"] = True
            trainer.stop.requested = True

        trainer.stop.install()
        signal.signal(signal.SIGUSR2, on_usr2)
        finished = trainer.fit()
        if usr2["received"] and not finished and callable(requeue_handler):
            requeue_handler(signal.SIGUSR2, None)  # rank 0 requeues through checkpoint(); others return
        return {"finished": finished, "epoch": trainer.progress.epoch, "global_step": trainer.progress.global_step,
                "rank": env.rank, "world_size": env.world_size, "mlflow_run_id": trainer.tracker.run_id,
                "hostname": socket.gethostname(), "master": f"{env.master_addr} ({socket.gethostbyname(env.master_addr)})"}

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit before requeueing: the same job, which resumes from its latest checkpoint."""
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides))


def parse_sweep(spec: str) -> tuple[str, list[str]]:
    """'key=v1;v2;v3' -> (key, [v1, v2, v3]); values are YAML (lists use commas, so ';' separates)."""
    if "=" not in spec:
        raise ConfigError(f"--sweep {spec!r}: expected key=value1;value2;...")
    key, values = spec.split("=", 1)
    return key, [v for v in values.split(";") if v]


def split_overrides(cfg: Config, splits: Sequence[str] = ()) -> list[list[str]]:
    """One override set per split of training domains, evaluated on all the remaining domains.

    ``splits`` are comma-separated training domains ("photo,cartoon", from ``--split``); none means
    every pair of the config's domains (train + eval), e.g. the six PACS splits.
    """
    domains = list(cfg.data.train_domains) + list(cfg.data.eval_domains)
    chosen = [tuple(s.split(",")) for s in splits] or list(itertools.combinations(domains, 2))
    out = []
    for split in chosen:
        unknown = [d for d in split if d not in domains]
        if unknown or len(set(split)) != len(split) or len(split) >= len(domains):
            raise ConfigError(f"--split {','.join(split)}: expected distinct training domains out of "
                              f"{', '.join(domains)} (the config's train + eval domains), leaving some unseen")
        rest = [d for d in domains if d not in split]
        out.append([f"data.train_domains=[{','.join(split)}]", f"data.eval_domains=[{','.join(rest)}]"])
    return out


def slug(overrides: Sequence[str]) -> str:
    """A folder/run name for a job's own overrides: readable (last key part and value) and unique
    (a hash of the full overrides), so optim.lr=0.1 and optim.lr=1.1 never share a folder."""
    readable = "_".join(f"{o.split('=', 1)[0].split('.')[-1]}-{o.split('=', 1)[1].strip('[]')}" for o in overrides)
    readable = "".join(c if c.isalnum() or c in "-_.," else "_" for c in readable)[:80]
    return f"{readable}-{hashlib.sha1(chr(0).join(overrides).encode()).hexdigest()[:6]}"


def sweep_overrides(base: Sequence[str], sweeps: Sequence[str],
                    splits: list[list[str]] | None = None) -> list[list[str]]:
    """The cross product of all sweeps (and domain splits), each as a full override list."""
    axes = [[[f"{k}={v}"] for v in vals] for k, vals in map(parse_sweep, sweeps)]
    if splits:
        axes.append(splits)
    return [list(base) + [o for item in combo for o in item] for combo in itertools.product(*axes)]


def job_parameters(cfg: Config, args: argparse.Namespace) -> dict:
    """submitit's generic parameters (and slurm_* ones) from the config's launch section and the flags."""
    lc = cfg.launch
    tasks = args.gpus_per_node or lc.gpus_per_node
    params: dict = dict(
        name=args.job_name or lc.job_name,
        timeout_min=args.time or lc.time_min,
        nodes=args.nodes or lc.nodes,
        tasks_per_node=tasks,
        cpus_per_task=args.cpus_per_task or lc.cpus_per_task,
    )
    if not args.cpu:
        params["gpus_per_node"] = tasks
    mem_gb = args.mem_gb if args.mem_gb is not None else lc.mem_gb if lc.mem_gb is not None else lc.mem_gb_per_task * tasks
    if mem_gb:  # 0: leave the memory to the cluster's default
        params["mem_gb"] = mem_gb
    extra = dict(line.split("=", 1) for line in [*lc.sbatch, *args.sbatch])
    slurm = {"partition": args.partition or lc.partition, "account": args.account or lc.account,
             "qos": args.qos or lc.qos, "constraint": args.constraint or lc.constraint,
             "signal_delay_s": 120, "array_parallelism": args.array_parallelism,
             "setup": [*lc.setup, *args.setup] or None,
             "additional_parameters": extra or None}
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v})
    return params


def sbatch_script(params: dict, folder: Path, python: str) -> str:
    """The sbatch script submitit would submit for ``params``, made without a SLURM installation."""
    from submitit.slurm.slurm import SlurmExecutor, _make_sbatch_string

    native = {SlurmExecutor._equivalence_dict().get(k, k): v for k, v in params.items() if not k.startswith("slurm_")}
    if "mem" in native:
        native["mem"] = f"{native['mem']}GB"
    native.update({k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")})
    return _make_sbatch_string(command=f"{python} -u -m submitit.core._submit {folder}", folder=folder, **native)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dgucdir submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="YAML config; its launch: section gives the defaults below")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every job")
    p.add_argument("--nodes", type=int)
    p.add_argument("--gpus-per-node", type=int, help="= tasks per node (one task per GPU)")
    p.add_argument("--cpus-per-task", type=int)
    p.add_argument("--mem-gb", type=int, help="memory per node (default: launch.mem_gb, else launch.mem_gb_per_task "
                   "x tasks per node; 0 leaves it to the cluster)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--constraint")
    p.add_argument("--time", type=int, help="time limit in minutes")
    p.add_argument("--job-name")
    p.add_argument("--folder", help="submitit/SLURM log folder (default: launch.folder, else <train.output_dir>/slurm)")
    p.add_argument("--sbatch", "--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="an extra #SBATCH line for this cluster, e.g. --sbatch exclusive= --sbatch reservation=r1 "
                   "(repeat; launch.sbatch in the config)")
    p.add_argument("--setup", action="append", default=[], metavar="COMMAND",
                   help="a shell command run before the tasks start, e.g. 'module load cuda' (repeat; launch.setup)")
    p.add_argument("--python", help="command that runs python on the nodes, for containers, e.g. "
                   "'apptainer exec --nv img.sif python' (default: launch.python, else this python)")
    p.add_argument("--max-requeues", type=int, help="how often a job that reached its time limit is requeued "
                   "(default: launch.max_requeues, 30; requeues after preemption are SLURM's and not counted)")
    p.add_argument("--cpu", action="store_true", help="request no GPUs (CPU tasks, gloo): tests, CPU clusters")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1;V2",
                   help="one job per value (repeat for a cross product); submitted as a job array")
    p.add_argument("--domain-pairs", action="store_true",
                   help="one job per pair of training domains (of the config's train + eval domains), "
                   "evaluated on the others: e.g. all 6 PACS splits")
    p.add_argument("--split", action="append", default=[], metavar="A,B",
                   help="one job per split named (repeat): these training domains, evaluated on the config's "
                   "other domains, e.g. --split photo,art_painting --split cartoon,sketch")
    p.add_argument("--array-parallelism", type=int, help="at most this many sweep jobs at once")
    p.add_argument("--cluster", default=None, choices=["slurm", "local", "debug"],
                   help="submitit cluster (default: slurm when available)")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script(s) instead of submitting")
    return p


def precision_line(cfg: Config) -> str:
    """What a submitted job trains in: no launcher sets a precision under submit, so the config decides."""
    mixed = cfg.train.mixed_precision or "no"
    name = "fp32" if mixed == "no" else mixed
    return (f"{name} (train.mixed_precision={cfg.train.mixed_precision}), "
            f"TF32 {'on' if cfg.train.tf32 else 'off'} (train.tf32={str(cfg.train.tf32).lower()})")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        base = load_config(args.config, args.overrides)
        if args.domain_pairs and args.split:
            raise ConfigError("--domain-pairs (every pair) and --split (the splits named) exclude each other")
        splits = split_overrides(base, args.split) if args.domain_pairs or args.split else None
        runs = sweep_overrides(args.overrides, args.sweep, splits)
        own = [o[len(args.overrides):] for o in runs]  # what sets each job apart
        uri = tracking_uri(base)  # one store for the whole sweep, resolved here, wherever the jobs start
        sweep_id = f"{base.tracking.experiment}-{time.strftime('%Y%m%d-%H%M%S')}" if len(runs) > 1 else None
        if sweep_id:  # each job its own output folder (checkpoints!) and MLflow run name
            runs = [o + [f"train.output_dir={base.train.output_dir}/{slug(mine)}", f"tracking.run_name={slug(mine)}",
                         f"tracking.sweep={sweep_id}"] for o, mine in zip(runs, own)]
        runs = [[*o, f"tracking.uri={uri}"] for o in runs]
        cfgs = [load_config(args.config, o) for o in runs]  # validate every job before submitting any
        world = (args.nodes or cfgs[0].launch.nodes) * (args.gpus_per_node or cfgs[0].launch.gpus_per_node)
        for cfg in cfgs:
            check_before_launch(cfg, world, weights_must_exist=not args.dry_run)
    except ConfigError as exc:
        print(f"dgucdir submit: error: {exc}", file=sys.stderr)
        return 2
    params = job_parameters(cfgs[0], args)
    python = args.python or cfgs[0].launch.python or shlex.quote(sys.executable)
    max_requeues = args.max_requeues if args.max_requeues is not None else cfgs[0].launch.max_requeues
    folder = Path(args.folder or cfgs[0].launch.folder or Path(base.train.output_dir) / "slurm").resolve() / "%j"
    if args.dry_run:
        print(sbatch_script(params, folder, python))
        for overrides, cfg in zip(runs, cfgs):
            print(f"# job: dgucdir train {args.config} {' '.join(overrides)}")
            print(f"# precision: {precision_line(cfg)}")
        return 0
    if sweep_id:
        parent = start_sweep_run(base, uri, sweep_id, own)
        runs = [[*o, f"tracking.parent_run_id={parent}"] for o in runs]
    # submitit's default of 3 time-outs would end the requeueing of a long run
    executor = submitit.AutoExecutor(folder=folder, cluster=args.cluster, slurm_max_num_timeout=max_requeues,
                                     slurm_python=python)
    executor.update_parameters(**params)
    jobs_args = [TrainJob(args.config, o) for o in runs]
    if len(jobs_args) > 1:
        jobs = executor.submit_array(jobs_args) if executor.cluster == "slurm" else [executor.submit(j) for j in jobs_args]
    else:
        jobs = [executor.submit(jobs_args[0])]
    for job, mine in zip(jobs, own):
        print(f"submitted job {job.job_id}: {' '.join(mine or args.overrides) or '(no overrides)'}")
    how = f"dgucdir runs --sweep {sweep_id}" if sweep_id else f"dgucdir runs --experiment {base.tracking.experiment}"
    print(f"compare them: {how}   (MLflow store {uri})")
    if args.wait:
        for job in jobs:
            print(f"job {job.job_id}: {job.results()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
