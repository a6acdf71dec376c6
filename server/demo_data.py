"""A small synthetic, non-IID, multi-site intent-classification data set for the demo.

Texts are built from per-intent templates and slot values, so labels are learnable from
the words. The last template of every intent is held out: sites never see it, and the
central evaluation file uses only it, so the demo's accuracy measures how well the shared
adapter generalises to phrasings no site had, not recall of training sentences.
Each site draws its label mix from a Dirichlet(alpha) distribution, so sites see very
different label frequencies, as hospitals or branches would.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from clients.task.data import write_jsonl

INTENTS: dict[str, list[str]] = {
    "book_flight": [
        "book a flight to {city} on {day}",
        "i need a plane ticket to {city}",
        "find me flights from {city} to {city2}",
        "can you reserve a seat on a flight to {city} {day}",
    ],
    "weather": [
        "what is the weather in {city} {day}",
        "will it rain in {city} {day}",
        "how cold is it going to be in {city}",
        "is it sunny in {city} right now",
    ],
    "transfer_money": [
        "send {amount} dollars to {person}",
        "transfer {amount} from checking to savings",
        "wire {amount} to {person} today",
        "move {amount} dollars into my {account} account",
    ],
    "check_balance": [
        "what is my {account} balance",
        "how much money is in my {account} account",
        "show the balance of {account}",
        "tell me how much i have in {account}",
    ],
    "play_music": [
        "play some {genre} music",
        "put on a {genre} playlist",
        "i want to listen to {genre}",
        "start playing {genre} songs by {person}",
    ],
    "set_alarm": [
        "set an alarm for {time}",
        "wake me up at {time} {day}",
        "create an alarm at {time}",
        "remind me with an alarm at {time}",
    ],
    "order_food": [
        "order a {food} for delivery",
        "i want to get {food} delivered {day}",
        "can you order {food} from the place near me",
        "get me some {food} for dinner",
    ],
    "book_doctor": [
        "book an appointment with dr {person} {day}",
        "i need to see a doctor {day}",
        "schedule a checkup with {person} at {time}",
        "make a medical appointment for {day}",
    ],
}
SLOTS: dict[str, list[str]] = {
    "city": ["paris", "tokyo", "lagos", "lima", "oslo", "denver", "mumbai", "cairo"],
    "city2": ["berlin", "sydney", "toronto", "madrid", "seoul", "nairobi"],
    "day": ["today", "tomorrow", "on monday", "this weekend", "next friday", "tonight"],
    "amount": ["20", "150", "75", "1000", "12", "300"],
    "person": ["alex", "maria", "chen", "fatima", "john", "priya", "sam"],
    "account": ["checking", "savings", "credit card", "joint"],
    "genre": ["jazz", "rock", "classical", "hip hop", "country", "lofi"],
    "time": ["6 am", "7:30", "noon", "9 pm", "half past five", "8 o'clock"],
    "food": ["pizza", "sushi", "burger", "salad", "curry", "tacos"],
}


def make_text(intent: str, rng: random.Random, *, held_out: bool = False) -> str:
    """One utterance: a training template, or (``held_out``) the intent's unseen one."""
    templates = INTENTS[intent]
    template = templates[-1] if held_out else rng.choice(templates[:-1])
    return template.format(**{slot: rng.choice(values) for slot, values in SLOTS.items()})


def generate(
    out_dir: Path,
    *,
    sites: int = 4,
    per_site: int = 120,
    eval_size: int = 240,
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[list[Path], Path, list[str]]:
    """Write ``site-<i>.jsonl`` files and ``eval.jsonl``; return paths and the label set."""
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    labels = sorted(INTENTS)
    sites_dir = out_dir / "sites"
    sites_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(sites):
        mix = np_rng.dirichlet([alpha] * len(labels))
        drawn = np_rng.choice(len(labels), size=per_site, p=mix)
        rows = [{"text": make_text(labels[j], rng), "label": labels[j]} for j in drawn]
        path = sites_dir / f"site-{i + 1}.jsonl"
        write_jsonl(path, rows)
        paths.append(path)
    eval_rows = [
        {"text": make_text(label, rng, held_out=True), "label": label}
        for label in (labels[i % len(labels)] for i in range(eval_size))
    ]
    eval_path = out_dir / "eval.jsonl"
    write_jsonl(eval_path, eval_rows)
    return paths, eval_path, labels
