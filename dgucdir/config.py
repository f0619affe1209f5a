"""Typed configuration: dataclass schema, YAML loading, dotted overrides, validation.

Every setting lives in one tree of dataclasses (in the manner of torchtitan's job config), so
the whole run is described by one object that is saved in checkpoints, flattened into MLflow
params and printed by ``dgucdir config``. Loading validates everything before any work starts:
an unknown key, a wrong type or an impossible value raises :class:`ConfigError` naming the
dotted key, the YAML file and line where it came from, and what would have been allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError


class ConfigError(UserError):
    """A configuration problem, always naming the offending key."""


@dataclass
class DataConfig:
    manifest: str = "data/demo/shards/manifest.json"
    train_domains: list[str] = field(default_factory=lambda: ["ink", "neon"])
    eval_domains: list[str] = field(default_factory=lambda: ["photo", "sketch"])
    image_size: int = 224
    num_threads: int | None = None  # DALI threads per pipeline; null: from the rank's thread budget
    order: Literal["global", "shard"] = "global"
    shuffle_buffer: int = 1024


@dataclass
class AugmentConfig:
    fourier: bool = True
    alpha: float = 1.0
    hpf_range: int = 50
    hpf_alpha: float = 0.4
    hpf_fixed: bool = False
    phase_amplitude: float = 50000.0
    crop_scale_min: float = 0.2
    # Fourier partners. "bank": each view its own raw resized training image, from a bank of the images
    # this rank already decoded; "per_view_raw": the same kind drawn from all training images and decoded
    # for it (the original, two more decodes per sample); "shared_batch": one augmented in-batch partner
    # per sample, shared by both views (ablation)
    partner: Literal["bank", "per_view_raw", "shared_batch"] = "per_view_raw"
    partner_bank_size: int = 4096  # raw images per rank, split over the training domains (3*S*S bytes each)


@dataclass
class ModelConfig:
    arch: Literal["resnet50", "resnet18", "resnet_narrow"] = "resnet50"
    proj_dim: int = 128
    momentum: float = 0.999
    # path to MoCo v2 weights; null or "none": random init; "required": refuse to start without a path
    moco_init: str | None = None
    rgb_only: bool = False
    channels_last: bool = False
    # BatchNorm statistics: paper = over the whole global batch (the original's one GPU), queries
    # and keys alike; shuffle = MoCo's shuffle-BN for the keys; local = each rank its own batch
    bn: Literal["paper", "shuffle", "local"] = "paper"
    # with bn=paper: how many consecutive ranks share BatchNorm statistics; null = all of them (the
    # paper's semantics); e.g. 8 = per node of 8 GPUs (fewer ranks per all-reduce, a smaller batch)
    bn_group: int | None = None


@dataclass
class LossConfig:
    temperature: float = 0.2
    queue_size: int = 5120
    shared_queue: bool = False
    w_phase_phase: float = 0.5
    w_rgb_rgb: float = 0.5
    w_phase_rgb: float = 0.5
    w_rgb_phase: float = 0.5
    # negatives of the two cross terms: "query" = the query's modality queue (phase->rgb against
    # the phase queue), as specified; "positive" = the positive key's modality queue
    cross_negatives: Literal["query", "positive"] = "query"
    # True: the step's keys are enqueued before the loss, so the other samples' fresh keys are
    # negatives too (own sample masked); False: after it, as MoCo. See docs/DESIGN.md.
    batch_negatives: bool = False
    cluster: bool = True
    cluster_weight: float = 0.1
    num_clusters: int = 7
    kmeans: Literal["euclidean", "spherical"] = "euclidean"
    kmeans_niter: int = 20
    kmeans_nredo: int = 5
    kmeans_max_points_per_centroid: int = 2000


@dataclass
class OptimConfig:
    lr: float = 0.0002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class TrainConfig:
    epochs: int = 200
    batch_size: int = 64
    warmup_epochs: int = 20
    seed: int = 0
    # null: what the launcher asks for (`accelerate launch --mixed_precision`, its config file), else
    # fp32; a value here overrides the launcher. The original trains and evaluates in fp32.
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    # float32 convolutions and matmuls in TF32 on Ampere+ GPUs (false: IEEE float32, the original's
    # numerics; PyTorch's own default would run convolutions in TF32). See dgucdir/numerics.py.
    tf32: bool = False
    # deterministic GPU kernels where PyTorch has them: bit-exact resume on a GPU, at some speed
    deterministic: bool = False
    # a resume on data other than the checkpoint's (another manifest fingerprint) is refused: the
    # partner bank's and the cluster tables' sample ids would point at other images. true goes on
    # (logged, and tagged dgucdir.resumed_on_other_data)
    resume_on_other_data: bool = False
    output_dir: str = "runs/default"
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    eval_every: int = 10
    log_every: int = 10
    max_steps_per_epoch: int | None = None
    max_steps: int | None = None  # stop (with a checkpoint) after this many global steps; resume continues
    # a collective that waits longer fails (a rank died or hangs): the survivors exit with an error
    # naming the lost rank instead of hanging until the job's time limit
    collective_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    topk: list[int] = field(default_factory=lambda: [1, 5, 15])
    map_k: int = 200
    batch_size: int = 128
    chunk_size: int = 1024
    # working memory of the scoring per rank, MiB: a chunk of queries x the gallery (~24 B per entry)
    chunk_mib: int = 512
    picture_queries: int = 4
    picture_topk: int = 8


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # default: MLFLOW_TRACKING_URI, else sqlite:///<store>/mlruns.db
    store: str = "runs"  # folder of the default store and its artifacts: one store for every run under it
    experiment: str = "dgucdir"
    run_name: str | None = None
    group: str | None = None  # a label that splits rows of `dgucdir runs`, e.g. an ablation variant
    sweep: str | None = None  # set by `dgucdir submit` for the jobs of a sweep (tag dgucdir.sweep)
    parent_run_id: str | None = None  # the sweep's parent run; the job's run is its child


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 1
    cpus_per_task: int = 10
    mem_gb: int | None = None  # per node; null: mem_gb_per_task x tasks per node; 0: the cluster's default
    mem_gb_per_task: int = 32
    max_requeues: int = 30  # submitit requeues after a time-out at most this often (its default of 3 ends long runs)
    sbatch: list[str] = field(default_factory=list)  # extra #SBATCH lines as KEY=VALUE, e.g. "exclusive="
    setup: list[str] = field(default_factory=list)  # shell commands before the tasks, e.g. "module load cuda"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    time_min: int = 24 * 60
    job_name: str = "dgucdir"
    folder: str | None = None  # submitit/SLURM logs; null: <train.output_dir>/slurm, next to the run
    python: str | None = None  # the command that runs python on the nodes, e.g. a container; null: this python


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# --------------------------------------------------------------------------- value checks
# (key, predicate, what is allowed). Checked after types, so predicates see typed values.
_VALUE_RULES: list[tuple[str, typing.Callable[[Any], bool], str]] = [
    ("data.train_domains", lambda v: len(v) >= 1 and len(set(v)) == len(v), "a non-empty list of distinct domain names"),
    ("data.eval_domains", lambda v: len(v) >= 2 and len(set(v)) == len(v), "at least two distinct domain names"),
    ("data.image_size", lambda v: v >= 16, "an integer >= 16"),
    ("data.num_threads", lambda v: v is None or v >= 1, "null (the rank's thread budget) or an integer >= 1"),
    ("data.shuffle_buffer", lambda v: v >= 1, "an integer >= 1"),
    ("augment.alpha", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    ("augment.hpf_alpha", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]"),
    ("augment.hpf_range", lambda v: v >= 0, "an integer >= 0 (0 disables the phase mix)"),
    ("augment.phase_amplitude", lambda v: v > 0, "a number > 0"),
    ("augment.partner_bank_size", lambda v: v >= 1, "an integer >= 1"),
    ("augment.crop_scale_min", lambda v: 0.0 < v <= 1.0, "a number in (0, 1]"),
    ("model.proj_dim", lambda v: v >= 1, "an integer >= 1"),
    ("model.momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("loss.temperature", lambda v: v > 0, "a number > 0"),
    ("loss.queue_size", lambda v: v >= 1, "an integer >= 1"),
    ("loss.cluster_weight", lambda v: v >= 0, "a number >= 0"),
    ("loss.num_clusters", lambda v: v >= 2, "an integer >= 2"),
    ("loss.kmeans_niter", lambda v: v >= 1, "an integer >= 1"),
    ("loss.kmeans_nredo", lambda v: v >= 1, "an integer >= 1"),
    ("loss.kmeans_max_points_per_centroid", lambda v: v >= 1, "an integer >= 1"),
    ("optim.lr", lambda v: v > 0, "a number > 0"),
    ("optim.momentum", lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
    ("optim.weight_decay", lambda v: v >= 0, "a number >= 0"),
    ("train.epochs", lambda v: v >= 1, "an integer >= 1"),
    ("train.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("train.warmup_epochs", lambda v: v >= 0, "an integer >= 0"),
    ("train.checkpoint_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.keep_checkpoints", lambda v: v >= 1, "an integer >= 1"),
    ("train.eval_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.log_every", lambda v: v >= 1, "an integer >= 1"),
    ("train.max_steps_per_epoch", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("train.max_steps", lambda v: v is None or v >= 1, "null or an integer >= 1"),
    ("eval.topk", lambda v: len(v) >= 1 and all(k >= 1 for k in v), "a non-empty list of integers >= 1"),
    ("eval.map_k", lambda v: v >= 1, "an integer >= 1"),
    ("eval.batch_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.chunk_size", lambda v: v >= 1, "an integer >= 1"),
    ("eval.picture_queries", lambda v: v >= 0, "an integer >= 0"),
    ("eval.picture_topk", lambda v: v >= 1, "an integer >= 1"),
    ("launch.nodes", lambda v: v >= 1, "an integer >= 1"),
    ("launch.gpus_per_node", lambda v: v >= 1, "an integer >= 1"),
    ("launch.cpus_per_task", lambda v: v >= 1, "an integer >= 1"),
    ("launch.time_min", lambda v: v >= 1, "an integer >= 1"),
]


def _cross_checks(cfg: Config) -> None:
    """Checks that involve several keys at once."""
    overlap = set(cfg.data.train_domains) & set(cfg.data.eval_domains)
    if overlap:
        raise ConfigError(
            f"data.eval_domains: {sorted(overlap)} also in data.train_domains; retrieval is evaluated on unseen domains only"
        )
    if cfg.augment.partner_bank_size < len(cfg.data.train_domains):
        raise ConfigError(f"augment.partner_bank_size={cfg.augment.partner_bank_size}: the bank needs at least one "
                          f"slot per training domain ({len(cfg.data.train_domains)})")


# --------------------------------------------------------------------------- type coercion
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, str(tp))


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Returns ``value`` as type ``tp`` or raises ConfigError naming ``key``."""

    def fail() -> typing.NoReturn:
        raise ConfigError(f"{key}{where}: got {value!r}, expected {_type_name(tp)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            fail()
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except ConfigError:
                pass
        fail()
    if origin is list:
        if not isinstance(value, list):
            fail()
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            fail()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail()
        return value
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, raw: Any, prefix: str, lines: dict[str, str]) -> Any:
    """Builds dataclass ``cls`` from a mapping, checking keys and types."""
    where = lines.get(prefix, "")
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'}{where}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(
            f"{key}{lines.get(key, where)}: unknown key; allowed keys under {prefix or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, key, lines)
        else:
            kwargs[name] = _coerce(value, tp, key, lines.get(key, ""))
    return cls(**kwargs)


def _get(cfg: Config, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, lines: dict[str, str] | None = None) -> None:
    """Raises ConfigError for the first impossible value."""
    lines = lines or {}
    for key, ok, allowed in _VALUE_RULES:
        value = _get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}{lines.get(key, '')}: got {value!r}, expected {allowed}")
    _cross_checks(cfg)


# --------------------------------------------------------------------------- YAML + overrides
def _line_map(node: yaml.Node, source: str, prefix: str = "") -> dict[str, str]:
    """Maps every dotted key of a composed YAML mapping to ' (file:line)'."""
    out: dict[str, str] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}.{key_node.value}" if prefix else str(key_node.value)
            out[key] = f" ({source}:{key_node.start_mark.line + 1})"
            out.update(_line_map(value_node, source, key))
    return out


def parse_override(text: str) -> tuple[str, str]:
    """Splits ``a.b=value`` into the dotted key and the value's text (typed later by :func:`typed_value`)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    return key, value.strip()


def field_type(key: str) -> Any | None:
    """The declared type of a dotted config key; None when there is no such field (or it is a section)."""
    cls: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(cls):
            return None
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return None
        cls = hints[part]
    return None if dataclasses.is_dataclass(cls) else cls


NULLS = ("null", "~", "")
TRUE, FALSE = ("true", "yes", "on"), ("false", "no", "off")


def typed_value(text: str, tp: Any) -> Any:
    """The override text read as type ``tp`` (the field's own), not as YAML 1.1 would guess it.

    So ``optim.lr=3e-4`` is a float, ``train.mixed_precision=no`` the string 'no' and
    ``tracking.run_name=2024`` a string. Text that does not fit is returned unchanged and the
    usual type check names the key and what was expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.lower() in NULLS and len(args) < len(typing.get_args(tp)):
            return None
        for arg in args:
            value = typed_value(text, arg)
            if value is not text or arg is str or typing.get_origin(arg) is Literal:
                return value
        return text
    if origin is list:
        if not (text.startswith("[") and text.endswith("]")):
            return text
        items = [t.strip() for t in text[1:-1].split(",")]
        return [typed_value(t.strip("'\""), typing.get_args(tp)[0]) for t in items if t]
    if tp is bool:
        return True if text.lower() in TRUE else False if text.lower() in FALSE else text
    for number in (int, float):
        if tp is number:
            try:
                return number(text)
            except ValueError:
                return text
    return text


def _override_value(key: str, text: str) -> Any:
    tp = field_type(key)
    if tp is not None:
        return typed_value(text, tp)
    try:  # not a field: a section or an unknown key, which the schema check then reports
        return yaml.safe_load(text) if text else None
    except yaml.YAMLError:
        return text


def _set_nested(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def from_dict(raw: dict, lines: dict[str, str] | None = None) -> Config:
    """Builds and validates a Config from plain data (e.g. a checkpoint's saved config)."""
    lines = lines or {}
    cfg = _build(Config, raw, "", lines)
    validate(cfg, lines)
    return cfg


PACKAGED_CONFIGS = Path(__file__).parent / "configs"  # `configs/` of the repository is a link to it


def resolve_config_path(path: str | Path) -> Path:
    """``path`` itself when it is a file; else a config shipped with the package, named like
    ``configs/demo.yaml``, ``demo.yaml`` or ``demo``, so the documented commands work from any folder."""
    path = Path(path)
    if path.is_file():
        return path
    name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
    packaged = PACKAGED_CONFIGS / name
    if path.parent.name in ("", "configs") and packaged.is_file():
        return packaged
    shipped = ", ".join(sorted(f"configs/{c.name}" for c in PACKAGED_CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file {path} does not exist (shipped with dgucdir: {shipped})")


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Loads a YAML config (or the defaults when ``path`` is None) and applies overrides."""
    raw: dict = {}
    lines: dict[str, str] = {}
    if path is not None:
        path = resolve_config_path(path)
        text = path.read_text()
        try:
            node = yaml.compose(text)
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if node is not None:
            lines = _line_map(node, str(path))
    return with_overrides(raw, overrides, lines)


def with_overrides(raw: dict, overrides: typing.Sequence[str], lines: dict[str, str] | None = None) -> Config:
    """``raw`` (a YAML file's data, or the config saved in a checkpoint) with dotted overrides, validated.

    Each override is checked like a config file's line: a word that is not ``key=value`` or a key
    the schema does not know is a :class:`ConfigError` naming what was typed.
    """
    raw = copy.deepcopy(raw)
    lines = dict(lines or {})
    for item in overrides:
        key, text = parse_override(item)
        _set_nested(raw, key, _override_value(key, text))
        parts = key.split(".")
        for depth in range(1, len(parts) + 1):  # an unknown key is named with the override that made it
            lines.setdefault(".".join(parts[:depth]), f" (command-line override {item!r})")
        lines[key] = f" (command-line override {item!r})"
    return from_dict(raw, lines)


def schema() -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, one line of help) for every key, in schema order."""
    from .config_help import HELP

    rows: list[tuple[str, str, Any, str]] = []

    def walk(cls: type, obj: Any, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            key, value = f"{prefix}{f.name}", getattr(obj, f.name)
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], value, key + ".")
            else:
                rows.append((key, _type_name(hints[f.name]), value, HELP.get(key, "")))

    walk(Config, Config(), "")
    return rows


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(cfg: Config) -> dict[str, Any]:
    """The config as {dotted.key: value}, e.g. for MLflow params."""
    out: dict[str, Any] = {}

    def walk(obj: Any, prefix: str) -> None:
        for key, value in obj.items():
            name = f"{prefix}.{key}" if prefix else key
            if isinstance(value, dict):
                walk(value, name)
            else:
                out[name] = value

    walk(to_dict(cfg), "")
    return out
