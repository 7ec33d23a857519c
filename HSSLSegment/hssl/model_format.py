"""The model folder format and the names of shipped models, without torch.

A model folder holds ``model.safetensors`` (tensors only, never code) and ``model.json`` (format
``hssl-model/1``: label table, normalisation, network plan, training record), optionally a
``MODEL_CARD.md``. Both the engine (``hssl.model_store``, which loads the weights) and the Slicer
module (which only lists and describes models) read folders through this module, so the format
and the ``--init`` grammar are defined once.

Shipped (bundled) pretrained models live in one folder per model, by default the extension's
``HSSLSegment/Resources/Models/<name>/``; ``HSSL_MODELS_DIR`` points the engine elsewhere (an
engine installed with pip next to a copy of the models). ``--init bundled`` means the model named
``default``; ``bundled:NAME`` any other.

Stdlib only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

FORMAT = "hssl-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"
CARD = "MODEL_CARD.md"
DEFAULT_BUNDLED = "default"
INIT_KEYWORDS = ("auto", "scratch", "bundled")


class ModelFormatError(ValueError):
    """A folder that is not a usable model; the message names the problem and the fix."""


def bundled_models_dir() -> Path:
    """The folder holding the shipped models (``$HSSL_MODELS_DIR`` or the extension's Resources)."""
    override = os.environ.get("HSSL_MODELS_DIR")
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parent.parent / "Resources" / "Models"


def bundled_model_dir(name: str = DEFAULT_BUNDLED) -> Path:
    return bundled_models_dir() / (name or DEFAULT_BUNDLED)


def bundled_model_names(root: str | os.PathLike | None = None) -> list[str]:
    """Names usable as ``bundled:NAME`` (``default`` is plain ``bundled``), sorted."""
    root = Path(root) if root is not None else bundled_models_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / META).is_file())


def parse_init(init: str) -> tuple[str, str | None]:
    """Split an ``--init`` value: ``("auto"|"scratch", None)``, ``("bundled", NAME)`` or ``("path", PATH)``.

    ``bundled`` alone is ``("bundled", "default")``. Anything that is not a keyword is a model folder.
    """
    init = (init or "").strip()
    if not init:
        raise ModelFormatError("the init is empty: use auto, scratch, bundled, bundled:NAME or a model folder")
    if init in ("auto", "scratch"):
        return init, None
    if init == "bundled" or init.startswith("bundled:"):
        name = init.partition(":")[2].strip() or DEFAULT_BUNDLED
        if "/" in name or "\\" in name or name in (".", ".."):
            raise ModelFormatError(f"'{init}' is not a bundled model name: use bundled:NAME with a name from "
                                   f"{', '.join(bundled_model_names()) or 'the shipped models'}")
        return "bundled", name
    return "path", init


def bundled_init(name: str | None) -> str:
    """The ``--init`` value for the bundled model ``name``: ``bundled`` for the default one."""
    return "bundled" if not name or name == DEFAULT_BUNDLED else f"bundled:{name}"


def missing_bundled_message(name: str) -> str:
    have = bundled_model_names()
    return (f"no pretrained model '{name}' is bundled with this version (bundled: {', '.join(have) or 'none'}): "
            "use --init bundled:NAME with one of those, --init scratch or --init PATH of a model folder")


def read_meta(folder: str | os.PathLike) -> dict:
    """``model.json`` of a complete model folder, checked for the format; :class:`ModelFormatError` otherwise.

    Only the structure is checked here; ``hssl.model_store.load_model`` validates every field
    against the weights before anything is allocated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFormatError(f"model folder '{folder}' does not exist: train one with 'hssl finetune' or check "
                               "the path")
    for name in (META, WEIGHTS):
        if not (folder / name).is_file():
            raise ModelFormatError(f"model folder '{folder}' is missing {name}: it is not a complete HSSLSegment "
                                   "model; re-train or copy the whole folder")
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelFormatError(f"model folder '{folder}': {META} is corrupt ({err}): re-train or copy the folder "
                               "again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelFormatError(f"model folder '{folder}' has format {found!r}, expected {FORMAT!r}: it was written "
                               "by another tool or version")
    return meta
