"""Write the `expenses` example task: an expense claim in free text in, a JSON verdict plus a set of flags out.

A rules task written to judge the training recipe (issue: a recipe judged by the task's own score) and never used to
tune it. Five rules interact, and a claim mentions things that decide nothing (a project, a colleague, the weather):

- missing_receipt: more than $75 and no receipt
- late: submitted more than 60 days after the expense
- over_limit: above the category's limit for the employee's level (limits below)
- alcohol: alcohol on a meals claim that was not client entertainment
- no_preapproval: travel or equipment over $1000 without a pre-approval

The verdict is `approve` when no flag is raised, or when the only flag is over_limit and the claim was pre-approved;
else `reject`. Most claims are clean, so `approve` is the majority verdict (about 70 %).
Run: python examples/expenses/make.py   (same seed, same files: 600 train, 200 eval)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

LIMITS = {  # category -> (staff, manager) limit in dollars
    "meals": (60, 120),
    "travel": (800, 2000),
    "equipment": (500, 1500),
    "software": (300, 1000),
}
ITEMS = {
    "meals": ["a team lunch", "dinner with {who}", "breakfast at the airport", "sandwiches for a workshop"],
    "travel": [
        "a train ticket to {city}",
        "a flight to {city}",
        "two hotel nights in {city}",
        "a rental car in {city}",
    ],
    "equipment": ["a monitor", "a laptop stand and dock", "a noise-cancelling headset", "an ergonomic chair"],
    "software": ["a design tool licence", "a year of a cloud IDE", "a PDF editor", "a diagramming app subscription"],
}
NAMES = ["Ana", "Bilal", "Chen", "Dara", "Elif", "Femi", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lea", "Mateo",
         "Nia", "Omar", "Priya", "Rosa", "Sven", "Tariq", "Uma", "Viktor", "Wen", "Yusuf", "Zoe"]  # fmt: skip
CITIES = ["Lyon", "Porto", "Gdansk", "Leeds", "Graz", "Turin", "Malmo", "Bilbao", "Ghent", "Cluj"]
PROJECTS = ["Atlas", "Beacon", "Cobalt", "Delta", "Ember", "Falcon"]
DISTRACTORS = [
    "It was for the {project} project.",
    "{other} from finance said the form looked fine.",
    "It rained the whole day.",
    "The previous claim, for {city}, was already paid.",
    "I used my personal card this time.",
    "My manager {other} was in the meeting too.",
]
SYSTEM = (
    "Review the expense claim under the policy. Reply with JSON only: "
    '{"verdict": "approve" or "reject", "flags": [sorted list of raised flags]}. '
    "Flags: missing_receipt, late, over_limit, alcohol, no_preapproval."
)


def claim(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(NAMES, 2)
    level = rng.choice(["staff", "staff", "manager"])
    category = rng.choice(sorted(LIMITS))
    limit = LIMITS[category][level == "manager"]
    over = rng.random() < 0.2
    amount = rng.randint(limit + 1, int(limit * 1.6)) if over else rng.randint(max(10, limit // 5), limit)
    receipt = rng.random() < 0.85
    days = rng.randint(61, 120) if rng.random() < 0.12 else rng.randint(1, 60)
    preapproved = rng.random() < 0.5
    client = category == "meals" and rng.random() < 0.4
    alcohol = category == "meals" and rng.random() < 0.25
    flags = set()
    if amount > 75 and not receipt:
        flags.add("missing_receipt")
    if days > 60:
        flags.add("late")
    if amount > limit:
        flags.add("over_limit")
    if alcohol and not client:
        flags.add("alcohol")
    if category in ("travel", "equipment") and amount > 1000 and not preapproved:
        flags.add("no_preapproval")
    verdict = "approve" if not flags or (flags == {"over_limit"} and preapproved) else "reject"

    item = rng.choice(ITEMS[category]).format(who="a client" if client else rng.choice(["the team", other]),
                                              city=rng.choice(CITIES))  # fmt: skip
    parts = [
        f"{name} ({level}) claims ${amount} for {item} ({category}), {days} days ago.",
        rng.choice(["Receipt attached.", "The receipt is attached."])
        if receipt
        else rng.choice(["No receipt, it got lost.", "I could not get a receipt."]),
        rng.choice(["This was pre-approved.", "Pre-approved by my manager."])
        if preapproved
        else rng.choice(["Not pre-approved.", "There was no time to get pre-approval."]),
    ]
    if category == "meals":
        parts.append("The bill includes wine." if alcohol else rng.choice(["No drinks on the bill.", ""]))
        if client:
            parts.append("It was client entertainment.")
    for _ in range(rng.choice([0, 1, 2])):
        parts.insert(rng.randint(1, len(parts)), rng.choice(DISTRACTORS))
    text = " ".join(p for p in parts if p).format(project=rng.choice(PROJECTS), other=other, city=rng.choice(CITIES))
    return text, json.dumps({"verdict": verdict, "flags": sorted(flags)})


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        for text, answer in rows:
            msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random("expenses/0")
    rows, seen = [], set()
    while len(rows) < 800:  # distinct claims only; every claim names its own amount and days, so none nearly repeat
        text, answer = claim(rng)
        if text not in seen:
            seen.add(text)
            rows.append((text, answer))
    write(here / "train.jsonl", rows[:600])
    write(here / "eval.jsonl", rows[600:])


if __name__ == "__main__":
    main()
