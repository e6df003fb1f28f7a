"""Benchmarks for cab_fast on a CUDA GPU: every figure measured side by side in the same run.

    python bench/bench.py            # table
    python bench/bench.py --json     # the same rows as JSON (one object) on stdout
    python bench/bench.py --quick    # fewer sizes (a smoke run)
    python bench/bench.py --autotune # first time every candidate tile of cab_fast's kernels at the bench sizes,
                               # print the winners as a tile table (for cab_fast._TILES) and use them here
    CAB_AUTOTUNE=1 python bench/bench.py   # cab_fast tunes each shape class on its first call instead

Times are medians of triton.testing.do_bench (CUDA events, warm-up first). Correctness lives in
test_equivalence.py; this file only checks that the fast path's outputs are finite before timing.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root: cab_reference, cab_fast
sys.path.insert(0, ROOT)
import cab_reference as ref  # noqa: E402

cab_fast = None          # imported in main(), after the CUDA check

ROWS = []


def _row(section, **kw):
    kw = {"section": section, **kw}
    ROWS.append(kw)
    return kw


def _ms(fn, rep=100):
    return do_bench(fn, warmup=25, rep=rep, return_mode="median")


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _header():
    # CAB_COMMIT first: a copy of the tree on another machine may carry no .git, or a stale one
    commit = os.environ.get("CAB_COMMIT") or _git_commit() or "?"
    import transformers
    p = torch.cuda.get_device_properties(0)
    return {"device": torch.cuda.get_device_name(0), "sms": p.multi_processor_count,
            "memory_gib": round(p.total_memory / 2 ** 30, 1), "torch": torch.__version__,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "commit": commit, "date": datetime.date.today().isoformat()}


def _tile(kind, d, dtype=torch.bfloat16):
    t = cab_fast.tiles("cuda", d, dtype)[kind]
    return "/".join(map(str, t[:-2])) + f" w{t[-2]} s{t[-1]}" if kind != "decode" else \
        f"{t[0]} w{t[1]} s{t[2]} {t[3]}/SM"


def _qkv(n_q, n_k, heads, hkv, d, seed, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(1, heads, n_q, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(1, hkv, n_k, d, device="cuda", dtype=dtype, generator=g),
            torch.randn(1, hkv, n_k, d, device="cuda", dtype=dtype, generator=g))


def bench_prefill(lengths, heads=32, d=128):
    from torch.nn.attention import SDPBackend
    flash = _sdpa(SDPBackend.FLASH_ATTENTION)
    qk_scale = cab_fast._LOG2E.value / math.sqrt(d)
    for hkv in (heads, heads // 4):
        for n in lengths:
            q, k, v = _qkv(n, n, heads, hkv, d, seed=n)
            flops = 4 * heads * n * n * d / 2                                   # causal: half of QK^T and PV
            r = {"n": n, "hq": heads, "hkv": hkv, "d": d}
            r["sdpa_ms"] = _ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                      enable_gqa=hkv != heads))
            try:
                r["sdpa_flash_ms"] = _ms(lambda: flash(q, k, v, True))
            except RuntimeError:                                               # e.g. no GQA in this backend
                r["sdpa_flash_ms"] = None
            out, sc = cab_fast.attention(q, k, v)
            assert torch.isfinite(sc).all() and torch.isfinite(out).all()
            r["fast_ms"] = _ms(lambda: cab_fast.attention(q, k, v))
            r["fast_validate_ms"] = _ms(lambda: cab_fast.attention(q, k, v, validate=True))
            r["fast_triton_fwd_ms"] = _ms(lambda: cab_fast._attention(q, k, v, route="prefill"))
            _, lse = cab_fast._fwd_cudnn(q, k, v, 1 / math.sqrt(d), True)
            r["score_pass_ms"] = _ms(lambda: cab_fast._scores_triton(q, k, None, lse, qk_scale, True))
            r["ratio_vs_sdpa"] = r["fast_ms"] / r["sdpa_ms"]
            r["fast_tflops"] = flops / r["fast_ms"] / 1e9
            r["sdpa_tflops"] = flops / r["sdpa_ms"] / 1e9
            # peak extra memory of the score pass (beyond q, k, v, out, lse)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            sc = cab_fast._scores_triton(q, k, None, lse, qk_scale, True)
            torch.cuda.synchronize()
            r["score_pass_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            del sc
            if n <= 4096:                                                      # eager: N^2 memory beyond
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                r["reference_ms"] = _ms(lambda: ref.attention(q, k, v), rep=20)
                r["reference_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
            else:
                r["reference_ms"] = None
            r["tiles"] = f"fwd {_tile('fwd', d)} | score {_tile('score', d)}"
            _row("prefill", **r)
            torch.cuda.empty_cache()
            yield r


def _graphed(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def bench_decode(lengths, heads=32, d=128):
    for hkv in (heads, heads // 4):
        for n in lengths:
            q, k, v = _qkv(1, n, heads, hkv, d, seed=n)
            r = {"n": n, "hq": heads, "hkv": hkv, "d": d}
            def sdpa(q=q, k=k, v=v, gqa=hkv != heads):
                return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            r["sdpa_ms"] = _ms(sdpa)
            out, sc = cab_fast.attention(q, k, v)
            assert torch.isfinite(sc).all() and torch.isfinite(out).all()
            r["fast_ms"] = _ms(lambda: cab_fast.attention(q, k, v))
            r["fast_validate_ms"] = _ms(lambda: cab_fast.attention(q, k, v, validate=True))
            # GPU time alone (CUDA-graph replay, as a serving loop runs decode): no Python launch overhead
            r["fast_graph_ms"] = _ms(_graphed(lambda: cab_fast.attention(q, k, v)))
            r["sdpa_graph_ms"] = _ms(_graphed(sdpa))
            r["graph_ratio"] = r["fast_graph_ms"] / r["sdpa_graph_ms"]
            r["ratio_vs_sdpa"] = r["fast_ms"] / r["sdpa_ms"]
            kv_bytes = 2 * k.numel() * k.element_size()
            r["fast_tb_s"] = kv_bytes / r["fast_graph_ms"] / 1e9
            r["sdpa_tb_s"] = kv_bytes / r["sdpa_graph_ms"] / 1e9
            r["tile"] = _tile("decode", d)
            _row("decode", **r)
            torch.cuda.empty_cache()
            yield r


def _host_us(fn, calls=2000, repeats=5):
    """Host microseconds per call of fn in a loop without synchronisation: on a tiny problem the GPU
    keeps up, so this is the Python + launch cost a caller pays. The median of `repeats` loops of
    calls / repeats each: single loops on the H100 hosts scattered by up to 3x."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls // repeats):
            fn()
        times.append((time.perf_counter() - t0) / (calls // repeats) * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def _growing(attend, k, v, start):
    """A call per step over the first start, start + 1, ... keys: a new shape every call, as a cache that
    grows by one token a step hands attention."""
    n = [start]

    def step():
        n[0] += 1
        return attend(k[:, :, :n[0]], v[:, :, :n[0]])
    return step


def bench_overhead(d=128):
    """Per-call host overhead on tiny problems (B=1, Hq=8, Hkv=2), cab_fast against SDPA: the same call
    repeated (a static-shape cache), and a decode whose key count grows by one per call."""
    for label, nq, nk in (("decode", 1, 64), ("decode", 1, 4096), ("prefill", 64, 64), ("growing", 1, 4096)):
        q, k, v = _qkv(nq, nk + 1000, 8, 2, d, seed=nk)
        r = {"call": label, "nq": nq, "nk": nk}

        def sdpa(k, v, q=q):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        def fast(k, v, validate=False, q=q):
            return cab_fast.attention(q, k, v, validate=validate)

        if label == "growing":          # 20 warm-up calls + the timed ones: within the 1000 spare keys
            r["sdpa_us"] = _host_us(_growing(sdpa, k, v, nk), calls=400)
            r["fast_us"] = _host_us(_growing(fast, k, v, nk), calls=400)
            r["fast_validate_us"] = _host_us(_growing(functools.partial(fast, validate=True), k, v, nk), calls=200)
        else:
            k, v = k[:, :, :nk], v[:, :, :nk]
            r["sdpa_us"] = _host_us(lambda: sdpa(k, v))
            r["fast_us"] = _host_us(lambda: fast(k, v))
            r["fast_validate_us"] = _host_us(lambda: fast(k, v, validate=True), calls=200)
        r["ratio"] = r["fast_us"] / r["sdpa_us"]
        _row("overhead", **r)
        yield r


_FIRST_CALL = r"""
import json, sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
import cab_fast
t2 = time.perf_counter()
r = {"import_torch_s": t1 - t0, "import_cab_fast_s": t2 - t1}
def qkv(nq, nk, hq=32, hkv=8, d=128):
    return [torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16) for h, n in ((hq, nq), (hkv, nk), (hkv, nk))]
def first(name, *shape):
    q, k, v = qkv(*shape); torch.cuda.synchronize()
    t = time.perf_counter(); cab_fast.attention(q, k, v); torch.cuda.synchronize()
    r[name] = time.perf_counter() - t
first("decode_4k_s", 1, 4096); first("decode_new_len_s", 1, 5000); first("decode_short_s", 1, 100)
first("prefill_2k_s", 2048, 2048); first("prefill_new_len_s", 3000, 3000)
q, k, v = qkv(512, 512); m = torch.ones(1, 512, dtype=torch.bool, device="cuda"); m[:, :7] = False
torch.cuda.synchronize(); t = time.perf_counter(); cab_fast.attention(q, k, v, key_mask=m); torch.cuda.synchronize()
r["padded_prefill_s"] = time.perf_counter() - t            # key_mask: the Triton forward
print(json.dumps(r))
"""


def bench_first_call():
    """First calls in fresh processes (bf16, D=128, GQA 32/8): a cold Triton cache (compiles) and a warm
    one (the same cache again). CUDA is initialised before each timed call."""
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        for label in ("cold", "warm"):
            res = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env, capture_output=True, text=True,
                                 timeout=300, cwd=ROOT)
            if res.returncode:
                raise RuntimeError(f"first-call subprocess failed:\n{res.stderr[-2000:]}")
            r = _row("first_call", cache=label, **json.loads(res.stdout.strip().splitlines()[-1]))
            yield r


def sweep_tiles(d_list=(128,)):
    """Time every candidate tile of each kernel at the bench sizes (bf16, causal, GQA 32/8 and MHA) and
    install the winners (least geometric-mean slowdown against the best candidate per size) in
    cab_fast._TILES for the rest of this run. Returns the table entries to paste into cab_fast.py."""
    cap, name = torch.cuda.get_device_capability(), torch.cuda.get_device_name(0)
    table = cab_fast._TILES.setdefault(name, {})          # this GPU's own entry: looked up before its architecture's
    shared = cab_fast._device(torch.empty(0, device="cuda"))[0][2]     # shared memory per block
    found = {}
    for d in d_list:
        bd = cab_fast._block_d(d)
        qk_scale = cab_fast._LOG2E.value / math.sqrt(d)
        problems = {"fwd": [], "score": [], "decode": []}
        for n, hkv in ((4096, 8), (16384, 8)):
            q, k, v = _qkv(n, n, 32, hkv, d, seed=n)
            problems["fwd"].append(lambda t, q=q, k=k, v=v: cab_fast._fwd_triton(q, k, v, None, qk_scale, True, tile=t))
        for n, hkv in ((1024, 8), (4096, 32), (16384, 8)):
            q, k, v = _qkv(n, n, 32, hkv, d, seed=n)
            lse = cab_fast._fwd_cudnn(q, k, v, 1 / math.sqrt(d), True)[1]
            problems["score"].append(lambda t, q=q, k=k, lse=lse: cab_fast._scores_triton(q, k, None, lse, qk_scale,
                                                                                         True, tile=t))
        for n, hkv in ((4096, 8), (32768, 32), (131072, 8), (131072, 32)):
            q, k, v = _qkv(1, n, 32, hkv, d, seed=n)
            problems["decode"].append(lambda t, q=q, k=k, v=v: cab_fast._decode(q, k, v, 1 / math.sqrt(d), True, None,
                                                                               tile=t))
        for kind, runs in problems.items():
            cands = [t for t in cab_fast._CANDIDATES[kind] if cab_fast._fits(kind, t, bd, False, shared)]
            times = [[cab_fast._time_ms(lambda: run(t)) for run in runs] for t in cands]
            best = [min(col) for col in zip(*times)]
            slow = [math.exp(sum(math.log(x / b) for x, b in zip(row, best)) / len(best)) for row in times]
            i = min(range(len(cands)), key=slow.__getitem__)
            table[(kind, bd, "half")] = found[(kind, bd, "half")] = cands[i]
            yield {"kind": kind, "block_d": bd, "winner": cands[i], "slowdown": slow[i],
                   "all": {str(c): round(s, 3) for c, s in zip(cands, slow)}}
        del problems
        torch.cuda.empty_cache()
    print(f"# {name} (sm{cap[0]}{cap[1]}), {datetime.date.today()}, torch {torch.__version__}, triton "
          f"{triton.__version__}: bench.py --autotune\n{name!r}: {found!r},", flush=True)


# ----------------------------------------------------------------------------------------------------
# End to end: a 16-layer random Llama generating after a long prompt, dense against cab_fast.CabCache

E2E_POLICY, E2E_SPARSITY = "cab", 0.9
GPU_GIB = 81559 / 1024          # an H100 80GB (nvidia-smi: 81559 MiB): the GPU the capacity question is asked of


def _llama(layers=16):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   head_dim=128, max_position_embeddings=65536)
    torch.manual_seed(0)
    with torch.device("cuda"):                          # initialised on the GPU: seconds, not a minute
        return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def _prompt(batch, n):
    return torch.randint(0, 32000, (batch, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))


def _evicting(evict_every=1, budget=None):
    config = ref.EvictionConfig(policy=E2E_POLICY, sparsity=E2E_SPARSITY, budget=budget)
    return cab_fast.CabCache(config, evict_every=evict_every)


def _side(model, impl):
    """(attention implementation, cache factory) of the dense or the evicting side."""
    import transformers
    model.set_attn_implementation("sdpa" if impl == "dense" else "cab_fast")
    return transformers.DynamicCache if impl == "dense" else _evicting


def _synced(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def _prefill(model, ids, cache):
    """The prompt's forward; only the last position's logits (as generate() does). Returns the next token."""
    return model(ids, past_key_values=cache, logits_to_keep=1).logits[:, -1:].argmax(-1)


def _eager_steps_ms(model, cache, token, steps=32, warmup=3):
    """ms per plain model() decode step (no generate() bookkeeping, no sync inside the loop)."""
    def run(token, count):
        for _ in range(count):
            token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
        return token
    token = run(token, warmup)
    seconds, _ = _synced(lambda: run(token, steps))
    return seconds / steps * 1e3


def _graph_steps_ms(model, cache, token, position, replays=20):
    """ms per decode step replayed from a CUDA graph that holds one whole step: forward, cache write,
    attention, eviction, argmax, and the next step's token and position."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                       # warm-up on the capture stream (library handles)
        for _ in range(2):
            token.copy_(model(token, position_ids=position, past_key_values=cache).logits[:, -1:].argmax(-1))
            position.add_(1)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        token.copy_(model(token, position_ids=position, past_key_values=cache).logits[:, -1:].argmax(-1))
        position.add_(1)
    graph.replay()
    seconds, _ = _synced(lambda: [graph.replay() for _ in range(replays)])
    return seconds / replays * 1e3


def _kv_mib(cache):
    if hasattr(cache, "bank") and cache.bank is not None:
        bank = cache.bank
        tensors = [bank.keys, bank.values, bank.scores, bank.positions, bank.valid, bank.free,
                   *bank.evidence.values()]
    else:
        tensors = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return sum(t.numel() * t.element_size() for t in tensors) / 2 ** 20


def e2e_prefill_and_eager(model, n, steps=32):
    """B=1: prefill seconds and eager decode ms per step, dense (SDPA + DynamicCache) vs eviction
    (cab_fast + CabCache, evict_every 1 and 64), each side in the same process on the same prompt."""
    ids = _prompt(1, n)
    rows = {}
    for impl, evict_every in (("dense", None), ("evict", 1), ("evict", 64)):
        make = _side(model, impl)
        new = make if impl == "dense" else (lambda e=evict_every: make(e))
        with torch.no_grad():
            _prefill(model, ids, new())                                   # warm-up: kernels compiled
            torch.cuda.empty_cache()
            times = []
            for _ in range(3):
                cache = new()
                seconds, token = _synced(lambda c=cache: _prefill(model, ids, c))
                times.append(seconds)
            step_ms = _eager_steps_ms(model, cache, token, steps)
        rows[(impl, evict_every)] = {"prefill_s": sorted(times)[1], "step_ms": step_ms, "kv_mib": _kv_mib(cache)}
        del cache
        torch.cuda.empty_cache()
    return rows


def e2e_dense_step_check(model, n, steps=16, top=10):
    """The dense eager step three ways on one DynamicCache: a loop that never syncs (as _eager_steps_ms),
    a loop that syncs after every step (as generate() does), and torch.profiler's top operators by device
    time over 4 unsynchronised steps. The first two revisit KV lengths the B=1 section already decoded; the
    profiled steps reach new ones. SDPA's default decode backend on an H100 (cuDNN, torch 2.11) plans once
    per KV length, about 2.3 ms of host time per layer call: a real generation, whose every step is a new
    length, pays it at every step (the B=1 section's dense row), a rerun over the same lengths does not."""
    from torch.profiler import ProfilerActivity, profile
    make = _side(model, "dense")
    with torch.no_grad():
        cache = make()
        token = _prefill(model, _prompt(1, n), cache)
        free_ms = _eager_steps_ms(model, cache, token, steps)

        def synced_steps(token):
            for _ in range(steps):
                token = model(token, past_key_values=cache).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        seconds, _ = _synced(lambda: synced_steps(token))
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            _eager_steps_ms(model, cache, token, steps=4, warmup=0)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=top)
    cache = None
    torch.cuda.empty_cache()
    return {"no_sync_ms": free_ms, "synced_ms": seconds / steps * 1e3, "profile": table}


def e2e_generate(model, n, new_tokens=33, rounds=3):
    """generate() ms per token, B=1: the time from its first generated token to its last, over new_tokens - 1
    decode steps (each token stamped by a stopping criterion after a synchronise, which generate() does once
    a step anyway; the prompt's forward is outside, so its variance is too). First on KV lengths this process
    has not decoded (a prompt 4 * new_tokens shorter than the other sections'): every first generation's case,
    where SDPA's default decode backend plans once per new KV length; then the median of `rounds` more over
    the same lengths (plans cached: dense's best case)."""
    import transformers

    class Clock(transformers.StoppingCriteria):
        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kwargs):
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    ids = _prompt(1, n - 4 * new_tokens)
    out = {}
    for impl in ("dense", "evict"):
        make = _side(model, impl)

        def per_token_ms():
            clock = Clock()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make(),
                               max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               stopping_criteria=transformers.StoppingCriteriaList([clock]))
            return (clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1) * 1e3
        out[impl] = {"new_lengths_ms": per_token_ms(),
                     "same_lengths_ms": statistics.median(per_token_ms() for _ in range(rounds))}
        torch.cuda.empty_cache()
    return out


def e2e_generate_overhead(model, n, new_tokens=17, top=12):
    """Where dense generate() spends its time per token outside the model: model.forward timed inside
    generate() (synchronised at entry and exit, so nothing of the model's GPU work is left outside), and
    cProfile's top functions by own time outside the forward."""
    import cProfile
    import io
    import pstats
    ids = _prompt(1, n)
    make = _side(model, "dense")
    inside = []
    forward = model.forward

    @functools.wraps(forward)                           # generate() reads the forward's signature
    def timed_forward(*args, **kwargs):
        seconds, out = _synced(lambda: forward(*args, **kwargs))
        inside.append(seconds)
        return out
    model.forward = timed_forward
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=make(), max_new_tokens=2,
                           min_new_tokens=2, do_sample=False)
            inside.clear()
            profile = cProfile.Profile()
            profile.enable()
            total, _ = _synced(lambda: model.generate(ids, attention_mask=torch.ones_like(ids),
                                                      past_key_values=make(), max_new_tokens=new_tokens,
                                                      min_new_tokens=new_tokens, do_sample=False))
            profile.disable()
    finally:
        del model.forward
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(top)
    decode = inside[1:]
    return {"generate_ms_per_token": (total - inside[0]) / (new_tokens - 1) * 1e3,
            "forward_ms_per_token": sum(decode) / len(decode) * 1e3,
            "outside_ms_per_token": (total - sum(inside)) / (new_tokens - 1) * 1e3,
            "profile": text.getvalue()}


def e2e_graphs(model, n, batch=8):
    """B=8, CUDA graphs on both sides: dense SDPA + transformers' StaticCache (prompt + 64 slots) against
    cab_fast + CabCache (evict_every=1); eager steps of the same caches beside them."""
    import transformers
    ids = _prompt(batch, n)
    out = {}
    for impl in ("dense", "evict"):
        _side(model, impl)
        with torch.no_grad():
            cache = (transformers.StaticCache(config=model.config, max_cache_len=n + 64) if impl == "dense"
                     else _evicting(1))
            token = _prefill(model, ids, cache)
            eager_ms = _eager_steps_ms(model, cache, token, steps=8, warmup=2)
            position = torch.full((batch, 1), n + 10, device="cuda")          # 10 tokens were generated
            graph_ms = _graph_steps_ms(model, cache, token.clone(), position)
        out[impl] = {"eager_ms": eager_ms, "graph_ms": graph_ms, "graph_tok_s": batch / graph_ms * 1e3}
        del cache
        torch.cuda.empty_cache()
    return out


def _as_if_cut(cache, n, live):
    """Make a CabCache's slots hold what a prompt of n tokens leaves after a cut: `live` real tokens with
    random keys and values (positions n - live .. n - 1) and the rest free; the next token is position n."""
    bank = cache.bank
    cap = bank.keys.shape[3]
    bank.keys.normal_()
    bank.values.normal_()
    bank.scores.uniform_()
    bank.positions.copy_(torch.arange(n - live, n - live + cap, device="cuda"))
    bank.valid.copy_(torch.arange(cap, device="cuda") < live)
    bank.free[..., :cap - live].copy_(torch.arange(live, cap, device="cuda"))
    bank.cursor.zero_()
    bank.next_position.fill_(n)
    bank.next_slot.copy_(bank.free[..., :1])
    bank.live = live
    for layer in cache.layers:
        layer.seen = n


def _emulated_gpu(gib):
    """Cap this process's allocator so that it and what lies outside it (the CUDA context, library
    workspaces) use at most gib, as on a GPU of that size. Returns the bytes the allocator has left."""
    torch.cuda.empty_cache()
    free, total = torch.cuda.mem_get_info()
    outside = total - free - torch.cuda.memory_reserved()
    limit = min(total, int(gib * 2 ** 30)) - outside
    torch.cuda.set_per_process_memory_fraction(limit / total)
    return limit - torch.cuda.memory_allocated()


def _out_of_memory(error):
    return isinstance(error, torch.OutOfMemoryError) or "ALLOC_FAILED" in str(error)


def _largest_batch(run, batch, step=0.96, tries=12):
    """The largest batch for which run(batch) does not run out of memory: from the memory arithmetic's batch
    down (or up) by 4% until one batch runs and another does not, then bisection between them. Returns the
    row of the largest batch that ran, with it and the smallest that ran out of memory (None if none did)."""
    ran, too_big, row = 0, None, None
    for _ in range(tries):
        try:
            row_now = run(batch)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            too_big = batch
        else:
            ran, row = batch, row_now
        finally:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if too_big is not None and too_big - ran <= 1:
            break
        if not ran:
            batch = max(1, min(batch - 1, int(batch * step)))
        elif too_big is None:
            batch = max(batch + 1, int(batch / step))
        else:
            batch = (ran + too_big) // 2
    if row is None:
        return {"batch": 0, "out_of_memory_at": too_big, "error": f"out of memory down to batch {too_big}"}
    return {**row, "batch": ran, "out_of_memory_at": too_big}


def e2e_capacity(model, n, gpu_gib, new_tokens=16, reserve_gib=(3.0, 6.0), evict_every=64):
    """The largest batch at an n-token prompt that fits a GPU of gpu_gib, dense and with eviction, and the
    tokens/s at each: decode steps on synthetic caches (random keys and values in the state a prompt leaves:
    dense StaticCache of n + new_tokens slots; CabCache slots after a cut), since running that many n-token
    prefills would take minutes. The search starts from memory arithmetic; reserve_gib is its headroom for a
    step's own temporaries (dense; eviction, whose cut ranks up to cab_fast._CUT_ELEMENTS slots at once)."""
    import transformers
    cfg = model.config
    layers, hkv, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    free_gib = _emulated_gpu(gpu_gib) / 2 ** 30
    budget = ref.EvictionConfig(policy=E2E_POLICY, sparsity=E2E_SPARSITY).cache_budget(n)
    dense_seq = layers * hkv * (n + new_tokens) * d * 2 * 2 / 2 ** 30                 # K and V, bf16
    # transformers' SDPA path with a mask (StaticCache) repeats one layer's K and V to the query heads
    dense_seq += cfg.num_attention_heads * (n + new_tokens) * d * 2 * 2 / 2 ** 30
    slots = budget + evict_every
    evict_seq = layers * hkv * slots * (d * 2 * 2 + 4 + 8 + 1 + 8) / 2 ** 30            # K, V, score, position,
    out = {"gpu_gib": gpu_gib, "free_gib": free_gib, "budget": budget}                  # valid, free list

    def dense(batch):
        cache = transformers.StaticCache(config=cfg, max_cache_len=n + new_tokens)
        token = _prefill(model, _prompt(batch, 1), cache)
        for layer in cache.layers:
            layer.keys.normal_()
            layer.values.normal_()
            layer.cumulative_length.fill_(n)
        return {"step_ms": _eager_steps_ms(model, cache, token, steps=4, warmup=1)}

    def evict(batch):
        cache = _evicting(evict_every, budget=budget)
        token = _prefill(model, _prompt(batch, 1), cache)
        for _ in range(2):                                                    # the second one timed
            _as_if_cut(cache, n, slots - 1)                                   # the next step cuts
            seconds, _ = _synced(lambda: model(token, past_key_values=cache))
        row = {"cut_step_ms": seconds * 1e3, "step_ms": _eager_steps_ms(model, cache, token, steps=4, warmup=1)}
        row["amortised_ms"] = (row["cut_step_ms"] + (evict_every - 1) * row["step_ms"]) / evict_every
        return row

    def measured(run, batch):
        with torch.no_grad():
            row = run(batch)
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        row["tok_s"] = batch / row.get("amortised_ms", row["step_ms"]) * 1e3
        return row

    try:
        for impl, run, per_seq, reserve in (("dense", dense, dense_seq, reserve_gib[0]),
                                            ("evict", evict, evict_seq, reserve_gib[1])):
            _side(model, impl)
            out[impl] = {"per_seq_mib": per_seq * 1024,
                         **_largest_batch(functools.partial(measured, run), int((free_gib - reserve) // per_seq))}
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    return out


def _recorded(measure, model, n, **kw):
    """measure(model, n, **kw), also kept as a row named after the function (for --json)."""
    result = measure(model, n, **kw)
    _row(measure.__name__, **result)
    return result


def bench_end_to_end(n=32768, layers=16, say=print, capacity=True, gpu_gib=GPU_GIB):
    """Every end-to-end figure, dense beside eviction, in one process (rows also go to ROWS for --json)."""
    model = _llama(layers)
    say(f"\nend to end: random Llama ({layers} layers, hidden 2048, 16/4 heads, D=128, bf16), {n}-token prompt, "
        f"eviction = cab_fast.CabCache({E2E_POLICY}, sparsity {E2E_SPARSITY})")
    r = e2e_prefill_and_eager(model, n)
    _row("e2e_b1", **{f"{k[0]}_{k[1]}": v for k, v in r.items()})
    dense = r[("dense", None)]
    say(f"{'B=1, eager':<34} {'prefill s':>9} {'x dense':>8} {'step ms':>8} {'x dense':>8} {'KV MiB':>8}")
    for (impl, e), v in r.items():
        label = "dense SDPA + DynamicCache" if impl == "dense" else f"eviction, evict_every={e}"   # new lengths
        say(f"{label:<34} {v['prefill_s']:>9.3f} {v['prefill_s'] / dense['prefill_s']:>8.2f} {v['step_ms']:>8.2f} "
            f"{v['step_ms'] / dense['step_ms']:>8.2f} {v['kv_mib']:>8.1f}", flush=True)
    c = _recorded(e2e_dense_step_check, model, n)
    say(f"dense eager step again over KV lengths already seen (SDPA's cuDNN plans cached): no sync "
        f"{c['no_sync_ms']:.2f} ms, synced every step {c['synced_ms']:.2f} ms; profiler over 4 steps at new "
        f"lengths:\n{c['profile']}", flush=True)
    g = _recorded(e2e_generate, model, n)
    say("generate() ms/token, B=1, first token to last: " + "; ".join(
        f"{label} dense {g['dense'][key]:.2f}, eviction {g['evict'][key]:.2f} "
        f"({g['evict'][key] / g['dense'][key]:.2f}x)"
        for label, key in (("new KV lengths", "new_lengths_ms"), ("the same lengths again", "same_lengths_ms"))),
        flush=True)
    o = _recorded(e2e_generate_overhead, model, n)
    say(f"dense generate() per token: {o['generate_ms_per_token']:.2f} ms, of which model.forward "
        f"{o['forward_ms_per_token']:.2f} ms and outside it {o['outside_ms_per_token']:.2f} ms "
        f"(forward synchronised at entry and exit); cProfile of the whole generate() by own time:\n"
        f"{o['profile']}", flush=True)
    gr = _recorded(e2e_graphs, model, n)
    say(f"{'B=8':<34} {'eager ms':>9} {'graph ms':>9} {'tok/s':>9}")
    for impl, v in gr.items():
        label = "dense SDPA + StaticCache" if impl == "dense" else "eviction, evict_every=1"
        say(f"{label:<34} {v['eager_ms']:>9.2f} {v['graph_ms']:>9.2f} {v['graph_tok_s']:>9.0f}")
    say(f"graph tokens/s, eviction / dense: {gr['evict']['graph_tok_s'] / gr['dense']['graph_tok_s']:.2f}x",
        flush=True)
    if not capacity:
        return
    c = _recorded(e2e_capacity, model, n, gpu_gib=gpu_gib)
    say(f"capacity at {n} tokens on a {c['gpu_gib']:.1f} GiB GPU: {c['free_gib']:.1f} GiB free after the weights; "
        f"budget {c['budget']} per layer and KV head; decode steps on synthetic caches at the largest batch that "
        f"ran (see e2e_capacity)")
    for impl, v in ((k, c[k]) for k in ("dense", "evict")):
        label = "dense StaticCache" if impl == "dense" else "eviction, evict_every=64"
        oom = f" (out of memory at {v['out_of_memory_at']})" if v["out_of_memory_at"] else ""
        say(f"{label:<26} {v['per_seq_mib']:>8.1f} MiB/seq  batch {v['batch']:>5}{oom}  " +
            (v["error"] if "error" in v else
             f"step {v['step_ms']:.2f} ms" + (f" (cut step {v['cut_step_ms']:.2f} ms, amortised "
                                                f"{v['amortised_ms']:.2f} ms)" if "amortised_ms" in v else "")
             + f"  {v['tok_s']:.0f} tok/s  peak {v['peak_gib']:.1f} GiB"), flush=True)


# ----------------------------------------------------------------------------------------------------
# What each policy's evidence costs: prefill through the end-to-end model with cab_fast.CabCache(policy)

EVIDENCE_POLICIES = ("h2o", "snapkv", "cab", "bidirectional", "question_aware", "match_span", "sentence_match",
                     "fact_slots", "title_links")
# The random prompts' token texts, for title_links: random words, a line break and a blank line each about
# every 50 tokens, so 32k tokens hold about 600 paragraphs, a few hundred of them titled and named elsewhere.
TEXTS = tuple("\n\n" if i % 50 == 0 else "\n" if i % 50 == 1 else f" w{i % 997}" for i in range(32000))


def _config(name):
    """EvictionConfig(name) at 90% sparsity, given the random prompts' token texts where it reads them."""
    fields = {f.name for f in dataclasses.fields(ref.POLICY_TYPES[name])}
    return ref.EvictionConfig(policy=ref.make_policy(name, **({"vocab": TEXTS} if "vocab" in fields else {})),
                              sparsity=0.9)


@torch.no_grad()
def bench_policy_overhead(lengths=(4096, 32768), layers=16, question=24):
    """Prefill seconds with each policy's cache (its evidence and the prompt cut included) against dense
    SDPA and against h2o (scores only, no evidence). The question is the prompt's last `question` tokens;
    the prompt's token ids go to the cache (SentenceMatch reads sentence ends from them). Given the question,
    match_span and sentence_match do not rank by scores and skip the score pass (bench_scoreless). Connectivity
    / curvature bridges are left out: they build the N x N attention graph by definition."""
    import transformers
    model = _llama(layers)
    for n in lengths:
        ids = _prompt(1, n)
        model.set_attn_implementation("sdpa")
        dense = min(_synced(lambda: _prefill(model, ids, transformers.DynamicCache()))[0] for _ in range(2))
        model.set_attn_implementation("cab_fast")
        row = {"n": n, "dense_s": dense}
        for name in (p for p in EVIDENCE_POLICIES if p in ref.POLICY_TYPES):
            def cut():
                cache = cab_fast.CabCache(_config(name), question_span=(n - question, n), token_ids=ids[0])
                return _prefill(model, ids, cache)
            row[name] = min(_synced(cut)[0] for _ in range(2))
        torch.cuda.empty_cache()
        yield row


SCORELESS_POLICIES = ("streaming", "match_span", "sentence_match", "title_links")   # with a question: no score pass


@torch.no_grad()
def bench_scoreless(n, layers=16, question=24, steps=32, rounds=3):
    """B=1, sparsity 0.9: prefill seconds and eager decode ms per step with the caches whose policy does not
    rank by scores (cab_fast skips the score pass: SDPA's forward for the prompt, decode kernels without
    scores), h2o's (scores) beside them, against dense SDPA + DynamicCache. The question is the prompt's last
    `question` tokens; the token ids go to the cache. Each side runs `rounds` times on fresh caches over the
    same prompt: prefill is the fastest round, the step the last round's, which for dense revisits the KV
    lengths of the rounds before (SDPA's cuDNN plans cached: dense at its best, see e2e_dense_step_check).
    Targets: a scoreless prefill <= 1.05x dense, its step <= dense's."""
    import transformers
    model = _llama(layers)
    ids = _prompt(1, n)

    def measured(make):
        prefill, step_ms = [], None
        for _ in range(rounds):
            cache = make()
            seconds, token = _synced(lambda c=cache: _prefill(model, ids, c))
            prefill.append(seconds)
            step_ms = _eager_steps_ms(model, cache, token, steps)
            del cache
            torch.cuda.empty_cache()
        return {"prefill_s": min(prefill), "step_ms": step_ms}

    model.set_attn_implementation("sdpa")
    rows = {"dense": measured(transformers.DynamicCache)}
    model.set_attn_implementation("cab_fast")
    for name in (*SCORELESS_POLICIES, "h2o"):
        config = _config(name)
        rows[name] = measured(lambda: cab_fast.CabCache(config, question_span=(n - question, n), token_ids=ids[0]))
        rows[name]["reads_scores"] = config.policy.ranks_by_scores(True, True)    # given a question and token ids
    return rows


def _f(x, fmt="{:8.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else f"{'-':>8}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke run")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: overhead,first,prefill,decode,e2e,capacity,policies,"
                         "scoreless")
    ap.add_argument("--autotune", action="store_true",
                    help="sweep cab_fast's candidate tiles first, print the winning table and use it in this run "
                         "(CAB_AUTOTUNE=1 in the environment instead tunes every shape class on its first call)")
    ap.add_argument("--gpu-gib", type=float, default=GPU_GIB,
                    help="the GPU memory the capacity section may use, GiB (default: an H100 80GB's; a larger GPU "
                         "is capped to it, a smaller one uses all it has)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (cab_fast's kernels); tests run on CPU, benchmarks do not")
    global cab_fast
    import cab_fast
    head = _header()
    say = (lambda *a, **k: None) if args.json else print
    say(" | ".join(f"{k} {v}" for k, v in head.items()))
    skip = set(args.skip.split(","))
    if args.autotune:
        say("\ntile sweep (bf16, causal): geometric-mean slowdown of each candidate against the best per size")
        for r in sweep_tiles():
            say(f"{r['kind']:>6} D{r['block_d']:<4} winner {r['winner']} ({r['slowdown']:.3f})  {r['all']}", flush=True)
    if "overhead" not in skip:
        say("\nhost time per call, tiny problems (B=1, Hq=8, Hkv=2, D=128, bf16), us; loop without sync; "
            "growing: Nk + 1 every call (a new shape each time)")
        say(f"{'call':>8} {'Nq':>4} {'Nk':>5} {'sdpa':>7} {'fast':>7} {'ratio':>6} {'fast+val':>8}")
        for r in bench_overhead():
            say(f"{r['call']:>8} {r['nq']:>4} {r['nk']:>5} {r['sdpa_us']:>7.1f} {r['fast_us']:>7.1f} "
                f"{r['ratio']:>6.2f} {r['fast_validate_us']:>8.1f}", flush=True)
    if "first" not in skip:
        say("\nfirst calls in a fresh process, s (bf16, D=128, GQA 32/8; CUDA initialised before each call)")
        for r in bench_first_call():
            say(f"{r['cache']:>5} Triton cache: " + ", ".join(f"{k[:-2]} {v:.3f}" for k, v in r.items()
                                                              if k.endswith("_s")), flush=True)
    if "prefill" not in skip:
        lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
        say("\nprefill, B=1, Hq=32, D=128, bf16, causal; ms (median); ratio = cab_fast / SDPA default backend")
        say(f"{'N':>6} {'Hkv':>4} {'sdpa':>8} {'sdpa-fl':>8} {'fast':>8} {'ratio':>6} {'TFLOP/s':>8} "
            f"{'fast+val':>8} {'tri-fwd':>8} {'scores':>8} {'ref':>8} {'ref GiB':>8} {'extraMiB':>8}  tiles")
        for r in bench_prefill(lengths):
            say(f"{r['n']:>6} {r['hkv']:>4} {_f(r['sdpa_ms'])} {_f(r['sdpa_flash_ms'])} {_f(r['fast_ms'])} "
                f"{_f(r['ratio_vs_sdpa'], '{:6.2f}')} {_f(r['fast_tflops'], '{:8.1f}')} "
                f"{_f(r['fast_validate_ms'])} {_f(r['fast_triton_fwd_ms'])} {_f(r['score_pass_ms'])} "
                f"{_f(r['reference_ms'])} {_f(r.get('reference_peak_gib'), '{:8.2f}')} "
                f"{_f(r['score_pass_extra_mib'], '{:8.2f}')}  {r['tiles']}", flush=True)
    if "decode" not in skip:
        lengths = [4096, 32768] if args.quick else [4096, 16384, 32768, 65536, 131072]
        say("\ndecode, 1 query, B=1, Hq=32, D=128, bf16; ms (median); TB/s = K+V bytes / graph-replay time")
        say(f"{'Nk':>7} {'Hkv':>4} {'sdpa':>8} {'fast':>8} {'ratio':>6} {'fast+val':>8} {'TB/s':>6} "
            f"{'sdpaTB/s':>8} {'sdpa-gr':>8} {'fast-gr':>8} {'gr-ratio':>8}  tile   (gr = CUDA-graph replay)")
        for r in bench_decode(lengths):
            say(f"{r['n']:>7} {r['hkv']:>4} {_f(r['sdpa_ms'])} {_f(r['fast_ms'])} {_f(r['ratio_vs_sdpa'], '{:6.2f}')} "
                f"{_f(r['fast_validate_ms'])} {_f(r['fast_tb_s'], '{:6.2f}')} {_f(r['sdpa_tb_s'], '{:8.2f}')} "
                f"{_f(r['sdpa_graph_ms'])} {_f(r['fast_graph_ms'])} {_f(r['graph_ratio'], '{:8.2f}')}  "
                f"{r['tile']}", flush=True)
    if "e2e" not in skip:
        bench_end_to_end(n=16384 if args.quick else 32768, say=say, capacity="capacity" not in skip,
                         gpu_gib=args.gpu_gib)
    if "policies" not in skip:
        say("\nprefill with each policy's evidence and cut (end-to-end model, B=1, 90%, question = last 24 tokens), "
            "s; (x h2o) = over the scores-only policy")
        for r in bench_policy_overhead((4096,) if args.quick else (4096, 32768)):
            _row("policy_overhead", **r)
            say(f"N={r['n']:>6}  dense {r['dense_s']:.3f}  " + "  ".join(
                f"{k} {v:.3f} ({v / r['h2o']:.2f})" for k, v in r.items() if k not in ("n", "dense_s")), flush=True)
    if "scoreless" not in skip:
        n = 4096 if args.quick else 32768
        say(f"\ncaches whose policy does not rank by scores (no score pass), B=1, N={n}, 90%, question = last 24 "
            f"tokens; dense's eager step at its best (KV lengths already seen); targets: prefill <= 1.05x, step "
            f"<= 1.00x dense")
        rows = bench_scoreless(n)
        _row("scoreless", n=n, **rows)
        dense = rows["dense"]
        say(f"{'cache':<16} {'scores':>6} {'prefill s':>9} {'x dense':>8} {'step ms':>8} {'x dense':>8}")
        for name, r in rows.items():
            reads = "-" if name == "dense" else ("yes" if r["reads_scores"] else "no")
            say(f"{name:<16} {reads:>6} {r['prefill_s']:>9.3f} {r['prefill_s'] / dense['prefill_s']:>8.2f} "
                f"{r['step_ms']:>8.2f} {r['step_ms'] / dense['step_ms']:>8.2f}", flush=True)
    if args.json:
        print(json.dumps({"header": head, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
