"""Short factual preference pairs of several kinds, written by the project: where DPO displaces a real model.

Every pair asks "What is the capital of C?" and prefers the answer a small instruct model already gives,
y+ = "The capital of C is X." The kinds differ in y-:

  edit        the same sentence with one word changed: another country's capital ("The capital of C is Y.").
              The literature's most reliable trigger (Pal et al. 2024, the DPOP paper): y+ and y- share every
              token but the answer, so pushing y- down pushes the shared tokens after it down too.
  paraphrase  the same answer in other words ("X is the capital of C."): two responses of the same kind.
  offpolicy   the answer to another prompt ("The capital of D is Y."): a response the model finds unlikely here.

`CAPITALS` is the project's own list (country, capital); `rows(kind)` builds the pairs, seeded.
"""

from __future__ import annotations

from typing import Any

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


def answer(country: str, capital: str) -> str:
  """y+ of every kind: the one-sentence answer."""
  return f"The capital of {country} is {capital}."


def rows(kind: str, *, seed: int = 0, limit: int = 0) -> list[dict[str, Any]]:
  """Generic preference rows (prompt, chosen, rejected, index, meta) of `kind` over the first `limit` countries of
  CAPITALS (all when 0); the other country of `edit` / `offpolicy` is drawn with `seed` (never the same one)."""
  if kind not in KINDS:
    raise ValueError(f"edit pairs: kind must be one of {KINDS}, got {kind!r}")
  if not 0 <= limit <= len(CAPITALS):
    raise ValueError(f"edit pairs: limit must be in [0, {len(CAPITALS)}], got {limit}")
  rng = np.random.default_rng(seed)
  out = []
  for i, (country, capital) in enumerate(CAPITALS[: limit or len(CAPITALS)]):
    j = int(rng.integers(len(CAPITALS) - 1))
    other_country, other_capital = CAPITALS[j + (j >= i)]
    rejected = {
        "edit": answer(country, other_capital),
        "paraphrase": f"{capital} is the capital of {country}.",
        "offpolicy": answer(other_country, other_capital),
    }[kind]
    out.append(
        {
            "prompt": f"What is the capital of {country}?",
            "chosen": answer(country, capital),
            "rejected": rejected,
            "index": i,
            "meta": {"kind": kind, "country": country, "capital": capital},
        }
    )
  return out
