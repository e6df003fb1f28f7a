"""The fast twin of cab_reference: exact accumulated attention scores in Triton, and a cache that decodes
in place. Two parts, in this order:

1. attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=False) -> (out, scores)
   The contract of cab_reference.attention (names, arguments, defaults, shapes); only *how* it is computed
   changes.
        q [B, Hq, Nq, D]; k, v [B, Hkv, Nk, D]; G = Hq // Hkv; key_mask [B, Nk] bool (True = real token)
        out    [B, Hq, Nq, D] in q's dtype
        scores [B, Hkv, Nk] float32: softmax probabilities summed over the Nq queries and the G query heads
               of each KV head's group (not divided by anything)
   validate=False (the default, as in SDPA and FlashAttention): values are not inspected and the call never
   waits for the GPU (NaN in, NaN out); validate=True runs the reference's finiteness check first.

   Kernels (NOTES.md has the design and the measurements):
     prefill   1. _fwd_kernel: FlashAttention-2 forward (online softmax); writes out and the per-row
                  log-sum-exp (natural log of sum_j exp(scale * q_i.k_j), +inf for a row that sees no key).
                  On a CUDA GPU, for fp16/bf16 without key_mask, cuDNN's SDPA forward (which also returns
                  the log-sum-exp) stands in for it: see _prefill.
               2. _score_kernel: key-block-major second pass. Each program owns BLOCK_N keys of one KV head,
                  loops over the queries of its query heads, recomputes p = exp(scale * q.k - lse) and sums
                  it. It alone writes its keys' scores: no atomics, deterministic, no N x N tensor.
     decode    3. _decode_partial_kernel: split-K over the keys (the Nq * G rows of a KV head in one
                  program per split); each split writes its running max, sum, accumulator and the raw logits
                  of its keys. With one split (short decode) it finishes the job itself: one launch.
               4. _decode_reduce_kernel: programs for key blocks and for output rows, each combining every
                  split's partials of its rows at once, in a fixed order (deterministic): the key blocks
                  turn their stored logits into probabilities and column sums, the rows write out.
     no scores _attention(..., scores=False) (what CabCache calls where its policy does not rank by scores)
               returns (out, None) and launches no score work: prefill is SDPA's default backend where dense
               attention would call it the same way (CUDA, no key mask, causal only for Nq == Nk), else
               kernel 1 alone; decode runs kernels 3 and 4 with SCORES off (no logits, no score blocks).

   Tiles are fixed ahead of time per (GPU compute capability or GPU, kernel, head-dim class, dtype class)
   in _TILES, as FlashAttention does: a call never autotunes. CAB_AUTOTUNE=1 in the environment (read on
   import) times the candidate tiles on the first call of each shape class instead (bench.py --autotune
   prints a table). The forward and decode kernels do not specialise on lengths, so a new length reuses
   them; the score pass does (divisible by 16 or not: at most two compiles per shape class, for a pass
   7-10% faster on the H100). A call's launches are planned once per input metadata (shapes, strides,
   dtypes, device, alignment; section "Plans"): a repeated call only allocates its outputs and calls the
   compiled kernels' launchers directly, without triton's per-call argument binding; the kernels a call
   needs compile together. Those direct launches use triton internals and are taken only under the triton
   releases they were run on (DIRECT_LAUNCH_TRITON); any other launches through triton's public API.

2. CabCache (section "fast cache", at the end): the twin of the reference's eviction loop for generation.
   It subclasses cab_reference.CabCache: the same arguments (plus cut_graphs) and methods; policies,
   selection and the prompt's first cut are the reference's own (imported as `_ref`, never re-exported).
   After the cut the tokens live in per-slot buffers: a decode step writes one slot, attends over all of
   them and syncs nothing (it can be captured in a CUDA graph). A cache whose policy does not rank by
   scores (EvictionLoop.reads_scores: streaming, the question-span matchers given a span, ...) skips the
   score pass on every path, prompt and decode; its layers' scores stay 0. Importing this module registers
   attn_implementation "cab_fast" with transformers; switch with `cab_fast.CabCache(...)` plus
   attn_implementation="cab_fast".

On a machine without CUDA this runs under the Triton interpreter (TRITON_INTERPRET=1 set before triton is
imported), slowly and with 16-wide tiles; that is what CI's tests use.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import threading

import torch
import triton
import triton.language as tl
from triton.runtime import _allocation  # the allocator for in-kernel tensor descriptors (_descriptor_scratch)

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _warm_triton():
    """What triton does once per process before its first compile or kernel load, started here on a daemon
    thread so that it overlaps the imports below and the caller's model loading: it hashes its own library
    (~0.4 s), imports its compiler's front end (~0.15 s), and with a cold cache builds its CUDA utilities
    with the C compiler (~0.3 s on an H100 host). None of it initialises CUDA. A failure here only means no
    head start: the main thread meets it again and reports it."""
    try:
        from triton.runtime.cache import triton_key
        triton_key()
        import triton.experimental.gluon  # noqa: F401
        from triton.backends.nvidia.driver import CudaUtils
        CudaUtils()
    except Exception:
        return


if not _INTERPRET:                                  # before the imports below (transformers: ~2 s)
    threading.Thread(target=_warm_triton, name="cab_fast: warm triton", daemon=True).start()


import cab_reference as _ref

# The twin's interface is the reference's: the config, the policies and the selection are imported, never
# redefined (their evidence functions take attention_fn, so none of these runs the slow attention).
from cab_reference import (
    CAB,
    H2O,
    POLICIES,
    POLICY_TYPES,
    Bidirectional,
    Delayed,
    Dense,
    DynamicLocal,
    EvictionConfig,
    FactSlots,
    HybridSemantic,
    MatchSpan,
    Policy,
    QuestionAware,
    SentenceMatch,
    SnapKV,
    StreamingLLM,
    TitleLinks,
    find_question_span,
    make_policy,
    select_kept,
    select_parts,
    sentence_end_ids,
    token_texts,
)

__all__ = [  # what this file adds (attention, CabCache, tiles, register) and what it shares with the reference
    "attention", "CabCache", "tiles", "register", "CAB", "H2O", "POLICIES", "POLICY_TYPES", "Bidirectional",
    "Delayed", "Dense", "DynamicLocal", "EvictionConfig", "FactSlots", "HybridSemantic", "MatchSpan", "Policy",
    "QuestionAware", "SentenceMatch", "SnapKV", "StreamingLLM", "TitleLinks", "find_question_span", "make_policy",
    "select_kept", "select_parts", "sentence_end_ids", "token_texts",
]

_AUTOTUNE = os.environ.get("CAB_AUTOTUNE", "0") == "1"
_LOG2E = tl.constexpr(1.4426950408889634)     # log2(e): the kernels work in base 2 (exp2, log2)
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DECODE_MAX_ROWS = 64          # the split-K decode kernels take calls with Nq * G <= this many rows

# ----------------------------------------------------------------------------------------------------
# Tiles. fwd / score: (BLOCK_M, BLOCK_N, num_warps, num_stages); decode: (BLOCK_N, num_warps, num_stages,
# programs per SM). Keyed by (kernel, BLOCK_D, dtype class "half" | "fp32").

_TILES = {
    # NVIDIA H100 80GB HBM3 (sm90), 2026-11-28, torch 2.11, triton 3.6, `bench.py --autotune`: the candidate
    # with the least geometric-mean slowdown over the sweep's sizes (bf16, causal; fwd: N = 4k, 16k GQA 32/8;
    # score: 1k, 16k GQA and 4k MHA; decode: 4k GQA, 32k MHA, 128k GQA and MHA). Runners-up within 10%:
    # fwd none; score (64, 64, 4, 3) 1.09. Decode re-swept the same day after the reduce kernel's rewrite
    # (GQA 32/8 and MHA, 4k-128k, CUDA-graph replay): (64, 4, 3, 1) fastest or within 1% of it at every size
    # but 64k MHA (+0.3%). The architecture's entry: any sm90 GPU without its own. Other head dims use
    # _default_tile.
    (9, 0): {
        ("fwd", 128, "half"): (128, 128, 8, 3),
        ("score", 128, "half"): (64, 128, 4, 3),
        ("decode", 128, "half"): (64, 4, 3, 1),
    },
    # NVIDIA H200 (sm90, the H100's SMs with 1.4x its memory bandwidth), 2026-11-28, same versions. Score
    # pass: the sm90 tile was still the fastest of 8 (4k-32k, GQA 32/8 and MHA). Decode, swept over 17
    # candidates under CUDA-graph replay (GQA 32/8 and MHA, 4k-128k): the one deeper pipeline stage pays
    # at this bandwidth: geometric-mean time over SDPA 1.073 (sm90's tile 1.099), worst from 32k 1.125
    # (1.188).
    "NVIDIA H200": {
        ("decode", 128, "half"): (64, 4, 4, 1),
    },
}

_CANDIDATES = {
    "fwd": [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 2),
            (16, 16, 4, 1)],
    "score": [(64, 128, 8, 3), (128, 128, 8, 3), (64, 128, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 2),
              (32, 32, 4, 2), (16, 16, 4, 1)],
    "decode": [(64, 4, 3, 2), (64, 4, 3, 4), (128, 4, 3, 2), (128, 4, 3, 4), (64, 4, 4, 8), (32, 4, 3, 4),
               (32, 4, 2, 2), (16, 4, 1, 2)],
}


def _fits(kind, tile, block_d, fp32, shared):
    """Tiles that fit one SM: at head dim 256, 64 x 64 at most for half inputs (registers); fp32 tiles
    at most 64 x 64 with 2 stages; and within the GPU's shared memory per block (_shared_bytes)."""
    if _shared_bytes(kind, tile, block_d, fp32) > shared:
        return False
    if kind == "decode":
        return tile[0] <= (32 if fp32 and block_d > 128 else 128)
    area, stages = tile[0] * tile[1], tile[3]
    if fp32:
        return area <= (32 * 32 if block_d > 128 else 64 * 64) and stages <= 2
    return block_d <= 128 or area <= 64 * 64


def _shared_bytes(kind, tile, block_d, fp32, rows=16):
    """A bound on the shared memory a kernel asks for at tile: each pipeline stage holds K and V blocks (the
    score pass: a query block), the query block stays resident, and the score pass's and decode's logit
    blocks too. Elements as the dots take them: 2 bytes, 8 for fp32 inputs (float64 dots). Decode tiles are
    chosen at 16 rows (_decode_fit: more). Equal to what triton 3.9 allocates for sm90's forward and 64-row
    decode, above it elsewhere; test_equivalence.py compiles every chosen tile for sm80-sm90 and checks."""
    size = 8 if fp32 else 2
    if kind == "decode":
        block_n, _, stages, _ = tile
        return stages * 2 * block_n * block_d * size + rows * (block_d * size + block_n * 4)
    block_m, block_n, _, stages = tile
    if kind == "fwd":
        return stages * 2 * block_n * block_d * size + block_m * block_d * size
    return stages * block_m * block_d * size + block_n * block_d * size + block_m * block_n * 4


def _default_tile(kind, block_d, fp32, shared):
    """Any GPU or head dim the table does not list: the first candidate that fits, else the smallest (a
    decode tile shrinks further at launch, _decode_fit)."""
    if _INTERPRET:
        return (16, 4, 1, 2) if kind == "decode" else (16, 16, 4, 1)
    fitting = [t for t in _CANDIDATES[kind] if _fits(kind, t, block_d, fp32, shared)]
    return fitting[0] if fitting else _CANDIDATES[kind][-1]


# Shared memory one block may opt into, by compute capability (CUDA C++ Programming Guide), where torch does
# not report the device's own (shared_memory_per_block_optin); any other GPU: the smallest, 99 KB.
_SHARED_OPTIN = {(8, 0): 163 << 10, (8, 6): 99 << 10, (8, 7): 163 << 10, (8, 9): 99 << 10, (9, 0): 227 << 10}
_DEVICES = {}                 # device index -> ((compute capability, name, shared memory per block), SM count)
_TUNED = {}                   # CAB_AUTOTUNE=1: (kernel, GPU, BLOCK_D, dtype class, shape class) -> tile


def _device(q):
    idx = q.get_device()
    info = _DEVICES.get(idx)
    if info is None:
        if idx < 0:                                                 # the interpreter on CPU
            info = (((0, 0), "interpreter", 1 << 30), 4)
        else:
            p = torch.cuda.get_device_properties(idx)
            shared = getattr(p, "shared_memory_per_block_optin", 0) or _SHARED_OPTIN.get((p.major, p.minor), 99 << 10)
            info = (((p.major, p.minor), p.name, shared), p.multi_processor_count)
        _DEVICES[idx] = info
    return info


def _dtype_class(dtype):
    return "fp32" if dtype == torch.float32 else "half"


def _cdiv(a, b):
    """Host-side ceil(a / b). (triton.cdiv and triton.next_power_of_2 are jit-callable wrappers that cost
    ~10 us per call from Python: a decode call used seven of them.)"""
    return -(-a // b)


def _next_pow2(n):
    return 1 << (n - 1).bit_length()


def _block_d(d):
    return max(16, _next_pow2(d))


def _table_tile(kind, gpu, block_d, dtype):
    """The tile for gpu = (compute capability, name, shared memory per block): the GPU's own entry, else its
    architecture's (GPUs of one architecture can differ in memory bandwidth, which moves the decode kernel's
    best tile), else _default_tile."""
    key = (kind, block_d, _dtype_class(dtype))
    for entry in (_TILES.get(gpu[1], {}), _TILES.get(gpu[0], {})):
        if key in entry:
            return entry[key]
    return _default_tile(kind, block_d, dtype == torch.float32, gpu[2])


def tiles(device, head_dim, dtype):
    """The tiles this process uses for head_dim and dtype on device: {kernel: tile} plus the decode
    kernels' other blocks ("min_split": keys one decode program takes before the keys are split,
    "reduce_n": keys per reduce program). Tests straddle these lengths."""
    probe = torch.empty(0, device=device)
    gpu = _device(probe)[0]
    out = {kind: _table_tile(kind, gpu, _block_d(head_dim), dtype) for kind in ("fwd", "score", "decode")}
    out["min_split"] = _MIN_SPLIT
    out["reduce_n"] = _reduce_block_n(16)
    return out


def _time_ms(fn):
    from triton.testing import do_bench
    try:
        return do_bench(fn, warmup=5, rep=20, return_mode="median")
    except Exception:                                               # out of resources: not a candidate
        return math.inf


def _tile(kind, q, block_d, shape_class, launch):
    """The table's tile; with CAB_AUTOTUNE=1 the fastest candidate for this shape class, timed once by
    running launch(tile) (which writes only the call's own outputs)."""
    gpu = _device(q)[0]
    if not _AUTOTUNE or _INTERPRET:
        return _table_tile(kind, gpu, block_d, q.dtype)
    key = (kind, gpu, block_d, _dtype_class(q.dtype), shape_class)
    tile = _TUNED.get(key)
    if tile is None:
        fp32 = q.dtype == torch.float32
        fitting = [t for t in _CANDIDATES[kind] if _fits(kind, t, block_d, fp32, gpu[2])]
        tile = min(fitting or [_default_tile(kind, block_d, fp32, gpu[2])], key=lambda t: _time_ms(lambda: launch(t)))
        _TUNED[key] = tile
    return tile


def _shape_class(n):
    """A coarse length class for autotuning (<= 512, <= 4096, <= 32768, more)."""
    return sum(int(n) > t for t in (512, 4096, 32768))


# ----------------------------------------------------------------------------------------------------
# Shared pieces of the inner loops

@triton.jit
def _mm(a, b, acc, PREC: tl.constexpr):
    """tl.dot; PREC "upcast" computes in fp32 (the CPU interpreter's bf16 dot is wrong in triton 3.9), "fp64"
    in float64, rounded to fp32 before acc is added."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif PREC == "fp64":
        c = tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee").to(tl.float32)
        return c if acc is None else acc + c
    else:
        return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _logits(q, K_base, KM_base, stride_kn, stride_kd, stride_kmn, offs_n, offs_d, q_pos, N_K, causal_off,
            qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
            HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """[ROWS, BLOCK_N] logits in log2 units of one key block; -inf where a key does not count.

    MASKED False: every key of the block is < N_K and visible to every row (left of the diagonal).
    MASKED True: the diagonal / ragged tail: the causal mask and the key-tail mask are applied.
    """
    n_ok = offs_n < N_K                                             # key tail (ragged Nk)
    kt = tl.load(K_base + offs_n.to(tl.int64)[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                 mask=n_ok[None, :] & (offs_d < HEAD_DIM)[:, None], other=0.0)           # [BLOCK_D, BLOCK_N]
    qk = _mm(q, kt, None, PREC=PREC) * qk_scale                     # [ROWS, BLOCK_N]
    if MASKED:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))             # keys past Nk never count
        if CAUSAL:                                                  # bottom-right causal diagonal
            qk = tl.where(offs_n[None, :] <= q_pos[:, None] + causal_off, qk, float("-inf"))
    if HAS_MASK:
        keep = tl.load(KM_base + offs_n.to(tl.int64) * stride_kmn, mask=n_ok, other=0) != 0
        if PREC == "fp64":      # a reduce over one row, which compiles to nothing, hides the 8-bit mask
            keep = tl.max(keep.to(tl.int32)[None, :], axis=0) != 0  # from triton 3.6's guess of p's width
        qk = tl.where(keep[None, :], qk, float("-inf"))             # left-padding keys never count
    return qk


@triton.jit
def _online_softmax(acc, m_i, l_i, qk, V_base, stride_vn, stride_vd, offs_n, offs_d, N_K,
                    HEAD_DIM: tl.constexpr, PREC: tl.constexpr):
    """Fold one key block's logits into the running max m_i, sum l_i and accumulator acc."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1))                           # finite: m_i starts at -1e30
    p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V_base + offs_n.to(tl.int64)[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=(offs_n < N_K)[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
    acc = _mm(p.to(v.dtype), v, acc * alpha[:, None], PREC=PREC)
    return acc, m_ij, l_i


# ----------------------------------------------------------------------------------------------------
# 1. Prefill forward: out and log-sum-exp

@triton.jit
def _fwd_inner(acc, m_i, l_i, q, q_pos, K_base, V_base, KM_base, stride_kn, stride_kd, stride_vn,
               stride_vd, stride_kmn, offs_d, lo, hi, N_K, causal_off, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Keys [lo, hi) in blocks of BLOCK_N."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = _logits(q, K_base, KM_base, stride_kn, stride_kd, stride_kmn, offs_n, offs_d, q_pos, N_K,
                     causal_off, qk_scale, MASKED=MASKED, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK,
                     HEAD_DIM=HEAD_DIM, PREC=PREC)
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, qk, V_base, stride_vn, stride_vd, offs_n, offs_d, N_K,
                                        HEAD_DIM=HEAD_DIM, PREC=PREC)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["H_Q", "G", "N_Q", "N_K", "skmb"])
def _fwd_kernel(Q, K, V, KM, Out, Lse,
                sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                sob, soh, som, sod, skmb, skmn,
                H_Q, G, N_Q, N_K, qk_scale,
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
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail (D = 80, 96)
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
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, offs_m, K_base, V_base, KM_base, skn, skd, svn, svd, skmn,
                               offs_d, 0, diag, N_K, causal_off, qk_scale, MASKED=False, CAUSAL=CAUSAL,
                               HAS_MASK=HAS_MASK, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, PREC=PREC)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, offs_m, K_base, V_base, KM_base, skn, skd, svn, svd, skmn,
                               offs_d, diag, hi, N_K, causal_off, qk_scale, MASKED=True, CAUSAL=CAUSAL,
                               HAS_MASK=HAS_MASK, HEAD_DIM=HEAD_DIM, BLOCK_N=BLOCK_N, PREC=PREC)
    # epilogue: a row that saw no key has l_i = 0: output 0 and lse = +inf (its probabilities are 0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / _LOG2E)
    tl.store(Out + b * sob + h * soh + offs_m64[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + (b * H_Q + h) * N_Q + offs_m64, lse, mask=m_ok)


# ----------------------------------------------------------------------------------------------------
# 2. Prefill scores: key-block-major pass over the queries, probabilities recomputed from the lse

@triton.jit
def _score_inner(acc, kb, Q_all, b, h, sqb, sqh, Lse_base, sqm, sqd, offs_d, offs_n, lo, hi, N_Q, causal_off,
                 qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, PREC: tl.constexpr, Q_TMA: tl.constexpr):
    """acc[n] += sum over queries m in [lo, hi) of exp(scale * q_m.k_n - lse_m), for query head h of batch b.

    MASKED False: every query of [lo, hi) sees every key of the block. True: the causal diagonal band.
    Q_all: all of q, a tensor descriptor [B, Hq, Nq, D] (Q_TMA) or a pointer.
    """
    d_ok = offs_d < HEAD_DIM                                        # head-dim tail
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_Q                                         # query tail (ragged Nq)
        offs_m64 = offs_m.to(tl.int64)
        if Q_TMA:                                                   # out-of-range rows and columns read 0
            tile = Q_all.load([b.to(tl.int32), h, start_m, 0])                   # [1, 1, BLOCK_M, BLOCK_D]
            qt = tl.trans(tl.reshape(tile, [BLOCK_M, BLOCK_D]))                      # [BLOCK_D, BLOCK_M]
        else:
            qt = tl.load(Q_all + b * sqb + h.to(tl.int64) * sqh + offs_m64[None, :] * sqm + offs_d[:, None] * sqd,
                         mask=m_ok[None, :] & d_ok[:, None], other=0.0)              # [BLOCK_D, BLOCK_M]
        # padded query rows and rows that see no key have lse = +inf, so their probabilities are 0
        lse2 = tl.load(Lse_base + offs_m64, mask=m_ok, other=float("inf")) * _LOG2E
        p = tl.math.exp2(_mm(kb, qt, None, PREC=PREC) * qk_scale - lse2[None, :])   # [BLOCK_N, BLOCK_M]
        if MASKED:
            if CAUSAL:                                              # bottom-right causal diagonal
                p = tl.where(offs_n[:, None] <= offs_m[None, :] + causal_off, p, 0.0)
        acc += tl.sum(p, 1)
    return acc


@triton.jit  # every int specialised (divisible by 16, == 1): 7-10% faster than generic lengths on the H100
def _score_kernel(Q, K, KM, Lse, Scores,
                  sqb, sqh, sqm, sqd, skb, skh, skn, skd, skmb, skmn,
                  H_Q, H_KV, G, HEADS_PER_PROG, N_Q, N_K, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                  HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_TMA: tl.constexpr):
    """Program (key block, (batch, KV head, head split)): the split's HEADS_PER_PROG query heads. Scores is
    [B, Hkv, N] when one program takes all G heads, else [B, Hkv, G // HEADS_PER_PROG, N] partials.
    Q_TMA: the query tiles come by the tensor memory accelerator (one descriptor, built here), which spares
    the pointer loads' per-element address arithmetic (see _q_tma for when)."""
    pid_n = tl.program_id(0)
    pid_x = tl.program_id(1)
    splits = G // HEADS_PER_PROG
    bh = pid_x // splits
    g_lo = (pid_x % splits) * HEADS_PER_PROG
    b = (bh // H_KV).to(tl.int64)
    hkv = bh % H_KV
    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N_K                                             # key tail (ragged Nk)
    offs_n64 = offs_n.to(tl.int64)
    kb = tl.load(K + b * skb + hkv.to(tl.int64) * skh + offs_n64[:, None] * skn + offs_d[None, :] * skd,
                 mask=n_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)       # [BLOCK_N, BLOCK_D]
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
    Q_all = Q
    if Q_TMA:                   # one descriptor per program (the pipeliner cannot take one built per head)
        Q_all = tl.make_tensor_descriptor(Q, shape=[tl.num_programs(1) // (H_KV * splits), H_Q, N_Q, HEAD_DIM],
                                          strides=[sqb, sqh, sqm, 1], block_shape=[1, 1, BLOCK_M, BLOCK_D])
    acc = tl.zeros([BLOCK_N], tl.float32)
    for g in range(g_lo, g_lo + HEADS_PER_PROG):                    # this program's query heads
        h = hkv * G + g
        Lse_base = Lse + (b * H_Q + h) * N_Q
        acc = _score_inner(acc, kb, Q_all, b, h, sqb, sqh, Lse_base, sqm, sqd, offs_d, offs_n, lo, full, N_Q,
                           causal_off, qk_scale, MASKED=True, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                           BLOCK_D=BLOCK_D, PREC=PREC, Q_TMA=Q_TMA)
        acc = _score_inner(acc, kb, Q_all, b, h, sqb, sqh, Lse_base, sqm, sqd, offs_d, offs_n, full, q_end, N_Q,
                           causal_off, qk_scale, MASKED=False, CAUSAL=CAUSAL, HEAD_DIM=HEAD_DIM, BLOCK_M=BLOCK_M,
                           BLOCK_D=BLOCK_D, PREC=PREC, Q_TMA=Q_TMA)
    keep = n_ok
    if HAS_MASK:
        km = tl.load(KM + b * skmb + offs_n64 * skmn, mask=n_ok, other=0)
        keep = keep & (km != 0)                                     # left-padding keys score 0
    tl.store(Scores + pid_x.to(tl.int64) * N_K + offs_n64, tl.where(keep, acc, 0.0), mask=n_ok)


# ----------------------------------------------------------------------------------------------------
# 3./4. Decode: split-K partials, then a fixed-order reduction and the scores

@triton.jit
def _store_decode_out(Out, acc, l_all, b, hkv, G, N_Q, sob, soh, som, sod, offs_r, offs_d, r_ok,
                      HEAD_DIM: tl.constexpr):
    """out rows r = (query head g, query i) of KV head hkv: acc / l (0 for a row that saw no key)."""
    out = acc / tl.where(l_all == 0.0, 1.0, l_all)[:, None]
    h64 = (hkv * G + offs_r // N_Q).to(tl.int64)
    qi = (offs_r % N_Q).to(tl.int64)
    tl.store(Out + b * sob + h64[:, None] * soh + qi[:, None] * som + offs_d[None, :] * sod,
             out.to(Out.dtype.element_ty), mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :])


@triton.jit
def _store_logit_scores(Scores_base, Lg_base, KM_base, stride_kmn, lse2, offs_r, r_ok, offs_n, N_K,
                        HAS_MASK: tl.constexpr):
    """Scores of keys offs_n from the stored logits [rows, N_K] (log2 units) and the rows' final lse2."""
    n_ok = offs_n < N_K                                             # key tail
    offs_n64 = offs_n.to(tl.int64)
    lg = tl.load(Lg_base + offs_r.to(tl.int64)[:, None] * N_K + offs_n64[None, :],
                 mask=r_ok[:, None] & n_ok[None, :], other=float("-inf"))            # [BLOCK_R, BLOCK_N]
    sc = tl.sum(tl.math.exp2(lg - lse2[:, None]), 0)
    if HAS_MASK:
        km = tl.load(KM_base + offs_n64 * stride_kmn, mask=n_ok, other=0)
        sc = tl.where(km != 0, sc, 0.0)                             # left-padding keys score 0
    tl.store(Scores_base + offs_n64, sc, mask=n_ok)


@triton.jit
def _lse2(m, total):
    """Log2-sum-exp of a row from its max and sum; +inf for a row that saw no key (its probabilities: 0)."""
    empty = total == 0.0
    return tl.where(empty, float("inf"), m + tl.math.log2(tl.where(empty, 1.0, total)))


@triton.jit
def _workspace(Work, PARTS, BLOCK_D: tl.constexpr):
    """The decode workspace, one float32 buffer: accumulators [PARTS, BLOCK_D], running max [PARTS],
    running sum [PARTS] (PARTS = B * Hkv * splits * BLOCK_R, 0 for one split), then the logits (none
    without SCORES)."""
    parts = PARTS.to(tl.int64)
    Mp = Work + parts * BLOCK_D
    Lp = Mp + parts
    return Work, Mp, Lp, Lp + parts


@triton.jit(do_not_specialize=["H_KV", "G", "N_Q", "N_K", "NUM_SPLITS", "PARTS", "skmb"])
def _decode_partial_kernel(Q, K, V, KM, Work, Out, Scores,
                           sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, skmb, skmn,
                           sob, soh, som, sod,
                           H_KV, G, N_Q, N_K, NUM_SPLITS, PARTS, qk_scale,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PREC: tl.constexpr,
                           SINGLE: tl.constexpr, SCORES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (split s, batch * KV head): key blocks s, s + NUM_SPLITS, s + 2 * NUM_SPLITS, ... for all
    G * Nq rows of the head. Interleaved, the head's programs stream adjacent blocks at any moment: on an H200
    1-1.5% faster than contiguous shares (MHA and GQA 32/8, 32k-128k keys, CUDA-graph replay).
    SINGLE (one split): also writes out and the scores, so short decode is one launch.
    SCORES False: no logits stored and no scores (Scores is never written)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    rows = G * N_Q
    offs_r = tl.arange(0, BLOCK_R)                                  # row r = (query head g, query i)
    r_ok = offs_r < rows                                            # row tail (G * Nq < BLOCK_R)
    qi = offs_r % N_Q
    offs_d = tl.arange(0, BLOCK_D)
    h64 = (hkv * G + offs_r // N_Q).to(tl.int64)
    q = tl.load(Q + b * sqb + h64[:, None] * sqh + qi.to(tl.int64)[:, None] * sqm + offs_d[None, :] * sqd,
                mask=r_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)        # [BLOCK_R, BLOCK_D]
    K_base = K + b * skb + hkv.to(tl.int64) * skh
    V_base = V + b * svb + hkv.to(tl.int64) * svh
    KM_base = KM + b * skmb
    Ap, Mp, Lp, Lg = _workspace(Work, PARTS, BLOCK_D=BLOCK_D)
    Lg_base = Lg + pid_bh.to(tl.int64) * rows * N_K                 # logits [rows, N_K] of this head
    lg_rows = offs_r.to(tl.int64)[:, None] * N_K
    m_i = tl.full([BLOCK_R], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    # decode is memory-bound: every block runs the masked variant (the masks cost nothing measurable)
    for start_n in range(pid_s * BLOCK_N, N_K, NUM_SPLITS * BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        qk = _logits(q, K_base, KM_base, skn, skd, skmn, offs_n, offs_d, qi, N_K, N_K - N_Q, qk_scale,
                     MASKED=True, CAUSAL=CAUSAL, HAS_MASK=HAS_MASK, HEAD_DIM=HEAD_DIM, PREC=PREC)
        if SCORES:
            tl.store(Lg_base + lg_rows + offs_n.to(tl.int64)[None, :], qk,
                     mask=r_ok[:, None] & (offs_n < N_K)[None, :])
        acc, m_i, l_i = _online_softmax(acc, m_i, l_i, qk, V_base, svn, svd, offs_n, offs_d, N_K,
                                        HEAD_DIM=HEAD_DIM, PREC=PREC)
    if SINGLE:
        _store_decode_out(Out, acc, l_i, b, hkv, G, N_Q, sob, soh, som, sod, offs_r, offs_d, r_ok,
                          HEAD_DIM=HEAD_DIM)
        if SCORES:
            lse2 = _lse2(m_i, l_i)
            tl.debug_barrier()                                      # the logits above, visible to all threads
            for start_n in range(0, N_K, BLOCK_N):
                _store_logit_scores(Scores + pid_bh.to(tl.int64) * N_K, Lg_base, KM_base, skmn, lse2, offs_r,
                                    r_ok, start_n + tl.arange(0, BLOCK_N), N_K, HAS_MASK=HAS_MASK)
    else:
        part = (pid_bh.to(tl.int64) * NUM_SPLITS + pid_s) * BLOCK_R
        tl.store(Mp + part + offs_r, m_i)
        tl.store(Lp + part + offs_r, l_i)
        tl.store(Ap + (part + offs_r)[:, None] * BLOCK_D + offs_d[None, :], acc)


@triton.jit
def _reduce_scores(Scores_base, Lg_base, KM_base, stride_kmn, Mp, Lp, part_s, s_ok, rows, start_n, N_K,
                   HAS_MASK: tl.constexpr, ROWS_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Scores of keys [start_n, +BLOCK_N): the rows' final lse from their split partials, then the logits."""
    offs_r = tl.arange(0, ROWS_R)
    part = part_s[:, None] + offs_r[None, :]
    m_s = tl.load(Mp + part, mask=s_ok[:, None], other=-1.0e30)     # [BLOCK_S, ROWS_R]
    l_s = tl.load(Lp + part, mask=s_ok[:, None], other=0.0)
    m_all = tl.max(m_s, 0)                                          # [ROWS_R]
    l_all = tl.sum(l_s * tl.math.exp2(m_s - m_all[None, :]), 0)
    _store_logit_scores(Scores_base, Lg_base, KM_base, stride_kmn, _lse2(m_all, l_all), offs_r, offs_r < rows,
                        start_n + tl.arange(0, BLOCK_N), N_K, HAS_MASK=HAS_MASK)


@triton.jit
def _reduce_out_row(Out_row, Ap, Mp, Lp, part_s, s_ok, sod, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """One row of out: the split accumulators weighted by exp2(m_split - m) and divided by the total sum."""
    m_s = tl.load(Mp + part_s, mask=s_ok, other=-1.0e30)            # [BLOCK_S]
    w = tl.math.exp2(m_s - tl.max(m_s, 0))                          # each split's weight; 0 past the tail
    total = tl.sum(tl.load(Lp + part_s, mask=s_ok, other=0.0) * w, 0)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.load(Ap + part_s[:, None] * BLOCK_D + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)                   # [BLOCK_D]
    tl.store(Out_row + offs_d * sod, out.to(Out_row.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["H_KV", "G", "N_Q", "N_K", "NUM_SPLITS", "PARTS", "skmb"])
def _decode_reduce_kernel(Work, KM, Out, Scores,
                          sob, soh, som, sod, skmb, skmn,
                          H_KV, G, N_Q, N_K, NUM_SPLITS, PARTS,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                          ROWS_R: tl.constexpr, BLOCK_S: tl.constexpr, HAS_MASK: tl.constexpr,
                          SCORES: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (block, batch * KV head). The first cdiv(N_K, BLOCK_N) blocks turn BLOCK_N keys' stored
    logits into scores (none without SCORES); each of the G * N_Q blocks after them writes one row of out.
    Every program combines the split partials of its rows itself, all splits at once and in the same fixed
    order (deterministic): one step each, since a loop over splits or keys in a few programs was
    latency-bound. The partials are laid out BLOCK_R rows apart (the partial kernel's tile, >= 16 for its
    dots); the score blocks take only ROWS_R = next_pow2(G * N_Q) rows, so that MHA's single row does not
    exponentiate 15 padding rows."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H_KV).to(tl.int64)
    hkv = pid_bh % H_KV
    Ap, Mp, Lp, Lg = _workspace(Work, PARTS, BLOCK_D=BLOCK_D)
    offs_s = tl.arange(0, BLOCK_S)
    part_s = (pid_bh.to(tl.int64) * NUM_SPLITS + offs_s) * BLOCK_R  # row 0 of each split's partials
    s_ok = offs_s < NUM_SPLITS                                      # split tail
    r = pid                                                         # out row r = (query head g, query i)
    if SCORES:
        key_blocks = tl.cdiv(N_K, BLOCK_N)
        r = pid - key_blocks
        rows = G * N_Q
        if pid < key_blocks:
            _reduce_scores(Scores + pid_bh.to(tl.int64) * N_K, Lg + pid_bh.to(tl.int64) * rows * N_K,
                           KM + b * skmb, skmn, Mp, Lp, part_s, s_ok, rows, pid * BLOCK_N, N_K, HAS_MASK=HAS_MASK,
                           ROWS_R=ROWS_R, BLOCK_N=BLOCK_N)
    if r >= 0:
        h = (hkv * G + r // N_Q).to(tl.int64)
        _reduce_out_row(Out + b * sob + h * soh + (r % N_Q).to(tl.int64) * som, Ap, Mp, Lp, part_s + r, s_ok, sod,
                        HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D)


# ----------------------------------------------------------------------------------------------------
# Launching. Every kernel takes its tensors first, then ints, then (all but the reduce kernel) one float.
# A _Launch is one kernel launch of a call minus its tensors: each call binds its own, by position in the
# call's tensor tuple. triton's kernel[grid](...) binds ~40 arguments, builds a specialisation key and
# parses options on every call; after its first launch a _Launch keeps the compiled kernel and calls its
# C launcher directly, the tensors passed as raw pointers (a tensor would cost a driver query each).

# A direct launch (_Launch.keep and .launch, _compile_together, _build_launcher) calls triton's internals:
# a compiled kernel's run, function and packed_metadata, the launcher's argument order, the driver's
# launcher_cls, AsyncCompileMode. They were written against and run on these triton releases; under any
# other, every launch goes through triton's public kernel[grid](...): the same kernels, more host time a call.
DIRECT_LAUNCH_TRITON = ("3.6",)


def _direct_launch_tested(version: str) -> bool:
    """Whether triton `version` (e.g. "3.6.0", "3.6.0+git1234") is a release the direct launch was run on."""
    return ".".join(version.split("+")[0].split(".")[:2]) in DIRECT_LAUNCH_TRITON


_DIRECT_LAUNCH = not _INTERPRET and _direct_launch_tested(triton.__version__)
_COMPILED = {}                # _specialisation(...) -> compiled kernel, shared by every launch that matches


class _Launch:
    __slots__ = ("kernel", "grid", "slots", "arity", "scalars", "warps", "stages", "constexprs", "direct",
                 "descriptors")

    def __init__(self, kernel, grid, slots, scalars, warps, stages, constexprs):
        self.kernel, self.grid, self.scalars, self.constexprs = kernel, grid, scalars, constexprs
        self.slots, self.arity = operator.itemgetter(*slots), len(slots)     # call's tensors -> this kernel's
        self.warps, self.stages = warps, stages
        self.direct = None        # once compiled: (launcher, function, metadata, grid x, grid y, trailing args)
        self.descriptors = constexprs.get("Q_TMA", False)   # builds tensor descriptors: see _descriptor_scratch

    def through_triton(self, tensors, warmup=False):
        args = (*self.slots(tensors), *self.scalars)
        options = dict(num_warps=self.warps, num_stages=self.stages, **self.constexprs)
        if warmup:                                                  # compile only
            return self.kernel.warmup(*args, grid=self.grid, **options)
        if self.descriptors:
            _descriptor_scratch()
        return self.kernel[self.grid](*args, **options)

    def keep(self, compiled):
        trailing = [self.constexprs[name] for name in self.kernel.arg_names[self.arity + len(self.scalars):]]
        launcher = compiled.run                      # first: this loads the module and sets .function
        self.direct = (launcher, compiled.function, compiled.packed_metadata, self.grid[0], self.grid[1],
                       (*self.scalars, *trailing))

    def launch(self, tensors, stream):
        launcher, function, metadata, grid_x, grid_y, trailing = self.direct
        if self.descriptors:
            _descriptor_scratch()
        launcher(grid_x, grid_y, 1, stream, function, metadata, None, None, None,
                 *[t.data_ptr() for t in self.slots(tensors)], *trailing)


def _specialisation(device, launch, tensors):
    """What triton specialises a launch on (a finer key is safe: it only adds entries): each tensor's dtype
    and 16-byte alignment; each int's divisibility by 16, == 1 and 32-bit range."""
    return (launch.kernel, device, launch.warps, launch.stages, *launch.constexprs.values(),
            *[(t.dtype, t.data_ptr() & 15 == 0) for t in launch.slots(tensors)],
            *[(a & 15 == 0) + 2 * (a == 1) + 4 * (a > 0x7FFFFFFF) for a in launch.scalars if type(a) is int])


def _compile_together(launches, tensors):
    """Compile several new specialisations at once. Cold, each costs ~0.3 s of LLVM and ptxas and ~0.3 s of
    C compiler for triton's launcher stub, which triton builds when the kernel is first loaded, one after
    another on the main thread: the stubs are built here too, on the compiling threads (subprocesses run
    outside the GIL), so the main thread's load finds them built."""
    try:
        from concurrent.futures import ThreadPoolExecutor

        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:                                             # a triton without it: one at a time
        return
    with ThreadPoolExecutor(2 * len(launches)) as pool:
        with AsyncCompileMode(pool):
            kernels = [launch.through_triton(tensors, warmup=True) for launch in launches]
        for kernel in kernels:
            pool.submit(_build_launcher, kernel)


def _build_launcher(kernel):
    """Build (into triton's cache) the launcher stub the compiled kernel will load; errors resurface at the load."""
    compiled = kernel.result() if hasattr(kernel, "result") else kernel
    triton.runtime.driver.active.launcher_cls(compiled.src, compiled.metadata)


def _first_run(launches, tensors, device, stream):
    """A plan's first call: each launch finds its compiled kernel by specialisation, or launches through
    triton, which compiles it (new ones together); either way it keeps the kernel for direct launches."""
    keys = [_specialisation(device, launch, tensors) for launch in launches]
    new = [launch for launch, key in zip(launches, keys) if key not in _COMPILED]
    if len(new) > 1:
        _compile_together(new, tensors)
    for launch, key in zip(launches, keys):
        compiled = _COMPILED.get(key)
        if compiled is None:                                        # triton compiles (or loads) and launches
            compiled = launch.through_triton(tensors)
            _COMPILED[key] = compiled = compiled.result() if hasattr(compiled, "result") else compiled
            launch.keep(compiled)
        else:
            launch.keep(compiled)
            launch.launch(tensors, stream)


def _run(launches, tensors):
    """Launch in order with this call's tensors. Launch hooks (profilers) and the interpreter always go
    through triton."""
    hooks = triton.knobs.runtime
    if not _DIRECT_LAUNCH or hooks.launch_enter_hook.calls or hooks.launch_exit_hook.calls:
        for launch in launches:
            launch.through_triton(tensors)
        return
    device = tensors[0].get_device()
    if device != torch.cuda.current_device():                       # the module and stream of q's device
        with torch.cuda.device(device):
            return _run(launches, tensors)
    stream = torch._C._cuda_getCurrentRawStream(device)
    if launches[0].direct is None or launches[-1].direct is None:   # a plan's launches are kept together
        return _first_run(launches, tensors, device, stream)
    for launch in launches:
        launch.launch(tensors, stream)


_SCRATCH = {}                 # (device, stream) -> the float32 decode workspace, reused by the next call


def _scratch(numel, device):
    """A float32 buffer of at least numel elements for one call's intermediates. Calls on one stream run in
    order, so each stream reuses one buffer (grown as needed); under CUDA-graph capture a fresh one, which
    the graph keeps."""
    if _INTERPRET or torch.cuda.is_current_stream_capturing():
        return torch.empty(numel, dtype=torch.float32, device=device)
    key = (device, torch._C._cuda_getCurrentRawStream(device.index))
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:      # grown by doubling: a cache growing by a key a step reallocates rarely
        size = max(numel, 1 << 16, 2 * buf.numel() if buf is not None else 0)
        buf = _SCRATCH[key] = torch.empty(size, dtype=torch.float32, device=device)
    return buf


# ----------------------------------------------------------------------------------------------------
# Python side: checks, launch parameters, routes

def _check_inputs(q, k, v, key_mask, scale, validate):
    """The reference's checks (shapes, devices, key_mask, scale, validate), then what the kernels add."""
    _ref.check_attention_inputs(q, k, v, key_mask, scale, validate, dtypes=_SUPPORTED_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v: expected one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d} not supported by cab_fast (1 .. {MAX_HEAD_DIM})")
    if not (q.is_cuda or _INTERPRET):
        raise ValueError(f"q: cab_fast runs Triton kernels on a CUDA device, got a {q.device.type} tensor; "
                         f"use cab_reference.attention on CPU, or set TRITON_INTERPRET=1 before importing "
                         f"triton to run these kernels in the (slow) interpreter")


def _prec(dtype):
    """The dots' precision. Half inputs: native. fp32 inputs: float64 products and sums (the reference uses
    no tf32), on the tensor cores: triton's fp32 "ieee" dot runs on the FMA units, 4-38x slower in prefill
    on an H200 (4k, D=128: 58.8 ms against 1.53), and as one FMA chain over D it took a decode output to 5x
    PyTorch's own fp32 error on peaked logits (NOTES section 5, Tolerances)."""
    if _INTERPRET and dtype == torch.bfloat16:
        return "upcast"
    return "fp64" if dtype == torch.float32 else "tf32"


def _mask_args(key_mask):
    """(batch stride, key stride, HAS_MASK) of key_mask, zeros without one."""
    return (0, 0, False) if key_mask is None else (*key_mask.stride(), True)


def _mask_tensor(key_mask, k):
    """The mask the kernels read: key_mask as bytes (same storage, no copy); without one, k stands in as a
    pointer never read."""
    return k if key_mask is None else key_mask.view(torch.uint8)


def _out_layout(q):
    """(size, stride) of out: [B, Nq, Hq, D] memory seen as [B, Hq, Nq, D]. transformers wants the former,
    so its transpose(1, 2).contiguous() becomes free."""
    b, hq, nq, d = q.shape
    return (b, hq, nq, d), (nq * hq * d, d, hq * d, 1)


# A call's tensors, in this order (a launch names its kernel's by position; a decode call has no lse, a
# prefill call no workspace).
_Q, _K, _V, _KM, _OUT, _LSE, _SCORES, _WORK = range(8)


def _fwd_launch(q, k, v, key_mask, qk_scale, causal, tile):
    """Kernel 1 over (q, k, v, km, out, lse) of a prefill call."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    skmb, skmn, has_mask = _mask_args(key_mask)
    bm, bn, warps, stages = tile
    out_stride = _out_layout(q)[1]
    return _Launch(_fwd_kernel, (_cdiv(nq, bm), b * hq), (_Q, _K, _V, _KM, _OUT, _LSE),
                   (*q.stride(), *k.stride(), *v.stride(), *out_stride, skmb, skmn, hq, hq // hkv, nq, nk,
                    qk_scale), warps, stages,
                   dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_MASK=has_mask, PREC=_prec(q.dtype),
                        BLOCK_M=bm, BLOCK_N=bn))


def _prefill_class(q, k, causal, key_mask):
    """The shape class a prefill kernel is autotuned for (CAB_AUTOTUNE=1)."""
    return _shape_class(q.shape[2]), _shape_class(k.shape[2]), causal, key_mask is not None


def _fwd_tile(q, k, v, key_mask, qk_scale, causal):
    return _tile("fwd", q, _block_d(q.shape[-1]), _prefill_class(q, k, causal, key_mask),
                 lambda t: _fwd_triton(q, k, v, key_mask, qk_scale, causal, t))


def _fwd_triton(q, k, v, key_mask, qk_scale, causal, tile=None):
    """Kernel 1 alone: (out [B, Hq, Nq, D], lse [B, Hq, Nq] float32, natural log, scale included)."""
    launch = _fwd_launch(q, k, v, key_mask, qk_scale, causal, tile or _fwd_tile(q, k, v, key_mask, qk_scale, causal))
    out = torch.empty_strided(*_out_layout(q), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    _run((launch,), (q, k, v, _mask_tensor(key_mask, k), out, lse))
    return out, lse


def _fwd_cudnn(q, k, v, scale, causal):
    """The vendor forward: cuDNN SDPA returns out and the natural-log lse [B, H, N(, 1)] with the scale
    included (checked against kernel 1 in test_equivalence.py). Grouped heads are passed as they are
    (query head h uses KV head h // G, as in SDPA's enable_gqa); K/V are not repeated. Its causal mask is
    top-left aligned, equal to ours only when Nq == Nk (_cudnn_ok checks)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, compute_log_sumexp=True, dropout_p=0.0, is_causal=causal, return_debug_mask=False,
        scale=scale)[:2]
    return out, lse.reshape(q.shape[0], q.shape[1], q.shape[2]).float()


_SMALL_PREFILL = 1 << 18       # Nq * Nk below which a prefill is host-bound (Triton's launch is cheaper than cuDNN's)


def _cudnn_ok(q, k, key_mask, causal):
    return (key_mask is None and q.is_cuda and q.dtype != torch.float32 and q.shape[-1] in (64, 128)
            and (not causal or q.shape[2] == k.shape[2]) and q.stride(-1) == 1 and k.stride(-1) == 1
            and q.shape[2] * k.shape[2] >= _SMALL_PREFILL)


_TMA_PREFILL = 1 << 24         # Nq * Nk from which the score pass loads q by TMA


def _q_tma(q, k):
    """Whether the score pass loads q's tiles by TMA: half inputs with head dims up to 128 on sm90 and later,
    contiguous rows, every head's base and row stride on 16-byte boundaries (TMA's rule; other inputs, a
    misaligned view say, take pointer loads), and Nq * Nk >= _TMA_PREFILL. On an H200 (bf16, D=128, causal,
    c5c5172) TMA took the pass from 4k to 32k 7-13% faster, but at 1k twice as slow (0.059 ms, not 0.030:
    each program builds its descriptor and has little else to do)."""
    arch = _device(q)[0][0]
    size = q.element_size()
    return (q.dtype != torch.float32 and _block_d(q.shape[-1]) <= 128 and (_INTERPRET or arch >= (9, 0))
            and q.shape[2] * k.shape[2] >= _TMA_PREFILL and q.stride(-1) == 1 and q.data_ptr() % 16 == 0
            and all(s * size % 16 == 0 for s in q.stride()[:3]))


def _score_launch(q, k, key_mask, qk_scale, causal, tile, splits):
    """Kernel 2 over (q, k, km, lse, scores) of a prefill call. scores is [B, Hkv, Nk], or with splits > 1
    programs per group [B, Hkv, splits, Nk]: partials of G // splits query heads each, summed afterwards in
    a fixed order."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    skmb, skmn, has_mask = _mask_args(key_mask)
    bm, bn, warps, stages = tile
    return _Launch(_score_kernel, (_cdiv(nk, bn), b * hkv * splits), (_Q, _K, _KM, _LSE, _SCORES),
                   (*q.stride(), *k.stride(), skmb, skmn, hq, hkv, hq // hkv, hq // hkv // splits, nq, nk,
                    qk_scale), warps, stages,
                   dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, HAS_MASK=has_mask, PREC=_prec(q.dtype),
                        BLOCK_M=bm, BLOCK_N=bn, Q_TMA=_q_tma(q, k)))


def _torch_scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")     # the current device: _run's guard set it


def _descriptor_scratch():
    """A kernel that builds tensor descriptors needs a little global memory per launch, which triton asks
    of the allocator set in the calling context (triton.set_allocator); where the caller set none, torch's
    (stream-ordered, and captured into a CUDA graph's pool under capture)."""
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_torch_scratch)


def _scores_shape(k, splits):
    b, hkv, nk = k.shape[:3]
    return (b, hkv, nk) if splits == 1 else (b, hkv, splits, nk)


def _summed(scores, splits):
    return scores if splits == 1 else scores.sum(2)


def _score_tile(q, k, v, key_mask, qk_scale, causal, lse=None):
    """The score pass's tile (CAB_AUTOTUNE=1: timed on this call, with the lse of kernel 1 if none is given)."""
    def timed(tile):
        nonlocal lse
        lse = _fwd_triton(q, k, v, key_mask, qk_scale, causal)[1] if lse is None else lse
        _scores_triton(q, k, key_mask, lse, qk_scale, causal, tile, head_splits=1)
    return _tile("score", q, _block_d(q.shape[-1]), _prefill_class(q, k, causal, key_mask), timed)


def _head_splits(q, k, causal, tile):
    """Programs per group in the score pass: one per query head (partials summed afterwards) when the query
    tiles come by TMA, or when B * Hkv * key blocks programs are fewer than 8 per SM; else one program takes
    its key block for all G query heads. Under a causal mask the first key blocks see every query and the
    last almost none, so with few programs the longest decides. GQA 32/8, D=128, one program per query head
    against one per group: pointer loads on an H100, 4k 0.21 ms (not 0.31), 8k 0.66 (0.89), 16k 2.49 (2.80),
    32k (2048 programs) 10.4 (9.6); TMA on an H200 (a probe), 4k 0.19 (0.30), 16k 2.29 (2.75), 32k 8.55
    (9.36). Not for small problems: the partials' sum would cost more host time than it saves."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    few = _cdiv(nk, tile[1]) * b * hkv < 8 * _device(q)[1]
    return hq // hkv if hq > hkv and (few or _q_tma(q, k)) and nq * nk >= _SMALL_PREFILL else 1


def _scores_triton(q, k, key_mask, lse, qk_scale, causal, tile=None, head_splits=None):
    """Kernel 2 alone: scores [B, Hkv, Nk] float32 from q, k and the saved lse."""
    tile = tile or _score_tile(q, k, None, key_mask, qk_scale, causal, lse)
    splits = head_splits or _head_splits(q, k, causal, tile)
    scores = torch.empty(_scores_shape(k, splits), dtype=torch.float32, device=q.device)
    _run((_score_launch(q, k, key_mask, qk_scale, causal, tile, splits),),
         (q, k, None, _mask_tensor(key_mask, k), None, lse, scores))
    return _summed(scores, splits)


def _prefill_plan(q, k, v, key_mask, scale, causal, forward):
    """run(q, k, v, key_mask) -> (out, scores): a forward for out and lse (cuDNN's where it applies and
    forward is "auto", or as forced: "cudnn" | "triton"), then the score pass."""
    qk_scale = scale * _LOG2E.value
    cudnn = forward == "cudnn" or (forward == "auto" and _cudnn_ok(q, k, key_mask, causal))
    fwd = () if cudnn else (_fwd_launch(q, k, v, key_mask, qk_scale, causal,
                                        _fwd_tile(q, k, v, key_mask, qk_scale, causal)),)
    tile = _score_tile(q, k, v, key_mask, qk_scale, causal)
    splits = _head_splits(q, k, causal, tile)
    launches = (*fwd, _score_launch(q, k, key_mask, qk_scale, causal, tile, splits))
    out_layout, lse_shape, scores_shape = _out_layout(q), tuple(q.shape[:3]), _scores_shape(k, splits)
    dtype, device = q.dtype, q.device
    fallback = None

    def run(q, k, v, key_mask):
        nonlocal fallback
        if cudnn:
            try:
                out, lse = _fwd_cudnn(q, k, v, scale, causal)
            except RuntimeError:                                    # e.g. an older cuDNN refusing Hq != Hkv
                if forward == "cudnn":
                    raise
                fallback = fallback or _prefill_plan(q, k, v, key_mask, scale, causal, "triton")
                return fallback(q, k, v, key_mask)
        else:
            out = torch.empty_strided(*out_layout, dtype=dtype, device=device)
            lse = torch.empty(lse_shape, dtype=torch.float32, device=device)
        scores = torch.empty(scores_shape, dtype=torch.float32, device=device)
        _run(launches, (q, k, v, _mask_tensor(key_mask, k), out, lse, scores))   # a first call compiles both at once
        return out, _summed(scores, splits)
    return run


def _dense_sdpa_ok(q, k, key_mask, causal):
    """Whether this call is one dense attention makes through SDPA: on a CUDA GPU, no key mask, and a causal
    mask only where Nq == Nk (SDPA's is top-left aligned, ours bottom-right)."""
    return key_mask is None and q.is_cuda and (not causal or q.shape[2] == k.shape[2])


def _forward_plan(q, k, v, key_mask, scale, causal, forward):
    """run(q, k, v, key_mask) -> (out, None): a prefill without the score pass. On "auto", a call that dense
    attention would make (_dense_sdpa_ok) goes to SDPA's default backend, K/V unrepeated, so that it costs
    what dense prefill costs; anything else to kernel 1 (its lse written, never read), or to cuDNN's
    forward where forced ("cudnn")."""
    if forward == "auto" and _dense_sdpa_ok(q, k, key_mask, causal):
        gqa = q.shape[1] != k.shape[1]
        return lambda q, k, v, key_mask: (torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa), None)
    if forward == "cudnn":
        return lambda q, k, v, key_mask: (_fwd_cudnn(q, k, v, scale, causal)[0], None)
    qk_scale = scale * _LOG2E.value
    launch = _fwd_launch(q, k, v, key_mask, qk_scale, causal, _fwd_tile(q, k, v, key_mask, qk_scale, causal))
    out_layout, lse_shape, dtype, device = _out_layout(q), tuple(q.shape[:3]), q.dtype, q.device

    def run(q, k, v, key_mask):
        out = torch.empty_strided(*out_layout, dtype=dtype, device=device)
        lse = torch.empty(lse_shape, dtype=torch.float32, device=device)
        _run((launch,), (q, k, v, _mask_tensor(key_mask, k), out, lse))
        return out, None
    return run


_MIN_SPLIT = 16 if _INTERPRET else 256    # decode keys one program takes before they are split
_MAX_SPLITS = 128                         # the reduce kernel combines at most this many splits at once


def _reduce_block_n(rows_r):
    return 16 if _INTERPRET else max(16, min(1024, 16384 // rows_r))    # [ROWS_R, BLOCK_N] <= 16384


def _decode_block_r(q, k):
    """Rows of one decode program: the Nq * G queries of a KV head, padded to a power of two >= 16."""
    return max(16, _next_pow2(q.shape[1] // k.shape[1] * q.shape[2]))


def _decode_fit(tile, rows, block_d, fp32, shared):
    """The decode tile for a block of `rows` rows, or None where none fits: tiles are chosen at 16 rows, and
    more rows hold larger query and logit blocks (on an H100, 128 keys x 64 rows x 3 stages at D=128 asks for
    240 KB of its 227, and triton refuses the launch): fewer keys per block, then fewer stages, until it fits."""
    block_n, warps, stages, per_sm = tile
    while block_n > 16 and _shared_bytes("decode", (block_n, warps, stages, per_sm), block_d, fp32, rows) > shared:
        block_n //= 2
    while stages > 1 and _shared_bytes("decode", (block_n, warps, stages, per_sm), block_d, fp32, rows) > shared:
        stages -= 1
    fits = _shared_bytes("decode", (block_n, warps, stages, per_sm), block_d, fp32, rows) <= shared
    return (block_n, warps, stages, per_sm) if fits else None


def _decode_fits(q, k):
    """Whether the decode kernels fit this call on q's GPU (fp32 with 64 rows at D >= 128 does not on 99 KB
    GPUs); where not, "auto" takes the prefill kernels."""
    return _decode_fit((16, 4, 1, 1), _decode_block_r(q, k), _block_d(q.shape[-1]), q.dtype == torch.float32,
                       _device(q)[0][2]) is not None


def _decode_launches(q, k, v, key_mask, qk_scale, causal, tile, scores=True):
    """Kernels 3 and 4 over (q, k, v, km, out, scores, work) of a decode call (one launch when one split
    covers the keys), and the float32 workspace they need. scores=False: no logits in the workspace, no
    score blocks in the reduce kernel's grid, and out stands in for the scores (a pointer never written)."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    g = hq // hkv
    rows = g * nq
    block_r = _decode_block_r(q, k)
    block_d = _block_d(d)
    skmb, skmn, has_mask = _mask_args(key_mask)
    fit = _decode_fit(tile, block_r, block_d, q.dtype == torch.float32, _device(q)[0][2])
    if fit is None:
        raise ValueError(f"route 'decode': {rows} query rows per KV head at head dim {d} do not fit this GPU's shared "
                         f"memory in any decode tile; the prefill route takes them")
    block_n, warps, stages, per_sm = fit
    want = min(_MAX_SPLITS, max(1, per_sm * _device(q)[1] // (b * hkv)))     # programs to fill the GPU
    share = _cdiv(max(_cdiv(nk, want), _MIN_SPLIT), block_n) * block_n       # keys a program takes, +- a block
    splits = _cdiv(nk, share)
    parts = b * hkv * splits * block_r if splits > 1 else 0        # one (batch, KV head, split, row) each
    work = parts * (block_d + 2) + (b * hkv * rows * nk if scores else 0)
    out_stride = _out_layout(q)[1]
    scores_slot = _SCORES if scores else _OUT
    partial = _Launch(_decode_partial_kernel, (splits, b * hkv), (_Q, _K, _V, _KM, _WORK, _OUT, scores_slot),
                      (*q.stride(), *k.stride(), *v.stride(), skmb, skmn, *out_stride,
                       hkv, g, nq, nk, splits, parts, qk_scale), warps, stages,
                      dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, CAUSAL=causal, HAS_MASK=has_mask,
                           PREC=_prec(q.dtype), SINGLE=splits == 1, SCORES=scores, BLOCK_N=block_n))
    if splits == 1:
        return (partial,), work
    rows_r = _next_pow2(rows)
    red_n = _reduce_block_n(rows_r)
    key_blocks = _cdiv(nk, red_n) if scores else 0
    reduce = _Launch(_decode_reduce_kernel, (key_blocks + rows, b * hkv), (_WORK, _KM, _OUT, scores_slot),
                     (*out_stride, skmb, skmn, hkv, g, nq, nk, splits, parts), 8, 3,
                     dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, ROWS_R=rows_r,
                          BLOCK_S=max(16, _next_pow2(splits)), HAS_MASK=has_mask, SCORES=scores, BLOCK_N=red_n))
    return (partial, reduce), work


def _decode_plan(q, k, v, key_mask, scale, causal, tile=None, scores=True):
    """run(q, k, v, key_mask) -> (out, scores) by the split-K decode kernels; (out, None) without scores."""
    if tile is None:
        shape_class = (_shape_class(k.shape[2]), k.shape[0] * k.shape[1], _decode_block_r(q, k))
        tile = _tile("decode", q, _block_d(q.shape[-1]), shape_class,
                     lambda t: _decode_plan(q, k, v, key_mask, scale, causal, t, scores)(q, k, v, key_mask))
    launches, work = _decode_launches(q, k, v, key_mask, scale * _LOG2E.value, causal, tile, scores)
    out_layout, scores_shape, dtype, device = _out_layout(q), tuple(k.shape[:3]), q.dtype, q.device

    def run(q, k, v, key_mask):
        out = torch.empty_strided(*out_layout, dtype=dtype, device=device)
        summed = torch.empty(scores_shape, dtype=torch.float32, device=device) if scores else None
        _run(launches, (q, k, v, _mask_tensor(key_mask, k), out, None, summed, _scratch(work, device)))
        return out, summed
    return run


def _decode(q, k, v, scale, causal, key_mask, tile=None):
    return _decode_plan(q, k, v, key_mask, scale, causal, tile)(q, k, v, key_mask)


# ----------------------------------------------------------------------------------------------------
# Plans. What a call launches follows from its inputs' metadata alone: shapes, strides, dtypes, device and
# 16-byte alignment (which triton specialises on), with scale, causal, the route and whether scores are
# wanted. A plan is made, and the checks run, once per metadata; a later call with the same metadata (a decode
# step over a cache of static shape, as cab_fast.CabCache's is after its cut) only allocates its outputs,
# binds pointers and launches. A call of a new shape (a cache that grows by a key a step) makes a plan, its
# kernels found by specialisation in _COMPILED. The _PLAN_LIMIT most recently made plans are kept.

_PLANS = {}
_PLAN_LIMIT = 256


def _metadata(t):
    return t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15


def _plan(q, k, v, key_mask, scale, causal, route, validate, scores):
    """The plan for this call's metadata: kept, or made after the checks (validate=True always checks)."""
    try:
        key = (*_metadata(q), *_metadata(k), *_metadata(v), None if key_mask is None else _metadata(key_mask),
               type(scale), scale, causal, route, scores)
        plan = _PLANS.get(key)
    except (AttributeError, TypeError, RuntimeError):   # not tensors, an unhashable scale: the checks say
        key = plan = None
    if plan is None or validate:
        _check_inputs(q, k, v, key_mask, scale, validate)
    if plan is None:
        plan = _new_plan(q, k, v, key_mask, scale, causal, route, scores)
        if key is not None:
            if len(_PLANS) >= _PLAN_LIMIT:
                _PLANS.pop(next(iter(_PLANS)), None)                # the oldest
            _PLANS[key] = plan
    return plan


def _new_plan(q, k, v, key_mask, scale, causal, route, scores):
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if nq == 0 or nk == 0 or b == 0:
        return lambda q, k, v, key_mask: (
            torch.zeros_like(q), torch.zeros(b, hkv, nk, dtype=torch.float32, device=q.device) if scores else None)
    if route == "decode" or (route == "auto" and nq * (hq // hkv) <= DECODE_MAX_ROWS and _decode_fits(q, k)):
        return _decode_plan(q, k, v, key_mask, scale, causal, scores=scores)
    forward = {"auto": "auto", "prefill": "triton", "cudnn": "cudnn"}[route]
    if not scores:
        return _forward_plan(q, k, v, key_mask, scale, causal, forward)
    return _prefill_plan(q, k, v, key_mask, scale, causal, forward)


def _attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=False, route="auto", scores=True):
    """attention() with the route exposed for tests and bench.py: "auto", "prefill" (Triton forward),
    "cudnn" (vendor forward + score kernel), "decode" (split-K kernels). scores=False: (out, None), and no
    score work is launched (for caches whose policy does not rank by scores, see CabCache)."""
    return _plan(q, k, v, key_mask, scale, causal, route, validate, scores)(q, k, v, key_mask)


def attention(q, k, v, *, scale=None, causal=True, key_mask=None, validate=False):
    """Scaled dot-product attention that also returns how much attention every key received.

    Same contract as cab_reference.attention (see its docstring for the math): out [B, Hq, Nq, D] in q's
    dtype, scores [B, Hkv, Nk] float32 = probabilities summed over queries and the G heads of a group.
    Inputs: fp16, bf16 or fp32 on a CUDA device (or CPU under TRITON_INTERPRET=1).

    Values are not inspected (validate=False, the default), as in SDPA and FlashAttention: the call reads
    q, k, v once and never waits for the GPU; a NaN or +inf input makes the rows it reaches NaN (out and
    scores); a -inf logit acts as a masked key. validate=True checks first and raises a ValueError naming
    the tensor with NaN/inf (it reads the inputs once more and waits for the answer).
    """
    return _attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask, validate=validate)


# ---- fast cache ----
# The twin of cab_reference's eviction loop (its section 6) for generation: cab_fast.CabCache, the same
# constructor and methods as the reference's, switched with one word.
#
# What differs is where the state lives. The reference keeps each layer's tokens in position order and
# rebuilds every per-slot tensor (cat to append, gather to evict) at every step. Here, once a layer has been
# cut, its tokens move into preallocated per-slot buffers of capacity C = budget + evict_every, stacked over
# the layers (a SlotBank):
#   - a decode step writes the new token's key and value into a free slot (the slot an eviction freed);
#     nothing else is copied, and the attention runs over all C slots with the free ones masked;
#   - a cut ranks the slots with the reference's own `choose`, on a view sorted by position (the slots are
#     in no particular order, and the selection ranks by slot order: recency, ties to the later slot,
#     pooling over neighbours), once for all layers; the evicted slots become the free list;
#   - nothing asks the device for a value, so a decode step has static shapes and can be captured in a CUDA
#     graph: the next slot, the cursor into the free list and the next position are device tensors.
# The prompt, a Delayed policy's uncut prompt, and any call of more than one token after the cut (a question
# appended to a compressed cache, chunked prefill) run the reference's path on position-ordered tensors:
# the new tokens' bottom-right causal mask needs them after the old ones in position order, so the bank is
# compacted back into position order first (a gather, rare) and rebuilt at the next single-token step.

# the fast cache's transformers imports, where a reader sees them (pyproject.toml lets E402 pass here)
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

_CUT_ELEMENTS = 1 << 24       # a cut ranks at most this many slots at once (its temporaries scale with it)
_HELD_BYTES = 1 << 29         # prompt keys and values held at most for one cut of several layers (CabCache.hold)
_RETIRED_GRAPHS = []          # dead banks' cut graphs, destroyed outside any stream capture (SlotBank.__del__)


class SlotBank:
    """Every layer's cut cache in per-slot buffers, stacked over the layers; Ly layers, C slots each:

        keys, values [Ly, B, Hkv, C, D]    scores [Ly, B, Hkv, C] float32    positions [Ly, B, Hkv, C] int64
        valid [Ly, B, Hkv, C] bool         evidence {name: [Ly, B, Hkv, C]}  (the policy's, per slot)
        free [Ly, B, Hkv, C] int64         the slots the next tokens go to, in order (the first C - live)
        cursor [] int64                    index into free of the next token's slot
        next_slot [Ly, B, Hkv, 1] int64    free[cursor]: where the next token goes, per layer and head

    A free slot is masked (valid False) and already holds what its next token starts with: score 0, the
    policy's fill evidence and the position that token will have, so `positions < seen` marks the live slots.
    """

    def __init__(self, loop, n_layers, first):
        self.cut_graph = None      # first: __del__ reads it even when an allocation below fails (out of memory)
        b, h, live, d = first.keys.shape
        self.loop, self.budget, self.live = loop, first.budget, live
        cap = first.budget + loop.evict_every
        dev = first.keys.device
        shape = (n_layers, b, h, cap)
        self.keys = first.keys.new_zeros(shape + (d,))           # zeros: a masked slot still meets p = 0 in
        self.values = first.values.new_zeros(shape + (d,))       # p @ V, and 0 * NaN would be NaN
        self.scores = torch.zeros(shape, dtype=torch.float32, device=dev)
        self.valid = torch.zeros(shape, dtype=torch.bool, device=dev)
        self.positions = torch.empty(shape, dtype=torch.int64, device=dev)
        self.positions[..., live:] = first.seen + torch.arange(cap - live, device=dev)
        self.evidence = {name: torch.full(shape, self._fill(name), dtype=t.dtype, device=dev)
                         for name, t in first.evidence.items()}
        self.free = torch.zeros(shape, dtype=torch.int64, device=dev)
        self.free[..., :cap - live] = torch.arange(live, cap, device=dev)
        self.cursor = torch.zeros((), dtype=torch.int64, device=dev)
        self.next_position = torch.full((), first.seen, dtype=torch.int64, device=dev)
        self.next_slot = self.free[..., :1].clone()
        self.members = [None] * n_layers

    def __del__(self):
        """A cache lives in reference cycles (its layers point back at it), so it dies when the cyclic garbage
        collector runs, at any allocation: inside another graph's capture, destroying its cut graph would
        invalidate that capture. The graph is kept until the next cut graph's capture begins."""
        if self.cut_graph is not None and torch.cuda.is_current_stream_capturing():
            _RETIRED_GRAPHS.append(self.cut_graph)

    def _fill(self, name):
        return self.loop.config.policy.fill_value(name)

    def fits(self, layer):
        """Whether this cut layer can move in: same shapes, dtype, device, budget, evidence and token count."""
        return (layer.keys.shape == self.keys.shape[1:3] + (self.live, self.keys.shape[-1])
                and layer.keys.dtype == self.keys.dtype and layer.keys.device == self.keys.device
                and layer.budget == self.budget and layer.evidence.keys() == self.evidence.keys())

    def move_in(self, index, layer):
        """Copy a cut layer's position-ordered state into its slots; the layer keeps views of the buffers."""
        live = self.live
        for name in ("keys", "values", "scores", "positions", "valid"):
            getattr(self, name)[index, :, :, :live] = getattr(layer, name)
            setattr(layer, name, getattr(self, name)[index])
        for name, t in layer.evidence.items():
            self.evidence[name][index, :, :, :live] = t
        layer.evidence = {name: t[index] for name, t in self.evidence.items()}
        layer.bank, layer.slot = self, self.next_slot[index]
        self.members[index] = layer

    @property
    def complete(self):
        return all(m is not None for m in self.members)

    def end_step(self):
        """After every layer attended to the new token: cut if the cache is evict_every over the budget,
        and point every layer at the next token's slot."""
        self.live += 1
        self.next_position.add_(1)
        if self.live - self.budget >= self.loop.evict_every:
            self.cut_all()
            self.live = self.budget
        else:
            self.cursor.add_(1)
            self.next_slot.copy_(self.free.gather(-1, self.cursor.expand(self.next_slot.shape)))

    def cut_all(self):
        """Cut every layer, then point them at the first freed slot. A cut is a hundred-odd small launches
        (the reference's selection), which in eager decoding cost more host time than the whole step's
        GPU work; with the same shapes at every cut, the first cut runs eagerly (warming up) and is then
        captured once into a CUDA graph that the later cuts replay (on a CUDA device, when the cut fits in
        one piece of _CUT_ELEMENTS slots and is not itself being captured by a caller's graph). The capture
        synchronises the device once; its temporaries stay in the graph's memory pool."""
        if self.cut_graph is not None and not torch.cuda.is_current_stream_capturing():
            self.cut_graph.replay()
            return
        self._cut_eagerly()
        per_cut = max(1, _CUT_ELEMENTS // self.scores[0].numel())
        if self.loop.cut_graphs and self.keys.is_cuda and per_cut >= len(self.members) \
                and self.loop.head_group is None and not torch.cuda.is_current_stream_capturing():
            _RETIRED_GRAPHS.clear()
            self.cut_graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.cut_graph):          # recorded, not run: the cut above did the work
                self._cut_eagerly()

    def _cut_eagerly(self):
        per_cut = max(1, _CUT_ELEMENTS // self.scores[0].numel())
        for start in range(0, len(self.members), per_cut):
            self.cut(slice(start, start + per_cut))
        self.cursor.zero_()
        self.next_slot.copy_(self.free.gather(-1, self.cursor.expand(self.next_slot.shape)))

    def cut(self, layers):
        """Evict every layer of `layers` (a slice) back to the budget: the reference's `choose` on the slots
        sorted by position, then the evicted slots become the free list (no key or value moves)."""
        config, budget = self.loop.config, self.budget
        positions = self.positions[layers]                                   # (l, B, Hkv, C), all live
        order = positions.argsort(dim=-1)                                    # slots in position order

        def by_position(t):
            return t[layers].gather(-1, order).flatten(0, 1)                 # (l * B, Hkv, C)
        context = {name: by_position(t) for name, t in self.evidence.items()}
        context["key_mask"] = by_position(self.valid)
        selection = _ref.choose(by_position(self.scores), budget, config.policy, config.per_head, context,
                                self.loop.head_group)
        evicted = order.gather(-1, selection.order[..., budget:].reshape(order.shape[:-1] + (-1,)))  # (l, B, Hkv, E)
        e = evicted.shape[-1]
        self.free[layers, ..., :e] = evicted
        self.scores[layers].scatter_(-1, evicted, 0.0)
        self.valid[layers].scatter_(-1, evicted, False)
        upcoming = self.next_position + torch.arange(e, device=evicted.device)   # the next tokens' positions
        positions.scatter_(-1, evicted, upcoming.expand_as(evicted))
        for name, t in self.evidence.items():
            t[layers].scatter_(-1, evicted, self._fill(name))

    def move_out(self, index, layer):
        """The layer's live slots back into position-ordered tensors of its own (the reference's layout)."""
        order = self.positions[index].argsort(dim=-1)[..., :self.live]       # (B, Hkv, live)
        layer.keys = self.keys[index].gather(2, order[..., None].expand(-1, -1, -1, self.keys.shape[-1]))
        layer.values = self.values[index].gather(2, order[..., None].expand(-1, -1, -1, self.values.shape[-1]))
        for name in ("scores", "positions", "valid"):
            setattr(layer, name, getattr(self, name)[index].gather(-1, order))
        layer.evidence = {name: t[index].gather(-1, order) for name, t in self.evidence.items()}
        layer.bank = layer.slot = None


def _capturing() -> bool:
    """Whether a CUDA graph capture is under way on the current stream (False without CUDA, where torch's
    own check raises)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class FastLayer(_ref.CabLayer):
    """The reference's cache layer until it is cut; then a view into the SlotBank (see above)."""

    def __init__(self, loop):
        super().__init__(loop)
        self.bank = self.slot = None
        self.index = None          # this layer's index in the model (and in the bank)
        self.padded = False        # a mask came with some token: key_mask() must be passed to attention

    def key_mask(self):
        """[B, L] real tokens, or None while no token can be padding (so attention may take cuDNN's forward)."""
        return super().key_mask() if self.padded else None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.bank is None:
            return super().update(key_states, value_states)
        _ref._last_updated_layer, self.awaits_attention = self, True   # see cab_reference: the attention call checks
        d = self.keys.shape[-1]
        self.keys.scatter_(2, self.slot[..., None].expand(-1, -1, -1, d), key_states)
        self.values.scatter_(2, self.slot[..., None].expand(-1, -1, -1, d), value_states)
        self.seen += 1
        return self.keys, self.values

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if self.bank is None:
            return super().get_mask_sizes(query_length)
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.bank.live + q, self.seen - self.bank.live

    def attend(self, query, attention_mask, scaling):
        """One decode token against all C slots: out [B, Hq, 1, D]; scores accumulate in the slots, unless
        the cache's policy does not rank by them (EvictionLoop.reads_scores): then none are computed and the
        slots' scores stay 0.

        The free slots and the padding differ per KV head, so the key mask is per (row, KV head): the heads
        are folded into the batch ([B * Hkv, G, 1, D] queries against [B * Hkv, 1, C, D] keys), the same
        programs and bytes as [B, Hq] against [B, Hkv]."""
        b, hq, _, d = query.shape
        hkv, cap = self.keys.shape[1], self.keys.shape[2]
        if attention_mask is None:
            self.valid.scatter_(2, self.slot, True)
        else:                      # the library's mask: its last column is this token
            self.padded = True
            new = _ref._as_bool_mask(attention_mask)[:, 0, -1, -1]           # (B,)
            self.valid.scatter_(2, self.slot, new[:, None, None].expand(b, hkv, 1))
        out, scores = _attention(query.reshape(b * hkv, hq // hkv, 1, d), self.keys.view(b * hkv, 1, cap, d),
                                 self.values.view(b * hkv, 1, cap, d), scale=scaling, causal=True,
                                 key_mask=self.valid.view(b * hkv, cap), scores=self.loop.reads_scores)
        if scores is not None:
            scores = scores.view(b, hkv, cap)
            self.scores.add_(scores)
            if "decode_scores" in self.evidence:               # Delayed: attention received after the prompt
                self.evidence["decode_scores"].add_(scores)
        if self.index == len(self.bank.members) - 1:        # the last layer: the step is complete
            self.bank.end_step()
        return out.reshape(b, hq, 1, d)

    def evict(self, record=False):
        """The reference's cut, usually held for the forward's last layer (CabCache.hold)."""
        if not self.loop.hold(self, record):
            super().evict(record)

    def index_batch(self, index):
        self.loop.dissolve()
        super().index_batch(index)


class CabCache(_ref.CabCache):
    """cab_reference.CabCache with per-slot buffers: same arguments, same evictions, and a decode step that
    copies nothing and syncs nothing. Use attn_implementation="cab_fast". Where the policy does not rank by
    scores (reads_scores False), no attention call computes them, and the layers' scores stay 0.

    CUDA graphs: with evict_every=1 a decode step can be captured, and every replay is a decode step with
    its cut. With evict_every > 1 the cache refuses to be captured (RuntimeError at the capture): whether
    a step cuts is counted on the host, so every replay would repeat the captured step's choice. Replaying a
    captured step advances the device state only: get_seq_length() lags, while the cached tokens and
    kept_positions() are right.

    A forward that raises (an exception or an interrupt) is undone as in the reference (see its CabCache),
    except a decode step on the slots: its buffers are written in place, so the cache refuses every later
    use instead (RuntimeError: start a new cache). Layers that differ in shape (or a model split over
    devices) keep the reference's layout.

    cut_graphs (the one argument the reference's CabCache lacks): on a CUDA device, cuts after the first
    replay a CUDA graph of the first (see SlotBank.cut_all); False runs every cut eagerly."""

    layer_type = FastLayer

    def __init__(self, *args, cut_graphs: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.cut_graphs = cut_graphs
        self.bank = None           # the SlotBank once the layers are cut
        self.in_slots = False      # this forward runs on the bank
        self.slots_ok = True       # False once layers turned out to differ: the reference's layout for good
        self.broken = None         # why the cache refuses to go on
        self.bank_before = None    # the bank when the forward began (a failed forward gets it back)
        self.held = []             # (layer, record): cuts waiting for the forward's last layer (hold)

    def layer(self, index):
        layer = super().layer(index)
        layer.index = index
        return layer

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self.settle()
            self.in_slots = key_states.shape[-2] == 1 and self.bank is not None and self.bank.complete
            if self.in_slots:      # in place: no checkpoint (a failure refuses the cache)
                self.refuse_capture()
            else:
                self.begin_forward()
        try:
            return self.layer(layer_idx).update(key_states, value_states)
        except BaseException:
            self.rollback()
            raise

    def refuse_capture(self):
        """A step on the slots cuts when the cache is evict_every tokens over the budget, counted on the host
        (SlotBank.end_step): a CUDA graph of the step would replay the captured step's choice every time.
        With evict_every=1 every step cuts, so a replay is right."""
        if self.evict_every > 1 and _capturing():
            raise RuntimeError(f"evict_every: a decode step captured in a CUDA graph needs evict_every=1 (whether "
                               f"a step cuts is counted on the host, and a replay repeats the captured step's "
                               f"choice), got {self.evict_every}; decode eagerly or use evict_every=1")

    def begin_forward(self):
        """The reference's checkpoint, with the bank, which the forward then dissolves: several new tokens need
        position order for their causal mask (rare)."""
        super().begin_forward()
        self.bank_before = self.bank
        try:
            self.dissolve()
        except BaseException:
            self.rollback()
            raise

    def settle(self):
        """The reference's (undo a forward that stopped between two layers), then refuse if the cache is broken."""
        super().settle()
        if self.broken:
            raise RuntimeError(f"CabCache: {self.broken}; start a new cache")

    def rollback(self):
        if self.in_slots:
            self.broken = "a decode step failed after the cache's buffers were written"
            return
        self.held = []
        super().rollback()
        self.bank = self.bank_before   # the layers' views into it are back too (dissolving only read it)

    def hold(self, layer, record):
        """Take a layer's cut (on the reference's path: the prompt, multi-token calls) for later, when the
        forward's last layer cuts every held layer at once (cut_held): one selection is ~260 small launches
        whatever its size, 16 of them ~12 ms of a 32k prefill's 0.33 s on an H200. Held layers keep their
        new tokens' keys and values until then: at most _HELD_BYTES, past which the held layers are cut at
        once (dense prefill holds all of them). False (cut now) while the layer count is unknown."""
        if self.n_layers is None:
            return False
        self.held.append((layer, record))
        if sum(waiting.keys.nbytes + waiting.values.nbytes for waiting, _ in self.held) >= _HELD_BYTES:
            self.cut_held()
        return True

    def cut_held(self):
        """Cut the held layers: those alike in shape in one selection over their rows stacked, [Ly * B, Hkv,
        L] (the selection ranks every row on its own; SlotBank.cut stacks layers the same way)."""
        groups = {}
        for layer, record in self.held:
            context = layer.context()
            like = (layer.scores.shape, layer.budget, *((n, t.shape, t.dtype) for n, t in context.items()))
            groups.setdefault(like, []).append((layer, record, context))
        self.held = []
        policy, per_head = self.config.policy, self.config.per_head
        for group in groups.values():
            first = group[0][0]
            context = {name: torch.cat([c[name] for _, _, c in group]) for name in group[0][2]}
            selection = _ref.choose(torch.cat([layer.scores for layer, _, _ in group]), first.budget, policy,
                                    per_head, context, self.head_group)
            b = first.scores.shape[0]
            for i, (layer, record, _) in enumerate(group):
                rows = slice(i * b, (i + 1) * b)
                layer.keep(selection._replace(kept=selection.kept[rows], part=selection.part[rows],
                                              order=selection.order[rows]), record)

    def after_reference_forward(self, layer):
        """A layer finished a forward on the reference's path. After the last layer: the held cuts, then
        every cut layer moves into the bank."""
        if self.n_layers is None or layer.index != self.n_layers - 1:
            return
        self.cut_held()
        for cut in self.layers:
            if self.slots_ok:
                self.into_bank(cut)

    def into_bank(self, layer):
        """A cut layer into the bank (the first makes it); a layer that does not fit dissolves the bank."""
        budget = layer.budget
        if budget is None or budget == math.inf or layer.keys.shape[-2] >= budget + self.evict_every:
            return                 # not cut yet (a Delayed prompt), or never cut (Dense)
        if "decode_scores" in layer.evidence and self.record and layer.prompt_record is None:
            return                 # Delayed: its first cut is recorded on the reference's path
        if self.bank is None:
            self.bank = SlotBank(self, self.n_layers, layer)
        if layer.index >= self.n_layers or not self.bank.fits(layer):
            self.dissolve()
            self.slots_ok = False
            return
        self.bank.move_in(layer.index, layer)

    def dissolve(self):
        """Every layer back to the reference's position-ordered tensors (multi-token calls, beam search)."""
        if self.bank is not None:
            for index, layer in enumerate(self.bank.members):
                if layer is not None:
                    self.bank.move_out(index, layer)
            self.bank = None

    def kept_positions(self):
        """Per layer, the original positions of the cached tokens, ascending: [B, Hkv, L] int64."""
        self.settle()
        return [layer.positions if layer.bank is None
                else layer.positions.sort(dim=-1).values[..., :layer.bank.live] for layer in self.layers]


_reference_forward = _ref.make_attention_interface(attention)
# The same adapter over attention without its scores, for caches whose policy does not rank by them. The
# adapter also hands its function to the policy's evidence (after_attention's attention_fn): no such policy
# calls it (test_fast_cache.py checks every one).
_scoreless_forward = _ref.make_attention_interface(functools.partial(_attention, scores=False))


def _cab_fast_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """attn_implementation="cab_fast": a FastLayer in the bank attends over its slots; everything else (the
    prompt, multi-token calls, the reference's CabCache, no cache) takes the reference's adapter, without the
    score pass where the cache's policy does not rank by scores."""
    layer = _ref._last_updated_layer
    if layer is None or layer.keys is not key:                      # no cache of ours
        return _reference_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    forward = _reference_forward if layer.loop.reads_scores else _scoreless_forward
    if not isinstance(layer, FastLayer):                            # the reference's CabCache
        return forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    cache = layer.loop
    if layer.bank is not None:
        layer.awaits_attention = False
        if dropout and module.training:    # the reference's adapter checks this on every other path
            raise ValueError(f"dropout: cab attention has no dropout, got {dropout} in training mode")
        try:
            return layer.attend(query, attention_mask, scaling).transpose(1, 2), None   # (B, 1, Hq, D)
        except BaseException:      # an interrupt too
            cache.rollback()
            raise
    layer.padded = layer.padded or attention_mask is not None
    out = forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    try:
        cache.after_reference_forward(layer)
    except BaseException:
        cache.rollback()
        raise
    return out


def register():
    """Make attn_implementation="cab_fast" available to transformers (done once on import)."""
    AttentionInterface.register("cab_fast", _cab_fast_forward)
    AttentionMaskInterface.register("cab_fast", sdpa_mask)


register()
