"""Fine-tuning a segmentation network on a few annotated slices of one volume.

Loop: patches around annotated slices (foreground-balanced) -> MONAI augmentations -> masked
CE + Dice (unknown voxels weigh zero) -> AdamW with a polynomial decay over the budget (steps or
seconds, whichever ends first). With 3 or more annotated slices one is held out for the first
70 % of the budget and scored periodically (``heldout_dice``), then added back for the rest
(phase ``refine``), so the final model uses every annotation.
"""
from __future__ import annotations

import dataclasses
import random
import signal
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from . import lifeline, postprocess, refine
from .device import autocast_dtype, is_oom, resolve_device
from .errors import HSSLError, OutOfMemory
from .io import Labels, LabelInfo, Volume
from .losses import MaskedDiceCELoss
from .model_format import DEFAULT_START, bundled_model_dir, missing_bundled_message, parse_init
from .model_store import Model, load_model
from .network import SegNet
from .normalize import Normalization, for_modality
from .plan import make_plan
from .progress import Eta, Progress
from .recipe import DEFAULT_RECIPE, FinetuneRecipe
from .sampling import PatchSampler, augmentation
from .sparse import Annotation, SliceRef, annotation_roi, choose_holdout, known_mask
from .training import autocast, backward_and_step, set_lr

# Shrinking the selection region across the held-out slice to fit the budget: the in-plane extent
# is scaled by this factor per try, down to one patch.
CROP_FACTOR = 0.9
# The held-out estimate's sliding-window overlap.
SLAB_OVERLAP = 0.25


@dataclasses.dataclass
class FinetuneOptions:
    steps: int | None = None
    time_budget: float | None = None  # seconds of training (evaluation included)
    device: str = "auto"
    seed: int = 0
    batch_size: int | None = None  # default: the recipe's
    lr: float | None = None  # default: the recipe's (lower to continue a model of the same labels)
    holdout: bool = True
    amp: bool = True  # False: full float32 (same as precision "fp32")
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (see hssl.device.autocast_dtype)
    init: str = "auto"  # auto (bundled if shipped, else scratch) | scratch | bundled | bundled:NAME | model folder
    modality: str = "auto"
    patch_size: Sequence[int] | None = None
    patch_voxels: int | None = None  # default: the recipe's, smaller on CPU (responsiveness) than on GPU
    fg_fraction: float | None = None  # default: the recipe's
    stop_file: str | None = None
    roi: bool = True  # train and predict around the painted structures (sparse.annotation_roi)
    final_step: str = "auto"  # auto (chosen on the held-out slice) or one of hssl.refine.CANDIDATES
    # Seconds of self-supervised adaptation to this scan before fine-tuning (hssl.adapt), taken out of
    # the time budget; default: the recipe's adapt_share of the time budget (none without one).
    adapt_seconds: float | None = None
    recipe: FinetuneRecipe = DEFAULT_RECIPE

    def validate(self) -> None:
        if self.steps is None and self.time_budget is None:
            raise HSSLError("give a budget: --steps N or --time-budget SECONDS")
        if self.steps is not None and self.steps < 1:
            raise HSSLError(f"--steps must be at least 1 (got {self.steps})")
        if self.time_budget is not None and self.time_budget <= 0:
            raise HSSLError(f"--time-budget must be positive seconds (got {self.time_budget})")
        if self.final_step != "auto" and self.final_step not in refine.CANDIDATES:
            raise HSSLError(f"--final-step must be auto or one of {', '.join(refine.CANDIDATES)} "
                            f"(got {self.final_step!r})")
        if self.batch_size is not None and self.batch_size < 1:
            raise HSSLError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.adapt_seconds is not None:
            if not np.isfinite(self.adapt_seconds) or self.adapt_seconds < 0:
                raise HSSLError(f"--adapt must be non-negative seconds (got {self.adapt_seconds})")
            if self.time_budget is not None and self.adapt_seconds >= 0.5 * self.time_budget:
                raise HSSLError(f"--adapt {self.adapt_seconds:g} s would leave fine-tuning less than half of the "
                                f"{self.time_budget:g} s budget: give fewer adaptation seconds or a larger budget")

    def adaptation_seconds(self) -> float:
        if self.adapt_seconds is not None:
            return float(self.adapt_seconds)
        return self.recipe.adapt_share * self.time_budget if self.time_budget else 0.0


@dataclasses.dataclass
class FinetuneResult:
    model: Model
    stopped: bool
    steps: int
    seconds: float
    heldout: str | None
    heldout_dice: float | None
    log: list[dict]
    annotation: tuple[np.ndarray, np.ndarray] | None = None  # (label values, known mask) trained on
    roi: tuple[slice, ...] | None = None  # [z, y, x] region trained on; prediction is limited to it
    final_step: dict | None = None  # the final-step candidate chosen and the held-out scores (hssl.refine)


class StopRequest:
    """A graceful stop: SIGINT/SIGTERM, the stop file, or the parent process gone (``hssl.lifeline``).
    Checked once per step; ``reason`` is "signal", "stop-file" or "parent-exited" (also recorded with
    ``lifeline.note_stop`` for model.json's ``training.stop_reason``)."""

    def __init__(self, stop_file: str | None):
        self.stop_file = Path(stop_file) if stop_file else None
        self.flag = False
        self.reason: str | None = None
        self._previous = {}

    def __enter__(self):
        lifeline.note_stop(None)
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. called from a GUI worker)
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handler(self, signum, frame):
        self._stop("signal")

    def _stop(self, reason: str) -> None:
        if not self.flag:
            self.flag, self.reason = True, reason
            lifeline.note_stop(reason)

    def requested(self) -> bool:
        if not self.flag:
            if lifeline.lost():
                self._stop(lifeline.PARENT_EXITED)
            elif self.stop_file is not None and self.stop_file.exists():
                self._stop("stop-file")
        return self.flag


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_init(init: str, progress: Progress | None = None, default_start: str = DEFAULT_START) -> str:
    """``auto``: the default start (``model_format.DEFAULT_START``). That is ``scratch``, or, when it
    is ``bundled``, the default pretrained model if the extension ships one and ``scratch`` with a
    note otherwise (an engine installed without the module's Resources folder). Anything else is
    returned unchanged."""
    if init != "auto":
        return init
    if default_start != "bundled":
        return "scratch"
    if (bundled_model_dir() / "model.json").is_file():
        return "bundled"
    if progress is not None:
        progress.log("note: no pretrained model is installed with this engine: training from scratch")
    return "scratch"


def initial_model(init: str, volume: Volume, labels: list[LabelInfo], normalization: Normalization,
                  opts: FinetuneOptions, progress: Progress, device: torch.device) -> tuple[SegNet, bool]:
    """Build the network to fine-tune. Returns (net, continues a model of the same labels?)."""
    n_out = len(labels) + 1
    spacing = tuple(reversed(volume.geometry.spacing))
    voxels = opts.patch_voxels or opts.recipe.patch_voxels(device.type)
    kind, value = parse_init(init)
    if kind == "scratch":
        return SegNet(make_plan(spacing, volume.array.shape, voxels, opts.patch_size), n_out), False
    if kind == "bundled":
        folder = bundled_model_dir(value)
        if not (folder / "model.json").exists():
            raise HSSLError(missing_bundled_message(value))
    else:
        folder = Path(value)
    source = load_model(folder)
    net = source.net
    # Keep the trained architecture (channels, kernels, strides) but size the patch for this volume.
    derived = make_plan(spacing, volume.array.shape, voxels, opts.patch_size)
    divisor = net.plan.divisor
    patch = tuple(max(d, int(np.ceil(p / d)) * d) for p, d in zip(derived.patch_size, divisor))
    net.plan = dataclasses.replace(net.plan, patch_size=patch, spacing=derived.spacing)
    # A pretrained model records the normalisation of each modality it saw; a fine-tuned one its own.
    per_modality = (source.meta.get("pretraining") or {}).get("normalization_per_modality") or {}
    schemes = {d.get("scheme") for d in per_modality.values() if isinstance(d, dict)} or {source.normalization.scheme}
    if normalization.scheme not in schemes:
        progress.log(f"note: the initial model was trained with '{'/'.join(sorted(schemes))}' normalisation; "
                     f"this volume uses '{normalization.scheme}'")
    same = [lab.name for lab in source.labels] == [lab.name for lab in labels]
    if not same:
        # Keep the learned body, start a fresh classifier for this label set.
        head = SegNet(net.plan, n_out).head
        net.head = head
        net.out_channels = n_out
        progress.log(f"initial model '{folder}' has labels {[lab.name for lab in source.labels]}; a new "
                     f"classifier head is trained for {[lab.name for lab in labels]}")
    return net, same


def finetune(volume: Volume, labels: Labels, annotation: Annotation, opts: FinetuneOptions,
             progress: Progress | None = None) -> FinetuneResult:
    """Fine-tune on ``volume`` with the sparse ``labels`` whose known voxels are ``annotation.known``."""
    opts.validate()
    progress = progress or Progress(json_lines=False)
    seed_everything(opts.seed)
    device = resolve_device(opts.device)
    if not any(int(v) > 0 for v in np.unique(labels.array[annotation.known])):
        raise HSSLError("the annotated slices contain no foreground label: paint the structure on at least "
                        "one slice")
    present = set(int(v) for v in np.unique(labels.array) if v)
    table = [lab for lab in labels.labels if lab.value in present]
    if not table:
        raise HSSLError("the labels have no annotated voxel: paint the structure on at least one slice")
    missing = [lab.name for lab in labels.labels if lab.value not in present]
    if missing:
        progress.log(f"note: segment(s) {missing} have no painted voxel and are left out")
    # Network classes are 1..N in table order; remap label values onto them.
    lut = np.zeros(int(labels.array.max()) + 1, dtype=np.uint8)
    for n, lab in enumerate(table, start=1):
        lut[lab.value] = n
    target = lut[labels.array]
    normalization = for_modality(opts.modality, volume.array)
    image = normalization.apply(volume.array)

    init = resolve_init(opts.init, progress)
    net, continuing = initial_model(init, volume, table, normalization, opts, progress, device)
    plan = net.plan
    holdout = choose_holdout(target, annotation.slices) if opts.holdout and annotation.slices else None
    names = volume.geometry.axis_names()
    train_known = annotation.known
    holdout_region = None
    if holdout is not None:
        train_known = known_mask(target.shape, [s for s in annotation.slices if s != holdout])
        holdout_region = known_mask(target.shape, [holdout]) & ~train_known
        holdout_region &= _box_around((target > 0) & train_known, plan.patch_size)

    roi = annotation_roi(target, annotation.known, plan.spacing) if opts.roi else None
    if roi is not None:
        # Patch centres only inside the region; patches still see the context around it.
        inside = np.zeros(target.shape, dtype=bool)
        inside[roi] = True
        train_known = train_known & inside
        if holdout_region is not None:
            holdout_region &= inside
    net.to(device).train()
    recipe = opts.recipe
    lr = opts.lr if opts.lr is not None else recipe.lr(continuing)
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=recipe.weight_decay)
    loss_fn = MaskedDiceCELoss()
    precision = opts.precision if opts.amp else "fp32"
    dtype = autocast_dtype(device, precision)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    rng = np.random.default_rng(opts.seed)
    fg_fraction = opts.fg_fraction if opts.fg_fraction is not None else recipe.fg_fraction
    sampler = PatchSampler(image, target, train_known, plan.patch_size, rng, fg_fraction)
    augment = augmentation(plan.spacing, plan.patch_size, opts.seed)
    batch_size = opts.batch_size or recipe.batch_size
    holdout_fraction, evals = recipe.holdout_fraction, recipe.holdout_evals

    progress.event("start", device=device.type, phase="finetune",
                   annotated_slices=[s.name(names) for s in annotation.slices],
                   heldout=holdout.name(names) if holdout else None,
                   labels=[lab.to_json() for lab in table], plan=plan.to_json(), init=init)
    progress.log(f"fine-tuning on {device.type}: {len(annotation.slices)} annotated slice(s) "
                 f"{[s.name(names) for s in annotation.slices]}, patch {plan.patch_size}, "
                 f"held out: {holdout.name(names) if holdout else 'none'}")

    selection, skipped_selection, window_seconds = None, None, None
    # Held-out estimates' (seconds, windows): the prediction's seconds per window, measured.
    slab_passes: list[tuple[float, int]] = []
    slab_windows = _slab_windows(holdout, holdout_region, plan) if holdout is not None else 0
    history: list[dict] = []
    step, stopped, heldout_dice, eval_seconds = 0, False, None, 0.0
    # A time budget is the time to the first prediction: training keeps back what the final
    # prediction over the region will take beyond the recipe's slack (estimated from a timed forward
    # pass, then from the held-out selection's own prediction).
    reserve = 0.0
    predict_region = roi if roi is not None else tuple(slice(0, n) for n in target.shape)
    eta = Eta()
    next_eval = 1.0 / (evals + 1) * holdout_fraction
    phase = "finetune"
    budget = opts.time_budget  # the whole budget, adaptation included
    with StopRequest(opts.stop_file) as stop:
        adaptation = None
        if opts.adaptation_seconds() > 0:
            adaptation = _adapt(net, image, roi, normalization.scheme, opts, device, dtype, stop, progress)
            if opts.time_budget is not None:
                opts = dataclasses.replace(opts, time_budget=max(opts.time_budget - adaptation["seconds"],
                                                                 0.5 * opts.time_budget))
            eta = Eta()
        while True:
            fraction = _fraction(step, eta.elapsed(), opts, reserve)
            if fraction >= 1.0:
                break
            if stop.requested():
                stopped = True
                progress.log("stop requested: saving the model trained so far")
                break
            if holdout is not None and phase == "finetune":
                if fraction >= next_eval:
                    # Estimates are skipped while they would take more than eval_share of the time so far.
                    if eval_seconds <= recipe.eval_share * eta.elapsed():
                        t_eval = time.monotonic()
                        heldout_dice = _slab_dice(net, image, target, holdout, holdout_region, plan, device, dtype)
                        eval_seconds += time.monotonic() - t_eval
                        slab_passes.append((time.monotonic() - t_eval, slab_windows))
                        net.train()
                    next_eval += holdout_fraction / (evals + 1)
                if fraction >= holdout_fraction:
                    t_eval = time.monotonic()
                    heldout_dice = _slab_dice(net, image, target, holdout, holdout_region, plan, device, dtype)
                    slab_passes.append((time.monotonic() - t_eval, slab_windows))
                    cost, crop = None, None
                    region = refine.selection_region(annotation.slices, holdout, roi, target.shape)
                    if opts.final_step == "auto" and window_seconds is not None:
                        # The held-out estimates were real sliding-window passes: their seconds per
                        # window are a better measure than the single forward pass at step 3.
                        if slab_passes and slab_windows:
                            window_seconds = sum(t for t, _ in slab_passes) / sum(n for _, n in slab_passes)
                        limit = recipe.selection_share * budget
                        cost = _selection_seconds(window_seconds, target.shape, region, plan, net.out_channels, recipe)
                        cropped = _crop_across(region, holdout, target, plan,
                                               lambda r: _selection_seconds(window_seconds, target.shape, r, plan, net.out_channels, recipe), limit) \
                            if cost > limit else None
                        if cropped is not None:
                            crop, crop_cost = cropped
                            # Too large a region (a 512 x 512 CT): the same three candidates, painted
                            # neighbours included, on a part of it around the held-out slice's structures.
                            progress.log(f"note: choosing the final step between the held-out slice's painted "
                                         f"neighbours would take about {cost:.0f} s of the {budget:.0f} s budget: "
                                         f"the candidates are compared on a {_extent_text(crop, holdout.axis)} part "
                                         "of it around the held-out slice's structures")
                            region, cost = crop, crop_cost
                    if cost is not None and cost > recipe.selection_share * budget:
                        skipped_selection = cost
                        progress.log(f"note: choosing the final step on the held-out slice would take about {cost:.0f} s "
                                     f"of the {budget:.0f} s budget, which training keeps: the final step "
                                     f"is {recipe.final_step}")
                    elif opts.final_step == "auto":
                        selection = _select_final_step(net, image, target, annotation, holdout, holdout_region, region,
                                                       table, normalization, device, precision, recipe,
                                                       cropped=crop is not None,
                                                       final_voxels=int(np.prod([r.stop - r.start for r in predict_region])),
                                                       limit_seconds=None if budget is None else recipe.selection_share * budget)
                        progress.event("final_step", **_final_step_event(selection, table))
                        progress.log(_final_step_note(selection, table))
                        if opts.time_budget is not None:
                            per_window = selection["predict_seconds"] / max(selection["windows"], 1)
                            candidates, passes = _expected_final(selection, recipe)
                            reserve = _reserve(per_window, target.shape, predict_region, plan, net.out_channels, recipe, selection["chosen"],
                                               _refine_seconds(selection, predict_region, recipe, candidates), passes)
                    net.train()
                    phase = "refine"
                    full_known = annotation.known if roi is None else annotation.known & inside
                    sampler = PatchSampler(image, target, full_known, plan.patch_size, rng, fg_fraction)
            set_lr(optimizer, recipe.lr_at(lr, fraction))
            batch = [augment(sampler.sample()) for _ in range(batch_size)]
            x = torch.stack([torch.as_tensor(b["image"]) for b in batch]).to(device)
            y = torch.stack([torch.as_tensor(b["label"]) for b in batch]).to(device)
            k = torch.stack([torch.as_tensor(b["known"]) for b in batch]).to(device)
            try:
                with autocast(device.type, dtype):
                    logits = net(x)
                loss = loss_fn(logits, y, k)
                if not torch.isfinite(loss):
                    raise HSSLError(f"the loss became {loss.item()} at step {step}: lower --lr or check the "
                                    "image intensities")
                backward_and_step(loss, net.parameters(), optimizer, scaler, recipe.grad_clip)
            except (RuntimeError, MemoryError) as err:
                if not (isinstance(err, MemoryError) or is_oom(err)):
                    raise
                batch_size, device = _after_oom(batch_size, device, net, progress)
                optimizer = _move_optimizer(optimizer, net, device)
                dtype = autocast_dtype(device, precision)
                scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
                continue
            step += 1
            if step == 3 and opts.time_budget is not None:
                window_seconds = _forward_seconds(net, plan, device, dtype)
                default_final = opts.final_step if opts.final_step != "auto" else recipe.final_step
                reserve = _reserve(window_seconds, target.shape, predict_region, plan, net.out_channels, recipe, default_final)
            fraction = _fraction(step, eta.elapsed(), opts, reserve)
            total = opts.steps if opts.steps is not None else max(step, int(round(step / max(fraction, 1e-9))))
            record = {"step": step, "loss": float(loss.item()), "heldout_dice": heldout_dice,
                      "elapsed_s": round(eta.elapsed(), 2), "phase": phase}
            history.append(record)
            progress.update(phase, step, total, loss=record["loss"], heldout_dice=heldout_dice,
                            eta_s=eta.remaining(fraction), elapsed_s=eta.elapsed(), device=device.type)
    if holdout is not None and phase == "finetune" and step > 0:
        heldout_dice = _slab_dice(net, image, target, holdout, holdout_region, plan, device, dtype)
    progress.close()
    net.eval()
    seconds = eta.elapsed()
    if step == 0:
        if stopped:
            during = " (during the adaptation to the scan)" if adaptation is not None else ""
            raise HSSLError(f"fine-tuning was stopped before its first step{during}: nothing was saved; start it "
                            "again and let it run")
        raise HSSLError("fine-tuning stopped before the first step: nothing was saved; give a larger budget")
    progress.log(f"{step} steps in {seconds:.1f} s ({step / max(seconds, 1e-9):.2f} steps/s)"
                 + (f", held-out Dice {heldout_dice:.3f} on {holdout.name(names)}" if heldout_dice is not None else ""))
    meta = {
        "training": {
            "steps": step, "seconds": round(seconds, 1), "device": device.type, "seed": opts.seed,
            "stop_reason": stop.reason if stopped else None,
            "init": init, "lr": lr, "batch_size": batch_size, "precision": str(dtype or torch.float32).replace("torch.", ""), "stopped": stopped, "recipe": recipe.to_json(),
            "annotated_slices": [s.name(names) for s in annotation.slices], "annotation": annotation.source,
            "heldout_slice": holdout.name(names) if holdout else None, "heldout_dice": heldout_dice,
            "image": volume.path, "labels": labels.path, "geometry": volume.geometry.to_json(),
            "roi_zyx": [[r.start, r.stop] for r in roi] if roi is not None else None,
            "adaptation": adaptation,
            "final_step": _final_step_record(selection, opts, table, skipped_selection),
            "log": history[:: max(1, len(history) // 200)],
        }
    }
    model = Model(net.to("cpu"), table, normalization, meta)
    kept = np.isin(labels.array, [lab.value for lab in table])
    return FinetuneResult(model, stopped, step, seconds, holdout.name(names) if holdout else None,
                          heldout_dice, history, (np.where(kept, labels.array, 0), annotation.known), roi,
                          meta["training"]["final_step"])


def _adapt(net: SegNet, image: np.ndarray, roi, scheme: str, opts: FinetuneOptions, device: torch.device, dtype,
           stop: StopRequest, progress: Progress) -> dict:
    """The self-supervised adaptation to this scan (``hssl.adapt``), with its progress and log line."""
    from . import adapt

    seconds = opts.adaptation_seconds()

    # The whole job's remaining time: what is left of the adaptation, then the fine-tuning budget.
    after = (opts.time_budget - seconds) if opts.time_budget is not None else 0.0

    def report(step: int, elapsed: float, loss: float) -> None:
        total = max(step, int(round(step * seconds / max(elapsed, 1e-9))))
        progress.update("adapt", step, total, loss=loss, elapsed_s=elapsed,
                        eta_s=max(0.0, seconds - elapsed) + after, device=device.type)

    record = adapt.adapt(net, image, roi, seconds, device, dtype, opts.seed, stop.requested, scheme,
                         lr=opts.recipe.adapt_lr, clip=opts.recipe.grad_clip, report=report)
    if record["steps"] == 0:
        progress.log(f"note: no adaptation to this scan: {record.get('skipped') or 'no step fitted its seconds'}")
    else:
        progress.log(f"adapted to this scan: {record['steps']} self-supervised steps in {record['seconds']:.1f} s "
                     f"(loss {record['first_loss']:.3f} -> {record['last_loss']:.3f})"
                     + (f"; ended early: {record['skipped']}" if record.get("skipped") else ""))
    progress.close()
    net.train()
    return record


def _fraction(step: int, elapsed: float, opts: FinetuneOptions, reserve: float = 0.0) -> float:
    """How much of the budget is used; ``reserve`` seconds of a time budget are kept for the final
    prediction, but training always gets at least half the budget."""
    parts = []
    if opts.steps is not None:
        parts.append(step / opts.steps)
    if opts.time_budget is not None:
        parts.append(elapsed / max(opts.time_budget - reserve, 0.5 * opts.time_budget))
    return max(parts)


def _forward_seconds(net: SegNet, plan, device: torch.device, dtype, tries: int = 3) -> float:
    """Seconds of one inference forward pass of a training-sized window (the fastest of ``tries``:
    the first pass after training steps can take twice as long)."""
    x = torch.zeros((1, 1, *plan.patch_size), device=device)
    net.eval()
    best = np.inf
    with torch.inference_mode(), autocast(device.type, dtype):
        for _ in range(tries):
            t0 = time.monotonic()
            net(x)
            best = min(best, time.monotonic() - t0)
    net.train()
    return best


def _windows(shape, region: tuple[slice, ...], plan, classes: int) -> int:
    """The windows prediction runs over ``region`` of a ``shape`` volume, at its default overlap."""
    from .predict import predicted_windows
    from .workflow import default_overlap

    return predicted_windows(shape, plan.patch_size, default_overlap(region, plan.patch_size), classes, roi=region)


def _reserve(per_window: float, shape, region: tuple[slice, ...], plan, classes: int, recipe: FinetuneRecipe,
             final_step: str, refine_seconds: float | None = None, passes: int = 1) -> float:
    """Seconds of a time budget to keep for the final prediction of ``region`` (of a ``shape``
    volume, ``classes`` output channels): its estimated time (``passes`` network passes of windows x
    seconds per window, plus the intensity refinement: ``refine_seconds`` when measured, else
    ``recipe.grow_seconds_per_voxel`` per voxel of the region) minus the recipe's slack for it."""
    extent = [r.stop - r.start for r in region]
    network = passes * per_window * _windows(shape, region, plan, classes)
    if refine_seconds is None:
        voxels = float(np.prod(extent))
        refine_seconds = recipe.grow_seconds_per_voxel * voxels if final_step != "network" else 0.0
    return max(0.0, network + refine_seconds - recipe.first_prediction_slack_s)


def _expected_final(selection: dict, recipe: FinetuneRecipe = DEFAULT_RECIPE) -> tuple[set[str], int]:
    """The intensity candidates the final prediction is expected to compute, and its network passes.
    Those chosen on the held-out slice, and, when a segment (not grown alone already) reproduced its
    painted slices below ``recipe.poor_heldout_dice`` in the selection's prediction, both
    ``network+grow`` and ``grow``: the prediction grows such a segment (``hssl.workflow``, unlearned),
    after a second pass for the probabilities when the network alone was chosen for everything."""
    chosen = selection["chosen"]
    steps = {chosen, *selection["per_class"].values()} - {"network"}
    shaky = [c for c, fit in selection.get("painted_fit", {}).items()
             if fit < recipe.poor_heldout_dice and selection["per_class"].get(c, chosen) != "grow"]
    if not shaky:
        return steps, 1
    return steps | {"network+grow", "grow"}, 1 if steps else 2


def _selection_seconds(per_window: float, shape, region: tuple[slice, ...], plan, classes: int,
                       recipe: FinetuneRecipe, intensity_candidates: int = 2) -> float:
    """Estimated seconds of ``_select_final_step`` on ``region`` of a ``shape`` volume: the network
    over it (windows x seconds per window) and each intensity candidate there
    (``recipe.grow_seconds_per_voxel``)."""
    extent = [r.stop - r.start for r in region]
    windows = _windows(shape, region, plan, classes)
    return per_window * windows + intensity_candidates * recipe.grow_seconds_per_voxel * float(np.prod(extent))


def _refine_seconds(selection: dict, region: tuple[slice, ...], recipe: FinetuneRecipe = DEFAULT_RECIPE,
                    candidates: set[str] | None = None) -> float:
    """The intensity refinement's estimated seconds over ``region`` for ``candidates`` (default: those
    the selection chose): each one's time on the selection region, scaled by the voxel count, but
    never below ``recipe.grow_seconds_per_voxel`` per voxel of ``region`` (a small region's grow can
    take a third of that per voxel, see the recipe)."""
    if candidates is None:
        candidates = {selection["chosen"], *selection["per_class"].values()}
    voxels = float(np.prod([r.stop - r.start for r in region]))
    scale = voxels / max(selection["region_voxels"], 1)
    return sum(max(selection["candidate_seconds"][name] * scale, recipe.grow_seconds_per_voxel * voxels)
               for name in set(candidates) - {"network"})


def _after_oom(batch_size: int, device: torch.device, net: SegNet, progress: Progress):
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if batch_size > 1:
        progress.log(f"out of memory on {device.type} with batch {batch_size}: retrying with batch {batch_size // 2}")
        return batch_size // 2, device
    if device.type != "cpu":
        progress.log(f"out of memory on {device.type} even with batch 1: continuing on the CPU (slower)")
        net.to("cpu")
        return 1, torch.device("cpu")
    raise OutOfMemory("host memory ran out even with batch 1: close other programs or use a smaller "
                      "--patch-size")


def _move_optimizer(optimizer, net, device):
    for state in optimizer.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                state[key] = value.to(device)
    return optimizer


def _slab_region(ref: SliceRef, region: np.ndarray, plan) -> tuple[slice, ...] | None:
    """A patch-thick slab around the held-out slice ``ref``, across it only as wide as ``region`` (the
    part of the slice that is scored: near the annotated structures, see _box_around); None when
    ``region`` is empty."""
    axis, index = ref.axis, ref.index
    half = plan.patch_size[axis] // 2
    sl = [slice(None)] * 3
    sl[axis] = slice(max(0, index - half), min(region.shape[axis], index + half + 1))
    for a in range(3):
        if a != axis:
            hit = np.nonzero(region.any(axis=tuple(b for b in range(3) if b != a)))[0]
            if hit.size == 0:
                return None
            sl[a] = slice(int(hit[0]), int(hit[-1]) + 1)
    return tuple(sl)


def _crop_across(region: tuple[slice, ...], ref: SliceRef, target: np.ndarray, plan, seconds, limit: float):
    """The largest part of ``region`` across the held-out slice ``ref`` (its full extent along
    ``ref.axis``, so both painted neighbours stay in) whose ``seconds(part)`` is within ``limit``,
    with those seconds: the in-plane extent shrinks by ``CROP_FACTOR`` per try, down to one patch,
    centred on the painted structures of the held-out slice (clipped to the region). None when even
    one patch is too costly."""
    axis = ref.axis
    across = [a for a in range(3) if a != axis]
    take = [slice(None)] * 3
    take[axis] = ref.index
    painted = np.nonzero(target[tuple(take)] > 0)
    centre = {}
    for a, hits in zip(across, painted):
        r = region[a]
        inside = hits[(hits >= r.start) & (hits < r.stop)]
        centre[a] = float(np.mean(inside)) if inside.size else 0.5 * (r.start + r.stop)
    scale = 1.0
    while True:
        scale *= CROP_FACTOR
        part, floor = list(region), True
        for a in across:
            r = region[a]
            full = r.stop - r.start
            size = min(full, max(plan.patch_size[a], int(round(full * scale))))
            floor &= size == min(full, plan.patch_size[a])
            lo = int(round(centre[a] - size / 2))
            lo = min(max(lo, r.start), r.stop - size)
            part[a] = slice(lo, lo + size)
        part = tuple(part)
        cost = seconds(part)
        if cost <= limit:
            return part, cost
        if floor:
            return None


def _extent_text(region: tuple[slice, ...], axis: int) -> str:
    """The in-plane size of ``region`` across ``axis``, e.g. '300 x 280'."""
    return " x ".join(str(region[a].stop - region[a].start) for a in range(3) if a != axis)


def _slab_windows(ref: SliceRef, region: np.ndarray, plan) -> int:
    """The windows of one held-out estimate (``_slab_dice``); 0 when it scores nothing."""
    from .predict import window_count

    sl = _slab_region(ref, region, plan)
    return 0 if sl is None else window_count([r.stop - r.start for r in sl], plan.patch_size, SLAB_OVERLAP)


def _slab_dice(net: SegNet, image: np.ndarray, target: np.ndarray, ref: SliceRef, region: np.ndarray,
               plan, device: torch.device, dtype: torch.dtype | None) -> float | None:
    """Mean foreground Dice on the held-out slice, predicting only a patch-thick slab around it."""
    axis, index = ref.axis, ref.index
    sl = _slab_region(ref, region, plan)
    if sl is None:
        return None
    lo = sl[axis].start
    slab = torch.from_numpy(np.ascontiguousarray(image[tuple(sl)]))[None, None].to(device)
    net.eval()
    with torch.inference_mode(), autocast(device.type, dtype):
        logits = sliding_window_inference(slab, plan.patch_size, 4, net, overlap=SLAB_OVERLAP, padding_mode="replicate")
    pred = logits[0].argmax(0).to("cpu").numpy()
    take = [slice(None)] * 3
    take[axis] = index - lo
    pred, ref_labels, mask = pred[tuple(take)], target[tuple(sl)][tuple(take)], region[tuple(sl)][tuple(take)]
    scores = []
    for c in np.unique(np.concatenate([np.unique(ref_labels[mask]), np.unique(pred[mask])])):
        if c == 0:
            continue
        p, r = (pred == c) & mask, (ref_labels == c) & mask
        scores.append(2.0 * np.count_nonzero(p & r) / max(np.count_nonzero(p) + np.count_nonzero(r), 1))
    return float(np.mean(scores)) if scores else None


def _box_around(mask: np.ndarray, patch) -> np.ndarray:
    """Boolean box covering ``mask``'s bounding box grown by one patch on each side.

    The held-out estimate is computed inside it: far-away false positives are not counted, which
    keeps the estimate cheap enough to run during training (the estimate is documented as local).
    """
    box = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return box
    sl = []
    for a in range(3):
        hit = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        sl.append(slice(max(0, int(hit[0]) - patch[a]), min(mask.shape[a], int(hit[-1]) + patch[a] + 1)))
    box[tuple(sl)] = True
    return box


def _select_final_step(net: SegNet, image: np.ndarray, target: np.ndarray, annotation: Annotation, holdout: SliceRef,
                       holdout_region: np.ndarray, region: tuple[slice, ...], table: list[LabelInfo],
                       normalization: Normalization, device: torch.device, precision: str, recipe: FinetuneRecipe,
                       cropped: bool = False, final_voxels: int | None = None, limit_seconds: float | None = None) -> dict:
    """Score each candidate on the held-out slice, computed on ``region`` (which holds it) with the
    network as trained without it and seeds from the other painted slices there; returns the
    overall and the per-segment choice, the scores, and the time the region's prediction took (for
    the final prediction's estimate). ``cropped``: ``region`` is a part across of the region between
    the painted neighbours (``_crop_across``), recorded as the scope. ``grow`` is also scored over
    ``recipe.alt_grow_connectivity`` neighbours when the final prediction's region (``final_voxels``)
    is small enough and the selection's seconds stay within ``limit_seconds``; it replaces the
    6-neighbour grow as the ``grow`` candidate when its mean held-out Dice is higher by more than
    ``recipe.alt_grow_margin``, its connectivity recorded."""
    from .predict import predict_array
    from .workflow import default_overlap

    t0 = time.monotonic()
    model = Model(net, table, normalization, {})
    overlap = default_overlap(region, net.plan.patch_size)
    t_predict = time.monotonic()
    _, probs = predict_array(model, image, device, overlap=overlap, precision=precision, probabilities=True,
                             roi=region)
    t_predict = time.monotonic() - t_predict
    windows = _windows(image.shape, region, net.plan, net.out_channels)
    net.train()
    train_known = known_mask(target.shape, [s for s in annotation.slices if s != holdout])
    probs_r, image_r = probs[(slice(None), *region)].astype(np.float32), image[region]
    known_r = train_known[region]
    sparse_r = np.where(known_r, target[region], 0)
    mask_r = holdout_region[region]
    classes = range(1, len(table) + 1)
    # How the network reproduces the painted slices there (on the components post-processing keeps,
    # as the final prediction judges it): a segment it does not will be grown by the final
    # prediction (hssl.workflow, unlearned), which the time kept for it must count.
    kept = postprocess.keep_annotated_components(np.argmax(probs_r, axis=0).astype(np.uint8), sparse_r, known_r)
    fit = refine.painted_fit(kept, sparse_r, known_r, classes)
    scores, seconds = {}, {}
    for name in refine.CANDIDATES:
        t = time.monotonic()
        pred = refine.candidate(name, image_r, probs_r, sparse_r, known_r, net.plan.spacing, recipe.refine_confidence,
                                span_margin=recipe.grow_span_margin)
        seconds[name] = time.monotonic() - t
        scores[name] = refine.slice_dice(pred, target[region], mask_r, classes)
    connectivity, tried = 6, {}
    alt = recipe.alt_grow_connectivity
    spent = time.monotonic() - t0
    if (alt and alt != 6 and final_voxels is not None and final_voxels <= recipe.alt_grow_max_voxels
            and (limit_seconds is None or spent + recipe.alt_grow_cost * seconds["grow"] <= limit_seconds)):
        t = time.monotonic()
        pred = refine.candidate("grow", image_r, None, sparse_r, known_r, net.plan.spacing,
                                span_margin=recipe.grow_span_margin, connectivity=alt)
        alt_seconds = time.monotonic() - t
        alt_scores = refine.slice_dice(pred, target[region], mask_r, classes)
        tried = {6: _mean(scores["grow"]), alt: _mean(alt_scores)}
        if tried[alt] > tried[6] + recipe.alt_grow_margin:
            scores["grow"], seconds["grow"], connectivity = alt_scores, alt_seconds, alt
    margins = {"grow": recipe.grow_margin}
    per_class = refine.choose_per_class(scores, margins=margins, poor=recipe.poor_heldout_dice)
    return {"chosen": refine.choose(scores, margins=margins), "per_class": per_class,
            "scores": scores, "seconds": time.monotonic() - t0, "predict_seconds": t_predict, "windows": windows,
            "candidate_seconds": seconds, "painted_fit": fit, "region_voxels": int(np.prod([r.stop - r.start for r in region])),
            "scope": "crop" if cropped else "region", "across": _extent_text(region, holdout.axis),
            "grow_connectivity": connectivity, "grow_by_connectivity": tried}


def _mean(scores: dict[int, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else 0.0


def _per_segment(scores: dict[int, float], table: list[LabelInfo]) -> dict[str, float]:
    return {table[c - 1].name: round(v, 4) for c, v in sorted(scores.items())}


def _final_step_event(selection: dict, table: list[LabelInfo], poor: float = DEFAULT_RECIPE.poor_heldout_dice) -> dict:
    """The ``final_step`` progress event: the overall choice, the choice per segment scored on the
    held-out slice, each candidate's held-out Dice per segment, and the segments whose chosen result
    stays below ``poor`` there; ``scope``: where the candidates were computed (``region``: between the
    held-out slice's painted neighbours, ``crop``: a part of that region across, see _crop_across);
    ``painted_fit``: the network's Dice per segment on the other painted slices there;
    ``grow_connectivity``: the neighbours ``grow`` competes over (6 or 26), chosen by the mean
    held-out Dice in ``grow_by_connectivity`` (empty when only 6 was tried)."""
    per = {name: _per_segment(sc, table) for name, sc in selection["scores"].items()}
    per_segment = {table[c - 1].name: name for c, name in sorted(selection["per_class"].items())}
    poor_segments = [seg for seg, name in per_segment.items() if per[name].get(seg, 1.0) < poor]
    return {"chosen": selection["chosen"], "per_segment": per_segment, "seconds": round(selection["seconds"], 2),
            "heldout_dice": per, "poor_segments": poor_segments, "scope": selection.get("scope", "region"),
            "painted_fit": _per_segment(selection.get("painted_fit", {}), table),
            "grow_connectivity": selection.get("grow_connectivity", 6),
            "grow_by_connectivity": {str(k): round(v, 4) for k, v in selection.get("grow_by_connectivity", {}).items()}}


def _final_step_note(selection: dict, table: list[LabelInfo]) -> str:
    event = _final_step_event(selection, table)
    parts = []
    for name, sc in selection["scores"].items():
        mean = np.mean(list(sc.values())) if sc else float("nan")
        wide = name == "grow" and selection.get("grow_connectivity", 6) != 6
        parts.append(f"{name}{' (all 26 neighbours)' if wide else ''} {mean:.3f}")
    note = f"held-out slice Dice by final step: {', '.join(parts)}; using {selection['chosen']}"
    others = {seg: name for seg, name in event["per_segment"].items() if name != selection["chosen"]}
    if others:
        note += " (" + ", ".join(f"{name} for {seg}" for seg, name in others.items()) + ")"
    if event["poor_segments"]:
        worst = ", ".join(f"{seg} {event['heldout_dice'][event['per_segment'][seg]][seg]:.2f}"
                          for seg in event["poor_segments"])
        note += (f"\nwarning: poorly learned on the held-out slice ({worst}): paint these segments on more slices "
                 "(or in another orientation) and fine-tune again")
    return note


def _final_step_record(selection: dict | None, opts: FinetuneOptions, table: list[LabelInfo],
                       skipped: float | None = None) -> dict:
    """What model.json says about the final segmentation step (read back by prediction); ``skipped``:
    the estimated seconds of a held-out choice that was too expensive to run."""
    if opts.final_step != "auto":
        return {"chosen": opts.final_step, "by": "option"}
    if skipped is not None:
        return {"chosen": opts.recipe.final_step,
                "by": f"default (the held-out choice would have taken about {skipped:.0f} s of the budget)"}
    if selection is None:
        return {"chosen": opts.recipe.final_step, "by": "default (no held-out slice)"}
    by = "held-out slice"
    if selection.get("scope") == "crop":
        by += (f" (on a {selection['across']} part across of the region between its painted neighbours: the whole "
               "region was too large to compare the candidates within the budget)")
    return {**_final_step_event(selection, table), "by": by}
