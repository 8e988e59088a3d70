"""SegDINO: the second network family, for users with a GPU: a DINOv3 ViT applied slice by slice, a token
pyramid and a light scale-aware decoder. Its config is stored in the model file like the student's.

* Input and output are those of `StudentUNet`: a 3D patch (B, 1, X, Y, Z) in, logits (B, C, X, Y, Z) out, so the
  trainer, the losses, the sliding-window inference and the model file need nothing beyond the architecture
  config. Every axial slice (the last axis, Z) of the patch goes through the 2D network; the slices of all
  patches run as one batch (in chunks of `slice_batch` when no gradients are taken).
* ViT input: 3 channels, the slice repeated (2D, `context_slices=0`) or [slice - 1, slice, slice + 1] (2.5D,
  `context_slices=1`; at the first and last slice of the patch the slice itself stands in for the missing
  neighbour), shown in radiological orientation and ImageNet-normalised exactly as the FKD teacher sees a
  slice (`nets/dinov3.teacher_feature_volume`), upsampled (bilinear, one factor for both axes) so that the
  shorter side has at least `min_tokens` patches.
* TPA, token pyramid aggregation: the normalised patch tokens of the blocks `layers` (default 2, 5, 8, 11),
  each projected by a 1x1 convolution to `width` channels, resampled (bilinear) x8, x4, x2, x1 (the earliest
  block gives the finest map, at 1/2 of the ViT input), then a 3x3 convolution.
* SAD, scale-aware decoder: per level a residual depthwise block x + s * GELU(GroupNorm(pointwise(depthwise
  3x3(x)))) whose per-channel scale s starts at 0 (each block starts as the identity), then top-down fusion
  (upsample the coarser map, add) down to the finest level and a 1x1 convolution to one channel per organ;
  the logits are resized (bilinear) to the slice.
* The backbone (`backbone.*`, the official DINOv3 key layout of `nets/dinov3.DinoV3ViT`) is frozen by default:
  no gradients, and it stays in eval mode when the module is put in train mode; `freeze_backbone=False`
  fine-tunes it too. Its weights are part of the network's state, so a model file is self-contained.
* `build_segdino` (what `network.build_network` calls to train one) loads DINOv3 weights like the FKD teacher
  (`backbone_weights` in the config, else $DINOMIX_DINOV3_WEIGHTS; an official checkpoint or a Hugging Face
  folder) and records `backbone_pretrained=True` and their sha256; without weights the backbone keeps its
  random initialisation, `backbone_pretrained` stays False and every listing of the model says
  "backbone untrained (random DINOv3 weights)".

Not provided: `feature_channels` / `forward_features` / `forward_pyramid`, and `forward(x, features=True)`
raises. FKD distils DINOv3 features into a student, which is pointless when the network is DINOv3 itself, and
the trainer components that read the student's 3D decoder pyramid (`methods/components.py`) do not apply to a
slice-wise 2D decoder; the supervised trainer and the mean-teacher / CutMix / PIC methods only need `forward`.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Literal, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, Field, field_validator

from ..errors import DinomixError
from . import dinov3

BACKBONE_UNTRAINED = "backbone untrained (random DINOv3 weights)"

log = logging.getLogger("dinomix.nets.segdino")


class SegDINOConfig(BaseModel):
    """Architecture of `SegDINO` (stored in the model file)."""

    family: Literal["segdino"] = "segdino"
    in_channels: Literal[1] = 1
    out_channels: int = 14
    backbone: Literal["vits16", "vitb16"] = "vits16"
    layers: tuple[int, ...] = Field(default=(2, 5, 8, 11), description="ViT blocks whose patch tokens form the "
                                                                       "pyramid, earliest (finest level) first")
    width: int = Field(default=256, ge=1, description="channels of the pyramid and decoder")
    context_slices: int = Field(default=0, ge=0, le=1, description="0: 2D (the slice as 3 channels); 1: 2.5D "
                                                                   "(channels: previous, this, next slice)")
    min_tokens: int = Field(default=16, ge=1, description="slices are upsampled so the shorter side has at "
                                                          "least this many ViT patches")
    freeze_backbone: bool = True
    backbone_weights: Optional[str] = Field(default=None, description="DINOv3 weights to start from (else "
                                                                      "$DINOMIX_DINOV3_WEIGHTS); recorded, not "
                                                                      "needed to load a model file")
    backbone_pretrained: bool = Field(default=False, description="set when the network is built: True only when "
                                                                 "real DINOv3 weights were loaded")
    backbone_sha256: Optional[str] = Field(default=None, description="sha256 of the DINOv3 weight files loaded")

    @field_validator("layers")
    @classmethod
    def _layers(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(i < 0 or i >= 12 for i in v) or list(v) != sorted(set(v)):
            raise ValueError(f"layers must be increasing block indices in 0..11, got {list(v)}")
        return v

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this: any size works (each slice is resized for the ViT)."""
        return 1


# ---------------------------------------------------------------- input slices

def slice_stack(x: torch.Tensor, context_slices: int = 0) -> torch.Tensor:
    """(B, 1, X, Y, Z) -> (B * Z, 3, X, Y), row b * Z + z: channels [z, z, z] (2D) or [z - 1, z, z + 1]
    (2.5D; the first and last slice of the patch stand in for their missing neighbour)."""
    v = x[:, 0].permute(0, 3, 1, 2)  # (B, Z, X, Y)
    if context_slices:
        padded = torch.cat([v[:, :1], v, v[:, -1:]], dim=1)
        s = torch.stack([padded[:, :-2], v, padded[:, 2:]], dim=2)
    else:
        s = v.unsqueeze(2).expand(-1, -1, 3, -1, -1)
    return s.reshape(-1, 3, *v.shape[2:])


def vit_input_size(X: int, Y: int, patch: int, min_tokens: int) -> tuple[int, int]:
    """(rows, columns) of the ViT input for an X x Y slice shown in radiological orientation (Y rows, X columns),
    as `dinov3.teacher_feature_volume` sizes it."""
    scale = max(1.0, patch * min_tokens / min(X, Y))
    return dinov3.slice_size(Y, patch, min_tokens, scale), dinov3.slice_size(X, patch, min_tokens, scale)


# ---------------------------------------------------------------- TPA and SAD

class TokenPyramid(nn.Module):
    """TPA: the token maps of n blocks -> n maps of `width` channels at 2^(n-1), ..., 2, 1 times the token grid."""

    def __init__(self, embed_dim: int, width: int, levels: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList([nn.Conv2d(embed_dim, width, kernel_size=1) for _ in range(levels)])
        self.conv = nn.ModuleList([nn.Conv2d(width, width, kernel_size=3, padding=1) for _ in range(levels)])
        self.factors = [2 ** (levels - 1 - i) for i in range(levels)]

    def forward(self, tokens: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """tokens: (N, D, h, w) per block, earliest first -> maps finest first."""
        out = []
        for t, proj, conv, f in zip(tokens, self.proj, self.conv, self.factors):
            h = proj(t)
            if f > 1:
                h = F.interpolate(h, scale_factor=f, mode="bilinear", align_corners=False)
            out.append(conv(h))
        return out


class ScaleAwareBlock(nn.Module):
    """x + scale * GELU(GroupNorm(pointwise(depthwise 3x3(x)))), the per-channel scale starting at 0."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(width, width, kernel_size=3, padding=1, groups=width)
        self.pw = nn.Conv2d(width, width, kernel_size=1)
        self.norm = nn.GroupNorm(math.gcd(32, width), width)
        self.act = nn.GELU()
        self.scale = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale.view(1, -1, 1, 1) * self.act(self.norm(self.pw(self.dw(x))))


class ScaleAwareDecoder(nn.Module):
    """SAD: a residual block per level, top-down fusion (upsample, add), a 1x1 convolution to the classes."""

    def __init__(self, width: int, levels: int, out_channels: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([ScaleAwareBlock(width) for _ in range(levels)])
        self.out = nn.Conv2d(width, out_channels, kernel_size=1)

    def forward(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """levels finest first -> logits at the finest level's resolution."""
        r = [blk(lv) for blk, lv in zip(self.blocks, levels)]
        h = r[-1]
        for lv in reversed(r[:-1]):
            h = F.interpolate(h, size=lv.shape[-2:], mode="bilinear", align_corners=False) + lv
        return self.out(h)


# ---------------------------------------------------------------- the network

class SegDINO(nn.Module):
    """DINOv3 ViT + TPA + SAD on every axial slice of a 3D patch; (B, 1, X, Y, Z) -> (B, C, X, Y, Z)."""

    slice_batch = 64  # slices per backbone call when no gradients are taken (inference: bounded memory)
    mean: torch.Tensor  # registered buffers: ImageNet normalisation of the backbone's input
    std: torch.Tensor

    def __init__(self, cfg: SegDINOConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = dinov3.build_vit(cfg.backbone)
        if max(cfg.layers) >= self.backbone.depth:
            raise DinomixError(f"SegDINO layers {list(cfg.layers)} exceed the {self.backbone.depth} blocks of "
                               f"{cfg.backbone}")
        n = len(cfg.layers)
        self.tpa = TokenPyramid(self.backbone.embed_dim, cfg.width, n)
        self.sad = ScaleAwareDecoder(cfg.width, n, cfg.out_channels)
        self.register_buffer("mean", torch.tensor(dinov3.IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(dinov3.IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if cfg.freeze_backbone:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> SegDINO:
        super().train(mode)
        if self.cfg.freeze_backbone:
            self.backbone.eval()  # a frozen backbone always runs as in evaluation
        return self

    def backbone_tokens(self, img: torch.Tensor) -> list[torch.Tensor]:
        """Normalised patch tokens (N, D, h, w) of the `layers` blocks; no autograd through a frozen backbone."""
        if self.cfg.freeze_backbone or not torch.is_grad_enabled():
            return self.backbone.forward_layers(img, self.cfg.layers)  # runs under torch.no_grad
        # Fine-tuning the backbone: the same forward, without the no_grad wrapper of `forward_layers`.
        # torch.no_grad() wraps with functools.wraps, which sets __wrapped__; the stubs type the decorated
        # method as a plain callable
        return type(self.backbone).forward_layers.__wrapped__(  # type: ignore[attr-defined]
            self.backbone, img, self.cfg.layers)

    def forward_slices(self, s: torch.Tensor) -> torch.Tensor:
        """(N, 3, X, Y) slices (values in [0, 1]) -> logits (N, C, X, Y)."""
        X, Y = s.shape[-2:]
        img = s.transpose(2, 3).flip(2, 3)  # radiological: rows anterior -> posterior, columns right -> left
        size = vit_input_size(X, Y, self.backbone.patch_size, self.cfg.min_tokens)
        if tuple(img.shape[-2:]) != size:
            img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        img = (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)
        logits = self.sad(self.tpa(self.backbone_tokens(img)))
        logits = F.interpolate(logits, size=(Y, X), mode="bilinear", align_corners=False)
        return logits.flip(2, 3).transpose(2, 3)

    def forward(self, x: torch.Tensor, features: bool = False) -> torch.Tensor:
        if features:
            raise DinomixError("SegDINO has no 3D decoder pyramid: trainer components that read the student's "
                               "features (FKD, ...) do not apply to it")
        B, _, X, Y, Z = x.shape
        s = slice_stack(x, self.cfg.context_slices)
        if torch.is_grad_enabled() or s.shape[0] <= self.slice_batch:
            out = self.forward_slices(s)
        else:
            out = torch.cat([self.forward_slices(c) for c in s.split(self.slice_batch)])
        return out.reshape(B, Z, -1, X, Y).permute(0, 2, 3, 4, 1).contiguous()


def build_segdino(cfg: SegDINOConfig, load_backbone: bool = True,
                  report: Optional[Callable[[str, str], None]] = None) -> SegDINO:
    """A SegDINO network. With `load_backbone` (building one to train) the DINOv3 weights of
    `cfg.backbone_weights` or $DINOMIX_DINOV3_WEIGHTS are loaded when given, and `cfg` itself records whether
    they were (`backbone_pretrained`, `backbone_sha256`), so the model file written from it says so. Without
    (loading a model file, whose weights replace these) the backbone is left as initialised."""
    net = SegDINO(cfg)
    if not load_backbone:
        return net
    say = report or (lambda msg, level: log.warning(msg) if level == "warning" else log.info(msg))
    path = dinov3.find_teacher_weights(cfg.backbone_weights)
    if path is None:
        cfg.backbone_pretrained, cfg.backbone_sha256 = False, None
        say(f"SegDINO: no DINOv3 weights (set backbone_weights in the architecture or ${dinov3.ENV_WEIGHTS}); the "
            f"{cfg.backbone} backbone keeps random weights, the model will be marked '{BACKBONE_UNTRAINED}'",
            "warning")
        return net
    vit, sha = dinov3.load_teacher(path)
    shape = ("embed_dim", "depth", "num_heads", "patch_size", "n_storage_tokens")
    if any(getattr(vit, a) != getattr(net.backbone, a) for a in shape):
        raise DinomixError(f"DINOv3 weights {path} are a ViT with "
                           + ", ".join(f"{a} {getattr(vit, a)}" for a in shape)
                           + f"; the SegDINO config asks for {cfg.backbone} ("
                           + ", ".join(f"{a} {getattr(net.backbone, a)}" for a in shape) + ")")
    try:
        net.backbone.load_state_dict(vit.state_dict(), strict=True)
    except RuntimeError as exc:
        raise DinomixError(f"DINOv3 weights {path} do not fit the {cfg.backbone} backbone: "
                           f"{str(exc).splitlines()[0][:200]}") from None
    cfg.backbone_pretrained, cfg.backbone_sha256 = True, sha
    say(f"SegDINO: {cfg.backbone} backbone loaded from {path} (sha256 {sha[:12]})", "info")
    return net
