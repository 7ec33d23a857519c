"""The units of a benchmark run, each run in its own process: fine-tune and predict (quality), the
MONAI baseline's training, one prediction, pretraining throughput. A unit's row (or its error) goes
to a JSON file."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from .baselines import MonaiModel, monai_predict, predict_monai, train_monai
from .cases import SCORE_KEYS, few_case, load_case, reference_labels
from .measure import heldout_curve, peak_mb, reset_peak, rss_mb, time_to_fraction
from .settings import CT_SHAPE, REPO


def _threads(spec: dict) -> int:
    from hssl.device import set_threads

    return set_threads(spec["threads"])


def _spec_case(spec: dict, name: str | None = None, with_ref: bool = True):
    return load_case(name or spec["case"], spec.get("ct_source", "lung2"), tuple(spec.get("ct_shape", CT_SHAPE)),
                     with_ref)


def w_quality(spec: dict) -> dict:
    """Fine-tune on the annotated slices and predict as ``hssl finetune --predict`` does
    (``hssl.finetune.finetune``, then ``hssl.workflow.predict_volume`` with the annotation: in its
    region, post-processed), score; optionally save the model."""
    from hssl.fewslice import score
    from hssl.finetune import FinetuneOptions, finetune
    from hssl.model_store import save_model
    from hssl.progress import Progress
    from hssl.workflow import predict_volume

    startup = time.time() - spec["launched"]
    threads = _threads(spec)
    t = time.perf_counter()
    volume, ref, axis, structure = _spec_case(spec)
    case = few_case(volume, ref, structure, spec["slices"], axis)
    slices = case.slices
    load_s = time.perf_counter() - t
    scope = reset_peak()
    opts = FinetuneOptions(steps=spec.get("steps"), time_budget=spec.get("time_budget"), device=spec["device"],
                           seed=spec["seed"], init=spec["init_value"], lr=spec.get("lr"))
    quiet = Progress(bar=False)
    t, c = time.perf_counter(), time.process_time()
    result = finetune(volume, case.labels, case.annotation, opts, quiet)
    finetune_s, finetune_cpu = time.perf_counter() - t, time.process_time() - c
    peak_finetune = peak_mb()
    device = result.model.meta["training"]["device"]
    t, c = time.perf_counter(), time.process_time()
    pred = predict_volume(result.model, volume, device, progress=quiet, annotation=result.annotation,
                          roi=result.roi).labels
    predict_s, predict_cpu = time.perf_counter() - t, time.process_time() - c
    peak = peak_mb()
    if spec.get("save"):
        m = result.model
        save_model(spec["save"], m.net, m.labels, m.normalization, m.meta, overwrite=True)
    row = {"case": spec["case"], "budgets": spec["budgets"], "slices": slices,
           "n_slices": len(slices), "structure_slices": len(case.structure_slices),
           "init": spec["init"], "lr": result.model.meta["training"]["lr"], "seed": spec["seed"],
           "device": device, "threads": threads,
           "steps": result.steps, "finetune_s": round(finetune_s, 2),
           "steps_per_s": round(result.steps / finetune_s, 3),
           "predict_s": round(predict_s, 2), "load_s": round(load_s, 2), "startup_s": round(startup, 2),
           "finetune_cpu_s": round(finetune_cpu, 2), "predict_cpu_s": round(predict_cpu, 2),
           "steps_per_cpu_s": round(result.steps / finetune_cpu, 3),
           "finetune_to_prediction_s": round(finetune_s + predict_s, 2),
           "heldout_slice": result.heldout, "heldout_dice": result.heldout_dice,
           "t95_s": time_to_fraction(result.log, result.heldout_dice), "heldout_curve": heldout_curve(result.log),
           "roi_zyx": [[r.start, r.stop] for r in result.roi] if result.roi is not None else None,
           "peak_rss_finetune_mb": round(peak_finetune), "peak_rss_mb": round(peak),
           "peak_scope": "finetune+predict" if scope else "process lifetime",
           "volume_shape": list(volume.array.shape)}
    if spec.get("score", True):
        # The network alone (no annotation overwrite, no post-processing) in the same region: "raw".
        raw = predict_volume(result.model, volume, device, progress=quiet, roi=result.roi).labels
        s, raw_s = score(case, pred), score(case, raw, hd95=False)
        row.update({k: s[k] for k in SCORE_KEYS})
        row.update({"dice_raw": raw_s["dice"], "dice_volume_raw": raw_s["dice_volume"]})
    return row


def w_baseline(spec: dict) -> dict:
    """Train the plain MONAI pipeline (``baselines.train_monai``) for the spec's steps or seconds and
    save it (``MonaiModel.save``) for the prediction units."""
    import torch

    from hssl.normalize import for_modality

    threads = _threads(spec)
    volume, ref, axis, structure = _spec_case(spec)
    case = few_case(volume, ref, structure, spec["slices"], axis)
    device = torch.device(spec["device"] if spec["device"] != "auto" else "cpu")
    scheme = for_modality("auto", volume.array).scheme  # CT or not: what a MONAI user knows of the scan
    scope = reset_peak()
    model, info = train_monai(volume.array, case.sparse, case.annotation.known, tuple(reversed(volume.geometry.spacing)),
                              scheme, spec["seed"], device,
                              time_budget=spec.get("time_budget"), steps=spec.get("steps"))
    peak = peak_mb()
    model.save(spec["save"])
    steps, seconds = info["steps"], info["seconds"]
    return {"case": spec["case"], "budgets": spec["budgets"], "slices": case.slices, "n_slices": len(case.slices),
            "seed": spec["seed"], "pipeline": "monai-unet", "device": device.type, "threads": threads,
            "steps": steps, "patch": info["patch"], "working_shape": info["working_shape"], "train_s": round(seconds, 2), "train_cpu_s": round(info["cpu_s"], 2),
            "steps_per_s": round(steps / seconds, 3), "crops_without_known_voxel": round(info["crops_without_known_voxel"], 3),
            "peak_rss_train_mb": round(peak), "peak_scope": "training" if scope else "process lifetime"}


def w_predict(spec: dict) -> dict:
    """Predict one volume with one method and model; time and peak RSS of the prediction alone
    (normalisation included), then the score.

    ``ours-roi``: the product's prediction (``hssl.workflow.predict_volume`` with the annotation:
    in its region, post-processed); ``ours-full``: ``predict_volume`` over the whole volume (slabs,
    Gaussian blending); ``monai-swi``: MONAI's default sliding_window_inference over the whole volume."""
    import torch

    from hssl.fewslice import score, score_labels
    from hssl.model_store import load_model
    from hssl.progress import Progress
    from hssl.sparse import annotation_roi
    from hssl.workflow import predict_volume

    threads = _threads(spec)
    method = spec["method"]
    device = torch.device(spec["device"] if spec["device"] != "auto" else "cpu")
    monai_pipeline = spec.get("pipeline") == "monai-unet"
    model = MonaiModel.load(spec["model"]) if monai_pipeline else load_model(spec["model"], device)
    volume, ref, axis, structure = _spec_case(spec, with_ref=method == "ours-roi")
    sparse = known = None
    if method == "ours-roi":  # the annotation is an input of the product's prediction
        case = few_case(volume, ref, structure, spec["slices"], axis)
        sparse, known = case.sparse, case.annotation.known
        case = ref = None  # the reference has no part in the measured prediction
    quiet = Progress(bar=False)
    scope = reset_peak()
    before = rss_mb()
    t, c = time.perf_counter(), time.process_time()
    if monai_pipeline:
        if method != "monai-swi":
            raise ValueError(f"the plain MONAI pipeline predicts with monai-swi, not {method}")
        labels = predict_monai(model, volume.array, tuple(reversed(volume.geometry.spacing)), device)
    elif method == "ours-roi":
        roi = annotation_roi(sparse, known, tuple(reversed(volume.geometry.spacing)))
        labels = predict_volume(model, volume, device.type, progress=quiet, annotation=(sparse, known), roi=roi).labels
    elif method == "ours-full":
        labels = predict_volume(model, volume, device.type, progress=quiet).labels
    elif method == "monai-swi":  # our weights, MONAI's default inference
        labels = monai_predict(model.net, model.normalization.apply(volume.array), device, model.plan.patch_size)
    else:
        raise ValueError(f"unknown method {method}")
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    peak = peak_mb()
    row = {"volume": spec["case"], "method": method, "model": spec["model_label"], "device": device.type,
           "threads": threads, "shape": list(volume.array.shape), "predict_s": round(seconds, 2),
           "predict_cpu_s": round(cpu, 2),
           "peak_rss_mb": round(peak), "rss_before_mb": round(before) if before else None,
           "peak_increase_mb": round(peak - before) if before else None,
           "peak_scope": "prediction" if scope else "process lifetime"}
    if spec.get("score", True):
        _, ref, axis, structure = _spec_case(spec)
        big = ref.size > 50e6
        if spec.get("slices") is None:  # a volume nobody annotated: scored everywhere
            s = {**score_labels(labels, reference_labels(ref, structure), volume.geometry, hd95=not big),
                 "scored_on": "whole volume (not annotated)"}
        else:
            s = score(few_case(volume, ref, structure, spec["slices"], axis), labels, hd95=not big)
        row.update({k: s[k] for k in SCORE_KEYS})
    return row


def w_pretrain(spec: dict) -> dict:
    """Steps/s of hssl's pretraining step with the real batch loader (``PairBatches`` through a
    ``Prefetcher``, without and with a prefetch thread) versus the same kind of batches already in
    memory. The step is the trainer's: forward, hierarchical loss, backward, clip, AdamW."""
    import torch

    from hssl.device import resolve_device
    from hssl.pretrain.catalog import build_catalog
    from hssl.pretrain.config import build_config, load_config
    from hssl.pretrain.heads import PretrainNet
    from hssl.pretrain.losses import HierarchicalLoss
    from hssl.pretrain.sampling import PairBatches, Prefetcher
    from hssl.pretrain.trainer import make_plan

    threads = _threads(spec)
    work = Path(spec["work"])
    cache = work / "pretrain-cache"
    if spec.get("tiny"):
        from hssl.io import write_labelmap

        folder = work / "pretrain-images"
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("synthetic", "synthetic2"):
            volume, _, _, _ = load_case(name, with_ref=False)
            write_labelmap(folder / f"{name}.nrrd", volume.array, volume.geometry)
        cfg = build_config({"data": {"sources": [{"kind": "folder", "path": str(folder), "task": "synthetic",
                                                  "group": "ct", "modality": "ct"}],
                                     "crop_size": [4, 16, 16], "cache_dir": str(cache)},
                            "model": {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
                                      "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "channels": [4, 8, 16],
                                      "projection_dim": 8},
                            "train": {"batch_size": 2, "device": spec["device"]}})
        config_name = "tiny synthetic"
    else:
        cfg = load_config(str(REPO / spec["config"]), [f"data.cache_dir={cache}", f"train.device={spec['device']}"])
        config_name = spec["config"]
    t = time.perf_counter()
    catalog = build_catalog(cfg.data, cache, cfg.data.crop_size, warn=lambda message: None)
    catalog_s = time.perf_counter() - t
    device = resolve_device(cfg.train.device)
    torch.manual_seed(cfg.train.seed)
    model = PretrainNet(make_plan(cfg, catalog), len(catalog.tasks), len(catalog.groups), cfg.model.heads_on,
                        cfg.model.projection_dim).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    loss_fn = HierarchicalLoss(cfg.loss)
    batches = PairBatches(catalog, cfg.data.crop_size, cfg.train.batch_size, cfg.augment, cfg.data.balance,
                          cfg.train.seed, 0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(batch):
        views = torch.from_numpy(batch["views"]).to(device)
        targets = {k: torch.from_numpy(batch[k]).to(device) for k in ("task", "group", "clean")}
        loss, _ = loss_fn(model(views), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()

    n = int(spec["steps"])
    train_step(batches.batch(10**6))  # warm-up (allocator, kernels)
    # Without prefetch the step is "build the batch, then train on it": both parts are timed in the
    # same step, so the comparison with batches already in memory is paired and immune to the
    # machine's load drifting between two separate runs.
    build, compute, build_cpu, compute_cpu = [], [], [], []
    for step in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        batch = batches.batch(step)
        t1, c1 = time.perf_counter(), time.process_time()
        train_step(batch)
        sync()
        compute.append(time.perf_counter() - t1)
        compute_cpu.append(time.process_time() - c1)
        build.append(t1 - t0)
        build_cpu.append(c1 - c0)
    # With a prefetch thread the loader's cost is the time the step waits for its batch.
    prefetch = Prefetcher(batches, 2)
    prefetch.get(n)  # fill the queue
    wait, compute2 = [], []
    for step in range(n + 1, 2 * n + 1):
        t0 = time.perf_counter()
        batch = prefetch.get(step)
        t1 = time.perf_counter()
        train_step(batch)
        sync()
        compute2.append(time.perf_counter() - t1)
        wait.append(t1 - t0)
    prefetch.close()

    def mode(data_s, train_s, clock):
        total = sum(data_s) + sum(train_s)
        return {"step_s": round(total / n, 4), "steps_per_s": round(n / total, 3),
                "data_s_per_step": round(sum(data_s) / n, 4), "overhead": round(sum(data_s) / total, 4),
                "clock": clock}

    return {"config": config_name, "config_prefetch": cfg.data.prefetch, "device": device.type, "threads": threads,
            "steps": n, "batch_pairs": cfg.train.batch_size, "crop_size": list(cfg.data.crop_size),
            "catalog_images": len(catalog.images), "catalog_s": round(catalog_s, 1),
            "modes": {"loader, no prefetch": mode(build_cpu, compute_cpu, "CPU"),
                      "loader, prefetch 2": mode(wait, compute2, "wall (waiting for the batch)"),
                      "in memory": mode([0.0] * n, compute_cpu, "CPU")},
            "wall_no_prefetch": mode(build, compute, "wall")}


WORKERS = {"quality": w_quality, "baseline": w_baseline, "predict": w_predict, "pretrain": w_pretrain}


def run_unit(kind: str, spec: dict, result_path: str, log_path: str) -> None:
    """Run one unit in this (fresh or forked) process; the result or the error goes to a JSON file."""
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        if kind == "fewslice":  # the comparison suite's unit: one method on one case
            from .methods import fewslice_unit

            row = fewslice_unit(spec)
        else:
            row = WORKERS[kind](spec)
    except Exception as err:  # recorded in the results, never silently dropped
        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()
