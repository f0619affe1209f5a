"""Config loading, overrides and every kind of validation error."""

from pathlib import Path

import pytest

from dgucdir.config import Config, ConfigError, flatten, load_config, parse_override
from helpers import REPO

CONFIGS = Path(__file__).parent.parent / "configs"


def test_paper_settings_in_pacs_and_domainnet():
    for name, topk in [("pacs", [1, 5, 15]), ("domainnet", [50, 100, 200])]:
        cfg = load_config(CONFIGS / f"{name}.yaml")
        assert (cfg.train.batch_size, cfg.optim.lr, cfg.train.epochs) == (64, 0.0002, 200)
        assert (cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.schedule) == (0.9, 1e-4, "cosine")
        assert (cfg.loss.queue_size, cfg.loss.temperature, cfg.loss.num_clusters) == (5120, 0.2, 7)
        assert (cfg.augment.alpha, cfg.augment.hpf_range, cfg.augment.hpf_alpha) == (1.0, 50, 0.4)
        assert (cfg.train.warmup_epochs, cfg.loss.cluster_weight) == (20, 0.1)
        assert [cfg.loss.w_phase_phase, cfg.loss.w_rgb_rgb, cfg.loss.w_phase_rgb, cfg.loss.w_rgb_phase] == [0.5] * 4
        assert cfg.eval.topk == topk
        assert cfg.model.arch == "resnet50" and cfg.model.momentum == 0.999
        assert len(cfg.data.train_domains) == 2 and not set(cfg.data.train_domains) & set(cfg.data.eval_domains)


def test_overrides_parse_yaml_values():
    cfg = load_config(CONFIGS / "pacs.yaml", ["train.epochs=5", "data.train_domains=[photo,sketch]",
                                              "data.eval_domains=[cartoon,art_painting]", "model.moco_init=/x.pth"])
    assert cfg.train.epochs == 5
    assert cfg.data.train_domains == ["photo", "sketch"]
    assert cfg.model.moco_init == "/x.pth"
    assert parse_override("a.b=[1, 2]") == ("a.b", "[1, 2]")


@pytest.mark.parametrize("override, key, value", [
    ("optim.lr=3e-4", "optim.lr", 0.0003),  # YAML 1.1 reads 3e-4 as a string
    ("train.mixed_precision=no", "train.mixed_precision", "no"),  # YAML 1.1: False
    ("train.mixed_precision=null", "train.mixed_precision", None),
    ("tracking.run_name=2024", "tracking.run_name", "2024"),  # YAML: an int
    ("tracking.run_name=null", "tracking.run_name", None),
    ("data.train_domains=[no, 2024]", "data.train_domains", ["no", "2024"]),
    ("eval.topk=[1,5, 10]", "eval.topk", [1, 5, 10]),
    ("augment.fourier=false", "augment.fourier", False),
    ("train.max_steps=null", "train.max_steps", None),
    ("train.max_steps=7", "train.max_steps", 7),
    ("model.moco_init=/w/moco.pth", "model.moco_init", "/w/moco.pth"),
])
def test_overrides_are_read_as_the_type_of_their_field(override, key, value):
    got = flatten(load_config(None, [override]))[key]
    assert got == value and type(got) is type(value)


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(None, ["optim.lr=1"]).optim.lr == 1.0
    with pytest.raises(ConfigError, match=r"train.epochs.*got '1.5', expected an integer"):
        load_config(None, ["train.epochs=1.5"])


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"train.epoch.*unknown key; allowed keys under train: epochs, batch_size"),
    ("bogus.x=1", r"bogus.*unknown key"),
    ("train.mixed_precision=fp8", r"train.mixed_precision.*expected one of 'no', 'bf16', 'fp16'"),
    ("model.arch=vit", r"model.arch.*one of 'resnet50', 'resnet18', 'resnet_narrow'"),
    ("augment.alpha=1.5", r"augment.alpha.*expected a number in \[0, 1\]"),
    ("loss.temperature=0", r"loss.temperature.*expected a number > 0"),
    ("data.eval_domains=[cartoon,photo]", r"data.eval_domains.*also in data.train_domains"),
    ("train.log_every=true", r"train.log_every.*expected an integer"),
    ("data.train_domains=photo", r"data.train_domains.*expected a list of a string"),
    ("train.epochs", r"expected dotted.key=value"),
])
def test_validation_errors_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "pacs.yaml", [override])


def test_yaml_errors_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: 3\n  batch_sise: 64\n")
    with pytest.raises(ConfigError, match=r"train.batch_sise \(.*bad.yaml:3\): unknown key"):
        load_config(bad)
    bad.write_text("optim:\n  lr: -1\n")
    with pytest.raises(ConfigError, match=r"optim.lr \(.*bad.yaml:2\): got -1.0, expected a number > 0"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_flatten_round_trip():
    flat = flatten(Config())
    assert flat["optim.lr"] == 0.0002 and flat["data.train_domains"] == ["ink", "neon"]
    assert len(flat) == sum(len(v) for v in Config().__dict__.values() for v in [vars(v)])


def test_schema_lists_every_key_with_type_default_and_help():
    from dgucdir.config import schema

    rows = {key: (tp, default, text) for key, tp, default, text in schema()}
    assert set(rows) == set(flatten(Config()))
    assert all(text for _, _, text in rows.values()), [k for k, (_, _, t) in rows.items() if not t]
    assert rows["optim.lr"][:2] == ("a number", 0.0002)
    assert rows["train.mixed_precision"][0] == "one of 'no', 'bf16', 'fp16' or null"


def test_shipped_configs_are_found_from_any_folder(tmp_path, monkeypatch):
    """`configs/demo.yaml` in the docs works outside the repository: the package ships its configs."""
    import subprocess
    import sys

    from dgucdir.config import resolve_config_path

    monkeypatch.chdir(tmp_path)
    assert not (tmp_path / "configs").exists()
    for name in ("configs/demo.yaml", "demo.yaml", "demo"):
        assert resolve_config_path(name).read_text() == (REPO / "configs/demo.yaml").read_text()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/demo.yaml").write_text("train:\n  epochs: 7\n")
    assert load_config("configs/demo.yaml").train.epochs == 7  # a file of the user's wins
    with pytest.raises(ConfigError, match=r"does not exist \(shipped with dgucdir: configs/demo.yaml, "):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("elsewhere/demo.yaml")  # only a bare name or configs/NAME falls back
    res = subprocess.run([sys.executable, "-m", "dgucdir", "config", "configs/pacs.yaml"], cwd=tmp_path / "configs",
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "moco_init: required" in res.stdout, res.stderr
