"""Command line of the pretraining: ``scripts/pretrain.py``, ``python -m hssl.pretrain``, torchrun.

Errors the user can fix end in one line ``error: ...`` on stderr and exit code 2 (3 for out of
memory), never a traceback. On success the last lines on stdout say where the outputs are.
"""
from __future__ import annotations

import argparse
import sys

from ..errors import HSSLError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pretrain", description="HSSL-style multi-domain self-supervised pretraining "
                                "of the HSSLSegment network (a reconstruction; see docs/pretraining.md)")
    p.add_argument("--config", default=None, help="YAML or JSON config (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=200 --set loss.temperature=0.1")
    p.add_argument("--output", default=None, help="output folder (overrides output_dir)")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="auto|PATH",
                   help="continue from the newest checkpoint of the output folder (or of PATH)")
    p.add_argument("--steps", type=int, default=None, help="schedule length (train.max_steps)")
    p.add_argument("--stop-at-step", type=int, default=None, help="stop this run after this step (train.stop_at_step)")
    p.add_argument("--time-budget", type=float, default=None, metavar="S", help="seconds for this run")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--overwrite", action="store_true", help="start over in an output folder that has checkpoints")
    p.add_argument("--no-export", action="store_true", help="do not write the model folder and bundle")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    return p


def script_args(argv: list[str]) -> list[str]:
    """The script's own arguments: those after ``--`` when present (Slicer passes its own before it)."""
    return argv[argv.index("--") + 1:] if "--" in argv else argv


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(script_args(sys.argv[1:] if argv is None else argv))
    try:
        return _run(args)
    except HSSLError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except MemoryError:
        print("error: host memory ran out: lower train.batch_size or data.crop_size", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only a full disk (log.csv, a plot) becomes a line; the rest is a bug
        from ..io import disk_full_message

        message = disk_full_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import json

    from .config import load_config

    overrides = list(args.overrides)
    for flag, key in (("output", "output_dir"), ("steps", "train.max_steps"), ("stop_at_step", "train.stop_at_step"),
                      ("time_budget", "train.time_budget"), ("device", "train.device"), ("threads", "train.threads")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(cfg.to_json(), indent=2))
        return 0
    from ..device import is_oom
    from .trainer import pretrain

    try:
        result = pretrain(cfg, resume=args.resume, overwrite=args.overwrite, export=not args.no_export)
    except RuntimeError as err:
        if is_oom(err):
            print("error: out of memory: lower train.batch_size or data.crop_size", file=sys.stderr)
            return 3
        raise
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(f"pretraining: {result.steps} steps ({result.stopped_by}), {result.seconds:.0f} s this run")
        print(f"outputs: {result.output_dir.resolve()}")
        print(f"  log: {result.output_dir.resolve() / 'log.csv'}")
        if result.checkpoint:
            print(f"  checkpoint: {result.checkpoint.resolve()}")
        if result.model_dir:
            print(f"  hssl model: {result.model_dir.resolve()} (hssl finetune --init {result.model_dir.resolve()})")
        if result.bundle_dir:
            print(f"  MONAI bundle: {result.bundle_dir.resolve()}")
    return 0
