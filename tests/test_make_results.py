"""docs/make_results.py on made-up runs: a bench.py --json object and diagnose.py --results files in tmp_path.
The suite summaries average as diagnose.py's own suite table does, carry no text of the items (the real
suites are CC BY-SA data), and RESULTS.md is regenerated from the summaries alone; the committed RESULTS.md
is what the committed summaries give."""

import importlib.util
import json
import math
import os
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
_spec = importlib.util.spec_from_file_location("make_results", os.path.join(ROOT, "docs", "make_results.py"))
mr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mr)

HEADER = {"device": "NVIDIA Test GPU", "sms": 132, "memory_gib": 79.2, "torch": "2.11.0+cu130", "triton": "3.6.0",
          "transformers": "5.17.0", "cuda": "13.0", "commit": "abc1234", "date": "2026-12-07"}
BENCH_ROWS = [
    {"section": "overhead", "call": "decode", "nq": 1, "nk": 64, "sdpa_us": 20.0, "fast_us": 30.0,
     "fast_validate_us": 200.0, "ratio": 1.5},
    {"section": "first_call", "cache": "cold", "import_torch_s": 3.1, "import_cab_fast_s": 2.0, "decode_4k_s": 0.9,
     "decode_new_len_s": 0.002, "decode_short_s": 0.5, "prefill_2k_s": 1.4, "prefill_new_len_s": 0.8,
     "padded_prefill_s": 1.9},
    {"section": "prefill", "n": 4096, "hq": 32, "hkv": 8, "d": 128, "sdpa_ms": 0.25, "sdpa_flash_ms": 0.5,
     "fast_ms": 0.4, "fast_validate_ms": 0.8, "fast_triton_fwd_ms": 0.3, "score_pass_ms": 0.19,
     "ratio_vs_sdpa": 1.6, "fast_tflops": 300.0, "sdpa_tflops": 500.0, "score_pass_extra_mib": 0.1,
     "reference_ms": 18.0, "reference_peak_gib": 6.3, "tiles": "fwd 128/128 w8 s3 | score 64/128 w4 s3"},
    {"section": "decode", "n": 32768, "hq": 32, "hkv": 8, "d": 128, "sdpa_ms": 0.05, "fast_ms": 0.055,
     "fast_validate_ms": 0.5, "fast_graph_ms": 0.052, "sdpa_graph_ms": 0.05, "graph_ratio": 1.04,
     "ratio_vs_sdpa": 1.1, "fast_tb_s": 2.5, "sdpa_tb_s": 2.6, "tile": "64 w4 s4 1/SM"},
    {"section": "e2e_b1", "dense_None": {"prefill_s": 0.24, "step_ms": 50.0, "kv_mib": 1025.0},
     "evict_1": {"prefill_s": 0.30, "step_ms": 12.5, "kv_mib": 107.0},
     "evict_64": {"prefill_s": 0.32, "step_ms": 10.0, "kv_mib": 109.0}},
    {"section": "e2e_dense_step_check", "no_sync_ms": 20.0, "synced_ms": 21.0,
     "profile": "-------\nName  Self CPU %\naten::_cudnn_attention_forward ...\n"},
    {"section": "e2e_generate", "dense": {"new_lengths_ms": 68.0, "same_lengths_ms": 19.0},
     "evict": {"new_lengths_ms": 17.0, "same_lengths_ms": 19.0}},
    {"section": "e2e_generate_overhead", "generate_ms_per_token": 40.0, "forward_ms_per_token": 37.0,
     "outside_ms_per_token": 3.0, "profile": "ncalls tottime\n..."},
    {"section": "e2e_graphs", "dense": {"eager_ms": 60.0, "graph_ms": 45.0, "graph_tok_s": 177.0},
     "evict": {"eager_ms": 20.0, "graph_ms": 4.0, "graph_tok_s": 2000.0}},
    {"section": "e2e_capacity", "gpu_gib": 79.6, "free_gib": 77.0, "budget": 3276,
     "dense": {"per_seq_mib": 1280.6, "batch": 54, "out_of_memory_at": 55, "step_ms": 295.7, "peak_gib": 70.2,
               "tok_s": 183.0},
     "evict": {"per_seq_mib": 108.7, "batch": 656, "out_of_memory_at": 657, "cut_step_ms": 132.8, "step_ms": 33.2,
               "amortised_ms": 34.8, "peak_gib": 73.2, "tok_s": 18865.0}},
    {"section": "policy_overhead", "n": 4096, "dense_s": 0.02, "h2o": 0.06, "snapkv": 0.05, "match_span": 0.09},
    {"section": "score_free_prefill", "n": 32768, "policy": "match_span", "dense_s": 0.24, "fast_s": 0.25},
]


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def run_main(tmp_path, *args):
    out = tmp_path / "RESULTS.md"
    code = mr.main([*args, "--results-dir", str(tmp_path / "results"), "--out", str(out)])
    return code, (out.read_text(encoding="utf-8") if out.exists() else "")


def summary(tmp_path, name):
    return json.loads((tmp_path / "results" / f"{name}.json").read_text(encoding="utf-8"))


def test_bench_summary_keeps_numbers_and_provenance_and_renders_every_section(tmp_path):
    run = write(tmp_path / "run.json", json.dumps({"header": HEADER, "rows": BENCH_ROWS}))
    code, md = run_main(tmp_path, "--bench", run, "--command", "python bench/bench.py --json")
    assert code == 0
    s = summary(tmp_path, "bench_nvidia_test_gpu")                       # named after the device
    assert s["provenance"]["device"] == "NVIDIA Test GPU" and s["provenance"]["commit"] == "abc1234"
    assert s["provenance"]["command"] == "python bench/bench.py --json"
    e2e = next(r for r in s["rows"] if r["section"] == "e2e_b1")
    assert e2e["evict_64.prefill_s"] == 0.32                             # nested results flattened
    assert not any("profile" in r for r in s["rows"])                    # profiler text left out
    for title in ("## Prefill", "## Decode", "## Host time per call", "## First calls", "## End to end",
                  "## Capacity on one GPU", "## Cost of each policy's evidence", "## `score_free_prefill`"):
        assert title in md, title
    assert "NVIDIA Test GPU (132 SMs, 79.2 GiB); torch 2.11.0+cu130, triton 3.6.0" in md
    assert "commit abc1234, 2026-12-07" in md
    assert "| prefill, B=1 (s) | 0.240 | 0.300 (1.25x) | 0.320 (1.33x) |" in md     # ratios to dense
    assert "30.0 (1.50x)" in md                                          # host time: fast / SDPA
    assert "| eviction, evict_every=64 | 108.7 | 656 (657) | 33.2 | 132.8 | 34.8 | 18,865 | 73.2 |" in md
    assert "0.0900 (1.50x)" in md                                        # match_span over h2o
    assert "| n | policy | dense_s | fast_s |" in md                     # an unknown section: its fields
    assert "- tiles: fwd 128/128 w8 s3 | score 64/128 w4 s3" in md
    assert "| dense generate() per token: all / model.forward / outside it (ms) | 40.0 / 37.0 / 3.00 |" in md


def test_tensor_parallel_rows_from_bench_tp(tmp_path):
    lines = ["# NVIDIA H100 80GB HBM3 x2, 2026-12-07, torch 2.11.0+cu130: bench_tp.py, prompt 32768, 8 layers, 32 "
             "decode steps"]
    lines += [json.dumps({"config": "dense", "gpus": gpus, "prefill_s": 0.1 * gpus, "tokens_per_s": 16.0,
                          "kv_cache_mib_per_gpu": 512.5 / gpus, "peak_mib_per_gpu": 2096.0}) for gpus in (1, 2)]
    path = write(tmp_path / "tp.jsonl", "\n".join(lines) + "\n")
    code, md = run_main(tmp_path, "--tp", path, "--commit", "abc1234", "--transformers", "5.17.0")
    assert code == 0
    s = summary(tmp_path, "tensor_parallel")
    assert s["provenance"]["device"] == "2x NVIDIA H100 80GB HBM3" and s["provenance"]["date"] == "2026-12-07"
    assert [r["gpus"] for r in s["rows"]] == [1, 2]
    assert "## Tensor parallelism" in md and "| dense | 2 | 0.200 | 16.0 | 256.2 | 2,096 |" in md


def suite_lines(after=False):
    """Two items, two policies, sparsity 0.9; item b's context does not help (benefit None); item texts are
    distinctive so that a leak would be found."""
    run = {"diagnose_run": {"question_after_cut": after, "max_new_tokens": 8, "model": None, "gguf_file": None,
                            "budget": None, "per_head": "true", "evict_every": 1, "knobs": {}}}
    rows = []
    for item, n, budget, dense_ok, benefits in (("item-SECRET-ID-a", 1000, 100, True, (0.5, 0.25)),
                                                 ("item-SECRET-ID-b", 2000, 250, False, (None, None))):
        for policy, ret, qret, ok, benefit in (("h2o", 0.1, 0.8, False, benefits[0]),
                                               ("match_span", 0.6, 0.4, True, benefits[1])):
            rows.append({"id": item, "setting": "hotpotqa_bridge", "policy": policy, "sparsity": 0.9, "n": n,
                         "budget": budget, "answer": "Zanzibar Quokka", "output": "the Quokka of Zanzibar",
                         "dense": "dense SAID Zanzibar", "question": "Which QUESTION-TEXT?", "context": "CTX-TEXT",
                         "answer_retention": ret + (0.2 if item.endswith("b") else 0.0),
                         "question_retention": None if after else qret, "correct": ok and item.endswith("a"),
                         "f1": 0.5 if ok else 0.0, "dense_correct": dense_ok, "dense_f1": 1.0 if dense_ok else 0.0,
                         "answer_nll": 2.0, "dense_nll": 1.0, "no_context_nll": 3.0, "context_benefit_kept": benefit})
    return [json.dumps(run)] + [json.dumps(r) for r in rows]


def test_suite_summary_averages_as_diagnose_does(tmp_path):
    path = write(tmp_path / "bridge.jsonl", "\n".join(suite_lines()) + "\n")
    code, md = run_main(tmp_path, "--suite", path, "--name", "real_heldout_bridge", "--device", "cpu (test)",
                        "--date", "2026-12-07", "--commit", "def5678", "--command", "python diagnose.py --suite X")
    assert code == 0
    s = summary(tmp_path, "real_heldout_bridge")
    assert s["topic"] == "Real questions"
    assert s["provenance"]["items"] == 2 and s["provenance"]["results"] == 4
    assert s["provenance"]["commit"] == "def5678" and s["provenance"]["date"] == "2026-12-07"
    (g,) = s["groups"]
    assert (g["setting"], g["sparsity"], g["question_after_cut"], g["items"]) == ("hotpotqa_bridge", 0.9, False, 2)
    assert g["benefit_items"] == 1 and g["dense_correct"] == 0.5 and g["dense_f1"] == 0.5
    p = {x["policy"]: x for x in g["policies"]}
    assert p["h2o"]["answer_retention"] == pytest.approx((0.1 + 0.3) / 2)
    assert p["h2o"]["question_retention"] == pytest.approx(0.8)
    assert p["h2o"]["context_benefit_kept"] == 0.5 and p["h2o"]["benefit_items"] == 1     # over helped items only
    assert p["match_span"]["context_benefit_kept"] == 0.25
    assert p["match_span"]["correct"] == 0.5 and p["match_span"]["vs_dense"] == 0.0
    assert p["h2o"]["vs_dense"] == -0.5 and p["h2o"]["items"] == 2
    assert p["random (expected)"]["answer_retention"] == pytest.approx((0.1 + 0.125) / 2)  # mean budget / n
    assert "| [1] real_heldout_bridge | hotpotqa_bridge | before | 0.90 | dense |" in md
    assert "| h2o | 0.20 | 0.80 | 0.50 (1) | 0.00 |" in md
    assert "commit def5678, 2026-12-07" in md and "`python diagnose.py --suite X`" in md


def test_question_after_the_cut_has_no_question_retention(tmp_path):
    path = write(tmp_path / "after.jsonl", "\n".join(suite_lines(after=True)) + "\n")
    assert run_main(tmp_path, "--suite", path, "--name", "real_after")[0] == 0
    (g,) = summary(tmp_path, "real_after")["groups"]
    assert g["question_after_cut"] is True
    assert all(p["question_retention"] is None for p in g["policies"])


def test_no_item_text_reaches_the_summary_or_the_markdown(tmp_path):
    path = write(tmp_path / "bridge.jsonl", "\n".join(suite_lines()) + "\n")
    _, md = run_main(tmp_path, "--suite", path, "--name", "real_x")
    stored = (tmp_path / "results" / "real_x.json").read_text(encoding="utf-8")
    for text in ("SECRET", "Zanzibar", "Quokka", "SAID", "QUESTION-TEXT", "CTX-TEXT"):
        assert text not in stored and text not in md, text


def test_a_setting_that_is_free_text_is_refused(tmp_path, capsys):
    lines = suite_lines()
    row = json.loads(lines[1])
    row["setting"] = "Who wrote the novel that the film was based on? " * 3
    path = write(tmp_path / "bad.jsonl", "\n".join([lines[0], json.dumps(row)]) + "\n")
    assert run_main(tmp_path, "--suite", path, "--name", "real_bad")[0] == 2
    assert "is not a short name" in capsys.readouterr().err
    assert not (tmp_path / "results" / "real_bad.json").exists()


def test_bad_inputs_are_one_line(tmp_path, capsys):
    path = write(tmp_path / "norun.jsonl", json.dumps({"id": "a"}) + "\n")
    assert run_main(tmp_path, "--suite", path, "--name", "x")[0] == 2
    assert run_main(tmp_path, "--suite", path)[0] == 2                  # --name is required
    assert run_main(tmp_path, "--bench", write(tmp_path / "b.json", "[1, 2]"))[0] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("make_results.py: error: ") for line in err)


def test_transcribed_summaries_give_way_to_measured_ones(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    old = {"kind": "suite", "name": "notes_real", "topic": "Real questions",
           "provenance": {"device": "cpu", "date": "2026-12-06", "transcribed": "from NOTES.md"},
           "groups": [{"setting": "squad", "sparsity": 0.9, "question_after_cut": False, "items": 16,
                       "policies": [{"policy": "OLDPOLICY", "answer_retention": 0.78, "items": 16}]}]}
    (results / "notes_real.json").write_text(json.dumps(old), encoding="utf-8")
    _, md = run_main(tmp_path)
    assert "OLDPOLICY" in md and "(transcribed)" in md
    path = write(tmp_path / "bridge.jsonl", "\n".join(suite_lines()) + "\n")
    _, md = run_main(tmp_path, "--suite", path, "--name", "real_new")
    assert "OLDPOLICY" not in md.split("## Runs")[0]                    # the table shows the measured run only


def test_regenerating_is_deterministic_and_check_says_so(tmp_path):
    run = write(tmp_path / "run.json", json.dumps({"header": HEADER, "rows": BENCH_ROWS}))
    path = write(tmp_path / "bridge.jsonl", "\n".join(suite_lines()) + "\n")
    run_main(tmp_path, "--bench", run)
    _, first = run_main(tmp_path, "--suite", path, "--name", "real_b", "--date", "2026-12-07")
    code, again = run_main(tmp_path)
    assert code == 0 and again == first
    assert run_main(tmp_path, "--check")[0] == 0
    (tmp_path / "RESULTS.md").write_text(first + "typed by hand\n", encoding="utf-8")
    assert run_main(tmp_path, "--check")[0] == 1


def test_the_committed_results_md_is_what_the_committed_summaries_give():
    assert mr.main(["--check"]) == 0, "docs/RESULTS.md is stale: run python docs/make_results.py"


def test_averages_equal_diagnose_summarise():
    """The same rows through diagnose.py's own summarise() give the same numbers."""
    diagnose = pytest.importorskip("diagnose")
    lines = suite_lines()
    rows = [json.loads(line) for line in lines[1:]]
    items = [{"id": i, "setting": "hotpotqa_bridge"} for i in dict.fromkeys(r["id"] for r in rows)]
    plan = SimpleNamespace(items=items,
                           sparsities=[0.9], policies=[SimpleNamespace(name="h2o"), SimpleNamespace(name="match_span")],
                           not_applicable=lambda policy: None, args=SimpleNamespace(question_after_cut=False))
    theirs = {t["policy"]: t for t in diagnose.summarise(rows, plan)}
    (ours,) = mr.summarise_suite(json.loads(lines[0])["diagnose_run"], rows)
    for p in ours["policies"]:
        for key, value in p.items():
            if key in theirs[p["policy"]] and key != "policy":
                expected = theirs[p["policy"]][key]
                if isinstance(expected, float) and math.isnan(expected):
                    expected = None
                assert value == pytest.approx(expected) if value is not None else expected is None, (p["policy"], key)
    assert ours["dense_correct"] == theirs["h2o"]["dense_correct"] and ours["dense_f1"] == theirs["h2o"]["dense_f1"]
