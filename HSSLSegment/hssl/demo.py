"""The demo: a real sample scan, 2-3 slices of its reference label as the "annotation",
fine-tune, predict, Dice on the slices that were not annotated, and a PNG overlay to look at."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import data
from .errors import HSSLError
from .evaluate import evaluate
from .finetune import FinetuneOptions
from .io import LabelInfo, read_image, read_labels, write_segmentation
from .progress import Progress
from .sparse import SliceRef, known_mask
from .workflow import run_finetune, run_predict

CASES = {"lung1": "lung tumour", "lung2": "lung tumour", "brain1": "brain tumour", "brain2": "brain tumour",
         "breast1": "breast lesion"}


def pick_slices(reference: np.ndarray, n: int, axis: int = 0) -> list[int]:
    """``n`` slices spread evenly through the structure's extent along ``axis`` (inner quantiles)."""
    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(reference.any(axis=other))[0]
    if present.size == 0:
        raise HSSLError("the reference label is empty")
    quantiles = [(i + 1) / (n + 1) for i in range(n)]
    picks = sorted({int(present[min(len(present) - 1, int(round(q * (len(present) - 1))))]) for q in quantiles})
    return picks


def make_sparse(reference: np.ndarray, slices: list[int], axis: int = 0) -> np.ndarray:
    sparse = np.zeros_like(reference)
    mask = known_mask(reference.shape, [SliceRef(axis, s) for s in slices])
    sparse[mask] = reference[mask]
    return sparse


def run_demo(a) -> int:
    if a.case not in CASES:
        raise HSSLError(f"unknown demo case '{a.case}': choose one of {sorted(CASES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data.fetch(["pyradiomics"])
    image_path = data.sample_path(f"{a.case}_image.nrrd")
    label_path = data.sample_path(f"{a.case}_label.nrrd")
    volume = read_image(image_path)
    reference = read_labels(label_path, volume.geometry)
    ref = (reference.array > 0).astype(np.uint8)
    axis = volume.geometry.axis_names().index("axial")
    slices = pick_slices(ref, a.annotated_slices, axis)
    table = [LabelInfo(CASES[a.case], 1, (0.90, 0.35, 0.25))]
    sparse_path = out / "annotation.seg.nrrd"
    write_segmentation(sparse_path, make_sparse(ref, slices, axis), volume.geometry, table, overwrite=True)
    print(f"demo: {a.case} ({image_path.name}, {volume.geometry.describe()})")
    print(f"demo: annotating {len(slices)} axial slice(s) {slices} of {int(ref.any(axis=(1, 2)).sum())} that "
          f"contain the {CASES[a.case]}; fine-tuning for {a.time_budget:.0f} s on device '{a.device}'")
    progress = Progress()
    opts = FinetuneOptions(time_budget=a.time_budget, device=a.device, seed=a.seed, init=a.init, roi=not a.no_roi)
    t0 = time.perf_counter()
    result = run_finetune(str(image_path), str(sparse_path), str(out / "model"), opts, progress, overwrite=True)
    pred = run_predict(result.model, str(image_path), str(out / "prediction.seg.nrrd"), device=a.device,
                       overwrite=True, progress=progress, annotation=result.annotation,
                       postprocess_mode=a.postprocess, roi=result.roi)
    region = ~known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
    scores = evaluate(pred["labels"], ref, volume.geometry, table, region)
    row = scores["labels"][0]
    summary = {"case": a.case, "annotated_slices": slices, "time_budget_s": a.time_budget, "steps": result.steps,
               "finetune_s": round(result.seconds, 1), "predict_s": round(pred["seconds"], 1),
               "total_s": round(time.perf_counter() - t0, 1), "heldout_dice": result.heldout_dice,
               "dice_unannotated": row["dice"], "hd95_mm_unannotated": row["hd95_mm"],
               "init": result.model.meta["training"].get("init", a.init),
               "postprocess": a.postprocess, "roi": not a.no_roi, "device": result.model.meta["training"]["device"], "seed": a.seed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = write_overlay(out / "overlay.png", volume, ref, pred["labels"], slices, axis, row["dice"])
    d = "n/a" if row["dice"] is None else f"{row['dice']:.3f}"
    h = "n/a" if row["hd95_mm"] is None else f"{row['hd95_mm']:.1f} mm"
    print(f"demo: Dice on the unannotated slices {d}, HD95 {h} ({result.steps} steps, "
          f"{summary['total_s']:.0f} s in all)")
    print(f"demo: wrote {out / 'prediction.seg.nrrd'} (open it in Slicer with {image_path}), {png}, "
          f"{out / 'summary.json'}")
    return 0


def write_overlay(path: Path, volume, ref: np.ndarray, pred: np.ndarray, annotated: list[int], axis: int,
                  dice: float | None) -> Path:
    """Axial slices through the structure: image, reference (green) and prediction (red) contours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    other = tuple(a for a in range(3) if a != axis)
    present = np.nonzero(ref.any(axis=other))[0]
    chosen = sorted(set(np.linspace(present[0], present[-1], num=min(8, len(present))).round().astype(int)))
    ys, xs = np.nonzero(np.moveaxis(ref, axis, 0).any(axis=0))
    pad = 25
    y0, y1 = max(0, ys.min() - pad), ys.max() + pad
    x0, x1 = max(0, xs.min() - pad), xs.max() + pad
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.4 * len(chosen), 2.8), squeeze=False)
    image = np.moveaxis(volume.array, axis, 0)
    r, p = np.moveaxis(ref, axis, 0), np.moveaxis(pred > 0, axis, 0)
    lo, hi = np.percentile(image[chosen][:, y0:y1, x0:x1], (1, 99))
    for ax, s in zip(axes[0], chosen):
        ax.imshow(image[s, y0:y1, x0:x1], cmap="gray", vmin=lo, vmax=hi)
        if r[s, y0:y1, x0:x1].any():
            ax.contour(r[s, y0:y1, x0:x1], levels=[0.5], colors="lime", linewidths=1)
        if p[s, y0:y1, x0:x1].any():
            ax.contour(p[s, y0:y1, x0:x1], levels=[0.5], colors="red", linewidths=1)
        ax.set_title(f"slice {s}" + (" (annotated)" if s in annotated else ""), fontsize=8)
        ax.axis("off")
    title = "green: reference, red: prediction"
    if dice is not None:
        title += f" - Dice on unannotated slices {dice:.3f}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
