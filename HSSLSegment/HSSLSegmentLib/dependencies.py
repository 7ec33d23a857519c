"""The Python packages the engine needs inside Slicer, which of them are missing, and whether this
Slicer's Python can run the engine at all.

Nothing here imports those packages (importing torch takes seconds and must not happen at Slicer
startup); availability is read from installed distribution metadata. Lower bounds, not pins: users
bring their own torch build (CPU, CUDA, MPS). The bounds and the minimum Python mirror the engine's
pyproject.toml (Testing/slicer checks that they agree). Stdlib only; this file also imports on
Slicer 5.8's Python 3.9, so that such a Slicer gets the one-line message instead of a traceback.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import re
import sys

# (distribution name, import name, minimum version). torch is installed through the PyTorch
# extension (it picks the build matching the GPU driver), the rest with pip.
TORCH_REQUIREMENT = ("torch", "torch", "2.2")
PIP_REQUIREMENTS = (
    ("monai", "monai", "1.4"),
    ("numpy", "numpy", "1.24"),
    ("scipy", "scipy", "1.9"),
    ("SimpleITK", "SimpleITK", "2.3"),
    ("slicerio", "slicerio", "1.0"),
    ("nibabel", "nibabel", "4.0"),
    ("safetensors", "safetensors", "0.4"),
    ("tqdm", "tqdm", "4.60"),
)


# The engine needs Python >= 3.10 (pyproject.toml requires-python). Slicer 5.8 ships Python 3.9.10
# and Slicer 5.10 Python 3.12.10 (Slicer's CMakeLists.txt, Slicer_REQUIRED_PYTHON_VERSION), so the
# first Slicer that runs the engine is 5.10 (also checked when building: CMakeLists.txt).
MINIMUM_PYTHON = (3, 10)
MINIMUM_SLICER = "5.10"


def pythonProblem(versionInfo=None) -> str | None:
    """One line saying why this Slicer cannot run the engine (its Python is too old), or None."""
    version = tuple((versionInfo or sys.version_info)[:3])
    if version[:2] >= MINIMUM_PYTHON:
        return None
    have = ".".join(str(v) for v in version)
    need = ".".join(str(v) for v in MINIMUM_PYTHON)
    return (f"HSSLSegment needs Slicer {MINIMUM_SLICER} or later: its engine needs Python {need} or newer, and this "
            f"Slicer has Python {have}. Install Slicer {MINIMUM_SLICER} or later from download.slicer.org.")


@dataclasses.dataclass
class Requirement:
    distribution: str
    importName: str
    minimum: str
    installed: str | None

    @property
    def satisfied(self) -> bool:
        return self.installed is not None and versionTuple(self.installed) >= versionTuple(self.minimum)

    @property
    def pipSpec(self) -> str:
        return f"{self.distribution}>={self.minimum}"

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.distribution} (missing, need >= {self.minimum})"
        if not self.satisfied:
            return f"{self.distribution} {self.installed} (too old, need >= {self.minimum})"
        return f"{self.distribution} {self.installed}"


def versionTuple(version: str) -> tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``; pre-release tags are ignored (good enough for lower bounds)."""
    numbers = []
    for part in version.split("+")[0].split("."):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group(0)))
    return tuple(numbers)


def installedVersion(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def requirements() -> list[Requirement]:
    """Every requirement with the installed version (torch first)."""
    return [Requirement(d, i, m, installedVersion(d)) for d, i, m in (TORCH_REQUIREMENT, *PIP_REQUIREMENTS)]


def missingRequirements() -> list[Requirement]:
    return [r for r in requirements() if not r.satisfied]


def pipInstallArguments(missing: list[Requirement]) -> list[str]:
    """What ``slicer.util.pip_install`` gets for the missing packages other than torch: their
    lower bounds plus ``torch==<installed>``, so that resolving a package that depends on torch
    (MONAI) keeps the installed build (e.g. a CUDA one from the PyTorch extension) instead of
    replacing it with PyPI's. Empty when nothing but torch is missing."""
    importlib.invalidate_caches()  # torch may have been installed a moment ago
    specs = [r.pipSpec for r in missing if r.distribution != "torch"]
    torch = installedVersion("torch")
    if specs and torch:
        specs.append(f"torch=={torch}")
    return specs
