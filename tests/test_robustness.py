"""Robustness: randomised equivalence with a float64 oracle (attention and the kept sets), numerics at
the edges, the table of bad attention inputs, every policy's promise held over many decode steps, a
model that survives a failing step, long decode soaks, and the GPU sizes (more than 2^31 elements).

cab_reference always; cab_fast too (Triton interpreter on CPU at tiny sizes, set up in conftest.py).
Hypothesis runs derandomised (testkit.examples) with a fixed example budget, so CI is reproducible;
`pytest --slow` runs the same properties with many more examples. GPU-only tests skip without CUDA.

Tolerances are derived per case from the float32 rounding unit u = 2^-24:
  delta  = (D + 2) * u * scale * max_ij sum_d |q_id k_jd|     bound on a float32 logit's error
  out    |ref - oracle| <= eps(dtype) |oracle| + (4 delta + (Nk + D) u) max|v| + 1e-7
  scores |ref - oracle| <= (4 delta + (Nq G + Nk) u) * oracle + 1e-7
The fast twin rounds P to the input dtype before P @ V (as flash kernels do) and works in exp2 from a
log-sum-exp: it gets eps(dtype) max|v| more on outputs and twice the bounds plus 64 u relative on scores.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cab_reference as R
from cab_reference import BRIDGE_MODES, POLICIES, EvictionConfig, EvictionLoop
from testkit import (
    CACHE_KWARG,
    GPU,
    SLOW,
    U32,
    assert_same_kept,
    bad_attention_calls,
    examples,
    forward,
    left_padding_mask,
    make_qkv,
    oracle_attention,
    policy_cases,
    promised,
    spot_check_rows,
    tiny_model,
)

try:
    import cab_fast
except ImportError as exc:         # the twin is optional for these tests (no triton)
    cab_fast, FAST_IMPORT_ERROR = None, exc

FAST_OK = cab_fast is not None and (GPU or os.environ.get("TRITON_INTERPRET") == "1")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

needs_fast = pytest.mark.skipif(not FAST_OK, reason="cab_fast unavailable (no CUDA and no TRITON_INTERPRET)")
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root


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


RATIOS = st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0])
KNOBS = {                          # knob name -> strategy; a knob not listed keeps its default
    "recent_ratio": RATIOS, "qa_recent_ratio": RATIOS, "bridge_ratio": st.sampled_from([0.0, 0.1, 0.2, 0.5]),
    "bridge": st.sampled_from(BRIDGE_MODES), "sinks": st.integers(0, 6), "window": st.sampled_from([1, 3, 5, 9]),
    "pool": st.sampled_from([1, 3, 7]), "alpha": st.sampled_from([0.0, 0.5, 1.0, 4.0]),
    "radius": st.integers(0, 9), "qa_tail": st.integers(1, 16), "threshold": st.sampled_from([0.0, 0.5, 0.9]),
}


@st.composite
def eviction_configs(draw):
    """Any registered policy with random knobs, a budget or a sparsity, per head or per layer."""
    cls = R.POLICY_TYPES[draw(st.sampled_from(POLICIES))]
    knobs = {f.name: draw(KNOBS[f.name]) for f in dataclasses.fields(cls) if f.name in KNOBS}
    if "bridge_ratio" in knobs:                       # CAB: importance takes what is left
        knobs["bridge_ratio"] = min(knobs["bridge_ratio"], round(1.0 - knobs["recent_ratio"], 1))
    return EvictionConfig(policy=cls(**knobs), budget=draw(st.one_of(st.none(), st.integers(1, 60))),
                          sparsity=draw(st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.99])), per_head=draw(st.booleans()))


def shared_evidence(scores, seed, question_mask):
    """Evidence other than the scores, identical for both sides (only the scores differ between them)."""
    g = torch.Generator().manual_seed(seed)
    b, h, n = scores.shape

    def rand():
        return torch.rand(b, h, n, generator=g, dtype=torch.float64).float()

    return {"window_scores": rand(), "bidirectional_scores": rand() * n, "question_similarity": rand() * 2 - 1,
            "decode_scores": rand(), "question_match": rand(), "connectivity": (rand() * n).floor(),
            "curvature": rand() * 20 - 16, "question_mask": question_mask}


def check_kept(case, config, side_scores, truth_scores, scores_rel):
    b, h, n = truth_scores.shape
    qm = torch.zeros(b, n, dtype=torch.bool)
    qm[:, max(0, n - 4):] = True
    evidence = shared_evidence(truth_scores, case["seed"], qm)
    key_mask = None if case["pads"] is None else left_padding_mask(b, n, case["pads"])
    kept_side = R.select_kept(side_scores.float(), config, key_mask=key_mask, **evidence)
    kept_truth = R.select_kept(truth_scores.float(), config, key_mask=key_mask, **evidence)
    k = config.budget_for(n)
    assert tuple(kept_side.shape) == (b, h, k)
    if k > 1:
        assert bool((kept_side[..., 1:] > kept_side[..., :-1]).all())
    assert torch.equal(kept_side, R.select_kept(side_scores.float().clone(), config, key_mask=key_mask,
                                                **evidence)), "selection not deterministic"
    assert_same_kept(kept_side, kept_truth, truth_scores, scores_rel, config.policy, config.per_head, evidence)


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
@pytest.mark.parametrize("nq,nk", [(0, 0), (0, 5)])
def test_no_queries_or_no_keys_give_empty_results(impl, nq, nk):
    """Regression: the reference raised amax()'s IndexError for Nk = 0 where the fast twin returns empty."""
    q, k, v = torch.randn(2, 4, nq, 8), torch.randn(2, 2, nk, 8), torch.randn(2, 2, nk, 8)
    out, scores = run_impl(impl, q, k, v)
    assert out.shape == (2, 4, nq, 8) and scores.shape == (2, 2, nk) and not bool(scores.any())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nonfinite_inputs_raise_when_validating(impl, where, bad):
    g = torch.Generator().manual_seed(3)
    t = {"q": torch.randn(1, 2, 4, 16, generator=g), "k": torch.randn(1, 2, 6, 16, generator=g),
         "v": torch.randn(1, 2, 6, 16, generator=g)}
    t[where][0, 1, 2, 3] = bad
    with pytest.raises(ValueError, match=f"^{where}: contains NaN or inf"):
        run_impl(impl, t["q"], t["k"], t["v"], validate=True)


def test_reference_without_validate_is_nan_in_nan_out():
    """As SDPA: by default values are not inspected; a NaN query spoils its own output row only."""
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(1, 2, 3, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8)
    q[0, 0, 1, 0] = math.nan
    out, _ = R.attention(q, k, v)
    assert torch.isnan(out[0, 0, 1]).all()
    finite = torch.ones_like(out, dtype=torch.bool)
    finite[0, 0, 1] = False
    assert torch.isfinite(out[finite]).all()


# ----------------------------------------------------------------------------------------------------
# 3. Bad inputs: ValueError / TypeError naming the argument (the one table, for both implementations)

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", bad_attention_calls(), ids=lambda c: c[0])
def test_bad_attention_inputs(impl, case):
    _, args, kwargs, error, word = case
    fn = R.attention if impl == "reference" else cab_fast.attention
    with pytest.raises(error, match=word):
        fn(*args, **kwargs)


@needs_fast
def test_fast_rejects_unsupported_head_dim_and_dtype():
    dev = "cuda" if GPU else "cpu"
    big = torch.randn(1, 1, 2, cab_fast.MAX_HEAD_DIM + 8, device=dev)
    with pytest.raises(ValueError, match="head dim"):
        cab_fast.attention(big, big, big)
    d64 = torch.randn(1, 1, 2, 16, dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match="float64"):
        cab_fast.attention(d64, d64, d64)
    with pytest.raises(TypeError, match="q, k, v: expected one dtype"):
        cab_fast.attention(d64.float(), d64.half(), d64.half())


@pytest.mark.skipif(cab_fast is None, reason="cab_fast not importable")
def test_fast_cpu_tensor_without_interpreter_points_to_alternatives(monkeypatch):
    monkeypatch.setattr(cab_fast, "_INTERPRET", False)
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError) as info:
        cab_fast.attention(q, q, q)
    assert "cab_reference" in str(info.value) and "TRITON_INTERPRET" in str(info.value)


@pytest.mark.skipif(cab_fast is None, reason="cab_fast not importable")
def test_direct_launch_only_under_the_triton_releases_it_was_run_on():
    """Direct launches call triton internals: they are taken only under the releases named in
    DIRECT_LAUNCH_TRITON (decided on import), and every other release launches through triton's public API."""
    assert cab_fast._direct_launch_tested("3.6.0") and cab_fast._direct_launch_tested("3.6.1+git5f1b2c")
    for version in ("3.5.1", "3.9.0", "3.10.0", "4.6.0", "13.6.0"):
        assert not cab_fast._direct_launch_tested(version), version
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}      # compiled kernels, not the interpreter
    for version, direct in (("3.6.0", True), ("3.9.0", False)):
        code = f"import triton; triton.__version__ = {version!r}; import cab_fast; print(cab_fast._DIRECT_LAUNCH)"
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
        assert run.stdout.strip() == str(direct), (version, run.stderr[-2000:])


@needs_gpu
@pytest.mark.parametrize("nq", [64, 1], ids=["prefill", "decode"])
def test_public_launch_matches_the_direct_launch(monkeypatch, nq):
    q, k, v = make_qkv(2, 8, 2, nq, 300, 64, dtype=torch.bfloat16, device="cuda")
    direct = [cab_fast.attention(q, k, v) for _ in range(2)]                  # the second one launches directly
    monkeypatch.setattr(cab_fast, "_DIRECT_LAUNCH", False)
    public = cab_fast.attention(q, k, v)
    for a, b in zip(direct[1], public):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------------
# 4. The eviction loop over many decode steps: promises kept, failures survived

def decode(loop, steps, *, b=1, hq=4, hkv=2, d=16, prompt=24, layers=2, device="cpu", seed=0,
           attention_fn=R.attention, check=None):
    """Prefill `prompt` random tokens, then decode `steps` tokens, through loop.forward_layer."""
    g = torch.Generator(device=device).manual_seed(seed)
    for step in range(steps + 1):
        n = prompt if step == 0 else 1
        for layer in range(layers):
            q, k, v = (torch.randn(b, h, n, d, generator=g, device=device) for h in (hq, hkv, hkv))
            loop.forward_layer(layer, q, k, v, scale=d ** -0.5, attention_fn=attention_fn)
        if check is not None:
            check(step, loop)


@pytest.mark.parametrize("per_head", [True, False], ids=["head", "layer"])
@pytest.mark.parametrize("policy", policy_cases(streaming={"sinks": 3}, snapkv={"window": 4},
                                                dynamic_local={"qa_tail": 8}))
def test_nothing_promised_is_lost_over_many_decode_steps(policy, per_head):
    """30 decode steps at budget 12 after a 24-token prompt whose question is tokens 19..22: every
    step, every layer and row holds what the policy promises (testkit.protected). delayed keeps the
    whole prompt until the first generated token; dynamic_local keeps its question-at-the-end share of
    recent tokens throughout (decided in the prompt), which right after the prompt holds the whole question."""
    loop = EvictionLoop(EvictionConfig(policy=policy, budget=12, per_head=per_head), question_span=(19, 23))

    def check(step, loop):
        seen = 24 + step
        for layer in loop.layers:
            pos = layer.positions
            assert layer.seen == seen
            if isinstance(policy, R.Delayed) and step == 0:
                assert pos.shape[-1] == 24, "delayed: nothing evicted during the prefill"
                continue
            assert pos.shape[-1] == (seen if isinstance(policy, R.Dense) else 12)
            want = promised(policy, 12, seen)          # dynamic_local: decided in the prompt, kept after
            if isinstance(policy, R.DynamicLocal) and step == 0:
                assert set(range(19, 23)) <= want
            for row in pos.reshape(-1, pos.shape[-1]).tolist():
                assert not want - set(row), f"step {step}: promised positions {sorted(want - set(row))} evicted"

    decode(loop, 30, check=check)


def test_model_generation_continues_after_a_failing_step():
    """Through a real model and the transformers adapter (cab_reference validates its inputs): a NaN
    embedding mid-decode raises, the cache is as before that step, and decoding resumes with the logits
    of an uninterrupted run."""
    model = tiny_model("llama")
    model.set_attn_implementation("cab_reference")
    seq = torch.randint(3, 96, (1, 30), generator=torch.Generator().manual_seed(7))
    config = EvictionConfig(policy="h2o", budget=12)
    clean = R.CabCache(config)
    clean_logits = [forward(model, seq[:, :20], clean)[:, -1]]
    clean_logits += [forward(model, seq[:, t:t + 1], clean)[:, -1] for t in range(20, 30)]
    cache = R.CabCache(config)
    logits = [forward(model, seq[:, :20], cache)[:, -1]]
    logits += [forward(model, seq[:, t:t + 1], cache)[:, -1] for t in range(20, 25)]
    before = [(layer.keys, layer.scores, layer.positions) for layer in cache.layers]
    embeds = model.get_input_embeddings()(seq[:, 25:26]).detach().clone()
    embeds[0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"), torch.no_grad():
        model(inputs_embeds=embeds, **{CACHE_KWARG: cache})
    assert cache.get_seq_length() == 25
    for (keys, scores, positions), layer in zip(before, cache.layers):
        assert layer.keys is keys and layer.scores is scores and layer.positions is positions
    logits += [forward(model, seq[:, t:t + 1], cache)[:, -1] for t in range(25, 30)]
    torch.testing.assert_close(torch.stack(logits), torch.stack(clean_logits), rtol=0, atol=0)


# A step that fails: a 3-layer model, the failure injected into the middle layer (or the last, or the model
# between layers 0 and 1) as the layer's own code finishes, so that earlier layers, and for "update" the
# failing layer itself, already hold the step's token. PROMPT tokens, then decode steps of one token each.
PROMPT, FAIL_LAYER = 12, 1
DEVICE = "cuda" if GPU else "cpu"             # the fast cache's kernels: a GPU's, else the interpreter's
SEQ = torch.randint(3, 96, (1, PROMPT + 6), generator=torch.Generator().manual_seed(11)).to(DEVICE)
CACHES = {"reference": ("cab_reference", R)}
if FAST_OK:
    CACHES["fast"] = ("cab_fast", cab_fast)


@pytest.fixture(scope="module")
def three_layers():
    return tiny_model("llama", layers=3, device=DEVICE)


def chunks(failing_step):
    """The token ids of each forward: the prompt, then one token a step, two steps past `failing_step`."""
    ends = [PROMPT] + list(range(PROMPT + 1, PROMPT + failing_step + 3))
    return [SEQ[:, start:end] for start, end in zip([0] + ends, ends)]


def fail_after(monkeypatch, owner, name, error, when):
    """owner.name runs as before, then raises `error` where when(self, *args) holds."""
    original = getattr(owner, name)

    def failing(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if when(self, *args):
            raise error("injected failure")
        return result
    monkeypatch.setattr(owner, name, failing)


def inject(monkeypatch, place, error, model, cache):
    """Make the next forward raise `error` at `place`."""
    def middle(layer, *args):
        return len(cache.layers) > FAIL_LAYER and layer is cache.layers[FAIL_LAYER]

    def last(layer, *args):
        return layer is cache.layers[-1] and len(cache.layers) == len(model.model.layers)
    fast = type(cache) is not R.CabCache
    if place == "update":
        fail_after(monkeypatch, cab_fast.FastLayer if fast else R.CabLayer, "update", error, middle)
    elif place == "attention":
        fail_after(monkeypatch, R.LayerState, "after_attention", error, middle)
        if fast:
            fail_after(monkeypatch, cab_fast.FastLayer, "attend", error, middle)
    elif place == "between layers":
        def mlp(x):
            raise error("injected failure")
        monkeypatch.setattr(model.model.layers[0].mlp, "forward", mlp)
    elif place == "after the last layer":                # the cache's work once the last layer attended
        if fast:
            fail_after(monkeypatch, cab_fast.CabCache, "after_reference_forward", error,
                       lambda c, layer: layer.index == len(model.model.layers) - 1)
            fail_after(monkeypatch, cab_fast.SlotBank, "end_step", error, lambda bank: True)
        else:
            fail_after(monkeypatch, R.LayerState, "after_attention", error, last)


def forward_each(model, impl, cache, steps):
    """One forward per chunk of token ids through `cache`: the last position's logits of each."""
    model.set_attn_implementation(impl)
    return [forward(model, ids, cache)[:, -1] for ids in steps]


@pytest.fixture(scope="module")
def clean_runs(three_layers):
    """(which, failing_step) -> the logits of every step and the kept positions after the last, of a cache
    that never failed (computed once)."""
    runs = {}

    def clean(which, failing_step):
        if (which, failing_step) not in runs:
            impl, module = CACHES[which]
            cache = module.CabCache(EvictionConfig(policy="h2o", budget=6))
            logits = forward_each(three_layers, impl, cache, chunks(failing_step))
            runs[which, failing_step] = logits, cache.kept_positions()
        return runs[which, failing_step]
    return clean


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("place", ["update", "attention", "between layers", "after the last layer"])
@pytest.mark.parametrize("failing_step", [0, 1], ids=["prompt", "decode"])
@pytest.mark.parametrize("which", list(CACHES))
def test_a_failed_step_is_undone_or_refused(three_layers, clean_runs, monkeypatch, which, failing_step, place, error):
    """A forward that raises (an exception or an interrupt) leaves the cache as before the step (it then
    goes on with the logits and kept positions of a cache that never failed) or, for the fast cache's steps
    on its slots (written in place), refuses every later use with one clear error: never half a step."""
    model, (impl, module) = three_layers, CACHES[which]
    steps, (want, want_kept) = chunks(failing_step), clean_runs(which, failing_step)
    cache = module.CabCache(EvictionConfig(policy="h2o", budget=6))
    forward_each(model, impl, cache, steps[:failing_step])
    before = (cache.get_seq_length(), [p.clone() for p in cache.kept_positions()])
    with monkeypatch.context() as patch:
        inject(patch, place, error, model, cache)
        with pytest.raises(error, match="injected failure"):
            forward_each(model, impl, cache, steps[failing_step:failing_step + 1])
    if which == "fast" and failing_step > 0:             # a step on the slots
        with pytest.raises(RuntimeError, match="start a new cache"):
            forward_each(model, impl, cache, steps[failing_step:])
        return
    assert cache.get_seq_length() == before[0]
    assert all(torch.equal(a, b) for a, b in zip(cache.kept_positions(), before[1], strict=True))
    got = forward_each(model, impl, cache, steps[failing_step:])
    torch.testing.assert_close(torch.stack(got), torch.stack(want[failing_step:]), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(cache.kept_positions(), want_kept, strict=True))


@pytest.mark.parametrize("which", list(CACHES))
def test_a_failure_after_the_caches_last_call_finds_the_step_complete(three_layers, clean_runs, monkeypatch,
                                                                       which):
    """The model's final norm runs after the cache's last call of the forward: the cache cannot see it fail
    and holds the whole step (every layer the token), as transformers' own caches do; the next step goes
    on from there."""
    model, (impl, module) = three_layers, CACHES[which]
    steps, (want, _) = chunks(1), clean_runs(which, 1)
    cache = module.CabCache(EvictionConfig(policy="h2o", budget=6))
    forward_each(model, impl, cache, steps[:1])
    def final_norm(x):
        raise RuntimeError("injected failure")
    with monkeypatch.context() as patch:
        patch.setattr(model.model.norm, "forward", final_norm)
        with pytest.raises(RuntimeError, match="injected failure"):
            forward_each(model, impl, cache, steps[1:2])
    got = forward_each(model, impl, cache, steps[2:])
    torch.testing.assert_close(torch.stack(got), torch.stack(want[2:]), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------
# 5. Soaks: many decode steps with eviction

def soak(attention_fn, steps, device, policy="h2o", budget=32, check_every=1, b=2, prompt=64):
    loop = EvictionLoop(EvictionConfig(policy=R.make_policy(policy), budget=budget))
    memory = []

    def check(step, loop):
        if step % check_every and step != steps:
            return
        seen = prompt + step
        for layer in loop.layers:
            assert layer.seen == seen
            assert layer.keys.shape[-2] == budget and layer.positions.shape[-1] == budget
            assert bool(torch.isfinite(layer.scores).all()), f"step {step}: non-finite scores"
            pos = layer.positions
            assert bool((pos[..., 1:] > pos[..., :-1]).all()), f"step {step}: positions not increasing"
            assert int(pos.min()) >= 0 and bool((pos[..., -1] == seen - 1).all()), "the newest token must be kept"
        if device == "cuda" and step >= 100:
            memory.append(torch.cuda.memory_allocated())

    assert prompt > budget, "the prompt must overflow the budget so the cache is flat from the first cut"
    decode(loop, steps, b=b, prompt=prompt, device=device, attention_fn=attention_fn, check=check)
    return memory


@pytest.mark.parametrize("policy", ["h2o", "cab", "streaming"])
def test_cpu_soak_hundreds_of_decode_steps(policy):
    soak(R.attention, 300, "cpu", policy=policy)


@needs_fast
def test_soak_fast_twin():
    soak(cab_fast.attention, 300 if GPU else 40, "cuda" if GPU else "cpu")


# ----------------------------------------------------------------------------------------------------
# 6. GPU only: more than 2^31 elements, 10k decode steps

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
@needs_fast
@pytest.mark.parametrize("route", ["prefill", "decode"])
def test_gpu_fast_more_than_2_31_elements_in_one_head(route):
    """One KV head's K of 1 x 1 x (2^24 + 77) x 128 > 2^31 elements: the key offsets within a head must be
    64-bit (the tests above overflow in the head offsets), through the prefill and the decode kernels.
    Checked in float32 chunks (float64 spot checks of 2^24 keys would take tens of GiB)."""
    d, nk = 128, (1 << 31) // 128 + 77
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, 1, nk, d, device="cuda", dtype=torch.bfloat16, generator=g)
    nq = 1 if route == "decode" else 64
    q = torch.randn(1, 1, nq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    out, scores = cab_fast._attention(q, k, v, causal=False, route=route)
    chunk = 1 << 22
    logits = torch.cat([(k[0, 0, i:i + chunk].float() @ q[0, 0].float().T) for i in range(0, nk, chunk)])
    logits = logits / math.sqrt(d)                                              # (Nk, Nq)
    p = torch.exp(logits - torch.logsumexp(logits, 0))
    want_scores = p.sum(1)
    want_out = torch.stack([p[i:i + chunk].T @ v[0, 0, i:i + chunk].float() for i in range(0, nk, chunk)]).sum(0)
    assert (scores[0, 0] - want_scores).abs().max().item() < 1e-5 + 1e-3 * want_scores.abs().max().item()
    assert (out[0, 0].float() - want_out).abs().max().item() < 2e-2


@needs_gpu
@pytest.mark.parametrize("impl", IMPLS)
def test_gpu_ten_thousand_decode_steps(impl):
    """10k decode steps with eviction (budget 256, 2 layers): scores finite, positions true and strictly
    increasing, the cache flat at the budget, allocated memory flat."""
    fn = R.attention if impl == "reference" else cab_fast.attention
    memory = soak(fn, 10_000, "cuda", budget=256, check_every=500, b=1, prompt=512)
    assert max(memory) - min(memory) <= 1 << 20, f"memory grew: {min(memory)} -> {max(memory)} bytes"
