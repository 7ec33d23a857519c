"""Dice and 95th-percentile Hausdorff distance per label, optionally on unannotated slices only.

HD95 is computed in millimetres from SimpleITK distance maps (the image spacing is used), as the
95th percentile of the symmetric surface-to-surface distances.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .io import Geometry, LabelInfo


def dice(pred: np.ndarray, ref: np.ndarray) -> float | None:
    """Dice of two boolean arrays; None when both are empty (undefined)."""
    denom = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if denom == 0:
        return None
    return 2.0 * int(np.count_nonzero(pred & ref)) / denom


def hd95(pred: np.ndarray, ref: np.ndarray, spacing_xyz) -> float | None:
    """95th-percentile symmetric surface distance (mm); None if either mask is empty."""
    if not pred.any() or not ref.any():
        return None
    surfaces = []
    for mask in (pred, ref):
        img = sitk.GetImageFromArray(mask.astype(np.uint8))
        img.SetSpacing(tuple(float(v) for v in spacing_xyz))
        surfaces.append(sitk.LabelContour(img, fullyConnected=False))
    distances = []
    for a, b in ((0, 1), (1, 0)):
        # Distance of every surface voxel of one mask to the nearest surface voxel of the other.
        to_b = sitk.Abs(sitk.SignedMaurerDistanceMap(surfaces[b], insideIsPositive=False, squaredDistance=False,
                                                     useImageSpacing=True))
        on_a = sitk.GetArrayViewFromImage(surfaces[a]) > 0
        distances.append(sitk.GetArrayViewFromImage(to_b)[on_a])
    return float(np.percentile(np.concatenate(distances), 95))


def evaluate(pred: np.ndarray, ref: np.ndarray, geometry: Geometry, labels: list[LabelInfo],
             region: np.ndarray | None = None) -> dict:
    """Per-label Dice/HD95 of ``[z, y, x]`` label arrays (values as in ``labels``) inside ``region``."""
    if region is None:
        region = np.ones(ref.shape, dtype=bool)
    rows = []
    for lab in labels:
        p = (pred == lab.value) & region
        r = (ref == lab.value) & region
        rows.append({"name": lab.name, "value": lab.value, "dice": dice(p, r), "hd95_mm": hd95(p, r, geometry.spacing),
                     "ref_voxels": int(np.count_nonzero(r)), "pred_voxels": int(np.count_nonzero(p))})
    scored = [r["dice"] for r in rows if r["dice"] is not None]
    return {"labels": rows, "mean_dice": float(np.mean(scored)) if scored else None,
            "region_voxels": int(np.count_nonzero(region))}
