"""The machine, versions, git state and bundled model that every output of a run names."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import numpy as np

from .settings import BUNDLED, REPO, Settings


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
