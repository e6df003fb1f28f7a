"""Robustness (issue 6): randomised equivalence with a float64 oracle, numerics at the edges, bad inputs,
nothing lost during eviction, a cache that survives a failing step, long decode soaks.

cab_reference always; cab_fast too (Triton interpreter on CPU at tiny sizes, set up in conftest.py).
Hypothesis runs derandomised (a fixed seed derived from each test) with a fixed example budget, so CI is
reproducible; `pytest --slow` runs the same properties with many more examples. GPU-only tests (more than
2^31 elements, 10k decode steps) skip without CUDA. NOTES_tests.md has the counts, sizes and timings.

Tolerances are derived per case from the float32 rounding unit u = 2^-24 (NOTES_tests.md):
  delta  = (D + 2) * u * scale * max_ij sum_d |q_id k_jd|     bound on a float32 logit's error
  out    |ref - oracle| <= eps(dtype) |oracle| + (4 delta + (Nk + D) u) max|v| + 1e-7
  scores |ref - oracle| <= (4 delta + (Nq G + Nk) u) * oracle + 1e-7
The fast twin rounds P to the input dtype before P @ V (as flash kernels do) and works in exp2 from a
log-sum-exp: it gets eps(dtype) max|v| more on outputs and twice the bounds plus 64 u relative on scores.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import cab_reference as R
from cab_reference import BRIDGE_MODES, POLICIES, CabCache, EvictionConfig
from test_reference import left_padding_mask, oracle_attention, tiny_model

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

try:
    import cab_fast
except Exception as exc:  # noqa: BLE001  (the twin is optional for these tests)
    cab_fast, FAST_IMPORT_ERROR = None, exc

GPU = torch.cuda.is_available()
FAST_OK = cab_fast is not None and (GPU or os.environ.get("TRITON_INTERPRET") == "1")
U32 = 2.0 ** -24
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

needs_fast = pytest.mark.skipif(not FAST_OK, reason="cab_fast unavailable (no CUDA and no TRITON_INTERPRET)")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")


def examples(count):
    """Derandomised hypothesis settings with a fixed example budget (the `slow` twins run SLOW)."""
    return settings(max_examples=count, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


SLOW = settings(max_examples=1000, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


# ----------------------------------------------------------------------------------------------------
# Cases and tolerances

@st.composite
def attention_cases(draw, max_n=48, dims=(8, 16, 32, 64, 128), dtypes=DTYPES, max_b=3):
    b = draw(st.integers(1, max_b))
    hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4]))
    nk = draw(st.integers(1, max_n))
    nq = draw(st.one_of(st.just(1), st.just(nk), st.integers(1, nk)))
    d = draw(st.sampled_from(dims))
    dtype = draw(st.sampled_from(dtypes))
    causal = draw(st.booleans())
    pads = draw(st.one_of(st.none(), st.lists(st.integers(0, nk), min_size=b, max_size=b)))
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    magnitude = draw(st.sampled_from([0.1, 1.0, 3.0]))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    return dict(b=b, hq=hkv * group, hkv=hkv, nq=nq, nk=nk, d=d, dtype=dtype, causal=causal, pads=pads,
                scale=scale, magnitude=magnitude, seed=seed)


def build(case, device="cpu"):
    g = torch.Generator().manual_seed(case["seed"])
    m = case["magnitude"]
    q = (torch.randn(case["b"], case["hq"], case["nq"], case["d"], generator=g) * m).to(case["dtype"])
    k = (torch.randn(case["b"], case["hkv"], case["nk"], case["d"], generator=g) * m).to(case["dtype"])
    v = torch.randn(case["b"], case["hkv"], case["nk"], case["d"], generator=g).to(case["dtype"])
    key_mask = None if case["pads"] is None else left_padding_mask(case["b"], case["nk"], case["pads"])
    if device != "cpu":
        q, k, v = q.to(device), k.to(device), v.to(device)
        key_mask = None if key_mask is None else key_mask.to(device)
    return q, k, v, key_mask


def bounds(q, k, v, scale):
    """(out_tol, scores_tol) tensors for the reference, shaped like the oracle's out and scores."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qa = q.double().abs().view(b, hkv, group, nq, d)
    ka = k.double().abs()[:, :, None]
    delta = (d + 2) * U32 * scale * float((qa @ ka.transpose(-1, -2)).max()) if nk else 0.0
    vmax = float(v.double().abs().max()) if v.numel() else 0.0
    out_abs = (4 * delta + (nk + d) * U32) * vmax + 1e-7
    scores_rel = 4 * delta + (nq * group + nk) * U32
    return out_abs, scores_rel


def compare(name, out, scores, ref_out, ref_scores, out_abs, scores_rel, eps, extra_abs=0.0):
    err_out = (out.double().cpu() - ref_out).abs()
    err_scores = (scores.double().cpu() - ref_scores).abs()
    tol_out = eps * ref_out.abs() + out_abs + extra_abs
    tol_scores = scores_rel * ref_scores.abs() + 1e-7
    assert torch.isfinite(out).all() and torch.isfinite(scores).all(), f"{name}: inf/NaN"
    worst_out = float((err_out / tol_out).max()) if err_out.numel() else 0.0
    worst_scores = float((err_scores / tol_scores).max()) if err_scores.numel() else 0.0
    assert worst_out <= 1.0, f"{name}: out error {float(err_out.max()):.3g} is {worst_out:.2f}x its bound"
    assert worst_scores <= 1.0, (f"{name}: scores error {float(err_scores.max()):.3g} is "
                                 f"{worst_scores:.2f}x its bound")
    return worst_out, worst_scores


def check_ref(case):
    q, k, v, key_mask = build(case)
    out, scores = R.attention(q, k, v, scale=case["scale"], causal=case["causal"], key_mask=key_mask)
    ref_out, ref_scores = oracle_attention(q, k, v, scale=case["scale"], causal=case["causal"], key_mask=key_mask)
    out_abs, scores_rel = bounds(q, k, v, case["scale"])
    compare("reference", out, scores, ref_out, ref_scores, out_abs, scores_rel, torch.finfo(q.dtype).eps)
    return scores, ref_scores


def check_fast(case):
    device = "cuda" if GPU else "cpu"
    q, k, v, key_mask = build(case, device)
    out, scores = cab_fast.attention(q, k, v, scale=case["scale"], causal=case["causal"], key_mask=key_mask)
    qc, kc, vc = q.cpu(), k.cpu(), v.cpu()
    km = None if key_mask is None else key_mask.cpu()
    ref_out, ref_scores = oracle_attention(qc, kc, vc, scale=case["scale"], causal=case["causal"], key_mask=km)
    out_abs, scores_rel = bounds(qc, kc, vc, case["scale"])
    eps = torch.finfo(q.dtype).eps
    vmax = float(vc.double().abs().max())
    compare("fast", out, scores, ref_out, ref_scores, 2 * out_abs, 2 * scores_rel + 64 * U32, eps,
            extra_abs=eps * vmax)
    return scores.cpu(), ref_scores


# ----------------------------------------------------------------------------------------------------
# 1. Randomised equivalence with the float64 oracle

@examples(200)
@given(attention_cases())
def test_reference_matches_float64_oracle(case):
    check_ref(case)


@pytest.mark.slow
@SLOW
@given(attention_cases(max_n=160, max_b=4))
def test_reference_matches_float64_oracle_slow(case):
    check_ref(case)


@needs_fast
@examples(25)
@given(attention_cases(max_n=40, dims=(8, 16, 32, 64)))
def test_fast_matches_float64_oracle(case):
    check_fast(case)


@needs_fast
@pytest.mark.slow
@SLOW
@given(attention_cases(max_n=96, dims=(8, 16, 32, 64, 128)))
def test_fast_matches_float64_oracle_slow(case):
    check_fast(case)


@st.composite
def eviction_configs(draw):
    policy = draw(st.sampled_from(POLICIES))
    local_tenths = draw(st.integers(0, 10))
    local, bridge = local_tenths / 10, draw(st.integers(0, 10 - local_tenths)) / 10
    budget = draw(st.one_of(st.none(), st.integers(1, 60)))
    return EvictionConfig(
        policy=policy, budget=budget, sparsity=draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99])),
        local_ratio=local, bridge_ratio=bridge, importance_ratio=1.0 - local - bridge,
        bridge=draw(st.sampled_from(BRIDGE_MODES)), per_head=draw(st.booleans()),
        sink=draw(st.integers(0, 6)), recent_ratio=draw(st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0])),
        window=draw(st.integers(1, 20)), pool=draw(st.sampled_from([1, 3, 7])),
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0, 4.0])))


def shared_evidence(config, scores, seed, question_mask):
    """Evidence other than the scores, identical for both sides (only the scores differ between them)."""
    g = torch.Generator().manual_seed(seed)
    b, h, n = scores.shape
    rand = lambda: torch.rand(b, h, n, generator=g, dtype=torch.float64).float()  # noqa: E731
    return {"window_scores": rand(), "bidirectional_scores": rand() * n, "question_similarity": rand() * 2 - 1,
            "decode_scores": rand(), "question_match": rand(), "connectivity": (rand() * n).floor(), "curvature": rand() * 20 - 16,
            "question_mask": question_mask}


def near_tie_proxies(scores, config, evidence):
    """The quantities a policy ranks by, as functions of the scores [B, H, N] (merged when per_head=False)."""
    s = scores.double()
    if not config.per_head:
        s = s.sum(1, keepdim=True)
    pooled = F.max_pool1d(s, config.pool, stride=1, padding=config.pool // 2)
    sim = evidence["question_similarity"].double()
    sim = sim if config.per_head else sim.mean(1, keepdim=True)
    qa = s / s.amax(-1, keepdim=True).clamp_min(1e-30) + config.alpha * sim
    return s, [s, pooled, qa]


def assert_same_kept(kept_a, kept_b, scores_truth, scores_tol, config, evidence):
    """Kept index sets equal, except swaps between tokens whose ranking quantities (score, pooled score,
    normalised score + alpha * similarity, distance to any other score for the median bridge) are within
    the score tolerance of each other; at most 2 swaps per row."""
    if torch.equal(kept_a, kept_b):
        return
    s, proxies = near_tie_proxies(scores_truth, config, evidence)
    tol = float(scores_tol)
    rows_a, rows_b = kept_a.reshape(-1, kept_a.shape[-1]), kept_b.reshape(-1, kept_b.shape[-1])
    heads = s.shape[1]
    for r, (ra, rb) in enumerate(zip(rows_a.tolist(), rows_b.tolist())):
        only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
        if not only_a:
            continue
        b, h = divmod(r, kept_a.shape[1])
        h = h if heads > 1 else 0
        assert len(only_a) <= 2, f"row {r}: {len(only_a)} swaps {only_a} vs {only_b}"
        for x in only_a:
            def close(y):
                if any(abs(float(p[b, h, x] - p[b, h, y])) <= 2 * tol * max(1.0, float(p[b, h].abs().max()))
                       for p in proxies):
                    return True
                sx, sy, others = s[b, h, x], s[b, h, y], s[b, h]      # median bridge: |s - m| ties
                return bool((((sx - others).abs() - (sy - others).abs()).abs() <= 4 * tol * (1 + others.abs()))
                            .any())
            assert any(close(y) for y in only_b), (
                f"row {r}: token {x} kept by one side only, no near-tie among {only_b}; "
                f"scores {float(s[b, h, x]):.6g} vs {[float(s[b, h, y]) for y in only_b]}")


def check_kept(case, config, side_scores, truth_scores, scores_rel):
    b, h, n = truth_scores.shape
    qm = torch.zeros(b, n, dtype=torch.bool)
    qm[:, max(0, n - 4):] = True
    evidence = shared_evidence(config, truth_scores, case["seed"], qm)
    key_mask = None if case["pads"] is None else left_padding_mask(b, n, case["pads"])
    kept_side = R.select_kept(side_scores.float(), config, key_mask=key_mask, **evidence)
    kept_truth = R.select_kept(truth_scores.float(), config, key_mask=key_mask, **evidence)
    k = n if config.policy == "none" else min(n, config.budget if config.budget is not None
                                              else max(1, math.floor((1 - config.sparsity) * n)))
    assert tuple(kept_side.shape) == (b, h, k)
    if k > 1:
        assert bool((kept_side[..., 1:] > kept_side[..., :-1]).all())
    assert torch.equal(kept_side, R.select_kept(side_scores.float().clone(), config, key_mask=key_mask,
                                                **evidence)), "selection not deterministic"
    assert_same_kept(kept_side, kept_truth, truth_scores, scores_rel, config, evidence)


@examples(200)
@given(attention_cases(max_n=40, dims=(8, 16, 32)), eviction_configs())
def test_reference_kept_matches_oracle_kept(case, config):
    scores, truth = check_ref(case)
    q, k, v, _ = build(case)
    check_kept(case, config, scores, truth, bounds(q, k, v, case["scale"])[1])


@pytest.mark.slow
@SLOW
@given(attention_cases(max_n=160, dims=(8, 16, 32, 64)), eviction_configs())
def test_reference_kept_matches_oracle_kept_slow(case, config):
    scores, truth = check_ref(case)
    q, k, v, _ = build(case)
    check_kept(case, config, scores, truth, bounds(q, k, v, case["scale"])[1])


@needs_fast
@examples(30)
@given(attention_cases(max_n=32, dims=(8, 16)), eviction_configs())
def test_fast_kept_matches_oracle_kept(case, config):
    scores, truth = check_fast(case)
    q, k, v, _ = build(case)
    check_kept(case, config, scores, truth, 2 * bounds(q, k, v, case["scale"])[1] + 64 * U32)


# ----------------------------------------------------------------------------------------------------
# 2. Numerics at the edges

IMPLS = [pytest.param("reference", id="reference"), pytest.param("fast", id="fast", marks=needs_fast)]


def run_impl(impl, q, k, v, **kwargs):
    if impl == "reference":
        return R.attention(q, k, v, **kwargs)
    device = "cuda" if GPU else "cpu"
    km = kwargs.pop("key_mask", None)
    out, scores = cab_fast.attention(q.to(device), k.to(device), v.to(device),
                                     key_mask=None if km is None else km.to(device), **kwargs)
    return out.cpu(), scores.cpu()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("nq,nk", [(1, 40), (20, 20)])
def test_huge_logits_stay_finite(impl, nq, nk):
    """|q.k| * scale up to 1e4: the row max is subtracted before exp, so nothing overflows."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, nq, 16, generator=g)
    k = torch.randn(1, 2, nk, 16, generator=g)
    v = torch.randn(1, 2, nk, 16, generator=g)
    scale = 1e4 / float((q @ k.transpose(-1, -2)).abs().max())
    out, scores = run_impl(impl, q, k, v, scale=scale)
    ref_out, ref_scores = oracle_attention(q, k, v, scale=scale)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    out_abs, scores_rel = bounds(q, k, v, scale)
    factor = 1 if impl == "reference" else 2
    compare(impl, out, scores, ref_out, ref_scores, factor * out_abs, factor * scores_rel + 64 * U32,
            torch.finfo(q.dtype).eps)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp16_products_that_overflow_fp16(impl):
    """fp16 q, k of magnitude ~200: q.k ~ 1e6 > 65504 (fp16 max); logits must be formed in float32."""
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 8, 32, generator=g) * 200).half()
    k = (torch.randn(1, 1, 24, 32, generator=g) * 200).half()
    v = torch.randn(1, 1, 24, 32, generator=g).half()
    assert float((q.double() @ k.double().transpose(-1, -2)).abs().max()) > 65504
    out, scores = run_impl(impl, q, k, v, scale=1e-4)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    ref_out, ref_scores = oracle_attention(q, k, v, scale=1e-4)
    out_abs, scores_rel = bounds(q, k, v, 1e-4)
    factor = 1 if impl == "reference" else 2
    extra = 0.0 if impl == "reference" else torch.finfo(torch.float16).eps * float(v.abs().max())
    compare(impl, out, scores, ref_out, ref_scores, factor * out_abs, factor * scores_rel + 64 * U32,
            torch.finfo(torch.float16).eps, extra_abs=extra)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
def test_rows_with_all_keys_masked_give_zero(impl, dtype, causal):
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 3, 16, generator=g).to(dtype)
    k = torch.randn(2, 2, 9, 16, generator=g).to(dtype)
    v = torch.randn(2, 2, 9, 16, generator=g).to(dtype)
    key_mask = torch.ones(2, 9, dtype=torch.bool)
    key_mask[1] = False
    out, scores = run_impl(impl, q, k, v, causal=causal, key_mask=key_mask)
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    assert torch.all(out[1] == 0) and torch.all(scores[1] == 0)
    assert torch.all(scores[0].sum(-1) > 0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_raise_when_validating(impl, where, bad):
    g = torch.Generator().manual_seed(3)
    t = {"q": torch.randn(1, 2, 4, 16, generator=g), "k": torch.randn(1, 2, 6, 16, generator=g),
         "v": torch.randn(1, 2, 6, 16, generator=g)}
    t[where][0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=where):
        run_impl(impl, t["q"], t["k"], t["v"], validate=True)


def test_reference_validates_by_default():
    q = torch.randn(1, 1, 2, 8)
    q[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="q"):
        R.attention(q, q, q)


# ----------------------------------------------------------------------------------------------------
# 3. Bad inputs: ValueError / TypeError naming the argument

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype=dtype, device=device)


def common_bad_calls():
    q, k, v = _t(1, 4, 3, 16), _t(1, 2, 5, 16), _t(1, 2, 5, 16)
    return [
        ("rank q", (q[0], k, v), {}, ValueError, "q"),
        ("rank k", (q, k[0], v), {}, ValueError, "k"),
        ("k/v shapes", (q, k, v[:, :1]), {}, ValueError, "k and v"),
        ("head dim", (q, _t(1, 2, 5, 8), _t(1, 2, 5, 8)), {}, ValueError, "head dim"),
        ("batch", (q, _t(2, 2, 5, 16), _t(2, 2, 5, 16)), {}, ValueError, "batch"),
        ("Hq % Hkv", (_t(1, 3, 3, 16), k, v), {}, ValueError, "multiple of KV heads"),
        ("Nq > Nk", (_t(1, 4, 6, 16), k, v), {}, ValueError, "Nq <= Nk"),
        ("int dtype", (q.long(), k, v), {}, TypeError, "q"),
        ("list", (q, k.tolist(), v), {}, TypeError, "k"),
        ("mixed devices", (q, k.to("meta"), v.to("meta")), {}, ValueError, "device"),
        ("key_mask dtype", (q, k, v), {"key_mask": torch.ones(1, 5)}, ValueError, "key_mask"),
        ("key_mask shape", (q, k, v), {"key_mask": torch.ones(5, dtype=torch.bool)}, ValueError, "key_mask"),
        ("key_mask device", (q, k, v), {"key_mask": torch.ones(1, 5, dtype=torch.bool, device="meta")},
         ValueError, "key_mask"),
        ("scale NaN", (q, k, v), {"scale": math.nan}, ValueError, "scale"),
        ("scale inf", (q, k, v), {"scale": math.inf}, ValueError, "scale"),
    ]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", common_bad_calls(), ids=lambda c: c[0])
def test_bad_attention_inputs(impl, case):
    _, args, kwargs, error, word = case
    fn = R.attention if impl == "reference" else cab_fast.attention
    with pytest.raises(error, match=word):
        fn(*args, **kwargs)


@needs_fast
def test_fast_rejects_unsupported_head_dim_and_dtype():
    dev = "cuda" if GPU else "cpu"
    big = _t(1, 1, 2, cab_fast.MAX_HEAD_DIM + 8, device=dev)
    with pytest.raises(ValueError, match="head dim"):
        cab_fast.attention(big, big, big)
    d64 = _t(1, 1, 2, 16, dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match="float64"):
        cab_fast.attention(d64, d64, d64)
    with pytest.raises(TypeError, match="dtype"):
        cab_fast.attention(d64.float(), d64.half(), d64.half())


@pytest.mark.skipif(cab_fast is None, reason="cab_fast not importable")
def test_fast_cpu_tensor_without_interpreter_points_to_alternatives(monkeypatch):
    monkeypatch.setattr(cab_fast, "_INTERPRET", False)
    q = _t(1, 1, 2, 16)
    with pytest.raises(ValueError) as info:
        cab_fast.attention(q, q, q)
    assert "cab_reference" in str(info.value) and "TRITON_INTERPRET" in str(info.value)


@pytest.mark.parametrize("kwargs,word", [
    ({"local_ratio": 0.4, "bridge_ratio": 0.4, "importance_ratio": 0.4}, "sum to 1"),
    ({"local_ratio": 0.3, "bridge_ratio": 0.2, "importance_ratio": 0.49}, "sum to 1"),
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -1e-9}, "sparsity"), ({"sparsity": math.nan}, "sparsity"),
    ({"budget": 0}, "budget"), ({"budget": -3}, "budget"),
    ({"policy": "H2O"}, "known policies: none, streaming, h2o, cab, snapkv"),
])
def test_bad_configs(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EvictionConfig(**kwargs)


def test_question_span_outside_the_prompt():
    for span in [(-1, 3), (5, 21), (7, 7), (9, 4)]:
        with pytest.raises(ValueError, match="question_span"):
            R.question_mask_from_spans(span, 2, 20)


# ----------------------------------------------------------------------------------------------------
# 4. Driving a CabCache without a model: the attention interface on random q, k, v

class FakeModule:
    training = False

    def __init__(self, layer_idx, group):
        self.layer_idx, self.num_key_value_groups = layer_idx, group


def drive(cache, attn, steps, *, b=1, hq=4, hkv=2, d=16, prompt=24, layers=2, device="cpu", seed=0, check=None):
    """Prefill `prompt` random tokens, then decode `steps` tokens through cache.update + attention."""
    g = torch.Generator(device=device).manual_seed(seed)
    mods = [FakeModule(i, hq // hkv) for i in range(layers)]
    for step in range(steps + 1):
        n = prompt if step == 0 else 1
        for mod in mods:
            q = torch.randn(b, hq, n, d, generator=g, device=device)
            k = torch.randn(b, hkv, n, d, generator=g, device=device)
            v = torch.randn(b, hkv, n, d, generator=g, device=device)
            keys, values = cache.update(k, v, mod.layer_idx)
            attn(mod, q, keys, values, None, scaling=d ** -0.5)
        if check is not None:
            check(step, cache)


REFERENCE_ATTN = R.make_attention_interface(R.attention)


def promised(config, budget, seen):
    """Original positions the policy promises to hold after `seen` tokens with this layer budget."""
    k = min(budget, seen)
    if config.policy == "streaming":
        sinks = min(config.sink, k)
        return set(range(sinks)) | set(range(seen - (k - sinks), seen))
    if config.policy == "match_span":
        sinks = min(config.span_sinks, k)          # match_span's own sink count (default 1)
        return set(range(sinks)) | set(range(seen - min(k - sinks, max(1, int(k * config.recent_ratio))), seen))
    if config.policy in ("cab", "dynamic_local"):
        recent = int(k * config.local_ratio)
    elif config.policy == "snapkv":
        recent = min(config.window, k // 2)
    elif config.policy == "none":
        recent = seen
    else:
        recent = min(k, max(1, int(k * config.recent_ratio)))
    return set(range(seen - recent, seen))


@pytest.mark.parametrize("per_head", [True, False], ids=["head", "layer"])
@pytest.mark.parametrize("policy", [p for p in POLICIES if p not in ("delayed", "question_aware",
                                                                       "hybrid_semantic", "dynamic_local",
                                                                       "match_span")])
def test_nothing_promised_is_lost_over_many_decode_steps(policy, per_head):
    config = EvictionConfig(policy=policy, budget=12, sink=3, window=4, per_head=per_head,
                            bridge="median" if policy != "cab" else "connectivity")
    cache = CabCache(config)

    def check(step, cache):
        seen = 24 + step
        for layer in cache.layers:
            pos = layer.positions
            expected_len = seen if policy == "none" else 12
            assert pos.shape[-1] == expected_len and cache.get_seq_length() == seen
            for row in pos.reshape(-1, pos.shape[-1]).tolist():
                missing = promised(config, layer.budget, seen) - set(row)
                assert not missing, f"step {step}: promised positions {sorted(missing)} evicted"

    drive(cache, REFERENCE_ATTN, 40, check=check)


@pytest.mark.parametrize("policy", ["question_aware", "hybrid_semantic", "dynamic_local", "delayed",
                                    "match_span"])
def test_question_policies_keep_their_promises_over_decode(policy):
    """The question-based policies (question span given) and delayed: recent window over 40 steps;
    dynamic_local with the question at the end keeps qa_local_ratio of the budget as the local window,
    which holds the whole question right after the prompt."""
    config = EvictionConfig(policy=policy, budget=12, qa_tail=8)
    cache = CabCache(config, question_span=(19, 23))

    def check(step, cache):
        seen = 24 + step
        for layer in cache.layers:
            pos = layer.positions
            if policy == "delayed" and step == 0:
                assert pos.shape[-1] == 24                    # nothing evicted during the prefill
                continue
            assert pos.shape[-1] == 12
            recent = int(12 * config.qa_local_ratio) if policy == "dynamic_local" and step == 0 else None
            want = set(range(seen - recent, seen)) if recent else promised(config, 12, seen)
            if policy == "dynamic_local" and step == 0:
                assert set(range(19, 23)) <= want
            for row in pos.reshape(-1, pos.shape[-1]).tolist():
                assert not want - set(row), f"step {step}: {sorted(want - set(row))} evicted"

    drive(cache, REFERENCE_ATTN, 40, check=check)


def snapshot(cache):
    return [(layer.seen, layer.keys.clone(), layer.values.clone(), layer.scores.clone(),
             layer.positions.clone(), layer.valid.clone()) for layer in cache.layers]


def assert_snapshot_equal(a, b):
    assert len(a) == len(b)
    for la, lb in zip(a, b):
        assert la[0] == lb[0]
        for ta, tb in zip(la[1:], lb[1:]):
            assert torch.equal(ta, tb)


@pytest.mark.parametrize("bad_layer", [0, 1])
@pytest.mark.parametrize("policy", ["h2o", "snapkv", "delayed"])
def test_cache_unchanged_and_usable_after_a_failing_step(policy, bad_layer):
    """A NaN reaching layer `bad_layer` mid-generation raises ValueError; the cache is left exactly as
    before that step (every layer), and the next good steps give what an uninterrupted run gives."""
    config = EvictionConfig(policy=policy, budget=10, window=4)
    clean, broken = CabCache(config), CabCache(config)
    drive(clean, REFERENCE_ATTN, 6, seed=5)
    drive(broken, REFERENCE_ATTN, 3, seed=5)
    before = snapshot(broken)
    mods = [FakeModule(i, 2) for i in range(2)]
    with pytest.raises(ValueError, match="NaN"):
        for mod in mods:
            q = torch.randn(1, 4, 1, 16)
            if mod.layer_idx == bad_layer:
                q[0, 0, 0, 0] = math.nan
            keys, values = broken.update(torch.randn(1, 2, 1, 16), torch.randn(1, 2, 1, 16), mod.layer_idx)
            REFERENCE_ATTN(mod, q, keys, values, None, scaling=0.25)
    assert_snapshot_equal(snapshot(broken), before)
    # continue with the tokens the clean run saw at steps 4..6
    g = torch.Generator().manual_seed(5)
    for step in range(7):
        n = 24 if step == 0 else 1
        for mod in mods:
            q, k, v = (torch.randn(1, h, n, 16, generator=g) for h in (4, 2, 2))
            if step >= 4:
                keys, values = broken.update(k, v, mod.layer_idx)
                REFERENCE_ATTN(mod, q, keys, values, None, scaling=0.25)
    assert_snapshot_equal(snapshot(broken), snapshot(clean))


def test_model_generation_continues_after_a_failing_step():
    """The same through a real model: a NaN embedding mid-decode raises, then decoding resumes and gives
    the logits of an uninterrupted run."""
    model = tiny_model("llama")
    model.set_attn_implementation("cab_reference")
    g = torch.Generator().manual_seed(7)
    seq = torch.randint(3, 96, (1, 30), generator=g)
    config = EvictionConfig(policy="h2o", budget=12)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clean = CabCache(config)
        clean_logits = [model(seq[:, :20], past_key_values=clean).logits[:, -1]]
        clean_logits += [model(seq[:, t:t + 1], past_key_values=clean).logits[:, -1] for t in range(20, 30)]
        cache = CabCache(config)
        logits = [model(seq[:, :20], past_key_values=cache).logits[:, -1]]
        logits += [model(seq[:, t:t + 1], past_key_values=cache).logits[:, -1] for t in range(20, 25)]
        embeds = model.get_input_embeddings()(seq[:, 25:26]).clone()
        embeds[0, 0, 0] = math.nan
        with pytest.raises(ValueError, match="NaN"):
            model(inputs_embeds=embeds, past_key_values=cache)
        assert cache.get_seq_length() == 25
        logits += [model(seq[:, t:t + 1], past_key_values=cache).logits[:, -1] for t in range(25, 30)]
    torch.testing.assert_close(torch.stack(logits), torch.stack(clean_logits), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# 5. Soaks: many decode steps with eviction

def soak(attn, steps, device, policy="h2o", budget=32, check_every=1, b=2, prompt=64):
    config = EvictionConfig(policy=policy, budget=budget, window=8)
    cache = CabCache(config)
    memory = []

    def check(step, cache):
        if step % check_every and step != steps:
            return
        seen = prompt + step
        assert cache.get_seq_length() == seen
        for layer in cache.layers:
            assert layer.keys.shape[-2] == budget and layer.positions.shape[-1] == budget
            assert bool(torch.isfinite(layer.scores).all()), f"step {step}: non-finite scores"
            pos = layer.positions
            assert bool((pos[..., 1:] > pos[..., :-1]).all()), f"step {step}: positions not increasing"
            assert int(pos.max()) == seen - 1 and int(pos.min()) >= 0
            assert bool((pos[..., -1] == seen - 1).all()), "the newest token must be kept"
        if device == "cuda" and step >= 100:
            memory.append(torch.cuda.memory_allocated())

    assert prompt > budget, "the prompt must overflow the budget so the cache is flat from the first cut"
    drive(cache, attn, steps, b=b, prompt=prompt, device=device, check=check)
    return memory


@pytest.mark.parametrize("policy", ["h2o", "cab", "streaming"])
def test_cpu_soak_hundreds_of_decode_steps(policy):
    soak(REFERENCE_ATTN, 300, "cpu", policy=policy)


@needs_fast
def test_cpu_soak_fast_twin():
    soak(R.make_attention_interface(cab_fast.attention), 40 if not GPU else 300,
         "cuda" if GPU else "cpu", check_every=1)


# ----------------------------------------------------------------------------------------------------
# 6. GPU only: more than 2^31 elements, 10k decode steps

def spot_check_rows(q, k, v, out, scores, rows, key_cols, scale, group, causal=True):
    """float64 check of a few (b, head, query) output rows and of the scores of a few late keys."""
    nq, nk = q.shape[2], k.shape[2]
    for b, h, i in rows:
        kv = h // group
        last = i + nk - nq + 1 if causal else nk
        logits = (k[b, kv, :last].double() @ q[b, h, i].double()) * scale
        p = torch.softmax(logits, dim=0)
        expected = p @ v[b, kv, :last].double()
        err = float((out[b, h, i].double() - expected).abs().max())
        assert err <= 2e-2 * float(expected.abs().max()) + 1e-3, f"row {(b, h, i)}: error {err:.3g}"
    for b, kv, j in key_cols:            # a late key: only the queries at or after it see it
        first = max(0, j - (nk - nq)) if causal else 0
        total = 0.0
        for h in range(kv * group, (kv + 1) * group):
            for i in range(first, nq):
                last = i + nk - nq + 1 if causal else nk
                logits = (k[b, kv, :last].double() @ q[b, h, i].double()) * scale
                total += float(torch.softmax(logits, dim=0)[j])
        got = float(scores[b, kv, j])
        assert abs(got - total) <= 1e-3 * total + 1e-5, f"score of key {(b, kv, j)}: {got} vs {total}"


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_more_than_2_31_elements_in_k_and_v(impl):
    """k and v of 1 x 32 x (2^19 + 64) x 128 > 2^31 elements each, 16 queries (a chunk): 32-bit offsets
    would wrap. Spot-checked against float64; every row's scores sum to Nq * G."""
    torch.manual_seed(0)
    b, hkv, group, nq, nk, d = 1, 32, 1, 16, 2 ** 19 + 64, 128
    assert b * hkv * nk * d > 2 ** 31
    q = torch.randn(b, hkv * group, nq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, hkv, nk, d, device="cuda", dtype=torch.bfloat16)
    fn = R.attention if impl == "reference" else cab_fast.attention
    out, scores = fn(q, k, v, causal=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(-1), torch.full((b, hkv), float(nq * group), device="cuda"),
                               rtol=1e-4, atol=1e-3)
    spot_check_rows(q, k, v, out, scores, [(0, 0, 0), (0, 31, 15), (0, 17, 7)],
                    [(0, 0, nk - 1), (0, 31, nk - 3)], d ** -0.5, group)


@needs_gpu
@needs_fast
def test_gpu_fast_prefill_more_than_2_31_elements():
    """A causal prefill with q, k, v, out of 1 x 32 x (2^19 + 64) x 128 elements each (> 2^31) through the
    fast twin (the reference would materialise N x N). Scores of the last keys and a few rows vs float64."""
    torch.manual_seed(1)
    b, h, n, d = 1, 32, 2 ** 19 + 64, 128
    q = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16)
    out, scores = cab_fast.attention(q, k, v, causal=True)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all() and torch.isfinite(scores).all()
    torch.testing.assert_close(scores.sum(-1), torch.full((b, h), float(n), device="cuda"), rtol=1e-4, atol=1)
    spot_check_rows(q, k, v, out, scores, [(0, 0, 0), (0, 5, n - 1), (0, 31, n // 2)],
                    [(0, 3, n - 1), (0, 30, n - 2)], d ** -0.5, 1)


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_ten_thousand_decode_steps(impl):
    """10k decode steps with eviction (budget 256, 2 layers): scores finite, positions true and strictly
    increasing, the cache flat at the budget, allocated memory flat."""
    attn = REFERENCE_ATTN if impl == "reference" else R.make_attention_interface(cab_fast.attention)
    memory = soak(attn, 10_000, "cuda", budget=256, check_every=500, b=1, prompt=512)
    assert max(memory) - min(memory) <= 1 << 20, f"memory grew: {min(memory)} -> {max(memory)} bytes"
