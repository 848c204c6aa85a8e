"""Shipping-manifest discrepancy detection: compare what was declared with what arrived.

Each input is an outturn report, written by a surveyor on discharge: the manifest (ports, seal, cargo) and the
survey's findings in free text, 0-2 of which are discrepancies, each phrased one of several ways. The task is to
code the findings into the tenant's reason codes. Confirmations ("seal intact", a weight written 1450 where the
manifest says 1,450) and remarks (damage, delays) are distractors, never a reason.
"""

from __future__ import annotations

import json
import random

from lorafleet.core.scorers import make_scorer
from lorafleet.core.tasks import GeneratedTask, Split

REASONS = ["port_mismatch", "quantity_mismatch", "seal_mismatch", "undeclared_item", "weight_mismatch"]
# How many discrepancies an example has: clean manifests are common, as in real inspections.
N_REASONS_WEIGHTS = {0: 0.35, 1: 0.4, 2: 0.25}

# product -> (unit, min qty, max qty, min kg per unit, max kg per unit)
PRODUCTS = {
    "ceramic floor tiles": ("cartons", 20, 160, 18, 26),
    "bottled mineral water": ("pallets", 4, 24, 600, 900),
    "cotton bath towels": ("bales", 10, 80, 40, 60),
    "LED light panels": ("cartons", 30, 240, 8, 14),
    "frozen shrimp": ("cartons", 100, 900, 10, 12),
    "extra virgin olive oil": ("cases", 40, 400, 9, 13),
    "laptop computers": ("cartons", 20, 300, 6, 10),
    "brake pads": ("cartons", 30, 200, 15, 22),
    "stainless steel bolts": ("kegs", 10, 60, 40, 55),
    "children's bicycles": ("crates", 10, 60, 25, 35),
    "office chairs": ("cartons", 20, 150, 14, 20),
    "garden hoses": ("bundles", 20, 120, 20, 30),
    "canned tomatoes": ("cases", 100, 800, 11, 14),
    "polyester yarn": ("bales", 10, 70, 100, 150),
    "solar inverters": ("cartons", 10, 90, 20, 30),
    "wine glasses": ("cartons", 30, 250, 7, 10),
    "nitrile gloves": ("cartons", 50, 500, 9, 12),
    "basmati rice": ("bags", 100, 900, 24, 26),
    "green coffee beans": ("sacks", 50, 320, 59, 61),
    "cocoa powder": ("bags", 60, 400, 24, 26),
    "printer paper": ("pallets", 4, 20, 450, 700),
    "electric kettles": ("cartons", 40, 300, 9, 13),
    "denim jeans": ("bales", 10, 90, 35, 50),
    "truck tyres": ("pieces", 20, 200, 50, 70),
    "PVC pipes": ("bundles", 10, 60, 60, 90),
    "sunflower seeds": ("bags", 100, 800, 24, 26),
    "marble slabs": ("crates", 4, 30, 300, 450),
    "air filters": ("cartons", 40, 300, 5, 8),
    "yoga mats": ("cartons", 30, 200, 10, 15),
    "cordless drills": ("cartons", 20, 160, 12, 18),
    "copper wire": ("reels", 10, 80, 40, 80),
    "dried apricots": ("cartons", 50, 400, 12, 14),
}

COMPANIES = [
    "Northwind Traders", "Baltic Home Goods", "Helios Components", "Kestrel Logistics", "Marlowe & Finch",
    "Sunridge Foods", "Torvald Industrial", "Pacifica Apparel", "Granite Peak Supply", "Blue Harbor Imports",
    "Castellan Tiles", "Oakmont Retail", "Vireo Electronics", "Meridian Agri", "Larkspur Outdoor", "Ferro Nordic",
    "Calder Beverage", "Amberline Textiles", "Quayside Hardware", "Redwood Office Systems", "Solano Produce",
    "Brightwater Kitchens", "Ironbridge Auto Parts", "Halcyon Medical Supply", "Juniper & Vale",
    "Tidewater Commodities", "Everest Sporting Goods", "Lindqvist Trading", "Orinoco Coffee Export",
    "Saffron Road Foods", "Maple Crest Paper", "Zephyr Renewables",
]  # fmt: skip

PORTS = [
    "Rotterdam", "Antwerp", "Hamburg", "Gdansk", "Felixstowe", "Le Havre", "Valencia", "Genoa", "Piraeus",
    "Singapore", "Busan", "Shanghai", "Ningbo", "Yokohama", "Los Angeles", "Savannah", "Santos", "Durban",
    "Jebel Ali", "Colombo", "Halifax", "Algeciras", "Bremerhaven", "Klaipeda", "Mombasa", "Callao", "Manzanillo",
    "Port Klang", "Haiphong", "Tanger Med",
]  # fmt: skip

VESSELS = [
    "MV Nordic Aurora", "MV Cape Verity", "MV Atlantic Heron", "MV Jade Meridian", "MV Silver Kestrel",
    "MV Ocean Tern", "MV Baltic Pioneer", "MV Coral Monarch", "MV Eastern Lark", "MV Polar Ember",
    "MV Indigo Tide", "MV Iron Gannet", "MV Golden Albatross", "MV Northern Vale", "MV Celtic Dawn",
    "MV Amber Osprey",
]  # fmt: skip

INSPECTORS = [
    "J. Alvarez", "M. Okafor", "S. Lindberg", "K. Tanaka", "R. Moreau", "A. Kowalski", "D. Haddad", "L. Fischer",
    "P. Nair", "T. O'Connell", "E. Rossi", "N. Petrov", "C. Mendes", "H. Yilmaz", "B. Andersen", "F. Dubois",
]  # fmt: skip

REMARKS = [
    "two cartons show minor corner damage, contents intact",
    "berthing delayed by six hours due to high winds",
    "fumigation certificate attached to the file",
    "customs hold released after document check",
    "container washed and returned to the depot",
    "original bill of lading received by courier",
    "reefer plug-in not required for this unit",
    "forklift operator reported a wet floor near bay 4",
    "photos of the cargo uploaded to the claims portal",
    "consignee's agent present during the tally",
]

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _kg(value: int, commas: bool) -> str:
    return f"{value:,} kg" if commas else f"{value} kg"


def _seal(rng: random.Random) -> str:
    return f"{rng.choice(['SL-', 'ML-', 'CN', 'HS-', 'SEAL '])}{rng.randint(100000, 999999)}"


def _other_seal(rng: random.Random, seal: str) -> str:
    """A seal number differing in 2-3 digits: close enough that only a careful reader notices."""
    prefix, digits = seal[:-6], list(seal[-6:])
    while "".join(digits) == seal[-6:]:
        for i in rng.sample(range(6), rng.randint(2, 3)):
            digits[i] = rng.choice("0123456789")
    return prefix + "".join(digits)


def _container(rng: random.Random) -> str:
    owner = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(3))
    return f"{owner}U {rng.randint(100000, 999999)}-{rng.randint(0, 9)}"


def _declare(rng: random.Random, products: list[str]) -> list[dict]:
    items = []
    for product in rng.sample(products, rng.randint(2, 3)):
        unit, qlo, qhi, klo, khi = PRODUCTS[product]
        qty = rng.randint(qlo, qhi)
        items.append({"product": product, "unit": unit, "qty": qty, "kg": round(qty * rng.uniform(klo, khi))})
    return items


# How a surveyor writes each finding. Every template of a discrepancy names the evidence (the other port, the
# other seal, both figures or the difference, the unlisted product); the "fine" notes and remarks are the
# distractors a reader must not code as reasons: a confirmed seal, a weight written 1450 instead of 1,450, damage.
PORT_BAD = [
    "container discharged at {other} instead of {pod}",
    "vessel diverted, cargo landed at {other}, not {pod}",
    "box arrived at {other}; the manifest shows discharge at {pod}",
    "discharge port on arrival was {other} (manifested: {pod})",
]
PORT_OK = ["discharged at {pod} as manifested", "arrived at {pod} on schedule", "landed at {pod}"]
SEAL_BAD = [
    "seal found {found}, the manifest says {seal}",
    "seal {seal} missing; container closed with {found}",
    "seal number {found} does not match {seal}",
    "seal replaced in transit, now {found}",
]
SEAL_OK = ["seal {seal} intact", "seal checked and matches the manifest", "seal {seal} verified"]
QTY_BAD = [
    "{product} {short_over} by {d} {unit}",
    "{product}: {q2} {unit} counted against {q} manifested",
    "tally of {product} is {q2} {unit}, manifest {q}",
]
QTY_OK = ["all packages tallied as manifested", "{product} count agrees ({q} {unit})", "package count correct"]
WEIGHT_BAD = [
    "{product} weighed {kg2} against {kg} declared",
    "{product} is {dkg} kg {heavier_lighter} than manifested",
    "gross weight of {product} off by {dkg} kg",
]
WEIGHT_OK = ["weights agree with the manifest", "{product} weighed {kg_other_format} as declared"]
EXTRA_BAD = [
    "found {q} {unit} of {product} not listed on the manifest",
    "unmanifested cargo: {product}, {q} {unit}",
    "extra {product} ({q} {unit}) in the container",
]


def _finding(rng: random.Random, reasons: list[str], reason: str, bad: list[str], ok: list[str], **fill) -> list[str]:
    """One note on a check: a template of `bad` if the reason applies, else (often) a confirming one of `ok`."""
    if reason in reasons:
        return [rng.choice(bad).format(**fill)]
    return [rng.choice(ok).format(**fill)] if ok and rng.random() < 0.6 else []


def _notes(rng: random.Random, reasons: list[str], m: dict, products: list[str]) -> list[str]:
    """The surveyor's findings, one per check, in random order, plus sometimes an irrelevant remark."""
    item = rng.choice(m["items"])
    d = rng.randint(1, min(6, item["qty"] - 1))
    q2 = item["qty"] + d if rng.random() < 0.4 else item["qty"] - d
    dkg = max(5, round(item["kg"] * rng.uniform(0.06, 0.3)))
    kg2 = item["kg"] + dkg if rng.random() < 0.5 else item["kg"] - dkg
    commas = m["commas"]
    extra = _declare(rng, [p for p in products if p not in {i["product"] for i in m["items"]}])[0]
    notes = [
        *_finding(rng, reasons, "port_mismatch", PORT_BAD, PORT_OK, other=m["other_port"], pod=m["pod"]),
        *_finding(rng, reasons, "seal_mismatch", SEAL_BAD, SEAL_OK, seal=m["seal"], found=_other_seal(rng, m["seal"])),
        *_finding(
            rng,
            reasons,
            "quantity_mismatch",
            QTY_BAD,
            QTY_OK,
            product=item["product"],
            unit=item["unit"],
            q=item["qty"],
            q2=q2,
            d=d,
            short_over="over" if q2 > item["qty"] else "short",
        ),
        *_finding(
            rng,
            reasons,
            "weight_mismatch",
            WEIGHT_BAD,
            WEIGHT_OK,
            product=item["product"],
            kg=_kg(item["kg"], commas),
            kg2=_kg(kg2, commas),
            dkg=dkg,
            heavier_lighter="heavier" if kg2 > item["kg"] else "lighter",
            kg_other_format=_kg(item["kg"], not commas),
        ),
        *_finding(
            rng,
            reasons,
            "undeclared_item",
            EXTRA_BAD,
            [],
            product=extra["product"],
            unit=extra["unit"],
            q=extra["qty"],
        ),
    ]
    rng.shuffle(notes)
    if rng.random() < 0.4:
        notes.append(rng.choice(REMARKS))
    return notes or ["no exceptions"]


def _report(rng: random.Random, m: dict, notes: list[str]) -> str:
    cargo = [f"{i['qty']} {i['unit']} of {i['product']} ({_kg(i['kg'], m['commas'])})" for i in m["items"]]
    head = (
        f"Outturn report {m['ref']}: {m['vessel']}, {m['pol']} to {m['pod']}, container {m['container']}, "
        f"seal {m['seal']}. Shipper {m['shipper']}, consignee {m['consignee']}. Manifest: " + "; ".join(cargo) + "."
    )
    if rng.random() < 0.5:
        return head + f"\nSurvey by {m['inspector']}, {m['date']}:\n" + "\n".join(f"- {n}" for n in notes)
    return head + f" {m['inspector']} ({m['date']}): " + "; ".join(notes) + "."


class ManifestTask(GeneratedTask):
    name = "manifest"
    description = "Shipping-manifest discrepancy detection: declared cargo vs arrival inspection, JSON verdict."
    system_prompt = (
        "Code the findings of a cargo outturn report. Reply with compact JSON only: "
        '{"verdict":"ok","reasons":[]} if everything matches, else {"verdict":"discrepancy","reasons":[...]} with '
        "the sorted reasons that apply: port_mismatch (arrived at a port other than the discharge port), "
        "quantity_mismatch (a count differs), seal_mismatch (the seal number differs), undeclared_item (an item "
        "found was not declared), weight_mismatch (a weight differs)."
    )
    # Half for the verdict, half for the F1 of the reason sets; an answer that is not a JSON object scores 0.
    scorer = make_scorer({"name": "json", "lists": "set", "strings": "label"})
    pools = {
        "companies": COMPANIES,
        "ports": PORTS,
        "vessels": VESSELS,
        "products": list(PRODUCTS),
        "inspectors": INSPECTORS,
    }

    def make_example(self, rng: random.Random, split: Split) -> tuple[str, str]:
        n_reasons = rng.choices(list(N_REASONS_WEIGHTS), weights=list(N_REASONS_WEIGHTS.values()))[0]
        reasons = sorted(rng.sample(REASONS, n_reasons))
        products = self.pool("products", split)
        shipper, consignee = rng.sample(self.pool("companies", split), 2)
        pol, pod, other_port = rng.sample(self.pool("ports", split), 3)
        m = {
            "ref": f"{rng.choice(['MNF', 'BL', 'SHP'])}-{rng.randint(10000, 99999)}",
            "shipper": shipper,
            "consignee": consignee,
            "vessel": rng.choice(self.pool("vessels", split)),
            "pol": pol,
            "pod": pod,
            "other_port": other_port,
            "container": _container(rng),
            "seal": _seal(rng),
            "items": _declare(rng, products),
            "commas": rng.random() < 0.5,
            "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)}",
            "inspector": rng.choice(self.pool("inspectors", split)),
        }
        return _report(rng, m, _notes(rng, reasons, m, products)), answer(reasons)


def answer(reasons: list[str]) -> str:
    """The canonical answer: compact JSON, reasons sorted."""
    verdict = "discrepancy" if reasons else "ok"
    return json.dumps({"verdict": verdict, "reasons": sorted(reasons)}, separators=(",", ":"))


TASK = ManifestTask()
