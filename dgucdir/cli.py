"""The `dgucdir` command: config, pack, demo-data, demo, train, eval, search, bench, submit.

Each command parses its arguments, calls one library function and prints what it returns;
the work itself lives in the library so that it can be imported and tested without a shell.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from .config import ConfigError, load_config, to_yaml
from .errors import UserError

log = logging.getLogger("dgucdir")

EPILOG = """examples:
  dgucdir demo                                   # build the digits demo, train, evaluate (CPU, minutes)
  dgucdir pack --tree PACS/ --out data/pacs      # root/<domain>/<class>/<image> -> shards
  dgucdir train configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar train.epochs=5
  dgucdir train configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar data.train_domains=[photo,art_painting] data.eval_domains=[cartoon,sketch]
  accelerate launch --config_file launch/accelerate/1node_8gpu.yaml -m dgucdir train configs/pacs.yaml model.moco_init=moco_v2_800ep_pretrain.pth.tar
  dgucdir eval runs/pacs/checkpoints/ckpt-000001000 --domains cartoon sketch
  dgucdir search runs/demo/checkpoints/ckpt-000000900 --gallery sketch --query my_digit.png
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 data.train_domains=[a,b]")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected 1 or more, got {value}")
    return value


def _add_jobs_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=_positive, default=1, metavar="N",
                   help="trainings run at once on this machine (default 1), each with 1/N of the cores and its "
                   "output in RUN/train.log: on a CPU one small run leaves cores idle between steps")


def cmd_config(args: argparse.Namespace) -> int:
    if args.schema:
        from .config import schema

        for key, type_name, default, text in schema():
            print(f"{key}  ({type_name}; default {default!r})\n    {text}")
        return 0
    if args.config is None:
        raise ConfigError("give a config file (or --schema)")
    sys.stdout.write(to_yaml(load_config(args.config, args.overrides)))
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    from .data.pack import PackError, pack, read_list, read_tree

    if bool(args.tree) == bool(args.list):
        raise PackError("give either --tree ROOT or one or more --list DOMAIN=FILE (with --root)")
    classes = args.classes.split(",") if args.classes else None
    if args.tree:
        domains, tree_classes = read_tree(Path(args.tree))
        classes = classes or tree_classes
    else:
        domains = {}
        for spec in args.list:
            if "=" not in spec:
                raise PackError(f"--list {spec!r}: expected DOMAIN=FILE")
            name, path = spec.split("=", 1)
            domains[name] = read_list(name, Path(path), Path(args.root or Path(path).parent), args.label_offset)
    result = pack(domains, Path(args.out), classes, args.label_offset, args.shard_mb, args.workers, args.max_pixels,
                  args.strict)
    for path, reason in result.skipped:
        log.warning("skipped %s: %s", path, reason)
    counts = ", ".join(f"{d}: {n}" for d, n in result.counts.items())
    print(f"packed {sum(result.counts.values())} images ({counts}) in {result.seconds:.1f} s "
          f"= {result.images_per_second:.0f} images/s; skipped {len(result.skipped)}; manifest: {result.manifest_path}")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo import DEMO_SETS, build_demo_data

    print(build_demo_data(Path(args.out or DEMO_SETS[args.set].manifest.parent.parent), force=True, kind=args.set))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .demo import ensure_demo_data
    from .errors import EXIT_RESUMABLE
    from .train import Trainer

    cfg = load_config(args.config, args.overrides)
    ensure_demo_data(cfg, launched_world_size())
    trainer = Trainer(cfg, resume=args.from_checkpoint or ("latest" if args.resume else None), overwrite=args.overwrite)
    finished = trainer.fit()
    return EXIT_RESUMABLE if not finished and trainer.stop.requested else 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(load_config(args.config, [f"train.output_dir={args.out}", *args.overrides]))
    if result is not None:
        print(result.markdown())
    return 0


def _eval_sources(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """(checkpoint, overrides): `eval --init random --config c.yaml key=value` puts key=value first."""
    if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
        return None, checked_overrides([args.checkpoint, *args.overrides])
    return args.checkpoint, checked_overrides(args.overrides)


def checked_overrides(words: list[str]) -> list[str]:
    """The words after a checkpoint, each a ``key=value`` override: a second checkpoint or a stray
    word is an error naming it, never silently dropped (keys are checked when the config is built)."""
    for word in words:
        if "=" not in word:
            if Path(word).exists():
                raise ConfigError(f"{word!r}: a second checkpoint or file; give one checkpoint per command")
            raise ConfigError(f"{word!r}: not an override; expected dotted.key=value (see `dgucdir config --schema`)")
    return words


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data.manifest import Manifest
    from .data.spec import PipelineSpec
    from .threads import ThreadBudget
    from .model.loading import baseline_encoder, encoder_from_checkpoint
    from .retrieval import evaluate
    from .train import setup_logging

    setup_logging(0)
    checkpoint, overrides = _eval_sources(args)
    if checkpoint and args.init:
        raise ConfigError("give a checkpoint or --init, not both")
    if checkpoint:
        encoder, cfg = encoder_from_checkpoint(Path(checkpoint), args.config, overrides)
    elif args.init and args.config:
        cfg = load_config(args.config, overrides)
        encoder = baseline_encoder(cfg, args.init[0], args.init[1] if len(args.init) > 1 else None)
    else:
        raise ConfigError("evaluate a checkpoint, or a baseline with --init random|moco-v2 PATH and --config")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    manifest = Manifest.load(args.manifest or cfg.data.manifest)
    spec = PipelineSpec.for_device(cfg.data.image_size, ThreadBudget.for_rank().apply(1, cfg.data.num_threads), device)
    report, files = evaluate(encoder.to(device), manifest, args.domains or cfg.data.eval_domains, spec, cfg.eval,
                             device, Path(args.out), precision=cfg.train.mixed_precision or "no")
    print(report.markdown())
    print(f"saved: {', '.join(str(f) for f in files)}")
    if args.log_to_run:
        from .tracking import log_posthoc

        if not checkpoint:
            raise ConfigError("--log-to-run logs into the run that trained a checkpoint: give the checkpoint")
        run_id = log_posthoc(cfg, Path(checkpoint), report.flat_metrics(), files, Path(args.out).name)
        print(f"logged to MLflow run {run_id} (metrics posthoc/..., artifacts posthoc/{Path(args.out).name})")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import search

    results = search(Path(args.checkpoint), args.gallery, [Path(q) for q in args.query], args.top, args.manifest,
                     Path(args.out))
    for result in results:
        print(f"\nquery {result.query}: top {len(result.matches)} in {args.gallery!r}")
        print("rank  score   class  index  path")
        for m in result.matches:
            print(f"{m.rank:>4}  {m.score:6.3f}  {m.class_name:>5}  {m.index:>5}  {m.record.source}")
    print(f"\npicture: {args.out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from .ablate import report_assets, run_ablation, write_report

    record = report_assets(Path(args.report), args.config)[0] if args.report else None
    ablation = run_ablation(args.config, args.overrides, args.variants, args.seeds, Path(args.out), args.jobs, record)
    print(ablation.markdown())
    print("\n".join(ablation.findings()))
    print(f"saved: {Path(args.out) / 'ablation.md'}, {Path(args.out) / 'ablation.json'}")
    if args.report:
        write_report(Path(args.report), ablation, Path(args.out), shlex.join(["dgucdir", "ablate", *sys.argv[2:]]))
        print(f"report: {args.report}")
    return 0


def cmd_select(args: argparse.Namespace) -> int:
    from .selection import run_selection

    run_selection(args.config, args.overrides, args.grid, args.seeds, Path(args.out), args.metric, args.jobs)
    print((Path(args.out) / "selection.md").read_text())
    print(f"saved: {Path(args.out) / 'selection.md'}, {Path(args.out) / 'selection.json'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .model.loading import encoder_from_checkpoint, save_encoder

    encoder, cfg = encoder_from_checkpoint(Path(args.checkpoint))
    print(f"exported {save_encoder(encoder, cfg, Path(args.out), args.layout)} ({args.layout} layout)")
    return 0


def cmd_track_resend(args: argparse.Namespace) -> int:
    from .metrics_log import resend

    run_id, sent = resend(Path(args.run_dir), args.uri)
    print(f"run {run_id}: sent {sent} metric value(s) the store was missing")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from .config import Config
    from .runs import report
    from .tracking import tracking_uri

    defaults = Config()
    defaults.tracking.store = args.store
    uri = args.uri or tracking_uri(defaults)
    table = report(uri, args.metric, args.experiment, args.sweep, Path(args.png) if args.png else None)
    print(table.to_json() if args.json else table.markdown())
    if args.png:
        print(f"picture: {args.png}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from .bench import run_bench

    if args.what == "train":
        from . import dist
        from .bench_train import bench_train
        from .demo import ensure_demo_data

        ensure_demo_data(load_config(args.config, args.overrides), launched_world_size())
        result = bench_train(args.config, args.overrides, args.steps, args.warmup)
        if dist.rank() == 0:
            print(json.dumps({"bench": "train", **result}, indent=1))
        return 0
    if args.what == "comm":
        from . import dist
        from .bench_comm import bench_comm
        from .demo import ensure_demo_data

        ensure_demo_data(load_config(args.config, args.overrides), launched_world_size())
        result = bench_comm(args.config, args.overrides, args.steps)
        if dist.rank() == 0:
            print(json.dumps({"bench": "comm", **result}, indent=1))
        return 0
    if args.what == "bn":
        import torch

        from .bench_bn import compare_batchnorm

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if args.precision == "bf16" else None
        print(json.dumps({"bench": "bn", **compare_batchnorm(device, args.arch, args.image_size, args.batch_size,
                                                             args.steps, dtype)}, indent=1))
        return 0
    if args.what == "photos":
        from .bench import write_bench_photos

        print(json.dumps({"bench": "photos", "manifest": str(write_bench_photos(Path(args.out), args.count))}))
        return 0
    result = run_bench(args.what, args.manifest, args.image_size, args.batch_size, args.steps, args.sizes,
                       args.naive_max)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun (bench eval sharded by query): once
        print(json.dumps(result, indent=1))
    return 0


def launched_world_size() -> int:
    """The number of processes the launcher started (before any process group exists)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgucdir",
        description="Domain-generalized unsupervised cross-domain image retrieval (DG-UCDIR, ICCV 2023): "
        "pack datasets into shards, train with accelerate on one or many GPUs (or the CPU), "
        "evaluate retrieval between unseen domains, search a gallery.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("config", help="print the resolved config (after overrides and validation), or --schema")
    p.add_argument("config", nargs="?", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 data.train_domains=[a,b]")
    p.add_argument("--schema", action="store_true", help="list every key with its type, default and one line of help")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("pack", help="image lists or folder trees -> webdataset shards + DALI index + manifest",
                       description="Validate every image (decode it), write per-domain webdataset shards with DALI "
                       "index files and manifest.json. Damaged images are skipped and listed in skipped.tsv.")
    p.add_argument("--tree", help="folder tree root/<domain>/<class>/<image>")
    p.add_argument("--list", action="append", default=[], metavar="DOMAIN=FILE",
                   help="image list with lines 'relative/path label' (repeat per domain)")
    p.add_argument("--root", help="folder the list paths are relative to (default: the list's folder)")
    p.add_argument("--label-offset", type=int, default=0, help="subtracted from list labels: 1 for PACS, 0 for DomainNet")
    p.add_argument("--classes", help="comma-separated class names (default: folder names)")
    p.add_argument("--out", required=True, help="output folder (manifest.json goes here)")
    p.add_argument("--shard-mb", type=float, default=256.0, help="target shard size in MB (default 256)")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger images are skipped as decompression bombs "
                   "(default 40 MP, the limit `search` applies to its queries)")
    p.add_argument("--strict", action="store_true", help="fail (and pack nothing) if any image would be skipped")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("demo-data", help="render a demo dataset (4 domains) and pack it",
                       description="Renders one of the embedded datasets (no download) and packs it: 'digits' "
                       "(configs/demo.yaml) or 'shapes', ten geometric shapes in four material-like domains "
                       "(configs/shapes.yaml), the second check of the ablations.")
    p.add_argument("out", nargs="?", help="output folder (default: where the set's config expects it, "
                   "data/demo or data/shapes)")
    p.add_argument("--set", choices=["digits", "shapes"], default="digits", help="which dataset (default digits)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("demo", help="the main job: demo data, train on two domains, evaluate on the two unseen ones",
                       description="Builds the demo dataset if needed, trains configs/demo.yaml (resuming if a "
                       "checkpoint exists), evaluates retrieval on the unseen domains and prints the table next "
                       "to the same encoder with random weights.")
    p.add_argument("--config", default="configs/demo.yaml")
    p.add_argument("--out", default="runs/demo", help="output folder (checkpoints, eval tables, MLflow store)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train (one process, or under accelerate launch / SLURM)",
                       description="Trains the config. For configs/demo.yaml, a single process first renders "
                       "the demo data when data/demo is missing or was rendered by an older version. "
                       "Exit codes: 0 trained to the end (or to train.max_steps), 2 a config/data/checkpoint "
                       "error, 75 resumable: stopped by SIGTERM/SIGUSR1 after writing a checkpoint, or a checkpoint "
                       "that did not fit on the disk (the previous one is intact; run again with --resume).")
    _add_config_args(p)
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true",
                       help="continue from the latest checkpoint in train.output_dir (a fresh start if there is none)")
    start.add_argument("--from", dest="from_checkpoint", metavar="CKPT", help="continue from this checkpoint folder")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a train.output_dir that has checkpoints (deletes them)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate cross-domain retrieval of a checkpoint or a baseline")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (ckpt-*), its state.pt, or an encoder exported "
                   "by `dgucdir export` (.safetensors, with its config)")
    p.add_argument("--init", nargs="+", metavar=("random|moco-v2", "PATH"),
                   help="evaluate a baseline instead of a checkpoint: 'random' or 'moco-v2 PATH'")
    p.add_argument("--config", help="config (default: the one saved in the checkpoint)")
    p.add_argument("--manifest", help="packed dataset to evaluate on (default: the config's)")
    p.add_argument("--domains", nargs="+", help="domains to retrieve between (default: the config's eval domains)")
    p.add_argument("--out", default="eval_out", help="folder for tables and pictures")
    p.add_argument("--log-to-run", action="store_true",
                   help="also log the results into the MLflow run that trained the checkpoint (posthoc/...)")
    p.add_argument("overrides", nargs="*", default=[], help="dotted config overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="retrieve the closest gallery images for query images")
    p.add_argument("checkpoint", help="checkpoint folder (ckpt-*) or an exported encoder (.safetensors)")
    p.add_argument("--gallery", required=True, help="domain to search in")
    p.add_argument("--query", nargs="+", required=True, help="query image file(s)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--manifest", help="packed dataset (default: the checkpoint config's)")
    p.add_argument("--out", default="search.png", help="picture of the results")
    p.set_defaults(func=cmd_search)

    from .ablate import STANDARD, VARIANTS

    p = sub.add_parser("ablate", help="train the method and its ablations over seeds; table on unseen domains",
                       description="Trains each variant (the config plus a few overrides) for each seed with "
                       "`dgucdir train` in its own folder under --out (finished ones are reused and interrupted "
                       "ones resume, if the same code trained them; other code's runs are refused) and tabulates "
                       "mean P@1 and mAP@All over the unseen domain pairs.\n\nvariants:\n"
                       + "\n".join(f"  {k:14} {d}" for k, (d, _) in VARIANTS.items()),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--variants", nargs="+", default=list(STANDARD), metavar="NAME",
                   help=f"which variants (default: the standard ablations, {' '.join(STANDARD)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.seed values (default: 0 1 2)")
    p.add_argument("--out", default="runs/ablate", help="folder of the variants' runs and the table")
    p.add_argument("--report", metavar="FILE", help="also write this config's section of a results file "
                   "(e.g. docs/RESULTS.md): command, date, machine, commit, table, findings, chart; its per-seed "
                   "file (FILE's folder/results/ablation_CONFIG.json) records each run as it finishes, and runs "
                   "it records for this code are not trained again, even where --out is gone")
    _add_jobs_arg(p)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("select", help="choose a setting from a grid by retrieval between the training domains",
                       description="Trains every point of the grid for every seed (as `dgucdir ablate` does: own "
                       "folders, finished runs reused, other code's runs refused), scores each last checkpoint by "
                       "retrieval between the *training* domains with their labels, and chooses the best mean "
                       "score (ties: the earlier point). The unseen domains are never looked at: measure the "
                       "chosen setting on them with `dgucdir ablate`.")
    _add_config_args(p)
    p.add_argument("--grid", action="append", required=True, metavar="KEY=V1;V2",
                   help="one axis of the grid, values separated by ';' (repeat for more axes: every combination)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="train.seed values (default: 0)")
    p.add_argument("--metric", default="mAP@All", help="the score, from the retrieval report (default: mAP@All)")
    p.add_argument("--out", default="runs/select", help="folder of the grid's runs and the selection")
    _add_jobs_arg(p)
    p.set_defaults(func=cmd_select)

    p = sub.add_parser("export", help="the trained encoder of a checkpoint as safetensors (weights + config)")
    p.add_argument("checkpoint", help="checkpoint folder (ckpt-*) or its state.pt")
    p.add_argument("--out", required=True, help="output file, e.g. encoder.safetensors")
    p.add_argument("--layout", default="dgucdir", choices=["dgucdir", "moco_v2"],
                   help="tensor names: dgucdir's Encoder (default) or MoCo v2's module.encoder_q.* backbone keys")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("track-resend", help="send MLflow the metrics a run folder holds and its store missed",
                       description="Every metric a run logs is first written to RUN_DIR/metrics.jsonl; when the "
                       "MLflow store failed during training (full, locked, unreachable), this sends the run "
                       "every (metric, step) value the store lacks.")
    p.add_argument("run_dir", help="the run's train.output_dir (holds metrics.jsonl and tracking.json)")
    p.add_argument("--uri", help="the store to send to (default: the one the run used, from tracking.json)")
    p.set_defaults(func=cmd_track_resend)

    p = sub.add_parser("runs", help="results table over runs/seeds from MLflow (one row per training split)",
                       description="Reads the MLflow store with MLflow's search API and prints one row per training "
                       "split and one column per ordered pair of unseen domains plus the mean, as mean ± std over "
                       "the split's runs (seeds). For a sweep, the table and picture also go to its parent run.")
    p.add_argument("--sweep", help="only the runs of this sweep id (printed by dgucdir submit)")
    p.add_argument("--experiment", help="only the runs of this MLflow experiment")
    p.add_argument("--metric", default="P@1", help="P@K (K from eval.topk), mAP@All or mAP@K (default P@1)")
    p.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the SQLite store in --store)")
    p.add_argument("--store", default="runs", help="folder of the default SQLite store (default: runs)")
    p.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    p.add_argument("--png", help="also draw the metric over training per run and the final bars to this PNG")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("bench", help="throughput and memory figures as JSON",
                       description="aug, loader, eval: the project's path next to a naive one written as the original "
                       "works. train: samples/s, data-wait fraction and MFU of real training steps in the world it "
                       "is launched in, e.g. `torchrun --nproc_per_node 2 -m dgucdir bench train`. bn: GlobalBatchNorm2d "
                       "(one-rank group) against BatchNorm2d on --arch: differences, time, memory kept for backward. "
                       "eval under torchrun: sharded by query, each rank's time. comm (under torchrun): every "
                       "collective of a training step counted, and projected to 8/64/512 GPUs. table: a sample table of --sizes rows "
                       "opened memory-mapped: seconds and resident memory. photos: writes and packs photo-sized JPEGs (four domains) for the loader and train "
                       "benchmarks at 224 px.")
    p.add_argument("what", choices=["aug", "loader", "eval", "train", "comm", "bn", "table", "photos"])
    p.add_argument("--arch", default="resnet50", help="bn: the backbone (default resnet50)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bn: autocast dtype (default fp32)")
    p.add_argument("--config", default="configs/demo.yaml", help="train: the config to train (default: the demo)")
    p.add_argument("overrides", nargs="*", default=[], help="train: dotted config overrides")
    p.add_argument("--warmup", type=int, default=3, help="train: untimed steps first")
    p.add_argument("--manifest", default="data/demo/shards/manifest.json")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="+", default=[4000], help="eval: numbers of queries (= gallery size); "
                   "table: the rows of the synthetic sample table (the first size)")
    p.add_argument("--naive-max", type=int, default=4000, help="eval: run the naive implementation up to this size")
    p.add_argument("--out", default="data/bench_photos", help="photos: the folder to write (default: data/bench_photos)")
    p.add_argument("--count", type=int, default=1000, help="photos: images per domain (default: 1000)")
    p.set_defaults(func=cmd_bench)

    sub.add_parser("submit", help="submit training to SLURM via submitit (see `dgucdir submit --help`)", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["submit"]:  # the launcher parses its own arguments (and --help)
        from .submit import main as submit_main

        return submit_main(argv[1:])
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except UserError as exc:  # anything else is a bug or the environment: keep its traceback
        print(f"dgucdir {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
