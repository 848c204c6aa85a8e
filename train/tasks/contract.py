"""Contract-clause classification: one clause in, one of ten labels out.

Clauses are built from several phrasings per label, with party names, jurisdictions, amounts and periods filled
in. Some phrasings avoid the label's keywords ("acts of God" for force majeure) and boilerplate sentences that
mention other topics ("shall survive termination") are mixed in, so keyword matching is not enough.
"""

from __future__ import annotations

import random

from lorafleet.core.scorers import make_scorer
from lorafleet.core.tasks import Checks, GeneratedTask, Split

TEMPLATES = {
    "termination": [
        "Either party may terminate this Agreement for convenience upon {days} days' prior written notice to the "
        "other party.",
        "{a} may terminate this Agreement with immediate effect by written notice if {b} commits a material breach "
        "and fails to cure it within {days} days after receiving notice of the breach.",
        "This Agreement shall automatically end if either party becomes insolvent, makes an assignment for the "
        "benefit of creditors or has a receiver appointed over its assets.",
        "Upon expiry or earlier termination, {b} shall cease all use of the Services and pay {a} all fees accrued "
        "up to the effective date of termination.",
        "{a} may end this Agreement at the end of any {months}-month renewal term by giving {b} written notice no "
        "later than {days} days before the renewal date.",
    ],
    "confidentiality": [
        "{b} shall keep confidential all non-public information disclosed by {a} and shall not disclose it to any "
        "third party without {a}'s prior written consent.",
        "Each party shall use the other party's Confidential Information solely to perform this Agreement and shall "
        "protect it with at least the degree of care it uses for its own similar information.",
        "The obligations of non-disclosure in this Section shall continue for {years} years after the disclosure of "
        "the relevant information by {a} to {b}.",
        "{b} may disclose proprietary information of {a} only to employees and advisers who need to know it and are "
        "bound by written obligations of secrecy no less protective than these.",
        "Information that is publicly available, already known to the recipient or independently developed by it "
        "is not subject to the restrictions on use and disclosure set out herein.",
    ],
    "indemnification": [
        "{a} shall indemnify, defend and hold harmless {b} and its officers from any third-party claims, losses and "
        "expenses arising out of {a}'s negligence or wilful misconduct.",
        "{b} agrees to defend {a} against any action alleging that the Deliverables infringe a third party's rights "
        "and to pay any damages finally awarded in such action.",
        "Each party shall compensate the other for all losses, costs and reasonable attorneys' fees resulting from "
        "third-party claims caused by its breach of this Agreement.",
        "The indemnified party shall notify {a} promptly of any claim, give it sole control of the defence and "
        "provide reasonable assistance at {a}'s expense.",
    ],
    "limitation_of_liability": [
        "In no event shall either party be liable for any indirect, incidental, special or consequential damages, "
        "including loss of profits, arising out of this Agreement.",
        "{a}'s total aggregate liability under this Agreement shall not exceed the fees paid by {b} in the "
        "{months} months preceding the event giving rise to the claim.",
        "The maximum amount recoverable by {b} from {a} for all claims in any contract year is capped at "
        "{currency}{amount}.",
        "Neither party excludes liability for death or personal injury caused by negligence, but otherwise each "
        "party's liability is limited to {currency}{amount} in total.",
    ],
    "governing_law": [
        "This Agreement shall be governed by and construed in accordance with the laws of {jurisdiction}, without "
        "regard to its conflict of laws principles.",
        "Any dispute arising out of or in connection with this Agreement shall be subject to the exclusive "
        "jurisdiction of the courts of {court}.",
        "The parties agree that the law of {jurisdiction} applies to this Agreement and to any non-contractual "
        "obligations arising from it.",
        "All disputes between {a} and {b} shall be finally settled by arbitration seated in {court}, and the "
        "substantive law of {jurisdiction} shall apply.",
    ],
    "payment_terms": [
        "{b} shall pay each undisputed invoice issued by {a} within {days} days of the invoice date by bank transfer "
        "to the account designated by {a}.",
        "The fees of {currency}{amount} per month are payable in advance on the first business day of each calendar "
        "month.",
        "Late payments shall bear interest at {rate}% per month from the due date until paid in full, and {a} may "
        "suspend the Services while any amount remains overdue.",
        "{a} will invoice {b} quarterly in arrears, and all amounts are exclusive of VAT, which {b} shall pay in "
        "addition at the applicable rate.",
        "{b} shall remit a deposit of {currency}{amount} on signature, with the balance due within {days} days of "
        "acceptance of the final deliverable.",
    ],
    "force_majeure": [
        "Neither party shall be liable for any failure or delay in performance caused by events beyond its "
        "reasonable control, including fire, flood, war, epidemic or strikes.",
        "If {a} is prevented from performing by an act of God, governmental action or a failure of public utilities, "
        "its obligations shall be suspended for the duration of the event.",
        "A party affected by a force majeure event shall notify the other within {days} days and use reasonable "
        "efforts to mitigate its effects.",
        "Should circumstances outside either party's control, such as natural disasters or civil unrest, continue "
        "for more than {months} months, either party may end this Agreement without liability.",
    ],
    "intellectual_property": [
        "All intellectual property rights in the Deliverables shall vest in {a} upon creation, and {b} hereby "
        "assigns to {a} all right, title and interest therein.",
        "{a} grants {b} a non-exclusive, non-transferable licence to use the Software solely for its internal "
        "business purposes during the term.",
        "Each party retains ownership of its pre-existing materials, and nothing in this Agreement transfers any "
        "patent, copyright or trademark of one party to the other.",
        "{b} shall not reverse engineer, decompile or create derivative works of the Software, and all improvements "
        "made by either party shall belong to {a}.",
        "{b} may use {a}'s name and logo only as approved in writing, and all goodwill arising from such use inures "
        "to {a}'s benefit.",
    ],
    "non_compete": [
        "During the term and for {months} months thereafter, {b} shall not engage in any business that competes with "
        "{a} within {jurisdiction}.",
        "For a period of {years} years following the closing, the seller shall not, directly or indirectly, own, "
        "manage or operate a competing business in {jurisdiction}.",
        "{b} shall not solicit or hire any employee of {a}, nor offer competing services to {a}'s customers, for "
        "{months} months after this Agreement ends.",
        "The Consultant undertakes not to provide similar services to any direct competitor of {a} while engaged and "
        "for {months} months afterwards.",
    ],
    "warranty": [
        "{a} warrants that the Services will be performed in a professional and workmanlike manner in accordance "
        "with generally accepted industry standards.",
        "{a} represents that the Products will be free from defects in materials and workmanship for {months} months "
        "from the date of delivery.",
        "If any Product fails to conform to its specifications during the warranty period, {a} shall at its option "
        "repair or replace it free of charge.",
        "Except as expressly set out herein, {a} makes no representations and disclaims all implied warranties, "
        "including merchantability and fitness for a particular purpose.",
    ],
}
LABELS = sorted(TEMPLATES)

# Boilerplate that mentions other labels' topics: appended to clauses of any label.
BOILERPLATE = [
    "This Section shall survive any expiration or termination of this Agreement.",
    "Capitalized terms used in this clause have the meanings given to them in Schedule 1.",
    "Any notice under this clause shall be in writing and sent to the addresses set out above.",
    "The rights in this clause are in addition to any other rights and remedies of {a}.",
    "For the avoidance of doubt, this clause does not limit {b}'s obligations under the Statement of Work.",
]
PREFIXES = ["", "", "", "{n}.{m} ", "Section {n}.{m}. ", "Clause {n}({letter}) ", "Article {n}: "]

COMPANIES = [
    "Orchard Lane Analytics Ltd", "Brightpath Software Inc.", "Harbourview Capital LLP", "Stellar Freight GmbH",
    "Nimbus Cloud Services Inc.", "Copperleaf Pharmaceuticals plc", "Greystone Engineering Ltd", "Aldergate Media",
    "Bluefin Robotics Corp.", "Westmarch Retail Group", "Quillon Legal Tech SAS", "Pinecrest Health Systems",
    "Lumen Data Labs BV", "Ravenscourt Consulting", "Tessellate Design Studio", "Highmoor Energy plc",
    "Silverline Payments Ltd", "Kingfisher Foods Inc.", "Arborvale Biotech AG", "Northgate Security Services",
    "Crescent Bay Hotels", "Meadowbrook Logistics", "Vantage Point Marketing", "Ironwood Construction Co.",
    "Sablewood Games Ltd", "Everbright Solar Pty Ltd", "Foxglove Insurance SE", "Cobalt Ridge Mining",
    "Hawthorne University Press", "Summit Peak Telecom", "Driftwood Apparel Inc.", "Palisade Medical Devices",
]  # fmt: skip

# jurisdiction -> seat of its courts
JURISDICTIONS = {
    "the State of New York": "New York County, New York",
    "England and Wales": "London",
    "the State of Delaware": "Wilmington, Delaware",
    "Ontario": "Toronto",
    "New South Wales": "Sydney",
    "Singapore": "the Republic of Singapore",
    "Ireland": "Dublin",
    "the Netherlands": "Amsterdam",
    "the State of California": "San Francisco, California",
    "Scotland": "Edinburgh",
    "Germany": "Frankfurt am Main",
    "Switzerland": "Zurich",
    "the State of Texas": "Austin, Texas",
    "British Columbia": "Vancouver",
    "Hong Kong": "the Hong Kong Special Administrative Region",
    "Sweden": "Stockholm",
    "the State of Illinois": "Chicago, Illinois",
    "Victoria": "Melbourne",
    "France": "Paris",
    "Japan": "Tokyo",
}
CURRENCIES = ["$", "US$", "EUR ", "GBP ", "CHF ", "A$"]


class ContractTask(GeneratedTask):
    name = "contract"
    description = "Contract-clause classification into one of ten clause types."
    system_prompt = (
        "You classify contract clauses. Read the clause and reply with exactly one label and nothing else, "
        f"chosen from: {', '.join(LABELS)}."
    )
    scorer = make_scorer({"name": "label", "labels": LABELS})  # case, spacing, quotes, a final period aside
    # Clauses of templates without names (and those differing in a number only) repeat across the splits:
    # measured 7 identical + 13 near-identical of 200 eval inputs at seed 0. The report shows it; allowed here.
    checks = Checks(max_overlap=0.15)
    pools = {"companies": COMPANIES, "jurisdictions": list(JURISDICTIONS)}

    def make_example(self, rng: random.Random, split: Split) -> tuple[str, str]:
        label = rng.choice(LABELS)
        a, b = rng.sample(self.pool("companies", split), 2)
        jurisdiction = rng.choice(self.pool("jurisdictions", split))
        slots = {
            "a": a,
            "b": b,
            "jurisdiction": jurisdiction,
            "court": JURISDICTIONS[jurisdiction],
            "days": rng.choice([5, 7, 10, 14, 15, 21, 30, 45, 60, 90]),
            "months": rng.choice([3, 6, 9, 12, 18, 24, 36]),
            "years": rng.choice([2, 3, 5, 7, 10]),
            "amount": f"{rng.choice([5, 10, 25, 50, 75, 100, 150, 250, 500, 1000]) * 1000:,}",
            "currency": rng.choice(CURRENCIES),
            "rate": rng.choice(["1", "1.5", "2", "0.5"]),
            "n": rng.randint(2, 24),
            "m": rng.randint(1, 9),
            "letter": rng.choice("abcdef"),
        }
        text = rng.choice(PREFIXES) + rng.choice(TEMPLATES[label])
        if rng.random() < 0.35:
            text += " " + rng.choice(BOILERPLATE)
        return text.format(**slots), label


TASK = ContractTask()
