"""Benchmarks for cab_fast on a CUDA GPU: every figure measured side by side in the same run.

    python bench.py            # table
    python bench.py --json     # the same rows as JSON (one object) on stdout
    python bench.py --quick    # fewer sizes (a smoke run)

Times are medians of triton.testing.do_bench (CUDA events, warm-up first). Correctness lives in
test_equivalence.py; this file only checks that the fast path's outputs are finite before timing.
"""

import argparse
import datetime
import json
import os
import math
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

import cab_fast
import cab_reference as ref

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


def _best(kernel):
    cfg = getattr(kernel, "best_config", None)
    if cfg is None:
        return "-"
    kw = cfg.kwargs
    return "/".join(str(kw[k]) for k in ("BLOCK_M", "BLOCK_N") if k in kw) + f" w{cfg.num_warps} s{cfg.num_stages}"


def bench_prefill(lengths, heads=32, d=128):
    from torch.nn.attention import SDPBackend
    flash = _sdpa(SDPBackend.FLASH_ATTENTION)
    cudnn = _sdpa(SDPBackend.CUDNN_ATTENTION)
    for hkv in (heads, heads // 4):
        for n in lengths:
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            flops = 4 * heads * n * n * d / 2                                   # causal: half of QK^T and PV
            r = {"n": n, "hq": heads, "hkv": hkv, "d": d}
            try:
                r["sdpa_flash_ms"] = _ms(lambda: flash(q, k, v, True))
            except RuntimeError as e:                                          # e.g. no GQA in this backend
                r["sdpa_flash_ms"] = None
                r["sdpa_flash_error"] = str(e)[:80]
            try:
                r["sdpa_cudnn_ms"] = _ms(lambda: cudnn(q, k, v, True))
            except RuntimeError:
                r["sdpa_cudnn_ms"] = None
            out, sc = cab_fast.attention(q, k, v, validate=False)
            assert torch.isfinite(sc).all() and torch.isfinite(out).all()
            r["fast_ms"] = _ms(lambda: cab_fast.attention(q, k, v, validate=False))
            r["fast_validate_ms"] = _ms(lambda: cab_fast.attention(q, k, v))
            r["fast_triton_fwd_ms"] = _ms(lambda: cab_fast._attention(q, k, v, validate=False, route="prefill"))
            r["fwd_config"] = _best(cab_fast._fwd_kernel)
            scale = 1 / math.sqrt(d)
            _, lse = cab_fast._fwd_triton(q, k, v, None, scale * cab_fast._LOG2E, True)
            r["triton_fwd_only_ms"] = _ms(lambda: cab_fast._fwd_triton(q, k, v, None, scale * cab_fast._LOG2E, True))
            r["score_pass_ms"] = _ms(lambda: cab_fast._scores_triton(q, k, None, lse, scale * cab_fast._LOG2E, True))
            r["score_config"] = _best(cab_fast._score_kernel)
            try:                                                               # vendor forward + score pass
                r["fast_cudnn_fwd_ms"] = _ms(lambda: cab_fast._attention(q, k, v, validate=False, route="cudnn"))
            except RuntimeError:
                r["fast_cudnn_fwd_ms"] = None
            base = r["sdpa_flash_ms"] or r["sdpa_cudnn_ms"]
            r["ratio_vs_sdpa_flash"] = r["fast_ms"] / base if base else None
            r["fast_tflops"] = flops / r["fast_ms"] / 1e9
            r["sdpa_flash_tflops"] = flops / base / 1e9 if base else None
            # peak extra memory of the score pass (beyond q, k, v, out, lse)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            sc = cab_fast._scores_triton(q, k, None, lse, scale * cab_fast._LOG2E, True)
            torch.cuda.synchronize()
            r["score_pass_extra_mib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 20
            r["scores_bytes_theory_mib"] = 4 * hkv * n / 2 ** 20
            del sc
            if n <= 4096:                                                      # eager: N^2 memory beyond
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                r["reference_ms"] = _ms(lambda: ref.attention(q, k, v, validate=False), rep=20)
                r["reference_peak_gib"] = (torch.cuda.max_memory_allocated() - before) / 2 ** 30
            else:
                r["reference_ms"] = None
            _row("prefill", **r)
            del q, k, v, out, lse
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
            g = torch.Generator(device="cuda").manual_seed(n)
            q = torch.randn(1, heads, 1, d, device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16, generator=g)
            r = {"n": n, "hq": heads, "hkv": hkv, "d": d}
            r["sdpa_ms"] = _ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=hkv != heads))
            out, sc = cab_fast.attention(q, k, v, validate=False)
            assert torch.isfinite(sc).all() and torch.isfinite(out).all()
            r["fast_ms"] = _ms(lambda: cab_fast.attention(q, k, v, validate=False))
            r["fast_validate_ms"] = _ms(lambda: cab_fast.attention(q, k, v))
            r["decode_config"] = _best(cab_fast._decode_partial_kernel)
            # GPU time alone (CUDA-graph replay, as a serving loop runs decode): no Python launch overhead
            r["fast_graph_ms"] = _ms(_graphed(lambda: cab_fast.attention(q, k, v, validate=False)))
            r["sdpa_graph_ms"] = _ms(_graphed(lambda: F.scaled_dot_product_attention(q, k, v,
                                                                                     enable_gqa=hkv != heads)))
            r["graph_ratio"] = r["fast_graph_ms"] / r["sdpa_graph_ms"]
            r["ratio_vs_sdpa"] = r["fast_ms"] / r["sdpa_ms"]
            kv_bytes = 2 * k.numel() * k.element_size()
            r["fast_tb_s"] = kv_bytes / r["fast_ms"] / 1e9
            r["sdpa_tb_s"] = kv_bytes / r["sdpa_ms"] / 1e9
            _row("decode", **r)
            del q, k, v
            torch.cuda.empty_cache()
            yield r


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
    ap.add_argument("--skip", default="", help="comma list of sections to skip: prefill,decode,e2e")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench.py needs a CUDA GPU (cab_fast's kernels); tests run on CPU, benchmarks do not")
    head = _header()
    say = (lambda *a, **k: None) if args.json else print
    say(" | ".join(f"{k} {v}" for k, v in head.items()))
    skip = set(args.skip.split(","))
    if "prefill" not in skip:
        lengths = [1024, 4096] if args.quick else [1024, 4096, 16384, 32768]
        say("\nprefill, B=1, Hq=32, D=128, bf16, causal; times in ms (median); ratio = cab_fast / SDPA-flash")
        say(f"{'N':>6} {'Hkv':>4} {'sdpa-fl':>8} {'sdpa-cdn':>8} {'fast':>8} {'ratio':>6} {'TFLOP/s':>8} "
            f"{'fast+val':>8} {'tri-fwd':>8} {'cdn-fwd':>8} {'fwd only':>8} {'scores':>8} {'ref':>8} "
            f"{'ref GiB':>8} {'extraMiB':>8}  configs fwd | score")
        for r in bench_prefill(lengths):
            say(f"{r['n']:>6} {r['hkv']:>4} {_f(r['sdpa_flash_ms'])} {_f(r['sdpa_cudnn_ms'])} {_f(r['fast_ms'])} "
                f"{_f(r['ratio_vs_sdpa_flash'], '{:6.2f}')} {_f(r['fast_tflops'], '{:8.1f}')} "
                f"{_f(r['fast_validate_ms'])} {_f(r['fast_triton_fwd_ms'])} {_f(r.get('fast_cudnn_fwd_ms'))} "
                f"{_f(r['triton_fwd_only_ms'])} {_f(r['score_pass_ms'])} {_f(r['reference_ms'])} "
                f"{_f(r.get('reference_peak_gib'), '{:8.2f}')} {_f(r['score_pass_extra_mib'], '{:8.2f}')}  "
                f"{r['fwd_config']} | {r['score_config']}", flush=True)
    if "decode" not in skip:
        lengths = [4096, 32768] if args.quick else [4096, 16384, 32768, 65536, 131072]
        say("\ndecode, 1 query, B=1, Hq=32, D=128, bf16; ms (median); TB/s = K+V bytes / time")
        say(f"{'Nk':>7} {'Hkv':>4} {'sdpa':>8} {'fast':>8} {'ratio':>6} {'fast+val':>8} {'TB/s':>6} "
            f"{'sdpaTB/s':>8} {'sdpa-gr':>8} {'fast-gr':>8} {'gr-ratio':>8}  config   (gr = CUDA-graph replay)")
        for r in bench_decode(lengths):
            say(f"{r['n']:>7} {r['hkv']:>4} {_f(r['sdpa_ms'])} {_f(r['fast_ms'])} {_f(r['ratio_vs_sdpa'], '{:6.2f}')} "
                f"{_f(r['fast_validate_ms'])} {_f(r['fast_tb_s'], '{:6.2f}')} {_f(r['sdpa_tb_s'], '{:8.2f}')} "
                f"{_f(r['sdpa_graph_ms'])} {_f(r['fast_graph_ms'])} {_f(r['graph_ratio'], '{:8.2f}')}  "
                f"{r['decode_config']}", flush=True)
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
