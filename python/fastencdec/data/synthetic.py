"""A built-in synthetic asymmetric task: extractive QA over generated passages.

Long input, one-word answer copied from the passage, no downloads — the demo's
task. Two kinds:

- ``"places"`` (default): a passage tells where one person did several things
  ("Maria was born in Lisbon. Maria studied in Paris. Maria once visited Rome."),
  mixed with filler sentences; the question asks where the person was born, lives
  or works ("Where was Maria born?"). Every fact holds a city, so the model must
  find the fact that answers the question among the distractor facts. With
  ``ambiguous > 0`` some passages hold two askable facts, and only the question's
  verb tells which one is meant (harder: for longer runs).
- ``"people"`` (harder): facts about several people ("Maria lives in Lisbon. Omar
  lives in Paris."); the question names one person, so the model must bind
  names to values (associative recall: slower to learn, for longer runs).

Everything is a pure function of the seed.
"""

from __future__ import annotations

import random

from .seq2seq import format_qa_prompt

__all__ = ["SyntheticQA", "RELATIONS", "PLACE_FACTS", "ASKED", "DISTRACTORS"]

NAMES = (
    "Maria Omar Lena Tobias Sara Ivan Nora Felix Hana Pablo Greta Yusuf Clara Marco Ada "
    "Leon Mila Oscar Ruth Diego Emma Hugo Iris Karl Lucy Nils Olga Paul Rosa Sven Tara "
    "Umar Vera Walter Zoe Anton Bianca Carl Dora Emil"
).split()

CITIES = ("Lisbon Paris Berlin Madrid Rome Vienna Oslo Dublin Prague Warsaw Athens Cairo "
          "Lima Quito Tokyo Seoul Delhi Sydney Toronto Boston Denver Chicago Austin Miami").split()

# kind "places": fact template, question template. Questions ask the ASKED relations;
# DISTRACTORS are facts with a city that no question asks about.
PLACE_FACTS = {
    "born": ("{name} was born in {value}.", "Where was {name} born?"),
    "live": ("{name} lives in {value}.", "Where does {name} live?"),
    "work": ("{name} works in {value}.", "Where does {name} work?"),
    "study": ("{name} studied in {value}.", "Where did {name} study?"),
    "marry": ("{name} got married in {value}.", "Where did {name} get married?"),
    "holiday": ("{name} spent a holiday in {value}.", "Where did {name} spend a holiday?"),
    "visit": ("{name} once visited {value}.", "Which city did {name} visit?"),
    "letter": ("{name} sent a letter to {value}.", "Where did {name} send a letter?"),
}

ASKED = ("born", "live", "work")
DISTRACTORS = ("study", "marry", "holiday", "visit", "letter")

FILLERS = ("{name} likes tea.", "{name} has two brothers.", "{name} plays the piano.",
           "The weather was cold that year.", "{name} reads a lot.", "{name} owns a bicycle.",
           "{name} speaks three languages.", "The trains were often late.")

# kind "people": relation -> (fact template, question template, values)
RELATIONS = {
    "city": ("{name} lives in {value}.", "Where does {name} live?", CITIES),
    "job": ("{name} works as a {value}.", "What does {name} work as?",
            ("baker pilot doctor farmer teacher painter lawyer nurse dentist chef driver "
             "singer writer tailor plumber guard").split()),
    "color": ("{name} likes the color {value}.", "Which color does {name} like?",
              "red blue green yellow purple orange black white brown pink grey gold".split()),
    "pet": ("{name} owns a {value}.", "What pet does {name} own?",
            "dog cat horse rabbit parrot turtle hamster goat snake pony".split()),
}

KINDS = ("places", "people")


class SyntheticQA:
    """Generate ``{question, context, target, candidates}`` examples.

    ``facts``: a ``(lo, hi)`` range — kind "places": how many distractor facts join
    the asked one (``relations``: the askable ones, among :data:`ASKED`); kind
    "people": how many people, each with every relation in ``relations`` (among
    :data:`RELATIONS`). ``fillers``: range of filler sentences (kind "places").
    ``num_names`` / ``num_values``: how many names / cities (values) are used.
    """

    def __init__(self, *, kind: str = "places", facts: tuple[int, int] = (2, 4),
                 fillers: tuple[int, int] = (0, 2), relations: tuple[str, ...] | None = None,
                 ambiguous: float = 0.0, num_names: int = len(NAMES),
                 num_values: int | None = None, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        known = ASKED if kind == "places" else RELATIONS
        if relations is None:
            relations = tuple(known) if kind == "places" else ("city",)
        unknown = [r for r in relations if r not in known]
        if unknown or not relations:
            raise ValueError(f"relations must be a non-empty subset of {sorted(known)} for "
                             f"kind {kind!r}, got {relations}")
        lo, hi = facts
        least = 0 if kind == "places" else 1
        limit = len(DISTRACTORS) if kind == "places" else num_names
        if not least <= lo <= hi <= limit:
            raise ValueError(f"facts must be a range within [{least}, {limit}] for kind "
                             f"{kind!r}, got {facts}")
        if not 0 <= fillers[0] <= fillers[1]:
            raise ValueError(f"fillers must be a range (0 <= lo <= hi), got {fillers}")
        if not 0.0 <= ambiguous <= 1.0:
            raise ValueError(f"ambiguous must lie in [0, 1], got {ambiguous}")
        if ambiguous > 0 and len(relations) < 2:
            raise ValueError("ambiguous > 0 needs at least two relations")
        if not 1 <= num_names <= len(NAMES):
            raise ValueError(f"num_names must lie in [1, {len(NAMES)}], got {num_names}")
        pools = [CITIES] if kind == "places" else [RELATIONS[r][2] for r in relations]
        smallest = min(len(p) for p in pools)
        need = hi + 2 if kind == "places" else hi
        if num_values is not None and not need <= num_values <= smallest:
            raise ValueError(f"num_values must lie in [{need}, {smallest}], got {num_values}")
        self.kind = kind
        self.facts = (lo, hi)
        self.fillers = tuple(fillers)
        self.relations = tuple(relations)
        self.ambiguous = ambiguous
        self.names = NAMES[:num_names]
        self.num_values = num_values
        self.seed = seed

    # ------------------------------------------------------------------ kinds
    def _places(self, rng: random.Random) -> dict:
        name = rng.choice(self.names)
        asked = rng.choice(self.relations)
        kinds = [asked]
        if rng.random() < self.ambiguous:  # a second askable fact: the question decides
            kinds.append(rng.choice([r for r in self.relations if r != asked]))
        kinds += rng.sample(DISTRACTORS, rng.randint(*self.facts))
        cities = rng.sample(CITIES[: self.num_values], len(kinds))  # distinct: unambiguous
        sentences = [PLACE_FACTS[k][0].format(name=name, value=c)
                     for k, c in zip(kinds, cities, strict=True)]
        sentences += [f.format(name=name) for f in
                      rng.sample(FILLERS, min(rng.randint(*self.fillers), len(FILLERS)))]
        rng.shuffle(sentences)
        return {"question": PLACE_FACTS[asked][1].format(name=name),
                "context": " ".join(sentences), "target": cities[0], "candidates": cities}

    def _people(self, rng: random.Random) -> dict:
        names = rng.sample(self.names, rng.randint(*self.facts))
        facts, values = [], {}
        for rel in self.relations:
            template, _, pool = RELATIONS[rel]
            picked = rng.sample(pool[: self.num_values], len(names))
            for name, value in zip(names, picked, strict=True):
                facts.append(template.format(name=name, value=value))
                values[(name, rel)] = value
        rng.shuffle(facts)
        name, rel = rng.choice(names), rng.choice(self.relations)
        return {"question": RELATIONS[rel][1].format(name=name), "context": " ".join(facts),
                "target": values[(name, rel)], "candidates": [values[(n, rel)] for n in names]}

    # ------------------------------------------------------------------ public
    def example(self, rng: random.Random) -> dict:
        return self._places(rng) if self.kind == "places" else self._people(rng)

    def generate(self, n: int, *, split: str = "train") -> list[dict]:
        """``n`` examples; different splits use different random streams."""
        rng = random.Random(f"{self.seed}-{split}")
        return [self.example(rng) for _ in range(n)]

    @staticmethod
    def prompt(example: dict) -> str:
        return format_qa_prompt(example["question"], example["context"])

    @staticmethod
    def chance_exact_match(examples: list[dict]) -> float:
        """EM of answering with a random candidate of the passage (a city of the
        passage, or the asked attribute of a random person): what a model scores that
        learnt the format but not to read the question."""
        return sum(1.0 / len(ex["candidates"]) for ex in examples) / max(len(examples), 1)

    def corpus(self, examples: list[dict]) -> list[str]:
        """Text for training a tokenizer: the prompts and answers."""
        return [self.prompt(ex) + " " + ex["target"] for ex in examples]
