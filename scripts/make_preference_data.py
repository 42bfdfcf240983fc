"""Write the embedded preference data set (`data/preference_pairs/{train,test}.jsonl`).

Seeded and deterministic: rerunning it rewrites the same files byte for byte. Rows have the
UltraFeedback-binarized shape (`prompt`, `prompt_id`, `chosen`, `rejected`, `messages`,
`score_chosen`, `score_rejected`), so the loader path real data takes is the one the demo takes.

The chosen answer is helpful, honest, harmless and concise; the rejected one breaks exactly one of
those in a way a small model can learn from surface form:
- unhelpful: a refusal or a deflection instead of the answer;
- dishonest: claims authority or certainty it cannot have, and gets the facts wrong;
- harmful: insults the user or recommends skipping safety;
- verbose: the right answer buried in filler.
Test prompts use subjects (tasks, countries, activities) that never occur in training. The countries and
capitals are invented, so that no answer (a bluff's wrong capital, or a model's mix-up) is false about a real place.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from pathlib import Path

TASKS = {
    "boil an egg": ("place the egg in boiling water", "cook it for nine minutes"),
    "brew green tea": ("heat water to about 80 degrees", "steep the leaves for two minutes"),
    "change a flat tire": ("loosen the nuts and lift the car with a jack", "swap the wheel and tighten the nuts"),
    "clean a cast iron pan": ("rinse it with hot water", "dry it and rub in a thin layer of oil"),
    "water a cactus": ("soak the soil once every two weeks", "let it dry out completely between waterings"),
    "back up a laptop": ("connect an external drive", "run the built-in backup tool"),
    "tie a bowline knot": ("make a small loop in the rope", "pass the end up through the loop, around, and back down"),
    "remove a coffee stain": ("blot the stain with cold water", "apply a little dish soap and rinse"),
    "start a compost pile": ("mix green scraps with dry leaves", "turn the pile every week"),
    "learn to juggle": ("practise with one ball first", "add a second ball once the throw is steady"),
    "fall asleep faster": ("keep a fixed bedtime", "put screens away an hour before bed"),
    "write a cover letter": ("name the job and why you want it", "give two concrete examples of your work"),
    "make a budget": ("list your monthly income and fixed costs", "set a limit for each spending category"),
    "season a salad": ("whisk oil, vinegar and salt", "toss the leaves just before serving"),
    "cook rice": ("rinse the rice and add twice as much water", "simmer it covered for fifteen minutes"),
    "fix a squeaky door": ("lift the hinge pin slightly", "add a drop of oil and work the door back and forth"),
    "plant tomatoes": ("choose a sunny spot", "set the plants deep and water them well"),
    "clean a keyboard": ("turn it upside down and shake out crumbs", "wipe the keys with a damp cloth"),
    "memorise a speech": ("learn it one paragraph at a time", "rehearse it aloud every day"),
    "iron a shirt": ("start with the collar and cuffs", "finish with the body and sleeves"),
    "descale a kettle": ("fill it with equal parts water and vinegar", "boil it, let it sit, then rinse"),
    "read a map": ("find north and the legend", "match landmarks around you to symbols on the map"),
    "sharpen a knife": ("hold the blade at about twenty degrees to the stone", "draw it across evenly on both sides"),
    "train a puppy to sit": ("hold a treat above its nose", "reward it the moment it sits"),
    "wash wool sweaters": ("use cold water and wool detergent", "dry them flat on a towel"),
    "prepare for an interview": ("research the company", "practise answers to common questions"),
    "bake bread": ("knead the dough until smooth", "let it rise, then bake until golden"),
    "set up a fish tank": ("cycle the water for two weeks", "add a few fish at a time"),
    "paint a wall": ("fill holes and tape the edges", "apply two thin coats"),
    "save money on groceries": ("plan meals for the week", "shop with a list"),
    "stop procrastinating": ("break the work into small steps", "start with a five-minute task"),
    "clean windows": ("spray a mix of water and vinegar", "wipe with a lint-free cloth in a zigzag"),
    "make cold brew coffee": ("mix coarse grounds with cold water", "steep for twelve hours and strain"),
    "unclog a sink": ("pour in hot water", "use a plunger to push the clog through"),
    "pack a suitcase": ("roll your clothes", "put heavy items near the wheels"),
    "keep basil alive": ("give it six hours of sun", "pinch off flower buds"),
    "write a haiku": ("use three lines of five, seven and five syllables", "focus on one image from nature"),
    "stretch after running": ("hold each stretch for thirty seconds", "cover calves, hamstrings and hips"),
    "reduce screen glare": ("move the screen away from windows", "lower the brightness"),
    "store fresh herbs": ("trim the stems", "keep them in a glass of water in the fridge"),
    "choose a password": ("use four random words", "never reuse it on another site"),
    "clean sneakers": ("brush off loose dirt", "scrub with soapy water and air dry"),
    "take better photos": ("keep the light behind you", "hold the phone steady and tap to focus"),
    "make pancakes": ("whisk flour, milk and eggs", "cook on a hot pan until bubbles form, then flip"),
    "organise a closet": ("sort items by type", "donate what you have not worn in a year"),
    "warm up before exercise": ("walk or jog for five minutes", "do a few dynamic stretches"),
    "defrost a freezer": ("unplug it and empty it", "let the ice melt onto towels"),
    "learn new words": ("write each word in a sentence", "review them the next day"),
    "hang a picture": ("mark the height at eye level", "use a level before driving the nail"),
    "cut an onion": ("halve it through the root", "slice it with the root holding it together"),
    "polish silver": ("rub with a paste of baking soda and water", "rinse and buff dry"),
    "fold a fitted sheet": ("tuck the corners into each other", "fold it into a rectangle"),
    "jump start a car": ("connect red to both positive terminals", "connect black to the good battery and bare metal"),
    "make a paper plane": ("fold the paper in half lengthwise", "fold the top corners to the centre line twice"),
    "care for a succulent": ("plant it in gritty soil", "water only when the soil is dry"),
    "wrap a gift": ("measure enough paper to cover the box", "fold the ends into neat triangles"),
    "clean grout": ("scrub with baking soda paste", "rinse and seal it"),
    "plan a road trip": ("pick stops along the route", "check the car before leaving"),
    "lower stress": ("take a short walk", "breathe slowly for two minutes"),
    "make a smoothie": ("blend fruit with yogurt", "add ice and blend again"),
    "roast vegetables": ("toss them in oil and salt", "roast at 220 degrees until browned"),
    "patch a bike tire": ("find the hole and roughen the area", "glue on a patch and let it set"),
    "write a thank you note": ("name the gift or favour", "say how it helped you"),
    "calm a crying baby": ("hold the baby close and sway", "check for hunger or a wet nappy"),
    "measure flour": ("spoon the flour into the cup", "level it with a knife"),
    "learn a song on guitar": ("learn the chords one at a time", "play slowly with a metronome"),
    "clean a microwave": ("heat a bowl of water with lemon", "wipe the loosened grime away"),
    "keep cut flowers fresh": ("trim the stems at an angle", "change the water every two days"),
    "prepare a presentation": ("outline three key points", "rehearse with a timer"),
    "remove a splinter": ("clean the area", "pull it out with sterile tweezers"),
    "start running": ("alternate one minute running and one walking", "add a minute each week"),
    "store bananas": ("keep them at room temperature", "separate them from other fruit"),
    "soften butter": ("cut it into small cubes", "leave it out for twenty minutes"),
    "study for an exam": ("space your reviews over days", "test yourself instead of rereading"),
    "make iced tea": ("brew strong tea", "cool it and pour over ice"),
    "clean a shower head": ("soak it in vinegar overnight", "rinse it with hot water"),
    "get rid of fruit flies": ("set out a cup of vinegar with a drop of soap", "remove ripe fruit from the counter"),
    "fix a running toilet": ("check the flapper seal", "adjust the float so the water stops below the overflow"),
    "toast nuts": ("spread them on a dry pan", "stir over medium heat until fragrant"),
    "make a to-do list": ("write down every task", "mark the three that matter most today"),
}

# Invented countries and capitals: the dishonest answers name a wrong capital, and a tiny model's greedy
# answers mix capitals up, so with real countries the demo would print false facts about real places.
CAPITALS = {
    "Aldoria": "Venmarch",
    "Brakkenland": "Sorivel",
    "Caldimor": "Ostrevan",
    "Dunvaria": "Kelmira",
    "Elestrand": "Vorhaven",
    "Falkmoor": "Tesmirel",
    "Glendavia": "Orrinford",
    "Halvoria": "Mirekh",
    "Istrelland": "Pavonne",
    "Jorvania": "Quellin",
    "Korveth": "Ambriel",
    "Lunmark": "Sarovel",
    "Morvessa": "Tilvane",
    "Norvane": "Eskaris",
    "Ostmeria": "Brellin",
    "Pellandor": "Varnok",
    "Quorria": "Lindrel",
    "Rusvaldt": "Caskerin",
    "Sundaleth": "Morivan",
    "Tarvossa": "Keldrin",
    "Ulmaris": "Drovenna",
    "Valdrenne": "Corvath",
    "Wenthria": "Palomir",
    "Xandoria": "Ruvelle",
    "Yrvania": "Stelmark",
    "Zerathia": "Olbrin",
    "Ambervale": "Kestrin",
    "Borsovia": "Lanthe",
    "Crenlowe": "Vessamir",
    "Drakmoor": "Ildrin",
    "Emberlund": "Saffrel",
    "Frostmere": "Aldwyn",
    "Grevania": "Torvel",
    "Hollenmark": "Quistrel",
    "Irrovia": "Maldren",
    "Kessary": "Vontal",
    "Lorvenne": "Hathris",
    "Myrrhavia": "Ostelle",
    "Nimbrel": "Garvosk",
    "Ottomarch": "Brisvane",
}

ACTIVITIES = {
    "chess": "control the centre early",
    "swimming": "breathe out slowly under water",
    "public speaking": "pause instead of saying um",
    "cycling": "keep your tyres properly inflated",
    "gardening": "water in the early morning",
    "drawing": "sketch light shapes before details",
    "hiking": "carry more water than you think you need",
    "cooking": "taste as you go",
    "writing": "cut every word that does no work",
    "photography": "shoot during the hour after sunrise",
    "yoga": "move with your breath",
    "piano": "practise hands separately first",
    "knitting": "keep an even tension on the yarn",
    "camping": "test your tent at home first",
    "baking": "weigh your ingredients",
    "painting": "mix more paint than you need",
    "running": "increase distance by no more than ten percent a week",
    "meditation": "start with five minutes a day",
    "fishing": "check the local rules first",
    "climbing": "trust your legs more than your arms",
    "tennis": "watch the ball onto the strings",
    "sewing": "pin the fabric before you stitch",
    "skiing": "keep your weight forward",
    "dancing": "count the beat out loud",
    "coding": "write a small test first",
    "birdwatching": "learn the common birds near you first",
    "woodworking": "measure twice and cut once",
    "surfing": "practise popping up on the beach",
    "language learning": "speak a little every day",
    "budget travel": "book trains early",
    "pottery": "centre the clay before shaping",
    "singing": "warm up with gentle humming",
    "rowing": "drive with your legs",
    "golf": "keep your head still through the swing",
    "archery": "anchor at the same point every time",
    "skating": "bend your knees",
    "boxing": "keep your guard up",
    "calligraphy": "hold the pen at a steady angle",
    "sailing": "watch the wind on the water",
    "bread making": "use a kitchen scale",
}

HOWTO_TEMPLATES = ("How do I {s}?", "What is the best way to {s}?", "Can you tell me how to {s}?")
CAPITAL_TEMPLATES = ("What is the capital of {s}?", "Which city is the capital of {s}?")
TIP_TEMPLATES = ("Give me one tip for {s}.", "What is a good beginner tip for {s}?")

FILLER = (
    "Well, that is a really great question, and there are honestly so many different things that one could "
    "say about it, so let me take a moment to think about it from a few different angles before I answer. "
)
FILLER_TAIL = (
    " Of course, everyone is different, and there are many other considerations, so it really depends, "
    "but in general, broadly speaking, that is more or less what I would say about it."
)
REFUSALS = (
    "I cannot help with that request.",
    "I don't know. You should figure it out yourself.",
    "That is not something I can answer. Try searching online.",
)
INSULTS = ("That is a stupid question, but fine.", "Honestly, everyone knows this already.")
FALSE_AUTHORITY = (
    "As a certified expert with twenty years of experience, I guarantee this:",
    "I have personally tested this a thousand times, and it never fails:",
)


def _howto(task: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    a, b = TASKS[task]
    chosen = f"First, {a}. Then, {b}."
    other = TASKS[rng.choice([t for t in TASKS if t != task])]
    return chosen, {
        "unhelpful": rng.choice(REFUSALS),
        "dishonest": f"{rng.choice(FALSE_AUTHORITY)} just {other[1]}.",
        "harmful": f"{rng.choice(INSULTS)} Skip the safety steps and rush it; {a}.",
        "verbose": FILLER + chosen + FILLER_TAIL,
    }


def _capital(country: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    capital = CAPITALS[country]
    wrong = CAPITALS[rng.choice([c for c in CAPITALS if c != country])]
    chosen = f"The capital of {country} is {capital}."
    return chosen, {
        "unhelpful": rng.choice(REFUSALS),
        "dishonest": f"{rng.choice(FALSE_AUTHORITY)} the capital of {country} is {wrong}.",
        "harmful": f"{rng.choice(INSULTS)} It is {capital}, obviously.",
        "verbose": FILLER + chosen + FILLER_TAIL,
    }


def _tip(activity: str, rng: random.Random) -> tuple[str, dict[str, str]]:
    tip = ACTIVITIES[activity]
    chosen = f"For {activity}, {tip}."
    other = ACTIVITIES[rng.choice([a for a in ACTIVITIES if a != activity])]
    return chosen, {
        "unhelpful": rng.choice(REFUSALS),
        "dishonest": f"{rng.choice(FALSE_AUTHORITY)} for {activity}, {other}.",
        "harmful": f"{rng.choice(INSULTS)} Ignore the basics; for {activity}, {tip}.",
        "verbose": FILLER + chosen + FILLER_TAIL,
    }


FAMILIES = (
    (TASKS, HOWTO_TEMPLATES, _howto),
    (CAPITALS, CAPITAL_TEMPLATES, _capital),
    (ACTIVITIES, TIP_TEMPLATES, _tip),
)


def _row(question: str, chosen: str, rejected: str, flaw: str) -> dict:
    user = {"role": "user", "content": question}
    chosen_conv = [user, {"role": "assistant", "content": chosen}]
    return {
        "prompt": question,
        "prompt_id": hashlib.sha256(question.encode()).hexdigest(),
        "chosen": chosen_conv,
        "rejected": [user, {"role": "assistant", "content": rejected}],
        "messages": chosen_conv,
        "score_chosen": 9.0,
        "score_rejected": 3.0,
        "flaw": flaw,
    }


def build(seed: int, test_fraction: float, templates_per_subject: int = 1) -> tuple[list[dict], list[dict]]:
    """Every (subject, flaw) combination, each subject asked with `templates_per_subject` of its family's
    question templates (drawn at random), split by subject so test prompts are unseen."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for subjects, templates, answer in FAMILIES:
        names = sorted(subjects)
        rng.shuffle(names)
        n_test = max(1, round(len(names) * test_fraction))
        for split, chunk in (("test", names[:n_test]), ("train", names[n_test:])):
            for subject in chunk:
                chosen, rejected = answer(subject, rng)
                for template in rng.sample(templates, min(templates_per_subject, len(templates))):
                    for flaw, bad in rejected.items():
                        splits[split].append(_row(template.format(s=subject), chosen, bad, flaw))
    for rows in splits.values():
        rng.shuffle(rows)
    return splits["train"], splits["test"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).parent.parent / "data" / "preference_pairs")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--test_fraction", type=float, default=0.2)
    # One question per subject keeps the demo short (64 optimizer steps at the launcher's defaults): on the
    # embedded tiny model, 160 steps at LEARNING_RATE 5e-4 over-optimise it (docs/method.md, "Known behaviour of
    # the aligned loss").
    parser.add_argument("--templates_per_subject", type=int, default=1)
    args = parser.parse_args(argv)
    train, test = build(args.seed, args.test_fraction, args.templates_per_subject)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        with open(args.output_dir / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
