"""docs/RESULTS.md from measured runs: each run is first reduced to a summary of numbers with its provenance
(docs/results/NAME.json), then RESULTS.md is written from every summary there, one table per topic.

    python docs/make_results.py --bench run.json [--name NAME] [--command CMD]
    python docs/make_results.py --tp tp.jsonl [--name NAME] [--command CMD]      (bench/bench_tp.py --json)
    python docs/make_results.py --suite run.jsonl --name real_heldout_bridge [--command CMD] [--topic TOPIC]
                                [--device DEV] [--date YYYY-MM-DD] [--commit SHA] [--torch V] [--transformers V]
    python docs/make_results.py            # RESULTS.md again from docs/results/*.json
    python docs/make_results.py --check    # exit 1 if RESULTS.md is not what the summaries give

--bench reads `python bench/bench.py --json > run.json`: {"header": {device, sms, memory_gib, torch, triton,
transformers, cuda, commit, date}, "rows": [{"section": ..., ...}]}. The summary keeps every row's numbers
and short labels (nested results flattened as "side.field"; long text such as profiler tables is dropped).
Known sections get their own tables; a section this script does not know is shown as a table of its fields.

--suite reads `python diagnose.py --suite ... --results run.jsonl`: a line {"diagnose_run": {...}}, then one
result per (item, policy, sparsity). The summary holds, per (setting, question before/after the cut,
sparsity) and policy, the means diagnose.py's suite table prints (its summarise(): numbers only, None and NaN
left out of a mean, context benefit kept over the items where the context helps the dense answer by 1+ nat),
random eviction's expected retention (mean budget / n over the items) and the item counts. No question,
answer, output or item id is copied: the real suites are CC BY-SA data. The run line does not record the
machine, so --device, --torch, --transformers, --commit and --date say it (defaults: this environment's
versions and commit, CPU, the file's modification date).

--tp reads `torchrun --nproc-per-node 2 bench/bench_tp.py --json > tp.jsonl` (a "# DEVICE xN, DATE, torch V: ..."
line, then one row per configuration) into a bench summary of section tensor_parallel.

A summary whose provenance says "transcribed" holds figures copied from an earlier NOTES.md; it is shown
only while no measured summary covers its topic (bench: its section).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS_DIR = os.path.join(HERE, "results")
RESULTS_MD = os.path.join(HERE, "RESULTS.md")

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,80}$")                      # a summary's file name
LABEL = re.compile(r"^[A-Za-z0-9_.,:()+ /=-]{0,80}$")              # setting and policy names: never free text
MAX_LABEL = 160                                                    # longer bench strings (profiles) are dropped

REAL_TOPIC, GENERATED_TOPIC = "Real questions", "Generated suites"
SUITE_FIELDS = ("answer_retention", "question_retention", "context_benefit_kept", "correct", "f1")


class Bad(Exception):
    """A user mistake: printed as one line, exit code 2."""


# ----------------------------------------------------------------------------------------------------
# Reading runs into summaries


def mean(values):
    """The mean of the values that are numbers (None and NaN mean 'nothing to measure'), else None."""
    values = [float(v) for v in values if v is not None and not isinstance(v, str) and v == v]
    return sum(values) / len(values) if values else None


def clean(value):
    """NaN and infinities as None (strict JSON), at any depth."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def flat(row, prefix=""):
    """A bench row's scalar fields, nested dicts as "outer.inner"; multi-line or long strings left out."""
    out = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat(value, name + "."))
        elif isinstance(value, str):
            if "\n" not in value and len(value) <= MAX_LABEL:
                out[name] = value
        elif value is None or isinstance(value, (bool, int, float)):
            out[name] = value
    return out


def git_commit():
    try:
        res = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return None
    return res.stdout.strip() or None


def installed(package):
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise Bad(f"{what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise Bad(f"{what} {path}:{e.lineno}:{e.colno}: not JSON ({e.msg})") from None


def summarise_bench(run, name, command=None):
    """A bench.py --json object as a summary: its header as provenance, its rows' numbers and labels."""
    if not isinstance(run, dict) or not isinstance(run.get("header"), dict) or not isinstance(run.get("rows"), list):
        raise Bad('--bench: expected bench.py --json output: {"header": {...}, "rows": [...]}')
    rows = []
    for i, row in enumerate(run["rows"]):
        if not isinstance(row, dict) or not isinstance(row.get("section"), str):
            raise Bad(f"--bench: row {i} has no section")
        rows.append(flat(row))
    provenance = {**flat(run["header"]), "command": command or "python bench/bench.py --json (flags not recorded)",
                  "sections": list(dict.fromkeys(r["section"] for r in rows))}
    return clean({"kind": "bench", "name": name, "provenance": provenance, "rows": rows})


def summarise_tp(path, name, command=None, commit=None, transformers=None):
    """bench_tp.py --json output (its '#' line, then one JSON row per configuration) as a bench summary."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise Bad(f"--tp {path}: {e.strerror}") from None
    head = next((line for line in lines if line.startswith("# ")), None)
    m = re.match(r"^# (.+) x(\d+), (\d{4}-\d{2}-\d{2}), torch (\S+?):", head or "")
    if not m:
        raise Bad(f"--tp {path}: expected bench_tp.py --json output (a '# DEVICE xN, DATE, torch V: ...' line)")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if line.startswith("{"):
            try:
                rows.append({"section": "tensor_parallel", **flat(json.loads(line))})
            except json.JSONDecodeError as e:
                raise Bad(f"--tp {path}:{lineno}:{e.colno}: not JSON ({e.msg})") from None
    if not rows:
        raise Bad(f"--tp {path}: no rows")
    provenance = {"device": f"{m.group(2)}x {m.group(1)}", "torch": m.group(4),
                  "transformers": transformers or installed("transformers"), "commit": commit or git_commit(),
                  "date": m.group(3), "command": command or "torchrun --nproc-per-node 2 bench/bench_tp.py --json",
                  "run": head[2:], "sections": ["tensor_parallel"]}
    return clean({"kind": "bench", "name": name, "provenance": provenance, "rows": rows})


def read_suite_results(path):
    """(run line, result rows) of a diagnose.py --results file."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError as e:
        raise Bad(f"--suite {path}: {e.strerror}") from None
    records = []
    for lineno, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if lineno == len(lines):                # a line cut short by an interrupted run
                break
            raise Bad(f"--suite {path}:{lineno}:{e.colno}: not JSON ({e.msg})") from None
    if not records or not isinstance(records[0], dict) or "diagnose_run" not in records[0]:
        raise Bad(f'--suite {path}:1: expected the run line {{"diagnose_run": ...}} written by diagnose.py --results')
    rows = records[1:]
    for lineno, row in enumerate(rows, 2):
        if not isinstance(row, dict) or not all(k in row for k in ("id", "setting", "policy", "sparsity")):
            raise Bad(f"--suite {path}:{lineno}: expected a result with id, setting, policy and sparsity")
        for key in ("setting", "policy"):
            if not isinstance(row[key], str) or not LABEL.match(row[key]):
                raise Bad(f"--suite {path}:{lineno}: {key} {str(row[key])[:40]!r} is not a short name")
    return records[0]["diagnose_run"], rows


def summarise_suite(run, rows):
    """Per (setting, sparsity) group and policy, the means of diagnose.py's summarise(); numbers only."""
    after = bool(run.get("question_after_cut"))
    groups = []
    for setting in dict.fromkeys(r["setting"] for r in rows):
        for sparsity in dict.fromkeys(r["sparsity"] for r in rows if r["setting"] == setting):
            cell = [r for r in rows if r["setting"] == setting and r["sparsity"] == sparsity]
            per_item = {r["id"]: r for r in cell}              # n, budget, dense: the same for every policy
            policies = []
            for policy in dict.fromkeys(r["policy"] for r in cell):
                rs = [r for r in cell if r["policy"] == policy]
                policies.append({"policy": policy, **{k: mean(r.get(k) for r in rs) for k in SUITE_FIELDS},
                                 "vs_dense": (None if mean(r.get("correct") for r in rs) is None
                                              or mean(r.get("dense_correct") for r in rs) is None else
                                              mean(r.get("correct") for r in rs)
                                              - mean(r.get("dense_correct") for r in rs)),
                                 "answer_nll": mean(r.get("answer_nll") for r in rs),
                                 "items": len(rs), "benefit_items": helped(rs)})
            expected = mean(r["budget"] / r["n"] for r in per_item.values() if r.get("n") and r.get("budget"))
            policies.append({"policy": "random (expected)", "answer_retention": expected,
                             "question_retention": None if after else expected, "items": len(per_item),
                             "benefit_items": helped(per_item.values())})
            groups.append({"setting": setting, "sparsity": sparsity, "question_after_cut": after,
                           "budget": run.get("budget"), "items": len(per_item),
                           "benefit_items": helped(per_item.values()),
                           "dense_correct": mean(r.get("dense_correct") for r in per_item.values()),
                           "dense_f1": mean(r.get("dense_f1") for r in per_item.values()),
                           "dense_nll": mean(r.get("dense_nll") for r in per_item.values()),
                           "no_context_nll": mean(r.get("no_context_nll") for r in per_item.values()),
                           "tokens": mean(r.get("n") for r in per_item.values()),
                           "kept": mean(r.get("budget") for r in per_item.values()),
                           "policies": policies})
    return groups


def helped(rows):
    """How many results count toward context_benefit_kept (a number: the context helps dense by 1+ nat)."""
    return sum(isinstance(r.get("context_benefit_kept"), (int, float)) and r["context_benefit_kept"] is not True
               and r["context_benefit_kept"] == r["context_benefit_kept"] for r in rows)


def suite_summary(path, name, command=None, topic=None, device=None, date=None, commit=None, torch=None,
                  transformers=None):
    run, rows = read_suite_results(path)
    if not rows:
        raise Bad(f"--suite {path}: no results yet")
    if not date:
        date = datetime.date.fromtimestamp(os.path.getmtime(path)).isoformat()
    provenance = {"device": device or run.get("device") or "cpu",
                  "torch": torch or run.get("torch") or installed("torch"),
                  "transformers": transformers or run.get("transformers") or installed("transformers"),
                  "commit": commit or run.get("commit") or git_commit(), "date": date,
                  "command": command or "python diagnose.py --suite ... --results FILE (command not recorded)",
                  "items": len({r["id"] for r in rows}), "results": len(rows),
                  "diagnose_run": run}
    return clean({"kind": "suite", "name": name, "topic": topic or default_topic(name),
                  "provenance": provenance, "groups": summarise_suite(run, rows)})


def default_topic(name):
    return REAL_TOPIC if name.startswith("real") else GENERATED_TOPIC


def write_summary(summary, results_dir):
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, summary["name"] + ".json")
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return path


def read_summaries(results_dir):
    out = []
    if not os.path.isdir(results_dir):
        return out
    for file in sorted(os.listdir(results_dir)):
        if file.endswith(".json"):
            summary = read_json(os.path.join(results_dir, file), "summary")
            if summary.get("kind") not in ("bench", "suite"):
                raise Bad(f"summary {file}: kind must be bench or suite")
            out.append(summary)
    return out


# ----------------------------------------------------------------------------------------------------
# Formatting


def num(x, digits=None):
    """A number as a table shows it: None as '-', big values without decimals, others to 3 figures."""
    if x is None or isinstance(x, str):
        return "-" if x is None else x
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    if digits is not None:
        return f"{x:.{digits}f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:#.3g}"


def frac(x):
    """A share (retention, accuracy): two decimals, three where the value has exactly three (3 of 40)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return num(x)
    if round(x, 2) != round(x, 3) and abs(x * 1000 - round(x * 1000)) < 1e-6:
        return f"{x:.3f}"
    return f"{x:.2f}"


def ratio(a, b, stored=None):
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
        return a / b
    return stored


def with_ratio(value, base, stored=None, digits=None):
    """'value (ratio x)', either part '-' where not measured."""
    r = ratio(value, base, stored)
    if value is None and r is None:
        return "-"
    return f"{num(value, digits)} ({num(r, 2)}x)" if r is not None else num(value, digits)


def table(header, rows, keep=1):
    """A markdown table; a column with nothing measured ('-' or empty throughout) is left out, but for the
    first `keep`."""
    cols = [i for i in range(len(header)) if i < keep or any(row[i] not in ("-", "") for row in rows)]
    header, rows = [header[i] for i in cols], [[row[i] for i in cols] for row in rows]
    cell = lambda v: str(v).replace("|", "\\|")                      # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cite(summary):
    """The short name of a run a table shows: summary name, device, commit, date."""
    p = summary["provenance"]
    return (f"`{summary['name']}`: {p.get('device') or '?'}, commit {p.get('commit') or 'not recorded'}, "
            f"{p.get('date') or 'date not recorded'}" + (" (transcribed)" if p.get("transcribed") else ""))


def provenance_line(p):
    device = p.get("device") or "?"
    extra = ", ".join(x for x in (f"{p['sms']} SMs" if p.get("sms") else "",
                                  f"{p['memory_gib']} GiB" if p.get("memory_gib") else "") if x)
    versions = ", ".join(f"{k} {p[k]}" for k in ("torch", "triton", "transformers", "cuda") if p.get(k))
    where = f"commit {p.get('commit') or 'not recorded'}, {p.get('date') or 'date not recorded'}"
    counts = (f"; {p['items']} items" if p.get("items") else "") + (f", {p['results']} results" if p.get("results")
                                                                      else "")
    line = f"{device}{f' ({extra})' if extra else ''}; {versions}; {where}{counts}; `{p.get('command', '?')}`"
    if p.get("transcribed"):
        line += f". Transcribed: {p['transcribed']}"
    return line


# ----------------------------------------------------------------------------------------------------
# Bench sections


def rows_of(summary, section):
    return [r for r in summary["rows"] if r["section"] == section]


def notes_of(rows):
    return [r["note"] for r in rows if r.get("note")]


def render_prefill(rows):
    out = table(["N", "Hkv", "SDPA ms", "SDPA flash ms", "fast ms (x SDPA)", "score pass ms", "fast + validate ms",
                 "fast TFLOP/s", "reference ms"],
                [[num(r.get("n")), num(r.get("hkv")), num(r.get("sdpa_ms")), num(r.get("sdpa_flash_ms")),
                  with_ratio(r.get("fast_ms"), r.get("sdpa_ms"), r.get("ratio_vs_sdpa")), num(r.get("score_pass_ms")),
                  num(r.get("fast_validate_ms")), num(r.get("fast_tflops")), num(r.get("reference_ms"))]
                 for r in rows])
    return out, [f"tiles: {t}" for t in dict.fromkeys(r["tiles"] for r in rows if r.get("tiles"))]


def render_decode(rows):
    out = table(["Nk", "Hkv", "SDPA ms", "fast ms (x SDPA)", "SDPA graph ms", "fast graph ms (x SDPA)",
                 "TB/s fast / SDPA", "fast + validate ms"],
                [[num(r.get("n")), num(r.get("hkv")), num(r.get("sdpa_ms")),
                  with_ratio(r.get("fast_ms"), r.get("sdpa_ms"), r.get("ratio_vs_sdpa")), num(r.get("sdpa_graph_ms")),
                  with_ratio(r.get("fast_graph_ms"), r.get("sdpa_graph_ms"), r.get("graph_ratio")),
                  f"{num(r.get('fast_tb_s'), 2)} / {num(r.get('sdpa_tb_s'), 2)}" if r.get("fast_tb_s") else "-",
                  num(r.get("fast_validate_ms"))] for r in rows])
    return out, [f"tile: {t}" for t in dict.fromkeys(r["tile"] for r in rows if r.get("tile"))]


def render_overhead(rows):
    return table(["call", "Nq", "Nk", "SDPA us", "fast us (x SDPA)", "fast + validate us"],
                 [[r.get("call", "-"), num(r.get("nq")), num(r.get("nk")), num(r.get("sdpa_us")),
                   with_ratio(r.get("fast_us"), r.get("sdpa_us"), r.get("ratio")), num(r.get("fast_validate_us"))]
                  for r in rows]), []


FIRST_CALL = (("import_torch_s", "import torch"), ("import_cab_fast_s", "import cab_fast"),
              ("decode_4k_s", "decode 4k"), ("decode_new_len_s", "decode, new length"),
              ("decode_short_s", "short decode"), ("prefill_2k_s", "prefill 2k"),
              ("prefill_new_len_s", "prefill, new length"), ("padded_prefill_s", "padded prefill"))


def render_first_call(rows):
    return table(["Triton cache"] + [label for _, label in FIRST_CALL],
                 [[r.get("cache", "-")] + [num(r.get(key)) for key, _ in FIRST_CALL] for r in rows]), []


def e2e_rows(summary):
    """The end-to-end figures of one run: (figure, dense, evict_every=1, evict_every=64) cells."""
    out = []
    for r in rows_of(summary, "e2e_b1"):
        d = lambda k: r.get(f"dense_None.{k}")                                  # noqa: E731
        e = lambda every, k: r.get(f"evict_{every}.{k}")                        # noqa: E731
        for key, label in (("prefill_s", "prefill, B=1 (s)"),
                           ("step_ms", "eager decode step, B=1, new KV lengths (ms)"), ("kv_mib", "KV cache (MiB)")):
            out.append([label, num(d(key))] + [with_ratio(e(every, key), d(key), e(every, key.split("_")[0] + "_x"))
                                               for every in (1, 64)])
    out = [row for row in out if any(c not in ("-", "") for c in row[1:])]
    for r in rows_of(summary, "e2e_dense_step_check"):
        out.append(["dense eager step again over KV lengths already seen, no sync / synced (ms)",
                    f"{num(r.get('no_sync_ms'))} / {num(r.get('synced_ms'))}", "", ""])
    for r in rows_of(summary, "e2e_generate"):
        for key, label in (("new_lengths_ms", "generate() per token, new KV lengths (ms)"),
                           ("same_lengths_ms", "generate() per token, the same lengths again (ms)")):
            out.append([label, num(r.get(f"dense.{key}")),
                        with_ratio(r.get(f"evict.{key}"), r.get(f"dense.{key}"), r.get(f"evict.{key}_x")), ""])
    for r in rows_of(summary, "e2e_generate_overhead"):
        out.append(["dense generate() per token: all / model.forward / outside it (ms)",
                    " / ".join(num(r.get(k)) for k in ("generate_ms_per_token", "forward_ms_per_token",
                                                       "outside_ms_per_token")), "", ""])
    for r in rows_of(summary, "e2e_graphs"):
        for key, label in (("eager_ms", "B=8, eager step (ms)"), ("graph_ms", "B=8, CUDA-graph step (ms)"),
                           ("graph_tok_s", "B=8, CUDA graphs, tokens/s")):
            out.append([label, num(r.get(f"dense.{key}")),
                        with_ratio(r.get(f"evict.{key}"), r.get(f"dense.{key}"), r.get(f"evict.{key}_x")), ""])
    return [row for row in out if any(c not in ("-", "") for c in row[1:])]


E2E_SECTIONS = ("e2e_b1", "e2e_dense_step_check", "e2e_generate", "e2e_generate_overhead", "e2e_graphs")


def render_capacity(rows):
    body = []
    for r in rows:
        for side, label in (("dense", "dense StaticCache"), ("evict", "eviction, evict_every=64")):
            oom = r.get(f"{side}.out_of_memory_at")
            body.append([label, num(r.get(f"{side}.per_seq_mib")),
                         f"{num(r.get(f'{side}.batch'))}" + (f" ({num(oom)})" if oom else ""),
                         num(r.get(f"{side}.step_ms")), num(r.get(f"{side}.cut_step_ms")),
                         num(r.get(f"{side}.amortised_ms")), num(r.get(f"{side}.tok_s")),
                         num(r.get(f"{side}.peak_gib"))])
    notes = [", ".join(x for x in (f"GPU memory budget {num(r['gpu_gib'])} GiB" if r.get("gpu_gib") else "",
                                   f"{num(r['free_gib'])} GiB free after the weights" if r.get("free_gib") else "",
                                   f"eviction budget {num(r['budget'])} tokens per layer and KV head"
                                   if r.get("budget") else "") if x) for r in rows]
    notes = [n for n in notes if n]
    return table(["cache", "MiB per sequence", "largest batch (out of memory at)", "step ms", "cut step ms",
                  "amortised ms", "tokens/s", "peak GiB"], body), notes


def render_policy_overhead(rows):
    names = [k for k in dict.fromkeys(k for r in rows for k in r)
             if k not in ("section", "n", "dense_s", "note", "relative_to")]
    body = []
    for r in rows:
        relative = r.get("relative_to") == "h2o"                # transcribed: only the ratios to h2o are known
        body.append([num(r.get("n")), num(r.get("dense_s"))] +
                    [(f"({num(r[k], 2)}x)" if relative and r.get(k) is not None else
                      with_ratio(r.get(k), r.get("h2o")) if k != "h2o" else num(r.get(k)))
                     for k in names])
    return table(["N", "dense s"] + [f"{k} s (x h2o)" if k != "h2o" else "h2o s" for k in names], body), []


def render_tp(rows):
    return table(["config", "GPUs", "prefill s", "tokens/s", "KV cache MiB per GPU", "peak MiB per GPU"],
                 [[r.get("config", "-"), num(r.get("gpus")), num(r.get("prefill_s")), num(r.get("tokens_per_s")),
                   num(r.get("kv_cache_mib_per_gpu")), num(r.get("peak_mib_per_gpu"))] for r in rows]), []


def render_generic(rows):
    keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in ("section", "note")]
    return table(keys, [[num(r.get(k)) for k in keys] for r in rows]), []


BENCH_TOPICS = (  # (title, sections, what the table is, renderer taking rows; e2e takes the summary)
    ("Prefill: attention with exact scores", ("prefill",),
     "B=1, Hq=32, D=128, bf16, causal; medians. fast = `cab_fast.attention` (outputs and exact scores), "
     "against SDPA's default backend (cuDNN on these GPUs) in the same run.", render_prefill),
    ("Decode: one query", ("decode",),
     "B=1, Hq=32, D=128, bf16; graph = CUDA-graph replay (GPU time only); TB/s = K and V bytes / graph time.",
     render_decode),
    ("Host time per call", ("overhead",),
     "Tiny problems (B=1, Hq=8, Hkv=2, D=128, bf16), a loop without sync, median of five loops; growing: one "
     "more key every call (a new shape each time).", render_overhead),
    ("First calls", ("first_call",),
     "Fresh processes, bf16, D=128, GQA 32/8, CUDA initialised first; seconds; cold and warm Triton cache.",
     render_first_call),
    ("End to end: generation with eviction", E2E_SECTIONS,
     "bench.py's random Llama (16 layers, hidden 2048, 16/4 heads, D=128, bf16), a 32k-token prompt (16k with "
     "--quick); eviction = `cab_fast.CabCache` with cab at 90% sparsity; ratios to dense in the same run.", None),
    ("Capacity on one GPU", ("e2e_capacity",),
     "The largest batch of 32k-token sequences (16k with --quick) whose decode steps fit the memory budget "
     "(synthetic caches in the state a prompt leaves), and its tokens/s.", render_capacity),
    ("Cost of each policy's evidence", ("policy_overhead",),
     "Prefill through the end-to-end model with each policy's `cab_fast.CabCache` at 90% (evidence and the "
     "prompt's cut included), question = the last 24 tokens; ratio to h2o (scores only).", render_policy_overhead),
    ("Tensor parallelism", ("tensor_parallel",),
     "bench_tp.py: a random Llama (8 layers, hidden 2048, 16/4 heads, bf16), 32k-token prompt, B=1, one GPU "
     "against `tp_plan=\"auto\"` over the GPUs; peak = memory allocated during the run beyond the weights.",
     render_tp),
)


def bench_summaries_for(summaries, sections):
    """The summaries with rows in these sections; transcribed ones only where no measured one has any."""
    having = [s for s in summaries if s["kind"] == "bench" and any(r["section"] in sections for r in s["rows"])]
    measured = [s for s in having if not s["provenance"].get("transcribed")]
    return measured or having


def render_bench_topic(title, sections, what, render, summaries):
    chosen = bench_summaries_for(summaries, sections)
    if not chosen:
        return None
    parts = [f"## {title}", "", what]
    for s in sorted(chosen, key=lambda s: (s["provenance"].get("date") or "", s["name"]), reverse=True):
        parts += ["", f"Run {cite(s)}.", ""]
        rows = [r for r in s["rows"] if r["section"] in sections]
        if render is None:
            body, notes = table(["figure", "dense", "eviction, evict_every=1 (x dense)",
                                 "evict_every=64 (x dense)"], e2e_rows(s)), []
        else:
            body, notes = render(rows)
        parts.append(body)
        notes += notes_of(rows)
        if notes:
            parts += [""] + [f"- {n}" for n in notes]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# Suite topics


def render_suite_topic(topic, summaries):
    chosen = [s for s in summaries if s["kind"] == "suite" and s.get("topic") == topic]
    measured = [s for s in chosen if not s["provenance"].get("transcribed")]
    chosen = measured or chosen
    parts = [f"## {topic}", "",
             "diagnose.py on SmolLM2-135M-Instruct (GGUF). answer / question ret = share of the answer's / the "
             "question's tokens kept at the prompt's cut, averaged over layers and KV heads and then items; benefit "
             "kept = (NLL without context - NLL after eviction) / (NLL without context - dense NLL) of the gold "
             "answer, averaged over the items where the context helps dense by 1+ nat (their count in brackets); "
             "accuracy = the answer appears in the greedy output. The dense row is the uncut cache.", ""]
    body, sources = [], []
    for i, s in enumerate(chosen, 1):
        sources.append(f"[{i}] {cite(s)}")
        for g in s["groups"]:
            cut = "after" if g.get("question_after_cut") else "before"
            what = (f"budget {g['budget']}" if g.get("sparsity") is None and g.get("budget")
                    else num(g.get("sparsity"), 2))
            label = [f"[{i}] {g.get('suite') or s['name']}", g["setting"], cut, what]
            benefit_items = f" ({g['benefit_items']})" if g.get("benefit_items") is not None else ""
            body.append(label + ["dense", "1.00", "1.00" if cut == "before" else "-",
                                 "1.00" if g.get("benefit_items") else "-", frac(g.get("dense_correct")),
                                 frac(g.get("dense_f1")), f"{g.get('items', '-')}{benefit_items}"])
            for p in g["policies"]:
                benefit = p.get("context_benefit_kept")
                body.append(["", "", "", "", p["policy"], frac(p.get("answer_retention")),
                             frac(p.get("question_retention")),
                             f"{frac(benefit)} ({p['benefit_items']})" if benefit is not None else "-",
                             frac(p.get("correct")), frac(p.get("f1")), f"{p.get('items', '-')}"])
            if g.get("note"):
                body.append(["", "", "", "", g["note"]] + [""] * 6)
    parts.append(table(["run", "setting", "question vs cut", "sparsity", "policy", "answer ret", "question ret",
                        "benefit kept (items)", "accuracy", "F1", "items (benefit)"], body))
    parts += [""] + [f"- {line}" for line in sources]
    tokens = [f"[{i}] {g['setting']}: about {g['tokens']:,.0f} tokens, {g['kept']:,.0f} kept"
              for i, s in enumerate(chosen, 1) for g in s["groups"] if g.get("tokens")]
    if tokens:
        parts += ["- prompt length at the cut (mean): " + "; ".join(dict.fromkeys(tokens))]
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------------
# RESULTS.md


def render(summaries):
    parts = ["# Results", "",
             "Generated by `python docs/make_results.py` from the summaries in `docs/results/` (do not edit by "
             "hand; NOTES.md says what the numbers mean). Each table names its run: device, versions, commit, "
             "date and command. Ratios are taken within one run. A run named as transcribed holds figures "
             "copied from an earlier NOTES.md, measured on older code; a measured run of the same topic "
             "replaces it."]
    sections = set()
    for title, secs, what, fn in BENCH_TOPICS:
        sections.update(secs)
        text = render_bench_topic(title, secs, what, fn, summaries)
        if text:
            parts += ["", text]
    unknown = dict.fromkeys(r["section"] for s in summaries if s["kind"] == "bench" for r in s["rows"]
                            if r["section"] not in sections)
    for section in unknown:
        text = render_bench_topic(f"`{section}`", (section,), f"bench.py's `{section}` rows, as recorded.",
                                  render_generic, summaries)
        parts += ["", text]
    topics = dict.fromkeys(s["topic"] for s in summaries if s["kind"] == "suite")
    order = [t for t in (REAL_TOPIC, GENERATED_TOPIC) if t in topics] + \
        [t for t in topics if t not in (REAL_TOPIC, GENERATED_TOPIC)]
    for topic in order:
        parts += ["", render_suite_topic(topic, summaries)]
    if len(parts) == 3:
        parts += ["", "No summaries yet: see `python docs/make_results.py --help`."]
    else:
        parts += ["", "## Runs", ""]
        parts += [f"- `{s['name']}` (`docs/results/{s['name']}.json`): {provenance_line(s['provenance'])}"
                  for s in sorted(summaries, key=lambda s: s["name"])]
    return "\n".join(parts) + "\n"


def regenerate(results_dir=RESULTS_DIR, out=RESULTS_MD, check=False):
    text = render(read_summaries(results_dir))
    if check:
        try:
            with open(out, encoding="utf-8") as f:
                return f.read() == text
        except OSError:
            return False
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", metavar="RUN.json", help="bench.py --json output to summarise")
    ap.add_argument("--suite", metavar="RUN.jsonl", help="diagnose.py --results file to summarise")
    ap.add_argument("--tp", metavar="TP.jsonl", help="bench/bench_tp.py --json output to summarise")
    ap.add_argument("--name", help="the summary's name: docs/results/NAME.json (bench default: bench_<device>)")
    ap.add_argument("--command", help="the command that produced the run (recorded with it)")
    ap.add_argument("--topic", help=f"suite summaries: the RESULTS.md topic (default: {REAL_TOPIC!r} for a name "
                                    f"starting with 'real', else {GENERATED_TOPIC!r})")
    ap.add_argument("--device", help="suite runs: the machine (default: cpu)")
    ap.add_argument("--date", help="suite runs: YYYY-MM-DD (default: the file's modification date)")
    ap.add_argument("--commit", help="suite and tp runs: the commit run (default: this checkout's HEAD)")
    ap.add_argument("--torch", help="suite runs: torch version (default: the installed one)")
    ap.add_argument("--transformers", help="suite and tp runs: transformers version (default: the installed one)")
    ap.add_argument("--results-dir", default=RESULTS_DIR, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=RESULTS_MD, help=argparse.SUPPRESS)
    ap.add_argument("--check", action="store_true", help="only check that RESULTS.md matches the summaries")
    args = ap.parse_args(argv)
    try:
        if sum(bool(x) for x in (args.bench, args.suite, args.tp)) > 1:
            raise Bad("give one of --bench, --suite, --tp (one summary per call)")
        if args.name is not None and not NAME.match(args.name):
            raise Bad(f"--name {args.name!r}: letters, digits, '_', '.', '-' only")
        if args.suite and not args.name:
            raise Bad("--suite needs --name (e.g. real_heldout_bridge)")
        if args.date and not re.match(r"^\d{4}-\d{2}-\d{2}$", args.date):
            raise Bad(f"--date {args.date!r}: expected YYYY-MM-DD")
        summary = None
        if args.bench:
            run = read_json(args.bench, "--bench")
            device = (run.get("header") or {}).get("device", "gpu") if isinstance(run, dict) else "gpu"
            name = args.name or "bench_" + re.sub(r"[^a-z0-9]+", "_", str(device).lower()).strip("_")
            summary = summarise_bench(run, name, args.command)
        elif args.tp:
            summary = summarise_tp(args.tp, args.name or "tensor_parallel", args.command, args.commit,
                                   args.transformers)
        elif args.suite:
            summary = suite_summary(args.suite, args.name, args.command, args.topic, args.device, args.date,
                                    args.commit, args.torch, args.transformers)
        if summary is not None:
            print(f"wrote {os.path.relpath(write_summary(summary, args.results_dir))}")
        ok = regenerate(args.results_dir, args.out, check=args.check)
    except Bad as e:
        sys.stderr.write(f"make_results.py: error: {e}\n")
        return 2
    if args.check:
        if not ok:
            sys.stderr.write(f"{args.out} differs from what docs/results/ gives: run python docs/make_results.py\n")
        return 0 if ok else 1
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
