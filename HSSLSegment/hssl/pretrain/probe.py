"""Linear probe of a (pretrained) network: frozen body, one 1x1x1 head per pyramid level, summed.

Fine-tuning (``hssl.pretrain.benchmark``) measures what a start is worth once every weight moves;
the probe measures what the frozen features already contain. Per real sample case ``n`` axial
slices of the reference are the annotation (``hssl.fewslice``, as the demo and the benchmark pick them). The
image is normalised as fine-tuning does, cropped to the region of interest around the painted
structure (``sparse.annotation_roi``, grown to a multiple of the plan's divisor), and passed once
through the frozen network (eval mode, no gradient). Each level of ``SegNet.pyramid`` gets a
trainable ``Conv3d(C_l, 2, 1)`` (``--levels`` picks a subset); its logits are upsampled
trilinearly to the crop and the levels are summed. The heads are trained with Adam on the masked CE + Dice of the annotated slices only,
for a fixed number of full-crop steps; Dice and HD95 are scored on the slices that were not
annotated (predictions outside the crop are background), after the fine-tuning engine's default
post-processing (only components that touch a painted voxel are kept), so that probe and
fine-tuning are scored alike; ``dice_raw`` is the read-out before it, ``dice_between`` the Dice on
the unannotated slices between the outermost annotated ones (interpolation only).

    python -m hssl.pretrain.probe --out /tmp/probe --cases brain1 lung2 --slices 2 3 --seeds 0 1 \\
        --init scratch hssl=bundled "dense=/path/model" --steps 300

``scratch`` is a randomly initialised network of the bundled model's plan: the "random features"
baseline. Runs on the CPU; set ``OMP_NUM_THREADS`` or ``--threads``. Rows go to
``results.jsonl`` as they finish and an interrupted run resumes where it stopped. On few slices
the coarse levels (more channels than voxels in the crop) can overfit; docs/pretraining.md
("Linear probe") has the measurement.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import HSSLError
from ..losses import MaskedDiceCELoss
from ..network import SegNet

DEFAULT_STEPS = 300
DEFAULT_LR = 1e-2
UPSAMPLE = "trilinear"  # align_corners=False; a level's logits are interpolated to the crop size


@dataclasses.dataclass
class ProbeFit:
    logits: torch.Tensor  # (n_classes, Z, Y, X) float32 on the CPU, the summed heads on the crop
    heads: nn.ModuleList  # one Conv3d(C_l, n_classes, 1) per level, finest first
    losses: list[float]  # training loss per step

    @property
    def prediction(self) -> torch.Tensor:
        """``(Z, Y, X)`` int64 class per voxel."""
        return self.logits.argmax(0)


def resolve_network(model_init: str) -> SegNet:
    """The network a probe reads: ``scratch`` (random weights, the bundled model's plan; the torch
    RNG must be seeded by the caller), ``bundled``, ``bundled:NAME`` or a model folder."""
    from ..model_format import bundled_model_dir
    from ..model_store import load_model
    from ..plan import Plan

    if model_init == "scratch":
        meta = bundled_model_dir() / "model.json"
        if not meta.is_file():
            raise HSSLError("--init scratch takes its plan from the bundled model, which is missing from this "
                            "installation: probe a model folder instead")
        return SegNet(Plan.from_json(json.loads(meta.read_text())["plan"]), out_channels=2)
    if model_init == "bundled" or model_init.startswith("bundled:"):
        name = model_init.partition(":")[2] or "default"
        folder = bundled_model_dir(name)
        if not (folder / "model.json").exists():
            raise HSSLError(f"no pretrained model '{name}' is bundled with this version: give scratch or the "
                            "path of a model folder")
    else:
        folder = Path(model_init)
    return load_model(folder).net


@torch.no_grad()
def extract_features(net: SegNet, image: np.ndarray) -> list[torch.Tensor]:
    """Frozen features of a ``[z, y, x]`` float32 crop (each side a multiple of ``net.plan.divisor``):
    ``[(C_l, z_l, y_l, x_l), ...]`` per level, finest first. The network is not modified."""
    was_training = net.training
    net.eval()
    try:
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
        return [f[0].detach().float() for f in net.pyramid(x)]
    finally:
        net.train(was_training)


def _standardise(feature: torch.Tensor) -> torch.Tensor:
    # A per-channel affine rescaling leaves the probe's function class unchanged but lets one
    # learning rate suit levels (and networks) whose activations differ in scale.
    flat = feature.reshape(feature.shape[0], -1)
    mean = flat.mean(1).view(-1, 1, 1, 1)
    std = flat.std(1).clamp(min=1e-6).view(-1, 1, 1, 1)
    return (feature - mean) / std


def fit_probe(features: Sequence[torch.Tensor], target, known, steps: int = DEFAULT_STEPS, seed: int = 0,
              lr: float = DEFAULT_LR, n_classes: int = 2) -> ProbeFit:
    """Train one 1x1x1 head per level on frozen ``features`` (``(C_l, z_l, y_l, x_l)`` or with a
    leading batch of 1) against ``target`` (``[Z, Y, X]`` integer classes) where ``known``
    (``[Z, Y, X]`` bool) is true. Logits of level l are upsampled to ``(Z, Y, X)`` (trilinear) and
    summed. Voxels outside ``known`` have no influence on the result: their target is never read
    by the loss (``MaskedDiceCELoss``) and every step sees the whole crop."""
    if steps < 1:
        raise HSSLError(f"--steps must be at least 1 (got {steps})")
    target = torch.as_tensor(np.asarray(target)).long()
    known = torch.as_tensor(np.asarray(known)).bool()
    if target.shape != known.shape or target.dim() != 3:
        raise HSSLError(f"target {tuple(target.shape)} and known mask {tuple(known.shape)} must be the same "
                        "[z, y, x] shape")
    if not known.any():
        raise HSSLError("the probe has no known voxel to learn from")
    size = tuple(target.shape)
    feats = [_standardise((f[0] if f.dim() == 5 else f).detach().float())[None] for f in features]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        heads = nn.ModuleList(nn.Conv3d(f.shape[1], n_classes, 1) for f in feats)

    def forward() -> torch.Tensor:
        # 1x1x1 convolution and trilinear interpolation are both linear, so the heads run at each
        # level's own resolution and only their n_classes logits are upsampled.
        total = None
        for f, head in zip(feats, heads):
            logits = head(f)
            if tuple(logits.shape[2:]) != size:
                logits = F.interpolate(logits, size=size, mode=UPSAMPLE, align_corners=False)
            total = logits if total is None else total + logits
        return total

    loss_fn = MaskedDiceCELoss()
    optimizer = torch.optim.Adam(heads.parameters(), lr=lr)
    y, k = target[None, None], known[None, None]
    losses = []
    for _ in range(steps):
        loss = loss_fn(forward(), y, k)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.item()))
    with torch.no_grad():
        logits = forward()[0]
    return ProbeFit(logits, heads, losses)


def crop_box(roi: Sequence[slice], shape: Sequence[int],
             divisor: Sequence[int]) -> tuple[tuple[slice, ...], tuple[int, ...]]:
    """Grow ``roi`` (``[z, y, x]`` slices) to a multiple of ``divisor`` (at least twice it, so the
    coarsest level keeps more than one voxel for instance norm), inside the volume where it fits.
    Returns the box and how many voxels must be padded after its end on each axis."""
    box, pad = [], []
    for sl, n, d in zip(roi, shape, divisor):
        want = max(int(np.ceil((sl.stop - sl.start) / d)), 2) * d
        lo = max(0, sl.start - (want - (sl.stop - sl.start)) // 2)
        hi = min(n, lo + want)
        lo = max(0, hi - want)
        box.append(slice(lo, hi))
        pad.append(want - (hi - lo))
    return tuple(box), tuple(pad)


def probe_volume(net: SegNet, image: np.ndarray, reference: np.ndarray, spacing_zyx: Sequence[float],
                 n_slices: int, seed: int, steps: int = DEFAULT_STEPS, axis: int = 0,
                 lr: float = DEFAULT_LR, levels: Sequence[int] | None = None) -> dict:
    """The probe on arrays: ``image`` normalised ``[z, y, x]`` float32, ``reference`` ``[z, y, x]``
    0/1, ``spacing_zyx`` in mm, slices picked along array ``axis``; ``levels`` the pyramid levels
    that get a head (0 = finest; default all). Returns the scores (Dice and HD95 in mm on the
    unannotated slices) and what was probed."""
    from .. import postprocess
    from ..evaluate import dice
    from ..fewslice import array_geometry, make_case, score
    from ..io import Volume
    from ..sparse import annotation_roi

    reference = (np.asarray(reference) > 0).astype(np.uint8)
    n_levels = len(net.plan.channels)
    levels = list(range(n_levels)) if levels is None else sorted(set(int(v) for v in levels))
    if not levels or not all(0 <= v < n_levels for v in levels):
        raise HSSLError(f"levels {levels} must be among 0..{n_levels - 1} (0 is the finest)")
    other = tuple(a for a in range(3) if a != axis)
    present = int(reference.any(axis=other).sum())
    if n_slices < 1 or n_slices > present:
        raise HSSLError(f"cannot annotate {n_slices} slice(s): the reference label spans {present} slice(s) "
                        f"along axis {axis}")
    case = make_case(Volume(image, array_geometry(reference.shape, spacing_zyx)), reference, n_slices, axis)
    slices, known, sparse = case.slices, case.annotation.known, case.sparse
    if len(slices) < n_slices:
        raise HSSLError(f"only {len(slices)} distinct slices can be picked for {n_slices} annotated slices: "
                        "use fewer")
    roi = annotation_roi(sparse, known, spacing_zyx)
    box, pad = crop_box(roi, reference.shape, net.plan.divisor)
    widths = [(0, p) for p in pad]
    crop = np.pad(image[box], widths, mode="edge")
    crop_target = np.pad(sparse[box], widths)
    crop_known = np.pad(known[box], widths)  # padded voxels are not real: never known

    t0 = time.perf_counter()
    pyramid = extract_features(net, crop)
    features = [pyramid[v] for v in levels]
    t_features = time.perf_counter() - t0
    fit = fit_probe(features, crop_target, crop_known, steps, seed, lr)
    seconds = time.perf_counter() - t0

    pred = np.zeros(reference.shape, dtype=np.uint8)
    inner = tuple(slice(0, b.stop - b.start) for b in box)
    pred[box] = fit.prediction.numpy()[inner] > 0
    # Scored like a fine-tuned prediction (hssl evaluate after the default post-processing): only
    # the components that touch a painted voxel are kept. The raw read-out's Dice is kept too.
    kept = postprocess.apply(pred, sparse, known, "annotated-components")
    scores = score(case, kept)
    # Between the outermost annotated slices the probe interpolates; beyond them it extrapolates
    # from slices that all contain the structure, which a linear read-out does badly (it paints the
    # end slices). ``dice_between`` isolates the interpolation.
    between = case.between()
    return {"dice_between": dice((kept > 0) & between, (reference > 0) & between), "slices": n_slices,
            "annotated": slices, "seed": seed, "steps": steps, "lr": lr, "dice": scores["dice"],
            "hd95_mm": scores["hd95_mm"], "dice_raw": score(case, pred, hd95=False)["dice"],
            "scored_on": scores["scored_on"], "seconds": round(seconds, 1), "features_s": round(t_features, 1),
            "final_loss": round(fit.losses[-1], 4), "roi_shape": [int(s) for s in crop.shape],
            "roi_zyx": [[b.start, b.stop] for b in box], "levels": levels,
            "channels": [int(f.shape[0]) for f in features]}


def probe_case(model_init: str, case: str, n_slices: int, seed: int, steps: int = DEFAULT_STEPS,
               threads: int | None = None, lr: float = DEFAULT_LR, levels: Sequence[int] | None = None) -> dict:
    """Probe ``model_init`` (scratch | bundled | bundled:NAME | a model folder) on the sample scan
    ``case`` with ``n_slices`` annotated axial slices. Returns one results row."""
    from ..fewslice import SAMPLE_CASES, load_sample
    from ..finetune import seed_everything
    from ..normalize import for_modality

    if case not in SAMPLE_CASES:
        raise HSSLError(f"unknown case '{case}': choose from {sorted(SAMPLE_CASES)}")
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        seed_everything(seed)
        net = resolve_network(model_init)
        volume, labels = load_sample(case)
        reference = labels.array
        axis = volume.geometry.axis_names().index("axial")
        image = for_modality("auto", volume.array).apply(volume.array)  # as hssl finetune normalises
        spacing = tuple(reversed(volume.geometry.spacing))
        row = probe_volume(net, image, reference, spacing, n_slices, seed, steps, axis, lr, levels)
    finally:
        torch.set_num_threads(previous)
    return {"case": case, "init": model_init, **row, "threads": threads or previous}


def _split_init(init: str) -> tuple[str, str]:
    """``LABEL=VALUE`` -> (label, value); a bare value is its own label."""
    return tuple(init.split("=", 1)) if "=" in init else (init, init)


def main(argv: list[str] | None = None) -> int:
    from .cli import script_args

    p = argparse.ArgumentParser(prog="python -m hssl.pretrain.probe", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder of results.jsonl")
    p.add_argument("--cases", nargs="+", default=["brain1", "lung2"])
    p.add_argument("--slices", nargs="+", type=int, default=[3], help="annotated axial slices per run")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--init", nargs="+", default=["scratch", "bundled"],
                   help="scratch | bundled | bundled:NAME | a model folder | LABEL=any of these (LABEL names "
                        "the column)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="Adam steps of the heads")
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--levels", nargs="+", type=int, default=None,
                   help="pyramid levels that get a head, 0 = finest (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--table-only", action="store_true", help="print the table of results.jsonl and exit")
    a = p.parse_args(script_args(sys.argv[1:] if argv is None else argv))
    try:
        return _run(a)
    except HSSLError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


def _run(a) -> int:
    from ..fewslice import SAMPLE_CASES
    from .benchmark import table

    unknown = [c for c in a.cases if c not in SAMPLE_CASES]
    if unknown:
        raise HSSLError(f"unknown case(s) {unknown}: choose from {sorted(SAMPLE_CASES)}")
    if a.steps < 1:
        raise HSSLError(f"--steps must be at least 1 (got {a.steps})")
    inits = [_split_init(i) for i in a.init]
    level_set = "all" if a.levels is None else " ".join(str(v) for v in sorted(set(a.levels)))
    if not a.table_only:
        for _, value in inits:
            resolve_network(value)  # a wrong path fails now, not after an hour of other runs
    out = Path(a.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HSSLError(f"cannot create '{out}' ({err.strerror}): choose a writable folder") from None
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    if not a.table_only:
        done = {(r["case"], r["slices"], r["seed"], r["init"], r["steps"], r.get("level_set", "all")) for r in rows}
        for case in a.cases:
            for n in a.slices:
                for seed in a.seeds:
                    for label, value in inits:
                        if (case, n, seed, label, a.steps, level_set) in done:
                            continue
                        row = probe_case(value, case, n, seed, a.steps, a.threads, a.lr, a.levels)
                        row.update(init=label, init_value=value, level_set=level_set,
                                   threads=a.threads or os.environ.get("OMP_NUM_THREADS", "default"))
                        print(json.dumps(row), flush=True)
                        with open(results, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        rows.append(row)
    labels = {label for label, _ in inits}
    chosen = [r for r in rows if r["case"] in a.cases and r["init"] in labels and r["steps"] == a.steps
              and r.get("level_set", "all") == level_set]
    if not chosen:
        print("no results yet")
        return 0
    print(f"Dice on every unannotated slice (levels: {level_set}):\n" + table(chosen))
    print(f"\nDice between the outermost annotated slices (levels: {level_set}):\n" + table(chosen, "dice_between"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
