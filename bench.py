"""Benchmarks for cab_fast on a CUDA GPU: every figure measured side by side in the same run.

    python bench.py            # table
    python bench.py --json     # the same rows as JSON (one object) on stdout
    python bench.py --quick    # fewer sizes (a smoke run)
    python bench.py --autotune # first time every candidate tile of cab_fast's kernels at the bench sizes,
                               # print the winners as a tile table (for cab_fast._TILES) and use them here

Times are medians of triton.testing.do_bench (CUDA events, warm-up first). Correctness lives in
test_equivalence.py; this file only checks that the fast path's outputs are finite before timing.
"""

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import cab_reference as ref

cab_fast = None          # imported in main(), after --autotune has set CAB_AUTOTUNE

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


def _header():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or os.environ.get("CAB_COMMIT", "?")      # the device copy has no .git: pass it in
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
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != heads)   # noqa: E731
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


def _host_us(fn, calls=2000):
    """Host microseconds per call of fn in a loop without synchronisation: on a tiny problem the GPU
    keeps up, so this is the Python + launch cost a caller pays."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def bench_overhead(d=128):
    """Per-call host overhead on tiny problems (B=1, Hq=8, Hkv=2), cab_fast against SDPA."""
    for label, nq, nk in (("decode", 1, 64), ("decode", 1, 4096), ("prefill", 64, 64)):
        q, k, v = _qkv(nq, nk, 8, 2, d, seed=nk)
        r = {"call": label, "nq": nq, "nk": nk}
        r["sdpa_us"] = _host_us(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
        r["fast_us"] = _host_us(lambda: cab_fast.attention(q, k, v))
        r["fast_validate_us"] = _host_us(lambda: cab_fast.attention(q, k, v, validate=True), calls=200)
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
                                 timeout=300)
            if res.returncode:
                raise RuntimeError(f"first-call subprocess failed:\n{res.stderr[-2000:]}")
            r = _row("first_call", cache=label, **json.loads(res.stdout.strip().splitlines()[-1]))
            yield r


def sweep_tiles(d_list=(64, 128)):
    """Time every candidate tile of each kernel at the bench sizes (bf16, causal, GQA 32/8 and MHA) and
    install the winners (least geometric-mean slowdown against the best candidate per size) in
    cab_fast._TILES for the rest of this run. Returns the table entries to paste into cab_fast.py."""
    cap = torch.cuda.get_device_capability()
    table = cab_fast._TILES.setdefault(cap, {})
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
            cands = [t for t in cab_fast._CANDIDATES[kind] if cab_fast._fits(kind, t, bd, False)]
            times = [[cab_fast._time_ms(lambda: run(t)) for run in runs] for t in cands]
            best = [min(col) for col in zip(*times)]
            slow = [math.exp(sum(math.log(x / b) for x, b in zip(row, best)) / len(best)) for row in times]
            i = min(range(len(cands)), key=slow.__getitem__)
            table[(kind, bd, "half")] = found[(kind, bd, "half")] = cands[i]
            yield {"kind": kind, "block_d": bd, "winner": cands[i], "slowdown": slow[i],
                   "all": {str(c): round(s, 3) for c, s in zip(cands, slow)}}
        del problems
        torch.cuda.empty_cache()
    print(f"# {torch.cuda.get_device_name(0)} (sm{cap[0]}{cap[1]}), {datetime.date.today()}, torch "
          f"{torch.__version__}, triton {triton.__version__}: bench.py --autotune\n{cap}: {found!r},", flush=True)


def _cache(pol, evict_every):
    import transformers
    return (transformers.DynamicCache() if pol is None
            else ref.CabCache(ref.EvictionConfig(policy=pol, sparsity=0.9, evict_every=evict_every)))


def _decode_steps(model, ids, pol, evict_every, steps):
    """ms per decode step of plain model(...) calls after a prefill: no generate() bookkeeping."""
    cache = _cache(pol, evict_every)
    with torch.no_grad():
        tok = model(ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        for i in range(steps + 3):
            if i == 3:                                                        # 3 warm-up steps
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps * 1e3


def bench_end_to_end(prompts, new_tokens=128, layers=16, policy="cab"):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                   num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                                   head_dim=128, max_position_embeddings=65536)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
    runs = [("sdpa", None, 1, "dense SDPA + DynamicCache"),
            ("cab_fast", policy, 1, f"cab_fast + CabCache({policy}, 90%)"),
            ("cab_fast", policy, 64, f"cab_fast + CabCache({policy}, 90%, evict_every=64)")]
    for n in prompts:
        ids = torch.randint(0, 32000, (1, n), device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
        for impl, pol, evict_every, label in runs:
            model.set_attn_implementation(impl)

            def gen(t):
                cache = _cache(pol, evict_every)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                with torch.no_grad():
                    model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                   max_new_tokens=t, min_new_tokens=t, do_sample=False)
                torch.cuda.synchronize()
                return time.perf_counter() - t0, cache
            gen(2)                                                            # warm-up: compile, autotune
            t1, _ = gen(1)
            tn, cache = gen(new_tokens)
            kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
            del cache
            step_ms = _decode_steps(model, ids, pol, evict_every, steps=32)
            r = _row("end_to_end", prompt=n, impl=label, layers=layers, new_tokens=new_tokens,
                     prefill_s=t1, ms_per_token=(tn - t1) / (new_tokens - 1) * 1e3, kv_cache_mib=kv / 2 ** 20,
                     forward_step_ms=step_ms)
            torch.cuda.empty_cache()
            yield r


def _f(x, fmt="{:8.3f}"):
    return fmt.format(x) if isinstance(x, (int, float)) else f"{'-':>8}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ap.add_argument("--quick", action="store_true", help="fewer sizes, for a smoke run")
    ap.add_argument("--skip", default="",
                    help="comma list of sections to skip: overhead,first,prefill,decode,e2e")
    ap.add_argument("--autotune", action="store_true",
                    help="sweep cab_fast's candidate tiles first, print the winning table and use it in this run "
                         "(and CAB_AUTOTUNE=1: any other shape class is tuned on its first call)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (cab_fast's kernels); tests run on CPU, benchmarks do not")
    global cab_fast
    if args.autotune:
        os.environ["CAB_AUTOTUNE"] = "1"
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
        say("\nhost time per call, tiny problems (B=1, Hq=8, Hkv=2, D=128, bf16), us; loop without sync")
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
        prompts = [16384] if args.quick else [16384, 32768]
        say("\nend to end: random Llama (16 layers, hidden 2048, 16/4 heads, D=128, bf16), B=1, greedy, "
            "128 new tokens")
        say(f"{'prompt':>7} {'implementation':<36} {'prefill s':>9} {'ms/token':>9} {'step ms':>9} {'KV MiB':>9}"
            "   (ms/token: generate(); step ms: plain model() decode steps)")
        for r in bench_end_to_end(prompts, new_tokens=32 if args.quick else 128):
            say(f"{r['prompt']:>7} {r['impl']:<36} {r['prefill_s']:>9.3f} {r['ms_per_token']:>9.2f} "
                f"{r['forward_step_ms']:>9.2f} {r['kv_cache_mib']:>9.1f}", flush=True)
    if args.json:
        print(json.dumps({"header": head, "rows": ROWS}, indent=1))


if __name__ == "__main__":
    main()
