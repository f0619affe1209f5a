"""Shared fixtures: the demo dataset (built once per session) and a 2-process gloo runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    """Rendered + packed demo dataset: <root>/images, <root>/lists, <root>/shards/manifest.json."""
    from dgucdir.demo import build_demo_data

    root = tmp_path_factory.mktemp("demo")
    build_demo_data(root)
    return root


@pytest.fixture(scope="session")
def demo_manifest(demo_root) -> Path:
    return demo_root / "shards" / "manifest.json"
