"""`dgucdir bench train`: FLOPs counted per sample from the model, and figures consistent with each other."""

import pytest

from helpers import REPO

pytestmark = pytest.mark.slow


def test_flops_per_sample_scale_with_pixels_and_mfu_is_achieved_over_peak(demo_manifest):
    from dgucdir.bench_train import bench_train

    base = [f"data.manifest={demo_manifest}", "data.num_threads=1", "train.batch_size=16", "loss.queue_size=64"]
    small = bench_train(str(REPO / "configs/demo.yaml"), [*base, "data.image_size=32", "augment.hpf_range=7"], 2, 1)
    large = bench_train(str(REPO / "configs/demo.yaml"), [*base, "data.image_size=64"], 2, 1)
    # convolutions dominate: 4x the pixels is ~4x the FLOPs (the MLP head and losses do not grow)
    assert 3.5 < large["model_gflops_per_sample"] / small["model_gflops_per_sample"] < 4.05
    for r in (small, large):
        assert r["timed_steps"] == 2 and r["samples_per_s"] > 0 and 0 <= r["data_wait_fraction"] < 1
        achieved = r["model_gflops_per_sample"] * 1e9 * r["samples_per_s"]
        assert r["mfu"] == pytest.approx(achieved / (r["matmul_peak_tflops"] * 1e12))


def test_timed_steps_are_those_asked_for_across_epochs(demo_manifest):
    """Batch 256 on the demo is 4 steps an epoch: 2 warm-up + 5 timed steps read into a second epoch."""
    from dgucdir.bench_train import bench_train

    r = bench_train(str(REPO / "configs/demo.yaml"), [f"data.manifest={demo_manifest}", "data.num_threads=1",
                    "train.batch_size=256", "loss.queue_size=512", "data.image_size=32", "augment.hpf_range=7"], 5, 2)
    assert r["timed_steps"] == 5 and r["samples_per_s"] > 0 and r["tf32"] is False
