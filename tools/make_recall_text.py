#!/usr/bin/env python3
"""Writes tools/data/recall.txt and tools/data/recall_facts.txt: a long-context recall text for
judging KV eviction policies (issue 19), and the fact values it asks the model to recall.

The text is a run of blocks, each about one evaluation context long (--ctx tokens, estimated
from characters: ~4.15 per token for the KJV prose, ~3.3 for fact sentences with their digits
and invented names). A block introduces a dozen facts (a rare invented name or a five-digit
number bound to a place), checks each soon after it appears, then repeats it twice at
intervals longer than a 25% budget of the context, with ordinary prose (consecutive lines of
tests/fixtures/trained-moe/calib.txt, the KJV Bible) between. Every fact's place and value is
unique in the whole text, so a repeat can only be predicted by copying from the same block.

`edgemoe ppl --facts tools/data/recall_facts.txt` scores each value's first mention in a
window against its repeats. Deterministic (fixed seed); standard library only.
"""
import argparse
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

ADJ = ["copper", "northern", "silent", "amber", "hollow", "iron", "crimson", "western", "salt",
       "ivory", "eastern", "misty", "granite", "golden", "frozen", "quiet", "high", "old",
       "bitter", "pale"]
NOUN = ["mill", "tower", "harbour", "bridge", "orchard", "chapel", "quarry", "market", "well",
        "forge", "garden", "archive", "lighthouse", "barracks", "vineyard"]
SYL = ["quel", "brin", "os", "vath", "zor", "mik", "thal", "dru", "vex", "ael", "pim", "gor",
       "nys", "tar", "ulm", "kesh", "ro", "vin", "dax", "lio", "fen", "sab", "orv", "yth"]


def invented_name(rng):
    def word():
        return "".join(rng.choice(SYL) for _ in range(rng.choice([2, 3]))).capitalize()
    return f"{word()} {word()}"


def fact(rng, place):
    if rng.random() < 0.5:
        value = invented_name(rng)
        intro = f"The keeper of the {place} is a man named {value}."
        check = f"So the keeper of the {place} is named {value}."
        repeat = f"Remember that the keeper of the {place} is named {value}."
    else:
        value = str(rng.randrange(10000, 100000))
        intro = f"The lock of the {place} opens with the number {value}."
        check = f"So the lock of the {place} opens with the number {value}."
        repeat = f"Remember that the lock of the {place} opens with the number {value}."
    return value, intro, check, repeat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--blocks", type=int, default=5)
    ap.add_argument("--facts", type=int, default=12)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "data"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(os.path.join(ROOT, "tests/fixtures/trained-moe/calib.txt"), encoding="utf-8") as f:
        prose = [l.strip() for l in f if l.strip()]
    places = [f"{a} {n}" for a in ADJ for n in NOUN]
    rng.shuffle(places)
    ctx = args.ctx
    # Token offsets inside a block: introductions spread over its first ~40%, a check ~100
    # tokens later, repeats ~700 and ~1250 tokens after the introduction (> 25% of 2048).
    scale = ctx / 2048
    line = 0
    text, values = [], []
    for b in range(args.blocks):
        events = []
        for i in range(args.facts):
            value, intro, check, repeat = fact(rng, places.pop())
            values.append(value)
            t = (40 + i * 60) * scale
            events += [(t, intro), (t + 100 * scale, check), (t + 700 * scale, repeat),
                       (t + 1250 * scale, repeat)]
        events.sort()
        est, out = 0.0, []
        for t, sentence in events:
            while est < t:
                out.append(prose[line % len(prose)])
                est += len(prose[line % len(prose)]) / 4.15 + 1
                line += 1
            out.append(sentence)
            est += len(sentence) / 3.3 + 1
        while est < ctx:
            out.append(prose[line % len(prose)])
            est += len(prose[line % len(prose)]) / 4.15 + 1
            line += 1
        text.append("\n".join(out))
    data = args.out_dir
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "recall.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")
    with open(os.path.join(data, "recall_facts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(values) + "\n")


if __name__ == "__main__":
    main()
