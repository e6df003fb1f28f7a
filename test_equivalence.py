"""cab_fast (Triton) against cab_reference (PyTorch): outputs, scores, kept tokens, determinism, generation.

On a machine without CUDA the kernels run in the Triton interpreter at small sizes (CI); on a GPU the same
tests run at larger sizes, plus a few long / huge cases.

Tolerance rule (derived, not guessed; NOTES_fast.md has the measured errors):
  truth      = cab_reference.attention in float64 on the test's (already rounded) inputs
  yardstick  = what plain PyTorch gets in the test dtype: the reference's float32 softmax, with P rounded
               to the input dtype before P @ V (as every flash kernel does) and the output rounded to it
  outputs:   err(fast) <= 2 * err(yardstick) + u * max|truth| + 1e-6        (the flash-attention rule)
  scores:    err(fast)[j] <= 4 * err(ref fp32)[j] + 64 * 2^-24 * truth[j] + 1e-6 * G
             (a score sums Nq * G probabilities, each with a relative error of a few float32 ulps from the
              logit and exp2; 64 ulps leaves room for the vendor forward's lse, cf. NOTES_fast.md)
  u = unit roundoff of the input dtype (fp32 2^-24, fp16 2^-11, bf16 2^-8).
Kept indices must be identical, except among near-ties: a token kept by one side only must have a
reference evidence value within the score tolerance of a token kept by the other side only.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # must precede the first import of triton

import math  # noqa: E402

import pytest  # noqa: E402

import cab_fast  # noqa: E402
import cab_reference as ref  # noqa: E402

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"
BLOCK_MS, BLOCK_NS = cab_fast.block_sizes()


def _around(blocks, extra=()):
    out = {1}
    for b in blocks:
        out |= {b - 1, b, b + 1, 2 * b - 1, 2 * b + 1}
    return sorted(out | set(extra))


if GPU:
    LENGTHS = _around([64, 128], extra=(97, 1000, 4097))
    # LENGTHS = [1, 127, 129]
else:
    LENGTHS = _around(BLOCK_NS, extra=(97,))
    # LENGTHS = [1, 17]
GROUPS = [1, 3, 4, 8]
# GROUPS = [4]
HEAD_DIMS = [64, 80, 96, 128, 256] if GPU else [64, 80, 128]
# HEAD_DIMS = [64]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# DTYPES = [torch.float32]
UNIT = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
ROUTES = ["prefill", "decode"]


def _inputs(b, hq, hkv, nq, nk, d, dtype, seed=0, spread=2.0):
    """Random q, k, v; q scaled by `spread` so the softmax is peaked (heavy hitters differ)."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, nq, d, generator=g) * spread).to(dtype).to(DEV)
    k = torch.randn(b, hkv, nk, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype).to(DEV)
    return q, k, v


def _left_pad_mask(b, nk, pads):
    m = torch.ones(b, nk, dtype=torch.bool)
    for row, pad in enumerate(pads[:b]):
        m[row, :min(pad, nk)] = False
    return m.to(DEV)


def _yardstick(q, k, v, causal, key_mask):
    """Plain PyTorch in the test dtype: float32 softmax, P rounded to the dtype before P @ V."""
    b, hq, nq, d = q.shape
    p = ref.attention_probabilities(q, k, causal=causal, key_mask=key_mask)         # (B, Hkv, G, Nq, Nk)
    out = p.to(q.dtype).float() @ v.float()[:, :, None]                             # (B, Hkv, G, Nq, D)
    return out.reshape(b, hq, nq, d).to(q.dtype), p.sum(dim=(2, 3))


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
    e_ysc = (y_sc.double() - t_sc).abs()
    tol_sc = 4 * e_ysc + 64 * 2.0 ** -24 * t_sc.abs() + 1e-6 * g
    print(f"{label} out: fast {e_out:.2e} torch-{str(q.dtype)[6:]} {e_yard:.2e} tol {tol_out:.2e} | "
          f"scores: fast max {e_sc.max().item():.2e} mean {e_sc.mean().item():.2e}, torch-fp32 max "
          f"{e_ysc.max().item():.2e}")
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert e_out <= tol_out, f"output error {e_out} > {tol_out}"
    bad = e_sc > tol_sc
    assert not bad.any(), (f"score error at {bad.nonzero()[:8].tolist()}: "
                           f"{e_sc[bad][:8].tolist()} > {tol_sc[bad][:8].tolist()}")
    return out, scores, t_sc, tol_sc


# ----------------------------------------------------------------------------------------------------
# Lengths around every block size, both kernel families

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", LENGTHS)
def test_lengths(n, causal, route):
    hq, hkv = 4, 2
    nq = n if route == "prefill" else min(n, cab_fast.DECODE_MAX_ROWS // (hq // hkv))
    if GPU and n > 1000 and route == "decode":
        nq = 1
    q, k, v = _inputs(2, hq, hkv, nq, n, 64, torch.float32, seed=n)
    _check(q, k, v, causal=causal, route=route, label=f"n={n} nq={nq} causal={causal} {route}")


# Nq < Nk: decode (1 query), speculative (a few), chunked prefill, across grouped-query ratios

PAIRS = [(1, 33), (3, 31), (16, 17), (17, 97), (33, 65)] + ([(1, 4097), (200, 1500)] if GPU else [])


@pytest.mark.parametrize("g", GROUPS)
@pytest.mark.parametrize("nq,nk", PAIRS)
@pytest.mark.parametrize("causal", [True, False])
def test_unequal_lengths_and_groups(nq, nk, g, causal):
    q, k, v = _inputs(1, 2 * g, 2, nq, nk, 64, torch.float32, seed=nq * 1000 + nk + g)
    _check(q, k, v, causal=causal, label=f"nq={nq} nk={nk} G={g} causal={causal} (auto)")
    if nq * g <= cab_fast.DECODE_MAX_ROWS:       # auto took the decode route: run the prefill one too
        _check(q, k, v, causal=causal, route="prefill", label="  (prefill route)")


# Head dims and dtypes

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_head_dims_and_dtypes(d, dtype, route):
    n = 33 if not GPU else 300
    nq = n if route == "prefill" else 5
    q, k, v = _inputs(2, 6, 2, nq, n, d, dtype, seed=d)
    _check(q, k, v, route=route, label=f"D={d} {dtype} {route}")


# Left padding (key_mask), including a row that is all padding

@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("causal", [True, False])
def test_left_padding(causal, route):
    n = 40 if not GPU else 700
    nq = n if route == "prefill" else 3
    q, k, v = _inputs(4, 4, 1, nq, n, 64, torch.bfloat16, seed=7)
    mask = _left_pad_mask(4, n, [0, 5, n // 2 + 1, n])               # last row: no real key at all
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


# ----------------------------------------------------------------------------------------------------
# Kept indices for every policy

def _policy_context(policy, q, k, v, key_mask, attention_fn, question_mask):
    config = ref.EvictionConfig(policy=policy, sparsity=0.75, window=4)
    ctx = ref.prompt_evidence(q, k, v, config, key_mask=key_mask, question_mask=question_mask,
                              attention_fn=attention_fn)
    if policy == "delayed":          # the first generated token's attention ranks the prompt
        ctx["decode_scores"] = attention_fn(q[:, :, -1:], k, v, causal=True, key_mask=key_mask)[1]
    if question_mask is not None:
        ctx["question_mask"] = question_mask
    return config, ctx


def _near_tie_ok(kept_f, kept_r, evidences, tols):
    """Kept sets may differ only among tokens whose evidence is within tolerance of each other."""
    for bh in range(kept_f.shape[0] * kept_f.shape[1]):
        b, h = divmod(bh, kept_f.shape[1])
        only_f = sorted(set(kept_f[b, h].tolist()) - set(kept_r[b, h].tolist()))
        only_r = sorted(set(kept_r[b, h].tolist()) - set(kept_f[b, h].tolist()))
        if not only_f:
            continue
        ok = False
        for ev, tol in zip(evidences, tols):
            e, t = ev[b, h], tol[b, h]
            gap = max(min(abs(e[i] - e[j]).item() - t[i].item() - t[j].item() for j in only_r) for i in only_f)
            ok = ok or gap <= 0
        assert ok, f"(b={b}, h={h}) kept only by fast {only_f}, only by reference {only_r}: not near-ties"


@pytest.mark.parametrize("policy", ref.POLICIES)
def test_kept_indices_every_policy(policy):
    b, hq, hkv, n, d = 2, 4, 2, 48, 64
    q, k, v = _inputs(b, hq, hkv, n, n, d, torch.float32, seed=11, spread=3.0)
    key_mask = _left_pad_mask(b, n, [0, 6])
    question_mask = torch.zeros(b, n, dtype=torch.bool, device=DEV)
    question_mask[:, n - 10:n - 2] = True
    qm = question_mask                    # every policy gets it; those that do not use it ignore it
    out_f, sc_f, sc_t, tol = _check(q, k, v, key_mask=key_mask, label=f"policy {policy}")
    sc_r = ref.attention(q, k, v, key_mask=key_mask)[1]
    cfg, ctx_f = _policy_context(policy, q, k, v, key_mask, cab_fast.attention, qm)
    _, ctx_r = _policy_context(policy, q, k, v, key_mask, ref.attention, qm)
    kept_f = cab_fast.select_kept(sc_f, cfg, key_mask=key_mask, **{kk: vv for kk, vv in ctx_f.items()
                                                                    if kk != "key_mask"})
    kept_r = ref.select_kept(sc_r, cfg, key_mask=key_mask, **{kk: vv for kk, vv in ctx_r.items()
                                                               if kk != "key_mask"})
    evid = [sc_r] + [ctx_r[kk] for kk in ("window_scores", "bidirectional_scores", "decode_scores") if kk in ctx_r]
    tols = [tol.float()] + [torch.full_like(e, 1e-5) + 1e-5 * e.abs() for e in evid[1:]]
    if not torch.equal(kept_f, kept_r):
        _near_tie_ok(kept_f.cpu(), kept_r.cpu(), [e.cpu() for e in evid], [t.cpu() for t in tols])


# ----------------------------------------------------------------------------------------------------
# Determinism, errors, huge offsets

@pytest.mark.parametrize("route", ROUTES)
def test_bitwise_deterministic(route):
    n = 70 if not GPU else 3000
    nq = n if route == "prefill" else 4
    q, k, v = _inputs(2, 8, 2, nq, n, 128, torch.bfloat16, seed=5)
    mask = _left_pad_mask(2, n, [0, 9])
    a = cab_fast._attention(q, k, v, key_mask=mask, route=route)
    b_ = cab_fast._attention(q, k, v, key_mask=mask, route=route)
    assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])
    if GPU and route == "prefill":   # the vendor-forward route too
        q1, k1, v1 = _inputs(1, 4, 4, n, n, 128, torch.bfloat16, seed=6)
        a = cab_fast._attention(q1, k1, v1, route="cudnn")
        b_ = cab_fast._attention(q1, k1, v1, route="cudnn")
        assert torch.equal(a[0], b_[0]) and torch.equal(a[1], b_[1])


@pytest.mark.skipif(not GPU, reason="the vendor (cuDNN) forward needs a CUDA GPU")
@pytest.mark.parametrize("hkv", [4, 1])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n", [1, 127, 129, 1000, 4097])
def test_cudnn_route_lse_convention(n, causal, hkv):
    """The cuDNN log-sum-exp must be natural-log with the scale included, like kernel 1's; grouped heads
    must map query head h to KV head h // G."""
    q, k, v = _inputs(2, 4, hkv, n, n, 128, torch.bfloat16, seed=n)
    scale = 1.0 / math.sqrt(128)
    _, lse_c = cab_fast._fwd_cudnn(q, k, v, scale, causal)
    _, lse_t = cab_fast._fwd_triton(q, k, v, None, scale * cab_fast._LOG2E, causal)
    print(f"lse |cudnn - triton| max {(lse_c - lse_t).abs().max().item():.2e}")
    assert (lse_c - lse_t).abs().max().item() < 1e-3
    _check(q, k, v, causal=causal, route="cudnn", label=f"cudnn n={n} causal={causal}")


def test_bad_inputs_raise():
    q, k, v = _inputs(1, 4, 2, 8, 8, 64, torch.float32)
    with pytest.raises(ValueError, match="q"):
        cab_fast.attention(q[0], k, v)
    with pytest.raises(TypeError, match="q"):
        cab_fast.attention(q.double(), k, v)
    with pytest.raises(TypeError, match="q, k, v"):
        cab_fast.attention(q, k.half(), v)
    with pytest.raises(ValueError, match="heads"):
        cab_fast.attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        cab_fast.attention(q, k[:, :, :4], v[:, :, :4])
    with pytest.raises(ValueError, match="key_mask"):
        cab_fast.attention(q, k, v, key_mask=torch.ones(1, 7, dtype=torch.bool, device=DEV))
    with pytest.raises(ValueError, match="NaN"):
        bad = q.clone()
        bad[0, 0, 0, 0] = math.nan
        cab_fast.attention(bad, k, v)
    if not GPU:
        old = cab_fast._INTERPRET
        cab_fast._INTERPRET = False
        try:
            with pytest.raises(ValueError, match="cab_reference"):
                cab_fast.attention(q, k, v)
        finally:
            cab_fast._INTERPRET = old


@pytest.mark.skipif(not GPU, reason="needs 2^31-element tensors on a GPU")
@pytest.mark.parametrize("route", ROUTES)
def test_int64_offsets(route):
    """Hkv * Nk * D > 2^31 elements in one head's K: every offset must be 64-bit."""
    d, nk = 128, (1 << 31) // 128 + 77
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    nq = 1 if route == "decode" else 64
    q = torch.randn(1, 1, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, scores = cab_fast._attention(q, k, v, causal=False, route=route, validate=False)
    logits = torch.cat([(k[0, 0, i:i + (1 << 22)].float() @ q[0, 0].float().T) for i in range(0, nk, 1 << 22)])
    logits = logits / math.sqrt(d)                                              # (Nk, Nq)
    lse = torch.logsumexp(logits, 0)
    p = torch.exp(logits - lse)
    want_scores = p.sum(1)
    want_out = torch.cat([p[i:i + (1 << 22)].T @ v[0, 0, i:i + (1 << 22)].float()
                          for i in range(0, nk, 1 << 22)]).view(-1, nq, d).sum(0)
    assert (scores[0, 0] - want_scores).abs().max().item() < 1e-5 + 1e-3 * want_scores.abs().max().item()
    assert (out[0, 0].float() - want_out).abs().max().item() < 2e-2


# ----------------------------------------------------------------------------------------------------
# Generation through transformers with CabCache: same tokens as the reference

def _tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                   max_position_embeddings=256)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(DEV).eval()
    with torch.no_grad():            # peaked attention, so heavy hitters differ between heads
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("policy", ["h2o", "cab", "snapkv", "streaming"])
def test_cabcache_generation_same_tokens(policy):
    if not hasattr(ref, "CabCache"):
        pytest.skip("cab_reference has no CabCache yet")
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 24), generator=g).to(DEV)
    attn = torch.ones_like(ids)
    attn[1, :5] = 0                                                            # left padding in row 1
    tokens = {}
    for impl in ("cab_reference", "cab_fast"):
        model.set_attn_implementation(impl)
        cache = ref.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5, window=4))
        with torch.no_grad():
            tokens[impl] = model.generate(ids, attention_mask=attn, past_key_values=cache, max_new_tokens=6,
                                          do_sample=False, pad_token_id=0)
    assert torch.equal(tokens["cab_fast"], tokens["cab_reference"]), tokens
