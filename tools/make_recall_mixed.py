#!/usr/bin/env python3
"""Writes tools/data/recall_mixed.txt and tools/data/recall_mixed_facts.txt: a second TUNING
recall text for KV eviction (issue 29), whose facts recur at MIXED distances.

tools/data/recall.txt (make_recall_text.py) restates each fact ~700 and ~1250 tokens after it
appears: always farther than a 25% budget of a 2048-token window keeps (448 slots after an
eviction), where ranking by attention wins and recency loses. The held-out recall text restates
its facts ~330 tokens apart, inside that budget, where recency wins. A policy tuned on one kind
loses on the other (docs/kv-eviction.md), so this text mixes both: every fact is restated twice,
each gap drawn from NEAR (150-420 tokens, inside the 25% budget) or FAR (560-1150, beyond it),
both kinds about equally often.

Sources and names are disjoint from every held-out text (tools/data/heldout/MANIFEST.md):
the filler is the lines of tools/data/tune/docs.txt (click's "Advanced Patterns" page, a
quantization TUNING text), the sentence templates and invented names are new (neither
make_recall_text.py's keepers and locks nor make_heldout.py's ships and collections).

One block of about --ctx tokens (estimated from characters: ~3.6 per token for the docs lines,
~3.3 for the fact sentences with their digits and invented names), so the first 2048-token
window of `edgemoe ppl --ctx 2048` holds every mention. Deterministic (fixed seed); standard
library only. `edgemoe ppl --facts tools/data/recall_mixed_facts.txt` scores it.
"""
import argparse
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

COLOUR = ["red", "blue", "green", "grey", "white", "black", "yellow", "brown", "silver",
          "violet", "scarlet", "azure"]
BEAST = ["heron", "badger", "otter", "falcon", "stag", "hare", "lynx", "raven", "wolf",
         "salmon", "beetle", "swan"]
SYL = ["ka", "lem", "stro", "bu", "nix", "qua", "rel", "teo", "wam", "jor", "ipp", "sel",
       "duv", "hai", "mon", "zet"]

NEAR = (150, 420)  # inside the 448 slots a 25% budget of 2048 keeps after an eviction
FAR = (560, 1150)  # beyond it


def invented_name(rng):
    def word():
        return "".join(rng.choice(SYL) for _ in range(rng.choice([2, 3]))).capitalize()
    return f"{word()} {word()}"


def fact(rng, inn, i):
    if i % 2 == 0:
        value = str(rng.randrange(1000, 10000)) + str(rng.randrange(10, 100))
        intro = f"Guests at the {inn} inn pay their bill with voucher {value}."
        again = f"Recall: at the {inn} inn the bill is paid with voucher {value}."
    else:
        value = invented_name(rng)
        intro = f"The cook of the {inn} inn is a woman called {value}."
        again = f"Recall: the cook of the {inn} inn is called {value}."
    return value, intro, again


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--facts", type=int, default=14)
    ap.add_argument("--seed", type=int, default=2929)
    ap.add_argument("--out-dir", default=os.path.join(HERE, "data"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    with open(os.path.join(HERE, "data/tune/docs.txt"), encoding="utf-8") as f:
        filler = [l.rstrip() for l in f if l.strip()]
    inns = [f"{c} {b}" for c in COLOUR for b in BEAST]
    rng.shuffle(inns)
    scale = args.ctx / 2048
    last = 1950 * scale  # the latest restatement, inside the first window
    events, values, gaps = [], [], []
    kinds = [(a, b) for a in (NEAR, FAR) for b in (NEAR, FAR)]
    for i in range(args.facts):
        value, intro, again = fact(rng, inns.pop(), i)
        values.append(value)
        t = (30 + i * 50) * scale
        # Cycle through near-near, near-far, far-near, far-far; a gap that would pass the
        # window's end is drawn from NEAR instead (or the restatement dropped).
        first, second = kinds[i % 4]
        g1 = rng.uniform(*first) * scale
        if t + g1 > last:
            g1 = rng.uniform(*NEAR) * scale
        g2 = rng.uniform(*second) * scale
        if t + g1 + g2 > last:
            g2 = rng.uniform(*NEAR) * scale
        events += [(t, intro), (t + g1, again)]
        gaps.append(round(g1))
        if t + g1 + g2 <= last:
            events.append((t + g1 + g2, again))
            gaps.append(round(g2))
    events.sort()
    est, line, out = 0.0, 0, []
    for t, sentence in events:
        while est < t:
            out.append(filler[line % len(filler)])
            est += len(filler[line % len(filler)]) / 3.6 + 1
            line += 1
        out.append(sentence)
        est += len(sentence) / 3.3 + 1
    while est < args.ctx * 1.25:
        out.append(filler[line % len(filler)])
        est += len(filler[line % len(filler)]) / 3.6 + 1
        line += 1
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "recall_mixed.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(out) + "\n")
    with open(os.path.join(args.out_dir, "recall_mixed_facts.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(values) + "\n")
    near = sum(g <= NEAR[1] * scale for g in gaps)
    print(f"{len(values)} facts, {len(gaps)} restatements: {near} near "
          f"({NEAR[0]}-{NEAR[1]} tokens), {len(gaps) - near} far; gaps {sorted(gaps)}")


if __name__ == "__main__":
    main()
