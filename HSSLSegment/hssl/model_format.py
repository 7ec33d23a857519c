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

A model folder is user input (shared, downloaded, possibly corrupted or hostile), so
:func:`check_model_folder` validates every field of ``model.json`` against the bounds below and
reads the weights' tensor names, dtypes and shapes from the safetensors header (a JSON header:
nothing is allocated and nothing is executed) before the engine builds a network. The bounds sit
far above anything this project trains (patches of 0.02-0.2 M voxels, 5 levels, 16-256 channels)
and keep one sliding window, the network and the label table within a workstation's memory.

Stdlib only.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

FORMAT = "hssl-model/1"
WEIGHTS = "model.safetensors"
META = "model.json"
CARD = "MODEL_CARD.md"
DEFAULT_BUNDLED = "default"
INIT_KEYWORDS = ("auto", "scratch", "bundled")
# What ``--init auto`` (the default start of the CLI, the background job and the Slicer module)
# starts from. The development set decides (docs/results.md, "Which start is the default"):
# "scratch" while no shipped pretrained model beats a random start there; "bundled" makes it the
# shipped default model whenever one is installed. The pretrained models stay selectable.
DEFAULT_START = "scratch"

# What a model folder may ask for (see the module docstring).
MAX_LEVELS = 8
MAX_STRIDE = 4
MAX_KERNEL = 7
MAX_CHANNELS = 1024
MAX_PATCH_SIDE = 1024
MAX_PATCH_VOXELS = 4 * 2**20  # one sliding window, e.g. 160^3 voxels
# Feature values of one window summed over the encoder levels (channels x voxels of each level):
# 2^27 float32 values are 512 MiB; the decoder holds about as many again.
MAX_FEATURE_VALUES = 2**27
MAX_WEIGHT_VALUES = 2**28  # parameters, 1 GiB as float32
MAX_LABELS = 255
MAX_LABEL_VALUE = 65535
MAX_NAME_CHARS = 256
MAX_SPACING_MM = 1e4
MAX_INTENSITY = 1e7  # a CT window beyond this is not Hounsfield units
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_META_BYTES = 64 * 2**20
WEIGHT_DTYPES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}  # weights are floating point only


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

    Only the structure is checked here; :func:`check_model_folder` validates every field.
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
        if (folder / META).stat().st_size > MAX_META_BYTES:
            raise ValueError(f"larger than {MAX_META_BYTES // 2**20} MiB")
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        raise ModelFormatError(f"model folder '{folder}': {META} is corrupt ({err}): re-train or copy the folder "
                               "again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ModelFormatError(f"model folder '{folder}' has format {found!r}, expected {FORMAT!r}: it was written "
                               "by another tool or version")
    return meta


# ------------------------------------------------------------------ validation of a model folder

def check_model_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, tuple[str, tuple[int, ...]]]]:
    """``(model.json, weights header)`` of a model folder whose every field is valid and within bounds.

    The header maps tensor names to ``(dtype, shape)``; it is read from the safetensors file's JSON
    header, so a hostile file costs nothing to refuse. Whether the shapes are the ones the plan
    implies needs the network definition (torch): ``hssl.model_store.load_model`` checks that
    before it allocates anything. Raises :class:`ModelFormatError` naming the field.
    """
    folder = Path(folder)
    meta = read_meta(folder)
    try:
        validate_meta(meta)
        header = read_weights_header(folder / WEIGHTS)
    except ModelFormatError as err:
        raise ModelFormatError(f"model folder '{folder}': {err}: the folder is corrupt or was not written by "
                               "HSSLSegment; re-train the model or copy the folder again") from None
    return meta, header


def validate_meta(meta: dict) -> None:
    """Check every field of ``model.json`` that the engine uses; :class:`ModelFormatError` names the first
    bad one (as ``model.json FIELD ...``)."""
    for key in ("labels", "normalization", "plan"):
        if key not in meta:
            raise ModelFormatError(f"{META} has no '{key}'")
    check_labels(meta["labels"])
    check_normalization(meta["normalization"])
    check_plan(meta["plan"])
    for key in ("name", "description", "created"):
        if key in meta and not isinstance(meta[key], str):
            raise ModelFormatError(f"{META} {key} must be a string, not {_kind(meta[key])}")
    for key in ("training", "pretraining", "versions"):
        if key in meta and not isinstance(meta[key], dict):
            raise ModelFormatError(f"{META} {key} must be an object, not {_kind(meta[key])}")
    per_modality = (meta.get("pretraining") or {}).get("normalization_per_modality")
    if per_modality is not None:
        if not isinstance(per_modality, dict):
            raise ModelFormatError(f"{META} pretraining.normalization_per_modality must be an object")
        for modality, norm in per_modality.items():
            check_normalization(norm, f"pretraining.normalization_per_modality.{modality}")


def check_labels(labels, field: str = "labels") -> None:
    """A label table: at most MAX_LABELS entries ``{name, value, color}`` with unique non-empty names,
    unique integer values 1..MAX_LABEL_VALUE and RGB colours of three numbers in [0, 1]."""
    if not isinstance(labels, list):
        raise ModelFormatError(f"{META} {field} must be a list, not {_kind(labels)}")
    if len(labels) > MAX_LABELS:
        raise ModelFormatError(f"{META} {field} has {len(labels)} entries (at most {MAX_LABELS})")
    names, values = set(), set()
    for n, label in enumerate(labels):
        where = f"{field}[{n}]"
        if not isinstance(label, dict):
            raise ModelFormatError(f"{META} {where} must be an object with name, value and color")
        name, value, color = label.get("name"), label.get("value"), label.get("color")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise ModelFormatError(f"{META} {where}.name must be a non-empty string of at most {MAX_NAME_CHARS} "
                                   f"characters, not {_show(name)}")
        if not _is_int(value) or not 1 <= value <= MAX_LABEL_VALUE:
            raise ModelFormatError(f"{META} {where}.value must be an integer from 1 to {MAX_LABEL_VALUE}, "
                                   f"not {_show(value)}")
        if name in names:
            raise ModelFormatError(f"{META} {where}.name '{name}' is used twice")
        if value in values:
            raise ModelFormatError(f"{META} {where}.value {value} is used twice")
        names.add(name)
        values.add(value)
        if (not isinstance(color, list) or len(color) != 3
                or not all(_is_number(c) and 0.0 <= c <= 1.0 for c in color)):
            raise ModelFormatError(f"{META} {where}.color must be three numbers in [0, 1] (RGB), not {_show(color)}")


def check_normalization(norm, field: str = "normalization") -> None:
    """``{scheme: ct|percentile, window: [lo, hi], percentiles: [lo, hi]}``: finite, ordered numbers."""
    if not isinstance(norm, dict):
        raise ModelFormatError(f"{META} {field} must be an object, not {_kind(norm)}")
    if norm.get("scheme") not in ("ct", "percentile"):
        raise ModelFormatError(f"{META} {field}.scheme must be 'ct' or 'percentile', not {_show(norm.get('scheme'))}")
    for key, lo_bound, hi_bound in (("window", -MAX_INTENSITY, MAX_INTENSITY), ("percentiles", 0.0, 100.0)):
        if key not in norm:
            continue  # the defaults apply (hssl.normalize)
        pair = norm[key]
        if (not isinstance(pair, list) or len(pair) != 2 or not all(_is_number(v) for v in pair)
                or not lo_bound <= pair[0] < pair[1] <= hi_bound):
            raise ModelFormatError(f"{META} {field}.{key} must be two finite numbers lo < hi within "
                                   f"[{lo_bound:g}, {hi_bound:g}], not {_show(pair)}")


def check_plan(plan, field: str = "plan") -> None:
    """A network plan within bounds and consistent with itself: as many strides, kernels and channels
    as levels, the first stride (1, 1, 1), odd kernels, a patch that is a multiple of the total stride
    (``divisor``) along each axis and whose window fits MAX_PATCH_VOXELS and MAX_FEATURE_VALUES."""
    if not isinstance(plan, dict):
        raise ModelFormatError(f"{META} {field} must be an object, not {_kind(plan)}")
    for key in ("spacing", "patch_size", "strides", "kernels", "channels"):
        if key not in plan:
            raise ModelFormatError(f"{META} {field} has no '{key}'")
    spacing = plan["spacing"]
    if (not isinstance(spacing, list) or len(spacing) != 3
            or not all(_is_number(v) and 0 < v <= MAX_SPACING_MM for v in spacing)):
        raise ModelFormatError(f"{META} {field}.spacing must be three positive millimetre values up to "
                               f"{MAX_SPACING_MM:g}, not {_show(spacing)}")
    patch = _triple(plan["patch_size"], f"{field}.patch_size", 1, MAX_PATCH_SIDE)
    voxels = math.prod(patch)
    if voxels > MAX_PATCH_VOXELS:
        raise ModelFormatError(f"{META} {field}.patch_size {patch} asks for {voxels} voxels per window (at most "
                               f"{MAX_PATCH_VOXELS})")
    channels = plan["channels"]
    if not isinstance(channels, list) or not 1 <= len(channels) <= MAX_LEVELS:
        raise ModelFormatError(f"{META} {field}.channels must list 1 to {MAX_LEVELS} levels, not {_show(channels)}")
    for n, c in enumerate(channels):
        if not _is_int(c) or not 1 <= c <= MAX_CHANNELS:
            raise ModelFormatError(f"{META} {field}.channels[{n}] must be an integer from 1 to {MAX_CHANNELS}, "
                                   f"not {_show(c)}")
    levels = len(channels)
    for key in ("strides", "kernels"):
        if not isinstance(plan[key], list) or len(plan[key]) != levels:
            raise ModelFormatError(f"{META} {field}.{key} must have one entry per level ({levels}, as "
                                   f"{field}.channels), not {_show(plan[key])}")
    strides = [_triple(s, f"{field}.strides[{n}]", 1, MAX_STRIDE) for n, s in enumerate(plan["strides"])]
    kernels = [_triple(k, f"{field}.kernels[{n}]", 1, MAX_KERNEL) for n, k in enumerate(plan["kernels"])]
    if strides[0] != [1, 1, 1]:
        raise ModelFormatError(f"{META} {field}.strides[0] must be [1, 1, 1] (the output has the input's "
                               f"resolution), not {strides[0]}")
    for n, (kernel, stride) in enumerate(zip(kernels, strides)):
        if any(k % 2 == 0 or k < s - 1 for k, s in zip(kernel, stride)):
            raise ModelFormatError(f"{META} {field}.kernels[{n}] {kernel} must be odd and at least the stride "
                                   f"{stride} minus 1 along each axis")
    divisor, features = [1, 1, 1], 0
    for stride, c in zip(strides, channels):
        divisor = [d * s for d, s in zip(divisor, stride)]
        features += c * math.prod(-(-p // d) for p, d in zip(patch, divisor))
    if any(p % d for p, d in zip(patch, divisor)):
        raise ModelFormatError(f"{META} {field}.patch_size {patch} must be a multiple of the total stride "
                               f"{divisor} along each axis")
    if features > MAX_FEATURE_VALUES:
        raise ModelFormatError(f"{META} {field} asks for {features} feature values per window (channels x voxels "
                               f"over the levels; at most {MAX_FEATURE_VALUES})")


def read_weights_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> ``(dtype, shape)`` from a safetensors file's header, checked against the file.

    The format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {...}}``, then the tensor bytes. Offsets must tile
    the data exactly; only floating-point dtypes are accepted. Nothing but the header is read.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if not 2 <= length <= min(MAX_HEADER_BYTES, size - 8):
                raise ModelFormatError(f"{WEIGHTS} has no valid safetensors header (file of {size} bytes)")
            header = json.loads(f.read(length).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as err:
        if isinstance(err, ModelFormatError):
            raise
        raise ModelFormatError(f"{WEIGHTS} cannot be read as safetensors ({err})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{WEIGHTS} has a header that is not an object")
    data_bytes = size - 8 - length
    tensors, spans, total = {}, [], 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if dtype not in WEIGHT_DTYPES:
            raise ModelFormatError(f"{WEIGHTS} tensor '{name}' has dtype {_show(dtype)}: weights must be one of "
                                   f"{', '.join(WEIGHT_DTYPES)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d for d in shape):
            raise ModelFormatError(f"{WEIGHTS} tensor '{name}' has an invalid shape {_show(shape)}")
        count = math.prod(shape)
        total += count
        if total > MAX_WEIGHT_VALUES:
            raise ModelFormatError(f"{WEIGHTS} holds more than {MAX_WEIGHT_VALUES} weights")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
                or offsets[1] - offsets[0] != count * WEIGHT_DTYPES[dtype]):
            raise ModelFormatError(f"{WEIGHTS} tensor '{name}' has data offsets {_show(offsets)} that do not "
                                   f"match its shape {shape} and dtype {dtype}")
        spans.append(tuple(offsets))
        tensors[name] = (dtype, tuple(shape))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ModelFormatError(f"{WEIGHTS} tensor data overlap or leave gaps (at byte {begin})")
        position = end
    if position != data_bytes:
        raise ModelFormatError(f"{WEIGHTS} is {data_bytes - position:+d} bytes off the size its header describes: "
                               "the file is truncated or padded")
    return tensors


def _triple(value, field: str, lo: int, hi: int) -> list[int]:
    if not isinstance(value, list) or len(value) != 3 or not all(_is_int(v) and lo <= v <= hi for v in value):
        raise ModelFormatError(f"{META} {field} must be three integers from {lo} to {hi} (z, y, x), "
                               f"not {_show(value)}")
    return list(value)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(v), type(v).__name__)


def _show(v) -> str:
    """A value for a message, cut to keep the message one short line."""
    text = json.dumps(v)
    return text if len(text) <= 60 else text[:57] + "..."
