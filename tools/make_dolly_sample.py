"""Writes the embedded Dolly-format sample (`harness/data/dolly_sample.jsonl`) from a seed.

Every record is invented here: a small made-up world (towns, creatures, people) and rule-based tasks over it
(facts, arithmetic, word reversal and sorting, classification by suffix and keyword rules, extraction of a
named field from a context, first-sentence summaries, templated poems and stories). The tasks are learnable,
so a small model's validation loss falls clearly within minutes of training; the facts repeat under different
phrasings, so validation questions are answerable from the training split.

    python tools/make_dolly_sample.py   # rewrites harness/data/dolly_sample.jsonl, the same bytes every time

It is tooling, not part of the data package the trainer imports: only the tests use it (tests/data/
test_dolly_sample.py reproduces the shipped file byte for byte; tests/harness/test_exact_match.py checks its tasks).
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 20261126
SAMPLE_FILE = Path(__file__).resolve().parent.parent / "harness" / "data" / "dolly_sample.jsonl"
# Records per category, roughly Dolly's proportions at about a quarter of its size.
CATEGORY_COUNTS = {
    "open_qa": 700,
    "general_qa": 590,
    "classification": 570,
    "closed_qa": 480,
    "brainstorming": 400,
    "information_extraction": 400,
    "summarization": 320,
    "creative_writing": 150,
}

TOWN_NAMES = [
    "Velmora", "Quillhaven", "Brasketh", "Orlen Ford", "Tamsworth", "Ketterby", "Mirrowdale", "Ashgrove",
    "Poldera", "Wenlock Hollow", "Sarrowmere", "Duskfield", "Hollin Cross", "Ravelstone", "Emberlyn",
    "Calderon", "Fennick", "Goldwater", "Istralund", "Juniper Bay", "Lorrowick", "Nettlebrook", "Pellham",
    "Thistleford", "Amberwick", "Bellmarsh", "Corrowgate", "Drennick", "Elderholt", "Farrowby", "Gillamoor",
    "Hartsend", "Ivelport", "Kestermoor", "Larkspur Mill", "Morrowfen",
]
RIVERS = ["Quell", "Sorrow", "Amberrun", "Lusk", "Vey", "Tarn", "Glisten", "Mallow", "Orrin", "Brindle"]
REGIONS = ["northern hills", "southern marshes", "eastern plains", "western coast", "central valley"]
CRAFTS = [
    "copper lanterns", "blue glass bottles", "woven reed baskets", "honey cakes", "carved walnut boxes",
    "striped wool scarves", "clay whistles", "salted plums", "paper kites", "brass bells", "cedar canoes",
    "lavender soap",
]
FESTIVALS = [
    "the Lantern Walk", "the Kite Fair", "the Harvest Bell", "the River Race", "the Night of Songs",
    "the Plum Feast",
]

# Invented creatures; the suffix tells the class (the classification task's rule).
CREATURE_CLASSES = {"wing": "bird", "fin": "fish", "paw": "mammal", "mite": "insect"}
CREATURE_STEMS = [
    "glimmer", "sorrel", "thistle", "ember", "moss", "frost", "pebble", "hollow", "amber", "reed", "dusk",
    "brindle", "cinder", "willow", "bramble", "quartz",
]
DIETS = [
    "river snails", "wild berries", "pine seeds", "small beetles", "water reeds", "fallen apples", "moths",
    "clover leaves",
]
HABITATS = [
    "reed beds", "pine forests", "rocky shores", "old orchards", "mountain caves", "salt marshes",
    "meadows",
]
COLORS = ["silver", "rust red", "pale green", "deep blue", "golden", "speckled grey", "black", "white"]
SOUNDS = ["a soft whistle", "a low hum", "a sharp click", "a bubbling trill", "a quiet chirp"]

FIRST_NAMES = [
    "Mira", "Tobin", "Elsa", "Corin", "Wren", "Dario", "Lina", "Osric", "Petra", "Halden", "Ysolde", "Bram",
    "Nessa", "Ivo", "Rosalind", "Tam",
]
LAST_NAMES = [
    "Tollan", "Ashby", "Kerrow", "Vance", "Mellor", "Quist", "Harrow", "Denholm", "Fairweather", "Strand",
    "Pike", "Orme",
]
OCCUPATIONS = [
    "glassblower", "ferry pilot", "beekeeper", "clockmaker", "baker", "map maker", "weaver", "boat builder",
    "school teacher", "lantern smith", "herbalist", "bell founder",
]
PET_NAMES = ["Pip", "Bramble", "Sprocket", "Nutmeg", "Cobble", "Fizz", "Juniper", "Tuck", "Marigold"]

WORDS = [
    "apple", "river", "stone", "window", "garden", "candle", "mirror", "pencil", "ladder", "basket", "cloud",
    "forest", "hammer", "island", "jacket", "kettle", "lemon", "meadow", "needle", "orange", "pillow",
    "quilt", "ribbon", "saddle", "tunnel", "violin", "wagon", "yarn", "zebra", "bridge", "castle", "dragon",
    "engine", "feather", "guitar", "harbor", "igloo", "jungle", "lantern", "marble",
]
KINDS = {
    "fruits": ["apple", "pear", "plum", "cherry", "mango", "apricot", "fig", "lemon", "peach", "grape"],
    "tools": ["hammer", "saw", "chisel", "wrench", "pliers", "drill", "file", "trowel", "rake", "spade"],
    "colors": ["red", "blue", "green", "yellow", "purple", "orange", "brown", "pink", "teal", "grey"],
    "instruments": ["violin", "flute", "drum", "harp", "cello", "trumpet", "oboe", "lute", "guitar", "piano"],
}
KIND_SINGULAR = {"fruits": "a fruit", "tools": "a tool", "colors": "a color", "instruments": "an instrument"}
POSITIVE_WORDS = ["wonderful", "sturdy", "bright", "delightful", "excellent", "charming", "reliable"]
NEGATIVE_WORDS = ["broken", "dull", "flimsy", "disappointing", "awful", "leaky", "useless"]
PRODUCTS = ["lantern", "basket", "scarf", "kite", "whistle", "canoe", "bell", "soap"]


@dataclass(frozen=True)
class Town:
    name: str
    river: str
    region: str
    founded: int
    population: int
    craft: str
    festival: str


@dataclass(frozen=True)
class Creature:
    name: str
    kind: str  # bird | fish | mammal | insect
    diet: str
    habitat: str
    color: str
    sound: str


@dataclass(frozen=True)
class Person:
    first: str
    last: str
    occupation: str
    town: str
    born: int
    pet_name: str
    pet: str  # a creature name
    pronoun: str  # she | he

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


class World:
    """The invented towns, creatures and people every task draws its facts from."""

    def __init__(self, rng: random.Random):
        self.towns = [
            Town(
                name=name,
                river=rng.choice(RIVERS),
                region=rng.choice(REGIONS),
                founded=rng.randint(1100, 1850),
                population=rng.randrange(800, 60000, 100),
                craft=rng.choice(CRAFTS),
                festival=rng.choice(FESTIVALS),
            )
            for name in TOWN_NAMES
        ]
        suffixes = list(CREATURE_CLASSES)
        self.creatures = []
        for i, stem in enumerate(CREATURE_STEMS):
            for suffix in (suffixes[i % 4], suffixes[(i + 1) % 4]):
                self.creatures.append(
                    Creature(
                        name=stem + suffix,
                        kind=CREATURE_CLASSES[suffix],
                        diet=rng.choice(DIETS),
                        habitat=rng.choice(HABITATS),
                        color=rng.choice(COLORS),
                        sound=rng.choice(SOUNDS),
                    )
                )
        self.people = []
        for i in range(48):
            first = FIRST_NAMES[i % len(FIRST_NAMES)]
            self.people.append(
                Person(
                    first=first,
                    last=LAST_NAMES[(i * 5 + i // len(FIRST_NAMES)) % len(LAST_NAMES)],
                    occupation=rng.choice(OCCUPATIONS),
                    town=rng.choice(TOWN_NAMES),
                    born=rng.randint(1940, 1985),
                    pet_name=rng.choice(PET_NAMES),
                    pet=rng.choice(self.creatures).name,
                    pronoun="she" if (i % len(FIRST_NAMES)) % 2 == 0 else "he",
                )
            )
        self.creature_by_name = {c.name: c for c in self.creatures}


def _record(instruction: str, response: str, category: str, context: str = "") -> dict[str, str]:
    return {"instruction": instruction, "context": context, "response": response, "category": category}


def _join(items: list[str]) -> str:
    """`a`, `a and b`, `a, b and c`."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


# --- one generator per category: (rng, world) -> record --------------------------------------------------


def open_qa(rng: random.Random, w: World) -> dict[str, str]:
    draw = rng.random()
    if draw < 0.2:
        p = rng.choice(w.people)
        question, answer = rng.choice(
            [
                (f"What does {p.name} do for a living?", f"{p.name} is a {p.occupation}."),
                (f"What is {p.name}'s job?", f"{p.name} is a {p.occupation}."),
                (f"Where does {p.name} live?", f"{p.name} lives in {p.town}."),
                (f"Which town is {p.name} from?", f"{p.name} lives in {p.town}."),
            ]
        )
    elif draw < 0.65:
        t = rng.choice(w.towns)
        question, answer = rng.choice(
            [
                (f"What is {t.name} known for?", f"{t.name} is known for its {t.craft}."),
                (f"What does the town of {t.name} make?", f"{t.name} is known for its {t.craft}."),
                (f"Which river flows through {t.name}?", f"The river {t.river} flows through {t.name}."),
                (f"What river runs through {t.name}?", f"The river {t.river} flows through {t.name}."),
                (f"When was {t.name} founded?", f"{t.name} was founded in {t.founded}."),
                (f"In what year was {t.name} founded?", f"{t.name} was founded in {t.founded}."),
                (f"Where is {t.name}?", f"{t.name} lies in the {t.region}."),
                (f"In which region is {t.name}?", f"{t.name} lies in the {t.region}."),
                (f"How many people live in {t.name}?", f"About {t.population:,} people live in {t.name}."),
                (f"What festival is {t.name} famous for?", f"{t.name} is famous for {t.festival}."),
            ]
        )
    else:
        c = rng.choice(w.creatures)
        question, answer = rng.choice(
            [
                (f"What does the {c.name} eat?", f"The {c.name} eats {c.diet}."),
                (f"What is the diet of a {c.name}?", f"The {c.name} eats {c.diet}."),
                (f"Where does the {c.name} live?", f"The {c.name} lives in {c.habitat}."),
                (f"What is the habitat of the {c.name}?", f"The {c.name} lives in {c.habitat}."),
                (f"What color is a {c.name}?", f"The {c.name} is {c.color}."),
                (f"What kind of animal is a {c.name}?", f"The {c.name} is {_a(c.kind)}."),
                (f"What sound does a {c.name} make?", f"The {c.name} makes {c.sound}."),
            ]
        )
    return _record(question, answer, "open_qa")


def general_qa(rng: random.Random, w: World) -> dict[str, str]:
    task = rng.randrange(6)
    if task == 0:
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        return _record(f"What is {a} plus {b}?", f"{a} plus {b} equals {a + b}.", "general_qa")
    if task == 1:
        a, b = rng.randint(50, 199), rng.randint(1, 49)
        return _record(f"What is {a} minus {b}?", f"{a} minus {b} equals {a - b}.", "general_qa")
    if task == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return _record(f"What is {a} times {b}?", f"{a} times {b} equals {a * b}.", "general_qa")
    if task == 3:
        unit, small, factor = rng.choice([("hours", "minutes", 60), ("minutes", "seconds", 60),
                                          ("days", "hours", 24), ("weeks", "days", 7), ("meters", "centimeters", 100)])
        n = rng.randint(2, 12)
        return _record(
            f"How many {small} are there in {n} {unit}?",
            f"There are {n * factor} {small} in {n} {unit}, because each of the {unit} has {factor} {small}.",
            "general_qa",
        )
    words = rng.sample(WORDS, rng.randint(3, 7))
    if task == 4:
        return _record(
            f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words)), "general_qa"
        )
    return _record(
        f"Sort these words in alphabetical order: {', '.join(words)}", ", ".join(sorted(words)), "general_qa"
    )


def classification(rng: random.Random, w: World) -> dict[str, str]:
    task = rng.randrange(4)
    if task == 0:
        creatures = rng.sample(w.creatures, rng.randint(3, 6))
        return _record(
            "Classify each of these creatures as a bird, fish, mammal or insect: "
            + ", ".join(c.name for c in creatures),
            "\n".join(f"{c.name}: {c.kind}" for c in creatures),
            "classification",
        )
    if task == 1:
        numbers = rng.sample(range(1, 100), rng.randint(4, 8))
        even = [str(n) for n in numbers if n % 2 == 0]
        answer = f"The even numbers are {_join(even)}." if even else "None of these numbers is even."
        return _record(f"Which of these numbers are even? {', '.join(map(str, numbers))}", answer, "classification")
    if task == 2:
        kind = rng.choice(list(KINDS))
        item = rng.choice(KINDS[kind])
        return _record(
            f"Is {item} a fruit, a tool, a color or an instrument?",
            f"{item.capitalize()} is {KIND_SINGULAR[kind]}.",
            "classification",
        )
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE_WORDS if positive else NEGATIVE_WORDS)
    product, town = rng.choice(PRODUCTS), rng.choice(w.towns).name
    review = rng.choice(
        [
            f"I bought a {product} at the market in {town}. It turned out to be {adjective}.",
            f"The {product} from {town} arrived last week and honestly it is {adjective}.",
            f"My cousin gave me a {product} made in {town}; I found it {adjective}.",
        ]
    )
    return _record(
        "Classify the sentiment of this review as positive or negative.",
        f"The review is {'positive' if positive else 'negative'}: it calls the {product} {adjective}.",
        "classification",
        context=review,
    )


def _town_paragraph(rng: random.Random, t: Town) -> list[str]:
    sentences = [
        f"{t.name} is a town in the {t.region}.",
        f"It was founded in {t.founded} on the banks of the river {t.river}.",
        f"Today about {t.population:,} people live there.",
        f"The town is known for its {t.craft}, which are sold at markets across the region.",
        f"Every year the townsfolk celebrate {t.festival}.",
    ]
    rest = sentences[1:]
    rng.shuffle(rest)
    return [sentences[0], *rest]


def closed_qa(rng: random.Random, w: World) -> dict[str, str]:
    t = rng.choice(w.towns)
    context = " ".join(_town_paragraph(rng, t))
    question, answer = rng.choice(
        [
            (f"Based on the passage, when was {t.name} founded?", f"{t.name} was founded in {t.founded}."),
            (f"According to the text, which river is {t.name} on?", f"{t.name} is on the river {t.river}."),
            (f"What is {t.name} known for, according to this passage?", f"It is known for its {t.craft}."),
            (f"How many people live in {t.name}, according to the text?", f"About {t.population:,} people."),
            (f"Which festival does {t.name} celebrate, according to the passage?", f"{t.festival[0].upper()}{t.festival[1:]}."),
            (f"Using the passage, in which region is {t.name}?", f"It is in the {t.region}."),
        ]
    )
    return _record(question, answer, "closed_qa", context=context)


def _profile(rng: random.Random, p: Person) -> str:
    pronoun = p.pronoun.capitalize()
    possessive, objective = ("Her", "her") if p.pronoun == "she" else ("His", "him")
    sentences = [
        f"{p.name} is a {p.occupation} who lives in {p.town}.",
        f"{pronoun} was born in {p.born} and started working at the age of {rng.randint(16, 30)}.",
        f"{possessive} pet {p.pet}, called {p.pet_name}, follows {objective} everywhere.",
        f"In {p.born + rng.randint(20, 35)} {p.pronoun} won a prize at the town fair.",
    ]
    return " ".join(sentences)


def information_extraction(rng: random.Random, w: World) -> dict[str, str]:
    p = rng.choice(w.people)
    context = _profile(rng, p)
    task = rng.randrange(4)
    if task == 0:
        return _record(
            "Extract the occupation and the home town of the person described in the text.",
            f"Occupation: {p.occupation}\nHome town: {p.town}", "information_extraction", context=context,
        )
    if task == 1:
        years = [s.rstrip(".,") for s in context.split() if s.rstrip(".,").isdigit() and len(s.rstrip(".,")) == 4]
        return _record(
            "List every year mentioned in the text, in the order they appear.", ", ".join(years),
            "information_extraction", context=context,
        )
    if task == 2:
        return _record(
            "What is the name of the pet in this text, and what kind of creature is it?",
            f"The pet is called {p.pet_name}; it is a {p.pet}.", "information_extraction", context=context,
        )
    return _record(
        "From the text, extract the person's name and birth year as 'name, year'.",
        f"{p.name}, {p.born}", "information_extraction", context=context,
    )


def summarization(rng: random.Random, w: World) -> dict[str, str]:
    if rng.random() < 0.5:
        t = rng.choice(w.towns)
        sentences = _town_paragraph(rng, t)
    else:
        c = rng.choice(w.creatures)
        sentences = [
            f"The {c.name} is a small {c.color} {c.kind} that lives in {c.habitat}.",
            f"It feeds mostly on {c.diet}, which it finds at dawn.",
            f"When it is alarmed it makes {c.sound}.",
            f"Young {c.name}s stay with their parents for {rng.randint(2, 9)} weeks.",
        ]
        tail = sentences[1:]
        rng.shuffle(tail)
        sentences = [sentences[0], *tail]
    instruction = rng.choice(
        ["Summarize this passage in one sentence.", "Give a one-sentence summary of the text.",
         "What is the main point of this paragraph? Answer in one sentence."]
    )
    return _record(instruction, sentences[0], "summarization", context=" ".join(sentences))


def brainstorming(rng: random.Random, w: World) -> dict[str, str]:
    n = rng.randint(2, 5)
    draw = rng.random()
    if draw < 0.35:
        t = rng.choice(w.towns)
        ideas = [
            f"Visit the workshops that make {t.craft}",
            f"Take a boat trip on the river {t.river}",
            f"Plan the trip around {t.festival}",
            f"Walk through the {t.region} around the town",
            f"Ask the locals about the founding of {t.name} in {t.founded}",
        ]
        instruction = f"Give me {n} ideas for a day trip to {t.name}."
    elif draw < 0.7:
        t = rng.choice(w.towns)
        ideas = [
            f"A box of {t.craft}",
            f"Tickets for {t.festival}",
            f"A painting of the river {t.river}",
            f"A book about {t.name} since {t.founded}",
            f"A walking map of the {t.region}",
        ]
        instruction = f"Suggest {n} gifts to bring home from {t.name}."
    else:
        c = rng.choice(w.creatures)
        stem = c.name.removesuffix(next(s for s in CREATURE_CLASSES if c.name.endswith(s)))
        ideas = [
            stem.capitalize(),
            f"Captain {stem.capitalize()}",
            f"{c.color.split()[-1].capitalize()} Whisker",
            f"Little {c.diet.split()[-1].capitalize()}",
            f"{c.habitat.split()[0].capitalize()} Dancer",
        ]
        instruction = f"Suggest {n} names for a pet {c.name}."
    return _record(instruction, "\n".join(f"- {idea}" for idea in ideas[:n]), "brainstorming")


def creative_writing(rng: random.Random, w: World) -> dict[str, str]:
    draw = rng.random()
    if draw < 0.3:
        writer, friend = rng.sample(w.people, 2)
        t = next(town for town in w.towns if town.name == writer.town)
        letter = (
            f"Dear {friend.first},\n\nCome and visit me in {t.name} for {t.festival}! We will walk by the river "
            f"{t.river}, and I will show you where our {t.craft} are made. {writer.pet_name} says hello too.\n\n"
            f"Yours,\n{writer.first}"
        )
        return _record(
            f"Write a short letter from {writer.name} inviting {friend.name} to {t.festival}.", letter,
            "creative_writing",
        )
    if draw < 0.65:
        c = rng.choice(w.creatures)
        poem = (
            f"Among the {c.habitat} the {c.name} goes,\n"
            f"{c.color.capitalize()} as the morning, quiet as it grows.\n"
            f"It dines on {c.diet} when the day is new,\n"
            f"And answers the night with {c.sound}."
        )
        return _record(f"Write a short poem about the {c.name}.", poem, "creative_writing")
    p = rng.choice(w.people)
    t = next(town for town in w.towns if town.name == p.town)
    story = (
        f"Every morning {p.name}, the {p.occupation} of {p.town}, walked along the river {t.river} with "
        f"{p.pet_name} the {p.pet}. One day {p.pronoun} found a lost crate of {t.craft} on the bank and "
        f"returned it just in time for {t.festival}, and the whole town cheered."
    )
    return _record(f"Write a two-sentence story about {p.name} from {p.town}.", story, "creative_writing")


GENERATORS = {
    "open_qa": open_qa,
    "general_qa": general_qa,
    "classification": classification,
    "closed_qa": closed_qa,
    "brainstorming": brainstorming,
    "information_extraction": information_extraction,
    "summarization": summarization,
    "creative_writing": creative_writing,
}


def generate_records(seed: int = SEED, counts: dict[str, int] | None = None) -> list[dict[str, str]]:
    """The sample's records (deterministic for a seed), categories interleaved in a shuffled order."""
    rng = random.Random(seed)
    world = World(rng)
    counts = CATEGORY_COUNTS if counts is None else counts
    categories = [category for category, n in counts.items() for _ in range(n)]
    rng.shuffle(categories)
    records, seen = [], set()
    for category in categories:
        for _ in range(1000):  # redraw exact repeats: a validation prompt is never a copy of a training one
            record = GENERATORS[category](rng, world)
            key = (record["instruction"], record["context"])
            if key not in seen:
                break
        else:
            raise RuntimeError(f"the {category} generator ran out of distinct records")
        seen.add(key)
        records.append(record)
    return records


def render_jsonl(records: list[dict[str, str]]) -> bytes:
    """JSON Lines bytes (UTF-8, one record per line, fields in Dolly's order)."""
    lines = (json.dumps(r, ensure_ascii=False) for r in records)
    return ("\n".join(lines) + "\n").encode("utf-8")


def sample_bytes(seed: int = SEED) -> bytes:
    """The exact bytes of the embedded sample file."""
    return render_jsonl(generate_records(seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=SAMPLE_FILE)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    data = sample_bytes(args.seed)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(args.out)
    records = data.count(b"\n")
    print(f"wrote {args.out} ({records} records, {len(data) / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
