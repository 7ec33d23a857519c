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
import shutil
import tempfile
import time
from pathlib import Path

import torch

from . import __version__
from .errors import HSSLError
from .io import LabelInfo
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
               extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write the model folder atomically: a sibling temp folder is renamed into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not overwrite:
        raise HSSLError(f"model folder '{folder}' already exists: pass --overwrite or choose another folder")
    parent = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=parent))
    except OSError as err:
        raise HSSLError(f"cannot write the model in '{parent}' ({err.strerror}): choose a writable folder") from None
    meta = {
        "format": FORMAT,
        "labels": [lab.to_json() for lab in labels],
        "normalization": normalization.to_json(),
        "plan": net.plan.to_json(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"hssl": __version__, "torch": torch.__version__, "python": platform.python_version()},
        **(extra or {}),
    }
    try:
        state = {k: v.detach().to("cpu").contiguous() for k, v in net.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        publish_folder(tmp, folder)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "no space left on the device" if err.errno == 28 else (err.strerror or str(err))
        raise HSSLError(f"cannot write the model folder '{folder}' ({reason}): free space or choose another "
                        "folder") from None
    return folder


def publish_folder(tmp: Path, folder: Path) -> None:
    """Put the complete folder ``tmp`` (a sibling of ``folder``) in place of ``folder`` by renames, so
    that a reader never sees half a model; an existing ``folder`` is replaced. mkdtemp makes private
    folders, and a model folder is meant to be shared and copied: 0755 / 0644."""
    os.chmod(tmp, 0o755)
    for f in tmp.iterdir():
        os.chmod(f, 0o644)
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        os.replace(folder, old / folder.name)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


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
