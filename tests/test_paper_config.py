"""The paper configuration end to end on the CPU: configs/pacs.yaml as shipped (ResNet-50 at 224 px, from a
MoCo v2 checkpoint in facebookresearch/moco's key layout), with only the data, batch, queue and run length
overridden: training, one clustering of colour phase images at 224 px, an evaluation, an exact resume,
and a bf16 step under CPU autocast."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import REPO, history, run

pytestmark = pytest.mark.slow


def write_moco_v2_checkpoint(path) -> dict[str, torch.Tensor]:
    """A MoCo v2 checkpoint as main_moco.py saves it: epoch, arch, and a DDP ``state_dict`` holding both
    encoders (``module.encoder_q.*``, ``module.encoder_k.*``, MLP head included) and the queue."""
    from dgucdir.model.encoder import Encoder

    torch.manual_seed(123)
    net = Encoder("resnet50", 128).net.state_dict()
    state = {f"module.encoder_q.{k}": v.clone() for k, v in net.items()}
    state |= {f"module.encoder_k.{k}": v.clone() for k, v in net.items()}
    state |= {"module.queue": torch.randn(128, 256), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    torch.save({"epoch": 800, "arch": "resnet50", "state_dict": state}, path)
    return net


@pytest.fixture(scope="module")
def paper_setup(tmp_path_factory):
    from dgucdir.bench import write_bench_photos

    tmp = tmp_path_factory.mktemp("paper")
    manifest = write_bench_photos(tmp / "photos", 8)  # 4 domains x 8 photo-sized JPEGs
    weights = write_moco_v2_checkpoint(tmp / "moco_v2_800ep_pretrain.pth.tar")
    return tmp, manifest, weights


def overrides(tmp, manifest, name: str) -> list[str]:
    return [f"data.manifest={manifest}", "data.train_domains=[warm,cool]", "data.eval_domains=[dim,bright]",
            "data.num_threads=1", f"model.moco_init={tmp / 'moco_v2_800ep_pretrain.pth.tar'}",
            "train.batch_size=4", "loss.queue_size=8", "train.epochs=2", "train.max_steps_per_epoch=2",
            "train.warmup_epochs=1", "train.checkpoint_every=1", "train.log_every=1",
            f"train.output_dir={tmp / name}", "tracking.experiment=tiny",
            f"tracking.uri=sqlite:///{tmp / name / 'mlruns.db'}"]


def test_the_paper_config_trains_clusters_evaluates_and_resumes_exactly(paper_setup):
    tmp, manifest, weights = paper_setup
    full = run(["train", "configs/pacs.yaml", *overrides(tmp, manifest, "full")], timeout=900)
    assert f"MoCo v2 init from {tmp / 'moco_v2_800ep_pretrain.pth.tar'}: {len(weights)} tensors loaded" in full.stderr
    assert "missing keys" not in full.stderr and "unexpected keys" not in full.stderr
    _, losses = history(tmp / "full")
    assert sorted(losses) == [1, 2, 3, 4]
    _, cluster = history(tmp / "full", "train/loss_cluster")
    assert sorted(cluster) == [3, 4]  # clustered once, at the start of epoch 1, on colour phase images at 224 px
    report = json.loads((tmp / "full/eval/epoch_0002/retrieval.json").read_text())
    assert report["domains"] == ["dim", "bright"] and 0 <= report["mean"]["mAP@All"] <= 1
    split = overrides(tmp, manifest, "split")
    run(["train", "configs/pacs.yaml", *split, "train.max_steps=3"], timeout=900)  # stops after the clustering
    run(["train", "configs/pacs.yaml", *split, "--resume"], timeout=900)
    _, resumed = history(tmp / "split")
    assert resumed[4] == losses[4]
    assert history(tmp / "split", "eval/mean/mAP_at_All")[1] == history(tmp / "full", "eval/mean/mAP_at_All")[1]


def test_a_bf16_step_of_the_paper_config_under_cpu_autocast(paper_setup):
    """Catches dtype errors of mixed precision (queues, Fourier stage, losses) before a GPU would."""
    tmp, manifest, _ = paper_setup
    res = subprocess.run([sys.executable, "-m", "dgucdir", "train", "configs/pacs.yaml",
                          *overrides(tmp, manifest, "bf16"), "train.mixed_precision=bf16", "train.max_steps=1",
                          "train.warmup_epochs=0"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-4000:]
    _, losses = history(tmp / "bf16")
    _, cluster = history(tmp / "bf16", "train/loss_cluster")
    assert list(losses) == [1] and torch.isfinite(torch.tensor(losses[1])) and list(cluster) == [1]
