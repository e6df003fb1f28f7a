"""Tests of cab_reference.py (issue 3): attention against an independent float64 oracle, every eviction
policy's promises, dense equivalence of generation, true positions after eviction, clear errors.

The oracle below is written from the definitions (softmax per query head, a loop over heads, h // G picks
the KV head), not from the reference's helpers. Tolerances (NOTES_tests.md derives them):
  out    |ref - oracle| <= eps(dtype) * |oracle| + 1e-5    (rounding to the output dtype is <= eps/2
         relative; the float32 computation adds < 1e-5 absolute at these sizes, measured <= 2e-6)
  scores |ref - oracle| <= 1e-5 + 1e-5 * |oracle|          (float32 whatever the input dtype: the inputs
         are converted exactly; each probability carries a few float32 ulps, summed over Nq * G terms)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import cab_reference as R
from cab_reference import BRIDGE_MODES, POLICIES, CabCache, EvictionConfig, attention, select_kept, select_parts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------
# The float64 oracle

def oracle_attention(q, k, v, scale=None, causal=True, key_mask=None):
    """softmax(q k^T * scale) v and per-key column sums, in float64, one query head at a time."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64 = q.double(), k.double(), v.double()
    allowed = torch.ones(b, nq, nk, dtype=torch.bool)
    if causal:
        for i in range(nq):                                  # query i is token i + nk - nq of the sequence
            allowed[:, i, i + nk - nq + 1:] = False
    if key_mask is not None:
        allowed &= key_mask.cpu()[:, None, :]
    out = torch.zeros(b, hq, nq, d, dtype=torch.float64)
    scores = torch.zeros(b, hkv, nk, dtype=torch.float64)
    for h in range(hq):
        kv = h // group
        logits = (q64[:, h] @ k64[:, kv].transpose(-1, -2)) * scale          # (B, Nq, Nk)
        logits = logits.masked_fill(~allowed, -math.inf)
        row_max = logits.max(dim=-1, keepdim=True).values
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        e = torch.exp(logits - row_max) * allowed
        total = e.sum(dim=-1, keepdim=True)
        p = e / torch.where(total > 0, total, torch.ones_like(total))
        out[:, h] = p @ v64[:, kv]
        scores[:, kv] += p.sum(dim=1)
    return out, scores


def left_padding_mask(b, nk, pads):
    mask = torch.ones(b, nk, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask


def make_qkv(b, hq, hkv, nq, nk, d, dtype, seed, magnitude=1.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, nq, d, generator=g) * magnitude).to(dtype)
    k = (torch.randn(b, hkv, nk, d, generator=g) * magnitude).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q, k, v


def check_against_oracle(q, k, v, *, causal, key_mask=None, scale=None):
    out, scores = attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)
    ref_out, ref_scores = oracle_attention(q, k, v, scale=scale, causal=causal, key_mask=key_mask)
    assert out.dtype == q.dtype and tuple(out.shape) == tuple(q.shape)
    assert scores.dtype == torch.float32 and tuple(scores.shape) == (k.shape[0], k.shape[1], k.shape[2])
    eps = torch.finfo(q.dtype).eps
    err_out = (out.double() - ref_out).abs()
    err_scores = (scores.double() - ref_scores).abs()
    print(f"out err max {err_out.max():.3g} mean {err_out.mean():.3g}; "
          f"scores err max {err_scores.max():.3g} mean {err_scores.mean():.3g}")
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
# 2. Every policy: budget, protected tokens, sorted unique indices, determinism, ties, padding

def policy_configs():
    configs = []
    for policy in POLICIES:
        for bridge in (BRIDGE_MODES if policy in ("cab", "dynamic_local") else ("median",)):
            for per_head in (True, False):
                configs.append(pytest.param(policy, bridge, per_head,
                                            id=f"{policy}-{bridge}-{'head' if per_head else 'layer'}"))
    return configs


def make_context(policy, bridge, scores, *, question_at_end=True, fill=None, generator=None):
    """The evidence each policy ranks by: random (or the constant `fill`), shaped like scores."""
    b, h, n = scores.shape

    def evidence(low=0.0, high=1.0):
        if fill is not None:
            return torch.full((b, h, n), float(fill))
        return low + (high - low) * torch.rand(b, h, n, generator=generator)

    context = {}
    if policy == "snapkv":
        context["window_scores"] = evidence(0, 16)
    if policy == "bidirectional":
        context["bidirectional_scores"] = evidence(0, n)
    if policy in ("question_aware", "hybrid_semantic"):
        context["question_similarity"] = evidence(-1, 1)
    if policy == "delayed":
        context["decode_scores"] = evidence(0, 4)
    if policy == "match_span":
        context["question_match"] = evidence(0, 1)
    if policy in ("cab", "dynamic_local") and bridge == "connectivity":
        context["connectivity"] = evidence(0, n).floor() if fill is None else evidence()
    if policy in ("cab", "dynamic_local") and bridge == "curvature":
        context["curvature"] = evidence(-20, 4)
    if policy == "dynamic_local":
        qm = torch.zeros(b, n, dtype=torch.bool)
        if question_at_end:
            qm[:, n - 5:n - 1] = True
        else:
            qm[:, 2:6] = True
        context["question_mask"] = qm
    return context


def protected(policy, config, k, question_at_end=True):
    """(sinks, recent): how many of the first / last tokens the policy promises to keep at budget k."""
    if policy == "none":
        return 0, k
    if policy == "streaming":
        sinks = min(config.sink, k)
        return sinks, k - sinks
    if policy == "match_span":
        sinks = min(config.span_sinks, k)          # match_span has its own sink count (default 1)
        return sinks, min(k - sinks, max(1, int(k * config.recent_ratio)))
    if policy == "cab":
        return 0, int(k * config.local_ratio)
    if policy == "dynamic_local":
        return 0, int(k * (config.qa_local_ratio if question_at_end else config.local_ratio))
    if policy == "snapkv":
        return 0, min(config.window, k // 2)
    return 0, min(k, max(1, int(k * config.recent_ratio)))          # h2o and the heavy-hitter variants


def check_selection(kept, n, k):
    assert kept.dtype == torch.int64 and kept.shape[-1] == k
    assert bool((kept >= 0).all() and (kept < n).all())
    if k > 1:
        assert bool((kept[..., 1:] > kept[..., :-1]).all()), "indices must be sorted ascending and unique"


@pytest.mark.parametrize("policy,bridge,per_head", policy_configs())
def test_policy_promises(policy, bridge, per_head):
    g = torch.Generator().manual_seed(11)
    b, h, n = 2, 3, 60
    scores = torch.rand(b, h, n, generator=g) * 10
    for budget, sparsity in [(20, 0.9), (1, 0.9), (3, 0.9), (59, 0.9), (60, 0.9), (500, 0.9), (None, 0.75)]:
        config = EvictionConfig(policy=policy, bridge=bridge, per_head=per_head, budget=budget,
                                sparsity=sparsity, window=8, sink=4)
        context = make_context(policy, bridge, scores, generator=g)
        kept = select_kept(scores, config, **context)
        # budget honoured: K = budget, floor((1 - s) N) without one, everything when it fits or policy none
        k = n if policy == "none" else min(n, budget if budget is not None else max(1, math.floor(0.25 * n)))
        check_selection(kept, n, k)
        assert tuple(kept.shape) == (b, h, k)
        # the protected tokens are there
        sinks, recent = protected(policy, config, k)
        kept_sets = [set(row.tolist()) for row in kept.reshape(-1, k)]
        for s in kept_sets:
            assert set(range(sinks)) <= s, f"sinks {list(range(sinks))} not all kept: {sorted(s)}"
            assert set(range(n - recent, n)) <= s, f"recent {recent} tokens not all kept: {sorted(s)}"
        # deterministic, and select_parts agrees with select_kept
        again = select_parts(scores.clone(), config, **{name: t.clone() for name, t in context.items()})
        assert torch.equal(again.kept, kept)
        assert again.order.shape == (b, h, n) and torch.equal(again.order.sort(-1).values,
                                                              torch.arange(n).expand(b, h, n))
        if not per_head:
            assert torch.equal(kept, kept[:, :1].expand_as(kept)), "per_head=False: one choice per layer"


@pytest.mark.parametrize("policy,bridge,per_head", policy_configs())
def test_policy_ties_break_toward_recent(policy, bridge, per_head):
    b, h, n, budget = 1, 2, 30, 10
    scores = torch.full((b, h, n), 2.0)
    config = EvictionConfig(policy=policy, bridge=bridge, per_head=per_head, budget=budget, sink=3, window=4,
                            span_sinks=3)
    kept = select_kept(scores, config, **make_context(policy, bridge, scores, fill=0.5))
    if policy == "none":
        expected = list(range(n))
    elif policy in ("streaming", "match_span"):      # sinks first, then every tie goes to recent
        expected = [0, 1, 2] + list(range(n - 7, n))
    else:                  # every score and every evidence equal: the most recent tokens win every tie
        expected = list(range(n - budget, n))
    assert kept[0, 0].tolist() == expected and kept[0, 1].tolist() == expected


def test_h2o_tie_for_the_last_slot_goes_to_the_later_token():
    scores = torch.zeros(1, 1, 12)
    scores[0, 0, [2, 5, 8]] = 3.0          # three equal heavy hitters for two heavy slots
    config = EvictionConfig(policy="h2o", budget=3, recent_ratio=0.2)   # 1 recent + 2 heavy
    assert select_kept(scores, config).tolist() == [[[5, 8, 11]]]


@pytest.mark.parametrize("policy,bridge,per_head", policy_configs())
def test_policy_never_keeps_padding_while_evicting_real_tokens(policy, bridge, per_head):
    g = torch.Generator().manual_seed(5)
    b, h, n = 3, 2, 40
    pads = [0, 12, 35]                              # row 2: 5 real tokens, fewer than the budget
    key_mask = left_padding_mask(b, n, pads)
    scores = torch.rand(b, h, n, generator=g)
    scores[~key_mask[:, None, :].expand(b, h, n)] = 1e6       # adversarial: padding looks heaviest
    context = make_context(policy, bridge, scores, generator=g)
    for name, t in context.items():
        if t.dtype != torch.bool:
            t[~key_mask[:, None, :].expand(b, h, n)] = 1e6 if name != "curvature" else -1e6
    config = EvictionConfig(policy=policy, bridge=bridge, per_head=per_head, budget=10, sink=2, window=4,
                            span_sinks=2)
    kept = select_kept(scores, config, key_mask=key_mask, **context)
    k = n if policy == "none" else 10
    check_selection(kept, n, k)
    for row, pad in enumerate(pads):
        real = n - pad
        for head in range(h):
            chosen = set(kept[row, head].tolist())
            if real >= k:
                assert all(i >= pad for i in chosen), f"row {row} head {head}: padding kept {sorted(chosen)}"
            else:
                assert set(range(pad, n)) <= chosen, f"row {row}: real tokens evicted while padding kept"
        if policy in ("streaming", "match_span") and real >= k:     # the sinks are the first *real* tokens
            assert {pad, pad + 1} <= set(kept[row, 0].tolist())


def test_dynamic_local_raises_local_ratio_only_for_a_question_at_the_end():
    scores = torch.rand(1, 1, 100, generator=torch.Generator().manual_seed(0))
    config = EvictionConfig(policy="dynamic_local", budget=20, qa_local_ratio=0.9)
    at_end = select_parts(scores, config, **make_context("dynamic_local", "median", scores, question_at_end=True))
    early = select_parts(scores, config, **make_context("dynamic_local", "median", scores, question_at_end=False))
    assert set(range(82, 100)) <= set(at_end.kept[0, 0].tolist())           # int(20 * 0.9) = 18 recent
    assert int((early.part == early.names.index("local")).sum()) == int(20 * config.local_ratio)


def test_policies_run_from_real_prompt_evidence():
    """prompt_evidence + select_kept on real q, k, v for every policy needing evidence."""
    q, k, v = make_qkv(1, 4, 2, 24, 24, 16, torch.float32, seed=9)
    qm = R.question_mask_from_spans((18, 22), 1, 24)
    _, scores = attention(q, k, v)
    for policy in POLICIES:
        for bridge in BRIDGE_MODES:
            config = EvictionConfig(policy=policy, bridge=bridge, budget=8, window=4)
            context = R.prompt_evidence(q, k, v, config, question_mask=qm)
            if policy == "delayed":
                context["decode_scores"] = scores
            if policy == "dynamic_local":
                context["question_mask"] = qm
            kept = select_kept(scores, config, **context)
            check_selection(kept, 24, 24 if policy == "none" else 8)


# ----------------------------------------------------------------------------------------------------
# 3. Generation: dense equivalence on tiny random Llama / Qwen2, true positions, budget during decode

def tiny_model(family, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls_config, cls_model = (LlamaConfig, LlamaForCausalLM) if family == "llama" else (Qwen2Config,
                                                                                       Qwen2ForCausalLM)
    config = cls_config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls_model(config).eval()
    with torch.no_grad():                      # sharper attention than a random init's near-uniform one
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None          # never stop early: compare every step
    return model


def prompts(batch, n=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    if batch == 2:                              # left padding: row 1 is 6 tokens shorter
        ids[1, :6] = 0
        mask[1, :6] = 0
    return ids, mask


def generate(model, impl, ids, mask, cache=None, steps=12):
    model.set_attn_implementation(impl)
    kwargs = {} if cache is None else {"past_key_values": cache}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")        # past_key_values is renamed `cache` in transformers 5.24
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generation_dense_equivalent_to_sdpa(family, batch):
    model = tiny_model(family)
    ids, mask = prompts(batch)
    dense, dense_logits = generate(model, "sdpa", ids, mask)
    for config in (EvictionConfig(policy="none"), EvictionConfig(policy="h2o", budget=ids.shape[1] + 12),
                   EvictionConfig(policy="cab", budget=10_000)):
        tokens, logits = generate(model, "cab_reference", ids, mask, CabCache(config))
        print(config.policy, "max |logit diff|", float((logits - dense_logits).abs().max()))
        assert tokens.tolist() == dense.tolist(), f"{config.policy}: tokens differ from sdpa"
        torch.testing.assert_close(logits, dense_logits, rtol=1e-4, atol=1e-4)


class Spy:
    """An attention implementation that runs cab_reference's and records what each layer-0 call saw."""

    name = "tst_spy_reference"

    def __init__(self):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        inner = R.make_attention_interface(attention)
        self.calls = []

        def spy(module, query, key, value, attention_mask, **kwargs):
            if module.layer_idx == 0:
                self.calls.append({"query": query.detach().clone(), "key": key.detach().clone(),
                                   "position_ids": kwargs.get("position_ids")})
            return inner(module, query, key, value, attention_mask, **kwargs)

        AttentionInterface.register(self.name, spy)
        AttentionMaskInterface.register(self.name, sdpa_mask)


def full_sequence_layer0(model, spy, ids, mask=None, position_ids=None):
    """Layer 0's query and keys for every position of ids in one uncached forward (no eviction)."""
    spy.calls.clear()
    model.set_attn_implementation(spy.name)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    call = spy.calls[0]
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
    cache = CabCache(EvictionConfig(policy=policy, budget=budget, sink=2))
    spy.calls.clear()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")        # past_key_values is renamed `cache` in transformers 5.24
        model(seq[:, :n_prompt], past_key_values=cache)
        for t in range(n_prompt, n_prompt + steps):
            model(seq[:, t:t + 1], past_key_values=cache)
            assert cache.get_seq_length() == t + 1
            for layer in cache.layers:
                assert layer.keys.shape[-2] == budget, "cache must stay at the budget during decode"
            pos = cache.kept_positions()[0]                                    # (1, Hkv, budget)
            assert bool((pos[..., 1:] > pos[..., :-1]).all()) and int(pos[..., -1].min()) == t
            stored = cache.layers[0].keys
            expected = full_k.gather(2, pos[..., None].expand(-1, -1, -1, stored.shape[-1]))
            torch.testing.assert_close(stored, expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(spy.calls[-1]["query"], full_q[:, :, t:t + 1], rtol=1e-5, atol=1e-5)
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
    decode_calls = spy.calls[1:]
    assert len(decode_calls) == steps - 1
    pads = (mask == 0).sum(-1)
    for i, call in enumerate(decode_calls):
        absolute = 24 + i - pads                                                   # per row
        assert call["position_ids"][:, 0].tolist() == absolute.tolist()
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


def test_evict_every_lets_the_cache_overshoot_then_cuts_back_to_the_budget():
    """evict_every=E: after the prompt cut the cache grows to budget + E - 1, then one cut brings it back
    to the budget, and the kept positions stay true (strictly increasing, the newest token last)."""
    model = tiny_model("llama")
    ids, mask = prompts(1, n=40)
    cache = CabCache(EvictionConfig(policy="h2o", sparsity=0.75, evict_every=4))
    lengths = []
    model.set_attn_implementation("cab_reference")
    with torch.no_grad():
        tok = model(ids, attention_mask=mask, past_key_values=cache).logits[:, -1:].argmax(-1)
        lengths.append(cache.layers[0].keys.shape[-2])
        for _ in range(9):
            tok = model(tok, past_key_values=cache).logits[:, -1:].argmax(-1)
            lengths.append(cache.layers[0].keys.shape[-2])
    assert lengths == [10, 11, 12, 13, 10, 11, 12, 13, 10, 11]
    positions = cache.kept_positions()[0]
    assert bool((positions.diff(dim=-1) > 0).all()) and int(positions[..., -1].max()) == 40 + 9 - 1


# ----------------------------------------------------------------------------------------------------
# 4. Clear errors for bad inputs

def _qkv(**shape):
    s = dict(b=1, hq=4, hkv=2, nq=3, nk=5, d=8)
    s.update(shape)
    return make_qkv(s["b"], s["hq"], s["hkv"], s["nq"], s["nk"], s["d"], torch.float32, seed=0)


def bad_attention_calls():
    q, k, v = _qkv()
    nan_q = q.clone()
    nan_q[0, 0, 0, 0] = math.nan
    inf_k = k.clone()
    inf_k[0, 0, 0, 0] = -math.inf
    return [
        ("rank", lambda: attention(q[0], k, v), ValueError, "q"),
        ("k/v mismatch", lambda: attention(q, k, v[:, :, :4]), ValueError, "v"),
        ("head dim", lambda: attention(q, k[..., :4], v[..., :4]), ValueError, "head dim"),
        ("batch", lambda: attention(q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch"),
        ("heads", lambda: attention(*_qkv(hq=3, hkv=2)), ValueError, "multiple"),
        ("Nq > Nk", lambda: attention(*_qkv(nq=6, nk=5)), ValueError, "Nq"),
        ("int dtype", lambda: attention(q.long(), k, v), TypeError, "q"),
        ("not a tensor", lambda: attention(q.tolist(), k, v), TypeError, "q"),
        ("key_mask dtype", lambda: attention(q, k, v, key_mask=torch.ones(1, 5)), ValueError, "key_mask"),
        ("key_mask shape", lambda: attention(q, k, v, key_mask=torch.ones(1, 4, dtype=torch.bool)),
         ValueError, "key_mask"),
        ("NaN", lambda: attention(nan_q, k, v), ValueError, "q"),
        ("-inf", lambda: attention(q, inf_k, v), ValueError, "k"),
    ]


@pytest.mark.parametrize("case", bad_attention_calls(), ids=lambda c: c[0])
def test_attention_bad_inputs(case):
    _, call, error, word = case
    with pytest.raises(error, match=word):
        call()


@pytest.mark.parametrize("kwargs,word", [
    ({"policy": "lru"}, "policy"), ({"bridge": "pagerank"}, "bridge"),
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"),
    ({"budget": 0}, "budget"), ({"budget": 2.5}, "budget"), ({"budget": True}, "budget"),
    ({"local_ratio": 0.5}, "sum to 1"), ({"local_ratio": 1.5, "importance_ratio": -0.7}, "ratio"),
    ({"recent_ratio": 2.0}, "recent_ratio"), ({"sink": -1}, "sink"), ({"window": 0}, "window"),
    ({"pool": 4}, "pool"), ({"alpha": math.nan}, "alpha"),
])
def test_config_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        EvictionConfig(**kwargs)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        EvictionConfig(policy="lru")
    assert all(name in str(info.value) for name in POLICIES)


def test_selection_and_cache_bad_inputs():
    config = EvictionConfig(policy="h2o", budget=2)
    with pytest.raises(ValueError, match="scores"):
        select_kept(torch.rand(4, 5), config)
    with pytest.raises(TypeError, match="scores"):
        select_kept(torch.ones(1, 1, 5, dtype=torch.long), config)
    with pytest.raises(ValueError, match="scores"):
        select_kept(torch.full((1, 1, 5), math.nan), config)
    with pytest.raises(ValueError, match="key_mask"):
        select_kept(torch.rand(1, 1, 5), config, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bogus"):
        select_kept(torch.rand(1, 1, 5), config, bogus=torch.rand(1, 1, 5))
    with pytest.raises(ValueError, match="question_similarity"):
        select_kept(torch.rand(1, 1, 5), EvictionConfig(policy="hybrid_semantic", budget=2))
    with pytest.raises(ValueError, match="question_span"):
        R.question_mask_from_spans((3, 9), 1, 8)
    with pytest.raises(ValueError, match="question_span"):
        R.question_mask_from_spans((4, 4), 1, 8)
    with pytest.raises(ValueError, match="question_span"):
        R.question_mask_from_spans([(0, 2)] * 3, 2, 8)
    with pytest.raises(TypeError, match="config"):
        CabCache({"policy": "h2o"})


def test_question_span_outside_prompt_raises_during_generation():
    model = tiny_model("llama")
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match="question_span"):
        generate(model, "cab_reference", ids, mask,
                 CabCache(EvictionConfig(policy="question_aware", budget=8), question_span=(15, 40)), steps=2)
    with pytest.raises(ValueError, match="question_span"):
        generate(model, "cab_reference", ids, mask, CabCache(EvictionConfig(policy="hybrid_semantic", budget=8)),
                 steps=2)
