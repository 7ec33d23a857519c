"""Export a pretrained ``SegNet``: as an ``hssl`` model folder and as a MONAI bundle, each with a
model card.

- ``<output>/model/``: ``model.json`` + ``model.safetensors`` written by
  ``hssl.model_store.save_model`` with no labels (one output channel). ``hssl finetune --init PATH``
  (or ``--init bundled`` once copied to ``Resources/Models/default``) keeps the architecture,
  sizes the patch for the target volume and trains a new classifier head.
- ``<output>/bundle/``: a MONAI bundle - ``configs/metadata.json``, ``configs/inference.json``
  (instantiates ``hssl.network.SegNet`` through MONAI's ``ConfigParser``; needs ``hssl`` importable),
  ``models/model.pt`` (a state dict), ``docs/README.md`` (the model card).

Both are written to a temporary sibling folder and renamed into place (``hssl.io.atomic_folder``):
a full disk or a crash leaves the previous export as it was, never half of one.
"""
from __future__ import annotations

import json
import platform
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import HSSLError
from ..io import atomic_folder
from ..model_store import save_model
from ..network import SegNet
from ..normalize import Normalization
from .config import PretrainConfig

CARD = "MODEL_CARD.md"


def git_commit(start: Path | None = None) -> str:
    """The source tree's commit (with ``-dirty`` when modified), or "unknown" outside a git checkout."""
    here = start or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], cwd=here, capture_output=True,
                               text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if sha.returncode != 0:
        return "unknown"
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def method_text(cfg: PretrainConfig) -> str:
    hssl = ("HSSL reconstruction: NT-Xent image contrast + task and group classification"
            + (" + restoration" if cfg.loss.w_restore and cfg.method == "hssl" else ""))
    g = cfg.dense
    vector = (f"balanced vector ({g.level_width} channels per level, "
              f"{'learned' if g.learned_projection else 'fixed random'} projections)"
              if g.projection == "balanced" else "unbalanced vector (raw levels concatenated, vox2vec style)")
    dense = f"dense voxel InfoNCE on the feature pyramid, {vector} + restoration"
    return {"hssl": hssl, "dense": dense, "hssl+dense": f"{hssl} + {dense}"}[cfg.method]


def pretraining_meta(cfg: PretrainConfig, summary: dict) -> dict:
    """What model.json and the card record about how the weights were made."""
    return {
        "method": method_text(cfg),
        "steps": summary["steps"], "seconds": summary["seconds_total"], "device": summary["device"],
        "processes": summary["processes"], "threads": summary["threads"], "final_loss": summary["final_loss"],
        "tasks": summary["tasks"], "groups": summary["groups"],
        "images": [{k: im[k] for k in ("task", "group", "source")} for im in summary["images"]],
        "normalization_per_modality": {"ct": Normalization("ct").to_json(), "mr": Normalization("percentile").to_json()},
        "config": cfg.to_json(), "commit": summary.get("commit") or git_commit(), "hssl": __version__,
    }


def model_card(cfg: PretrainConfig, summary: dict, command: str | None = None) -> str:
    meta = pretraining_meta(cfg, summary)
    by_task = Counter(im["task"] for im in summary["images"])
    groups = {im["task"]: im["group"] for im in summary["images"]}
    rows = "\n".join(f"| {t} | {groups[t]} | {n} |" for t, n in sorted(by_task.items()))
    sources = "\n".join(f"- `{Path(im['source']).name}` ({im['task']}, {im['group']}, {im['shape']} voxels at "
                        f"{im['spacing']} mm after preprocessing)" for im in summary["images"])
    skipped = ", ".join(f"{k}: {len(v)}" for k, v in summary.get("skipped", {}).items()) or "none"
    l, m, t = cfg.loss, cfg.model, cfg.train
    command = command or "python " + shlex.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    return f"""# {cfg.export.name}

{cfg.export.description or "A 3D encoder-decoder (hssl.network.SegNet) pretrained self-supervised on several domains."}

Method (`{cfg.method}`): {meta['method']}.
{_method_note(cfg)}

## Network
`hssl.network.SegNet`, {sum(p.numel() for p in SegNet_from(cfg, summary).parameters()) / 1e6:.2f} M parameters,
channels {m.channels}, strides {m.strides}, kernels {m.kernels} (numpy [z, y, x] order), one output
channel. Fine-tuning keeps this architecture, sizes the patch for its volume and trains a new head.

## Data ({len(summary['images'])} images, {len(by_task)} tasks, groups {summary['groups']}; skipped: {skipped})
| task | group | images |
|---|---|---|
{rows}

{sources}

Preprocessing: CT clipped to the fixed window {list(Normalization('ct').window)} HU, MR clipped to its own
{list(Normalization('percentile').percentiles)} percentiles, both scaled to [0, 1] (`hssl.normalize`, as in
fine-tuning); resampled to {cfg.data.spacing} mm ([z, y, x] per group); cropped to the body.

## Training
- Loss: {_loss_text(cfg)}
- Crops {cfg.data.crop_size} voxels, {cfg.dense.pairs_per_step if 'dense' in cfg.method else t.batch_size} pairs per step and process, balance `{cfg.data.balance}`.
- AdamW lr {t.lr}, weight decay {t.weight_decay}, warm-up {t.warmup_steps} steps, cosine over {t.max_steps} steps.
- Ran {summary['steps']} steps in {summary['seconds_total']:.0f} s on {summary['device']} ({summary['processes']}
  process(es), {summary['threads']} thread(s)); final loss {summary['final_loss'] if summary['final_loss'] is None else round(summary['final_loss'], 4)}.

## Reproduce
```
{command}
```
Commit: `{meta['commit']}`, hssl {__version__}, torch {torch.__version__}, Python {platform.python_version()}.

## Intended use and limits
Initialisation for few-slice fine-tuning (`hssl finetune --init ...`). It segments nothing by itself.
Pretrained on very little data: see docs/pretraining.md for the measured effect on fine-tuning.
"""


def _method_note(cfg: PretrainConfig) -> str:
    notes = []
    if "hssl" in cfg.method:
        notes.append("The HSSL part is **our reconstruction** of HSSL (Zheng et al., MICCAI 2021): the paper's loss "
                     "details are not available to us; see docs/pretraining.md.")
    if "dense" in cfg.method:
        notes.append("The dense part follows Kats et al. (ISBI 2024) and vox2vec as described in docs/pretraining.md "
                     "(a re-implementation, at a much smaller scale).")
    return "\n".join(notes)


def _loss_text(cfg: PretrainConfig) -> str:
    l, m, g = cfg.loss, cfg.model, cfg.dense
    parts = []
    if "hssl" in cfg.method:
        parts.append(f"{l.w_image} x NT-Xent (temperature {l.temperature}) + {l.w_task} x CE(task) + {l.w_group} x "
                     f"CE(group) (heads on pooled {', '.join(m.heads_on)} features)")
        if cfg.method == "hssl":
            parts.append(f"{l.w_restore} x restoration MSE")
    if "dense" in cfg.method:
        parts.append(f"{g.w_voxel} x voxel InfoNCE (temperature {g.temperature}, up to {g.voxels_per_pair} voxels "
                     f"per pair, head {g.head_dims}) + {g.w_restore} x restoration MSE")
    return " + ".join(parts) + "."


def SegNet_from(cfg: PretrainConfig, summary: dict) -> SegNet:  # noqa: N802 - mirrors the class name
    from ..plan import Plan

    spacing = tuple(float(v) for v in np.median([im["spacing"] for im in summary["images"]], axis=0))
    plan = Plan(spacing, tuple(cfg.data.crop_size), tuple(tuple(s) for s in cfg.model.strides),
                tuple(tuple(k) for k in cfg.model.kernels), tuple(cfg.model.channels))
    return SegNet(plan, 1)


def majority_normalization(summary: dict) -> Normalization:
    groups = Counter(im["group"] for im in summary["images"])
    return Normalization("ct") if groups.most_common(1)[0][0] == "ct" else Normalization("percentile")


def export_hssl_model(folder: Path, net: SegNet, cfg: PretrainConfig, summary: dict, command: str | None = None) -> Path:
    meta = {"description": cfg.export.description or f"{cfg.export.name}: {method_text(cfg)}; fine-tune before use",
            "name": cfg.export.name, "pretraining": pretraining_meta(cfg, summary)}
    return save_model(folder, net, [], majority_normalization(summary), extra=meta, overwrite=True,
                      extra_files={CARD: model_card(cfg, summary, command)})


def export_bundle(folder: Path, net: SegNet, cfg: PretrainConfig, summary: dict, command: str | None = None) -> Path:
    """A MONAI bundle folder (replaced if it exists)."""
    import monai

    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    plan = net.plan.to_json()
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
                  "meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "first export from hssl pretraining"},
        "monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__, "required_packages_version": {"hssl": __version__},
        "name": cfg.export.name,
        "task": "Self-supervised pretrained 3D encoder-decoder (initialisation for segmentation fine-tuning)",
        "description": "HSSL-style multi-domain pretraining (a reconstruction); see docs/README.md",
        "authors": "HSSLSegment", "copyright": "see the sources' licences in docs/README.md",
        "intended_use": "initialisation for fine-tuning; not a segmentation model by itself",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CT or MR",
                                 "num_channels": 1, "spatial_shape": plan["patch_size"], "dtype": "float32",
                                 "value_range": [0, 1], "is_patch_data": True,
                                 "channel_def": {"0": "image normalised with hssl.normalize"}}},
            "outputs": {"pred": {"type": "image", "format": "features", "num_channels": 1,
                                 "spatial_shape": plan["patch_size"], "dtype": "float32",
                                 "value_range": [], "is_patch_data": True,
                                 "channel_def": {"0": "restoration output (pretraining head)"}}},
        },
        "hssl_pretraining": pretraining_meta(cfg, summary),
    }
    inference = {
        "plan_json": plan,
        "plan": {"_target_": "hssl.plan.Plan.from_json", "d": "@plan_json"},
        "network_def": {"_target_": "hssl.network.SegNet", "plan": "@plan", "out_channels": 1},
        "device": "cpu",
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "bundle_root": ".",
    }
    texts = {"configs/metadata.json": json.dumps(metadata, indent=2) + "\n",
             "configs/inference.json": json.dumps(inference, indent=2) + "\n",
             "docs/README.md": model_card(cfg, summary, command)}
    files = {"models/model.pt": lambda path: torch.save(state, path)}
    files.update({name: lambda path, text=text: path.write_text(text, encoding="utf-8") for name, text in texts.items()})
    return atomic_folder(folder, files, overwrite=True, what="MONAI bundle")


def export_all(cfg: PretrainConfig, net: SegNet, summary: dict, command: str | None = None):
    out = Path(cfg.output_dir)
    net = net.to("cpu").eval()
    model_dir = export_hssl_model(out / "model", net, cfg, summary, command) if cfg.export.hssl_model else None
    bundle_dir = export_bundle(out / "bundle", net, cfg, summary, command) if cfg.export.monai_bundle else None
    return model_dir, bundle_dir


def install_bundled(source: str | Path, name: str, half: bool = False, description: str | None = None,
                    root: str | Path | None = None, overwrite: bool = False) -> Path:
    """Copy a pretrained model folder into the extension as ``--init bundled:NAME`` (``default``:
    plain ``--init bundled``): ``<root>/<name>/`` with model.json, model.safetensors and the card.

    ``half`` stores the weights as float16 (half the size; fine-tuning loads them into float32).
    Written to a temporary sibling and renamed, so a failed copy never leaves half a model.
    """
    import re

    from safetensors.torch import save_file

    from ..model_format import bundled_model_dir
    from ..model_store import META, WEIGHTS, load_model

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise HSSLError(f"bundled model name '{name}' must be letters, digits, '.', '_' or '-'")
    model = load_model(source)  # validates the folder
    if model.labels:
        raise HSSLError(f"'{source}' is a fine-tuned model (labels {[lab.name for lab in model.labels]}): bundle "
                        "pretrained models (no labels) only, or share the folder itself")
    root = Path(root) if root else bundled_model_dir().parent
    dest = root / name
    if dest.exists() and not overwrite:
        raise HSSLError(f"a bundled model '{name}' already exists in '{root}': pass --overwrite to replace it")
    meta = dict(model.meta)
    meta["name"] = name if name != "default" else meta.get("name", name)
    if description:
        meta["description"] = description
    meta["weights_dtype"] = "float16" if half else "float32"
    card_path = Path(source) / CARD
    card = card_path.read_text() if card_path.is_file() else f"# {name}\n\n{meta.get('description', '')}\n"
    if description:
        lines = card.splitlines()
        if len(lines) > 2 and lines[2].strip() and not lines[2].startswith("#"):
            lines[2] = description  # the card's opening paragraph is the export description
        else:
            lines[1:1] = ["", description]
        card = "\n".join(lines) + "\n"
    card += (f"\n## Shipped copy\nBundled as `{name}` (`hssl finetune --init "
             f"{'bundled' if name == 'default' else 'bundled:' + name}`), weights stored as "
             f"{'float16 (fine-tuning loads them into float32)' if half else 'float32'}.\n")
    state = {k: (v.half() if half and v.is_floating_point() else v).contiguous()
             for k, v in model.net.state_dict().items()}
    atomic_folder(dest, {WEIGHTS: lambda path: save_file(state, str(path)),
                         META: lambda path: path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8"),
                         CARD: lambda path: path.write_text(card, encoding="utf-8")},
                  overwrite=True, what="bundled model")
    load_model(dest)  # the copy loads
    return dest
