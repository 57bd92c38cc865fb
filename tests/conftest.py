"""Shared test helpers: the repository on sys.path, the shipped reference key lists, and the
scripts under tools/ as modules."""
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
sys.path.insert(0, str(ROOT))


def load_reference(name: str) -> dict:
    """One of the JSON files in tests/reference/ (without the .json suffix)."""
    return json.loads((REFERENCE_DIR / f"{name}.json").read_text())


def load_module(path: str):
    """A script of the repository (e.g. "tools/export_onnx.py") imported as a module."""
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
