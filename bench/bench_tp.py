"""Tokens/s and KV-cache memory per GPU: one GPU vs two (tensor parallel), dense vs 90% eviction.

    torchrun --nproc-per-node 2 bench/bench_tp.py            (--prompt 32768 --steps 32 --layers 8 --json)

A random Llama-shaped model in bf16 (bench.py's end-to-end shape: hidden 2048, 16 query heads and 4 KV
heads of dim 128, vocab 32000) is saved once, loaded whole on GPU 0 (rank 0 alone; the other ranks
wait), then with tp_plan="auto" on every rank. Each runs the prompt once (prefill) and `steps` timed
greedy decode steps (plain forward calls after 3 warm-ups, as bench.py's forward_step_ms), with
  dense              SDPA + the library's DynamicCache
  cab 90% per-head   cab_fast attention + cab_fast.CabCache, sparsity 0.9: no communication of ours
  cab 90% per-layer  the same, per_head=False: an all-reduce of the head-summed scores at every cut
Reported: prefill seconds, decode tokens/s, and per GPU (the largest over the ranks) the KV cache it
holds (the cache's key and value tensors) and the peak memory allocated during the run beyond the
weights. Exits 0 with a message on fewer than two GPUs. --smoke runs the script itself on CPU processes
over gloo (tiny model, cab_reference attention and cache; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
import cab_reference as ref  # noqa: E402
from tp_check import join_ranks, shared_temp_dir  # noqa: E402

VOCAB = 32000


def configs(smoke=False):
    """(label, attn_implementation, cache factory or None for the library's DynamicCache)."""
    if smoke:
        impl, cache_type = "cab_reference", ref.CabCache
    else:
        import cab_fast
        impl, cache_type = "cab_fast", getattr(cab_fast, "CabCache", ref.CabCache)
    return [("dense", "sdpa", None),
            ("cab 90% per-head", impl, lambda: cache_type(ref.EvictionConfig("cab", sparsity=0.9))),
            ("cab 90% per-layer", impl, lambda: cache_type(ref.EvictionConfig("cab", sparsity=0.9, per_head=False)))]


def save_random_model(path, layers, prompt, device, hidden=2048):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                         head_dim=hidden // 16, max_position_embeddings=prompt + 1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    del model


def load(path, impl, tensor_parallel, device):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # 5.24 prefers DistributedConfig(tp_plan=...)
        if tensor_parallel:
            return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation=impl,
                                                        dtype=torch.bfloat16).eval()
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl,
                                                    dtype=torch.bfloat16).to(device).eval()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device, peak=False):
    if device.type != "cuda":
        return 0
    return torch.cuda.max_memory_allocated(device) if peak else torch.cuda.memory_allocated(device)


def kv_bytes(cache):
    """Bytes of key and value tensors this rank's cache holds (views of a slot bank count their slots)."""
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def measure(model, ids, make_cache, steps, device):
    from transformers import DynamicCache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = allocated(device)
    cache = DynamicCache() if make_cache is None else make_cache()
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        tok = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
        sync(device)
        prefill = time.perf_counter() - t0
        for i in range(steps + 3):
            if i == 3:                                                        # 3 warm-up steps
                sync(device)
                t0 = time.perf_counter()
            tok = model(tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        sync(device)
    step = (time.perf_counter() - t0) / steps
    result = {"prefill_s": prefill, "tokens_per_s": 1.0 / step, "kv_cache_mib": kv_bytes(cache) / 2 ** 20,
              "peak_mib": (allocated(device, peak=True) - base) / 2 ** 20}
    del cache
    return result


def run(path, ids, steps, device, tensor_parallel, rank, smoke):
    """Every configuration on one GPU (rank 0 only) or tensor parallel (every rank): {label: result}."""
    results = {}
    if tensor_parallel or rank == 0:
        model = None
        for label, impl, make_cache in configs(smoke):
            if model is None:
                model = load(path, impl, tensor_parallel, device)
            model.set_attn_implementation(impl)
            measure(model, ids, make_cache, 2, device)                       # compile the kernels, warm up
            results[label] = measure(model, ids, make_cache, steps, device)
        del model
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    return everyone


def summarise(label, gpus, per_rank):
    """One row: speed from rank 0, memory the largest over the ranks that ran."""
    ran = [r[label] for r in per_rank if label in r]
    return {"config": label, "gpus": gpus, "prefill_s": ran[0]["prefill_s"], "tokens_per_s": ran[0]["tokens_per_s"],
            "kv_cache_mib_per_gpu": max(r["kv_cache_mib"] for r in ran),
            "peak_mib_per_gpu": max(r["peak_mib"] for r in ran)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")
    ap.add_argument("--smoke", action="store_true", help="CPU processes over gloo, tiny model: checks the script")
    args = ap.parse_args()
    device = join_ranks("bench_tp", args.smoke)
    if device is None:
        return 0
    rank, world = dist.get_rank(), dist.get_world_size()
    path = shared_temp_dir(rank, prefix="bench_tp_")
    if rank == 0:
        save_random_model(path, args.layers, args.prompt, device, hidden=128 if args.smoke else 2048)
    dist.barrier()
    ids = torch.randint(0, VOCAB, (1, args.prompt), generator=torch.Generator().manual_seed(1)).to(device)
    one = run(path, ids, args.steps, device, False, rank, args.smoke)
    two = run(path, ids, args.steps, device, True, rank, args.smoke)
    if rank == 0:
        rows = [summarise(label, 1, one) for label, _, _ in configs(args.smoke)]
        rows += [summarise(label, world, two) for label, _, _ in configs(args.smoke)]
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke)"
        print(f"# {name} x{world}, {datetime.date.today()}, torch {torch.__version__}: "
              f"bench_tp.py, prompt {args.prompt}, {args.layers} layers, {args.steps} decode steps")
        if args.json:
            for row in rows:
                print(json.dumps(row))
        else:
            print(f"{'config':<20} {'GPUs':>4} {'prefill s':>10} {'tokens/s':>10} {'KV MiB/GPU':>11} "
                  f"{'peak MiB/GPU':>13}")
            for r in rows:
                print(f"{r['config']:<20} {r['gpus']:>4} {r['prefill_s']:>10.3f} {r['tokens_per_s']:>10.1f} "
                      f"{r['kv_cache_mib_per_gpu']:>11.1f} {r['peak_mib_per_gpu']:>13.1f}")
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()                 # leave together: a rank tearing down while another still talks can abort
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
