"""Model folders: ``model.safetensors`` (weights only, no code) + ``model.json`` (readable metadata).

``model.json`` holds the format version, the label table (name, value, colour), the intensity
normalisation, the network plan, the annotated slices and training log, and package versions.
Loading validates everything and never executes anything from the folder.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from . import __version__
from .errors import HSSLError
from .io import LabelInfo, atomic_folder
from .model_format import FORMAT, META, WEIGHTS, ModelFormatError, read_meta
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
    state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
    files = {WEIGHTS: lambda path: save_file(state, str(path)),
             META: lambda path: path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")}
    for name, text in (extra_files or {}).items():
        files[name] = lambda path, text=text: path.write_text(text, encoding="utf-8")
    return atomic_folder(folder, files, overwrite, what="model folder")


def load_model(folder: str | os.PathLike, device: torch.device | str = "cpu") -> Model:
    """Load and validate a model folder. Weights are tensors only (safetensors); nothing is executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except ModelFormatError as err:
        raise HSSLError(str(err)) from None
    weights_path = folder / WEIGHTS
    try:
        labels = [LabelInfo.from_json(d) for d in meta["labels"]]
        plan = Plan.from_json(meta["plan"])
        normalization = Normalization.from_json(meta["normalization"])
    except (KeyError, TypeError, ValueError) as err:
        raise HSSLError(f"model folder '{folder}': {META} lacks a valid {err}: the folder is corrupt") from None
    net = SegNet(plan, out_channels=len(labels) + 1)
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as err:
        raise HSSLError(f"model folder '{folder}': {WEIGHTS} is corrupt ({str(err)[:100]}): re-train or copy "
                        "the folder again") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise HSSLError(f"model folder '{folder}': the weights do not fit the plan in {META} "
                        f"({str(err).splitlines()[0][:120]}): the folder is corrupt or mixed up") from None
    net.to(device).eval()
    return Model(net, labels, normalization, meta, str(folder))
