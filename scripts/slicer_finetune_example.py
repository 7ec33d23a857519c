"""Fine-tune on a sparse annotation and predict, headless, with the HSSLSegment module's logic.

In Slicer (the extension installed, or this source tree next to the script):

    Slicer --no-main-window --python-script scripts/slicer_finetune_example.py -- \\
        --image lung1_image.nrrd --labels my_slices.seg.nrrd --out out/ --time-budget 150

With a plain Python that has the ``slicer-core`` wheel, torch and MONAI (same arguments):

    python scripts/slicer_finetune_example.py --image ... --labels ... --out out/

Writes ``OUT/model/`` (the fine-tuned model folder) and ``OUT/prediction.seg.nrrd``. Exit code 0 on
success, 2 for bad input, 3 when memory ran out, 1 otherwise (as the engine's job).
"""
import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE_MODULE_DIR = HERE.parent / "HSSLSegment"  # this repository's module folder, when run from the tree


def parseArguments(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", required=True, help="the scan: .nrrd, .nii.gz, .mha")
    parser.add_argument("--labels", required=True, help="sparse annotation: Slicer .seg.nrrd or a labelmap")
    parser.add_argument("--out", required=True, help="output folder (model/ and prediction.seg.nrrd)")
    parser.add_argument("--names", default=None, help="for a labelmap: VALUE=NAME,... e.g. 1=tumour")
    parser.add_argument("--segments", default=None, help="comma-separated segment names to learn (default all)")
    parser.add_argument("--background-slices", default="", help="slices annotated as background only, e.g. axial:3")
    parser.add_argument("--init", default="auto",
                        help="auto (the shipped pretrained model, the engine's default) | scratch | bundled[:NAME] | "
                             "model folder")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds of fine-tuning (default: the engine's, 150 s, unless --steps is given)")
    parser.add_argument("--steps", type=int, default=None, help="a step budget instead of a time budget")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace OUT/model if it exists")
    if argv and argv[0] == "--":  # Slicer passes the separator through
        argv = argv[1:]
    return parser.parse_args(argv)


def parseNames(text):
    if not text:
        return None
    names = {}
    for part in text.split(","):
        value, _, name = part.partition("=")
        names[int(value)] = name.strip()
    return names


def main(argv):
    args = parseArguments(argv)
    if SOURCE_MODULE_DIR.is_dir() and str(SOURCE_MODULE_DIR) not in sys.path:
        sys.path.insert(0, str(SOURCE_MODULE_DIR))
    import slicer

    from HSSLSegmentLib import mrml_io
    from HSSLSegmentLib.model_registry import ModelError
    from HSSLSegmentLib.process import JobAlreadyRunningError

    out = Path(args.out).resolve()
    modelOut = out / "model"
    if modelOut.exists() and not args.overwrite:
        print(f"error: '{modelOut}' already exists: pass --overwrite or choose another --out", file=sys.stderr)
        return 2
    inSlicer = hasattr(slicer, "app")
    if inSlicer:
        # The module's Logic, as the GUI uses it (PythonSlicer runs the engine).
        from HSSLSegment import HSSLSegmentLogic

        scene = slicer.mrmlScene
        logic = HSSLSegmentLogic()
        run = logic.finetune
    else:
        # Plain Python with slicer-core: the same GUI-free workflow the Logic wraps.
        from HSSLSegmentLib.model_registry import ModelRegistry, bundledModelsDir
        from HSSLSegmentLib.segmentation_jobs import SegmentationJobs

        mrml_io.registerSegmentationConverters()
        scene = slicer.vtkMRMLScene()
        engineDir = os.environ.get("HSSLSEGMENT_ENGINE_DIR", str(SOURCE_MODULE_DIR))
        jobs = SegmentationJobs(sys.executable, engineDir, ModelRegistry(bundledModelsDir(), out / "models"))

        def run(*positional, **keywords):
            keywords.pop("waitForCompletion", None)
            jobs.startFinetune(*positional, **keywords)
            return jobs.wait()

    def report(event):
        if event.type.value == "progress" and event.step is not None and event.total:
            print(f"{event.phase.value if event.phase else '?'} {event.step}/{event.total}"
                  + (f" loss {event.loss:.3f}" if event.loss is not None else ""), flush=True)
        elif event.type.value in ("log", "error") and event.message:
            print(event.message, flush=True)

    try:
        volume = mrml_io.loadVolumeFile(scene, args.image)
        annotation = mrml_io.loadSegmentationFile(scene, args.labels, volume, names=parseNames(args.names))
        segments = [s.strip() for s in args.segments.split(",")] if args.segments else None
        if inSlicer:
            logic.jobs.onEvent = report
        else:
            jobs.onEvent = report
        outcome = run(volume, annotation, segments=segments, init=args.init,
                      timeBudgetS=None if args.steps else args.time_budget, steps=args.steps, device=args.device,
                      seed=args.seed, backgroundSlices=args.background_slices, predict=True, modelOut=str(modelOut),
                      overwrite=args.overwrite, waitForCompletion=True)
    except (mrml_io.InputError, ModelError, JobAlreadyRunningError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not outcome.ok:
        print(f"error: {outcome.errorMessage}", file=sys.stderr)
        code = outcome.result.exitCode
        return code if code in (1, 2, 3) else 1
    for warning in outcome.warnings:
        print(f"warning: {warning}")
    prediction = mrml_io.saveSegmentationFile(outcome.predictionNode, out / "prediction.seg.nrrd")
    print(f"model: {outcome.model.path}")
    print(f"prediction: {prediction} (segments {', '.join(outcome.model.segmentNames)}; "
          f"{outcome.result.durationS:.0f} s on {outcome.result.device})")
    return 0


# Unconditional: Slicer runs --python-script files in its own __main__, and must be told to exit.
sys.exit(main(sys.argv[1:]))
