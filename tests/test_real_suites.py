"""suites/make_real_suites.py on made-up items in the official formats (suites/fixture/): the selection
rules, the contexts it writes, the splits, and that diagnose.py reads what it writes."""

import importlib.util
import json
import os

import pytest

import diagnose

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository root
FIXTURE = os.path.join(ROOT, "suites", "fixture")
_spec = importlib.util.spec_from_file_location("make_real_suites", os.path.join(ROOT, "suites", "make_real_suites.py"))
real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(real)


@pytest.fixture(scope="module")
def suites():
    return real.build(FIXTURE, "dev")


def test_bridge_keeps_only_an_answer_found_once_inside_a_supporting_fact(suites):
    (item,) = suites["hotpotqa_bridge"]         # b-twice: answer also a title; b-outside: not in a supporting fact
    assert item["id"] == "hotpotqa-0" and item["answer"] == "Telsby"
    assert item["context"].startswith("Harlow Bridge\nThe Harlow Bridge was designed by Mira Ostrand. It opened")
    assert "\n\nMira Ostrand\nMira Ostrand was an architect. She grew up in Telsby" in item["context"]


def test_comparison_keeps_entity_answers_not_yes_or_no(suites):
    assert [i["answer"] for i in suites["hotpotqa_comparison"]] == ["Petra Novak"]


def test_squad_context_is_the_answers_paragraph_and_five_others_in_article_order(suites):
    items = {i["id"]: i for i in suites["squad"]}
    hq = items["squad-0-q-hq"]
    paragraphs = hq["context"].split("\n\n")
    assert len(paragraphs) == real.SQUAD_PARAGRAPHS and "Orlin Foods has its headquarters" in hq["context"]
    numbers = [int(p.split()[1]) for p in paragraphs if p.startswith("Paragraph")]
    assert numbers == sorted(numbers)            # the article's order
    assert not any("q-none" in i for i in items)  # unanswerable questions are skipped


def test_squad_goes_round_robin_over_articles(suites):
    assert [i["id"] for i in suites["squad"]][:2] == ["squad-0-q-hq", "squad-1-q-tower"]


def test_squad_paragraph_choice_is_seeded_by_the_question(suites):
    again = real.build(FIXTURE, "dev")["squad"]
    assert again == suites["squad"]


def test_splits_take_their_item_and_article_ranges():
    with open(os.path.join(FIXTURE, "hotpotqa.json")) as f:
        records = json.load(f)
    assert real.hotpot_suite(records, range(1, 5), "hotpotqa_bridge") == []     # item 0 is outside
    assert real.SPLITS["dev"][0] == range(0, 2000) and real.SPLITS["check"][0] == range(2000, 4000)
    assert real.SPLITS["heldout"][0].start == 4000 and real.SPLITS["heldout"][1].start == 20
    assert real.build(FIXTURE, "heldout") == {}                                 # the fixture has no held-out items


def test_diagnose_reads_the_written_suites(tmp_path):
    real.main(["--split", "dev", "--data", FIXTURE, "--out", str(tmp_path)])
    paths = sorted(str(p) for p in tmp_path.iterdir())
    items = diagnose.read_suite(paths)
    assert {i["setting"] for i in items} == {"hotpotqa_bridge", "hotpotqa_comparison", "squad"}
