"""The DINOv3 ViT backbone, its weight loading and its application to the slices of a volume.

* `DinoV3ViT`: the DINOv3 ViT backbone (ViT-S/16 and ViT-B/16), written here so that no DINOv3 package is
  needed; its parameter and buffer names are exactly those of the official checkpoints
  (facebookresearch/dinov3, e.g. `dinov3_vits16_pretrain_lvd1689m-08c60483.pth`): `cls_token`,
  `storage_tokens`, `mask_token`, `patch_embed.proj.*`, `rope_embed.periods`, `blocks.N.{norm1, attn.qkv
  (+ bias_mask: the key bias is masked), attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}`, `norm.*`.
  Axial RoPE (base 100, coordinates normalised per axis), 4 storage (register) tokens, LayerScale, LayerNorm
  eps 1e-5; evaluation-mode forward (no coordinate augmentation). Written by hand: timm's DINOv3 models use
  other parameter names and no well-kept package loads the official checkpoints without the dinov3 repo.
* `load_teacher(path)`: an official checkpoint file (.pth / .pt / .safetensors, optionally wrapped in
  {"teacher"|"model"|"state_dict": ...} or prefixed `backbone.`), or a Hugging Face model folder
  (config.json + model.safetensors / pytorch_model.bin of `DINOv3ViTModel`: `embeddings.*`, `layer.N.attention.
  {q,k,v,o}_proj`, `layer_scale{1,2}.lambda1`, `mlp.{up,down}_proj`), converted to the official layout.
  `find_teacher_weights` takes a config path or $DINOMIX_DINOV3_WEIGHTS; with neither, FKD is off.
* `teacher_feature_volume`: each axial slice of a preprocessed volume (values in [0, 1]) as 3 channels with
  ImageNet normalisation, shown in radiological orientation, upsampled so the token grid is at least 16 x 16;
  the normalised patch tokens of the chosen layers are stacked (channels) into a feature volume
  (C, tokens_x, tokens_y, Z). Used by FKD (`methods/fkd.py`) and SegDINO (`nets/segdino.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DinomixError

ENV_WEIGHTS = "DINOMIX_DINOV3_WEIGHTS"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# DinoV3ViT keyword arguments of each known teacher
ARCHS: dict[str, dict[str, Any]] = {
    "vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0),
    "vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0),
}


# ---------------------------------------------------------------- the ViT (official DINOv3 layout)

class LinearKMaskedBias(nn.Linear):
    """qkv projection whose key bias is masked out (`bias_mask`: 1 for q and v, 0 for k)."""

    bias_mask: torch.Tensor  # registered buffer

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__(dim_in, dim_out, bias=True)
        mask = torch.ones(dim_out)
        mask[dim_out // 3: 2 * dim_out // 3] = 0
        self.register_buffer("bias_mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias * self.bias_mask.to(self.bias.dtype))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = LinearKMaskedBias(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # B, heads, N, hd
        p = N - sin.shape[0]  # class + storage tokens get no rotation
        q = torch.cat([q[:, :, :p], q[:, :, p:] * cos + _rotate_half(q[:, :, p:]) * sin], dim=2)
        k = torch.cat([k[:, :, :p], k[:, :, p:] * cos + _rotate_half(k[:, :, p:]) * sin], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * ffn_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), sin, cos))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RopeEmbed(nn.Module):
    periods: torch.Tensor  # registered buffer

    def __init__(self, dim: int, heads: int, base: float = 100.0) -> None:
        super().__init__()
        hd = dim // heads
        self.register_buffer("periods", base ** (2 * torch.arange(hd // 4, dtype=torch.float32) / (hd // 2)))

    def forward(self, H: int, W: int) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.periods.device
        ch = torch.arange(0.5, H, device=dev, dtype=torch.float32) / H
        cw = torch.arange(0.5, W, device=dev, dtype=torch.float32) / W
        coords = torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).flatten(0, 1) * 2.0 - 1.0  # HW, 2
        angles = (2 * math.pi * coords[..., None] / self.periods).flatten(-2).tile(2)  # HW, hd
        return torch.sin(angles), torch.cos(angles)


class DinoV3ViT(nn.Module):
    """DINOv3 ViT backbone with the official checkpoint's names; `forward_layers` gives patch-token maps."""

    def __init__(self, embed_dim: int = 384, depth: int = 12, num_heads: int = 6, ffn_ratio: float = 4.0,
                 patch_size: int = 16, n_storage_tokens: int = 4) -> None:
        super().__init__()
        self.embed_dim, self.depth, self.num_heads, self.patch_size = embed_dim, depth, num_heads, patch_size
        self.n_storage_tokens = n_storage_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.patch_embed = PatchEmbed(patch_size, embed_dim)
        self.rope_embed = RopeEmbed(embed_dim, num_heads)
        self.blocks = nn.ModuleList([Block(embed_dim, num_heads, ffn_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def init_random(self, seed: int = 0) -> DinoV3ViT:
        """Random weights for tests: normal(0, 0.02) clipped at 2 sigma for weights and tokens, small random
        biases, LayerNorm gains near 1, LayerScale 0.1 (the official init is 1e-5, which would make the blocks
        nearly invisible in a test of the loading code)."""
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                r = torch.randn(p.shape, generator=g)
                if name.endswith("gamma"):
                    p.copy_(0.1 + 0.01 * r)
                elif "norm" in name and name.endswith("weight"):
                    p.copy_(1.0 + 0.02 * r)
                else:
                    p.copy_((0.02 * r).clamp(-0.04, 0.04))
        return self

    @torch.no_grad()
    def forward_layers(self, x: torch.Tensor, layers: Sequence[int] = (-1,)) -> list[torch.Tensor]:
        """x (B, 3, H, W), H and W multiples of the patch size -> normalised patch tokens (B, D, h, w) of each
        chosen block (negative indices count from the last), as `get_intermediate_layers(norm=True)`."""
        want = {(i if i >= 0 else self.depth + i) for i in layers}
        B = x.shape[0]
        t = self.patch_embed(x)
        h, w = t.shape[2:]
        t = t.flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(B, -1, -1), self.storage_tokens.expand(B, -1, -1), t], dim=1)
        sin, cos = self.rope_embed(h, w)
        outs = {}
        for i, blk in enumerate(self.blocks):
            t = blk(t, sin, cos)
            if i in want:
                outs[i] = self.norm(t)[:, 1 + self.n_storage_tokens:].transpose(1, 2).reshape(B, -1, h, w)
        return [outs[i if i >= 0 else self.depth + i] for i in layers]


def build_vit(arch: str = "vits16") -> DinoV3ViT:
    if arch not in ARCHS:
        raise DinomixError(f"unknown DINOv3 teacher '{arch}' (known: {', '.join(ARCHS)})")
    return DinoV3ViT(**ARCHS[arch])


# ---------------------------------------------------------------- loading

def _strip_prefixes(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, out of its wrapping dicts and without the common key prefixes."""
    for wrap in ("teacher", "model", "state_dict"):
        if wrap in sd and isinstance(sd[wrap], dict):
            sd = sd[wrap]
    for prefix in ("module.", "backbone.", "model."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def hf_to_official(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face `DINOv3ViTModel` keys -> official DINOv3 keys (q/k/v fused; the key has no bias there).
    Blocks are `layer.N.*` (transformers 4.x) or `model.layer.N.*` (transformers 5)."""
    sd = {k[len("model."):] if k.startswith("model.layer.") else k: v for k, v in sd.items()}
    out = {"cls_token": sd["embeddings.cls_token"].reshape(1, 1, -1),
           "storage_tokens": sd["embeddings.register_tokens"],
           "mask_token": sd["embeddings.mask_token"].reshape(1, -1),
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layer."))
    for i in range(depth):
        s, b = f"layer.{i}.", f"blocks.{i}."
        q = sd[f"{s}attention.q_proj.weight"]
        out[f"{b}attn.qkv.weight"] = torch.cat([sd[f"{s}attention.{x}_proj.weight"] for x in "qkv"])
        qb = sd.get(f"{s}attention.q_proj.bias", torch.zeros(q.shape[0]))
        vb = sd.get(f"{s}attention.v_proj.bias", torch.zeros(q.shape[0]))
        kb = sd.get(f"{s}attention.k_proj.bias", torch.zeros(q.shape[0]))
        out[f"{b}attn.qkv.bias"] = torch.cat([qb, kb, vb])
        for src, dst in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj"),
                         ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2")):
            out[f"{b}{dst}.weight"], out[f"{b}{dst}.bias"] = sd[f"{s}{src}.weight"], sd[f"{s}{src}.bias"]
        out[f"{b}ls1.gamma"] = sd[f"{s}layer_scale1.lambda1"]
        out[f"{b}ls2.gamma"] = sd[f"{s}layer_scale2.lambda1"]
    return out


def official_to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official keys -> Hugging Face `DINOv3ViTModel` keys, blocks as `layer.N.*` (transformers 4.x naming;
    used by tests to write an HF-layout folder)."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.register_tokens": sd["storage_tokens"],
           "embeddings.mask_token": sd["mask_token"].reshape(1, 1, -1),
           "embeddings.patch_embeddings.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.bias": sd["patch_embed.proj.bias"],
           "norm.weight": sd["norm.weight"], "norm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        s, b = f"layer.{i}.", f"blocks.{i}."
        q, k, v = sd[f"{b}attn.qkv.weight"].chunk(3)
        qb, _, vb = sd[f"{b}attn.qkv.bias"].chunk(3)
        out.update({f"{s}attention.q_proj.weight": q, f"{s}attention.k_proj.weight": k,
                    f"{s}attention.v_proj.weight": v, f"{s}attention.q_proj.bias": qb,
                    f"{s}attention.v_proj.bias": vb,
                    f"{s}layer_scale1.lambda1": sd[f"{b}ls1.gamma"], f"{s}layer_scale2.lambda1": sd[f"{b}ls2.gamma"]})
        for dst, src in (("norm1", "norm1"), ("norm2", "norm2"), ("attention.o_proj", "attn.proj"),
                         ("mlp.up_proj", "mlp.fc1"), ("mlp.down_proj", "mlp.fc2")):
            out[f"{s}{dst}.weight"], out[f"{s}{dst}.bias"] = sd[f"{b}{src}.weight"], sd[f"{b}{src}.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DinomixError(f"cannot read DINOv3 weights {path}: {str(exc)[:200]}") from None


def _arch_from_state(sd: dict[str, torch.Tensor]) -> dict:
    dim = sd["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hidden = sd["blocks.0.mlp.fc1.weight"].shape[0]
    heads = {384: 6, 768: 12, 1024: 16}.get(dim, dim // 64)
    return dict(embed_dim=dim, depth=depth, num_heads=heads, ffn_ratio=hidden / dim,
                patch_size=sd["patch_embed.proj.weight"].shape[-1], n_storage_tokens=sd["storage_tokens"].shape[1])


def load_teacher(path: str | os.PathLike) -> tuple[DinoV3ViT, str]:
    """(frozen ViT in eval mode, sha256 of the weight files) from an official checkpoint or an HF folder."""
    p = Path(path)
    if p.is_dir():
        files = [p / n for n in ("model.safetensors", "pytorch_model.bin") if (p / n).is_file()]
        if not files:
            raise DinomixError(f"{p} holds no model.safetensors or pytorch_model.bin (Hugging Face DINOv3 folder)")
        sd = hf_to_official(_strip_prefixes(_read_tensors(files[0])))
        hashed = [files[0]] + ([p / "config.json"] if (p / "config.json").is_file() else [])
        cfg = json.loads((p / "config.json").read_text()) if (p / "config.json").is_file() else {}
    elif p.is_file():
        sd = _strip_prefixes(_read_tensors(p))
        if "embeddings.cls_token" in sd:
            sd = hf_to_official(sd)
        hashed, cfg = [p], {}
    else:
        raise DinomixError(f"DINOv3 teacher weights not found: {p}")
    if "cls_token" not in sd:
        raise DinomixError(f"{p}: not a DINOv3 ViT checkpoint (no cls_token; keys like {list(sd)[:3]})")
    try:
        arch = _arch_from_state(sd)
    except (KeyError, ValueError, IndexError) as exc:
        raise DinomixError(f"{p}: not a complete DINOv3 ViT checkpoint (missing {exc})") from None
    if cfg.get("num_attention_heads"):
        arch["num_heads"] = int(cfg["num_attention_heads"])
    vit = DinoV3ViT(**arch)
    own = vit.state_dict()
    for k in [k for k in own if k not in sd]:
        if k.endswith("bias_mask") or k == "rope_embed.periods":
            sd[k] = own[k]  # buffers that some exports leave out: their values are fixed by the architecture
    try:
        vit.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise DinomixError(f"{p}: weights do not fit a DINOv3 ViT: {str(exc).splitlines()[0][:200]}") from None
    h = hashlib.sha256()
    for f in hashed:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    vit.eval().requires_grad_(False)
    return vit, h.hexdigest()


def find_teacher_weights(path: Optional[str] = None) -> Optional[Path]:
    """The configured path, else $DINOMIX_DINOV3_WEIGHTS; None when neither is set (FKD off)."""
    p = path or os.environ.get(ENV_WEIGHTS)
    if not p:
        return None
    if not Path(p).exists():
        raise DinomixError(f"DINOv3 teacher weights not found: {p}")
    return Path(p)


# ---------------------------------------------------------------- teacher feature volumes

def slice_size(n: int, patch: int, min_tokens: int, scale: float) -> int:
    return int(math.ceil(n * scale / patch)) * patch if n * scale >= patch * min_tokens else patch * min_tokens


@torch.no_grad()
def teacher_feature_volume(vit: DinoV3ViT, volume: torch.Tensor, layers: Sequence[int] = (-1,),
                           min_tokens: int = 16, batch: int = 8) -> torch.Tensor:
    """volume (1, X, Y, Z) in [0, 1] (RAS) -> features (C, tokens_x, tokens_y, Z) float32.

    Each axial slice is shown in radiological orientation (rows anterior to posterior, columns patient right to
    left), as 3 identical channels with ImageNet normalisation, upsampled (bilinear) by one factor for both
    axes so that the shorter side has at least `min_tokens` patches, each side rounded up to whole patches.
    Token (i, j) of the result covers voxels [i X / tokens_x, (i + 1) X / tokens_x) along x, likewise along y.
    """
    _, X, Y, Z = volume.shape
    ps = vit.patch_size
    scale = max(1.0, ps * min_tokens / min(X, Y))
    sx, sy = slice_size(X, ps, min_tokens, scale), slice_size(Y, ps, min_tokens, scale)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    dev = next(vit.parameters()).device
    out = []
    for z0 in range(0, Z, batch):
        sl = volume[0, :, :, z0:z0 + batch].permute(2, 1, 0).flip(1, 2)  # (b, Y desc, X desc)
        img = F.interpolate(sl[:, None].float(), size=(sy, sx), mode="bilinear", align_corners=False)
        img = ((img.expand(-1, 3, -1, -1) - mean) / std).to(dev)
        feats = torch.cat(vit.forward_layers(img, layers), dim=1).float().cpu()  # (b, C, ty, tx)
        out.append(feats.flip(2, 3).permute(1, 3, 2, 0))  # (C, tx, ty, b)
    return torch.cat(out, dim=3)
