"""The device check, here on the CPU in its small size and with DALI hidden from the interpreter.

So the script cannot rot between GPU runs, and every module it exercises (model step, Fourier
stage, partner bank, k-means, retrieval, GlobalBatchNorm2d, the Trainer with a checkpoint and an
exact resume) is shown to import and run on a node without DALI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import REPO

EXPECTED_PHASES = {"fourier", "step", "batchnorm", "kmeans", "retrieval", "bank", "trainer", "throughput"}


def _without_dali(tmp_path: Path) -> dict[str, str]:
    """An environment whose interpreter cannot import ``nvidia.dali``, as on a bare node (a sitecustomize
    puts a finder first on the import path that refuses it)."""
    folder = tmp_path / "no_dali"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        "class NoDali(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'nvidia.dali' or name.startswith('nvidia.dali.'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoDali())\n")
    return {**os.environ, "PYTHONPATH": str(folder), "OMP_NUM_THREADS": "1"}


def test_the_hidden_dali_is_really_hidden(tmp_path):
    env = _without_dali(tmp_path)
    probe = subprocess.run([sys.executable, "-c", "import nvidia.dali"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'nvidia.dali'" in probe.stderr


def test_device_check_runs_every_phase_on_the_cpu_without_dali(tmp_path, demo_manifest):
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "scripts/device_check.py", "--device", "cpu", "--size", "small",
                          "--data", str(demo_manifest), "--out", str(out)], cwd=REPO, env=_without_dali(tmp_path),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and set(summary["phases"]) == EXPECTED_PHASES
    results = {p: json.loads((out / f"{p}.json").read_text()) for p in EXPECTED_PHASES}
    assert not any(r["dali_imported"] for r in results.values())
    trainer = results["trainer"]
    assert trainer["stopped_early"] and trainer["resume_weights_equal"] and trainer["clusters_used"]
    assert results["batchnorm"]["fp32"]["saved_ratio"] <= 1.05
    assert results["step"]["fp32_vs_cpu_rel"] == 0.0  # the CPU against itself: the same bits


def test_a_failing_phase_is_reported_and_the_others_still_run(tmp_path):
    """No data set for the trainer: that phase fails with its error in the summary, the next one passes."""
    out = tmp_path / "check"
    res = subprocess.run([sys.executable, "scripts/device_check.py", "--device", "cpu", "--size", "small",
                          "--data", str(tmp_path / "missing.json"), "--phases", "trainer", "bank", "--out", str(out)],
                         cwd=REPO, env=_without_dali(tmp_path), capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["phases"]["trainer"]["status"] == "failed" and "missing.json" in summary["phases"]["trainer"]["error"]
    assert summary["phases"]["bank"]["status"] == "passed" and not summary["passed"]


def test_asking_for_a_dali_pipeline_without_dali_is_one_line(tmp_path, demo_manifest):
    res = subprocess.run([sys.executable, "-m", "dgucdir", "eval", "--init", "random", "--config", "configs/demo.yaml",
                          "--out", str(tmp_path / "eval"), "--manifest", str(demo_manifest)], cwd=REPO, env=_without_dali(tmp_path), capture_output=True, text=True,
                         timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr
    assert lines[-1].startswith("dgucdir eval: error:") and "pip install 'dgucdir[cu13]'" in lines[-1]
    assert "Traceback" not in res.stderr
