"""Intensity normalisation: the same rule at fine-tuning, prediction and pretraining time.

Schemes (both map to roughly [0, 1], float32):
- ``ct``: clip Hounsfield units to a fixed window (default -1000..1000 HU) and rescale.
- ``percentile``: clip to the volume's own 0.5th-99.5th percentiles (of non-zero voxels when the
  volume has a zero background) and rescale. Used for MR and anything not calibrated.
The scheme and its parameters are stored in the model folder; percentiles are recomputed on each
volume a model is applied to (MR intensities are not comparable across scans).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .errors import HSSLError
from .model_format import ModelFormatError, check_normalization

CT_WINDOW = (-1000.0, 1000.0)


@dataclasses.dataclass(frozen=True)
class Normalization:
    scheme: str  # "ct" or "percentile"
    window: tuple[float, float] = CT_WINDOW
    percentiles: tuple[float, float] = (0.5, 99.5)

    def to_json(self) -> dict:
        return {"scheme": self.scheme, "window": list(self.window), "percentiles": list(self.percentiles)}

    @classmethod
    def from_json(cls, d: dict) -> "Normalization":
        """Read from a model folder (user input): finite, ordered numbers (``hssl.model_format``)."""
        try:
            check_normalization(d)
        except ModelFormatError as err:
            raise HSSLError(f"{err}: the model folder is corrupt; re-train the model") from None
        return cls(d["scheme"], tuple(float(v) for v in d.get("window", CT_WINDOW)),
                   tuple(float(v) for v in d.get("percentiles", (0.5, 99.5))))

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``[z, y, x]`` raw intensities -> float32 in about [0, 1]."""
        a = array.astype(np.float32, copy=True)
        if self.scheme == "ct":
            lo, hi = self.window
        else:
            sample = a[::2, ::2, ::2]
            if np.count_nonzero(sample) > 0.05 * sample.size and sample.min() == 0:
                sample = sample[sample != 0]
            lo, hi = np.percentile(sample, self.percentiles)
            if hi <= lo:
                lo, hi = float(a.min()), float(a.max())
        np.clip(a, lo, hi, out=a)
        a -= lo
        a /= max(hi - lo, 1e-6)
        return a


def guess_modality(array: np.ndarray) -> str:
    """'ct' when the intensities look like Hounsfield units (air near -1000), else 'mr'."""
    if np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating):
        lo = float(np.percentile(array[::4, ::4, ::4], 1))
        if lo <= -500:
            return "ct"
    return "mr"


def for_modality(modality: str, array: np.ndarray) -> Normalization:
    if modality == "auto":
        modality = guess_modality(array)
    if modality == "ct":
        return Normalization("ct")
    if modality in ("mr", "other"):
        return Normalization("percentile")
    raise HSSLError(f"unknown modality '{modality}': choose auto, ct or mr")
