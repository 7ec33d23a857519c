"""The few-slice comparison suite: every case x slice count x seed, every method side by side, in one
run (``python scripts/benchmark.py --suite fewslice``).

Each unit (one method on one case, slice count and seed; ``methods.fewslice_unit``) runs in a new
process with the given threads, so its times and peak memory are its own. Rows go to
``OUT/fewslice.json`` after every unit (written to a temporary name, then renamed): a killed run
continues where it stopped when started again with the same ``--out``, and more cases, seeds or
methods can be added to an existing run the same way. Units that failed are run again. The tables
(``fewslice.md``) and the plot (``fewslice.png``) are rewritten from the JSON each time
(``--report OUT/fewslice.json`` rewrites them without running anything).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from . import devcases, methods
from .runner import run_process

SLICES = (3, 5)
SEEDS = (0, 1, 2)
TINY_STEPS = 3
BUDGET_KEYS = ("time_budget", "steps", "threads", "device", "tiny")  # a run's results hold for these only


@dataclasses.dataclass
class SuiteSettings:
    cases: list
    slices: list
    seeds: list
    methods: list
    time_budget: float | None  # seconds of training for the learned methods
    steps: int | None  # or a number of steps (the tiny suite)
    threads: int = 2
    device: str = "cpu"
    tiny: bool = False
    mode: str = "fewslice"  # what the environment record calls the run
    isolation: str = "spawn"


def parse(argv: list[str]) -> tuple[SuiteSettings, argparse.Namespace]:
    from hssl.errors import HSSLError
    from hssl.recipe import DEFAULT_TIME_BUDGET_S

    p = argparse.ArgumentParser(prog="python scripts/benchmark.py --suite fewslice",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", choices=["fewslice"], required=True)
    p.add_argument("--out", default="fewslice-output", help="folder of the results (default fewslice-output)")
    p.add_argument("--tiny", action="store_true",
                   help=f"one small real crop ({devcases.TINY}), 3 slices, seed 0, {TINY_STEPS} steps: the test")
    p.add_argument("--cases", nargs="+", default=None, help="case names (default: every case of the set)")
    p.add_argument("--kinds", nargs="+", default=None, help="only the cases of these kinds")
    p.add_argument("--slices", nargs="+", type=int, default=None, help=f"painted slices (default {' '.join(map(str, SLICES))})")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help=f"default {' '.join(map(str, SEEDS))}")
    p.add_argument("--methods", nargs="+", default=None, choices=list(methods.METHODS),
                   help="default: all of them but the start that ours already has "
                        "(ours-scratch while the default start is scratch)")
    p.add_argument("--time-budget", type=float, default=None,
                   help=f"training seconds of every learned method (default {DEFAULT_TIME_BUDGET_S:.0f})")
    p.add_argument("--steps", type=int, default=None, help="training steps instead of seconds")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every unit (default 2)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto (default cpu)")
    a = p.parse_args(argv)
    if a.tiny:
        cases, slices, seeds = [devcases.TINY], [3], [0]
        time_budget, steps = a.time_budget, a.steps or TINY_STEPS
    else:
        try:
            cases = a.cases or [n for k in (a.kinds or [None]) for n in devcases.case_names(k)]
        except HSSLError as err:  # an unknown kind
            raise SystemExit(f"error: {err}") from None
        slices, seeds = a.slices or list(SLICES), a.seeds or list(SEEDS)
        time_budget = a.time_budget if a.time_budget or a.steps else DEFAULT_TIME_BUDGET_S
        steps = a.steps
    if not cases:
        raise SystemExit(f"error: no case of kind(s) {a.kinds}: the cases come from {devcases.source()}")
    known = set(devcases.case_names()) | {devcases.TINY}
    unknown = [c for c in cases if c not in known]
    if unknown:
        raise SystemExit(f"error: unknown case(s) {unknown}: choose from {sorted(known)}")
    if any(n < 1 for n in slices) or a.threads < 1:
        raise SystemExit("error: --slices and --threads must be at least 1")
    s = SuiteSettings(cases, slices, seeds, a.methods or methods.default_methods(), time_budget, steps, a.threads,
                      a.device, a.tiny)
    return s, a


def unit_key(row: dict) -> tuple:
    return row["case"], row["n_slices"], row["method"], row["seed"]


def planned(s: SuiteSettings) -> list[dict]:
    """The units of a run, methods side by side for each case, slice count and seed (so a partial run
    already compares them); a deterministic method once per case and slice count (seed None)."""
    units = []
    for case in s.cases:
        for n in s.slices:
            for seed in s.seeds:
                for name in s.methods:
                    if not methods.METHODS[name].seeded:
                        if seed != s.seeds[0]:
                            continue
                        seed_of_unit = None
                    else:
                        seed_of_unit = seed
                    units.append({"case": case, "n_slices": n, "method": name, "seed": seed_of_unit})
    return units


def load_results(path: Path, s: SuiteSettings) -> dict:
    """The results so far in ``path`` (a run to continue), or a new record. Refuses results made with
    another budget, thread count or device: they would not compare."""
    from .environment import environment

    settings = dataclasses.asdict(s)
    if path.exists():
        results = json.loads(path.read_text())
        old = results.get("settings", {})
        differ = [k for k in BUDGET_KEYS if old.get(k) != settings[k]]
        if results.get("suite") != "fewslice" or differ:
            raise SystemExit(f"error: {path} holds results made with other settings ({', '.join(differ) or 'suite'}: "
                             f"{ {k: old.get(k) for k in differ} }): continue with those or choose another --out")
        for key in ("cases", "slices", "seeds", "methods"):  # what this run adds to the earlier one
            settings[key] = old[key] + [v for v in settings[key] if v not in old[key]]
        results["settings"] = settings
        results["meta"]["continued"] = results["meta"].get("continued", []) + [environment(s)["date"]]
        return results
    return {"suite": "fewslice", "format": 1, "meta": environment(s), "settings": settings, "cases_from": devcases.source(),
            "units": [], "notes": []}


def _union_command(settings: dict) -> str:
    """One command that reproduces everything in the results so far (their cases, slices, seeds and
    methods together)."""
    budget = f"--time-budget {settings['time_budget']:g}" if settings.get("time_budget") else f"--steps {settings['steps']}"
    return (f"python scripts/benchmark.py --suite fewslice --cases {' '.join(settings['cases'])} --slices "
            f"{' '.join(map(str, settings['slices']))} --seeds {' '.join(map(str, settings['seeds']))} --methods "
            f"{' '.join(settings['methods'])} {budget} --threads {settings['threads']} --device {settings['device']}")


def save(results: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def main(argv: list[str]) -> int:
    from .suite_report import write_reports

    s, a = parse(argv)
    if not s.tiny:
        from hssl import data

        data.fetch(["pyradiomics"])
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "fewslice.json"
    results = load_results(path, s)
    results.setdefault("commands", []).append("python scripts/benchmark.py " + " ".join(argv))
    results["command"] = _union_command(results["settings"])
    skipped = {name: why for name in s.methods if (why := methods.missing(name))}
    for why in skipped.values():
        note = f"skipped {why}"
        print(f"note: {note}", flush=True)
        if note not in results["notes"]:
            results["notes"].append(note)
    done = {unit_key(r) for r in results["units"] if "error" not in r}
    todo = [u for u in planned(s) if u["method"] not in skipped and unit_key(u) not in done]
    print(f"fewslice suite: {len(todo)} unit(s) to run, {len(done)} done; results in {path}", flush=True)
    t0 = time.perf_counter()
    for n, unit in enumerate(todo, 1):
        seed = "" if unit["seed"] is None else f"-s{unit['seed']}"
        name = f"{unit['case']}-{unit['n_slices']}sl-{unit['method']}{seed}"
        spec = {**unit, "time_budget": s.time_budget, "steps": s.steps, "threads": s.threads, "device": s.device,
                "work": str(out), "prediction": str(out / "predictions" / f"{name}.nrrd"), "launched": time.time()}
        (out / "predictions").mkdir(exist_ok=True)
        print(f"[{n}/{len(todo)}]", end=" ", flush=True)
        # ITK (Grow from seeds, Fill between slices, SimpleITK) takes its thread count from here.
        row = run_process("fewslice", spec, name, out, s.threads,
                          env={"ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(s.threads)})
        if "error" in row:
            row.update(unit)
        results["units"] = [r for r in results["units"] if unit_key(r) != unit_key(row)] + [row]
        save(results, path)
    results["meta"]["last_run_s"] = round(time.perf_counter() - t0, 1)
    save(results, path)
    written = write_reports(results, out)
    print("wrote " + ", ".join(str(p) for p in [path, *written]))
    errors = [r for r in results["units"] if "error" in r]
    if errors:
        print(f"error: {len(errors)} unit(s) failed: see {out / 'fewslice.md'} (Errors) and {out / 'logs'}",
              file=sys.stderr)
        return 1
    return 0
