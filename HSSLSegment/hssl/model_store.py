"""Model folders: ``model.safetensors`` (weights only, no code) + ``model.json`` (readable metadata).

``model.json`` holds the format version, the label table (name, value, colour), the intensity
normalisation, the network plan, the annotated slices and training log, and package versions.
Loading validates everything before allocating anything and never executes anything from the folder.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from . import __version__, lifeline
from .errors import HSSLError
from .io import LabelInfo, atomic_folder
from .model_format import FORMAT, MAX_WEIGHT_VALUES, META, WEIGHTS, ModelFormatError, check_model_folder
from .network import SegNet
from .normalize import Normalization
from .plan import Plan


@dataclasses.dataclass
class Model:
    net: SegNet
    labels: list[LabelInfo]  # foreground classes; class index n in the network = labels[n-1]
    normalization: Normalization
    meta: dict
    path: str = ""

    @property
    def plan(self) -> Plan:
        return self.net.plan


def save_model(folder: str | os.PathLike, net: SegNet, labels: list[LabelInfo], normalization: Normalization,
               extra: dict | None = None, overwrite: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the model folder atomically (``hssl.io.atomic_folder``: a private sibling folder renamed
    into place; removed on failure, a full disk included). ``extra_files`` are text files (a model
    card) written into the same folder before the rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    meta = {
        "format": FORMAT,
        "labels": [lab.to_json() for lab in labels],
        "normalization": normalization.to_json(),
        "plan": net.plan.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"hssl": __version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra or {}),
    }
    training = meta.get("training")
    if isinstance(training, dict) and "stop_reason" not in training:
        # Why fine-tuning ended early ("signal", "stop-file", "parent-exited"), recorded by StopRequest.
        training["stop_reason"] = lifeline.stop_reason() if training.get("stopped") else None
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    files = {WEIGHTS: lambda path: save_file(state, str(path)),
             META: lambda path: path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")}
    for name, text in (extra_files or {}).items():
        files[name] = lambda path, text=text: path.write_text(text, encoding="utf-8")
    return atomic_folder(folder, files, overwrite, what="model folder")


def load_model(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """Load and validate a model folder. Weights are tensors only (safetensors); nothing is executed.

    Every field of model.json is checked (``hssl.model_format.check_model_folder``) and the tensor
    names and shapes in the weights' header are compared with those of the network the plan
    describes, built on torch's ``meta`` device (shapes without storage), before any weight or
    network is allocated: a corrupt or hostile folder is refused with one line naming the field.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta, header = check_model_folder(folder)
    except ModelFormatError as err:
        raise HSSLError(str(err)) from None
    labels = [LabelInfo.from_json(d) for d in meta["labels"]]
    plan = Plan.from_json(meta["plan"])
    normalization = Normalization.from_json(meta["normalization"])
    _check_shapes(folder, plan, len(labels) + 1, header)
    net = SegNet(plan, out_channels=len(labels) + 1)
    try:
        state = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as err:
        raise HSSLError(f"model folder '{folder}': {WEIGHTS} is corrupt ({str(err)[:100]}): re-train or copy "
                        "the folder again") from None
    bad = [name for name, t in state.items() if not bool(torch.isfinite(t).all())]
    if bad:
        raise HSSLError(f"model folder '{folder}': {WEIGHTS} holds NaN or infinite weights (in {bad[0]}"
                        f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}): the training diverged or the file "
                        "is corrupt; re-train the model")
    net.load_state_dict(state, strict=True)
    net.to(device).eval()
    return Model(net, labels, normalization, meta, str(folder))


def _check_shapes(folder: Path, plan: Plan, out_channels: int, header: dict) -> None:
    """The weights' tensors (names and shapes from the safetensors header) must be exactly those of
    ``SegNet(plan, out_channels)``; compared on the meta device, so nothing is allocated."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in SegNet(plan, out_channels).state_dict().items()}
    except (ValueError, RuntimeError, AssertionError) as err:
        raise HSSLError(f"model folder '{folder}': the plan in {META} does not describe a buildable network "
                        f"({str(err).splitlines()[0][:100]}): the folder is corrupt; re-train the model") from None
    n_params = sum(math.prod(shape) for shape in expected.values())
    if n_params > MAX_WEIGHT_VALUES:
        raise HSSLError(f"model folder '{folder}': the plan in {META} asks for {n_params} weights (at most "
                        f"{MAX_WEIGHT_VALUES}): the folder is corrupt or hostile; re-train the model")
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = [k for k in sorted(expected) if k in header and header[k][1] != expected[k]]
    if missing or unexpected or wrong:
        if wrong:
            detail = (f"tensor '{wrong[0]}' has shape {list(header[wrong[0]][1])} but the plan and the "
                      f"{out_channels - 1} label(s) imply {list(expected[wrong[0]])}")
        elif missing:
            detail = f"{len(missing)} tensor(s) the plan implies are missing, e.g. '{missing[0]}'"
        else:
            detail = f"{len(unexpected)} tensor(s) the plan does not have, e.g. '{unexpected[0]}'"
        raise HSSLError(f"model folder '{folder}': the weights do not fit the plan and labels in {META} ({detail}): "
                        "the folder is corrupt or mixed up; re-train or copy it again")
