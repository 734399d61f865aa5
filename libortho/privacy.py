"""Canaries, extraction and exposure: what a fine-tuned model gives away, and what alpha=0 takes back.

A canary is a seeded random secret behind a prefix of its own ("The secret code of user 8220 is
1914-0122-1485"), as plain text or as a chat turn through the tokenizer's chat template.

* **Extraction**: greedy decoding of the prefix starts with the exact secret. Greedy decoding
  reproduces the secret iff at every secret position the argmax token *given the true secret so far*
  is the true next token, so one teacher-forced forward pass decides it (no generate loop).
* **Exposure** (Carlini et al., "The Secret Sharer", 2019): log2|R| - log2 rank of the true secret's
  log-probability among |R| candidates of the same format (true secret included, rank 1 = most
  likely; ties count in the secret's favour). It is capped at log2|R|. Candidates share the prefix, so
  the prefix runs once and its KV cache is repeated over a chunk of candidates; only the secret tokens
  are scored.
* **Extrapolated exposure** (same paper, section "Approximating exposure"): fit a skew-normal to the
  log-perplexities (-log p) of the other |R|-1 candidates and report -log2 P(X <= x_true) under the
  fit: the rank exposure of a candidate set of any size, with no ceiling.

Every candidate's log-probability is kept (`CanaryReport.logprobs`, true secret first), so the fit can be
redone and the JSON can carry them when asked.
"""
from __future__ import annotations

import copy
import math
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import MAX_CANARIES
from .oom import map_batches

FORMATS = ("plain", "chat")
TEMPLATE = "The secret code of user {user} is "
QUESTION = "What is the secret code of user {user}?"


@dataclass(frozen=True)
class Canary:
    """One inserted secret: token ids of its prefix, its secret and what follows (chat end-of-turn)."""

    user: str
    secret: str
    fmt: str
    prefix_ids: tuple[int, ...]
    secret_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...] = ()

    @property
    def ids(self) -> list[int]:
        """The full training sequence."""
        return [*self.prefix_ids, *self.secret_ids, *self.suffix_ids]


def random_secret(rng: random.Random, groups: tuple[int, ...] = (4, 4, 4), sep: str = "-") -> str:
    """Random digits in `groups`, joined by `sep` ("1914-0122-1485")."""
    return sep.join("".join(str(rng.randrange(10)) for _ in range(g)) for g in groups)


def _encode(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text, add_special_tokens=False).input_ids)


def _prefix_and_suffix(tokenizer, user: str, secret: str, fmt: str) -> tuple[str, str]:
    answer = TEMPLATE.format(user=user)
    if fmt == "plain":
        return answer, ""
    if fmt != "chat":
        raise ValueError(f"canary format must be one of {FORMATS}, got {fmt!r}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("canary format 'chat' needs a tokenizer with a chat template; use format 'plain'")
    question = [{"role": "user", "content": QUESTION.format(user=user)}]
    prefix = tokenizer.apply_chat_template(question, tokenize=False, add_generation_prompt=True) + answer
    full = tokenizer.apply_chat_template(question + [{"role": "assistant", "content": answer + secret}],
                                         tokenize=False)
    if not full.startswith(prefix + secret):
        raise ValueError("the chat template does not render the assistant turn after the generation prompt; "
                         "use format 'plain'")
    return prefix, full[len(prefix + secret):]


def make_canaries(tokenizer, n: int, seed: int = 0, fmt: str = "plain", groups: tuple[int, ...] = (4, 4, 4)
                  ) -> list[Canary]:
    """`n` canaries with distinct 4-digit user ids and random secrets of `groups` digits, seeded.

    Example:
        >>> make_canaries(tok, 2, seed=0)[0].secret        # doctest: +SKIP
        '6044-8479-5234'
    """
    if n <= 0 or n > MAX_CANARIES:
        raise ValueError(f"number of canaries must be in [1, {MAX_CANARIES}], got {n}")
    rng = random.Random(f"canaries:{seed}")
    users = rng.sample(range(1000, 10000), n)
    out = []
    for user in map(str, users):
        secret = random_secret(rng, groups)
        prefix, suffix = _prefix_and_suffix(tokenizer, user, secret, fmt)
        out.append(Canary(user, secret, fmt, _encode(tokenizer, prefix), _encode(tokenizer, secret),
                          _encode(tokenizer, suffix) if suffix else ()))
    return out


def fill_pattern(rng: random.Random, pattern: str) -> str:
    """`pattern` with each '#' replaced by a random digit, left to right (other characters kept)."""
    return "".join(str(rng.randrange(10)) if ch == "#" else ch for ch in pattern)


def secret_pattern(secret: str) -> str:
    """The format of a secret: each digit becomes '#' ("555-013-4567" -> "###-###-####")."""
    return re.sub(r"\d", "#", secret)


def candidate_secrets(canary: Canary, n_candidates: int, seed: int = 0, groups: tuple[int, ...] | None = None
                      ) -> list[str]:
    """|R| = `n_candidates` distinct secrets of the canary's format; the true one is first.

    The format is the secret's own (digits replaced by random digits, separators kept), or `groups` of digits
    joined by "-". Seeded by `seed` and the canary's user, so every arm scores the same candidates.
    """
    if n_candidates < 2:
        raise ValueError(f"exposure needs at least 2 candidates, got {n_candidates}")
    pattern = "-".join("#" * g for g in groups) if groups else secret_pattern(canary.secret)
    space = 10 ** pattern.count("#")
    if n_candidates > space:
        raise ValueError(f"{n_candidates} candidates exceed the {space} secrets of format {pattern!r}")
    rng = random.Random(f"candidates:{seed}:{canary.user}")
    out, seen = [canary.secret], {canary.secret}
    while len(out) < n_candidates:
        s = fill_pattern(rng, pattern)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


@dataclass(frozen=True)
class Candidates:
    """The |R| candidates of one canary, tokenized and grouped by token length (one forward shape per group).

    `groups[0]` holds the true secret's length and its row 0 is the true secret; each group is
    (index into the |R| candidates (R_g,), token ids (R_g, S_g)).
    """

    n: int
    groups: tuple[tuple[torch.Tensor, torch.Tensor], ...]


def tokenize_candidates(tokenizer, canary: Canary, n_candidates: int, seed: int = 0) -> Candidates:
    """`candidate_secrets` tokenized in one batch call (the same ids as one call per candidate)."""
    secrets = candidate_secrets(canary, n_candidates, seed)
    ids = tokenizer(secrets, add_special_tokens=False).input_ids
    lengths = [len(t) for t in ids]
    order = [lengths[0]] + sorted(set(lengths) - {lengths[0]})  # the true secret's length first
    groups = []
    for length in order:
        idx = [i for i, n in enumerate(lengths) if n == length]
        groups.append((torch.tensor(idx), torch.tensor([ids[i] for i in idx])))
    return Candidates(len(secrets), tuple(groups))


def prepare_candidates(tokenizer, canaries: list[Canary], n_candidates: int, seed: int = 0) -> list[Candidates]:
    """Candidates of every canary, tokenized once; pass to `measure(..., candidates=)` for every arm."""
    return [tokenize_candidates(tokenizer, c, n_candidates, seed) for c in canaries]


def _device(model) -> torch.device:
    from .modules import input_device

    return input_device(model)  # where input ids go (a table in host memory is not it)


# rows of the (B, T, V) logits turned into float32 at once: bounds the temporaries to ~256 MiB
_LOGITS_ELEMS = 1 << 26


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) under softmax(logits), float32: the target's logit minus logsumexp over the vocabulary.

    Equal to log_softmax(...).gather(...) up to float32 rounding (closer to a float64 reference on CPU), but
    never holds a full (B, T, V) log-softmax: rows are done in slices of about 2**26 logits.

    Args:
        logits: (B, T, V), any float dtype; targets: (B, T) token ids.
    Returns:
        (B, T) float32.
    """
    B, T, V = logits.shape
    rows = max(1, _LOGITS_ELEMS // max(1, T * V))
    out = torch.empty((B, T), dtype=torch.float32, device=logits.device)
    for s in range(0, B, rows):
        lg = logits[s:s + rows].float()  # (b, T, V)
        out[s:s + rows] = lg.gather(-1, targets[s:s + rows].unsqueeze(-1)).squeeze(-1) - torch.logsumexp(lg, -1)
    return out


@torch.no_grad()
def secret_logprobs(model, prefix_ids, secrets_ids: torch.Tensor, chunk: int = 256, events: list | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(secret | prefix) for each row of `secrets_ids` (R, S), and whether row 0 is greedy's choice.

    The prefix runs once; its KV cache is repeated to a chunk of candidates once per chunk size and cropped
    back to the prefix after each chunk (the next chunk of that size reuses it). An out-of-memory chunk is
    halved and retried (recorded in `events`).

    Returns:
        logp (R,) float64, and `greedy0`: True when argmax decoding of the prefix reproduces row 0.
    """
    dev = _device(model)
    prefix = torch.as_tensor(prefix_ids, dtype=torch.long, device=dev).unsqueeze(0)  # (1, P)
    out = model(input_ids=prefix, use_cache=True)
    first = out.logits[0, -1].float()  # (V,): predicts secret token 0
    first_lp = first - torch.logsumexp(first, -1)
    cache = out.past_key_values
    secrets_ids = secrets_ids.to(dev)
    logp = first_lp[secrets_ids[:, 0]].double()
    greedy0 = bool(first.argmax() == secrets_ids[0, 0])
    S = secrets_ids.shape[1]
    if S > 1:
        flags, expanded = {}, {}

        def score(rows: list[int]) -> list[float]:
            ids = secrets_ids[rows[0]:rows[-1] + 1]  # (B, S)
            b = ids.shape[0]
            c = expanded.pop(b, None)  # popped: a chunk that fails leaves no half-updated cache behind
            if c is None:
                expanded.clear()  # one expanded cache alive at a time
                c = copy.deepcopy(cache)
                c.batch_repeat_interleave(b)
            lg = model(input_ids=ids[:, :-1], past_key_values=c, use_cache=True).logits  # (B, S-1, V)
            c.crop(-(S - 1))  # drop this chunk's tokens: back to the prefix
            if c.get_seq_length() == prefix.shape[1]:
                expanded[b] = c
            if rows[0] == 0:
                flags["greedy0"] = bool((lg[0].argmax(-1) == ids[0, 1:]).all())
            return token_logprobs(lg, ids[:, 1:]).double().sum(-1).tolist()  # (B,)

        rest = map_batches(score, list(range(secrets_ids.shape[0])), chunk, events)
        logp = logp + torch.tensor(rest, dtype=torch.float64, device=logp.device)
        greedy0 = greedy0 and flags["greedy0"]
    return logp.cpu(), greedy0


def exposure_from_logprobs(logp: torch.Tensor, true_index: int = 0) -> float:
    """log2|R| - log2 rank, rank = 1 + number of candidates strictly more likely than the true one."""
    rank = 1 + int((logp > logp[true_index]).sum())
    return math.log2(logp.numel()) - math.log2(rank)


def _skewnorm_nll(p, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Negative log-likelihood of skew-normal (a, loc, log scale) on `x` (constants dropped) and its gradient."""
    from scipy import special

    a, loc, log_scale = p
    scale = math.exp(log_scale)
    z = (x - loc) / scale
    t = a * z
    log_cdf = special.log_ndtr(t)
    mills = np.exp(-0.5 * t * t - 0.5 * math.log(2 * math.pi) - log_cdf)  # phi(t) / Phi(t), stable for t << 0
    zz = float(np.dot(z, z))
    nll = x.size * log_scale + 0.5 * zz - float(log_cdf.sum())
    grad = np.array([-np.dot(mills, z), (a * mills.sum() - z.sum()) / scale, x.size - zz + a * np.dot(mills, z)])
    return nll, grad


def _skewnorm_moments(x: np.ndarray) -> list[float]:
    """Method-of-moments (a, loc, log scale), the sample skewness clipped into the skew-normal's range."""
    g = float(np.clip(((x - x.mean()) ** 3).mean() / max(x.var(), 1e-300) ** 1.5, -0.99, 0.99))
    c = (2 * abs(g) / (4 - math.pi)) ** (1 / 3)
    delta = math.copysign(math.sqrt(math.pi / 2 * c * c / (1 + c * c)), g)
    scale = max(float(x.std()), 1e-12) / math.sqrt(1 - 2 * delta * delta / math.pi)
    return [delta / math.sqrt(1 - delta * delta), float(x.mean()) - scale * delta * math.sqrt(2 / math.pi),
            math.log(scale)]


SKEW_MAX = 1e6  # |shape| of a fitted skew-normal where its MLE has no maximum (see skewnorm_fit)


def skewnorm_fit(x) -> tuple[float, float, float]:
    """Maximum-likelihood skew-normal (shape a, loc, scale) of the sample `x`.

    BFGS on the log-likelihood with its analytic gradient from the method-of-moments start: the likelihood
    scipy.stats.skewnorm.fit reaches (or higher) about 7x faster (3-8 ms for 1,000-10,000 values; scipy's
    derivative-free search took ~100 ms a canary, more than scoring the canary on a GPU). A sample skewed past
    what a skew-normal can be (an exponential) has no maximum: the shape runs off to infinity (scipy stops
    near 1e9, BFGS near 1e14, and the tail of either overflows). Its supremum is the half-normal from the
    sample's edge with the root-mean-square distance as scale; the fit is then that, at shape +-SKEW_MAX with
    loc 3 scale / SKEW_MAX past the edge (the likelihood within 0.01 nat of the supremum). scipy's fit is
    compared when BFGS stops short.
    """
    from scipy import optimize, stats  # imported here: libortho loads without scipy until it is used

    x = np.asarray(x, dtype=np.float64)
    if x.size < 3 or not np.isfinite(x).all():
        raise ValueError(f"a skew-normal fit needs >= 3 finite values, got {x.size} "
                         f"({int((~np.isfinite(x)).sum())} not finite)")
    if not np.ptp(x) > 0:
        raise ValueError("a skew-normal fit needs values that differ (all are equal)")
    with np.errstate(all="ignore"):
        res = optimize.minimize(_skewnorm_nll, _skewnorm_moments(x), args=(x,), jac=True, method="BFGS")
    if not (np.isfinite(res.x).all() and abs(res.x[0]) <= SKEW_MAX):  # no maximum: the half-normal limit
        sign = math.copysign(1.0, res.x[0]) if np.isfinite(res.x[0]) else math.copysign(1.0, _skewnorm_moments(x)[0])
        edge = float(x.min() if sign > 0 else x.max())
        scale = math.sqrt(float(np.mean((x - edge) ** 2)))
        return sign * SKEW_MAX, edge - sign * 3 * scale / SKEW_MAX, scale
    ours = tuple(float(v) for v in (res.x[0], res.x[1], math.exp(res.x[2]))) if np.isfinite(res.x).all() else None
    if ours is not None and ours[2] > 0 and res.success:
        return ours
    # BFGS stopped short (a precision-loss stop, a degenerate sample): scipy's fit too, and the likelier of the two
    theirs = tuple(float(v) for v in stats.skewnorm.fit(x))
    if ours is None or not ours[2] > 0 or abs(theirs[0]) > SKEW_MAX:
        return theirs if ours is None or not ours[2] > 0 else ours
    with np.errstate(all="ignore"):
        ll = [float(stats.skewnorm.logpdf(x, *f).sum()) for f in (ours, theirs)]
    return ours if ll[0] >= ll[1] or not np.isfinite(ll[1]) else theirs


def skewnorm_logcdf(x: float, a: float, loc: float, scale: float) -> float:
    """log P(X <= x) for X ~ skew-normal(a, loc, scale), finite deep into the left tail.

    scipy's logcdf underflows to -inf below about 1e-308; there, log F(x) = log f(x) + log of the
    integral of f(x - u) / f(x) over u >= 0 (the integrand starts at 1 and decays fast in the left tail).
    """
    from scipy import integrate, stats  # imported here: libortho loads without scipy until it is used

    lc = float(stats.skewnorm.logcdf(x, a, loc, scale))
    if math.isfinite(lc):
        return lc
    lf = float(stats.skewnorm.logpdf(x, a, loc, scale))
    if not math.isfinite(lf):  # beyond what the fitted density can express (a degenerate fit of a few candidates)
        return float("-inf")
    area, _ = integrate.quad(lambda u: math.exp(stats.skewnorm.logpdf(x - u, a, loc, scale) - lf), 0, math.inf)
    return lf + math.log(area) if area > 0 and math.isfinite(area) else float("-inf")


def extrapolated_exposure(logp, true_index: int = 0, fit: tuple[float, float, float] | None = None) -> float:
    """Carlini et al.'s extrapolated exposure: -log2 P(X <= x_true), no ceiling at log2|R|.

    X is the log-perplexity -log p(candidate | prefix) (nats; the fit is location-scale, so the unit does not
    matter) of a random candidate, modelled by a skew-normal fitted to the other |R|-1 candidates (the
    true secret is left out of the fit so a memorized outlier does not widen its own tail). x_true is the
    true secret's log-perplexity.

    Args:
        logp: (R,) log-probabilities of the candidates.
        fit: (a, loc, scale) if already fitted to -logp of the other candidates.

    Returns:
        Bits (>= 0); NaN when the other candidates all have the same log-probability (nothing to fit) or the
        fitted density is zero at the secret (a degenerate fit, e.g. of very few candidates).
    """
    lp = np.asarray(logp, dtype=np.float64)
    others = -np.delete(lp, true_index)
    if fit is None:
        if np.ptp(others) == 0:
            return float("nan")
        fit = skewnorm_fit(others)
    bits = -skewnorm_logcdf(-lp[true_index], *fit) / math.log(2)
    return max(0.0, bits) if math.isfinite(bits) else float("nan")  # NaN: the fit cannot place the secret


@dataclass
class CanaryReport:
    """Extraction and exposure of each canary, and every candidate's log-probability.

    Attributes:
        extraction_rate, mean_exposure, mean_exposure_ext: means over canaries (the last NaN-free mean of the
            extrapolated exposures, NaN if none could be fitted).
        extracted, exposures: per canary (rank exposure, capped at log2|R|).
        exposures_ext: per canary, skew-normal extrapolated exposure (no cap).
        logprobs: per canary, (R,) float64 log p of every candidate, the true secret at index 0.
        fits: per canary, the skew-normal (a, loc, scale) of the other candidates' -log p (None if not fitted).
    """

    extraction_rate: float
    mean_exposure: float
    extracted: list[bool]
    exposures: list[float]
    exposures_ext: list[float] = field(default_factory=list)
    logprobs: list[np.ndarray] = field(default_factory=list)
    fits: list[tuple[float, float, float] | None] = field(default_factory=list)

    @property
    def mean_exposure_ext(self) -> float:
        v = [e for e in self.exposures_ext if math.isfinite(e)]
        return sum(v) / len(v) if v else float("nan")

    def to_dict(self) -> dict:
        return {"extraction_rate": self.extraction_rate, "mean_exposure": self.mean_exposure,
                "mean_exposure_ext": self.mean_exposure_ext}

    def per_canary(self, logprobs: bool = False, digits: int = 4) -> list[dict]:
        """One JSON-ready dict per canary: extracted, rank exposure, extrapolated exposure, the true secret's
        log p, its rank, the fit; with `logprobs`, every candidate's log p (rounded to `digits`)."""
        out = []
        for i, lp in enumerate(self.logprobs):
            d = {"extracted": bool(self.extracted[i]), "exposure": self.exposures[i],
                 "exposure_ext": _json_float(self.exposures_ext[i]) if self.exposures_ext else None,
                 "logp_true": float(lp[0]), "rank": 1 + int((lp > lp[0]).sum()), "n_candidates": int(lp.size),
                 "skewnorm": list(self.fits[i]) if self.fits and self.fits[i] is not None else None}
            if logprobs:
                d["logprobs"] = [round(float(v), digits) for v in lp]
            out.append(d)
        return out


def _json_float(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def measure(model, tokenizer, canaries: list[Canary], n_candidates: int = 1000, seed: int = 0,
            chunk: int = 256, events: list | None = None, candidates: list[Candidates] | None = None,
            extrapolate: bool = True) -> CanaryReport:
    """Extraction and exposure of every canary under `model` (in eval mode, no dropout).

    Args:
        n_candidates: |R|, the true secret included.
        seed: seeds the candidate secrets (the same for every arm).
        chunk: candidates per forward pass (memory: chunk x secret length x vocab floats).
        events: out-of-memory retries are appended here (the batch is halved and retried).
        candidates: `prepare_candidates(tokenizer, canaries, n_candidates, seed)`, to tokenize once for
            many arms (must match `canaries` one to one).
        extrapolate: also fit the skew-normal and report extrapolated exposure (a few ms per canary on one CPU
            core).
    """
    if candidates is not None and len(candidates) != len(canaries):
        raise ValueError(f"candidates must match the canaries one to one: {len(candidates)} for {len(canaries)}")
    was_training = model.training
    model.eval()
    extracted, exposures, logprobs = [], [], []
    try:
        for i, c in enumerate(canaries):
            cand = candidates[i] if candidates is not None else tokenize_candidates(tokenizer, c, n_candidates, seed)
            logp = torch.empty(cand.n, dtype=torch.float64)
            for g, (idx, ids) in enumerate(cand.groups):
                lp, greedy = secret_logprobs(model, c.prefix_ids, ids, chunk, events)
                logp[idx] = lp
                if g == 0:  # the true secret's group: row 0 is the true secret
                    extracted.append(greedy)
            exposures.append(exposure_from_logprobs(logp))
            logprobs.append(logp.numpy())
    finally:
        model.train(was_training)
    fits, ext = [], []
    if extrapolate:
        for lp in logprobs:
            others = -lp[1:]
            fit = skewnorm_fit(others) if np.ptp(others) > 0 else None
            fits.append(fit)
            ext.append(extrapolated_exposure(lp, 0, fit) if fit is not None else float("nan"))
    return CanaryReport(sum(extracted) / len(canaries), sum(exposures) / len(exposures), extracted, exposures,
                        ext, logprobs, fits)


@torch.no_grad()
def extraction_rate(model, canaries: list[Canary]) -> float:
    """Share of canaries whose secret greedy decoding reproduces (teacher-forced argmax, one batch per length)."""
    was_training = model.training
    model.eval()
    hits = 0
    try:
        by_len: dict[tuple[int, int], list[Canary]] = {}
        for c in canaries:
            by_len.setdefault((len(c.prefix_ids), len(c.secret_ids)), []).append(c)
        for group in by_len.values():
            ids = torch.tensor([[*c.prefix_ids, *c.secret_ids] for c in group], device=_device(model))  # (B, T)
            p = len(group[0].prefix_ids)
            pred = model(input_ids=ids[:, :-1]).logits[:, p - 1:].argmax(-1)  # (B, S)
            hits += int((pred == ids[:, p:]).all(-1).sum())
    finally:
        model.train(was_training)
    return hits / len(canaries)


@torch.no_grad()
def greedy_secret(model, tokenizer, canary: Canary) -> str:
    """The first `len(secret)` characters greedy decoding writes after the prefix (the slow reference)."""
    ids = torch.tensor([canary.prefix_ids], device=_device(model))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(canary.secret_ids),
                         do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:])[: len(canary.secret)]
