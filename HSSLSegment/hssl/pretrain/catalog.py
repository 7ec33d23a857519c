"""The pretraining catalog: images from several sources, each tagged with a task and a group, and
their preprocessed copies in an on-disk cache.

Sources (one mapping each in ``data.sources``):

- ``{kind: samples}``: the project's real sample scans (``hssl data fetch``). Tasks are the source
  datasets (``lung_ct``, ``brain_mr``, ``breast_mr``, ``head_ct``, ``dmri``), groups the modality.
- ``{kind: msd, path: DIR}``: a Medical Segmentation Decathlon folder. ``dataset.json`` gives the
  images (``training[].image`` and ``test[]``; ``splits`` picks them), the task (its ``name``)
  and the modality (its ``modality``); without ``dataset.json`` the ``imagesTr``/``imagesTs``
  folders are listed. Labels are never read: pretraining is label-free, so labelled and label-less
  images mix freely. Multi-channel (4D) MSD images contribute channel ``channel`` (default 0).
- ``{kind: folder, path: DIR, glob: PATTERN}``: NIfTI/NRRD/MHA files, or DICOM series folders
  (directories that the glob matches). ``task`` defaults to the folder name.

Every source takes ``task``, ``group``, ``modality`` (``ct``, ``mr`` or ``auto``: guessed per image
from its intensities), ``include``/``exclude`` (file-name globs). The group defaults to the modality.

Preprocessing, per image: intensities with ``hssl.normalize`` on the full original volume (CT: the
fixed HU window; MR: percentiles), exactly as fine-tuning does; linear resampling to the group's
spacing (``data.spacing``, mm ``[z, y, x]``), except that an axis which had at least one crop's
worth of voxels keeps that many; a crop to the box of body voxels. The result is a float16
``[z, y, x]`` array in ``<cache>/<key>.npy`` (read memory-mapped), listed in
``<cache>/manifest.json``. The key hashes the file, its size and time stamp and the preprocessing
parameters, so a changed setting or file is re-processed and everything else is reused.

Images that cannot be used (missing, unreadable, 2D, 4D, constant) are skipped with a warning and
counted; only an empty result is an error.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .. import data as sample_data
from ..errors import HSSLError
from ..io import IMAGE_SUFFIXES, read_image
from ..normalize import for_modality, guess_modality
from .config import DataConfig

MANIFEST = "manifest.json"
CACHE_FORMAT = "hssl-pretrain-cache/1"
PREPROCESS_VERSION = 1  # bump when the preprocessing code changes what it writes

# Sample scan file name -> (task, group/modality, body region). Labels are not images.
SAMPLE_TASKS = {
    "lung1_image.nrrd": ("lung_ct", "ct", "chest"),
    "lung2_image.nrrd": ("lung_ct", "ct", "chest"),
    "brain1_image.nrrd": ("brain_mr", "mr", "head"),
    "brain2_image.nrrd": ("brain_mr", "mr", "head"),
    "breast1_image.nrrd": ("breast_mr", "mr", "breast"),
    "ct_brain_atlas_1mm.nii.gz": ("head_ct", "ct", "head"),
    "aniso_vox.nii.gz": ("dmri", "mr", "head"),
    "test_piesno.nii.gz": ("dmri", "mr", "head"),
    "small_64D.nii": ("dmri", "mr", "head"),  # 4D: skipped (counted), kept to exercise the skip path
}
SOURCE_KEYS = {"kind", "path", "glob", "task", "group", "modality", "channel", "splits", "include", "exclude"}
MR_NAMES = ("mr", "mri", "t1", "t2", "flair", "adc", "dwi", "pd", "t1w", "t2w", "t1gd", "t1c", "bold")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image to pretrain on, before preprocessing."""

    path: str
    task: str
    group: str | None  # None: the modality, once known
    modality: str  # ct | mr | auto
    channel: int | None = None  # for 4D multi-channel images
    source: str = ""


@dataclasses.dataclass
class CachedImage:
    """One preprocessed image in the cache: ``array`` is float16 ``[z, y, x]``, memory-mapped."""

    id: str
    file: str
    task: str
    group: str
    task_id: int
    group_id: int
    modality: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    source_path: str

    _array: np.ndarray | None = dataclasses.field(default=None, repr=False, compare=False)

    def array(self, cache_dir: Path) -> np.ndarray:
        if self._array is None:
            self._array = np.load(cache_dir / self.file, mmap_mode="r")
        return self._array


@dataclasses.dataclass
class Catalog:
    cache_dir: Path
    images: list[CachedImage]
    tasks: list[str]  # index = task id
    groups: list[str]  # index = group id
    skipped: dict[str, list[str]]  # reason -> paths

    def summary(self) -> str:
        per_task = {t: sum(1 for im in self.images if im.task == t) for t in self.tasks}
        parts = ", ".join(f"{t} {n}" for t, n in per_task.items())
        skipped = sum(len(v) for v in self.skipped.values())
        return (f"{len(self.images)} image(s) in {len(self.tasks)} task(s) [{parts}] and {len(self.groups)} "
                f"group(s) {self.groups}" + (f"; {skipped} skipped" if skipped else ""))


# ---------------------------------------------------------------------------------- listing

def list_items(sources: list, warn: Callable[[str], None]) -> tuple[list[Item], dict[str, list[str]]]:
    """All images the sources name, and the ones already known to be missing."""
    items: list[Item] = []
    missing: list[str] = []
    for n, source in enumerate(sources):
        if not isinstance(source, dict):
            raise HSSLError(f"data.sources[{n}] must be a mapping like {{kind: folder, path: DIR}}")
        unknown = set(source) - SOURCE_KEYS
        if unknown:
            raise HSSLError(f"unknown config key 'data.sources[{n}].{sorted(unknown)[0]}' (valid: "
                            f"{', '.join(sorted(SOURCE_KEYS))})")
        kind = source.get("kind")
        if kind == "samples":
            found, lost = _sample_items(source)
        elif kind == "msd":
            found, lost = _msd_items(source, n)
        elif kind == "folder":
            found, lost = _folder_items(source, n)
        else:
            raise HSSLError(f"data.sources[{n}].kind is {kind!r}: choose samples, msd or folder")
        found = _filter(found, source)
        if not found and not lost:
            warn(f"warning: data.sources[{n}] ({kind} {source.get('path', '')}) has no image")
        items.extend(found)
        missing.extend(lost)
    for path in missing:
        warn(f"warning: skipping '{path}': the file does not exist")
    return items, ({"missing": missing} if missing else {})


def _filter(items: list[Item], source: dict) -> list[Item]:
    include, exclude = source.get("include"), source.get("exclude") or []
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    out = []
    for item in items:
        name = Path(item.path).name
        if include and not any(fnmatch.fnmatch(name, p) for p in include):
            continue
        if any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        out.append(item)
    return out


def _modality(source: dict, default: str = "auto") -> str:
    modality = str(source.get("modality", default)).lower()
    if modality not in ("ct", "mr", "auto"):
        raise HSSLError(f"source modality '{modality}' must be ct, mr or auto")
    return modality


def _sample_items(source: dict) -> tuple[list[Item], list[str]]:
    items = []
    for s in sample_data.SOURCES:
        for member in s.members:
            name = Path(member).name
            if name not in SAMPLE_TASKS:
                continue
            task, group, _ = SAMPLE_TASKS[name]
            path = sample_data.data_dir() / s.name / name
            if not path.exists():
                raise HSSLError(f"sample scan '{name}' is not in the cache {sample_data.data_dir()}: run "
                                "'hssl data fetch' once (needs access to PyPI)")
            items.append(Item(str(path), source.get("task", task), source.get("group", group),
                              _modality(source, group), None, "samples"))
    return items, []


def _msd_items(source: dict, n: int) -> tuple[list[Item], list[str]]:
    root = Path(str(source.get("path", ""))).expanduser()
    if not root.is_dir():
        raise HSSLError(f"data.sources[{n}]: MSD folder '{root}' does not exist")
    splits = source.get("splits", ["training", "test"])
    meta_path = root / "dataset.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            raise HSSLError(f"'{meta_path}' is not valid JSON ({err}): fix or remove it") from None
        names = []
        if "training" in splits:
            names += [e["image"] if isinstance(e, dict) else e for e in meta.get("training", [])]
        if "test" in splits:
            names += [e["image"] if isinstance(e, dict) else e for e in meta.get("test", [])]
        task = source.get("task", meta.get("name") or root.name)
        modalities = meta.get("modality") or {}
    else:
        folders = {"training": "imagesTr", "test": "imagesTs"}
        names = [str(p.relative_to(root)) for split in splits for p in sorted((root / folders.get(split, split)).glob("*"))
                 if p.name.lower().endswith(IMAGE_SUFFIXES)]
        if not names:
            raise HSSLError(f"data.sources[{n}]: '{root}' has neither dataset.json nor images in imagesTr/imagesTs: "
                            "is it an MSD task folder?")
        task, modalities = source.get("task", root.name), {}
    channel = source.get("channel")
    if channel is None and len(modalities) > 1:
        channel = 0
    modality = _modality(source, _msd_modality(modalities, channel or 0))
    items, missing = [], []
    for name in names:
        path = (root / name).resolve()
        if path.name.startswith("._"):  # macOS resource forks that some MSD archives carry
            continue
        if not path.exists():
            missing.append(str(path))
            continue
        items.append(Item(str(path), str(task), source.get("group"), modality, channel, f"msd:{root.name}"))
    return items, missing


def _msd_modality(modalities: dict, channel: int) -> str:
    name = str(modalities.get(str(channel), modalities.get(channel, ""))).lower()
    if name == "ct":
        return "ct"
    if any(name.startswith(m) for m in MR_NAMES):
        return "mr"
    return "auto"


def _folder_items(source: dict, n: int) -> tuple[list[Item], list[str]]:
    root = Path(str(source.get("path", ""))).expanduser()
    if not root.is_dir():
        raise HSSLError(f"data.sources[{n}]: folder '{root}' does not exist")
    pattern = source.get("glob", "**/*")
    items = []
    for path in sorted(root.glob(pattern)):
        is_image = path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES)
        is_series = path.is_dir() and any(p.suffix.lower() in (".dcm", "") and p.is_file() for p in path.iterdir())
        if (is_image or is_series) and not path.name.startswith("."):
            items.append(Item(str(path), str(source.get("task", root.name)), source.get("group"),
                              _modality(source), source.get("channel"), f"folder:{root.name}"))
    return items, []


# ------------------------------------------------------------------------------ preprocessing

def build_catalog(cfg: DataConfig, cache_dir: str | Path, crop_size: list[int],
                  warn: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Catalog:
    """List the sources, preprocess what is not cached yet, write the manifest, return the catalog."""
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HSSLError(f"cannot create the cache folder '{cache_dir}' ({err.strerror}): set data.cache_dir "
                        "to a writable folder") from None
    items, skipped = list_items(cfg.sources, warn)
    if not items and not skipped:
        raise HSSLError("the catalog is empty: the configured sources hold no image (check data.sources paths, "
                        "globs and include/exclude)")
    entries = []
    for item in items:
        try:
            entries.append(_cached(item, cfg, cache_dir, crop_size))
        except _Skip as skip:
            warn(f"warning: skipping '{item.path}': {skip.reason}")
            skipped.setdefault(skip.kind, []).append(item.path)
    if not entries:
        total = sum(len(v) for v in skipped.values())
        raise HSSLError(f"no usable image: all {total} listed image(s) were skipped "
                        f"({', '.join(f'{k}: {len(v)}' for k, v in skipped.items())}); see the warnings above")
    if skipped:
        warn(f"warning: {sum(len(v) for v in skipped.values())} image(s) skipped "
             f"({', '.join(f'{k}: {len(v)}' for k, v in skipped.items())}), {len(entries)} used")
    tasks = sorted({e["task"] for e in entries})
    groups = sorted({e["group"] for e in entries})
    images = []
    for e in entries:
        e["task_id"], e["group_id"] = tasks.index(e["task"]), groups.index(e["group"])
        images.append(CachedImage(e["id"], e["file"], e["task"], e["group"], e["task_id"], e["group_id"],
                                  e["modality"], tuple(e["shape"]), tuple(e["spacing"]), e["source_path"]))
    manifest = {"format": CACHE_FORMAT, "tasks": tasks, "groups": groups, "images": entries,
                "skipped": skipped, "preprocessing": _preprocessing(cfg)}
    _atomic_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return Catalog(cache_dir, images, tasks, groups, skipped)


def load_manifest(cache_dir: str | Path) -> Catalog:
    """Re-open a cache written by build_catalog (e.g. by another process of a distributed run)."""
    cache_dir = Path(cache_dir)
    try:
        manifest = json.loads((cache_dir / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        raise HSSLError(f"cannot read the cache manifest in '{cache_dir}' ({err}): delete the cache folder "
                        "to rebuild it") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise HSSLError(f"'{cache_dir / MANIFEST}' has format {manifest.get('format')!r}: delete the cache folder")
    images = [CachedImage(e["id"], e["file"], e["task"], e["group"], e["task_id"], e["group_id"], e["modality"],
                          tuple(e["shape"]), tuple(e["spacing"]), e["source_path"]) for e in manifest["images"]]
    return Catalog(cache_dir, images, manifest["tasks"], manifest["groups"], manifest.get("skipped", {}))


class _Skip(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


def _preprocessing(cfg: DataConfig) -> dict:
    return {"version": PREPROCESS_VERSION, "spacing": cfg.spacing, "body_threshold": cfg.body_threshold,
            "body_margin": cfg.body_margin}


def _cached(item: Item, cfg: DataConfig, cache_dir: Path, crop_size: list[int]) -> dict:
    path = Path(item.path)
    try:
        stat = path.stat()
    except OSError:
        raise _Skip("missing", "the file does not exist") from None
    key_src = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, item.channel, item.modality,
                          item.group, _preprocessing(cfg), crop_size], sort_keys=True)
    key = hashlib.sha1(key_src.encode()).hexdigest()[:16]
    file = f"{key}.npy"
    meta_file = cache_dir / f"{key}.json"
    if (cache_dir / file).exists() and meta_file.exists():
        try:
            entry = json.loads(meta_file.read_text())
            entry["task"] = item.task  # task names may change without re-processing
            return entry
        except ValueError:
            pass
    array, spacing, modality = _preprocess(item, cfg, crop_size)
    group = item.group or modality
    _atomic_npy(cache_dir / file, array)
    entry = {"id": key, "file": file, "task": item.task, "group": group, "modality": modality,
             "shape": list(array.shape), "spacing": [round(s, 4) for s in spacing], "source_path": str(path),
             "source": item.source}
    _atomic_text(meta_file, json.dumps(entry) + "\n")
    return entry


def _read(item: Item) -> tuple[np.ndarray, tuple[float, float, float]]:
    """-> array ``[z, y, x]``, spacing ``[z, y, x]`` mm."""
    path = Path(item.path)
    if item.channel is not None and path.is_file():
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError:
            raise _Skip("unreadable", "cannot be read as an image") from None
        if image.GetDimension() == 4:
            size = list(image.GetSize())
            if not 0 <= item.channel < size[3]:
                raise _Skip("not 3D", f"has {size[3]} channels, channel {item.channel} asked for")
            image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, item.channel])
        if image.GetDimension() != 3 or min(image.GetSize()) < 2 or image.GetNumberOfComponentsPerPixel() != 1:
            raise _Skip("not 3D", f"is not a 3D scalar volume (size {image.GetSize()})")
        array = sitk.GetArrayFromImage(image)
        if not np.all(np.isfinite(array)) or array.min() == array.max():
            raise _Skip("unreadable", "holds NaN/Inf or constant values")
        return array, tuple(reversed(image.GetSpacing()))
    try:
        volume = read_image(path)
    except HSSLError as err:
        text = str(err)
        kind = "not 3D" if any(w in text for w in ("2D", "4D", "single slice", "component")) else "unreadable"
        raise _Skip(kind, text.split("' ", 1)[-1].split(": ")[0]) from None
    return volume.array, tuple(reversed(volume.geometry.spacing))


def _preprocess(item: Item, cfg: DataConfig, crop_size: list[int]) -> tuple[np.ndarray, tuple, str]:
    array, spacing = _read(item)
    modality = item.modality if item.modality != "auto" else guess_modality(array)
    # Normalise the whole original volume, exactly as fine-tuning and prediction do.
    norm = for_modality(modality, array)
    image = norm.apply(array)
    group = item.group or modality
    target = cfg.spacing.get(group)
    if target is not None:
        spacing_arr, shape = np.asarray(spacing, float), np.asarray(image.shape)
        extent = spacing_arr * shape
        new = np.asarray(target, float)
        # A thin volume keeps at least one crop's worth of voxels along an axis where it had them.
        for a in range(3):
            if shape[a] >= crop_size[a]:
                new[a] = min(new[a], extent[a] / crop_size[a])
        if not np.allclose(new, spacing_arr, rtol=1e-3):
            image = _resample(image, spacing_arr, new)
            spacing = tuple(float(s) for s in new)
    threshold = cfg.body_threshold.get(group, cfg.body_threshold.get(modality, 0.05))
    image = _crop_body(image, threshold, cfg.body_margin)
    return image.astype(np.float16), tuple(float(s) for s in spacing), modality


def _resample(image: np.ndarray, spacing: np.ndarray, new: np.ndarray) -> np.ndarray:
    src = sitk.GetImageFromArray(image)
    src.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    size = np.maximum(1, np.round(np.asarray(image.shape) * spacing / new)).astype(int)
    out = sitk.Resample(src, [int(s) for s in size[::-1]], sitk.Transform(), sitk.sitkLinear, src.GetOrigin(),
                        tuple(float(s) for s in new[::-1]), src.GetDirection(), float(image.min()))
    return sitk.GetArrayFromImage(out)


def _crop_body(image: np.ndarray, threshold: float, margin: int) -> np.ndarray:
    """The box of voxels above ``threshold``, grown by ``margin`` voxels in-plane and 1 along z."""
    mask = image > threshold
    if not mask.any():
        return image
    sl = []
    for a in range(3):
        hit = np.nonzero(mask.any(axis=tuple(b for b in range(3) if b != a)))[0]
        m = 1 if a == 0 else margin
        sl.append(slice(max(0, int(hit[0]) - m), min(image.shape[a], int(hit[-1]) + m + 1)))
    return np.ascontiguousarray(image[tuple(sl)])


def _atomic_npy(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp.npy", dir=path.parent)
    os.close(fd)
    try:
        np.save(tmp, array)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise HSSLError(f"cannot write the cache file '{path}' ({err.strerror}): free disk space or set "
                        "data.cache_dir elsewhere") from None


def _atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise HSSLError(f"cannot write '{path}' ({err.strerror}): free disk space or choose another folder") from None
