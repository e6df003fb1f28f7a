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
Kept indices must be identical, except among near-ties (testkit.assert_same_kept): a token kept by one
side only must rank within tolerance of a token kept by the other side only, by the reference's scores or
by evidence each side computed with its own attention (SnapKV's window, Bidirectional's, Delayed's
decode scores: 2e-5 of the row's largest value).
"""

import functools
import math

import pytest
import torch
import triton

import cab_fast
import cab_reference as ref
from testkit import GPU, assert_same_kept, generate, left_padding_mask, make_qkv, prompts, tiny_model

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
# kept indices: one length just below and one just above each block the D=64 kernels use, every dtype
POLICY_LENGTHS = sorted({m for b in _blocks(64, torch.float32) if b > 8 for m in (b - 1, b + 1)})
POLICY_CASES = [(n, dtype) for n in POLICY_LENGTHS for dtype in DTYPES]


# q and k scaled by sqrt(2): logits twice a plain draw's, a peaked softmax (heavy hitters differ)
peaked_qkv = functools.partial(make_qkv, magnitude=2 ** 0.5, device=DEV)


def _yardstick(q, k, v, causal, key_mask):
    """Plain PyTorch in the test dtype: float32 softmax, P rounded to the dtype before P @ V."""
    b, hq, nq, d = q.shape
    p = ref.attention_probabilities(q, k, causal=causal, key_mask=key_mask)         # (B, Hkv, G, Nq, Nk)
    out = p.to(q.dtype).float() @ v.float()[:, :, None]                             # (B, Hkv, G, Nq, D)
    return out.reshape(b, hq, nq, d).to(q.dtype), p.sum(dim=(2, 3))


def _score_tolerance(t_sc, y_sc, g):
    return 4 * (y_sc.double() - t_sc).abs() + 64 * 2.0 ** -24 * t_sc.abs() + 1e-6 * g


def _check(q, k, v, *, causal=True, key_mask=None, route="auto", label=""):
    out, scores = cab_fast._attention(q, k, v, causal=causal, key_mask=key_mask, route=route)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert scores.shape == (k.shape[0], k.shape[1], k.shape[2]) and scores.dtype == torch.float32
    t_out, t_sc = ref.attention(q.double(), k.double(), v.double(), causal=causal, key_mask=key_mask)
    y_out, y_sc = _yardstick(q, k, v, causal, key_mask)
    g = q.shape[1] // k.shape[1]
    e_out = (out.double() - t_out).abs().max().item()
    e_yard = (y_out.double() - t_out).abs().max().item()
    tol_out = 2 * e_yard + UNIT[q.dtype] * t_out.abs().max().item() + 1e-6
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
    sms = {} if GPU else {"_DEVICES": {-1: (((0, 0), "interpreter"), 1024)}}
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

def _config(policy):
    knobs = {"window": 4} if policy == "snapkv" else {}             # a window that fits the short prompts
    return ref.EvictionConfig(policy=ref.make_policy(policy, **knobs), sparsity=0.75)


# evidence each side computes with its own attention; near ties in it may swap kept tokens
ATTENTION_EVIDENCE = ("window_scores", "bidirectional_scores", "decode_scores")


def _relative(score_tol, scores):
    """One tolerance relative to each row's largest score (assert_same_kept's form; at least the per-token
    one), and at least 2e-5: the attention-computed evidence's 1e-5 + 1e-5 |e| per token, in that form."""
    return max(2e-5, float((score_tol / scores.abs().amax(-1, keepdim=True).clamp_min(1)).max()))


@functools.cache
def _policy_case(n, dtype):
    """Inputs (left padding in row 1, a question near the end) and both sides' scores for one case."""
    b, hq, hkv, d = 2, 4, 2, 64
    q, k, v = peaked_qkv(b, hq, hkv, n, n, d, dtype, seed=11 + n, magnitude=3 ** 0.5)
    key_mask = left_padding_mask(b, n, [0, n // 8], device=DEV)
    question_mask = torch.zeros(b, n, dtype=torch.bool, device=DEV)
    question_mask[:, max(0, n - 10):max(1, n - 2)] = True
    _, sc_f, _, tol = _check(q, k, v, key_mask=key_mask, label=f"policy inputs n={n} {dtype}")
    sc_r = ref.attention(q, k, v, key_mask=key_mask)[1]
    return q, k, v, key_mask, question_mask, sc_f, sc_r, tol


def _evidence(config, q, k, v, key_mask, question_mask, attention_fn):
    ctx = ref.prompt_evidence(q, k, v, config, key_mask=key_mask, question_mask=question_mask,
                              attention_fn=attention_fn)
    if "decode_scores" in ctx:       # delayed: the first generated token's attention ranks the prompt
        ctx["decode_scores"] = attention_fn(q[:, :, -1:], k, v, causal=True, key_mask=key_mask)[1]
    return ctx


@pytest.mark.parametrize("policy", ref.POLICIES)
def test_kept_indices_every_policy(policy):
    config = _config(policy)
    for n, dtype in POLICY_CASES:
        q, k, v, key_mask, question_mask, sc_f, sc_r, tol = _policy_case(n, dtype)
        ctx_f = _evidence(config, q, k, v, key_mask, question_mask, cab_fast.attention)
        ctx_r = _evidence(config, q, k, v, key_mask, question_mask, ref.attention)
        masks = {"key_mask": key_mask, "question_mask": question_mask}
        kept_f = ref.select_kept(sc_f, config, **masks, **ctx_f)
        kept_r = ref.select_kept(sc_r, config, **masks, **ctx_r)
        computed = [name for name in ATTENTION_EVIDENCE if name in ctx_r]
        assert_same_kept(kept_f.cpu(), kept_r.cpu(), sc_r.cpu(), _relative(tol, sc_r), config.policy, config.per_head,
                         {name: t.cpu() for name, t in ctx_r.items()}, computed=computed)


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
        a = cab_fast._attention(q1, k1, v1, route="cudnn")
        b_ = cab_fast._attention(q1, k1, v1, route="cudnn")
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
        _, lse_c = cab_fast._fwd_cudnn(q, k, v, scale, causal)
        _, lse_t = cab_fast._fwd_triton(q, k, v, None, scale * cab_fast._LOG2E.value, causal)
        print(f"lse |cudnn - triton| max {(lse_c - lse_t).abs().max().item():.2e}")
        assert (lse_c - lse_t).abs().max().item() < 1e-3
        _check(q, k, v, causal=causal, route="cudnn", label=f"cudnn n={n} causal={causal}")


def test_tile_table_fits():
    """Every tile in the table is one the kernels can run (the fit rule the candidates obey)."""
    for entries in cab_fast._TILES.values():
        for (kind, block_d, dtype_class), tile in entries.items():
            assert cab_fast._fits(kind, tile, block_d, dtype_class == "fp32"), (kind, block_d, dtype_class, tile)


def test_tile_lookup_order(monkeypatch):
    """A GPU's own entry first, then its architecture's, then the default: an H200 shares the H100's sm90
    entry but for what it lists itself."""
    monkeypatch.setattr(cab_fast, "_TILES", {(9, 0): {("decode", 128, "half"): (64, 4, 3, 1),
                                                      ("score", 128, "half"): (64, 128, 4, 3)},
                                             "GPU X": {("decode", 128, "half"): (64, 4, 4, 1)}})
    lookup = functools.partial(cab_fast._table_tile, block_d=128, dtype=torch.bfloat16)
    assert lookup("decode", ((9, 0), "GPU X")) == (64, 4, 4, 1)
    assert lookup("score", ((9, 0), "GPU X")) == (64, 128, 4, 3)
    assert lookup("decode", ((9, 0), "GPU Y")) == (64, 4, 3, 1)
    assert lookup("decode", ((8, 0), "GPU X")) == (64, 4, 4, 1)
    assert lookup("fwd", ((8, 0), "GPU Z")) == cab_fast._default_tile("fwd", 128, False)


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
