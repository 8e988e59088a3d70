"""The CPU kernel of the student U-Net (`FastStudent`): the network's function, several times faster on a CPU.

Written by hand because no library runs this network's layer sequence with these CPU-specific shortcuts
(channels-last oneDNN calls, im2col stem, linear-algebra reordering of the head, reused buffers, bfloat16
where the CPU has it); `cpu_runner` checks it against the module on a test input before it is used.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Optional

import torch
import torch.nn.functional as F

from .unet import StudentUNet

log = logging.getLogger("dinomix")

_CL = torch.channels_last_3d
_STAT_ROWS = 1 << 16


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, D, H, W) tensor in channels-last memory -> its (N, D*H*W, C) view."""
    return t.permute(0, 2, 3, 4, 1).reshape(t.shape[0], -1, t.shape[1])


def _empty_cl(n: int, c: int, spatial, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty((n, *spatial, c), dtype=dtype).permute(0, 4, 1, 2, 3)


def _norm_act_(x: torch.Tensor, norm: Any, slope: Optional[float]) -> torch.Tensor:
    """Instance norm (biased variance, affine) then leaky ReLU, in place on a channels-last tensor.

    Two passes over blocks of rows that stay in cache, computed in float32 whatever the tensor's precision
    (float32 or bfloat16): first each block's mean and sum of squared deviations, merged into the whole
    tensor's by the pairwise update of Chan, Golub and LeVeque (as stable as a two-pass variance, one read of
    the tensor from memory); then scale, shift and activation. As accurate as PyTorch's and several times
    faster on CPU than its Welford reduction or batch_norm on this layout, and for bfloat16 about 4x faster
    than mixed-precision element-wise ops on the whole tensor.
    """
    v = _rows(x)
    n = v.shape[1]
    mean = torch.zeros((v.shape[0], 1, v.shape[2]))
    m2 = torch.zeros_like(mean)
    seen = 0
    for s in range(0, n, _STAT_ROWS):
        block = v[:, s:s + _STAT_ROWS]
        k = block.shape[1]
        d = block.float()  # a float32 copy of a bfloat16 block; the block itself (a view) when float32
        block_mean = d.sum(1, keepdim=True) / k
        d = d.sub_(block_mean) if d.dtype != block.dtype else d - block_mean
        block_m2 = d.mul_(d).sum(1, keepdim=True)
        delta = block_mean - mean
        total = seen + k
        mean += delta * (k / total)
        m2 += block_m2 + delta * delta * (seen * k / total)
        seen = total
    scale = norm.weight * torch.rsqrt(m2 / n + norm.eps)
    shift = norm.bias - mean * scale
    for s in range(0, n, _STAT_ROWS):
        block = v[:, s:s + _STAT_ROWS]
        f = block.float()  # the block itself when float32; a float32 copy of a bfloat16 block
        f.mul_(scale).add_(shift)
        if slope is not None:
            F.leaky_relu_(f, slope)
        if f.data_ptr() != block.data_ptr():
            block.copy_(f)
    return x


class FastStudent:
    """Inference-only CPU execution of `StudentUNet.forward` with the same weights and the same function.

    The network module stays as built (nets/unet.py is the training definition); this runs its layers
    faster on a CPU: channels-last activations (oneDNN's fast 3D convolution layout), oneDNN called
    directly for the small deep layers, the one-channel stem convolution as an im2col GEMM, instance
    norm + leaky ReLU in place, the transposed and 1x1x1 convolutions as GEMMs, full-resolution work
    buffers reused from window to window, and the output head reordered by linearity:
    head_fuse(cat(up(f), s)) = up(W_f f + b) + W_s s, so the 1x1x1 projection runs at half resolution
    and the exact, separable 2x trilinear upsampling moves 16 instead of 24 channels. Outputs agree
    with `net(x)` to float rounding; `Segmenter` checks that on a small input and otherwise falls back
    to the module.

    With `bf16`, the 3x3x3 convolutions below full resolution (about 60 % of the time) run in bfloat16 and
    the encoder/decoder activations between them are stored in bfloat16 (instance-norm statistics in
    float32); the full-resolution stem and output head stay float32. On a CPU with native bfloat16
    (AVX512-BF16 or AMX; `bf16_supported`) oneDNN runs these convolutions about 2x faster. Measured on the
    BTCV P1 eval cases in full mode: the same mean Dice to 0.01 points, network 1.3x faster
    (docs/inference.md).
    """

    # MONAI's blocks expose their layers through nn.Module.__getattr__ (typed `Tensor | Module`): the kernel reads
    # the network's structure dynamically, so the blocks are typed Any here.

    def __init__(self, net: StudentUNet, bf16: bool = False) -> None:
        self.net = net
        blocks: Any = net
        self.slope = float(blocks.stem.adn.A.negative_slope)
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        stem_conv = blocks.stem.conv
        # 3x3x3 convolution weights (and biases) in the layout and precision the kernel runs them in
        self._w_cl: dict[int, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        for m in net.modules():
            if isinstance(m, torch.nn.Conv3d) and m.kernel_size != (1, 1, 1):
                dt = torch.float32 if m is stem_conv else self.dtype
                bias = None if m.bias is None else m.bias.detach().to(dt)
                self._w_cl[id(m)] = (m.weight.detach().contiguous(memory_format=_CL).to(dt), bias)
        # transposed convolutions as (Ci, Co * 8) GEMM weights, in the activations' precision
        self._w_tr = {id(m): (m.weight.detach().reshape(m.weight.shape[0], -1).to(self.dtype),
                              None if m.bias is None else m.bias.detach().to(self.dtype))
                      for m in net.modules() if isinstance(m, torch.nn.ConvTranspose3d)}
        self._mkldnn = bool(torch.backends.mkldnn.is_available())
        # Full-resolution work buffers kept from one window to the next: fresh memory costs a page fault
        # per 4 KiB page on first touch, which on a CPU costs about as much as the arithmetic done in it.
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.reuse = False

    @staticmethod
    def supports(net: torch.nn.Module) -> bool:
        if type(net) is not StudentUNet:
            return False
        try:
            blocks: Any = net
            cfg = blocks.cfg
            return bool(cfg.in_channels == 1 and cfg.norm == "instance" and not cfg.dropout
                        and blocks.stem.conv.kernel_size == (3, 3, 3))
        except AttributeError:
            return False

    def release(self) -> None:
        """Free the work buffers kept between windows."""
        self._buffers.clear()

    def _buffer(self, tag: str, shape: tuple[int, ...], channels_last: bool = True,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A work tensor of this shape ((N, C, *spatial) channels-last, or plain); reused if `self.reuse`."""
        def make() -> torch.Tensor:
            return (_empty_cl(shape[0], shape[1], shape[2:], dtype) if channels_last
                    else torch.empty(shape, dtype=dtype))
        if not self.reuse:
            return make()
        key = (tag, channels_last, dtype, *shape)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = make()
        return buf

    # -- layers
    def _conv(self, x: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
        w, bias = self._w_cl[id(conv)]
        x = x.to(w.dtype)  # the stem's float32 output, once, into the kernel's precision
        if self._mkldnn:
            # oneDNN directly: F.conv3d uses a slow generic kernel for small inputs (N*C*D*H <= 20480).
            return torch.ops.aten.mkldnn_convolution(x, w, bias, list(conv.padding), list(conv.stride),
                                                     list(conv.dilation), conv.groups)
        return F.conv3d(x, w, bias, conv.stride, conv.padding)

    def _stem(self, x: torch.Tensor, conv: torch.nn.Conv3d, slab: int = 8) -> torch.Tensor:
        """3x3x3 convolution (padding 1) of a one-channel volume as im2col + GEMM, channels-last out."""
        n, _, d, h, w = x.shape
        co = conv.weight.shape[0]
        wt = conv.weight.reshape(co, 27).t()
        xp = F.pad(x, (1, 1, 1, 1, 1, 1))
        out = self._buffer("stem", (n, co, d, h, w))
        rows = out.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), contiguous
        cols = self._buffer("cols", (27, min(slab, d), h, w), channels_last=False)
        for b in range(n):
            for z0 in range(0, d, slab):
                z1 = min(d, z0 + slab)
                c = cols[:, :z1 - z0]
                k = 0
                for a in range(3):
                    for e in range(3):
                        for f in range(3):
                            c[k].copy_(xp[b, 0, z0 + a:z1 + a, e:e + h, f:f + w])
                            k += 1
                target = rows[b, z0:z1].view(-1, co)
                if conv.bias is not None:
                    torch.addmm(conv.bias, c.reshape(27, -1).t(), wt, out=target)
                else:
                    torch.mm(c.reshape(27, -1).t(), wt, out=target)
        return out

    def _transp2_cat(self, x: torch.Tensor, conv: torch.nn.ConvTranspose3d, skip: torch.Tensor) -> torch.Tensor:
        """cat((ConvTranspose3d k=2 s=2)(x), skip) along channels, the transposed conv as one GEMM."""
        n, ci, d, h, w = x.shape
        co = conv.weight.shape[1]
        wm, bias = self._w_tr[id(conv)]
        out = self._buffer("cat", (n, co + skip.shape[1], 2 * d, 2 * h, 2 * w), dtype=wm.dtype)
        o = out.permute(0, 2, 3, 4, 1)
        xr = _rows(x.to(wm.dtype))
        for b in range(n):
            r = (xr[b] @ wm).view(d, h, w, co, 2, 2, 2)
            if bias is not None:
                r = r + bias.view(1, 1, 1, co, 1, 1, 1)
            o[b, ..., :co].view(d, 2, h, 2, w, 2, co).copy_(r.permute(0, 4, 1, 5, 2, 6, 3))
        o[..., co:].copy_(skip.permute(0, 2, 3, 4, 1))
        return out

    @staticmethod
    def _up2_axis(x: torch.Tensor, ax: int, out: torch.Tensor) -> torch.Tensor:
        """2x linear upsampling (align_corners=False: weights 3/4 and 1/4, edges clamped) along dim `ax`."""
        n = x.shape[ax]
        src = x.permute(0, 2, 3, 4, 1)
        a = ax - 1
        par = out.permute(0, 2, 3, 4, 1).unflatten(a, (n, 2))
        even, odd = par.select(a + 1, 0), par.select(a + 1, 1)
        if n > 1:
            torch.lerp(src.narrow(a, 1, n - 1), src.narrow(a, 0, n - 1), 0.25, out=even.narrow(a, 1, n - 1))
            torch.lerp(src.narrow(a, 0, n - 1), src.narrow(a, 1, n - 1), 0.25, out=odd.narrow(a, 0, n - 1))
        even.narrow(a, 0, 1).copy_(src.narrow(a, 0, 1))
        odd.narrow(a, n - 1, 1).copy_(src.narrow(a, n - 1, 1))
        return out

    def _up2(self, x: torch.Tensor, slab: int = 16) -> torch.Tensor:
        """Trilinear 2x upsampling (align_corners=False), separable: D on the whole, H and W slab by slab
        of the output, so only the result is full size."""
        n, c, d, h, w = x.shape
        xd = self._up2_axis(x, 2, _empty_cl(n, c, (2 * d, h, w)))
        out = self._buffer("up", (n, c, 2 * d, 2 * h, 2 * w))
        for z0 in range(0, 2 * d, slab):
            part = xd[:, :, z0:z0 + slab]
            xh = self._up2_axis(part, 3, _empty_cl(n, c, (part.shape[2], 2 * h, w)))
            self._up2_axis(xh, 4, out[:, :, z0:z0 + slab])
        return out

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tag: str,
                into: Optional[torch.Tensor] = None) -> torch.Tensor:
        """1x1x1 convolution of a channels-last tensor as a GEMM (written into the storage of `into`)."""
        co = weight.shape[0]
        wt = weight.reshape(co, -1).t()
        shape = (x.shape[0], co, *x.shape[2:])
        if into is not None:
            n = math.prod(shape)
            out = into.permute(0, 2, 3, 4, 1).reshape(-1)[:n].view(shape[0], *shape[2:], co).permute(0, 4, 1, 2, 3)
        else:
            out = self._buffer(tag, shape)
        xr, orow = _rows(x), _rows(out)
        for b in range(x.shape[0]):
            if bias is not None:
                torch.addmm(bias, xr[b], wt, out=orow[b])
            else:
                torch.mm(xr[b], wt, out=orow[b])
        return out

    # -- forward
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, D, H, W), channels-first contiguous (channels-last where a routed branch is merged).
        With `reuse` set, the result lives in a work buffer that the next call overwrites (the sliding window
        consumes each result at once). A network with a second window merges two passes (nets/window_routing.py)."""
        window = getattr(self.net, "window", None)
        if window is None:
            return self.plain_logits(x)
        from .window_routing import run_windowed

        return run_windowed(self.plain_logits, x, window)

    def plain_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The network's logits of one input, in one pass."""
        net: Any = self.net
        slope = self.slope
        stem = _norm_act_(self._stem(x, net.stem.conv), net.stem.adn.N, slope)
        h = stem
        skips = []
        for down, enc in zip(net.downs, net.encs):
            h = _norm_act_(self._conv(h, down.conv), down.adn.N, slope)
            o = _norm_act_(self._conv(h, enc.conv1.conv), enc.norm1, slope)
            o = _norm_act_(self._conv(o, enc.conv2.conv), enc.norm2, None)
            o += h
            h = F.leaky_relu_(o, slope)
            skips.append(h)
        routed = getattr(net, "routed", None)
        first_branch = len(net.ups) - routed.blocks if routed is not None else -1
        branch_in = h if first_branch == 0 else None
        for i, (up, skip) in enumerate(zip(net.ups, reversed(skips[:-1]))):
            h = self._up_block(h, up, skip)
            if i + 1 == first_branch:
                branch_in = h
        routed_logits = None
        if routed is not None:  # per-organ routing: the branch's logits of the routed classes (network.RoutedConfig)
            b = branch_in
            assert b is not None  # set at the block where the branch leaves the decoder
            for j, up in enumerate(net.branch_ups):
                b = self._up_block(b, up, skips[-2 - (first_branch + j)])
            routed_logits = self._head(b.float(), stem, net.branch_fuse, net.branch_out, None, "b").clone()
            del b, branch_in
        del skips
        out_into = stem if net.head_out.weight.shape[0] <= stem.shape[1] else None  # stem is spent: reuse it
        out = self._head(h.float(), stem, net.head_fuse, net.head_out, out_into, "")
        if routed_logits is not None:
            out.index_copy_(1, net.routed_index, routed_logits)
        return out

    def _up_block(self, h: torch.Tensor, up: Any, skip: torch.Tensor) -> torch.Tensor:
        """One MONAI UnetUpBlock: transposed conv, concatenation with the skip, two conv + norm + act."""
        o = self._transp2_cat(h, up.transp_conv.conv, skip)
        cb = up.conv_block
        o = _norm_act_(self._conv(o, cb.conv1.conv), cb.norm1, self.slope)
        return _norm_act_(self._conv(o, cb.conv2.conv), cb.norm2, self.slope)

    def _head(self, h: torch.Tensor, stem: torch.Tensor, fuse_block: Any, out_conv: torch.nn.Conv3d,
              into: Optional[torch.Tensor], tag: str) -> torch.Tensor:
        """out_conv(fuse_block(cat(up(h), stem))), with the fuse projection moved before the upsampling."""
        fuse = fuse_block.conv
        cf = h.shape[1]
        w = fuse.weight.reshape(fuse.weight.shape[0], -1)
        if (into is stem and w.shape[0] == stem.shape[1] and out_conv.weight.shape[0] <= stem.shape[1]
                and all(s == 2 * f for s, f in zip(stem.shape[2:], h.shape[2:]))):
            return self._head_in_stem(h, stem, fuse_block, out_conv, w, cf)
        g = self._linear(h, w[:, :cf], fuse.bias, "g" + tag)  # the decoder's share of head_fuse, at half resolution
        if all(s == 2 * f for s, f in zip(stem.shape[2:], g.shape[2:])):
            u = self._up2(g)
        else:
            u = F.interpolate(g, size=stem.shape[2:], mode="trilinear",
                              align_corners=False).contiguous(memory_format=_CL)
        ur, sr, ws = _rows(u), _rows(stem), w[:, cf:].t()
        for b in range(u.shape[0]):
            ur[b].addmm_(sr[b], ws)
        u = _norm_act_(u, fuse_block.adn.N, self.slope)
        return self._linear(u, out_conv.weight, out_conv.bias, "out" + tag, into=into)

    def _head_in_stem(self, h: torch.Tensor, stem: torch.Tensor, fuse_block: Any,
                      out_conv: torch.nn.Conv3d, w: torch.Tensor, cf: int, slab: int = 16) -> torch.Tensor:
        """The last head, computed in the stem's own storage (the stem is read for the last time here): no
        second full-resolution buffer for the fused features (fewer pages to touch).

        Slab by slab along D: the 2x upsampling of the fuse projection, plus the stem's share, overwrites the
        stem slab it was computed from. Then norm + act in place, and the output 1x1x1 convolution into the
        channels-first logits buffer."""
        fuse = fuse_block.conv
        g = self._linear(h, w[:, :cf], fuse.bias, "g")  # the decoder's share of head_fuse, at half resolution
        n, c, d, hh, ww = g.shape
        xd = self._up2_axis(g, 2, _empty_cl(n, c, (2 * d, hh, ww)))
        del g
        ws = w[:, cf:].t()
        srow = stem.permute(0, 2, 3, 4, 1)  # (N, D, H, W, C), contiguous
        for z0 in range(0, 2 * d, slab):
            part = xd[:, :, z0:z0 + slab]
            ps = part.shape[2]
            xh = self._up2_axis(part, 3, _empty_cl(n, c, (ps, 2 * hh, ww)))
            us = self._up2_axis(xh, 4, _empty_cl(n, c, (ps, 2 * hh, 2 * ww))).permute(0, 2, 3, 4, 1)
            for b in range(n):
                us[b].view(-1, c).addmm_(srow[b, z0:z0 + ps].reshape(-1, c), ws)
            srow[:, z0:z0 + ps].copy_(us)
        del xd
        _norm_act_(stem, fuse_block.adn.N, self.slope)
        return self._project_channels_first(stem, out_conv)

    def _project_channels_first(self, x: torch.Tensor, conv: torch.nn.Conv3d) -> torch.Tensor:
        """The output 1x1x1 convolution of a channels-last tensor, written channels-first (N, C, D, H, W)
        contiguous: each row block as W x^T, so BLAS reads the rows transposed and no transpose is copied.
        The sliding window then adds the result into its channels-first output about 5x faster than a
        channels-last one, and the GEMM itself runs 3x faster than row-major output of 14 columns
        (measured at a 128 x 128 x 224 window)."""
        n, c = x.shape[:2]
        co = conv.weight.shape[0]
        w = conv.weight.reshape(co, c)
        bias = conv.bias[:, None] if conv.bias is not None else None
        out = self._buffer("logits", (n, co, *x.shape[2:]), channels_last=False)
        rows = _rows(x)
        for b in range(n):
            o = out[b].view(co, -1)
            for r0 in range(0, rows.shape[1], _STAT_ROWS):
                part = rows[b, r0:r0 + _STAT_ROWS].t()
                if bias is not None:
                    torch.addmm(bias, w, part, out=o[:, r0:r0 + _STAT_ROWS])
                else:
                    torch.mm(w, part, out=o[:, r0:r0 + _STAT_ROWS])
        return out


def bf16_supported() -> bool:
    """Whether this CPU runs oneDNN's bfloat16 convolutions natively (AVX512-BF16 or AMX); elsewhere they are
    emulated and slower than float32. DINOMIX_FLOAT32=1 turns bfloat16 off."""
    if os.environ.get("DINOMIX_FLOAT32"):
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# How close the CPU kernel's logits must be to `net(x)` on the check input, as a fraction of their largest
# magnitude: float32 reproduces the module to rounding; bfloat16 activations (8 significant bits) drift more.
_CHECK_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}


def cpu_runner(net: torch.nn.Module, device: torch.device, bf16: bool = False) -> Optional[FastStudent]:
    """A FastStudent for this network if it runs on the CPU and reproduces `net(x)` on a test input."""
    if (device.type != "cpu" or os.environ.get("DINOMIX_NO_FASTPATH") or not isinstance(net, StudentUNet)
            or not FastStudent.supports(net)):
        return None
    try:
        fast = FastStudent(net, bf16=bf16)
        div = net.cfg.divisor
        g = torch.Generator().manual_seed(0)
        x = torch.rand((1, 1, 2 * div, 2 * div, 3 * div), generator=g)
        # one pass compared: a network with a second window merges two passes, and the kernel runs both as the
        # module does (nets/window_routing.py)
        with torch.no_grad():
            ref = net.plain_logits(x)
            got = fast.plain_logits(x)
        tol = _CHECK_TOLERANCE[fast.dtype] * float(ref.abs().max())
        if got.shape != ref.shape or not torch.allclose(got, ref, rtol=1e-3, atol=tol):
            log.warning("the CPU kernel does not reproduce this network's logits: segmenting with the slower "
                        "torch module")
            return None
        return fast
    except Exception as e:  # any layer this runner does not know: use the module itself, and say so
        log.warning(f"the CPU kernel cannot run this network ({type(e).__name__}: {e}): segmenting with the slower "
                    "torch module")
        return None
