"""`dgucdir runs`: the results table from an MLflow store, checked against values worked out by hand."""

import json
import subprocess
import sys

import pytest

from mlflow.tracking import MlflowClient

from helpers import REPO


def _store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, tags={"dgucdir.sweep": "s1", "dgucdir.sweep_parent": "true"}).info.run_id

    def add(sweep, split, seed, p_xy, p_yx, steps=(10, 20), status="FINISHED"):
        run = client.create_run(exp, run_name=f"{split}-{seed}", tags={
            "dgucdir.sweep": sweep, "dgucdir.train_domains": split, "dgucdir.seed": str(seed),
            "mlflow.parentRunId": parent})
        rid = run.info.run_id
        for i, step in enumerate(steps):  # the table uses the last value; earlier ones are the curve
            scale = (i + 1) / len(steps)
            client.log_metric(rid, "eval/x_to_y/P_at_1", p_xy * scale, step=step)
            client.log_metric(rid, "eval/y_to_x/P_at_1", p_yx * scale, step=step)
            client.log_metric(rid, "eval/mean/P_at_1", (p_xy + p_yx) / 2 * scale, step=step)
        client.set_terminated(rid, status)

    add("s1", "a,b", 0, 0.40, 0.20)
    add("s1", "a,b", 2, 0.05, 0.05, status="KILLED")  # stopped: its last evaluation is not its final one
    add("s1", "a,b", 1, 0.60, 0.30)
    add("s1", "a,c", 0, 0.10, 0.50)
    add("s2", "a,b", 0, 0.99, 0.99)  # another sweep: left out of --sweep s1
    return uri, client, parent


def test_table_is_mean_and_std_over_seeds_per_split(tmp_path):
    pytest.importorskip("matplotlib", reason="the picture needs the report extra: pip install 'dgucdir[report]'")
    from dgucdir.runs import report

    uri, client, parent = _store(tmp_path)
    table = report(uri, "P@1", None, "s1", tmp_path / "runs.png")
    cells = table.cells()
    assert set(cells) == {"a+b", "a+c"}
    mean, std, n = cells["a+b"]["x_to_y"]
    assert (round(mean, 6), round(std, 4), n) == (50.0, 14.1421, 2)  # [40, 60]
    assert round(cells["a+b"]["mean"][0], 6) == 37.5  # (30 + 45) / 2
    assert cells["a+c"]["y_to_x"] == (50.0, 0.0, 1)
    md = table.markdown()
    assert "| a+b | 50.00 ± 14.14 | 25.00 ± 7.07 | 37.50 ± 10.61 | 2 |" in md
    assert "Left out, not finished (their last evaluation is not their final one): a,b-2 (KILLED)" in md
    assert (tmp_path / "runs.png").stat().st_size > 10_000
    curve = [r.curve for r in table.runs if r.name == "a,b-0"][0]
    assert [s for s, _ in curve] == [10, 20] and [round(v, 9) for _, v in curve] == [0.15, 0.3]
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"results_P_at_1.md", "runs.png"} <= artifacts  # the sweep's parent run gets both


def test_cli_json_and_errors(tmp_path):
    uri, _, _ = _store(tmp_path)
    res = subprocess.run([sys.executable, "-m", "dgucdir", "runs", "--uri", uri, "--sweep", "s2", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["table"]["a+b"]["mean"]["mean"] == 99.0
    bad = subprocess.run([sys.executable, "-m", "dgucdir", "runs", "--uri", uri, "--sweep", "nope"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no finished, evaluated runs in sweep 'nope'" in bad.stderr
