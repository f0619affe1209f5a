"""`dgucdir ablate`: the table's arithmetic by hand, and bad variants refused before any training."""

import pytest

from dgucdir.ablate import Ablation, VariantResult, run_ablation
from dgucdir.config import ConfigError, load_config


def test_table_mean_std_and_delta_vs_full():
    full = VariantResult("full", [], {0: {"P@1": 0.40, "mAP@All": 0.20}, 1: {"P@1": 0.44, "mAP@All": 0.22}})
    ablated = VariantResult("no_fourier", ["augment.fourier=false"],
                            {0: {"P@1": 0.50, "mAP@All": 0.25}, 1: {"P@1": 0.46, "mAP@All": 0.25}})
    assert full.stat("P@1") == pytest.approx((42.0, 2.8284271))  # [40, 44]
    md = Ablation("configs/demo.yaml", [0, 1], [full, ablated], "ablate-x").markdown()
    assert "| full | the method as configured | 42.00 ± 2.83 | 21.00 ± 1.41 | +0.00 | +0.00 |" in md
    assert "| no_fourier | augment.fourier=false | 48.00 ± 2.83 | 25.00 ± 0.00 | +6.00 | +4.00 |" in md
    assert "dgucdir runs --sweep ablate-x" in md


def test_unknown_variant_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"--variants: unknown \['no_magic'\]"):
        run_ablation("configs/demo.yaml", [], ["full", "no_magic"], [0], tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_ablation_trains_each_variant_and_seed_under_one_parent_run(tmp_path, demo_manifest):
    """Two variants x two seeds, end to end: the table's numbers are the runs' own last evaluations,
    and the parent run gets the table, the bar chart and each variant's mean/std."""
    import json

    from mlflow.tracking import MlflowClient

    from dgucdir.runs import parent_run
    from helpers import tiny_config

    cfg = tiny_config(tmp_path, demo_manifest, "abl", epochs=2, eval_every=2, max_steps_per_epoch=3)
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    out = tmp_path / "ablate"
    ablation = run_ablation(str(cfg), [f"tracking.uri={uri}"], ["full", "no_fourier"], [0, 1], out)
    for v in ablation.variants:
        for seed in (0, 1):
            report = json.loads((out / f"{v.name}-seed{seed}/eval/epoch_0002/retrieval.json").read_text())
            assert v.per_seed[seed] == report["mean"]
    assert load_config(out / "no_fourier-seed1/config.yaml").augment.fourier is False
    assert load_config(out / "full-seed1/config.yaml").augment.fourier is True
    assert load_config(out / "full-seed1/config.yaml").train.seed == 1
    client = MlflowClient(uri)
    parent = parent_run(uri, "ablate-ablate")
    assert {a.path for a in client.list_artifacts(parent)} >= {"ablation.md", "ablation.json", "ablation.png"}
    mean, std = ablation.variants[1].stat("mAP@All")
    logged = client.get_run(parent).data.metrics
    assert logged["ablation/no_fourier/mAP_at_All/mean"] == pytest.approx(mean)
    assert logged["ablation/no_fourier/mAP_at_All/std"] == pytest.approx(std)
    children = client.search_runs([client.get_run(parent).info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_name for r in children) == ["full-seed0", "full-seed1", "no_fourier-seed0", "no_fourier-seed1"]
