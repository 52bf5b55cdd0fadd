"""The in-house models shipped inside the package (trained by modelkit/), and the one `ferry run` serves."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
INHOUSE = ("ferry-tiny", "ferry-tiny-moe", "ferry-tiny-draft")
DEFAULT = "ferry-tiny"


def inhouse_path(name: str) -> Path:
    if name not in INHOUSE:
        raise ValueError(f"unknown in-house model {name!r}; choose one of {', '.join(INHOUSE)}")
    path = ASSETS / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"in-house model {name} is missing from {ASSETS}; reinstall ferry, or train it "
                                f"with `python -m modelkit.train {name}` in a source checkout")
    return path


def default_model_path() -> Path:
    return inhouse_path(DEFAULT)
