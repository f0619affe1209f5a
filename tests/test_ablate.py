"""`dgucdir ablate`: the table's arithmetic by hand, and bad variants refused before any training."""

import pytest

from dgucdir.ablate import Ablation, VariantResult, run_ablation
from dgucdir.config import ConfigError


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
