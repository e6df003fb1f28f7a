"""Attention-score-driven KV-cache eviction, written to be read top to bottom.

A long prompt fills the KV cache. Eviction keeps a *budget* of K tokens per layer (and per KV head)
and drops the rest, ranked by evidence gathered while the model runs: mostly the attention each key
received. This file is the project's source of truth; `cab_fast.py` computes the same things faster.

Reading order
  1. EvictionConfig          what to keep, validated in one place
  2. attention               softmax(QK^T)V plus the accumulated scores, grouped-query native
  3. prompt evidence         the extra signals some policies rank by (observation window, question)
  4. selection               one budgeted top-k routine shared by every policy
  5. the policies            none, streaming, h2o, cab, snapkv, the five proposed fixes, match_span
  6. transformers glue       the "cab_reference" attention implementation and CabCache

Shape letters (used in every shape comment)
  B    batch                 Hq   query heads        Hkv  key/value heads      G = Hq // Hkv
  Nq   queries in this call  Nk   keys (cached + new) N    tokens ranked by a policy
  D    head dim              K    budget: tokens kept per (batch row, KV head)

Papers
  StreamingLLM: Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks".
  H2O:          Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference".
  SnapKV:       Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation".
  CAB:          the research code this project re-implements (local + bridge + importance); see
                NOTES.md for where we differ from it and why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------
# 1. Configuration

POLICIES = (
    "none",             # keep everything: the dense baseline through the same code path
    "streaming",        # attention sinks + most recent tokens (StreamingLLM)
    "h2o",              # heavy hitters by accumulated score + recent tokens (H2O)
    "cab",              # local + importance + bridge tokens (CAB)
    "snapkv",           # pooled scores from the last prompt queries + that window (SnapKV)
    "question_aware",   # fix 1: accumulated score + alpha * similarity to the question
    "bidirectional",    # fix 2: rank by a non-causal pass over the prompt
    "delayed",          # fix 3: evict only after the first generated token has looked at the prompt
    "dynamic_local",    # fix 4: CAB with the local ratio chosen from the prompt's structure
    "hybrid_semantic",  # fix 5: recent tokens + the tokens most similar to the question
    "match_span",       # fix 6: sinks + recent + the neighbourhood of the passage sharing the question's words
)
BRIDGE_MODES = ("median", "connectivity", "curvature")


@dataclass
class EvictionConfig:
    policy: str = "cab"
    sparsity: float = 0.9          # fraction of tokens dropped; the budget is max(1, floor((1 - s) * N))
    budget: int | None = None      # tokens kept per layer and KV head; overrides sparsity when set
    # the three-part CAB split of the budget (must sum to 1)
    local_ratio: float = 0.3
    bridge_ratio: float = 0.2
    importance_ratio: float = 0.5
    bridge: str = "median"         # how CAB picks bridge tokens, one of BRIDGE_MODES
    per_head: bool = True          # one decision per KV head; False sums heads (the original CAB)
    sink: int = 4                  # streaming: first tokens always kept
    recent_ratio: float = 0.2      # two-part policies: share of the budget for the most recent tokens
    window: int = 16               # snapkv: observation window (last prompt queries)
    pool: int = 7                  # snapkv: max-pool width over neighbouring positions (odd)
    alpha: float = 1.0             # question_aware: weight of the question similarity
    qa_local_ratio: float = 0.9    # dynamic_local: local ratio used for a question-at-the-end prompt
    qa_tail: int = 32              # dynamic_local: "at the end" = the question ends this close to the end
    evict_every: int = 1           # decode: cut back to the budget once every this many new tokens; 1 keeps
                                   #   the cache at the budget, more trades evict_every - 1 slots for fewer cuts
    # match_span (question_match evidence): which words the passage shares with the question, then a
    # neighbourhood around the best-matching stretch (the answer sits next to the words that match)
    match_threshold: float = 0.5   # cos(v_j, v_i) above which key j counts as "the same word" as question token i
    match_window: int = 9          # odd width of the moving average that turns word matches into a stretch score
    span_radius: int = 9           # keep this many tokens either side of a well-matching stretch
    match_layers: int = 1          # question_match averaged over the first match_layers layers, then reused
    span_sinks: int = 1            # match_span's attention sinks (1: at 10% of a short prompt every slot counts)

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy: unknown policy {self.policy!r}; known policies: {', '.join(POLICIES)}")
        if self.bridge not in BRIDGE_MODES:
            raise ValueError(f"bridge: unknown mode {self.bridge!r}; known modes: {', '.join(BRIDGE_MODES)}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity: expected a value in [0, 1), got {self.sparsity}")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)
                                        or self.budget < 1):
            raise ValueError(f"budget: expected an integer >= 1 or None, got {self.budget!r}")
        ratios = {"local_ratio": self.local_ratio, "bridge_ratio": self.bridge_ratio,
                  "importance_ratio": self.importance_ratio, "recent_ratio": self.recent_ratio,
                  "qa_local_ratio": self.qa_local_ratio}
        for name, value in ratios.items():      # 1e-6 slack: 1 - 0.7 - 0.3 is -5.6e-17 in floating point
            if not -1e-6 <= value <= 1.0 + 1e-6:
                raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
        total = self.local_ratio + self.bridge_ratio + self.importance_ratio
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"local_ratio + bridge_ratio + importance_ratio must sum to 1 (within 1e-6), "
                             f"got {self.local_ratio} + {self.bridge_ratio} + {self.importance_ratio} = {total}")
        for name in ("sink", "window", "pool", "qa_tail", "match_window", "match_layers",
                     "span_sinks", "evict_every"):
            value = getattr(self, name)
            least = 0 if name in ("sink", "span_sinks") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}: expected an integer >= {least}, got {value!r}")
        if self.pool % 2 == 0:
            raise ValueError(f"pool: expected an odd width so pooling stays centred, got {self.pool}")
        if not math.isfinite(self.alpha):
            raise ValueError(f"alpha: expected a finite number, got {self.alpha}")
        if self.match_window % 2 == 0:
            raise ValueError(f"match_window: expected an odd width so pooling stays centred, got {self.match_window}")
        if isinstance(self.span_radius, bool) or not isinstance(self.span_radius, int) or self.span_radius < 0:
            raise ValueError(f"span_radius: expected an integer >= 0, got {self.span_radius!r}")
        if not -1.0 <= self.match_threshold < 1.0:   # 1.0 would divide by zero in question_match
            raise ValueError(f"match_threshold: expected a value in [-1, 1), got {self.match_threshold}")

    def budget_for(self, n: int) -> int:
        """K, the number of tokens kept out of n: everything when n <= budget (or policy none)."""
        if self.policy == "none":
            return n
        keep = self.budget if self.budget is not None else max(1, math.floor((1.0 - self.sparsity) * n))
        return min(keep, n)


# ----------------------------------------------------------------------------------------------------
# 2. Attention with accumulated scores

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_attention_inputs(q, k, v, key_mask, scale, validate, dtypes=FLOAT_DTYPES):
    """The checks every attention implementation shares (cab_fast adds its kernels' own)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}: expected one of {', '.join(map(str, dtypes))}, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v: expected equal shapes, got {tuple(k.shape)} and {tuple(v.shape)}")
    (b, hq, nq, d), (bk, hkv, nk, dk) = q.shape, k.shape
    if b != bk or d != dk:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: batch and head dim must match")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q has {hq} heads, k has {hkv}: query heads must be a multiple of KV heads")
    if nq > nk:
        raise ValueError(f"q has {nq} queries but k only {nk} keys: expected Nq <= Nk")
    if len({q.device, k.device, v.device}) != 1:
        raise ValueError(f"q, k, v: expected one device, got {q.device}, {k.device}, {v.device}")
    if key_mask is not None:
        if not isinstance(key_mask, torch.Tensor) or key_mask.dtype != torch.bool \
                or tuple(key_mask.shape) != (b, nk):
            raise ValueError(f"key_mask: expected bool [B, Nk] = [{b}, {nk}], got "
                             f"{getattr(key_mask, 'dtype', type(key_mask).__name__)} "
                             f"{tuple(getattr(key_mask, 'shape', ()))}")
        if key_mask.device != k.device:
            raise ValueError(f"key_mask: expected device {k.device}, got {key_mask.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"scale: expected a finite number or None, got {scale!r}")
    if validate:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not torch.isfinite(t).all():
                raise ValueError(f"{name}: contains NaN or inf (validate=True); attention needs finite inputs")


def visibility(nq: int, nk: int, *, causal: bool, key_mask=None, device=None):
    """Which keys each query may attend to, True = visible.

    Causal masks are bottom-right aligned: the queries are the *last* Nq of Nk tokens, so query i sits at
    position i + Nk - Nq and sees keys 0 .. i + Nk - Nq. key_mask [B, Nk] removes padding keys.
    """
    q_pos = torch.arange(nq, device=device)[:, None] + (nk - nq)              # (Nq, 1)
    k_pos = torch.arange(nk, device=device)[None, :]                          # (1, Nk)
    visible = (k_pos <= q_pos) if causal else torch.ones(nq, nk, dtype=torch.bool, device=device)  # (Nq, Nk)
    visible = visible[None, None, None]                                       # (1, 1, 1, Nq, Nk)
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, None, :]                  # (B, 1, 1, Nq, Nk)
    return visible


def attention_probabilities(q, k, *, scale=None, causal=True, key_mask=None):
    """P[b, h, g, i, j] = softmax_j(q_i . k_j * scale) over the keys query i may see, in float32.

    Query head h * G + g uses KV head h: the group axis is split out instead of repeating K, which is
    what "grouped-query attention is native" means. The row max is subtracted before exp, so logits of
    any magnitude are safe; a row that sees no key at all becomes all zeros instead of 0/0 = NaN.
    """
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(acc).view(b, hkv, g, nq, d)                                     # (B, Hkv, G, Nq, D)
    logits = (qg @ k.to(acc)[:, :, None].mT) * scale                          # (B, Hkv, G, Nq, Nk)
    visible = visibility(nq, nk, causal=causal, key_mask=key_mask, device=q.device)
    logits = logits.masked_fill(~visible, -math.inf)                          # (B, Hkv, G, Nq, Nk)
    row_max = logits.amax(dim=-1, keepdim=True)                               # (B, Hkv, G, Nq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)              # empty rows: exp(-inf) = 0
    p = torch.exp(logits - row_max)                                           # (B, Hkv, G, Nq, Nk)
    row_sum = p.sum(dim=-1, keepdim=True)                                     # (B, Hkv, G, Nq, 1)
    return p / torch.where(row_sum > 0, row_sum, 1.0)                         # each visible row sums to 1


def attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=True):
    """Scaled dot-product attention that also returns how much attention every key received.

        out[b, h, i]  = sum_j P[b, h, i, j] v_j
        scores[b, kv, j] = sum over the G query heads h of group kv, sum over queries i of P[b, h, i, j]

    Every query row of P sums to 1 (or 0 if it sees no key) *before* the column sums, so a full causal
    prefill's scores add up to Nq * G per (batch row, KV head). The sum is not divided by the number of
    queries that could see key j: early keys are seen by more queries and collect more, which is H2O's
    choice too (kvpress's ObservedAttentionPress divides instead).

    q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D]; key_mask [B, Nk] bool (True = real token) or None.
    Returns out [B, Hq, Nq, D] in q's dtype and scores [B, Hkv, Nk] float32 (float64 for float64 inputs).
    validate=True rejects NaN/inf inputs with a ValueError (inputs must be finite); with validate=False
    they are not looked at: a -inf logit acts as a masked key, a +inf or NaN logit makes its row NaN.
    """
    _check_attention_inputs(q, k, v, key_mask, scale, validate)
    b, hq, nq, d = q.shape
    p = attention_probabilities(q, k, scale=scale, causal=causal, key_mask=key_mask)  # (B, Hkv, G, Nq, Nk)
    out = p @ v.to(p.dtype)[:, :, None]                                       # (B, Hkv, G, Nq, D)
    out = out.reshape(b, hq, nq, d).to(q.dtype)                               # (B, Hq, Nq, D)
    scores = p.sum(dim=(2, 3))                                                # (B, Hkv, Nk)
    return out, scores


# ----------------------------------------------------------------------------------------------------
# 3. Prompt evidence: what some policies rank by besides the accumulated scores
#
# Every function here returns one value per key [B, Hkv, N]. They are computed once over the prompt
# (CabCache does this right after the prefill's attention) and travel with the cached keys afterwards.

AttentionFn = Callable[..., tuple]


def window_scores(q, k, v, window, *, scale=None, key_mask=None, attention_fn: AttentionFn = attention):
    """SnapKV's evidence: column sums of the attention of the last `window` queries only.

    Because the causal mask is bottom-right aligned, attending with q[..., -window:, :] against all keys
    is exactly "the last window queries of the prompt".
    """
    return attention_fn(q[:, :, -window:], k, v, scale=scale, causal=True, key_mask=key_mask)[1]  # (B, Hkv, N)


def bidirectional_scores(q, k, v, *, scale=None, key_mask=None, attention_fn: AttentionFn = attention):
    """Fix 2's evidence: column sums of a *non-causal* pass, so early tokens are also judged by what
    later tokens (the question) make of them. Used only for ranking; the model's outputs stay causal."""
    return attention_fn(q, k, v, scale=scale, causal=False, key_mask=key_mask)[1]         # (B, Hkv, N)


def question_similarity(q, k, question_mask):
    """Cosine similarity of every key to the question: cos(k_j, mean of the question's queries).

    We compare the layer's own keys with the layer's own queries at the question positions, averaged
    over the query heads of each KV head's group. That is the geometry the model itself uses to match
    (q.k is its attention logit), unlike hidden states, which mix every head's subspace; cosine instead
    of softmax keeps the comparison free of the few keys that dominate a softmax row. RoPE is applied to
    both, so nearby positions are favoured slightly, as they are by the model.

    q [B, Hq, Nq, D] (the prompt's queries, Nq = N); k [B, Hkv, N, D]; question_mask [B, N] bool.
    Returns [B, Hkv, N] float32 in [-1, 1]; rows with no question tokens get 0.
    """
    b, hq, nq, d = q.shape
    hkv = k.shape[1]
    qm = question_mask[:, -nq:].to(torch.float32)                            # (B, Nq) question queries
    qg = q.float().view(b, hkv, hq // hkv, nq, d)                            # (B, Hkv, G, Nq, D)
    weights = qm[:, None, None, :, None]                                     # (B, 1, 1, Nq, 1)
    count = qm.sum(-1).clamp_min(1.0)[:, None, None]                         # (B, 1, 1)
    center = (qg * weights).sum(dim=(2, 3)) / (count * (hq // hkv))          # (B, Hkv, D)
    sim = F.cosine_similarity(k.float(), center[:, :, None, :], dim=-1, eps=1e-8)   # (B, Hkv, N)
    return sim * (qm.sum(-1) > 0)[:, None, None]                             # (B, Hkv, N)


def question_match(v, question_mask, threshold=0.5, key_mask=None):
    """Fix 6's evidence: how strongly key j shares a word with the question, rare words counting more.

    Values carry no RoPE, and in the first layers a value is mostly a function of the token itself, so
    cos(v_j, v_i) close to 1 means "token j is the same word as question token i" wherever they stand.
    With m[j, i] = relu((cos(v_j, v_i) - threshold) / (1 - threshold)) for question tokens i and keys j
    before the question,

        question_match[j] = sum over i of m[j, i] / (1 + sum over j' of m[j', i]),

    an inverse-document-frequency weighting: a question word found all over the context ("the", "of")
    adds little, one found in a single place adds up to 1. Cosines are averaged over the KV heads (word
    identity is not a per-head matter), so every head gets the same evidence, normalised to sum 1 over
    the keys. Keys from the question on get 0 (the question matches itself).

    v [B, Hkv, N, D]; question_mask [B, N] bool; key_mask [B, N] or None. Returns [B, Hkv, N] float32.
    """
    b, hkv, n, _ = v.shape
    cols = question_mask.any(dim=0).nonzero().squeeze(-1)                   # (Q,) question positions, any row
    vn = F.normalize(v.float(), dim=-1)                                      # (B, Hkv, N, D)
    cos = (vn @ vn[:, :, cols].mT).mean(dim=1)                               # (B, N, Q) key j x question token i
    m = ((cos - threshold) / (1.0 - threshold)).clamp_min(0.0)               # (B, N, Q)
    positions = torch.arange(n, device=v.device)
    first = torch.where(question_mask, positions, n).amin(dim=-1)            # (B,) question start
    before = positions[None, :] < first[:, None]                             # (B, N) candidate keys
    if key_mask is not None:
        before = before & key_mask
    m = m * before[:, :, None] * question_mask[:, None, cols]                # (B, N, Q) this row's question only
    idf = 1.0 / (1.0 + m.sum(dim=1, keepdim=True))                           # (B, 1, Q)
    match = (m * idf).sum(dim=-1)                                            # (B, N)
    match = match / match.sum(dim=-1, keepdim=True).clamp_min(1e-30)         # rows sum to 1 (or 0)
    return match[:, None, :].expand(b, hkv, n).contiguous()                  # (B, Hkv, N)


def attention_graph(q, k, *, scale=None, key_mask=None):
    """The prompt's causal attention as a token graph per KV head: W = mean over the group of P.

    Rows are queries, columns keys, for the last Nq of the N tokens (a prefill has Nq = N); rows of
    earlier tokens are zero. This materialises N x N per KV head, so only the graph-based bridge modes
    use it (NOTES.md: "which policies need more than scores").
    """
    p = attention_probabilities(q, k, scale=scale, causal=True, key_mask=key_mask)  # (B, Hkv, G, Nq, N)
    w = p.mean(dim=2)                                                        # (B, Hkv, Nq, N)
    return F.pad(w, (0, 0, k.shape[2] - q.shape[2], 0))                      # (B, Hkv, N, N)


def connectivity(graph, key_mask=None):
    """Bridge evidence "connectivity": how many distinct queries attend to key j above uniform.

        connectivity[j] = #{ i : W[i, j] > 1 / (number of keys query i sees) }

    A token many different queries find worth more than a uniform share links many parts of the text.
    (The original code used (sum_{i in I} A[i, j]) * (sum_{i in I} A[j, i]) over the important set I;
    NOTES.md says why we count instead.)
    """
    n = graph.shape[-1]
    visible = visibility(n, n, causal=True, key_mask=key_mask, device=graph.device)[:, 0, 0]  # (B|1, N, N)
    seen = visible.sum(-1, keepdim=True).clamp_min(1)[:, None]                # (B|1, 1, N, 1)
    return (graph > 1.0 / seen).sum(dim=-2).to(torch.float32)                # (B, Hkv, N)


def forman_curvature(graph, key_mask=None):
    """Bridge evidence "curvature": node Forman-Ricci curvature of the thresholded attention graph.

    Graph: undirected, unweighted; tokens i != j are joined when the symmetrised attention
    (W[i, j] + W[j, i]) / 2 exceeds 1 / n_valid, the weight of uniform attention. For an edge e = (i, j)
    the augmented Forman curvature is

        F(e) = 4 - deg(i) - deg(j) + 3 * t(e),   t(e) = triangles containing e (common neighbours),

    and a node's curvature is the mean of F over its edges. Edges between hubs that share few
    neighbours are very negative: they are the bottlenecks between dense regions, so the *lowest*
    curvature marks a bridge. Isolated tokens get +inf (never bridges).
    Returns [B, Hkv, N] float32.
    """
    n = graph.shape[-1]
    sym = (graph + graph.mT) / 2                                             # (B, Hkv, N, N)
    valid = torch.ones(graph.shape[0], n, dtype=torch.bool, device=graph.device) if key_mask is None else key_mask
    n_valid = valid.sum(-1).clamp_min(1)[:, None, None, None]                 # (B, 1, 1, 1)
    pair = valid[:, None, :, None] & valid[:, None, None, :]                  # (B, 1, N, N)
    no_loops = ~torch.eye(n, dtype=torch.bool, device=graph.device)
    adj = ((sym > 1.0 / n_valid) & pair & no_loops).to(torch.float32)         # (B, Hkv, N, N)
    deg = adj.sum(-1)                                                        # (B, Hkv, N)
    triangles = (adj @ adj) * adj                                            # (B, Hkv, N, N)
    edge_f = (4 - deg[..., :, None] - deg[..., None, :] + 3 * triangles) * adj
    node_f = edge_f.sum(-1) / deg.clamp_min(1)                               # (B, Hkv, N)
    return torch.where(deg > 0, node_f, math.inf)


def question_mask_from_spans(spans, batch: int, n: int, device=None):
    """question_span=(start, end) (end exclusive, token positions of the prompt) for every row, or one
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


def prompt_evidence(q, k, v, config: EvictionConfig, *, scale=None, key_mask=None, question_mask=None,
                    attention_fn: AttentionFn = attention):
    """The extra per-key evidence config.policy ranks by, as keyword arguments for select_kept."""
    policy = config.policy
    if policy == "snapkv":
        return {"window_scores": window_scores(q, k, v, config.window, scale=scale, key_mask=key_mask,
                                               attention_fn=attention_fn)}
    if policy == "bidirectional":
        return {"bidirectional_scores": bidirectional_scores(q, k, v, scale=scale, key_mask=key_mask,
                                                             attention_fn=attention_fn)}
    if policy in ("question_aware", "hybrid_semantic"):
        if question_mask is None:
            raise ValueError(f"question_span: policy {policy!r} needs the question's token positions")
        return {"question_similarity": question_similarity(q, k, question_mask)}
    if policy == "match_span":
        if question_mask is None:
            raise ValueError(f"question_span: policy {policy!r} needs the question's token positions")
        return {"question_match": question_match(v, question_mask, config.match_threshold, key_mask)}
    if policy in ("cab", "dynamic_local") and config.bridge != "median":
        graph = attention_graph(q, k, scale=scale, key_mask=key_mask)       # (B, Hkv, N, N)
        bridge = connectivity if config.bridge == "connectivity" else forman_curvature
        return {config.bridge: bridge(graph, key_mask)}
    return {}


# ----------------------------------------------------------------------------------------------------
# 4. Selection: fill the budget part by part
#
# A policy describes its keep-set as an ordered list of parts, e.g. H2O = [recent: 20% of K by
# position, heavy: the rest by score]. Each part takes its `count` best tokens among those no earlier
# part took. Ordering is always (real token before padding, higher priority, more recent): ties break
# toward the more recent token, so selection is deterministic.

class Part(NamedTuple):
    name: str
    count: int
    priority: object   # [B, H, N] tensor, or a function(available [B, H, N] bool) -> tensor


class Selection(NamedTuple):
    kept: torch.Tensor    # [B, H, K] int64, ascending: the token indices kept
    part: torch.Tensor    # [B, H, K] int64: index into names of the part that kept each token
    names: list           # the policy's part names, in the order they were filled
    order: torch.Tensor   # [B, H, N] int64: every token, best first (kept ones in part order, then
                          #   the evicted ones by the last part's priority): rank r = order.argsort()


def _recency(shape, device):
    return torch.arange(shape[-1], device=device, dtype=torch.float32).expand(shape)   # (B, H, N)


def _best_first(priority, available, valid):
    """Token indices ordered best first: available real tokens, then available padding (by recency
    only, so every head pads alike), then tokens already taken; within each, higher priority first and
    ties to the more recent token."""
    n = priority.shape[-1]
    priority = torch.where(valid, torch.nan_to_num(priority, nan=-math.inf), 0.0)  # (B, H, N)
    by_priority = torch.sort(priority.flip(-1), dim=-1, descending=True, stable=True).indices
    order = (n - 1) - by_priority                                            # ties: later position first
    tier = (2 * (available & valid).to(torch.int8) + (available & ~valid).to(torch.int8)).gather(-1, order)
    return order.gather(-1, torch.sort(tier, dim=-1, descending=True, stable=True).indices)


def select_parts(scores, config: EvictionConfig, **context) -> Selection:
    """select_kept, with the why: which part kept each token and the full keep order (for diagnose)."""
    scores = _check_scores(scores)
    b, h, n = scores.shape
    context = _check_context(context, scores)
    if not config.per_head:        # one decision per layer: sum heads (the original CAB code's choice)
        scores, context = _merge_heads(scores, context)
    k = config.budget_for(n)
    valid = context.get("key_mask")
    valid = torch.ones_like(scores, dtype=torch.bool) if valid is None else valid.expand(scores.shape)
    if k == n:                     # everything fits: keep all, no ranking needed
        parts = [Part("all", n, _recency(scores.shape, scores.device))]
    else:
        parts = POLICY_PARTS[config.policy](scores, k, config, context)
    assert sum(p.count for p in parts) == k, "a policy's parts must add up to the budget"
    taken = torch.zeros_like(valid)                                          # (B, H', N)
    part_of = torch.full(scores.shape, -1, dtype=torch.int64, device=scores.device)
    chosen_in_order = []
    for index, part in enumerate(parts):
        priority = part.priority(valid & ~taken) if callable(part.priority) else part.priority
        chosen = _best_first(priority, ~taken, valid)[..., :part.count]      # (B, H', count)
        taken = taken.scatter(-1, chosen, True)
        part_of = part_of.scatter(-1, chosen, index)
        chosen_in_order.append(chosen)
    evicted = _best_first(priority, ~taken, valid)[..., :n - k]              # (B, H', N - K)
    order = torch.cat(chosen_in_order + [evicted], dim=-1)                   # (B, H', N)
    kept = taken.nonzero()[:, -1].view(*taken.shape[:-1], k)                 # (B, H', K), ascending
    part = part_of.gather(-1, kept)                                          # (B, H', K)
    if not config.per_head:
        kept, part, order = (t.expand(b, h, t.shape[-1]) for t in (kept, part, order))
    return Selection(kept, part, [p.name for p in parts], order)


def select_kept(scores, config: EvictionConfig, **context):
    """The tokens to keep: int64 indices [B, Hkv, K] sorted ascending, K = config.budget_for(N).

    scores [B, Hkv, N]: accumulated attention per key. context (all optional unless a policy needs it):
      key_mask [B, N] bool          False for padding; padding is kept only when real tokens run out
      question_mask [B, N] bool     the question's tokens (dynamic_local)
      window_scores, bidirectional_scores, question_similarity, connectivity, curvature, decode_scores,
      question_match
                                    [B, Hkv, N] per-key evidence (see prompt_evidence)
    """
    return select_parts(scores, config, **context).kept


CONTEXT_KEYS = ("key_mask", "question_mask", "window_scores", "bidirectional_scores", "question_similarity",
                "connectivity", "curvature", "decode_scores", "question_match")


def _check_scores(scores):
    if not isinstance(scores, torch.Tensor) or scores.dim() != 3:
        raise ValueError(f"scores: expected a tensor [B, Hkv, N], got "
                         f"{tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores: expected a floating dtype, got {scores.dtype}")
    if scores.shape[-1] == 0:
        raise ValueError("scores: expected at least one token (N >= 1)")
    if torch.isnan(scores).any():
        raise ValueError("scores: contains NaN")
    return scores


def _check_context(context, scores):
    b, h, n = scores.shape
    checked = {}
    for name, value in context.items():
        if name not in CONTEXT_KEYS:
            raise TypeError(f"select_kept got an unexpected keyword {name!r}; known: {', '.join(CONTEXT_KEYS)}")
        if value is None:
            continue
        if name in ("key_mask", "question_mask"):
            if value.dtype != torch.bool or tuple(value.shape) not in ((b, n), (b, h, n)):
                raise ValueError(f"{name}: expected bool [B, N] = [{b}, {n}] or [B, Hkv, N], "
                                 f"got {value.dtype} {tuple(value.shape)}")
            value = value if value.dim() == 3 else value[:, None, :]          # (B, 1|Hkv, N)
        elif tuple(value.shape) != (b, h, n):
            raise ValueError(f"{name}: expected shape [B, Hkv, N] = [{b}, {h}, {n}], got {tuple(value.shape)}")
        checked[name] = value.to(scores.device)
    return checked


def _merge_heads(scores, context):
    """Average every per-head tensor over heads (a mask: a token counts if any head has it)."""
    merged = {name: (v.any(1, keepdim=True) if v.dtype == torch.bool else v.float().mean(1, keepdim=True))
              for name, v in context.items()}
    return scores.sum(1, keepdim=True), merged


# ----------------------------------------------------------------------------------------------------
# 5. The policies: each maps (scores, budget K, config, context) to a list of Parts
#
# Protected tokens (sinks, the recent window, SnapKV's observation window) are parts ranked by
# position, so they are kept by construction and rank dumps show real scores, not sentinels.

def _recent(count, scores):
    return Part("recent", count, _recency(scores.shape, scores.device))


def _need(context, name, policy):
    if name not in context:
        raise ValueError(f"{name}: policy {policy!r} ranks by it; compute it with prompt_evidence(...)")
    return context[name]


def _streaming(scores, k, config, context):
    """StreamingLLM: the first `sink` tokens soak up attention mass whatever they say, so keep them
    (the "attention sinks"), and fill the rest with the most recent tokens."""
    sinks = min(config.sink, k)
    return [Part("sink", sinks, -_recency(scores.shape, scores.device)), _recent(k - sinks, scores)]


def _heavy_hitters(scores, k, config, name, evidence):
    """The two-part shape shared by H2O and its variants: recent_ratio of K (at least 1) for the most
    recent tokens, the rest for the highest `evidence`."""
    recent = min(k, max(1, int(k * config.recent_ratio)))
    return [_recent(recent, scores), Part(name, k - recent, evidence)]


def _h2o(scores, k, config, context):
    """H2O: heavy hitters, the keys with the largest accumulated attention, plus a recent window."""
    return _heavy_hitters(scores, k, config, "heavy", scores)


def _median_bridge(scores):
    """Bridge mode "median" (O(N)): among the tokens not yet taken, those whose accumulated score is
    closest to the median of theirs: neither heavy hitters nor noise."""
    def priority(available):
        rest = scores.masked_fill(~available, math.nan)                      # (B, H, N)
        median = rest.nanmedian(dim=-1, keepdim=True).values                 # (B, H, 1)
        return -(scores - median).abs()
    return priority


def _cab_parts(scores, k, context, local_ratio, bridge_ratio, config):
    local, bridge = int(k * local_ratio), int(k * bridge_ratio)
    if config.bridge == "median":
        bridge_priority = _median_bridge(scores)
    elif config.bridge == "connectivity":
        bridge_priority = _need(context, "connectivity", config.policy)
    else:
        bridge_priority = -_need(context, "curvature", config.policy)       # lowest curvature first
    return [Part("local", local, _recency(scores.shape, scores.device)),
            Part("importance", k - local - bridge, scores),
            Part("bridge", bridge, bridge_priority)]


def _cab(scores, k, config, context):
    """CAB: three parts of the budget, in this order:
      local      = int(K * local_ratio) most recent tokens,
      importance = K - local - bridge heavy hitters by accumulated score (as in H2O),
      bridge     = int(K * bridge_ratio) tokens that connect the others (see BRIDGE_MODES:
                   median score, connectivity or Forman curvature of the attention graph)."""
    return _cab_parts(scores, k, context, config.local_ratio, config.bridge_ratio, config)


def _snapkv(scores, k, config, context):
    """SnapKV: the prompt's last `window` queries already "know" what the answer will need. Keep that
    window, and rank the rest by the window's attention max-pooled over `pool` neighbours (so a
    neighbourhood survives, not isolated tokens). The kept window is clamped to half the budget: a
    window larger than K would keep nothing else. After the prompt, decode-time evictions pool the
    accumulated scores instead (the window's evidence is for prompt tokens only)."""
    evidence = context.get("window_scores", scores)
    pooled = F.max_pool1d(evidence.float(), config.pool, stride=1, padding=config.pool // 2)   # (B, H, N)
    window = min(config.window, k // 2)
    return [_recent(window, scores), Part("pooled", k - window, pooled)]


def _normalised(x):
    """x / max over tokens, so heavy hitters land in [0, 1] whatever the prompt length."""
    return x / x.amax(dim=-1, keepdim=True).clamp_min(1e-30)


def _question_aware(scores, k, config, context):
    """Fix 1: heavy hitters by  scores / max(scores) + alpha * cos(key, question)  (question_similarity),
    plus the recent window. Normalising the scores puts both terms on the same [0, 1]-ish scale."""
    sim = _need(context, "question_similarity", config.policy)
    return _heavy_hitters(scores, k, config, "question_aware", _normalised(scores) + config.alpha * sim)


def _bidirectional(scores, k, config, context):
    """Fix 2: heavy hitters by a non-causal pass over the prompt (bidirectional_scores), so a context
    token can also earn attention from the question that follows it. Decode-time evictions use the
    accumulated causal scores."""
    return _heavy_hitters(scores, k, config, "bidirectional", context.get("bidirectional_scores", scores))


def _delayed(scores, k, config, context):
    """Fix 3: nothing is evicted during the prefill (CabCache waits); once the first generated token
    has attended to the whole prompt, its attention (decode_scores, accumulated over generated tokens)
    ranks the prompt's heavy hitters."""
    return _heavy_hitters(scores, k, config, "first_token", _need(context, "decode_scores", config.policy))


def is_question_at_end(question_mask, n, tail):
    """True per row when the question's last token lies within `tail` tokens of the end."""
    positions = torch.arange(n, device=question_mask.device)
    last = torch.where(question_mask, positions, -1).amax(dim=-1)            # (B, 1|H)
    return (last >= 0) & (last >= n - tail)


def _dynamic_local(scores, k, config, context):
    """Fix 4: CAB whose local ratio follows the prompt's structure. A question at the end (a QA prompt)
    means the recent tokens hold what generation needs: local = qa_local_ratio, bridge and importance
    share the rest in their configured proportion. Otherwise the configured ratios. The question's
    position comes from question_mask (CabCache's question_span), never from guessing at strings."""
    qm = context.get("question_mask")
    if qm is None or not bool(is_question_at_end(qm, scores.shape[-1], config.qa_tail).all()):
        return _cab(scores, k, config, context)
    rest = 1.0 - config.qa_local_ratio
    other = config.bridge_ratio + config.importance_ratio
    bridge_ratio = rest * (config.bridge_ratio / other if other > 0 else 0.0)
    return _cab_parts(scores, k, context, config.qa_local_ratio, bridge_ratio, config)


def _hybrid_semantic(scores, k, config, context):
    """Fix 5: the recent window plus the tokens most similar to the question (question_similarity),
    ignoring attention scores altogether."""
    return _heavy_hitters(scores, k, config, "semantic", _need(context, "question_similarity", config.policy))


def _match_span(scores, k, config, context):
    """Fix 6: keep the stretch of text that answers the question, not the words it shares with it.

    Attention from the question lands on the needle's words that *match* the question, not on the
    answer beside them (NOTES.md), and in a small model it lands mostly on sinks and on the question's
    own label. So rank by word overlap instead (question_match), and keep neighbourhoods:
        stretch[j]  = mean of question_match over the match_window tokens centred on j,
        priority[j] = max of stretch over the span_radius tokens either side of j,
    so every token within span_radius of the best-matching stretch ties at that stretch's value and the
    whole neighbourhood is kept (a plateau of 2 * span_radius + 1 tokens), then the next-best stretch.
    Parts: the first `span_sinks` tokens (attention sinks, as StreamingLLM), recent_ratio of K (at least 1)
    most recent tokens (the chat template's tail and the end of the question), the rest by priority.
    Decode-time evictions pool over the remaining slots (new tokens have question_match 0)."""
    match = _need(context, "question_match", config.policy).float()          # (B, H, N)
    b, h, n = match.shape
    stretch = F.avg_pool1d(match.reshape(b * h, 1, n), config.match_window, stride=1,
                           padding=config.match_window // 2, count_include_pad=False)   # (B*H, 1, N)
    priority = F.max_pool1d(stretch, 2 * config.span_radius + 1, stride=1, padding=config.span_radius)
    sinks = min(config.span_sinks, k)
    recent = min(k - sinks, max(1, int(k * config.recent_ratio)))
    return [Part("sink", sinks, -_recency(scores.shape, scores.device)), _recent(recent, scores),
            Part("span", k - sinks - recent, priority.reshape(b, h, n))]


POLICY_PARTS = {
    "streaming": _streaming, "h2o": _h2o, "cab": _cab, "snapkv": _snapkv,
    "question_aware": _question_aware, "bidirectional": _bidirectional, "delayed": _delayed,
    "dynamic_local": _dynamic_local, "hybrid_semantic": _hybrid_semantic, "match_span": _match_span,
}
assert set(POLICY_PARTS) | {"none"} == set(POLICIES)


# ----------------------------------------------------------------------------------------------------
# 6. transformers glue: the "cab_reference" attention implementation and CabCache
#
# The model calls cache.update(k, v, layer) and then the attention function with exactly the keys that
# update returned. CabLayer.update remembers itself as the layer that just ran; the attention function
# recognises it by those keys, computes out + scores with `attention`, hands the scores to the layer,
# and the layer evicts before the next forward builds its mask. Everything else about transformers
# (RoPE, masks for the new tokens, generate's position bookkeeping) stays the library's.

from transformers import AttentionInterface                                  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer                     # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask     # noqa: E402

# evidence a token gets when it enters the cache after the prompt (curvature: +inf = never a bridge)
EVIDENCE_FILL = {"curvature": math.inf}
_last_updated_layer = None    # the CabLayer whose update ran last; its attention call comes next


class CabLayer(DynamicLayer):
    """One layer's evicting cache. Per slot, aligned with keys/values [B, Hkv, L, D]:
    scores [B, Hkv, L] (accumulated attention), positions [B, Hkv, L] (original token positions),
    valid [B, Hkv, L] (False for left padding) and the policy's evidence [B, Hkv, L] each.
    `seen` counts every token ever added: what get_seq_length reports, so masks and RoPE stay true."""

    is_croppable = False       # eviction cannot be undone, so assisted decoding's crop is refused

    def __init__(self, cache: "CabCache"):
        super().__init__()
        self.cache = cache
        self.seen = 0
        self.budget = None                 # fixed from the prompt length at the first call
        self.evidence = {}
        self.prompt_record = None          # CabCache(record=True): the prompt's selection, for tools

    def lazy_initialization(self, key_states, value_states):
        super().lazy_initialization(key_states, value_states)
        b, h = key_states.shape[:2]
        self.scores = key_states.new_zeros(b, h, 0, dtype=torch.float32)
        self.positions = torch.zeros(b, h, 0, dtype=torch.int64, device=key_states.device)
        self.valid = torch.zeros(b, h, 0, dtype=torch.bool, device=key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        global _last_updated_layer
        keys, values = super().update(key_states, value_states)
        b, h, n = key_states.shape[:3]
        dev = key_states.device
        self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, n)], dim=-1)
        new_pos = torch.arange(self.seen, self.seen + n, device=dev).expand(b, h, n)
        self.positions = torch.cat([self.positions, new_pos], dim=-1)
        self.valid = torch.cat([self.valid, torch.ones(b, h, n, dtype=torch.bool, device=dev)], dim=-1)
        for name, value in self.evidence.items():
            fill = value.new_full((b, h, n), EVIDENCE_FILL.get(name, 0))
            self.evidence[name] = torch.cat([value, fill], dim=-1)
        self.seen += n
        _last_updated_layer = self
        return keys, values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        """(stored + q, seen - stored): the mask covers the stored slots plus the new tokens, whose
        true positions start at `seen` (5.17 passes cache_position, 5.24 the query length)."""
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        stored = 0 if self.keys is None or not self.is_initialized else self.keys.shape[-2]
        return stored + q, self.seen - stored

    def key_mask(self):
        """[B, L]: real tokens. Padding is ranked alike in every head (see _best_first), so the heads agree."""
        return self.valid[:, 0]

    def after_attention(self, query, key, value, scores, scale, attention_fn):
        """Accumulate this call's scores; gather the prompt's evidence on the first call; evict to budget."""
        config = self.cache.config
        self.scores = self.scores + scores
        is_prompt = self.budget is None
        if is_prompt:
            n = key.shape[2]
            # the configured budget, not min(budget, n): a short prompt leaves room to grow into
            if config.policy == "none":
                self.budget = math.inf                 # the dense baseline never evicts
            else:
                self.budget = config.budget if config.budget is not None else config.budget_for(n)
            question_mask = question_mask_from_spans(self.cache.question_span, key.shape[0], n, key.device)
            if question_mask is not None:
                self.evidence["question_mask"] = question_mask[:, None, :].expand(-1, key.shape[1], -1)
            self.evidence.update(prompt_evidence(query, key, value, config, scale=scale,
                                                 key_mask=self.key_mask(), question_mask=question_mask,
                                                 attention_fn=attention_fn))
            if "question_match" in self.evidence:      # fix 6: word identity is clearest in the first layers
                self.evidence["question_match"] = self.cache.shared_evidence(
                    "question_match", self.evidence["question_match"], config.match_layers)
            if config.policy == "delayed":
                self.evidence["decode_scores"] = torch.zeros_like(self.scores)
                return                                 # fix 3: the first generated token ranks the prompt
        elif config.policy == "delayed":
            self.evidence["decode_scores"] = self.evidence["decode_scores"] + scores
        if self.keys.shape[-2] - self.budget >= (1 if is_prompt else config.evict_every):
            self.evict(record=is_prompt or (config.policy == "delayed" and self.prompt_record is None))

    def evict(self, record=False):
        """Keep the policy's choice of `budget` slots: a gather on the slot axis of every per-slot tensor."""
        config = self.cache.config
        context = dict(self.evidence, key_mask=self.valid)
        selection = select_parts(self.scores, replace(config, budget=self.budget), **context)
        if record and self.cache.record:
            self.prompt_record = {"selection": selection, "scores": self.scores, "positions": self.positions,
                                  "valid": self.valid, "evidence": dict(self.evidence)}
        kept = selection.kept                                                 # (B, Hkv, K)
        slots = kept[..., None].expand(-1, -1, -1, self.keys.shape[-1])       # (B, Hkv, K, D)
        self.keys, self.values = self.keys.gather(2, slots), self.values.gather(2, slots)
        self.scores, self.positions, self.valid = (t.gather(2, kept) for t in (self.scores, self.positions,
                                                                               self.valid))
        self.evidence = {name: t.gather(2, kept) for name, t in self.evidence.items()}
        assert bool((self.valid == self.valid[:, :1]).all()), "slot validity differs between KV heads"

    def _index_batch(self, index):
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[index], self.values[index]
        self.scores, self.positions, self.valid = self.scores[index], self.positions[index], self.valid[index]
        self.evidence = {name: t[index] for name, t in self.evidence.items()}

    def reorder_cache(self, beam_idx):
        self._index_batch(beam_idx.to(self.scores.device) if self.is_initialized else beam_idx)

    def batch_select_indices(self, indices):
        self._index_batch(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.is_initialized:
            self._index_batch(torch.arange(self.keys.shape[0], device=self.keys.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("CabCache: evicted tokens cannot be cropped back (assisted decoding)")


class CabCache(Cache):
    """A transformers Cache that evicts to config's budget, per layer and KV head.

        model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="cab_reference")
        model.generate(input_ids, past_key_values=CabCache(EvictionConfig(policy="h2o", sparsity=0.9)))

    question_span=(start, end) (or one per batch row), in token positions of the prompt, is what the
    question-based policies read. record=True keeps each layer's prompt selection (layer.prompt_record).
    The prompt is cut right after its prefill (the delayed policy: after the first generated token);
    each decode step then evicts one token to stay within the budget (config.evict_every > 1: the cache
    grows to budget + evict_every - 1 and is cut back to the budget every evict_every tokens).
    """

    def __init__(self, config: EvictionConfig | None = None, *, question_span=None, record: bool = False):
        super().__init__(layers=[])
        self.config = config if config is not None else EvictionConfig()
        if not isinstance(self.config, EvictionConfig):
            raise TypeError(f"config: expected an EvictionConfig, got {type(self.config).__name__}")
        self.question_span = question_span
        self.record = record
        self._shared = {}          # shared_evidence: name -> (sum over layers so far, count)
        self._checkpoint = ([], {})  # (layers with their state, _shared) at the current forward's start

    def shared_evidence(self, name, value, layers):
        """Evidence pooled across layers, in the order the layers cut their prompts: the mean of `name`
        over the first `layers` layers that offered it; later layers get that mean instead of their own.
        (Layer l cuts right after its own prefill attention, so it can only use layers 0..l.)"""
        total, count = self._shared.get(name, (0, 0))
        if count < layers:
            total, count = total + value, count + 1
            self._shared[name] = (total, count)
        return total / count

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:         # a forward starts: remember every layer so a failing step can be undone
            layers = [(layer, dict(vars(layer), evidence=dict(layer.evidence))) for layer in self.layers]
            self._checkpoint = (layers, dict(self._shared))
        while len(self.layers) <= layer_idx:
            self.layers.append(CabLayer(self))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def rollback(self):
        """Undo the current forward's updates and evictions in every layer (the attention raised), so the
        cache stays usable. Layer state is only ever replaced, never written in place (except the slots
        this forward appended), so the references kept at the forward's start are the old state."""
        layers, shared = self._checkpoint
        self.layers[:] = [layer for layer, _ in layers]
        for layer, state in layers:
            layer.__dict__.clear()
            layer.__dict__.update(state)
        self._shared = dict(shared)

    def kept_positions(self):
        """Per layer, the original positions of the cached tokens: [B, Hkv, L] int64."""
        return [layer.positions for layer in self.layers]


def _as_bool_mask(attention_mask):
    """The library's mask as bool [B, 1, Nq, Nk] (True = attend), whether boolean or additive."""
    return attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0


def _check_library_mask(mask, key_mask, nq, nk):
    """Our masks (bottom-right causal + padding) must reproduce the library's for every real query;
    a model with another mask (a sliding window, say) would otherwise get silently wrong outputs."""
    expected = visibility(nq, nk, causal=True, key_mask=key_mask, device=mask.device)[:, 0, 0]  # (B, Nq, Nk)
    real_query = key_mask[:, nk - nq:]                                        # (B, Nq)
    if not bool(((mask[:, 0] == expected) | ~real_query[..., None]).all()):
        raise ValueError("attention_mask: the model's mask is not causal + padding (a sliding window?); "
                         "cab attention supports plain causal decoder masks only")


def make_attention_interface(attention_fn: AttentionFn, *, validate: bool = True):
    """Wrap attention(q, k, v, ...) -> (out, scores) into transformers' attention-interface signature."""

    def cab_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout and module.training:
            raise ValueError(f"dropout: cab attention has no dropout, got {dropout} in training mode")
        nq, nk = query.shape[2], key.shape[2]
        mask = None if attention_mask is None else _as_bool_mask(attention_mask)
        layer = _last_updated_layer if _last_updated_layer is not None and _last_updated_layer.keys is key else None
        if layer is None:          # no CabCache: keys line up with the library's mask
            key_mask = None if mask is None else mask[:, 0, -1, :]
        else:                      # slots were evicted: the layer knows which hold real tokens
            if mask is not None:   # the newest columns are this call's tokens in both
                layer.valid[..., -nq:] = mask[:, 0, -1, -nq:][:, None, :]
            key_mask = layer.key_mask()
        try:
            if mask is not None and (layer is None or layer.budget is None):
                _check_library_mask(mask, key_mask, nq, nk)
            out, scores = attention_fn(query, key, value, scale=scaling, causal=True, key_mask=key_mask,
                                       validate=validate)
            if layer is not None:
                layer.after_attention(query, key, value, scores, scaling, attention_fn)
        except Exception:
            if layer is not None:  # a bad input mid-generation: leave the cache as it was before this step
                layer.cache.rollback()
            raise
        return out.transpose(1, 2).contiguous(), None                          # (B, Nq, Hq, D)

    return cab_attention_forward


def register_attention(name: str, attention_fn: AttentionFn, *, validate: bool = True):
    """Make attn_implementation=name available to Llama-family models (with the SDPA-style bool mask,
    without which left-padded batches would get no mask at all). validate=False skips the NaN/inf check,
    which costs a device sync per layer and step on a GPU."""
    AttentionInterface.register(name, make_attention_interface(attention_fn, validate=validate))
    AttentionMaskInterface.register(name, sdpa_mask)


register_attention("cab_reference", attention)
