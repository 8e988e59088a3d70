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

from typing import Annotated, Any, Literal, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UnetResBlock, UnetUpBlock
from pydantic import BaseModel, Discriminator, Field, Tag

from .segdino import SegDINOConfig


class StudentConfig(BaseModel):
    """Architecture of `StudentUNet` (stored in the model file)."""

    family: Literal["student_unet"] = "student_unet"
    in_channels: int = 1
    out_channels: int = 14
    stem_channels: int = 16
    channels: tuple[int, ...] = Field(default=(24, 48, 96, 160), description="widths at 1/2, 1/4, 1/8, 1/16")
    norm: str = "instance"
    dropout: float = 0.0

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this."""
        return 2 ** len(self.channels)


class StudentUNet(nn.Module):
    def __init__(self, cfg: StudentConfig) -> None:
        super().__init__()
        self.cfg = cfg
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
        return stem, levels

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(stem features at full resolution, decoder features at 1/2 resolution)."""
        stem, levels = self.forward_pyramid(x)
        return stem, levels[-1]

    def head(self, stem: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(feat, size=stem.shape[2:], mode="trilinear", align_corners=False)
        return self.head_out(self.head_fuse(torch.cat([up, stem], dim=1)))

    def forward(self, x: torch.Tensor, features: bool = False):
        """Logits; with `features=True`, (logits, stem, decoder pyramid) for trainer components. One entry
        point for both, so DistributedDataParallel sees (and synchronises) every forward pass."""
        stem, levels = self.forward_pyramid(x)
        logits = self.head(stem, levels[-1])
        return (logits, stem, levels) if features else logits


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
