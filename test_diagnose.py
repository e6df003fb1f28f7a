"""diagnose.py end to end on a randomly initialised tiny Llama and a word-level tokenizer built here
(CPU, offline, a few seconds), the suite reader, the suite generator, and the match_span policy."""

import io
import json
import re
from contextlib import redirect_stdout

import pytest
import torch

import cab_reference as ref
import diagnose
import make_qa_suite
from cab_reference import CabCache, EvictionConfig, select_kept, select_parts

ITEMS = [
    {"id": "a", "context": diagnose.DEFAULT_CONTEXT, "question": diagnose.DEFAULT_QUESTION,
     "answer": diagnose.DEFAULT_ANSWER},
    {"id": "b", "context": "The password for the red vault is falcon . The password for the blue vault is walrus . "
                           "Local markets open early on Saturdays .",
     "question": "What is the password for the red vault ?", "answer": "falcon"},
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


def test_prompt_spans_come_from_offsets(tiny):
    _, tokenizer = tiny
    prompt = diagnose.build_prompt(tokenizer, ITEMS[0]["context"], ITEMS[0]["question"], ITEMS[0]["answer"])
    assert "".join(prompt.tokens[p] + " " for p in prompt.answer_positions).strip() == "McLaren Vale"
    assert " ".join(prompt.tokens[p] for p in prompt.question_positions) == \
        " ".join(t for t, _ in __import__("tokenizers").pre_tokenizers.Whitespace().pre_tokenize_str(
            ITEMS[0]["question"]))
    assert prompt.question_span == (prompt.question_positions[0], prompt.question_positions[-1] + 1)


def test_text_mode_end_to_end(tiny, tmp_path):
    page = tmp_path / "ranks.html"
    out, reports = run_main(["--policy", "h2o", "match_span", "streaming", "--layers", "--max-new-tokens", "3",
                             "--html", str(page)], tiny)
    assert "\033[" not in out                       # not a terminal: no colour
    for policy in ("h2o", "match_span", "streaming"):
        assert f"== {policy}" in out
    assert "answer tokens kept" in out and "greedy answer" in out and "layer  1" in out
    assert re.search(r"budget \d+/\d+", out)
    html = page.read_text()
    assert html.count("<h2>") == 3 and "class='ev" in html and "ans" in html


def test_json_retention_agrees_with_kept_indices(tiny):
    out, _ = run_main(["--policy", "h2o", "snapkv", "match_span", "delayed", "--json", "--layers",
                       "--max-new-tokens", "3"], tiny)
    data = json.loads(out)
    answer, question = data["answer_positions"], data["question_positions"]
    assert answer and question
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
        assert isinstance(rep["output"], str)


def test_analysis_matches_the_cache(tiny):
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = diagnose.build_prompt(tokenizer, ITEMS[0]["context"], ITEMS[0]["question"], ITEMS[0]["answer"])
    engine.prefill(prompt)
    cache, _ = engine.generate(EvictionConfig(policy="h2o", sparsity=0.9), max_new_tokens=1)
    a = diagnose.analyse(cache, prompt)
    for l, layer in enumerate(cache.layers):
        kept_positions = layer.positions[0]                                   # (H, K), nothing decoded
        for h in range(kept_positions.shape[0]):
            assert set(kept_positions[h].tolist()) == set(a["kept"][l, h].nonzero().flatten().tolist())


@pytest.mark.parametrize("policy", ["h2o", "snapkv", "match_span", "delayed", "cab"])
def test_replay_matches_generate(tiny, policy):
    """The engine's replayed prefill + greedy loop = model.generate with a CabCache."""
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = diagnose.build_prompt(tokenizer, ITEMS[0]["context"], ITEMS[0]["question"], ITEMS[0]["answer"])
    engine.prefill(prompt)
    config = EvictionConfig(policy=policy, sparsity=0.8)
    cache, text = engine.generate(config, max_new_tokens=4)
    reference = CabCache(config, question_span=prompt.question_span)
    with torch.no_grad():
        out = model.generate(prompt.ids, max_new_tokens=4, do_sample=False, attention_mask=torch.ones_like(prompt.ids),
                             **{diagnose._cache_kwarg(model): reference})   # cache= on 5.24, past_key_values= on 5.17
    assert text == tokenizer.decode(out[0, prompt.ids.shape[1]:], skip_special_tokens=True).strip().split("\n")[0].strip()
    for mine, theirs in zip(cache.kept_positions(), reference.kept_positions()):
        assert torch.equal(mine.sort(-1).values, theirs.sort(-1).values)


def test_suite_end_to_end(tiny, tmp_path):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    out, _ = run_main(["--suite", str(path), "--sparsity", "0.5", "0.9", "--policy", "h2o", "match_span",
                       "--json", "--max-new-tokens", "2"], tiny)
    data = json.loads(out)
    assert len(data["rows"]) == len(ITEMS) * 2 * 2
    for row in data["rows"]:
        assert 0.0 <= row["answer_retention"] <= 1.0 and 0.0 <= row["question_retention"] <= 1.0
        assert row["correct"] == diagnose.contains(row["output"], row["answer"])
    text, table = run_main(["--suite", str(path), "--sparsity", "0.9", "--policy", "h2o", "--max-new-tokens", "2"],
                           tiny)
    assert "sparsity 0.90" in text and "h2o" in text and "dense accuracy" in text


@pytest.mark.parametrize("line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"id": "x", "context": "a b", "question": "q?"}', "missing key(s) answer"),
    ('{"id": "x", "context": "a b", "question": "q?", "answer": 3}', "'answer' must be a non-empty string"),
    ('{"id": "x", "context": "a b", "question": "q?", "answer": "zebra"}', "does not occur in the context"),
])
def test_suite_reader_rejects_malformed_lines_with_line_number(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(ITEMS[1])
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(ValueError) as err:
        diagnose.read_suite(str(path))
    assert f"{path}:3:" in str(err.value) and message in str(err.value)


def test_suite_reader_cli_error(tiny, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": 1}\n')
    with pytest.raises(SystemExit, match=r"bad.jsonl:1: missing key"):
        run_main(["--suite", str(path)], tiny)


def test_answer_scoring():
    assert diagnose.contains("It is McLaren Vale.", "McLaren Vale")
    assert not diagnose.contains("Barossa", "McLaren Vale")
    assert diagnose.token_f1("the McLaren Vale region", "McLaren Vale") == pytest.approx(0.8)


def test_shipped_suite_is_what_the_generator_writes():
    items = make_qa_suite.make_suite()
    with open("qa_suite.jsonl") as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == items and len(items) >= 30
    for item in items:
        assert item["answer"] in item["context"] and 1 <= len(item["answer"].split()) <= 3
        assert 0.05 <= item["depth"] <= 0.95
    assert diagnose.read_suite("qa_suite.jsonl")


# ----------------------------------------------------------------------------------------------------
# match_span (fix 6)

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
    config = EvictionConfig(policy="match_span", budget=budget, span_radius=radius, match_window=1)
    sel = select_parts(scores, config, question_match=match)
    kept = sel.kept
    assert kept.shape == (1, 2, budget)                              # budget honoured
    sinks = min(config.span_sinks, budget)
    recent = min(budget - sinks, max(1, int(budget * config.recent_ratio)))
    span = budget - sinks - recent
    for h in range(2):
        got = set(kept[0, h].tolist())
        assert set(range(sinks)) <= got
        assert set(range(n - recent, n)) <= got
        if span >= 2 * radius + 1:
            assert set(range(peak - radius, peak + radius + 1)) <= got
    assert torch.equal(select_kept(scores, config, question_match=match), kept)


def test_match_span_needs_the_question():
    with pytest.raises(ValueError, match="question_match"):
        select_kept(torch.rand(1, 1, 20), EvictionConfig(policy="match_span", budget=5))
    for bad in ({"match_window": 4}, {"span_radius": -1}, {"match_threshold": 1.0}, {"match_layers": 0},
                {"span_sinks": -1}):
        with pytest.raises(ValueError):
            EvictionConfig(policy="match_span", **bad)


def test_match_span_shares_the_first_layers_evidence(tiny):
    model, tokenizer = tiny
    engine = diagnose.Engine(model, tokenizer)
    prompt = diagnose.build_prompt(tokenizer, ITEMS[0]["context"], ITEMS[0]["question"], ITEMS[0]["answer"])
    engine.prefill(prompt)
    cache = engine.replay(EvictionConfig(policy="match_span", match_layers=1))
    first, second = (layer.prompt_record["evidence"]["question_match"] for layer in cache.layers)
    assert torch.equal(first, second)
    own = ref.question_match(engine.layers[1][3], torch.zeros(1, prompt.ids.shape[1], dtype=torch.bool).index_fill_(
        1, torch.tensor(prompt.question_positions), True))
    both = engine.replay(EvictionConfig(policy="match_span", match_layers=2))
    mean = both.layers[1].prompt_record["evidence"]["question_match"]
    assert torch.allclose(mean, (first + own) / 2)


def test_prompt_file_and_explicit_context(tiny, tmp_path):
    spec = tmp_path / "prompt.json"
    spec.write_text(json.dumps(ITEMS[1]))
    out, _ = run_main(["--prompt-file", str(spec), "--policy", "h2o", "--json", "--max-new-tokens", "2"], tiny)
    data = json.loads(out)
    assert data["answer"] == "falcon" and len(data["answer_positions"]) == 1
    out, _ = run_main(["--context", ITEMS[1]["context"], "--question", ITEMS[1]["question"], "--answer", "falcon",
                       "--policy", "match_span", "--sparsity", "0.5", "--span-radius", "2", "--json",
                       "--max-new-tokens", "2"], tiny)
    rep = json.loads(out)["policies"][0]
    assert rep["policy"] == "match_span" and rep["sparsity"] == 0.5


def test_colour_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv("NO_COLOR", raising=False)
    assert diagnose.use_colour(Tty()) and not diagnose.use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not diagnose.use_colour(Tty())
    assert diagnose.Style(False)("x", "32") == "x" and diagnose.Style(True)("x", "32") == "\033[32mx\033[0m"


def test_bad_config_is_a_clear_error(tiny):
    with pytest.raises(SystemExit, match="sparsity"):
        run_main(["--sparsity", "1.5"], tiny)
