"""The demo: a real sample scan, 2-3 slices of its reference label as the "annotation",
fine-tune, predict, Dice on the slices that were not annotated, and a PNG overlay to look at."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from . import data, fewslice
from .errors import HSSLError
from .finetune import FinetuneOptions
from .io import write_segmentation
from .progress import Progress
from .workflow import run_finetune, run_predict

# The demo's cases are the sample scans with a lesion label; re-exported for older callers.
CASES = fewslice.SAMPLE_CASES
pick_slices = fewslice.pick_slices


def run_demo(a) -> int:
    if a.case not in CASES:
        raise HSSLError(f"unknown demo case '{a.case}': choose one of {sorted(CASES)}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data.fetch(["pyradiomics"])
    image_path = data.sample_path(f"{a.case}_image.nrrd")
    case = fewslice.sample_case(a.case, a.annotated_slices)
    volume, ref, axis, slices = case.volume, case.reference.array, case.axis, case.slices
    sparse_path = out / "annotation.seg.nrrd"
    write_segmentation(sparse_path, case.sparse, volume.geometry, case.reference.labels, overwrite=True)
    print(f"demo: {a.case} ({image_path.name}, {volume.geometry.describe()})")
    print(f"demo: annotating {len(slices)} axial slice(s) {slices} of {len(case.structure_slices)} that "
          f"contain the {CASES[a.case]}; fine-tuning for {a.time_budget:.0f} s on device '{a.device}'")
    progress = Progress()
    opts = FinetuneOptions(time_budget=a.time_budget, device=a.device, seed=a.seed, init=a.init, roi=not a.no_roi)
    t0 = time.perf_counter()
    result = run_finetune(str(image_path), str(sparse_path), str(out / "model"), opts, progress, overwrite=True,
                          slices=[case.slice_spec])
    pred = run_predict(result.model, str(image_path), str(out / "prediction.seg.nrrd"), device=a.device,
                       overwrite=True, progress=progress, annotation=result.annotation,
                       postprocess_mode=a.postprocess, roi=result.roi)
    scores = fewslice.score(case, pred["labels"])
    where = "the unannotated slices" if not case.whole_volume else "the whole volume (every slice was annotated)"
    summary = {"case": a.case, "annotated_slices": slices, "time_budget_s": a.time_budget, "steps": result.steps,
               "finetune_s": round(result.seconds, 1), "predict_s": round(pred["seconds"], 1),
               "total_s": round(time.perf_counter() - t0, 1), "heldout_dice": result.heldout_dice,
               "dice_unannotated": scores["dice"], "hd95_mm_unannotated": scores["hd95_mm"],
               "scored_on": scores["scored_on"],
               "init": result.model.meta["training"].get("init", a.init),
               "postprocess": a.postprocess, "roi": not a.no_roi, "device": result.model.meta["training"]["device"], "seed": a.seed}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    png = write_overlay(out / "overlay.png", volume, ref, pred["labels"], slices, axis, scores["dice"])
    d = "n/a" if scores["dice"] is None else f"{scores['dice']:.3f}"
    h = "n/a" if scores["hd95_mm"] is None else f"{scores['hd95_mm']:.1f} mm"
    print(f"demo: Dice on {where} {d}, HD95 {h} ({result.steps} steps, "
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
