"""Running a benchmark: which units a run needs, each in a new process (spawned, or forked in the
tiny mode), the timed ``hssl finetune --predict`` command, and the results they add up to."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .analysis import compare, summarise, targets
from .cases import budget_slices, load_case
from .environment import environment, git_state
from .measure import cpu_seconds, time_to_fraction
from .settings import ENGINE, REPEAT_BELOW_CPU_S, SAMPLES, SCRIPT, Settings, init_lr, init_value
from .units import run_unit


class Runner:
    """Runs units one at a time, each in its own process, and keeps their rows."""

    def __init__(self, s: Settings, work: Path):
        self.s, self.work = s, work
        (work / "logs").mkdir(parents=True, exist_ok=True)
        (work / "units").mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, kind: str, spec: dict) -> dict:
        row = self.once(kind, spec)
        if (kind != "predict" or "error" in row or self.s.predict_repeats < 2
                or row["predict_cpu_s"] > REPEAT_BELOW_CPU_S):
            return row
        # A short prediction is repeated in new processes; the minimum of each measure is reported
        # (timing and RSS noise only ever add), every value is kept.
        rows = [row] + [self.once(kind, {**spec, "tag": f"{spec.get('tag', '')}-repeat{n}"})
                        for n in range(1, self.s.predict_repeats)]
        rows = [r for r in rows if "error" not in r]
        best = dict(rows[0])
        for key in ("predict_s", "predict_cpu_s", "peak_rss_mb", "peak_increase_mb"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                best[key] = min(values)
                best[f"{key}_all"] = values
        best["repeats"] = len(rows)
        return best

    def once(self, kind: str, spec: dict) -> dict:
        self.count += 1
        name = f"{self.count:03d}-{kind}-{spec.get('tag', '')}".replace("/", "_").replace("%", "pc")
        spec = {**spec, "threads": self.s.threads, "device": self.s.device, "work": str(self.work),
                "ct_source": self.s.ct_source, "ct_shape": list(self.s.ct_shape), "launched": time.time()}
        return run_process(kind, spec, name, self.work, self.s.threads, self.s.isolation)


def run_process(kind: str, spec: dict, name: str, work: Path, threads: int, isolation: str = "spawn",
                env: dict | None = None) -> dict:
    """Run one unit (``units.run_unit``) in a new process: a fresh interpreter of ``SCRIPT --worker``
    (``spawn``) or a forked child (``fork``, CPU only). Its row comes back through a JSON file in
    ``work/units``, its output goes to ``work/logs/NAME.log``; a unit that leaves no row becomes an
    error row with the end of its log. ``env``: extra environment variables of a spawned unit."""
    result = work / "units" / f"{name}.json"
    log = work / "logs" / f"{name}.log"
    for folder in (result.parent, log.parent):
        folder.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    t = time.perf_counter()
    if isolation == "fork":
        import multiprocessing

        proc = multiprocessing.get_context("fork").Process(target=run_unit, args=(kind, spec, str(result), str(log)))
        proc.start()
        proc.join()
        code = proc.exitcode
    else:
        spec_path = work / "units" / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        code = subprocess.call([sys.executable, str(SCRIPT), "--worker", kind, str(spec_path), str(result)],
                               env={**child_env(threads), **(env or {})})
    wall = time.perf_counter() - t
    if result.exists():
        row = json.loads(result.read_text())
    else:
        tail = log.read_text()[-1500:] if log.exists() else ""
        row = {"error": f"the {kind} worker exited with code {code} without a result", "traceback": tail}
    row["wall_s"] = round(wall, 1)
    row["unit"] = name
    status = f"ERROR {row['error']}" if "error" in row else "ok"
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {status} ({wall:.0f} s)", flush=True)
    return row


def child_env(threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ENGINE) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    return env


def run_cli(case: str, slices: list[int], budget: dict, s: Settings, work: Path) -> dict:
    """``hssl finetune ... --predict`` as a user's button press: wall time from launch to the
    written prediction, with the timeline from ``--progress-json`` and the process's peak RSS."""
    from hssl import data
    from hssl.fewslice import make_sparse
    from hssl.io import LabelInfo, write_labelmap, write_segmentation

    folder = work / f"cli-{case}"
    folder.mkdir(parents=True, exist_ok=True)
    volume, ref, axis, structure = load_case(case, s.ct_source, s.ct_shape)
    if case in SAMPLES:
        image = str(data.sample_path(f"{case}_image.nrrd"))
    else:
        image = str(folder / "image.nrrd")
        write_labelmap(image, volume.array, volume.geometry)
    labels = folder / "annotation.seg.nrrd"
    write_segmentation(labels, make_sparse(ref, slices, axis), volume.geometry,
                       [LabelInfo(structure, 1, (0.90, 0.35, 0.25))], overwrite=True)
    budget_args = (["--time-budget", str(budget["time_budget"])] if "time_budget" in budget
                   else ["--steps", str(budget["steps"])])
    cmd = [sys.executable, "-m", "hssl", "finetune", "--image", image, "--labels", str(labels), "--out",
           str(folder / "model"), "--device", s.device, "--threads", str(s.threads), "--seed", "0",
           "--predict", str(folder / "prediction.seg.nrrd"), "--progress-json", "--overwrite", *budget_args]
    events: dict[str, float] = {}
    predicted = {}
    with open(work / "logs" / f"cli-{case}.log", "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=child_env(s.threads))
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            events.setdefault(record.get("event"), time.perf_counter() - t0)
            if record.get("event") == "prediction":
                predicted = record
        proc.stdout.close()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            peak = usage.ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)
            cpu = usage.ru_utime + usage.ru_stime
        except (AttributeError, ChildProcessError):
            proc.wait()
            peak = cpu = None
        wall = time.perf_counter() - t0
    row = {"case": case, "slices": slices, "budget": budget, "device": s.device, "threads": s.threads,
           "command": "hssl finetune --predict (a new process, as the Slicer job runs it)",
           "returncode": proc.returncode, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2) if cpu else None,
           "peak_rss_mb": round(peak) if peak else None}
    if proc.returncode != 0 or "prediction" not in events:
        row["error"] = f"hssl finetune exited with {proc.returncode}; see logs/cli-{case}.log"
        return row
    meta = json.loads((folder / "model" / "model.json").read_text())["training"]
    row.update({"press_to_prediction_s": round(events["prediction"], 2),
                "startup_and_load_s": round(events.get("start", float("nan")), 2),
                "finetune_s": meta["seconds"], "steps": meta["steps"],
                "steps_per_s": round(meta["steps"] / max(meta["seconds"], 1e-9), 3),
                "predict_s": predicted.get("seconds"), "heldout_dice": meta.get("heldout_dice"),
                "t95_s": time_to_fraction(meta.get("log", []), meta.get("heldout_dice"))})
    return row


def run(s: Settings, out: Path, work: Path) -> dict:
    from hssl.device import set_threads

    set_threads(s.threads)
    meta = environment(s)
    results = {"meta": meta, "settings": dataclasses.asdict(s), "quality": [], "baseline": [], "prediction": [],
               "cross_volume": [], "interactive": [], "pretrain_throughput": None, "notes": []}
    runner = Runner(s, work)
    t_all = time.perf_counter()

    def save_partial():
        (out / "results.partial.json").write_text(json.dumps(results, indent=1, default=str))

    # The annotated slices of every (case, budget); budgets that give the same slices share a run.
    refs = {}
    needed = set(s.cases) | {c for pair in s.cross for c in pair[:1]} | set(s.predict_cases) | set(s.interactive_cases)
    if any(sec in s.sections for sec in ("predict", "interactive")):
        needed.add(s.ct_source)
    for case in sorted(needed):
        _, ref, axis, _ = load_case(case, with_ref=True)
        refs[case] = (ref, axis)

    def slice_plan(case: str, budgets: list) -> dict:
        ref, axis = refs[case]
        groups: dict[tuple, list] = {}
        for b in budgets:
            groups.setdefault(tuple(budget_slices(ref, b, axis)), []).append(b)
        return groups

    models = work / "models"
    quality_jobs = []  # (case, slices, budgets, init, seed, save path)
    for n, init in enumerate(s.inits):
        budgets_of_init = s.budgets if n == 0 or s.other_init_budgets is None else s.other_init_budgets
        for case in s.cases:
            for slices, budgets in slice_plan(case, budgets_of_init).items():
                for seed in s.seeds:
                    quality_jobs.append((case, slices, budgets, init, seed))
    quality_jobs.sort(key=lambda j: (s.cases.index(j[0]) if j[0] in s.cases else 99, len(j[1]), s.inits.index(j[3])))
    # The 3-slice models that prediction, the CT-sized volume and the cross-volume setting reuse.
    three = {c: tuple(budget_slices(refs[c][0], "3", refs[c][1])) for c in refs}
    reused = set()
    if "predict" in s.sections:
        reused |= set(s.predict_cases) | {s.ct_source}
    if "cross" in s.sections:
        reused |= {pair[0] for pair in s.cross}
    cross_inits = s.inits if s.cross_all_inits else s.inits[:1]
    for case in sorted(reused):
        for init in cross_inits if case in {p[0] for p in s.cross} else s.inits[:1]:
            for seed in (s.seeds if case in {p[0] for p in s.cross} else s.seeds[:1]):
                if not any(j[0] == case and j[1] == three[case] and j[3] == init and j[4] == seed
                           for j in quality_jobs):
                    quality_jobs.append((case, three[case], ["3"], init, seed))

    def model_dir(case, init, seed, kind="ours"):
        return models / f"{kind}-{case}-{init_value(init)[0]}-s{seed}"

    if {"quality", "predict", "cross"} & set(s.sections):
        for case, slices, budgets, init, seed in quality_jobs:
            label, value = init_value(init)
            save = model_dir(case, init, seed) if slices == three.get(case) else None
            row = runner("quality", {"tag": f"{case}-{'+'.join(budgets)}-{label}-s{seed}", "case": case,
                                     "slices": list(slices), "budgets": budgets, "init": label, "init_value": value,
                                     "lr": init_lr(init),
                                     "seed": seed, "steps": s.steps, "save": str(save) if save else None})
            results["quality"].append(row)
            save_partial()

    init0, seed0 = s.inits[0], s.seeds[0]
    if "baseline" in s.sections:
        for case in s.cases:
            for slices, budgets in slice_plan(case, s.baseline_budgets).items():
                for seed in s.seeds:
                    save = model_dir(case, "monai", seed, "baseline") if slices == three[case] else \
                        models / f"baseline-{case}-{len(slices)}-s{seed}"
                    row = runner("baseline", {"tag": f"{case}-{'+'.join(budgets)}-s{seed}", "case": case,
                                              "slices": list(slices), "budgets": budgets, "seed": seed,
                                              "steps": s.steps, "save": str(save)})
                    results["baseline"].append(row)
                    if "error" not in row:
                        p = runner("predict", {"tag": f"{case}-monai-pipeline-s{seed}-{len(slices)}", "case": case,
                                               "method": "monai-swi", "model": str(save), "pipeline": "monai-unet",
                                               "model_label": f"MONAI pipeline ({len(slices)} slices)",
                                               "slices": list(slices)})
                        if slices == three[case] and seed == seed0 and case in s.predict_cases:
                            results["prediction"].append(p)  # also the baseline's row of the prediction table
                        row.update({"predict_s": p.get("predict_s"), "peak_rss_predict_mb": p.get("peak_rss_mb"),
                                    **{k: p.get(k) for k in ("dice", "hd95_mm", "scored_on", "dice_volume")}})
                        if "error" in p:
                            row["error"] = p["error"]
                    save_partial()

    if "predict" in s.sections:
        for case in s.predict_cases:
            ours = model_dir(case, init0, seed0)
            if not (ours / "model.json").exists():
                results["notes"].append(f"no 3-slice model for {case}: prediction rows skipped")
                continue
            common = {"case": case, "model": str(ours), "model_label": f"ours ({init_value(init0)[0]}, 3 slices)",
                      "slices": list(three[case])}
            methods = ["ours-roi"] + (["ours-full", "monai-swi"] if case in s.whole_volume_cases else [])
            for method in methods:
                results["prediction"].append(runner("predict", {**common, "tag": f"{case}-{method}", "method": method}))
                save_partial()
        # The CT-sized volume: our product path, our whole-volume path and MONAI's, same weights.
        ours = model_dir(s.ct_source, init0, seed0)
        if (ours / "model.json").exists():
            common = {"case": "ct512", "model": str(ours), "slices": list(three[s.ct_source]),
                      "model_label": f"ours ({init_value(init0)[0]}, 3 slices of {s.ct_source})"}
            for method in s.ct_methods:
                spec = {**common, "tag": f"ct512-{method}", "method": method}
                if method != "ours-roi":
                    spec["slices"] = None  # whole volume, no annotation
                results["prediction"].append(runner("predict", spec))
                save_partial()

    if "cross" in s.sections:
        for source, target in s.cross:
            for init in cross_inits:
                for seed in s.seeds:
                    model = model_dir(source, init, seed)
                    if not (model / "model.json").exists():
                        continue
                    row = runner("predict", {"tag": f"cross-{source}-{target}-{init_value(init)[0]}-s{seed}",
                                             "case": target, "method": "ours-full", "model": str(model),
                                             "model_label": f"{source}, 3 slices",
                                             "slices": None})
                    row.update({"source": source, "target": target, "init": init_value(init)[0], "seed": seed,
                                "source_slices": list(three[source])})
                    results["cross_volume"].append(row)
                    save_partial()

    if "interactive" in s.sections:
        ct = refs[s.ct_source]
        row = runner("quality", {"tag": "ct512-interactive", "case": "ct512", "slices": list(three[s.ct_source]),
                                 "budgets": ["3"], "init": "scratch", "init_value": "scratch", "seed": seed0,
                                 "steps": s.ct_steps, "score": False})
        row["note"] = (f"{s.ct_source} tiled to {tuple(s.ct_shape)} ([z, y, x]); 3 slices of the first copy "
                       f"annotated ({ct[0].shape[0]} slices per copy); not scored")
        results["interactive"].append({"kind": "engine", **row})
        for case in s.interactive_cases:
            ref, axis = refs[case]
            row = run_cli(case, list(three[case]), s.interactive_budget, s, work)
            print(f"[{time.strftime('%H:%M:%S')}] cli-{case}: {'ERROR ' + row['error'] if 'error' in row else 'ok'} "
                  f"({row['wall_s']:.0f} s)", flush=True)
            results["interactive"].append({"kind": "cli", **row})
            save_partial()

    if "pretrain" in s.sections:
        results["pretrain_throughput"] = runner("pretrain", {"tag": "throughput", **s.pretrain})
        save_partial()

    meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    meta["benchmark_wall_s"] = round(time.perf_counter() - t_all, 1)
    meta["benchmark_cpu_s"] = round(cpu_seconds(), 1)
    # Every unit starts a new interpreter: a commit or an edit landing during the run reaches the
    # units after it. Say so when the tree moved.
    end = git_state()
    if (end["commit"], end["modified"]) != (meta["git"]["commit"], meta["git"]["modified"]):
        meta["git_end"] = end
        results["notes"].append(f"the source tree changed during the run: commit {meta['git']['commit'][:10]} "
                                f"at the start, {end['commit'][:10]} at the end (modified at the end: "
                                f"{', '.join(end['modified']) or 'none'}); later units ran the newer code")
    results["summary"] = summarise(results)
    results["comparison"] = compare(results)
    results["targets"] = targets(results, s)
    return results
