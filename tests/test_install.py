"""Installing where GPU nodes are: metadata a Python 3.12 / torch 2.11 node accepts, the offline
wheelhouse (split, verify, install), and a training install without the full MLflow package."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from helpers import REPO, history, tiny_config

sys.path.insert(0, str(REPO / "scripts"))
import install_wheelhouse  # noqa: E402
import wheelhouse  # noqa: E402


def make_wheel(folder: Path, name: str, version: str, requires: list[str] = (), requires_python: str | None = None,
               payload: bytes = b"") -> Path:
    """A minimal valid wheel: one module (``<name>/__init__.py`` holding ``payload``) and its dist-info."""
    module = name.replace("-", "_")
    info = f"{module}-{version}.dist-info"
    meta = [f"Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Python: {requires_python}"] if requires_python else []
    meta += [f"Requires-Dist: {r}" for r in requires]
    files = {f"{module}/__init__.py": b"DATA = " + repr(payload).encode() + b"\n",
             f"{info}/METADATA": ("\n".join(meta) + "\n").encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{p},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
              for p, d in files.items()] + [f"{info}/RECORD,,"]
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, d in files.items():
            z.writestr(p, d)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def test_split_parts_reassemble_to_the_same_bytes_and_a_tampered_part_is_refused(tmp_path):
    data = bytes(range(256)) * 10 + b"tail"  # 2564 bytes: three parts of 1 KiB
    (tmp_path / "big-1.0-py3-none-any.whl").write_bytes(data)
    (tmp_path / "small-1.0-py3-none-any.whl").write_bytes(b"fits")
    manifest = wheelhouse.write_manifest(tmp_path, 1024, {"python": "3.12"})
    big, small = manifest["files"]
    assert [p["size"] for p in big["parts"]] == [1024, 1024, 516] and small["parts"] == []
    assert not (tmp_path / big["name"]).exists()  # only the parts travel
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    out = tmp_path / "out"
    out.mkdir()
    assert install_wheelhouse.reassemble(tmp_path, big, out).read_bytes() == data
    assert install_wheelhouse.reassemble(tmp_path, small, out).read_bytes() == b"fits"
    part = tmp_path / big["parts"][1]["name"]
    part.write_bytes(part.read_bytes()[:-1] + b"X")
    with pytest.raises(install_wheelhouse.ChecksumError, match=r"part001: checksum mismatch"):
        install_wheelhouse.reassemble(tmp_path, big, out)
    res = subprocess.run([sys.executable, str(REPO / "scripts/install_wheelhouse.py"), str(tmp_path), "--verify-only"],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "refused, nothing installed" in res.stderr and "part001" in res.stderr


def test_the_installer_installs_a_split_wheelhouse_offline_into_a_target(tmp_path):
    house, target = tmp_path / "house", tmp_path / "target"
    house.mkdir()
    payload = bytes(range(256)) * 64  # 16 KiB of incompressible-enough data: the wheel is split
    make_wheel(house, "tinypkg", "1.2", payload=payload)
    manifest = wheelhouse.write_manifest(house, 4096, {})
    assert len(manifest["files"][0]["parts"]) >= 2
    res = subprocess.run([sys.executable, str(REPO / "scripts/install_wheelhouse.py"), str(house), "--target",
                          str(target)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "installed: tinypkg 1.2" in res.stdout
    got = subprocess.run([sys.executable, "-c", "import tinypkg; print(len(tinypkg.DATA))"], cwd=tmp_path,
                         env={"PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert got.stdout.strip() == str(len(payload))


def lowest_allowed(req: Requirement) -> str:
    """The lowest version a requirement's specifier names as allowed (its >= or == bound), else 1.0."""
    bounds = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    return min(bounds, key=lambda v: tuple(int(x) for x in v.split("."))) if bounds else "1.0"


def resolve(tmp_path: Path, torch_version: str, python: str) -> subprocess.CompletedProcess:
    """pip's resolver, offline, over dgucdir's declared metadata and stand-in wheels of its requirements
    at their lowest allowed versions, with torch at ``torch_version``, for Python ``python``."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    index = tmp_path / f"index-{torch_version}-{python}"
    index.mkdir()
    make_wheel(index, "dgucdir", project["version"], project["dependencies"], project["requires-python"])
    for text in project["dependencies"]:
        req = Requirement(text)
        version = {"torch": torch_version, "torchvision": "0.26.0"}.get(req.name, lowest_allowed(req))
        make_wheel(index, req.name, version)
    return subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links",
                           str(index), "--python-version", python, "--only-binary=:all:", "--target",
                           str(tmp_path / "t"), "--report", "-", "--quiet", "dgucdir"],
                          capture_output=True, text=True)


def test_pip_accepts_the_package_on_python_312_with_torch_211(tmp_path):
    res = resolve(tmp_path, "2.11.0", "3.12")
    assert res.returncode == 0, res.stderr
    chosen = {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(res.stdout)["install"]}
    assert chosen["torch"] == "2.11.0" and chosen["torchvision"] == "0.26.0"
    assert resolve(tmp_path, "2.11.0", "3.13").returncode == 0
    older = resolve(tmp_path, "2.10.0", "3.12")  # the check can fail: a torch below the declared minimum
    assert older.returncode != 0 and "conflicting dependencies" in older.stderr
    requires_python = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert {"3.11", "3.12", "3.13", "3.14"} <= set(requires_python.filter(["3.10", "3.11", "3.12", "3.13", "3.14"]))


def site_without(dists: set[str], farm: Path) -> Path:
    """A copy (by symlinks) of this environment's site-packages without ``dists``: their packages and
    their metadata are gone, as in an install that never had them. Entries another distribution also
    owns (namespace folders such as ``google``) stay."""
    import sysconfig

    def tops(dist: metadata.Distribution) -> set[str]:
        return {Path(f).parts[0] for f in dist.files or [] if not Path(f).parts[0].startswith("..")}

    gone, kept = set(), set()
    for dist in metadata.distributions():
        (gone if wheelhouse.canonical(dist.metadata["Name"]) in dists else kept).update(tops(dist))
    site = Path(sysconfig.get_paths()["purelib"])
    farm.mkdir()
    for entry in site.iterdir():
        if entry.name not in gone - kept and entry.suffix != ".pth":
            (farm / entry.name).symlink_to(entry)
    return farm


RUN_FROM = """
import runpy, sys
sys.path[:0] = [{site!r}, {repo!r}]
sys.argv[0] = 'dgucdir'
runpy.run_module('dgucdir', run_name='__main__')
"""


@pytest.mark.slow
def test_training_runs_with_the_mlflow_client_only(tmp_path, demo_manifest):
    """What the full `mlflow` adds over `mlflow-skinny` (pandas, Flask, matplotlib, ...) is taken away:
    `--help` and training work, model logging and pictures name the extra to install."""
    try:
        metadata.distribution("mlflow")
    except metadata.PackageNotFoundError:
        pytest.skip("compares with the full MLflow package, which this environment does not have")
    env = wheelhouse.target_environment(f"{sys.version_info.major}.{sys.version_info.minor}")
    training_node = set(wheelhouse.closure([Requirement("dgucdir[cu13]")], env))
    extra_only = set(wheelhouse.closure([Requirement("mlflow")], env)) - training_node
    assert {"pandas", "flask", "matplotlib", "mlflow"} <= extra_only
    site = site_without(extra_only - {"mlflow"}, tmp_path / "site")  # mlflow's own package is skinny's too
    assert not (site / "pandas").exists() and (site / "mlflow").exists() and (site / "torch").exists()

    def dgucdir(*args: str) -> subprocess.CompletedProcess:
        code = RUN_FROM.format(site=str(site), repo=str(REPO))
        return subprocess.run([sys.executable, "-S", "-c", code, *args], cwd=REPO, capture_output=True, text=True,
                              timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})

    res = dgucdir("--help")
    assert res.returncode == 0 and "usage: dgucdir" in res.stdout, res.stderr
    res = dgucdir("runs", "--store", str(tmp_path), "--png", str(tmp_path / "r.png"))
    assert res.returncode == 2 and res.stderr.strip().endswith("pip install 'dgucdir[report]'"), res.stderr
    cfg = tiny_config(tmp_path, demo_manifest, "skinny", epochs=1, max_steps_per_epoch=2, eval_every=5)
    res = dgucdir("train", str(cfg))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the MLflow model of the encoder needs the Python package 'pandas'" in res.stderr
    assert "pip install 'dgucdir[mlflow]'" in res.stderr
    assert (tmp_path / "skinny/encoder.safetensors").is_file()
    assert sorted(history(tmp_path / "skinny")[1]) == [1, 2]  # tracked through the client-only install


def test_node_constraints_are_the_lock_without_the_nodes_pytorch():
    """constraints-node.txt is what scripts/node_constraints.py makes of constraints.txt: no torch, torchvision
    or CUDA library of torch's; the rest (DALI's own CUDA packages included) pinned as in the lock."""
    import node_constraints

    committed = (REPO / "constraints-node.txt").read_text()
    assert committed == node_constraints.node_constraints((REPO / "constraints.txt").read_text(),
                                                          f"{sys.version_info.major}.{sys.version_info.minor}")
    names = {wheelhouse.canonical(line.split("==")[0]) for line in committed.splitlines() if "==" in line}
    assert not names & {"torch", "torchvision", "triton", "nvidia-cudnn-cu13", "nvidia-cublas"}
    assert {"accelerate", "mlflow-skinny", "nvidia-dali-cuda130"} <= names


@pytest.mark.slow
def test_installing_with_the_node_constraints_keeps_the_nodes_torch(tmp_path):
    """pip offline, in a venv holding torch 2.11, against an index that also has the lock's newer torch:
    with constraints-node.txt torch stays; with constraints.txt pip would replace it (the check can fail)."""
    pins = {wheelhouse.canonical(line.split("==")[0]): line.split("==")[1]
            for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line}
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    index = tmp_path / "index"
    index.mkdir()
    make_wheel(index, "dgucdir", project["version"], project["dependencies"])
    for text in project["dependencies"]:
        name = Requirement(text).name
        make_wheel(index, name, pins[wheelhouse.canonical(name)])
    make_wheel(index, "torch", "2.11.0")
    make_wheel(index, "torchvision", "0.26.0")
    venv = tmp_path / "node"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin/python"), "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "install", "-q", "--no-index", "--find-links", str(index), "torch==2.11.0",
                    "torchvision==0.26.0"], check=True)

    def planned(constraints: str) -> dict[str, str]:
        res = subprocess.run([*pip, "install", "--dry-run", "--no-index", "--find-links", str(index), "-c",
                              str(REPO / constraints), "--report", "-", "--quiet", "dgucdir"],
                             capture_output=True, text=True)
        assert res.returncode == 0 or constraints == "constraints.txt", res.stderr
        return {i["metadata"]["name"]: i["metadata"]["version"] for i in json.loads(res.stdout or '{"install": []}')
                ["install"]} if res.returncode == 0 else {"torch": "unresolvable: " + res.stderr[-200:]}

    kept = planned("constraints-node.txt")
    assert "torch" not in kept and "torchvision" not in kept and kept["dgucdir"] == project["version"]
    assert "torch" in planned("constraints.txt")  # the full lock asks for another torch than the node's
