"""The CPU kernel (`nets.cpu_kernel.FastStudent`) is what segments on a CPU, and it computes the network's function:
same logits as `StudentUNet.forward` on inputs of odd, non-cubic shapes, for the shipped model and a routed
fine-tune, and the shipped model never silently falls back to the slower module. Its bfloat16 variant (the
default on a CPU with native bfloat16) stays within bfloat16 rounding of those logits and picks the same label
almost everywhere."""

from __future__ import annotations

import pytest
import torch

from dinomix.inference import Segmenter
from dinomix.nets.cpu_kernel import FastStudent, bf16_supported, cpu_runner
from dinomix.nets.unet import RoutedConfig, StudentConfig, StudentUNet

SHAPES = [(1, 1, 16, 32, 48), (1, 1, 48, 16, 32), (2, 1, 32, 32, 16)]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max())))


def _net(routed: bool = False) -> StudentUNet:
    torch.manual_seed(0)
    net = StudentUNet(StudentConfig(out_channels=5))
    if routed:
        parent = net
        net = StudentUNet(StudentConfig(out_channels=5, routed=RoutedConfig(classes=[2, 4], blocks=1)))
        net.init_branch_from(parent)
        with torch.no_grad():  # a trained branch: not the parent's copy any more
            for p in net.branch_parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[2:])) + f"-b{s[0]}")
@pytest.mark.parametrize("routed", [False, True], ids=["plain", "routed"])
def test_the_kernel_gives_the_networks_logits_on_odd_shapes(shape, routed):
    net = _net(routed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _close(FastStudent(net)(x), net(x))


def test_the_shipped_model_segments_with_the_kernel():
    seg = Segmenter("abdomen-btcv13", "cpu")
    assert isinstance(seg.fast, FastStudent), "the CPU kernel refused the shipped model: segmentation would be slower"


def test_the_kernel_can_be_switched_off(monkeypatch):
    monkeypatch.setenv("DINOMIX_NO_FASTPATH", "1")
    assert cpu_runner(_net(), torch.device("cpu")) is None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[2:])) + f"-b{s[0]}")
@pytest.mark.parametrize("routed", [False, True], ids=["plain", "routed"])
def test_the_bfloat16_kernel_stays_close_to_the_networks_logits(shape, routed):
    net = _net(routed)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = net(x), FastStudent(net, bf16=True)(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).abs().max()) <= 3e-2 * float(ref.abs().max())
    assert float((got.argmax(1) == ref.argmax(1)).float().mean()) >= 0.99


@pytest.mark.skipif(not bf16_supported(), reason="this CPU has no native bfloat16 (AVX512-BF16 or AMX)")
def test_the_shipped_model_uses_bfloat16_where_the_cpu_has_it():
    assert Segmenter("abdomen-btcv13", "cpu").fast.dtype == torch.bfloat16


def test_float32_can_be_forced(monkeypatch):
    monkeypatch.setenv("DINOMIX_FLOAT32", "1")
    seg = Segmenter("abdomen-btcv13", "cpu")
    assert isinstance(seg.fast, FastStudent) and seg.fast.dtype == torch.float32


def test_the_logits_come_channels_first_so_the_sliding_window_adds_them_without_a_strided_copy():
    x = torch.randn((1, 1, 32, 32, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert FastStudent(_net())(x).is_contiguous()


def test_work_buffers_reused_from_window_to_window_give_each_window_its_own_logits():
    net = _net()
    fast = FastStudent(net)
    fast.reuse = True
    g = torch.Generator().manual_seed(3)
    windows = [torch.randn((1, 1, 32, 32, 48), generator=g) for _ in range(3)]
    with torch.no_grad():
        for x in windows:
            assert _close(fast(x).clone(), net(x))
    assert fast._buffers, "the buffers were not kept between windows"
