"""Which precision a run trains in: the config's when it names one, else the launcher's (accelerate config)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from helpers import REPO, free_port, tiny_config

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("configured, expected", [(None, "bf16"), ("no", "no")])
def test_precision_defers_to_the_accelerate_config_unless_the_config_names_one(tmp_path, demo_manifest,
                                                                               configured, expected):
    from mlflow.tracking import MlflowClient

    launcher = tmp_path / "accelerate.yaml"
    launcher.write_text(yaml.safe_dump({"compute_environment": "LOCAL_MACHINE", "distributed_type": "NO",
                                        "num_machines": 1, "num_processes": 1, "use_cpu": True,
                                        "mixed_precision": "bf16", "main_training_function": "main"}))
    cfg = tiny_config(tmp_path, demo_manifest, "p", epochs=1, max_steps_per_epoch=2, eval_every=1,
                      mixed_precision=configured)
    res = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launcher),
                          "--main_process_port", str(free_port()), "-m", "dgucdir", "train", str(cfg)],
                         cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'p' / 'mlruns.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.data.tags["dgucdir.precision"] == expected
    assert run.data.params["train.mixed_precision"] == str(configured)
    assert "eval/mean/P_at_1" in run.data.metrics  # evaluation ran (under the same precision: retrieval.autocast)
    overridden = "the launcher asked for mixed precision 'bf16'; train.mixed_precision='no' wins"
    assert (overridden in res.stderr) == (configured == "no")  # never silent
