"""The compact 3D student network, built from MONAI blocks; its config is stored in the model file.

Network families (the `family` of the architecture config, `ArchitectureConfig`): `student_unet` (this
module's `StudentUNet`, the default; a config without `family` is one) and `segdino` (`segdino.SegDINO`, a
DINOv3 ViT applied slice by slice, for users with a GPU). `build_network` builds either.

Design for speed on a 2-core CPU: the full-resolution stage is a single light convolution (most of a
U-Net's cost sits there), the encoder/decoder do their work from 1/2 resolution down, and the output
head fuses the upsampled decoder features with the full-resolution stem through 1x1x1 convolutions.
The decoder's half-resolution feature map (`features`) is what the DINO-Mix FKD head distils into.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_serializer

from .segdino import SegDINOConfig
from .window_routing import WindowRoutingConfig


class RoutedConfig(BaseModel):
    """Per-organ routing of a fine-tuned `StudentUNet` (stored in the model file).

    Why: a fine-tune on one or two corrected scans must not change the organs nobody corrected. A routed network
    keeps the parent's whole network unchanged and adds a trainable branch (a copy of the parent's last decoder
    blocks and output head) whose logits replace the parent's for the routed classes only. The logits of every
    other class, background included, are the parent's exactly, so an organ that is not routed can change only
    where a routed organ now wins over it."""

    model_config = ConfigDict(extra="forbid")

    classes: list[int] = Field(min_length=1, description="output channels whose logits come from the branch")
    blocks: int = Field(1, ge=1, le=4, description="decoder up-blocks copied into the branch (from the last)")


class StudentConfig(BaseModel):
    """Architecture of `StudentUNet` (stored in the model file)."""

    family: Literal["student_unet"] = "student_unet"
    in_channels: int = 1
    out_channels: int = 14
    stem_channels: int = 16
    channels: tuple[int, ...] = Field(default=(24, 48, 96, 160), description="widths at 1/2, 1/4, 1/8, 1/16")
    norm: str = "instance"
    dropout: float = 0.0
    routed: Optional[RoutedConfig] = Field(default=None, description="per-organ routing of a fine-tuned model")
    window: Optional[WindowRoutingConfig] = Field(default=None, description="organs drawn through a second window "
                                                  "(a fine-tune's window calibration)")

    @model_serializer(mode="wrap")
    def _drop_unrouted(self, handler):
        """A plain network's config reads as it did before routing existed (model files, recipes, comparisons)."""
        out = handler(self)
        if isinstance(out, dict):
            for key in ("routed", "window"):
                if out.get(key) is None:
                    out.pop(key, None)
        return out

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** len(self.channels)


def _bias(conv: nn.Conv3d) -> torch.Tensor:
    """The bias of a convolution built with one (every 1x1x1 output layer here)."""
    assert conv.bias is not None
    return conv.bias


class StudentUNet(nn.Module):
    # the routing branch (fine-tunes only; see _build_branch): typed here because nn.Module.__getattr__ is not
    branch_ups: nn.ModuleList
    branch_fuse: nn.Module
    branch_out: nn.Conv3d
    routed_index: torch.Tensor
    routed: Optional[RoutedConfig]
    window: Optional[WindowRoutingConfig]  # organs drawn through a second window (nets/window_routing.py)

    def __init__(self, cfg: StudentConfig) -> None:
        # imported here, not with the module: the configs above are read with every model file's header
        # (`dinomix models list`), which needs no network, and MONAI's import takes about 2 s of CPU
        from monai.networks.blocks import Convolution, UnetResBlock, UnetUpBlock

        super().__init__()
        self.cfg = cfg
        self.window = cfg.window
        norm = (cfg.norm, {"affine": True}) if cfg.norm == "instance" else cfg.norm
        act = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})
        ch = list(cfg.channels)
        self.stem = Convolution(3, cfg.in_channels, cfg.stem_channels, kernel_size=3, norm=norm, act=act)
        downs, encs = [], []
        prev = cfg.stem_channels
        for c in ch:
            downs.append(Convolution(3, prev, c, strides=2, kernel_size=3, norm=norm, act=act))
            encs.append(UnetResBlock(3, c, c, kernel_size=3, stride=1, norm_name=norm, act_name=act,
                                     dropout=cfg.dropout or None))
            prev = c
        self.downs = nn.ModuleList(downs)
        self.encs = nn.ModuleList(encs)
        ups = []
        for i in range(len(ch) - 1, 0, -1):
            ups.append(UnetUpBlock(3, ch[i], ch[i - 1], kernel_size=3, stride=1, upsample_kernel_size=2,
                                   norm_name=norm, act_name=act))
        self.ups = nn.ModuleList(ups)
        self.head_fuse = Convolution(3, ch[0] + cfg.stem_channels, cfg.stem_channels, kernel_size=1,
                                     norm=norm, act=act)
        self.head_out = nn.Conv3d(cfg.stem_channels, cfg.out_channels, kernel_size=1)
        self.coarse_out = nn.Conv3d(ch[0], cfg.out_channels, kernel_size=1)
        self.routed = cfg.routed
        if cfg.routed is not None:
            self._build_branch(cfg.routed)

    # ---------------------------------------------------------------- per-organ routing (fine-tunes)
    def _build_branch(self, r: RoutedConfig) -> None:
        n = len(self.ups)
        if r.blocks > n:
            raise ValueError(f"routed.blocks {r.blocks} > the network's {n} decoder blocks")
        bad = [c for c in r.classes if not 0 < c < self.cfg.out_channels]
        if bad or len(set(r.classes)) != len(r.classes):
            raise ValueError(f"routed.classes must be distinct organ channels 1..{self.cfg.out_channels - 1}, "
                             f"got {r.classes}")
        self.branch_ups = copy.deepcopy(self.ups[n - r.blocks:])
        self.branch_fuse = copy.deepcopy(self.head_fuse)
        self.branch_out = nn.Conv3d(self.cfg.stem_channels, len(r.classes), kernel_size=1)
        self.register_buffer("routed_index", torch.tensor(sorted(r.classes), dtype=torch.long), persistent=False)

    def branch_parameters(self) -> list[nn.Parameter]:
        """The parameters a routed fine-tune trains (empty for a plain network)."""
        if self.routed is None:
            return []
        return [p for m in (self.branch_ups, self.branch_fuse, self.branch_out) for p in m.parameters()]

    def freeze_trunk(self) -> None:
        """Only the routing branch learns: every parameter of the parent network is frozen."""
        keep = {id(p) for p in self.branch_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    @torch.no_grad()
    def init_branch_from(self, parent: StudentUNet) -> None:
        """Load `parent` (plain or routed) into this routed network: its weights everywhere, and the branch
        started from the parent's own output path, so that the new network computes exactly the parent's logits
        until it learns. A routed parent's branch carries over for the classes it already routed."""
        own = self.state_dict()
        trunk = {k: v for k, v in parent.state_dict().items() if not k.startswith("branch_")}
        missing = [k for k in own if not k.startswith("branch_") and k not in trunk]
        if missing:
            raise ValueError(f"parent network lacks {missing[:3]}")
        self.load_state_dict({**own, **trunk})
        assert self.routed is not None, "init_branch_from needs a routed network"
        n, k = len(self.ups), self.routed.blocks
        src_ups, src_fuse = parent.ups[n - k:], parent.head_fuse
        assert isinstance(src_fuse, nn.Module)
        prev: dict[int, int] = {}
        if parent.routed is not None:
            if parent.routed.blocks != k:
                raise ValueError(f"parent routes through {parent.routed.blocks} blocks, this network {k}")
            src_ups, src_fuse = parent.branch_ups, parent.branch_fuse  # type: ignore[assignment]  # same module kind
            prev = {int(c): i for i, c in enumerate(parent.routed_index.tolist())}
        self.branch_ups.load_state_dict(src_ups.state_dict())
        self.branch_fuse.load_state_dict(src_fuse.state_dict())
        for row, c in enumerate(self.routed_index.tolist()):
            if c in prev:
                w, b = parent.branch_out.weight[prev[c]], _bias(parent.branch_out)[prev[c]]
            else:
                w, b = parent.head_out.weight[c], _bias(parent.head_out)[c]
            self.branch_out.weight[row].copy_(w)
            _bias(self.branch_out)[row].copy_(b)

    @torch.no_grad()
    def restrict_routing(self, keep: Sequence[int]) -> None:
        """Route only the classes in `keep` (the others return to the parent's output); no routing left when
        `keep` is empty. The model's config follows, so the saved file describes exactly this network."""
        rows = [i for i, c in enumerate(self.routed_index.tolist()) if c in set(keep)]
        if not rows:
            for name in ("branch_ups", "branch_fuse", "branch_out", "routed_index"):
                delattr(self, name)
            self.routed = None
            self.cfg = self.cfg.model_copy(update={"routed": None})
            return
        assert self.routed is not None
        out = nn.Conv3d(self.branch_out.in_channels, len(rows), kernel_size=1).to(self.branch_out.weight.device)
        out.weight.copy_(self.branch_out.weight[rows])
        _bias(out).copy_(_bias(self.branch_out)[rows])
        self.branch_out = out
        self.routed_index = self.routed_index[rows]
        self.routed = self.routed.model_copy(update={"classes": [int(c) for c in self.routed_index.tolist()]})
        self.cfg = self.cfg.model_copy(update={"routed": self.routed})

    def _route(self, logits: torch.Tensor, stem: torch.Tensor, skips: list[torch.Tensor],
               levels: list[torch.Tensor]) -> torch.Tensor:
        assert self.routed is not None
        n, k = len(self.ups), self.routed.blocks
        h = levels[n - k]
        for j, up in enumerate(self.branch_ups):
            h = up(h, skips[-2 - (n - k + j)])
        up_h = F.interpolate(h, size=stem.shape[2:], mode="trilinear", align_corners=False)
        b = self.branch_out(self.branch_fuse(torch.cat([up_h, stem], dim=1)))
        return logits.index_copy(1, self.routed_index, b)

    @property
    def feature_channels(self) -> int:
        return self.cfg.channels[0]

    @property
    def pyramid_channels(self) -> list[int]:
        """Widths of the `forward_pyramid` decoder maps, coarsest first."""
        return list(reversed(self.cfg.channels))

    def forward_pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(stem features at full resolution, decoder feature maps coarsest first: the bottleneck at 1/16,
        then the decoder outputs at 1/8, 1/4 and 1/2; the last is what `head` uses)."""
        stem, _, levels = self._pyramid(x)
        return stem, levels

    def _pyramid(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        stem = self.stem(x)
        skips = []
        h = stem
        for down, enc in zip(self.downs, self.encs):
            h = enc(down(h))
            skips.append(h)
        h = skips[-1]
        levels = [h]
        for up, skip in zip(self.ups, reversed(skips[:-1])):
            h = up(h, skip)
            levels.append(h)
        return stem, skips, levels

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stem features at full resolution, decoder features at 1/2 resolution)."""
        stem, levels = self.forward_pyramid(x)
        return stem, levels[-1]

    def head(self, stem: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(feat, size=stem.shape[2:], mode="trilinear", align_corners=False)
        return self.head_out(self.head_fuse(torch.cat([up, stem], dim=1)))

    def forward(self, x: torch.Tensor, features: bool = False):
        """Logits; with `features=True`, (logits, stem, decoder pyramid) for trainer components. One entry
        point for both, so DistributedDataParallel sees (and synchronises) every forward pass. With a second window
        (`window`), the logits merge two passes (nets/window_routing.py); it is never trained."""
        if self.window is not None and not features:
            from .window_routing import run_windowed

            return run_windowed(self.plain_logits, x, self.window)
        stem, skips, levels = self._pyramid(x)
        logits = self._logits_of(stem, skips, levels)
        return (logits, stem, levels) if features else logits

    def plain_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of one pass, without the second window."""
        return self._logits_of(*self._pyramid(x))

    def _logits_of(self, stem: torch.Tensor, skips: list[torch.Tensor], levels: list[torch.Tensor]) -> torch.Tensor:
        logits = self.head(stem, levels[-1])
        return self._route(logits, stem, skips, levels) if self.routed is not None else logits


def _family(v: Any) -> str:
    return (v.get("family") if isinstance(v, dict) else getattr(v, "family", None)) or "student_unet"


# The architecture of a model file or training config, told apart by `family` ("student_unet" when absent).
ArchitectureConfig = Annotated[
    Union[Annotated[StudentConfig, Tag("student_unet")], Annotated[SegDINOConfig, Tag("segdino")]],
    Discriminator(_family),
]


def build_network(cfg: StudentConfig | SegDINOConfig, load_backbone: bool = True) -> nn.Module:
    """The network of an architecture config. SegDINO: with `load_backbone` (to train one) the DINOv3 weights
    of the config or $DINOMIX_DINOV3_WEIGHTS are loaded, and `cfg` records whether there were any
    (`segdino.build_segdino`); loading a model file passes False, its own weights replace the backbone's."""
    if cfg.family == "student_unet":
        return StudentUNet(cfg)
    if cfg.family == "segdino":
        from .segdino import build_segdino

        return build_segdino(cfg, load_backbone=load_backbone)
    raise ValueError(f"unknown network family '{cfg.family}'")


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def fit_roi(roi: Sequence[int], divisor: int) -> tuple[int, ...]:
    return tuple(max(divisor, (r // divisor) * divisor) for r in roi)
