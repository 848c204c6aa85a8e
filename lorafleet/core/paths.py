"""Where run-time artefacts live. Everything is under one home folder (git-ignored)."""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    """The lorafleet home: $LORAFLEET_HOME, else the current directory (the repo root under `make`)."""
    return Path(os.environ.get("LORAFLEET_HOME", ".")).resolve()


def models_dir() -> Path:
    return home() / "models"


def adapters_dir() -> Path:
    return home() / "adapters"


def runs_dir() -> Path:
    return home() / "runs"


def data_dir() -> Path:
    """The state store's SQLite file and uploaded files (serve.store)."""
    return home() / "data"
