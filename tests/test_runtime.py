"""validate_runtime: the one place for checks that need the data and the world size."""

from pathlib import Path

import pytest

from dgucdir.config import ConfigError, load_config
from dgucdir.data.manifest import Manifest
from dgucdir.errors import DataError
from dgucdir.runtime import check_world_split, validate_runtime


def cfg(*overrides):
    return load_config(None, ["data.train_domains=[ink,neon]", "data.eval_domains=[photo,sketch]", *overrides])


def test_returns_the_per_rank_batch():
    assert check_world_split(cfg("train.batch_size=64", "loss.queue_size=256"), 4) == 16


@pytest.mark.parametrize("overrides, world, message", [
    (["train.batch_size=64"], 3, "train.batch_size=64 must be divisible by n_domains x world_size = 2 x 3 = 6"),
    (["train.batch_size=63"], 1, "train.batch_size=63 must be divisible by n_domains x world_size = 2 x 1 = 2"),
    # 64 over 2 ranks = 32 per rank, 16 per domain: the queue must hold whole per-rank batches of each rank
    (["train.batch_size=64", "loss.queue_size=100"], 2, "loss.queue_size=100 must be divisible by world_size x "
     "per-rank batch per domain = 2 x 16 = 32"),
    (["train.batch_size=64", "loss.queue_size=96", "loss.shared_queue=true"], 2,
     "per-rank batch per step = 2 x 32 = 64"),
])
def test_world_split_errors_name_the_key(overrides, world, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_world_split(cfg(*overrides), world)


def test_data_checks(demo_manifest):
    manifest = Manifest.load(demo_manifest)
    assert validate_runtime(cfg("train.batch_size=16", "loss.queue_size=64"), manifest, 2) == 8
    with pytest.raises(DataError, match=r"data.eval_domains: \['clipart'\] not in"):
        validate_runtime(cfg("data.eval_domains=[photo,clipart]"), manifest, 1)
    with pytest.raises(ConfigError, match="loss.num_clusters=100000: only .* training images to cluster"):
        validate_runtime(cfg("loss.num_clusters=100000"), manifest, 1)


def test_paper_configs_refuse_to_start_without_moco_weights(tmp_path):
    from dgucdir.runtime import check_before_launch, moco_init_path

    repo = Path(__file__).parent.parent
    for name in ("pacs.yaml", "domainnet.yaml"):
        paper = load_config(repo / "configs" / name)
        with pytest.raises(ConfigError, match="model.moco_init: this config starts from MoCo v2 ImageNet weights.*"
                                              "github.com/facebookresearch/moco.*model.moco_init=none"):
            check_before_launch(paper, 1)
    assert moco_init_path(load_config(repo / "configs" / "pacs.yaml", ["model.moco_init=none"])) is None
    with pytest.raises(ConfigError, match="model.moco_init: nowhere.pth does not exist"):
        moco_init_path(load_config(None, ["model.moco_init=nowhere.pth"]))
    weights = tmp_path / "moco.pth.tar"
    weights.write_bytes(b"")
    assert moco_init_path(load_config(None, [f"model.moco_init={weights}"])) == str(weights)
