"""Shipping-manifest discrepancy detection: compare what was declared with what arrived.

Each input is a manifest (shipper, vessel, ports, seal, declared cargo) and an arrival inspection (port, seal
found, counted and weighed cargo) with 0-2 injected discrepancies a careful reader can see by comparing the two
halves. The same numbers are sometimes written differently (1,450 vs 1450): a format change is not a discrepancy.
"""

from __future__ import annotations

import json
import random

from train.tasks.base import Split, Task, f1, normalize_label, parse_json

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


def _inject(rng: random.Random, reasons: list[str], items: list[dict], products: list[str]) -> list[dict]:
    """The cargo found on arrival: the declared items, changed as the reasons say, in a different order."""
    found = [dict(item) for item in items]
    if "quantity_mismatch" in reasons:
        item = rng.choice(found)
        delta = rng.randint(1, min(6, item["qty"] - 1))
        item["qty"] += delta if rng.random() < 0.4 else -delta
    if "weight_mismatch" in reasons:
        item = rng.choice(found)
        change = max(5, round(item["kg"] * rng.uniform(0.06, 0.3)))
        item["kg"] += change if rng.random() < 0.5 else -change
    if "undeclared_item" in reasons:
        extra = _declare(rng, [p for p in products if p not in {i["product"] for i in items}])[0]
        found.append(extra)
    rng.shuffle(found)
    return found


def _manifest_text(rng: random.Random, m: dict) -> str:
    commas = rng.random() < 0.5
    cargo = [f"{i['qty']} {i['unit']} of {i['product']}, {_kg(i['kg'], commas)}" for i in m["items"]]
    layout = rng.randrange(3)
    if layout == 0:
        return (
            f"SHIPPING MANIFEST {m['ref']}\nShipper: {m['shipper']}. Consignee: {m['consignee']}.\n"
            f"Vessel {m['vessel']}, {m['pol']} to {m['pod']}. Container {m['container']}, seal {m['seal']}.\n"
            "Declared cargo:\n" + "\n".join(f"- {c}" for c in cargo)
        )
    if layout == 1:
        return (
            f"Manifest no. {m['ref']} | {m['vessel']} | loaded at {m['pol']}, port of discharge {m['pod']}\n"
            f"Shipper {m['shipper']} / consignee {m['consignee']}\n"
            f"Container {m['container']} sealed with {m['seal']}.\nDeclared: " + "; ".join(cargo) + "."
        )
    return (
        f"Bill of lading {m['ref']}: {m['shipper']} ships to {m['consignee']} aboard the {m['vessel']} from "
        f"{m['pol']}, discharge port {m['pod']}. The manifest declares " + ", ".join(cargo) + ". "
        f"Seal {m['seal']} was applied at origin on container {m['container']}."
    )


def _inspection_text(rng: random.Random, m: dict) -> str:
    commas = rng.random() < 0.5
    found = [f"{i['product']}: {i['qty']} {i['unit']}, {_kg(i['kg'], commas)}" for i in m["found"]]
    layout = rng.randrange(3)
    if layout == 0:
        text = (
            f"Arrival report, {m['arrival']}, {m['date']} (inspector {m['inspector']}):\n"
            f"Seal on arrival: {m['seal_found']}\nCounted and weighed at dock:\n" + "\n".join(f"- {f}" for f in found)
        )
    elif layout == 1:
        text = (
            f"Tally at {m['arrival']} terminal on {m['date']} by {m['inspector']}: " + "; ".join(found) + ". "
            f"Seal checked: {m['seal_found']}."
        )
    else:
        text = (
            f"On discharge at {m['arrival']} ({m['date']}), {m['inspector']} found seal {m['seal_found']} "
            "and counted " + ", ".join(found) + "."
        )
    if rng.random() < 0.5:
        text += f"\nRemarks: {rng.choice(REMARKS)}."
    return text


class ManifestTask(Task):
    name = "manifest"
    description = "Shipping-manifest discrepancy detection: declared cargo vs arrival inspection, JSON verdict."
    system_prompt = (
        "Compare a shipping manifest with its arrival inspection. Reply with compact JSON only: "
        '{"verdict":"ok","reasons":[]} if everything matches, else {"verdict":"discrepancy","reasons":[...]} with '
        "the sorted reasons that apply: port_mismatch (arrived at a port other than the discharge port), "
        "quantity_mismatch (a count differs), seal_mismatch (the seal number differs), undeclared_item (an item "
        "found was not declared), weight_mismatch (a weight differs)."
    )
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
        seal = _seal(rng)
        items = _declare(rng, products)
        m = {
            "ref": f"{rng.choice(['MNF', 'BL', 'SHP'])}-{rng.randint(10000, 99999)}",
            "shipper": shipper,
            "consignee": consignee,
            "vessel": rng.choice(self.pool("vessels", split)),
            "pol": pol,
            "pod": pod,
            "container": _container(rng),
            "seal": seal,
            "items": items,
            "arrival": other_port if "port_mismatch" in reasons else pod,
            "seal_found": _other_seal(rng, seal) if "seal_mismatch" in reasons else seal,
            "found": _inject(rng, reasons, items, products),
            "date": f"{rng.randint(1, 28)} {rng.choice(MONTHS)}",
            "inspector": rng.choice(self.pool("inspectors", split)),
        }
        user = _manifest_text(rng, m) + "\n" + _inspection_text(rng, m)
        return user, answer(reasons)

    def score(self, prediction: str, reference: str) -> float:
        """Half for the verdict, half for the F1 of the reason sets; a prediction that is not a JSON object: 0."""
        pred, ref = parse_json(prediction), json.loads(reference)
        if not isinstance(pred, dict):
            return 0.0
        verdict = pred.get("verdict")
        verdict_ok = isinstance(verdict, str) and normalize_label(verdict) == ref["verdict"]
        reasons = pred.get("reasons")
        if not isinstance(reasons, list) or not all(isinstance(r, str) for r in reasons):
            return 0.5 * verdict_ok
        return 0.5 * verdict_ok + 0.5 * f1({normalize_label(r) for r in reasons}, set(ref["reasons"]))


def answer(reasons: list[str]) -> str:
    """The canonical answer: compact JSON, reasons sorted."""
    verdict = "discrepancy" if reasons else "ok"
    return json.dumps({"verdict": verdict, "reasons": sorted(reasons)}, separators=(",", ":"))


TASK = ManifestTask()
