"""Fine-tuning a model on a clinician's corrected cases and unlabeled scans, registered as a new version of it.

`dinomix finetune` (dinomix/cli/finetune.py) parses its arguments into `FinetuneOptions` and calls
`steps.finetune`, a short sequence of steps of one `steps.FineTune` (each step's docstring says why it is there):

    prepare -> route -> set up the trainer -> evaluate before -> plan (time) -> leave-one-scan-out -> train
    -> self-check -> window calibration -> organ calibration -> evaluate after (compare) -> held-out veto
    -> register

Modules: `options` (what is asked for; standard library only, so the command line loads no torch), `cases` (the
held-out and training cases, kept in memory), `config` (the training config, from the parent's), `budget` (the
time plan and re-planning), `verdict` (before against after), `versions` (the new version's name and
registration), `steps` (the steps).

What it does:

1. prepare: loads the model (registry name or model file): its weights, architecture, organs and preprocessing;
   the new model keeps all of them (every inference mode included). Reads the dataset (a `dataset.json`
   manifest or a folder `dinomix dataset import` understands). Corrected cases are labeled only for the organs
   the clinician reviewed (`annotated` in the manifest: partial labels; label values of other organs there are
   treated as unknown); cases without a label are unlabeled scans. Held-out cases: `--holdout` ids (labeled),
   else the labeled cases whose split is eval, val, validation, test or holdout; every other case is for
   training. The parent's training config is validated once; one that does not validate here is replaced by
   the default settings, and the log says so.
2. route (`--routing organs`, the default; dinomix/training/routing.py): the parent segments the corrected
   scans, and an organ learns only where the correction changed it (reviewed, and the parent's Dice against the
   correction below `--route-below`, 90 %). The new network is the parent, frozen, plus a small trainable
   branch (a copy of its last decoder block and head, network.RoutedConfig) whose logits replace the parent's
   for those organs only: every other organ keeps the parent's output, by construction. `--routing off`
   fine-tunes the whole network (the behaviour before routing).
3. train: the semi-supervised trainer (dinomix/training/semi.py) from the model's weights, with PIC priorities
   (`--priority-weight`, default 3) on the `--priority` organs, the parent's peak learning rate (with at least
   ROUTED_WARMUP warm-up iterations when routed), and `finetune_semi_defaults`: per-class pseudo-label
   thresholds, no consistency ramp-up and (pic, cutmix) the mixed-only student batch. `--open-organs` and
   `--parent-distillation W` as before (off by default). With `--minutes`, the iteration count is planned from
   a measured step time (3 trial iterations, then undone) and re-planned from the pace of the last iterations
   while training, so that the whole command, checks and registration included, ends within the budget.
4. leave-one-scan-out: with two or more corrected scans, the same fine-tune without one of them (LOCO_SHARE of
   the iterations in all), scored against its parent on the left-out scan.
   No branch is trained where nothing could keep it: without a held-out case or --keep-unverified the self-check
   would send every learnt organ back to the parent (left-out corrected scans can speak against a trained organ,
   not vouch for it: routing.LOCO_BOUND_FROM), so the fine-tune skips training (the log says so) and ends in
   seconds, after the organ calibration.
5. self-check (no held-out case needed): on the clinician's own scans, each routed organ must fit the
   corrections at least as well as the parent, hold on left-out scans (from three of them, consistently: the lower
   confidence bound of the mean gain above zero, training/evidence.py), change the unlabeled scans about as much
   as the corrections changed it, and not take more than 1 % of an uncorrected organ; an organ that fails goes
   back to the parent's output. The verdict: "safe" (nothing unverified kept, or the held-out cases confirm it),
   "unknown" (learnt organs or offsets kept with --keep-unverified, or offsets two corrected scans agree on, that
   nothing vouched for) or "unsafe" (worse on held-out cases).
6. window calibration (dinomix/training/window_calibration.py; --no-window turns it off): when no branch was
   trained, one map of the scans' HU (HU -> 40 + c (HU - 40) + l, c >= 1) fitted on the reviewed organs of the
   corrected scans, and kept where the network is surer of itself through it on the unlabeled scans (from one
   corrected scan; no left-out scan doing worse), or, without unlabeled scans, where every left-out corrected scan
   gains +1 Dice point on them (+4 on average). A kept map is the new
   network's second window (architecture.window, nets/window_routing.py): the reviewed organs' scores come from a
   pass through it, every other class's from the parent's pass, so an organ nobody reviewed changes only where a
   reviewed organ now wins over it, in the mode fine-tuned on (architecture.window.modes; other modes draw as the
   parent; so does a scan the network is less sure of through it, and, on each scan, a reviewed organ it would draw
   below its floor: a quarter of its smallest volume in the training scans, training/organ_volumes.py). The model
   is then "unknown", and the organ calibration does not run.
7. organ calibration (dinomix/training/calibration.py): for each routed organ the trained branch could not keep,
   one offset added to the organ's logit (drawn larger or smaller everywhere, nothing else), fitted on the
   corrected scans so that every one of them fits better (half the best offset), kept where leave-one-scan-out
   over three or more corrected scans vouches for it (no left-out scan worse, +1 Dice point on average, the lower
   confidence bound of the mean gain above zero) and the unlabeled scans change no more than the corrections
   imply; written into the network's output biases. Two corrected scans cannot vouch for an offset, but one they
   agree on strongly (fitted on each alone, it improves the other by calibration.PAIR_STRONG_GAIN Dice points or
   more) is kept unverified, the model "unknown". From one corrected scan none is fitted (unless held-out cases
   or --keep-unverified).
8. compare: evaluates before and after on held-out cases, if any (model-grid Dice in %, sliding window on the
   training preprocessing; organs annotated and present in each case); a routed organ or an offset more than
   1 Dice point worse there goes back to the parent's output (unless --keep-unverified).
9. register: writes the new model into the registry as `<parent>.ft1`, `.ft2`, ... (or `--new-name`; an
   existing name is never overwritten), with `parent` = the source model's id and the self-check in its
   metadata. The DINOMix Trainer module shows the verdict and makes an unsafe or unknown model current only when
   asked to.

Events (`--events FILE|-`, JSON lines, besides start / progress / log / error / cancelled):
  {"event": "metric", "kind": "train", "iteration": i, "iterations": N, "loss": ..., "loss_sup": ...,
   "loss_cons": ..., "lr": ..., "time_left_s": ...}                          (every iteration)
  {"event": "metric", "kind": "eval", "phase": "before"|"after", "mean_dice": ..., "dice": {organ: %}}
  {"event": "metric", "kind": "plan", "iterations": N, "step_s": ..., "budget_s": ...}
  {"event": "result", "model": new name, "parent": ..., "path": ..., "iterations": N, "per_organ":
   {organ: {"before": %, "after": %, "delta": %}}, "before": {...}, "after": {...},
   "worse_than_parent": true|false|null, "verdict": "...", "self_check": {"verdict": "safe"|"unknown"|"unsafe",
   "message": ..., "checks": [{"name", "passed", "detail"}], "removed": {...}, "per_organ": {...}},
   "routing": {"mode", "routed", "calibrated": {organ: logit offset}, "parent_dice_on_corrections", "kept",
               "loco_scans", "loco_iterations"},
   "window": null | {"contrast", "level_hu", "kept", "why", "evidence", "unlabeled_entropy_change", "organs",
                     "fit_gains", "loco_gains", "loco_worst_organ", "window_hu", "candidates"},
   "timings_s": {stage: seconds}, ...}
"""

from .options import HOLDOUT_SPLITS, METHODS, ROUTING, FinetuneOptions

__all__ = ["HOLDOUT_SPLITS", "METHODS", "ROUTING", "FinetuneOptions"]
