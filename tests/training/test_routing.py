"""Per-organ routing of a fine-tune (network.RoutedConfig, dinomix/training/routing.py): the routed network starts as
exactly its parent, organs that are not routed keep the parent's logits whatever the branch learns, the CPU kernel
and the model file carry the routing, and the self-check removes what it cannot vouch for."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinomix.modelfile import ModelMeta, load_model, save_model
from dinomix.nets.cpu_kernel import cpu_runner
from dinomix.nets.unet import RoutedConfig, StudentConfig, StudentUNet
from dinomix.training.data import CachedCase
from dinomix.training.routing import Routing, neighbour_losses, route_organs, self_check, untrained_check, what_next

SMALL = StudentConfig(out_channels=5, stem_channels=8, channels=(8, 16, 24, 32))
NAMES = ["background", "liver", "spleen", "gallbladder", "pancreas"]


def _parent() -> StudentUNet:
    torch.manual_seed(0)
    return StudentUNet(SMALL).eval()


def _routed(parent: StudentUNet, classes: list[int], blocks: int = 1) -> StudentUNet:
    net = StudentUNet(SMALL.model_copy(update={"routed": RoutedConfig(classes=classes, blocks=blocks)}))
    net.init_branch_from(parent)
    return net.eval()


def _nudge(net: StudentUNet, scale: float = 0.2) -> None:
    """What training does: the branch's weights move."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.branch_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


X = torch.rand((1, 1, 32, 32, 48), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_a_routed_network_starts_as_exactly_its_parent(blocks):
    parent = _parent()
    with torch.no_grad():
        a, b = parent(X), _routed(parent, [2, 4], blocks)(X)
    assert torch.equal(a[:, [0, 1, 3]], b[:, [0, 1, 3]])  # not routed: the parent's own numbers
    assert torch.allclose(a, b, rtol=0, atol=1e-6)  # routed: the same weights (a narrower GEMM, last-bit rounding)


def test_organs_that_are_not_routed_keep_the_parents_logits_whatever_the_branch_learns():
    parent = _parent()
    net = _routed(parent, [3])
    _nudge(net)
    with torch.no_grad():
        a, b = parent(X), net(X)
    keep = [0, 1, 2, 4]
    assert torch.equal(a[:, keep], b[:, keep])
    assert not torch.allclose(a[:, 3], b[:, 3])


def test_only_the_branch_learns_once_the_trunk_is_frozen():
    net = _routed(_parent(), [3])
    net.freeze_trunk()
    trainable = {id(p) for p in net.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in net.branch_parameters()} and trainable
    loss = net(X)[:, 3].mean()
    loss.backward()
    assert all(p.grad is None for p in net.parameters() if not p.requires_grad)


def test_the_cpu_kernel_computes_the_routed_network():
    net = _routed(_parent(), [1, 3], blocks=2)
    _nudge(net)
    fast = cpu_runner(net, torch.device("cpu"))
    assert fast is not None  # the kernel checks itself against the module and would refuse on a mismatch
    with torch.no_grad():
        ref = net(X)
        fast.reuse = True
        fast(X)
        got = fast(X)  # second call: reused work buffers
    assert torch.allclose(got, ref, atol=1e-4 * float(ref.abs().max()))


def test_unrouting_an_organ_gives_it_back_the_parents_output():
    parent = _parent()
    net = _routed(parent, [1, 3])
    _nudge(net)
    with torch.no_grad():
        before = net(X)
        net.restrict_routing([3])
        after = net(X)
        assert net.cfg.routed.classes == [3]
        assert torch.equal(after[:, 1], parent(X)[:, 1]) and torch.equal(after[:, 3], before[:, 3])
        net.restrict_routing([])
        assert net.cfg.routed is None and torch.equal(net(X), parent(X))
    assert not any(k.startswith("branch_") for k in net.state_dict())


def test_a_routed_model_file_round_trips(tmp_path):
    net = _routed(_parent(), [2])
    _nudge(net)
    from dinomix.organs import OrganSchema
    from dinomix.preprocessing import PreprocessConfig

    meta = ModelMeta(model_id="routed-test", title="t", trained=True, architecture=net.cfg,
                     organs=OrganSchema.from_names(NAMES[1:]), preprocessing=PreprocessConfig())
    save_model(tmp_path / "m.safetensors", net, meta)
    loaded, m = load_model(tmp_path / "m.safetensors")
    assert m.architecture.routed == RoutedConfig(classes=[2], blocks=1)
    with torch.no_grad():
        assert torch.equal(loaded(X), net(X))


def test_routing_settings_are_checked():
    with pytest.raises(ValueError, match="distinct organ channels"):
        StudentUNet(SMALL.model_copy(update={"routed": RoutedConfig(classes=[0])}))
    with pytest.raises(ValueError, match="distinct organ channels"):
        StudentUNet(SMALL.model_copy(update={"routed": RoutedConfig(classes=[2, 2])}))
    with pytest.raises(Exception, match="extra"):
        RoutedConfig.model_validate({"classes": [1], "typo": 1})


# ---------------------------------------------------------------- which organs learn, and the self-check

def _case(cid: str, label: np.ndarray, annotated: list[int]) -> CachedCase:
    ann = np.zeros(len(NAMES), bool)
    ann[0] = True
    ann[annotated] = True
    lab = torch.from_numpy(label.astype(np.uint8))
    return CachedCase(cid, torch.zeros((1, *label.shape)), lab, ann, {})


def _blobs() -> np.ndarray:
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[2:12, 2:12, 2:12] = 1     # liver, 1000 voxels
    lab[14:18, 14:18, 14:18] = 2  # spleen, 64 voxels
    lab[2:6, 14:18, 2:6] = 3      # gallbladder, 64 voxels
    return lab


def test_an_organ_learns_only_where_the_correction_changed_it():
    gt = _blobs()
    pred = gt.copy()
    pred[2:12, 2:12, 11] = 0         # liver: 90 % of it found -> Dice 94.7, a touch-up
    pred[2:6, 14:18, 2:4] = 0        # gallbladder: half found -> Dice 66.7
    case = _case("a", gt, annotated=[1, 3])  # spleen not reviewed
    r = route_organs([case], [torch.from_numpy(pred)], len(NAMES), below=90.0)
    assert r.classes == [3]
    assert r.parent_dice[1] == pytest.approx(94.74, abs=0.01) and 1 in r.kept
    assert 2 not in r.parent_dice  # not annotated: never routed


def test_a_routed_organ_that_eats_a_neighbour_is_unrouted():
    gt = _blobs()
    parent = torch.from_numpy(gt.copy())
    parent[2:6, 14:18, 2:4] = 0      # the parent missed half the gallbladder
    child = torch.from_numpy(gt.copy())  # the child found it ...
    child[14:18, 14:18, 14] = 3      # ... and took a quarter of the spleen (not corrected)
    losses = neighbour_losses([parent], [child], [3], len(NAMES))
    assert losses == {2: {3: pytest.approx(0.25)}}
    case = _case("a", gt, annotated=[3])
    sc = self_check(NAMES, Routing(classes=[3]), [case], [parent], [child], [], [])
    assert 3 in sc.removed and "spleen" in sc.removed[3]
    assert sc.verdict == "safe" and "parent's output for every organ" in sc.message


def test_what_corrected_scans_alone_taught_is_not_kept_unless_asked_for():
    gt = _blobs()
    parent = torch.from_numpy(gt.copy())
    parent[2:6, 14:18, 2:4] = 0
    child = torch.from_numpy(gt.copy())  # learnt the gallbladder, nothing else changed
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [parent], [child], [], [])
    assert 3 in sc.removed and "nothing can vouch" in sc.removed[3]
    assert sc.verdict == "safe" and "Nothing was kept" in sc.message and "Hold out for evaluation" in sc.message
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [parent], [child], [], [],
                    keep_unverified=True)
    assert sc.removed == {} and sc.verdict == "unknown"
    assert [c.passed for c in sc.checks] == [True, None, None, True]


def test_the_advice_after_an_empty_fine_tune_gives_the_counts_the_rules_need():
    """One corrected scan: holding it out would leave nothing to learn from, so the advice asks for another corrected
    scan (a window, strongly agreed offsets; vouched offsets from three) and for held-out scans (a branch, safe from
    three); from three corrected scans on, only the held-out advice is left."""
    one = untrained_check(NAMES, Routing(classes=[3]), 1).message
    assert "parent's output for every organ" in one and "Correct another scan" in one
    assert "window fitted to a scanner" in one and "from 3 on" in one
    assert "unlabeled" in one  # they judge a window fitted on the one corrected scan
    assert "Hold out for evaluation" in one and "3 held-out scans" in one
    assert "Correct 1 more scan of" in what_next(2) and "Correct another scan" not in what_next(2)
    three = what_next(3)
    assert "more scan" not in three and "Hold out for evaluation" in three


def test_the_message_says_why_nothing_on_the_corrected_scans_vouches_for_a_kept_organ():
    """One corrected scan cannot be left out; two or more without leave-one-scan-out (--no-loco) were not: the
    message names which, instead of claiming a single scan (2026-12-06: three corrected and three held-out scans
    with --no-loco read "with one corrected scan and no held-out case")."""
    gt = _blobs()
    parent = torch.from_numpy(gt.copy())
    parent[2:6, 14:18, 2:4] = 0
    child = torch.from_numpy(gt.copy())
    one = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [parent], [child], [], [],
                     keep_unverified=True)
    two = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3]), _case("b", gt, [3])], [parent, parent],
                     [child, child], [], [], keep_unverified=True)
    assert "with one corrected scan" in one.message
    assert "without leave-one-scan-out (--no-loco)" in two.message and "one corrected scan" not in two.message
    assert one.verdict == two.verdict == "unknown"


def test_leave_one_scan_out_can_speak_against_a_learnt_organ_but_not_vouch_for_it():
    gt = _blobs()
    parent = torch.from_numpy(gt.copy())
    parent[2:6, 14:18, 2:4] = 0
    child = torch.from_numpy(gt.copy())
    cases = [_case("a", gt, [3]), _case("b", gt, [3])]

    def check(loco, cases=cases, keep_unverified=True):
        n = len(cases)
        return self_check(NAMES, Routing(classes=[3]), cases, [parent] * n, [child] * n, [], [], loco={3: loco},
                          keep_unverified=keep_unverified)

    assert "left-out" in check([+4.0, -2.5]).removed[3]
    assert "no clear gain" in check([+0.3, +0.2]).removed[3]
    sc = check([+4.0, +1.0])  # kept only on request, and then unverified
    assert sc.removed == {} and sc.verdict == "unknown"
    three = cases + [_case("c", gt, [3])]
    # three gains of one sign that spread widely (a benchmark branch that then lost 2.3 points on other scans)
    assert "spread too widely" in check([+2.0, +4.0, +12.2], three).removed[3]
    # three consistent gains still do not vouch (a benchmark branch with +3.7, +4.4, +6.6 lost 3.0 elsewhere)
    sc = check([+3.7, +4.4, +6.6], three, keep_unverified=False)
    assert 3 in sc.removed and "nothing can vouch" in sc.removed[3] and sc.verdict == "safe"
    sc = check([+3.7, +4.4, +6.6], three)
    assert sc.removed == {} and sc.verdict == "unknown"


def test_harm_on_held_out_cases_makes_the_verdict_unsafe():
    gt = _blobs()
    t = torch.from_numpy(gt)
    # with held-out cases the fine-tune keeps what the corrected scans cannot vouch for until they have spoken
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [t], [t], [], [], keep_unverified=True)
    assert sc.verdict == "unknown"
    sc.add_holdout(["spleen -3.0"], 1)
    assert sc.verdict == "unsafe" and "spleen -3.0" in sc.message
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [t], [t], [], [], keep_unverified=True)
    sc.add_holdout([], 3)
    assert sc.verdict == "safe" and sc.checks[-1].passed is True


def test_one_or_two_held_out_cases_can_speak_against_but_not_vouch():
    """A benchmark branch that one held-out scan let through lost 2.2 Dice points on the other scans."""
    gt = _blobs()
    t = torch.from_numpy(gt)
    for n in (1, 2):
        sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [t], [t], [], [], keep_unverified=True)
        sc.add_holdout([], n)
        assert sc.verdict == "unknown" and sc.checks[-1].passed is True and "too few to vouch" in sc.message


def test_a_routed_organ_that_overreaches_on_unlabeled_scans_is_unrouted():
    gt = _blobs()
    t = torch.from_numpy(gt)
    parent_unl = torch.from_numpy(gt.copy())
    child_unl = parent_unl.clone()
    child_unl[0:12, 12:20, 0:8] = 3  # the gallbladder grows far beyond anything the corrections did
    child_unl[parent_unl == 1] = 1
    child_unl[parent_unl == 2] = 2
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [t], [t], [parent_unl], [child_unl])
    assert 3 in sc.removed and "unlabeled" in sc.removed[3]


# ---------------------------------------------------------------- the time budget

def test_the_iteration_count_follows_the_measured_pace(monkeypatch):
    import dinomix.training.finetune.budget as F

    class Cfg:
        iterations = 100

    clock = [0.0]
    monkeypatch.setattr(F.time, "monotonic", lambda: clock[0])
    replan = F.Replanner(Cfg)
    replan.start(deadline=100.0, after_s=10.0)  # started at 0.0
    for done in range(1, 11):  # 1 s a step: 90 s of training left -> 90 iterations in all
        clock[0] = float(done)
        Cfg.iterations = replan(done, clock[0])
    assert Cfg.iterations == 90
    for done in range(11, 21):  # the machine gets busy: 3 s a step from here
        clock[0] += 3.0
        Cfg.iterations = replan(done, clock[0])
    # 40 s spent at iteration 20, 50 s left at 3 s a step -> 16 more
    assert Cfg.iterations == 20 + math.floor(50 / 3)


def test_an_organ_the_held_out_cases_take_back_is_named_in_the_message():
    gt = _blobs()
    t = torch.from_numpy(gt)
    sc = self_check(NAMES, Routing(classes=[3]), [_case("a", gt, [3])], [t], [t], [], [], keep_unverified=True)
    sc.drop_learnt(3, NAMES, "worse on the held-out cases (-2.0 Dice points)")
    assert 3 in sc.removed and 3 not in sc.learnt and f"{NAMES[3]} taken back: worse" in sc.message


def test_a_kept_window_tells_the_clinician_what_segmenting_costs_and_which_scans_it_spares():
    """A kept window makes the model `unknown` and its message says that the reviewed organs are drawn through it,
    that segmenting now takes four passes (two judge each scan), and that another scanner's scan is drawn as before
    (2026-12-08: the message still said two passes after the smoothed judges had doubled them)."""
    from dinomix.training.window_calibration import WindowCalibration, WindowMap

    check = untrained_check(NAMES, Routing(classes=[3]), 1)
    cal = WindowCalibration(fitted=WindowMap(contrast=1.5, level=-20.0), classes=[3], fit_gains=[4.0], kept=True,
                            window_hu=(-43.0, 223.0), entropy=[-0.3], evidence="unlabeled scans")
    check.add_window(cal, NAMES, "fast")
    assert check.verdict == "unknown"
    assert f"draws {NAMES[3]} through a window fitted to your scanner" in check.message
    assert "in fast mode takes four passes" in check.message and "drawn as before" in check.message
    assert "1 unlabeled scan " in check.message and "entropy 30 % lower" in check.message
