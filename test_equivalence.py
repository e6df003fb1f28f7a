"""cab_fast (Triton) against cab_reference (PyTorch): outputs, scores, kept tokens, determinism, generation.

On a machine without CUDA the kernels run in the Triton interpreter at small sizes (CI); on a GPU the same
tests run at the lengths around the tiles the kernels use there (cab_fast.tiles), plus a few long cases.
One plain `pytest test_equivalence.py` runs it on either machine. Elsewhere: the bad-input table and
tensors of more than 2^31 elements (test_robustness.py), the fast cache (test_fast_cache.py).

Tolerance rule (derived, not guessed; NOTES.md has the measured errors):
  truth      = cab_reference.attention in float64 on the test's (already rounded) inputs (itself held to
               testkit.oracle_attention in test_reference.py; it runs on the test's device, the oracle on the CPU)
  yardstick  = what plain PyTorch gets in the test dtype: the reference's float32 softmax, with P rounded
               to the input dtype before P @ V (as every flash kernel does) and the output rounded to it
  outputs:   err(fast) <= 2 * err(yardstick) + u * max|truth| + 1e-6        (the flash-attention rule)
  scores:    err(fast)[j] <= 4 * err(ref fp32)[j] + 64 * 2^-24 * truth[j] + 1e-6 * G
             (a score sums Nq * G probabilities, each with a relative error of a few float32 ulps from the
              logit and exp2; 64 ulps leaves room for the vendor forward's lse)
  u = unit roundoff of the input dtype (fp32 2^-24, fp16 2^-11, bf16 2^-8).
Kept indices (prompt cuts, and cuts after decode steps with evict_every 1 and 3, every policy, lengths
around every block the kernels use for each head dim and dtype, causal or not, left padding) must be
identical, except for ties (testkit.assert_kept_ties_within_bounds). Each key j's score carries its own
error bound, bound[j] = the scores rule above: 4x the error of float32 PyTorch's column sum for key j (its
float32 accumulation error over the Nq * G probabilities, measured against float64) + 64 float32 ulps of
it + 1e-6 * G; every attention call of either side is asserted within it, and sums of calls (decode steps,
heads summed) add their bounds. A token x kept by one side only may replace y kept by the other only if
BOTH sides' own ranking values for x and y differ by at most B[x] + B[y], B = the two sides' bounds added
(so either order is within error); for SnapKV's pooled scores the pooled bounds, for QuestionAware's mix
the bound to first order, and for CAB-like policies' median bridge a key o equally far from x and y within
B[x] + B[y] + 2 B[o]. Evidence a side computes with its own attention (SnapKV's window, Bidirectional's,
Delayed's decode scores) carries its calls' bounds the same way.
Without scores (scores=False, for caches whose policy does not rank by them) the prefill and decode routes
give the scoring call's out bit for bit, and a prefill that dense attention would make through SDPA is
that SDPA call (that no score work is launched: test_fast_cache.py).
"""

import concurrent.futures
import functools
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import triton

import cab_fast
import cab_reference as ref
from testkit import GPU, assert_kept_ties_within_bounds, generate, left_padding_mask, make_qkv, prompts, tiny_model

DEV = "cuda" if GPU else "cpu"
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROUTES = ["prefill", "decode"]


def _blocks(d, dtype):
    """Every block length the kernels use for (d, dtype) in this process: tiles' BLOCK_M / BLOCK_N, the
    decode split threshold and the reduce kernel's block."""
    t = cab_fast.tiles(DEV, d, dtype)
    return sorted({*t["fwd"][:2], *t["score"][:2], t["decode"][0], t["min_split"], t["reduce_n"]})


def _around(blocks, extra=()):
    out = {1}
    for b in blocks:
        out |= {b - 1, b, b + 1, 2 * b - 1, 2 * b + 1}
    return sorted(out | set(extra))


# (head dim, dtype) pairs whose tiles the length sweep straddles: the fp32 tile and the bf16 tile (the
# model path); under the interpreter every tile is 16 wide, so one pair covers them.
TILE_CASES = [(64, torch.float32), (128, torch.bfloat16)] if GPU else [(64, torch.float32)]
LENGTH_CASES = [(d, dtype, n) for d, dtype in TILE_CASES
                for n in _around(_blocks(d, dtype), extra=(97, 1000, 4097) if GPU else (97,))]
GROUPS = [1, 3, 4, 8]
HEAD_DIMS = [64, 80, 96, 128, 256] if GPU else [64, 80, 128]


# q and k scaled by sqrt(2): logits twice a plain draw's, a peaked softmax (heavy hitters differ)
def peaked_qkv(*args, magnitude=2 ** 0.5, **kwargs):
    """make_qkv on the test's device; a test in bf16 skips on a GPU before sm80 (triton's bf16 dots need it)."""
    dtype = args[6] if len(args) > 6 else kwargs.get("dtype")
    if GPU and dtype == torch.bfloat16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 needs sm80 or later")
    return make_qkv(*args, magnitude=magnitude, device=DEV, **kwargs)


def _cudnn(fn, *args, **kwargs):
    """A call that forces the cuDNN forward; skips the test where cuDNN refuses it (its GPU, version or
    shape), which the "auto" route would route around."""
    try:
        return fn(*args, **kwargs)
    except RuntimeError as error:
        pytest.skip(f"cuDNN refuses this call here: {str(error)[:200]}")


def _yardstick(q, k, v, causal, key_mask):
    """Plain PyTorch in the test dtype: float32 softmax, P rounded to the dtype before P @ V."""
    b, hq, nq, d = q.shape
    p = ref.attention_probabilities(q, k, causal=causal, key_mask=key_mask)         # (B, Hkv, G, Nq, Nk)
    out = p.to(q.dtype).float() @ v.float()[:, :, None]                             # (B, Hkv, G, Nq, D)
    return out.reshape(b, hq, nq, d).to(q.dtype), p.sum(dim=(2, 3))


def _score_tolerance(t_sc, y_sc, g):
    return 4 * (y_sc.double() - t_sc).abs() + 64 * 2.0 ** -24 * t_sc.abs() + 1e-6 * g


def _out_errors(out, t_out, y_out, dtype):
    """(error of out, error of the yardstick, tolerance) against the float64 truth t_out (the outputs' rule)."""
    e_yard = (y_out.double() - t_out).abs().max().item()
    return (out.double() - t_out).abs().max().item(), e_yard, 2 * e_yard + UNIT[dtype] * t_out.abs().max().item() + 1e-6


def _check(q, k, v, *, causal=True, key_mask=None, route="auto", label="", decode_tile=None):
    if decode_tile is None:
        out, scores = cab_fast._attention(q, k, v, causal=causal, key_mask=key_mask, route=route)
    else:
        out, scores = cab_fast._decode(q, k, v, q.shape[-1] ** -0.5, causal, key_mask, tile=decode_tile)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert scores.shape == (k.shape[0], k.shape[1], k.shape[2]) and scores.dtype == torch.float32
    t_out, t_sc = ref.attention(q.double(), k.double(), v.double(), causal=causal, key_mask=key_mask)
    y_out, y_sc = _yardstick(q, k, v, causal, key_mask)
    g = q.shape[1] // k.shape[1]
    e_out, e_yard, tol_out = _out_errors(out, t_out, y_out, q.dtype)
    e_sc = (scores.double() - t_sc).abs()
    tol_sc = _score_tolerance(t_sc, y_sc, g)
    print(f"{label} out: fast {e_out:.2e} torch-{str(q.dtype)[6:]} {e_yard:.2e} tol {tol_out:.2e} | "
          f"scores: fast max {e_sc.max().item():.2e} mean {e_sc.mean().item():.2e}, torch-fp32 max "
          f"{(y_sc.double() - t_sc).abs().max().item():.2e}")
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert e_out <= tol_out, f"output error {e_out} > {tol_out}"
    bad = e_sc > tol_sc
    assert not bad.any(), (f"score error at {bad.nonzero()[:8].tolist()}: "
                           f"{e_sc[bad][:8].tolist()} > {tol_sc[bad][:8].tolist()}")
    return out, scores, t_sc, tol_sc


def _decode_rows(n, g):
    """Queries a decode-route call may take at n keys with G heads per group (Nq * G <= DECODE_MAX_ROWS)."""
    return min(n, cab_fast.DECODE_MAX_ROWS // g)


# ----------------------------------------------------------------------------------------------------
# Lengths around every block the kernels use here, both kernel families

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d,dtype,n", LENGTH_CASES)
def test_lengths(d, dtype, n, causal):
    hq, hkv = 4, 2
    q, k, v = peaked_qkv(2, hq, hkv, n, n, d, dtype, seed=n)
    _check(q, k, v, causal=causal, route="prefill", label=f"n={n} D={d} {dtype} causal={causal} prefill")
    nq = 1 if n > 1000 else _decode_rows(n, hq // hkv)
    _check(q[:, :, n - nq:], k, v, causal=causal, route="decode", label=f"  decode nq={nq}")


# Without scores (caches whose policy does not rank by them): the same out, nothing else computed

SCORELESS_CASES = [(d, dtype, n) for d, dtype in TILE_CASES
                   for n in sorted({1, *(m for b in _blocks(d, dtype) for m in (b - 1, b, b + 1, 2 * b + 1))})]


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("g", [1, 4])
@pytest.mark.parametrize("d,dtype,n", SCORELESS_CASES)
def test_scoreless_calls_give_the_same_out(d, dtype, n, g, causal, masked):
    """scores=False returns (out, None): on the prefill and decode routes the same kernels' out, bit for bit,
    as with scores (the score work is only left out); on "auto" on a GPU a prefill may take SDPA instead,
    held to the outputs' rule against float64 like every out."""
    q, k, v = peaked_qkv(2, 2 * g, 2, n, n, d, dtype, seed=n + g)
    key_mask = left_padding_mask(2, n, [0, n // 3], device=DEV) if masked else None
    calls = [("prefill", q), ("decode", q[:, :, n - _decode_rows(n, g):])] + ([("auto", q)] if GPU else [])
    for route, qr in calls:
        out, scores = cab_fast._attention(qr, k, v, causal=causal, key_mask=key_mask, route=route, scores=False)
        assert scores is None and out.shape == qr.shape and out.dtype == qr.dtype
        with_scores = cab_fast._attention(qr, k, v, causal=causal, key_mask=key_mask, route=route)[0]
        if route != "auto":
            assert torch.equal(out, with_scores), f"{route}: out differs from the scoring call's"
        t_out = ref.attention(qr.double(), k.double(), v.double(), causal=causal, key_mask=key_mask)[0]
        e_out, _, tol_out = _out_errors(out, t_out, _yardstick(qr, k, v, causal, key_mask)[0], qr.dtype)
        assert e_out <= tol_out, f"{route}: output error {e_out} > {tol_out}"


def test_scoreless_prefill_is_dense_sdpa(monkeypatch):
    """Without scores, a prefill that dense attention would make through SDPA (a CUDA GPU, no key mask, a causal
    mask only for Nq == Nk) is that very SDPA call, K/V unrepeated: the same bits, none of our kernels. On the
    CPU, SDPA's CPU backend stands in (the CUDA condition is pretended). Scores or not, plans are apart."""
    monkeypatch.setattr(cab_fast, "_PLANS", {})
    n, dtype = (300, torch.bfloat16) if GPU else (80, torch.float32)     # n * G > DECODE_MAX_ROWS: not decode
    q, k, v = peaked_qkv(1, 8, 2, n, n, 64, dtype, seed=31)
    mask = left_padding_mask(1, n, [3], device=DEV)
    dense_ok = cab_fast._dense_sdpa_ok
    assert dense_ok(q, k, None, True) == GPU and dense_ok(q[:, :, 1:], k, None, False) == GPU
    assert not dense_ok(q, k, mask, False) and not dense_ok(q[:, :, 1:], k, None, True)
    cab_fast._attention(q, k, v)
    if not GPU:
        monkeypatch.setattr(cab_fast, "_dense_sdpa_ok", lambda *args: True)

    def no_kernels(launches, tensors):
        raise AssertionError(f"launched {[launch.kernel for launch in launches]}")
    monkeypatch.setattr(cab_fast, "_run", no_kernels)
    for causal in (True, False):
        out, scores = cab_fast._attention(q, k, v, causal=causal, scores=False)
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert scores is None and torch.equal(out, want)
    assert len(cab_fast._PLANS) == 3                                # with scores, and two without


# Nq < Nk: decode (1 query), speculative (a few), chunked prefill, across grouped-query ratios

PAIRS = [(1, 33), (3, 31), (16, 17), (17, 97), (33, 65)] + ([(1, 4097), (200, 1500)] if GPU else [])


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("nq,nk", PAIRS)
def test_unequal_lengths_and_groups(nq, nk, g):
    q, k, v = peaked_qkv(1, 2 * g, 2, nq, nk, 64, torch.float32, seed=nq * 1000 + nk + g)
    for causal in (True, False):
        _check(q, k, v, causal=causal, label=f"nq={nq} nk={nk} G={g} causal={causal} (auto)")
        if nq * g <= cab_fast.DECODE_MAX_ROWS:   # auto took the decode route: run the prefill one too
            _check(q, k, v, causal=causal, route="prefill", label="  (prefill route)")


# Head dims and dtypes

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_and_dtypes(d, dtype):
    n = 300 if GPU else 33
    q, k, v = peaked_qkv(2, 6, 2, n, n, d, dtype, seed=d)
    _check(q, k, v, route="prefill", label=f"D={d} {dtype} prefill")
    _check(q[:, :, -5:], k, v, route="decode", label=f"D={d} {dtype} decode")


# Left padding (key_mask), including a row that is all padding

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("causal", [True, False])
def test_left_padding(causal, route):
    n = 700 if GPU else 40
    nq = n if route == "prefill" else 3
    q, k, v = peaked_qkv(4, 4, 1, nq, n, 64, torch.bfloat16, seed=7)
    mask = left_padding_mask(4, n, [0, 5, n // 2 + 1, n], device=DEV)   # last row: no real key at all
    out, scores, _, _ = _check(q, k, v, causal=causal, key_mask=mask, route=route,
                               label=f"left padding causal={causal} {route}")
    assert (scores[~mask[:, None, :].expand_as(scores)] == 0).all()
    assert (out[3] == 0).all()


def test_noncontiguous_inputs():
    """transformers hands over q/k/v as transposes of [B, N, H, D]: strides are honoured."""
    b, n, hq, hkv, d = 2, 37, 4, 2, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, n, hq, d, generator=g).to(DEV).transpose(1, 2)
    k = torch.randn(b, n, hkv, d, generator=g).to(DEV).transpose(1, 2)
    v = torch.randn(b, n, hkv, d, generator=g).to(DEV).transpose(1, 2)
    for route in ROUTES:
        _check(q, k, v, route=route, label=f"non-contiguous {route}")


def test_score_pass_head_splits_agree():
    """Kernel 2 with a group's query heads spread over programs (small problems) sums to the same scores."""
    q, k, v = peaked_qkv(1, 8, 2, 40, 40, 64, torch.float32, seed=4)
    qk_scale = cab_fast._LOG2E.value / 8.0
    lse = cab_fast._fwd_triton(q, k, v, None, qk_scale, True)[1]
    one = cab_fast._scores_triton(q, k, None, lse, qk_scale, True, head_splits=1)
    split = cab_fast._scores_triton(q, k, None, lse, qk_scale, True, head_splits=4)
    assert split.shape == one.shape == (1, 2, 40)
    torch.testing.assert_close(split, one, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hkv,nk", [(1, 2500), (2, 700)])
def test_decode_many_splits(hkv, nk, monkeypatch):
    """The reduce kernel combines every split of a row in one step: up to _MAX_SPLITS (128) of them, more
    than the interpreter's 4 pretend SMs ever ask for, so a larger GPU is pretended. Then a second call with
    fewer splits on the same stream reuses the (now larger) workspace."""
    sms = {} if GPU else {"_DEVICES": {-1: (((0, 0), "interpreter", 1 << 30), 1024)}}
    for name, value in {"_PLANS": {}, **sms}.items():              # plans made with the pretended GPU
        monkeypatch.setattr(cab_fast, name, value)
    q, k, v = peaked_qkv(1, 2 * hkv, hkv, 1, nk, 64, torch.float32, seed=nk)
    _check(q, k, v, route="decode", label=f"nk={nk} hkv={hkv} (many splits)")
    _check(q, k[:, :, :300], v[:, :, :300], route="decode", label="  then 300 keys")


def test_fp32_decode_peaked_batch():
    """fp32 decode with peaked logits, B=3: with the q.k dot a float32 FMA chain this output was 1% past the
    tolerance on an H200 (1.90e-6 against 1.88e-6, found with 3 pretended SMs: the same one-split path as
    here); fp32 inputs now take their dots in float64 (NOTES.md, section 5). The CPU interpreter's dot was
    never such a chain, so there it passes either way."""
    q, k, v = peaked_qkv(3, 4, 2, 1, 50, 64, torch.float32, seed=53)
    _check(q, k, v, route="decode", label="fp32 B=3 Hkv=2 nk=50")


def test_score_pass_tma_and_pointer_loads_agree(monkeypatch):
    """Kernel 2 loads q's tiles by TMA where q's layout allows (half inputs, every head and row on 16 bytes;
    long prompts only, here every length) and by pointers elsewhere: the same scores either way, ragged
    query and key tails included."""
    monkeypatch.setattr(cab_fast, "_TMA_PREFILL", 0)
    q, k, v = peaked_qkv(1, 8, 2, 150, 150, 64, torch.bfloat16, seed=5)
    qk_scale = cab_fast._LOG2E.value / 8.0
    lse = cab_fast._fwd_triton(q, k, v, None, qk_scale, True)[1]
    q_off = _misaligned(q)
    if not cab_fast._q_tma(q, k):
        pytest.skip("this GPU has no TMA (before sm90)")
    assert not cab_fast._q_tma(q_off, k)
    by_tma = cab_fast._scores_triton(q, k, None, lse, qk_scale, True, head_splits=1)
    by_pointer = cab_fast._scores_triton(q_off, k, None, lse, qk_scale, True, head_splits=1)
    torch.testing.assert_close(by_tma, by_pointer, rtol=1e-6, atol=1e-6)


def test_descriptor_scratch_keeps_the_callers_allocator():
    """The TMA path needs triton's allocator: torch's where the caller set none, never replacing theirs."""
    import contextvars

    from triton.runtime import _allocation

    def after(allocator):
        if allocator is not None:
            triton.set_allocator(allocator)
        cab_fast._descriptor_scratch()
        return _allocation._allocator.get()

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)
    assert contextvars.copy_context().run(after, None) is cab_fast._torch_scratch
    assert contextvars.copy_context().run(after, mine) is mine


def _misaligned(t):
    """t's values in the same shape and strides, one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("route", ROUTES)
def test_plans_follow_metadata(route, monkeypatch):
    """A call reuses the plan of an earlier call only when shapes, strides, dtypes, device, alignment, scale
    and causal all match; anything else makes (and checks) a plan of its own. The plan cache stays bounded."""
    monkeypatch.setattr(cab_fast, "_PLANS", {})
    monkeypatch.setattr(cab_fast, "_PLAN_LIMIT", 4)
    nq = 40 if route == "prefill" else 2
    q, k, v = peaked_qkv(1, 4, 2, nq, 40, 64, torch.float32, seed=21)
    first = _check(q, k, v, route=route, label=f"{route}: first call")
    again = _check(q.clone(), k.clone(), v.clone(), route=route, label="  same metadata")
    assert len(cab_fast._PLANS) == 1
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    _check(_misaligned(q), _misaligned(k), _misaligned(v), route=route, label="  misaligned")
    _check(q.transpose(2, 3).contiguous().transpose(2, 3), k, v, route=route, label="  other strides")
    _check(q, k, v, causal=False, route=route, label="  not causal")
    out = cab_fast._attention(q, k, v, scale=0.5, route=route)[0]
    assert not torch.equal(out, first[0])                           # the scale is part of the plan
    assert len(cab_fast._PLANS) == 4
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEV)
    cab_fast._attention(q, k, v, key_mask=mask, route=route)
    assert len(cab_fast._PLANS) == 4                                # the oldest plan made way
    with pytest.raises(ValueError, match="key_mask"):               # a bad mask after a good one: checked
        cab_fast._attention(q, k, v, key_mask=mask.to(torch.uint8), route=route)
    with pytest.raises(ValueError, match="key_mask"):
        cab_fast._attention(q, k, v, key_mask=mask[:, :39], route=route)


# ----------------------------------------------------------------------------------------------------
# Values are not inspected by default (NaN in, NaN out); validate=True checks

@pytest.mark.parametrize("route", ROUTES)
def test_default_call_does_not_inspect_values(route, monkeypatch):
    q, k, v = peaked_qkv(1, 4, 2, 6, 20, 64, torch.float32, seed=9)
    q[0, 1, 2, 5] = math.nan                                         # query head 1 (KV head 0), row 2

    def no_value_checks(*args, **kwargs):
        raise AssertionError("attention(validate=False) read the inputs' values on the host")
    monkeypatch.setattr(torch, "isfinite", no_value_checks)
    out, scores = cab_fast._attention(q, k, v, route=route)
    monkeypatch.undo()
    assert torch.isnan(out[0, 1, 2]).all() and torch.isfinite(out[0, 0]).all()
    assert torch.isnan(scores[0, 0]).any() and torch.isfinite(scores[0, 1]).all()
    with pytest.raises(ValueError, match="q: contains NaN"):
        cab_fast._attention(q, k, v, route=route, validate=True)


# ----------------------------------------------------------------------------------------------------
# Kept indices for every policy, at lengths around the blocks and in every dtype

def _config(policy, budget=None):
    knobs = {"window": 4} if policy == "snapkv" else {}             # a window that fits the short prompts
    return ref.EvictionConfig(policy=ref.make_policy(policy, **knobs), sparsity=0.75, budget=budget)


# evidence each side computes with its own attention; its own error bound rides with it
ATTENTION_EVIDENCE = ("window_scores", "bidirectional_scores", "decode_scores")


class _Bounded:
    """attention_fn of one side that also keeps, per call, each key's score error bound:
    bound[j] = _score_tolerance (4x float32 PyTorch's error of key j's column sum against float64, plus
    64 float32 ulps of it), which the call's scores are asserted to be within. A swap between the two
    sides is a tie when their values differ by no more than the sum of both sides' bounds."""

    def __init__(self, fn):
        self.fn, self.bounds = fn, []

    def __call__(self, q, k, v, *, scale=None, causal=True, key_mask=None):
        out, scores = self.fn(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
        t_sc = ref.attention(q.double(), k.double(), v.double(), scale=scale, causal=causal, key_mask=key_mask)[1]
        bound = _score_tolerance(t_sc, _yardstick(q, k, v, causal, key_mask)[1], q.shape[1] // k.shape[1])
        assert ((scores.double() - t_sc).abs() <= bound).all(), f"{self.fn.__module__} scores past their bound"
        self.bounds.append(bound)
        return out, scores

    def take(self):
        """The bounds of the calls since the last take, summed (zero without any)."""
        total = sum(self.bounds) if self.bounds else 0.0
        self.bounds = []
        return total


# (head dim, dtype) whose blocks the kept-index lengths straddle: fp32, and fp16 and bf16 at D=64 and the
# model's D=128 (under the interpreter every tile is 16 wide: the model's pair and fp32 cover it)
KEPT_TILES = ([(64, torch.float32), (64, torch.float16), (64, torch.bfloat16), (128, torch.float16),
               (128, torch.bfloat16)] if GPU else [(64, torch.float32), (128, torch.bfloat16)])
KEPT_CASES = [(d, dtype, n) for d, dtype in KEPT_TILES
              for n in sorted({m for b in _blocks(d, dtype) if b > 8 for m in (b - 1, b + 1)})]
# decode steps: caches that straddle the decode kernels' key block and split threshold (the model's pair on the CPU)
DECODE_KEPT_CASES = [(d, dtype, b) for d, dtype in KEPT_TILES if GPU or d == 128
                     for b in sorted({cab_fast.tiles(DEV, d, dtype)["decode"][0], cab_fast._MIN_SPLIT})]


def _inputs(d, dtype, n, steps=0):
    """q, k, v for a prompt of n tokens and `steps` decode tokens after it (B=2, 4 query heads on 2 KV heads,
    left padding in row 1, peaked logits), the key mask and the question (near the prompt's end)."""
    q, k, v = peaked_qkv(2, 4, 2, n + steps, n + steps, d, dtype, seed=11 + n + d, magnitude=3 ** 0.5)
    key_mask = left_padding_mask(2, n, [0, n // 8], device=DEV)
    question = (max(0, n - 10), max(1, n - 2))
    question_mask = torch.zeros(2, n, dtype=torch.bool, device=DEV)
    question_mask[:, question[0]:question[1]] = True
    return q, k, v, key_mask, question, question_mask


def _values(scores, evidence):
    """One side's values and the evidence names its own attention computed."""
    computed = [name for name in ATTENTION_EVIDENCE if name in evidence]
    return {"scores": scores, **evidence}, computed


@functools.cache
def _prompt_scores(d, dtype, n, causal):
    """Each side's scores of one prompt, with their per-key bounds (every policy ranks the same call)."""
    q, k, v, key_mask, _, _ = _inputs(d, dtype, n)
    sides = [_Bounded(fn) for fn in (cab_fast.attention, ref.attention)]
    return [(side(q, k, v, causal=causal, key_mask=key_mask)[1], side.take()) for side in sides]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d,dtype,n", KEPT_CASES)
@pytest.mark.parametrize("policy", ref.POLICIES)
def test_kept_indices_prefill_cut(policy, d, dtype, n, causal):
    """The prompt's cut: the same kept tokens from either side's scores and evidence, at lengths around every
    block the kernels use for this head dim and dtype, causal or not, with left padding."""
    config = _config(policy)
    q, k, v, key_mask, _, question_mask = _inputs(d, dtype, n)
    values, bounds = [], {}
    for fn, (scores, bound) in zip((cab_fast.attention, ref.attention), _prompt_scores(d, dtype, n, causal)):
        side = _Bounded(fn)
        bounds["scores"] = bounds.get("scores", 0.0) + bound
        evidence = ref.prompt_evidence(q, k, v, config, key_mask=key_mask, question_mask=question_mask,
                                       attention_fn=side)
        if "decode_scores" in evidence:    # Delayed: the first generated token's attention ranks the prompt
            evidence["decode_scores"] = side(q[:, :, -1:], k, v, key_mask=key_mask)[1]
        kept = ref.select_kept(scores, config, key_mask=key_mask, question_mask=question_mask, **evidence)
        vals, computed = _values(scores, evidence)
        evidence_bound = side.take()
        for name in computed:
            bounds[name] = bounds.get(name, 0.0) + evidence_bound
        values.append((kept, vals))
    (kept_f, vals_f), (kept_r, vals_r) = values
    assert_kept_ties_within_bounds(kept_f, kept_r, vals_f, vals_r, bounds, config.policy, config.per_head)


class _TwinLayer(ref.LayerState):
    """One side's layer in the eviction loop, carrying each slot's score error bound. At every cut the
    reference's layer (which runs the step first) records its choice; the fast layer checks its own against
    it, ties within bounds allowed, then keeps the reference's, so both sides go on from the same slots."""

    def __init__(self, loop):
        super().__init__(loop)
        self.bound = self.cut = None

    def append(self, k, v, valid=None):
        out = super().append(k, v, valid)
        new = self.scores.new_zeros(*self.scores.shape[:2], k.shape[2], dtype=torch.float64)
        self.bound = new if self.bound is None else torch.cat([self.bound, new], dim=-1)
        return out

    def gather(self, kept):
        super().gather(kept)
        self.bound = self.bound.gather(2, kept)

    def after_attention(self, q, scores, *, scale=None, attention_fn=ref.attention):
        self.bound = self.bound + attention_fn.take()
        super().after_attention(q, scores, scale=scale, attention_fn=attention_fn)

    def evict(self, record=False):
        config = self.loop.config
        values, computed = _values(self.scores, self.evidence)
        evidence_bound = self.loop.attention_fn.take()
        bounds = {"scores": self.bound, **{name: self.bound + evidence_bound for name in computed}}
        selection = ref.choose(self.scores, self.budget, config.policy, config.per_head, self.context())
        twin = self.loop.twin
        if twin is not None:                                         # the fast side, after the reference
            ref_positions, ref_kept, ref_values, ref_bounds = twin.layers[0].cut
            assert torch.equal(self.positions, ref_positions)
            bounds = {name: bounds[name] + ref_bounds[name] for name in bounds}
            assert_kept_ties_within_bounds(selection.kept, ref_kept, values, ref_values, bounds, config.policy,
                                           config.per_head)
            selection = selection._replace(kept=ref_kept)
        self.cut = (self.positions, selection.kept, values, bounds)
        self.keep(selection, record)


class _TwinLoop(ref.EvictionLoop):
    layer_type = _TwinLayer

    def __init__(self, attention_fn, twin, **kwargs):
        super().__init__(**kwargs)
        self.attention_fn, self.twin = _Bounded(attention_fn), twin

    def step(self, q, k, v, valid=None):
        return self.forward_layer(0, q, k, v, valid=valid, attention_fn=self.attention_fn)


@pytest.mark.parametrize("evict_every", [1, 3])
@pytest.mark.parametrize("d,dtype,block", DECODE_KEPT_CASES)
@pytest.mark.parametrize("policy", [name for name in ref.POLICIES if name != "none"])   # all that evict
def test_kept_indices_decode_steps(policy, d, dtype, block, evict_every):
    """The eviction loop (cab_reference.EvictionLoop, one layer) on both sides: a prompt of block + 2 tokens
    cut to block - 2, then decode steps over block - 1 keys (cutting every step) or block - 1, block,
    block + 1 (every third); at each cut the same kept tokens, ties within bounds."""
    n, steps = block + 2, 7 if GPU else 4
    q, k, v, key_mask, question, _ = _inputs(d, dtype, n, steps)
    config = _config(policy, budget=block - 2)
    loop_r = _TwinLoop(ref.attention, None, config=config, question_span=question, evict_every=evict_every)
    loop_f = _TwinLoop(cab_fast.attention, loop_r, config=config, question_span=question, evict_every=evict_every)
    for loop in (loop_r, loop_f):
        loop.step(q[:, :, :n], k[:, :, :n], v[:, :, :n], valid=key_mask)
    for t in range(n, n + steps):
        for loop in (loop_r, loop_f):
            loop.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1])
    assert torch.equal(loop_f.layers[0].positions, loop_r.layers[0].positions)


def test_ties_only_within_both_sides_bounds():
    """A swap passes only where both sides' own values for the two keys lie within their bounds' sum."""
    fast = {"scores": torch.tensor([[[5.0, 3.0, 2.9, 1.0]]])}
    slow = {"scores": torch.tensor([[[5.0, 2.95, 3.0, 1.0]]])}
    h2o, a, b = ref.make_policy("h2o"), torch.tensor([[[0, 1]]]), torch.tensor([[[0, 2]]])
    assert_kept_ties_within_bounds(a, b, fast, slow, {"scores": torch.full((1, 1, 4), 0.05)}, h2o, True)
    with pytest.raises(AssertionError, match="no tie"):             # 3.0 - 2.9 = 0.1 > 0.04 + 0.04
        assert_kept_ties_within_bounds(a, b, fast, slow, {"scores": torch.full((1, 1, 4), 0.04)}, h2o, True)
    with pytest.raises(AssertionError, match="no tie"):             # 3.0 against 1.0
        assert_kept_ties_within_bounds(a, torch.tensor([[[0, 3]]]), fast, slow,
                                       {"scores": torch.full((1, 1, 4), 0.05)}, h2o, True)


# ----------------------------------------------------------------------------------------------------
# Determinism, the cuDNN route, tiles

@pytest.mark.parametrize("route", ROUTES)
def test_bitwise_deterministic(route):
    n = 3000 if GPU else 70
    nq = n if route == "prefill" else 4
    q, k, v = peaked_qkv(2, 8, 2, nq, n, 128, torch.bfloat16, seed=5)
    mask = left_padding_mask(2, n, [0, 9], device=DEV)
    a = cab_fast._attention(q, k, v, key_mask=mask, route=route)
    b_ = cab_fast._attention(q, k, v, key_mask=mask, route=route)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])
    if GPU and route == "prefill":   # the vendor-forward route too
        q1, k1, v1 = peaked_qkv(1, 4, 4, n, n, 128, torch.bfloat16, seed=6)
        a = _cudnn(cab_fast._attention, q1, k1, v1, route="cudnn")
        b_ = _cudnn(cab_fast._attention, q1, k1, v1, route="cudnn")
        assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])


@pytest.mark.skipif(not GPU, reason="the vendor (cuDNN) forward needs a CUDA GPU")
@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("n", [1, 127, 129, 1000, 4097])
def test_cudnn_route_lse_convention(n, hkv):
    """The cuDNN log-sum-exp must be natural-log with the scale included, like kernel 1's; grouped heads
    must map query head h to KV head h // G."""
    q, k, v = peaked_qkv(2, 4, hkv, n, n, 128, torch.bfloat16, seed=n)
    scale = 1.0 / math.sqrt(128)
    for causal in (True, False):
        _, lse_c = _cudnn(cab_fast._fwd_cudnn, q, k, v, scale, causal)
        _, lse_t = cab_fast._fwd_triton(q, k, v, None, scale * cab_fast._LOG2E.value, causal)
        print(f"lse |cudnn - triton| max {(lse_c - lse_t).abs().max().item():.2e}")
        assert (lse_c - lse_t).abs().max().item() < 1e-3
        _cudnn(_check, q, k, v, causal=causal, route="cudnn", label=f"cudnn n={n} causal={causal}")


def test_tile_table_fits():
    """Every tile in the table is one the kernels can run on its GPU (the fit rule the candidates obey; the
    table lists sm90 GPUs only)."""
    for entries in cab_fast._TILES.values():
        for (kind, block_d, dtype_class), tile in entries.items():
            assert cab_fast._fits(kind, tile, block_d, dtype_class == "fp32", cab_fast._SHARED_OPTIN[(9, 0)]), (
                kind, block_d, dtype_class, tile)


def test_tile_lookup_order(monkeypatch):
    """A GPU's own entry first, then its architecture's, then the default: an H200 shares the H100's sm90
    entry but for what it lists itself."""
    monkeypatch.setattr(cab_fast, "_TILES", {(9, 0): {("decode", 128, "half"): (64, 4, 3, 1),
                                                      ("score", 128, "half"): (64, 128, 4, 3)},
                                             "GPU X": {("decode", 128, "half"): (64, 4, 4, 1)}})
    lookup = functools.partial(cab_fast._table_tile, block_d=128, dtype=torch.bfloat16)
    assert lookup("decode", ((9, 0), "GPU X", 227 << 10)) == (64, 4, 4, 1)
    assert lookup("score", ((9, 0), "GPU X", 227 << 10)) == (64, 128, 4, 3)
    assert lookup("decode", ((9, 0), "GPU Y", 227 << 10)) == (64, 4, 3, 1)
    assert lookup("decode", ((8, 0), "GPU X", 163 << 10)) == (64, 4, 4, 1)
    assert lookup("fwd", ((8, 0), "GPU Z", 163 << 10)) == cab_fast._default_tile("fwd", 128, False, 163 << 10)


def test_default_tiles_follow_shared_memory(monkeypatch):
    """Where the table lists no tile, the GPU's shared memory per block decides: the first candidate within
    it by _shared_bytes (the compiled sizes: test_chosen_tiles_compile_within_limits), so a 99 KB GPU (sm86,
    sm89) gets smaller tiles than an H100 (227 KB) and fp32 at D=256 still finds one."""
    monkeypatch.setattr(cab_fast, "_INTERPRET", False)              # the GPU's rule, not the interpreter's tile
    for kind, block_d, fp32, shared in itertools.product(("fwd", "score", "decode"), (64, 128, 256), (False, True),
                                                         ARCH_SHARED.values()):
        tile = cab_fast._default_tile(kind, block_d, fp32, shared)
        assert cab_fast._shared_bytes(kind, tile, block_d, fp32) <= shared, (kind, block_d, fp32, shared, tile)
    assert cab_fast._default_tile("fwd", 128, False, 99 << 10) != cab_fast._default_tile("fwd", 128, False, 227 << 10)


def test_decode_tile_fits_its_rows(monkeypatch):
    """Decode tiles are chosen at 16 rows; at 64 (G * Nq) the query and logit blocks grow: on an H100, 128
    keys x 64 rows x 3 stages at D=128 asks for 240 KB of its 227 KB, and triton refuses the launch. The tile
    takes fewer keys, then stages, until it fits; where none fits, "auto" takes the prefill kernels and the
    decode route says why."""
    h100 = ARCH_SHARED[(9, 0)]
    assert cab_fast._decode_fit((128, 4, 3, 2), 16, 128, False, h100) == (128, 4, 3, 2)
    assert cab_fast._decode_fit((128, 4, 2, 2), 64, 128, False, h100) == (128, 4, 2, 2)
    assert cab_fast._decode_fit((128, 4, 3, 2), 64, 128, False, h100) == (64, 4, 3, 2)
    assert cab_fast._decode_fit((16, 4, 1, 2), 64, 256, True, 99 << 10) is None
    small = {-1: (((0, 0), "interpreter", 99 << 10), 4)}            # the interpreter, pretending a 99 KB GPU
    monkeypatch.setattr(cab_fast, "_DEVICES", small if not GPU else {})
    monkeypatch.setattr(cab_fast, "_PLANS", {})
    if GPU:
        monkeypatch.setattr(cab_fast, "_device", lambda q: (((8, 6), "pretended", 99 << 10), 84))
    q, k, v = peaked_qkv(1, 8, 1, 8, 20, 256, torch.float32, seed=8)   # 64 rows of fp32 at D=256
    _check(q, k, v, label="fp32 D=256, 64 rows, 99 KB: auto takes the prefill kernels")
    with pytest.raises(ValueError, match="shared memory"):
        cab_fast._attention(q, k, v, route="decode")


@pytest.mark.skipif(not GPU, reason="a tile's shared memory and machine code are the GPU's")
@pytest.mark.parametrize("tile", [(128, 4, 2, 2), (128, 4, 3, 2)])
@pytest.mark.parametrize("nk", [200, 5000])
def test_decode_128_keys_64_rows(tile, nk):
    """128 keys x 64 rows (bf16, D=128, G=4 x 16 queries), one split (200 keys) and many (5000): with 2
    stages the tile fits an H100 (176 KB) and runs as asked; with 3 it would ask for 240 KB and runs at the
    tile _decode_fit gives (64 keys)."""
    q, k, v = peaked_qkv(1, 8, 2, 16, nk, 128, torch.bfloat16, seed=nk)
    fitted = cab_fast._decode_fit(tile, 64, 128, False, cab_fast._device(q)[0][2])
    _check(q, k, v, decode_tile=tile, label=f"decode tile {tile} at 64 rows runs as {fitted}")


# Shared memory one block may opt into, bytes (CUDA C++ Programming Guide), for each architecture compiled for
ARCH_SHARED = {(8, 0): 166912, (8, 6): 101376, (8, 9): 101376, (9, 0): 232448}
REGISTERS_PER_BLOCK = 65536
# What is compiled, (architecture, head dim, dtype, with every decode candidate at 64 rows): on a GPU each
# architecture at D = 64, 128, 256 in bf16 and fp32; on the CPU (CI) the smallest shared memory (sm86) at the
# model's D=128 bf16 and at fp32 D=256 (where only the last candidates fit), and sm90 with the candidates
COMPILE_JOBS = ([(arch, d, dtype, arch == (9, 0) and d == 128 and dtype == "bfloat16") for arch in ARCH_SHARED
                 for d in (64, 128, 256) for dtype in ("bfloat16", "float32")] if GPU
                else [((8, 6), 128, "bfloat16", False), ((8, 6), 256, "float32", False),
                      ((9, 0), 128, "bfloat16", True)])


def _compiled(job):
    """Compile one job's kernels in a process of its own (the kernels must be triton's compilable functions,
    not the interpreter's) and return their resources."""
    arch, d, dtype, candidates = job
    code = (f"import json, testkit; print(json.dumps(testkit.chosen_tile_resources({arch}, {ARCH_SHARED[arch]}, "
            f"[({d}, {dtype!r})], candidates={candidates})))")
    root = os.path.dirname(os.path.abspath(__file__))
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests")])          # cab_fast, testkit
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env,
                         capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_chosen_tiles_compile_within_limits():
    """Any CUDA machine: every kernel at the tile cab_fast would choose on sm80, sm86, sm89 and sm90 (and on
    sm90 every decode candidate at 64 rows, as autotuning may pick) compiles within that architecture's shared
    memory per block and 64K registers per block. Triton compiles for a target without its GPU (ptxas comes
    with triton), so this runs on the CPU too, a subset there (COMPILE_JOBS)."""
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        for (arch, *_), resources in zip(COMPILE_JOBS, pool.map(_compiled, COMPILE_JOBS)):
            for r in resources:
                print(f"sm{arch[0]}{arch[1]} {r}")
                assert r["shared"] <= ARCH_SHARED[arch], (arch, r)
                assert r["registers"] * r["threads"] <= REGISTERS_PER_BLOCK, (arch, r)


@pytest.mark.skipif(not GPU, reason="autotuning times kernels on a GPU")
def test_autotune_on_request(monkeypatch):
    """CAB_AUTOTUNE=1: the first call of a shape class times the candidates, remembers the winner, and the
    result is the same function."""
    monkeypatch.setattr(cab_fast, "_AUTOTUNE", True)
    monkeypatch.setattr(cab_fast, "_TUNED", {})
    monkeypatch.setattr(cab_fast, "_PLANS", {})
    monkeypatch.setitem(cab_fast._CANDIDATES, "decode", [(64, 4, 3, 2), (32, 4, 2, 4)])
    q, k, v = peaked_qkv(1, 4, 2, 1, 777, 64, torch.bfloat16, seed=12)
    _check(q, k, v, route="decode", label="autotuned decode")
    assert [key[0] for key in cab_fast._TUNED] == ["decode"]


# ----------------------------------------------------------------------------------------------------
# Generation through transformers with CabCache: same tokens as the reference

@pytest.mark.parametrize("policy", ["h2o", "cab", "snapkv", "streaming"])
def test_cabcache_generation_same_tokens(policy):
    model = tiny_model(vocab=97, sharpen=6.0, device=DEV)     # peaked attention: heavy hitters differ by head
    ids, mask = prompts(2, 24, pad=5, vocab=97, device=DEV)   # left padding in row 1
    tokens = {}
    for impl in ("cab_reference", "cab_fast"):
        cache = ref.CabCache(ref.EvictionConfig(policy=_config(policy).policy, sparsity=0.5))
        tokens[impl] = generate(model, impl, ids, mask, cache, steps=6)[0]
    assert torch.equal(tokens["cab_fast"], tokens["cab_reference"]), tokens
