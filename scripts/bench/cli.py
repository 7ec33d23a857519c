"""The command line of ``scripts/benchmark.py``: options into ``Settings``, run, write, exit code."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from .report import rewrite_reports, write_outputs
from .runner import run
from .settings import BUNDLED, SAMPLES, SECTIONS, Settings, init_value, mode_settings
from .units import run_unit

DESCRIPTION = "Benchmarks of the few-slice loop on the real sample scans, side by side with a plain MONAI pipeline."


def parse(argv: list[str] | None) -> tuple[Settings, argparse.Namespace]:
    p = argparse.ArgumentParser(description=DESCRIPTION,
                                epilog="Modes: tiny (synthetic, seconds; the test), default (~20 CPU minutes), full. "
                                       "The few-slice comparison of every method on the development set: "
                                       "--suite fewslice (its own options: --suite fewslice --help).")
    p.add_argument("--mode", default="default", choices=["tiny", "default", "full"])
    p.add_argument("--out", default=None, help="folder for the results (default: benchmark-output)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every run (default 1)")
    p.add_argument("--device", default="cpu", help="cpu | cuda (AMP on CUDA) | auto (default cpu)")
    p.add_argument("--only", nargs="+", choices=SECTIONS, default=None, help="run only these sections")
    p.add_argument("--cases", nargs="+", default=None, help=f"sample cases ({', '.join(SAMPLES)})")
    p.add_argument("--budgets", nargs="+", default=None, help="slice counts (3) or shares (10%%)")
    p.add_argument("--inits", nargs="+", default=None,
                   help="scratch | bundled | LABEL=VALUE, VALUE a model folder, scratch or bundled, optionally with "
                        "' --lr X' (e.g. 'bundled-lr2e-3=bundled --lr 0.002')")
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (ours and the baseline)")
    p.add_argument("--ct-shape", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"),
                   help="the CT-sized volume (default 300 512 512: lung2 tiled along z)")
    p.add_argument("--isolation", choices=["spawn", "fork"], default=None,
                   help="a fresh interpreter per run (default) or a forked child (faster start, CPU only)")
    p.add_argument("--keep-work", action="store_true", help="keep the models, predictions and logs (printed path)")
    p.add_argument("--report", default=None, metavar="RESULTS_JSON",
                   help="measure nothing: rewrite the tables, plots and README section of an earlier results.json "
                        "(into --out, default its folder)")
    a = p.parse_args(argv)
    s = mode_settings(a.mode)
    for key in ("cases", "budgets", "inits", "seeds", "steps", "isolation"):
        if getattr(a, key) is not None:
            setattr(s, key, getattr(a, key))
    if a.budgets is not None:
        s.other_init_budgets = None  # the given budgets hold for every init
    s.threads, s.device = a.threads, a.device
    if a.ct_shape:
        s.ct_shape = tuple(a.ct_shape)
    if a.only:
        s.sections = tuple(a.only)
    if a.cases:
        s.predict_cases = [c for c in s.predict_cases if c in a.cases] or a.cases[:1]
        s.interactive_cases = [c for c in s.interactive_cases if c in a.cases] or a.cases[:1]
        s.whole_volume_cases = [c for c in s.whole_volume_cases if c in a.cases]
    if s.isolation == "fork" and s.device != "cpu":
        raise SystemExit("error: --isolation fork is for the CPU only (CUDA does not survive fork): use spawn")
    for init in s.inits:
        label, value = init_value(init)
        if value == "bundled" and not (BUNDLED / "model.json").exists():
            raise SystemExit(f"error: --inits bundled: no model in {BUNDLED}: leave it out or give LABEL=FOLDER")
        if value not in ("scratch", "bundled") and not value.startswith("bundled:") and not Path(value).is_dir():
            raise SystemExit(f"error: --inits {init}: '{value}' is not a model folder")
    return s, a


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, kind, spec_path, result_path = sys.argv
        spec = json.loads(Path(spec_path).read_text())
        log = Path(spec["work"]) / "logs" / (Path(result_path).name[:-5] + ".log")
        run_unit(kind, spec, result_path, str(log))
        return 0
    args = sys.argv[1:] if argv is None else argv
    if "--suite" in args or any(a.startswith("--suite=") for a in args):
        from .suite import main as suite_main

        return suite_main(args)
    s, a = parse(argv)
    if a.report:
        if json.loads(Path(a.report).read_text()).get("suite") == "fewslice":
            from .suite_report import rewrite

            return rewrite(Path(a.report), Path(a.out) if a.out else None)
        return rewrite_reports(Path(a.report), Path(a.out) if a.out else None)
    out = Path(a.out or "benchmark-output")
    out.mkdir(parents=True, exist_ok=True)
    if s.mode != "tiny":
        from hssl import data

        data.fetch(["pyradiomics"])
    work = Path(tempfile.mkdtemp(prefix="hssl-benchmark-"))
    command = "python scripts/benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"benchmark ({s.mode}): results in {out}, work files in {work}", flush=True)
    try:
        results = run(s, out, work)
        paths = write_outputs(results, out, command.strip())
    finally:
        if a.keep_work:
            print(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    for t in results["targets"]:
        print(f"target: {({True: 'met', False: 'MISSED', None: 'not measured'})[t['met']]}: {t['target']}: "
              f"{t['measured']}")
    print("wrote " + ", ".join(str(p) for p in paths))
    errors = [r for key in ("quality", "baseline", "prediction", "cross_volume", "interactive") for r in results[key]
              if "error" in r]
    p = results.get("pretrain_throughput")
    if p and "error" in p:
        errors.append(p)
    if errors:
        print(f"error: {len(errors)} run(s) failed: see {out / 'results.md'} (Errors) and the logs "
              "(--keep-work keeps them)", file=sys.stderr)
        return 1
    return 0
