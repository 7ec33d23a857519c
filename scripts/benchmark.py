#!/usr/bin/env python
"""Benchmarks of the few-slice loop on the real sample scans, side by side with a plain MONAI pipeline.

What is measured (issue 6), one heavy thing at a time, each in its own process so that its peak
memory is its own:

1. quality: N annotated axial slices of the reference label (spread through the structure as
   ``hssl demo`` picks them: ``hssl.fewslice.pick_slices``) for budgets of 1, 2, 3, 5 slices and 5 %,
   10 %, 100 % of the slices that contain the structure; inits (``scratch``, ``bundled`` when
   ``HSSLSegment/Resources/Models/default/model.json`` exists, or ``LABEL=PATH``); seeds. Dice and
   HD95 on the slices that were not annotated (when every slice with the structure is annotated,
   on the whole volume, and the row says so); the cross-volume setting (fine-tune on lung1,
   predict lung2; brain1 -> brain2).
2. interactive speed: fine-tune steps/s, fine-tune -> first prediction, time to 95 % of the final
   held-out Dice (from the training log), prediction time and peak RSS for the sample scans and
   for a CT-sized 512 x 512 x 300 volume (lung2 tiled along z); plus one real ``hssl finetune
   --predict`` command timed from launch to the written prediction.
3. the baseline: the same ``SegNet`` trained with a plain MONAI pipeline (``CacheDataset``,
   ``RandCropByPosNegLabeld`` crops from the whole volume, the same augmentations and optimiser,
   the same masked loss, the same number of steps) and applied with MONAI's default
   ``sliding_window_inference`` on the whole volume (no ROI, no post-processing).
4. pretraining throughput: steps/s with the real batch loader (``hssl.pretrain.sampling``) versus
   batches already in memory.

Outputs in ``--out``: ``results.json`` (everything, machine-readable), ``results.md`` (tables),
``dice_vs_fraction.png``, ``prediction_time_memory.png``, ``heldout_curves.png`` and
``README-results.md`` (the README "Results" section). Every output states the machine, device,
threads, torch/MONAI versions and the git commit.

    python scripts/benchmark.py                      # default: ~20 CPU minutes, one thread
    python scripts/benchmark.py --mode full          # all cases, budgets, seeds (hours on a CPU)
    python scripts/benchmark.py --mode tiny          # synthetic volume, a few steps (the test)
    python scripts/benchmark.py --only quality --cases brain1 --budgets 3 --steps 100

Sample scans: ``hssl data fetch`` once (the default and full modes need them; tiny does not).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINE = REPO / "HSSLSegment"
sys.path.insert(0, str(ENGINE))

import numpy as np  # noqa: E402

SECTIONS = ("quality", "baseline", "predict", "cross", "interactive", "pretrain")
BUNDLED = ENGINE / "Resources" / "Models" / "default"
CT_SHAPE = (300, 512, 512)  # the CT-sized volume, [z, y, x]
SAMPLES = ("lung1", "lung2", "brain1", "brain2")
EQUAL_DICE = 0.01  # "equal accuracy": Dice within one point
# Measurement noise: the same prediction repeated took 19.0 +- 0.3 s of CPU time (1 thread) and a
# process's peak RSS varies by a few MB, so ratios up to these count as "not slower / no more".
TIME_TOLERANCE = 1.05
RSS_TOLERANCE = 1.02
FEW_POINTS = 0.05  # "within a few Dice points"
RSS_LIMIT_MB = 4096
REPEAT_BELOW_CPU_S = 30.0


# ------------------------------------------------------------------------------------- settings

@dataclasses.dataclass
class Settings:
    """What one benchmark run measures. Budgets are slice counts ("3") or shares ("10%") of the
    slices that contain the structure."""

    mode: str
    cases: list
    budgets: list  # for the first init (scratch)
    inits: list  # labels or LABEL=VALUE (VALUE: scratch | bundled | model folder)
    seeds: list
    steps: int  # fine-tuning steps per quality run (ours and the baseline alike)
    baseline_budgets: list
    predict_cases: list  # sample scans predicted in the annotation region, and with the MONAI baseline
    whole_volume_cases: list  # ... also over the whole volume, by hssl and by MONAI with the same weights
    cross: list  # [source, target] pairs
    ct_source: str
    ct_shape: tuple
    ct_methods: list  # on the CT-sized volume: ours-roi, ours-full, monai-swi
    ct_steps: int
    interactive_cases: list
    interactive_budget: dict  # {"time_budget": s} or {"steps": n}
    pretrain: dict  # {"config": path} or {"tiny": True}; plus "steps"
    other_init_budgets: list | None = None  # budgets of the inits after the first (None: the same)
    predict_repeats: int = 1  # predictions under REPEAT_BELOW_CPU_S are repeated: the minimum is reported
    cross_all_inits: bool = True  # cross-volume for every init (else the first only)
    threads: int = 1
    device: str = "cpu"
    isolation: str = "spawn"  # spawn: a fresh interpreter per unit; fork: a forked child (quick, CPU only)
    sections: tuple = SECTIONS


def mode_settings(mode: str) -> Settings:
    inits = ["scratch"] + (["bundled"] if (BUNDLED / "model.json").exists() else [])
    ct_all = ["ours-roi", "ours-full", "monai-swi"]
    if mode == "tiny":
        return Settings("tiny", cases=["synthetic"], budgets=["1", "3", "100%"], inits=["scratch"], seeds=[0],
                        steps=3, baseline_budgets=["3"], predict_cases=["synthetic"],
                        whole_volume_cases=["synthetic"], cross=[["synthetic", "synthetic2"]],
                        ct_source="synthetic", ct_shape=(60, 48, 48), ct_methods=ct_all, ct_steps=2,
                        interactive_cases=["synthetic"], interactive_budget={"steps": 2},
                        pretrain={"tiny": True, "steps": 2}, isolation="fork", predict_repeats=2)
    if mode == "default":
        # About 20 CPU minutes on one thread: the pretrained init only at 1 and 3 slices, cross-volume
        # for the first init, and on the CT-sized volume our product path against MONAI's whole-volume
        # inference (hssl's whole-volume path against MONAI's with the same weights runs on brain1).
        return Settings("default", cases=["lung2", "brain1"], budgets=["1", "3", "10%", "100%"], inits=inits,
                        seeds=[0], steps=25, baseline_budgets=["3"], predict_cases=["lung2", "brain1"],
                        whole_volume_cases=["brain1"], cross=[["lung1", "lung2"], ["brain1", "brain2"]],
                        ct_source="lung2", ct_shape=CT_SHAPE, ct_methods=["ours-roi", "monai-swi"], ct_steps=4,
                        interactive_cases=["lung2"], interactive_budget={"time_budget": 30.0},
                        pretrain={"config": "configs/pretrain_samples.yaml", "steps": 4},
                        other_init_budgets=["1", "3"], cross_all_inits=False, predict_repeats=2)
    if mode == "full":
        return Settings("full", cases=list(SAMPLES), budgets=["1", "2", "3", "5", "5%", "10%", "100%"], inits=inits,
                        seeds=[0, 1, 2], steps=200, baseline_budgets=["1", "3", "10%", "100%"],
                        predict_cases=list(SAMPLES), whole_volume_cases=list(SAMPLES),
                        cross=[["lung1", "lung2"], ["brain1", "brain2"]], ct_source="lung2", ct_shape=CT_SHAPE,
                        ct_methods=ct_all, ct_steps=20, interactive_cases=list(SAMPLES),
                        interactive_budget={"time_budget": 120.0},
                        pretrain={"config": "configs/pretrain_samples.yaml", "steps": 20}, predict_repeats=3)
    raise SystemExit(f"error: unknown mode '{mode}': choose tiny, default or full")


def init_value(init: str) -> tuple[str, str]:
    """``LABEL=VALUE`` -> (label, value); ``scratch`` -> (scratch, scratch). VALUE may end with
    ``--lr X`` (the fine-tuning learning rate of that init), see ``init_lr``."""
    label, sep, value = init.partition("=")
    return (label, value.split()[0]) if sep else (init, init)


def init_lr(init: str) -> float | None:
    """The ``--lr X`` of an init spec such as ``"bundled-lr2e-3=bundled --lr 0.002"``, else None."""
    words = init.partition("=")[2].split()
    if "--lr" in words[:-1]:
        return float(words[words.index("--lr") + 1])
    return None


# ------------------------------------------------------------------------------------- environment

def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD").strip() or "unknown"
    # Porcelain lines are "XY PATH": the two status columns, a space, the path.
    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(changed), "modified": changed[:20]}


def environment(s: Settings) -> dict:
    import monai
    import SimpleITK as sitk
    import torch

    from hssl import __version__

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory_gb = None
    try:
        with open("/proc/meminfo") as f:
            memory_gb = round(int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    device = s.device
    if s.device.startswith("cuda") and s.isolation == "spawn" and torch.cuda.is_available():
        device = f"{s.device} ({torch.cuda.get_device_name(0)})"  # never before forking: CUDA does not survive fork
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "memory_gb": memory_gb, "python": platform.python_version(),
            "torch": torch.__version__, "monai": monai.__version__, "numpy": np.__version__,
            "simpleitk": sitk.Version_VersionString(), "hssl": __version__, "device": device,
            "threads": s.threads, "load_average_start": [round(v, 2) for v in os.getloadavg()],
            "git": git_state(), "mode": s.mode, "bundled_model": bundled_model()}


def bundled_model() -> dict | None:
    """Which pretrained model ``--init bundled`` loads (it may not be committed yet): its name,
    creation date and the SHA-256 of its weights."""
    import hashlib

    meta_path = BUNDLED / "model.json"
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    digest = hashlib.sha256((BUNDLED / "model.safetensors").read_bytes()).hexdigest()[:16]
    pretraining = meta.get("pretraining", {}) if isinstance(meta.get("pretraining"), dict) else {}
    return {"path": str(BUNDLED.relative_to(REPO)), "weights_sha256": digest, "created": meta.get("created"),
            "name": meta.get("name") or pretraining.get("name")}


def meta_line(meta: dict) -> str:
    g = meta["git"]
    return (f"{meta['device']} | {meta['threads']} thread(s) | torch {meta['torch']} | MONAI {meta['monai']} | "
            f"{meta['machine']} {meta['cpu_count']} CPUs | commit {g['commit'][:10]}{'+dirty' if g['dirty'] else ''}")


# ------------------------------------------------------------------------------------- memory

def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb() -> float | None:
    return _proc_status_mb("VmRSS")


def peak_mb() -> float:
    peak = _proc_status_mb("VmHWM")
    if peak is None:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = usage / 2**20 if sys.platform == "darwin" else usage / 1024  # bytes on macOS, KiB on Linux
    return peak


# ------------------------------------------------------------------------------------- cases

def synthetic_case(seed: int):
    """A CT-like ``[z, y, x]`` volume (HU) of 20 x 48 x 48 voxels at 0.8 x 0.8 x 3 mm with an
    ellipsoid 'lesion' across 11 slices. Only for the tiny mode (the harness test)."""
    rng = np.random.default_rng(seed)
    shape = (20, 48, 48)
    z, y, x = np.indices(shape)
    body = ((y - 24) / 20) ** 2 + ((x - 24) / 21) ** 2 <= 1
    cy, cx = 22 + 3 * seed, 26 - 2 * seed
    lesion = ((z - 10) / 5.6) ** 2 + ((y - cy) / 8) ** 2 + ((x - cx) / 7) ** 2 <= 1
    image = np.full(shape, -1000.0)
    image[body] = 30
    image[lesion] = 160
    image = (image + rng.normal(0, 15, shape)).astype(np.int16)
    return image, lesion.astype(np.uint8), (0.8, 0.8, 3.0)


def load_case(name: str, ct_source: str = "lung2", ct_shape=CT_SHAPE, with_ref: bool = True):
    """-> (Volume, reference uint8 [z, y, x] or None, slice axis, structure name).

    ``ct512`` is ``ct_source`` tiled along z to ``ct_shape`` (a CT-sized volume made of real data)."""
    from hssl import data
    from hssl.fewslice import SAMPLE_CASES as CASES
    from hssl.io import Geometry, Volume, read_image, read_labels

    if name == "ct512":
        volume, ref, axis, structure = load_case(ct_source, with_ref=with_ref)
        reps = [math.ceil(c / s) for c, s in zip(ct_shape, volume.array.shape)]
        crop = tuple(slice(0, c) for c in ct_shape)
        array = np.tile(volume.array, reps)[crop]
        tiled = np.tile(ref, reps)[crop] if ref is not None else None
        g = volume.geometry
        geometry = Geometry((int(ct_shape[2]), int(ct_shape[1]), int(ct_shape[0])), g.spacing, g.origin, g.direction)
        return Volume(array, geometry, f"{ct_source} tiled to {tuple(ct_shape)}"), tiled, axis, structure
    if name.startswith("synthetic"):
        image, ref, spacing = synthetic_case(0 if name == "synthetic" else 1)
        size = (image.shape[2], image.shape[1], image.shape[0])
        geometry = Geometry(size, spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
        return Volume(image, geometry, name), (ref if with_ref else None), 0, "lesion"
    volume = read_image(data.sample_path(f"{name}_image.nrrd"))
    ref = None
    if with_ref:
        ref = (read_labels(data.sample_path(f"{name}_label.nrrd"), volume.geometry).array > 0).astype(np.uint8)
    axis = volume.geometry.axis_names().index("axial")
    return volume, ref, axis, CASES.get(name, "structure")


def structure_slices(ref: np.ndarray, axis: int) -> list[int]:
    other = tuple(a for a in range(3) if a != axis)
    return [int(i) for i in np.nonzero(ref.any(axis=other))[0]]


def budget_slices(ref: np.ndarray, budget: str, axis: int = 0) -> list[int]:
    """The annotated slices for a budget: ``"3"`` slices or ``"10%"`` of the slices holding the
    structure (rounded up, at least 1; ``"100%"`` = all of them), spread by ``pick_slices``."""
    from hssl.fewslice import pick_slices

    present = structure_slices(ref, axis)
    if budget.endswith("%"):
        n = max(1, math.ceil(float(budget[:-1]) / 100 * len(present) - 1e-9))
    else:
        n = int(budget)
    if n < 1:
        raise SystemExit(f"error: budget '{budget}' gives no slice")
    if n >= len(present):
        return present
    return pick_slices(ref, n, axis)


# ------------------------------------------------------------------------------------- scoring

def score(pred: np.ndarray, ref: np.ndarray, geometry, slices: list[int], axis: int, hd95: bool = True) -> dict:
    """Dice/HD95 on the unannotated slices, or on the whole volume when every slice with the
    structure is annotated; plus the whole-volume Dice."""
    from hssl.evaluate import dice, evaluate
    from hssl.io import LabelInfo
    from hssl.sparse import SliceRef, known_mask

    covers_all = set(structure_slices(ref, axis)) <= set(slices)
    region = None if covers_all else ~known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
    if hd95:
        row = evaluate(pred, ref, geometry, [LabelInfo("structure", 1, (1.0, 0.0, 0.0))], region)["labels"][0]
        d, h = row["dice"], row["hd95_mm"]
    else:
        r = np.ones(ref.shape, dtype=bool) if region is None else region
        d, h = dice((pred > 0) & r, (ref > 0) & r), None
    return {"dice": d, "hd95_mm": h, "scored_on": "whole volume" if covers_all else "unannotated slices",
            "dice_volume": dice(pred > 0, ref > 0)}


def time_to_fraction(log: list[dict], final: float | None, fraction: float = 0.95) -> float | None:
    """Seconds until the held-out Dice estimate first reached ``fraction`` of its final value."""
    if not final or final <= 0:
        return None
    for record in log:
        value = record.get("heldout_dice")
        if value is not None and value >= fraction * final:
            return float(record["elapsed_s"])
    return None


def heldout_curve(log: list[dict]) -> list[list[float]]:
    """[(elapsed s, held-out Dice)] at each change of the estimate (it is refreshed a few times)."""
    curve, last = [], None
    for record in log:
        value = record.get("heldout_dice")
        if value is not None and value != last:
            curve.append([float(record["elapsed_s"]), round(float(value), 4)])
            last = value
    return curve


# ------------------------------------------------------------------------------------- the MONAI baseline

def monai_normalisation(scheme: str, keys=("image",)):
    """The standard MONAI intensity transform equal to hssl's scheme: CT -1000..1000 HU -> 0..1;
    otherwise the 0.5-99.5 percentiles -> 0..1."""
    from monai.transforms import ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    if scheme == "ct":
        return ScaleIntensityRanged(list(keys), a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensityRangePercentilesd(list(keys), lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)


def train_baseline(image: np.ndarray, sparse: np.ndarray, known: np.ndarray, scheme: str, plan, steps: int,
                   seed: int, device, batch_size: int = 2) -> tuple:
    """A plain MONAI pipeline on one sparsely annotated volume.

    ``CacheDataset`` (normalisation, ``SpatialPadd``, ``FgBgToIndicesd`` cached) ->
    ``RandCropByPosNegLabeld`` (pos=1, neg=1: half the crops centred on a labelled voxel, half on
    any voxel whose label is 0 - unannotated voxels included, which is what a plain pipeline
    does) -> the same augmentations as hssl (``hssl.sampling.augmentation``) -> ``SegNet`` with
    the same masked Dice+CE loss (unannotated voxels weigh zero), AdamW, polynomial decay and
    gradient clipping as hssl's fine-tuning. Returns (net, log, wall s, CPU s, share of crops without a
    known voxel).
    """
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import Compose, FgBgToIndicesd, RandCropByPosNegLabeld, SpatialPadd

    from hssl.finetune import seed_everything
    from hssl.losses import MaskedDiceCELoss
    from hssl.network import SegNet
    from hssl.sampling import augmentation

    seed_everything(seed)
    keys = ["image", "label", "known"]
    transforms = Compose([
        monai_normalisation(scheme),
        SpatialPadd(keys, spatial_size=plan.patch_size),
        FgBgToIndicesd("label"),
        RandCropByPosNegLabeld(keys, label_key="label", spatial_size=plan.patch_size, pos=1, neg=1,
                               num_samples=batch_size, fg_indices_key="label_fg_indices",
                               bg_indices_key="label_bg_indices"),
        augmentation(plan.spacing, plan.patch_size, seed),
    ])
    transforms.set_random_state(seed=seed)
    item = {"image": image[None].astype(np.float32), "label": sparse[None].astype(np.int64),
            "known": known[None].astype(np.float32)}
    t0, c0 = time.perf_counter(), time.process_time()
    dataset = CacheDataset([item], transforms, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    net = SegNet(plan, 2).to(device).train()
    lr = 2e-3
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    loss_fn = MaskedDiceCELoss()
    log, step, empty, crops = [], 0, 0, 0
    while step < steps:
        for batch in loader:
            if step >= steps:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - step / steps) ** 0.9
            x, y, k = (torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(device) for key in keys)
            crops += k.shape[0]
            empty += int((k.flatten(1).sum(1) == 0).sum())
            loss = loss_fn(net(x), y, k)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            optimizer.step()
            step += 1
            log.append({"step": step, "loss": float(loss.item()), "elapsed_s": round(time.perf_counter() - t0, 2)})
    return net.eval(), log, time.perf_counter() - t0, time.process_time() - c0, empty / max(crops, 1)


def monai_predict(net, image: np.ndarray, device) -> np.ndarray:
    """MONAI's default ``sliding_window_inference`` over the whole ``[z, y, x]`` volume (overlap
    0.25, constant blending, the network's patch, 4 windows per batch) -> uint8 argmax."""
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    with torch.inference_mode():
        logits = sliding_window_inference(x, net.plan.patch_size, 4, net.to(device))
        return logits.argmax(1)[0].to(torch.uint8).cpu().numpy()


# ------------------------------------------------------------------------------------- workers

def _threads(spec: dict) -> int:
    from hssl.device import set_threads

    return set_threads(spec["threads"])


def _spec_case(spec: dict, name: str | None = None, with_ref: bool = True):
    return load_case(name or spec["case"], spec.get("ct_source", "lung2"), tuple(spec.get("ct_shape", CT_SHAPE)),
                     with_ref)


def w_quality(spec: dict) -> dict:
    """Fine-tune on the annotated slices (hssl.finetune), predict in the annotation region with
    post-processing (what ``hssl finetune --predict`` does), score; optionally save the model."""
    import torch

    from hssl import postprocess
    from hssl.fewslice import make_sparse
    from hssl.finetune import FinetuneOptions, finetune
    from hssl.io import LabelInfo, Labels
    from hssl.model_store import save_model
    from hssl.predict import predict_array
    from hssl.progress import Progress
    from hssl.sparse import resolve_annotation

    startup = time.time() - spec["launched"]
    threads = _threads(spec)
    t = time.perf_counter()
    volume, ref, axis, structure = _spec_case(spec)
    names = volume.geometry.axis_names()
    slices = spec["slices"]
    sparse = make_sparse(ref, slices, axis)
    load_s = time.perf_counter() - t
    annotation = resolve_annotation(sparse, names, [f"{names[axis]}:{','.join(str(s) for s in slices)}"])
    table = [LabelInfo(structure, 1, (0.90, 0.35, 0.25))]
    scope = reset_peak()
    opts = FinetuneOptions(steps=spec.get("steps"), time_budget=spec.get("time_budget"), device=spec["device"],
                           seed=spec["seed"], init=spec["init_value"], lr=spec.get("lr"))
    t, c = time.perf_counter(), time.process_time()
    result = finetune(volume, Labels(sparse, table), annotation, opts, Progress(bar=False))
    finetune_s, finetune_cpu = time.perf_counter() - t, time.process_time() - c
    peak_finetune = peak_mb()
    device = torch.device(result.model.meta["training"]["device"])
    t, c = time.perf_counter(), time.process_time()
    x = result.model.normalization.apply(volume.array)
    raw, _ = predict_array(result.model, x, device, overlap=0.5 if result.roi is not None else 0.25, roi=result.roi)
    del x
    pred = postprocess.apply(raw, sparse, annotation.known, "annotated-components")
    predict_s, predict_cpu = time.perf_counter() - t, time.process_time() - c
    peak = peak_mb()
    if spec.get("save"):
        m = result.model
        save_model(spec["save"], m.net, m.labels, m.normalization, m.meta, overwrite=True)
    row = {"case": spec["case"], "budgets": spec["budgets"], "slices": slices,
           "n_slices": len(slices), "structure_slices": len(structure_slices(ref, axis)),
           "init": spec["init"], "lr": result.model.meta["training"]["lr"], "seed": spec["seed"],
           "device": device.type, "threads": threads,
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
        s = score(pred, ref, volume.geometry, slices, axis)
        raw_s = score(raw, ref, volume.geometry, slices, axis, hd95=False)
        row.update(s)
        row.update({"dice_raw": raw_s["dice"], "dice_volume_raw": raw_s["dice_volume"]})
    return row


def w_baseline(spec: dict) -> dict:
    """Train with the plain MONAI pipeline (``train_baseline``) and save the model folder."""
    import torch

    from hssl.fewslice import make_sparse
    from hssl.io import LabelInfo
    from hssl.model_store import save_model
    from hssl.normalize import for_modality
    from hssl.plan import CPU_PATCH_VOXELS, DEFAULT_PATCH_VOXELS, make_plan
    from hssl.sparse import SliceRef, known_mask

    threads = _threads(spec)
    volume, ref, axis, structure = _spec_case(spec)
    slices = spec["slices"]
    sparse = make_sparse(ref, slices, axis)
    known = known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
    device = torch.device(spec["device"] if spec["device"] != "auto" else "cpu")
    normalization = for_modality("auto", volume.array)
    voxels = CPU_PATCH_VOXELS if device.type == "cpu" else DEFAULT_PATCH_VOXELS
    plan = make_plan(tuple(reversed(volume.geometry.spacing)), volume.array.shape, voxels)  # = hssl's scratch plan
    scope = reset_peak()
    net, log, seconds, cpu, empty = train_baseline(volume.array, sparse, known, normalization.scheme, plan,
                                                   spec["steps"], spec["seed"], device)
    peak = peak_mb()
    table = [LabelInfo(structure, 1, (0.30, 0.45, 0.90))]
    meta = {"training": {"pipeline": "monai-baseline", "steps": len(log), "seconds": round(seconds, 1),
                         "seed": spec["seed"], "annotated_slices": slices, "log": log[:: max(1, len(log) // 50)]}}
    save_model(spec["save"], net.to("cpu"), table, normalization, meta, overwrite=True)
    return {"case": spec["case"], "budgets": spec["budgets"], "slices": slices, "n_slices": len(slices),
            "seed": spec["seed"], "device": device.type, "threads": threads, "steps": len(log),
            "train_s": round(seconds, 2), "train_cpu_s": round(cpu, 2), "steps_per_s": round(len(log) / seconds, 3),
            "crops_without_known_voxel": round(empty, 3), "peak_rss_train_mb": round(peak),
            "peak_scope": "training" if scope else "process lifetime"}


def w_predict(spec: dict) -> dict:
    """Predict one volume with one method and model; time and peak RSS of the prediction alone
    (normalisation included), then the score.

    ``ours-roi``: hssl.predict in the region of the annotation + post-processing (the product);
    ``ours-full``: hssl.predict over the whole volume (slabs, Gaussian blending);
    ``monai-swi``: MONAI's default sliding_window_inference over the whole volume."""
    import torch

    from hssl import postprocess
    from hssl.fewslice import make_sparse
    from hssl.model_store import load_model
    from hssl.predict import predict_array
    from hssl.sparse import SliceRef, annotation_roi, known_mask

    threads = _threads(spec)
    method = spec["method"]
    device = torch.device(spec["device"] if spec["device"] != "auto" else "cpu")
    model = load_model(spec["model"], device)
    volume, ref, axis, _ = _spec_case(spec, with_ref=method == "ours-roi")
    sparse = known = None
    if method == "ours-roi":  # the annotation is an input of the product's prediction
        slices = spec["slices"]
        sparse = make_sparse(ref, slices, axis)
        known = known_mask(ref.shape, [SliceRef(axis, s) for s in slices])
        ref = None
    scope = reset_peak()
    before = rss_mb()
    t, c = time.perf_counter(), time.process_time()
    if spec.get("normalisation", "hssl") == "hssl":
        x = model.normalization.apply(volume.array)
    else:
        x = monai_normalisation(model.normalization.scheme)({"image": volume.array[None]})["image"][0]
        x = np.asarray(x, dtype=np.float32)
    if method == "ours-roi":
        roi = annotation_roi(sparse, known, model.plan.spacing)
        labels, _ = predict_array(model, x, device, overlap=0.5, roi=roi)
        labels = postprocess.apply(labels, sparse, known, "annotated-components")
    elif method == "ours-full":
        labels, _ = predict_array(model, x, device, overlap=0.25)
    elif method == "monai-swi":
        labels = monai_predict(model.net, x, device)
    else:
        raise ValueError(f"unknown method {method}")
    seconds, cpu = time.perf_counter() - t, time.process_time() - c
    peak = peak_mb()
    del x
    row = {"volume": spec["case"], "method": method, "model": spec["model_label"], "device": device.type,
           "threads": threads, "shape": list(volume.array.shape), "predict_s": round(seconds, 2),
           "predict_cpu_s": round(cpu, 2),
           "peak_rss_mb": round(peak), "rss_before_mb": round(before) if before else None,
           "peak_increase_mb": round(peak - before) if before else None,
           "peak_scope": "prediction" if scope else "process lifetime"}
    if spec.get("score", True):
        _, ref, axis, _ = _spec_case(spec)
        big = ref.size > 50e6
        row.update(score(labels, ref, volume.geometry, spec.get("slices") or [], axis, hd95=not big))
        if spec.get("slices") is None:
            row["scored_on"] = "whole volume (not annotated)"
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


def _child(kind: str, spec: dict, result_path: str, log_path: str) -> None:
    """Run one unit in this (fresh or forked) process; the result or the error goes to a JSON file."""
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        row = WORKERS[kind](spec)
    except Exception as err:  # recorded in the results, never silently dropped
        row = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-2000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()


# ------------------------------------------------------------------------------------- running units

class Runner:
    """Runs units one at a time, each in its own process, and keeps their rows."""

    def __init__(self, s: Settings, work: Path):
        self.s, self.work = s, work
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "units").mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, kind: str, spec: dict) -> dict:
        row = self.once(kind, spec)
        if (kind != "predict" or "error" in row or self.s.predict_repeats < 2
                or row["predict_cpu_s"] > REPEAT_BELOW_CPU_S):
            return row
        # A short prediction is repeated in new processes; the minimum of each measure is reported
        # (timing and RSS noise only ever add), every value is kept.
        rows = [row] + [self.once(kind, {**spec, "tag": f"{spec.get('tag', '')}-repeat{n}"})
                        for n in range(1, self.s.predict_repeats)]
        rows = [r for r in rows if "error" not in r]
        best = dict(rows[0])
        for key in ("predict_s", "predict_cpu_s", "peak_rss_mb", "peak_increase_mb"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                best[key] = min(values)
                best[f"{key}_all"] = values
        best["repeats"] = len(rows)
        return best

    def once(self, kind: str, spec: dict) -> dict:
        self.count += 1
        name = f"{self.count:03d}-{kind}-{spec.get('tag', '')}".replace("/", "_").replace("%", "pc")
        result = self.work / "units" / f"{name}.json"
        log = self.work / "logs" / f"{name}.log"
        spec = {**spec, "threads": self.s.threads, "device": self.s.device, "work": str(self.work),
                "ct_source": self.s.ct_source, "ct_shape": list(self.s.ct_shape), "launched": time.time()}
        t = time.perf_counter()
        if self.s.isolation == "fork":
            import multiprocessing

            proc = multiprocessing.get_context("fork").Process(target=_child, args=(kind, spec, str(result), str(log)))
            proc.start()
            proc.join()
            code = proc.exitcode
        else:
            spec_path = self.work / "units" / f"{name}.spec.json"
            spec_path.write_text(json.dumps(spec))
            code = subprocess.call([sys.executable, str(Path(__file__).resolve()), "--worker", kind, str(spec_path),
                                    str(result)], env=child_env(self.s.threads))
        wall = time.perf_counter() - t
        if result.exists():
            row = json.loads(result.read_text())
        else:
            tail = log.read_text()[-1500:] if log.exists() else ""
            row = {"error": f"the {kind} worker exited with code {code} without a result", "traceback": tail}
        row["wall_s"] = round(wall, 1)
        row["unit"] = name
        status = f"ERROR {row['error']}" if "error" in row else "ok"
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} ({wall:.0f} s)", flush=True)
        return row


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and every finished child process."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def child_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ENGINE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def run_cli(case: str, slices: list[int], budget: dict, s: Settings, work: Path) -> dict:
    """``hssl finetune ... --predict`` as a user's button press: wall time from launch to the
    written prediction, with the timeline from ``--progress-json`` and the process's peak RSS."""
    from hssl import data
    from hssl.fewslice import make_sparse
    from hssl.io import LabelInfo, write_labelmap, write_segmentation

    folder = work / f"cli-{case}"
    folder.mkdir(parents=True, exist_ok=True)
    volume, ref, axis, structure = load_case(case, s.ct_source, s.ct_shape)
    if case in SAMPLES:
        image = str(data.sample_path(f"{case}_image.nrrd"))
    else:
        image = str(folder / "image.nrrd")
        write_labelmap(image, volume.array, volume.geometry)
    labels = folder / "annotation.seg.nrrd"
    write_segmentation(labels, make_sparse(ref, slices, axis), volume.geometry,
                       [LabelInfo(structure, 1, (0.90, 0.35, 0.25))], overwrite=True)
    budget_args = (["--time-budget", str(budget["time_budget"])] if "time_budget" in budget
                   else ["--steps", str(budget["steps"])])
    cmd = [sys.executable, "-m", "hssl", "finetune", "--image", image, "--labels", str(labels), "--out",
           str(folder / "model"), "--device", s.device, "--threads", str(s.threads), "--seed", "0",
           "--predict", str(folder / "prediction.seg.nrrd"), "--progress-json", "--overwrite", *budget_args]
    events: dict[str, float] = {}
    predicted = {}
    with open(work / "logs" / f"cli-{case}.log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env(s.threads))
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            events.setdefault(record.get("event"), time.perf_counter() - t0)
            if record.get("event") == "prediction":
                predicted = record
        proc.stdout.close()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
            cpu = usage.ru_utime + usage.ru_stime
        except (AttributeError, ChildProcessError):
            proc.wait()
            peak = cpu = None
        wall = time.perf_counter() - t0
    row = {"case": case, "slices": slices, "budget": budget, "device": s.device, "threads": s.threads,
           "command": "hssl finetune --predict (a new process, as the Slicer job runs it)",
           "returncode": proc.returncode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2) if cpu else None,
           "peak_rss_mb": round(peak) if peak else None}
    if proc.returncode != 0 or "prediction" not in events:
        row["error"] = f"hssl finetune exited with {proc.returncode}; see logs/cli-{case}.log"
        return row
    meta = json.loads((folder / "model" / "model.json").read_text())["training"]
    row.update({"press_to_prediction_s": round(events["prediction"], 2),
                "startup_and_load_s": round(events.get("start", float("nan")), 2),
                "finetune_s": meta["seconds"], "steps": meta["steps"],
                "steps_per_s": round(meta["steps"] / max(meta["seconds"], 1e-9), 3),
                "predict_s": predicted.get("seconds"), "heldout_dice": meta.get("heldout_dice"),
                "t95_s": time_to_fraction(meta.get("log", []), meta.get("heldout_dice"))})
    return row


# ------------------------------------------------------------------------------------- the benchmark

def run(s: Settings, out: Path, work: Path) -> dict:
    from hssl.device import set_threads

    set_threads(s.threads)
    meta = environment(s)
    results = {"meta": meta, "settings": dataclasses.asdict(s), "quality": [], "baseline": [], "prediction": [],
               "cross_volume": [], "interactive": [], "pretrain_throughput": None, "notes": []}
    runner = Runner(s, work)
    t_all = time.perf_counter()

    def save_partial():
        (out / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))

    # The annotated slices of every (case, budget); budgets that give the same slices share a run.
    refs = {}
    needed = set(s.cases) | {c for pair in s.cross for c in pair[:1]} | set(s.predict_cases) | set(s.interactive_cases)
    if any(sec in s.sections for sec in ("predict", "interactive")):
        needed.add(s.ct_source)
    for case in sorted(needed):
        _, ref, axis, _ = load_case(case, with_ref=True)
        refs[case] = (ref, axis)

    def slice_plan(case: str, budgets: list) -> dict:
        ref, axis = refs[case]
        groups: dict[tuple, list] = {}
        for b in budgets:
            groups.setdefault(tuple(budget_slices(ref, b, axis)), []).append(b)
        return groups

    models = work / "models"
    quality_jobs = []  # (case, slices, budgets, init, seed, save path)
    for n, init in enumerate(s.inits):
        budgets_of_init = s.budgets if n == 0 or s.other_init_budgets is None else s.other_init_budgets
        for case in s.cases:
            for slices, budgets in slice_plan(case, budgets_of_init).items():
                for seed in s.seeds:
                    quality_jobs.append((case, slices, budgets, init, seed))
    quality_jobs.sort(key=lambda j: (s.cases.index(j[0]) if j[0] in s.cases else 99, len(j[1]), s.inits.index(j[3])))
    # The 3-slice models that prediction, the CT-sized volume and the cross-volume setting reuse.
    three = {c: tuple(budget_slices(refs[c][0], "3", refs[c][1])) for c in refs}
    reused = set()
    if "predict" in s.sections:
        reused |= set(s.predict_cases) | {s.ct_source}
    if "cross" in s.sections:
        reused |= {pair[0] for pair in s.cross}
    cross_inits = s.inits if s.cross_all_inits else s.inits[:1]
    for case in sorted(reused):
        for init in cross_inits if case in {p[0] for p in s.cross} else s.inits[:1]:
            for seed in (s.seeds if case in {p[0] for p in s.cross} else s.seeds[:1]):
                if not any(j[0] == case and j[1] == three[case] and j[3] == init and j[4] == seed
                           for j in quality_jobs):
                    quality_jobs.append((case, three[case], ["3"], init, seed))

    def model_dir(case, init, seed, kind="ours"):
        return models / f"{kind}-{case}-{init_value(init)[0]}-s{seed}"

    if {"quality", "predict", "cross"} & set(s.sections):
        for case, slices, budgets, init, seed in quality_jobs:
            label, value = init_value(init)
            save = model_dir(case, init, seed) if slices == three.get(case) else None
            row = runner("quality", {"tag": f"{case}-{'+'.join(budgets)}-{label}-s{seed}", "case": case,
                                     "slices": list(slices), "budgets": budgets, "init": label, "init_value": value,
                                     "lr": init_lr(init),
                                     "seed": seed, "steps": s.steps, "save": str(save) if save else None})
            results["quality"].append(row)
            save_partial()

    init0, seed0 = s.inits[0], s.seeds[0]
    if "baseline" in s.sections:
        for case in s.cases:
            for slices, budgets in slice_plan(case, s.baseline_budgets).items():
                for seed in s.seeds:
                    save = model_dir(case, "monai", seed, "baseline") if slices == three[case] else \
                        models / f"baseline-{case}-{len(slices)}-s{seed}"
                    row = runner("baseline", {"tag": f"{case}-{'+'.join(budgets)}-s{seed}", "case": case,
                                              "slices": list(slices), "budgets": budgets, "seed": seed,
                                              "steps": s.steps, "save": str(save)})
                    results["baseline"].append(row)
                    if "error" not in row:
                        p = runner("predict", {"tag": f"{case}-monai-baseline-s{seed}-{len(slices)}", "case": case,
                                               "method": "monai-swi", "model": str(save), "normalisation": "monai",
                                               "model_label": f"MONAI baseline ({len(slices)} slices)",
                                               "slices": list(slices)})
                        # The baseline's weights with hssl's inference (region + post-processing): the Dice
                        # difference that the training pipeline alone makes.
                        h = runner("predict", {"tag": f"{case}-baseline-weights-hssl-inference-s{seed}-{len(slices)}",
                                               "case": case, "method": "ours-roi", "model": str(save),
                                               "normalisation": "monai", "slices": list(slices),
                                               "model_label": f"MONAI baseline ({len(slices)} slices)"})
                        row["dice_with_hssl_inference"] = h.get("dice")
                        if slices == three[case] and seed == seed0 and case in s.predict_cases:
                            results["prediction"] += [p, h]  # also the baseline's rows of the prediction table
                        row.update({"predict_s": p.get("predict_s"), "peak_rss_predict_mb": p.get("peak_rss_mb"),
                                    **{k: p.get(k) for k in ("dice", "hd95_mm", "scored_on", "dice_volume")}})
                        if "error" in p:
                            row["error"] = p["error"]
                    save_partial()

    if "predict" in s.sections:
        for case in s.predict_cases:
            ours = model_dir(case, init0, seed0)
            if not (ours / "model.json").exists():
                results["notes"].append(f"no 3-slice model for {case}: prediction rows skipped")
                continue
            common = {"case": case, "model": str(ours), "model_label": f"ours ({init_value(init0)[0]}, 3 slices)",
                      "slices": list(three[case])}
            methods = [("ours-roi", "hssl")]
            if case in s.whole_volume_cases:
                methods += [("ours-full", "hssl"), ("monai-swi", "hssl")]
            for method, norm in methods:
                results["prediction"].append(runner("predict", {**common, "tag": f"{case}-{method}", "method": method,
                                                                "normalisation": norm}))
                save_partial()
        # The CT-sized volume: our product path, our whole-volume path and MONAI's, same weights.
        ours = model_dir(s.ct_source, init0, seed0)
        if (ours / "model.json").exists():
            common = {"case": "ct512", "model": str(ours), "slices": list(three[s.ct_source]),
                      "model_label": f"ours ({init_value(init0)[0]}, 3 slices of {s.ct_source})"}
            for method in s.ct_methods:
                spec = {**common, "tag": f"ct512-{method}", "method": method, "normalisation": "hssl"}
                if method != "ours-roi":
                    spec["slices"] = None  # whole volume, no annotation
                results["prediction"].append(runner("predict", spec))
                save_partial()

    if "cross" in s.sections:
        for source, target in s.cross:
            for init in cross_inits:
                for seed in s.seeds:
                    model = model_dir(source, init, seed)
                    if not (model / "model.json").exists():
                        continue
                    row = runner("predict", {"tag": f"cross-{source}-{target}-{init_value(init)[0]}-s{seed}",
                                             "case": target, "method": "ours-full", "model": str(model),
                                             "model_label": f"{source}, 3 slices", "normalisation": "hssl",
                                             "slices": None})
                    row.update({"source": source, "target": target, "init": init_value(init)[0], "seed": seed,
                                "source_slices": list(three[source])})
                    results["cross_volume"].append(row)
                    save_partial()

    if "interactive" in s.sections:
        ct = refs[s.ct_source]
        row = runner("quality", {"tag": "ct512-interactive", "case": "ct512", "slices": list(three[s.ct_source]),
                                 "budgets": ["3"], "init": "scratch", "init_value": "scratch", "seed": seed0,
                                 "steps": s.ct_steps, "score": False})
        row["note"] = (f"{s.ct_source} tiled to {tuple(s.ct_shape)} ([z, y, x]); 3 slices of the first copy "
                       f"annotated ({ct[0].shape[0]} slices per copy); not scored")
        results["interactive"].append({"kind": "engine", **row})
        for case in s.interactive_cases:
            ref, axis = refs[case]
            row = run_cli(case, list(three[case]), s.interactive_budget, s, work)
            print(f"[{time.strftime('%H:%M:%S')}] cli-{case}: {'ERROR ' + row['error'] if 'error' in row else 'ok'} "
                  f"({row['wall_s']:.0f} s)", flush=True)
            results["interactive"].append({"kind": "cli", **row})
            save_partial()

    if "pretrain" in s.sections:
        results["pretrain_throughput"] = runner("pretrain", {"tag": "throughput", **s.pretrain})
        save_partial()

    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["benchmark_wall_s"] = round(time.perf_counter() - t_all, 1)
    meta["benchmark_cpu_s"] = round(cpu_seconds(), 1)
    # Every unit starts a new interpreter: a commit or an edit landing during the run reaches the
    # units after it. Say so when the tree moved.
    end = git_state()
    if (end["commit"], end["modified"]) != (meta["git"]["commit"], meta["git"]["modified"]):
        meta["git_end"] = end
        results["notes"].append(f"the source tree changed during the run: commit {meta['git']['commit'][:10]} "
                                f"at the start, {end['commit'][:10]} at the end (modified at the end: "
                                f"{', '.join(end['modified']) or 'none'}); later units ran the newer code")
    results["summary"] = summarise(results)
    results["comparison"] = compare(results)
    results["targets"] = targets(results, s)
    return results


# ------------------------------------------------------------------------------------- summaries

def _stats(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "n": 0, "missing": len(values)}
    return {"mean": round(float(np.mean(v)), 4), "sd": round(float(np.std(v)), 4), "n": len(v),
            "missing": len(values) - len(v)}


def _fraction(budget: str, n_slices: int, n_structure: int) -> float:
    return 1.0 if budget == "100%" else n_slices / n_structure


def summarise(results: dict) -> list[dict]:
    """Mean and spread over seeds per (case, budget, init)."""
    rows = [r for r in results["quality"] if "error" not in r and "scored_on" in r]
    groups: dict[tuple, list] = {}
    for r in rows:
        for b in r["budgets"]:
            groups.setdefault((r["case"], b, r["init"]), []).append(r)
    out = []
    for (case, budget, init), rs in groups.items():
        out.append({"case": case, "budget": budget, "init": init, "n_slices": rs[0]["n_slices"],
                    "structure_slices": rs[0]["structure_slices"], "slices": rs[0]["slices"],
                    "fraction": round(_fraction(budget, rs[0]["n_slices"], rs[0]["structure_slices"]), 4),
                    "scored_on": rs[0]["scored_on"], "seeds": [r["seed"] for r in rs],
                    "dice": _stats([r["dice"] for r in rs]), "hd95_mm": _stats([r["hd95_mm"] for r in rs]),
                    "dice_volume": _stats([r["dice_volume"] for r in rs]),
                    "dice_raw": _stats([r["dice_raw"] for r in rs]), "steps": rs[0]["steps"],
                    "shared_with": [b for b in rs[0]["budgets"] if b != budget]})
    order = {b: i for i, b in enumerate(["1", "2", "3", "5", "5%", "10%", "100%"])}
    out.sort(key=lambda r: (r["case"], r["init"] != "scratch", r["init"], order.get(r["budget"], 99), r["budget"]))
    return out


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def _diff(a, b):
    return round(a - b, 4) if a is not None and b is not None else None


def compare(results: dict) -> list[dict]:
    """Ours against the MONAI baseline: prediction (per volume), training (per case).

    ``time_ratio`` compares CPU time (user + system of the process): with one thread it is the
    compute itself, while wall time on a shared machine also counts the waits for a core (measured
    here: the same prediction took 19-29 s of wall time and 19.0 +- 0.3 s of CPU time).
    ``wall_ratio`` is given too."""
    pred = [r for r in results["prediction"] if "error" not in r]
    out = []
    for volume in sorted({r["volume"] for r in pred}):
        rows = {(r["method"], r["model"].startswith("MONAI")): r for r in pred if r["volume"] == volume}
        pairs = [("ours-roi", False, "monai-swi", True, "product vs plain MONAI pipeline"),
                 ("ours-roi", False, "monai-swi", False, "product vs MONAI inference, same weights"),
                 ("ours-full", False, "monai-swi", False, "whole volume, same weights")]
        for m1, b1, m2, b2, what in pairs:
            a, b = rows.get((m1, b1)), rows.get((m2, b2))
            if not a or not b:
                continue
            same_region = volume != "ct512" or m1 != "ours-roi"
            out.append({"volume": volume, "what": what, "ours": m1, "baseline": m2 + (" (MONAI-trained)" if b2 else ""),
                        "time_ratio": _ratio(a["predict_cpu_s"], b["predict_cpu_s"]),
                        "wall_ratio": _ratio(a["predict_s"], b["predict_s"]),
                        "peak_rss_ratio": _ratio(a["peak_rss_mb"], b["peak_rss_mb"]),
                        "peak_increase_ratio": _ratio(a.get("peak_increase_mb"), b.get("peak_increase_mb")),
                        "ours_cpu_s": a["predict_cpu_s"], "baseline_cpu_s": b["predict_cpu_s"],
                        "ours_s": a["predict_s"], "baseline_s": b["predict_s"], "ours_rss_mb": a["peak_rss_mb"],
                        "baseline_rss_mb": b["peak_rss_mb"],
                        "dice_diff": _diff(a.get("dice"), b.get("dice")) if same_region else None,
                        "ours_dice": a.get("dice") if same_region else None, "baseline_dice": b.get("dice"),
                        "device": a["device"]})
    for b in results["baseline"]:
        if "error" in b:
            continue
        ours = [q for q in results["quality"] if "error" not in q and q["case"] == b["case"] and
                q["slices"] == b["slices"] and q["seed"] == b["seed"] and q["init"] == "scratch"]
        if not ours:
            continue
        q = ours[0]
        out.append({"volume": b["case"], "what": f"training, {b['n_slices']} slices, seed {b['seed']}",
                    "ours": "hssl finetune", "baseline": "MONAI pipeline",
                    "time_ratio": _ratio(q["finetune_cpu_s"], b["train_cpu_s"]),
                    "wall_ratio": _ratio(q["finetune_s"], b["train_s"]),
                    "peak_rss_ratio": _ratio(q["peak_rss_finetune_mb"], b["peak_rss_train_mb"]),
                    "ours_cpu_s": q["finetune_cpu_s"], "baseline_cpu_s": b["train_cpu_s"],
                    "ours_s": q["finetune_s"], "baseline_s": b["train_s"], "ours_rss_mb": q["peak_rss_finetune_mb"],
                    "baseline_rss_mb": b["peak_rss_train_mb"], "dice_diff": _diff(q.get("dice"), b.get("dice")),
                    "dice_diff_same_inference": _diff(q.get("dice"), b.get("dice_with_hssl_inference")),
                    "ours_dice": q.get("dice"), "baseline_dice": b.get("dice"), "device": q["device"],
                    "baseline_crops_without_known_voxel": b["crops_without_known_voxel"]})
    return out


def targets(results: dict, s: Settings) -> list[dict]:
    """The issue's targets: met (True/False), or None when not measured in this run."""
    out = []
    pred_pairs = [c for c in results["comparison"] if not c["what"].startswith("training")]
    if pred_pairs:
        bad = []
        for c in pred_pairs:
            slower = c["time_ratio"] is not None and c["time_ratio"] > TIME_TOLERANCE
            bigger = c["peak_rss_ratio"] is not None and c["peak_rss_ratio"] > RSS_TOLERANCE
            worse = c["dice_diff"] is not None and c["dice_diff"] < -EQUAL_DICE
            if slower or bigger or worse:
                text = (f"{c['volume']} {c['ours']} vs {c['baseline']}: CPU time x{c['time_ratio']}, "
                        f"RSS x{c['peak_rss_ratio']}")
                if c["dice_diff"] is not None:
                    text += f", Dice {c['dice_diff']:+.3f}"
                bad.append(text)
        out.append({"target": "prediction never slower than MONAI's sliding_window_inference at equal accuracy, "
                              f"and no more memory (CPU time ratio <= {TIME_TOLERANCE}, peak RSS ratio <= "
                              f"{RSS_TOLERANCE}: measurement noise)",
                    "met": not bad, "measured": "; ".join(bad) if bad else
                    "; ".join(f"{c['volume']} {c['ours']}: CPU time x{c['time_ratio']}, RSS x{c['peak_rss_ratio']}"
                              for c in pred_pairs)})
    ct = [r for r in results["prediction"] if r.get("volume") == "ct512" and "error" not in r and
          r["method"].startswith("ours") and r["device"] == "cpu"]
    if ct:
        worst = max(ct, key=lambda r: r["peak_rss_mb"])
        shape = "x".join(str(v) for v in reversed(worst["shape"]))
        out.append({"target": f"CPU prediction of a {shape} volume within ~4 GB RSS",
                    "met": worst["peak_rss_mb"] <= RSS_LIMIT_MB,
                    "measured": ", ".join(f"{r['method']} {r['peak_rss_mb']} MB peak RSS ({r['predict_s']} s)"
                                          for r in ct)})
    p = results.get("pretrain_throughput")
    if p and "error" not in p:
        key = "loader, prefetch 2" if p["config_prefetch"] else "loader, no prefetch"
        mode = p["modes"][key]
        out.append({"target": "the data loader costs under 10 % of a pretraining step",
                    "met": mode["overhead"] < 0.10,
                    "measured": "; ".join(f"{k}: {v['overhead'] * 100:.1f} % ({v['step_s']} s/step)"
                                          for k, v in p["modes"].items() if k != "in memory")
                    + f" (config {p['config']} uses prefetch {p['config_prefetch']})"})
    summary = results.get("summary", [])
    inits = {r["init"] for r in summary}
    pretrained = sorted(i for i in inits if i != "scratch")
    if pretrained:
        for init in pretrained:
            pairs = []
            for r in summary:
                if r["init"] == "scratch" and r["budget"] == "3":
                    other = [o for o in summary if o["init"] == init and o["case"] == r["case"] and o["budget"] == "3"]
                    if other and other[0]["dice"]["mean"] is not None and r["dice"]["mean"] is not None:
                        pairs.append((r["case"], other[0]["dice"]["mean"], r["dice"]["mean"]))
            if pairs:
                gain = float(np.mean([a - b for _, a, b in pairs]))
                out.append({"target": f"with 3 annotated slices the pretrained init ({init}) beats scratch on average",
                            "met": gain > 0, "measured": f"mean Dice difference {gain:+.3f} ("
                            + ", ".join(f"{c}: {a:.3f} vs {b:.3f}" for c, a, b in pairs) + ")"})
    else:
        out.append({"target": "with 3 annotated slices the pretrained init beats scratch on average", "met": None,
                    "measured": "not measured: no pretrained model is bundled "
                                "(HSSLSegment/Resources/Models/default/model.json) and none was given with --inits"})
    for init in sorted(inits):
        pairs = []
        for r in summary:
            if r["init"] == init and r["budget"] == "10%":
                full = [o for o in summary if o["init"] == init and o["case"] == r["case"] and o["budget"] == "100%"]
                if full and full[0]["dice_volume"]["mean"] is not None and r["dice_volume"]["mean"] is not None:
                    pairs.append((r["case"], r["dice_volume"]["mean"], full[0]["dice_volume"]["mean"]))
        if pairs:
            gap = float(np.mean([b - a for _, a, b in pairs]))
            out.append({"target": f"with 10 % of the slices within a few Dice points of 100 % ({init})",
                        "met": gap <= FEW_POINTS,
                        "measured": f"whole-volume Dice 10 % vs 100 %: mean gap {gap * 100:.1f} points ("
                        + ", ".join(f"{c}: {a:.3f} vs {b:.3f}" for c, a, b in pairs) + f"); 'a few' taken as "
                        f"<= {FEW_POINTS * 100:.0f}"})
    return out


# ------------------------------------------------------------------------------------- reports

def _f(v, digits=3, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.{digits}f}{unit}" if isinstance(v, float) else f"{v}{unit}"


def _ms(st: dict, digits=3) -> str:
    if not st or st["mean"] is None:
        return "-"
    text = f"{st['mean']:.{digits}f}"
    if st["n"] > 1:
        text += f" ± {st['sd']:.{digits}f}"
    if st.get("missing"):
        text += f" ({st['missing']} undefined)"
    return text


def _budget_label(b: str) -> str:
    return b if b.endswith("%") else f"{b} slice{'s' if b != '1' else ''}"


def markdown(results: dict) -> str:
    meta, s = results["meta"], results["settings"]
    g = meta["git"]
    lines = [f"# HSSLSegment benchmark ({meta['mode']} mode)", "",
             f"- when: {meta['date']}; wall time {meta.get('benchmark_wall_s', '-')} s, CPU time "
             f"{meta.get('benchmark_cpu_s', '-')} s; load average "
             f"{meta['load_average_start']} at the start, {meta.get('load_average_end', '-')} at the end",
             f"- machine: {meta['platform']}, {meta['cpu']}, {meta['cpu_count']} CPUs ({meta['cpus_usable']} usable), "
             f"{meta['memory_gb']} GB",
             f"- device: {meta['device']}, {meta['threads']} thread(s); python {meta['python']}, "
             f"torch {meta['torch']}, "
             f"MONAI {meta['monai']}, numpy {meta['numpy']}, SimpleITK {meta['simpleitk']}, hssl {meta['hssl']}",
             f"- commit: {g['commit']}"
             + (f" (uncommitted changes in {', '.join(g['modified'])})" if g["dirty"] else ""),
             f"- fine-tuning budget: {s['steps']} steps per run (batch 2, hssl's CPU patch); seeds {s['seeds']}",
             "- bundled model: " + (f"{meta['bundled_model']['path']} ({meta['bundled_model']['name']}, created "
                                    f"{meta['bundled_model']['created']}, weights sha256 "
                                    f"{meta['bundled_model']['weights_sha256']})" if meta.get("bundled_model")
                                    else "none"), ""]
    lines += ["## 1. Few-slice quality", "",
              "Annotation: axial slices of the reference label spread through the structure (`hssl.fewslice.pick_slices`); "
              "budgets in % are of the slices that contain the structure, rounded up. **Dice/HD95** on the slices that "
              "were not annotated, after hssl's post-processing (the output equals the annotation on annotated slices, "
              "components not touching a painted voxel are removed); when every slice with the structure is annotated "
              "there is nothing unannotated to score and the whole volume is scored (marked *whole volume*). "
              "**volume Dice**: the whole volume (annotated slices included). **raw**: the network alone (no "
              "post-processing), same region as Dice. Mean ± SD over seeds.", "",
              "| case | budget | slices (of structure) | init | Dice | HD95 mm | volume Dice | raw Dice | scored on |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["summary"]:
        shared = f" (= {', '.join(r['shared_with'])})" if r["shared_with"] else ""
        lines.append(f"| {r['case']} | {_budget_label(r['budget'])}{shared} | "
                     f"{r['n_slices']} of {r['structure_slices']} "
                     f"| {r['init']} | {_ms(r['dice'])} | {_ms(r['hd95_mm'], 1)} | {_ms(r['dice_volume'])} | "
                     f"{_ms(r['dice_raw'])} | {r['scored_on']} |")
    if results["summary"]:
        from hssl.pretrain.benchmark import table

        rows = [{"case": r["case"], "slices": _budget_label(r["budget"]), "init": r["init"], "dice": r["dice"]["mean"]}
                for r in results["summary"] if r["dice"]["mean"] is not None]
        lines += ["", "Dice per init (mean, then each value; the format of `python -m hssl.pretrain.benchmark`):", "",
                  table(rows)]
    if results["cross_volume"]:
        lines += ["", "### Cross-volume", "", "Fine-tuned on 3 slices of the source scan, applied to the whole target "
                  "scan (no annotation there, so no region and no post-processing); scored on the whole target volume.",
                  "", "| source -> target | init | seed | Dice | HD95 mm | predict s |", "|---|---|---|---|---|---|"]
        for r in results["cross_volume"]:
            if "error" in r:
                lines.append(f"| {r.get('source')} -> {r.get('target')} | | | error: {r['error']} | | |")
                continue
            lines.append(f"| {r['source']} -> {r['target']} | {r['init']} | {r['seed']} | {_f(r['dice'])} | "
                         f"{_f(r['hd95_mm'], 1)} | {_f(r['predict_s'], 1)} |")
    lines += ["", "## 2. Interactive speed", "",
              "Engine runs (fine-tune with hssl.finetune, then prediction in the annotation region with "
              "post-processing), 3-slice budget. *fine-tune -> prediction* excludes process start-up and file reading; "
              "the `hssl finetune --predict` rows below include them. *95 % held-out* = time until the held-out "
              "slice's Dice estimate first reached 95 % of its final value (the estimate is refreshed about 7 times "
              "during the first 70 % of the budget, so this is coarse). Peak RSS = the whole process (imports "
              "included). Times are wall time, CPU time in brackets.", "",
              "| volume | init | steps | steps/s (per CPU s) | fine-tune s (CPU) | predict s (CPU) | fine-tune -> "
              "prediction s | held-out Dice | 95 % held-out after s | peak RSS fine-tune / with predict MB | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    speed = [r for r in results["quality"] if "error" not in r and "3" in r["budgets"] and r["seed"] == s["seeds"][0]]
    speed += [r for r in results["interactive"] if r.get("kind") == "engine" and "error" not in r]
    for r in speed:
        shape = "x".join(str(v) for v in reversed(r["volume_shape"]))
        lines.append(f"| {r['case']} ({shape}) | {r['init']} | {r['steps']} | {_f(r['steps_per_s'], 2)} "
                     f"({_f(r['steps_per_cpu_s'], 2)}) | {_f(r['finetune_s'], 1)} ({_f(r['finetune_cpu_s'], 1)}) | "
                     f"{_f(r['predict_s'], 1)} ({_f(r['predict_cpu_s'], 1)}) | "
                     f"{_f(r['finetune_to_prediction_s'], 1)} | "
                     f"{_f(r['heldout_dice'])} | {_f(r['t95_s'], 1)} | "
                     f"{r['peak_rss_finetune_mb']} / {r['peak_rss_mb']} "
                     f"| {r['device']} |")
    cli = [r for r in results["interactive"] if r.get("kind") == "cli"]
    if cli:
        lines += ["", "`hssl finetune --predict` in a new process (what the Slicer job runs), launch to written "
                  "prediction:", "", "| case | budget | launch -> prediction s | start-up + reading s | fine-tune s | "
                  "steps | steps/s | predict s | held-out Dice | 95 % held-out after s | CPU s | peak RSS MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in cli:
            if "error" in r:
                lines.append(f"| {r['case']} | {r['budget']} | error: {r['error']} |||||||||")
                continue
            b = r["budget"]
            budget = f"{b['time_budget']:.0f} s" if "time_budget" in b else f"{b['steps']} steps"
            lines.append(f"| {r['case']} | {budget} | {_f(r['press_to_prediction_s'], 1)} | "
                         f"{_f(r['startup_and_load_s'], 1)} | {_f(r['finetune_s'], 1)} | {r['steps']} | "
                         f"{_f(r['steps_per_s'], 2)} | {_f(r['predict_s'], 1)} | {_f(r['heldout_dice'])} | "
                         f"{_f(r['t95_s'], 1)} | {_f(r['cpu_s'], 1)} | {r['peak_rss_mb']} |")
    lines += ["", "### Prediction time and memory", "",
              "Each row is its own process; time includes intensity normalisation; peak RSS is the process's peak "
              "during the prediction (imports and the loaded volume included), *increase* = peak minus the RSS just "
              "before. `ours-roi`: hssl in the region of the annotation + post-processing (the product); `ours-full`: "
              "hssl over the whole volume (slabs, Gaussian blending); `monai-swi`: MONAI's default "
              "`sliding_window_inference` over the whole volume, argmax. "
              + (f"Predictions under {REPEAT_BELOW_CPU_S:.0f} s of CPU time ran up to {s['predict_repeats']} times, "
                 "each in a new process: the minimum of each measure is shown (*runs*), every value is in "
                 "results.json." if s["predict_repeats"] > 1 else "Each prediction ran once."), "",
              "| volume | method | model | wall s | CPU s | peak RSS MB | increase MB | Dice | scored on | runs | "
              "device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["prediction"]:
        if "error" in r:
            lines.append(f"| {r.get('unit')} | error: {r['error']} ||||||||")
            continue
        shape = "x".join(str(v) for v in reversed(r["shape"]))
        dice = _f(r.get("dice")) if not (r["volume"] == "ct512" and r["method"] == "ours-roi") else "- (region only)"
        lines.append(f"| {r['volume']} ({shape}) | {r['method']} | {r['model']} | {_f(r['predict_s'], 1)} | "
                     f"{_f(r['predict_cpu_s'], 1)} | {r['peak_rss_mb']} | {r.get('peak_increase_mb')} | {dice} | "
                     f"{r.get('scored_on', '-')} | {r.get('repeats', 1)} | {r['device']} |")
    lines += ["", "## 3. Against a plain MONAI pipeline", "",
              "Baseline: the same `SegNet` (same plan), `CacheDataset` -> `RandCropByPosNegLabeld` (pos 1, neg 1, "
              "crops from the whole volume; negative centres may be unannotated voxels) -> hssl's augmentations -> the "
              "same masked Dice+CE loss (unannotated voxels weigh zero), AdamW, learning-rate decay and clipping, the "
              "same number of steps; prediction: MONAI's default `sliding_window_inference` over the whole volume "
              "(overlap 0.25, constant blending), argmax, no post-processing. Ratios are ours / baseline "
              "(< 1: ours is faster or smaller), on CPU time (user + system: on this shared machine wall time also "
              "counts waiting for a core; wall-time ratios are given too); Dice difference = ours - baseline on the "
              "same region.", "",
              "| volume | comparison | CPU time ratio | ours CPU s | baseline CPU s | wall ratio | peak RSS ratio | "
              "ours MB | baseline MB | Dice ours - baseline | device |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["comparison"]:
        extra = ""
        if "baseline_crops_without_known_voxel" in c:
            extra = (f" (baseline crops without a known voxel: {c['baseline_crops_without_known_voxel'] * 100:.0f} %; "
                     f"Dice difference with hssl's inference for both: {_f(c['dice_diff_same_inference'])})")
        lines.append(f"| {c['volume']} | {c['what']}: {c['ours']} vs {c['baseline']}{extra} | {_f(c['time_ratio'], 2)} "
                     f"| {_f(c['ours_cpu_s'], 1)} | {_f(c['baseline_cpu_s'], 1)} | {_f(c['wall_ratio'], 2)} | "
                     f"{_f(c['peak_rss_ratio'], 2)} | "
                     f"{c['ours_rss_mb']} | {c['baseline_rss_mb']} | {_f(c['dice_diff'])} | {c['device']} |")
    lines += ["", "## 4. Pretraining throughput", ""]
    p = results.get("pretrain_throughput")
    if p is None:
        lines.append("Not run (section not selected).")
    elif "error" in p:
        lines.append(f"error: {p['error']}")
    else:
        lines += [f"Config `{p['config']}` ({p['catalog_images']} images, crops {p['crop_size']}, "
                  f"{p['batch_pairs']} pairs "
                  f"per step), {p['steps']} steps per mode after one warm-up step, {p['device']}, {p['threads']} "
                  "thread(s); the step is the trainer's (forward, hierarchical loss, backward, clipping, AdamW). "
                  "Without prefetch each step times building its batch (`PairBatches.batch`) and training on it "
                  "separately, so *in memory* is the same steps without the building; with prefetch, the loader's "
                  "cost is the time a step waits for its batch. Overhead = loader time / step time.", "",
                  "| batches from | s/step | steps/s | loader s/step | loader overhead |", "|---|---|---|---|---|"]
        for k, v in p["modes"].items():
            lines.append(f"| {k} | {v['step_s']} | {v['steps_per_s']} | {v['data_s_per_step']} | "
                         f"{v['overhead'] * 100:.1f} % |")
    lines += ["", "## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {met} | {t['measured']} |")
    errors = [r for key in ("quality", "baseline", "prediction", "cross_volume", "interactive") for r in results[key]
              if "error" in r]
    if errors or results["notes"]:
        lines += ["", "## Errors and notes", ""]
        lines += [f"- {r.get('unit', r.get('case'))}: {r['error']}" for r in errors]
        lines += [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def _footer(fig, meta: dict) -> None:
    fig.text(0.01, 0.005, meta_line(meta), fontsize=6, color="0.35", ha="left", va="bottom")


def plots(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = results["meta"]
    info = {"Description": meta_line(meta), "Software": "scripts/benchmark.py"}
    written = []

    def save(fig, name: str, bottom: float = 0.03) -> None:
        fig.tight_layout(rect=(0, bottom, 1, 1))
        _footer(fig, meta)
        fig.savefig(out / name, dpi=90, metadata=info)
        plt.close(fig)
        written.append(out / name)

    # Dice against annotated fraction, one panel per case, one line per init (+ the MONAI baseline).
    summary = results["summary"]
    cases = sorted({r["case"] for r in summary})
    fig, axes = plt.subplots(1, max(1, len(cases)), figsize=(4.2 * max(1, len(cases)), 3.6), squeeze=False)
    for ax, case in zip(axes[0], cases):
        for init in sorted({r["init"] for r in summary if r["case"] == case}, key=lambda i: (i != "scratch", i)):
            rs = sorted([r for r in summary if r["case"] == case and r["init"] == init
                        and r["dice"]["mean"] is not None],
                        key=lambda r: r["fraction"])
            seen, pts = set(), []
            for r in rs:
                if r["fraction"] not in seen:
                    seen.add(r["fraction"])
                    pts.append(r)
            if not pts:
                continue
            x = [r["fraction"] * 100 for r in pts]
            line = ax.errorbar(x, [r["dice"]["mean"] for r in pts], yerr=[r["dice"]["sd"] or 0 for r in pts],
                               marker="o", capsize=3, label=f"hssl, {init}")
            whole = [r for r in pts if r["scored_on"] == "whole volume"]
            if whole:
                ax.scatter([r["fraction"] * 100 for r in whole], [r["dice"]["mean"] for r in whole], s=90,
                           facecolors="none", edgecolors=line[0].get_color(), zorder=3)
        base = [b for b in results["baseline"] if b["case"] == case and "error" not in b and b.get("dice") is not None]
        if base:
            by_n: dict[int, list] = {}
            for b in base:
                by_n.setdefault(b["n_slices"], []).append(b["dice"])
            n_struct = next((r["structure_slices"] for r in summary if r["case"] == case), None)
            if n_struct:
                xs = sorted(by_n)
                ax.errorbar([min(1.0, n / n_struct) * 100 for n in xs], [np.mean(by_n[n]) for n in xs],
                            yerr=[np.std(by_n[n]) for n in xs], marker="s", linestyle="--", capsize=3, color="0.4",
                            label="plain MONAI pipeline")
        ax.set_title(case, fontsize=10)
        ax.set_xlabel("annotated: % of the slices with the structure", fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_xlim(0, 105)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("Dice on unannotated slices\n(circled: whole volume)")
    if cases:
        axes[0][0].legend(fontsize=7, loc="lower right")
    save(fig, "dice_vs_fraction.png")

    # Prediction time and peak RSS per volume and method.
    pred = [r for r in results["prediction"] if "error" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    volumes = sorted({r["volume"] for r in pred}, key=lambda v: (v == "ct512", v))
    kinds = [("ours-roi", False), ("ours-full", False), ("monai-swi", False), ("monai-swi", True)]
    names = {("ours-roi", False): "ours, annotation region", ("ours-full", False): "ours, whole volume",
             ("monai-swi", False): "MONAI swi, our weights", ("monai-swi", True): "MONAI swi, MONAI-trained"}
    width = 0.8 / len(kinds)
    for ax, key, label in ((axes[0], "predict_cpu_s", "prediction CPU time (s)"),
                           (axes[1], "peak_rss_mb", "peak RSS of the process (MB)")):
        for k, kind in enumerate(kinds):
            xs, ys = [], []
            for i, v in enumerate(volumes):
                r = [r for r in pred if r["volume"] == v and (r["method"], r["model"].startswith("MONAI")) == kind]
                if r:
                    xs.append(i + (k - (len(kinds) - 1) / 2) * width)
                    ys.append(r[0][key])
            if xs:
                bars = ax.bar(xs, ys, width, label=names[kind])
                ax.bar_label(bars, fmt="%.0f" if key == "peak_rss_mb" else "%.3g", fontsize=6)
        if key == "peak_rss_mb":
            ax.axhline(RSS_LIMIT_MB, color="red", linestyle=":", linewidth=1, label="4 GB target")
        ax.set_xticks(range(len(volumes)))
        ax.set_xticklabels(volumes)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=7)
    save(fig, "prediction_time_memory.png")

    # Held-out Dice estimate during fine-tuning.
    runs = [r for r in results["quality"] if "error" not in r and r.get("heldout_curve")]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in runs:
        curve = np.array(r["heldout_curve"])
        line, = ax.plot(curve[:, 0], curve[:, 1], marker=".",
                        label=f"{r['case']}, {r['n_slices']} slices, {r['init']}, seed {r['seed']}")
        if r.get("t95_s") is not None:
            ax.axvline(r["t95_s"], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning time (s)")
    ax.set_ylabel("held-out slice Dice (estimate)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    if runs:
        ax.legend(fontsize=6)
    ax.set_title("dotted: 95 % of the final estimate reached", fontsize=8)
    save(fig, "heldout_curves.png", bottom=0.04)
    return written


def readme_section(results: dict, out: Path, command: str) -> str:
    """The README's "Results" section, generated from the results."""
    meta, s = results["meta"], results["settings"]
    g = meta["git"]
    try:
        rel = out.resolve().relative_to(REPO).as_posix()
    except ValueError:
        rel = str(out)
    lines = ["## Results", "",
             f"Generated by `{command}` on {meta['date'][:10]} ({meta['benchmark_wall_s'] / 60:.1f} min, "
             f"{meta['benchmark_cpu_s'] / 60:.1f} CPU min): "
             f"{meta['cpu']}, {meta['cpu_count']} CPUs, {meta['memory_gb']} GB, {meta['platform']}; device "
             f"{meta['device']}, {meta['threads']} thread(s); torch {meta['torch']}, MONAI {meta['monai']}; commit "
             f"`{g['commit'][:10]}`{' (with uncommitted changes)' if g['dirty'] else ''}. Load average "
             f"{meta['load_average_start'][0]} at the start on {meta['cpu_count']} CPUs"
             + (": other jobs were running, so wall times include waiting for a core (CPU times do not)."
                if meta["load_average_start"][0] > 0.5 else "."), "",
             ("A synthetic volume (tiny mode: a check of the harness, not a result). " if meta["mode"] == "tiny" else
              "Real sample scans (pyradiomics `lung1`/`lung2` CT, `brain1`/`brain2` MR). ")
             + "The annotation is N axial slices of the reference label spread through the structure (as `hssl demo` "
             "picks them); Dice and HD95 are measured on the slices that were *not* annotated. "
             f"Every fine-tuning ran {s['steps']} steps ({'seeds ' + ', '.join(map(str, s['seeds']))}). "
             f"Full tables: [{rel}/results.md]({rel}/results.md), raw numbers: "
             f"[{rel}/results.json]({rel}/results.json), "
             "method and discussion: [docs/benchmarks.md](docs/benchmarks.md).", ""]
    summary = results["summary"]
    budgets = [b for b in ["1", "2", "3", "5", "5%", "10%", "100%"] if any(r["budget"] == b for r in summary)]
    if summary:
        lines += ["| case (slices with structure) | init | " + " | ".join(_budget_label(b) for b in budgets) + " |",
                  "|---|---|" + "---|" * len(budgets)]
        for case in sorted({r["case"] for r in summary}):
            for init in sorted({r["init"] for r in summary if r["case"] == case}, key=lambda i: (i != "scratch", i)):
                cells = []
                for b in budgets:
                    r = [r for r in summary if r["case"] == case and r["init"] == init and r["budget"] == b]
                    if not r:
                        cells.append("")
                        continue
                    r = r[0]
                    cell = f"{_ms(r['dice'], 2)}" + (" *" if r["scored_on"] == "whole volume" else "")
                    cells.append(cell + f" ({r['n_slices']})" if b.endswith("%") else cell)
                n = next(r["structure_slices"] for r in summary if r["case"] == case)
                lines.append(f"| {case} ({n}) | {init} | " + " | ".join(cells) + " |")
        lines += ["", "Dice on the unannotated slices (`*`: every slice with the structure was annotated, so the whole "
                  "volume is scored; the output equals the annotation on annotated slices, so a `*` value only "
                  "counts false positives on the other slices); for % budgets the number of slices is in brackets.",
                  ""]
    if results["cross_volume"]:
        cv = [r for r in results["cross_volume"] if "error" not in r]
        lines += ["Cross-volume (3 slices of one scan, whole other scan predicted): " + "; ".join(
            f"{r['source']} -> {r['target']} ({r['init']}, seed {r['seed']}) Dice {_f(r['dice'])}"
            for r in cv) + ".", ""]
    speed = [r for r in results["quality"] if "error" not in r and "3" in r["budgets"] and r["seed"] == s["seeds"][0]
             and r["init"] == "scratch"]
    speed += [r for r in results["interactive"] if r.get("kind") == "engine" and "error" not in r]
    if speed:
        lines += ["| volume (3 slices, scratch) | steps/s | fine-tune -> prediction | 95 % of held-out Dice after | "
                  "prediction | peak RSS |", "|---|---|---|---|---|---|"]
        for r in speed:
            shape = "x".join(str(v) for v in reversed(r["volume_shape"]))
            lines.append(f"| {r['case']} {shape} | {_f(r['steps_per_s'], 2)} | "
                         f"{_f(r['finetune_to_prediction_s'], 0)} s "
                         f"({r['steps']} steps) | {_f(r['t95_s'], 0, ' s')} | {_f(r['predict_s'], 1)} s | "
                         f"{r['peak_rss_mb']} MB |")
        cli = [r for r in results["interactive"] if r.get("kind") == "cli" and "error" not in r]
        for r in cli:
            b = r["budget"]
            budget = f"a {b['time_budget']:.0f} s budget" if "time_budget" in b else f"{b['steps']} steps"
            lines.append("")
            lines.append(f"`hssl finetune --predict` on {r['case']} with {budget}: {r['press_to_prediction_s']:.0f} s "
                         f"from launch to the written prediction ({r['startup_and_load_s']:.0f} s start-up and "
                         "reading, "
                         f"{r['steps']} steps at {r['steps_per_s']:.2f}/s, prediction {_f(r['predict_s'], 1)} s), "
                         f"peak RSS {r['peak_rss_mb']} MB.")
        lines.append("")
    comp = results["comparison"]
    if comp:
        lines += ["Against a plain MONAI pipeline (same network and steps; `RandCropByPosNegLabeld` crops, the same "
                  "masked loss, default `sliding_window_inference` on the whole volume):", "",
                  "| volume | comparison | CPU time ours/MONAI | peak RSS ours/MONAI | Dice ours - MONAI |",
                  "|---|---|---|---|---|"]
        for c in comp:
            lines.append(f"| {c['volume']} | {c['what']} | {_f(c['time_ratio'], 2)} ({_f(c['ours_cpu_s'], 1)} / "
                         f"{_f(c['baseline_cpu_s'], 1)} s) | {_f(c['peak_rss_ratio'], 2)} ({c['ours_rss_mb']} / "
                         f"{c['baseline_rss_mb']} MB) | {_f(c['dice_diff'], 3)} |")
        lines.append("")
    p = results.get("pretrain_throughput")
    if p and "error" not in p:
        lines += ["Pretraining (" + p["config"] + "): " + "; ".join(
            f"{k} {v['steps_per_s']:.2f} steps/s"
            + (f" (loader overhead {v['overhead'] * 100:.1f} %)" if k != "in memory" else "")
            for k, v in p["modes"].items()) + ".", ""]
    lines += ["| target | met | measured |", "|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['target']} | {({True: 'yes', False: '**no**', None: 'not measured'})[t['met']]} | "
                     f"{t['measured']} |")
    if results["notes"]:
        lines += [""] + [f"Note: {n}." for n in results["notes"]]
    lines += ["", f"![Dice against annotated fraction]({rel}/dice_vs_fraction.png)",
              f"![Prediction time and memory]({rel}/prediction_time_memory.png)", ""]
    return "\n".join(lines)


def write_outputs(results: dict, out: Path, command: str) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    results["meta"]["command"] = command
    paths = [out / "results.json", out / "results.md", out / "README-results.md"]
    paths[0].write_text(json.dumps(results, indent=1, default=str) + "\n")
    paths[1].write_text(markdown(results))
    paths[2].write_text(readme_section(results, out, command))
    paths += plots(results, out)
    (out / "results.partial.json").unlink(missing_ok=True)
    return paths


# ------------------------------------------------------------------------------------- command line

def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Modes: tiny (synthetic, seconds; the test), default (~20 CPU minutes), full.")
    p.add_argument("--mode", default="default", choices=["tiny", "default", "full"])
    p.add_argument("--out", default=None, help="folder for the results (default: benchmark-output)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every run (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (AMP on CUDA) | auto (default cpu)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    p.add_argument("--cases", nargs="+", default=None, help=f"sample cases ({', '.join(SAMPLES)})")
    p.add_argument("--budgets", nargs="+", default=None, help="slice counts (3) or shares (10%%)")
    p.add_argument("--inits", nargs="+", default=None,
                   help="scratch | bundled | LABEL=VALUE, VALUE a model folder, scratch or bundled, optionally with "
                        "' --lr X' (e.g. 'bundled-lr2e-3=bundled --lr 0.002')")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (ours and the baseline)")
    p.add_argument("--ct-shape", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                   help="the CT-sized volume (default 300 512 512: lung2 tiled along z)")
    p.add_argument("--isolation", choices=["spawn", "fork"], default=None,
                   help="a fresh interpreter per run (default) or a forked child (faster start, CPU only)")
    p.add_argument("--keep-work", action="store_true", help="keep the models, predictions and logs (printed path)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="measure nothing: rewrite the tables, plots and README section of an earlier results.json "
                        "(into --out, default its folder)")
    a = p.parse_args(argv)
    s = mode_settings(a.mode)
    for key in ("cases", "budgets", "inits", "seeds", "steps", "isolation"):
        if getattr(a, key) is not None:
            setattr(s, key, getattr(a, key))
    if a.budgets is not None:
        s.other_init_budgets = None  # the given budgets hold for every init
    s.threads, s.device = a.threads, a.device
    if a.ct_shape:
        s.ct_shape = tuple(a.ct_shape)
    if a.only:
        s.sections = tuple(a.only)
    if a.cases:
        s.predict_cases = [c for c in s.predict_cases if c in a.cases] or a.cases[:1]
        s.interactive_cases = [c for c in s.interactive_cases if c in a.cases] or a.cases[:1]
        s.whole_volume_cases = [c for c in s.whole_volume_cases if c in a.cases]
    if s.isolation == "fork" and s.device != "cpu":
        raise SystemExit("error: --isolation fork is for the CPU only (CUDA does not survive fork): use spawn")
    for init in s.inits:
        label, value = init_value(init)
        if value == "bundled" and not (BUNDLED / "model.json").exists():
            raise SystemExit(f"error: --inits bundled: no model in {BUNDLED}: leave it out or give LABEL=FOLDER")
        if value not in ("scratch", "bundled") and not value.startswith("bundled:") and not Path(value).is_dir():
            raise SystemExit(f"error: --inits {init}: '{value}' is not a model folder")
    return s, a


def rewrite_reports(results_path: Path, out: Path | None) -> int:
    """Re-derive summaries, comparisons, targets and every report from a results.json."""
    results = json.loads(results_path.read_text())
    # A run made before a setting existed ran with that setting's default (e.g. no repeated predictions).
    fields = dataclasses.fields(Settings)
    results["settings"] = {**{f.name: f.default for f in fields if f.default is not dataclasses.MISSING},
                           **results["settings"]}
    names = {f.name for f in fields}
    settings = {**dataclasses.asdict(mode_settings(results["settings"]["mode"])),
                **{k: v for k, v in results["settings"].items() if k in names}}
    s = Settings(**settings)
    results["summary"] = summarise(results)
    results["comparison"] = compare(results)
    results["targets"] = targets(results, s)
    paths = write_outputs(results, out or results_path.parent, results["meta"]["command"])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, kind, spec_path, result_path = sys.argv
        spec = json.loads(Path(spec_path).read_text())
        log = Path(spec["work"]) / "logs" / (Path(result_path).name[:-5] + ".log")
        _child(kind, spec, result_path, str(log))
        return 0
    s, a = parse(argv)
    if a.report:
        return rewrite_reports(Path(a.report), Path(a.out) if a.out else None)
    out = Path(a.out or "benchmark-output")
    out.mkdir(parents=True, exist_ok=True)
    if s.mode != "tiny":
        from hssl import data

        data.fetch(["pyradiomics"])
    work = Path(tempfile.mkdtemp(prefix="hssl-benchmark-"))
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"benchmark ({s.mode}): results in {out}, work files in {work}", flush=True)
    try:
        results = run(s, out, work)
        paths = write_outputs(results, out, command.strip())
    finally:
        if a.keep_work:
            print(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for t in results["targets"]:
        print(f"target: {({True: 'met', False: 'MISSED', None: 'not measured'})[t['met']]}: {t['target']}: "
              f"{t['measured']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    errors = [r for key in ("quality", "baseline", "prediction", "cross_volume", "interactive") for r in results[key]
              if "error" in r]
    p = results.get("pretrain_throughput")
    if p and "error" in p:
        errors.append(p)
    if errors:
        print(f"error: {len(errors)} run(s) failed: see {out / 'results.md'} (Errors) and the logs "
              "(--keep-work keeps them)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
