#!/usr/bin/env python
"""Few-slice quality on the real sample scans: Dice/HD95 on the unannotated slices.

For each case, a number of axial slices of the reference label (spread evenly through the
structure, as `hssl demo` picks them: `hssl.fewslice`) is the annotation; the engine fine-tunes at a
fixed CPU budget, predicts as `hssl finetune --predict` does, and is scored on every slice that was not
annotated. One run at a time.

    python scripts/few_slice_eval.py --cases lung2 brain1 --slices 2 3 --seeds 0 1 --time-budget 120 \
        --out results/few_slice.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "HSSLSegment"))

import numpy as np  # noqa: E402

from hssl import data, fewslice, postprocess  # noqa: E402
from hssl.finetune import FinetuneOptions, finetune  # noqa: E402
from hssl.progress import Progress  # noqa: E402
from hssl.workflow import predict_volume  # noqa: E402


def run(case: str, n_slices: int, seed: int, args) -> dict:
    few = fewslice.sample_case(case, n_slices)
    opts = FinetuneOptions(time_budget=args.time_budget, steps=args.steps, device=args.device, seed=seed,
                           init=args.init, roi=not args.no_roi, patch_voxels=args.patch_voxels)
    result = finetune(few.volume, few.labels, few.annotation, opts, Progress(bar=False))
    device = result.model.meta["training"]["device"]
    # The product's prediction (what `hssl finetune --predict` writes), then the network alone in
    # the same region for the raw score.
    pred = predict_volume(result.model, few.volume, device, progress=Progress(bar=False),
                          annotation=result.annotation, postprocess_mode=args.postprocess, roi=result.roi)
    raw = predict_volume(result.model, few.volume, device, progress=Progress(bar=False), roi=result.roi)
    post, raw_score = fewslice.score(few, pred.labels), fewslice.score(few, raw.labels, hd95=False)
    row = {"case": case, "slices": n_slices, "annotated": few.slices, "seed": seed, "init": args.init,
           "roi": not args.no_roi, "steps": result.steps, "finetune_s": round(result.seconds, 1),
           "steps_per_s": round(result.steps / result.seconds, 2), "predict_s": round(pred.seconds, 1),
           "heldout_dice": result.heldout_dice, "dice_raw": raw_score["dice"], "dice": post["dice"],
           "hd95_mm": post["hd95_mm"], "scored_on": post["scored_on"], "postprocess": args.postprocess}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["lung2", "brain1"], choices=sorted(fewslice.SAMPLE_CASES))
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
