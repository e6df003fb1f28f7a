"""Attention-score-driven KV-cache eviction, written to be read top to bottom.

A long prompt fills the KV cache. Eviction keeps a *budget* of K tokens per layer (and per KV head) and
drops the rest, ranked by evidence gathered while the model runs: mostly the attention each key received.
This file is the project's source of truth; `cab_fast.py` computes the same things faster.

Reading order
  1. attention          softmax(QK^T)V plus the accumulated scores, grouped-query native
  2. selection          fill a budget part by part (the one routine every policy shares)
  3. the classic policies, each beside the evidence it ranks by: StreamingLLM, H2O, SnapKV, CAB
  4. the fixes          why H2O and CAB lose the answer at 90% sparsity, and one policy per idea
  5. choosing           EvictionConfig (policy + budget) and select_kept
  6. the eviction loop  plain PyTorch state: cut the prompt, then per step append, attend, accumulate, evict
  7. tensor parallelism, and the transformers adapter: attention "cab_reference" and CabCache

Shape letters (used in every shape comment)
  B    batch                 Hq   query heads        Hkv  key/value heads      G = Hq // Hkv
  Nq   queries in this call  Nk   keys (cached + new) N    tokens ranked by a policy
  D    head dim              K    budget: tokens kept per (batch row, KV head)

Papers
  StreamingLLM: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks".
  H2O:          Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference".
  SnapKV:       Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation".
  CAB:          the research code this project re-implements: recent *local* tokens, *bridge* tokens that
                connect the important ones, *importance* heavy hitters. NOTES.md says where we differ from
                it and why, and holds every measurement.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Attention with accumulated scores

def visibility(nq: int, nk: int, *, causal: bool, key_mask=None, device=None):
    """Which keys each query may see (True). Causal masks are bottom-right aligned: the queries are the
    *last* Nq of Nk tokens, so query i sees keys 0 .. i + Nk - Nq. key_mask [B, Nk] hides padding."""
    q_pos = torch.arange(nq, device=device)[:, None] + (nk - nq)              # (Nq, 1)
    k_pos = torch.arange(nk, device=device)[None, :]                          # (1, Nk)
    visible = (k_pos <= q_pos) if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)
    visible = visible[None, None, None]                                       # (1, 1, 1, Nq, Nk)
    return visible if key_mask is None else visible & key_mask[:, None, None, None, :]   # (B|1, 1, 1, Nq, Nk)


def attention_probabilities(q, k, *, scale=None, causal=True, key_mask=None):
    """P[b, h, g, i, j] = softmax_j(q_i . k_j * scale) over the keys query i may see, in float32.

    Query head h * G + g uses KV head h: the group axis is split out instead of repeating K ("grouped-query
    attention is native"). The row max is subtracted before exp, so any logit magnitude is safe; a row
    that sees no key becomes zeros instead of 0/0 = NaN."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(b, hkv, hq // hkv, nq, d)                             # (B, Hkv, G, Nq, D)
    logits = (qg @ k.to(acc)[:, :, None].mT) * scale                          # (B, Hkv, G, Nq, Nk)
    if nk == 0:                                   # no keys (so no queries): empty, as the fast twin returns
        return logits
    logits = logits.masked_fill(~visibility(nq, nk, causal=causal, key_mask=key_mask, device=q.device), -math.inf)
    row_max = logits.amax(dim=-1, keepdim=True)                               # (B, Hkv, G, Nq, 1)
    p = torch.exp(logits - torch.where(torch.isfinite(row_max), row_max, 0.0))   # empty rows: exp(-inf) = 0
    row_sum = p.sum(dim=-1, keepdim=True)                                     # (B, Hkv, G, Nq, 1)
    return p / torch.where(row_sum > 0, row_sum, 1.0)                         # each visible row sums to 1


def attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=False):
    """Scaled dot-product attention that also returns how much attention every key received.

        out[b, h, i]     = sum_j P[b, h, i, j] v_j
        scores[b, kv, j] = sum over the G query heads h of group kv and over queries i of P[b, h, i, j]

    Each query row of P sums to 1 (0 if it sees no key), so a causal prefill's scores add up to Nq * G per
    (batch row, KV head). The sum is not divided by how many queries could see key j: early keys collect
    more, which is H2O's choice too. q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D]; key_mask [B, Nk] bool (True =
    real token) or None. Returns out [B, Hq, Nq, D] in q's dtype, scores [B, Hkv, Nk] float32 (float64 for
    float64 inputs). As SDPA, values are not inspected (a NaN input makes its rows NaN) unless validate=True:
    then NaN/inf is a ValueError (one more read of the inputs; on a GPU, a sync)."""
    check_attention_inputs(q, k, v, key_mask, scale, validate)
    b, hq, nq, d = q.shape
    p = attention_probabilities(q, k, scale=scale, causal=causal, key_mask=key_mask)  # (B, Hkv, G, Nq, Nk)
    out = (p @ v.to(p.dtype)[:, :, None]).reshape(b, hq, nq, d).to(q.dtype)   # (B, Hq, Nq, D)
    return out, p.sum(dim=(2, 3))                                             # scores (B, Hkv, Nk)


AttentionFn = Callable[..., tuple]   # attention's signature: (q, k, v, *, scale, causal, key_mask, validate)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_attention_inputs(q, k, v, key_mask, scale, validate, dtypes=FLOAT_DTYPES):
    """The checks every attention implementation shares (cab_fast passes its own dtypes)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            raise TypeError(f"{name}: expected a torch.Tensor of {', '.join(map(str, dtypes))}, "
                            f"got {getattr(t, 'dtype', type(t).__name__)}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
    (b, hq, nq, d), (bk, hkv, nk, dk) = q.shape, k.shape
    mask_ok = key_mask is None or (isinstance(key_mask, torch.Tensor) and key_mask.dtype == torch.bool
                                   and tuple(key_mask.shape) == (b, nk) and key_mask.device == k.device)
    for wrong, message in [
            (k.shape != v.shape, f"k and v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}"),
            (b != bk or d != dk, f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head dim must match"),
            (hkv == 0 or hq % max(hkv, 1), f"q has {hq} heads, k {hkv}: query heads must be a multiple of KV heads"),
            (nq > nk, f"q has {nq} queries but k only {nk} keys: expected Nq <= Nk"),
            (len({q.device, k.device, v.device}) > 1, f"q, k, v: expected one device, got {q.device}, {k.device}, "
                                                      f"{v.device}"),
            (not mask_ok, f"key_mask: expected bool [B, Nk] = [{b}, {nk}] on {k.device}, got "
                          f"{getattr(key_mask, 'dtype', type(key_mask))} {tuple(getattr(key_mask, 'shape', ()))} "
                          f"on {getattr(key_mask, 'device', None)}"),
            (scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)),
             f"scale: expected a finite number or None, got {scale!r}")]:
        if wrong:
            raise ValueError(message)
    for name, t in (("q", q), ("k", k), ("v", v)) if validate else ():
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: contains NaN or inf (validate=True); attention needs finite inputs")


# ----------------------------------------------------------------------------------------------------
# 2. Selection: fill the budget part by part
#
# A policy describes its keep-set as an ordered list of parts, e.g. H2O = [recent: 20% of K by position,
# heavy: the rest by score]. Each part takes its `count` best tokens among those no earlier part took,
# ordered by (real token before padding, higher priority, more recent): ties go to the more recent token.
# Nothing here asks the device for a value (no .item(), nonzero or bool()): static shapes.

class Part(NamedTuple):
    name: str
    count: int
    priority: object   # [B, H, N] tensor, or a function(available [B, H, N] bool) -> tensor


class Selection(NamedTuple):
    kept: torch.Tensor    # [B, H, K] int64, ascending: the token indices kept
    part: torch.Tensor    # [B, H, K] int64: index into names of the part that kept each token
    names: list           # the policy's part names, in the order they were filled
    order: torch.Tensor   # [B, H, N] int64: every token, best first (kept ones in part order, then the
                          #   evicted ones by the last part's priority): rank r = order.argsort()


def recency(scores):
    """Priority by position, later = higher: the most recent tokens first. [B, H, N] float32."""
    return torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32).expand(scores.shape)


def best_first(priority, available, valid):
    """Token indices best first: available real tokens, then available padding (by recency only, so every
    head pads alike), then tokens already taken; within each, higher priority, then more recent."""
    n = priority.shape[-1]
    priority = torch.where(valid, torch.nan_to_num(priority, nan=-math.inf), 0.0)  # (B, H, N)
    order = (n - 1) - torch.sort(priority.flip(-1), dim=-1, descending=True, stable=True).indices  # ties: later
    tier = (2 * (available & valid).to(torch.int8) + (available & ~valid).to(torch.int8)).gather(-1, order)
    return order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)


def fill_parts(parts, valid) -> Selection:
    """Fill the parts in order; the counts add up to K. valid [B, H, N] bool (False = padding)."""
    n, k = valid.shape[-1], sum(p.count for p in parts)
    if k > n:
        raise RuntimeError(f"parts {[p.name for p in parts]} ask for {k} tokens out of {n}")
    taken = torch.zeros_like(valid)                                          # (B, H, N)
    part_of = torch.full(valid.shape, -1, dtype=torch.int64, device=valid.device)
    chosen_in_order = []
    for index, part in enumerate(parts):
        priority = part.priority(valid & ~taken) if callable(part.priority) else part.priority
        chosen = best_first(priority, ~taken, valid)[..., :part.count]       # (B, H, count)
        taken, part_of = taken.scatter(-1, chosen, True), part_of.scatter(-1, chosen, index)
        chosen_in_order.append(chosen)
    evicted = best_first(priority, ~taken, valid)[..., :n - k]               # (B, H, N - K)
    order = torch.cat(chosen_in_order + [evicted], dim=-1)                   # (B, H, N)
    kept = torch.where(taken, torch.arange(n, device=valid.device), n).sort(dim=-1).values[..., :k]   # (B, H, K)
    return Selection(kept, part_of.gather(-1, kept), [p.name for p in parts], order)


# ----------------------------------------------------------------------------------------------------
# 3. The classic policies
#
# A policy is a small frozen dataclass: its fields are its knobs (each declares the values it accepts),
# `evidence` computes the per-key signals it ranks by from the prompt (once, right after the prompt's
# attention), and `parts` splits a budget of k tokens into Parts. Protected tokens (sinks, the recent
# window) are parts ranked by position, so they are kept by construction and rank dumps show real scores.

class Prompt(NamedTuple):
    """What a policy may look at when the prompt is cut: one layer's prompt attention inputs."""
    q: torch.Tensor                    # [B, Hq, N, D] the prompt's queries (RoPE applied)
    k: torch.Tensor                    # [B, Hkv, N, D]
    v: torch.Tensor                    # [B, Hkv, N, D]
    scale: float | None
    key_mask: torch.Tensor | None      # [B, N] bool, False = padding
    question_mask: torch.Tensor | None  # [B, N] bool, True = the question's tokens (CabCache's question_span)
    attention_fn: AttentionFn          # cab_reference.attention or its fast twin
    head_group: object = None          # the ranks holding the layer's other KV heads (see head_sum)
    token_ids: torch.Tensor | None = None  # [B, N] int64 the prompt's token ids (CabCache(token_ids=...)) or None


class Rule(NamedTuple):
    """What a knob accepts: ok(value), and the words of its error "<knob>: expected <expected>, got ..."."""
    expected: str
    ok: Callable[[object], bool]


def is_number(x, low=-math.inf, high=math.inf, *, integer=False, open_high=False):
    """A real number (never a bool) in [low, high] ([low, high) with open_high), an int if `integer`."""
    kind = int if integer else (int, float)
    return isinstance(x, kind) and not isinstance(x, bool) and low <= x and (x < high if open_high else x <= high)


def at_least(least):
    return Rule(f"an integer >= {least}", lambda x: is_number(x, least, integer=True))


FRACTION = Rule("a value in [0, 1]", lambda x: is_number(x, 0, 1))
ODD = Rule("an odd width >= 1 (pooling stays centred)", lambda x: is_number(x, 1, integer=True) and x % 2 == 1)
COSINE = Rule("a value in [-1, 1)", lambda x: is_number(x, -1, 1, open_high=True))   # 1 divides by 1 - 1
TOKEN_IDS = Rule("a tuple of token ids (ints >= 0)",
                 lambda x: isinstance(x, tuple) and all(is_number(i, 0, integer=True) for i in x))


def knob(default, rule: Rule, *, repr=True):
    """A dataclass field that declares the Rule its values must pass (check_fields checks it)."""
    return dataclasses.field(default=default, repr=repr, metadata={"rule": rule})


def check(name, value, rule: Rule):
    if not rule.ok(value):
        raise ValueError(f"{name}: expected {rule.expected}, got {value!r}")


def check_fields(obj):
    """Check every field of the dataclass `obj` that declares a Rule (policy knobs, EvictionConfig)."""
    for field in dataclasses.fields(obj):
        if "rule" in field.metadata:
            check(field.name, getattr(obj, field.name), field.metadata["rule"])


def _need(context, name, policy):
    if context.get(name) is None:
        raise ValueError(f"{name}: policy {policy!r} ranks by it; compute it with its evidence(...) "
                         f"(prompt_evidence, or CabCache does it for you)")
    return context[name]


@dataclass(frozen=True)
class Policy:
    """Base class: the knobs are the dataclass fields (declared with knob()); subclasses set `name` and
    define `parts`, and `evidence` when they rank by more than the accumulated scores."""
    name: ClassVar[str] = ""
    needs_question: ClassVar[bool] = False   # True: evidence needs CabCache(question_span=...)
    cuts_prompt: ClassVar[bool] = True       # False: the loop keeps the whole prompt one step longer (Delayed)

    def __post_init__(self):
        check_fields(self)

    def evidence(self, prompt: Prompt) -> dict:
        """Extra per-key evidence {name: [B, Hkv, N]} ranked by `parts`; most policies need none."""
        return {}

    def parts(self, scores, k, context) -> list:
        """Split a budget of k < N tokens into Parts; scores [B, H, N], context as select_kept's."""
        raise NotImplementedError

    def select(self, scores, k, context, valid) -> Selection:
        """Fill the parts (a policy whose split differs between batch rows overrides this)."""
        return fill_parts(self.parts(scores, k, context), valid)

    def fill_value(self, evidence_name) -> float:
        """The evidence a token gets when it enters the cache after the prompt."""
        return 0.0

    def after_prompt(self, evidence, scores):
        """Each attention call after the prompt's: evidence may grow with its scores [B, Hkv, L] (Delayed)."""

    def layer_pooling(self) -> dict:
        """{evidence name: L}: use the mean of that evidence over the first L layers in every layer. Once
        every name listed here has its L layers, later layers compute no evidence: list all or none."""
        return {}

    def ranks_by_scores(self, question: bool, token_ids: bool) -> bool:
        """Whether `parts` may rank by the accumulated scores, given whether CabCache has a question span
        and the prompt's token ids. False lets the fast twin skip the score pass altogether."""
        return True


@dataclass(frozen=True)
class Dense(Policy):
    """Keep everything: the dense baseline through the same code path (its budget is N)."""
    name: ClassVar[str] = "none"

    def ranks_by_scores(self, question, token_ids):
        return False


@dataclass(frozen=True)
class StreamingLLM(Policy):
    """StreamingLLM: the first `sinks` tokens soak up attention mass whatever they say, so keep them
    (the "attention sinks"), and fill the rest with the most recent tokens."""
    name: ClassVar[str] = "streaming"
    sinks: int = knob(4, at_least(0))           # first tokens always kept

    def parts(self, scores, k, context):
        sinks = min(self.sinks, k)
        return [Part("sink", sinks, -recency(scores)), Part("recent", k - sinks, recency(scores))]

    def ranks_by_scores(self, question, token_ids):
        return False


def recent_share(k, recent_ratio, room=None):
    """recent_ratio of K for the most recent tokens, at least 1 (at most `room`, K by default)."""
    return min(k if room is None else room, max(1, int(k * recent_ratio)))


@dataclass(frozen=True)
class H2O(Policy):
    """H2O: heavy hitters, the keys with the largest accumulated attention, plus a recent window. Its
    variants in section 4 change only what ranks the heavy hitters (`priority`) and the part's name."""
    name: ClassVar[str] = "h2o"
    heavy: ClassVar[str] = "heavy"              # the name of the part ranked by priority
    recent_ratio: float = knob(0.2, FRACTION)   # share of the budget for the most recent tokens (at least 1)

    def priority(self, scores, context):
        return scores

    def parts(self, scores, k, context):
        recent = recent_share(k, self.recent_ratio)
        return [Part("recent", recent, recency(scores)), Part(self.heavy, k - recent, self.priority(scores, context))]


def window_scores(q, k, v, window, *, scale=None, key_mask=None, attention_fn: AttentionFn = attention):
    """SnapKV's evidence: column sums of the attention of the last `window` queries only (with the causal
    mask bottom-right aligned, q[..., -window:, :] against all keys is exactly that). [B, Hkv, N]"""
    return attention_fn(q[:, :, -window:], k, v, scale=scale, causal=True, key_mask=key_mask)[1]


@dataclass(frozen=True)
class SnapKV(Policy):
    """SnapKV: the prompt's last `window` queries already "know" what the answer will need. Keep that
    window (at most half the budget) and rank the rest by the window's attention max-pooled over `pool`
    neighbours, so a neighbourhood survives, not isolated tokens. Decode-time evictions keep ranking by the
    prompt's window evidence, pooled over the slots left: a generated token has none (0), so it stays
    while recent or while pooling lends it a kept neighbour's evidence."""
    name: ClassVar[str] = "snapkv"
    window: int = knob(16, at_least(1))         # observation window: the last prompt queries
    pool: int = knob(7, ODD)                    # max-pool width over neighbouring positions

    def evidence(self, prompt):
        return {"window_scores": window_scores(prompt.q, prompt.k, prompt.v, self.window, scale=prompt.scale,
                                               key_mask=prompt.key_mask, attention_fn=prompt.attention_fn)}

    def parts(self, scores, k, context):
        evidence = context.get("window_scores", scores)                      # without it: the scores
        pooled = F.max_pool1d(evidence.float(), self.pool, stride=1, padding=self.pool // 2)   # (B, H, N)
        window = min(self.window, k // 2)
        return [Part("recent", window, recency(scores)), Part("pooled", k - window, pooled)]


# CAB's bridge evidence: "median" needs only the scores; the graph modes read the prompt's attention as a
# token graph per KV head, W = P averaged over the group (rows queries, columns keys; N x N per head).

def connectivity(graph, key_mask=None):
    """Bridge evidence "connectivity": how many distinct queries attend to key j above uniform,
        connectivity[j] = #{ i : W[i, j] > 1 / (number of keys query i sees) }:
    a token many queries find worth more than a uniform share links many parts of the text. (The original
    code multiplied in- and out-attention over the important set; NOTES.md says why we count.)"""
    n = graph.shape[-1]
    visible = visibility(n, n, causal=True, key_mask=key_mask, device=graph.device)[:, 0, 0]  # (B|1, N, N)
    seen = visible.sum(-1, keepdim=True).clamp_min(1)[:, None]                # (B|1, 1, N, 1)
    return (graph > 1.0 / seen).sum(dim=-2).to(torch.float32)                # (B, Hkv, N)


def forman_curvature(graph, key_mask=None):
    """Bridge evidence "curvature": node Forman-Ricci curvature of the attention graph with an edge
    i -- j (i != j) where (W[i, j] + W[j, i]) / 2 > 1 / n_valid, the weight of uniform attention:
        F(e) = 4 - deg(i) - deg(j) + 3 * t(e),   t(e) = triangles containing edge e = (i, j),
    a node's curvature the mean of F over its edges. Edges between hubs sharing few neighbours are very
    negative: bottlenecks between dense regions, so the *lowest* curvature marks a bridge. Isolated
    tokens get +inf (never bridges). [B, Hkv, N] float32."""
    n = graph.shape[-1]
    valid = torch.ones(graph.shape[0], n, dtype=torch.bool, device=graph.device) if key_mask is None else key_mask
    n_valid = valid.sum(-1).clamp_min(1)[:, None, None, None]                 # (B, 1, 1, 1)
    pair = valid[:, None, :, None] & valid[:, None, None, :] & ~torch.eye(n, dtype=torch.bool, device=graph.device)
    adj = (((graph + graph.mT) / 2 > 1.0 / n_valid) & pair).to(torch.float32)   # (B, Hkv, N, N)
    deg = adj.sum(-1)                                                        # (B, Hkv, N)
    edge_f = (4 - deg[..., :, None] - deg[..., None, :] + 3 * (adj @ adj) * adj) * adj
    return torch.where(deg > 0, edge_f.sum(-1) / deg.clamp_min(1), math.inf)


def median_bridge(scores):
    """Bridge mode "median" (O(N)): among the tokens not yet taken, those whose accumulated score is closest
    to the median of theirs: neither heavy hitters nor noise."""
    def priority(available):
        median = scores.masked_fill(~available, math.nan).nanmedian(dim=-1, keepdim=True).values  # (B, H, 1)
        return -(scores - median).abs()
    return priority


BRIDGE_MODES = ("median", "connectivity", "curvature")


@dataclass(frozen=True)
class CAB(Policy):
    """CAB: three parts of the budget, in this order:
      local (recent) = int(K * recent_ratio) most recent tokens (at least 1, as H2O),
      importance     = K - local - bridge heavy hitters by accumulated score (as H2O),
      bridge         = int(K * bridge_ratio) tokens that connect the others, by `bridge` mode: "median",
                       "connectivity" or "curvature" (the graph modes cost N x N per KV head).
    Importance takes what the other two leave, so recent_ratio + bridge_ratio must be <= 1."""
    name: ClassVar[str] = "cab"
    recent_ratio: float = knob(0.3, FRACTION)   # CAB's "local" share: the most recent tokens
    bridge_ratio: float = knob(0.2, FRACTION)   # tokens connecting the important ones
    bridge: str = knob("median", Rule("one of " + ", ".join(BRIDGE_MODES), lambda x: x in BRIDGE_MODES))

    def __post_init__(self):
        super().__post_init__()
        if self.recent_ratio + self.bridge_ratio > 1.0 + 1e-9:
            raise ValueError(f"recent_ratio + bridge_ratio: expected at most 1 (importance takes the rest), "
                             f"got {self.recent_ratio} + {self.bridge_ratio}")

    def evidence(self, prompt):
        if self.bridge == "median":
            return {}
        p = attention_probabilities(prompt.q, prompt.k, scale=prompt.scale, key_mask=prompt.key_mask)
        n, nq = prompt.k.shape[2], prompt.q.shape[2]
        graph = F.pad(p.mean(dim=2), (0, 0, n - nq, 0))                     # (B, Hkv, N, N), W = mean over G
        measure = connectivity if self.bridge == "connectivity" else forman_curvature
        return {self.bridge: measure(graph, prompt.key_mask)}

    def fill_value(self, evidence_name):
        return math.inf if evidence_name == "curvature" else 0.0              # new tokens: never a bridge

    def parts(self, scores, k, context):
        return self.split(scores, k, context, self.recent_ratio, self.bridge_ratio)

    def split(self, scores, k, context, recent_ratio, bridge_ratio):
        local = recent_share(k, recent_ratio)
        bridge = min(int(k * bridge_ratio), k - local)
        if self.bridge == "median":
            bridge_priority = median_bridge(scores)
        else:
            evidence = _need(context, self.bridge, self.name)
            bridge_priority = evidence if self.bridge == "connectivity" else -evidence   # lowest curvature first
        return [Part("local", local, recency(scores)), Part("importance", k - local - bridge, scores),
                Part("bridge", bridge, bridge_priority)]


# ----------------------------------------------------------------------------------------------------
# 4. The fixes
#
# The failure: at 90% sparsity H2O and CAB keep almost none of the answer to a question about a long
# context ("McLaren Vale" in diagnose.py's default prompt). Accumulated causal attention favours the first
# token, sentence-final periods and early filler; the answer is a few tokens in the middle that no query
# has needed yet. Each fix changes one thing about what ranks the prompt; "still fails" is why the next.

def question_similarity(q, k, question_mask):
    """cos(k_j, mean of the question's queries), per KV head: the layer's own keys against the layer's own
    queries at the question positions (averaged over the group), the geometry the model matches with
    (q.k is its logit); cosine, not softmax, so the few keys that dominate a softmax row do not.
    q [B, Hq, N, D]; k [B, Hkv, N, D]; question_mask [B, N]. [B, Hkv, N] in [-1, 1], 0 without a question."""
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    qm = question_mask[:, -nq:].to(torch.float32)                            # (B, Nq) question queries
    qg = q.float().view(b, hkv, hq // hkv, nq, d)                            # (B, Hkv, G, Nq, D)
    count = qm.sum(-1).clamp_min(1.0)[:, None, None]                         # (B, 1, 1)
    center = (qg * qm[:, None, None, :, None]).sum(dim=(2, 3)) / (count * (hq // hkv))   # (B, Hkv, D)
    sim = F.cosine_similarity(k.float(), center[:, :, None, :], dim=-1, eps=1e-8)   # (B, Hkv, N)
    return sim * (qm.sum(-1) > 0)[:, None, None]


@dataclass(frozen=True)
class QuestionAware(H2O):
    """Fix 1, question-aware scoring. Fixes: accumulated attention ignores what was asked. Changes: heavy
    hitters by  scores / max(scores) + alpha * question_similarity,  plus the recent window (the division
    puts both terms on a [0, 1]-ish scale). Still fails: keys similar to the question's mean query are the
    question's own words."""
    name: ClassVar[str] = "question_aware"
    heavy: ClassVar[str] = "question_aware"
    needs_question: ClassVar[bool] = True
    alpha: float = knob(1.0, Rule("a finite number", lambda x: is_number(x) and math.isfinite(x)))  # similarity weight

    def evidence(self, prompt):
        return {"question_similarity": question_similarity(prompt.q, prompt.k, prompt.question_mask)}

    def priority(self, scores, context):
        normalised = scores / scores.amax(dim=-1, keepdim=True).clamp_min(1e-30)
        return normalised + self.alpha * _need(context, "question_similarity", self.name)


def bidirectional_scores(q, k, v, *, scale=None, key_mask=None, attention_fn: AttentionFn = attention):
    """Fix 2's evidence: column sums of a *non-causal* pass, so early tokens are also judged by what later
    tokens (the question) make of them; for ranking only, the model's outputs stay causal. [B, Hkv, N]"""
    return attention_fn(q, k, v, scale=scale, causal=False, key_mask=key_mask)[1]


@dataclass(frozen=True)
class Bidirectional(H2O):
    """Fix 2, bidirectional scoring. Fixes: a causal context token is judged only by the tokens before it,
    never by the question after it. Changes: heavy hitters by a non-causal pass over the prompt, plus the
    recent window. Decode-time evictions keep ranking by the prompt's pass: a generated token has none (0)
    and stays only while recent. Still fails: the extra mass lands on sinks and the question's own words."""
    name: ClassVar[str] = "bidirectional"
    heavy: ClassVar[str] = "bidirectional"

    def evidence(self, prompt):
        return {"bidirectional_scores": bidirectional_scores(prompt.q, prompt.k, prompt.v, scale=prompt.scale,
                                                             key_mask=prompt.key_mask,
                                                             attention_fn=prompt.attention_fn)}

    def priority(self, scores, context):
        return context.get("bidirectional_scores", scores)


@dataclass(frozen=True)
class Delayed(H2O):
    """Fix 3, delayed eviction. Fixes: the prompt is cut before any token has asked for the answer. Changes:
    nothing is evicted in the prefill (cuts_prompt False); the first cut waits for the first generated
    token and ranks heavy hitters by decode_scores, zero in the prompt, plus every later attention call's
    scores (after_prompt). Costs a full-size cache for one step. Still fails: one token's attention in a
    small model is mostly on the sink."""
    name: ClassVar[str] = "delayed"
    heavy: ClassVar[str] = "first_token"
    cuts_prompt: ClassVar[bool] = False

    def evidence(self, prompt):
        return {"decode_scores": torch.zeros(prompt.k.shape[:3], device=prompt.k.device)}   # (B, Hkv, N)

    def after_prompt(self, evidence, scores):
        evidence["decode_scores"] = evidence["decode_scores"] + scores

    def priority(self, scores, context):
        return _need(context, "decode_scores", self.name)


def is_question_at_end(question_mask, tail):
    """True per row when the question's last token is within `tail` tokens of the end of the prompt
    (question_mask [B, ..., N], the prompt's)."""
    n = question_mask.shape[-1]
    last = torch.where(question_mask, torch.arange(n, device=question_mask.device), -1).amax(dim=-1)  # (B, ...)
    return (last >= 0) & (last >= n - tail)


@dataclass(frozen=True)
class DynamicLocal(CAB):
    """Fix 4, a local ratio from the prompt's structure. Fixes: CAB's fixed 30% recent share is wrong for a
    QA prompt, whose recent tokens are the question. Changes: a question that ends within qa_tail tokens of
    the prompt's end gives local = qa_recent_ratio (bridge and importance share the rest in their
    proportion); otherwise CAB's ratios. Read once, from the prompt's question_mask (evidence question_at_end,
    1 in every prompt slot of such a row): later evictions keep the decision while the row holds any prompt
    token. Still fails: the recent tokens are the question, not the answer."""
    name: ClassVar[str] = "dynamic_local"
    qa_recent_ratio: float = knob(0.9, FRACTION)   # recent share when the question ends the prompt
    qa_tail: int = knob(32, at_least(1))           # "at the end" = the question ends this close to the end

    def evidence(self, prompt):
        evidence = super().evidence(prompt)
        if prompt.question_mask is not None:
            at_end = is_question_at_end(prompt.question_mask, self.qa_tail).float()   # (B,)
            evidence["question_at_end"] = at_end[:, None, None].expand(prompt.k.shape[:3])
        return evidence

    def select(self, scores, k, context, valid):
        cab = super().select(scores, k, context, valid)
        if "question_at_end" in context:                       # decided in the prompt (generated tokens: 0)
            at_end = context["question_at_end"].amax(-1, keepdim=True) > 0   # (B, 1|H, 1)
        elif "question_mask" in context:                       # a prompt's selection without its evidence
            at_end = is_question_at_end(context["question_mask"], self.qa_tail)[..., None]
        else:
            return cab
        share = self.bridge_ratio / (1.0 - self.recent_ratio) if self.recent_ratio < 1 else 0.0
        qa = fill_parts(self.split(scores, k, context, self.qa_recent_ratio, (1.0 - self.qa_recent_ratio) * share),
                        valid)
        return Selection(*(torch.where(at_end, a, c) for a, c in zip(qa[:2], cab[:2])), cab.names,
                         torch.where(at_end, qa.order, cab.order))


@dataclass(frozen=True)
class HybridSemantic(H2O):
    """Fix 5, hybrid local + semantic. Fixes: attention is the wrong signal altogether. Changes: the recent
    window plus the keys most similar to the question (question_similarity); no scores. Still fails:
    similar keys are the question's words, not the answer."""
    name: ClassVar[str] = "hybrid_semantic"
    heavy: ClassVar[str] = "semantic"
    needs_question: ClassVar[bool] = True

    def evidence(self, prompt):
        return {"question_similarity": question_similarity(prompt.q, prompt.k, prompt.question_mask)}

    def priority(self, scores, context):
        return _need(context, "question_similarity", self.name)

    def ranks_by_scores(self, question, token_ids):
        return False


def same_word(vn, cols, threshold, head_group=None):
    """m[..., j, i] = relu((cos(v_j, v_i) - threshold) / (1 - threshold)) for every key j and the tokens i in
    `cols`: how surely key j is the same word as token i. Values carry no RoPE and in the first layers are
    mostly a function of the token, so cos(v_j, v_i) near 1 means "the same word" wherever they stand.
    Word identity is no per-head matter: cosines are averaged over the layer's KV heads (every rank's
    under tensor parallelism, head_sum). vn [..., Hkv, N, D] unit-norm values. [..., N, Q]."""
    cos = head_sum((vn @ vn[..., cols, :].mT).sum(-3), head_group) / (vn.shape[-3] * head_group_size(head_group))
    return ((cos - threshold) / (1.0 - threshold)).clamp_min(0.0)


def question_match(v, question_mask, threshold=0.5, key_mask=None, head_group=None):
    """MatchSpan's evidence: how strongly key j shares a word with the question, rare words counting more,

        question_match[j] = sum over question tokens i of m[j, i] / (1 + sum over j' of m[j', i])

    (m: same_word) over keys before the question; an inverse-document-frequency weighting: a question word
    found all over the context ("the") adds little, one found once up to 1. Normalised to sum 1 over the
    keys, the same in every head. v [B, Hkv, N, D]; question_mask, key_mask [B, N]. [B, Hkv, N] float32."""
    b, hkv, n, _ = v.shape
    cols = question_mask.any(dim=0).nonzero().squeeze(-1)                   # (Q,) question positions, any row
    m = same_word(F.normalize(v.float(), dim=-1), cols, threshold, head_group)   # (B, N, Q)
    positions = torch.arange(n, device=v.device)
    before = positions[None, :] < torch.where(question_mask, positions, n).amin(dim=-1)[:, None]   # (B, N)
    if key_mask is not None:
        before = before & key_mask
    m = m * before[:, :, None] * question_mask[:, None, cols]                # (B, N, Q) this row's question only
    idf = 1.0 / (1.0 + m.sum(dim=1, keepdim=True))                           # (B, 1, Q)
    match = (m * idf).sum(dim=-1)                                            # (B, N)
    match = match / match.sum(dim=-1, keepdim=True).clamp_min(1e-30)         # rows sum to 1 (or 0)
    return match[:, None, :].expand(b, hkv, n).contiguous()                  # (B, Hkv, N)


def sinks_recent_and(policy, k, scores, name, priority, question_mask=None):
    """The parts of MatchSpan, SentenceMatch and FactSlots: the first `sinks` tokens, recent_share of K most
    recent tokens, the rest by `priority` (by the scores, as "heavy", when it is None). With a question,
    up to `question_tokens` of its own tokens rank above the evidence, but only from as much evidence on:
    a small budget keeps the evidence alone (a kept answer is of little use to a model that lost half of
    its question); a shorter question leaves the rest of its share to `priority`, a longer keeps its end."""
    sinks = min(policy.sinks, k)
    recent = recent_share(k, policy.recent_ratio, room=k - sinks)
    rest = k - sinks - recent
    parts = [Part("sink", sinks, -recency(scores)), Part("recent", recent, recency(scores))]
    if priority is None:
        return parts + [Part("heavy", rest, scores)]
    tokens = 0 if question_mask is None else policy.question_tokens
    question = max(0, min(tokens, rest - tokens))
    if question:                                 # the question's tokens above every other key
        parts.append(Part("question", question, torch.where(question_mask, priority.amax(-1, keepdim=True) + 1.0,
                                                             priority)))
    return parts + [Part(name, rest - question, priority)]


@dataclass(frozen=True)
class MatchSpan(Policy):
    """Fix 6, keep the passage that answers the question. Fixes: attention from the question lands on the
    needle's words that *match* the question, not on the answer beside them (and in a small model mostly on
    sinks and the question's own label). Changes: rank by word overlap with the question (question_match,
    averaged over the first `layers` layers) and keep whole neighbourhoods:
        stretch[j]  = mean of question_match over the `window` tokens centred on j,
        priority[j] = max of stretch over the `radius` tokens either side of j,
    so the 2 * radius + 1 tokens around the best stretch tie and are kept together, then the next-best.
    Parts: sinks_recent_and; decode-time evictions pool over the slots left (new tokens have match 0).
    Without a question (no question_span) it is H2O with sinks. Still fails: bridge questions, whose
    answer's sentence shares no word with the question, and paraphrased predicates far from the entity."""
    name: ClassVar[str] = "match_span"
    sinks: int = knob(1, at_least(0))           # attention sinks (1: at 10% of a short prompt every slot counts)
    recent_ratio: float = knob(0.2, FRACTION)
    threshold: float = knob(0.5, COSINE)        # cos(v_j, v_i) above which key j is "the same word" as token i
    window: int = knob(9, ODD)                  # moving average that turns word matches into a stretch score
    radius: int = knob(9, at_least(0))          # keep this many tokens either side of a well-matching stretch
    layers: int = knob(1, at_least(1))          # question_match averaged over the first `layers` layers
    question_tokens: int = knob(32, at_least(0))   # question tokens kept once the evidence has as many

    def evidence(self, prompt):
        if prompt.question_mask is None:
            return {}
        return {"question_match": question_match(prompt.v, prompt.question_mask, self.threshold, prompt.key_mask,
                                                 prompt.head_group)}

    def layer_pooling(self):
        return {"question_match": self.layers}   # word identity is clearest in the first layers

    def ranks_by_scores(self, question, token_ids):
        return not question

    def parts(self, scores, k, context):
        match, priority = context.get("question_match"), None
        if match is not None:
            b, h, n = match.shape
            stretch = F.avg_pool1d(match.float().reshape(b * h, 1, n), self.window, stride=1,
                                   padding=self.window // 2, count_include_pad=False)   # (B*H, 1, N)
            priority = F.max_pool1d(stretch, 2 * self.radius + 1, stride=1, padding=self.radius).reshape(b, h, n)
        return sinks_recent_and(self, k, scores, "span", priority, context.get("question_mask"))


# Questions that share no word with the answer: SentenceMatch keeps whole sentences and matches a second
# round through the bridge entity; FactSlots keeps a context's distinctive facts before any question.

def sentence_index(token_ids, boundary_ids):
    """Sentence number of every token [B, N] int64: a token ending a sentence (its id in boundary_ids)
    belongs to that sentence, the next token starts a new one. None without token ids or boundary ids."""
    if token_ids is None or not boundary_ids:
        return None
    ends = torch.isin(token_ids, torch.tensor(boundary_ids, device=token_ids.device)).long()   # (B, N)
    return ends.cumsum(-1) - ends


def token_texts(tokenizer) -> tuple:
    """Every token id's text, in id order: TitleLinks(vocab=token_texts(tokenizer))."""
    return tuple(tokenizer.batch_decode([[i] for i in range(len(tokenizer))]))


def sentence_end_ids(tokenizer) -> tuple:
    """The ids of the tokens whose text, stripped, ends in ".", "?" or "!" (".", ").", ".\\n", ...):
    SentenceMatch(boundary_ids=sentence_end_ids(tokenizer))."""
    return tuple(i for i, text in enumerate(token_texts(tokenizer)) if text.rstrip().endswith((".", "?", "!")))


def word_match(vn, query, candidates, threshold, head_group=None):
    """Word identity of every key with the query tokens (query [N] bool), each query word shared out among
    its occurrences:  match[j] = sum over i of m[j, i] / max(1, sum over j' of m[j', i])  (m: same_word)
    over candidate keys j (candidates [N] bool). A word found once elsewhere (an entity) gives its sentence
    1, a template word shared by c sentences 1 / c each (question_match's 1 / (1 + c) would tie a two-token
    entity with a three-word template shared by one other sentence). vn [Hkv, N, D] one row's values. [N]"""
    m = same_word(vn, query.nonzero().squeeze(-1), threshold, head_group) * candidates[:, None]   # (N, Q)
    return (m / m.sum(0, keepdim=True).clamp_min(1.0)).sum(-1)


def sentence_sums(x, sentence):
    """Every token gets the sum of x over its sentence. x [N] float, sentence [N] int64."""
    return x.new_zeros(int(sentence.max()) + 1).index_add_(0, sentence, x)[sentence]


def nearness(weight, positions):
    """How close token j is to the words that matched, rare words counting more: max over matched tokens m
    of weight[m] / (1 + |j - m|), in [0, 1] (weight [N] >= 0, 0 = no match). The answer sits next to the
    words the question shares with its sentence: a sentence longer than its share keeps those first. [N]"""
    matched = weight > 0
    if not bool(matched.any()):
        return torch.zeros_like(weight)
    distance = (positions[:, None] - positions[matched][None, :]).abs()      # (N, M)
    return (weight[matched].clamp_max(1.0) / (1.0 + distance)).amax(-1)


def hop_sentences(v, question_mask, sentence, key_mask, threshold, hops, head_group=None):
    """SentenceMatch's evidence [B, N]: the sentence matching the question best (hop 1) ranks above the
    sentence matching hop 1's new words (hop 2) ... above every other sentence, by its best match in any
    round (in [0, 1]). A host sync per hop (the best sentence's argmax)."""
    b, _, n, _ = v.shape
    vn = F.normalize(v.float(), dim=-1)                                      # (B, Hkv, N, D)
    positions = torch.arange(n, device=v.device)
    priority = torch.zeros(b, n, device=v.device)
    for row in range(b):
        qm, sid = question_mask[row], sentence[row]
        if not bool(qm.any()):
            continue
        candidates = positions < int(qm.nonzero()[0])                        # keys before the question
        candidates = candidates if key_mask is None else candidates & key_mask[row]
        query, best, chosen = qm, torch.zeros(n, device=v.device), torch.zeros_like(qm)
        for hop in range(hops):
            match = word_match(vn[row], query, candidates & ~chosen, threshold, head_group)
            per_sentence = sentence_sums(match, sid) * (candidates & ~chosen)
            if float(per_sentence.max()) <= 0:
                break
            best = torch.maximum(best, per_sentence / per_sentence.max())
            found = (sid == sid[int(per_sentence.argmax())]) & candidates
            near = nearness(match * found, positions) if hop == 0 else 0.0   # the question's sentence only
            priority[row] += (hops - hop + 1 + 0.5 * near) * found
            query, chosen = found & ~((match > 0) & found), chosen | found   # its new words: the bridge
            if not bool(query.any()):
                break
        priority[row] += best
    return priority


@dataclass(frozen=True)
class SentenceMatch(Policy):
    """Fix 7, keep whole sentences, reached in hops. Fixes two failures of MatchSpan:
    - bridge questions ("home town of the architect of the Harlow Bridge?"): the answer's sentence ("Mira
      Ostrand grew up in Telsby") shares only the bridge entity of the sentence that matches the question
      ("The Harlow Bridge was designed by Mira Ostrand");
    - paraphrased predicates ("Where is Orlin Foods based?" for "Orlin Foods has its headquarters in ...
      Dunmore"): the answer stands in the matching sentence, but past MatchSpan's radius.
    Changes: keep the sentence sharing the question's rarest words, then the one sharing that sentence's
    *new* words (the bridge entity), for `hops` rounds (hop_sentences). Word identity as question_match's,
    at threshold 0.9 (identical tokens have cosine 1; unrelated ones often pass 0.5). Sentences end at
    `boundary_ids` in the prompt's token ids (CabCache(token_ids=...)), else every `segment` tokens. Parts
    and the no-question case as MatchSpan's. Still fails: an entity written differently in its two
    sentences (a pronoun); a hop-1 distractor sharing more question words; hop 2 won by the one other
    sentence sharing hop 1's template when no third shares it; a hop-2 sentence longer than its share."""
    name: ClassVar[str] = "sentence_match"
    sinks: int = knob(1, at_least(0))
    recent_ratio: float = knob(0.2, FRACTION)
    threshold: float = knob(0.9, COSINE)        # cos(v_j, v_i) above which key j is "the same word" as token i
    hops: int = knob(2, at_least(1))            # matching rounds: 1 = the question's sentence, 2 = + the bridge's
    boundary_ids: tuple = knob((), TOKEN_IDS)   # token ids that end a sentence (needs the prompt's token ids)
    segment: int = knob(16, at_least(1))        # without boundaries: "sentences" of this many tokens
    question_tokens: int = knob(32, at_least(0))   # question tokens kept once the evidence has as many

    def evidence(self, prompt):
        if prompt.question_mask is None:
            return {}
        b, h, n, _ = prompt.v.shape
        sentence = sentence_index(prompt.token_ids, self.boundary_ids)
        if sentence is None:
            sentence = (torch.arange(n, device=prompt.v.device) // self.segment).expand(b, n)
        priority = hop_sentences(prompt.v, prompt.question_mask, sentence, prompt.key_mask, self.threshold, self.hops,
                                 prompt.head_group)
        return {"sentence_match": priority[:, None, :].expand(b, h, n).contiguous()}

    def layer_pooling(self):
        return {"sentence_match": 1}   # the first layer's values: word identity, before any mixing

    def ranks_by_scores(self, question, token_ids):
        return not question

    def parts(self, scores, k, context):
        question = context.get("question_mask")
        return sinks_recent_and(self, k, scores, "sentences", context.get("sentence_match"), question)


def token_counts(token_ids, key_mask=None):
    """How often each token's id occurs among the row's real tokens: [B, N] float32 (0 for padding)."""
    real = torch.ones_like(token_ids, dtype=torch.bool) if key_mask is None else key_mask
    counts = torch.zeros(token_ids.shape, device=token_ids.device)
    for row in range(token_ids.shape[0]):
        _, inverse, per_id = torch.unique(token_ids[row], return_inverse=True, return_counts=True)
        counts[row] = torch.zeros_like(per_id).index_add_(0, inverse, real[row].long())[inverse].float() * real[row]
    return counts


@dataclass(frozen=True)
class FactSlots(Policy):
    """Fix 8, before the question exists keep the words that tell similar sentences apart. Fixes:
    compression before the question, where H2O and SnapKV keep no more of the answer than random eviction
    at 90%. A question will ask about a fact; facts of one kind share a pattern ("X grew up in Y.") and
    differ in their slots (X, Y). Changes, with c the count of a token in the prompt:
      template[s] = mean over sentence s of [2 <= c <= max_repeat] / c  (shared by a few sentences, not all),
      priority[j] = template[sentence of j] * (1 + slot_bonus * [c_j == 1]),
    so patterned sentences rank first, their one-off words (names, places) first within them. Parts:
    sinks_recent_and. Needs token ids and boundary_ids (as SentenceMatch), else H2O with sinks. Still
    fails: answering (at 90% it keeps slot words without the words relating them); facts that share no
    pattern; kinds with more than max_repeat facts."""
    name: ClassVar[str] = "fact_slots"
    sinks: int = knob(1, at_least(0))
    recent_ratio: float = knob(0.0, FRACTION)   # share for the most recent tokens (at least 1; no question yet)
    max_repeat: int = knob(16, at_least(2))     # a word in at most this many places can be a pattern word
    slot_bonus: float = knob(10.0, Rule("a finite number >= 0", lambda x: is_number(x, 0, math.inf, open_high=True)))
    boundary_ids: tuple = knob((), TOKEN_IDS)   # token ids that end a sentence, as SentenceMatch

    def evidence(self, prompt):
        sentence = sentence_index(prompt.token_ids, self.boundary_ids)
        if sentence is None:
            return {}
        b, h, n, _ = prompt.v.shape
        counts = token_counts(prompt.token_ids, prompt.key_mask)                       # (B, N)
        pattern = ((counts >= 2) & (counts <= self.max_repeat)) / counts.clamp_min(1)   # (B, N)
        priority = torch.zeros(b, n, device=prompt.v.device)
        for row in range(b):
            length = sentence_sums(torch.ones(n, device=prompt.v.device), sentence[row])
            template = sentence_sums(pattern[row].float(), sentence[row]) / length
            priority[row] = template * (1.0 + self.slot_bonus * (counts[row] == 1))
        return {"fact_slots": priority[:, None, :].expand(b, h, n).contiguous()}

    def ranks_by_scores(self, question, token_ids):
        return not (token_ids and self.boundary_ids)

    def parts(self, scores, k, context):
        return sinks_recent_and(self, k, scores, "slots", context.get("fact_slots"))


def paragraphs(text):
    """(start, end) character spans of the runs of lines between blank lines; a line of chat markup
    ("<|im_start|>user") separates as a blank line does."""
    spans, start = [], None
    for line in re.finditer(r"[^\n]*(?:\n|$)", text):
        separator = not line.group().strip() or "<|" in line.group()
        if separator and start is not None:
            spans.append((start, line.start()))
        start = None if separator else line.start() if start is None else start
    return spans + ([(start, len(text))] if start is not None else [])


def title_links(texts, max_title):
    """TitleLinks' evidence for one row of token texts [N]. A paragraph whose first line is a title (at
    most max_title words, a parenthesised qualifier dropped) is *linked* when that title's words occur, in
    any case, anywhere else in the prompt. A paragraph's tokens get 1 / (1 + their index in it), plus 2 in
    a linked paragraph: linked paragraphs first, each from its start, then every other paragraph's start;
    text outside paragraphs gets 0. One pass over the words finds every title's occurrences."""
    text = "".join(texts)
    found = list(re.finditer(r"\w+", text))               # lowered per word: text.lower() may change offsets
    starts, words = [m.start() for m in found], [m.group().lower() for m in found]
    where = {}                                                               # word -> its indices in words
    for index, word in enumerate(words):
        where.setdefault(word, []).append(index)

    def named_outside(title, start, end):
        return any(not start <= starts[i] < end and words[i:i + len(title)] == title for i in where.get(title[0], ()))

    token_ends = [0, *itertools.accumulate(map(len, texts))]
    lead = [1.0 / (1 + i) for i in range(len(texts))]                       # 1 / (1 + index in the paragraph)
    priority = [0.0] * len(texts)
    for start, end in paragraphs(text):
        first_line, _, body = text[start:end].partition("\n")
        title = [word.lower() for word in re.findall(r"\w+", first_line.split(" (")[0])]
        linked = bool(body.strip()) and 0 < len(title) <= max_title and named_outside(title, start, end)
        first = bisect.bisect_right(token_ends, start) - 1                  # the token holding its first character
        last = bisect.bisect_left(token_ends, end)
        priority[first:last] = [2.0 + x for x in lead[:last - first]] if linked else lead[:last - first]
    return priority


@dataclass(frozen=True)
class TitleLinks(Policy):
    """Fix 9, keep the paragraphs the rest of the prompt refers to. Fixes: a multi-hop answer sits in the
    paragraph about the bridge entity, which shares no word with the question and, before the question
    exists, nothing marks at all. A prompt of titled paragraphs (retrieved passages, Wikipedia leads) says
    which ones matter by naming them: the paragraph whose title another paragraph (or the question)
    mentions is the entity the text links to. Changes: rank by title_links (the linked paragraphs from their
    start, then every paragraph's start); text only, no scores, the same in every layer and head. Parts:
    sinks_recent_and. Needs the prompt's token ids and vocab (token_texts(tokenizer)), else H2O with
    sinks. Still fails: untitled text; an answer in a paragraph nobody names (the question's own
    paragraph, when the question does not name its title); more linked paragraphs than the budget holds."""
    name: ClassVar[str] = "title_links"
    sinks: int = knob(1, at_least(0))
    recent_ratio: float = knob(0.0, FRACTION)   # share for the most recent tokens (at least 1)
    max_title: int = knob(12, at_least(1))      # a first line of more words is no title
    question_tokens: int = knob(32, at_least(0))   # question tokens kept once the evidence has as many
    vocab: tuple = knob((), Rule("a tuple of every token id's text (token_texts(tokenizer))",
                                 lambda x: isinstance(x, tuple) and all(isinstance(t, str) for t in x)), repr=False)

    def evidence(self, prompt):
        if prompt.token_ids is None or not self.vocab:
            return {}
        b, h, n, _ = prompt.v.shape
        if int(prompt.token_ids.max()) >= len(self.vocab):
            raise ValueError(f"vocab: holds {len(self.vocab)} token texts, but the prompt has token id "
                             f"{int(prompt.token_ids.max())}; pass token_texts(tokenizer) of the model's tokenizer")
        rows = [title_links([self.vocab[i] for i in row.tolist()], self.max_title) for row in prompt.token_ids]
        links = torch.tensor(rows, device=prompt.v.device)                  # (B, N)
        return {"title_links": links[:, None, :].expand(b, h, n).contiguous()}

    def layer_pooling(self):
        return {"title_links": 1}   # text alone: every layer's would be the same

    def ranks_by_scores(self, question, token_ids):
        return not (token_ids and self.vocab)

    def parts(self, scores, k, context):
        return sinks_recent_and(self, k, scores, "linked", context.get("title_links"), context.get("question_mask"))


# ----------------------------------------------------------------------------------------------------
# 5. Choosing: EvictionConfig and select_kept

POLICY_TYPES = {cls.name: cls for cls in (Dense, StreamingLLM, H2O, SnapKV, CAB, QuestionAware, Bidirectional,
                                          Delayed, DynamicLocal, HybridSemantic, MatchSpan, SentenceMatch, FactSlots,
                                          TitleLinks)}


class PolicyNames(Sequence):
    """POLICY_TYPES' names, read-only and always current (a `from cab_reference import POLICIES` sees the
    policies registered later too); equal to the tuple of them."""

    def __getitem__(self, index):
        return tuple(POLICY_TYPES)[index]

    def __len__(self):
        return len(POLICY_TYPES)

    def __eq__(self, other):
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, PolicyNames)) else NotImplemented

    def __repr__(self):
        return repr(tuple(self))


POLICIES = PolicyNames()           # "none", "streaming", "h2o", "snapkv", "cab", ...


def register_policy(cls):
    """Add a Policy subclass to POLICY_TYPES (and so to POLICIES); usable as a class decorator. A name
    already taken (a built-in's too) is a ValueError: nothing is replaced silently."""
    if not (isinstance(cls, type) and issubclass(cls, Policy) and cls.name):
        raise TypeError(f"register_policy: expected a Policy subclass with a name, got {cls!r}")
    if cls.name in POLICY_TYPES:
        raise ValueError(f"register_policy: the name {cls.name!r} is taken by {POLICY_TYPES[cls.name].__name__}")
    POLICY_TYPES[cls.name] = cls
    return cls


def make_policy(name: str, **knobs) -> Policy:
    """The policy called `name`, with its knobs (its dataclass fields) set from keyword arguments."""
    if name not in POLICY_TYPES:
        raise ValueError(f"policy: unknown policy {name!r}; known policies: {', '.join(POLICY_TYPES)}")
    known = [f.name for f in dataclasses.fields(POLICY_TYPES[name])]
    if unknown := sorted(set(knobs) - set(known)):
        raise TypeError(f"policy {name!r} has no knob {', '.join(unknown)}; its knobs: {', '.join(known) or 'none'}")
    return POLICY_TYPES[name](**knobs)


@dataclass
class EvictionConfig:
    """What to keep: a policy and a budget, shared by the reference and the fast twin.

    policy    a name from POLICIES (default knobs) or a policy object, e.g. SnapKV(window=32); after
              construction always the object. The default, "match_span", keeps the passage sharing the
              question's words given CabCache(question_span=...), and is H2O with one sink without one.
    sparsity  fraction of tokens dropped: K = max(1, floor((1 - sparsity) * N)) in exact decimal arithmetic
              (0.9 of 50 tokens keeps 5). N is the padded prompt length: in a left-padded batch every row
              keeps K, so a padded row drops less of its own tokens.
    budget    tokens kept per layer and KV head; overrides sparsity when set.
    per_head  one decision per KV head; False sums the heads' scores (one per layer, as the original CAB).
    """
    policy: str | Policy = "match_span"
    sparsity: float = knob(0.9, Rule("a value in [0, 1)", lambda x: is_number(x, 0, 1, open_high=True)))
    budget: int | None = knob(None, Rule("None or an integer >= 1", lambda x: x is None or at_least(1).ok(x)))
    per_head: bool = knob(True, Rule("True or False", lambda x: isinstance(x, bool)))

    def __post_init__(self):
        if isinstance(self.policy, str):
            self.policy = make_policy(self.policy)
        elif not isinstance(self.policy, Policy):
            raise TypeError(f"policy: expected a name from {', '.join(POLICIES)} or a Policy object, "
                            f"got {type(self.policy).__name__}")
        check_fields(self)

    def budget_for(self, n: int) -> int:
        """K, the number of tokens kept out of n: everything when n <= budget (or the Dense policy)."""
        return n if isinstance(self.policy, Dense) else min(self.cache_budget(n), n)

    def cache_budget(self, n: int):
        """The size a cache holds to after a prompt of n tokens: the budget itself, not min(budget, n), so a
        short prompt leaves room to grow into; math.inf for Dense (never evicts)."""
        if isinstance(self.policy, Dense):
            return math.inf
        if self.budget is not None:
            return self.budget
        return max(1, math.floor((1 - Fraction(str(self.sparsity))) * n))   # exact: 0.1 * 50 is 5, not 4.99..


def select_kept(scores, config: EvictionConfig, *, head_group=None, **context):
    """The tokens to keep: int64 indices [B, Hkv, K] sorted ascending, K = config.budget_for(N).

    scores [B, Hkv, N]: accumulated attention per key. context (each optional unless the policy needs it):
    key_mask [B, N] bool (False = padding, kept only when real tokens run out), question_mask [B, N] bool,
    and the evidence [B, Hkv, N] the policy's evidence() returns. head_group: see head_sum."""
    return select_parts(scores, config, head_group=head_group, **context).kept


def select_parts(scores, config: EvictionConfig, *, head_group=None, **context) -> Selection:
    """select_kept, with the why: which part kept each token and the full keep order (for diagnose)."""
    scores = _check_scores(scores)
    context = _check_context(context, scores)
    return choose(scores, config.budget_for(scores.shape[-1]), config.policy, config.per_head, context, head_group)


def choose(scores, k, policy: Policy, per_head: bool, context, head_group=None) -> Selection:
    """The selection itself, on checked inputs (the eviction loop and the fast twin call this directly)."""
    b, h, n = scores.shape
    if not per_head:               # one decision per layer: sum heads (the original CAB code's choice)
        scores, context = _merge_heads(scores, context, head_group)
    valid = context.get("key_mask")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand(scores.shape)
    if k == n:                     # everything fits: keep all, no ranking needed
        selection = fill_parts([Part("all", n, recency(scores))], valid)
    else:
        selection = policy.select(scores, k, context, valid)
    if not per_head:
        selection = selection._replace(**{f: getattr(selection, f).expand(b, h, -1) for f in ("kept", "part", "order")})
    return selection


def _merge_heads(scores, context, head_group=None):
    """Sum the scores over heads, average every other per-head tensor (a mask: a token counts if any head
    has it). Under tensor parallelism the per-rank sums travel in one all-reduce of [B, 1 + E, N]."""
    floats = [name for name, v in context.items() if v.dtype != torch.bool]
    sums = [scores.sum(1, keepdim=True)] + [context[name].float().sum(1, keepdim=True) for name in floats]
    if head_group is not None:     # one collective: stacked in the widest dtype, then split back
        total = head_sum(torch.cat(sums, dim=1), head_group)                 # (B, 1 + E, N)
        sums = [t.to(s.dtype) for t, s in zip(total.split(1, dim=1), sums)]
    heads = scores.shape[1] * head_group_size(head_group)
    merged = {name: v.any(1, keepdim=True) for name, v in context.items() if v.dtype == torch.bool}
    merged.update({name: summed / heads for name, summed in zip(floats, sums[1:])})
    return sums[0], merged


def _check_scores(scores):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise ValueError(f"scores: expected a tensor [B, Hkv, N], got {getattr(scores, 'shape', type(scores))}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating dtype, got {scores.dtype}")
    if scores.shape[-1] == 0 or torch.isnan(scores).any():
        raise ValueError(f"scores: expected at least one token (N >= 1) and no NaN, got {tuple(scores.shape)}")
    return scores


def _check_context(context, scores):
    """Masks (key_mask, question_mask) become [B, 1|Hkv, N] bool; evidence must be [B, Hkv, N]; None is dropped."""
    b, h, n = scores.shape
    checked = {}
    for name, value in ((name, value) for name, value in context.items() if value is not None):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(value).__name__}")
        if name in ("key_mask", "question_mask"):
            if value.dtype != torch.bool or tuple(value.shape) not in ((b, n), (b, h, n)):
                raise ValueError(f"{name}: expected bool [B, N] = [{b}, {n}] or [B, Hkv, N], "
                                 f"got {value.dtype} {tuple(value.shape)}")
            value = value if value.dim() == 3 else value[:, None, :]          # (B, 1|Hkv, N)
        elif tuple(value.shape) != (b, h, n):
            raise ValueError(f"{name}: expected shape [B, Hkv, N] = [{b}, {h}, {n}], got {tuple(value.shape)}")
        checked[name] = value.to(scores.device)
    return checked


def prompt_evidence(q, k, v, config: EvictionConfig, *, scale=None, key_mask=None, question_mask=None,
                    attention_fn: AttentionFn = attention, head_group=None, token_ids=None):
    """The evidence config.policy ranks by, as keyword arguments for select_kept."""
    policy = config.policy
    if policy.needs_question and question_mask is None:
        raise ValueError(f"question_span: policy {policy.name!r} needs the question's token positions")
    return policy.evidence(Prompt(q, k, v, scale, key_mask, question_mask, attention_fn, head_group, token_ids))


def question_mask_from_spans(spans, batch: int, n: int, device=None):
    """question_span=(start, end) (end exclusive, token positions of the padded prompt) for every row, or one
    span per row, as a bool mask [B, N]; a span outside the prompt is a ValueError."""
    if spans is None:
        return None
    per_row = [spans] * batch if isinstance(spans[0], int) else list(spans)
    if len(per_row) != batch:
        raise ValueError(f"question_span: expected one (start, end) or {batch} of them, got {len(per_row)}")
    mask = torch.zeros(batch, n, dtype=torch.bool, device=device)
    for row, (start, end) in enumerate(per_row):
        if not 0 <= start < end <= n:
            raise ValueError(f"question_span: ({start}, {end}) is outside the prompt of {n} tokens "
                             f"(expected 0 <= start < end <= {n})")
        mask[row, start:end] = True
    return mask


# ----------------------------------------------------------------------------------------------------
# 6. The eviction loop, as plain PyTorch state
#
# Per layer and forward:  append the new keys/values  ->  attend (out + scores)  ->  accumulate the scores
# ->  on the prompt, gather the policy's evidence  ->  evict back to the budget. LayerState holds one
# layer's slots; EvictionLoop the layers and what they share (config, question, evidence pooled across
# layers). EvictionLoop.forward_layer is the whole loop for one layer; the transformers adapter (section 7)
# splits it between the cache's update() and the attention call.

class LayerState:
    """One layer's evicting cache. Per slot, aligned with keys/values [B, Hkv, L, D]: scores (accumulated
    attention), positions (original token positions), valid (False for left padding) and the policy's
    evidence, [B, Hkv, L] each. `seen` counts every token ever added."""

    def __init__(self, loop: EvictionLoop):
        self.loop = loop
        self.keys = self.values = None
        self.scores = self.positions = self.valid = None
        self.evidence = {}
        self.seen = 0
        self.budget = None                 # fixed from the prompt length at the first attention
        self.prompt_record = None          # record=True: the prompt's selection, for tools (diagnose.py)

    def append(self, k, v, valid=None):
        """Add Nq new tokens (k, v [B, Hkv, Nq, D]; valid [B, Nq] bool or None = all real)."""
        b, h, n = k.shape[:3]
        valid = torch.ones(b, n, dtype=torch.bool, device=k.device) if valid is None else valid
        new_pos = torch.arange(self.seen, self.seen + n, device=k.device).expand(b, h, n)
        new_valid = valid[:, None, :].expand(b, h, n)
        if self.keys is None:
            self.keys, self.values = k, v
            self.scores = k.new_zeros(b, h, n, dtype=torch.float32)
            self.positions, self.valid = new_pos, new_valid.contiguous()
        else:
            self.keys, self.values = torch.cat([self.keys, k], dim=-2), torch.cat([self.values, v], dim=-2)
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, n)], dim=-1)
            self.positions = torch.cat([self.positions, new_pos], dim=-1)
            self.valid = torch.cat([self.valid, new_valid], dim=-1)
        for name, value in self.evidence.items():
            fill = value.new_full((b, h, n), self.loop.config.policy.fill_value(name))
            self.evidence[name] = torch.cat([value, fill], dim=-1)
        self.seen += n
        return self.keys, self.values

    def key_mask(self):
        """[B, L]: real tokens. Padding is ranked alike in every head (see best_first), so the heads agree."""
        return self.valid[:, 0]

    def after_attention(self, q, scores, *, scale=None, attention_fn: AttentionFn = attention):
        """Accumulate this call's scores (None: not computed, see EvictionLoop.reads_scores); on the first
        call gather the prompt's evidence; evict to the budget."""
        loop, policy = self.loop, self.loop.config.policy
        if scores is not None:
            self.scores = self.scores + scores
        is_prompt = self.budget is None
        if is_prompt:
            self.budget = loop.config.cache_budget(self.keys.shape[2])
            self.evidence.update(loop.prompt_evidence(self, q, scale, attention_fn))
            if not policy.cuts_prompt:
                return
        else:
            policy.after_prompt(self.evidence, scores)
        if self.keys.shape[-2] - self.budget >= (1 if is_prompt else loop.evict_every):
            first_cut = is_prompt or (not policy.cuts_prompt and self.prompt_record is None)
            self.evict(record=loop.record and first_cut)

    def evict(self, record=False):
        """Keep the policy's choice of `budget` slots: a gather on the slot axis of every per-slot tensor."""
        config = self.loop.config
        self.keep(choose(self.scores, self.budget, config.policy, config.per_head, self.context(),
                         self.loop.head_group), record)

    def context(self):
        """What the policy ranks by besides the scores: the evidence and the key mask, [B, Hkv, L] each."""
        return dict(self.evidence, key_mask=self.valid)

    def keep(self, selection, record=False):
        """Apply a Selection of this layer's slots (record: and keep it as the prompt's, for tools)."""
        if record:
            self.prompt_record = {"selection": selection, "scores": self.scores, "positions": self.positions,
                                  "valid": self.valid, "evidence": dict(self.evidence)}
        self.gather(selection.kept)

    def gather(self, kept):
        """Keep slots `kept` [B, Hkv, K] of every per-slot tensor, in that order."""
        slots = kept[..., None].expand(-1, -1, -1, self.keys.shape[-1])      # (B, Hkv, K, D)
        self.keys, self.values = self.keys.gather(2, slots), self.values.gather(2, slots)
        self.scores, self.positions, self.valid = (t.gather(2, kept) for t in (self.scores, self.positions,
                                                                               self.valid))
        self.evidence = {name: t.gather(2, kept) for name, t in self.evidence.items()}

    def index_batch(self, index):
        """Reorder / select batch rows (beam search, batch expansion)."""
        if self.keys is None:
            return
        self.keys, self.values = self.keys[index], self.values[index]
        self.scores, self.positions, self.valid = self.scores[index], self.positions[index], self.valid[index]
        self.evidence = {name: t[index] for name, t in self.evidence.items()}


class EvictionLoop:
    """Every layer's LayerState plus what the layers share: the config, the question, evidence pooled across
    layers, and a checkpoint so a forward that raises leaves the cache as it was.

    question_span=(start, end) (or one per batch row) in token positions of the (left-padded) prompt, for
    the question-based policies. The prompt is cut right after its attention (Delayed: a step later); each
    later forward evicts back to the budget once the cache holds evict_every tokens more than it.
    head_group: the process group sharing each layer's KV heads under tensor parallelism (head_sum; the
    adapter finds it). token_ids [B, N] or [N] int64: the prompt's token ids (SentenceMatch, FactSlots)."""

    layer_type = LayerState        # the class of self.layers (CabCache's and the fast twin's differ)

    def __init__(self, config: EvictionConfig | None = None, *, question_span=None, evict_every: int = 1,
                 record: bool = False, head_group=None, token_ids=None):
        self.config = EvictionConfig() if config is None else config
        if not isinstance(self.config, EvictionConfig):
            raise TypeError(f"config: expected an EvictionConfig, got {type(self.config).__name__}")
        check("evict_every", evict_every, at_least(1))
        if head_group is not None and not (torch.distributed.is_available()
                                           and isinstance(head_group, torch.distributed.ProcessGroup)):
            raise TypeError(f"head_group: expected a torch.distributed.ProcessGroup or None, "
                            f"got {type(head_group).__name__}")
        if token_ids is not None and (not isinstance(token_ids, torch.Tensor) or token_ids.dtype != torch.int64
                                      or token_ids.dim() not in (1, 2)):
            raise ValueError(f"token_ids: expected an int64 tensor [B, N] or [N], got {token_ids!r:.80}")
        check("question_span", question_span, SPANS)    # its bounds: when the prompt arrives
        self.question_span, self.token_ids, self.evict_every = question_span, token_ids, evict_every
        self.record, self.head_group = record, head_group
        self.layers = []
        self._pooled = {}          # evidence name -> (sum over the layers so far, count)
        self._checkpoint = ([], {})

    def layer(self, index: int) -> LayerState:
        while len(self.layers) <= index:
            self.layers.append(self.layer_type(self))
        return self.layers[index]

    def begin_forward(self):
        """Remember every layer's state (a forward starts), so a failing step can be undone."""
        self._checkpoint = ([(layer, dict(vars(layer), evidence=dict(layer.evidence))) for layer in self.layers],
                            dict(self._pooled))

    def rollback(self):
        """Undo the current forward in every layer: layer state is only ever replaced, never written in
        place, so the references kept at the forward's start are the old state."""
        layers, pooled = self._checkpoint
        self.layers[:] = [layer for layer, _ in layers]
        for layer, state in layers:
            layer.__dict__.clear()
            layer.__dict__.update(state)
        self._pooled = dict(pooled)

    def forward_layer(self, index, q, k, v, *, scale=None, valid=None, attention_fn: AttentionFn = attention):
        """The loop for one layer and one forward: append, attend, accumulate, evict. Returns out."""
        if index == 0:
            self.begin_forward()
        layer = self.layer(index)
        try:
            keys, values = layer.append(k, v, valid)
            out, scores = attention_fn(q, keys, values, scale=scale, causal=True, key_mask=layer.key_mask())
            layer.after_attention(q, scores, scale=scale, attention_fn=attention_fn)
        except BaseException:      # an interrupt too: KeyboardInterrupt is no Exception
            self.rollback()
            raise
        return out

    def prompt_evidence(self, layer, q, scale, attention_fn):
        """The policy's evidence for this layer's prompt, with the question mask and layer pooling."""
        keys, values = layer.keys, layer.values
        b, h, n = keys.shape[:3]
        question_mask = question_mask_from_spans(self.question_span, b, n, keys.device)
        token_ids = self.token_ids
        if token_ids is not None:
            token_ids = (token_ids.expand(b, -1) if token_ids.dim() == 1 else token_ids).to(keys.device)
            if tuple(token_ids.shape) != (b, n):
                raise ValueError(f"token_ids: expected [B, N] = [{b}, {n}] (the prompt), got {tuple(token_ids.shape)}")
        pooling = self.config.policy.layer_pooling()
        if pooling and all(self._pooled.get(name, (0, 0))[1] >= layers for name, layers in pooling.items()):
            evidence = {name: total / count for name, (total, count) in self._pooled.items()}   # nothing to compute
        else:
            evidence = prompt_evidence(q, keys, values, self.config, scale=scale, key_mask=layer.key_mask(),
                                       question_mask=question_mask, attention_fn=attention_fn,
                                       head_group=self.head_group, token_ids=token_ids)
            for name, layers in pooling.items():
                if name in evidence:
                    evidence[name] = self.pooled(name, evidence[name], layers)
        if question_mask is not None:
            evidence["question_mask"] = question_mask[:, None, :].expand(b, h, n)
        return evidence

    def pooled(self, name, value, layers):
        """The mean of `name` over the first `layers` layers that offered it, in the order the layers
        cut their prompts (layer l cuts right after its own attention, so it can only use layers 0..l)."""
        total, count = self._pooled.get(name, (0, 0))
        if count < layers:
            total, count = total + value, count + 1
            self._pooled[name] = (total, count)
        return total / count

    def kept_positions(self):
        """Per layer, the original positions of the cached tokens: [B, Hkv, L] int64."""
        return [layer.positions for layer in self.layers]

    @property
    def reads_scores(self) -> bool:
        """Whether this cache's policy ranks by accumulated scores; when not, an attention function may
        skip computing them (the fast twin's hook) and the layers' scores stay 0."""
        return self.config.policy.ranks_by_scores(self.question_span is not None, self.token_ids is not None)


def _is_span(x):
    return isinstance(x, (tuple, list)) and len(x) == 2 and all(is_number(i, integer=True) for i in x)


SPANS = Rule("(start, end) token positions as two ints, or one such pair per batch row",
             lambda x: x is None or _is_span(x) or (isinstance(x, (tuple, list)) and x and all(map(_is_span, x))))

# ----------------------------------------------------------------------------------------------------
# 7. Tensor parallelism and the transformers adapter
#
# transformers' tp_plan="auto" splits every layer's KV heads over the ranks of a process group, the *head
# group*. Per-head decisions need nothing from the other ranks; only what pools over all of a layer's heads
# travels: the per-layer selection (_merge_heads) and the word-identity cosines (same_word). Budgets,
# question spans and masks depend only on the prompt. head_group None = one process: nothing travels.

def head_sum(x, head_group):
    """x, a sum over this rank's KV heads, summed over every rank of head_group (x itself for None).
    An all-reduce leaves the same bits on every rank, so all ranks then make the same choice."""
    if head_group is None:
        return x
    x = x.clone(memory_format=torch.contiguous_format)                      # all_reduce writes in place
    torch.distributed.all_reduce(x, group=head_group)
    return x


def head_group_size(head_group):
    """Ranks sharing a layer's KV heads: transformers shards heads evenly, so global heads = local * this."""
    return 1 if head_group is None else torch.distributed.get_world_size(head_group)


def find_head_group(module, query, key, head_group=None):
    """The head group of this attention call: None when this rank holds all of the layer's KV heads, else
    head_group as given or the tensor-parallel group of the module's sharded (DTensor) weights."""
    config = getattr(module, "config", None)
    total = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    local = key.shape[1]
    if total is None or local == total:
        query_heads = getattr(config, "num_attention_heads", None)
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and query_heads is not None and query.shape[1] != query_heads:
            raise ValueError(f"head_group: this rank holds all {local} KV heads but {query.shape[1]} of the "
                             f"{query_heads} query heads (more ranks than KV heads?): each key's score would "
                             f"miss the other ranks' query heads; use at most {local} tensor-parallel ranks")
        return head_group
    if head_group is None:
        meshes = [p.device_mesh for p in module.parameters() if hasattr(p, "device_mesh")]
        if not meshes:
            raise ValueError(f"head_group: this rank holds {local} of the layer's {total} KV heads but the "
                             f"attention module has no sharded weights to find their process group from; "
                             f"pass CabCache(head_group=...)")
        head_group = meshes[0].get_group("tp") if meshes[0].ndim > 1 else meshes[0].get_group()
    if local * head_group_size(head_group) != total:
        raise ValueError(f"head_group: this rank holds {local} of the layer's {total} KV heads, so "
                         f"{total // local} ranks should share them; the group has {head_group_size(head_group)}")
    return head_group


# The model calls cache.update(k, v, layer), then the attention function with exactly the keys update
# returned. Everything else (RoPE, masks for the new tokens, generate's positions) stays the library's.
# The adapter's imports open this part, where a reader sees them (pyproject.toml lets E402 pass).
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

# transformers passes the attention function neither the cache nor its layer, so update() leaves its layer
# here (marked awaits_attention) for the attention call that follows, which must get the very keys update()
# returned. (cab_fast sets it too.)
_last_updated_layer = None


class CabLayer(LayerState, DynamicLayer):
    """LayerState as a transformers cache layer: update() appends; the sizes report tokens *seen*."""

    is_croppable = False       # eviction cannot be undone, so assisted decoding's crop is refused

    def __init__(self, loop):
        DynamicLayer.__init__(self)
        LayerState.__init__(self, loop)
        self.awaits_attention = False      # updated, and its attention call not made yet

    def update(self, key_states, value_states, *args, **kwargs):
        global _last_updated_layer
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.keys = self.values = None
        _last_updated_layer, self.awaits_attention = self, True
        return self.append(key_states, value_states)

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(stored + q, seen - stored): the mask covers the stored slots plus the new tokens, whose
        true positions start at `seen` (5.17 passes cache_position, 5.24 the query length)."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        stored = 0 if self.keys is None else self.keys.shape[-2]
        return stored + q, self.seen - stored

    def reorder_cache(self, beam_idx):
        self.index_batch(beam_idx.to(self.keys.device) if self.keys is not None else beam_idx)

    def batch_select_indices(self, indices):
        self.index_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.keys is not None:
            self.index_batch(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("CabCache: evicted tokens cannot be cropped back (assisted decoding)")


class CabCache(EvictionLoop, Cache):
    """A transformers Cache that evicts to config's budget, per layer and KV head.

        model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="cab_reference")
        model.generate(input_ids, cache=CabCache(EvictionConfig(policy="h2o", sparsity=0.9)))

    (`cache=` from transformers 5.24, `past_key_values=` before.) Arguments as EvictionLoop's; question_span
    (see find_question_span) is in positions of the padded input_ids: add each row's left padding to a span
    found in its own text. record=True keeps each layer's prompt selection (layer.prompt_record).
    A forward that raises leaves the cache as before it: undone at once when raised in the cache's own
    calls, at the cache's next use when raised between two layers. What raises after the last layer's
    attention (the LM head) finds the step cached, as in transformers' own caches."""

    layer_type = CabLayer

    def __init__(self, config: EvictionConfig | None = None, *, question_span=None, evict_every: int = 1,
                 record: bool = False, head_group=None, token_ids=None):
        Cache.__init__(self, layers=[])
        EvictionLoop.__init__(self, config, question_span=question_span, evict_every=evict_every, record=record,
                              head_group=head_group, token_ids=token_ids)
        self.n_layers = None       # the model's layer count (its config's), from its first attention call

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self.settle()
            self.begin_forward()
        try:
            return self.layer(layer_idx).update(key_states, value_states)
        except BaseException:
            self.rollback()
            raise

    def settle(self):
        """Undo a forward that stopped between two layers (they do not all hold its tokens) before the
        cache is used again."""
        seen = {layer.seen for layer in self.layers}
        if len(seen) > 1 or (seen and len(self.layers) < (self.n_layers or 0)):
            self.rollback()

    def get_seq_length(self, layer_idx: int = 0) -> int:
        self.settle()
        return super().get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length, layer_idx: int) -> tuple[int, int]:
        self.settle()
        return super().get_mask_sizes(query_length, layer_idx)

    def kept_positions(self):
        self.settle()
        return super().kept_positions()


def _as_bool_mask(attention_mask):
    """The library's mask as bool [B, 1, Nq, Nk] (True = attend), whether boolean or additive (cab_fast too)."""
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


def make_attention_interface(attention_fn: AttentionFn, *, validate: bool = False):
    """Wrap attention(q, k, v, ...) -> (out, scores) into transformers' attention-interface signature.
    validate=True: a NaN/inf input raises (and the cache rolls back) instead of spreading NaN."""

    def cab_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and module.training:
            raise ValueError(f"dropout: cab attention has no dropout, got {dropout} in training mode")
        nq, nk = query.shape[2], key.shape[2]
        mask = None if attention_mask is None else _as_bool_mask(attention_mask)
        layer = _last_updated_layer if getattr(_last_updated_layer, "awaits_attention", False) else None
        try:
            if layer is None:          # no CabCache (or its call was made): keys line up with the library's mask
                key_mask = None if mask is None else mask[:, 0, -1, :]
            else:
                layer.awaits_attention = False
                if layer.keys is not key:
                    index = next(i for i, other in enumerate(layer.loop.layers) if other is layer)
                    raise RuntimeError(f"CabCache: layer {index} was updated (cache.update) but its attention call "
                                       f"got other keys than update() returned (the model changed them in between: "
                                       f"a copy, a cast, a repeat?); the cache can neither count their scores nor "
                                       f"evict")
                if mask is not None:   # slots were evicted: the layer knows which hold real tokens; the
                    layer.valid[..., -nq:] = mask[:, 0, -1, -nq:][:, None, :]   # newest are this call's in both
                key_mask = layer.key_mask()
                layer.loop.n_layers = getattr(getattr(module, "config", None), "num_hidden_layers", None)
                if layer.budget is None:                         # the prompt: whose heads are these?
                    layer.loop.head_group = find_head_group(module, query, key, layer.loop.head_group)
            if mask is not None and (layer is None or layer.budget is None):
                _check_library_mask(mask, key_mask, nq, nk)
            out, scores = attention_fn(query, key, value, scale=scaling, causal=True, key_mask=key_mask,
                                       validate=validate)
            if layer is not None:
                layer.after_attention(query, scores, scale=scaling, attention_fn=attention_fn)
        except BaseException:      # an interrupt too
            if layer is not None:  # a bad input mid-generation: leave the cache as it was before this step
                layer.loop.rollback()
            raise
        return out.transpose(1, 2).contiguous(), None                          # (B, Nq, Hq, D)

    return cab_attention_forward


def _check_library_mask(mask, key_mask, nq, nk):
    """Our masks (bottom-right causal + padding) must reproduce the library's for every real query;
    a model with another mask (a sliding window, say) would otherwise get silently wrong outputs."""
    expected = visibility(nq, nk, causal=True, key_mask=key_mask, device=mask.device)[:, 0, 0]  # (B, Nq, Nk)
    real_query = key_mask[:, nk - nq:]                                        # (B, Nq)
    if not bool(((mask[:, 0] == expected) | ~real_query[..., None]).all()):
        raise ValueError("attention_mask: the model's mask is not causal + padding (a sliding window?); "
                         "cab attention supports plain causal decoder masks only")


# attn_implementation="cab_reference", with SDPA's bool mask (left-padded batches need one). The reference
# checks every input for NaN/inf (cheap on a CPU, and a bad step rolls back); the fast twin registers
# without the check, which would cost a device sync per layer and step.
AttentionInterface.register("cab_reference", make_attention_interface(attention, validate=True))
AttentionMaskInterface.register("cab_reference", sdpa_mask)


def token_span(offsets, char_start: int, char_end: int) -> tuple[int, int]:
    """(start, end) token positions (end exclusive) of the tokens overlapping characters
    [char_start, char_end), from a tokenizer's offset mapping [(char_start, char_end) per token]."""
    hits = [i for i, (s, e) in enumerate(offsets) if s < char_end and e > char_start and e > s]
    if not hits:
        raise ValueError(f"characters {char_start}..{char_end}: no token covers them")
    return hits[0], hits[-1] + 1


def find_question_span(tokenizer, prompt: str, question: str, *, add_special_tokens=False) -> tuple[int, int]:
    """question_span for CabCache: the token positions of the last occurrence of `question` in `prompt`
    (the text you tokenize, e.g. the chat template's output), from the tokenizer's offset mapping.
    Tokenize the prompt the same way for the model: add_special_tokens must match (a BOS token the
    model sees and this count does not would shift the span by one); in a left-padded batch add each
    row's padding (CabCache)."""
    start = prompt.rfind(question)
    if not question or start < 0:
        raise ValueError(f"question: {question[:60]!r} does not occur in the prompt")
    offsets = tokenizer(prompt, return_offsets_mapping=True, add_special_tokens=add_special_tokens)["offset_mapping"]
    return token_span(offsets, start, start + len(question))
