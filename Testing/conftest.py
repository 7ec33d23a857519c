"""Shared pytest fixtures. The engine is imported from the source tree (as Slicer does from its
install tree), so the tests also run without ``pip install -e .``."""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "HSSLSegment"))
os.environ.setdefault("PYTHONPATH", str(ROOT / "HSSLSegment"))
