"""Helpers shared by the engine tests (synthetic volumes, running the CLI, error checks)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ROOT / "HSSLSegment"


def make_volume(shape=(20, 40, 44), spacing=(0.8, 0.7, 3.0), origin=(-12.5, 30.25, 101.0),
                direction=None, seed=0):
    """A CT-like synthetic volume ([z, y, x] array) with an ellipsoid 'organ' (label 1) and a
    smaller second structure (label 2). Returns (image, labels) as SimpleITK images."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    c = np.array(shape) / 2
    organ = ((z - c[0]) / (shape[0] * 0.3)) ** 2 + ((y - c[1]) / (shape[1] * 0.25)) ** 2 + \
            ((x - c[2]) / (shape[2] * 0.3)) ** 2 <= 1
    small = ((z - c[0]) / 3) ** 2 + ((y - shape[1] * 0.8) / 3) ** 2 + ((x - shape[2] * 0.2) / 3) ** 2 <= 1
    array = np.full(shape, -800, dtype=np.int16)
    array[4:-4, 4:-4, 4:-4] = 0
    array[organ] = 120
    array[small] = 300
    array = (array + rng.normal(0, 20, shape)).astype(np.int16)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[organ] = 1
    labels[small] = 2
    images = []
    for a in (array, labels):
        img = sitk.GetImageFromArray(a)
        img.SetSpacing(spacing)
        img.SetOrigin(origin)
        if direction is not None:
            img.SetDirection(direction)
        images.append(img)
    return images[0], images[1]


def oblique_direction():
    """A rotation about an oblique axis: no zero entries, so every component matters."""
    angle, axis = 0.3, np.array([1.0, 2.0, 2.0]) / 3.0
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    r = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k
    return tuple(r.reshape(-1))


def run_cli(*args, cwd=None, env=None, timeout=300):
    """Run ``python -m hssl`` as a user would; returns CompletedProcess with text output."""
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ENGINE) + os.pathsep + e.get("PYTHONPATH", "")
    if env:
        e.update(env)
    return subprocess.run([sys.executable, "-m", "hssl", *map(str, args)], capture_output=True, text=True,
                          encoding="utf-8", errors="replace",
                          cwd=cwd, env=e, timeout=timeout)


def assert_one_line_error(proc, *fragments, code=2):
    """A user error: exit code, exactly one 'error:' line on stderr naming the problem, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    for f in fragments:
        assert f.lower() in lines[0].lower(), (f, lines[0])
    return lines[0]
