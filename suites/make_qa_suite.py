"""Write qa_suite.jsonl: synthetic extractive-QA items for `python diagnose.py --suite suites/qa_suite.jsonl`.

Deterministic (a fixed seed, no downloads): `python suites/make_qa_suite.py` rewrites the same file. Each item
hides one needle fact among filler sentences and 2-4 distractor facts of the same type (same sentence
pattern, different entity and attribute), at a depth of 10-90% of the context. The question asks for the
needle's entity by its attribute; the answer is 1-3 words that occur verbatim in the needle.
"""

from __future__ import annotations

import argparse
import json
import os
import random

FILLER = [
    "The weather in the region is usually mild in spring and wet in late autumn.",
    "Local markets open early on Saturdays and sell bread, cheese and fresh fruit.",
    "Most visitors arrive by road, although a regional train runs twice a day.",
    "The council repaired several bridges last year after a long period of heavy rain.",
    "Schools in the area close for two weeks in the middle of winter.",
    "A small museum near the main square displays old farming tools and photographs.",
    "Many families have lived in the district for several generations.",
    "The annual festival draws musicians from neighbouring towns and villages.",
    "Cycling paths follow the old railway line through the hills.",
    "The library extended its opening hours after a public survey.",
    "Tourism grew steadily during the last decade, especially in summer.",
    "A new community garden was planted beside the primary school.",
    "Several cafes along the high street serve breakfast until noon.",
    "The hospital added a maternity wing with twenty new beds.",
    "Birdwatchers often gather at the lake at dawn to watch migrating flocks.",
    "The local newspaper has been printed every week since the nineteenth century.",
    "Farmers in the valley grow wheat, barley and a little canola.",
    "An old stone church stands at the top of the hill overlooking the town.",
    "The football club trains on Tuesday and Thursday evenings.",
    "Road works on the main highway are expected to finish next month.",
    "Volunteers clean the beaches every first Sunday of the month.",
    "The post office moved to a larger building near the railway station.",
    "Evening concerts are held in the park during the warmer months.",
    "A ferry crosses the bay every hour between seven and seven.",
]

FAMILIES = {
    "wine": {
        "entities": ["McLaren Vale", "Barossa Valley", "Clare Valley", "Eden Valley", "Coonawarra",
                     "Langhorne Creek", "Padthaway", "Wrattonbully", "Riverland", "Kangaroo Island"],
        "attributes": [f"{d} km {w} of {c}" for d, w, c in [
            (55, "south", "Adelaide"), (60, "north-east", "Adelaide"), (120, "north", "Adelaide"),
            (70, "east", "Adelaide"), (380, "south-east", "Adelaide"), (80, "south-east", "Murray Bridge"),
            (45, "north", "Naracoorte"), (30, "north", "Penola"), (200, "east", "Mildura"),
            (15, "west", "Cape Jervis")]],
        "fact": "{e} is a wine region located {a}, known for its rich red wines.",
        "question": "Which wine region is located {a}?",
    },
    "inventor": {
        "entities": ["Ada Whitlock", "Bruno Castellane", "Clara Mendez", "Dmitri Volkov", "Elena Rossi",
                     "Farid Haddad", "Greta Lindqvist", "Hiro Tanaka", "Ingrid Olsen", "Jonas Becker"],
        "attributes": ["folding bicycle lock", "solar kettle", "pocket telescope", "silent alarm clock",
                       "glass umbrella", "floating lantern", "copper compass", "wooden calculator",
                       "steam whistle", "paper microscope"],
        "fact": "The {a} was invented by {e} in a small workshop.",
        "question": "Who invented the {a}?",
    },
    "vault": {
        "entities": ["falcon", "granite", "lantern", "meadow", "saffron", "thunder", "violet", "walrus",
                     "harbour", "cobalt"],
        "attributes": ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "silver",
                       "golden"],
        "fact": "The password for the {a} vault is {e}, and it changes every year.",
        "question": "What is the password for the {a} vault?",
    },
    "river": {
        "entities": ["Marrow River", "Tilden River", "Caswell River", "Oberon River", "Fenwick River",
                     "Ashby River", "Loddon River", "Pellam River", "Quarry River", "Sorrel River"],
        "attributes": ["Brackenford", "Elmstead", "Harlow Cross", "Kingsbury", "Millbrook", "Northcote",
                       "Oakhurst", "Redvale", "Stonebridge", "Willowby"],
        "fact": "The town of {a} lies on the banks of the {e}, which floods most winters.",
        "question": "On which river does the town of {a} lie?",
    },
    "pet": {
        "entities": ["Biscuit", "Pepper", "Juniper", "Waffles", "Clover", "Mango", "Pickles", "Rusty",
                     "Sprout", "Tofu"],
        "attributes": ["Martha", "Oliver", "Priya", "Samuel", "Tomasz", "Yuki", "Leila", "Marcus",
                       "Nadia", "Edgar"],
        "fact": "{a} has a small dog named {e} that sleeps by the fire.",
        "question": "What is the name of {a}'s dog?",
    },
}


def make_item(rng: random.Random, index: int, family: str, depth: float, n_filler: int, n_distractors: int):
    spec = FAMILIES[family]
    picks = rng.sample(range(len(spec["entities"])), n_distractors + 1)
    attrs = rng.sample(range(len(spec["attributes"])), n_distractors + 1)
    facts = [spec["fact"].format(e=spec["entities"][e], a=spec["attributes"][a]) for e, a in zip(picks, attrs)]
    needle, distractors = facts[0], facts[1:]
    sentences = [rng.choice(FILLER) for _ in range(n_filler)]
    # distractors anywhere except the needle's slot; the needle at depth * (number of sentences)
    for fact in distractors:
        sentences.insert(rng.randrange(len(sentences) + 1), fact)
    slot = round(depth * len(sentences))
    sentences.insert(slot, needle)
    return {
        "id": f"{family}-{index:02d}",
        "context": " ".join(sentences),
        "question": spec["question"].format(a=spec["attributes"][attrs[0]]),
        "answer": spec["entities"][picks[0]],
        "depth": round(slot / (len(sentences) - 1), 2),
    }


def make_suite(n: int = 40, seed: int = 0):
    rng = random.Random(seed)
    families = list(FAMILIES)
    items = []
    for i in range(n):
        depth = 0.1 + 0.8 * (i % 9) / 8          # 0.1, 0.2, ..., 0.9, cycling
        items.append(make_item(rng, i, families[i % len(families)], depth,
                               n_filler=rng.randint(14, 22), n_distractors=rng.randint(2, 4)))
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "qa_suite.jsonl"),
                        help="output file (default: qa_suite.jsonl beside this script)")
    parser.add_argument("-n", type=int, default=40, help="number of items (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args()
    with open(args.out, "w") as f:
        for item in make_suite(args.n, args.seed):
            f.write(json.dumps(item) + "\n")
    print(f"wrote {args.n} items to {args.out}")


if __name__ == "__main__":
    main()
