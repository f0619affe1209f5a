"""Optional parts of the install, and the one-line error that names the extra to add.

A training node installs only what training needs (`pip install dgucdir[cu13]`); the pictures of
``runs --png``/``ablate`` (matplotlib) and the full MLflow package (UI/server, the mlflow.pytorch
model flavour, which needs pandas) are extras, asked for where they are used.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


class MissingExtraError(UserError):
    """A feature whose packages this install left out."""


def require(module: str, extra: str, purpose: str, alternative: str = "") -> ModuleType:
    """``module`` imported, or :class:`MissingExtraError` naming what is missing and the extra to install
    (``alternative``: another install that also provides it, e.g. DALI for another CUDA version)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        other = f" (or {alternative})" if alternative else ""
        # the package that is missing, unless that is only the namespace above the module (``nvidia``)
        missing = exc.name if exc.name and not module.startswith(f"{exc.name}.") else module
        raise MissingExtraError(f"{purpose} needs the Python package {missing!r}, which this install leaves out: "
                                f"pip install 'dgucdir[{extra}]'{other}") from exc


def pyplot(purpose: str) -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend (no display on cluster nodes)."""
    matplotlib = require("matplotlib", "report", purpose)
    matplotlib.use("Agg")
    return require("matplotlib.pyplot", "report", purpose)
