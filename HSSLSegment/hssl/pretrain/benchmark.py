"""Few-slice benchmark of initialisations, through the ``hssl`` command line, one run at a time.

For each case (a real sample scan with a reference label) ``n`` axial slices of the reference are
the annotation (``hssl.fewslice``, as the demo does); then, per seed and per
initialisation, ``hssl finetune --steps N --predict`` and ``hssl evaluate --exclude-annotated``
(Dice on the slices that were not annotated). Rows go to ``results.jsonl`` as they finish, so an
interrupted benchmark resumes where it stopped.

    python -m hssl.pretrain.benchmark --out /tmp/bench --cases brain1 brain2 lung1 lung2 --slices 3 \\
        --seeds 0 1 --init scratch bundled --steps 120

Set ``OMP_NUM_THREADS`` to control the threads each run uses.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def prepare(case: str, n_slices: int, folder: Path) -> dict:
    from .. import data
    from ..fewslice import sample_case
    from ..io import write_labelmap, write_segmentation

    few = sample_case(case, n_slices)
    sparse_path = folder / f"{case}_{n_slices}slices.seg.nrrd"
    ref_path = folder / f"{case}_reference.nrrd"  # the label as 0/1 (some sample labels use other values)
    if not ref_path.exists():
        write_labelmap(ref_path, few.reference.array, few.volume.geometry)
    if not sparse_path.exists():
        write_segmentation(sparse_path, few.sparse, few.volume.geometry, few.reference.labels, overwrite=True)
    return {"image": str(data.sample_path(f"{case}_image.nrrd")), "ref": str(ref_path), "sparse": str(sparse_path),
            "slices": few.slices, "slice_spec": few.slice_spec}


def _hssl(*args: str) -> subprocess.CompletedProcess:
    engine = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(engine) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "hssl", *args], capture_output=True, text=True, encoding="utf-8",
                          errors="replace", env=env)


def run_one(case: str, n_slices: int, seed: int, init: str, steps: int, out: Path, prepared: dict) -> dict:
    label, _, value = init.partition("=") if "=" in init else (init, "", init)
    value, *extra = value.split()  # "PATH --lr 0.002": extra finetune options for this column
    tag = f"{case}-{n_slices}-{label.replace('/', '_').replace(':', '_')}-s{seed}"
    work = out / "runs" / tag
    work.mkdir(parents=True, exist_ok=True)
    pred = work / "prediction.nrrd"
    t0 = time.perf_counter()
    ft = _hssl("finetune", "--image", prepared["image"], "--labels", prepared["sparse"], "--slices", prepared["slice_spec"],
               "--out", str(work / "model"),
               "--init", value, "--steps", str(steps), "--seed", str(seed), "--device", "cpu", "--predict", str(pred),
               "--overwrite", *extra)
    seconds = time.perf_counter() - t0
    if ft.returncode != 0:
        raise SystemExit(f"error: finetune failed for {tag}: {ft.stderr.strip().splitlines()[-1:]}")
    ev = _hssl("evaluate", "--pred", str(pred), "--ref", prepared["ref"], "--exclude-annotated", prepared["sparse"],
               "--json")
    if ev.returncode != 0:
        raise SystemExit(f"error: evaluate failed for {tag}: {ev.stderr.strip().splitlines()[-1:]}")
    scores = json.loads(ev.stdout)
    meta = json.loads((work / "model" / "model.json").read_text())["training"]
    return {"case": case, "slices": n_slices, "annotated": prepared["slices"], "seed": seed, "init": label,
            "init_value": " ".join([value, *extra]),
            "steps": steps, "dice": scores["labels"][0]["dice"], "hd95_mm": scores["labels"][0]["hd95_mm"],
            "heldout_dice": meta.get("heldout_dice"), "finetune_predict_s": round(seconds, 1),
            "threads": os.environ.get("OMP_NUM_THREADS", "default")}


def _values(key: str, rows: list[dict]) -> list[float]:
    """A run's Dice is None when prediction and reference are both empty on the scored slices: that
    counts as 0 for ``dice`` (the run found nothing); for other keys (e.g. ``dice_between`` when
    no unannotated slice lies between the annotated ones) the run has no value and is left out."""
    if key == "dice":
        return [r.get(key) or 0.0 for r in rows]
    return [r[key] for r in rows if r.get(key) is not None]


def table(rows: list[dict], key: str = "dice") -> str:
    """Markdown: mean (and each run's) ``key`` (Dice) per case and initialisation."""
    inits = sorted({r["init"] for r in rows}, key=lambda s: (s != "scratch", s))
    keys = sorted({(r["case"], r["slices"]) for r in rows})
    lines = ["| case | slices | " + " | ".join(inits) + " |", "|---|---|" + "---|" * len(inits)]
    for case, n in keys:
        cells = []
        for init in inits:
            d = _values(key, [r for r in rows if (r["case"], r["slices"], r["init"]) == (case, n, init)])
            cells.append(f"{np.mean(d):.3f} ({', '.join(f'{v:.3f}' for v in d)})" if d else "-")
        lines.append(f"| {case} | {n} | " + " | ".join(cells) + " |")
    means = []
    for init in inits:
        d = _values(key, [r for r in rows if r["init"] == init])
        means.append(f"**{np.mean(d):.3f}** (n={len(d)})" if d else "-")
    lines.append("| mean | | " + " | ".join(means) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hssl.pretrain.benchmark", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--cases", nargs="+", default=["brain1", "brain2", "lung1", "lung2"])
    p.add_argument("--slices", nargs="+", type=int, default=[3])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--init", nargs="+", default=["scratch", "bundled"],
                   help="scratch | bundled | a model folder | LABEL=any of these (LABEL names the column), "
                        "optionally followed by finetune options, e.g. 'fast=bundled --lr 0.002'")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--table-only", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if not a.table_only:
        done = {(r["case"], r["slices"], r["seed"], r["init"], r["steps"]) for r in rows}
        labels = [i.partition("=")[0] if "=" in i else i for i in a.init]
        for case in a.cases:
            for n in a.slices:
                prepared = prepare(case, n, out)
                for seed in a.seeds:
                    for init, label in zip(a.init, labels):
                        if (case, n, seed, label, a.steps) in done:
                            continue
                        row = run_one(case, n, seed, init, a.steps, out, prepared)
                        print(json.dumps(row), flush=True)
                        with open(results, "a") as f:
                            f.write(json.dumps(row) + "\n")
                        rows.append(row)
    wanted = {i.partition("=")[0] if "=" in i else i for i in a.init}
    chosen = [r for r in rows if r["case"] in a.cases and r["init"] in wanted and r["steps"] == a.steps]
    print(table(chosen))
    return 0


if __name__ == "__main__":
    sys.exit(main())
