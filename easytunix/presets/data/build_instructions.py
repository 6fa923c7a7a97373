"""Writes ``instructions.jsonl``: a few hundred short English prompt/completion pairs.

Deterministic and hand-written (templates over small fact tables), for
real-weight SFT smoke tests and examples. Run ``python build_instructions.py``
in this folder to regenerate the file.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Canada": "Ottawa", "Australia": "Canberra",
    "Argentina": "Buenos Aires", "Mexico": "Mexico City", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Russia": "Moscow", "Greece": "Athens", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna",
    "Hungary": "Budapest", "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern",
    "Turkey": "Ankara", "South Korea": "Seoul", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Peru": "Lima",
    "Chile": "Santiago", "Nigeria": "Abuja", "Morocco": "Rabat", "Iran": "Tehran", "Indonesia": "Jakarta",
    "the Philippines": "Manila", "the Czech Republic": "Prague", "Ukraine": "Kyiv", "New Zealand": "Wellington",
    "Cuba": "Havana", "Iceland": "Reykjavik", "Brazil": "Brasilia", "Colombia": "Bogota",
}

OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "closed", "early": "late", "full": "empty", "hard": "soft", "high": "low", "long": "short",
    "loud": "quiet", "rich": "poor", "strong": "weak", "wet": "dry", "thick": "thin", "true": "false",
    "left": "right", "win": "lose", "push": "pull", "inside": "outside", "first": "last", "day": "night",
    "black": "white", "old": "young", "clean": "dirty", "easy": "difficult",
}

PLURALS = {
    "cat": "cats", "dog": "dogs", "child": "children", "mouse": "mice", "man": "men", "woman": "women",
    "tooth": "teeth", "foot": "feet", "box": "boxes", "city": "cities", "leaf": "leaves", "knife": "knives",
    "person": "people", "goose": "geese", "sheep": "sheep", "fish": "fish", "baby": "babies", "bus": "buses",
    "glass": "glasses", "story": "stories",
}

SOUNDS = {
    "dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "horse": "neighs",
    "pig": "oinks", "owl": "hoots", "bee": "buzzes", "snake": "hisses", "frog": "croaks", "wolf": "howls",
    "sheep": "bleats", "rooster": "crows",
}

COLORS = {
    "the sky on a clear day": "blue", "grass": "green", "snow": "white", "a ripe banana": "yellow",
    "coal": "black", "blood": "red", "a carrot": "orange", "a lemon": "yellow", "milk": "white",
    "a strawberry": "red",
}

FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many seconds are in a minute?", "There are 60 seconds in a minute."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does an insect have?", "An insect has 6 legs."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides."),
    ("How many sides does a hexagon have?", "A hexagon has 6 sides."),
    ("How many sides does an octagon have?", "An octagon has 8 sides."),
    ("How many continents are there?", "There are 7 continents."),
    ("How many planets are in the solar system?", "There are 8 planets in the solar system."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What is the closest star to Earth?", "The Sun is the closest star to Earth."),
    ("What is the chemical formula of water?", "The chemical formula of water is H2O."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide from the air."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean is the largest ocean on Earth."),
    ("How many letters are in the English alphabet?", "There are 26 letters in the English alphabet."),
    ("What is the freezing point of water in Fahrenheit?", "Water freezes at 32 degrees Fahrenheit."),
    ("What shape has no corners?", "A circle has no corners."),
]

CHAT = [
    ("Say hello.", "Hello! How can I help you today?"),
    ("Thank you!", "You're welcome!"),
    ("Good morning!", "Good morning! I hope you have a great day."),
    ("Can you help me?", "Of course. What do you need help with?"),
    ("Goodbye!", "Goodbye! Have a nice day."),
]

WORDS = [
    "apple", "river", "garden", "pencil", "window", "planet", "music", "orange", "bridge", "candle",
    "forest", "rabbit", "silver", "summer", "yellow",
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def number_words(n: int) -> str:
  """English words for 0..99."""
  if n < 20:
    return _ONES[n]
  tens, ones = divmod(n, 10)
  return _TENS[tens] + ("" if ones == 0 else "-" + _ONES[ones])


def _distinct_pairs(rng: random.Random, count: int, low: int, high: int) -> list[tuple[int, int]]:
  pairs: dict[tuple[int, int], None] = {}
  while len(pairs) < count:
    pairs[(rng.randint(low, high), rng.randint(low, high))] = None
  return list(pairs)


def build(seed: int = 0) -> list[dict[str, str]]:
  rng = random.Random(seed)
  out: list[dict[str, str]] = []
  add = lambda p, c: out.append({"prompt": p, "completion": c})  # noqa: E731
  for country, city in CAPITALS.items():
    add(f"What is the capital of {country}?", f"The capital of {country} is {city}.")
  for a, b in _distinct_pairs(rng, 40, 1, 50):
    add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
  for a, b in _distinct_pairs(rng, 30, 2, 12):
    add(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")
  for word, opposite in OPPOSITES.items():
    add(f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}.")
  for word, plural in PLURALS.items():
    add(f"What is the plural of {word}?", f"The plural of {word} is {plural}.")
  for n in sorted(rng.sample(range(100), 30)):
    add(f"Write the number {n} in words.", f"{n} in words is {number_words(n)}.")
  for i, day in enumerate(DAYS):
    add(f"What day comes after {day}?", f"The day after {day} is {DAYS[(i + 1) % 7]}.")
  for i, month in enumerate(MONTHS):
    add(f"What month comes after {month}?", f"The month after {month} is {MONTHS[(i + 1) % 12]}.")
  for animal, sound in SOUNDS.items():
    add(f"What sound does a {animal} make?", f"A {animal} {sound}.")
  for thing, color in COLORS.items():
    add(f"What color is {thing}?", f"{thing[0].upper() + thing[1:]} is {color}.")
  for word in WORDS:
    add(f"Write the word '{word}' in capital letters.", word.upper())
    add(f"Spell the word '{word}' backwards.", word[::-1])
    add(f"How many letters are in the word '{word}'?", f"The word '{word}' has {len(word)} letters.")
  for prompt, completion in FACTS + CHAT:
    add(prompt, completion)
  rng.shuffle(out)
  return out


def main() -> None:
  path = Path(__file__).resolve().parent / "instructions.jsonl"
  with path.open("w", encoding="utf-8") as f:
    for record in build():
      f.write(json.dumps(record, ensure_ascii=False) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
