"""The Python packages the engine needs inside Slicer, and which of them are missing.

Nothing here imports those packages (importing torch takes seconds and must never happen at Slicer
startup or in the Slicer process at all); availability is read from installed distribution
metadata. Lower bounds, not pins: users bring their own torch build (CPU, CUDA, MPS).
The bounds mirror the engine's pyproject.toml (Testing/slicer checks that they agree).
Stdlib only.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import re

# (distribution name, import name, minimum version). torch is installed through the PyTorch
# extension (it picks the build matching the GPU driver), the rest with pip.
TORCH_REQUIREMENT = ("torch", "torch", "2.2")
PIP_REQUIREMENTS = (
    ("monai", "monai", "1.4"),
    ("numpy", "numpy", "1.24"),
    ("SimpleITK", "SimpleITK", "2.3"),
    ("slicerio", "slicerio", "1.0"),
    ("nibabel", "nibabel", "4.0"),
    ("safetensors", "safetensors", "0.4"),
    ("tqdm", "tqdm", "4.60"),
)


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
