"""Drug-interaction extraction: list the interacting pairs among the drugs a clinical note mentions.

The answer follows a fixed, hand-written interaction table, so the model has to learn the table and find the drugs
in free text. The drug list cannot be split between train and eval (the table is the thing learned), so the splits
differ instead in everything around the drugs: patients, clinicians and hospitals come from disjoint halves of
their pools, and every drug *combination* belongs to one split only (by a stable hash), so an eval note never
repeats a train note's set of drugs.
"""

from __future__ import annotations

import json
import random
import zlib

from lorafleet.core.scorers import make_scorer
from lorafleet.core.tasks import GeneratedTask, Split

# A teaching subset of well-known, clinically major interactions; not a clinical reference.
INTERACTIONS = [
    ("clarithromycin", "simvastatin"),  # CYP3A4 inhibition: myopathy, rhabdomyolysis
    ("itraconazole", "simvastatin"),
    ("amiodarone", "simvastatin"),
    ("clarithromycin", "colchicine"),  # colchicine toxicity
    ("aspirin", "warfarin"),  # bleeding
    ("fluconazole", "warfarin"),  # raised INR
    ("amiodarone", "warfarin"),
    ("ibuprofen", "warfarin"),
    ("ciprofloxacin", "warfarin"),
    ("metronidazole", "warfarin"),
    ("sertraline", "tramadol"),  # serotonin syndrome, seizures
    ("fluoxetine", "tramadol"),
    ("linezolid", "sertraline"),
    ("fluoxetine", "linezolid"),
    ("lisinopril", "spironolactone"),  # hyperkalaemia
    ("lisinopril", "potassium chloride"),
    ("potassium chloride", "spironolactone"),
    ("amiodarone", "digoxin"),  # digoxin toxicity
    ("clarithromycin", "digoxin"),
    ("methotrexate", "trimethoprim"),  # bone-marrow suppression
    ("ibuprofen", "methotrexate"),
    ("clopidogrel", "omeprazole"),  # less clopidogrel activation; pantoprazole is the safe alternative
    ("nitroglycerin", "sildenafil"),  # severe hypotension
    ("ciprofloxacin", "theophylline"),  # theophylline toxicity
    ("ciprofloxacin", "tizanidine"),
    ("ibuprofen", "lithium"),  # lithium toxicity
    ("lisinopril", "lithium"),
    ("allopurinol", "azathioprine"),  # azathioprine toxicity
]
INTERACTING = {frozenset(pair) for pair in INTERACTIONS}

# drug -> typical dose phrases; drugs with no table entry are distractors.
DOSES = {
    "simvastatin": ["40 mg nightly", "20 mg at night"],
    "clarithromycin": ["500 mg twice daily", "250 mg BID"],
    "itraconazole": ["200 mg daily", "100 mg twice daily"],
    "amiodarone": ["200 mg daily", "400 mg daily"],
    "colchicine": ["0.5 mg twice daily", "0.6 mg daily"],
    "warfarin": ["5 mg daily (target INR 2-3)", "3 mg daily"],
    "aspirin": ["81 mg daily", "75 mg once a day"],
    "fluconazole": ["150 mg single dose", "200 mg daily"],
    "ibuprofen": ["400 mg three times daily", "600 mg PRN"],
    "ciprofloxacin": ["500 mg twice daily", "750 mg BID"],
    "metronidazole": ["500 mg three times daily", "400 mg TDS"],
    "sertraline": ["50 mg daily", "100 mg each morning"],
    "tramadol": ["50 mg every 6 hours as needed", "100 mg SR twice daily"],
    "fluoxetine": ["20 mg daily", "40 mg each morning"],
    "linezolid": ["600 mg twice daily"],
    "lisinopril": ["10 mg daily", "20 mg once daily"],
    "spironolactone": ["25 mg daily", "50 mg once daily"],
    "potassium chloride": ["20 mEq daily", "600 mg SR twice daily"],
    "digoxin": ["125 mcg daily", "62.5 mcg daily"],
    "methotrexate": ["15 mg once weekly", "10 mg weekly"],
    "trimethoprim": ["200 mg twice daily", "100 mg at night"],
    "clopidogrel": ["75 mg daily"],
    "omeprazole": ["20 mg daily", "40 mg before breakfast"],
    "nitroglycerin": ["0.4 mg SL PRN chest pain", "patch 0.2 mg/hr"],
    "sildenafil": ["50 mg as needed", "20 mg three times daily"],
    "theophylline": ["300 mg SR twice daily", "200 mg BID"],
    "tizanidine": ["4 mg at night", "2 mg three times daily"],
    "lithium": ["400 mg twice daily", "800 mg at night"],
    "allopurinol": ["300 mg daily", "100 mg daily"],
    "azathioprine": ["100 mg daily", "50 mg twice daily"],
    "metformin": ["500 mg twice daily", "1000 mg BID"],
    "pantoprazole": ["40 mg daily", "20 mg before breakfast"],
    "cetirizine": ["10 mg daily"],
    "montelukast": ["10 mg at night"],
    "cholecalciferol": ["1000 IU daily", "20,000 IU weekly"],
    "salbutamol": ["2 puffs PRN", "100 mcg inhaler as needed"],
    "insulin glargine": ["18 units at night", "24 units daily"],
    "latanoprost": ["1 drop each eye at night"],
    "senna": ["15 mg at night", "7.5 mg PRN"],
}
DRUGS = list(DOSES)
MAX_PAIRS = 3  # keeps answers short (< 48 tokens)

PATIENTS = [
    "Margaret Ellison", "Tomasz Wisniewski", "Aisha Rahman", "Gerald Pemberton", "Lucia Ferreira",
    "Harold Finch", "Priya Venkatesan", "Oluwaseun Adeyemi", "Dorothy Kessler", "Mateo Gutierrez",
    "Ingrid Solberg", "Kwame Mensah", "Beatrice Holloway", "Yusuf Demir", "Eleanor Whitcombe", "Ravi Chandran",
    "Agnes Lindqvist", "Frank Delgado", "Mei Ling Zhao", "Stanley Kowalczyk", "Fatima Al-Sayed", "Walter Brennan",
    "Rosa Castellano", "Edmund Thackeray", "Nadia Volkova", "Clarence Obi", "Hilda Johansen", "Samuel Okoro",
    "Greta Hoffmann", "Desmond Achterberg", "Josefina Ruiz", "Albert Nakamura", "Vera Novak", "Cyril Ashdown",
    "Amina Diallo", "Bernard Lefevre", "Theresa Quinlan", "Hamid Farahani", "Olive Mortimer", "Raymond Tsang",
]  # fmt: skip

CLINICIANS = [
    "Dr Amara Osei", "Dr Jonathan Pryce", "Dr Sofia Marchetti", "Dr Henrik Dahl", "Dr Leila Haddadi",
    "Dr Benedict Carrow", "Dr Yuki Morimoto", "Dr Carmen Villalobos", "Dr Nikolai Sorokin", "Dr Grace Adebayo",
    "Dr Isabelle Fontaine", "Dr Arjun Mehrotra", "Dr Siobhan Kearney", "Dr Matthias Brandt", "Dr Naomi Feldman",
    "Dr Tobias Engel", "Dr Rania Khalil", "Dr Oscar Lindgren", "Dr Hannah Whitlock", "Dr Emeka Nwosu",
]  # fmt: skip

HOSPITALS = [
    "Riverside General Hospital", "Mercy Valley Medical Center", "St Aldhelm's Infirmary", "Lakeshore Community Clinic",
    "Northfield University Hospital", "Kingsbridge Health Centre", "Cedar Hill Medical Group", "Bayview Memorial",
    "Ashcombe Family Practice", "Elmstead Regional Hospital", "Harrowgate Medical Centre", "Pine Ridge Clinic",
    "Westbrook Teaching Hospital", "Sunnyvale Cardiology Associates", "Fairhaven Hospital", "Old Mill Surgery",
]  # fmt: skip

DEPARTMENTS = ["cardiology", "general medicine", "the emergency department", "primary care", "rheumatology",
               "psychiatry", "infectious diseases", "the pre-operative clinic"]  # fmt: skip
CONDITIONS = ["type 2 diabetes", "atrial fibrillation", "hypertension", "COPD", "recurrent urinary infections",
              "rheumatoid arthritis", "depression", "gout", "chronic back pain", "heart failure", "asthma",
              "bipolar disorder", "angina", "psoriasis"]  # fmt: skip
ALLERGIES = ["penicillin (rash)", "sulfa drugs", "no known drug allergies", "latex", "codeine (nausea)", "NKDA"]
NOISE = [
    "BP {sys}/{dia}, HR {hr}, afebrile.",
    "Creatinine {cr} mg/dL, eGFR {egfr}.",
    "Lives with daughter; independent with daily activities.",
    "Non-smoker, drinks alcohol occasionally.",
    "Follow-up in {weeks} weeks.",
    "Chest clear, mild ankle oedema.",
    "Reports poor sleep and low appetite.",
]
HOME = ["Current medications: {list}.", "Home meds include {list}.", "Takes {list} regularly.", "Meds: {list}."]
NEW = [
    "Started on {drug} {dose} today.",
    "Plan: add {drug} {dose}.",
    "{Drug} {dose} was prescribed at urgent care last week.",
    "Was given {drug} {dose} in the ED.",
    "We will begin {drug} {dose}.",
]


def pairs_in(drugs: list[str]) -> list[list[str]]:
    """The interacting pairs among drugs: each pair sorted, the list sorted."""
    found = {tuple(sorted(p)) for p in INTERACTING if p <= set(drugs)}
    return [list(p) for p in sorted(found)]


def combo_split(drugs: list[str]) -> Split:
    """The split a drug combination belongs to; crc32 is stable across processes, unlike hash()."""
    return "train" if zlib.crc32(",".join(sorted(drugs)).encode()) % 2 == 0 else "eval"


def _pick_drugs(rng: random.Random, split: Split) -> list[str]:
    while True:
        n = rng.randint(2, 5)
        drugs: list[str] = []
        # Most notes are seeded with one or two known pairs, so every pair is seen often enough to be learned.
        if rng.random() < 0.7:
            for pair in rng.sample(INTERACTIONS, 2 if n >= 4 and rng.random() < 0.3 else 1):
                drugs += [d for d in pair if d not in drugs]
        drugs += rng.sample([d for d in DRUGS if d not in drugs], max(0, n - len(drugs)))
        if len(pairs_in(drugs)) <= MAX_PAIRS and combo_split(drugs) == split:
            rng.shuffle(drugs)
            return drugs


def _medication_text(rng: random.Random, drugs: list[str]) -> list[str]:
    n_home = rng.randint(1, len(drugs))
    home = [f"{d} {rng.choice(DOSES[d])}" for d in drugs[:n_home]]
    sentences = [rng.choice(HOME).format(list=", ".join(home))]
    for d in drugs[n_home:]:
        sentences.append(rng.choice(NEW).format(drug=d, Drug=d.capitalize(), dose=rng.choice(DOSES[d])))
    return sentences


class DrugsTask(GeneratedTask):
    name = "drugs"
    description = "Drug-interaction extraction from a clinical note: JSON list of interacting pairs."
    system_prompt = (
        "You review clinical notes for drug interactions. List every pair of drugs mentioned in the note that "
        "interact. Reply with compact JSON only: a list of pairs of lowercase generic names, each pair sorted "
        'alphabetically and the list sorted, e.g. [["clarithromycin","simvastatin"]], or [] if no pair interacts.'
    )
    # Pair-level F1, order within and between pairs ignored; an answer that is not a JSON list scores 0.
    scorer = make_scorer({"name": "f1", "format": "json", "inner": "set"})
    pools = {"patients": PATIENTS, "clinicians": CLINICIANS, "hospitals": HOSPITALS}

    def make_example(self, rng: random.Random, split: Split) -> tuple[str, str]:
        drugs = _pick_drugs(rng, split)
        patient = rng.choice(self.pool("patients", split))
        clinician = rng.choice(self.pool("clinicians", split))
        hospital = rng.choice(self.pool("hospitals", split))
        age, sex = rng.randint(24, 92), rng.choice(["man", "woman"])
        conditions = rng.sample(CONDITIONS, 2)
        header = rng.choice(
            [
                f"{hospital}, {rng.choice(DEPARTMENTS)}. Patient: {patient}, {age}-year-old {sex}. "
                f"Seen by {clinician}.",
                f"Seen today in {rng.choice(DEPARTMENTS)} at {hospital} by {clinician}. {patient} is a {age}-year-old "
                f"{sex} with {conditions[0]}.",
                f"Note by {clinician} ({hospital}): {patient}, {age}, history of {' and '.join(conditions)}.",
            ]
        )
        noise = rng.sample(NOISE, rng.randint(1, 2)) + [f"Allergies: {rng.choice(ALLERGIES)}."]
        body = _medication_text(rng, drugs) + [
            s.format(
                sys=rng.randint(105, 165),
                dia=rng.randint(60, 95),
                hr=rng.randint(55, 105),
                cr=round(rng.uniform(0.6, 1.8), 1),
                egfr=rng.randint(35, 95),
                weeks=rng.choice([2, 4, 6, 12]),
            )
            for s in noise
        ]
        rng.shuffle(body)
        return header + " " + " ".join(body), answer(pairs_in(drugs))


def answer(pairs: list[list[str]]) -> str:
    return json.dumps(pairs, separators=(",", ":"))


TASK = DrugsTask()
