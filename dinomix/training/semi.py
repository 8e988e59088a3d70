"""Semi-supervised training: mean teacher, pseudo-labels with confidence masking, random CutMix or PIC on
labeled and unlabeled patches, on top of the supervised trainer (trainer.py).

Methods (`TrainConfig.semi.method`), all on the same data, iterations and seed so an ablation is fair:

* ``supervised``: the supervised loss only (with `semi.init_weights`, a plain supervised fine-tune).
* ``mean_teacher``: + the teacher's confident pseudo-labels on the unlabeled patches, learnt by the student
  from a differently augmented view (no mixing).
* ``cutmix``: + random CutMix, both directions: a box of a labeled patch into each unlabeled patch, and a box
  of an unlabeled patch into each labeled patch (dinomix/methods/pic.py `cutmix`).
* ``pic``: + PIC, Progressive Imbalance-aware CutMix (dinomix/methods/pic.py `PIC`), both directions.

Each iteration: `batch_size` labeled patches (class-balanced, BalancedSampler) and `semi.unlabeled_batch`
unlabeled patches (random crops); the teacher (EMA of the student, decay `ema_decay`) labels the unlabeled
patches; voxels whose teacher probability is below `confidence` get weight 0. Loss = partial-label Dice + CE
on the labeled patches + w(t) * the same loss, voxel-weighted and with per-voxel annotated classes
(`masked_partial_dice_ce`), on the mixed patches, whose labels are mixed ground truth / pseudo-labels;
w(t) = consistency_weight * exp(-5 (1 - t / T_ramp)^2) (sigmoid ramp-up, T_ramp = rampup * iterations).
Which pseudo-labels count: one fixed threshold, or per-class thresholds from the teacher's confidence quantiles
(`pseudo_labels`, dinomix/methods/thresholds.py); `pseudo_labels.open_organs` (fine-tuning) are organs a
background pseudo-label does not rule out (merged with it, as for partial labels). With `student_patches:
mixed` the student sees only the mixed patches: the supervised loss on their ground-truth voxels, the
consistency loss on their pseudo-labelled ones.
Fine-tuning (`init_weights`) can add a distillation from the frozen parent on every voxel without ground truth
(`parent_distillation`, dinomix/methods/parent_distillation.py), in every method.

Partial and missing labels: a labeled case annotates a set of organs; label values of organs it does not
annotate are unknown and treated as such (set to 0 = "background or an unannotated organ", the marginal
loss). With `fill_partial`, voxels of partially labeled patches that the annotation leaves unknown take the
teacher's confident label in the mixed loss. Without unlabeled cases, the labeled images serve as unlabeled
patches too (their labels unused there).

Exact resume: all draws of iteration `it` (crops, augmentation, organ sampling, boxes) come from the
generators seeded by (seed, it); the teacher's weights and PIC's class frequencies are in every checkpoint.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any, Optional, Sequence, cast

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DinomixError
from ..methods.action import ActionComponent
from ..methods.components import AuxBatch, AuxComponent
from ..methods.fkd import FKDComponent, TeacherFeatures
from ..methods.parent_distillation import unbiased_distillation, voxels_without_ground_truth
from ..methods.pic import PIC, Patches, cutmix
from ..methods.scdl import SCDLComponent
from ..methods.thresholds import ClassThresholds
from ..modelfile import ModelMeta, load_model
from ..nets.dinov3 import ENV_WEIGHTS, find_teacher_weights
from ..nets.unet import StudentConfig, StudentUNet
from ..nets.window_routing import WindowRoutingConfig
from . import organ_volumes
from .data import CachedCase, augment, crop
from .losses import partial_dice_ce
from .trainer import Trainer, lr_at

# ---------------------------------------------------------------- schedule and loss

def sigmoid_rampup(it: int, length: int) -> float:
    """exp(-5 (1 - x)^2) for x = it / length clipped to [0, 1] (Laine & Aila); 1 when length is 0."""
    if length <= 0:
        return 1.0
    x = min(1.0, max(0.0, it / length))
    return float(math.exp(-5.0 * (1.0 - x) ** 2))


def masked_partial_dice_ce(logits: torch.Tensor, target: torch.Tensor, ann: torch.Tensor, weight: torch.Tensor,
                           ce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5) -> torch.Tensor:
    """`partial_dice_ce` with the annotated classes given per voxel and a per-voxel weight.

    logits (B,C,...), target (B,...) long, ann (B,C,...) bool (classes annotated at each voxel, [:,0] True),
    weight (B,...) >= 0. Where target is 0, the probabilities of background and of every class not annotated
    at that voxel merge into one (marginal loss). CE is the weighted sum over voxels divided by the number of
    voxels (weight-0 voxels count as zero loss, as in FixMatch); the soft Dice of class c is taken over the
    voxels where c is annotated, weighted, for the organs present there. With weight 1 and `ann` constant
    per sample this is exactly `partial_dice_ce`.
    """
    B, C = logits.shape[:2]
    logp = F.log_softmax(logits.float(), dim=1)
    ann = ann.to(logits.device).bool()
    w = weight.to(logits.device).float()
    merge = ~ann
    merge[:, 0] = True
    neg = torch.finfo(logp.dtype).min
    merged_bg = torch.logsumexp(torch.where(merge, logp, torch.full_like(logp, neg)), dim=1)
    tgt_logp = logp.gather(1, target.unsqueeze(1)).squeeze(1)
    voxel_logp = torch.where(target == 0, merged_bg, tgt_logp)
    ce = -(w * voxel_logp).sum() / voxel_logp.numel()

    probs = logp.exp()
    onehot = F.one_hot(target, C).movedim(-1, 1).to(probs.dtype)
    wv = ann.to(probs.dtype) * w.unsqueeze(1)
    dims = tuple(range(2, logits.dim()))
    inter = (wv * probs * onehot).sum(dims)
    gt = (wv * onehot).sum(dims)
    denom = (wv * probs).sum(dims) + gt
    dice = (2 * inter + smooth) / (denom + smooth)
    organ_mask = gt > 0
    organ_mask[:, 0] = False
    n = organ_mask.sum()
    dice_loss = (1 - dice)[organ_mask].sum() / n.clamp(min=1)
    return ce_weight * ce + dice_weight * dice_loss


def sanitize_labels(lab: torch.Tensor, ann: torch.Tensor) -> torch.Tensor:
    """Label values of classes a sample does not annotate -> 0 (unknown, handled by the marginal loss)."""
    keep = torch.gather(ann.bool(), 1, lab.reshape(lab.shape[0], -1)).reshape(lab.shape)
    return torch.where(keep, lab, torch.zeros_like(lab))


def open_background(ann: torch.Tensor, target: torch.Tensor, open_classes: Optional[torch.Tensor],
                    where: Optional[torch.Tensor] = None) -> None:
    """In place: at pseudo-labelled background voxels (`where`, default everywhere), the `open_classes` (bool, C)
    become unannotated, so the marginal loss merges them with background (semi.pseudo_labels.open_organs).
    ann (B,C,...) bool, target (B,...) long."""
    if open_classes is None or not bool(open_classes.any()):
        return
    bg = target == 0
    if where is not None:
        bg &= where
    idx = torch.nonzero(open_classes).reshape(-1)
    ann[:, idx] &= ~bg.unsqueeze(1)


# ---------------------------------------------------------------- data

class UnlabeledSampler:
    """Random crops (centre uniform in the volume) of the images of some cases; labels are never read."""

    def __init__(self, cases: list[CachedCase], patch: tuple[int, int, int]) -> None:
        if not cases:
            raise DinomixError("no case to draw unlabeled patches from")
        self.cases = cases
        self.patch = patch
        self.last_draws: list[tuple[CachedCase, np.ndarray]] = []

    def batch(self, rng: np.random.Generator, size: int) -> torch.Tensor:
        out = []
        self.last_draws = []
        for _ in range(size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            centre = np.array([rng.integers(0, n) for n in case.image.shape[1:]])
            start = centre - np.array(self.patch) // 2
            out.append(crop(case.image, start, self.patch, 0.0))
            self.last_draws.append((case, start))
        return torch.stack(out)


def labeled_patches(img: torch.Tensor, lab: torch.Tensor, ann: torch.Tensor,
                    extra: Optional[dict[str, torch.Tensor]] = None) -> Patches:
    shape = lab.shape
    ann_vox = ann.bool().view(ann.shape[0], ann.shape[1], 1, 1, 1).expand(-1, -1, *shape[1:]).clone()
    return Patches(img, lab.clone(), ann_vox, torch.ones(shape, dtype=torch.float32), dict(extra or {}))


def fill_unknown(lab: Patches, ann: torch.Tensor, pseudo: torch.Tensor, sure: torch.Tensor,
                 conf: Optional[torch.Tensor] = None, open_classes: Optional[torch.Tensor] = None) -> None:
    """In place: voxels of partially labeled patches whose label is unknown (0 while some organ is not
    annotated) take the teacher's confident class when that is background or an organ the patch does not
    annotate; they then count as annotated for every class, except that a teacher background leaves the
    `open_classes` the patch does not annotate unknown (semi.pseudo_labels.open_organs). A teacher vote for an
    annotated organ there is overruled by the annotation (the organ is not there)."""
    ann = ann.bool()
    for b in torch.nonzero(~ann.all(dim=1)).reshape(-1).tolist():
        tc = pseudo[b]
        ok = (lab.target[b] == 0) & sure[b] & ((tc == 0) | ~ann[b][tc])
        lab.target[b][ok] = tc[ok]
        lab.ann[b][:, ok] = True
        if open_classes is not None:
            still_open = open_classes & ~ann[b]
            open_background(lab.ann[b:b + 1], lab.target[b:b + 1], still_open, ok[None])
        if conf is not None and "confidence" in lab.extra:
            lab.extra["confidence"][b, 0][ok] = conf[b][ok]
        if "from_label" in lab.extra:  # filled voxels are teacher pseudo-labels, not ground truth
            lab.extra["from_label"][b, 0][ok] = 0.0


# ---------------------------------------------------------------- trainer

class SemiTrainer(Trainer):
    """The supervised trainer plus mean teacher, pseudo-labels and CutMix / PIC (see the module docstring)."""

    def __init__(self, *args, init_model: Optional[tuple[torch.nn.Module, ModelMeta]] = None, **kwargs) -> None:
        """`Trainer`'s arguments, and `init_model`: the model `semi.init_weights` names (network, metadata), when
        the caller has it in memory already (a fine-tune: its parent), so that it is not read again."""
        super().__init__(*args, **kwargs)
        self.init_model = init_model
        self.teacher: Optional[torch.nn.Module] = None
        self.parent: Optional[torch.nn.Module] = None  # frozen initial weights (semi.parent_distillation)
        self.parent_merged: Optional[torch.Tensor] = None
        self.pic: Optional[PIC] = None
        self.open_classes: Optional[torch.Tensor] = None  # semi.pseudo_labels.open_organs as a class mask
        self.thresholds: Optional[ClassThresholds] = None
        self.init_meta: Optional[ModelMeta] = None
        self._info: dict = {}
        self.components = torch.nn.ModuleList()
        self.teacher_features: Optional[TeacherFeatures] = None
        self.fkd_status: dict = {"enabled": False, "reason": "not configured (semi.components.fkd.enabled is false)"}

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """The supervised set-up, then the initial weights, the teacher, the pseudo-label thresholds, PIC and the
        trainer components."""
        super().setup()
        cfg, s = self.cfg, self.cfg.semi
        if s.init_weights:
            self._load_init(s.init_weights)
        if s.parent_distillation.weight > 0:
            self._setup_parent()
        unl = [c for c in self.train_cases if c.label is None]
        self.labeled_ids = [c.id for c in self.train_cases if c.label is not None]
        self.unlabeled_ids = [c.id for c in unl]
        if s.method != "supervised":
            if not unl:
                self.rep.log("no unlabeled cases: the labeled images serve as unlabeled patches too")
            self.unlabeled = UnlabeledSampler(unl or self.train_cases, cfg.patch_size)
            self.teacher = copy.deepcopy(self.net).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
            pl = s.pseudo_labels
            self.thresholds = ClassThresholds(self.schema.num_classes, s.confidence, pl.threshold, pl.quantile,
                                              pl.momentum, pl.floor)
            if pl.open_organs:
                self.open_classes = self._class_mask(pl.open_organs)
                self.rep.log("a teacher's background does not rule out: " + ", ".join(pl.open_organs)
                             + " (merged with background in the pseudo-label loss)")
        if s.method == "pic":
            priority = np.ones(self.schema.num_classes)
            for name, mult in s.pic.priority.items():
                if mult < 0:
                    raise DinomixError(f"PIC priority of '{name}' must be >= 0, got {mult}")
                priority[self.schema.by_name(name).value] = mult
            self.pic = PIC(self.schema.num_classes, self.sampler.freq, priority, s.pic.alpha0,
                           s.pic.freq_momentum, self._box_fraction())
        self.rep.log(f"method {s.method}: {len(self.labeled_ids)} labeled and {len(unl)} unlabeled training cases"
                     + ("" if s.method == "supervised" else
                        f"; {cfg.batch_size} labeled + {s.unlabeled_batch} unlabeled patches per iteration, "
                        f"teacher EMA {s.ema_decay}, confidence {self._threshold_text()}"
                        + ("; the student sees only the mixed patches" if s.student_patches == "mixed" else "")))
        self._setup_components()

    def _box_fraction(self) -> tuple[float, float]:
        """semi.box_fraction as a tuple (min, max)."""
        lo, hi = self.cfg.semi.box_fraction
        return lo, hi

    def _aux_components(self) -> list[AuxComponent]:
        """The trainer components: `self.components` holds only AuxComponent modules (`_setup_components`)."""
        return [cast(AuxComponent, c) for c in self.components]

    def _class_mask(self, names: list[str]) -> torch.Tensor:
        """Bool (C,) mask of the named organs (a clear error for a name the model does not know)."""
        mask = torch.zeros(self.schema.num_classes, dtype=torch.bool)
        for name in names:
            mask[self.schema.by_name(name).value] = True
        return mask

    def _setup_parent(self) -> None:
        """The frozen copy of the initial weights that semi.parent_distillation distils from."""
        pd = self.cfg.semi.parent_distillation
        merged = self._class_mask(pd.free_organs)
        merged[0] = True
        self.parent = copy.deepcopy(self.net).eval()
        for p in self.parent.parameters():
            p.requires_grad_(False)
        self.parent_merged = merged.to(self.device)
        free = ", ".join(pd.free_organs) or "none"
        self.rep.log(f"parent distillation (weight {pd.weight:g}, T {pd.temperature:g}) on the voxels without ground "
                     f"truth; merged with background, so the parent has no say on them: {free}")

    @property
    def _track_ground_truth(self) -> bool:
        """Whether the patches carry `from_label` (1 = ground-truth voxel), mixed along with them."""
        return self.cfg.semi.student_patches == "mixed" or self.parent is not None

    def _parent_loss(self, x: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """semi.parent_distillation, weighted, on the student's input x (already augmented) and its logits."""
        pd = self.cfg.semi.parent_distillation
        assert self.parent is not None and self.parent_merged is not None  # both set by _setup_parent
        with torch.no_grad():
            parent_logits = self._forward(self.parent, x)
        return pd.weight * unbiased_distillation(logits, parent_logits, self.parent_merged, mask.to(logits.device),
                                                 pd.temperature)

    @staticmethod
    def _no_gt(rows: Patches) -> torch.Tensor:
        return voxels_without_ground_truth(rows.target, rows.ann, rows.extra["from_label"][:, 0])

    def _threshold_text(self) -> str:
        s = self.cfg.semi
        if s.pseudo_labels.threshold == "fixed":
            return str(s.confidence)
        pl = s.pseudo_labels
        return f"per class: {pl.quantile:g}-quantile of the teacher's confidence, in [{pl.floor:g}, {s.confidence:g}]"

    def _setup_components(self) -> None:
        """Trainer components (semi.components): built, moved to the device, optimised with the student."""
        comp, C = self.cfg.semi.components, self.schema.num_classes
        if not comp.fkd.enabled:
            self.rep.log("FKD off: not configured (semi.components.fkd.enabled is false)")
        if not comp.any_enabled:
            return
        arch = self.cfg.architecture
        if not isinstance(arch, StudentConfig):  # the family "student_unet"
            raise DinomixError("trainer components (semi.components) need the student U-Net architecture")
        if comp.fkd.enabled:
            weights = find_teacher_weights(comp.fkd.weights)
            if weights is None:
                self.fkd_status = {"enabled": False, "reason": "no DINOv3 teacher weights available (set "
                                   f"semi.components.fkd.weights or ${ENV_WEIGHTS})"}
                self.rep.log(f"FKD is off: {self.fkd_status['reason']}; training continues without it", "warning")
            else:
                tf = TeacherFeatures(comp.fkd, weights, self.pp.model_dump(mode="json"))
                self.rep.begin("fkd-features", f"DINOv3 teacher features of {len(self.train_cases)} cases")

                def progress(i: int, n: int) -> None:
                    self.check()
                    self.rep.update(i / n, f"teacher {i}/{n}")

                tf.prepare(self.train_cases, progress)
                self.teacher_features = tf
                pyramid = list(reversed(arch.channels))
                if -comp.fkd.level > len(pyramid):
                    raise DinomixError(f"semi.components.fkd.level {comp.fkd.level}: the student has {len(pyramid)} "
                                       "decoder maps")
                self.components.append(FKDComponent(comp.fkd, pyramid[comp.fkd.level], tf.channels, C))
                self.fkd_status = {"enabled": True, "teacher_weights_sha256": tf.weights_sha,
                                   "teacher": {"embed_dim": tf.vit.embed_dim, "depth": tf.vit.depth},
                                   "features_computed": tf.cache.computed}
                self.rep.log(f"FKD on: DINOv3 teacher ({tf.vit.embed_dim}-d, layers {comp.fkd.layers}) from "
                             f"{weights}; {tf.cache.computed} of {len(self.train_cases)} feature volumes computed, "
                             "the rest from the cache")
        if comp.scdl.enabled:
            self.components.append(SCDLComponent(comp.scdl, C, arch.channels[0]))
        if comp.action.enabled:
            self.components.append(ActionComponent(comp.action, C, list(reversed(arch.channels))))
        if len(self.components):
            n_aux = sum(p.numel() for p in self.components.parameters())
            self.rep.log("trainer components: " + ", ".join(c.name for c in self._aux_components())
                         + f" ({n_aux:,} training-only parameters, not in the model file)")
            self.components.to(self.device)
            self.opt.add_param_group({"params": list(self.components.parameters())})

    def _load_init(self, path: str) -> None:
        p = Path(path)
        net, meta = self.init_model if self.init_model is not None else load_model(p)
        if getattr(self.cfg.architecture, "routed", None) is not None:
            self._load_init_routed(p, net, meta)
            return
        if meta.architecture != self.cfg.architecture:
            raise DinomixError(f"init_weights {p.name}: its architecture {meta.architecture.model_dump()} differs "
                               f"from the config's {self.cfg.architecture.model_dump()}")
        if meta.organs.names != self.schema.names:
            raise DinomixError(f"init_weights {p.name}: its organs ({', '.join(meta.organs.names)}) differ from the "
                               f"config's ({', '.join(self.schema.names)})")
        self.net.load_state_dict(net.state_dict())
        self.init_meta = meta
        if not meta.trained:
            self.rep.log(f"starting from '{meta.model_id}', which is UNTRAINED (random weights)", "warning")

    def _load_init_routed(self, p: Path, net: torch.nn.Module, meta: ModelMeta) -> None:
        """A routed fine-tune (network.RoutedConfig): the parent's network frozen, its output path copied into the
        branch that alone learns, so the new model starts as exactly the parent."""
        arch = self.cfg.architecture
        # a routed architecture is a student U-Net's (`_load_init`), built by network.build_network
        assert isinstance(arch, StudentConfig) and arch.routed is not None
        assert isinstance(self.net, StudentUNet) and isinstance(net, StudentUNet)
        plain = arch.model_copy(update={"routed": None})
        if meta.architecture.model_copy(update={"routed": None}) != plain:
            raise DinomixError(f"init_weights {p.name}: its architecture differs from the config's")
        if meta.organs.names != self.schema.names:
            raise DinomixError(f"init_weights {p.name}: its organs differ from the config's")
        self.net.init_branch_from(net)
        self.net.freeze_trunk()
        self.init_meta = meta
        names = ["background"] + self.schema.names
        self.rep.log("only the routed organs learn (" + ", ".join(names[c] for c in arch.routed.classes)
                     + f"); every other organ keeps '{meta.model_id}''s output; "
                     f"{sum(p.numel() for p in self.net.branch_parameters()):,} trainable parameters")

    # ------------------------------------------------------------------ state
    def state(self, it: int, elapsed: float, best: dict) -> dict:
        st = super().state(it, elapsed, best)
        if self.teacher is not None:
            st["teacher"] = self.teacher.state_dict()
        if self.pic is not None:
            st["pic"] = self.pic.state_dict()
        if self.thresholds is not None:
            st["thresholds"] = self.thresholds.state_dict()
        if len(self.components):
            st["components"] = {"modules": self.components.state_dict(),
                                "extra": [c.extra_state() for c in self._aux_components()]}
        return st

    def load_checkpoint(self) -> dict:
        st = super().load_checkpoint()
        self._load_extra(st)
        return st

    def _load_extra(self, st: dict) -> None:
        if self.teacher is not None:
            if "teacher" not in st:
                raise DinomixError("cannot resume: the checkpoint holds no teacher weights")
            self.teacher.load_state_dict(st["teacher"])
        if self.pic is not None:
            self.pic.load_state_dict(st["pic"])
        if self.thresholds is not None and "thresholds" in st:  # checkpoints before per-class thresholds: fixed
            self.thresholds.load_state_dict(st["thresholds"])
        if len(self.components):
            if "components" not in st:
                raise DinomixError("cannot resume: the checkpoint holds no trainer-component state")
            self.components.load_state_dict(st["components"]["modules"])
            for c, extra in zip(self._aux_components(), st["components"]["extra"]):
                c.load_extra_state(extra)

    def replicated_modules(self) -> list[torch.nn.Module]:
        """Under torchrun DDP averages the components' gradients too (distributed.py)."""
        return [self.components] if len(self.components) else []

    def restore_state(self, st: dict) -> None:
        """Back to an in-memory state (from `state`), e.g. after timing a few trial iterations."""
        st = copy.deepcopy(st)
        self.net.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.scaler.load_state_dict(st["scaler"])
        self.history = list(st["history"])
        self._load_extra(st)

    # ------------------------------------------------------------------ loop
    def _fetch_labeled(self, c: int, rng: np.random.Generator) -> Optional[Patches]:
        """A labeled crop around a random voxel of class c (PIC source when the batch has none)."""
        smp = self.sampler
        holders = smp.holders.get(c) or []
        if not holders:
            return None
        case = smp.cases[int(rng.choice(holders))]
        assert case.label is not None  # the sampler keeps only labeled cases
        flat = int(case.indices[c][rng.integers(len(case.indices[c]))])
        centre = np.array(np.unravel_index(flat, case.label.shape))
        centre = centre + (rng.uniform(-smp.jitter, smp.jitter, 3) * np.array(smp.patch)).astype(int)
        start = centre - np.array(smp.patch) // 2
        img = crop(case.image, start, smp.patch, 0.0)[None]
        ann = torch.from_numpy(np.asarray(case.annotated))[None]
        lab = sanitize_labels(crop(case.label, start, smp.patch, 0)[None].long(), ann)
        out = labeled_patches(img, lab, ann, self._extras([(case, start)], None))
        if self._track_ground_truth:
            out.extra["from_label"] = torch.ones((1, 1) + tuple(smp.patch))
        return out

    def _forward(self, net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=self.use_amp):
            return net(x.to(self.device)).float()

    def _forward_student(self, x: torch.Tensor):
        """(logits, stem, decoder pyramid); the features only when a component needs them."""
        with torch.autocast("cuda", enabled=self.use_amp):
            if len(self.components):
                logits, stem, levels = self.train_net(x.to(self.device), features=True)
                return logits.float(), stem, levels
            return self.train_net(x.to(self.device)).float(), None, None

    def _extras(self, draws: list, conf: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fields mixed along with the patches for the components: the confidence of each voxel's target
        (1 for ground truth, the teacher's max probability for pseudo-labels) and, with FKD, the teacher
        features of each crop on the student's 1/2-resolution feature grid."""
        if not len(self.components):
            return {}
        patch = tuple(self.cfg.patch_size)
        n = len(draws)
        out = {"confidence": (torch.ones((n, 1) + patch) if conf is None else conf[:, None].float().clone())}
        tf = self.teacher_features
        if tf is not None:  # on the grid of the decoder map FKD distils into (level -1: 1/2, -2: 1/4, ...)
            step = 2 ** (-self.cfg.semi.components.fkd.level)
            grid = tuple(p // step for p in patch)
            crops = [tf.crop(case.id, case.image.shape[1:], start, patch, grid) for case, start in draws]
            out["fkd"] = torch.stack([f for f, _ in crops]).half()
            out["fkd_valid"] = torch.stack([v for _, v in crops])
        return out

    def _component_losses(self, it: int, logits: torch.Tensor, stem, levels, rows: Patches, nl: int
                          ) -> dict[str, torch.Tensor]:
        if not len(self.components):
            return {}
        dev = logits.device
        batch = AuxBatch(features=levels, stem=stem, logits=logits, target=rows.target.to(dev),
                         ann=rows.ann.to(dev), confidence=rows.extra["confidence"][:, 0].to(dev),
                         labeled=torch.arange(len(rows), device=dev) < nl, n_labeled=nl, iteration=it,
                         progress=it / max(1, self.cfg.iterations - 1),
                         extra={k: v for k, v in rows.extra.items() if k != "confidence"})
        terms: dict[str, torch.Tensor] = {}
        for comp in self._aux_components():
            terms.update(comp.losses(batch))
        return terms

    def step(self, it: int) -> float:
        cfg, s = self.cfg, self.cfg.semi
        rng = self.iteration_rng(it)  # (seed, it), with the rank under torchrun
        img_l, lab_l, ann_l = self.sampler.batch(rng, cfg.batch_size)
        lab_l = sanitize_labels(lab_l, ann_l)
        lab0 = labeled_patches(img_l, lab_l, ann_l, self._extras(self.sampler.last_draws, None))
        for g in self.opt.param_groups:
            g["lr"] = self._lr(it)
        if s.method == "supervised":
            x = augment(img_l, rng).to(self.device)
            self.net.train()
            self.opt.zero_grad(set_to_none=True)
            logits, stem, levels = self._forward_student(x)
            sup = partial_dice_ce(logits, lab_l.to(self.device), ann_l.to(self.device), cfg.ce_weight,
                                  cfg.dice_weight)
            terms = self._component_losses(it, logits, stem, levels, lab0, len(lab0))
            if self.parent is not None:
                lab0.extra["from_label"] = torch.ones((len(lab0), 1) + tuple(lab_l.shape[1:]))
                terms["loss_parent"] = self._parent_loss(x, logits, self._no_gt(lab0))
            loss = sup + sum(terms.values()) if terms else sup
            self._backward(loss)
            self._info = {k: round(float(v.detach()), 5) for k, v in terms.items()}
            if terms:
                self._info["loss_sup"] = round(float(sup.detach()), 5)
            return float(loss.detach())

        teacher, thresholds = self.teacher, self.thresholds
        assert teacher is not None and thresholds is not None  # set up for every method but supervised
        img_u = self.unlabeled.batch(rng, s.unlabeled_batch)
        nl = img_l.shape[0]
        partial = ~ann_l.bool().all(dim=1)
        fill = s.fill_partial and bool(partial.any())
        with torch.no_grad():
            t_in = torch.cat([img_l, img_u]) if fill else img_u
            prob = torch.softmax(self._forward(teacher, t_in), dim=1).cpu()
        conf, pseudo = prob.max(dim=1)
        if thresholds.mode != "fixed":
            thresholds.observe(*self.dist.gather_cat(conf, pseudo))  # all processes' teacher outputs
        sure = thresholds.mask(conf, pseudo)
        off = nl if fill else 0
        unl = Patches(img_u, pseudo[off:], torch.ones((img_u.shape[0], self.schema.num_classes) + img_u.shape[2:],
                                                      dtype=torch.bool), sure[off:].float(),
                      self._extras(self.unlabeled.last_draws, conf[off:]))
        open_background(unl.ann, unl.target, self.open_classes)
        mixed_only = s.student_patches == "mixed"
        if self._track_ground_truth:  # which voxels carry ground truth, mixed along with them (1 in labeled patches)
            lab0.extra["from_label"] = torch.ones((nl, 1) + tuple(lab_l.shape[1:]))
            unl.extra["from_label"] = torch.zeros((len(unl), 1) + tuple(img_u.shape[2:]))
        lab = lab0.clone()
        if fill:
            fill_unknown(lab, ann_l, pseudo[:nl], sure[:nl], conf[:nl], self.open_classes)
        if self.pic is not None:
            self.pic.observe(*self.dist.gather_cat(unl.target, unl.weight))  # all processes' pseudo-labels
        t = it / max(1, cfg.iterations - 1)
        l2u = s.directions in ("both", "labeled_into_unlabeled")
        u2l = s.directions in ("both", "unlabeled_into_labeled")
        infos = []
        if s.method == "mean_teacher":
            mixed = unl
        else:
            parts = []
            if l2u:
                m, inf = (self.pic.mix(rng, t, unl, lab, self._fetch_labeled if s.pic.fetch_labeled_source else None)
                          if self.pic is not None else cutmix(rng, unl, lab, self._box_fraction()))
                parts.append(m)
                infos += inf
            if u2l:
                m, inf = (self.pic.mix(rng, t, lab, unl) if self.pic is not None
                          else cutmix(rng, lab, unl, self._box_fraction()))
                parts.append(m)
                infos += inf
            mixed = Patches.cat(parts)
        w = s.consistency_weight * sigmoid_rampup(it, round(s.rampup * cfg.iterations))
        self.net.train()
        self.opt.zero_grad(set_to_none=True)
        if mixed_only:
            sup, cons, logits, x = self._mixed_only_losses(mixed, rng)
            terms = {}
            if self.parent is not None:
                terms["loss_parent"] = self._parent_loss(x, logits, self._no_gt(mixed))
        else:
            x_l = augment(img_l, rng)
            x_m = augment(mixed.image, rng)
            x = torch.cat([x_l, x_m])
            logits, stem, levels = self._forward_student(x)
            sup = partial_dice_ce(logits[:nl], lab_l.to(self.device), ann_l.to(self.device), cfg.ce_weight,
                                  cfg.dice_weight)
            cons = masked_partial_dice_ce(logits[nl:], mixed.target.to(self.device), mixed.ann, mixed.weight,
                                          cfg.ce_weight, cfg.dice_weight)
            terms = self._component_losses(it, logits, stem, levels, Patches.cat([lab0, mixed]), nl) \
                if len(self.components) else {}
            if self.parent is not None:
                no_gt = torch.cat([self._no_gt(lab0), self._no_gt(mixed)])
                terms["loss_parent"] = self._parent_loss(x, logits, no_gt)
        loss = sup + w * cons + (sum(terms.values()) if terms else 0.0)
        self._backward(loss)
        self._update_teacher(it)
        self._info = {"loss_sup": round(float(sup.detach()), 5), "loss_cons": round(float(cons.detach()), 5),
                      "cons_weight": round(w, 5), "confident": round(float(unl.weight.mean()), 4)}
        if s.pseudo_labels.threshold != "fixed":
            self._info["thresholds"] = [round(float(t), 4) for t in thresholds.tau]
        self._info.update({k: round(float(v.detach()), 5) for k, v in terms.items()})
        if infos:
            self._info["mix_organs"] = [-1 if i.organ is None else i.organ for i in infos]
            self._info["mix_fallbacks"] = sum(i.fallback for i in infos)
        return float(loss.detach())

    def _mixed_only_losses(self, mixed: Patches, rng: np.random.Generator
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """student_patches 'mixed': one student pass over the mixed patches only (their ground-truth voxels for
        the supervised loss, their pseudo-labelled voxels for the consistency loss), as in BCP (Bai et al.,
        CVPR 2023), where the mixed patches replace the plain labeled ones. Also returns the logits and the
        augmented input, for the parent distillation."""
        cfg = self.cfg
        gt = mixed.extra["from_label"][:, 0]
        x = augment(mixed.image, rng)
        logits = self._forward_student(x)[0]
        target = mixed.target.to(self.device)
        sup = masked_partial_dice_ce(logits, target, mixed.ann, mixed.weight * gt, cfg.ce_weight, cfg.dice_weight)
        cons = masked_partial_dice_ce(logits, target, mixed.ann, mixed.weight * (1.0 - gt), cfg.ce_weight,
                                      cfg.dice_weight)
        return sup, cons, logits, x

    def _lr(self, it: int) -> float:
        return lr_at(self.cfg, it)

    def _backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        params = list(self.net.parameters()) + list(self.components.parameters())
        torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()

    @torch.no_grad()
    def _update_teacher(self, it: int) -> None:
        s = self.cfg.semi
        assert self.teacher is not None  # set up for every method but supervised
        d = min(s.ema_decay, 1.0 - 1.0 / (it + 1)) if s.ema_warmup else s.ema_decay
        for tp, sp in zip(self.teacher.parameters(), self.net.parameters()):
            tp.mul_(d).add_(sp.detach(), alpha=1.0 - d)
        for tb, sb in zip(self.teacher.buffers(), self.net.buffers()):
            tb.copy_(sb)

    def iteration_info(self, done: int, elapsed: float) -> dict:  # noqa: ARG002
        return dict(self._info)

    # ------------------------------------------------------------------ routing
    def restrict_routing(self, keep: Sequence[int]) -> None:
        """Route only the classes in `keep` (`StudentUNet.restrict_routing`; the others return to the parent's
        output); the config, which the model file records, follows the network."""
        assert isinstance(self.net, StudentUNet)  # a routed network is a student U-Net (_load_init_routed)
        self.net.restrict_routing(keep)
        self.cfg.architecture = self.net.cfg

    def draw_through_window(self, window: WindowRoutingConfig) -> None:
        """Draw the window's organs through its second window (nets/window_routing.py: a fine-tune's window
        calibration); the config, which the model file records, follows the network."""
        assert isinstance(self.net, StudentUNet)  # window calibration runs on routed fine-tunes only
        self.net.window = window
        self.net.cfg = self.net.cfg.model_copy(update={"window": window})
        self.cfg.architecture = self.net.cfg

    # ------------------------------------------------------------------ export
    def customize_meta(self, meta: ModelMeta) -> ModelMeta:
        s = self.cfg.semi
        training = dict(meta.training)
        training["trainer"] = "supervised" if s.method == "supervised" else f"semi-supervised ({s.method})"
        semi = {"method": s.method, "labeled_cases": self.labeled_ids, "unlabeled_cases": self.unlabeled_ids,
                "fkd": self.fkd_status, "components": [c.describe() for c in self._aux_components()]}
        if self.init_meta is not None:
            # a model made from another keeps the smaller of its parent's smallest organ volumes and its own scans'
            training[organ_volumes.KEY] = organ_volumes.smallest(
                [], organ_volumes.recorded(training), organ_volumes.recorded(self.init_meta.training))
            semi["init"] = {"model_id": self.init_meta.model_id, "weights_sha256": self.init_meta.weights_sha256,
                            "trained": self.init_meta.trained}
            training["parent"] = self.init_meta.model_id
        if self.thresholds is not None:
            semi["pseudo_label_thresholds_final"] = self.thresholds.summary(["background"] + self.schema.names)
        if self.pic is not None:
            semi["pic_final"] = {"freq": [round(float(f), 8) for f in self.pic.freq],
                                 "probabilities_end": [round(float(p), 6) for p in self.pic.probabilities(1.0)]}
        training["semi"] = semi
        update: dict[str, Any] = {"training": training}
        if self.init_meta is not None:
            update["postprocessing"] = self.init_meta.postprocessing
        return meta.model_copy(update=update)
