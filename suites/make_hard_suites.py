"""Write the hard QA suites: bridge (two-hop), paraphrase and a held-out lexical set, for diagnose.py --suite.

    python suites/make_hard_suites.py     # suites/{bridge,paraphrase,lexical}_suite.jsonl

Deterministic (fixed seeds, no downloads). Items carry qa_suite.jsonl's fields (id, context, question,
answer, depth) plus "setting" ("bridge" | "paraphrase" | "lexical"), which diagnose.py groups its tables by.
The families, names and filler are disjoint from make_qa_suite.py's, so nothing here was seen while
match_span was tuned.

bridge       The question names entity A and asks for an attribute of B, which only a first fact names:
             "The Harlow Bridge was designed by Mira Ostrand." ... "Mira Ostrand grew up in Telsby."
             "What is the home town of the architect of the Harlow Bridge?" The answer's fact shares no
             content word with the question (checked below): only the bridge entity B links the two.
             Distractors: other (A', B') first facts and other (B', attribute) second facts of the same
             pattern, so every second fact looks alike. The two facts sit at independent depths (either
             order); "depth" is the answer fact's.
paraphrase   The question names the entity but rewords the predicate, and the answer sits several words
             past the entity: "Where is Orlin Foods based?" for "Orlin Foods has its headquarters in the
             old harbour district of Dunmore." Distractors: the same pattern for other entities.
lexical      qa_suite.jsonl's kind (the question repeats the fact's words) with new families: a held-out
             check that the default question-aware policy still keeps the answer.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re

# Filler: neutral sentences with no names; sampled without replacement inside an item.
FILLER = [
    "The morning bus was late again because of road works near the bakery.",
    "Rain is expected over the weekend, with clear skies returning on Monday.",
    "A new bicycle lane was painted along the main avenue last spring.",
    "The swimming pool closes for cleaning during the first week of every month.",
    "Children collected litter from the park as part of a school project.",
    "The market hall has a glass roof that lets in plenty of light.",
    "Several shops extended their hours for the holiday season.",
    "An evening class in pottery has become popular with retired residents.",
    "The bridge over the canal was repainted in a dark green colour.",
    "Fresh bread is delivered to the corner shop before six every day.",
    "A choir rehearses in the community hall on Wednesday nights.",
    "The local radio station plays folk music on Sunday afternoons.",
    "Visitors often remark on how quiet the streets are after dark.",
    "The harbour wall was strengthened after a storm damaged it years ago.",
    "A chess club meets in the back room of the library.",
    "Street lamps along the promenade were replaced with brighter ones.",
    "The orchard at the edge of the village produces apples and pears.",
    "A weekly quiz night at the pub raises money for charity.",
    "Traffic on the ring road is heaviest between eight and nine.",
    "The old cinema now shows classic films once a fortnight.",
    "Students from the college volunteer at the animal shelter.",
    "The fountain in the square was switched off to save water.",
    "Fishing boats leave the quay at dawn and return by noon.",
    "A small bookshop sells second-hand novels and maps.",
    "The hiking trail to the waterfall takes about two hours.",
    "Gardeners compete every summer for the best vegetable patch.",
    "The town hall clock is wound by hand once a week.",
    "An outdoor theatre performs plays in the castle grounds in July.",
    "The ice rink opens in December and stays open until February.",
    "Most houses on the hill were built from local grey stone.",
    "A farmers' cooperative runs the dairy on the edge of town.",
    "The tennis courts can be booked online or at the reception desk.",
    "Snow rarely settles here, although frost is common in January.",
    "A mural of sailing ships covers one wall of the train station.",
    "The recycling centre accepts glass, paper and garden waste.",
    "Lunch at the school canteen is served from half past twelve.",
]

# Bridge families: A --fact1--> B --fact2--> answer. "a", "b", "c" are the pools for A, B and the answer.
BRIDGE = {
    "architect": {
        "a": ["Harlow Bridge", "Quinton Library", "Selby Tower", "Arden Museum", "Corwin Theatre",
              "Daventry Station", "Elmore Chapel", "Fenby Observatory", "Garston Pavilion", "Hollis Gallery"],
        "b": ["Mira Ostrand", "Tobias Wren", "Lucia Ferrante", "Anselm Kirch", "Petra Novak",
              "Rafael Quintero", "Sigrid Dahl", "Otto Brenner", "Yara Haddon", "Cyril Mabry"],
        "c": ["Telsby", "Wickham", "Dunford", "Ravensmoor", "Ashcombe", "Brightwell", "Colbury", "Eastleigh",
              "Fairholme", "Glenroy"],
        "fact1": "The {a} was designed by {b}.",
        "fact2": "{b} grew up in {c} and still visits it often.",
        "question": "What is the home town of the architect of the {a}?",
    },
    "company": {
        "a": ["Orvane Systems", "Brixley Foods", "Calloway Shipping", "Delmont Paper", "Everin Textiles",
              "Farrow Robotics", "Gilford Glassworks", "Hadley Motors", "Istra Pharma", "Jessop Timber"],
        "b": ["Nadia Klement", "Victor Ashe", "Helena Sorvino", "Marcus Pell", "Irene Vasquez",
              "Felix Amsel", "Dora Lindgren", "Samir Rahal", "Agnes Thorne", "Leon Marchetti"],
        "c": ["Uppsala", "Bologna", "Leiden", "Coimbra", "Salamanca", "Heidelberg", "Tartu", "Ghent",
              "Krakow", "Padua"],
        "fact1": "{a} is led by its chief executive, {b}.",
        "fact2": "{b} earned a degree in chemistry at the university in {c}.",
        "question": "Where did the boss of {a} study?",
    },
    "novel": {
        "a": ["The Glass Orchard", "Winter Harbour", "A Map of Salt", "The Quiet Engine", "Lanterns at Noon",
              "The Copper Field", "Seven Tides", "The Paper Crown", "North of Silence", "The Amber Room"],
        "b": ["Edith Marlow", "Jasper Quill", "Rosa Delacroix", "Hugo Fenn", "Maren Solberg",
              "Theo Carradine", "Livia Stroud", "Amos Kettering", "Bianca Ruel", "Cormac Doyle"],
        "c": ["Pistachio", "Marmalade", "Ziggy", "Bramble", "Nutmeg", "Paprika", "Domino", "Cricket",
              "Figaro", "Sherbet"],
        "fact1": "{a} is a novel written by {b}.",
        "fact2": "{b} keeps a grey parrot named {c} at home.",
        "question": "What is the pet bird of the author of {a} called?",
    },
    "ship": {
        "a": ["Morning Star", "Silver Heron", "North Wind", "Blue Falcon", "Marsh Lark", "Iron Duke",
              "Red Kestrel", "Golden Hind", "White Gull", "Storm Petrel"],
        "b": ["Ewan Blackwood", "Ingrid Halvorsen", "Tomas Ferreira", "Olga Petrova", "Bram Visser",
              "Carmen Ibarra", "Duncan Moir", "Freya Lund", "Gustav Ekberg", "Hana Sato"],
        "c": ["Portreath", "Kilbrannan", "Mousehole", "Stromness", "Whitstable", "Aldeburgh", "Tobermory",
              "Padstow", "Lerwick", "Clovelly"],
        "fact1": "The ship {a} is commanded by {b}.",
        "fact2": "{b} owns a cottage by the sea at {c}.",
        "question": "Where does the captain of the {a} have a house?",
    },
    "band": {
        "a": ["The Velvet Moths", "Paper Lions", "The Night Owls", "Copper Kites", "The Hollow Pines",
              "Neon Harbour", "The Drifting Keys", "Static Gardens", "The Pale Riders", "Echo Valley"],
        "b": ["Jonah Price", "Mila Horvat", "Kasper Lind", "Nina Okafor", "Ruben Alves", "Sofia Brandt",
              "Timo Jarvi", "Vera Kaplan", "Wes Carter", "Zora Milic"],
        "c": ["Lisbon", "Belfast", "Valencia", "Gdansk", "Porto", "Trieste", "Bergen", "Antwerp", "Lyon",
              "Seville"],
        "fact1": "The drummer of {a} is {b}.",
        "fact2": "{b} was raised by grandparents in {c}.",
        "question": "In which city did the percussionist of {a} spend childhood?",
    },
}

# Paraphrase families: entity named in the question, predicate reworded, answer several words past it.
PARAPHRASE = {
    "headquarters": {
        "e": ["Orlin Foods", "Castellan Bank", "Northway Freight", "Pemberton Tools", "Quayle Media",
              "Rowntree Plastics", "Stannard Energy", "Talbot Insurance", "Ulverston Mills", "Verity Labs"],
        "x": ["Dunmore", "Halswell", "Kirkby", "Moreton", "Pendle", "Rothley", "Sandford", "Thornbury",
              "Wexcombe", "Yarrow"],
        "fact": "{e} has its headquarters in the old harbour district of {x}.",
        "question": "Where is {e} based?",
    },
    "founder": {
        "e": ["the Larkspur Trust", "the Meridian Society", "the Harbour Guild", "the Fenwick Institute",
              "the Ashgrove Club", "the Beacon Foundation", "the Cinder Collective", "the Delph Academy",
              "the Ember League", "the Foxglove Circle"],
        "x": ["Oswin Hale", "Priya Natarajan", "Quentin Moss", "Rhea Calder", "Silas Verne", "Tamsin Holt",
              "Ulrich Baum", "Vivian Osei", "Wilfred Lyle", "Xenia Pavlou"],
        "fact": "{E} was founded in the spring of 1990 by a small group led by {x}.",
        "question": "Who set up {e}?",
    },
    "dish": {
        "e": ["Mrs Abernathy", "Mr Okonjo", "Mrs Fairweather", "Mr Lindqvist", "Mrs Papadakis",
              "Mr Delacourt", "Mrs Kowalczyk", "Mr Ferreira", "Mrs Yamamoto", "Mr Gallagher"],
        "x": ["mushroom risotto", "lamb tagine", "fish pie", "beef stroganoff", "vegetable lasagne",
              "chicken korma", "pea soup", "pork dumplings", "lentil curry", "seafood paella"],
        "fact": "{e} cooks the same meal for the whole family every Sunday, and it is always {x}.",
        "question": "What does {e} prepare at the end of each week?",
    },
    "research": {
        "e": ["Dr Amara Osei", "Dr Bernard Holm", "Dr Celia Ruiz", "Dr Dmitri Lazar", "Dr Esther Cohen",
              "Dr Fergus Nairn", "Dr Gemma Ricci", "Dr Henrik Berg", "Dr Isla Munro", "Dr Jakob Weiss"],
        "x": ["grey seals", "barn owls", "honey bees", "red squirrels", "sea turtles", "fruit bats",
              "arctic terns", "water voles", "monarch butterflies", "mountain hares"],
        "fact": "{e} spent almost thirty years of her career observing the behaviour of {x}.",
        "question": "Which animal did {e} investigate?",
    },
    "shipyard": {
        "e": ["the Aurora", "the Bellflower", "the Corsair", "the Dauntless", "the Endeavour", "the Fulmar",
              "the Guillemot", "the Halcyon", "the Intrepid", "the Jubilee"],
        "x": ["Birkenhead", "Greenock", "Clydebank", "Sunderland", "Belfast", "Rosyth", "Appledore",
              "Falmouth", "Barrow", "Hebburn"],
        "fact": "{E}, the oldest vessel still sailing in the northern fleet, came out of the yards at {x}.",
        "question": "Where was {e} constructed?",
    },
}

# Lexical families (held out): the question repeats the fact's words, as in qa_suite.jsonl.
LEXICAL = {
    "platform": {
        "e": ["Aldgate", "Bramley", "Cheswick", "Denholm", "Eppleby", "Frome", "Glaisdale", "Hexham",
              "Ilkley", "Jarrow"],
        "a": ["7:15", "8:40", "9:05", "10:30", "11:50", "12:20", "13:45", "14:10", "15:35", "16:55"],
        "fact": "The {a} train to {e} leaves from the far end of the station.",
        "question": "Where does the {a} train go to?",
    },
    "locker": {
        "e": ["a violin", "a brass telescope", "a chess set", "a leather satchel", "a rubber duck",
              "a sewing kit", "a tin whistle", "a box of chalk", "a silk scarf", "a pocket watch"],
        "a": ["locker 12", "locker 27", "locker 35", "locker 41", "locker 58", "locker 63", "locker 74",
              "locker 86", "locker 90", "locker 19"],
        "fact": "Inside {a} at the gym there is {e} that nobody has claimed.",
        "question": "What is inside {a} at the gym?",
    },
    "garden": {
        "e": ["tulips", "sunflowers", "lavender", "roses", "dahlias", "peonies", "marigolds", "irises",
              "poppies", "daisies"],
        "a": ["north garden", "south garden", "east garden", "west garden", "walled garden", "rose garden",
              "kitchen garden", "herb garden", "sunken garden", "water garden"],
        "fact": "The gardener planted {e} in the {a} this year.",
        "question": "What did the gardener plant in the {a} this year?",
    },
    "code": {
        "e": ["heron", "basalt", "tundra", "juniper", "quartz", "sparrow", "ember", "willow", "cobble",
              "maple"],
        "a": ["first floor", "second floor", "third floor", "fourth floor", "fifth floor", "sixth floor",
              "seventh floor", "eighth floor", "ninth floor", "tenth floor"],
        "fact": "The door code for the {a} office is {e} until further notice.",
        "question": "What is the door code for the {a} office?",
    },
}

STOPWORDS = {"the", "a", "an", "of", "in", "at", "is", "was", "by", "to", "and", "it", "its", "what", "where",
             "which", "who", "did", "does", "do", "how", "on", "for", "with", "still", "that"}


def content_words(text: str) -> set:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOPWORDS}


def capitalise(text: str) -> str:
    return text[0].upper() + text[1:]


def place(rng: random.Random, sentences: list, fact: str, depth: float) -> int:
    """Insert `fact` at depth * len(sentences); returns its slot."""
    slot = round(depth * len(sentences))
    sentences.insert(slot, fact)
    return slot


def scatter(rng: random.Random, sentences: list, facts: list):
    for fact in facts:
        sentences.insert(rng.randrange(len(sentences) + 1), fact)


def depth_of(sentences: list, fact: str) -> float:
    return round(sentences.index(fact) / (len(sentences) - 1), 2)


def bridge_item(rng: random.Random, index: int, family: str, depth: float):
    """Needle chain a0 -> b0 -> c0; distractor chains a_i -> b_i -> c_i (some with only one of the hops)."""
    spec = BRIDGE[family]
    n = rng.randint(2, 4) + 1
    a, b, c = (rng.sample(spec[key], n) for key in ("a", "b", "c"))
    fact1 = [spec["fact1"].format(a=a[i], b=b[i]) for i in range(n)]
    fact2 = [spec["fact2"].format(b=b[i], c=c[i]) for i in range(n)]
    question = spec["question"].format(a=a[0])
    shared = content_words(fact2[0]) & content_words(question)
    assert not shared, f"{family}: the answer's fact shares {shared} with the question"
    sentences = rng.sample(FILLER, rng.randint(16, 26))
    # distractors: both hops for most, and one lone second hop (a B' that no first fact names)
    scatter(rng, sentences, fact1[1:] + fact2[1:])
    place(rng, sentences, fact2[0], depth)
    hop1_depth = rng.choice([d for d in (0.05, 0.25, 0.5, 0.75, 0.95) if abs(d - depth) >= 0.2])
    place(rng, sentences, fact1[0], hop1_depth)
    return {"id": f"bridge-{family}-{index:02d}", "setting": "bridge", "context": " ".join(sentences),
            "question": question, "answer": c[0], "depth": depth_of(sentences, fact2[0]),
            "bridge": b[0], "hop1_depth": depth_of(sentences, fact1[0])}


def single_fact_item(rng: random.Random, index: int, setting: str, family: str, spec: dict, depth: float):
    n = rng.randint(2, 4) + 1
    es = rng.sample(spec["e"], n)
    xs = rng.sample(spec["x" if "x" in spec else "a"], n)
    if setting == "paraphrase":
        facts = [spec["fact"].format(e=e, E=capitalise(e), x=x) for e, x in zip(es, xs)]
        question, answer = spec["question"].format(e=es[0]), xs[0]
    else:                                   # lexical: the question names the attribute, the answer is e
        facts = [capitalise(spec["fact"].format(e=e, a=x)) for e, x in zip(es, xs)]
        question, answer = spec["question"].format(a=xs[0]), es[0]
    sentences = rng.sample(FILLER, rng.randint(16, 26))
    scatter(rng, sentences, facts[1:])
    place(rng, sentences, facts[0], depth)
    return {"id": f"{setting}-{family}-{index:02d}", "setting": setting, "context": " ".join(sentences),
            "question": question, "answer": answer, "depth": depth_of(sentences, facts[0])}


def make_suite(setting: str, n: int = 40, seed: int = 0):
    rng = random.Random(f"{setting}-{seed}")
    families = {"bridge": BRIDGE, "paraphrase": PARAPHRASE, "lexical": LEXICAL}[setting]
    names = list(families)
    items = []
    for i in range(n):
        depth = 0.1 + 0.8 * (i % 9) / 8          # 0.1, 0.2, ..., 0.9, cycling
        family = names[i % len(names)]
        if setting == "bridge":
            items.append(bridge_item(rng, i, family, depth))
        else:
            items.append(single_fact_item(rng, i, setting, family, families[family], depth))
    for item in items:                       # extractive and unambiguous: the answer occurs exactly once
        assert item["context"].count(item["answer"]) == 1, item["id"]
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=40, help="items per suite (default: 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--settings", nargs="+", default=["bridge", "paraphrase", "lexical"],
                        choices=["bridge", "paraphrase", "lexical"])
    args = parser.parse_args()
    for setting in args.settings:
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{setting}_suite.jsonl")
        with open(path, "w") as f:
            for item in make_suite(setting, args.n, args.seed):
                f.write(json.dumps(item) + "\n")
        print(f"wrote {args.n} items to {path}")


if __name__ == "__main__":
    main()
