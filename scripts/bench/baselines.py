"""The plain MONAI pipeline: what a competent MONAI user writes in an afternoon to learn a structure
from a few painted slices of one scan, and MONAI's default sliding-window inference.

- network: MONAI's own ``monai.networks.nets.UNet`` with its usual 3D settings (channels 16-256,
  four stride-2 levels, two residual units, instance norm);
- data: intensity normalisation with MONAI transforms (CT: -1000..1000 HU -> 0..1; MR: the
  0.5-99.5 percentiles -> 0..1), ``SpatialPadd`` to the patch, then per step patches centred on
  painted voxels, every class equally often, painted background included
  (``ClassesToIndicesd`` restricted to known voxels + ``RandCropByLabelClassesd``), with the usual
  flips, in-plane 90-degree rotations and intensity shifts; in-plane the volume is resampled to
  MONAI's usual working spacing when it is finer (1.5 mm for CT as in MONAI's CT tutorials, 1 mm
  for MR as in its brain-MR ones), through-plane it keeps its slices (resampling them would smear
  the painted slices into unpainted ones);
- loss: masked Dice + cross-entropy (``hssl.losses.MaskedDiceCELoss``, built on MONAI's
  ``MaskedDiceLoss``): unpainted voxels weigh zero, they are unknown, not background;
- optimiser: AdamW at a constant 1e-3, two patches per step, for a wall-clock budget in seconds
  (and/or a number of steps), one step = ``hssl.training.backward_and_step`` (no clipping, no AMP:
  MONAI's defaults);
- inference: ``monai.inferers.sliding_window_inference`` with its defaults (overlap 0.25,
  constant blending, 4 windows per batch) over the whole volume at the working spacing, the class
  scores resized back to the volume's grid, argmax; no region, no post-processing.

Arrays are numpy ``[z, y, x]``; labels are the painted values (0 = background).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

UNET = {"spatial_dims": 3, "in_channels": 1, "channels": (16, 32, 64, 128, 256), "strides": (2, 2, 2, 2),
        "num_res_units": 2}
PATCH_CAP = (64, 96, 96)  # [z, y, x] voxels: the patch, unless the volume is smaller
DIVISOR = 16  # four stride-2 levels: every side of a patch is a multiple of 2**4
LR = 1e-3
BATCH = 2
# In-plane working spacing (mm) per intensity scheme: what MONAI's CT tutorials (spleen, BTCV) and
# brain-MR ones (BraTS) resample to. Finer scans are resampled; coarser ones are left as they are.
INPLANE_MM = {"ct": 1.5, "percentile": 1.0}


def monai_normalisation(scheme: str, keys=("image",)):
    """The standard MONAI intensity transform equal to hssl's scheme: CT -1000..1000 HU -> 0..1;
    otherwise the 0.5-99.5 percentiles -> 0..1."""
    from monai.transforms import ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    if scheme == "ct":
        return ScaleIntensityRanged(list(keys), a_min=-1000.0, a_max=1000.0, b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensityRangePercentilesd(list(keys), lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)


def working_shape(shape_zyx, spacing_zyx, scheme: str) -> tuple[int, int, int]:
    """The ``[z, y, x]`` size at the working spacing: slices kept, in-plane at least ``INPLANE_MM``."""
    target = INPLANE_MM[scheme]
    z, y, x = (int(v) for v in shape_zyx)
    _, sy, sx = (float(v) for v in spacing_zyx)
    return z, max(1, round(y * sy / max(sy, target))), max(1, round(x * sx / max(sx, target)))


def monai_patch(shape_zyx) -> tuple[int, int, int]:
    """``PATCH_CAP``, or where the volume is smaller the largest multiple of 16 inside it, at least 32
    (two voxels at the deepest level, which instance norm needs): windows then reach past the volume
    only on a side shorter than 32."""
    return tuple(int(min(cap, max(2 * DIVISOR, DIVISOR * (n // DIVISOR)))) for n, cap in zip(shape_zyx, PATCH_CAP))


@dataclasses.dataclass
class MonaiModel:
    """A trained MONAI UNet: ``values[c - 1]`` is the label value of network class ``c``."""

    net: object
    values: list[int]
    scheme: str  # "ct" or "percentile" (hssl.normalize's names)
    patch: tuple[int, int, int]

    def save(self, folder: str | Path) -> Path:
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(folder / "unet.safetensors"))
        meta = {"pipeline": "monai-unet", "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in UNET.items()},
                "values": self.values, "scheme": self.scheme, "patch": list(self.patch)}
        (folder / "unet.json").write_text(json.dumps(meta, indent=1) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "MonaiModel":
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / "unet.json").read_text())
        net = unet(len(meta["values"]) + 1)
        net.load_state_dict(load_file(str(folder / "unet.safetensors")))
        return cls(net.eval(), [int(v) for v in meta["values"]], meta["scheme"], tuple(meta["patch"]))


def unet(out_channels: int):
    from monai.networks.nets import UNet

    return UNet(out_channels=out_channels, **UNET)


def train_monai(image: np.ndarray, sparse: np.ndarray, known: np.ndarray, spacing_zyx, scheme: str, seed: int,
                device, time_budget: float | None = None, steps: int | None = None) -> tuple[MonaiModel, dict]:
    """Train the plain MONAI pipeline on one volume: ``image`` raw intensities, ``sparse`` the
    painted label values, ``known`` True on the painted slices, ``spacing_zyx`` in mm, ``scheme``
    ``ct`` or ``percentile`` (hssl.normalize's names); until ``time_budget`` seconds of
    training or ``steps`` steps, whichever ends first (the clock starts at the first step, after
    the cached transforms). Returns the model and what the run did: steps, seconds, CPU seconds,
    patch, loss log, share of patches without a known voxel."""
    import torch
    from monai.data import CacheDataset, DataLoader
    from monai.transforms import (ClassesToIndicesd, Compose, RandCropByLabelClassesd, RandFlipd, RandRotate90d,
                                  RandShiftIntensityd, RandSpatialCropd, Resized, SpatialPadd)
    from monai.utils import set_determinism

    from hssl.losses import MaskedDiceCELoss
    from hssl.training import backward_and_step

    if time_budget is None and steps is None:
        raise ValueError("give the MONAI pipeline a time budget or a number of steps")
    values = [int(v) for v in np.unique(sparse[known]) if v]
    if not values:
        raise ValueError("the painted slices hold no foreground")
    lut = np.zeros(int(sparse.max()) + 1, dtype=np.int64)
    lut[values] = np.arange(1, len(values) + 1)
    work = working_shape(image.shape, spacing_zyx, scheme)
    patch = monai_patch(work)
    # A crop centred on a painted voxel has the painted slice at its centre, always at the same place;
    # four stride-2 levels then learn that one position of 16 and fail on the slices in between
    # (measured on lung2's lungs: Dice 0.9 on the painted slices, 0.5 one slice away). A larger crop
    # around the painted voxel, then a patch at a random place inside it, moves the slice around
    # while (but for the rare offset 0 when the margin is 16) keeping it in the patch.
    outer = tuple(p + max(p // 2, DIVISOR) for p in patch)
    set_determinism(seed)
    keys = ["image", "label", "known"]
    resample = [Resized(keys, spatial_size=work, mode=("trilinear", "nearest", "nearest"))] if work != image.shape else []
    transforms = Compose([
        monai_normalisation(scheme),
        *resample,
        SpatialPadd(keys, spatial_size=outer, mode=("edge", "constant", "constant")),  # padding is never known
        # Centres on known voxels only: every class, painted background included, equally often.
        ClassesToIndicesd("label", num_classes=len(values) + 1, image_key="known", image_threshold=0.5),
        RandCropByLabelClassesd(keys, label_key="label", spatial_size=outer, num_classes=len(values) + 1,
                                num_samples=BATCH, indices_key="label_cls_indices", warn=False),
        RandSpatialCropd(keys, roi_size=patch, random_size=False),
        RandFlipd(keys, prob=0.1, spatial_axis=0),
        RandFlipd(keys, prob=0.1, spatial_axis=1),
        RandFlipd(keys, prob=0.1, spatial_axis=2),
        # A quarter turn of a patch that is not square in-plane would change its shape (breast1's
        # 32 x 80 x 32 patch: the batch could not be stacked); flips cover such a patch.
        *([RandRotate90d(keys, prob=0.1, max_k=3, spatial_axes=(1, 2))] if patch[1] == patch[2] else []),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
    ])
    transforms.set_random_state(seed=seed)
    item = {"image": image[None].astype(np.float32), "label": lut[sparse][None],
            "known": known[None].astype(np.float32)}
    dataset = CacheDataset([item], transforms, cache_rate=1.0, num_workers=0, progress=False)
    loader = DataLoader(dataset, batch_size=1, shuffle=False, num_workers=0)
    net = unet(len(values) + 1).to(device).train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=1e-5)
    loss_fn = MaskedDiceCELoss()
    log, step, empty, crops = [], 0, 0, 0
    t0, c0 = time.perf_counter(), time.process_time()

    def done() -> bool:
        return (steps is not None and step >= steps) or (time_budget is not None and
                                                         time.perf_counter() - t0 >= time_budget)

    while not done():
        for batch in loader:
            if done():
                break
            x, y, k = (torch.as_tensor(batch[key]).as_subclass(torch.Tensor).to(device) for key in keys)
            crops += k.shape[0]
            empty += int((k.flatten(1).sum(1) == 0).sum())
            loss = loss_fn(net(x), y, k)
            backward_and_step(loss, net.parameters(), optimizer)
            step += 1
            log.append({"step": step, "loss": float(loss.item()), "elapsed_s": round(time.perf_counter() - t0, 2)})
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    set_determinism(None)
    info = {"steps": step, "seconds": seconds, "cpu_s": cpu, "patch": list(patch), "working_shape": list(work),
            "lr": LR, "batch": BATCH,
            "log": log, "crops_without_known_voxel": empty / max(crops, 1)}
    return MonaiModel(net.eval(), values, scheme, patch), info


def monai_predict(net, image: np.ndarray, device, roi_size) -> np.ndarray:
    """MONAI's default ``sliding_window_inference`` over the whole normalised ``[z, y, x]`` volume
    (overlap 0.25, constant blending, ``roi_size`` windows, 4 per batch) -> uint8 argmax classes."""
    import torch

    return _scores(net, image, device, roi_size).argmax(1)[0].to(torch.uint8).cpu().numpy()


def _scores(net, image: np.ndarray, device, roi_size):
    import torch
    from monai.inferers import sliding_window_inference

    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None].to(device)
    with torch.inference_mode():
        return sliding_window_inference(x, tuple(roi_size), 4, net.to(device).eval())


def predict_monai(model: MonaiModel, image: np.ndarray, spacing_zyx, device) -> np.ndarray:
    """The plain pipeline's prediction of a raw ``[z, y, x]`` volume (``spacing_zyx`` mm): its
    normalisation and working spacing, edge-padded to the patch where smaller (as in training),
    ``sliding_window_inference`` with MONAI's defaults, the class scores resized (trilinear) back to
    the volume's grid, argmax; returns the label values (0 = background)."""
    import torch
    from monai.transforms import Resize, SpatialPad

    x = monai_normalisation(model.scheme)({"image": image[None].astype(np.float32)})["image"]
    work = working_shape(image.shape, spacing_zyx, model.scheme)
    if work != image.shape:
        x = Resize(work, mode="trilinear")(x)
    x = SpatialPad(model.patch, method="end", mode="edge")(x)
    scores = _scores(model.net, np.asarray(x, dtype=np.float32)[0], device, model.patch)
    scores = scores[0, :, :work[0], :work[1], :work[2]]
    if work != image.shape:
        with torch.inference_mode():
            scores = torch.as_tensor(Resize(image.shape, mode="trilinear")(scores))
    classes = scores.argmax(0).to(torch.uint8).cpu().numpy()
    lut = np.array([0] + model.values, dtype=np.uint8 if max(model.values) < 256 else np.uint16)
    return lut[classes]
