"""What a benchmark run measures: the modes (tiny, default, full), the ``--inits`` grammar and the
tolerances the targets use."""
from __future__ import annotations

import dataclasses
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ENGINE = REPO / "HSSLSegment"
SCRIPT = REPO / "scripts" / "benchmark.py"  # the entry point; each unit is one ``--worker`` process of it

SECTIONS = ("quality", "baseline", "predict", "cross", "interactive", "pretrain")
BUNDLED = ENGINE / "Resources" / "Models" / "default"
CT_SHAPE = (300, 512, 512)  # the CT-sized volume, [z, y, x]
SAMPLES = ("lung1", "lung2", "brain1", "brain2")
EQUAL_DICE = 0.01  # "equal accuracy": Dice within one point
# Measurement noise: the same prediction repeated took 19.0 +- 0.3 s of CPU time (1 thread) and a
# process's peak RSS varies by a few MB, so ratios up to these count as "not slower / no more".
TIME_TOLERANCE = 1.05
RSS_TOLERANCE = 1.02
FEW_POINTS = 0.05  # "within a few Dice points"
RSS_LIMIT_MB = 4096
REPEAT_BELOW_CPU_S = 30.0


@dataclasses.dataclass
class Settings:
    """What one benchmark run measures. Budgets are slice counts ("3") or shares ("10%") of the
    slices that contain the structure."""

    mode: str
    cases: list
    budgets: list  # for the first init (scratch)
    inits: list  # labels or LABEL=VALUE (VALUE: scratch | bundled | model folder)
    seeds: list
    steps: int  # fine-tuning steps per quality run (ours and the baseline alike)
    baseline_budgets: list
    predict_cases: list  # sample scans predicted in the annotation region, and with the MONAI baseline
    whole_volume_cases: list  # ... also over the whole volume, by hssl and by MONAI with the same weights
    cross: list  # [source, target] pairs
    ct_source: str
    ct_shape: tuple
    ct_methods: list  # on the CT-sized volume: ours-roi, ours-full, monai-swi
    ct_steps: int
    interactive_cases: list
    interactive_budget: dict  # {"time_budget": s} or {"steps": n}
    pretrain: dict  # {"config": path} or {"tiny": True}; plus "steps"
    other_init_budgets: list | None = None  # budgets of the inits after the first (None: the same)
    predict_repeats: int = 1  # predictions under REPEAT_BELOW_CPU_S are repeated: the minimum is reported
    cross_all_inits: bool = True  # cross-volume for every init (else the first only)
    threads: int = 1
    device: str = "cpu"
    isolation: str = "spawn"  # spawn: a fresh interpreter per unit; fork: a forked child (quick, CPU only)
    sections: tuple = SECTIONS


def mode_settings(mode: str) -> Settings:
    inits = ["scratch"] + (["bundled"] if (BUNDLED / "model.json").exists() else [])
    ct_all = ["ours-roi", "ours-full", "monai-swi"]
    if mode == "tiny":
        return Settings("tiny", cases=["synthetic"], budgets=["1", "3", "100%"], inits=["scratch"], seeds=[0],
                        steps=3, baseline_budgets=["3"], predict_cases=["synthetic"],
                        whole_volume_cases=["synthetic"], cross=[["synthetic", "synthetic2"]],
                        ct_source="synthetic", ct_shape=(60, 48, 48), ct_methods=ct_all, ct_steps=2,
                        interactive_cases=["synthetic"], interactive_budget={"steps": 2},
                        pretrain={"tiny": True, "steps": 2}, isolation="fork", predict_repeats=2)
    if mode == "default":
        # About 20 CPU minutes on one thread: the pretrained init only at 1 and 3 slices, cross-volume
        # for the first init, and on the CT-sized volume our product path against MONAI's whole-volume
        # inference (hssl's whole-volume path against MONAI's with the same weights runs on brain1).
        return Settings("default", cases=["lung2", "brain1"], budgets=["1", "3", "10%", "100%"], inits=inits,
                        seeds=[0], steps=25, baseline_budgets=["3"], predict_cases=["lung2", "brain1"],
                        whole_volume_cases=["brain1"], cross=[["lung1", "lung2"], ["brain1", "brain2"]],
                        ct_source="lung2", ct_shape=CT_SHAPE, ct_methods=["ours-roi", "monai-swi"], ct_steps=4,
                        interactive_cases=["lung2"], interactive_budget={"time_budget": 30.0},
                        pretrain={"config": "configs/pretrain_samples.yaml", "steps": 4},
                        other_init_budgets=["1", "3"], cross_all_inits=False, predict_repeats=2)
    if mode == "full":
        return Settings("full", cases=list(SAMPLES), budgets=["1", "2", "3", "5", "5%", "10%", "100%"], inits=inits,
                        seeds=[0, 1, 2], steps=200, baseline_budgets=["1", "3", "10%", "100%"],
                        predict_cases=list(SAMPLES), whole_volume_cases=list(SAMPLES),
                        cross=[["lung1", "lung2"], ["brain1", "brain2"]], ct_source="lung2", ct_shape=CT_SHAPE,
                        ct_methods=ct_all, ct_steps=20, interactive_cases=list(SAMPLES),
                        interactive_budget={"time_budget": 120.0},
                        pretrain={"config": "configs/pretrain_samples.yaml", "steps": 20}, predict_repeats=3)
    raise SystemExit(f"error: unknown mode '{mode}': choose tiny, default or full")


def init_value(init: str) -> tuple[str, str]:
    """``LABEL=VALUE`` -> (label, value); ``scratch`` -> (scratch, scratch). VALUE may end with
    ``--lr X`` (the fine-tuning learning rate of that init), see ``init_lr``."""
    label, sep, value = init.partition("=")
    return (label, value.split()[0]) if sep else (init, init)


def init_lr(init: str) -> float | None:
    """The ``--lr X`` of an init spec such as ``"bundled-lr2e-3=bundled --lr 0.002"``, else None."""
    words = init.partition("=")[2].split()
    if "--lr" in words[:-1]:
        return float(words[words.index("--lr") + 1])
    return None
