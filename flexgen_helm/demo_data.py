"""Scenario data the demo writes itself, in the layout HELM downloads to, so its runs need no network.

`write_mmlu_demo` writes a small multiple-choice set of general-knowledge questions (written for this
project, not taken from MMLU) as HELM's MMLU scenario reads them:
`<output_path>/scenarios/mmlu/data/{dev,val,test}/<subject>_<split>.csv`, rows of question, four
options and the letter of the right one. HELM's MMLU scenario then finds its data folder present and
downloads nothing. An MMLU data folder that is already there (the real dataset, or an earlier demo's)
is left as it is.
"""

from __future__ import annotations

import csv
from pathlib import Path

DEMO_SUBJECT = "miscellaneous"

# (question, [A, B, C, D], answer letter)
_DEV = [
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], "B"),
    ("How many days are there in a leap year?", ["365", "364", "366", "360"], "C"),
    ("What is the boiling point of water at sea level in degrees Celsius?", ["100", "90", "80", "120"], "A"),
    ("Which animal is known as the largest mammal?", ["Elephant", "Giraffe", "Hippopotamus", "Blue whale"], "D"),
    ("What colour do you get by mixing blue and yellow?", ["Purple", "Green", "Orange", "Brown"], "B"),
]
_VAL = [
    ("How many legs does a spider have?", ["Six", "Ten", "Eight", "Four"], "C"),
]
_TEST = [
    ("What is the capital of France?", ["Paris", "Rome", "Madrid", "Berlin"], "A"),
    ("How many continents are there on Earth?", ["Five", "Six", "Eight", "Seven"], "D"),
    ("Which gas do plants absorb from the air for photosynthesis?", ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"], "B"),
    ("What is the largest ocean on Earth?", ["Atlantic", "Indian", "Pacific", "Arctic"], "C"),
    ("How many hours are there in a day?", ["24", "12", "20", "30"], "A"),
    ("Which organ pumps blood through the human body?", ["Lungs", "Liver", "Kidney", "Heart"], "D"),
    ("What is frozen water called?", ["Steam", "Ice", "Fog", "Dew"], "B"),
    ("Which is the longest river in Africa?", ["Congo", "Niger", "Nile", "Zambezi"], "C"),
    ("What is 7 multiplied by 8?", ["56", "54", "64", "48"], "A"),
    ("Which language has the most native speakers?", ["English", "Spanish", "Hindi", "Mandarin Chinese"], "D"),
    ("In which country are the pyramids of Giza?", ["Mexico", "Egypt", "Peru", "Greece"], "B"),
    ("What is the chemical symbol for gold?", ["Ag", "Go", "Au", "Gd"], "C"),
    ("How many sides does a hexagon have?", ["Six", "Five", "Seven", "Eight"], "A"),
    ("Who wrote the play Romeo and Juliet?", ["Charles Dickens", "Jane Austen", "Mark Twain", "William Shakespeare"], "D"),
    ("What is the closest star to the Earth?", ["Sirius", "The Sun", "Polaris", "Vega"], "B"),
    ("Which metal is liquid at room temperature?", ["Iron", "Copper", "Mercury", "Aluminium"], "C"),
    ("How many minutes are there in an hour?", ["60", "100", "30", "90"], "A"),
    ("Which is the smallest prime number?", ["0", "1", "3", "2"], "D"),
    ("What is the main language spoken in Brazil?", ["Spanish", "Portuguese", "French", "Italian"], "B"),
    ("What do bees make?", ["Milk", "Silk", "Honey", "Wax paper"], "C"),
]


def write_mmlu_demo(output_path: Path, subject: str = DEMO_SUBJECT) -> bool:
    """Write the demo's MMLU-layout data under `output_path`; False (nothing written) if an MMLU data
    folder is already there."""
    data = Path(output_path) / "scenarios" / "mmlu" / "data"
    if data.exists():
        return False
    for split, rows in (("dev", _DEV), ("val", _VAL), ("test", _TEST)):
        folder = data / split
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            for question, options, answer in rows:
                writer.writerow([question, *options, answer])
    return True
