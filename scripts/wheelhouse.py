#!/usr/bin/env python3
"""Collects every wheel dgucdir needs on a node that already has PyTorch, for an offline install.

Run it with the project's environment (it reads the exact tested versions from what is installed
there, i.e. constraints.txt), on any machine with access to the package index:

    $(bash scripts/setup_env.sh) scripts/wheelhouse.py --python 3.12 \\
        --platform manylinux_2_28_x86_64 --out wheelhouse/

What it takes: the closure of ``dgucdir[<extras>]`` (default: cu13 and test, enough for the GPU
check), with markers evaluated for the target Python on Linux, minus torch, torchvision and
everything they require (the node brings those), at the versions installed here, as wheels for
the target Python and platform; plus a wheel of dgucdir itself. Files over ``--part-mib`` (default
60) are split into parts, manifest.json lists every file and part with its sha256, and
install_wheelhouse.py is copied beside them: on the node, ``python3 wheelhouse/install_wheelhouse.py``.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from install_wheelhouse import MANIFEST, sha256  # noqa: E402 - the installer is the format's other half

ROOT = Path(__file__).resolve().parent.parent
NODE_BRINGS = ("torch", "torchvision")
# what scripts/device_check.py imports beyond the node's torch and torchvision: it runs from the
# source tree (no dgucdir wheel, none of its DALI, MLflow or SLURM dependencies)
DEVICE_CHECK_NEEDS = ("accelerate", "pyyaml", "tqdm", "pillow", "numpy", "safetensors")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def target_environment(python: str) -> dict[str, str]:
    """Marker values of the target interpreter (Linux x86_64 CPython ``python``)."""
    env = default_environment()
    env.update(python_version=python, python_full_version=f"{python}.0", implementation_name="cpython",
               platform_python_implementation="CPython", sys_platform="linux", platform_system="Linux",
               os_name="posix", platform_machine="x86_64")
    return env


def closure(roots: list[Requirement], env: dict[str, str]) -> dict[str, str]:
    """{distribution: installed version} of ``roots`` and everything they require under ``env``."""
    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in found:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"wheelhouse: {req.name} is required for Python {env['python_version']} but not "
                             "installed here: run this with the environment of scripts/setup_env.sh") from None
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            wanted = [""] + sorted(req.extras)
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in wanted):
                todo.append(Requirement(sub.name + (f"[{','.join(sorted(sub.extras))}]" if sub.extras else "")))
    return found


def needed(extras: list[str], python: str, with_torch: bool, roots: list[str] | None = None) -> dict[str, str]:
    """The distributions to carry, pinned: the closure of ``roots`` (default: dgucdir with ``extras``) minus
    what a PyTorch node has."""
    env = target_environment(python)
    wanted = closure([Requirement(r) for r in roots] if roots else
                     [Requirement(f"dgucdir[{','.join(extras)}]" if extras else "dgucdir")], env)
    wanted.pop("dgucdir", None)
    if not with_torch:
        for name in closure([Requirement(n) for n in NODE_BRINGS], env):
            wanted.pop(name, None)
    return dict(sorted(wanted.items()))


def download(pins: dict[str, str], dest: Path, python: str, platform: str) -> None:
    """Binary wheels for the target; pure-Python projects published as sdists only are built here."""
    tags = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp",
            "--abi", f"cp{python.replace('.', '')}", "--abi", "abi3", "--abi", "none", "--platform", platform,
            "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64", "--platform", "any"]
    specs = [f"{n}=={v}" for n, v in pins.items()]
    res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                          "-d", str(dest), *tags, *specs])
    if res.returncode == 0:
        return
    have = {canonical(p.name.split("-")[0]) for p in dest.glob("*.whl")}
    for name, version in pins.items():  # one at a time, to say which one has no wheel
        if name in have:
            continue
        got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), *tags,
                              f"{name}=={version}"])
        if got.returncode != 0:
            print(f"wheelhouse: no {python}/{platform} wheel of {name}=={version}; building one", file=sys.stderr)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dest),
                            f"{name}=={version}"], check=True)


def split(path: Path, part_bytes: int) -> list[dict]:
    """Cuts ``path`` into ``<name>.partNNN`` files of at most ``part_bytes`` and removes it; [] when it fits."""
    if path.stat().st_size <= part_bytes:
        return []
    parts = []
    with open(path, "rb") as f:
        for i, block in enumerate(iter(lambda: f.read(part_bytes), b"")):
            part = path.with_name(f"{path.name}.part{i:03d}")
            part.write_bytes(block)
            parts.append({"name": part.name, "size": len(block), "sha256": sha256(part)})
    path.unlink()
    return parts


def write_manifest(house: Path, part_bytes: int, info: dict) -> dict:
    """Splits the large wheels and records every file's (and part's) sha256 in manifest.json."""
    files = []
    for wheel in sorted(house.glob("*.whl")):
        entry = {"name": wheel.name, "size": wheel.stat().st_size, "sha256": sha256(wheel)}
        entry["parts"] = split(wheel, part_bytes)
        files.append(entry)
    manifest = {**info, "part_bytes": part_bytes, "files": files}
    (house / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="the wheelhouse folder to write (must not exist or be empty)")
    parser.add_argument("--python", default="3.12", help="target Python version (default 3.12)")
    parser.add_argument("--platform", default="manylinux_2_28_x86_64", help="target wheel platform tag")
    parser.add_argument("--extras", default="cu13,test", help="dgucdir extras to carry (default cu13,test)")
    parser.add_argument("--part-mib", type=float, default=60.0, help="split files larger than this (default 60)")
    parser.add_argument("--with-torch", action="store_true", help="also carry torch and torchvision (large)")
    parser.add_argument("--for", dest="purpose", choices=["install", "device-check"], default="install",
                        help="install: dgucdir and its extras (default); device-check: only what "
                        "scripts/device_check.py needs beside torch, run from the source tree (no DALI)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        parser.error(f"--out {out}: not empty")
    out.mkdir(parents=True, exist_ok=True)
    check = args.purpose == "device-check"
    pins = needed([e for e in args.extras.split(",") if e], args.python, args.with_torch,
                  list(DEVICE_CHECK_NEEDS) if check else None)
    print(f"wheelhouse: {len(pins)} distributions for Python {args.python} on {args.platform}"
          f"{'' if args.with_torch else ' (torch, torchvision and their requirements left to the node)'}")
    with tempfile.TemporaryDirectory() as tmp:
        download(pins, Path(tmp), args.python, args.platform)
        for wheel in Path(tmp).glob("*.whl"):
            shutil.move(str(wheel), out / wheel.name)
    if not check:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)],
                       check=True)
    missing = set(pins) - {canonical(p.name.split("-")[0]) for p in out.glob("*.whl")}
    if missing:
        raise SystemExit(f"wheelhouse: no wheel for {', '.join(sorted(missing))}")
    manifest = write_manifest(out, int(args.part_mib * 2**20), {"python": args.python, "platform": args.platform,
                                                                 "extras": "" if check else args.extras,
                                                                 "purpose": args.purpose, "pins": pins})
    shutil.copy2(Path(__file__).with_name("install_wheelhouse.py"), out / "install_wheelhouse.py")
    sizes = [p["size"] for f in manifest["files"] for p in (f["parts"] or [f])]
    print(f"wheelhouse: {len(manifest['files'])} wheels, {sum(f['size'] for f in manifest['files']) / 2**20:.0f} MiB "
          f"in {len(sizes)} files, the largest {max(sizes) / 2**20:.1f} MiB; on the node: "
          f"python3 {out}/install_wheelhouse.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
