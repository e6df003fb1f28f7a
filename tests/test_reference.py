"""Tests of cab_reference.py, in the file's reading order: attention against the float64 oracle, the
policies as objects (knobs, names), exact budgets, every policy's keep promise at the selection level,
the eviction loop as plain state (and that the transformers adapter is exactly that loop), generation
through tiny random Llama / Qwen2 models, question spans, and clear errors for bad selection/cache input.

Randomised equivalence, numerics at the edges, the bad-attention-input table, decode soaks and the GPU
sizes are in test_robustness.py; shared helpers in testkit.py.

Tolerances against the oracle (attention in float32, inputs converted exactly):
  out    |ref - oracle| <= eps(dtype) * |oracle| + 1e-5    (rounding to the output dtype is <= eps/2
         relative; the float32 computation adds < 1e-5 absolute at these sizes, measured <= 2e-6)
  scores |ref - oracle| <= 1e-5 + 1e-5 * |oracle|          (each probability carries a few float32
         ulps, summed over Nq * G terms)
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cab_reference as R
from cab_reference import CabCache, EvictionConfig, EvictionLoop, attention, select_kept, select_parts
from testkit import (
    CACHE_KWARG,
    SINKS_THEN_RECENT,
    Spy,
    examples,
    forward,
    generate,
    left_padding_mask,
    make_qkv,
    oracle_attention,
    policy_cases,
    prompts,
    protected,
    question_mask,
    random_context,
    tiny_model,
    word_tokenizer,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_against_oracle(q, k, v, *, causal, key_mask=None, scale=None):
    out, scores = attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)
    ref_out, ref_scores = oracle_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape)
    assert scores.dtype == torch.float32 and tuple(scores.shape) == (k.shape[0], k.shape[1], k.shape[2])
    eps = torch.finfo(q.dtype).eps
    err_out = (out.double() - ref_out).abs()
    err_scores = (scores.double() - ref_scores).abs()
    bad_out = err_out > eps * ref_out.abs() + 1e-5
    bad_scores = err_scores > 1e-5 + 1e-5 * ref_scores.abs()
    assert not bad_out.any(), f"out: {int(bad_out.sum())} elements off, max err {err_out.max():.3g}"
    assert not bad_scores.any(), f"scores: {int(bad_scores.sum())} off, max err {err_scores.max():.3g}"
    return out, scores


# ----------------------------------------------------------------------------------------------------
# 1. Attention against the oracle, one parametrised axis at a time

# (Nq, Nk): decode (Nq = 1), odd chunks, equal lengths, chunked prefill (Nq < Nk)
LENGTHS = [(1, 1), (1, 37), (7, 7), (7, 50), (64, 64), (64, 100), (200, 200), (200, 203)]
# (Hq, Hkv): group size 1 (MHA), 3, 4 (GQA), and MQA with 3 query heads
HEADS = [(2, 2), (6, 2), (4, 1), (3, 1)]
HEAD_DIMS = [32, 64, 128]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("nq,nk", LENGTHS)
def test_attention_lengths(nq, nk, causal):
    i = LENGTHS.index((nq, nk))
    hq, hkv = HEADS[i % len(HEADS)]
    d = HEAD_DIMS[i % len(HEAD_DIMS)]
    q, k, v = make_qkv(2, hq, hkv, nq, nk, d, torch.float32, seed=100 + i)
    check_against_oracle(q, k, v, causal=causal)


@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (6, 2), (4, 1)], ids=["G1", "G3", "G4"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_attention_dtypes_heads_dims(dtype, hq, hkv, d):
    q, k, v = make_qkv(1, hq, hkv, 7, 50, d, dtype, seed=d + hq)
    check_against_oracle(q, k, v, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("nq,nk", [(1, 30), (7, 30), (64, 64), (200, 200)])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_attention_left_padding(dtype, nq, nk, causal):
    q, k, v = make_qkv(3, 4, 1, nq, nk, 32, dtype, seed=nq * 7 + nk)
    key_mask = left_padding_mask(3, nk, [0, 5, nk - 1])        # row 2: one real token
    check_against_oracle(q, k, v, causal=causal, key_mask=key_mask)


def test_attention_explicit_scale_and_fully_masked_rows():
    q, k, v = make_qkv(2, 3, 3, 5, 9, 64, torch.float32, seed=3)
    check_against_oracle(q, k, v, causal=True, scale=0.37)
    key_mask = left_padding_mask(2, 9, [0, 9])                  # row 1: no real key at all
    out, scores = check_against_oracle(q, k, v, causal=False, key_mask=key_mask)
    assert torch.all(out[1] == 0) and torch.all(scores[1] == 0)
    # causal + left padding: the padded queries of a prefill see no key -> zero rows, never NaN
    out, scores = check_against_oracle(q[:, :, :5], k[:, :, :5], v[:, :, :5], causal=True,
                                       key_mask=left_padding_mask(2, 5, [3, 0]))
    assert torch.all(out[0, :, :3] == 0) and torch.isfinite(out).all()


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)], ids=["G1", "G3", "G4"])
@pytest.mark.parametrize("n", [1, 7, 64, 200])
def test_prefill_scores_sum_to_queries_times_group(n, hq, hkv):
    q, k, v = make_qkv(2, hq, hkv, n, n, 32, torch.bfloat16, seed=n)
    _, scores = attention(q, k, v, causal=True)
    expected = torch.full((2, hkv), float(n * (hq // hkv)))
    torch.testing.assert_close(scores.sum(-1), expected, rtol=1e-5, atol=1e-5)
    # left padding: a padded query sees nothing, so only the real rows contribute
    pads = [0, min(3, n - 1)]
    _, scores = attention(q, k, v, causal=True, key_mask=left_padding_mask(2, n, pads))
    expected = torch.tensor([[float((n - p) * (hq // hkv))] * hkv for p in pads])
    torch.testing.assert_close(scores.sum(-1), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# 2. Policies as objects: knobs, names, EvictionConfig

def bad_knob_values(default):
    """Values a knob with this default must reject: wrong types (bool is not a number) and NaN / -1."""
    if isinstance(default, str):
        return ["nonsense", 3]
    if isinstance(default, tuple):
        return [(-1,), (1.5,), [1, 2]]
    if isinstance(default, int):
        return [-1, True, 1.5]
    return [math.nan, True, "0.5"]


@pytest.mark.parametrize("name", list(R.POLICY_TYPES))
def test_every_knob_rejects_bad_values_naming_the_knob(name):
    for field in dataclasses.fields(R.POLICY_TYPES[name]):
        for bad in bad_knob_values(field.default):
            with pytest.raises(ValueError, match=f"^{field.name}"):
                R.make_policy(name, **{field.name: bad})


@pytest.mark.parametrize("policy,knobs,word", [
    ("snapkv", {"pool": 4}, "pool"), ("snapkv", {"window": 0}, "window"),
    ("h2o", {"recent_ratio": 1.5}, "recent_ratio"), ("streaming", {"sinks": -1}, "sinks"),
    ("cab", {"recent_ratio": 0.8, "bridge_ratio": 0.3}, r"recent_ratio \+ bridge_ratio"),
    ("cab", {"bridge": "pagerank"}, "connectivity"),        # the message lists the known modes
    ("dynamic_local", {"qa_recent_ratio": 1.01}, "qa_recent_ratio"), ("dynamic_local", {"qa_tail": 0}, "qa_tail"),
    ("dynamic_local", {"recent_ratio": 0.9, "bridge_ratio": 0.2}, "bridge_ratio"),   # CAB's check, inherited
    ("match_span", {"threshold": 1.0}, "threshold"), ("match_span", {"threshold": -1.5}, "threshold"),
    ("match_span", {"window": 8}, "odd"), ("match_span", {"radius": -1}, "radius"),
    ("match_span", {"layers": 0}, "layers"), ("question_aware", {"alpha": math.inf}, "alpha"),
])
def test_knob_constraints(policy, knobs, word):
    with pytest.raises(ValueError, match=word):
        R.make_policy(policy, **knobs)
    with pytest.raises(ValueError, match=word):       # the class itself checks, not only make_policy
        R.POLICY_TYPES[policy](**knobs)


def test_make_policy_errors_name_the_policy_and_its_knobs():
    with pytest.raises(ValueError) as info:
        R.make_policy("lru")
    assert "lru" in str(info.value) and all(name in str(info.value) for name in R.POLICIES)
    with pytest.raises(TypeError, match="policy 'h2o' has no knob windw; its knobs: recent_ratio"):
        R.make_policy("h2o", windw=3)
    with pytest.raises(TypeError, match="'none' has no knob sinks; its knobs: none"):
        R.make_policy("none", sinks=2)


def test_names_and_objects_are_interchangeable():
    assert R.POLICIES == tuple(R.POLICY_TYPES) and len(set(R.POLICIES)) == len(R.POLICIES)
    for name, cls in R.POLICY_TYPES.items():
        assert cls.name == name and cls.__doc__, f"{cls.__name__}: name or docstring missing"
        config = EvictionConfig(policy=name)
        assert config.policy == cls() and type(config.policy) is cls      # a name becomes the default object
    config = EvictionConfig(policy=R.SnapKV(window=32))
    assert config.policy.window == 32 and config.policy.pool == R.SnapKV().pool
    assert R.make_policy("snapkv", window=32) == config.policy and hash(config.policy) == hash(R.SnapKV(window=32))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.policy.window = 8
    assert isinstance(EvictionConfig().policy, R.MatchSpan)          # the default keeps answers given a question


@pytest.mark.parametrize("policy", [R.H2O, 3, None, {"name": "h2o"}], ids=["class", "int", "None", "dict"])
def test_eviction_config_rejects_what_is_not_a_policy(policy):
    with pytest.raises(TypeError, match="policy"):
        EvictionConfig(policy=policy)


def test_register_policy_adds_one_place(monkeypatch):
    monkeypatch.setattr(R, "POLICY_TYPES", dict(R.POLICY_TYPES))
    monkeypatch.setattr(R, "POLICIES", R.POLICIES)
    imported = R.POLICIES                      # as `from cab_reference import POLICIES` holds it

    @R.register_policy
    @dataclasses.dataclass(frozen=True)
    class Oldest(R.Policy):
        """Keeps the first tokens."""
        name = "tst_oldest"

        def parts(self, scores, k, context):
            return [R.Part("oldest", k, -R.recency(scores))]

    assert R.POLICIES[-1] == "tst_oldest" and R.make_policy("tst_oldest") == Oldest()
    assert imported[-1] == "tst_oldest" and imported == tuple(R.POLICY_TYPES)     # importers see it too
    kept = select_kept(torch.rand(1, 2, 10), EvictionConfig(policy="tst_oldest", budget=3))
    assert kept.tolist() == [[[0, 1, 2], [0, 1, 2]]]
    for bad in (int, R.Policy, "h2o"):         # not a subclass; the base class has no name
        with pytest.raises(TypeError, match="register_policy"):
            R.register_policy(bad)


def test_register_policy_refuses_a_name_already_taken(monkeypatch):
    monkeypatch.setattr(R, "POLICY_TYPES", dict(R.POLICY_TYPES))

    @dataclasses.dataclass(frozen=True)
    class Impostor(R.H2O):
        """H2O under another class."""

    for taken in ("h2o", "none"):
        Impostor.name = taken
        with pytest.raises(ValueError, match=f"'{taken}'.*taken"):
            R.register_policy(Impostor)
        assert R.POLICY_TYPES[taken] is not Impostor


@pytest.mark.parametrize("kwargs,word", [
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -1e-9}, "sparsity"), ({"sparsity": math.nan}, "sparsity"),
    ({"sparsity": "0.9"}, "sparsity"), ({"sparsity": True}, "sparsity"),
    ({"budget": 0}, "budget"), ({"budget": -3}, "budget"), ({"budget": 2.5}, "budget"), ({"budget": True}, "budget"),
    ({"per_head": "maybe"}, "per_head"), ({"per_head": 1}, "per_head"),
])
def test_config_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EvictionConfig(**kwargs)


# ----------------------------------------------------------------------------------------------------
# 3. Budgets in exact arithmetic

@pytest.mark.parametrize("sparsity,n,k", [
    (0.9, 50, 5), (0.9, 100, 10), (0.8, 10, 2), (0.7, 10, 3), (0.9, 30, 3), (0.99, 100, 1), (0.95, 1, 1),
    (0.9, 9, 1), (0.0, 17, 17), (0.5, 7, 3), (0.999, 1000, 1), (0.1, 10, 9),
])
def test_budget_is_exact(sparsity, n, k):
    """floor((1 - 0.9) * 50) in floats is floor(4.999999999999999) = 4; the budget must be 5."""
    assert EvictionConfig(sparsity=sparsity).budget_for(n) == k


@examples(300)
@given(n=st.integers(1, 10 ** 6), digits=st.integers(1, 6), data=st.data())
def test_budget_property_decimal_sparsity(n, digits, data):
    """For s = m / 10^d written as a float: K = max(1, floor((1 - s) N)) computed in integers, capped at N."""
    m = data.draw(st.integers(0, 10 ** digits - 1))
    s = m / 10 ** digits
    expected = min(n, max(1, n * (10 ** digits - m) // 10 ** digits))
    assert EvictionConfig(policy="h2o", sparsity=s).budget_for(n) == expected


@examples(300)
@given(n=st.integers(1, 10 ** 6), s=st.floats(0.0, 1.0, exclude_max=True), budget=st.none() | st.integers(1, 100))
def test_budget_property_any_sparsity(n, s, budget):
    """K = max(1, floor((1 - Fraction(str(s))) N)) capped at N, or min(budget, N); 1 <= K <= N; K grows with N;
    the cache holds to the budget itself (room to grow into), and Dense keeps everything."""
    config = EvictionConfig(policy="h2o", sparsity=s, budget=budget)
    k = config.budget_for(n)
    want = min(budget, n) if budget is not None else min(n, max(1, math.floor((1 - Fraction(str(s))) * n)))
    assert k == want and 1 <= k <= n and config.budget_for(n + 1) >= k
    assert config.cache_budget(n) == (budget if budget is not None else k)
    dense = EvictionConfig(policy="none", sparsity=s, budget=budget)
    assert dense.budget_for(n) == n and dense.cache_budget(n) == math.inf


def test_left_padding_counts_toward_the_budget():
    """The budget comes from the padded prompt length: in a left-padded batch every row keeps the same K,
    so a row with padding keeps a larger share of its real tokens (here 12 of 16 against 12 of 24)."""
    pads, n = [0, 8], 24
    loop = EvictionLoop(EvictionConfig(policy="h2o", sparsity=0.5))
    q, k, v = make_qkv(2, 4, 2, n, n, 16, seed=2)
    loop.forward_layer(0, q, k, v, valid=left_padding_mask(2, n, pads))
    layer = loop.layers[0]
    assert layer.budget == 12 and layer.keys.shape[-2] == 12
    assert layer.valid.sum(-1).tolist() == [[12, 12], [12, 12]]


# ----------------------------------------------------------------------------------------------------
# 4. Every policy at the selection level: budget, protected tokens, sorted unique indices,
#    determinism, ties, padding. The keep-promise arithmetic is testkit.protected (one entry per policy).

POLICY_CASES = policy_cases(streaming={"sinks": 4}, snapkv={"window": 8})
PER_HEAD = pytest.mark.parametrize("per_head", [True, False], ids=["head", "layer"])


def check_selection(kept, n, k):
    assert kept.dtype == torch.int64 and kept.shape[-1] == k
    assert bool((kept >= 0).all() and (kept < n).all())
    if k > 1:
        assert bool((kept[..., 1:] > kept[..., :-1]).all()), "indices must be sorted ascending and unique"


@PER_HEAD
@pytest.mark.parametrize("policy", POLICY_CASES)
def test_policy_promises(policy, per_head):
    g = torch.Generator().manual_seed(11)
    b, h, n = 2, 3, 60
    scores = torch.rand(b, h, n, generator=g) * 10
    for budget, sparsity in [(20, 0.9), (1, 0.9), (3, 0.9), (59, 0.9), (60, 0.9), (500, 0.9), (None, 0.75)]:
        config = EvictionConfig(policy=policy, per_head=per_head, budget=budget, sparsity=sparsity)
        context = random_context(policy, scores, generator=g)
        kept = select_kept(scores, config, **context)
        k = config.budget_for(n)
        check_selection(kept, n, k)
        assert tuple(kept.shape) == (b, h, k)
        sinks, recent = protected(policy, k) if k < n else (0, n)
        for row in kept.reshape(-1, k).tolist():
            assert set(range(sinks)) <= set(row), f"sinks {list(range(sinks))} not all kept: {row}"
            assert set(range(n - recent, n)) <= set(row), f"recent {recent} tokens not all kept: {row}"
        again = select_parts(scores.clone(), config, **{name: t.clone() for name, t in context.items()})
        assert torch.equal(again.kept, kept), "selection not deterministic, or select_parts disagrees"
        assert torch.equal(again.order.sort(-1).values, torch.arange(n).expand(b, h, n)), "order: a permutation"
        assert torch.equal(again.order[..., :k].sort(-1).values, kept), "order starts with the kept tokens"
        if not per_head:
            assert torch.equal(kept, kept[:, :1].expand_as(kept)), "per_head=False: one choice per layer"


TIE_CASES = policy_cases(streaming={"sinks": 3}, snapkv={"window": 4}, match_span={"sinks": 3},
                         sentence_match={"sinks": 3}, fact_slots={"sinks": 3}, title_links={"sinks": 3})


@PER_HEAD
@pytest.mark.parametrize("policy", TIE_CASES)
def test_policy_ties_break_toward_recent(policy, per_head):
    b, h, n, budget = 1, 2, 30, 10
    scores = torch.full((b, h, n), 2.0)
    config = EvictionConfig(policy=policy, per_head=per_head, budget=budget)
    kept = select_kept(scores, config, **random_context(policy, scores, fill=0.5))
    if isinstance(policy, R.Dense):
        expected = list(range(n))
    elif isinstance(policy, (R.StreamingLLM, *SINKS_THEN_RECENT)):      # sinks first, then every tie goes to recent
        expected = [0, 1, 2] + list(range(n - 7, n))
    else:                  # every score and every evidence equal: the most recent tokens win every tie
        expected = list(range(n - budget, n))
    assert kept[0, 0].tolist() == expected and kept[0, 1].tolist() == expected


def test_h2o_tie_for_the_last_slot_goes_to_the_later_token():
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, [2, 5, 8]] = 3.0          # three equal heavy hitters for two heavy slots
    config = EvictionConfig(policy=R.H2O(recent_ratio=0.2), budget=3)   # 1 recent + 2 heavy
    assert select_kept(scores, config).tolist() == [[[5, 8, 11]]]


@PER_HEAD
@pytest.mark.parametrize("policy", policy_cases(streaming={"sinks": 2}, snapkv={"window": 4}, match_span={"sinks": 2},
                                                sentence_match={"sinks": 2}, fact_slots={"sinks": 2},
                                                title_links={"sinks": 2}))
def test_policy_never_keeps_padding_while_evicting_real_tokens(policy, per_head):
    g = torch.Generator().manual_seed(5)
    b, h, n = 3, 2, 40
    pads = [0, 12, 35]                              # row 2: 5 real tokens, fewer than the budget
    key_mask = left_padding_mask(b, n, pads)
    padding = ~key_mask[:, None, :].expand(b, h, n)
    scores = torch.rand(b, h, n, generator=g)
    scores[padding] = 1e6                           # adversarial: padding looks heaviest
    context = random_context(policy, scores, generator=g)
    for name, t in context.items():
        if t.dtype != torch.bool:
            t[padding] = 1e6 if name != "curvature" else -1e6
    kept = select_kept(scores, EvictionConfig(policy=policy, per_head=per_head, budget=10), key_mask=key_mask,
                       **context)
    k = n if isinstance(policy, R.Dense) else 10
    check_selection(kept, n, k)
    for row, pad in enumerate(pads):
        real = n - pad
        for head in range(h):
            chosen = set(kept[row, head].tolist())
            if real >= k:
                assert all(i >= pad for i in chosen), f"row {row} head {head}: padding kept {sorted(chosen)}"
            else:
                assert set(range(pad, n)) <= chosen, f"row {row}: real tokens evicted while padding kept"
        if isinstance(policy, (R.StreamingLLM, *SINKS_THEN_RECENT)) and real >= k:   # sinks: the first *real* tokens
            assert {pad, pad + 1} <= set(kept[row, 0].tolist())


@PER_HEAD
def test_dynamic_local_splits_per_batch_row(per_head):
    """One batch row with the question at the end keeps qa_recent_ratio of K as local tokens, the other
    CAB's recent_ratio; each row's choice is what that row alone would get."""
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(2, 2, 100, generator=g)
    policy = R.DynamicLocal(qa_recent_ratio=0.9, qa_tail=8)
    config = EvictionConfig(policy=policy, budget=20, per_head=per_head)
    qm = torch.cat([question_mask(1, 100, at_end=True), question_mask(1, 100, at_end=False)])
    both = select_parts(scores, config, question_mask=qm)
    local = both.names.index("local")
    assert set(range(82, 100)) <= set(both.kept[0, 0].tolist())          # int(20 * 0.9) = 18 recent
    assert int((both.part[0, 0] == local).sum()) == 18
    assert int((both.part[1, 0] == local).sum()) == int(20 * policy.recent_ratio)
    for row in range(2):
        alone = select_parts(scores[row:row + 1], config, question_mask=qm[row:row + 1])
        for field in ("kept", "part", "order"):
            assert torch.equal(getattr(both, field)[row], getattr(alone, field)[0]), f"row {row}: {field}"
    without = select_parts(scores, config)                              # no question: plain CAB
    assert torch.equal(without.kept, select_kept(scores, EvictionConfig(policy=R.CAB(), budget=20,
                                                                        per_head=per_head)))


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("policy", [R.CAB(), R.CAB(recent_ratio=0.0, bridge_ratio=1.0), R.DynamicLocal()],
                         ids=["cab", "cab-all-bridge", "dynamic_local"])
def test_cab_keeps_the_newest_token_at_tiny_budgets(policy, k):
    """CAB's local share is at least one token, as H2O's recent share: int(K * 0.3) is 0 for K <= 3, and the
    newest token (here the lowest score, the farthest from the median) must not be the one evicted."""
    scores = torch.arange(10, 0, -1, dtype=torch.float32).expand(1, 2, 10)    # the newest token scores least
    kept = select_kept(scores, EvictionConfig(policy=policy, budget=k), question_mask=question_mask(1, 10))
    assert all(9 in row for row in kept[0].tolist()), kept.tolist()


def test_match_span_without_a_question_is_h2o_with_sinks():
    scores = torch.rand(1, 1, 50, generator=torch.Generator().manual_seed(1))
    selection = select_parts(scores, EvictionConfig(policy=R.MatchSpan(sinks=2, recent_ratio=0.2), budget=10))
    assert selection.names == ["sink", "recent", "heavy"]
    heavy = sorted((scores[0, 0, 2:48].topk(6).indices + 2).tolist())  # 10 - 2 sinks - 2 recent
    assert selection.kept[0, 0].tolist() == [0, 1] + heavy + [48, 49]


def test_policies_run_from_real_prompt_evidence():
    """prompt_evidence (each policy's evidence()) + select_kept on real q, k, v, for every policy."""
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, torch.float32, seed=9)
    qm = R.question_mask_from_spans((18, 22), 1, 24)
    _, scores = attention(q, k, v)
    for param in policy_cases(snapkv={"window": 4}):
        config = EvictionConfig(policy=param.values[0], budget=8)
        context = R.prompt_evidence(q, k, v, config, question_mask=qm)
        kept = select_kept(scores, config, question_mask=qm, **context)
        check_selection(kept, 24, 24 if isinstance(config.policy, R.Dense) else 8)


@pytest.mark.parametrize("name", [n for n, cls in R.POLICY_TYPES.items() if cls.needs_question])
def test_question_policies_need_the_question(name):
    q, k, v = make_qkv(1, 2, 1, 8, 8, 8, seed=0)
    config = EvictionConfig(policy=name, budget=4)
    with pytest.raises(ValueError, match="question_span"):
        R.prompt_evidence(q, k, v, config)
    with pytest.raises(ValueError, match="question_similarity"):      # evidence missing at selection
        select_kept(torch.rand(1, 1, 8), config)


# ----------------------------------------------------------------------------------------------------
# 5. The eviction loop as plain state, and the transformers adapter as that loop

class RecordingCache(CabCache):
    """A CabCache that records the new keys and values of every update (layer, k, v)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.updates.append((layer_idx, key_states.clone(), value_states.clone()))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


LOOP_CASES = [
    pytest.param(EvictionConfig(policy="h2o", budget=10), {}, id="h2o"),
    pytest.param(EvictionConfig(policy=R.SnapKV(window=4), sparsity=0.6), {"evict_every": 3}, id="snapkv-every3"),
    pytest.param(EvictionConfig(policy=R.CAB(bridge="curvature"), budget=12, per_head=False), {},
                 id="cab-curvature-layer"),
    pytest.param(EvictionConfig(policy="delayed", budget=10), {}, id="delayed"),
    pytest.param(EvictionConfig(policy=R.MatchSpan(layers=2, radius=2, window=3), budget=10),
                 {"question_span": (14, 18)}, id="match_span-2layers"),
    pytest.param(EvictionConfig(), {}, id="default-without-question"),
]


@pytest.mark.parametrize("config,cache_kwargs", LOOP_CASES)
def test_forward_layer_is_what_cabcache_does_in_a_model(config, cache_kwargs):
    """generate() through CabCache on a left-padded batch, then the same q, k, v replayed through
    EvictionLoop.forward_layer with no transformers in between: identical outputs every call and
    identical state (keys, values, scores, positions, validity, evidence) in every layer at the end."""
    model, spy = tiny_model("llama"), Spy()
    ids, mask = prompts(2, n=20)
    cache = RecordingCache(config, **cache_kwargs)
    generate(model, spy.name, ids, mask, cache, steps=6)
    assert len(cache.updates) == len(spy.calls) == 2 * 6
    loop = EvictionLoop(config, **cache_kwargs)
    for (layer, k, v), call in zip(cache.updates, spy.calls):
        assert call["layer"] == layer
        valid = mask.bool() if k.shape[2] > 1 else None             # the prompt's padding, then real tokens
        out = loop.forward_layer(layer, call["query"], k, v, scale=call["scaling"], valid=valid)
        assert torch.equal(out.transpose(1, 2), call["out"]), f"layer {layer}: outputs differ"
    for mine, theirs in zip(loop.layers, cache.layers, strict=True):
        for name in ("keys", "values", "scores", "positions", "valid"):
            assert torch.equal(getattr(mine, name), getattr(theirs, name)), name
        assert mine.seen == theirs.seen and mine.budget == theirs.budget
        assert mine.evidence.keys() == theirs.evidence.keys()
        assert all(torch.equal(mine.evidence[e], theirs.evidence[e]) for e in mine.evidence)


def loop_inputs(steps, *, seed=0, prompt=24, layers=2):
    """Random (q, k, v) per step and layer (b=1, Hq=4, Hkv=2, D=16): a prompt, then `steps` decode tokens."""
    g = torch.Generator().manual_seed(seed)
    return [[tuple(torch.randn(1, h, prompt if step == 0 else 1, 16, generator=g) for h in (4, 2, 2))
             for _ in range(layers)] for step in range(steps + 1)]


def feed(loop, inputs, fail_layer=None):
    """Run the steps in `inputs` through loop.forward_layer; layer `fail_layer` of the first step raises."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    for i, step in enumerate(inputs):
        for layer, (q, k, v) in enumerate(step):
            fn = broken if (i, layer) == (0, fail_layer) else attention
            loop.forward_layer(layer, q, k, v, scale=0.25, attention_fn=fn)


def state(loop):
    """Everything a forward may change, by reference (state is replaced, never written in place)."""
    return ([(layer.seen, layer.budget, layer.keys, layer.values, layer.scores, layer.positions, layer.valid,
              dict(layer.evidence)) for layer in loop.layers], dict(loop._pooled))


def assert_same_state(a, b):
    (layers_a, pooled_a), (layers_b, pooled_b) = a, b
    assert len(layers_a) == len(layers_b) and pooled_a.keys() == pooled_b.keys()
    for la, lb in zip(layers_a, layers_b):
        assert la[:2] == lb[:2]
        assert all(torch.equal(ta, tb) for ta, tb in zip(la[2:7], lb[2:7]))
        assert la[7].keys() == lb[7].keys() and all(torch.equal(la[7][e], lb[7][e]) for e in la[7])
    for name in pooled_a:
        assert pooled_a[name][1] == pooled_b[name][1] and torch.equal(pooled_a[name][0], pooled_b[name][0])


@pytest.mark.parametrize("step,layer", [(0, 1), (3, 0), (3, 1)],
                         ids=["prompt-layer1", "decode-layer0", "decode-layer1"])
@pytest.mark.parametrize("config", [EvictionConfig(policy="h2o", budget=10),
                                    EvictionConfig(policy=R.MatchSpan(layers=2), budget=10),
                                    EvictionConfig(policy="delayed", budget=10)], ids=["h2o", "match_span", "delayed"])
def test_a_failing_forward_rolls_back_every_layer(config, step, layer):
    """A forward that raises in any layer leaves the loop (every layer, and the evidence pooled across
    layers) as before that forward; retrying it and going on gives what an uninterrupted run gives."""
    inputs = loop_inputs(6)
    clean, broken = EvictionLoop(config, question_span=(18, 22)), EvictionLoop(config, question_span=(18, 22))
    feed(clean, inputs)
    feed(broken, inputs[:step])
    before = state(broken)
    with pytest.raises(RuntimeError, match="injected"):
        feed(broken, inputs[step:step + 1], fail_layer=layer)
    assert_same_state(state(broken), before)
    feed(broken, inputs[step:])
    assert_same_state(state(broken), state(clean))


@pytest.mark.parametrize("policy", [R.SnapKV(window=4, pool=1), R.SnapKV(window=4), R.Bidirectional()],
                         ids=["snapkv-unpooled", "snapkv", "bidirectional"])
def test_decode_evictions_rank_by_the_prompts_evidence(policy):
    """After the prompt, SnapKV and Bidirectional keep ranking by the prompt's evidence (the window's or the
    non-causal pass's), not by the scores accumulated since: decode queries that all look for the first
    generated token (a heavy hitter for H2O) leave the same tokens as random ones, and a generated token
    (evidence 0) stays only while recent (SnapKV's pooling may lend it a kept neighbour's evidence, so
    that part is checked without pooling)."""
    budget, prompt, steps = 12, 24, 16
    inputs = loop_inputs(steps, prompt=prompt, layers=1)
    first = inputs[1][0][1].repeat_interleave(2, dim=1) * 30                  # (1, Hq, 1, D): finds token 24
    kept = []
    for focused in (False, True):
        loop = EvictionLoop(EvictionConfig(policy=policy, budget=budget))
        for step, ((q, k, v),) in enumerate(inputs):
            loop.forward_layer(0, first if focused and step > 1 else q, k, v, scale=0.25)
        kept.append(loop.kept_positions()[0])
    assert torch.equal(kept[0], kept[1])
    if getattr(policy, "pool", 1) == 1:
        recent = protected(policy, budget)[1]
        for row in kept[0].reshape(-1, budget).tolist():
            assert all(p < prompt or p >= prompt + steps - recent for p in row), row


def test_dynamic_local_decides_at_the_prompt_and_keeps_the_decision():
    """DynamicLocal reads where the question stands once, in the prompt: a row whose question ends the
    prompt keeps qa_recent_ratio of K as recent tokens through every later step (many more than qa_tail),
    a row whose question is early keeps CAB's share throughout."""
    policy, budget, prompt, steps = R.DynamicLocal(qa_tail=4), 20, 24, 12
    loop = EvictionLoop(EvictionConfig(policy=policy, budget=budget), question_span=[(19, 23), (2, 6)])
    g = torch.Generator().manual_seed(3)
    for step in range(steps + 1):
        n = prompt if step == 0 else 1
        loop.forward_layer(0, *(torch.randn(2, h, n, 16, generator=g) for h in (4, 2, 2)), scale=0.25)
        seen = prompt + step
        layer = loop.layers[0]
        for row, question_at_end in enumerate((True, False)):
            recent = protected(policy, budget, question_at_end=question_at_end)[1]
            for head in layer.positions[row].tolist():
                assert set(range(seen - recent, seen)) <= set(head), f"step {step}, row {row}: {head}"
            local = R.choose(layer.scores[row:row + 1], budget - 1, policy, True,
                             {name: t[row:row + 1] for name, t in layer.context().items()})
            assert int((local.part == local.names.index("local")).sum(-1).max()) == \
                protected(policy, budget - 1, question_at_end=question_at_end)[1], f"step {step}, row {row}"


@pytest.mark.parametrize("every", [1, 4])
def test_evict_every_lets_the_cache_overshoot_then_cuts_back(every):
    """evict_every=E: after the prompt cut the cache grows to budget + E - 1, then one cut brings it back
    to the budget; the kept positions stay true (strictly increasing, the newest token last). Through a
    model, with CabCache's argument."""
    model = tiny_model("llama")
    model.set_attn_implementation("cab_reference")
    ids, mask = prompts(1, n=40)
    cache = CabCache(EvictionConfig(policy="h2o", sparsity=0.75), evict_every=every)
    lengths = []
    tok = forward(model, ids, cache, attention_mask=mask)[:, -1:].argmax(-1)
    lengths.append(cache.layers[0].keys.shape[-2])
    for _ in range(9):
        tok = forward(model, tok, cache)[:, -1:].argmax(-1)
        lengths.append(cache.layers[0].keys.shape[-2])
    assert lengths == ([10] * 10 if every == 1 else [10, 11, 12, 13, 10, 11, 12, 13, 10, 11])
    positions = cache.kept_positions()[0]
    assert bool((positions.diff(dim=-1) > 0).all()) and int(positions[..., -1].max()) == 40 + 9 - 1


@pytest.mark.parametrize("every", [0, -1, True, 1.5, None])
def test_evict_every_must_be_a_positive_integer(every):
    for make in (CabCache, EvictionLoop):
        with pytest.raises(ValueError, match="evict_every"):
            make(EvictionConfig(policy="h2o"), evict_every=every)


# ----------------------------------------------------------------------------------------------------
# 6. Generation through tiny random Llama / Qwen2: dense equivalence, true positions, budgets

@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_dense_equivalent_to_sdpa(family, batch):
    model = tiny_model(family)
    ids, mask = prompts(batch)
    dense, dense_logits = generate(model, "sdpa", ids, mask)
    for config in (EvictionConfig(policy="none"), EvictionConfig(policy="h2o", budget=ids.shape[1] + 12),
                   EvictionConfig(policy="cab", budget=10_000)):
        tokens, logits = generate(model, "cab_reference", ids, mask, CabCache(config))
        assert tokens.tolist() == dense.tolist(), f"{config.policy}: tokens differ from sdpa"
        torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


def full_sequence_layer0(model, spy, ids, mask=None, position_ids=None):
    """Layer 0's query and keys for every position of ids in one uncached forward (no eviction)."""
    spy.calls.clear()
    model.set_attn_implementation(spy.name)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    call = spy.layer_calls(0)[0]
    return call["query"], call["key"]                      # (B, Hq, N, D), (B, Hkv, N, D)


@pytest.mark.parametrize("policy", ["streaming", "h2o", "cab"])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_true_positions_after_eviction_manual_decode(family, policy):
    """A plain forward loop (no generate, no position_ids): RoPE positions come from get_seq_length,
    which must count every token seen. Layer 0's keys depend only on token and position, so the cached
    keys after eviction must equal an uncached run's keys at the recorded original positions, and each
    decode query must equal the uncached run's query at its absolute position."""
    model, spy = tiny_model(family), Spy()
    n_prompt, steps, budget = 24, 10, 8
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(3, 96, (1, n_prompt + steps), generator=g)
    full_q, full_k = full_sequence_layer0(model, spy, seq)
    knobs = {"sinks": 2} if policy == "streaming" else {}
    cache = CabCache(EvictionConfig(policy=R.make_policy(policy, **knobs), budget=budget))
    spy.calls.clear()
    forward(model, seq[:, :n_prompt], cache)
    for t in range(n_prompt, n_prompt + steps):
        forward(model, seq[:, t:t + 1], cache)
        assert cache.get_seq_length() == t + 1
        assert all(layer.keys.shape[-2] == budget for layer in cache.layers), "cache must stay at the budget"
        pos = cache.kept_positions()[0]                                    # (1, Hkv, budget)
        assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos[..., -1].min()) == t
        stored = cache.layers[0].keys
        expected = full_k.gather(2, pos[..., None].expand(-1, -1, -1, stored.shape[-1]))
        torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(spy.layer_calls(0)[-1]["query"], full_q[:, :, t:t + 1], rtol=1e-5, atol=1e-5)
    if policy == "streaming":                        # sinks + the most recent tokens, exactly
        assert cache.kept_positions()[0][0, 0].tolist() == [0, 1] + list(range(n_prompt + steps - 6,
                                                                              n_prompt + steps))


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_true_positions_after_eviction_generate_left_padded(family):
    """generate() with a left-padded batch of 2 and h2o eviction: the position_ids the attention sees
    during decode are the absolute, padding-aware ones, and the kept layer-0 keys match an uncached run."""
    model, spy = tiny_model(family), Spy()
    ids, mask = prompts(2, n=24)
    steps, budget = 8, 10
    cache = CabCache(EvictionConfig(policy="h2o", budget=budget))
    spy.calls.clear()
    seq, _ = generate(model, spy.name, ids, mask, cache, steps=steps)
    decode_calls = spy.layer_calls(0)[1:]
    assert len(decode_calls) == steps - 1
    pads = (mask == 0).sum(-1)
    for i, call in enumerate(decode_calls):
        assert call["position_ids"][:, 0].tolist() == (24 + i - pads).tolist()     # absolute, per row
    full_mask = torch.cat([mask, torch.ones(2, steps, dtype=mask.dtype)], dim=1)
    position_ids = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    _, full_k = full_sequence_layer0(model, spy, seq, full_mask, position_ids)
    layer = cache.layers[0]
    pos = layer.positions                                                          # (B, Hkv, budget)
    assert layer.keys.shape[-2] == budget and cache.get_seq_length() == 24 + steps - 1
    assert bool(layer.valid.all()), "padding kept while real tokens were evicted"
    expected = full_k.gather(2, pos[..., None].expand(-1, -1, -1, layer.keys.shape[-1]))
    torch.testing.assert_close(layer.keys, expected, rtol=1e-5, atol=1e-5)


def test_budget_larger_than_prompt_lets_the_cache_grow_to_the_budget():
    """Regression: the layer budget used to be min(budget, prompt length), so a 20-token prompt with
    budget 26 was cut to 20 at the first decode step. The cache must grow to 26 first, and match sdpa
    exactly while nothing has been evicted."""
    model = tiny_model("llama")
    ids, mask = prompts(1)
    dense, dense_logits = generate(model, "sdpa", ids, mask, steps=12)
    cache = CabCache(EvictionConfig(policy="h2o", budget=26))
    tokens, logits = generate(model, "cab_reference", ids, mask, cache, steps=12)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [26, 26]
    assert cache.get_seq_length() == 20 + 11
    # the first 26 - 20 + 1 = 7 generated tokens were produced with nothing evicted
    assert tokens[:, :27].tolist() == dense[:, :27].tolist()
    torch.testing.assert_close(logits[:, :7], dense_logits[:, :7], rtol=1e-4, atol=1e-4)


def test_record_keeps_each_layers_prompt_selection():
    model = tiny_model("llama")
    ids, mask = prompts(1, n=30)
    cache = CabCache(EvictionConfig(policy="h2o", budget=10), record=True)
    generate(model, "cab_reference", ids, mask, cache, steps=3)
    for layer in cache.layers:
        record = layer.prompt_record
        assert record["selection"].kept.shape == (1, 2, 10) and record["positions"].shape == (1, 2, 30)
        assert torch.equal(record["selection"].kept, select_kept(record["scores"], EvictionConfig(policy="h2o",
                                                                                              budget=10)))
    assert all(layer.prompt_record is None for layer in CabCache(EvictionConfig()).layers)


@pytest.mark.parametrize("policy", ["none", "h2o"])
def test_beam_search_reorders_the_cache(policy):
    """num_beams=3 repeats the rows, then reorders them every step (batch_repeat_interleave, reorder_cache):
    with policy none the beams are sdpa's; with h2o every beam row stays at the budget."""
    model = tiny_model("llama")
    ids, mask = prompts(2, n=20)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        dense = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False)
    model.set_attn_implementation("cab_reference")
    cache = CabCache(EvictionConfig(policy=policy, budget=10))
    with torch.no_grad():
        beams = model.generate(ids, attention_mask=mask, max_new_tokens=5, num_beams=3, do_sample=False,
                               **{CACHE_KWARG: cache})
    assert [tuple(layer.keys.shape[:3]) for layer in cache.layers] == [(6, 2, 24 if policy == "none" else 10)] * 2
    if policy == "none":
        assert torch.equal(beams, dense)


# ----------------------------------------------------------------------------------------------------
# 7. Question spans from text

def test_token_span_from_offsets():
    offsets = [(0, 0), (0, 3), (3, 4), (5, 9), (9, 9), (10, 14)]       # special (0, 0); empty (9, 9)
    assert R.token_span(offsets, 0, 3) == (1, 2)
    assert R.token_span(offsets, 2, 6) == (1, 4)             # partial overlaps count
    assert R.token_span(offsets, 5, 14) == (3, 6)
    with pytest.raises(ValueError, match="no token"):
        R.token_span(offsets, 4, 5)                          # the space between tokens


def test_find_question_span_is_the_last_occurrence():
    question = "Where is the red vault ?"
    prompt = f"Q: {question} The red vault is in Oslo . The blue one is in Rome . Q: {question} A:"
    tokenizer = word_tokenizer([prompt])
    start, end = R.find_question_span(tokenizer, prompt, question)
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert " ".join(tokens[start:end]) == question and tokens[end:] == ["A", ":"]
    for absent in ("Where is Paris ?", ""):
        with pytest.raises(ValueError, match="question"):
            R.find_question_span(tokenizer, prompt, absent)


def test_find_question_span_drives_a_question_policy_in_a_model():
    question = "which vault ?"
    prompt = "the red vault holds gold and the blue vault holds silver , " * 3 + question
    tokenizer = word_tokenizer([prompt])
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"] % 93 + 3
    span = R.find_question_span(tokenizer, prompt, question)
    assert span == (ids.shape[1] - 3, ids.shape[1])
    model = tiny_model("llama")
    cache = CabCache(EvictionConfig(policy=R.DynamicLocal(qa_recent_ratio=0.9), budget=10), question_span=span)
    generate(model, "cab_reference", ids, torch.ones_like(ids), cache, steps=1)
    kept = cache.kept_positions()[0]
    assert set(range(span[0], span[1])) <= set(kept[0, 0].tolist())     # the question is in the local window


def test_question_span_counts_the_left_padding():
    """question_span holds positions in the padded input: a span found in a row's own text (find_question_span)
    moves right by that row's padding; unshifted, it marks other tokens."""
    question = "which vault ?"
    texts = ["the red vault holds gold . " + question, "the red vault holds gold and the blue vault holds silver . "
             + question]
    tokenizer = word_tokenizer(texts)
    tokenizer.pad_token, tokenizer.padding_side = "[UNK]", "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids, mask = batch["input_ids"] % 93 + 3, batch["attention_mask"]
    pads = (mask == 0).sum(-1).tolist()
    spans = [R.find_question_span(tokenizer, text, question) for text in texts]
    shifted = [(start + pad, end + pad) for (start, end), pad in zip(spans, pads)]
    cache = CabCache(EvictionConfig(policy="hybrid_semantic", budget=100), question_span=shifted)
    generate(tiny_model("llama"), "cab_reference", ids, mask, cache, steps=1)
    asked = tokenizer(question, add_special_tokens=False)["input_ids"]
    marked = cache.layers[0].evidence["question_mask"][:, 0, :ids.shape[1]]
    for row in range(2):
        assert batch["input_ids"][row][marked[row]].tolist() == asked
        unshifted = R.question_mask_from_spans(spans, 2, ids.shape[1])[row]
        assert (batch["input_ids"][row][unshifted].tolist() == asked) == (pads[row] == 0)


# ----------------------------------------------------------------------------------------------------
# 8. Clear errors for bad selection and cache inputs (bad attention inputs: test_robustness.py)

def test_selection_bad_inputs():
    config = EvictionConfig(policy="h2o", budget=2)
    with pytest.raises(ValueError, match="scores"):
        select_kept(torch.rand(4, 5), config)
    with pytest.raises(TypeError, match="scores"):
        select_kept(torch.ones(1, 1, 5, dtype=torch.long), config)
    with pytest.raises(ValueError, match="scores"):
        select_kept(torch.full((1, 1, 5), math.nan), config)
    with pytest.raises(ValueError, match="scores"):
        select_kept(torch.rand(1, 1, 0), config)
    with pytest.raises(ValueError, match="key_mask"):
        select_kept(torch.rand(1, 1, 5), config, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="question_mask"):
        select_kept(torch.rand(1, 1, 5), config, question_mask=torch.ones(1, 5))
    with pytest.raises(TypeError, match="bogus"):
        select_kept(torch.rand(1, 1, 5), config, bogus=[1, 2])
    with pytest.raises(ValueError, match="window_scores"):
        select_kept(torch.rand(1, 1, 5), config, window_scores=torch.rand(1, 2, 5))


@pytest.mark.parametrize("span,batch", [((-1, 3), 2), ((5, 21), 2), ((7, 7), 2), ((9, 4), 2), ([(0, 2)] * 3, 2)])
def test_question_span_outside_the_prompt(span, batch):
    with pytest.raises(ValueError, match="question_span"):
        R.question_mask_from_spans(span, batch, 20)


def test_cache_bad_inputs():
    with pytest.raises(TypeError, match="config"):
        CabCache({"policy": "h2o"})
    model = tiny_model("llama")
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match="question_span"):       # outside the 20-token prompt
        generate(model, "cab_reference", ids, mask,
                 CabCache(EvictionConfig(policy="question_aware", budget=8), question_span=(15, 40)), steps=2)
    with pytest.raises(ValueError, match="question_span"):       # needed and not given
        generate(model, "cab_reference", ids, mask, CabCache(EvictionConfig(policy="hybrid_semantic", budget=8)),
                 steps=2)


class FakeModule:
    layer_idx, training = 0, False


def test_attention_interface_refuses_what_it_cannot_honour():
    """A mask other than causal + padding (a sliding window) and dropout in training are errors, not
    silently different attention; an evicting cache cannot be cropped back."""
    interface = R.make_attention_interface(attention)
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8)
    window = torch.ones(6, 6, dtype=torch.bool).tril() & torch.ones(6, 6, dtype=torch.bool).triu(-2)
    out, _ = interface(FakeModule(), q, k, v, torch.ones(6, 6, dtype=torch.bool).tril()[None, None])
    torch.testing.assert_close(out, attention(q, k, v)[0].transpose(1, 2))       # causal: accepted
    with pytest.raises(ValueError, match="attention_mask"):
        interface(FakeModule(), q, k, v, window[None, None])
    training = FakeModule()
    training.training = True
    with pytest.raises(ValueError, match="dropout"):
        interface(training, q, k, v, None, dropout=0.1)
    layer = CabCache(EvictionConfig(policy="h2o")).layer(0)
    assert layer.is_croppable is False
    with pytest.raises(NotImplementedError, match="crop"):
        layer.crop(1)


def test_keys_changed_between_update_and_attention_is_an_error():
    """A model that changes the keys between cache.update() and the attention call (a copy, a cast, a
    repeat) would attend with no eviction and no scores: the attention call raises instead, naming the
    layer, and leaves the cache as before the forward; plain calls with no cache still work after it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    inner = R.make_attention_interface(attention)

    def copying(module, query, key, value, attention_mask, **kwargs):
        return inner(module, query, key.clone(), value, attention_mask, **kwargs)

    AttentionInterface.register("tst_copying_keys", copying)
    AttentionMaskInterface.register("tst_copying_keys", sdpa_mask)
    model = tiny_model("llama")
    ids, mask = prompts(1)
    cache = CabCache(EvictionConfig(policy="h2o", budget=8))
    with pytest.raises(RuntimeError, match="layer 0.*update.*other keys"):
        generate(model, "tst_copying_keys", ids, mask, cache, steps=2)
    assert cache.get_seq_length() == 0
    q, k, v = make_qkv(1, 4, 2, 6, 6, 8)
    out, _ = inner(FakeModule(), q, k, v, None)                               # no cache: no pairing
    torch.testing.assert_close(out, attention(q, k, v)[0].transpose(1, 2))
    dense, _ = generate(model, "sdpa", ids, mask, steps=2)
    tokens, _ = generate(model, "cab_reference", ids, mask, CabCache(EvictionConfig(policy="none")), steps=2)
    assert tokens.tolist() == dense.tolist()


def test_fill_parts_refuses_parts_larger_than_the_tokens():
    parts = [R.Part("a", 3, torch.rand(1, 1, 4)), R.Part("b", 2, torch.rand(1, 1, 4))]
    with pytest.raises(RuntimeError, match="5 tokens out of 4"):
        R.fill_parts(parts, torch.ones(1, 1, 4, dtype=torch.bool))
