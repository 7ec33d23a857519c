"""Shared helpers of the pretraining tests: tiny synthetic scans, an MSD-style tree, tiny configs.

Synthetic volumes are fine for these unit tests (they check mechanics, not quality); every quality
figure in docs/pretraining.md comes from the real sample scans.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "pretrain.py"

# A 3-level network small enough for a step in a few milliseconds on one thread.
TINY_MODEL = {"strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]], "kernels": [[1, 3, 3], [3, 3, 3], [3, 3, 3]],
              "channels": [4, 8, 16], "projection_dim": 8}


def body_volume(shape=(12, 40, 40), modality="ct", seed=0, border=4) -> np.ndarray:
    """A blob phantom ``[z, y, x]`` with an empty border (so the body crop has something to cut):
    CT in HU (air -1000, tissue ~40, bright spots ~700), MR in arbitrary positive units (air 0)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = (y ** 2 + x ** 2) < 0.3
    inside[:, :border] = inside[:, -border:] = inside[:, :, :border] = inside[:, :, -border:] = False
    spots = (np.sin(7 * y + seed) * np.cos(5 * x) > 0.6) & inside
    if modality == "ct":
        a = np.full(shape, -1000.0)
        a[inside] = 40
        a[spots] = 700
        a += rng.normal(0, 10, shape)
        return a.astype(np.int16)
    a = np.zeros(shape)
    a[inside] = 300
    a[spots] = 900
    a[inside] += rng.normal(0, 20, int(inside.sum()))
    return np.clip(a, 0, None).astype(np.int16)


def write_volume(path: Path, array: np.ndarray, spacing_zyx=(3.0, 1.0, 1.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in reversed(spacing_zyx)))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def make_msd(root: Path, name: str = "Task99_Tiny", modality: dict | None = None, n_train: int = 2, n_test: int = 1,
             missing: int = 0, channels: int = 1, kind: str = "ct") -> Path:
    """An MSD-style task folder: dataset.json, imagesTr/, labelsTr/, imagesTs/. ``missing`` extra
    training entries point at files that do not exist; ``channels`` > 1 writes 4D images."""
    root = root / name
    root.mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for i in range(n_train):
        image = f"./imagesTr/case_{i:03d}.nii.gz"
        _write_msd_image(root / image, kind, i, channels)
        label = f"./labelsTr/case_{i:03d}.nii.gz"
        write_volume(root / label, (body_volume(modality=kind, seed=i) > 0).astype(np.uint8))
        training.append({"image": image, "label": label})
    for i in range(missing):
        training.append({"image": f"./imagesTr/gone_{i:03d}.nii.gz", "label": f"./labelsTr/gone_{i:03d}.nii.gz"})
    for i in range(n_test):
        image = f"./imagesTs/test_{i:03d}.nii.gz"
        _write_msd_image(root / image, kind, 100 + i, channels)
        test.append(image)
    meta = {"name": name.split("_", 1)[-1], "modality": modality or {"0": "CT"}, "labels": {"0": "background", "1": "x"},
            "numTraining": len(training), "numTest": len(test), "training": training, "test": test}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def _write_msd_image(path: Path, kind: str, seed: int, channels: int) -> None:
    if channels == 1:
        write_volume(path, body_volume(modality=kind, seed=seed))
        return
    vols = [sitk.GetImageFromArray(body_volume(modality=kind, seed=seed + 10 * c)) for c in range(channels)]
    for v in vols:
        v.SetSpacing((1.0, 1.0, 3.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.JoinSeries(vols), str(path))


def tiny_tree(root: Path) -> list[dict]:
    """Two tasks in two groups (a CT MSD task and an MR folder): the sources of a tiny pretraining."""
    make_msd(root, "Task01_CT", n_train=2, n_test=1)
    for i in range(2):
        write_volume(root / "mr" / f"mr_{i}.nrrd", body_volume(modality="mr", seed=i), (4.0, 1.0, 1.0))
    return [{"kind": "msd", "path": str(root / "Task01_CT")},
            {"kind": "folder", "path": str(root / "mr"), "glob": "*.nrrd", "modality": "mr", "task": "mr_scans"}]


def tiny_config(out: Path, sources: list[dict], **train) -> dict:
    """A config dict for a pretraining that takes about a second."""
    return {"output_dir": str(out),
            "data": {"sources": sources, "crop_size": [4, 16, 16], "spacing": {"ct": [3.0, 1.5, 1.5], "mr": [4.0, 1.5, 1.5]},
                     "prefetch": 0},
            "model": dict(TINY_MODEL),
            "loss": {"w_restore": 0.5},
            "train": {"max_steps": 6, "warmup_steps": 2, "batch_size": 3, "checkpoint_every": 2, "threads": 1, **train},
            "export": {"monai_bundle": True}}


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(json.dumps(tree, indent=1))
    return path


def run_script(*args: str, timeout: float = 240, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", timeout=timeout, env=env, cwd=REPO)


def read_log(out: Path) -> dict[int, dict]:
    import csv

    with open(out / "log.csv", newline="") as f:
        return {int(r["step"]): r for r in csv.DictReader(f)}
