#!/usr/bin/env python3
"""Installs a wheelhouse made by scripts/wheelhouse.py, with no network: reassemble, verify, install.

Travels inside the wheelhouse (the builder copies it there), so a node needs nothing but Python:

    python3 wheelhouse/install_wheelhouse.py                      # into the Python that runs it
    python3 wheelhouse/install_wheelhouse.py --python venv/bin/python
    python3 wheelhouse/install_wheelhouse.py --target /scratch/dgucdir-libs   # then PYTHONPATH=...

Every part and every reassembled wheel is checked against the sha256 in manifest.json before
anything is installed; one mismatch and nothing is. Wheels whose distribution is already
installed at the same version are skipped (the node's own PyTorch is never touched: the
wheelhouse does not carry it). Standard library only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

MANIFEST = "manifest.json"


class ChecksumError(Exception):
    """A part or a wheel whose bytes are not the ones the manifest was written for."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reassemble(house: Path, entry: dict, into: Path) -> Path:
    """The wheel of one manifest entry, whole and verified, in ``into`` (or in place when unsplit)."""
    parts = entry.get("parts") or []
    if not parts:
        path = house / entry["name"]
    else:
        path = into / entry["name"]
        with open(path, "wb") as out:
            for part in parts:
                part_path = house / part["name"]
                if not part_path.is_file():
                    raise ChecksumError(f"{part_path}: missing part of {entry['name']}")
                if sha256(part_path) != part["sha256"]:
                    raise ChecksumError(f"{part_path}: checksum mismatch (the part was damaged or changed)")
                with open(part_path, "rb") as f:
                    shutil.copyfileobj(f, out)
    if not path.is_file():
        raise ChecksumError(f"{path}: missing")
    if sha256(path) != entry["sha256"]:
        raise ChecksumError(f"{path}: checksum mismatch (the wheel was damaged or changed)")
    return path


def wheel_identity(filename: str) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    name, version = filename.split("-")[:2]
    return re.sub(r"[-_.]+", "-", name).lower(), version


def installed_versions(python: str) -> dict[str, str]:
    """What the interpreter has installed (-P: not what happens to lie in the current folder)."""
    code = ("import importlib.metadata as m, json, re; print(json.dumps({re.sub(r'[-_.]+', '-', "
            "d.metadata['Name']).lower(): d.version for d in m.distributions() if d.metadata['Name']}))")
    return json.loads(subprocess.run([python, "-P", "-c", code], check=True, capture_output=True, text=True).stdout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wheelhouse", nargs="?", default=str(Path(__file__).resolve().parent),
                        help="the wheelhouse folder (default: the folder of this script)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter to install for (default: this one)")
    parser.add_argument("--target", help="install into this folder (pip --target) instead of the interpreter's env")
    parser.add_argument("--verify-only", action="store_true", help="check every checksum, install nothing")
    args = parser.parse_args(argv)
    house = Path(args.wheelhouse)
    manifest = json.loads((house / MANIFEST).read_text())
    have = {} if args.target else installed_versions(args.python)
    with tempfile.TemporaryDirectory(prefix="wheelhouse-") as tmp:
        try:
            wheels = [reassemble(house, entry, Path(tmp)) for entry in manifest["files"]]
        except ChecksumError as exc:
            print(f"install_wheelhouse: refused, nothing installed: {exc}", file=sys.stderr)
            return 1
        print(f"verified {len(wheels)} wheels ({sum(w.stat().st_size for w in wheels) / 2**20:.0f} MiB)")
        if args.verify_only:
            return 0
        todo = [w for w in wheels if have.get(wheel_identity(w.name)[0]) != wheel_identity(w.name)[1]]
        for w in wheels:
            if w not in todo:
                print(f"  already installed: {' '.join(wheel_identity(w.name))}")
        if todo:
            where = ["--target", args.target] if args.target else []
            subprocess.run([args.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-cache-dir",
                            "--disable-pip-version-check", *where, *map(str, todo)], check=True)
        for w in todo:
            print(f"  installed: {' '.join(wheel_identity(w.name))}")
    if not args.target:  # what the node's own packages (its torch) lack, said now rather than at import
        subprocess.run([args.python, "-m", "pip", "check", "--disable-pip-version-check"], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
