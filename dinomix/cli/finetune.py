"""`dinomix finetune`: fine-tune a model on a clinician's corrected cases and unlabeled scans, and register the
result as a new version of the model.

    dinomix finetune --model NAME --dataset DATASET_DIR_OR_MANIFEST [--priority ORGAN ...]
                     (--minutes M | --iterations N) [--events FILE|-] [--new-name NAME] [--holdout CASE ...]

Optional extras: --method {pic,cutmix,mean_teacher,supervised} (default pic), --routing {organs,off},
--route-below, --route-blocks, --no-loco, --output RUN_DIR, --device, --patch-size, --lr, --threads, --seed,
--priority-weight, --parent-distillation, --open-organs, --consistency-weight.

What it does (prepare -> route -> calibrate (time) -> leave-one-scan-out -> train -> self-check -> organ calibration
-> register):

1. Loads the model (registry name or model file): its weights, architecture, organs and preprocessing; the
   new model keeps all of them (every inference mode included).
2. Reads the dataset (a `dataset.json` manifest or a folder `dinomix dataset import` understands). Corrected
   cases are labeled only for the organs the clinician reviewed (`annotated` in the manifest: partial labels;
   label values of other organs there are treated as unknown); cases without a label are unlabeled scans.
   Held-out cases: `--holdout` ids (labeled), else the labeled cases whose split is eval, val, validation,
   test or holdout; every other case is for training.
3. Routes (`--routing organs`, the default; dinomix/training/routing.py): the parent segments the corrected
   scans, and an organ learns only where the correction changed it (reviewed, and the parent's Dice against the
   correction below `--route-below`, 90 %). The new network is the parent, frozen, plus a small trainable
   branch (a copy of its last decoder block and head, network.RoutedConfig) whose logits replace the parent's
   for those organs only: every other organ keeps the parent's output, by construction. `--routing off`
   fine-tunes the whole network (the behaviour before routing).
4. Runs the semi-supervised trainer (dinomix/training/semi.py) from the model's weights, with PIC priorities
   (`--priority-weight`, default 3) on the `--priority` organs, the parent's peak learning rate (with at least
   ROUTED_WARMUP warm-up iterations when routed), and `finetune_semi_defaults`: per-class pseudo-label
   thresholds, no consistency ramp-up and (pic, cutmix) the mixed-only student batch. `--open-organs` and
   `--parent-distillation W` as before (off by default). With `--minutes`, the iteration count is planned from
   a measured step time (3 trial iterations, then undone) and re-planned from the pace of the last iterations
   while training, so that the whole command, checks and registration included, ends within the budget.
5. With two or more corrected scans, leave-one-scan-out: the same fine-tune without one of them (LOCO_SHARE of
   the iterations in all), scored against its parent on the left-out scan.
   No branch is trained where nothing could keep it: with fewer than three corrected scans to leave out (routing
   MIN_LOCO_VOUCH), no held-out case and no --keep-unverified, the self-check would send every learnt organ back
   to the parent, so the fine-tune skips training (the log says so) and ends after the organ calibration, well
   within the budget.
6. Self-check (no held-out case needed): on the clinician's own scans, each routed organ must fit the
   corrections at least as well as the parent, hold on left-out scans, change the unlabeled scans about as much
   as the corrections changed it, and not take more than 1 % of an uncorrected organ; an organ that fails goes
   back to the parent's output. The verdict: "safe", "unknown" (one corrected scan and no held-out case:
   nothing shows the learnt organs are better elsewhere) or "unsafe" (worse on held-out cases).
6b. Organ calibration (dinomix/training/calibration.py): for each routed organ the trained branch could not keep,
   one offset added to the organ's logit (drawn larger or smaller everywhere, nothing else), fitted on the
   corrected scans so that every one of them fits better (half the best offset), kept where leave-one-scan-out
   over two or more corrected scans vouches for it (no left-out scan worse, +1 Dice point on average) and the
   unlabeled scans change no more than the corrections imply; written into the network's output biases. With one
   corrected scan nothing vouches for an offset and none is kept (unless held-out cases or --keep-unverified).
7. Evaluates before and after on held-out cases, if any (model-grid Dice in %, sliding window on the training
   preprocessing; organs annotated and present in each case).
8. Writes the new model into the registry as `<parent>.ft1`, `.ft2`, ... (or `--new-name`; an existing name
   is never overwritten), with `parent` = the source model's id and the self-check in its metadata. The
   DINOMix Trainer module shows the verdict and makes an unsafe or unknown model current only when asked to.

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
   "timings_s": {stage: seconds}, ...}
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from .job import Job
from .options import add_device_option

if TYPE_CHECKING:
    from ..training.config import SemiConfig

HOLDOUT_SPLITS = ("eval", "val", "validation", "test", "holdout")
METHODS = ("pic", "cutmix", "mean_teacher", "supervised")
CALIBRATION_STEPS = 3
MIN_ITERATIONS = 5
ROUTING = ("organs", "off")
LOCO_SHARE = 0.35        # share of the training iterations spent on the leave-one-scan-out checks
MAX_LOCO_SCANS = 3
# Organ calibration (training/calibration.py) time per corrected scan, fit and leave-one-scan-out, on 2 busy cores
# (about 20 s for two BTCV scans at 3 mm with 13 organs on a 2-core machine running two other jobs, 2026-12-06):
# kept free at the end of the budget
CALIBRATION_S_PER_SCAN = 12.0
MAX_CHECK_SCANS = 4      # unlabeled scans the self-check compares parent and new model on
ROUTED_WARMUP = 20       # routed fine-tunes warm up at least this long: Adam's first steps move every weight of
                         # the small branch by about the learning rate (2 steps without: several Dice points)
REPLAN_WINDOW = 10       # iterations whose pace re-plans a time-budgeted run


def register(sub) -> None:
    f = sub.add_parser("finetune", help="fine-tune a model on corrected cases and unlabeled scans; registers a new "
                                        "version")
    f.add_argument("--model", required=True, help="registry name or model file to start from")
    f.add_argument("--dataset", required=True, help="dataset manifest (dataset.json) or dataset folder")
    f.add_argument("--priority", nargs="+", action="extend", default=[], metavar="ORGAN",
                   help="organs to favour (PIC priority), e.g. the organs the clinician corrected")
    budget = f.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, default=None, help="time budget of the whole command")
    budget.add_argument("--iterations", type=int, default=None, help="number of training iterations")
    f.add_argument("--events", default=None, metavar="FILE|-", help="JSON-lines progress events")
    f.add_argument("--new-name", default=None, help="name of the new model (default <parent>.ftN)")
    f.add_argument("--holdout", nargs="+", action="extend", default=None, metavar="CASE",
                   help="labeled case ids to evaluate on before and after (never trained on)")
    f.add_argument("--method", choices=METHODS, default="pic", help="semi-supervised method (default pic)")
    f.add_argument("--output", default=None, help="run folder (default: a new folder in the user cache)")
    f.add_argument("--routing", choices=ROUTING, default="organs",
                   help="organs (default): only the organs your corrections changed learn, every other organ keeps "
                        "the parent's output; off: every organ is fine-tuned")
    f.add_argument("--route-below", type=float, default=90.0, metavar="DICE",
                   help="an annotated organ learns when the parent's Dice against your correction is below this "
                        "(default 90)")
    f.add_argument("--route-blocks", type=int, default=1, choices=[1, 2, 3],
                   help="decoder blocks the routed organs get their own copy of (default 1)")
    f.add_argument("--no-loco", dest="loco", action="store_false",
                   help="skip the leave-one-scan-out self-check (with two or more corrected scans it takes about a "
                        "third of the training time)")
    f.add_argument("--keep-unverified", action="store_true",
                   help="keep organs learnt from fewer than 3 corrected scans (and no held-out case), which the "
                        "self-check cannot vouch for; the new model is then marked 'unknown' (default: such organs "
                        "keep the parent's output)")
    add_device_option(f)
    f.add_argument("--patch-size", type=int, default=None, help="cubic patch edge (default: the parent's, else 48)")
    f.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the parent's, else 2e-3)")
    f.add_argument("--threads", type=int, default=None)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--priority-weight", type=float, default=3.0, help="PIC multiplier of the --priority organs")
    f.add_argument("--parent-distillation", type=float, default=None, metavar="WEIGHT",
                   help="weight of the distillation from the frozen parent on the organs nobody corrected "
                        "(default 0 = off; at the same iteration count, 1 learnt the corrected organs a little "
                        "better and forgot less, but each step costs 1.2-1.45x: in 10 CPU minutes it was no "
                        "better than off)")
    f.add_argument("--open-organs", action="store_true",
                   help="leave the corrected and priority organs open where the teacher says background "
                        "(semi.pseudo_labels.open_organs; off by default: in the 10-minute correction-loop benchmark "
                        "it learnt them no faster and lost more of the vena cava)")
    f.add_argument("--consistency-weight", type=float, default=None, metavar="W",
                   help="weight of the consistency (pseudo-label) loss against the supervised loss on the "
                        "corrections (default: the parent's, 1.0 for the built-in models; in the 10-minute "
                        "correction-loop benchmark 0.3 forgot the organs nobody corrected and 2 learnt none of "
                        "the corrected ones, so 1 stays)")
    f.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    job = Job("finetune", args.events,
              {"prepare": 0.02, "route": 0.03, "cache": 0.05, "eval_before": 0.03, "calibrate": 0.02, "loco": 0.2,
               "train": 0.53, "eval_after": 0.03, "self_check": 0.05, "organ_calibration": 0.02, "register": 0.02})
    opts = FinetuneOptions(
        model=args.model, dataset=args.dataset, priority=list(args.priority or []), minutes=args.minutes,
        iterations=args.iterations, new_name=args.new_name, holdout=args.holdout, method=args.method,
        output=args.output, device=args.device, patch_size=args.patch_size, lr=args.lr, threads=args.threads,
        seed=args.seed, priority_weight=args.priority_weight, parent_distillation=args.parent_distillation,
        open_organs=args.open_organs, consistency_weight=args.consistency_weight, routing=args.routing,
        route_below=args.route_below, route_blocks=args.route_blocks, loco=args.loco,
        keep_unverified=args.keep_unverified)

    def work(rep, check) -> dict:
        result = finetune(opts, rep, check)
        if not args.events:
            sc = result["self_check"]
            print(f"fine-tuned '{result['parent']}' for {result['iterations']} iterations in {result['time_s']:.0f} s; "
                  f"registered '{result['model']}' ({result['path']})\n  self-check: {sc['verdict'].upper()}: "
                  f"{sc['message']}\n  {result['verdict']}")
        return result

    try:
        return job.run(work)
    finally:
        job.close()


@dataclass
class FinetuneOptions:
    model: str
    dataset: str
    priority: list[str] = field(default_factory=list)
    minutes: Optional[float] = None
    iterations: Optional[int] = None
    new_name: Optional[str] = None
    holdout: Optional[list[str]] = None
    method: str = "pic"
    output: Optional[str] = None
    device: str = "auto"
    patch_size: Optional[int] = None
    lr: Optional[float] = None
    threads: Optional[int] = None
    seed: int = 0
    priority_weight: float = 3.0
    parent_distillation: Optional[float] = None  # None: off
    open_organs: bool = False  # True: semi.pseudo_labels.open_organs = the corrected and priority organs
    consistency_weight: Optional[float] = None  # None: the parent's semi.consistency_weight
    routing: str = "organs"  # organs: network.RoutedConfig over the organs the corrections changed; off: all learn
    route_below: float = 90.0
    route_blocks: int = 1
    loco: bool = True
    keep_unverified: bool = False  # keep learnt organs nothing can vouch for (the model is then marked unknown)


# ---------------------------------------------------------------- helpers (pure, tested directly)

def next_version_name(parent: str, existing: set[str]) -> str:
    """`<parent>.ftN` with N one more than the highest N in use (from 1)."""
    pat = re.compile(rf"^{re.escape(parent)}\.ft(\d+)$")
    used = [int(m.group(1)) for n in existing if (m := pat.match(n))]
    return f"{parent}.ft{max(used, default=0) + 1}"


def plan_iterations(budget_s: float, spent_s: float, step_s: float, after_s: float, margin: float = 0.08) -> int:
    """Iterations that fit the budget: what is left after the time spent so far and the final evaluation and
    export (after_s), less a safety margin, divided by the measured time of one iteration."""
    left = (budget_s - spent_s - after_s) * (1.0 - margin)
    return max(0, math.floor(left / max(step_s, 1e-6)))


def compare(before: Optional[dict], after: Optional[dict]) -> tuple[dict, Optional[bool], str]:
    """Per-organ before/after Dice, whether the new model is worse on average, and a plain verdict."""
    if not before or not after:
        return {}, None, ("not evaluated: the dataset has no held-out labeled cases (pass --holdout CASE ...), so "
                          "nothing says whether the new model is better or worse than its parent")
    per = {}
    for organ in before["dice"]:
        b, a = before["dice"][organ], after["dice"].get(organ)
        per[organ] = {"before": b, "after": a, "delta": None if a is None else round(a - b, 2)}
    mb, ma = before["mean_dice"], after["mean_dice"]
    worse = ma < mb
    down = [f"{o} {v['delta']:+.1f}" for o, v in per.items() if v["delta"] is not None and v["delta"] < -1.0]
    if worse:
        verdict = (f"WORSE than its parent on the held-out cases: mean Dice {ma:.1f}% vs {mb:.1f}% "
                   f"({ma - mb:+.1f}). It was registered anyway; remove it with 'dinomix models remove' if unwanted.")
    else:
        verdict = f"not worse than its parent on the held-out cases: mean Dice {ma:.1f}% vs {mb:.1f}% ({ma - mb:+.1f})."
    if down:
        verdict += " Organs down by more than 1 Dice point: " + ", ".join(down) + "."
    return per, worse, verdict


def corrected_organs(cases: list, schema) -> list[str]:
    """The organs the clinician reviewed: those annotated in the partially labeled cases (a fully labeled case
    annotates every organ and says nothing about which ones were corrected), in schema order."""
    found: set[str] = set()
    for c in cases:
        organs = c.annotated_organs(schema)
        if organs and len(organs) < len(schema.names):
            found.update(organs)
    return [n for n in schema.names if n in found]


def parent_distillation_settings(weight: Optional[float], free_organs: list[str]) -> dict:
    """semi.parent_distillation of a fine-tune, off unless asked for. It addresses the EMA teacher drifting with
    the student on organs nobody corrected (the vena cava lost 11 Dice points beside a corrected portal vein in the
    correction-loop benchmark). At equal iterations weight 1 learnt the corrected organs as well or better and
    forgot less; off by default because each step costs 1.2-1.45x, and in the same-day 10-minute benchmark
    (2026-12-02) the fewer iterations learnt less of the corrected organs (12.0 vs 17.9) and lost more of the
    vena cava (-4.4 vs -1.8) while holding the liver (README "Correction loop")."""
    if weight is None:
        weight = 0.0
    if weight < 0:
        from ..errors import DinomixError

        raise DinomixError(f"--parent-distillation must be >= 0, got {weight:g}")
    return {"weight": weight, "free_organs": list(free_organs)}


def finetune_semi_defaults(method: str, parent: SemiConfig, open_organs: Optional[list[str]] = None) -> dict:
    """Semi-supervised settings a fine-tune uses whatever its parent was trained with.

    * Per-class pseudo-label thresholds (`class_quantile`): the parent is a trained model that is rarely 0.9-sure
      of some organs (kidneys, spleen); with one fixed threshold the consistency loss kept only its confident
      background around them and erased those organs (correction-loop benchmark, 2026-11-23).
    * The student sees only the mixed patches (cutmix / pic, no trainer components): the clinician's minutes buy
      about 1.25x the iterations (benchmarks/step_time.py), and the labeled patches are still seen, inside the
      mixed ones.
    * No consistency ramp-up: the teacher starts as the trained parent, so its pseudo-labels are worth their full
      weight from the first iteration; with the ramp-up of training from scratch nothing held the organs the
      corrections leave unannotated during the first 40 % of the run, the student forgot them, and the EMA
      teacher followed it.
    * `open_organs` (`--open-organs`: the corrected and priority organs; none by default): the teacher starts as a
      parent that missed them, so its background pseudo-labels on the unlabeled scans say "no gallbladder here"
      where there is one; these organs are then merged with background in the pseudo-label loss
      (`semi.pseudo_labels.open_organs`). Off by default: in the 10-minute correction-loop benchmark (2026-12-02,
      same base) it learnt the corrected organs no faster (14.2 against 17.9 Dice, 431 against 456 iterations)
      and lost more of the vena cava (-9.1 against -1.8), so the teacher's background is not what holds them
      back there (benchmarks/results/finetune_open_organs.json)."""
    pl = parent.pseudo_labels.model_copy(update={"threshold": "class_quantile", "open_organs": list(open_organs or [])})
    out: dict = {"pseudo_labels": pl, "rampup": 0.0}
    if method in ("cutmix", "pic") and not parent.components.any_enabled:
        out["student_patches"] = "mixed"
    return out


# ---------------------------------------------------------------- the command

def finetune(opts: FinetuneOptions, rep, check: Callable[[], None]) -> dict:
    """prepare -> route -> calibrate -> leave-one-scan-out -> train -> self-check -> register (module docstring)."""
    from .. import registry
    from ..cachedirs import cache_root, preprocessed_dir
    from ..datasets import Dataset, load_dataset
    from ..errors import DinomixError
    from ..modelfile import ModelMeta, load_model
    from ..nets.unet import RoutedConfig, fit_roi
    from ..organs import OrganSchema
    from ..training import calibration
    from ..training.config import DataConfig, TrainConfig
    from ..training.data import cache_cases
    from ..training.routing import MIN_LOCO_VOUCH, loco_deltas, predict, route_organs, self_check, untrained_check

    t0 = time.monotonic()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.monotonic()
        timings[name] = round(timings.get(name, 0.0) + now - since, 1)
        return now

    rep.begin("prepare", f"reading model {opts.model} and dataset {opts.dataset}")
    if opts.iterations is not None and opts.iterations < 1:
        raise DinomixError("--iterations must be at least 1")
    if opts.minutes is not None and opts.minutes <= 0:
        raise DinomixError("--minutes must be positive")
    if opts.consistency_weight is not None and opts.consistency_weight < 0:
        raise DinomixError(f"--consistency-weight must be 0 or more (got {opts.consistency_weight:g})")
    if opts.routing not in ROUTING:
        raise DinomixError(f"--routing must be one of {', '.join(ROUTING)} (got {opts.routing})")
    if not 0 < opts.route_below <= 100:
        raise DinomixError(f"--route-below must be a Dice % in (0, 100] (got {opts.route_below:g})")
    entry = registry.resolve(opts.model)
    meta: ModelMeta = entry.meta
    if OrganSchema.from_names(meta.organs.names).names != meta.organs.names:
        raise DinomixError(f"model '{meta.model_id}' has organs outside the catalog; it cannot be fine-tuned here")
    if opts.routing == "organs" and getattr(meta.architecture, "family", "") != "student_unet":
        raise DinomixError(f"model '{meta.model_id}' ({meta.architecture.family}) cannot route organs; "
                           "use --routing off")
    priority = [meta.organs.by_name(o).name for o in opts.priority]
    ds = load_dataset(opts.dataset)
    ids = [c.id for c in ds.cases]
    if opts.holdout:
        missing = [h for h in opts.holdout if h not in ids]
        if missing:
            raise DinomixError(f"--holdout: no case {', '.join(missing)} in dataset '{ds.name}'")
        unlabeled = [h for h in opts.holdout if not ds.get(h).labeled]
        if unlabeled:
            raise DinomixError(f"--holdout: case {', '.join(unlabeled)} has no label and cannot be evaluated")
        hold = set(opts.holdout)
    else:
        hold = {c.id for c in ds.cases if c.labeled and (c.split or "").lower() in HOLDOUT_SPLITS}
    train = [c for c in ds.cases if c.id not in hold]
    if not any(c.labeled and c.annotated_organs(meta.organs) for c in train):
        raise DinomixError(f"dataset '{ds.name}' has no labeled training case with organs of model "
                           f"'{meta.model_id}' ({', '.join(meta.organs.names)}); "
                           f"held out: {', '.join(sorted(hold)) or 'none'}")

    existing = {e.name for e in registry.list_models()}
    name = opts.new_name or next_version_name(meta.model_id, existing)
    if opts.new_name:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.@+-]*$", name):
            raise DinomixError(f"--new-name '{name}': use letters, digits and _ . @ + - "
                               "(starting with a letter or digit)")
        if name in existing:
            raise DinomixError(f"a model named '{name}' already exists; choose another --new-name "
                               "(nothing is overwritten)")

    run = Path(opts.output) if opts.output else (
        cache_root() / "finetune"
        / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if (run / "checkpoint_last.pt").exists() or (run / "dataset.json").exists():
        raise DinomixError(f"{run} already holds a fine-tuning run; choose another --output (nothing is overwritten)")
    cases = [c.model_copy(update={"image": str(ds.path(c.image).resolve()),
                                  "label": str(ds.path(c.label).resolve()) if c.label else None,
                                  "split": "holdout" if c.id in hold else "train"}) for c in ds.cases]
    manifest_ds = Dataset(name=f"finetune-{ds.name}", cases=cases)
    manifest = manifest_ds.save(run / "dataset.json")
    manifest_ds = load_dataset(manifest)  # as the trainer reads it, so the preprocessed cache keys match

    # Config: the parent's training config where it has one (optimiser, sampling...), its model description always.
    parent_cfg = meta.training.get("config") if isinstance(meta.training.get("config"), dict) else None
    try:
        cfg = TrainConfig.model_validate(parent_cfg) if parent_cfg else TrainConfig()
    except Exception as exc:  # an older or foreign config: start from the defaults, and say so
        rep.log(f"the training config stored in '{meta.model_id}' does not validate here ({str(exc).splitlines()[0]}); "
                "fine-tuning with the default training settings", "warning")
        cfg, parent_cfg = TrainConfig(), None
    modes = dict(meta.preprocessing.modes)
    mode = "fast" if "fast" in modes else next(iter(modes))
    div = meta.architecture.divisor
    roi = fit_roi(meta.preprocessing.mode(mode).roi_size, div)
    t = lap("prepare", t0)

    # Route: which organs the corrections changed (the parent's predictions on the corrected scans).

    from ..inference import pick_device

    device = pick_device(opts.device)
    parent_net, _ = load_model(entry.path, device)
    labeled_cases = [c for c in manifest_ds.cases if c.split == "train" and c.labeled]
    rep.begin("route", f"comparing '{meta.model_id}' with the corrections of {len(labeled_cases)} scans")
    cached_lab = cache_cases(manifest_ds, labeled_cases, meta.organs, meta.preprocessing, mode,
                             cache_dir=preprocessed_dir() if cfg.data.persistent_cache else None)
    check()
    tc = time.monotonic()
    parent_lab, parent_logits = [], []  # the logits: for the organ calibration (training/calibration.py)
    for i, c in enumerate(cached_lab):
        lg, pred = calibration.predict_logits(parent_net, c, roi, div, device)
        parent_logits.append(lg)
        parent_lab.append(pred)
        rep.update((i + 1) / len(cached_lab))
        check()
    t_case = (time.monotonic() - tc) / max(1, len(cached_lab))  # one scan's inference, for the time plan
    names = ["background"] + meta.organs.names
    routing = route_organs(cached_lab, parent_lab, meta.organs.num_classes, opts.route_below)
    parent_routed = getattr(meta.architecture, "routed", None)
    arch = meta.architecture
    if opts.routing == "organs":
        if not routing.classes:
            raise DinomixError(
                "nothing to learn: on the corrected scans the model already agrees with every corrected organ "
                f"to {opts.route_below:g}% Dice or more (" + ", ".join(f"{names[c]} {d:.1f}%" for c, d in
                                                                        routing.parent_dice.items())
                + "); lower --route-below to fine-tune anyway")
        classes = sorted(set(routing.classes) | set(parent_routed.classes if parent_routed else []))
        arch = meta.architecture.model_copy(update={"routed": RoutedConfig(
            classes=classes, blocks=parent_routed.blocks if parent_routed else opts.route_blocks)})
        rep.log("learning from the corrections: " + ", ".join(f"{names[c]} (parent {routing.parent_dice[c]:.1f}% on "
                                                              f"the corrections)" for c in routing.classes)
                + (("; kept as the parent has them: " + ", ".join(f"{names[c]} ({w})" for c, w in
                                                                  routing.kept.items())) if routing.kept else ""))
    elif parent_routed is not None:
        raise DinomixError(f"model '{meta.model_id}' is a routed fine-tune; fine-tune it with --routing organs")
    t = lap("route", t)

    edge = opts.patch_size or (cfg.patch_size[0] if parent_cfg else 48)
    # The parent's own peak rate: at a quarter of it a 10-minute CPU fine-tune with PIC (about 450 iterations)
    # learnt none of the corrected organs (correction-loop benchmark, 2026-12-01); warm-up and cosine decay as ever.
    lr = opts.lr or (cfg.optim.lr if parent_cfg else 2e-3)
    title = meta.title if meta.title.endswith("(fine-tuned)") else f"{meta.title} (fine-tuned)".strip()
    free = [n for n in meta.organs.names if n in set(priority) | set(corrected_organs(train, meta.organs))]
    semi = cfg.semi.model_copy(update={
        "method": opts.method, "init_weights": str(Path(entry.path).resolve()), "ema_warmup": False,
        "pic": cfg.semi.pic.model_copy(update={"priority": {o: opts.priority_weight for o in priority}}),
        "parent_distillation": cfg.semi.parent_distillation.model_copy(
            update=parent_distillation_settings(opts.parent_distillation, free)),
        **finetune_semi_defaults(opts.method, cfg.semi, free if opts.open_organs else []),
        **({} if opts.consistency_weight is None else {"consistency_weight": opts.consistency_weight}),
        # routed: the organs the reviewed ones compete with keep the parent's logits, and an unannotated voxel is
        # already "not a routed organ" to the partial-label loss, so the teacher's pass over the labeled patches
        # (2 of the step's 8 network passes) buys nothing
        **({"fill_partial": False} if opts.routing == "organs" else {})})
    cfg = cfg.model_copy(update={
        "model_id": name, "title": title, "organs": meta.organs.names, "architecture": arch,
        "preprocessing": meta.preprocessing, "modes": modes, "mode": mode, "spacing_mm": modes[mode].spacing_mm,
        # one grid: a fine-tune's unlabeled and mixed patches are drawn on the mode grid only (TrainConfig.train_modes)
        "train_modes": {},
        "data": DataConfig(dataset=str(manifest), train_splits=["train"], eval_split="holdout" if hold else None),
        "patch_size": fit_roi((edge,) * 3, div), "iterations": opts.iterations or 1000, "eval_every": 0,
        "checkpoint_every": 50, "seed": opts.seed, "threads": opts.threads,
        "optim": cfg.optim.model_copy(update={"lr": lr}), "semi": semi})
    cfg = TrainConfig.validated(cfg.model_dump(), "dinomix finetune")

    tr = _trainer(cfg, run, rep, check, opts.device, meta.model_id)
    labeled = [c for c in tr.train_cases if c.label is not None]
    unl_cases = [c for c in tr.train_cases if c.label is None][:MAX_CHECK_SCANS]
    partial = [c.id for c in labeled if not bool(c.annotated.all())]
    rep.log(f"fine-tuning '{meta.model_id}' -> '{name}' ({opts.method}, routing {opts.routing}): {len(labeled)} "
            f"labeled training cases ({len(partial)} partially), {len(tr.train_cases) - len(labeled)} unlabeled, "
            f"{len(tr.eval_cases)} held out; priority organs: {', '.join(priority) or 'none'}")
    if len(modes) > 1:
        rep.log(f"fine-tuning on the {mode} grid ({modes[mode].spacing_mm[0]:g} mm); the new model keeps the "
                f"parent's modes ({', '.join(modes)}), the others running the fine-tuned weights on their grids")
    if priority and opts.method != "pic":
        rep.log(f"--priority only acts through PIC; method {opts.method} ignores it", "warning")
    parent_unl, unl_logits = [], []
    if opts.routing == "organs":
        for case in unl_cases:
            lg, pred = calibration.predict_logits(parent_net, case, roi, div, device)
            unl_logits.append(lg)
            parent_unl.append(pred)
            check()
    t = lap("cache", t)

    before = None
    t_eval = 0.0
    if tr.eval_cases:
        rep.begin("eval_before", f"evaluating '{meta.model_id}' on {len(tr.eval_cases)} held-out cases")
        te = time.monotonic()
        before = tr.evaluate()
        t_eval = time.monotonic() - te
        rep.emit("metric", kind="eval", phase="before", model=meta.model_id, **before)
        rep.log(f"before: mean held-out Dice {before['mean_dice']:.1f}% ({meta.model_id})")
    else:
        rep.log("no held-out labeled cases: the self-check on your own scans will say whether the new model can be "
                "trusted", "warning")
    check()
    t = lap("eval_before", t)

    # What remains after training: the child's predictions for the self-check, the held-out evaluation, export.
    after_s = ((len(labeled) + len(unl_cases)) * t_case * 1.3 + t_eval + 5.0
               + (CALIBRATION_S_PER_SCAN * len(labeled) if opts.routing == "organs" else 0.0))
    loco_ids = _loco_cases(cached_lab, routing.classes) if opts.routing == "organs" and opts.loco else []
    # A branch is trained only where something could keep it: without MIN_LOCO_VOUCH corrected scans to leave out,
    # held-out cases or --keep-unverified, the self-check would send every trained organ back to the parent, so the
    # clinician's minutes are not spent on it (the organ calibration, seconds, still runs).
    train_branch = not (opts.routing == "organs" and not tr.eval_cases and not opts.keep_unverified
                        and len(loco_ids) < MIN_LOCO_VOUCH)
    if not train_branch:
        loco_ids = []
        rep.log(f"{len(labeled)} corrected scan(s) and no held-out case: nothing could check a trained branch, so "
                f"none is trained (correct {MIN_LOCO_VOUCH} or more scans, hold one out, or pass --keep-unverified); "
                "only the organ calibration runs, and the fine-tune ends early", "warning")
    step_s = None
    loco_iters = 0
    if opts.minutes is not None and train_branch:
        rep.begin("calibrate", "timing a few iterations")
        start_state = copy.deepcopy(tr.state(0, 0.0, {"mean_dice": -1.0, "iteration": -1}))
        times = []
        for it in range(CALIBRATION_STEPS):
            check()
            ts = time.monotonic()
            tr.step(it)
            times.append(time.monotonic() - ts)
            rep.update((it + 1) / CALIBRATION_STEPS)
        tr.restore_state(start_state)
        step_s = statistics.mean(times[1:]) if len(times) > 1 else times[0]
        step_s *= 1.0 + 0.5 / cfg.checkpoint_every  # checkpoints and per-iteration bookkeeping
        budget_s = opts.minutes * 60.0
        extra = len(loco_ids) * (2 * t_case + 3.0)  # each left-out scan: its set-up and two predictions
        n_all = plan_iterations(budget_s, time.monotonic() - t0, step_s, after_s + extra)
        if loco_ids:
            loco_iters = int(n_all * LOCO_SHARE / len(loco_ids))
            if loco_iters < MIN_ITERATIONS:
                loco_ids, loco_iters = [], 0
        n = n_all - loco_iters * len(loco_ids)
        if n < MIN_ITERATIONS:
            need = (time.monotonic() - t0 + after_s + MIN_ITERATIONS * step_s) / 0.92 / 60.0
            raise DinomixError(f"a budget of {opts.minutes:g} min leaves time for {n} iterations (setup and evaluation "
                               f"took {time.monotonic() - t0:.0f} s, one iteration takes {step_s:.1f} s); "
                               f"give at least {math.ceil(need)} minutes")
        cfg.iterations = n
        rep.emit("metric", kind="plan", iterations=n, step_s=round(step_s, 3), budget_s=budget_s,
                 spent_s=round(time.monotonic() - t0, 1), loco_iterations=loco_iters, loco_scans=len(loco_ids))
        rep.log(f"budget {opts.minutes:g} min: {n} iterations at {step_s:.2f} s each"
                + (f", and {loco_iters} for each of {len(loco_ids)} leave-one-scan-out checks" if loco_ids else ""))
    elif train_branch:
        loco_iters = max(MIN_ITERATIONS, int(cfg.iterations * LOCO_SHARE / max(1, len(loco_ids)))) if loco_ids else 0
    t = lap("calibrate", t)

    deadline = t0 + opts.minutes * 60.0 if opts.minutes is not None else None
    parent_warmup = cfg.optim.warmup_iters

    def warmup(n: int) -> int:
        w = max(1, min(parent_warmup, n // 10))
        return max(w, min(n // 2, ROUTED_WARMUP)) if opts.routing == "organs" else w

    # Leave-one-scan-out: the same fine-tune without one corrected scan, scored on that scan.
    loco: dict[int, list[float]] = {}
    for j, cid in enumerate(loco_ids):
        rep.begin("loco", f"leave-one-scan-out {j + 1}/{len(loco_ids)}: without {cid}")
        k = next(i for i, c in enumerate(cached_lab) if c.id == cid)
        sub_cfg = cfg.model_copy(update={"iterations": loco_iters, "checkpoint_every": max(1, loco_iters),
                                         "optim": cfg.optim.model_copy(update={"warmup_iters": warmup(loco_iters)}),
                                         "data": cfg.data.model_copy(
            update={"cases": [c.id for c in tr.train_cases if c.id != cid], "eval_split": None})})
        sub = _trainer(TrainConfig.validated(sub_cfg.model_dump(), "dinomix finetune"), run / f"loco-{j + 1}", rep,
                       check, opts.device, meta.model_id, quiet=True)
        if deadline is not None:
            assert step_s is not None  # timed above: a deadline and a branch to train (loco_ids is empty without)
            fold_end = time.monotonic() + loco_iters * step_s * 1.05
            sub.replan = _replanner(sub.cfg, fold_end, 0.0, time.monotonic())
        sub.run()
        child_pred = predict(sub.net, cached_lab[k], roi, div, device)
        for cls, d in loco_deltas(cached_lab, k, parent_lab[k], child_pred, routing.classes).items():
            loco.setdefault(cls, []).append(round(d, 2))
        del sub
        check()
    t = lap("loco", t)

    cfg.optim.warmup_iters = warmup(cfg.iterations)

    def info(done: int, elapsed: float) -> dict:
        if deadline is not None:
            left = deadline - time.monotonic()
        else:
            left = (cfg.iterations - done) * elapsed / max(done, 1) + after_s
        return {"kind": "train", "iterations": cfg.iterations, "time_left_s": round(max(0.0, left), 1)}

    tr.info_hook = info
    if deadline is not None:
        tr.replan = _replanner(cfg, deadline, after_s, time.monotonic())
    tr.provenance = {"finetune": {"parent": meta.model_id, "parent_weights_sha256": meta.weights_sha256,
                                  "method": opts.method, "priority": priority, "priority_weight": opts.priority_weight,
                                  "parent_distillation": cfg.semi.parent_distillation.model_dump(),
                                  "routing": opts.routing, "minutes": opts.minutes, "holdout": sorted(hold),
                                  "partially_labeled": partial}}
    res = tr.run() if train_branch else {"time_s": 0.0, "iterations": 0}
    iterations = cfg.iterations if train_branch else 0
    check()
    t = lap("train", t)

    sc = None
    offsets: dict[int, float] = {}
    if opts.routing == "organs":
        rep.begin("self_check", "checking the new model against its parent on your scans")
        if train_branch:
            child_lab = [predict(tr.net, c, roi, div, device) for c in cached_lab]
            check()
            child_unl = [predict(tr.net, c, roi, div, device) for c in unl_cases]
            # held-out cases can vouch for what the corrected scans cannot: then keep it until they have spoken
            sc = self_check(names, routing, cached_lab, parent_lab, child_lab, parent_unl, child_unl, loco,
                            keep_unverified=opts.keep_unverified or bool(tr.eval_cases))
            tr.net.restrict_routing([c for c in tr.net.routed.classes if c not in sc.removed])
        else:
            sc = untrained_check(names, routing, len(labeled))
            # the untrained branch starts as the parent's output path: keep only the parent's own routed organs
            carried = set(parent_routed.classes) if parent_routed else set()
            tr.net.restrict_routing([c for c in tr.net.routed.classes if c in carried])
        tr.cfg.architecture = tr.net.cfg
        t = lap("self_check", t)
        rep.begin("organ_calibration", "fitting one offset per corrected organ on your scans")
        offsets = _calibrate(tr.net, sc, names, routing.classes, cached_lab, parent_logits, parent_lab,
                             list(zip(unl_logits, parent_unl)), opts.keep_unverified or bool(tr.eval_cases), rep)
        t = lap("organ_calibration", t)
    t = lap("self_check", t)

    after = None
    if tr.eval_cases:  # the final model, after the self-check sent failing organs back to the parent
        rep.begin("eval_after", f"evaluating '{name}' on {len(tr.eval_cases)} held-out cases")
        after = tr.evaluate()
        rep.emit("metric", kind="eval", phase="after", model=name, **after)
        rep.log(f"after: mean held-out Dice {after['mean_dice']:.1f}% ({name})")
    per, worse, verdict = compare(before, after)
    rep.log(f"'{name}' is {verdict}" if worse is not None else f"'{name}': {verdict}",
            "warning" if worse or worse is None else "info")
    t = lap("eval_after", t)

    if sc is not None and after and (tr.net.routed is not None or offsets) and not opts.keep_unverified:
        # organs the held-out cases say are worse go back to the parent's output, and the final model is scored again
        harmed = [c for c in getattr(tr.net.routed, "classes", []) if (per.get(names[c]) or {}).get("delta") is not None
                  and per[names[c]]["delta"] < -1.0]
        harmed_offsets = {c: b for c, b in offsets.items() if (per.get(names[c]) or {}).get("delta") is not None
                          and per[names[c]]["delta"] < -1.0}
        if harmed or harmed_offsets:
            for c in harmed:
                sc.removed[c] = f"worse on the held-out cases ({per[names[c]]['delta']:+.1f} Dice points)"
            if harmed:
                tr.net.restrict_routing([c for c in tr.net.routed.classes if c not in harmed])
                tr.cfg.architecture = tr.net.cfg
            for cls in harmed_offsets:
                sc.drop_offset(cls, names, f"worse on the held-out cases ({per[names[cls]]['delta']:+.1f} Dice points)")
                offsets.pop(cls)
            calibration.apply_offsets(tr.net, {c: -b for c, b in harmed_offsets.items()})
            harmed = harmed + list(harmed_offsets)
            after = tr.evaluate()
            rep.emit("metric", kind="eval", phase="after", model=name, **after)
            per, worse, verdict = compare(before, after)
            rep.log(f"without {', '.join(names[c] for c in harmed)}: '{name}' is {verdict}")
    if sc is not None:
        if after:
            sc.add_holdout([f"{o} {v['delta']:+.1f}" for o, v in per.items()
                            if v["delta"] is not None and v["delta"] < -1.0])
        check_result = sc.as_dict()
    else:
        check_result = {"verdict": "unsafe" if worse else ("safe" if worse is False else "unknown"),
                        "message": ("Every organ was fine-tuned (--routing off): nothing keeps the organs nobody "
                                    "corrected. " + verdict),
                        "checks": [{"name": "held-out cases", "passed": None if worse is None else not worse,
                                    "detail": verdict}], "removed": {}, "per_organ": {}}
    rep.log(f"self-check: {check_result['verdict']}: {check_result['message']}",
            "info" if check_result["verdict"] == "safe" else "warning")

    rep.begin("register", f"registering '{name}'")
    tr.provenance["finetune"].update({"before": before, "after": after, "worse_than_parent": worse,
                                      "verdict": verdict, "self_check": check_result,
                                      "routed_organs": [names[c] for c in getattr(tr.net.cfg.routed, "classes", [])],
                                      "calibrated_organs": {names[c]: b for c, b in offsets.items()}})
    registered = None
    for _ in range(5):
        final_path = run / f"{cfg.model_id}.safetensors"
        tr.export(final_path, iterations, res["time_s"], after)
        try:
            registered = registry.import_model(final_path)
            break
        except DinomixError:
            if opts.new_name or cfg.model_id not in {e.name for e in registry.list_models()}:
                raise
            cfg.model_id = next_version_name(meta.model_id, {e.name for e in registry.list_models()})  # lost a race
    if registered is None:
        raise DinomixError("could not find a free name for the new model version")
    name = registered.name
    lap("register", t)
    return {"model": name, "parent": meta.model_id, "path": str(registered.path), "method": opts.method,
            "priority": priority, "iterations": iterations, "time_s": round(time.monotonic() - t0, 1),
            "train_time_s": res["time_s"], "step_s": round(step_s, 3) if step_s else None,
            "budget": {"minutes": opts.minutes, "iterations": opts.iterations},
            "train_cases": {"labeled": [c.id for c in labeled], "partially_labeled": partial,
                            "unlabeled": [c.id for c in tr.train_cases if c.label is None]},
            "holdout": sorted(hold), "evaluation": "model-grid Dice % on the held-out cases (sliding window, "
                                                  "training preprocessing)",
            "before": before, "after": after, "per_organ": per, "worse_than_parent": worse, "verdict": verdict,
            "self_check": check_result, "routing": {
                "mode": opts.routing, "routed": [names[c] for c in getattr(tr.net.cfg.routed, "classes", [])],
                "calibrated": {names[c]: b for c, b in offsets.items()},
                "parent_dice_on_corrections": {names[c]: d for c, d in routing.parent_dice.items()},
                "kept": {names[c]: w for c, w in routing.kept.items()}, "loco_scans": loco_ids,
                "loco_iterations": loco_iters},
            "timings_s": timings, "run_dir": str(run)}


def _calibrate(net, sc, names: list[str], classes: list[int], cached_lab: list, logits: list, parent_lab: list,
               unlabeled: list, keep_unverified: bool, rep) -> dict[int, float]:
    """Organ calibration (training/calibration.py) of the routed organs the trained branch could not keep: one
    logit offset per organ, fitted on the corrected scans, kept where leave-one-scan-out vouches for it (or, with
    `keep_unverified`, wherever it fits the corrections), written into the network's output biases. Returns the
    offsets applied {class: offset} and records them in the self-check `sc`."""
    from ..training import calibration

    branch = set(getattr(net.routed, "classes", None) or [])
    todo = [c for c in classes if c not in branch]
    if not todo:
        return {}
    scans = [calibration.Scan.of(case, lg, p) for case, lg, p in zip(cached_lab, logits, parent_lab)]
    cal = calibration.calibrate(scans, todo)
    kept, dropped = calibration.vouch(cal, scans, unlabeled, names)
    unverified = {}
    if keep_unverified:  # the held-out cases (or the clinician, --keep-unverified) decide instead of leave-one-out
        unverified = {c: b for c, b in cal.offsets.items() if c not in kept and c in dropped
                      and len(cal.loco.get(c) or []) < calibration.MIN_CAL_VOUCH}
    applied = {**kept, **unverified}
    calibration.apply_offsets(net, applied)
    sc.add_calibration(names, cal, kept, unverified, {c: w for c, w in dropped.items() if c not in unverified})
    if applied:
        rep.log(calibration.describe(applied, cal, names))
    return applied


def _trainer(cfg, run: Path, rep, check, device: str, parent_id: str, quiet: bool = False):
    """A set-up SemiTrainer for this config (quiet: its log lines and progress are not reported)."""
    from ..events import Reporter
    from ..training.semi import SemiTrainer

    tr = SemiTrainer(cfg, run, Reporter(bar=False) if quiet else rep, check, device)
    tr.parent_id = parent_id
    tr.setup()
    check()
    return tr


def _loco_cases(cached_lab: list, classes: list[int]) -> list[str]:
    """Corrected scans to leave out one at a time (at most MAX_LOCO_SCANS): those annotating a routed organ, when
    at least two do (with one, nothing is left to learn from)."""
    ids = [c.id for c in cached_lab if any(c.annotated[k] and bool((c.label == k).any()) for k in classes)]
    return ids[:MAX_LOCO_SCANS] if len(ids) >= 2 else []


def _replanner(cfg, deadline: float, after_s: float, started: float) -> Callable[[int, float], int]:
    """Re-plans the iteration count from the measured pace so that training ends `after_s` before the deadline:
    the pace of the last iterations (a machine that slows down mid-run is followed within a few steps)."""
    marks: list[tuple[int, float]] = []

    def replan(done: int, elapsed: float) -> int:  # noqa: ARG001
        now = time.monotonic()
        marks.append((done, now))
        del marks[:-REPLAN_WINDOW]
        if len(marks) < 2:
            pace = (now - started) / max(done, 1)
        else:
            pace = (marks[-1][1] - marks[0][1]) / max(1, marks[-1][0] - marks[0][0])
        left = deadline - after_s - now
        n = done + max(0, math.floor(left / max(pace, 1e-6)))
        return n if abs(n - cfg.iterations) > max(1, 0.02 * cfg.iterations) or n < cfg.iterations else cfg.iterations

    return replan
