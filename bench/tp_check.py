"""Eviction under transformers tensor parallelism agrees with one GPU: the two-GPU check.

    torchrun --nproc-per-node 2 bench/tp_check.py            (exits 0 with a message on fewer than two GPUs)

A randomly initialised Llama-shaped model with grouped-query attention (8 query heads, 4 KV heads, so
each of two ranks holds 2 KV heads of every layer) is saved to a temporary directory and loaded on every
rank twice: whole, on the rank's own GPU, and with tp_plan="auto" (heads split over the ranks, the
o_proj/down_proj outputs all-reduced). Both generate 64 greedy tokens from a 4096-token prompt, whose
last tokens repeat a passage of its middle (the "question", given to match_span as question_span), at
90% sparsity, for every case in CASES. The tokens and every layer's kept original positions (gathered
from all ranks, heads in rank order) must equal the one-GPU run's:

  reference  cab_reference attention + CabCache, float64: exactly equal. The sharded model rounds
             differently (an all-reduce adds the ranks' partial sums in another order than one matmul),
             but at float64 those differences (~1e-16) do not reorder any two scores or logits.
  cab_fast   cab_fast attention + cab_fast.CabCache (where it exists), float32, GPU only: equal except
             near-ties. float32 rounding (~1e-7) can swap two tokens whose ranking priorities are that
             close; the check then allows a generated token to differ only where the one-GPU run's
             top-2 logit gap is below NEAR_TIE (from there on the runs see different tokens and are not
             compared), and at most POSITION_SLACK of the kept positions to differ.

--cpu runs the same on CPU processes over gloo (reference only, small sizes): test_tp.py does that.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository root
import cab_reference as ref  # noqa: E402

NEAR_TIE = 1e-3          # float32 runs: a generated token may differ where the top-2 logit gap is below this
POSITION_SLACK = 0.01    # float32 runs: share of kept positions that may differ (swapped near-tied scores)


def cases():
    """(label, EvictionConfig, needs the question span): every policy of the issue, per head and per layer."""
    h2o, cab, snapkv, match = ref.H2O(), ref.CAB(), ref.SnapKV(), ref.MatchSpan()
    return [("h2o", ref.EvictionConfig(h2o, sparsity=0.9), False),
            ("h2o per-layer", ref.EvictionConfig(h2o, sparsity=0.9, per_head=False), False),
            ("cab per-head", ref.EvictionConfig(cab, sparsity=0.9), False),
            ("cab per-layer", ref.EvictionConfig(cab, sparsity=0.9, per_head=False), False),
            ("snapkv", ref.EvictionConfig(snapkv, sparsity=0.9), False),
            ("match_span", ref.EvictionConfig(match, sparsity=0.9), True),
            ("match_span per-layer", ref.EvictionConfig(match, sparsity=0.9, per_head=False), True)]


@dataclass
class Sizes:
    prompt: int = 4096
    new_tokens: int = 64
    question: int = 24
    layers: int = 4
    hidden: int = 256
    vocab: int = 1024


def save_random_model(path, sizes: Sizes):
    """A random Llama with GQA (8 query heads, 4 KV heads, head dim 32); init 0.05 so attention is peaked."""
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=sizes.vocab, hidden_size=sizes.hidden, intermediate_size=2 * sizes.hidden,
                         num_hidden_layers=sizes.layers, num_attention_heads=8, num_key_value_heads=4,
                         head_dim=sizes.hidden // 8, max_position_embeddings=2 * sizes.prompt,
                         initializer_range=0.05, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)


def prompt_and_question(sizes: Sizes, device):
    """Random ids whose last `question` tokens copy a passage from the middle: (ids [1, N], span)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, sizes.vocab, (1, sizes.prompt), generator=g)
    start = sizes.prompt // 2
    ids[0, -sizes.question:] = ids[0, start:start + sizes.question]
    return ids.to(device), (sizes.prompt - sizes.question, sizes.prompt)


def load(path, impl, dtype, device, tensor_parallel):
    from transformers import AutoModelForCausalLM
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # 5.24 prefers DistributedConfig(tp_plan=...)
        if tensor_parallel:
            return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", attn_implementation=impl,
                                                        dtype=dtype).eval()
        return AutoModelForCausalLM.from_pretrained(path, attn_implementation=impl, dtype=dtype).to(device).eval()


def gather_heads(positions, group):
    """[B, Hkv_local, L] from every rank -> [B, Hkv, L], heads in rank order (tp_plan shards them so)."""
    if group is None:
        return positions
    parts = [torch.empty_like(positions) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, positions.contiguous(), group=group)
    return torch.cat(parts, dim=1)


def generate(model, ids, cache, new_tokens):
    """(tokens [new_tokens], logits [new_tokens, V]) of greedy decoding with `cache`."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)            # 5.24 renames past_key_values to cache
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:], torch.cat(out.logits).float()


def compare(one, tp, exact):
    """Compare one-GPU and tensor-parallel runs: a dict of what differs, with 'ok' for the verdict."""
    (tok1, logits1, pos1), (tok2, _, pos2) = one, tp
    differ = (tok1 != tok2).nonzero()
    first = int(differ[0]) if len(differ) else None
    top2 = logits1.topk(2, dim=-1).values
    gap = None if first is None else float(top2[first, 0] - top2[first, 1])
    report = {"tokens_equal": first is None, "first_diff": first, "gap": gap}
    if first is None and pos1 is not None:
        total = sum(p.numel() for p in pos1)
        wrong = sum(int((a.sort(-1).values != b.sort(-1).values).sum()) for a, b in zip(pos1, pos2))
        report.update(positions=total, positions_differ=wrong)
    else:
        report.update(positions=None, positions_differ=None)
    if exact:
        report["ok"] = first is None and not report["positions_differ"]
    else:
        near_tie = first is None or gap < NEAR_TIE
        slack = report["positions"] is None or report["positions_differ"] <= POSITION_SLACK * report["positions"]
        report["ok"] = near_tie and slack
    return report


def run_cases(path, sizes, impl, cache_type, dtype, device, exact, rank):
    """Every case, one GPU then tensor parallel; returns [(label, report)]."""
    ids, span = prompt_and_question(sizes, device)
    runs = {}
    for tensor_parallel in (False, True):
        model = load(path, impl, dtype, device, tensor_parallel)
        for label, config, needs_question in cases():
            cache = cache_type(config, question_span=span if needs_question else None)
            tokens, logits = generate(model, ids, cache, sizes.new_tokens)
            group = getattr(cache, "head_group", None)
            positions = ([gather_heads(p, group) for p in cache.kept_positions()]
                         if hasattr(cache, "kept_positions") else None)
            runs[label, tensor_parallel] = (tokens, logits, positions)
            if tensor_parallel and group is None:
                raise RuntimeError(f"{label}: the tensor-parallel run found no head group")
        del model
    return [(label, compare(runs[label, False], runs[label, True], exact)) for label, _, _ in cases()]


def print_table(title, results):
    print(f"\n{title}")
    print(f"{'case':<22} {'tokens':>8} {'first diff':>10} {'top-2 gap':>10} {'positions differ':>18}  verdict")
    for label, r in results:
        pos = "-" if r["positions"] is None else f"{r['positions_differ']}/{r['positions']}"
        gap = "-" if r["gap"] is None else f"{r['gap']:.2e}"
        first = "-" if r["first_diff"] is None else str(r["first_diff"])
        print(f"{label:<22} {'equal' if r['tokens_equal'] else 'differ':>8} {first:>10} {gap:>10} {pos:>18}  "
              f"{'ok' if r['ok'] else 'FAIL'}", flush=True)


def join_ranks(script, cpu):
    """Join the process group started by torchrun (gloo on CPU; else NCCL, one GPU per rank) and return
    this rank's device; None, after saying why, with fewer than two processes (or GPUs)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2 or (not cpu and torch.cuda.device_count() < 2):
        print(f"{script}: skipped: needs two processes with a GPU each (torchrun --nproc-per-node 2 {script}.py); "
              f"found {world} process(es) and {torch.cuda.device_count()} GPU(s)")
        return None
    if cpu:
        dist.init_process_group("gloo")
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def shared_temp_dir(rank, prefix="tp_check_"):
    """A directory rank 0 creates and every rank knows (all ranks share one file system)."""
    name = [tempfile.mkdtemp(prefix=prefix) if rank == 0 else None]
    dist.broadcast_object_list(name, src=0)
    return name[0]


def check(sizes: Sizes, device, fast: bool):
    """The whole check on an initialised process group; returns True when every case agrees."""
    rank = dist.get_rank()
    path = shared_temp_dir(rank)
    if rank == 0:
        save_random_model(path, sizes)
    dist.barrier()
    suites = [("reference: cab_reference attention + CabCache, float64 (exact)", "cab_reference",
               ref.CabCache, torch.float64, True)]
    if fast:                       # cab_fast's cache where it has one (its prompt runs the reference's path)
        import cab_fast
        cache_type = getattr(cab_fast, "CabCache", ref.CabCache)
        suites.append((f"cab_fast attention + {cache_type.__module__}.CabCache, float32 (near-ties allowed)",
                       "cab_fast", cache_type, torch.float32, False))
    ok = True
    for title, impl, cache_type, dtype, exact in suites:
        results = run_cases(path, sizes, impl, cache_type, dtype, device, exact, rank)
        ok = ok and all(r["ok"] for _, r in results)
        if rank == 0:
            print_table(title, results)
    if rank == 0:
        import shutil
        shutil.rmtree(path, ignore_errors=True)
    dist.barrier()                 # leave together: a rank tearing down while another still talks can abort
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="CPU processes over gloo, reference only, small sizes")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 4096, --cpu 256)")
    ap.add_argument("--new-tokens", type=int, default=None, help="generated tokens (default 64, --cpu 8)")
    args = ap.parse_args()
    sizes = Sizes() if not args.cpu else Sizes(prompt=256, new_tokens=8, question=12, layers=2, hidden=128, vocab=512)
    sizes.prompt = args.prompt or sizes.prompt
    sizes.new_tokens = args.new_tokens or sizes.new_tokens
    device = join_ranks("tp_check", args.cpu)
    if device is None:
        return 0
    world = dist.get_world_size()
    try:
        ok = check(sizes, device, fast=not args.cpu)
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"\ntp_check: {'PASS' if ok else 'FAIL'} ({world} ranks, prompt {sizes.prompt}, "
              f"{sizes.new_tokens} new tokens)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
