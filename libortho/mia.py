"""Membership inference: does a model tell the records it was trained on from unseen records of the same kind?

Each attack gives every record a score, higher = "more likely a member" (token log-probs in nats):

* `loss`: mean token log-probability (minus the mean loss; Yeom et al. 2018).
* `ref_ratio`: minus the ratio of the record's mean loss under the model to that under a reference model
  (the public model): Carlini et al. 2021, "Extracting training data", ratio of log-perplexities.
* `ref_diff`: minus the loss difference model - reference (difficulty calibration, Watson et al. 2022).
* `min_k`: Min-K% Prob (Shi et al. 2024): mean of the lowest k% token log-probabilities.
* `min_k_pp`: Min-K%++ (Zhang et al. 2024): per token (log p(x_t) - mu_t) / sigma_t, with mu_t, sigma_t the
  mean and standard deviation of log p(z) for z drawn from the model's own next-token distribution;
  mean of the lowest k%.

Metrics over members vs non-members: ROC AUC (Mann-Whitney, ties count one half) and TPR at 1% FPR (the
best true-positive rate of a threshold that flags at most floor(0.01 n_nonmembers) non-members), each with
a seeded bootstrap 95% CI (members and non-members resampled separately; percentile intervals, as TPR at
low FPR is a step function of the data). TPR at 1% FPR needs >= 100 non-members to mean what it says.
`auc_claim` compares two models on the same records (paired bootstrap CI, DeLong test).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .oom import map_batches
from .stats import Claim, _check_common, bootstrap_ci

SCORES = ("loss", "ref_ratio", "ref_diff", "min_k", "min_k_pp")
_LOGITS_ELEMS = 1 << 26  # logits turned into float32 at once (~256 MiB)


@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one record under one model (T-1 predicted tokens).

    Attributes:
        logp: log p(x_t | x_<t); mu, sigma: mean and standard deviation of log p(z | x_<t), z ~ p(. | x_<t).
    """

    logp: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray


def _check_records(records) -> list[list[int]]:
    out = [list(map(int, r.tolist() if torch.is_tensor(r) else r)) for r in records]
    if not out:
        raise ValueError("records is empty: pass token id sequences of the records to score")
    short = [i for i, r in enumerate(out) if len(r) < 2]
    if short:
        raise ValueError(f"each record needs >= 2 tokens (one predicted), records {short[:5]} have fewer")
    return out


@torch.no_grad()
def token_stats(model, records, batch_size: int = 8, events: list | None = None) -> list[TokenStats]:
    """`TokenStats` of each record (token id sequences, any lengths) under `model`, in eval mode.

    Records are right-padded to the longest in a batch (attention mask 0 on padding; causal attention keeps
    real tokens blind to it). An out-of-memory batch is halved and retried (recorded in `events`).
    """
    recs = _check_records(records)
    from .modules import input_device

    dev = input_device(model)  # where input ids go (a table in host memory is not it)
    was_training = model.training
    model.eval()

    def run(batch: list[list[int]]) -> list[TokenStats]:
        T = max(map(len, batch))
        ids = torch.zeros((len(batch), T), dtype=torch.long, device=dev)  # (B, T)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(batch):
            ids[i, :len(r)] = torch.tensor(r, device=dev)
            mask[i, :len(r)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # (B, T-1, V)
        tgt = ids[:, 1:]
        B, T1, V = logits.shape
        logp, mu, sigma = (torch.empty((B, T1), dtype=torch.float64, device=dev) for _ in range(3))
        rows = max(1, _LOGITS_ELEMS // max(1, T1 * V))
        for s in range(0, B, rows):
            lp = torch.log_softmax(logits[s:s + rows].float(), -1)  # (b, T-1, V)
            p = lp.exp()
            m = (p * lp).sum(-1)  # (b, T-1): E_z[log p(z)]
            # centred second moment: E[l^2] - mu^2 cancels catastrophically in float32
            v = (p * (lp - m.unsqueeze(-1)).square()).sum(-1)
            logp[s:s + rows] = lp.gather(-1, tgt[s:s + rows].unsqueeze(-1)).squeeze(-1).double()
            mu[s:s + rows] = m.double()
            sigma[s:s + rows] = v.double().sqrt()
        out = []
        for i, r in enumerate(batch):
            n = len(r) - 1
            out.append(TokenStats(logp[i, :n].cpu().numpy(), mu[i, :n].cpu().numpy(), sigma[i, :n].cpu().numpy()))
        return out

    try:
        return map_batches(run, recs, batch_size, events)
    finally:
        model.train(was_training)


def _lowest_mean(x: np.ndarray, k: float) -> float:
    n = max(1, int(len(x) * k))
    return float(np.sort(x)[:n].mean())


def record_scores(target: list[TokenStats], reference: list[TokenStats] | None = None, k: float = 0.2
                  ) -> dict[str, np.ndarray]:
    """Every attack's score of each record, higher = more member-like.

    Args:
        target: `token_stats` under the attacked model.
        reference: `token_stats` of the same records under the reference (public) model; without it the
            `ref_*` scores are left out.
        k: share of lowest tokens for Min-K% and Min-K%++ (0.2: the papers' default).

    Returns:
        {score name: (n_records,) float64}.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k!r}")
    if reference is not None and [len(t.logp) for t in reference] != [len(t.logp) for t in target]:
        raise ValueError("reference stats must be of the same records as target (same count and lengths)")
    loss = np.array([-t.logp.mean() for t in target])
    out = {"loss": -loss,
           "min_k": np.array([_lowest_mean(t.logp, k) for t in target]),
           # sigma = 0 only for a one-hot next-token distribution: that token is then certain, z = 0
           "min_k_pp": np.array([_lowest_mean(np.divide(t.logp - t.mu, t.sigma, out=np.zeros_like(t.mu),
                                                        where=t.sigma > 0), k) for t in target])}
    if reference is not None:
        ref = np.array([-t.logp.mean() for t in reference])
        out["ref_ratio"] = -loss / ref
        out["ref_diff"] = -(loss - ref)
    return out


# ---------------------------------------------------------------------------------------------
# metrics

def _auc(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(member score > non-member score) + 0.5 P(tie), along `axis` (vectorized for the bootstrap)."""
    from scipy import stats  # imported here: libortho loads without scipy until it is used

    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)  # (..., n1), (..., n0)
    n1, n0 = x.shape[-1], y.shape[-1]
    r = stats.rankdata(np.concatenate([x, y], -1), axis=-1)[..., :n1]  # mid-ranks of the members
    return (r.sum(-1) - n1 * (n1 + 1) / 2) / (n1 * n0)


def _tpr(x: np.ndarray, y: np.ndarray, fpr: float, axis: int = -1) -> np.ndarray:
    x, y = np.moveaxis(x, axis, -1), np.moveaxis(y, axis, -1)
    n0 = y.shape[-1]
    m = math.floor(fpr * n0 + 1e-9)  # non-members a threshold may flag
    thr = np.sort(y, -1)[..., n0 - m - 1]  # the (m+1)-th highest: strictly above it lie at most m
    return (x > thr[..., None]).mean(-1)


def _check_scores(member, nonmember) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(member, dtype=np.float64), np.asarray(nonmember, dtype=np.float64)
    if x.ndim != 1 or y.ndim != 1 or x.size < 2 or y.size < 2:
        raise ValueError(f"need >= 2 member and >= 2 non-member scores, got {x.size} and {y.size}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("scores must be finite; a NaN score means a record could not be scored, drop it")
    return x, y


def roc_auc(member, nonmember) -> float:
    """ROC AUC of members vs non-members (0.5: no signal, 1: every member scores above every non-member)."""
    x, y = _check_scores(member, nonmember)
    return float(_auc(x, y))


def tpr_at_fpr(member, nonmember, fpr: float = 0.01) -> float:
    """Share of members flagged by the threshold that flags at most floor(fpr * n_nonmembers) non-members."""
    if not 0 <= fpr < 1:
        raise ValueError(f"fpr must be in [0, 1), got {fpr!r}")
    x, y = _check_scores(member, nonmember)
    return float(_tpr(x, y, fpr))


def attack_metrics(member, nonmember, fpr: float = 0.01, seed: int = 0, n_resamples: int = 2000) -> dict:
    """{"auc", "auc_ci95", "tpr_at_fpr", "tpr_ci95", "fpr", "n_members", "n_nonmembers"}; CIs seeded."""
    x, y = _check_scores(member, nonmember)
    kw = {"method": "percentile", "n_resamples": n_resamples, "seed": seed}
    return {"auc": float(_auc(x, y)), "auc_ci95": list(bootstrap_ci((x, y), _auc, **kw)),
            "tpr_at_fpr": float(_tpr(x, y, fpr)),
            "tpr_ci95": list(bootstrap_ci((x, y), lambda a, b, axis: _tpr(a, b, fpr, axis), **kw)),
            "fpr": fpr, "n_members": int(x.size), "n_nonmembers": int(y.size)}


def membership_inference(model, members, nonmembers, reference: list[TokenStats] | None = None,
                         k: float = 0.2, fpr: float = 0.01, seed: int = 0, batch_size: int = 8,
                         events: list | None = None) -> dict:
    """Every attack against `model`: {"scores": {name: {"member": [...], "nonmember": [...]}},
    "metrics": {name: attack_metrics}}.

    Args:
        members, nonmembers: token id sequences (the private fine-tuning records, unseen records of the
            same distribution).
        reference: `token_stats(public_model, members + nonmembers)`, computed once for every arm.
    """
    recs = _check_records(members) + _check_records(nonmembers)
    n1 = len(members)
    st = token_stats(model, recs, batch_size, events)
    sc = record_scores(st, reference, k)
    return {"scores": {n: {"member": v[:n1].tolist(), "nonmember": v[n1:].tolist()} for n, v in sc.items()},
            "metrics": {n: attack_metrics(v[:n1], v[n1:], fpr, seed) for n, v in sc.items()}}


# ---------------------------------------------------------------------------------------------
# two models on the same records

def delong_var(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """DeLong covariance of the AUCs of k score sets on the same records (x: (k, n1) members, y: (k, n0)).

    Fast form of Sun & Xu 2014: placement values from mid-ranks. Returns (k, k).
    """
    from scipy import stats  # imported here: libortho loads without scipy until it is used

    n1, n0 = x.shape[1], y.shape[1]
    rx, ry = stats.rankdata(x, axis=1), stats.rankdata(y, axis=1)
    rz = stats.rankdata(np.concatenate([x, y], 1), axis=1)
    v10 = (rz[:, :n1] - rx) / n0  # (k, n1): share of non-members below each member
    v01 = 1 - (rz[:, n1:] - ry) / n1  # (k, n0): share of members above each non-member
    return np.atleast_2d(np.cov(v10)) / n1 + np.atleast_2d(np.cov(v01)) / n0


def auc_claim(name: str, candidate: str, control: str, candidate_member, candidate_nonmember, control_member,
              control_nonmember, threshold: float = 0.0, *, direction: str = "less", alpha: float = 0.05,
              seed: int = 0, n_resamples: int = 2000) -> Claim:
    """A claim on AUC(candidate) - AUC(control), both attacks scoring the same members and non-members.

    "less" (default): the candidate's membership signal is no more than `threshold` above the control's
    (e.g. alpha 0 vs the public model): upper 95% CI bound < threshold and one-sided DeLong p < alpha.
    "greater": lower bound > threshold and p < alpha.
    CI: bootstrap (percentile) resampling members and non-members, each record's two scores together.
    """
    from scipy import stats  # imported here: libortho loads without scipy until it is used

    _check_common(threshold, direction, alpha)
    cm, cn = _check_scores(candidate_member, candidate_nonmember)
    km, kn = _check_scores(control_member, control_nonmember)
    if cm.shape != km.shape or cn.shape != kn.shape:
        raise ValueError(f"both models must score the same records: {cm.size}+{cn.size} vs {km.size}+{kn.size}")
    x, y = np.stack([cm, km]), np.stack([cn, kn])  # (2, n1), (2, n0)

    def diff(a, b, axis=-1):  # a: (2, n1) or, resampled, (2, resamples, n1): row 0 candidate, row 1 control
        return _auc(a[0], b[0]) - _auc(a[1], b[1])

    value = float(diff(x, y))
    lo, hi = bootstrap_ci((x, y), diff, method="percentile", n_resamples=n_resamples, seed=seed)
    cov = delong_var(x, y)
    se = math.sqrt(max(0.0, cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]))
    gap = value - threshold if direction == "greater" else threshold - value  # > 0: beyond the threshold
    p = float(stats.norm.sf(gap / se)) if se > 0 else (0.0 if gap > 0 else 1.0)
    bound_ok = lo > threshold if direction == "greater" else hi < threshold
    return Claim(name, candidate, control, "auc_diff", value, (lo, hi), float(threshold), p,
                 bool(bound_ok and p < alpha), int(cm.size + cn.size), direction,
                 "DeLong, bootstrap percentile",
                 {"alpha": alpha, "candidate_auc": float(_auc(cm, cn)), "control_auc": float(_auc(km, kn)),
                  "n_members": int(cm.size), "n_nonmembers": int(cn.size)})
