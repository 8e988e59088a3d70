"""Design study: does a converged refit of the output layer learn more from a few corrected scans than the organ
offsets do, and how much could it learn at best?

    python benchmarks/head_refit_design.py --model MODEL --scans ID [ID ...] [--corrected 2 3 6]

Why: the routed branch gets 110-180 SGD iterations in ten CPU minutes and leave-one-scan-out never vouched for it;
the organ offsets (one number per organ) carry only where the parent has a systematic bias. Between the two is the
output layer itself: for every routed organ, the row of the parent's last 1x1 convolution (16 weights and a bias over
the features the parent already computes), refitted on the corrected scans with everything else frozen. The other
classes' logits stay the parent's; a voxel outside the reviewed organs is scored as "one of the classes nobody
reviewed", whose logits are fixed. The loss is the parent's own (soft Dice + cross-entropy); L-BFGS fits its 17
numbers per organ to convergence in 5 to 90 s (scoring included), so the number of iterations is not what limits
it. An L2 pull towards the parent's row (L2-SP) bounds how far it moves. Hand-written: a 17-parameter fit on cached
features needs no library beyond torch's L-BFGS.

Per fold (a choice of --corrected scans; both correction styles, as the Trainer exports them: the parent's labels
with the reviewed organs replaced by the reference): the rows of the reviewed organs the parent fits below 90 on the
corrections are refitted, and every organ is scored on the other scans. Also the *oracle* per fold: the same refit
on the scored scans themselves with their full labels, scored on them: what a refitted output layer could gain at
best on those patients (an upper bound, not a method). Prints a table, writes benchmarks/results/head_refit_design.json.

Choose designs on scans the parent never saw and never on the P1 test scans.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibration_design as CD  # noqa: E402
import p1_common as P  # noqa: E402

BELOW = 90.0
# voxels the refit can change: labeled as a routed organ, or where some routed organ's logit is within this many
# units of the voxel's best logit (the others are far from every routed organ's border and carry no information)
MARGIN = 8.0
# at most this many of those voxels enter the fit (the oracle's dozen scans have ~7 M)
MAX_VOXELS = 1_500_000


def parent_features(model: str, ids: list[str], btcv: Path, work: Path):
    """(features per scan (F, V) float16: the input of the output convolution; reference labels (V,) long; the output
    convolution's weight (C, F) and bias (C,); meta), on the fast model grid, cached in `work`."""
    import torch
    import torch.nn.functional as F
    from monai.inferers import sliding_window_inference

    from dinomix.modelfile import load_model
    from dinomix.nets.unet import fit_roi
    from dinomix.registry import resolve

    entry = resolve(model)
    meta = entry.meta
    cache = work / f"features-{meta.weights_sha256[:12]}-{'-'.join(ids)}.pt"
    net, _ = load_model(entry.path, torch.device("cpu"))
    w, b = net.head_out.weight.detach()[:, :, 0, 0, 0].float(), net.head_out.bias.detach().float()
    if cache.is_file():
        d = torch.load(cache)
        return d["features"], d["labels"], w, b, meta
    cached = CD.cached_p1_cases(meta, ids, btcv, work)
    roi = fit_roi(meta.preprocessing.mode("fast").roi_size, meta.architecture.divisor)
    net.eval()

    def fused(x: torch.Tensor) -> torch.Tensor:
        stem, levels = net.forward_pyramid(x)
        up = F.interpolate(levels[-1], size=stem.shape[2:], mode="trilinear", align_corners=False)
        return net.head_fuse(torch.cat([up, stem], dim=1))

    feats, labels = [], []
    with torch.no_grad():
        for c in cached:
            t0 = time.perf_counter()
            div = meta.architecture.divisor
            roi_case = tuple(min(r, -(-n // div) * div) for r, n in zip(roi, c.image.shape[1:]))
            f = sliding_window_inference(c.image[None].as_subclass(torch.Tensor), roi_case, 1, fused, overlap=0.25,
                                         mode="gaussian")[0]
            feats.append(f.reshape(f.shape[0], -1).to(torch.float16))
            labels.append(c.label.reshape(-1).long().as_subclass(torch.Tensor))
            print(f"  features {c.id}: {tuple(f.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.save({"features": feats, "labels": labels}, cache)
    return feats, labels, w, b, meta


def dice_all(pred, ref, nc: int) -> list[Optional[float]]:
    """Dice % per class, background None (None where neither has the class)."""
    from dinomix.training.routing import dice

    return [None] + [dice(pred == k, ref == k) for k in range(1, nc)]


def logits_of(feat, w, b, rows: Optional[dict] = None):
    """The parent's logits (C, V) from its features, the routed rows replaced by `rows` {class: (w, b)}."""
    z = w @ feat.float() + b[:, None]
    for k, (wk, bk) in (rows or {}).items():
        z[k] = wk @ feat.float() + bk
    return z


def refit(feats, targets, reviewed: list[int], routed: list[int], w, b, lam: float, dice: bool = False) -> dict:
    """Refit the output rows of `routed` on (features, partial labels) by L-BFGS: cross-entropy over the voxels
    near a routed organ, a voxel labeled with a reviewed organ targeting it and any other voxel targeting the set of
    classes nobody reviewed (its logits fixed: convex), plus lam * |row - parent row|^2; with `dice`, plus the mean
    soft Dice loss of the routed organs over those voxels (the parent's own training loss is Dice + cross-entropy:
    cross-entropy alone draws small organs smaller than Dice would, which the oracle showed; no longer convex)."""
    import torch

    nc = w.shape[0]
    other = torch.tensor([c for c in range(nc) if c not in reviewed])
    rt = torch.tensor(routed)
    xs, ys = [], []
    for f, y in zip(feats, targets):
        z = logits_of(f, w, b)
        near = (z[rt].max(0).values >= z.max(0).values - MARGIN) | torch.isin(y, rt)
        xs.append(f[:, near].float())
        ys.append(y[near])
    x, y = torch.cat(xs, 1), torch.cat(ys)
    if x.shape[1] > MAX_VOXELS:  # a random subset (seeded): the fit has 17 numbers per organ to find
        keep = torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(0))[:MAX_VOXELS]
        x, y = x[:, keep], y[keep]
    z0 = w @ x + b[:, None]
    pos = torch.isin(y, torch.tensor(reviewed))
    lse_other = torch.logsumexp(z0[other], 0)
    w0, b0 = w[rt].clone(), b[rt].clone()
    wr, br = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([wr, br], lr=1, max_iter=100, history_size=20, line_search_fn="strong_wolfe")
    n = x.shape[1]
    onehot = (y[None] == rt[:, None]).float()

    def closure():
        opt.zero_grad()
        z = z0.index_copy(0, rt, wr @ x + br[:, None])
        lse = torch.logsumexp(z, 0)
        tgt = torch.where(pos, z.gather(0, y[None]).squeeze(0), lse_other)
        loss = (lse - tgt).sum() / n + lam * (((wr - w0) ** 2).sum() + ((br - b0) ** 2).sum())
        if dice:
            pr = torch.exp(z[rt] - lse)
            inter = (pr * onehot).sum(1)
            loss = loss + (1 - 2 * inter / (pr.sum(1) + onehot.sum(1) + 1e-3)).mean()
        loss.backward()
        return loss

    opt.step(closure)
    return {k: (wr[i].detach(), br[i].detach()) for i, k in enumerate(routed)}


def study(feats, labels, w, b, names: list[str], ids: list[str], n_corrected: int, lams: list[float],
          losses: list[str], styles: tuple[str, ...], limit: Optional[int], oracle_lams: list[float],
          oracle_only: bool = False, blocks: bool = False) -> list[dict]:
    """Per fold, the refit arms (fitted on the corrected scans) and the oracle arms (fitted on the scored scans).
    `blocks`: folds of consecutive scans, as the correction-loop benchmark rotates them (fold i corrects scans
    n*i .. n*i+n-1), instead of `limit` random choices."""
    nc = len(names)
    preds = [logits_of(f, w, b).argmax(0) for f in feats]
    base = [dice_all(p, y, nc) for p, y in zip(preds, labels)]
    out = []
    for style in styles:
        rev = list(range(1, nc)) if style == "all" else [names.index(o) for o in CD.MINORITY]
        folds = ([tuple(range(i, i + n_corrected)) for i in range(0, len(ids) - n_corrected + 1, n_corrected)]
                 if blocks else CD.fold_choices(len(ids), n_corrected, limit))
        for fit in folds:
            scored = [i for i in range(len(ids)) if i not in fit]
            corr = [CD.trainer_export(preds[i], labels[i], rev) for i in fit]
            fit_dice = {k: statistics.mean(v) for k in rev
                        if (v := [d for i, t in zip(fit, corr) if (d := dice_all(preds[i], t, nc)[k]) is not None])}
            routed = [k for k, d in fit_dice.items() if d < BELOW]
            parent_scored = {k: statistics.mean(v) for k in range(1, nc)
                             if (v := [base[i][k] for i in scored if base[i][k] is not None])}
            fold = {"style": style, "n_corrected": n_corrected, "corrected": [ids[i] for i in fit],
                    "scored": [ids[i] for i in scored], "reviewed": [names[k] for k in rev],
                    "routed": [names[k] for k in routed],
                    "parent": {names[k]: round(v, 2) for k, v in parent_scored.items()}, "arms": {}}
            oracle_routed = [k for k in rev if parent_scored.get(k, 100.0) < BELOW]
            arms = [(f"refit {loss} lam={lam:g}", lam, loss, fit, corr, routed) for loss in losses for lam in lams
                    if not oracle_only] + \
                   [(f"oracle {loss} lam={lam:g}", lam, loss, scored, [labels[i] for i in scored], oracle_routed)
                    for loss in losses for lam in oracle_lams]
            for name, lam, loss, on, targets, rt in arms:
                if not rt:
                    fold["arms"][name] = {"change": {}, "gain": 0.0, "worst": 0.0}
                    continue
                t0 = time.perf_counter()
                rows = refit([feats[i] for i in on], targets, rev, rt, w, b, lam, loss == "dice+ce")
                change = {}
                new = [dice_all(logits_of(feats[i], w, b, rows).argmax(0), labels[i], nc) for i in scored]
                for k in range(1, nc):
                    pairs = [(base[i][k], n[k]) for i, n in zip(scored, new) if base[i][k] is not None]
                    if pairs:
                        change[names[k]] = round(statistics.mean((a or 0.0) - p for p, a in pairs), 2)
                # the benchmark's target: every reviewed organ the parent draws below 90 on the scored scans (an organ
                # not refitted changes only where a refitted one now wins)
                g = statistics.mean([change[names[k]] for k in rev
                                     if names[k] in change and parent_scored[k] < BELOW] or [0.0])
                fold["arms"][name] = {"change": change, "gain": round(g, 2),
                                      "worst": round(min(change.values(), default=0.0), 2),
                                      "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  {n_corrected} corrected {fold['corrected']} {style}: routed {fold['routed']}; " +
                  "; ".join(f"{a} {v['gain']:+.2f} (worst {v['worst']:+.2f})" for a, v in fold["arms"].items()),
                  flush=True)
            out.append(fold)
    return out


def table(folds: list[dict]) -> tuple[str, list[dict]]:
    rows, lines = [], ["| corrected | arm | gain (mean over folds) | smallest fold gain | largest fold gain | "
                       "worst organ | folds with an organ down > 1 | folds gaining >= 2 |",
                       "|---|---|---|---|---|---|---|---|"]
    for n in sorted({f["n_corrected"] for f in folds}):
        for style in sorted({f["style"] for f in folds}):
            sel = [f for f in folds if f["n_corrected"] == n and f["style"] == style]
            for arm in sel[0]["arms"]:
                g = [f["arms"][arm]["gain"] for f in sel]
                wst = [f["arms"][arm]["worst"] for f in sel]
                row = {"corrected": n, "style": style, "arm": arm, "gain": round(statistics.mean(g), 2),
                       "smallest": min(g), "largest": max(g), "worst": min(wst),
                       "harmed": sum(x < -1.0 for x in wst), "reached_2": sum(x >= 2.0 for x in g), "folds": len(g)}
                rows.append(row)
                lines.append(f"| {n} ({style}) | {arm} | {row['gain']:+.2f} | {row['smallest']:+.2f} | "
                             f"{row['largest']:+.2f} | {row['worst']:+.2f} | {row['harmed']} of {len(g)} | "
                             f"{row['reached_2']} of {len(g)} |")
    return "\n".join(lines), rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="parent: registry name or model file (never trained on --scans)")
    p.add_argument("--scans", nargs="+", required=True, help="P1 case ids the parent never saw (not the test scans)")
    p.add_argument("--corrected", type=int, nargs="+", default=[2, 3, 6])
    p.add_argument("--folds-per-count", type=int, default=8)
    p.add_argument("--lams", type=float, nargs="+", default=[0.0, 0.01, 0.1], help="L2-SP weights (pull towards "
                   "the parent's rows)")
    p.add_argument("--oracle-lams", type=float, nargs="+", default=[0.0], help="L2-SP weights of the oracle arm "
                   "(fitted on the scored scans themselves: the ceiling)")
    p.add_argument("--oracle-only", action="store_true", help="only the oracle (the ceiling: it chooses nothing, so "
                   "it may be measured on the P1 test scans, e.g. the correction-loop benchmark's folds)")
    p.add_argument("--blocks", action="store_true", help="folds of consecutive --scans, as correction_loop.py "
                   "rotates them, instead of random choices")
    p.add_argument("--losses", nargs="+", choices=["ce", "dice+ce"], default=["dice+ce"],
                   help="ce alone draws small organs smaller: even the oracle lost Dice with it (2026-12-07)")
    p.add_argument("--styles", nargs="+", choices=["all", "minority"], default=["all", "minority"])
    p.add_argument("--data", default=os.environ.get("DINOMIX_DATA", str(P.REPO.parent / "shared" / "data")))
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=str(P.RESULTS / "head_refit_design.json"))
    args = p.parse_args(argv)
    btcv = P.p1_data(args.data)
    if btcv is None:
        return 1 if P.on_ci() else 0
    if set(args.scans) & set(P.p1_split(btcv)["test"]) and not args.oracle_only:
        print("--scans includes P1 test scans: designs are never chosen on them (--oracle-only measures the ceiling "
              "there)", file=sys.stderr)
        return 2
    work = P.make_workdir(args.workdir, "head_refit_design")
    feats, labels, w, b, meta = parent_features(args.model, args.scans, btcv, work)
    names = ["background"] + meta.organs.names
    folds = [f for n in args.corrected
             for f in study(feats, labels, w, b, names, args.scans, n, args.lams, args.losses, tuple(args.styles),
                            args.folds_per_count, args.oracle_lams, args.oracle_only, args.blocks)]
    text, rows = table(folds)
    print(f"\nparent {args.model}; scans {args.scans}; reviewed organs below {BELOW:g} refitted\n\n{text}")
    P.write_json({"benchmark": "head_refit_design", "issue": 17, "date": P.now_iso(), **P.machine(None),
                  "parent": args.model, "scans": args.scans, "corrected": args.corrected, "lams": args.lams,
                  "margin": MARGIN, "table": rows, "folds": folds}, Path(args.out))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
