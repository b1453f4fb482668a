"""Short factual preference pairs of several kinds, written by the project: where DPO displaces a real model.

Every pair asks a factual question and prefers the answer a small instruct model already gives (or close to it).
Three topics: `capital` ("What is the capital of C?", y+ = "The capital of C is X."), `symbol` ("What is the
chemical symbol of E?", y+ = "The chemical symbol of E is S.") and `sum` ("What is A plus B?", y+ = "A plus B is
N."). The kinds differ in y-:

  edit        the same sentence with one word changed: another fact's answer ("The capital of C is Y.").
              The literature's most reliable trigger (Pal et al. 2024, the DPOP paper): y+ and y- share every
              token but the answer, so pushing y- down pushes the shared tokens after it down too.
  paraphrase  the same answer in other words ("X is the capital of C."): two responses of the same kind.
  offpolicy   the answer to another prompt ("The capital of D is Y."): a response the model finds unlikely here.

`CAPITALS`, `ELEMENTS` and `SUMS` are the project's own lists (subject, answer; every answer distinct within its
topic); `rows(kind, topic=...)` builds the pairs of one topic, `topic_rows` of several, seeded.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

KINDS = ("edit", "paraphrase", "offpolicy")

# (country as it reads after "the capital of", capital): well-known capitals, one word or two.
CAPITALS = (
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Russia", "Moscow"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Egypt", "Cairo"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Poland", "Warsaw"),
    ("Hungary", "Budapest"),
    ("Ireland", "Dublin"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"),
    ("the Czech Republic", "Prague"),
    ("Romania", "Bucharest"),
    ("Bulgaria", "Sofia"),
    ("Turkey", "Ankara"),
    ("Iran", "Tehran"),
    ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("South Korea", "Seoul"),
    ("North Korea", "Pyongyang"),
    ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"),
    ("Malaysia", "Kuala Lumpur"),
    ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"),
    ("Afghanistan", "Kabul"),
    ("Kenya", "Nairobi"),
    ("Ethiopia", "Addis Ababa"),
    ("Nigeria", "Abuja"),
    ("Ghana", "Accra"),
    ("Morocco", "Rabat"),
    ("Algeria", "Algiers"),
    ("Tunisia", "Tunis"),
    ("Argentina", "Buenos Aires"),
    ("Brazil", "Brasilia"),
    ("Chile", "Santiago"),
    ("Peru", "Lima"),
    ("Colombia", "Bogota"),
    ("Venezuela", "Caracas"),
    ("Ecuador", "Quito"),
    ("Cuba", "Havana"),
    ("Mexico", "Mexico City"),
    ("Canada", "Ottawa"),
    ("the United States", "Washington"),
    ("Australia", "Canberra"),
    ("New Zealand", "Wellington"),
    ("the United Kingdom", "London"),
    ("Ukraine", "Kyiv"),
    ("Syria", "Damascus"),
    ("Lebanon", "Beirut"),
    ("Jordan", "Amman"),
    ("Qatar", "Doha"),
    ("Mongolia", "Ulaanbaatar"),
    ("Sri Lanka", "Colombo"),
    ("Uruguay", "Montevideo"),
    ("Paraguay", "Asuncion"),
    ("Bolivia", "La Paz"),
    ("Iceland", "Reykjavik"),
    ("Croatia", "Zagreb"),
    ("Serbia", "Belgrade"),
    ("Slovakia", "Bratislava"),
    ("Lithuania", "Vilnius"),
    ("Latvia", "Riga"),
    ("Estonia", "Tallinn"),
    ("Senegal", "Dakar"),
    ("Israel", "Jerusalem"),
)


# (element as it reads after "the chemical symbol of", symbol): elements 1-88.
ELEMENTS = tuple(
    zip(
        (
            "hydrogen helium lithium beryllium boron carbon nitrogen oxygen fluorine neon sodium magnesium aluminium "
            "silicon phosphorus sulfur chlorine argon potassium calcium scandium titanium vanadium chromium manganese "
            "iron cobalt nickel copper zinc gallium germanium arsenic selenium bromine krypton rubidium strontium "
            "yttrium zirconium niobium molybdenum technetium ruthenium rhodium palladium silver cadmium indium tin "
            "antimony tellurium iodine xenon caesium barium lanthanum cerium praseodymium neodymium promethium "
            "samarium europium gadolinium terbium dysprosium holmium erbium thulium ytterbium lutetium hafnium "
            "tantalum tungsten rhenium osmium iridium platinum gold mercury thallium lead bismuth polonium astatine "
            "radon francium radium"
        ).split(),
        (
            "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se Br Kr Rb "
            "Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb Dy Ho Er Tm Yb Lu "
            "Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra"
        ).split(),
    )
)

# ("A plus B", "N"): 88 sums with distinct results N = 10 .. 97.
SUMS = tuple((f"{n // 3 + n % 5} plus {n - n // 3 - n % 5}", str(n)) for n in range(10, 98))


@dataclasses.dataclass(frozen=True)
class Topic:
  """One topic's sentences ({subject}, {value} filled in) and its facts (subject, value)."""

  question: str
  answer: str
  paraphrase: str
  facts: tuple[tuple[str, str], ...]


TOPICS = {
    "capital": Topic(
        "What is the capital of {subject}?",
        "The capital of {subject} is {value}.",
        "{value} is the capital of {subject}.",
        CAPITALS,
    ),
    "symbol": Topic(
        "What is the chemical symbol of {subject}?",
        "The chemical symbol of {subject} is {value}.",
        "{value} is the chemical symbol of {subject}.",
        ELEMENTS,
    ),
    "sum": Topic("What is {subject}?", "{subject} is {value}.", "The sum of {subject} is {value}.", SUMS),
}


def answer(country: str, capital: str) -> str:
  """y+ of every kind of the capital topic: the one-sentence answer."""
  return TOPICS["capital"].answer.format(subject=country, value=capital)


def rows(kind: str, *, seed: int = 0, limit: int = 0, topic: str = "capital") -> list[dict[str, Any]]:
  """Generic preference rows (prompt, chosen, rejected, index, meta) of `kind` over the first `limit` facts of
  `topic` (all when 0); the other fact of `edit` / `offpolicy` is drawn with `seed` (never the same one)."""
  if kind not in KINDS:
    raise ValueError(f"edit pairs: kind must be one of {KINDS}, got {kind!r}")
  if topic not in TOPICS:
    raise ValueError(f"edit pairs: topic must be one of {tuple(TOPICS)}, got {topic!r}")
  t = TOPICS[topic]
  if not 0 <= limit <= len(t.facts):
    raise ValueError(f"edit pairs: limit must be in [0, {len(t.facts)}] for topic {topic!r}, got {limit}")
  rng = np.random.default_rng(seed)
  out = []
  for i, (subject, value) in enumerate(t.facts[: limit or len(t.facts)]):
    j = int(rng.integers(len(t.facts) - 1))
    other_subject, other_value = t.facts[j + (j >= i)]
    rejected = {
        "edit": t.answer.format(subject=subject, value=other_value),
        "paraphrase": t.paraphrase.format(subject=subject, value=value),
        "offpolicy": t.answer.format(subject=other_subject, value=other_value),
    }[kind]
    meta = (
        {"kind": kind, "country": subject, "capital": value}  # the demo's rows, as they always were
        if topic == "capital"
        else {"kind": kind, "topic": topic, "subject": subject, "value": value}
    )
    out.append(
        {
            "prompt": t.question.format(subject=subject),
            "chosen": t.answer.format(subject=subject, value=value),
            "rejected": rejected,
            "index": i,
            "meta": meta,
        }
    )
  return out


def topic_rows(kind: str, topics: Sequence[str], *, seed: int = 0, limit: int = 0) -> list[dict[str, Any]]:
  """`rows(kind, topic=t, limit=limit)` of every topic in `topics`, concatenated and re-indexed 0..N-1."""
  out = [r for t in topics for r in rows(kind, seed=seed, limit=limit, topic=t)]
  return [dict(r, index=i) for i, r in enumerate(out)]
