"""The pretraining loop: catalog -> balanced pair batches -> PretrainNet -> hierarchical loss
(``method: hssl``), or dense crop pairs -> voxel InfoNCE + restoration (``method: dense``,
``hssl+dense``: both; see hssl.pretrain.dense).

- Budgets: ``train.max_steps`` is the schedule (linear warm-up, cosine decay); ``stop_at_step``
  and ``time_budget`` end one run early with a checkpoint, and ``--resume`` continues it.
- Checkpoints ``<output>/checkpoints/step-NNNNNNN.pt`` every ``checkpoint_every`` steps and at the
  end, written to a temporary file, flushed to disk and renamed: a killed process or a full disk
  leaves the previous checkpoint intact. They hold model, optimiser, schedule, AMP scaler, RNG
  states, the step and the config; the data position is the step itself (see sampling).
- Resume refuses a checkpoint of another configuration (compared by ``config.fingerprint``).
- Distributed data parallel when started by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on CPU, NCCL
  on CUDA. Each process draws its own crops; the contrastive negatives are the process's own batch.
- Logs: ``log.csv`` (one row per step), TensorBoard events when ``tensorboard`` is installed,
  ``loss_curve.png`` when matplotlib is, ``summary.json``.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..device import resolve_device
from ..errors import HSSLError
from ..finetune import StopRequest
from ..io import atomic_write_text, is_disk_full
from ..plan import Plan
from ..training import backward_and_step
from .catalog import Catalog, build_catalog, load_manifest
from .config import PretrainConfig
from .heads import PretrainNet
from .losses import DenseLoss, HierarchicalLoss, accuracy
from .sampling import PairBatches, Prefetcher

CHECKPOINT_FORMAT = "hssl-pretrain-checkpoint/1"
CSV_FIELDS = ["step", "loss", "image", "task", "group", "restore", "voxel", "task_acc", "group_acc", "lr", "elapsed_s",
              "steps_per_s"]


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


@dataclasses.dataclass
class PretrainResult:
    output_dir: Path
    steps: int
    seconds: float
    checkpoint: Path | None
    model_dir: Path | None
    bundle_dir: Path | None
    final_loss: float | None
    stopped_by: str  # "max_steps" | "stop_at_step" | "time_budget" | "signal"


def _say(message: str, dist: Dist | None = None) -> None:
    if dist is None or dist.main:
        print(message, file=sys.stderr, flush=True)


def init_distributed() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not td.is_initialized():
        td.init_process_group(backend=backend)
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def make_plan(cfg: PretrainConfig, catalog: Catalog) -> Plan:
    m = cfg.model
    spacing = tuple(float(v) for v in np.median([im.spacing for im in catalog.images], axis=0))
    return Plan(spacing, tuple(cfg.data.crop_size), tuple(tuple(s) for s in m.strides),
                tuple(tuple(k) for k in m.kernels), tuple(m.channels))


def lr_factor(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to 5 % at ``max_steps``."""
    t = cfg.train
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------- checkpoints

def checkpoint_dir(cfg: PretrainConfig) -> Path:
    return Path(cfg.output_dir) / "checkpoints"


def list_checkpoints(folder: Path) -> list[Path]:
    return sorted(folder.glob("step-*.pt"))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {"python": _listify(random.getstate()),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _listify(v):
    return [_listify(x) for x in v] if isinstance(v, (tuple, list)) else v


def _tuplify(v):
    return tuple(_tuplify(x) for x in v) if isinstance(v, list) else v


def save_checkpoint(path: Path, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically; on failure the temporary file is removed, the previous
    checkpoints stay as they were and a write failure (a full disk included: torch.save then raises
    a RuntimeError without an errno) is one line saying which checkpoint is intact."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:  # make the rename itself durable
            fd = os.open(path.parent, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(err, Exception) or not (isinstance(err, OSError) or is_disk_full(err, path.parent)):
            raise
        previous = [p.name for p in list_checkpoints(path.parent) if p != path] if path.parent.is_dir() else []
        keep = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        if is_disk_full(err, path.parent):
            raise HSSLError(f"no space left on the device while writing checkpoint '{path}' ({keep}): free disk "
                            "space and resume with --resume") from None
        raise HSSLError(f"cannot write checkpoint '{path}' ({err.strerror or err}; {keep}): choose a writable "
                        "output folder") from None
    return path


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - truncated or foreign files raise many kinds
        raise HSSLError(f"checkpoint '{path}' cannot be read ({type(err).__name__}: {str(err)[:100]}): it is "
                        "incomplete or not a pretraining checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise HSSLError(f"'{path}' is not an HSSLSegment pretraining checkpoint")
    return state


def find_resume(resume: str, cfg: PretrainConfig) -> Path | None:
    """``auto``: the newest loadable checkpoint of the output folder (None if there is none);
    a folder: its newest; a file: itself."""
    if resume == "auto":
        folder = checkpoint_dir(cfg)
    else:
        p = Path(resume)
        if p.is_file():
            return p
        if not p.is_dir():
            raise HSSLError(f"--resume '{resume}' is neither a checkpoint file nor a folder")
        folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    candidates = list_checkpoints(folder)
    for path in reversed(candidates):
        try:
            load_checkpoint(path)
            return path
        except HSSLError as err:
            _say(f"warning: {err}; trying the one before")
    if resume != "auto":
        raise HSSLError(f"no usable checkpoint in '{folder}'")
    return None


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k}")
    return keys


# ---------------------------------------------------------------------------------------- loop

def pretrain(cfg: PretrainConfig, resume: str | None = None, overwrite: bool = False,
             export: bool = True) -> PretrainResult:
    """Run (or continue) one pretraining; returns where everything went."""
    dist = init_distributed()
    from .export import git_commit

    commit = git_commit()  # the code that trains, not the tree as it is when the run ends
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise HSSLError(f"cannot create the output folder '{out}' ({err.strerror}): choose a writable folder") from None
    ckpt_dir = checkpoint_dir(cfg)

    state = None
    if resume:
        path = find_resume(resume, cfg)
        if path is not None:
            state = load_checkpoint(path)
            if state["fingerprint"] != cfg.fingerprint():
                differ = [k for k in _config_diff(state["config"], cfg.to_json())
                          if k.split(".")[0] not in ("export",) and k != "output_dir"]
                raise HSSLError(f"checkpoint '{path}' was written by another configuration (differs in: "
                                f"{', '.join(differ[:6]) or 'the config format'}): resume with the same config, "
                                "or start a new output_dir")
            _say(f"resuming from {path} at step {state['step']}", dist)
        else:
            _say(f"no checkpoint in {ckpt_dir} yet: starting a new pretraining", dist)
    elif list_checkpoints(ckpt_dir) and not overwrite:
        raise HSSLError(f"'{out}' already holds a pretraining (checkpoints in {ckpt_dir}): pass --resume to continue "
                        "it, --overwrite to start over, or choose another output_dir")
    elif overwrite and dist.main:
        for p in list_checkpoints(ckpt_dir):
            p.unlink()
        (out / "log.csv").unlink(missing_ok=True)

    # The catalog: built once (by rank 0), read by the others.
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "cache"
    if dist.main:
        catalog = build_catalog(cfg.data, cache_dir, cfg.data.crop_size)
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
    if not dist.main:
        catalog = load_manifest(cache_dir)
    _say(f"catalog: {catalog.summary()} (cache {cache_dir})", dist)
    if state is not None and (state["tasks"] != catalog.tasks or state["groups"] != catalog.groups):
        raise HSSLError(f"the checkpoint was trained on tasks {state['tasks']} / groups {state['groups']} but the "
                        f"catalog now has {catalog.tasks} / {catalog.groups}: resume with the same data")

    device = resolve_device(cfg.train.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    plan = make_plan(cfg, catalog)
    dense = "dense" in cfg.method
    model = PretrainNet(plan, len(catalog.tasks), len(catalog.groups), cfg.model.heads_on, cfg.model.projection_dim,
                        dense=cfg.dense if dense else None, hssl="hssl" in cfg.method,
                        seed=cfg.train.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    use_amp = cfg.train.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    step, elapsed_before = 0, 0.0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
        step, elapsed_before = int(state["step"]), float(state.get("elapsed_s", 0.0))
    ddp_model = model
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if dense:
        from .dense import DensePairBatches

        loss_fn = DenseLoss(cfg.dense, cfg.loss if "hssl" in cfg.method else None)
        batches = DensePairBatches(catalog, cfg.data, cfg.dense, cfg.train.seed, dist.rank,
                                   warn=lambda m: _say(m, dist))
    else:
        loss_fn = HierarchicalLoss(cfg.loss)
        batches = PairBatches(catalog, cfg.data.crop_size, cfg.train.batch_size, cfg.augment, cfg.data.balance,
                              cfg.train.seed, dist.rank)
    prefetch = Prefetcher(batches, cfg.data.prefetch)

    end = cfg.train.max_steps if not cfg.train.stop_at_step else min(cfg.train.max_steps, cfg.train.stop_at_step)
    logger = _Logger(out, step, dist, cfg.method) if dist.main else None
    if dist.main:
        atomic_write_text(out / "config.json", json.dumps(cfg.to_json(), indent=2) + "\n", "pretraining config")
        size = (f"{cfg.dense.pairs_per_step} crop pairs" if dense else f"{cfg.train.batch_size} pairs") + " per process"
        _say(f"pretraining ({cfg.method}) on {device.type} x{dist.world}: {sum(p.numel() for p in model.net.parameters()) / 1e6:.2f} M "
             f"network parameters, crops {tuple(cfg.data.crop_size)} x {size}, "
             f"steps {step} -> {end} of {cfg.train.max_steps}"
             + (f", time budget {cfg.train.time_budget:.0f} s" if cfg.train.time_budget else ""), dist)
    bar = _bar(step, end, dist)
    t0 = time.monotonic()
    stopped_by = "max_steps" if end == cfg.train.max_steps else "stop_at_step"
    last_ckpt, last_loss, first_local_loss = None, None, None
    ddp_model.train()
    try:
        with StopRequest(None) as stop:
            while step < end:
                if cfg.train.time_budget and time.monotonic() - t0 >= cfg.train.time_budget:
                    stopped_by = "time_budget"
                    break
                if _any(stop.requested(), dist):
                    stopped_by = "signal"
                    _say("stop requested: writing a checkpoint", dist)
                    break
                batch = prefetch.get(step)
                views = torch.from_numpy(batch["views"]).to(device, non_blocking=True)
                tb = {"task": torch.from_numpy(batch["task"]).to(device),
                      "group": torch.from_numpy(batch["group"]).to(device),
                      "clean": torch.from_numpy(batch["clean"]).to(device)}
                with torch.autocast(device_type=device.type, enabled=use_amp):
                    if dense:
                        voxels = torch.from_numpy(np.concatenate([batch["voxels1"], batch["voxels2"]])).to(device)
                        outputs = ddp_model(views, voxels)
                    else:
                        outputs = ddp_model(views)
                loss, terms = loss_fn(outputs, tb)
                if not torch.isfinite(loss):
                    files = sorted({catalog.images[int(i)].source_path for i in batch["image"]})
                    bad = [k for k, v in terms.items() if not torch.isfinite(v)]
                    good = list_checkpoints(ckpt_dir)
                    raise HSSLError(f"the pretraining loss became {loss.item()} at step {step + 1} (terms: "
                                    f"{', '.join(bad) or 'the weighted sum'}; batch from {', '.join(files)}); the last "
                                    f"good checkpoint is {good[-1] if good else 'none'}: lower train.lr, check those "
                                    "images, then --resume")
                backward_and_step(loss, model.parameters(), optimizer, scaler, cfg.train.grad_clip)
                scheduler.step()
                step += 1
                if first_local_loss is None:
                    first_local_loss = float(loss.item())
                if step % cfg.train.log_every == 0 or step == end:
                    row = {"step": step, "loss": float(loss.item()), **{k: float(v.item()) for k, v in terms.items()},
                           "lr": optimizer.param_groups[0]["lr"]}
                    if model.levels:
                        level = model.levels[0]
                        row["task_acc"] = accuracy(outputs["task"][level], tb["task"].repeat(2))
                        row["group_acc"] = accuracy(outputs["group"][level], tb["group"].repeat(2))
                    row = _mean_over_ranks(row, dist)
                    elapsed = time.monotonic() - t0
                    row["elapsed_s"] = round(elapsed_before + elapsed, 2)
                    row["steps_per_s"] = round((step - (logger.start if logger else 0)) / max(elapsed, 1e-9), 4)
                    last_loss = row["loss"]
                    if logger:
                        logger.write(row)
                    if bar is not None:
                        bar.n = step
                        bar.set_postfix({"loss": f"{row['loss']:.3f}", **({"task_acc": f"{row['task_acc']:.2f}"}
                                                                           if "task_acc" in row else {})},
                                        refresh=False)
                        bar.refresh()
                if step % cfg.train.checkpoint_every == 0 and step < end:
                    last_ckpt = _checkpoint(cfg, model, optimizer, scheduler, scaler, step, catalog,
                                            elapsed_before + time.monotonic() - t0, dist)
    finally:
        prefetch.close()
        if bar is not None:
            bar.close()
    seconds = time.monotonic() - t0
    if step > 0:
        last_ckpt = _checkpoint(cfg, model, optimizer, scheduler, scaler, step, catalog, elapsed_before + seconds,
                                dist, force=True)
    _replica_record(out, model, dist, step, first_local_loss)
    model_dir = bundle_dir = None
    if dist.main:
        logger.close()
        png = logger.plot()
        done = step >= cfg.train.max_steps
        summary = {"steps": step, "max_steps": cfg.train.max_steps, "seconds_this_run": round(seconds, 1),
                   "seconds_total": round(elapsed_before + seconds, 1), "stopped_by": stopped_by, "complete": done,
                   "device": device.type, "processes": dist.world, "threads": torch.get_num_threads(),
                   "final_loss": last_loss, "method": cfg.method, "tasks": catalog.tasks, "groups": catalog.groups,
                   "images": [{"task": im.task, "group": im.group, "source": im.source_path, "shape": list(im.shape),
                               "spacing": list(im.spacing)} for im in catalog.images],
                   "skipped": catalog.skipped, "checkpoint": str(last_ckpt) if last_ckpt else None,
                   "loss_curve": str(png) if png else None, "fingerprint": cfg.fingerprint(), "commit": commit}
        if export and step > 0:
            from .export import export_all

            model_dir, bundle_dir = export_all(cfg, model.net.to("cpu"), summary)
            summary["model_dir"] = str(model_dir) if model_dir else None
            summary["bundle_dir"] = str(bundle_dir) if bundle_dir else None
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n", "pretraining summary")
    if dist.world > 1:
        import torch.distributed as td

        td.barrier()
        td.destroy_process_group()
    return PretrainResult(out, step, seconds, last_ckpt, model_dir, bundle_dir, last_loss, stopped_by)


def _checkpoint(cfg, model, optimizer, scheduler, scaler, step, catalog, elapsed, dist, force=False):
    if not dist.main:
        return None
    folder = checkpoint_dir(cfg)
    path = folder / f"step-{step:07d}.pt"
    if path.exists() and not force:
        return path
    state = {"format": CHECKPOINT_FORMAT, "step": step, "elapsed_s": elapsed, "model": model.state_dict(),
             "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
             "rng": _rng_state(), "config": cfg.to_json(), "fingerprint": cfg.fingerprint(),
             "tasks": catalog.tasks, "groups": catalog.groups}
    save_checkpoint(path, state)
    for old in list_checkpoints(folder)[:-cfg.train.keep_checkpoints]:
        old.unlink(missing_ok=True)
    return path


def _any(flag: bool, dist: Dist) -> bool:
    if dist.world == 1:
        return flag
    import torch.distributed as td

    t = torch.tensor([1.0 if flag else 0.0])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def _mean_over_ranks(row: dict, dist: Dist) -> dict:
    if dist.world == 1:
        return row
    import torch.distributed as td

    keys = [k for k in row if k not in ("step", "lr")]
    t = torch.tensor([row[k] for k in keys], dtype=torch.float64)
    td.all_reduce(t)
    return {**row, **{k: float(v) / dist.world for k, v in zip(keys, t)}}


def parameter_digest(module: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer, bit for bit (equal digests = identical replicas)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()


def _replica_record(out: Path, model, dist: Dist, step: int, first_loss: float | None) -> None:
    """In a distributed run every process writes ``replicas/rank-R.json`` (its parameter digest and its
    own first loss), and rank 0 checks that all digests agree."""
    if dist.world == 1:
        return
    import torch.distributed as td

    digest = parameter_digest(model)
    folder = out / "replicas"
    folder.mkdir(exist_ok=True)
    (folder / f"rank-{dist.rank}.json").write_text(json.dumps(
        {"rank": dist.rank, "world": dist.world, "step": step, "digest": digest, "first_local_loss": first_loss}))
    digests = [None] * dist.world
    td.all_gather_object(digests, digest)
    if dist.main and len(set(digests)) != 1:
        raise HSSLError(f"the {dist.world} replicas diverged (parameter digests differ): report this")


class _Logger:
    """log.csv (rows after the resume step, left by a killed run, are dropped), TensorBoard, PNG."""

    def __init__(self, out: Path, start: int, dist: Dist, method: str = "hssl"):
        self.out, self.start, self.method = out, start, method
        self.path = out / "log.csv"
        rows = []
        if start > 0 and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= start]
        self.file = open(self.path, "w", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=CSV_FIELDS)
        self.writer.writeheader()
        for r in rows:
            self.writer.writerow({k: r.get(k, "") for k in CSV_FIELDS})
        self.file.flush()
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1 if start else None)
        except ImportError:
            _say("note: tensorboard is not installed: TensorBoard logs are skipped (pip install tensorboard); "
                 "log.csv has the same numbers")

    def write(self, row: dict) -> None:
        self.writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()
                              if k in CSV_FIELDS})
        self.file.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"pretrain/{k}", v, row["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()

    def plot(self) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            _say("note: matplotlib is not installed: no loss_curve.png (log.csv has the numbers)")
            return None
        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return None
        steps = np.array([int(r["step"]) for r in rows])
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in ("loss", "image", "task", "group", "restore", "voxel"):
            if not rows[0].get(key):
                continue  # a term this method does not have
            values = np.array([float(r[key]) for r in rows])
            k = max(1, len(values) // 50)
            smooth = np.convolve(values, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, label=key)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (moving average)")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title({"hssl": "HSSL pretraining (reconstruction)", "dense": "dense voxel-level pretraining",
                      "hssl+dense": "HSSL + dense pretraining"}.get(self.method, "pretraining"))
        fig.tight_layout()
        path = self.out / "loss_curve.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def _bar(step: int, end: int, dist: Dist):
    if not dist.main:
        return None
    from tqdm import tqdm

    return tqdm(total=end, initial=step, desc="pretrain", file=sys.stderr, dynamic_ncols=True)
