"""The methods the few-slice suite compares, by name, and the unit that runs one of them.

Every method takes the same painted slices (an ``hssl.fewslice.FewSliceCase``) and a ``Budget`` and
returns label values on the case's ``[z, y, x]`` grid:

- ``ours``: the product path at its defaults, what ``hssl finetune --predict`` gives:
  ``hssl.finetune.finetune`` (init ``auto``: the default start, ``hssl.model_format.DEFAULT_START``)
  and ``hssl.workflow.predict_volume`` with the annotation (its region, post-processing);
- ``ours-scratch`` and ``ours-pretrained``: the same from a random start (``--init scratch``) and from
  the shipped default pretrained model (``--init bundled``); a run leaves out the one that is the
  default start (``default_methods``), which ``ours`` already is;
- ``ours-adapt`` (only when asked for): ``ours`` with ``ADAPT_SHARE`` of the budget spent first on
  the self-supervised adaptation to the scan (``hssl.adapt``);
- ``monai``: the plain MONAI pipeline (``baselines``) at the same wall-clock budget;
- ``fill-between`` and ``grow-from-seeds``: the Segment Editor's "Fill between slices" and "Grow from
  seeds" through slicer-core (``bench.peers``); deterministic, so run once per case and slice count.

``register`` adds a method; a method whose module is missing is skipped with a note.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import time
from typing import Callable

import numpy as np

from .measure import peak_mb, reset_peak


@dataclasses.dataclass(frozen=True)
class Budget:
    """What a learned method may spend: ``time_budget`` seconds of training and/or ``steps``."""

    time_budget: float | None
    steps: int | None
    seed: int
    device: str


@dataclasses.dataclass
class Output:
    """A method's prediction (``[z, y, x]`` label values) and what it did."""

    labels: np.ndarray
    steps: int | None = None
    patch: list | None = None  # training patch [z, y, x]
    train_s: float | None = None
    predict_s: float | None = None
    extra: dict = dataclasses.field(default_factory=dict)
    # Extra measurements run after the timed span (their results are merged into ``extra``).
    after: Callable[[], dict] | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str  # the table's column heading
    role: str  # "ours" or "peer"
    run: Callable[..., Output]
    seeded: bool = True  # False: the same result for every seed, run once
    needs: str | None = None  # a module of this package the method imports (e.g. "peers")


METHODS: dict[str, Method] = {}


def register(name: str, label: str, role: str, seeded: bool = True, needs: str | None = None):
    """Decorator: add ``run(case, budget) -> Output`` to ``METHODS`` under ``name``."""
    def add(run: Callable[..., Output]) -> Callable[..., Output]:
        METHODS[name] = Method(name, label, role, run, seeded, needs)
        return run
    return add


def missing(name: str) -> str | None:
    """Why method ``name`` cannot run here (its module is absent), or None."""
    method = METHODS[name]
    if method.needs and importlib.util.find_spec(f"{__package__}.{method.needs}") is None:
        return f"{method.label}: scripts/bench/{method.needs}.py is not installed"
    return None


def _ours(case, budget: Budget, init: str, adapt_seconds: float | None = None) -> Output:
    from hssl.finetune import FinetuneOptions, finetune
    from hssl.progress import Progress
    from hssl.workflow import predict_volume

    quiet = Progress(bar=False)
    opts = FinetuneOptions(time_budget=budget.time_budget, steps=budget.steps, device=budget.device, seed=budget.seed,
                           init=init, adapt_seconds=adapt_seconds)
    result = finetune(case.volume, case.labels, case.annotation, opts, quiet)
    training = result.model.meta["training"]
    pred = predict_volume(result.model, case.volume, budget.device, progress=quiet, annotation=result.annotation,
                          roi=result.roi)
    extra = {"init": training["init"], "heldout_dice": result.heldout_dice, "final_step": result.final_step,
             "adaptation": training.get("adaptation"), "predict_stages_s": pred.stage_seconds}
    return Output(pred.labels, result.steps, list(result.model.plan.patch_size), result.seconds, pred.seconds, extra,
                  after=lambda: {"candidates": _other_final_steps(case, result, pred.final, budget, quiet)})


def _other_final_steps(case, result, chosen: str, budget: Budget, quiet) -> dict:
    """Dice of the final steps the model did not choose (after the timed prediction, so they cost
    nothing in the times reported): what the per-scan choice gained or lost."""
    from hssl.fewslice import score
    from hssl.refine import CANDIDATES
    from hssl.workflow import predict_volume

    out = {}
    for name in CANDIDATES:
        if name == chosen:
            continue
        other = predict_volume(result.model, case.volume, budget.device, progress=quiet, annotation=result.annotation,
                               roi=result.roi, final_step=name)
        s = score(case, other.labels, hd95=False)
        out[name] = {"dice": s["dice"], "classes": [c["dice"] for c in s["classes"]]}
    return out


@register("ours", "ours (default)", "ours")
def ours(case, budget: Budget) -> Output:
    return _ours(case, budget, "auto")


@register("ours-scratch", "ours, scratch start", "ours")
def ours_scratch(case, budget: Budget) -> Output:
    return _ours(case, budget, "scratch")


@register("ours-pretrained", "ours, pretrained start", "ours")
def ours_pretrained(case, budget: Budget) -> Output:
    return _ours(case, budget, "bundled")


# ``ours-adapt``'s share of the time budget spent adapting to the scan (``hssl.adapt``) before fine-tuning.
ADAPT_SHARE = 0.2


@register("ours-adapt", "ours, adapted to the scan first", "ours")
def ours_adapt(case, budget: Budget) -> Output:
    if not budget.time_budget:
        raise ValueError("ours-adapt takes a share of a time budget: run it with --time-budget")
    return _ours(case, budget, "auto", ADAPT_SHARE * budget.time_budget)


# Variants run only when asked for (--methods): what a change would do, not the comparison itself.
OPT_IN = {"ours-adapt"}


def default_methods() -> list[str]:
    """Every method but the start that ``ours`` already has (``--init auto`` is ``DEFAULT_START``) and
    the opt-in variants."""
    from hssl.model_format import DEFAULT_START

    same = "ours-pretrained" if DEFAULT_START == "bundled" else "ours-scratch"
    return [name for name in METHODS if name != same and name not in OPT_IN]


@register("monai", "plain MONAI pipeline", "peer")
def monai(case, budget: Budget) -> Output:
    import torch

    from hssl.device import resolve_device
    from hssl.normalize import for_modality

    from .baselines import predict_monai, train_monai

    device = resolve_device(budget.device)
    array = case.volume.array
    spacing_zyx = tuple(reversed(case.volume.geometry.spacing))
    model, info = train_monai(array, case.sparse, case.annotation.known, spacing_zyx,
                              for_modality("auto", array).scheme, budget.seed, device, budget.time_budget, budget.steps)
    t = time.perf_counter()
    labels = predict_monai(model, array, spacing_zyx, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return Output(labels, info["steps"], info["patch"], info["seconds"], time.perf_counter() - t,
                  {"working_shape": info["working_shape"]})


@register("fill-between", "Fill between slices", "peer", seeded=False, needs="peers")
def fill_between(case, budget: Budget) -> Output:
    from .peers import fill_between_slices

    t = time.perf_counter()
    labels = fill_between_slices(case.sparse, case.annotation.known)
    return Output(labels, predict_s=time.perf_counter() - t)


@register("grow-from-seeds", "Grow from seeds", "peer", seeded=False, needs="peers")
def grow_from_seeds(case, budget: Budget) -> Output:
    from .peers import grow_from_seeds as grow

    t = time.perf_counter()
    spacing_zyx = tuple(reversed(case.volume.geometry.spacing))
    labels = grow(case.volume.array, case.sparse, case.annotation.known, spacing_zyx)
    return Output(labels, predict_s=time.perf_counter() - t)


def fewslice_unit(spec: dict) -> dict:
    """One method on one case, slice count and seed, in this (fresh) process: build the case, run the
    method, write its prediction (``spec["prediction"]``, a labelmap on the case's grid), then score
    it on the unpainted slices (``hssl.fewslice.score``). ``start_to_prediction_s`` runs from the
    method's start, with the scan already in memory as in Slicer, to the written file; the peak RSS
    is the process's during the same span (the loaded case included)."""
    from hssl.device import set_threads
    from hssl.fewslice import make_case, score
    from hssl.io import write_labelmap

    from .devcases import load_case

    method = METHODS[spec["method"]]
    threads = set_threads(spec["threads"])
    startup = time.time() - spec["launched"]
    t = time.perf_counter()
    dev = load_case(spec["case"])
    case = make_case(dev.volume, dev.reference, spec["n_slices"], "auto")
    load_s = time.perf_counter() - t
    budget = Budget(spec.get("time_budget"), spec.get("steps"), spec["seed"] or 0, spec["device"])
    scope = reset_peak()
    t = time.perf_counter()
    out = method.run(case, budget)
    labels = np.asarray(out.labels)
    if labels.shape != case.sparse.shape:
        raise RuntimeError(f"{method.name} returned shape {labels.shape} for a volume of {case.sparse.shape}")
    write_labelmap(spec["prediction"], labels.astype(case.sparse.dtype), case.volume.geometry, overwrite=True)
    seconds = time.perf_counter() - t
    peak = peak_mb()
    extra = {**out.extra, **(out.after() if out.after is not None else {})}
    s = score(case, labels)
    steps_per_s = out.steps / out.train_s if out.steps and out.train_s else None
    return {"case": spec["case"], "kind": dev.kind, "method": method.name, "n_slices": spec["n_slices"],
            "seed": spec["seed"], "axis": case.volume.geometry.axis_names()[case.axis], "slices": case.slices,
            "structure_slices": len(case.structure_slices),
            "unpainted_classes": case.unpainted_classes(), "dice": s["dice"], "hd95_mm": s["hd95_mm"],
            "dice_volume": s["dice_volume"], "scored_on": s["scored_on"],
            "classes": [{k: c[k] for k in ("name", "value", "dice", "hd95_mm", "ref_voxels", "pred_voxels")}
                        for c in s["classes"]],
            "steps": out.steps, "steps_per_s": round(steps_per_s, 3) if steps_per_s else None, "patch": out.patch,
            "train_s": _round(out.train_s), "predict_s": _round(out.predict_s),
            "start_to_prediction_s": round(seconds, 2), "peak_rss_mb": round(peak),
            "peak_scope": "method" if scope else "process lifetime", "startup_s": round(startup, 2),
            "load_s": round(load_s, 2), "threads": threads, "device": spec["device"],
            "volume_shape": list(case.sparse.shape), "prediction": spec["prediction"], **extra}


def _round(v: float | None, digits: int = 2) -> float | None:
    return None if v is None else round(float(v), digits)
