"""The fast twin of cab_reference.py: attention with exact accumulated scores in Triton.

Same interface as cab_reference.py (same names, arguments, defaults, return shapes); only *how* the
result is computed changes. The policies, the selection and the cache are imported from the reference,
never redefined, so both files always rank tokens the same way.

    attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=True) -> (out, scores)
        q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D]; G = Hq // Hkv; key_mask [B, Nk] bool (True = real token)
        out    [B, Hq, Nq, D] in q's dtype
        scores [B, Hkv, Nk] float32: softmax probabilities summed over the Nq queries and the G query heads
               of each KV head's group (not divided by anything)

Kernels (NOTES_fast.md explains the design and has the measurements):
  prefill   1. _fwd_kernel: FlashAttention-2 forward (online softmax), writes out and the per-row
               log-sum-exp (natural log of sum_j exp(scale * q_i.k_j), +inf for a row that sees no key).
               On a CUDA GPU, without key_mask, the vendor forward (cuDNN SDPA, which also returns the
               log-sum-exp) can stand in for it: see _prefill.
            2. _score_kernel: key-block-major second pass. Each program owns BLOCK_N keys of one KV head,
               loops over every query of the G query heads of its group, recomputes
               p = exp(scale * q.k - lse) and sums it. It alone writes its keys' scores: no atomics,
               deterministic, and no N x N tensor.
  decode    3. _decode_partial_kernel: split-K over the keys (Nq * G rows handled by one program per
               KV head and split); each split writes its running max, running sum, accumulator and the
               raw logits of its keys.
            4. _decode_reduce_kernel: one program per key block; each combines the split partials in a fixed
               order (deterministic) into the final lse, the first also writes out; then it turns its keys'
               stored logits into probabilities and column sums.
All four share one inner-loop helper per loop direction (_attn_inner over key blocks for 1 and 3,
_score_inner over query blocks for 2), each with a constexpr STAGE flag: 1 = off-diagonal blocks with no
causal mask, 2 = the diagonal / ragged-tail blocks with masks.

On a machine without CUDA this runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), slowly and with small blocks; that is what CI's tests use.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

import cab_reference as _ref
from cab_reference import *  # noqa: F401,F403  (EvictionConfig, POLICIES, select_kept, CabCache, ...)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DECODE_MAX_ROWS = 64          # use the split-K decode kernels when Nq * G <= this many rows


# ----------------------------------------------------------------------------------------------------
# Autotune configs: short lists beside the kernels. Under the interpreter one small config, so CI is
# fast and its length tests straddle these block sizes (see block_sizes()).

def _cfg(bm, bn, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


if _INTERPRET:
    _FWD_CONFIGS = [_cfg(16, 16, 4, 1)]
    _SCORE_CONFIGS = [_cfg(16, 16, 4, 1)]
    _DECODE_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    _SPLIT_UNIT = 16          # decode split sizes are multiples of this (>= every decode BLOCK_N)
    _NUM_SMS = 2
else:
    _FWD_CONFIGS = [
        _cfg(128, 64, 8, 3), _cfg(128, 128, 8, 3), _cfg(128, 64, 4, 3), _cfg(64, 64, 4, 3),
        _cfg(32, 32, 4, 2),   # only for fp32 at head dim 256 (see _prune_by_head_dim)
    ]
    _SCORE_CONFIGS = [
        _cfg(64, 128, 8, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3), _cfg(64, 128, 8, 4),
        _cfg(64, 128, 4, 3),
        _cfg(32, 32, 4, 2),   # only for fp32 at head dim 256 (see _prune_by_head_dim)
    ]
    _DECODE_CONFIGS = [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
                       for bn, w, s in ((64, 4, 3), (128, 4, 3), (32, 4, 4))]
    _SPLIT_UNIT = 128
    _NUM_SMS = None           # read from the device on first use


def block_sizes():
    """Every BLOCK_M / BLOCK_N the kernels may use in this process (tests straddle these lengths)."""
    ms = {c.kwargs["BLOCK_M"] for c in _FWD_CONFIGS + _SCORE_CONFIGS}
    ns = {c.kwargs["BLOCK_N"] for c in _FWD_CONFIGS + _SCORE_CONFIGS + _DECODE_CONFIGS} | {_SPLIT_UNIT}
    return sorted(ms), sorted(ns)


def _prune_by_head_dim(configs, named_args, **kwargs):
    """Keep the tiles that fit: at head dim 256, 64 x 64 at most for half inputs (registers) and the
    small fp32 config for fp32 inputs (shared memory: 64 x 64 x 3 stages asked for 344 KB of 227)."""
    d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))   # constexprs come in kwargs (triton >= 3.3)
    fp32 = kwargs.get("PREC", named_args.get("PREC")) == "ieee"
    small = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 32 * 32]
    if d > 128 and fp32:
        return small
    kept = [c for c in configs if c not in small and (d <= 128 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64)]
    return kept or small


def _bucket(n):
    """Autotune key for a length: a coarse size class (<= 512, <= 4096, <= 32768, more), so decode does
    not retune every token and a test run does not retune every length."""
    return sum(int(n) > t for t in (512, 4096, 32768))


# ----------------------------------------------------------------------------------------------------
# Inner loop over key blocks: the online-softmax update (forward and decode share it)

@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """tl.dot; PREC "upcast" computes in fp32 (the CPU interpreter's bf16 dot is wrong in triton 3.9)."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _attn_inner(acc, m_i, l_i, q, q_pos, K_base, V_base, KM_base, Lg_base, lg_rows, lg_row_ok,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_kmn,
                offs_d, lo, hi, N_K, causal_off, qk_scale,
                STAGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
                STORE_LOGITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                PREC: tl.constexpr):
    """Running max m_i, running sum l_i and accumulator acc over keys [lo, hi), logits in log2 units.

    STAGE 1: every key in [lo, hi) is < N_K and visible to every row (blocks left of the diagonal).
    STAGE 2: diagonal / ragged tail: the causal mask and the key-tail mask are applied.
    """
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail (D = 80, 96)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < N_K                                         # key tail (ragged Nk)
        offs_n64 = offs_n.to(tl.int64)
        kt = tl.load(K_base + offs_n64[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)                  # [BLOCK_D, BLOCK_N]
        qk = _mm(q, kt, None, PREC) * qk_scale                             # [ROWS, BLOCK_N]
        if STAGE == 2:
            qk = tl.where(n_ok[None, :], qk, float("-inf"))         # keys past Nk never count
            if CAUSAL:                                              # bottom-right causal diagonal
                qk = tl.where(offs_n[None, :] <= q_pos[:, None] + causal_off, qk, float("-inf"))
        if HAS_MASK:
            km = tl.load(KM_base + offs_n64 * stride_kmn, mask=n_ok, other=0)
            qk = tl.where(km[None, :] != 0, qk, float("-inf"))      # left-padding keys never count
        if STORE_LOGITS:                                            # decode: keep logits for the scores
            tl.store(Lg_base + lg_rows[:, None] + offs_n64[None, :], qk,
                     mask=lg_row_ok[:, None] & n_ok[None, :])
        m_ij = tl.maximum(m_i, tl.max(qk, 1))                       # finite: m_i starts at -1e30
        p = tl.math.exp2(qk - m_ij[:, None])
        alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V_base + offs_n64[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)                   # [BLOCK_N, BLOCK_D]
        acc = _mm(p.to(v.dtype), v, acc, PREC)
        m_i = m_ij
    return acc, m_i, l_i


# ----------------------------------------------------------------------------------------------------
# 1. Prefill forward: out and log-sum-exp

@triton.autotune(configs=_FWD_CONFIGS, key=["NQ_BUCKET", "NK_BUCKET", "BLOCK_D", "CAUSAL", "HAS_MASK"],
                 prune_configs_by={"early_config_prune": _prune_by_head_dim})
@triton.jit
def _fwd_kernel(Q, K, V, KM, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, som, sod, skmb, skmn,
                H_Q, G, N_Q, N_K, NQ_BUCKET, NK_BUCKET, qk_scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m - 1 - pid_m                                   # longest rows first
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_Q).to(tl.int64)
    h = pid_bh % H_Q
    hkv = (h // G).to(tl.int64)
    h = h.to(tl.int64)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_Q                                             # query tail (ragged Nq)
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail
    offs_m64 = offs_m.to(tl.int64)
    q = tl.load(Q + b * sqb + h * sqh + offs_m64[:, None] * sqm + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)                       # [BLOCK_M, BLOCK_D]
    K_base = K + b * skb + hkv * skh
    V_base = V + b * svb + hkv * svh
    KM_base = KM + b * skmb
    causal_off = N_K - N_Q                                          # query i sees keys <= i + causal_off

    m_i = tl.full([BLOCK_M], -1.0e30, tl.float32)                   # running max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)                           # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)                  # accumulator
    if CAUSAL:
        # keys every row of this block sees: [0, diag); the diagonal band: [diag, hi)
        diag = tl.maximum(start_m + causal_off + 1, 0) // BLOCK_N * BLOCK_N
        diag = tl.minimum(diag, N_K // BLOCK_N * BLOCK_N)
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + causal_off, 0), N_K)
    else:
        diag = N_K // BLOCK_N * BLOCK_N                             # full key blocks, then the ragged tail
        hi = N_K
    acc, m_i, l_i = _attn_inner(acc, m_i, l_i, q, offs_m, K_base, V_base, KM_base, Lse, offs_m64, m_ok,
                                skn, skd, svn, svd, skmn, offs_d, 0, diag, N_K, causal_off, qk_scale,
                                1, CAUSAL, HAS_MASK, False, HEAD_DIM, BLOCK_N, PREC)
    acc, m_i, l_i = _attn_inner(acc, m_i, l_i, q, offs_m, K_base, V_base, KM_base, Lse, offs_m64, m_ok,
                                skn, skd, svn, svd, skmn, offs_d, diag, hi, N_K, causal_off, qk_scale,
                                2, CAUSAL, HAS_MASK, False, HEAD_DIM, BLOCK_N, PREC)
    # epilogue: a row that saw no key has l_i = 0: output 0 and lse = +inf (its probabilities are 0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(Out + b * sob + h * soh + offs_m64[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + (b * H_Q + h) * N_Q + offs_m64, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------
# 2. Prefill scores: key-block-major pass over the queries, probabilities recomputed from the lse

@triton.jit
def _score_inner(acc, kb, Q_base, Lse_base, sqm, sqd, offs_d, offs_n, lo, hi, N_Q, causal_off, qk_scale,
                 STAGE: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr, PREC: tl.constexpr):
    """acc[n] += sum over queries m in [lo, hi) of exp(scale * q_m.k_n - lse_m).

    STAGE 1: every query of [lo, hi) sees every key of the block. STAGE 2: the causal diagonal band.
    """
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_ok = offs_m < N_Q                                         # query tail (ragged Nq)
        offs_m64 = offs_m.to(tl.int64)
        qt = tl.load(Q_base + offs_m64[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=m_ok[None, :] & d_ok[:, None], other=0.0)                  # [BLOCK_D, BLOCK_M]
        # padded query rows and rows that see no key have lse = +inf, so their probabilities are 0
        lse2 = tl.load(Lse_base + offs_m64, mask=m_ok, other=float("inf")) * 1.4426950408889634
        s = _mm(kb, qt, None, PREC) * qk_scale                             # [BLOCK_N, BLOCK_M]
        p = tl.math.exp2(s - lse2[None, :])
        if STAGE == 2:
            if CAUSAL:                                              # bottom-right causal diagonal
                p = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, p, 0.0)
        acc += tl.sum(p, 1)
    return acc


@triton.autotune(configs=_SCORE_CONFIGS, key=["NQ_BUCKET", "NK_BUCKET", "BLOCK_D", "CAUSAL"],
                 prune_configs_by={"early_config_prune": _prune_by_head_dim})
@triton.jit
def _score_kernel(Q, K, KM, Lse, Scores,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, skmb, skmn,
                  H_Q, H_KV, G, N_Q, N_K, NQ_BUCKET, NK_BUCKET, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K                                             # key tail (ragged Nk)
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail
    offs_n64 = offs_n.to(tl.int64)
    kb = tl.load(K + b * skb + hkv.to(tl.int64) * skh + offs_n64[:, None] * skn + offs_d[None, :] * skd,
                 mask=n_ok[:, None] & d_ok[None, :], other=0.0)                      # [BLOCK_N, BLOCK_D]
    causal_off = N_K - N_Q
    q_end = tl.cdiv(N_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # queries that see some key of this block start at start_n - causal_off; from `full` on they see all
        lo = tl.maximum(start_n - causal_off, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_off, 0), BLOCK_M) * BLOCK_M
        full = tl.minimum(tl.maximum(full, lo), q_end)
    else:
        lo = 0
        full = 0
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(G):                                              # the query heads of this KV head
        h = (hkv * G + g).to(tl.int64)
        Q_base = Q + b * sqb + h * sqh
        Lse_base = Lse + (b * H_Q + h) * N_Q
        acc = _score_inner(acc, kb, Q_base, Lse_base, sqm, sqd, offs_d, offs_n, lo, full, N_Q, causal_off,
                           qk_scale, 2, CAUSAL, HEAD_DIM, BLOCK_M, PREC)
        acc = _score_inner(acc, kb, Q_base, Lse_base, sqm, sqd, offs_d, offs_n, full, q_end, N_Q, causal_off,
                           qk_scale, 1, CAUSAL, HEAD_DIM, BLOCK_M, PREC)
    keep = n_ok
    if HAS_MASK:
        km = tl.load(KM + b * skmb + offs_n64 * skmn, mask=n_ok, other=0)
        keep = keep & (km != 0)                                     # left-padding keys score 0
    acc = tl.where(keep, acc, 0.0)
    tl.store(Scores + pid_bh.to(tl.int64) * N_K + offs_n64, acc, mask=n_ok)


# ----------------------------------------------------------------------------------------------------
# 3./4. Decode: split-K partials, then a fixed-order reduction and the scores

@triton.autotune(configs=_DECODE_CONFIGS, key=["NK_BUCKET", "BLOCK_R", "BLOCK_D"])
@triton.jit
def _decode_partial_kernel(Q, K, V, KM, Mp, Lp, Ap, Lg,
                           sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, skmb, skmn,
                           H_KV, G, N_Q, N_K, NK_BUCKET, SPLIT, NUM_SPLITS, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    rows = G * N_Q
    offs_r = tl.arange(0, BLOCK_R)                                  # row r = (query head g, query i)
    r_ok = offs_r < rows                                            # row tail (G * Nq < BLOCK_R)
    g = offs_r // N_Q
    qi = offs_r % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail
    h64 = (hkv * G + g).to(tl.int64)
    q = tl.load(Q + b * sqb + h64[:, None] * sqh + qi.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & d_ok[None, :], other=0.0)                       # [BLOCK_R, BLOCK_D]
    lo = pid_s * SPLIT
    hi = tl.minimum(lo + SPLIT, N_K)
    Lg_base = Lg + pid_bh.to(tl.int64) * rows * N_K
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # decode is memory-bound: every block runs the masked stage (the masks cost nothing measurable)
    acc, m_i, l_i = _attn_inner(acc, m_i, l_i, q, qi, K + b * skb + hkv.to(tl.int64) * skh,
                                V + b * svb + hkv.to(tl.int64) * svh, KM + b * skmb,
                                Lg_base, offs_r.to(tl.int64) * N_K, r_ok,
                                skn, skd, svn, svd, skmn, offs_d, lo, hi, N_K, N_K - N_Q, qk_scale,
                                2, CAUSAL, HAS_MASK, True, HEAD_DIM, BLOCK_N, PREC)
    part = (pid_bh.to(tl.int64) * NUM_SPLITS + pid_s) * BLOCK_R
    tl.store(Mp + part + offs_r, m_i)
    tl.store(Lp + part + offs_r, l_i)
    tl.store(Ap + (part + offs_r)[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _decode_reduce_kernel(Mp, Lp, Ap, Lg, KM, Out, Scores,
                          sob, soh, som, sod, skmb, skmn,
                          H_KV, G, N_Q, N_K, NUM_SPLITS,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                          BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per BLOCK_N keys (many programs, one step each: a loop over the keys of a whole split
    was latency-bound). Each recomputes the final lse from the split partials, in the same fixed order."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    rows = G * N_Q
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < rows                                            # row tail
    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < NUM_SPLITS                                      # split tail
    base = pid_bh.to(tl.int64) * NUM_SPLITS * BLOCK_R
    part = base + offs_s[:, None] * BLOCK_R + offs_r[None, :]
    m_s = tl.load(Mp + part, mask=s_ok[:, None], other=-1.0e30)     # [BLOCK_S, BLOCK_R]
    l_s = tl.load(Lp + part, mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m_s, 0)                                          # [BLOCK_R]
    l_all = tl.sum(l_s * tl.math.exp2(m_s - m_all[None, :]), 0)
    empty = l_all == 0.0                                            # rows that saw no key (or padded rows)
    lse2 = tl.where(empty, float("inf"), m_all + tl.math.log2(tl.where(empty, 1.0, l_all)))
    if pid_n == 0:                                                  # the output: splits in a fixed order
        offs_d = tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
        for s in range(NUM_SPLITS):
            row = base + s * BLOCK_R + offs_r
            w = tl.math.exp2(tl.load(Mp + row) - m_all)
            acc += tl.load(Ap + row[:, None] * BLOCK_D + offs_d[None, :]) * w[:, None]
        out = acc / tl.where(empty, 1.0, l_all)[:, None]
        g = offs_r // N_Q
        qi = offs_r % N_Q
        h64 = (hkv * G + g).to(tl.int64)
        tl.store(Out + b * sob + h64[:, None] * soh + qi.to(tl.int64)[:, None] * som + offs_d[None, :] * sod,
                 out.to(Out.dtype.element_ty), mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :])
    # the scores of this program's keys, from the stored logits and the final lse
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K                                             # key tail
    offs_n64 = offs_n.to(tl.int64)
    Lg_base = Lg + pid_bh.to(tl.int64) * rows * N_K
    lg = tl.load(Lg_base + offs_r.to(tl.int64)[:, None] * N_K + offs_n64[None, :],
                 mask=r_ok[:, None] & n_ok[None, :], other=float("-inf"))            # [BLOCK_R, BLOCK_N]
    sc = tl.sum(tl.math.exp2(lg - lse2[:, None]), 0)
    if HAS_MASK:
        km = tl.load(KM + b * skmb + offs_n64 * skmn, mask=n_ok, other=0)
        sc = tl.where(km != 0, sc, 0.0)                             # left-padding keys score 0
    tl.store(Scores + pid_bh.to(tl.int64) * N_K + offs_n64, sc, mask=n_ok)


# ----------------------------------------------------------------------------------------------------
# Python side: checks, launch parameters, routes

def _check_inputs(q, k, v, key_mask, scale, validate):
    """The reference's checks (shapes, devices, key_mask, scale), then what the kernels add."""
    _ref.check_attention_inputs(q, k, v, key_mask, scale, False, dtypes=_SUPPORTED_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d} not supported by cab_fast (1 .. {MAX_HEAD_DIM})")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"q: cab_fast runs Triton kernels on a CUDA device, got a {q.device.type} tensor; "
                         f"use cab_reference.attention on CPU, or set TRITON_INTERPRET=1 before importing "
                         f"triton to run these kernels in the (slow) interpreter")
    if validate:   # one fused check and one host sync for all three tensors
        finite = torch.stack([torch.isfinite(t).all() for t in (q, k, v)])
        if not bool(finite.all()):
            name = ("q", "k", "v")[int((~finite).nonzero()[0, 0])]
            raise ValueError(f"{name}: contains NaN or inf (validate=True); attention needs finite inputs")


def _block_d(d):
    return max(16, triton.next_power_of_2(d))


def _prec(dtype):
    # fp32 inputs: true fp32 products (the reference does not use tf32); half inputs: native dot
    if _INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    return "ieee" if dtype == torch.float32 else "tf32"


def _mask_args(key_mask, k):
    if key_mask is None:
        return k, 0, 0, False                                       # dummy pointer, never read
    km = key_mask.view(torch.uint8)                                 # same storage, no copy
    return km, km.stride(0), km.stride(1), True


def _num_sms(device):
    global _NUM_SMS
    if _NUM_SMS is None:
        _NUM_SMS = torch.cuda.get_device_properties(device).multi_processor_count
    return _NUM_SMS


def _empty_out(q):
    """Output in [B, Nq, Hq, D] memory, returned as the [B, Hq, Nq, D] view: transformers wants the
    former, so its transpose(1, 2).contiguous() becomes free."""
    b, hq, nq, d = q.shape
    return torch.empty(b, nq, hq, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def _fwd_triton(q, k, v, key_mask, qk_scale, causal):
    """Kernel 1: (out [B, Hq, Nq, D], lse [B, Hq, Nq] float32, natural log, scale included)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    out = _empty_out(q)
    lse = torch.empty(b, hq, nq, dtype=torch.float32, device=q.device)
    km, skmb, skmn, has_mask = _mask_args(key_mask, k)
    grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), b * hq)
    _fwd_kernel[grid](q, k, v, km, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                      skmb, skmn, hq, hq // hkv, nq, nk, _bucket(nq), _bucket(nk), qk_scale,
                      HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_MASK=has_mask,
                      PREC=_prec(q.dtype))
    return out, lse


def _fwd_cudnn(q, k, v, scale, causal):
    """The vendor forward: cuDNN SDPA returns out and the natural-log lse [B, H, N(, 1)] with the scale
    included (checked against kernel 1 in test_equivalence.py). Grouped heads are passed as they are
    (query head h uses KV head h // G, as in SDPA's enable_gqa); K/V are not repeated."""
    # (attn_bias, compute_log_sumexp, dropout_p, is_causal, return_debug_mask); its causal mask is
    # top-left aligned, equal to ours only when Nq == Nk (_cudnn_ok checks)
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    out, lse = res[0], res[1]
    return out, lse.reshape(q.shape[0], q.shape[1], q.shape[2]).float()


_CUDNN_GQA = True    # set False for good if the op refuses Hq != Hkv (older torch / cuDNN)


def _cudnn_ok(q, k, key_mask, causal):
    return (q.is_cuda and key_mask is None and q.dtype in (torch.float16, torch.bfloat16)
            and (q.shape[1] == k.shape[1] or _CUDNN_GQA) and (not causal or q.shape[2] == k.shape[2])
            and q.shape[-1] in (64, 128) and q.stride(-1) == 1 and k.stride(-1) == 1)


def _scores_triton(q, k, key_mask, lse, qk_scale, causal):
    """Kernel 2: scores [B, Hkv, Nk] float32 from q, k and the saved lse."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scores = torch.empty(b, hkv, nk, dtype=torch.float32, device=q.device)
    km, skmb, skmn, has_mask = _mask_args(key_mask, k)
    grid = lambda meta: (triton.cdiv(nk, meta["BLOCK_N"]), b * hkv)
    _score_kernel[grid](q, k, km, lse, scores, *q.stride(), *k.stride(), skmb, skmn,
                        hq, hkv, hq // hkv, nq, nk, _bucket(nq), _bucket(nk), qk_scale,
                        HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_MASK=has_mask,
                        PREC=_prec(q.dtype))
    return scores


def _prefill(q, k, v, scale, causal, key_mask, forward="auto"):
    qk_scale = scale * _LOG2E
    global _CUDNN_GQA
    out = None
    if forward == "cudnn" or (forward == "auto" and _cudnn_ok(q, k, key_mask, causal)):
        try:
            out, lse = _fwd_cudnn(q, k, v, scale, causal)
        except RuntimeError:
            if forward == "cudnn" or q.shape[1] == k.shape[1]:
                raise
            _CUDNN_GQA = False                                      # grouped heads refused: Triton from now on
    if out is None:
        out, lse = _fwd_triton(q, k, v, key_mask, qk_scale, causal)
    return out, _scores_triton(q, k, key_mask, lse, qk_scale, causal)


def _decode(q, k, v, scale, causal, key_mask):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = g * nq
    block_r = max(16, triton.next_power_of_2(rows))
    block_d = _block_d(d)
    sms = _num_sms(q.device) if q.is_cuda else _NUM_SMS
    want = max(1, triton.cdiv(2 * sms, b * hkv))                    # about two programs per SM
    splits = min(triton.cdiv(nk, _SPLIT_UNIT), want)
    split = triton.cdiv(triton.cdiv(nk, splits), _SPLIT_UNIT) * _SPLIT_UNIT
    splits = triton.cdiv(nk, split)
    dev = q.device
    work = torch.empty(b * hkv * splits * block_r * (block_d + 2), dtype=torch.float32, device=dev)
    ap = work[:b * hkv * splits * block_r * block_d]                # accumulators [B*Hkv, S, R, D]
    mp = work[ap.numel():ap.numel() + b * hkv * splits * block_r]   # running max  [B*Hkv, S, R]
    lp = work[ap.numel() + mp.numel():]                             # running sum  [B*Hkv, S, R]
    lg = torch.empty(b * hkv, rows, nk, dtype=torch.float32, device=dev)
    out = _empty_out(q)
    scores = torch.empty(b, hkv, nk, dtype=torch.float32, device=dev)
    km, skmb, skmn, has_mask = _mask_args(key_mask, k)
    qk_scale = scale * _LOG2E
    _decode_partial_kernel[(splits, b * hkv)](
        q, k, v, km, mp, lp, ap, lg, *q.stride(), *k.stride(), *v.stride(), skmb, skmn,
        hkv, g, nq, nk, _bucket(nk), split, splits, qk_scale,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, CAUSAL=causal, HAS_MASK=has_mask, PREC=_prec(q.dtype))
    red_n = 16 if _INTERPRET else max(16, min(256, 4096 // block_r))   # [BLOCK_R, BLOCK_N] <= 4096
    _decode_reduce_kernel[(triton.cdiv(nk, red_n), b * hkv)](
        mp, lp, ap, lg, km, out, scores, *out.stride(), skmb, skmn, hkv, g, nq, nk, splits,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        HAS_MASK=has_mask, BLOCK_N=red_n, num_warps=4)
    return out, scores


def _attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=True, route="auto"):
    """attention() with the route exposed for tests and bench.py: "auto", "prefill" (Triton forward),
    "cudnn" (vendor forward + score kernel), "decode" (split-K kernels)."""
    _check_inputs(q, k, v, key_mask, scale, validate)
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if nq == 0 or nk == 0 or b == 0:
        return (torch.zeros_like(q),
                torch.zeros(b, hkv, nk, dtype=torch.float32, device=q.device))
    if route == "decode" or (route == "auto" and nq * (hq // hkv) <= DECODE_MAX_ROWS):
        return _decode(q, k, v, scale, causal, key_mask)
    forward = {"auto": "auto", "prefill": "triton", "cudnn": "cudnn"}[route]
    return _prefill(q, k, v, scale, causal, key_mask, forward)


def attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=True):
    """Scaled dot-product attention that also returns how much attention every key received.

    Same contract as cab_reference.attention (see its docstring for the math): out [B, Hq, Nq, D] in q's
    dtype, scores [B, Hkv, Nk] float32 = probabilities summed over queries and the G heads of a group.
    Inputs: fp16, bf16 or fp32 on a CUDA device (or CPU under TRITON_INTERPRET=1).
    """
    return _attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, validate=validate)


# ----------------------------------------------------------------------------------------------------
# transformers: attn_implementation="cab_fast" (the reference's wrapper around this file's attention)

_ref.register_attention("cab_fast", attention)
