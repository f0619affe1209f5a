"""`dgucdir select`: the grid, the choice on a toy problem with a known answer, and end to end."""

import json

import pytest

from dgucdir.config import ConfigError
from dgucdir.selection import Candidate, choose, grid_points, point_name, run_selection


def test_grid_is_every_combination_in_order_and_list_values_stay_whole():
    points = grid_points(["augment.hpf_range=2;4", "data.train_domains=[ink,neon];[neon,ink]"])
    assert points == [["augment.hpf_range=2", "data.train_domains=[ink,neon]"],
                      ["augment.hpf_range=2", "data.train_domains=[neon,ink]"],
                      ["augment.hpf_range=4", "data.train_domains=[ink,neon]"],
                      ["augment.hpf_range=4", "data.train_domains=[neon,ink]"]]
    assert point_name(points[1]) == "hpf_range-2_train_domains--neon-ink-"
    for bad in ("augment.hpf_range", "=1;2", "augment.alpha=;"):
        with pytest.raises(ConfigError, match="expected KEY=VALUE1;VALUE2"):
            grid_points([bad])


def test_a_toy_problem_gets_its_known_answer_from_the_training_domain_score_alone():
    """A toy "training" whose training-domain score peaks at a window of 4 (with seed noise smaller than
    the gaps): the protocol must choose 4 by the mean over seeds, score every point and seed once, and
    break a tie towards the earlier point."""
    calls = []

    def training_domain(point, seed):
        calls.append((tuple(point), seed))
        window = int(point[0].split("=")[1])
        return 50 - (window - 4) ** 2 + 0.1 * seed

    points = grid_points(["augment.hpf_range=14;2;4;8"])
    candidates, best = choose(points, [0, 1, 2], training_domain)
    assert best.point == ["augment.hpf_range=4"] and best.mean == pytest.approx(50.1)
    assert len(calls) == 12 and len(set(calls)) == 12
    assert [c.mean for c in candidates] == pytest.approx([-50.0 + 0.1, 46.1, 50.1, 34.1])
    _, first = choose([["a=1"], ["a=2"]], [0], lambda p, s: 1.0)
    assert first.point == ["a=1"]
    assert Candidate(["a=1"], {0: 2.0, 1: 4.0}).std == pytest.approx(1.4142136)


@pytest.mark.slow
def test_selection_end_to_end_scores_the_training_domains_of_each_last_checkpoint(tmp_path, demo_manifest):
    from helpers import tiny_config

    cfg = tiny_config(tmp_path, demo_manifest, "sel", epochs=1, eval_every=1, max_steps_per_epoch=3)
    out = tmp_path / "select"
    candidates, best = run_selection(str(cfg), [f"tracking.uri=sqlite:///{tmp_path / 'store.db'}"],
                                     ["optim.lr=0.05;0.0001"], [0], out)
    for c in candidates:
        run_dir = out / f"{point_name(c.point)}-seed0"  # scored per checkpoint: the report is under its name
        report = json.loads((run_dir / "select_eval" / "ckpt-000000003" / "retrieval.json").read_text())
        assert sorted({p["query"] for p in report["pairs"]}) == ["ink", "neon"]  # the training domains
        assert c.scores[0] == pytest.approx(100 * report["mean"]["mAP@All"])
    assert best is max(candidates, key=lambda c: c.scores[0])
    saved = json.loads((out / "selection.json").read_text())
    assert saved["chosen"] == best.point and saved["scored_on"] == ["ink", "neon"]
    assert "(chosen)" in (out / "selection.md").read_text()
