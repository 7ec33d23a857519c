"""Pretraining configuration: dataclasses read from YAML or JSON, plus ``key=value`` overrides.

Validated once, here: an unknown key is an error that names it (with the closest valid key), a
value of the wrong type is an error that names the key and the expected type. Everything after
validation can trust the types.

Spacings and sizes are in numpy ``[z, y, x]`` order (z = the slice axis, as in ``hssl.plan``).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import typing
from pathlib import Path
from typing import Any

from ..errors import HSSLError

# The architecture every pretraining run uses unless the config says otherwise. It is the plan that
# hssl.plan derives for the fine-tuning volumes (0.6x0.6x5 mm CT, 0.8x0.8x6.5 mm MR): in-plane
# downsampling only for three levels (kernels 1x3x3), then one isotropic level, so a pretrained
# network and a network trained from scratch on those volumes have exactly the same shape.
DEFAULT_STRIDES = [[1, 1, 1], [1, 2, 2], [1, 2, 2], [1, 2, 2], [2, 2, 2]]
DEFAULT_KERNELS = [[1, 3, 3], [1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3]]
DEFAULT_CHANNELS = [16, 32, 64, 128, 256]


@dataclasses.dataclass
class DataConfig:
    """Where the images come from and how they are preprocessed into the cache."""

    # Each source is a mapping, see hssl.pretrain.catalog: {kind: samples|msd|folder, path, glob,
    # task, group, modality, channel, splits, include, exclude}.
    sources: list = dataclasses.field(default_factory=lambda: [{"kind": "samples"}])
    cache_dir: str = ""  # default: <output_dir>/cache
    # Target spacing per group (mm, [z, y, x]); a group missing here keeps each image's own spacing.
    spacing: dict = dataclasses.field(default_factory=lambda: {"ct": [5.0, 0.7, 0.7], "mr": [6.0, 0.8, 0.8]})
    # Body crop: voxels above this normalised intensity (0..1) count as body; CT: 0.25 = -500 HU.
    body_threshold: dict = dataclasses.field(default_factory=lambda: {"ct": 0.25, "mr": 0.05})
    body_margin: int = 4  # voxels kept around the body box (in-plane; 1 along z)
    crop_size: list = dataclasses.field(default_factory=lambda: [8, 48, 48])
    # How a crop's volume is chosen: hierarchical (group, then task, then image, each uniform),
    # task (task uniform, then image), group (group uniform, then image), image (uniform over images).
    balance: str = "hierarchical"
    prefetch: int = 2  # batches prepared ahead in a background thread (0: none)


@dataclasses.dataclass
class ModelConfig:
    """The hssl.network.SegNet being pretrained, and the pretraining heads (dropped at export)."""

    strides: list = dataclasses.field(default_factory=lambda: [list(s) for s in DEFAULT_STRIDES])
    kernels: list = dataclasses.field(default_factory=lambda: [list(k) for k in DEFAULT_KERNELS])
    channels: list = dataclasses.field(default_factory=lambda: list(DEFAULT_CHANNELS))
    # Which pooled features carry heads: "bottleneck" (trains the encoder), "decoder" (the finest
    # decoder level: trains encoder and decoder).
    heads_on: list = dataclasses.field(default_factory=lambda: ["bottleneck", "decoder"])
    projection_dim: int = 128


@dataclasses.dataclass
class LossConfig:
    """Loss = w_image * NT-Xent + w_task * CE(task) + w_group * CE(group) + w_restore * MSE."""

    w_image: float = 1.0
    w_task: float = 0.5
    w_group: float = 0.5
    w_restore: float = 0.0  # dense term: the network's own 1x1x1 head restores the clean view
    temperature: float = 0.2


@dataclasses.dataclass
class AugmentConfig:
    """Per-view augmentations (two views of one crop differ by all of these)."""

    view_shift: float = 0.25  # views are sub-crops of a region this fraction larger (in-plane)
    flip: float = 0.5  # probability per in-plane axis
    rot90: float = 0.5  # in-plane quarter turns (square crops only)
    intensity_scale: float = 0.2
    intensity_shift: float = 0.1
    gamma: float = 0.3  # exponent drawn in exp(U(-gamma, gamma))
    noise_std: float = 0.03
    noise_prob: float = 0.5
    blur_prob: float = 0.3  # in-plane box blur
    cutout_prob: float = 0.5  # replace a few cuboids by noise (the in-painting corruption)
    cutout_boxes: int = 3


@dataclasses.dataclass
class DenseConfig:
    """The dense voxel-level method (Kats et al., ISBI 2024; vox2vec): used by ``method: dense`` and
    ``method: hssl+dense`` (see hssl.pretrain.dense)."""

    projection: str = "balanced"  # balanced: each pyramid level -> level_width, concatenated; unbalanced: raw levels (vox2vec)
    learned_projection: bool = True  # false: the per-level projections stay fixed random (as in the released code)
    level_width: int = 32  # per-level width of the balanced vector
    head_dims: list = dataclasses.field(default_factory=lambda: [160, 160, 128])  # MLP after the vector (BN+ReLU between)
    temperature: float = 0.1  # voxel InfoNCE
    w_voxel: float = 1.0
    w_restore: float = 10.0  # MSE restoration of the clean crop from the finest level
    pairs_per_step: int = 4  # crop pairs per step and process
    same_volume: bool = True  # all pairs of a step from one volume (the paper); false: one volume per pair (balanced)
    voxels_per_pair: int = 256  # voxels sampled in each pair's overlap (at most)
    min_overlap_voxels: int = 16  # fewer body voxels in the overlap: the pair is redrawn
    shuffle_prob: float = 0.8  # local pixel shuffling
    shuffle_blocks: int = 200  # blocks shuffled per view
    shuffle_block_size: list = dataclasses.field(default_factory=lambda: [2, 6, 6])  # largest block, [z, y, x]
    bezier_prob: float = 0.9  # monotone Bezier intensity curve
    inpaint_prob: float = 0.5  # noise cuboids (in-painting)
    inpaint_boxes: int = 15
    inpaint_size: float = 0.2  # largest cuboid edge, a fraction of the crop edge


@dataclasses.dataclass
class TrainConfig:
    max_steps: int = 1000  # the schedule's length (warm-up + cosine decay)
    stop_at_step: int = 0  # stop this run after this step (0: at max_steps); for chunked runs
    time_budget: float = 0.0  # seconds for this run (0: none); a checkpoint is written when it ends
    batch_size: int = 8  # crops per step and process; each gives two views
    lr: float = 1e-3
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    grad_clip: float = 12.0
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    threads: int = 0  # torch CPU threads (0: torch's default)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 1


@dataclasses.dataclass
class ExportConfig:
    hssl_model: bool = True  # <output_dir>/model: an hssl model folder (--init PATH)
    monai_bundle: bool = True  # <output_dir>/bundle: a MONAI bundle
    name: str = "hssl-pretrained"
    description: str = ""


@dataclasses.dataclass
class PretrainConfig:
    output_dir: str = "pretrain-output"
    # hssl: image/task/group terms (HSSL reconstruction); dense: voxel-level coarse-to-fine
    # contrast + restoration (Kats et al.); hssl+dense: both on one network.
    method: str = "hssl"
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    dense: DenseConfig = dataclasses.field(default_factory=DenseConfig)
    export: ExportConfig = dataclasses.field(default_factory=ExportConfig)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything a resumed run must share with the run that wrote the checkpoint.

        Left out: where outputs go, and the per-run budgets (stop_at_step, time_budget), the
        logging/checkpoint cadence and the device, which may change between the runs of one
        pretraining.
        """
        d = self.to_json()
        d.pop("output_dir")
        if d["method"] == "hssl":  # configs written before the dense method existed keep their fingerprint
            d.pop("method")
            d.pop("dense")
        d.pop("export")
        d["data"].pop("cache_dir")
        d["data"].pop("prefetch")
        for key in ("stop_at_step", "time_budget", "checkpoint_every", "keep_checkpoints", "log_every",
                    "device", "threads", "amp"):
            d["train"].pop(key)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def validate(self) -> None:
        d, m, loss, t = self.data, self.model, self.loss, self.train
        if self.method not in METHODS:
            raise HSSLError(f"method '{self.method}' must be one of {', '.join(METHODS)}")
        if not isinstance(d.sources, list) or not d.sources:
            raise HSSLError("data.sources is empty: list at least one source (samples, msd or folder)")
        if len(d.crop_size) != 3 or any(not isinstance(c, int) or c < 2 for c in d.crop_size):
            raise HSSLError(f"data.crop_size {d.crop_size} must be three integers >= 2 (z, y, x)")
        if d.balance not in ("hierarchical", "task", "group", "image"):
            raise HSSLError(f"data.balance '{d.balance}' must be hierarchical, task, group or image")
        for group, sp in d.spacing.items():
            if not (isinstance(sp, list) and len(sp) == 3 and all(isinstance(v, (int, float)) and v > 0 for v in sp)):
                raise HSSLError(f"data.spacing.{group} {sp} must be three positive numbers in mm (z, y, x)")
        n = len(m.channels)
        if n < 2 or len(m.strides) != n or len(m.kernels) != n:
            raise HSSLError(f"model.channels, model.strides and model.kernels must have the same length >= 2 "
                            f"(got {n}, {len(m.strides)}, {len(m.kernels)})")
        if any(len(s) != 3 for s in m.strides + m.kernels) or list(m.strides[0]) != [1, 1, 1]:
            raise HSSLError("model.strides and model.kernels need three values per level and the first "
                            "stride must be [1, 1, 1]")
        divisor = [1, 1, 1]
        for s in m.strides:
            divisor = [a * b for a, b in zip(divisor, s)]
        if any(c % dv for c, dv in zip(d.crop_size, divisor)):
            raise HSSLError(f"data.crop_size {d.crop_size} must be a multiple of the network's total stride "
                            f"{divisor} along each axis")
        bad = set(m.heads_on) - {"bottleneck", "decoder"}
        if bad or not m.heads_on:
            raise HSSLError(f"model.heads_on {m.heads_on} must list bottleneck and/or decoder")
        if loss.temperature <= 0:
            raise HSSLError(f"loss.temperature must be positive (got {loss.temperature})")
        for key in ("w_image", "w_task", "w_group", "w_restore"):
            if getattr(loss, key) < 0:
                raise HSSLError(f"loss.{key} must be >= 0 (got {getattr(loss, key)})")
        if "hssl" in self.method and loss.w_image + loss.w_task + loss.w_group + loss.w_restore == 0:
            raise HSSLError("every loss weight is 0: nothing would be learned")
        if "dense" in self.method:
            self.dense_validate()
        if t.max_steps < 1 or t.batch_size < 1:
            raise HSSLError("train.max_steps and train.batch_size must be at least 1")
        if "hssl" in self.method and loss.w_image > 0 and t.batch_size < 2:
            raise HSSLError("the contrastive term needs train.batch_size >= 2 (other crops are its negatives)")
        if t.checkpoint_every < 1 or t.keep_checkpoints < 1 or t.log_every < 1:
            raise HSSLError("train.checkpoint_every, train.keep_checkpoints and train.log_every must be >= 1")
        if t.time_budget < 0 or t.stop_at_step < 0:
            raise HSSLError("train.time_budget and train.stop_at_step must be >= 0")


    def dense_validate(self) -> None:
        g = self.dense
        if g.projection not in ("balanced", "unbalanced"):
            raise HSSLError(f"dense.projection '{g.projection}' must be balanced or unbalanced")
        if g.level_width < 1 or not g.head_dims or any(not isinstance(v, int) or v < 1 for v in g.head_dims):
            raise HSSLError("dense.level_width and every dense.head_dims entry must be positive integers")
        if g.temperature <= 0:
            raise HSSLError(f"dense.temperature must be positive (got {g.temperature})")
        if g.w_voxel < 0 or g.w_restore < 0 or g.w_voxel + g.w_restore == 0:
            raise HSSLError("dense.w_voxel and dense.w_restore must be >= 0 and not both 0")
        if g.pairs_per_step < 1 or g.voxels_per_pair < 2 or g.min_overlap_voxels < 1:
            raise HSSLError("dense.pairs_per_step >= 1, dense.voxels_per_pair >= 2 and dense.min_overlap_voxels >= 1 "
                            "are required")
        if g.pairs_per_step * min(g.voxels_per_pair, g.min_overlap_voxels) < 2:
            raise HSSLError("the voxel contrast needs at least 2 voxels per step: raise dense.pairs_per_step or "
                            "dense.min_overlap_voxels")
        if len(g.shuffle_block_size) != 3 or any(not isinstance(v, int) or v < 1 for v in g.shuffle_block_size):
            raise HSSLError(f"dense.shuffle_block_size {g.shuffle_block_size} must be three positive integers (z, y, x)")
        for key in ("shuffle_prob", "bezier_prob", "inpaint_prob", "inpaint_size"):
            if not 0 <= getattr(g, key) <= 1:
                raise HSSLError(f"dense.{key} must be between 0 and 1 (got {getattr(g, key)})")


METHODS = ("hssl", "dense", "hssl+dense")
SECTIONS = {"data": DataConfig, "model": ModelConfig, "loss": LossConfig, "augment": AugmentConfig,
            "train": TrainConfig, "dense": DenseConfig, "export": ExportConfig}


def read_config_file(path: str | Path) -> dict:
    """A YAML (``.yaml``/``.yml``, needs PyYAML) or JSON file -> nested dict."""
    path = Path(path)
    if not path.is_file():
        raise HSSLError(f"config file '{path}' does not exist: check the path")
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise HSSLError(f"config '{path}' is YAML, which needs PyYAML: pip install pyyaml, or write the "
                            "config as JSON") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise HSSLError(f"config '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    else:
        try:
            data = json.loads(text)
        except ValueError as err:
            raise HSSLError(f"config '{path}' is not valid JSON ({err})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HSSLError(f"config '{path}' must be a mapping of sections (data, model, loss, augment, train, export)")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``train.max_steps=200`` -> ("train.max_steps", 200). Values are read as JSON when they parse
    (numbers, true/false, lists, objects) and as plain strings otherwise."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise HSSLError(f"override '{text}' must look like section.key=value (e.g. train.max_steps=200)")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def apply_override(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise HSSLError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def build_config(tree: dict) -> PretrainConfig:
    """Nested dict -> validated PretrainConfig; unknown keys and wrong types are errors."""
    top = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in tree:
        if key not in top:
            raise HSSLError(_unknown(key, top))
    kwargs: dict[str, Any] = {}
    for key in ("output_dir", "method"):
        if key in tree:
            kwargs[key] = _coerce(key, tree[key], str)
    for section, cls in SECTIONS.items():
        values = tree.get(section) or {}
        if not isinstance(values, dict):
            raise HSSLError(f"config section '{section}' must be a mapping, not {type(values).__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in names:
                raise HSSLError(_unknown(f"{section}.{key}", {f"{section}.{n}" for n in names}))
        kwargs[section] = cls(**{k: _coerce(f"{section}.{k}", v, hints[k]) for k, v in values.items()})
    config = PretrainConfig(**kwargs)
    config.validate()
    return config


def load_config(path: str | None, overrides: list[str] = ()) -> PretrainConfig:
    tree = read_config_file(path) if path else {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return build_config(tree)


def _unknown(key: str, valid: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(valid), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(sorted(valid))})"
    return f"unknown config key '{key}'{hint}"


def _coerce(key: str, value: Any, kind: Any) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    elif kind is list:
        if isinstance(value, list):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - every field above has one of these types
        return value
    raise HSSLError(f"config key '{key}' must be {kind.__name__}, got {value!r}")
