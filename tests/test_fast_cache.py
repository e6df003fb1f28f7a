"""cab_fast.CabCache (per-slot buffers) against cab_reference.CabCache (the readable eviction loop).

Both caches drive the same greedy generation of a tiny random Llama (float32, q/k weights sharpened so the
heads rank differently), the reference with attn_implementation "cab_reference", the twin with "cab_fast"
(the Triton interpreter on CPU, the real kernels on a GPU). After every generated token the kept original
positions must be the same sets in every layer and head, and the generated tokens the same.

Near-ties: none are allowed. The two sides' scores differ by float32 rounding (~1e-7 relative); ties that
the selection itself creates (padding, pooled priorities, equal positions) are exact on both sides and
broken by the same rule, so with these inputs a different kept set means a bug, and the test prints the
step, layer and both sets.

A cache whose policy does not rank by scores (streaming, the question matchers given a question, fact_slots
given token ids and sentence ends) skips the score pass: the reference's kept positions with its own scores
left at 0, no score kernel launched, and no such policy's evidence asks for attention.

On a GPU, more properties of the decode step: it never waits for the device (sync debug mode "error"); it
can be captured in a CUDA graph whose replays give the eager steps' results (evict_every=1; with more, the
capture raises and the cache goes on eagerly, also checked on the CPU with the capture check faked);
cuts replayed from the cut's own CUDA graph equal eager ones; and a dropped cache's graph survives another
cache's capture.
"""

import dataclasses
import gc
import itertools
import sys
from types import SimpleNamespace

import pytest
import torch
import transformers

import cab_fast
import cab_reference as ref
from testkit import GPU, forward, generate, make_qkv, prompts, tiny_model

DEV = "cuda" if GPU else "cpu"
PROMPT, QUESTION, STEPS = 24, (16, 22), 5
BOUNDARIES = tuple(range(3, 97, 7))      # token ids taken for sentence ends: a sentence every ~7 tokens
TEXTS = tuple("\n\n" if i % 13 == 0 else "\n" if i % 13 == 1 else f" w{i % 6}" for i in range(97))   # titled paragraphs


@pytest.fixture(scope="module")
def model():
    return tiny_model(vocab=97, sharpen=6.0, device=DEV)     # peaked attention: heavy hitters differ by head


def left_padded_prompts(batch=2, pad=5):
    return prompts(batch, PROMPT, pad=pad, vocab=97, device=DEV)   # rows after the first: `pad` tokens shorter


class KeptAfterEachToken(transformers.StoppingCriteria):
    """generate() calls this after every token: snapshot the cache's kept positions, never stop."""

    def __init__(self, cache):
        self.cache, self.kept = cache, []

    def __call__(self, input_ids, scores, **kwargs):
        self.kept.append([p.clone() for p in self.cache.kept_positions()])
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_recording_kept(model, impl, cache, ids, mask, steps=STEPS):
    """Greedy generation through `cache`: (sequences, kept positions after every token)."""
    snap = KeptAfterEachToken(cache)
    out, _ = generate(model, impl, ids, mask, cache, steps, stopping_criteria=transformers.StoppingCriteriaList([snap]))
    return out, snap.kept


def assert_kept_equal(kept_fast, kept_ref):
    """kept_* [step][layer] -> [B, Hkv, L]: same sets (both ascending) in every layer and head."""
    assert len(kept_fast) == len(kept_ref)
    for step, (fast, reference) in enumerate(zip(kept_fast, kept_ref)):
        for layer, (f, r) in enumerate(zip(fast, reference)):
            assert f.shape == r.shape and torch.equal(f, r), \
                f"after token {step}, layer {layer}: kept positions differ\nfast {f.tolist()}\nref  {r.tolist()}"


@pytest.mark.parametrize("evict_every", [1, 3])
@pytest.mark.parametrize("policy", ref.POLICIES)
def test_same_tokens_and_kept_positions(model, policy, evict_every):
    ids, mask = left_padded_prompts()
    runs = {}
    for impl, module in (("cab_reference", ref), ("cab_fast", cab_fast)):
        cache = module.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5), evict_every=evict_every,
                                question_span=QUESTION)
        runs[impl] = generate_recording_kept(model, impl, cache, ids, mask)
        if impl == "cab_fast" and policy != "none":
            assert cache.bank is not None and cache.bank.complete, "the decode steps did not run on the slots"
    assert torch.equal(runs["cab_fast"][0], runs["cab_reference"][0]), "generated tokens differ"
    assert_kept_equal(runs["cab_fast"][1], runs["cab_reference"][1])


def with_text_knobs(name):
    """The policy `name`, given BOUNDARIES where it reads sentence ends and TEXTS where it reads token texts."""
    fields = {f.name for f in dataclasses.fields(ref.POLICY_TYPES[name])}
    knobs = {"boundary_ids": BOUNDARIES, "vocab": TEXTS}
    return ref.make_policy(name, **{knob: value for knob, value in knobs.items() if knob in fields})


# (policy, with the question span, with the prompt's token ids): the caches that do not rank by scores, and
# h2o, which does
SCORE_READING_CASES = [("none", False, False), ("streaming", False, False), ("match_span", True, False),
                       ("sentence_match", True, True), ("fact_slots", False, True), ("title_links", True, True),
                       ("h2o", True, True)]


@pytest.mark.parametrize("policy, question, token_ids", SCORE_READING_CASES)
def test_scoreless_caches_keep_the_reference_positions_without_scores(model, policy, question, token_ids):
    """A cache whose policy does not rank by scores skips the score pass: the reference's tokens and kept
    positions after the prompt and every decode step, while its layers' scores stay 0; h2o's accumulate."""
    ids, mask = left_padded_prompts()
    kwargs = {"question_span": QUESTION if question else None, "token_ids": ids if token_ids else None}
    runs = {}
    for impl, module in (("cab_reference", ref), ("cab_fast", cab_fast)):
        cache = module.CabCache(ref.EvictionConfig(policy=with_text_knobs(policy), sparsity=0.5), **kwargs)
        runs[impl] = generate_recording_kept(model, impl, cache, ids, mask)
    assert cache.reads_scores == (policy == "h2o")
    assert policy == "none" or (cache.bank is not None and cache.bank.complete), "the steps did not run on the slots"
    for index, layer in enumerate(cache.layers):
        assert bool(layer.scores.any()) == cache.reads_scores, f"layer {index}: scores {layer.scores.tolist()}"
    assert torch.equal(runs["cab_fast"][0], runs["cab_reference"][0]), "generated tokens differ"
    assert_kept_equal(runs["cab_fast"][1], runs["cab_reference"][1])


def score_work(launch):
    """Whether a kernel launch computes scores: the score pass, or a decode kernel not told SCORES=False."""
    decode = launch.kernel in (cab_fast._decode_partial_kernel, cab_fast._decode_reduce_kernel)
    return launch.kernel is cab_fast._score_kernel or (decode and launch.constexprs.get("SCORES", True))


@pytest.mark.parametrize("policy", ["streaming", "h2o"])
def test_scoreless_cache_launches_no_score_work(model, monkeypatch, policy):
    """Skipped, not computed and ignored: through a prompt that takes the prefill kernels (40 tokens x 2 query
    heads per KV head > DECODE_MAX_ROWS; left padding keeps it off SDPA on a GPU too) and decode steps on the
    slots, a streaming cache launches the forward and decode kernels and no score work; h2o's does."""
    launched, run = [], cab_fast._run
    monkeypatch.setattr(cab_fast, "_run", lambda launches, tensors: launched.extend(launches) or run(launches, tensors))
    ids, mask = prompts(2, 40, pad=5, vocab=97, device=DEV)
    cache = cab_fast.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5))
    generate(model, "cab_fast", ids, mask, cache, steps=3)
    kernels = {launch.kernel for launch in launched}
    assert {cab_fast._fwd_kernel, cab_fast._decode_partial_kernel} <= kernels and cache.bank is not None
    assert any(map(score_work, launched)) == (policy == "h2o")


def test_scoreless_policies_never_ask_attention_for_evidence():
    """The scoreless adapter hands a policy's evidence an attention function that returns no scores. Every
    policy that does not rank by scores, with or without a question and the prompt's token ids, gathers its
    evidence without calling it."""
    n = PROMPT
    q, k, v = make_qkv(1, 4, 2, n, n, 16, seed=3)
    ids = prompts(1, n, vocab=97)[0]
    question = torch.zeros(1, n, dtype=torch.bool)
    question[:, QUESTION[0]:QUESTION[1]] = True

    def no_attention(*args, **kwargs):
        raise AssertionError("the evidence called attention_fn")
    checked = set()
    for name, has_question, has_ids in itertools.product(ref.POLICY_TYPES, (False, True), (False, True)):
        policy = with_text_knobs(name)
        if policy.ranks_by_scores(has_question, has_ids) or (policy.needs_question and not has_question):
            continue
        ref.prompt_evidence(q, k, v, ref.EvictionConfig(policy=policy), attention_fn=no_attention,
                            question_mask=question if has_question else None, token_ids=ids if has_ids else None)
        checked.add(name)
    assert {"none", "streaming", "hybrid_semantic", "match_span", "sentence_match", "fact_slots",
            "title_links"} <= checked


def decode_loop(model, impl, cache, chunks):
    """Plain forwards (no generate): each chunk of token ids is fed as one call, then 2 greedy tokens."""
    model.set_attn_implementation(impl)
    kept, logits = [], []
    for chunk in chunks:
        out = forward(model, chunk.to(DEV), cache)[:, -1:]
        for _ in range(2):
            logits.append(out)
            kept.append([p.clone() for p in cache.kept_positions()])
            out = forward(model, out.argmax(-1), cache)[:, -1:]
    return torch.cat(logits, 1), kept


@pytest.mark.parametrize("held_bytes, selections", [(1 << 29, 1), (1, 2)])
def test_prompt_layers_cut_together(model, monkeypatch, held_bytes, selections):
    """The prompt's cuts wait for the last layer and share one selection over both layers' rows; with
    _HELD_BYTES exceeded at once, each layer is cut as it comes. Either way the reference's choice (kept
    positions and the recorded prompt selections)."""
    ids, mask = left_padded_prompts()
    monkeypatch.setattr(cab_fast, "_HELD_BYTES", held_bytes)
    rows, choose = [], ref.choose
    monkeypatch.setattr(ref, "choose", lambda scores, *args: rows.append(scores.shape[0]) or choose(scores, *args))
    caches = {}
    for impl, module in (("cab_fast", cab_fast), ("cab_reference", ref)):
        caches[impl] = module.CabCache(ref.EvictionConfig(policy="cab", sparsity=0.5), record=True)
        model.set_attn_implementation(impl)
        forward(model, ids.to(DEV), caches[impl], attention_mask=mask.to(DEV))
        if impl == "cab_fast":
            assert rows == [2 * 2 // selections] * selections, f"selections over {rows} rows"
            assert caches[impl].bank is not None and caches[impl].bank.complete
    assert_kept_equal([caches["cab_fast"].kept_positions()], [caches["cab_reference"].kept_positions()])
    for fast, reference in zip(caches["cab_fast"].layers, caches["cab_reference"].layers):
        assert torch.equal(fast.prompt_record["selection"].kept, reference.prompt_record["selection"].kept)


@pytest.mark.skipif(not GPU, reason="cut graphs exist only on a CUDA device")
@pytest.mark.parametrize("evict_every", [1, 3])
def test_eager_cuts_match_replayed_cuts(model, evict_every):
    """cut_graphs=False runs every cut eagerly; the default replays a CUDA graph of the first cut after it.
    Both generate the same tokens and keep the same positions after every token."""
    ids, mask = left_padded_prompts()
    runs = []
    for cut_graphs in (True, False):
        cache = cab_fast.CabCache(ref.EvictionConfig(policy="cab", sparsity=0.5), evict_every=evict_every,
                                  question_span=QUESTION, cut_graphs=cut_graphs)
        runs.append(generate_recording_kept(model, "cab_fast", cache, ids, mask, steps=7))
        assert (cache.bank.cut_graph is not None) == cut_graphs
    assert torch.equal(runs[0][0], runs[1][0]), "generated tokens differ"
    assert_kept_equal(runs[0][1], runs[1][1])


@pytest.mark.skipif(not GPU, reason="cut graphs exist only on a CUDA device")
def test_dead_cache_keeps_its_graph_through_a_capture(model, monkeypatch):
    """A dropped cache waits for the cyclic garbage collector (its layers point back at it). Collected while
    a second cache captures its cut, the first one's CUDA graph must outlive that capture: destroying a
    graph invalidates a capture in progress (seen as a failed generate() on the second cache)."""
    ids, mask = left_padded_prompts()
    config = ref.EvictionConfig(policy="cab", sparsity=0.5)
    capture = cab_fast.SlotBank._cut_eagerly

    def collecting(bank):
        if torch.cuda.is_current_stream_capturing():
            gc.collect()
        capture(bank)
    gc.disable()                                         # the first cache stays garbage until collecting()
    try:
        first = cab_fast.CabCache(config)
        generate_recording_kept(model, "cab_fast", first, ids, mask)
        assert first.bank.cut_graph is not None
        del first
        monkeypatch.setattr(cab_fast.SlotBank, "_cut_eagerly", collecting)
        second = cab_fast.CabCache(config)
        generate_recording_kept(model, "cab_fast", second, ids, mask)
        assert second.bank.cut_graph is not None and cab_fast._RETIRED_GRAPHS
    finally:
        gc.enable()


@pytest.mark.parametrize("policy, evict_every", [("h2o", 1), ("snapkv", 2), ("streaming", 1)])
def test_multi_token_calls_after_the_cut(model, policy, evict_every):
    """A 5-token question appended to a compressed cache (and a 3-token chunk after it) takes the
    position-ordered path and comes back to the slots: the same kept positions and logits as the reference
    (streaming: on both paths without scores)."""
    g = torch.Generator().manual_seed(7)
    chunks = [torch.randint(3, 97, (1, n), generator=g) for n in (PROMPT, 5, 3)]
    results = {}
    for impl, module in (("cab_reference", ref), ("cab_fast", cab_fast)):
        cache = module.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5), evict_every=evict_every)
        results[impl] = decode_loop(model, impl, cache, chunks)
    torch.testing.assert_close(results["cab_fast"][0], results["cab_reference"][0], rtol=1e-4, atol=1e-4)
    assert_kept_equal(results["cab_fast"][1], results["cab_reference"][1])


def test_reordered_batch_leaves_and_rejoins_the_slots(model):
    """Beam search reorders batch rows: the fast cache returns to position order for it and comes back
    to the slots at the next step, keeping what the reference keeps."""
    ids, _ = left_padded_prompts(pad=0)
    swap = torch.tensor([1, 0], device=DEV)
    kept = {}
    for impl, module in (("cab_reference", ref), ("cab_fast", cab_fast)):
        cache = module.CabCache(ref.EvictionConfig(policy="h2o", sparsity=0.5), evict_every=2)
        out, _ = generate(model, impl, ids, torch.ones_like(ids), cache, steps=3)
        cache.reorder_cache(swap)
        _, kept[impl] = decode_loop(model, impl, cache, [out[swap, -1:]])
        if impl == "cab_fast":
            assert cache.bank is not None and cache.bank.complete
    assert_kept_equal(kept["cab_fast"], kept["cab_reference"])


def test_decode_writes_into_the_evicted_slot(model):
    """No copy of the cache per step: the buffers keep their storage, and the new token's key lands in the
    slot the last cut freed."""
    ids, mask = left_padded_prompts(batch=1)
    cache = cab_fast.CabCache(ref.EvictionConfig(policy="h2o", sparsity=0.5))
    generate(model, "cab_fast", ids, mask, cache, steps=2)
    bank = cache.bank
    pointers = (bank.keys.data_ptr(), bank.values.data_ptr())
    slot = bank.next_slot.clone()                                            # (Ly, B, Hkv, 1)
    forward(model, torch.tensor([[5]], device=DEV), cache)
    assert (bank.keys.data_ptr(), bank.values.data_ptr()) == pointers and cache.bank is bank
    newest = cache.get_seq_length() - 1                                      # the token just written
    assert bool((bank.positions.gather(-1, slot) == newest).all()), "the new token is not in the freed slot"


@pytest.mark.skipif(not GPU, reason="host syncs and CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("policy", ["cab", "snapkv", "match_span", "dynamic_local"])
def test_decode_step_never_syncs(model, policy):
    ids, mask = left_padded_prompts(batch=2)
    cache = cab_fast.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5), question_span=QUESTION)
    out, _ = generate(model, "cab_fast", ids, mask, cache, steps=2)
    token = out[:, -1:]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):                               # a cut at every step (evict_every=1)
            token = forward(model, token, cache)[:, -1:].argmax(-1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("evict_every", [1, 2])
def test_capture_is_refused_unless_every_step_cuts(model, monkeypatch, evict_every):
    """Whether a step on the slots cuts is counted on the host, so a CUDA graph of one step replays that
    step's choice: with evict_every > 1 a capture (cab_fast's check of it, faked here) is refused before the
    step writes anything, and the cache then decodes on as one that was never asked; with evict_every=1
    (every step cuts) the step runs."""
    ids, mask = left_padded_prompts(batch=1)
    config = ref.EvictionConfig(policy="h2o", sparsity=0.5)
    asked, clean = (cab_fast.CabCache(config, evict_every=evict_every) for _ in range(2))
    for cache in (asked, clean):
        out, _ = generate(model, "cab_fast", ids, mask, cache, steps=2)
    token = out[:, -1:]
    with monkeypatch.context() as patch:
        patch.setattr(cab_fast, "_capturing", lambda: True)
        if evict_every > 1:
            with pytest.raises(RuntimeError, match="evict_every: a decode step captured in a CUDA graph needs "
                                                   "evict_every=1"):
                forward(model, token, asked)
        else:
            forward(model, token, asked)
            forward(model, token, clean)
    for _ in range(evict_every + 1):                                       # through a cut
        want = forward(model, token, clean)[:, -1:]
        torch.testing.assert_close(forward(model, token, asked)[:, -1:], want, rtol=0, atol=0)
        assert_kept_equal([asked.kept_positions()], [clean.kept_positions()])
        token = want.argmax(-1)


def warm_up_step(model, token, position, to_capture, eager):
    """One decode step of both caches, the one to capture on a side stream (a capture needs its library
    handles warmed up there); then token and position advance to the eager cache's next step."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward(model, token, to_capture, position_ids=position)
    torch.cuda.current_stream().wait_stream(side)
    token.copy_(forward(model, token, eager, position_ids=position)[:, -1:].argmax(-1))
    position.add_(1)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("evict_every", [2, 5])
def test_capture_with_evict_every_above_1_raises_and_leaves_the_cache_as_it_was(model, evict_every):
    """The protocol of test_decode_step_replays_in_a_cuda_graph with evict_every > 1: the capture raises,
    and the cache decodes on eagerly with the logits and kept positions of an identical cache."""
    ids, mask = left_padded_prompts(batch=2)
    caches = [cab_fast.CabCache(ref.EvictionConfig(policy="cab", sparsity=0.5), evict_every=evict_every)
              for _ in range(2)]
    for cache in caches:
        out, _ = generate(model, "cab_fast", ids, mask, cache, steps=2)
    eager, asked = caches
    token = out[:, -1:].clone()
    position = (ids.shape[1] + 1 - (mask == 0).sum(-1, keepdim=True)).clone()
    with torch.no_grad():
        warm_up_step(model, token, position, asked, eager)
        with pytest.raises(RuntimeError, match="needs evict_every=1"), torch.cuda.graph(torch.cuda.CUDAGraph()):
            forward(model, token, asked, position_ids=position)
        for _ in range(evict_every + 1):
            want = forward(model, token, eager, position_ids=position)
            torch.testing.assert_close(forward(model, token, asked, position_ids=position), want, rtol=1e-5,
                                       atol=1e-5)
            assert_kept_equal([asked.kept_positions()], [eager.kept_positions()])
            token.copy_(want[:, -1:].argmax(-1))
            position.add_(1)


@pytest.mark.skipif(not GPU, reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("policy", ["cab", "streaming"])
def test_decode_step_replays_in_a_cuda_graph(model, policy):
    """Capture one decode step (model forward + cache write + attention + cut) and replay it: the same
    logits, kept positions and cached keys as eager steps on an identical cache (streaming: without scores)."""
    ids, mask = left_padded_prompts(batch=2)
    caches = [cab_fast.CabCache(ref.EvictionConfig(policy=policy, sparsity=0.5)) for _ in range(2)]
    for cache in caches:
        out, _ = generate(model, "cab_fast", ids, mask, cache, steps=2)
    eager, graphed = caches
    n = ids.shape[1] + 1                                 # the next token's position, before padding
    pads = (mask == 0).sum(-1, keepdim=True)
    token = out[:, -1:].clone()
    position = (n - pads).clone()                        # (B, 1) padding-aware positions, as generate()'s
    with torch.no_grad():
        warm_up_step(model, token, position, graphed, eager)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = forward(model, token, graphed, position_ids=position)
        for step in range(3):
            graph.replay()
            want = forward(model, token, eager, position_ids=position)
            torch.testing.assert_close(static_logits, want, rtol=1e-5, atol=1e-5)
            for f, r in zip(graphed.kept_positions(), eager.kept_positions()):
                assert torch.equal(f, r), f"replay {step}: kept positions differ"
            assert torch.equal(graphed.bank.keys, eager.bank.keys), f"replay {step}: cached keys differ"
            token.copy_(want[:, -1:].argmax(-1))
            position.add_(1)


def test_a_bank_whose_allocation_fails_dies_quietly(monkeypatch):
    """Out of memory while a SlotBank allocates its slots (a capacity search meets it on purpose): the half-built
    bank is collected without an error from __del__."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class Keys:
        shape, device = (1, 2, 8, 4), torch.device("cpu")

        def new_zeros(self, *shape):
            raise torch.OutOfMemoryError("out of memory")
    with pytest.raises(torch.OutOfMemoryError):
        cab_fast.SlotBank(SimpleNamespace(evict_every=1), 2, SimpleNamespace(keys=Keys(), budget=4))
    gc.collect()
    assert unraisable == []


def test_keys_changed_in_a_decode_step_on_the_slots_are_an_error(model):
    """As in the reference: an attention call that gets other keys than update() returned raises instead of
    attending with no eviction; a step on the slots wrote in place, so the cache then refuses to go on."""
    def copying_decode_keys(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:
            key = key.clone()
        return cab_fast._cab_fast_forward(module, query, key, value, attention_mask, **kwargs)

    transformers.AttentionInterface.register("tst_fast_copying_keys", copying_decode_keys)
    transformers.masking_utils.AttentionMaskInterface.register("tst_fast_copying_keys",
                                                               transformers.masking_utils.sdpa_mask)
    ids, mask = prompts(1, PROMPT, vocab=97, device=DEV)
    cache = cab_fast.CabCache(cab_fast.EvictionConfig(policy="h2o", budget=8))
    with pytest.raises(RuntimeError, match="update.*other keys"):
        generate(model, "tst_fast_copying_keys", ids, mask, cache, steps=4)
    assert cache.broken                                                     # the step failed on the slots
    with pytest.raises(RuntimeError, match="start a new cache"):
        forward(model, ids[:, -1:], cache)
