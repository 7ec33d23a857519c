"""The user-level operations shared by the CLI, the Slicer job and the demo: files in, files out."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import postprocess
from . import refine as refine_module
from .device import resolve_device
from .errors import HSSLError, OutOfMemory
from .finetune import FinetuneOptions, FinetuneResult, finetune
from .io import (IMAGE_SUFFIXES, Labels, Volume, check_output, read_image, read_labels, write_labelmap,
                 write_prediction)
from .model_store import Model, load_model, save_model
from .predict import predict_array, window_count
from .progress import Eta, Progress
from .recipe import DEFAULT_RECIPE, FinetuneRecipe
from .sparse import Annotation, annotation_roi, resolve_annotation

BYTES_PER_VOXEL = 16  # raw + normalised float32 + labels + masks + working copies, measured loosely


def check_memory(volume_path: str, voxels: int) -> None:
    """Refuse volumes that cannot fit in memory, before any big allocation."""
    need = voxels * BYTES_PER_VOXEL
    available = _available_memory()
    if available is not None and need > available:
        raise HSSLError(f"'{volume_path}' has {voxels / 1e6:.0f} M voxels and needs about {need / 2**30:.1f} GiB "
                        f"but only {available / 2**30:.1f} GiB of memory is free: crop or downsample the volume, "
                        "or close other programs")


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def parse_names(text: str | None) -> dict[int, str] | None:
    """``"1=tumour,2=liver"`` -> {1: "tumour", 2: "liver"}."""
    if not text:
        return None
    names = {}
    for part in text.split(","):
        value, sep, name = part.partition("=")
        if not sep or not name.strip():
            raise HSSLError(f"--names entry '{part}' must look like VALUE=NAME, e.g. 1=tumour")
        try:
            names[int(value)] = name.strip()
        except ValueError:
            raise HSSLError(f"--names entry '{part}': the label value must be an integer") from None
    return names


def select_segments(labels: Labels, segments: Sequence[str] | None) -> Labels:
    """Keep only the named segments; voxels of other segments become background."""
    if not segments:
        return labels
    by_name = {lab.name: lab for lab in labels.labels}
    unknown = [s for s in segments if s not in by_name]
    if unknown:
        raise HSSLError(f"segment(s) {unknown} are not in the labels (they have {list(by_name)}): check the names")
    keep = [by_name[s] for s in segments]
    array = np.where(np.isin(labels.array, [lab.value for lab in keep]), labels.array, 0).astype(labels.array.dtype)
    return Labels(array, keep, labels.path)


def load_inputs(image: str, labels: str, names: str | None = None, segments: Sequence[str] | None = None,
                slices: Sequence[str] | None = None, known_mask: str | None = None,
                all_known: bool = False) -> tuple[Volume, Labels, Annotation]:
    volume = read_image(image)
    check_memory(image, volume.array.size)
    lab = select_segments(read_labels(labels, volume.geometry, parse_names(names)), segments)
    mask = None
    if known_mask:
        mask = read_labels(known_mask, volume.geometry).array > 0
    annotation = resolve_annotation(lab.array, volume.geometry.axis_names(), slices, mask, all_known)
    return volume, lab, annotation


def run_finetune(image: str, labels: str, out: str, opts: FinetuneOptions, progress: Progress,
                 overwrite: bool = False, **inputs) -> FinetuneResult:
    """Fine-tune and save the model folder ``out`` (also after a graceful stop)."""
    if Path(out).exists() and not overwrite:
        raise HSSLError(f"model folder '{out}' already exists: pass --overwrite or choose another folder")
    check_output(out, overwrite=True, what="model folder")
    volume, lab, annotation = load_inputs(image, labels, **inputs)
    result = finetune(volume, lab, annotation, opts, progress)
    progress.event("progress", phase="save", step=0, total=1)
    save_model(out, result.model.net, result.model.labels, result.model.normalization, result.model.meta,
               overwrite=overwrite)
    result.model.path = str(out)
    progress.event("saved", model=str(out))
    progress.log(f"model saved to {out}")
    return result


@dataclasses.dataclass
class Prediction:
    """An in-memory prediction on the image grid: ``labels`` ``[z, y, x]`` label values (the model's
    table, 0 = background), ``probs`` ``(C, z, y, x)`` float16 or None, the table of the segments
    kept, the device that ran it, the seconds it took and, in ``stage_seconds``, the seconds of each
    stage that ran (``network``: the sliding-window passes; ``refine``: the intensity candidates;
    ``confine``: the grow beyond a leaking segment's painting)."""

    labels: np.ndarray
    probs: np.ndarray | None
    label_table: list
    device: str
    seconds: float
    final: str = "network"  # the last step that produced the labels (hssl.refine.CANDIDATES)
    per_segment: dict = dataclasses.field(default_factory=dict)  # segment name -> final step, where it differs
    stage_seconds: dict = dataclasses.field(default_factory=dict)


DENSE_WINDOWS = 64  # a region predicted at overlap 0.5 in at most this many windows takes seconds


def default_overlap(roi: tuple[slice, ...] | None, patch: Sequence[int] | None = None) -> float:
    """Sliding-window overlap: 0.5 inside a small annotation region (a denser window grid is cheap
    there and smooths window seams), else MONAI's usual 0.25. A region as large as a whole brain
    at a CPU patch needs about 300 windows at 0.5 but 90 at 0.25, which is what keeps the first
    prediction within seconds of the budget."""
    if roi is None:
        return 0.25
    if patch is not None:
        extent = [r.stop - r.start for r in roi]
        if window_count(extent, patch, 0.5) > DENSE_WINDOWS:
            return 0.25
    return 0.5


def prediction_annotation(labels_path: str, geometry, use_roi: bool = True, slices: Sequence[str] | None = None):
    """The sparse annotation of this image as prediction needs it: ``((label values, known mask), roi)``;
    ``roi`` is None when ``use_roi`` is False or nothing is painted. ``slices`` lists the annotated
    slices (background-only ones included) as fine-tuning takes them; default: detected."""
    sparse = read_labels(labels_path, geometry)
    known = resolve_annotation(sparse.array, geometry.axis_names(), slices).known
    roi = annotation_roi(sparse.array, known, tuple(reversed(geometry.spacing))) if use_roi else None
    return (sparse.array, known), roi


def predict_volume(model: Model, volume: Volume, device: str = "auto", overlap: float | None = None,
                   sw_batch_size: int = 4, probabilities: bool = False, segments: Sequence[str] | None = None,
                   progress: Progress | None = None, annotation: tuple[np.ndarray, np.ndarray] | None = None,
                   postprocess_mode: str = "annotated-components", roi: tuple[slice, ...] | None = None,
                   precision: str = "auto", final_step: str | None = None) -> Prediction:
    """The product's prediction of a loaded ``volume``: normalise, sliding-window inference (in ``roi``
    when given), map classes to label values, then with ``annotation`` = (label values, known mask)
    of this image: the output equals the annotation on annotated voxels and, with
    ``postprocess_mode='annotated-components'``, keeps only the components touching painted voxels
    (see ``postprocess``). With an annotation the final step is ``final_step`` (default: the one the
    model chose on its held-out slice, ``hssl.refine``); without one it is the network alone.
    On GPU out-of-memory it retries one window at a time, then on the CPU."""
    progress = progress or Progress()
    if overlap is None:
        overlap = default_overlap(roi, model.plan.patch_size)
    dev = resolve_device(device)
    if segments:
        have = [lab.name for lab in model.labels]
        missing = [s for s in segments if s not in have]
        if missing:
            raise HSSLError(f"the model was trained on segments {have}, not {missing}: fine-tune a model for "
                            "those segments or pick another model")
    if annotation is not None and annotation[0].shape != volume.array.shape:
        raise HSSLError(f"the annotation has shape {annotation[0].shape} but the image {volume.array.shape}: give "
                        "the annotation of this image")
    final, per_class = model_final_step(model) if final_step is None else (final_step, {})
    if final not in refine_module.CANDIDATES:
        raise HSSLError(f"unknown final step '{final}': choose one of {', '.join(refine_module.CANDIDATES)}")
    if annotation is None:
        final, per_class = "network", {}
    else:
        grow_connectivity(model)  # a corrupt record fails before the network pass
    needed = {final, *per_class.values()}
    eta = Eta()
    x = model.normalization.apply(volume.array)

    def on_progress(done: int, total: int) -> None:
        progress.update("predict", done, total, eta_s=eta.remaining(done / max(total, 1)), device=dev.type)

    def infer(with_probabilities: bool):
        nonlocal dev, sw_batch_size
        while True:
            try:
                return predict_array(model, x, dev, overlap, sw_batch_size, precision=precision,
                                     probabilities=with_probabilities, on_progress=on_progress, roi=roi)
            except OutOfMemory:
                if dev.type != "cuda":
                    raise
                import torch

                torch.cuda.empty_cache()
                if sw_batch_size > 1:
                    sw_batch_size = 1
                    progress.log("GPU out of memory while predicting: retrying with --sw-batch-size 1")
                else:
                    dev = torch.device("cpu")
                    progress.log("GPU out of memory while predicting even with one window at a time: "
                                 "continuing on the CPU (slower)")

    stages = {}

    def timed(stage: str, started: float) -> None:
        stages[stage] = round(stages.get(stage, 0.0) + time.monotonic() - started, 2)

    t = time.monotonic()
    classes, probs = infer(probabilities or needed != {"network"})
    progress.close()
    timed("network", t)
    if annotation is not None:
        sparse = _class_indices(model, annotation[0])
        unlearned = {}
        if final_step is None:
            # A segment the network does not even reproduce on its painted slices was not learned:
            # it is grown from the painted slices (refine.unlearned_step), unless the held-out slice
            # chose growing alone for it already.
            unlearned = {c: fit for c, fit in _unlearned(model, classes, sparse, annotation[1], roi, postprocess_mode).items()
                         if per_class.get(c, final) != "grow"}
            if unlearned:
                needed = {final, *per_class.values(), "network+grow", "grow"}
                if probs is None:
                    # The model chose the network alone, so its probabilities were not kept (they
                    # cost a float16 copy of the volume per class); network+grow needs them.
                    t = time.monotonic()
                    _, probs = infer(True)
                    progress.close()
                    timed("network", t)
        recipe = _trained_recipe(model)
        grown = None
        if needed != {"network"}:
            t = time.monotonic()
            classes, fallback, grown = _refined(needed, final, per_class, model, x, classes, probs, sparse, annotation[1],
                                                roi, recipe, unlearned)
            for c, (name, share) in fallback.items():
                how = ("within the network's sure voxels of the other segments and of the background" if name == "network+grow"
                       else "alone: within the network's sure voxels it would shrink to")
                progress.log(f"note: the network did not learn '{model.labels[c - 1].name}' (Dice {unlearned[c]:.2f} "
                             f"on its painted slices): that segment is grown from the painted slices on the "
                             f"intensities, {how} {share:.0%} of its size grown alone")
            per_class.update({c: name for c, (name, _) in fallback.items()})
            timed("refine", t)
        if final_step is None:
            t = time.monotonic()
            classes, confined = _confined(model, x, classes, sparse, annotation[1], roi, recipe, final, per_class, grown)
            if confined:
                timed("confine", t)
            for c, (face, section) in confined.items():
                progress.log(f"note: '{model.labels[c - 1].name}' runs to the edge of the region around the painted "
                             f"slices ({face} voxels on one face, {section} on its fullest painted slice): the network "
                             "leaked there, so beyond its painted voxels that segment is grown from the painted slices "
                             "on the intensities; paint its outermost slices to check it")
            per_class.update({c: f"{per_class.get(c, final)}, grow beyond the painting" for c in confined})
    if not probabilities:
        probs = None
    # Network classes 1..N map back to the model's label values.
    values = [0] + [lab.value for lab in model.labels]
    lut = np.array(values, dtype=np.uint16 if max(values) > 255 else np.uint8)
    labels = lut[classes]
    if annotation is not None:
        labels = postprocess.apply(labels, annotation[0], annotation[1], postprocess_mode)
    if segments:
        keep = [lab.value for lab in model.labels if lab.name in segments]
        labels = np.where(np.isin(labels, keep), labels, 0).astype(labels.dtype)
    chosen = [lab for lab in model.labels if not segments or lab.name in segments]
    return Prediction(labels, probs, chosen, dev.type, eta.elapsed(), final,
                      {model.labels[c - 1].name: name for c, name in sorted(per_class.items())}, stages)


def model_final_step(model: Model) -> tuple[str, dict[int, str]]:
    """The final step a model chose when it was fine-tuned: the overall one (``network`` for models
    without a record) and, by network class, the ones chosen per segment on the held-out slice."""
    record = (model.meta.get("training") or {}).get("final_step") or {}
    if not isinstance(record, dict):
        return "network", {}
    by_name = {lab.name: n for n, lab in enumerate(model.labels, start=1)}
    per_segment = record.get("per_segment") if isinstance(record.get("per_segment"), dict) else {}
    unknown = [str(v) for v in [record.get("chosen", "network"), *per_segment.values()]
               if v not in refine_module.CANDIDATES]
    if unknown:
        raise HSSLError(f"model.json training.final_step names an unknown final step {unknown[0]!r}: the model "
                        f"folder is corrupt; predict with --final-step {'|'.join(refine_module.CANDIDATES)}")
    return record.get("chosen", "network"), {by_name[seg]: name for seg, name in per_segment.items() if seg in by_name}


def grow_connectivity(model: Model) -> int:
    """The neighbours the ``grow`` candidate competes over, as the model chose on its held-out slice
    (6 for models without the record)."""
    record = (model.meta.get("training") or {}).get("final_step") or {}
    value = record.get("grow_connectivity", 6) if isinstance(record, dict) else 6
    if value not in (6, 18, 26) or isinstance(value, bool):
        raise HSSLError(f"model.json training.final_step.grow_connectivity is {value!r}, not 6, 18 or 26: the model "
                        "folder is corrupt; re-train the model")
    return int(value)


def _trained_recipe(model: Model) -> FinetuneRecipe:
    """The recipe the model was fine-tuned with (today's defaults for what its record lacks, or for
    all of it when the record is unreadable)."""
    recipe = (model.meta.get("training") or {}).get("recipe") or {}
    try:
        return FinetuneRecipe.from_json(recipe)
    except ValueError:
        return DEFAULT_RECIPE


def _class_indices(model: Model, values: np.ndarray) -> np.ndarray:
    """An annotation in label values as the network's class indices (0 elsewhere)."""
    sparse = np.zeros(values.shape, dtype=np.int32)
    for cls, lab in enumerate(model.labels, start=1):
        sparse[values == lab.value] = cls
    return sparse


def _unlearned(model: Model, network: np.ndarray, sparse: np.ndarray, known: np.ndarray, roi,
               postprocess_mode: str = "annotated-components") -> dict[int, float]:
    """Classes whose network Dice on their own painted voxels (in ``roi``) is below the recipe's
    poor-learning threshold, with that Dice. With ``postprocess_mode='annotated-components'`` it is
    judged on the components that post-processing keeps: a look-alike elsewhere on a painted slice
    (the air outside the body for the lungs) never reaches the user, so it does not make a segment
    unlearned (lung2 chest CT: 0.50 on the raw network, 0.88 on its kept components)."""
    region = roi if roi is not None else tuple(slice(0, n) for n in network.shape)
    net_r, sparse_r, known_r = network[region], sparse[region], known[region]
    if postprocess_mode == "annotated-components":
        net_r = postprocess.keep_annotated_components(net_r, sparse_r, known_r)
    fit = refine_module.painted_fit(net_r, sparse_r, known_r, range(1, len(model.labels) + 1))
    poor = DEFAULT_RECIPE.poor_heldout_dice
    return {c: v for c, v in fit.items() if v < poor}


def _refined(needed: set[str], final: str, per_class: dict[int, str], model: Model, x: np.ndarray,
             network: np.ndarray, probs: np.ndarray | None, sparse: np.ndarray, known: np.ndarray, roi,
             recipe: FinetuneRecipe, unlearned: dict[int, float] | None = None):
    """Network classes after the final step: each class from the candidate chosen for it
    (``per_class``, else ``final``), computed inside ``roi`` (background outside) with the
    ``recipe`` the model was trained with; a class in
    ``unlearned`` from ``refine.unlearned_step`` instead (whose network voxels seed nothing in
    ``network+grow``). Returns the classes and, per unlearned class, (the candidate used, the size of
    its network+grow result as a share of its grow result)."""
    region = roi if roi is not None else tuple(slice(0, n) for n in x.shape)
    probs_r = probs[(slice(None), *region)].astype(np.float32) if probs is not None else None
    connectivity = grow_connectivity(model)
    results = {name: (network[region] if name == "network" else
                      refine_module.candidate(name, x[region], probs_r, sparse[region], known[region],
                                              model.plan.spacing, recipe.refine_confidence,
                                              distrust=tuple(unlearned or ()), span_margin=recipe.grow_span_margin,
                                              connectivity=connectivity))
               for name in needed}
    fallback = {c: refine_module.unlearned_step(results["network+grow"], results["grow"], c, recipe.unlearned_keep_share)
                for c in sorted(unlearned or {})}
    chosen = {**per_class, **{c: name for c, (name, _) in fallback.items()}}
    out = np.zeros(x.shape, dtype=np.uint8)
    out[region] = refine_module.compose(results, chosen, final, range(1, len(model.labels) + 1))
    return out, fallback, results.get("grow")


def _confined(model: Model, x: np.ndarray, classes: np.ndarray, sparse: np.ndarray, known: np.ndarray, roi,
              recipe: FinetuneRecipe, final: str, per_class: dict[int, str], grown: np.ndarray | None = None):
    """Network classes with every segment that leaked to a face of ``roi`` (``refine.leaking``, judged
    on the components the post-processing keeps) taken from ``grow`` outside the box of its painted
    voxels (``refine.confine``); a segment already grown alone is left as it is. ``grown``: the grow
    candidate on ``roi`` when it was computed already. Returns the classes and ``{class: (voxels on
    the fullest face, on the fullest painted slice)}``."""
    if roi is None:
        return classes, {}
    n = len(model.labels)
    sparse_r, known_r = sparse[roi], known[roi]
    kept = postprocess.keep_annotated_components(classes[roi], sparse_r, known_r)
    leaks = {c: v for c, v in refine_module.leaking(kept, sparse_r, known_r, roi, classes.shape, range(1, n + 1),
                                                    recipe.leak_face_ratio).items()
             if per_class.get(c, final) != "grow"}
    if not leaks:
        return classes, {}
    if grown is None:
        grown = refine_module.candidate("grow", x[roi], None, sparse_r, known_r, model.plan.spacing,
                                        span_margin=recipe.grow_span_margin, connectivity=grow_connectivity(model))
    out = classes.copy()
    out[roi] = refine_module.confine(classes[roi], grown, sparse_r, known_r, sorted(leaks))
    return out, leaks


def run_predict(model: Model | str, image: str, out: str, device: str = "auto", overlap: float | None = None,
                sw_batch_size: int = 4, probabilities: str | None = None, segments: Sequence[str] | None = None,
                overwrite: bool = False, progress: Progress | None = None,
                annotation: tuple[np.ndarray, np.ndarray] | None = None,
                postprocess_mode: str = "annotated-components", roi: tuple[slice, ...] | None = None,
                precision: str = "auto", final_step: str | None = None) -> dict:
    """Predict ``image`` with a model (folder or loaded) and write ``out`` in the image's geometry
    (``predict_volume`` between reading and writing; see there for ``annotation`` and ``roi``)."""
    progress = progress or Progress()
    check_output(out, overwrite)
    if probabilities:
        check_output(probabilities, overwrite, "probabilities output")
    if not isinstance(model, Model):
        model = load_model(model, resolve_device(device))
    volume = read_image(image)
    check_memory(image, volume.array.size)
    pred = predict_volume(model, volume, device, overlap, sw_batch_size, bool(probabilities), segments, progress,
                          annotation, postprocess_mode, roi, precision, final_step)
    write_prediction(out, pred.labels, volume.geometry, pred.label_table, overwrite)
    probs = pred.probs
    if probabilities and probs is not None:
        write_labelmap(probabilities, np.moveaxis(probs[1:].astype(np.float32), 0, -1)
                       if probs.shape[0] > 2 else probs[1].astype(np.float32), volume.geometry, overwrite)
    progress.event("prediction", path=str(out), seconds=round(pred.seconds, 2), stage_seconds=pred.stage_seconds)
    stages = ", ".join(f"{name} {sec:.1f} s" for name, sec in pred.stage_seconds.items())
    progress.log(f"prediction written to {out} ({pred.seconds:.1f} s on {pred.device}: {stages})")
    return {"path": str(out), "seconds": pred.seconds, "labels": pred.labels, "geometry": volume.geometry,
            "label_table": pred.label_table}


def finetune_and_predict(image: str, labels: str, out: str, opts: FinetuneOptions, progress: Progress,
                         overwrite: bool = False, prediction_out: str | None = None,
                         postprocess_mode: str = "annotated-components", **inputs) -> tuple[FinetuneResult, str | None]:
    """Fine-tune and save the model folder ``out``; with ``prediction_out``, then predict ``image`` with
    it and the annotation it was trained on (region of interest, post-processing); end with the
    ``done`` event. What ``hssl finetune`` and the Slicer job run. ``inputs`` go to ``load_inputs``.

    A prediction output is checked before training (exists, writable, known suffix), so a bad path
    never costs a training run. Returns the training result and the prediction path (or None).
    """
    if prediction_out:
        check_output(prediction_out, overwrite)
        name = Path(prediction_out).name.lower()
        if not name.endswith(".seg.nrrd") and not name.endswith(IMAGE_SUFFIXES):
            raise HSSLError(f"prediction output '{prediction_out}' has an unknown suffix: use .seg.nrrd (Slicer "
                            "segmentation), .nrrd, .nii.gz or .mha")
    from . import lifeline

    result = run_finetune(image, labels, out, opts, progress, overwrite=overwrite, **inputs)
    prediction = None
    # With the parent gone nobody would open the prediction; the module predicts from the saved model later.
    if prediction_out and not lifeline.lost():
        prediction = run_predict(result.model, image, prediction_out, device=opts.device, overwrite=overwrite,
                                 progress=progress, annotation=result.annotation, postprocess_mode=postprocess_mode,
                                 roi=result.roi, precision=opts.precision if opts.amp else "fp32")["path"]
    progress.event("done", stopped=result.stopped, model=str(out), prediction=prediction,
                   heldout_dice=result.heldout_dice, steps=result.steps, seconds=round(result.seconds, 1),
                   final_step=result.final_step)
    return result, prediction
