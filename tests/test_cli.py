"""The `dgucdir` command: help texts, config printing, pack, eval and search on a real checkpoint."""

import json

import pytest
import yaml


from helpers import REPO, cli, run, tiny_config

SUBCOMMANDS = ["config", "pack", "demo-data", "demo", "train", "eval", "search", "export", "ablate", "runs", "bench"]


def test_help_explains_every_subcommand():
    top = cli("--help").stdout
    for sub in SUBCOMMANDS + ["submit"]:
        assert sub in top
    for sub in SUBCOMMANDS:
        out = cli(sub, "--help").stdout
        assert out.startswith("usage: dgucdir " + sub) and len(out.splitlines()) > 3
    assert "--dry-run" in cli("submit", "--help").stdout


def test_config_prints_the_resolved_config_and_rejects_bad_keys():
    out = cli("config", "configs/pacs.yaml", "train.epochs=7").stdout
    assert yaml.safe_load(out)["train"]["epochs"] == 7
    bad = cli("config", "configs/pacs.yaml", "train.epochz=7", check=False)
    assert bad.returncode == 2 and "train.epochz" in bad.stderr and "unknown key" in bad.stderr


def test_pack_cli_two_domains_reports_throughput(tmp_path, demo_root):
    args = ["pack", "--root", str(demo_root / "images"), "--out", str(tmp_path / "out"), "--workers", "2"]
    for d in ("ink", "sketch"):
        args += ["--list", f"{d}={demo_root / 'lists' / f'{d}.txt'}"]
    res = cli(*args)
    assert "packed" in res.stdout and "images/s" in res.stdout and "skipped 0" in res.stdout
    assert set(json.loads((tmp_path / "out/manifest.json").read_text())["domains"]) == {"ink", "sketch"}
    (tmp_path / "bad.txt").write_text("ink/0/x.jpg 0\nno-label-here\n")
    bad = cli("pack", "--list", f"ink={tmp_path / 'bad.txt'}", "--out", str(tmp_path / "o2"), check=False)
    assert bad.returncode == 2 and "bad.txt:2" in bad.stderr


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, demo_manifest):
    tmp = tmp_path_factory.mktemp("ckpt")
    run(["train", str(tiny_config(tmp, demo_manifest, "c", epochs=1, max_steps_per_epoch=2, eval_every=5))])
    return next((tmp / "c/checkpoints").glob("ckpt-*"))


def test_eval_checkpoint_and_baselines(tmp_path, checkpoint, demo_manifest):
    res = cli("eval", str(checkpoint), "--domains", "ink", "neon", "photo", "--out", str(tmp_path / "e"))
    report = json.loads((tmp_path / "e/retrieval.json").read_text())
    assert len(report["pairs"]) == 6 and {"P@1", "mAP@All"} <= set(report["mean"])
    assert (tmp_path / "e/retrieval_ink_to_photo.png").is_file()
    assert "| ink | — |" in res.stdout
    cfg = checkpoint.parent.parent.parent / "c.yaml"
    cli("eval", "--init", "random", "--config", str(cfg), "--out", str(tmp_path / "r"))
    assert json.loads((tmp_path / "r/retrieval.json").read_text())["domains"] == ["photo", "sketch"]
    bad = cli("eval", str(checkpoint), "--config", str(REPO / "configs/pacs.yaml"), "--out", str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "another architecture" in bad.stderr


def test_eval_and_search_take_an_exported_encoder(tmp_path, checkpoint, demo_root):
    """`dgucdir export`'s .safetensors carries its config: eval and search use it as they use the checkpoint,
    with the same results."""
    exported = tmp_path / "encoder.safetensors"
    cli("export", str(checkpoint), "--out", str(exported))
    for source, out in ((checkpoint, "from_ckpt"), (exported, "from_file")):
        cli("eval", str(source), "eval.picture_queries=0", "--domains", "ink", "photo", "--out", str(tmp_path / out))
    assert json.loads((tmp_path / "from_file/retrieval.json").read_text()) == \
        json.loads((tmp_path / "from_ckpt/retrieval.json").read_text())
    query = demo_root / "images" / "photo" / "3" / "0003.jpg"
    found = [cli("search", str(source), "--gallery", "sketch", "--query", str(query), "--top", "3",
                 "--out", str(tmp_path / "s.png")).stdout for source in (exported, checkpoint)]
    assert found[0] == found[1] and "sketch" in found[0]


def test_search_prints_top_k_caches_the_gallery_and_rejects_bad_input(tmp_path, checkpoint, demo_root):
    query = demo_root / "images" / "photo" / "3" / "0003.jpg"
    out = tmp_path / "s.png"
    res = cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(query), "--top", "4", "--out", str(out))
    rows = [l for l in res.stdout.splitlines() if l.strip()[:1].isdigit()]
    assert len(rows) == 4 and out.is_file()
    scores = [float(r.split()[1]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    cache = list((checkpoint / "search_cache").glob("sketch-*.pt"))
    assert len(cache) == 1
    mtime = cache[0].stat().st_mtime
    cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(query), "--out", str(out))
    assert cache[0].stat().st_mtime == mtime  # reused, not recomputed
    bad = cli("search", str(checkpoint), "--gallery", "clipart", "--query", str(query), check=False)
    assert bad.returncode == 2 and "domain 'clipart' is not in" in bad.stderr
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    bad = cli("search", str(checkpoint), "--gallery", "sketch", "--query", str(tmp_path / "broken.jpg"), check=False)
    assert bad.returncode == 2 and "cannot be read as an image" in bad.stderr


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(monkeypatch, capsys):
    from dgucdir import cli as cli_module
    from dgucdir.errors import DataError

    def user_error(args):
        raise DataError("no manifest at data/x/manifest.json")

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli_module, "cmd_config", user_error)
    assert cli_module.main(["config", "configs/demo.yaml"]) == 2
    assert capsys.readouterr().err == "dgucdir config: error: no manifest at data/x/manifest.json\n"
    monkeypatch.setattr(cli_module, "cmd_config", bug)
    with pytest.raises(KeyError, match="a bug"):
        cli_module.main(["config", "configs/demo.yaml"])


def test_export_round_trips_the_encoder_in_both_layouts(tmp_path, checkpoint):
    import torch

    from dgucdir.model.encoder import MOCO_PREFIX
    from dgucdir.model.loading import encoder_from_checkpoint, load_encoder

    want, _ = encoder_from_checkpoint(checkpoint)
    for layout in ("dgucdir", "moco_v2"):
        out = tmp_path / f"{layout}.safetensors"
        cli("export", str(checkpoint), "--out", str(out), "--layout", layout)
        got, cfg = load_encoder(out)
        assert cfg.model.arch == "resnet_narrow"
        for (k, a), (_, b) in zip(want.state_dict().items(), got.state_dict().items()):
            assert torch.equal(a, b), k
    from safetensors import safe_open

    with safe_open(str(tmp_path / "moco_v2.safetensors"), framework="pt") as f:
        assert all(k.startswith(MOCO_PREFIX) for k in f.keys()) and f"{MOCO_PREFIX}conv1.weight" in f.keys()


def test_eval_log_to_run_lands_in_the_training_run(tmp_path, checkpoint):
    import torch
    from mlflow.tracking import MlflowClient

    meta = torch.load(checkpoint / "state.pt", weights_only=True)
    run_id, step = meta["meta"]["mlflow_run_id"], meta["progress"]["global_step"]
    res = cli("eval", str(checkpoint), "--log-to-run", "--out", str(tmp_path / "posthoc"))
    assert f"logged to MLflow run {run_id}" in res.stdout
    client = MlflowClient(meta["meta"]["config"]["tracking"]["uri"])
    history = client.get_metric_history(run_id, "posthoc/mean/P_at_1")
    report = json.loads((tmp_path / "posthoc/retrieval.json").read_text())
    assert [(m.step, round(m.value, 9)) for m in history] == [(step, round(report["mean"]["P@1"], 9))]


def test_the_final_encoder_is_an_mlflow_model_with_the_checkpoints_features(checkpoint):
    """`mlflow.pytorch.load_model` on the run's model URI gives the trained encoder back, bit for bit."""
    pytest.importorskip("pandas", reason="the model flavour needs the full MLflow: pip install 'dgucdir[mlflow]'")
    import mlflow.pytorch
    import torch
    from mlflow.tracking import MlflowClient

    from dgucdir.model.loading import encoder_from_checkpoint

    meta = torch.load(checkpoint / "state.pt", weights_only=True)["meta"]
    mlflow.set_tracking_uri(meta["config"]["tracking"]["uri"])
    uri = MlflowClient().get_run(meta["mlflow_run_id"]).data.tags["dgucdir.model_uri"]
    loaded = mlflow.pytorch.load_model(uri).eval()
    want, _ = encoder_from_checkpoint(checkpoint)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded.pooled(x), want.eval().pooled(x))


def test_words_after_a_checkpoint_are_overrides_of_its_config_or_an_error(tmp_path, checkpoint):
    res = cli("eval", str(checkpoint), "eval.topk=[1,3]", "--domains", "photo", "sketch", "--out", str(tmp_path / "k"))
    mean = json.loads((tmp_path / "k/retrieval.json").read_text())["mean"]
    assert {"P@1", "P@3"} <= set(mean) and "P@5" not in mean, mean  # the saved config says [1, 5, 15]
    assert "P@3" in res.stdout
    for words, says in ((["foo.bar=1"], "foo.bar"), (["notanoverride"], "'notanoverride': not an override"),
                        ([str(checkpoint)], "a second checkpoint")):
        bad = cli("eval", str(checkpoint), *words, "--out", str(tmp_path / "x"), check=False)
        assert bad.returncode == 2 and says in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    bad = cli("export", str(checkpoint), str(checkpoint), "--out", str(tmp_path / "e.safetensors"), check=False)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_a_crafted_checkpoint_is_refused_by_every_command_and_runs_nothing(tmp_path, demo_manifest):
    import torch

    from test_checkpoint import CreatesFile

    marker = tmp_path / "marker"
    cfg = tiny_config(tmp_path, demo_manifest, "crafted")
    crafted = tmp_path / "crafted/checkpoints/ckpt-000000005"
    crafted.mkdir(parents=True)
    torch.save({"meta": CreatesFile(marker), "model": {}}, crafted / "state.pt")
    torch.save({"rng": CreatesFile(marker)}, crafted / "rank0.pt")
    for args in (["eval", str(crafted)], ["export", str(crafted), "--out", str(tmp_path / "e.safetensors")],
                 ["train", str(cfg), "--resume"], ["search", str(crafted), "--gallery", "sketch", "--query", "x.png"]):
        res = cli(*args, check=False)
        assert res.returncode == 2, (args, res.stderr[-2000:])
        last = res.stderr.strip().splitlines()[-1]
        assert last.startswith(f"dgucdir {args[0]}: error: {crafted / 'state.pt'}: refused by the safe loader"), last
        assert "Traceback" not in res.stderr and not marker.exists(), args
