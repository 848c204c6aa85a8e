"""Write the `tickets` example task: support tickets routed to one of six queues (600 train, 200 eval).

A task written for the bring-your-own-task path and never used to tune the training recipe. Tickets mix a
greeting, one or two sentences of the queue's problem (several phrasings each, some without the obvious keyword),
a sentence that mentions another queue's topic in passing, and a sign-off, so keyword matching is not enough.
Run: python examples/tickets/make.py   (same seed, same files)
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

QUEUES = {
    "billing": [
        "I was charged twice for my {plan} subscription this month, order {order}.",
        "The amount on invoice {invoice} does not match the price I agreed to.",
        "Why did my card get debited {amount} when I am on the free tier?",
        "Could you resend the receipt for payment {order}? Our accountant needs the VAT number on it.",
        "My company card expired and now the renewal for {plan} failed, how do I update the payment method?",
    ],
    "bug_report": [
        "The {feature} page shows a blank screen after the last update.",
        "Every time I export to {format} the app freezes and I have to restart it.",
        "The {feature} button does nothing on {browser}, no error either.",
        "Since yesterday the sync between the phone app and the website loses my last {count} changes.",
        "I get error code {code} when I open the {feature} tab.",
    ],
    "feature_request": [
        "It would be great if {feature} could also handle {format} files.",
        "Please add a dark theme, my team works late and the white background hurts.",
        "Could you let us schedule reports to be sent every {weekday} morning?",
        "We would love an API endpoint for {feature} so we can automate it.",
        "Any plans to support more than {count} users on one workspace? We are growing.",
    ],
    "account_access": [
        "I cannot log in, the password reset mail never arrives at {email}.",
        "My two-factor codes stopped working after I changed phones.",
        "Our admin left the company and nobody can manage the workspace any more.",
        "The account {email} is locked after too many attempts, please unlock it.",
        "I signed up with Google but now I want to use {email} to sign in instead.",
    ],
    "shipping": [
        "Order {order} was supposed to arrive on {weekday} and the tracking has not moved since.",
        "The parcel arrived damaged, the box was crushed and the {item} is broken.",
        "I received a {item} but I ordered two, where is the rest of order {order}?",
        "Can you deliver to a pickup point in {city} instead of my home address?",
        "The courier says the address is wrong, but it is the same one I always use in {city}.",
    ],
    "cancellation": [
        "Please close my account and delete my data, I no longer need the service.",
        "I want to end the {plan} plan at the end of this billing period.",
        "We are moving to another tool, how do we stop the automatic renewal?",
        "Cancel order {order} please, I bought it by mistake.",
        "I'd like to downgrade and then leave entirely once our projects are archived.",
    ],
}
# A passing mention of another queue's topic, so a keyword does not decide the queue.
ASIDES = [
    "The invoice side of things is fine, by the way.",
    "Shipping of my last order was quick, thanks for that.",
    "I am not asking to cancel anything.",
    "Logging in works fine.",
    "I know you are adding new features all the time.",
    "No bug here as far as I can tell.",
]
GREETINGS = ["Hi,", "Hello team,", "Good morning,", "Hey,", "Dear support,", ""]
SIGNOFFS = ["Thanks, {name}", "Best regards, {name}", "Cheers, {name}", "- {name}", "Thank you in advance.", ""]
NAMES = [
    "Ana",
    "Bilal",
    "Chen",
    "Dara",
    "Elif",
    "Femi",
    "Goran",
    "Hana",
    "Ivo",
    "Jun",
    "Kemal",
    "Lea",
    "Mateo",
    "Nia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sven",
    "Tariq",
    "Uma",
    "Viktor",
    "Wen",
    "Yusuf",
    "Zoe",
]
SLOTS = {
    "plan": ["Pro", "Team", "Business", "Starter", "Enterprise"],
    "feature": ["dashboard", "calendar", "reports", "invoices", "team settings", "search", "timeline"],
    "format": ["PDF", "CSV", "Excel", "JSON", "PNG"],
    "browser": ["Safari", "Firefox", "Chrome", "Edge"],
    "weekday": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"],
    "item": ["lamp", "keyboard", "headset", "chair", "monitor stand", "backpack"],
    "city": ["Lyon", "Porto", "Gdansk", "Leeds", "Graz", "Turin", "Malmo", "Bilbao"],
}
LABELS = sorted(QUEUES)
SYSTEM = "Route the support ticket to one queue. Reply with the queue name only, one of: " + ", ".join(LABELS) + "."


def fill(rng: random.Random, text: str, name: str) -> str:
    values = {k: rng.choice(v) for k, v in SLOTS.items()}
    values |= {"order": f"#{rng.randint(10000, 99999)}", "invoice": f"INV-{rng.randint(1000, 9999)}",
               "amount": f"${rng.randint(5, 400)}.{rng.randint(0, 99):02d}", "count": str(rng.randint(2, 50)),
               "code": f"E{rng.randint(100, 999)}", "email": f"{name.lower()}{rng.randint(1, 99)}@example.com",
               "name": name}  # fmt: skip
    return text.format(**values)


def ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(LABELS)
    name = rng.choice(NAMES)
    body = rng.sample(QUEUES[label], rng.choice([1, 1, 2]))
    if rng.random() < 0.5:
        body.insert(rng.randint(0, len(body)), rng.choice(ASIDES))
    parts = [rng.choice(GREETINGS), *body, rng.choice(SIGNOFFS)]
    return fill(rng, " ".join(p for p in parts if p), name), label


def write(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w") as f:
        for text, label in rows:
            msgs = [{"role": "user", "content": text}, {"role": "assistant", "content": label}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def words(text: str) -> frozenset[str]:
    return frozenset(re.findall(r"\w+", text.lower()))


def main() -> None:
    here = Path(__file__).parent
    rng = random.Random("tickets/0")
    train, evals, seen = [], [], set()
    while len(train) < 600:  # distinct tickets only
        text, label = ticket(rng)
        if text not in seen:
            seen.add(text)
            train.append((text, label))
    train_words = [words(t) for t, _ in train]
    while len(evals) < 200:
        # Held out for real: no eval ticket nearly repeats a train one (lorafleet train check would refuse it).
        text, label = ticket(rng)
        w = words(text)
        if text not in seen and all(len(w & o) / len(w | o) < 0.85 for o in train_words):
            seen.add(text)
            evals.append((text, label))
    write(here / "train.jsonl", train)
    write(here / "eval.jsonl", evals)


if __name__ == "__main__":
    main()
