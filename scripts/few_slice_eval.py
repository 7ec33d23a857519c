#!/usr/bin/env python
"""Few-slice quality on the real sample scans: Dice/HD95 on the unannotated slices.

For each case, a number of axial slices of the reference label (spread evenly through the
structure, as `hssl demo` picks them) is the annotation; the engine fine-tunes at a fixed CPU
budget, predicts, and is scored on every slice that was not annotated. One run at a time.

    python scripts/few_slice_eval.py --cases lung2 brain1 --slices 2 3 --seeds 0 1 --time-budget 120 \
        --out results/few_slice.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HSSLSegment"))

import numpy as np  # noqa: E402

from hssl import data  # noqa: E402
from hssl.demo import CASES, make_sparse, pick_slices  # noqa: E402
from hssl.evaluate import evaluate  # noqa: E402
from hssl.finetune import FinetuneOptions, finetune  # noqa: E402
from hssl.io import LabelInfo, Labels, read_image, read_labels  # noqa: E402
from hssl.predict import predict_array  # noqa: E402
from hssl import postprocess  # noqa: E402
from hssl.progress import Progress  # noqa: E402
from hssl.sparse import SliceRef, known_mask, resolve_annotation  # noqa: E402


def run(case: str, n_slices: int, seed: int, args) -> dict:
    volume = read_image(data.sample_path(f"{case}_image.nrrd"))
    ref = (read_labels(data.sample_path(f"{case}_label.nrrd"), volume.geometry).array > 0).astype(np.uint8)
    axis = volume.geometry.axis_names().index("axial")
    slices = pick_slices(ref, n_slices, axis)
    sparse = make_sparse(ref, slices, axis)
    table = [LabelInfo(CASES[case], 1, (1.0, 0.0, 0.0))]
    annotation = resolve_annotation(sparse, volume.geometry.axis_names())
    opts = FinetuneOptions(time_budget=args.time_budget, steps=args.steps, device=args.device, seed=seed,
                           init=args.init, roi=not args.no_roi, patch_voxels=args.patch_voxels)
    result = finetune(volume, Labels(sparse, table), annotation, opts, Progress(bar=False))
    import torch

    t = time.perf_counter()
    pred, _ = predict_array(result.model, result.model.normalization.apply(volume.array), torch.device(args.device
                            if args.device != "auto" else "cpu"), roi=result.roi,
                            overlap=0.5 if result.roi is not None else 0.25)
    predict_s = time.perf_counter() - t
    pred_post = postprocess.apply(pred, sparse, annotation.known, args.postprocess)
    region = ~known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
    raw = evaluate(pred, ref, volume.geometry, table, region)["labels"][0]
    post = evaluate(pred_post, ref, volume.geometry, table, region)["labels"][0]
    row = {"case": case, "slices": n_slices, "annotated": slices, "seed": seed, "init": args.init,
           "roi": not args.no_roi, "steps": result.steps, "finetune_s": round(result.seconds, 1),
           "steps_per_s": round(result.steps / result.seconds, 2), "predict_s": round(predict_s, 1),
           "heldout_dice": result.heldout_dice, "dice_raw": raw["dice"], "dice": post["dice"],
           "hd95_mm": post["hd95_mm"], "postprocess": args.postprocess}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["lung2", "brain1"], choices=sorted(CASES))
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--slices", nargs="+", type=int, default=[2, 3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--time-budget", type=float, default=120)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--init", default="scratch")
    p.add_argument("--no-roi", action="store_true")
    p.add_argument("--patch-voxels", type=int, default=None, help="voxels per training patch (default: engine's)")
    p.add_argument("--postprocess", default="annotated-components", choices=postprocess.MODES)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    from hssl.device import set_threads

    print("threads:", set_threads(args.threads), flush=True)
    data.fetch(["pyradiomics"])
    rows = [run(c, n, s, args) for c in args.cases for n in args.slices for s in args.seeds]
    summary = {}
    for c in args.cases:
        for n in args.slices:
            d = [r["dice"] or 0.0 for r in rows if r["case"] == c and r["slices"] == n]
            summary[f"{c}/{n}"] = {"mean": float(np.mean(d)), "std": float(np.std(d)), "n": len(d)}
    print(json.dumps(summary, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
