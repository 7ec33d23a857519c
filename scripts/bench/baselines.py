"""The plain MONAI pipeline the benchmark compares against: its training and MONAI's default
sliding-window inference."""
from __future__ import annotations

import time

import numpy as np


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
