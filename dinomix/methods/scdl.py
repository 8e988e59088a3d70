"""SCDL, Semantic Class Distribution Learning (Su et al., 2026, arXiv 2603.05202; reference code Zyh55555/SCDL),
as a trainer component (`SCDLComponent`, config `SCDLConfig`).

Why: with few labels and a long-tailed organ distribution, the segmentation loss and the pseudo-labels are
dominated by the large organs, and the features of small organs drift into the regions of the large ones.
SCDL shapes the class-conditional feature distributions directly: every class has a learnable Gaussian proxy
in an embedding space, the decoder's tokens are aligned with the proxies in both directions (CDBA), and the
labeled tokens anchor each proxy on its organ's semantics (SAC), so that unlabeled tokens are pulled towards
proxies that mean something.

What is computed each iteration (every row of the batch, labeled and mixed):

* Tokens: a decoder map (`feature_level`, default the last of `batch.features`, the 1/2-resolution map) is
  average-pooled (adaptive) to a `grid`^3 token grid (each axis capped at the map's size, so no token is a
  duplicate of another) and flattened; an MLP (x_dim -> 512 -> 512 -> 256, ReLU, dropout 0.2) embeds each
  token: z (B, L, D).
* Proxies: class c has a mean mu_c and a scale sigma_c = softplus(rho_c) (D each); `samples` (50)
  reparameterised samples mu_c + sigma_c * eps per class, eps from a torch.Generator seeded by (seed,
  iteration), so a resumed run draws the same samples. sigma starts at `init_sigma` (0.05): with the
  reference's Xavier init of rho (sigma ~ 0.7 per dimension) the samples of a 256-d proxy are almost
  isotropic noise around a mean of norm ~1, and every class looks the same at the start.
* Similarity (choice, `similarity`): s[b, l, c] = the mean over the samples of cos(z_l, sample_cs), the
  expected cosine of the token to class c's distribution ("samples", default; a broad class, one with a large
  sigma, has a smaller expected similarity). The cosine is linear in the normalised sample, so this equals
  normalise(z_l) . mean_s normalise(sample_cs) and no (B, L, C, S) tensor is built. "mean": cos(z_l, mu_c).
* CDBA, the two directions: embedding-to-proxy P_e2p(c | l) = softmax over classes of s / tau_e2p, and
  proxy-to-embedding P_p2e(l | c) = softmax over the tokens of the same row of s / tau_p2e. (The reference code
  takes both softmaxes over classes with the same logits, so its bidirectional KL is identically zero; here
  the second one is over tokens, as the name says.) The two are distributions over different sets, so they
  are compared as joint distributions over (token, class) pairs (choice, `kl_mode`):
  "joint" (default): P(l, c) = P_e2p(c | l) / L and Q(l, c) = P_p2e(l | c) / C (uniform marginals over tokens
  and over classes); the loss is KL(P || Q) + KL(Q || P), averaged over rows. It is zero exactly when the
  token-to-class assignment is balanced both ways (every token spreads one unit over the classes and every
  class claims the same total mass over the tokens): a head class whose proxy is close to every token, or a
  tail class whose proxy no token claims, is penalised, which is SCDL's debiasing aim.
  "token": Q(c | l) = P_p2e(l | c) renormalised over classes per token; KL(P_e2p || Q) + KL(Q || P_e2p),
  averaged over tokens.
  Equal class masses are a strong demand when background fills most tokens; with `kl_class_prior` "target"
  (joint mode) Q(l, c) = pi_c P_p2e(l | c) instead, pi the row's class proportions of the detached token
  targets (below; floored at `kl_prior_floor` and renormalised), so the alignment asks each class for its
  observed share of the tokens rather than 1/C.
* Bidirectional similarity (token targets on unlabeled tokens): b(c | l) = P_e2p(c | l) P_p2e(l | c)
  renormalised over classes, detached; since P_p2e divides by each class's total mass over the tokens, this
  is a class-balanced, sharpened version of P_e2p.
* Token targets w[b, l, c]: each voxel of the token's region contributes its ground-truth class where it has
  one, and the bidirectional similarity of the token where it has none: w = share + (1 - sum_c share) * b,
  with share[b, l, c] the fraction of the token's voxels that are ground truth of class c (the full-resolution
  target one-hot, adaptive-average-pooled onto the token grid, i.e. the class proportions of the token). A
  fully labeled token gets its ground-truth class proportions, a fully unlabeled one the detached
  bidirectional similarity (the paper's two cases); a token across a CutMix box edge gets a mixture.
  Ground truth = voxels with `known` True and (labeled row or confidence == 1): teacher pseudo-labels
  (confidence < 1) count as unlabeled, and a 0 that a partially labeled case leaves unknown ("background or
  an organ it does not annotate", `known` False) is never taken as background: it counts as unlabeled.
* Proxy contrastive loss: pos_c = w_c s_c and neg_c = (1 - w_c) s_c per token (the target-weighted and the
  complement-weighted expected similarity to class c), loss = mean over tokens and classes of
  exp(-(pos_c - neg_c)) = exp(-(2 w_c - 1) s_c): it raises the similarity to the target classes and lowers it
  to the others, smoothly (no temperature, bounded gradients). Plus `dist_weight` (0.1) x the distribution
  consistency term mean over tokens of sum_c w_c (1 - s_c), the expected cosine distance between the token and
  samples of its target classes: it pulls each class's sample cloud onto the tokens the class should cover
  (the scale sigma is learnt by this term and the contrastive one).
* SAC: for each organ c (background too with `sac_background`) with ground-truth tokens, its centre is the
  mean normalised embedding of those tokens (weighted by the class share of each token, `sac_tokens`
  "proportion"; or only tokens whose majority (> 1/2) is ground truth of c, "majority"), detached; loss =
  mean over those organs of 1 - cos(centre_c, mu_c). Only the proxy means receive its gradient.
* Prior tokens (`prior`, off by default): `prior_features(feature_map)` adds to a decoder map a 1x1x1
  convolution (zero-initialised, so switching it on changes nothing at first) of the upsampled prior tokens
  sum_c P(c | l) normalise(mu_c), P from the proxy means (no sampling noise). The trainer applies it during
  training only if it is wired to (it is not, at the time of writing); the exported network carries no SCDL
  module, so a network trained with it meets no prior at inference, which is why it stays off by default.

Loss terms (`losses`): scdl_cdba (KL, `cdba_weight`), scdl_proxy (contrastive + dist, `proxy_weight`),
scdl_sac (`sac_weight`), each times the component's own ramp (`ramp_start`, `rampup`); all weights default to
0.1. When no organ has ground-truth tokens, scdl_sac is 0 x (the sum of the parameters) so the graph stays
valid. The dropout of the embedding MLP uses the global torch RNG, which the trainer seeds per iteration.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, Field

from .components import AuxBatch, AuxComponent, grid3, ramp


class SCDLConfig(BaseModel):
    """SCDL in the semi-supervised trainer (`semi.components.scdl`); see the module docstring for each choice."""

    enabled: bool = False
    feature_level: int = Field(default=-1, description="index into batch.features (coarsest first); -1: 1/2 resolution")
    grid: int = Field(default=12, ge=1, le=256,
                      description="tokens per axis (adaptive average pooling, capped at the map size)")
    hidden_dim: int = Field(default=512, ge=1, le=8192)
    embed_dim: int = Field(default=256, ge=1, le=8192)
    dropout: float = Field(default=0.2, ge=0, lt=1)
    samples: int = Field(default=50, ge=1, le=10_000, description="reparameterised samples per class proxy")
    init_sigma: float = Field(default=0.05, gt=0, le=100, description="initial proxy scale softplus(rho)")
    similarity: Literal["samples", "mean"] = Field(
        default="samples", description="token-class similarity: mean cosine to the proxy samples, or to the proxy mean")
    tau_e2p: float = Field(default=0.2, gt=0, description="temperature of the embedding-to-proxy softmax (classes)")
    tau_p2e: float = Field(default=0.2, gt=0, description="temperature of the proxy-to-embedding softmax (tokens)")
    kl_mode: Literal["joint", "token"] = Field(default="joint", description="how the two directions are compared")
    kl_class_prior: Literal["uniform", "target"] = Field(
        default="uniform", description="joint mode: class marginal of the proxy-to-embedding side")
    kl_prior_floor: float = Field(default=1e-3, gt=0, le=1, description="floor of the target class proportions")
    dist_weight: float = Field(default=0.1, ge=0, le=1000,
                               description="distribution consistency term inside scdl_proxy")
    sac_tokens: Literal["proportion", "majority"] = "proportion"
    sac_background: bool = Field(default=False, description="SAC also anchors the background proxy")
    cdba_weight: float = Field(default=0.1, ge=0, le=1000)
    proxy_weight: float = Field(default=0.1, ge=0, le=1000)
    sac_weight: float = Field(default=0.1, ge=0, le=1000)
    prior: bool = Field(default=False, description="build the prior-token projection (`prior_features`)")
    ramp_start: float = Field(default=0.0, ge=0, le=1, description="training progress where the ramp-up starts")
    rampup: float = Field(default=0.0, ge=0, le=1, description="sigmoid ramp-up length, fraction of training")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


# ---------------------------------------------------------------- tokens and labels

def token_grid(size: Sequence[int], grid: int) -> tuple[int, int, int]:
    """The token grid of a map of `size`: `grid` per axis, at most the map's size."""
    return grid3([min(int(grid), int(s)) for s in size])


def pool_tokens(feature_map: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """(B, F, X, Y, Z) -> (B, L, F): adaptive average pooling onto `grid`, flattened in C order."""
    pooled = F.adaptive_avg_pool3d(feature_map, grid3(grid))
    return pooled.flatten(2).transpose(1, 2)


def ground_truth_voxels(target: torch.Tensor, known: torch.Tensor, confidence: torch.Tensor,
                        labeled: torch.Tensor) -> torch.Tensor:
    """(B, X, Y, Z) bool: voxels whose target is ground truth: known, and in a labeled row or with confidence 1
    (mixed ground truth); teacher pseudo-labels and the unknown 0s of partial labels are not."""
    row = labeled.to(target.device).bool().view(-1, *([1] * (target.dim() - 1)))
    return known.bool() & (row | (confidence >= 1.0))


def token_label_share(target: torch.Tensor, gt: torch.Tensor, num_classes: int,
                      grid: Sequence[int]) -> torch.Tensor:
    """(B, L, C): the fraction of each token's voxels that are ground truth of class c (adaptive average pooling
    of the masked one-hot target onto the token grid; one class at a time to keep memory at one volume). The
    classes sum to the token's ground-truth fraction (< 1 where some voxels are not ground truth)."""
    shares = []
    for c in range(num_classes):
        m = ((target == c) & gt).float().unsqueeze(1)
        shares.append(F.adaptive_avg_pool3d(m, grid3(grid)).flatten(1))
    return torch.stack(shares, dim=-1)


# ---------------------------------------------------------------- CDBA

def proxy_samples(mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """(C, S, D) reparameterised samples mu_c + sigma_c * eps_cs."""
    return mu.unsqueeze(1) + sigma.unsqueeze(1) * eps


def class_similarity(z: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor,
                     mode: str = "samples") -> torch.Tensor:
    """(B, L, C): mean over the samples of cos(z_l, sample_cs) ("samples") or cos(z_l, mu_c) ("mean")."""
    zn = F.normalize(z, dim=-1)
    if mode == "samples":
        m = F.normalize(proxy_samples(mu, sigma, eps), dim=-1).mean(dim=1)
    elif mode == "mean":
        m = F.normalize(mu, dim=-1)
    else:
        raise ValueError(f"unknown similarity mode '{mode}'")
    return torch.einsum("bld,cd->blc", zn, m)


def direction_log_probs(sim: torch.Tensor, tau_e2p: float, tau_p2e: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log P_e2p, log P_p2e), both (B, L, C): the first normalised over classes (dim 2), the second over the
    tokens of each row (dim 1)."""
    return F.log_softmax(sim / tau_e2p, dim=2), F.log_softmax(sim / tau_p2e, dim=1)


def class_prior(w: torch.Tensor, floor: float) -> torch.Tensor:
    """(B, C): each row's class proportions of the token targets w (B, L, C), floored and renormalised."""
    pi = w.mean(dim=1) + floor
    return pi / pi.sum(dim=1, keepdim=True)


def bidirectional_kl(log_e2p: torch.Tensor, log_p2e: torch.Tensor, mode: str = "joint",
                     prior: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric KL between the two directions (module docstring): "joint" over (token, class) pairs with
    P = P_e2p / L and Q = P_p2e / C (or prior_c P_p2e with a class prior (B, C)), mean over rows; "token" per
    token, P_p2e renormalised over classes."""
    B, L, C = log_e2p.shape
    if mode == "joint":
        log_p = log_e2p - math.log(L)
        log_q = log_p2e - math.log(C) if prior is None else log_p2e + prior.log().unsqueeze(1)
        kl = (log_p.exp() * (log_p - log_q)).sum(dim=(1, 2)) + (log_q.exp() * (log_q - log_p)).sum(dim=(1, 2))
        return kl.mean()
    if mode == "token":
        log_q = F.log_softmax(log_p2e, dim=2)
        kl = (log_e2p.exp() * (log_e2p - log_q)).sum(dim=2) + (log_q.exp() * (log_q - log_e2p)).sum(dim=2)
        return kl.mean()
    raise ValueError(f"unknown kl_mode '{mode}'")


def bidirectional_similarity(log_e2p: torch.Tensor, log_p2e: torch.Tensor) -> torch.Tensor:
    """(B, L, C): P_e2p(c | l) P_p2e(l | c) renormalised over classes."""
    return F.softmax(log_e2p + log_p2e, dim=2)


def token_targets(share: torch.Tensor, bisim: torch.Tensor) -> torch.Tensor:
    """(B, L, C) soft class targets: the ground-truth shares plus the bidirectional similarity for the rest."""
    rest = (1.0 - share.sum(dim=2, keepdim=True)).clamp(min=0.0)
    return share + rest * bisim


def proxy_contrastive_loss(sim: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean over tokens and classes of exp(-(pos_c - neg_c)), pos_c = w_c s_c, neg_c = (1 - w_c) s_c."""
    pos = w * sim
    neg = (1.0 - w) * sim
    return torch.exp(-(pos - neg)).mean()


def distribution_consistency(sim: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean over tokens of sum_c w_c (1 - s_c): expected cosine distance to samples of the target classes."""
    return (w * (1.0 - sim)).sum(dim=-1).mean()


# ---------------------------------------------------------------- SAC

def organ_centres(z: torch.Tensor, share: torch.Tensor, tokens: str = "proportion",
                  background: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres (C, D) normalised and detached, present (C,) bool): the weighted mean normalised embedding of
    each class's ground-truth tokens; weights = the class share of the token ("proportion") or 1 where the
    class is more than half of the token ("majority"). Background (class 0) only with `background`."""
    zn = F.normalize(z.detach(), dim=-1).reshape(-1, z.shape[-1])
    s = share.detach().reshape(-1, share.shape[-1])
    if tokens == "proportion":
        wt = s
    elif tokens == "majority":
        wt = (s > 0.5).to(s.dtype)
    else:
        raise ValueError(f"unknown sac_tokens '{tokens}'")
    mass = wt.sum(dim=0)
    present = mass > 0
    if not background:
        present[0] = False
    centres = F.normalize(wt.t() @ zn / mass.clamp(min=1e-12).unsqueeze(1), dim=-1)
    return centres, present


def semantic_anchor_loss(centres: torch.Tensor, present: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """mean over present classes of 1 - cos(centre_c, mu_c); the centres are constants (detached)."""
    cos = (F.normalize(centres.detach(), dim=-1) * F.normalize(mu, dim=-1)).sum(dim=-1)
    return (1.0 - cos)[present].mean()


def prior_tokens(z: torch.Tensor, mu: torch.Tensor, tau: float) -> torch.Tensor:
    """(B, L, D): sum_c softmax_c(cos(z_l, mu_c) / tau) normalise(mu_c), a soft mixture of the proxy means."""
    mun = F.normalize(mu, dim=-1)
    p = F.softmax(torch.einsum("bld,cd->blc", F.normalize(z, dim=-1), mun) / tau, dim=-1)
    return p @ mun


# ---------------------------------------------------------------- the component

class SCDLComponent(AuxComponent):
    """SCDL (module docstring): a token-embedding MLP and Gaussian class proxies, trained with CDBA and SAC
    losses on the student's decoder features."""

    name = "scdl"

    def __init__(self, cfg: SCDLConfig, num_classes: int, feature_channels: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = int(num_classes)
        self.feature_channels = int(feature_channels)
        h, d = cfg.hidden_dim, cfg.embed_dim
        self.embed = nn.Sequential(
            nn.Linear(feature_channels, h), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(h, h), nn.ReLU(inplace=True), nn.Dropout(cfg.dropout),
            nn.Linear(h, d),
        )
        self.proxy_mu = nn.Parameter(torch.randn(num_classes, d) / math.sqrt(d))
        rho0 = math.log(math.expm1(cfg.init_sigma))  # softplus^-1
        self.proxy_rho = nn.Parameter(torch.full((num_classes, d), rho0))
        self.prior_proj: nn.Conv3d | None = None
        if cfg.prior:
            self.prior_proj = nn.Conv3d(d, feature_channels, kernel_size=1)
            nn.init.zeros_(self.prior_proj.weight)
            bias = self.prior_proj.bias
            assert bias is not None  # Conv3d has a bias unless bias=False
            nn.init.zeros_(bias)

    # ------------------------------------------------------------------ pieces
    @property
    def proxy_sigma(self) -> torch.Tensor:
        return F.softplus(self.proxy_rho)

    def noise(self, iteration: int, device: torch.device) -> torch.Tensor:
        """(C, S, D) standard normal proxy noise of this iteration (CPU generator seeded by (seed, iteration),
        so the same on every device and on resume)."""
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + int(iteration))
        eps = torch.randn((self.num_classes, self.cfg.samples, self.cfg.embed_dim), generator=g)
        return eps.to(device)

    def tokens(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(embeddings (B, L, D), token grid) of a decoder map."""
        grid = token_grid(feature_map.shape[2:], self.cfg.grid)
        return self.embed(pool_tokens(feature_map.float(), grid)), grid

    def _zero(self) -> torch.Tensor:
        total = sum(p.sum() for p in self.parameters())
        assert isinstance(total, torch.Tensor)  # the embedding has parameters: a sum of tensors, not the start 0
        return 0.0 * total

    # ------------------------------------------------------------------ losses
    def losses(self, batch: AuxBatch) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        feat = batch.features[cfg.feature_level]
        dev = feat.device
        with torch.autocast(device_type=dev.type, enabled=False):
            z, grid = self.tokens(feat)
            mu = self.proxy_mu
            sim = class_similarity(z, mu, self.proxy_sigma, self.noise(batch.iteration, dev), cfg.similarity)
            log_e2p, log_p2e = direction_log_probs(sim, cfg.tau_e2p, cfg.tau_p2e)
            with torch.no_grad():
                target = batch.target.to(dev)
                gt = ground_truth_voxels(target, batch.known.to(dev), batch.confidence.to(dev), batch.labeled)
                share = token_label_share(target, gt, self.num_classes, grid)
                w = token_targets(share, bidirectional_similarity(log_e2p, log_p2e))
                prior = class_prior(w, cfg.kl_prior_floor) if cfg.kl_class_prior == "target" else None
            kl = bidirectional_kl(log_e2p, log_p2e, cfg.kl_mode, prior)
            proxy = proxy_contrastive_loss(sim, w) + cfg.dist_weight * distribution_consistency(sim, w)
            centres, present = organ_centres(z, share, cfg.sac_tokens, cfg.sac_background)
            sac = semantic_anchor_loss(centres, present, mu) if bool(present.any()) else self._zero()
        r = ramp(batch.progress, cfg.ramp_start, cfg.rampup)
        return {"scdl_cdba": (r * cfg.cdba_weight) * kl,
                "scdl_proxy": (r * cfg.proxy_weight) * proxy,
                "scdl_sac": (r * cfg.sac_weight) * sac}

    # ------------------------------------------------------------------ prior tokens
    def prior_features(self, feature_map: torch.Tensor) -> torch.Tensor:
        """`feature_map` + a zero-initialised 1x1x1 convolution of its prior tokens (soft mixtures of the proxy
        means), upsampled to the map. Only with `prior`; the trainer applies it during training only if wired
        to (see the module docstring: the exported network has no prior path)."""
        if self.prior_proj is None:
            raise RuntimeError("SCDL prior tokens are off (SCDLConfig.prior)")
        z, grid = self.tokens(feature_map)
        prior = prior_tokens(z, self.proxy_mu, self.cfg.tau_e2p)  # (B, L, D)
        prior = prior.transpose(1, 2).reshape(prior.shape[0], prior.shape[2], *grid)
        up = F.interpolate(prior, size=tuple(feature_map.shape[2:]), mode="trilinear", align_corners=False)
        return feature_map + self.prior_proj(up).to(feature_map.dtype)

    def describe(self) -> dict:
        return {"name": self.name, **self.cfg.model_dump()}
