"""The `dgucdir` command: config, pack, demo-data, demo, train, eval, search, bench, submit."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .config import Config, ConfigError, flatten, load_config, to_yaml

log = logging.getLogger("dgucdir")

EPILOG = """examples:
  dgucdir demo                                   # build the digits demo, train, evaluate (CPU, minutes)
  dgucdir pack --tree PACS/ --out data/pacs      # root/<domain>/<class>/<image> -> shards
  dgucdir train configs/pacs.yaml train.epochs=5 data.train_domains=[photo,sketch]
  accelerate launch --multi_gpu --num_processes 8 -m dgucdir train configs/pacs.yaml
  dgucdir eval runs/pacs/checkpoints/ckpt-000001000 --domains cartoon sketch
  dgucdir search runs/demo/checkpoints/ckpt-000000900 --gallery sketch --query my_digit.png
"""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 data.train_domains=[a,b]")


def cmd_config(args: argparse.Namespace) -> int:
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


DEMO_MANIFEST = Path("data/demo/shards/manifest.json")  # where configs/demo.yaml expects the demo


def build_demo_data(out: Path, force: bool = False) -> Path:
    """Renders and packs the demo dataset unless this renderer's version is already there.

    Returns the manifest path. The version file is written last, so an interrupted build is
    rebuilt rather than trusted.
    """
    from .data.demo import (
        RENDER_VERSION,
        VERSION_FILE,
        mark_render_version,
        read_render_version,
        write_demo_images,
    )
    from .data.pack import pack, read_list

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


def set_aside_stale_run(cfg: Config, out: Path) -> None:
    """Moves a demo run that was trained with other settings or other demo data out of the way.

    `dgucdir demo` resumes an interrupted run; resuming one that was started with different
    settings would silently mix them. Nothing is deleted: the old run is renamed.
    """
    from .data.demo import RENDER_VERSION, read_render_version

    saved = out / "config.yaml"
    if not saved.is_file():
        return
    try:
        theirs = flatten(load_config(saved))
        mine = flatten(cfg)
        changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    except ConfigError:
        changed = ["a config this version no longer reads"]
    their_data = read_render_version(out)
    if their_data != RENDER_VERSION:
        changed.append(f"demo data version {their_data} -> {RENDER_VERSION}")
    if not changed:
        return
    stale = out.with_name(f"{out.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    out.rename(stale)
    log.warning("%s was trained with other settings (%s): moved it to %s and starting over", out,
                "; ".join(changed), stale)


def cmd_demo_data(args: argparse.Namespace) -> int:
    print(build_demo_data(Path(args.out), force=True))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from .train import Trainer

    cfg = load_config(args.config, args.overrides)
    if Path(cfg.data.manifest) == DEMO_MANIFEST and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # one process renders missing or outdated demo data itself; several would race on the files
        build_demo_data(DEMO_MANIFEST.parent.parent)
    trainer = Trainer(cfg, resume=args.resume)
    trainer.fit()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import torch

    from .data.demo import mark_render_version
    from .model.encoder import Encoder
    from .retrieval import evaluate
    from .train import Trainer

    cfg = load_config(args.config, [f"train.output_dir={args.out}", *args.overrides])
    build_demo_data(Path(cfg.data.manifest).parent.parent)
    out = Path(cfg.train.output_dir)
    set_aside_stale_run(cfg, out)
    trainer = Trainer(cfg, resume="latest")
    mark_render_version(out)
    if not trainer.fit():
        return 0

    def evaluate_encoder(encoder: torch.nn.Module, tag: str):
        return evaluate(encoder, trainer.manifest, cfg.data.eval_domains, trainer.spec, cfg.eval.batch_size,
                        cfg.eval.topk, cfg.eval.map_k, cfg.eval.chunk_size, trainer.device,
                        Path(cfg.train.output_dir) / "eval" / tag)[0]

    # The last epoch was evaluated during fit(), unless this process resumed a finished run.
    trained = trainer.last_report or evaluate_encoder(trainer.core.encoder_q, "final")
    # The same encoder with random weights (same seed, same architecture): the baseline to beat.
    torch.manual_seed(cfg.train.seed)
    baseline = evaluate_encoder(Encoder(cfg.model.arch, cfg.model.proj_dim).to(trainer.device), "random_init")
    if trainer.rank == 0:
        print("\n## Retrieval between unseen domains, trained encoder\n")
        print(trained.markdown())
        print("## Mean over ordered pairs: trained vs the same encoder with random weights\n")
        print("| metric | trained | random init |\n|---|---|---|")
        for name, value in trained.mean().items():
            print(f"| {name} | {100 * value:.2f} | {100 * baseline.mean()[name]:.2f} |")
        out = Path(cfg.train.output_dir).resolve()
        print(f"\nTables and pictures: {out / 'eval'}\nMLflow store: {trainer.tracker.uri}\n"
              f"Open it with: mlflow ui --backend-store-uri {trainer.tracker.uri}")
    return 0


def _load_encoder(args: argparse.Namespace, device):
    """The encoder to evaluate: from a checkpoint, MoCo v2 weights, or random; plus its config."""
    import torch

    from .checkpoint import encoder_from_checkpoint
    from .model.encoder import Encoder, load_moco_v2

    if args.checkpoint and "=" in args.checkpoint and not Path(args.checkpoint).exists():
        args.overrides.insert(0, args.checkpoint)  # `eval --init random --config c.yaml key=value`
        args.checkpoint = None
    if args.checkpoint:
        if args.init:
            raise ConfigError("give a checkpoint or --init, not both")
        cfg = load_config(args.config, args.overrides) if args.config else None
        encoder, cfg = encoder_from_checkpoint(Path(args.checkpoint), cfg)
    else:
        if not args.init or not args.config:
            raise ConfigError("evaluate a checkpoint, or a baseline with --init random|moco-v2 PATH and --config")
        cfg = load_config(args.config, args.overrides)
        torch.manual_seed(cfg.train.seed)
        encoder = Encoder(cfg.model.arch, cfg.model.proj_dim)
        if args.init[0] == "moco-v2":
            if len(args.init) != 2:
                raise ConfigError("--init moco-v2 needs the checkpoint path: --init moco-v2 PATH")
            load_moco_v2(encoder, args.init[1])
        elif args.init != ["random"]:
            raise ConfigError(f"--init {' '.join(args.init)}: expected 'random' or 'moco-v2 PATH'")
    return encoder.to(device), cfg


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data.manifest import Manifest
    from .data.pipeline import PipelineSpec
    from .retrieval import evaluate
    from .train import setup_logging

    setup_logging(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder, cfg = _load_encoder(args, device)
    manifest = Manifest.load(args.manifest or cfg.data.manifest)
    domains = args.domains or cfg.data.eval_domains
    spec = PipelineSpec(cfg.data.image_size, 0, 1, 0 if device.type == "cuda" else None, cfg.data.num_threads)
    out = Path(args.out)
    report, files = evaluate(encoder, manifest, domains, spec, cfg.eval.batch_size, cfg.eval.topk, cfg.eval.map_k,
                             cfg.eval.chunk_size, device, out, cfg.eval.picture_queries, cfg.eval.picture_topk)
    print(report.markdown())
    print(f"saved: {', '.join(str(f) for f in files)}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .search import run_search

    return run_search(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    return bench.main(args)


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

    p = sub.add_parser("config", help="print the resolved config (after overrides and validation)")
    _add_config_args(p)
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
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="larger images are skipped as decompression bombs")
    p.add_argument("--strict", action="store_true", help="fail (and pack nothing) if any image would be skipped")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("demo-data", help="render the digits demo dataset (4 domains) and pack it")
    p.add_argument("out", nargs="?", default="data/demo", help="output folder (default data/demo)")
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
                       "the demo data when data/demo is missing or was rendered by an older version.")
    _add_config_args(p)
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint in the output folder (or the one given)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate cross-domain retrieval of a checkpoint or a baseline")
    p.add_argument("checkpoint", nargs="?", help="checkpoint folder (ckpt-*) or its state.pt")
    p.add_argument("--init", nargs="+", metavar=("random|moco-v2", "PATH"),
                   help="evaluate a baseline instead of a checkpoint: 'random' or 'moco-v2 PATH'")
    p.add_argument("--config", help="config (default: the one saved in the checkpoint)")
    p.add_argument("--manifest", help="packed dataset to evaluate on (default: the config's)")
    p.add_argument("--domains", nargs="+", help="domains to retrieve between (default: the config's eval domains)")
    p.add_argument("--out", default="eval_out", help="folder for tables and pictures")
    p.add_argument("overrides", nargs="*", default=[], help="dotted config overrides")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("search", help="retrieve the closest gallery images for query images")
    p.add_argument("checkpoint", help="checkpoint folder (ckpt-*)")
    p.add_argument("--gallery", required=True, help="domain to search in")
    p.add_argument("--query", nargs="+", required=True, help="query image file(s)")
    p.add_argument("--top", type=int, default=10)
    p.add_argument("--manifest", help="packed dataset (default: the checkpoint config's)")
    p.add_argument("--out", default="search.png", help="picture of the results")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("bench", help="throughput and memory figures as JSON")
    p.add_argument("what", choices=["aug", "loader", "eval"])
    p.add_argument("--manifest", default="data/demo/shards/manifest.json")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sizes", type=int, nargs="+", default=[4000], help="eval: numbers of queries (= gallery size)")
    p.add_argument("--naive-max", type=int, default=4000, help="eval: run the naive implementation up to this size")
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
    from .data.pack import PackError

    try:
        return args.func(args)
    except (ConfigError, PackError, FileNotFoundError, ValueError) as exc:
        print(f"dgucdir {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
