"""Tensor parallelism on CPU: two processes over gloo stand in for two GPUs.

Each rank holds half of a layer's KV heads, as under transformers' tp_plan="auto". What pools over all
heads (per-layer selection, question_match) must come out equal to one process holding every head, and
equal on every rank; per-head selection needs no communication. The last test runs tp_check.py's whole
check (a random Llama loaded with tp_plan="auto", reference cache and attention, float64) at small sizes.
"""

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cab_reference as ref

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2


CHECKS = {}   # name -> function(rank): every check runs in one spawn of WORLD ranks (imports cost seconds)


def check(fn):
    """Register fn(rank) in CHECKS; test_every_rank_agrees (at the end) passes when no rank raised."""
    CHECKS[fn.__name__] = fn
    return fn


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_checks(rank, port, out_dir):
    """One rank: every check in CHECKS, each failure written to out_dir/<check>.<rank>."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        for name, fn in CHECKS.items():
            try:
                fn(rank)
            except Exception:
                with open(os.path.join(out_dir, f"{name}.{rank}"), "w") as f:
                    f.write(traceback.format_exc())
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def failures(tmp_path_factory):
    """{check name: traceback of the first rank where it failed}, from one spawn of all checks."""
    out_dir = tmp_path_factory.mktemp("tp")
    mp.spawn(_run_checks, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {path.name.split(".")[0]: path.read_text() for path in sorted(out_dir.iterdir())}


def _dyadic(*shape, seed):
    """Multiples of 1/16 below 64: sums over heads are exact in any order, so the check can be exact."""
    return torch.randint(0, 1024, shape, generator=torch.Generator().manual_seed(seed)).float() / 16


def _shard(x, rank):
    """This rank's KV heads (dim 1), contiguous blocks in rank order as tp_plan shards them."""
    return x.chunk(WORLD, dim=1)[rank]


def _same_on_every_rank(x):
    gathered = [torch.empty_like(x) for _ in range(WORLD)]
    dist.all_gather(gathered, x.contiguous())
    return all(torch.equal(gathered[0], g) for g in gathered)


SELECTION_CASES = [  # (policy, evidence names it ranks by)
    (ref.H2O(), ()),
    (ref.CAB(), ()),
    (ref.CAB(bridge="connectivity"), ("connectivity",)),
    (ref.SnapKV(), ("window_scores",)),
    (ref.MatchSpan(), ("question_match",)),
    (ref.QuestionAware(), ("question_similarity",)),
    (ref.DynamicLocal(), ()),
]


def _selection_case(rank, b, h, n, budget):
    key_mask = torch.ones(b, n, dtype=torch.bool)
    key_mask[0, :5] = False                                                  # left padding in row 0
    question_mask = torch.zeros(b, n, dtype=torch.bool)
    question_mask[:, n - 8:n - 2] = True
    for case, (policy, names) in enumerate(SELECTION_CASES):
        scores = _dyadic(b, h, n, seed=10 + case)
        evidence = {name: _dyadic(b, h, n, seed=100 * case + i) for i, name in enumerate(names)}
        for per_head in (False, True):
            config = ref.EvictionConfig(policy, budget=budget, per_head=per_head)
            whole = ref.select_parts(scores, config, key_mask=key_mask, question_mask=question_mask, **evidence)
            sharded = ref.select_parts(_shard(scores, rank), config, key_mask=key_mask, question_mask=question_mask,
                                       head_group=dist.group.WORLD,
                                       **{name: _shard(e, rank) for name, e in evidence.items()})
            for field in ("kept", "part", "order"):
                assert torch.equal(getattr(sharded, field), _shard(getattr(whole, field), rank)), \
                    (policy.name, per_head, field)
            if not per_head:                                                 # one decision per layer
                assert _same_on_every_rank(sharded.kept)


@check
def selection_over_sharded_heads(rank):
    """Per layer (one all-reduce) and per head (none), for every policy shape, padding and ties."""
    for b, h, n, budget in [(2, 4, 64, 9), (1, 8, 33, 31)]:
        _selection_case(rank, b, h, n, budget)


def _question_match_case(rank, b, h, n, d):
    g = torch.Generator().manual_seed(5)
    v = torch.randn(b, h, n, d, generator=g)
    v[:, :, 10:14] = v[:, :, n - 6:n - 2]                                    # the question repeats a passage
    question_mask = torch.zeros(b, n, dtype=torch.bool)
    question_mask[:, n - 6:] = True
    whole = ref.question_match(v, question_mask, threshold=0.3)
    sharded = ref.question_match(_shard(v, rank), question_mask, threshold=0.3, head_group=dist.group.WORLD)
    torch.testing.assert_close(sharded, _shard(whole, rank), rtol=1e-5, atol=1e-6)
    assert _same_on_every_rank(sharded[:, 0])                                # every rank ranks alike
    alone = ref.question_match(_shard(v, rank), question_mask, threshold=0.3)
    assert not torch.allclose(alone, sharded)                                # the check can fail


@check
def question_match_over_sharded_heads(rank):
    for b, h, n, d in [(1, 4, 40, 16), (2, 8, 57, 8)]:
        _question_match_case(rank, b, h, n, d)


def _sentence_match_prompt(rank, head_group):
    """A prompt whose question shares one word with sentence A in every KV head and two words with sentence B
    in the second rank's heads only (elsewhere B's values are unrelated): over all heads A matches, B does not;
    the second rank alone would pick B."""
    dot, qmark = 1, 2
    ids = torch.tensor([[0, 5, 10, 6, dot, 40, 41, 42, dot, 7, 20, 21, 8, dot, 43, 44, dot, 50, 10, 20, 21, qmark, 60]])
    b, n, h, d = 1, ids.shape[1], 2 * WORLD, 16
    g = torch.Generator().manual_seed(8)
    table = torch.randn(int(ids.max()) + 1, h, d, generator=g)
    v = table[ids].permute(0, 2, 1, 3).contiguous()                         # (B, Hkv, N, D): one vector per id
    v[:, :h // WORLD, 9:14] = torch.randn(b, h // WORLD, 5, d, generator=g)  # B, first rank's heads: unrelated
    question_mask = torch.zeros(b, n, dtype=torch.bool)
    question_mask[:, 17:22] = True
    q, k = torch.randn(b, 2 * h, n, d, generator=g), torch.randn(b, h, n, d, generator=g)
    if head_group is not None:
        q, k, v = _shard(q, rank), _shard(k, rank), _shard(v, rank)
    return ref.Prompt(q, k, v, None, None, question_mask, ref.attention, head_group, ids)


@check
def sentence_match_over_sharded_heads(rank):
    """SentenceMatch's word identity is averaged over every rank's heads, so all ranks keep the same sentences."""
    policy = ref.SentenceMatch(boundary_ids=(1, 2))
    whole = policy.evidence(_sentence_match_prompt(rank, None))["sentence_match"]
    sharded = policy.evidence(_sentence_match_prompt(rank, dist.group.WORLD))["sentence_match"]
    assert _same_on_every_rank(sharded[:, 0])
    torch.testing.assert_close(sharded, _shard(whole, rank), rtol=1e-5, atol=1e-6)
    assert int(whole[0, 0].argmax()) in range(1, 5)                          # sentence A first
    if rank == WORLD - 1:                                                    # the check can fail
        alone = policy.evidence(_sentence_match_prompt(rank, dist.group.WORLD)._replace(head_group=None))
        assert not torch.allclose(alone["sentence_match"], sharded)


@check
def tp_plan_auto_on_gloo(rank):
    """transformers' tp_plan="auto" on CPU: tokens and kept positions equal one process's (float64)."""
    import tp_check
    sizes = tp_check.Sizes(prompt=96, new_tokens=4, question=8, layers=2, hidden=64, vocab=256)
    assert tp_check.check(sizes, torch.device("cpu"), fast=False)


@pytest.mark.parametrize("name", list(CHECKS))
def test_every_rank_agrees_with_one_process(failures, name):
    """Check `name` (its docstring says what it compares) raised on no rank."""
    assert name not in failures, failures[name]
