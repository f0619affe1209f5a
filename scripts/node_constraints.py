#!/usr/bin/env python3
"""Writes constraints-node.txt: constraints.txt without what a GPU node's PyTorch brings.

``pip install -c constraints.txt`` would pin torch to the version the tests run with and replace a
node's own (CUDA-matched) torch. The node file drops torch, torchvision and everything they require
(the CUDA libraries, triton), as installed in this environment, so only the rest is pinned.
"""

from __future__ import annotations

import sys
from pathlib import Path

from packaging.requirements import Requirement

sys.path.insert(0, str(Path(__file__).resolve().parent))
from wheelhouse import NODE_BRINGS, canonical, closure, target_environment  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def node_constraints(text: str, python: str) -> str:
    """``text`` (a constraints file) without the lines of the node's PyTorch closure, with a header saying so."""
    brought = set(closure([Requirement(n) for n in NODE_BRINGS], target_environment(python)))
    kept = [line for line in text.splitlines()
            if line.startswith("#") or not line.strip() or canonical(line.split("==")[0]) not in brought]
    header = ["# constraints.txt without torch, torchvision and what they require (the node brings its own",
              "# PyTorch): pip install -c constraints-node.txt '.[cu13]'. Written by scripts/node_constraints.py."]
    return "\n".join(header + [line for line in kept if not line.startswith("#")]) + "\n"


if __name__ == "__main__":
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    out = ROOT / "constraints-node.txt"
    out.write_text(node_constraints((ROOT / "constraints.txt").read_text(), python))
    print(f"{out.name}: {sum(1 for l in out.read_text().splitlines() if l and not l.startswith('#'))} packages")
