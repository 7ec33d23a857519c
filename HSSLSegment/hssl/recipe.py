"""The fine-tuning recipe: every constant of the few-slice training loop, in one place.

Stdlib only, so that the Slicer module (which never imports torch) reads the same defaults as the
command line and the background job: one budget default everywhere. The recipe a model was
trained with is written into its ``model.json`` (``training.recipe``).
"""
from __future__ import annotations

import dataclasses
import math

# Patch voxel budgets. On a CPU a smaller patch keeps a step near half a second, so a 2-3 minute
# budget gives a few hundred steps (measured: 12x112x112 at 0.53 s/step vs 14x128x128 at 1.2 s/step
# on 2 cores); a GPU affords more context per step.
CPU_PATCH_VOXELS = 128 * 1024
GPU_PATCH_VOXELS = 96 * 96 * 24


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
    """Constants of ``hssl.finetune``; the user-facing knobs live in ``FinetuneOptions``."""

    time_budget_s: float = 150.0  # default budget when neither steps nor seconds are given
    batch_size: int = 2
    # A pretrained body with a new head learns at the scratch rate; continuing a model of the same
    # labels (the Slicer loop's "fine-tune again") only needs gentle updates. Measured on 8 runs
    # (docs/pretraining.md): the bundled model reached mean Dice 0.43 at 5e-4 but 0.66 at 2e-3.
    lr_new_head: float = 2e-3
    lr_continue: float = 5e-4
    weight_decay: float = 1e-5
    lr_power: float = 0.9  # polynomial decay lr * (1 - fraction) ** power over the budget
    grad_clip: float = 12.0  # max global gradient norm
    fg_fraction: float = 0.33  # share of patches centred on a painted foreground voxel
    holdout_fraction: float = 0.7  # share of the budget during which the held-out slice stays out
    holdout_evals: int = 6  # held-out estimates during the hold-out phase
    eval_share: float = 0.1  # at most this share of the training time goes to held-out estimates
    cpu_patch_voxels: int = CPU_PATCH_VOXELS
    gpu_patch_voxels: int = GPU_PATCH_VOXELS
    # The final segmentation (hssl.refine): chosen per scan on the held-out slice when there is one,
    # else this candidate; network voxels this sure of their class seed the intensity refinement.
    final_step: str = "network+grow"
    refine_confidence: float = 0.9
    # grow (painted slices alone) stays within the painted slices' span plus this share of it on
    # either side (hssl.refine.painted_span).
    grow_span_margin: float = 0.25
    poor_heldout_dice: float = 0.5  # below this on the held-out slice a segment is reported as poorly learned
    # The intensity-only candidate must beat the network's by this much on the held-out slice: it is
    # scored on the network as trained with the slice left out (70 % of the budget), and the network
    # keeps learning. On the development set a margin of 0.05 still picked grow twice where
    # network+grow ended 0.06-0.13 better (mni_nuclei, mni_limbic); a segment the network did not
    # learn at all is grown anyway (hssl.workflow: its painted-slice fit). A segment the network
    # alone scores below poor_heldout_dice on the held-out slice has no handicap on grow: it takes
    # the better intensity candidate, ties to grow (hssl.refine.choose_per_class; on a CPU without
    # native bfloat16 the handicap sent colin_nuclei's putamen and pallidum to network+grow at 0.53
    # and 0.58 where grow gave 0.80 and 0.71).
    grow_margin: float = 0.2
    # A segment the network did not learn (its Dice on its own painted slices below
    # poor_heldout_dice) is grown from the painted slices: with the network's sure voxels of the
    # other segments and of the background (network+grow) when that keeps at least this share of
    # the voxels growing alone gives it, else alone (hssl.refine.unlearned_step). Development-set
    # seed-0 runs: the network+grow result kept 70 % and 83 % (pallidum, caudate of mni_nuclei) and
    # was better than growing alone there; it kept 51 % of the head CT's ventricles (which the
    # network took for brain) and was worse (Dice 0.48 against 0.78).
    unlearned_keep_share: float = 0.6
    # A segment whose prediction has more voxels on a face of the region around the painting than
    # this times its largest painted slice leaked there; outside the box of its painted voxels it is
    # grown from the painted slices instead (hssl.refine.leaking, confine). Reference structures of
    # the development set have at most 0.03 there, and the final predictions of the other cases at
    # most 0.02 (3 slices, every seed run); brain2's tumour network once had 14 (9628 voxels
    # predicted for 368), lung2's tumour network+grow 0.30 to 1.54 in six runs of seeds 0-2 (it ran
    # on two slices past the tumour's end: Dice 0.707-0.782 unconfined, 0.80 confined, Grow from
    # seeds 0.794).
    leak_face_ratio: float = 0.25
    # The held-out choice of the final step predicts the region between the held-out slice's painted
    # neighbours and runs each intensity candidate there. When that is estimated (the windows that
    # prediction runs there, at the seconds per window of the held-out estimates' sliding-window
    # passes; grow_seconds_per_voxel for each intensity candidate, as measured on 2 cores) to take
    # more than this share of a time budget (on lung2's 512 x 512 chest CT the whole region took 42
    # of 150 s and left 134 training steps; a tenth, once the estimate counted every window, cut
    # lung1's part to 175 x 198 and its Dice from 0.830 to 0.788 on seed 0, where the part of
    # about 300 x 340 had taken 17-23 s), the candidates are compared on a part of that region
    # across (its full length along the held-out slice's axis, painted neighbours included, shrunk
    # in-plane around the held-out slice's structures until it fits); when even one patch across
    # would take longer, the final step is final_step. The final prediction's reserve counts the
    # grow as its seconds in the selection region scaled by the voxels, and never less than
    # grow_seconds_per_voxel (before a selection: that alone; lung2's 16 M-voxel region: about 25 s).
    # The grow's seconds per voxel vary with the region and its seeds: on lung1's 11 M-voxel region
    # the final grow took 21.5 s and 25.4 s in two runs, where the selection's had taken 6.2 s on a
    # 2.9 M-voxel part (scaled: 23.4 s) and 0.38 s on a 0.55 M-voxel one (scaled: 7.7 s).
    selection_share: float = 0.15
    grow_seconds_per_voxel: float = 1.5e-6
    # grow over all 26 neighbours instead of 6 (hssl.refine) is also scored on the held-out slice and
    # replaces the 6-neighbour grow when its mean Dice there is higher; tried when the final
    # prediction's region has at most alt_grow_max_voxels voxels (its graph has 13 edges per voxel,
    # not 3) and when, at alt_grow_cost times the 6-neighbour grow's seconds there (measured:
    # 2.0-2.4), the selection stays within its share of the budget. 0 turns it off. It must win by
    # alt_grow_margin: on the development set (3 slices, seeds 0-2) the held-out slice preferred 26
    # by 0.036 (head CT ventricles: final Dice 0.870 -> 0.923) and 0.35 (MNI tissue: 0.908 -> 0.906)
    # where it did not hurt, by 0.007 (colin_nuclei: 0.767 -> 0.755) and 0.012 (brain1's tumour:
    # 0.709 -> 0.694) where it did.
    alt_grow_connectivity: int = 26
    alt_grow_max_voxels: int = 9_000_000
    alt_grow_cost: float = 2.5
    alt_grow_margin: float = 0.02
    # Self-supervised adaptation to the scan before fine-tuning (hssl.adapt): this share of a time
    # budget, at this learning rate. Off (0) until it wins on the development set.
    adapt_share: float = 0.0
    adapt_lr: float = 1e-3
    # A time budget ends at the first prediction: training keeps back what the final prediction is
    # estimated to take beyond this many seconds.
    first_prediction_slack_s: float = 10.0

    def patch_voxels(self, device_type: str) -> int:
        return self.cpu_patch_voxels if device_type == "cpu" else self.gpu_patch_voxels

    def lr(self, continuing: bool) -> float:
        return self.lr_continue if continuing else self.lr_new_head

    def lr_at(self, base_lr: float, fraction: float) -> float:
        """The learning rate at ``fraction`` (0..1) of the budget."""
        return base_lr * max(0.0, 1.0 - fraction) ** self.lr_power

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "FinetuneRecipe":
        """Read a recipe written by ``to_json``; unknown keys are ignored (a newer writer), missing
        ones take today's defaults (an older one). Values must be finite positive numbers."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        kwargs = {}
        for key, value in (d or {}).items():
            if key not in names:
                continue
            default = getattr(DEFAULT_RECIPE, key)
            if isinstance(default, str):
                if not isinstance(value, str):
                    raise ValueError(f"recipe field '{key}' must be a string, got {value!r}")
                kwargs[key] = value
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"recipe field '{key}' must be a finite non-negative number, got {value!r}")
            kwargs[key] = type(default)(value)
        return cls(**kwargs)


DEFAULT_RECIPE = FinetuneRecipe()
DEFAULT_TIME_BUDGET_S = DEFAULT_RECIPE.time_budget_s


def time_budget_or_default(time_budget: float | None, steps: int | None) -> float | None:
    """The seconds to train: as given, else the default budget unless a step budget is given."""
    if time_budget or steps:
        return time_budget
    return DEFAULT_TIME_BUDGET_S
