"""Shared test fixtures: the repository on sys.path and the shipped reference key lists."""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(ROOT))


def load_reference(name: str) -> dict:
    """One of the JSON files in tests/reference/ (without the .json suffix)."""
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())
