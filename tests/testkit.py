"""Helpers shared by the test files (one copy of each; the tests import them from here).

  inputs       make_qkv, left_padding_mask
  oracle       oracle_attention: float64, one query head at a time, written from the definitions
  hypothesis   examples(count), SLOW: derandomised settings with a fixed example budget
  models       tiny_model, prompts, generate, forward, CACHE_KWARG (the cache keyword of the installed
               transformers), word_tokenizer (offsets without a download), Spy (records every attention call)
  policies     policy_cases (every policy in POLICY_TYPES, CAB-like ones in every bridge mode),
               random_context (the evidence a policy ranks by), protected / promised (what a policy
               promises to keep: the keep-promise arithmetic, once per policy)
  near ties    assert_same_kept: kept sets equal up to swaps between near-tied tokens (one tolerance);
               assert_kept_ties_within_bounds: up to swaps whose two sides' values are within per-key bounds
  other GPUs   compiled_resources, chosen_tile_resources: cab_fast's kernels compiled for an architecture
               that need not be present, with their shared memory and registers
  bad inputs   bad_attention_calls: the one table of malformed attention calls
  huge         spot_check_rows: float64 spot checks for tensors too big for the oracle (> 2^31 elements)
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings

import cab_reference as R

GPU = torch.cuda.is_available()
U32 = 2.0 ** -24                   # float32 rounding unit


# ----------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle

def make_qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0, magnitude=1.0, device="cpu"):
    """Random q [B, Hq, Nq, D], k, v [B, Hkv, Nk, D] (q and k scaled by magnitude), from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, hq, nq, d, generator=g) * magnitude).to(dtype)
    k = (torch.randn(b, hkv, nk, d, generator=g) * magnitude).to(dtype)
    v = torch.randn(b, hkv, nk, d, generator=g).to(dtype)
    return q.to(device), k.to(device), v.to(device)


def left_padding_mask(b, n, pads, device="cpu"):
    """[B, N] bool, row r's first pads[r] tokens False (padding)."""
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, pad in enumerate(pads):
        mask[row, :pad] = False
    return mask.to(device)


def oracle_attention(q, k, v, scale=None, causal=True, key_mask=None):
    """softmax(q k^T * scale) v and per-key column sums, in float64 on the CPU, one query head at a time
    (h // G picks the KV head; causal = bottom-right aligned). Not written with the reference's helpers."""
    b, hq, nq, d = q.shape
    hkv, nk = k.shape[1], k.shape[2]
    group = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q64, k64, v64 = q.double().cpu(), k.double().cpu(), v.double().cpu()
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


def examples(count):
    """Derandomised hypothesis settings with a fixed example budget (reproducible in CI)."""
    return settings(max_examples=count, derandomize=True, deadline=None, database=None, print_blob=True,
                    suppress_health_check=list(HealthCheck))


SLOW = examples(1000)              # the `--slow` twins


# ----------------------------------------------------------------------------------------------------
# Tiny random models and generation

def _cache_keyword():
    """transformers 5.24 renamed past_key_values to `cache` (the old name warns, removed in 6); 5.17 has
    only past_key_values."""
    from transformers import LlamaForCausalLM
    return "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


CACHE_KWARG = _cache_keyword()
VOCAB = 96


def tiny_model(family="llama", seed=0, layers=2, vocab=VOCAB, sharpen=4.0, device="cpu"):
    """A random Llama or Qwen2 (64 wide, 4 query heads, 2 KV heads) with attention sharpened by scaling
    the q and k projections (a random init attends almost uniformly), eval mode, greedy generation that
    never stops early (compare every step)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[family]
    config = cls_config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = cls_model(config).to(device).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def prompts(batch, n=20, seed=1, pad=6, vocab=VOCAB, device="cpu"):
    """Random token ids [B, n] (3 .. vocab - 1) and attention mask; rows after the first are left-padded
    by `pad` tokens (id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, n), generator=g)
    mask = torch.ones(batch, n, dtype=torch.long)
    ids[1:, :pad] = 0
    mask[1:, :pad] = 0
    return ids.to(device), mask.to(device)


def generate(model, impl, ids, mask, cache=None, steps=12, **kwargs):
    """Greedy generate with attn_implementation=impl (extra kwargs go to generate, e.g.
    stopping_criteria); returns (sequences, logits [B, steps, vocab])."""
    model.set_attn_implementation(impl)
    if cache is not None:
        kwargs[CACHE_KWARG] = cache
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.scores, dim=1)


def forward(model, ids, cache, **kwargs):
    """One plain forward through `cache` (a manual decode step); returns the logits."""
    with torch.no_grad():
        return model(ids, **{CACHE_KWARG: cache}, **kwargs).logits


def word_tokenizer(texts):
    """A whitespace word-level fast tokenizer over the words of `texts` ([UNK] = 0): offset mappings and
    a chat-free prompt without downloading anything."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    words = sorted({w for text in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")


class Spy:
    """An attention implementation wrapping `attention_fn` (cab_reference's by default) that records, for
    every call, the layer, query, keys, scaling, position_ids and output."""

    def __init__(self, name="tst_spy_reference", attention_fn=R.attention, validate=False):
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        inner = R.make_attention_interface(attention_fn, validate=validate)
        self.name, self.calls = name, []

        def spy(module, query, key, value, attention_mask, **kwargs):
            out, _ = inner(module, query, key, value, attention_mask, **kwargs)
            self.calls.append({"layer": module.layer_idx, "query": query.detach().clone(),
                               "key": key.detach().clone(), "scaling": kwargs.get("scaling"),
                               "position_ids": kwargs.get("position_ids"), "out": out.detach().clone()})
            return out, None

        AttentionInterface.register(name, spy)
        AttentionMaskInterface.register(name, sdpa_mask)

    def layer_calls(self, layer):
        return [call for call in self.calls if call["layer"] == layer]


# ----------------------------------------------------------------------------------------------------
# Policies: cases, evidence, keep promises

def policy_cases(**knobs_by_name):
    """pytest params: every policy in POLICY_TYPES with default knobs (CAB and its subclasses once per
    bridge mode), with knobs_by_name[name] applied where given, e.g. policy_cases(streaming={"sinks": 2})."""
    cases = []
    for name, cls in R.POLICY_TYPES.items():
        knobs = knobs_by_name.get(name, {})
        bridges = R.BRIDGE_MODES if issubclass(cls, R.CAB) else (None,)
        for bridge in bridges:
            extra = {} if bridge is None else {"bridge": bridge}
            cases.append(pytest.param(cls(**knobs, **extra), id=name + ("" if bridge is None else f"-{bridge}")))
    return cases


EVIDENCE_RANGES = {                 # name -> (low, high) of random evidence; "n" = the number of tokens
    "window_scores": (0, 16), "bidirectional_scores": (0, "n"), "question_similarity": (-1, 1),
    "decode_scores": (0, 4), "question_match": (0, 1), "connectivity": (0, "n"), "curvature": (-20, 4),
    "sentence_match": (0, 4), "fact_slots": (0, 11), "title_links": (0, 3),
    "question_at_end": None,   # None: from question_mask
}


def evidence_names(policy):
    """The evidence a policy's evidence() produces, found by running it on a tiny random prompt."""
    q, k, v = make_qkv(1, 2, 1, 6, 6, 4, seed=0)
    question = torch.zeros(1, 6, dtype=torch.bool)
    question[:, 3:5] = True
    prompt = R.Prompt(q, k, v, None, None, question, R.attention)
    return sorted(policy.evidence(prompt))


def question_mask(b, n, at_end=True):
    """[B, N] bool: four question tokens ending one token before the end (at_end) or at positions 2..5."""
    mask = torch.zeros(b, n, dtype=torch.bool)
    if at_end:
        mask[:, n - 5:n - 1] = True
    else:
        mask[:, 2:6] = True
    return mask


def random_context(policy, scores, *, generator=None, fill=None, question_at_end=True):
    """select_kept's context for `policy`: its evidence, random in EVIDENCE_RANGES (or all `fill`), and
    question_mask (every policy gets it; those that do not read it ignore it)."""
    b, h, n = scores.shape
    context = {"question_mask": question_mask(b, n, question_at_end)}
    for name in evidence_names(policy):
        if EVIDENCE_RANGES[name] is None:                # DynamicLocal's decision: the question's place
            context[name] = torch.full((b, h, n), float(question_at_end))
            continue
        low, high = (n if x == "n" else x for x in EVIDENCE_RANGES[name])
        if fill is not None:
            context[name] = torch.full((b, h, n), float(fill))
        else:
            context[name] = low + (high - low) * torch.rand(b, h, n, generator=generator)
            if name == "connectivity":
                context[name] = context[name].floor()          # a count of queries
    return context


SINKS_THEN_RECENT = (R.MatchSpan, R.SentenceMatch, R.FactSlots, R.TitleLinks)   # sinks, recent_ratio, the rest


def protected(policy, k, *, question_at_end=True):
    """(sinks, recent): how many of the first / most recent tokens `policy` promises to keep at budget
    k < N. One entry per policy class; a new policy fails here until its promise is written down."""
    def recent_share(ratio):                                      # H2O and its variants: at least 1
        return min(k, max(1, int(k * ratio)))

    kind = type(policy)
    if kind is R.Dense:
        return 0, k
    if kind is R.StreamingLLM:
        sinks = min(policy.sinks, k)
        return sinks, k - sinks
    if kind in SINKS_THEN_RECENT:
        sinks = min(policy.sinks, k)
        return sinks, min(k - sinks, recent_share(policy.recent_ratio))
    if kind is R.SnapKV:
        return 0, min(policy.window, k // 2)
    if kind is R.CAB:
        return 0, recent_share(policy.recent_ratio)
    if kind is R.DynamicLocal:
        return 0, recent_share(policy.qa_recent_ratio if question_at_end else policy.recent_ratio)
    if kind in (R.H2O, R.QuestionAware, R.Bidirectional, R.Delayed, R.HybridSemantic):
        return 0, recent_share(policy.recent_ratio)
    raise AssertionError(f"protected(): no keep promise written down for {kind.__name__}; add it here")


def promised(policy, k, seen, *, question_at_end=True):
    """The original positions `policy` promises to hold with budget k after `seen` tokens."""
    if k >= seen:
        return set(range(seen))
    sinks, recent = protected(policy, k, question_at_end=question_at_end)
    return set(range(sinks)) | set(range(seen - recent, seen))


# ----------------------------------------------------------------------------------------------------
# Near ties

def ranking_proxies(scores, policy, per_head, evidence, computed=()):
    """The quantities `policy` ranks by, as functions of the scores [B, H, N] (float64, heads merged
    when per_head=False): the scores, SnapKV's pooled scores, QuestionAware's mixed priority; and the
    evidence named in `computed` (each side computed its own, e.g. SnapKV's window_scores: those values
    and SnapKV's pooling of them)."""
    def merged(t):
        t = t.double()
        return t if per_head else t.sum(1, keepdim=True)

    s = merged(scores)
    proxies = [s] + [merged(evidence[name]) for name in computed]
    if isinstance(policy, R.SnapKV):
        def pooled(t):
            return F.max_pool1d(t, policy.pool, stride=1, padding=policy.pool // 2)
        proxies.append(pooled(s))
        if "window_scores" in computed:
            proxies.append(pooled(merged(evidence["window_scores"])))
    if isinstance(policy, R.QuestionAware):
        sim = evidence["question_similarity"].double()
        sim = sim if per_head else sim.mean(1, keepdim=True)
        proxies.append(s / s.amax(-1, keepdim=True).clamp_min(1e-30) + policy.alpha * sim)
    return s, proxies


def swapped(kept_a, kept_b, heads, max_swaps):
    """(row, b, h, kept by a only, kept by b only) for every (batch row, head) whose kept sets [B, H, K] differ,
    at most max_swaps each; h is 0 where the evidence has one head (heads == 1: per-layer selection)."""
    rows_a, rows_b = kept_a.reshape(-1, kept_a.shape[-1]), kept_b.reshape(-1, kept_b.shape[-1])
    for r, (ra, rb) in enumerate(zip(rows_a.tolist(), rows_b.tolist())):
        only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
        if only_a:
            assert len(only_a) <= max_swaps, f"row {r}: {len(only_a)} swaps {only_a} vs {only_b}"
            b, h = divmod(r, kept_a.shape[1])
            yield r, b, (h if heads > 1 else 0), only_a, only_b


def assert_same_kept(kept_a, kept_b, scores_truth, scores_tol, policy, per_head, evidence, max_swaps=2,
                     computed=()):
    """Kept index sets equal, except swaps between tokens whose ranking quantities (ranking_proxies, or
    the distance to another score for CAB's median bridge) are within the score tolerance (relative to
    the row's largest value, at least 1) of each other; at most max_swaps per (batch row, head).
    `computed`: evidence names whose values the two sides computed separately (see ranking_proxies)."""
    if torch.equal(kept_a, kept_b):
        return
    s, proxies = ranking_proxies(scores_truth, policy, per_head, evidence, computed)
    tol = float(scores_tol)
    for r, b, h, only_a, only_b in swapped(kept_a, kept_b, s.shape[1], max_swaps):

        def near(x, y):
            if any(abs(float(p[b, h, x] - p[b, h, y])) <= 2 * tol * max(1.0, float(p[b, h].abs().max()))
                   for p in proxies):
                return True
            sx, sy, others = s[b, h, x], s[b, h, y], s[b, h]          # median bridge: |s - m| ties
            return bool((((sx - others).abs() - (sy - others).abs()).abs() <= 4 * tol * (1 + others.abs())).any())

        for x in only_a:
            assert any(near(x, y) for y in only_b), (
                f"row {r}: token {x} kept by one side only, no near-tie among {only_b}; "
                f"scores {float(s[b, h, x]):.6g} vs {[float(s[b, h, y]) for y in only_b]}")


def bounded_proxies(values, bounds, policy, per_head):
    """[(quantity [B, H, N], its per-key error bound)] that `policy` ranks by, from one side's own values
    {name: [B, Hkv, N]}: "scores" and the evidence it computed with its own attention, each with its bound in
    `bounds`, and the evidence both sides share (no bound). Heads are summed when per_head=False (bounds
    add); SnapKV max-pools (|max a - max a'| <= max |a - a'|: pooled bounds); QuestionAware mixes the
    scores over their row maximum with the question similarity (bound to first order)."""
    def merged(t):
        t = t.double()
        return t if per_head else t.sum(1, keepdim=True)

    out = [(merged(values[name]), merged(bound)) for name, bound in bounds.items()]
    if isinstance(policy, R.SnapKV):
        def pooled(t):
            return F.max_pool1d(t, policy.pool, stride=1, padding=policy.pool // 2)
        out += [(pooled(v), pooled(b)) for v, b in list(out)]
    if isinstance(policy, R.QuestionAware):
        s, b = out[0]
        top, at = s.max(-1, keepdim=True)
        top = top.clamp_min(1e-30)
        sim = values["question_similarity"].double()
        sim = sim if per_head else sim.mean(1, keepdim=True)
        out.append((s / top + policy.alpha * sim, (b + s / top * b.gather(-1, at)) / top))
    return out


def assert_kept_ties_within_bounds(kept_a, kept_b, values_a, values_b, bounds, policy, per_head, max_swaps=2):
    """Kept index sets [B, Hkv, K] equal, except swaps of x (kept by a only) for y (kept by b only) where
    both sides' own ranking quantities (bounded_proxies of values_a, values_b) for x and y differ by at most
    bound[x] + bound[y]: within error, either order is right. bounds: per key, what the two sides' values
    may differ by (each side's error bound, added). CAB-like policies also take "bridge" tokens closest to
    the median of the rest: there x and y tie if some key o (the median) is as far from both within
    bound[x] + bound[y] + 2 bound[o]. At most max_swaps per (batch row, head)."""
    if torch.equal(kept_a, kept_b):
        return
    sides = [bounded_proxies(values, bounds, policy, per_head) for values in (values_a, values_b)]
    for r, b, h, only_a, only_b in swapped(kept_a, kept_b, sides[0][0][0].shape[1], max_swaps):

        def tied(x, y):
            for i, (_, bound) in enumerate(sides[0]):
                e, own = bound[b, h], [side[i][0][b, h] for side in sides]
                if all(abs(float(v[x] - v[y])) <= float(e[x] + e[y]) for v in own):
                    return True
            if isinstance(policy, R.CAB):
                e = sides[0][0][1][b, h]
                return all(bool((((v[x] - v).abs() - (v[y] - v).abs()).abs() <= e[x] + e[y] + 2 * e).any())
                           for v in (side[0][0][b, h] for side in sides))
            return False

        for x in only_a:
            assert any(tied(x, y) for y in only_b), (
                f"row {r}: token {x} kept by one side only, no tie within bounds among {only_b}; scores "
                f"{[(float(side[0][0][b, h, x]), [float(side[0][0][b, h, y]) for y in only_b]) for side in sides]}, "
                f"bounds {float(sides[0][0][1][b, h, x]):.3g} vs {[float(sides[0][0][1][b, h, y]) for y in only_b]}")


# ----------------------------------------------------------------------------------------------------
# Bad inputs

def bad_attention_calls(device="cpu"):
    """(id, args, kwargs, error type, word the message must contain): every malformed attention call."""
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape).to(dtype=dtype, device=device)

    q, k, v = t(1, 4, 3, 16), t(1, 2, 5, 16), t(1, 2, 5, 16)
    return [
        ("rank q", (q[0], k, v), {}, ValueError, "q"),
        ("rank k", (q, k[0], v), {}, ValueError, "k"),
        ("k/v shapes", (q, k, v[:, :1]), {}, ValueError, "k and v"),
        ("head dim", (q, t(1, 2, 5, 8), t(1, 2, 5, 8)), {}, ValueError, "head dim"),
        ("batch", (q, t(2, 2, 5, 16), t(2, 2, 5, 16)), {}, ValueError, "batch"),
        ("Hq % Hkv", (t(1, 3, 3, 16), k, v), {}, ValueError, "multiple of KV heads"),
        ("Nq > Nk", (t(1, 4, 6, 16), k, v), {}, ValueError, "Nq <= Nk"),
        ("int dtype", (q.long(), k, v), {}, TypeError, "q"),
        ("list", (q, k.tolist(), v), {}, TypeError, "k"),
        ("mixed devices", (q, k.to("meta"), v.to("meta")), {}, ValueError, "device"),
        ("key_mask dtype", (q, k, v), {"key_mask": torch.ones(1, 5, device=device)}, ValueError, "key_mask"),
        ("key_mask shape", (q, k, v), {"key_mask": torch.ones(5, dtype=torch.bool, device=device)},
         ValueError, "key_mask"),
        ("key_mask device", (q, k, v), {"key_mask": torch.ones(1, 5, dtype=torch.bool, device="meta")},
         ValueError, "key_mask"),
        ("scale NaN", (q, k, v), {"scale": math.nan}, ValueError, "scale"),
        ("scale inf", (q, k, v), {"scale": math.inf}, ValueError, "scale"),
        ("scale str", (q, k, v), {"scale": "0.1"}, ValueError, "scale"),
    ]


# ----------------------------------------------------------------------------------------------------
# More than 2^31 elements (GPU only): float64 spot checks

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



# ----------------------------------------------------------------------------------------------------
# Compiling for GPUs that are not here

_POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.uint8: "*u8"}


def _ast_source(launch, tensors):
    """What triton's launcher would compile for this launch: each argument typed and specialised as at a
    launch (pointers on 16 bytes, ints == 1 as constants, ints divisible by 16 marked so), constexprs bound."""
    from triton.compiler import ASTSource

    kernel = launch.kernel
    values = (*launch.slots(tensors), *launch.scalars)
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, (param, value) in enumerate(zip(kernel.params, values)):
        name = param.name
        if isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1 and not param.do_not_specialize:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = "i64" if abs(value) > 0x7FFFFFFF else "i32"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    signature.update({name: "constexpr" for name in launch.constexprs})
    return ASTSource(kernel, signature, constexprs, attrs)


def _registers(cubin):
    """(registers per thread, local memory bytes per thread: spills) of a cubin, by triton's cuobjdump."""
    import re
    import subprocess
    import tempfile

    import triton
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    return int(re.search(r"REG:(\d+)", usage)[1]), int(re.search(r"LOCAL:(\d+)", usage)[1])


def compiled_resources(launch, tensors, capability):
    """{shared, registers, spills, threads} of launch compiled for a GPU of this (major, minor) capability,
    which need not be present: triton compiles for a target and ptxas assembles it."""
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 10 * capability[0] + capability[1], 32)
    compiled = triton.compile(_ast_source(launch, tensors), target=target,
                              options=dict(num_warps=launch.warps, num_stages=launch.stages))
    registers, spills = _registers(compiled.asm["cubin"])
    return dict(shared=compiled.metadata.shared, registers=registers, spills=spills, threads=32 * launch.warps)


def chosen_tile_resources(capability, shared, cases, candidates=False):
    """compiled_resources of every kernel launch cab_fast makes, at the tiles it chooses on a GPU of this
    capability and shared memory per block, for cases [(head dim, dtype name)]: the forward; the score pass
    by pointer loads and, where it would, by TMA; the decode kernels with 16 and 64 rows, one split and many,
    and without scores.
    candidates: also the decode kernel at 64 rows from every candidate tile (autotuning's choice), for the
    first case. Run without TRITON_INTERPRET (the kernels must be triton's compilable functions)."""
    import cab_fast

    cab_fast._DEVICES[-1] = ((capability, "pretended", shared), 132)     # meta tensors ask for device -1
    out = []
    for i, (d, dtype_name) in enumerate(cases):
        dtype = getattr(torch, dtype_name)
        launches = _kernel_launches(cab_fast, d, dtype, cab_fast.tiles("meta", d, dtype))
        if candidates and i == 0:
            launches = itertools.chain(launches, *(_decode_launches(cab_fast, d, dtype, tile, rows=64, nk=200)
                                                   for tile in cab_fast._CANDIDATES["decode"]))
        for label, launch, tensors in launches:
            out.append(dict(kernel=label, head_dim=d, dtype=dtype_name, block_n=launch.constexprs.get("BLOCK_N"),
                            warps=launch.warps, stages=launch.stages,
                            **compiled_resources(launch, tensors, capability)))
    return out


def _call_tensors(d, dtype, hq, hkv, nq, nk):
    """A call's tensors (q, k, v, key mask, out, lse, scores, workspace) on the meta device."""
    def t(*shape, dt=dtype):
        return torch.empty(*shape, dtype=dt, device="meta")
    return (t(1, hq, nq, d), t(1, hkv, nk, d), t(1, hkv, nk, d), t(1, nk, dt=torch.uint8), t(1, hq, nq, d),
            t(1, hq, nq, dt=torch.float32), t(1, hkv, nk, dt=torch.float32), t(16, dt=torch.float32))


def _decode_launches(cab_fast, d, dtype, tile, rows, nk, scores=True):
    """The decode launches of one KV head with `rows` query heads, where the decode kernels take them."""
    tensors = _call_tensors(d, dtype, rows, 1, 1, nk)
    q, k, v, km = tensors[:4]
    if cab_fast._decode_fits(q, k):
        for launch in cab_fast._decode_launches(q, k, v, km, 0.1, True, tile, scores)[0]:
            yield f"{launch.kernel.__name__} {rows} rows {tile}" + " no scores" * (not scores), launch, tensors


def _kernel_launches(cab_fast, d, dtype, tiles):
    """(label, launch, the call's tensors) of each kernel family at tiles, on meta tensors with a key mask."""
    for n in (4096, 1024):                  # 4096^2: long enough for the score pass's TMA loads, where it has them
        tensors = _call_tensors(d, dtype, 8, 8, n, n)
        q, k, v, km = tensors[:4]
        if n == 4096:
            yield "fwd", cab_fast._fwd_launch(q, k, v, km, 0.1, True, tiles["fwd"]), tensors
        score = cab_fast._score_launch(q, k, km, 0.1, True, tiles["score"], 1)
        if n == 1024 or score.constexprs["Q_TMA"]:
            yield "score" + " (TMA)" * score.constexprs["Q_TMA"], score, tensors
    for rows, nk in ((16, 65536), (64, 200), (64, 65536)):
        yield from _decode_launches(cab_fast, d, dtype, tiles["decode"], rows, nk)
    yield from _decode_launches(cab_fast, d, dtype, tiles["decode"], 64, 65536, scores=False)
