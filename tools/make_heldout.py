#!/usr/bin/env python3
"""Writes tools/data/heldout/: the HELD-OUT texts of tools/heldout_eval.sh (issue 29), texts
the project never tuned or calibrated on, of five kinds, each cut from a file inside a PyPI
source distribution fetched with pip at fixture time (sources and hashes in MANIFEST.md):

  prose   Alice's Adventures in Wonderland   Brotli 1.1.0   tests/testdata/alice29.txt
  play    As You Like It (Shakespeare)       Brotli 1.1.0   tests/testdata/asyoulik.txt
  docs    reStructuredText specification     docutils 0.21.2 docs/ref/rst/restructuredtext.txt
  code    six.py (Python)                    six 1.17.0     six.py
  recall  invented facts restated ~330 tokens apart between passages of
          Brotli 1.1.0 tests/testdata/lcet10.txt (a Library of Congress workshop report)

Licences: the Gutenberg texts (Canterbury corpus) and lcet10 are in the public domain; the
docutils documentation is placed in the public domain (its COPYING.txt); six is MIT, and its
excerpt keeps the licence notice it starts with. So the excerpts are committed.

The TUNING texts stay what they were: tools/data/recall.txt (issue 19's recall text) and the
trained fixture's calib.txt / heldout.txt (KJV). Nothing here may be used to choose a setting.

Each excerpt is about 2 300 SmolLM2 tokens (characters per token estimated per kind), so it
holds one 2048-token KV window, eight windows of 256 and two of 1024. The recall text uses
other sentence templates and other invented names than make_recall_text.py, so a policy tuned
on that text's wording gains nothing here. Deterministic; standard library and pip only.
"""
import argparse
import hashlib
import os
import random
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

SDISTS = {
    "brotli": ("Brotli", "1.1.0"),
    "docutils": ("docutils", "0.21.2"),
    "six": ("six", "1.17.0"),
}

# (name, package, path inside the sdist, first line to keep (a substring), characters kept)
# Characters per token measured with `edgemoe ppl` on the first cut: prose 3.8, play 3.3,
# rst 4.3; the lengths aim at 2 300–2 600 tokens (at least one 2048-token window).
EXCERPTS = [
    ("prose", "brotli", "tests/testdata/alice29.txt", "CHAPTER I", 10000),
    ("play", "brotli", "tests/testdata/asyoulik.txt", "ACT I", 8600),
    ("docs", "docutils", "docs/ref/rst/restructuredtext.txt", "reStructuredText_ is plaintext", 10400),
    ("code", "six", "six.py", "# Copyright (c) 2010", 8400),
]
FILLER = ("brotli", "tests/testdata/lcet10.txt")

SYL = ["ka", "lom", "bre", "tiv", "sund", "ap", "mer", "gol", "wys", "dun", "ik", "por", "hal",
       "zen", "rud", "ob", "ca", "nest", "ul", "fra"]
SHIPS = ["Heron", "Marigold", "Vigilant", "Osprey", "Lantern", "Thistle", "Meridian", "Kestrel",
         "Bramble", "Solace", "Juniper", "Tern", "Harvester", "Wren", "Pilgrim", "Corsair"]
SUBJECTS = ["maps", "letters", "ledgers", "photographs", "charters", "sermons", "almanacs",
            "diaries", "broadsides", "treaties", "census rolls", "ship logs", "herbals",
            "patents", "songbooks", "deeds"]


def fetch(tmp, key):
    name, version = SDISTS[key]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                    "--no-binary", ":all:", f"{name}=={version}", "-d", tmp], check=True)
    for f in os.listdir(tmp):
        if f.lower().startswith(f"{name.lower()}-{version}") and f.endswith(".tar.gz"):
            return os.path.join(tmp, f), f"{name}-{version}"
    raise SystemExit(f"pip left no sdist of {name} {version} in {tmp}")


def member(sdist, top, path):
    with tarfile.open(sdist) as t:
        raw = t.extractfile(f"{top}/{path}").read()
    # The Canterbury files are ASCII with CRLF; read as Latin-1 so any byte decodes.
    return raw, raw.decode("latin-1").replace("\r\n", "\n")


def excerpt(text, start, chars):
    at = text.find(start)
    if at < 0:
        raise SystemExit(f"`{start}` not found")
    cut = text[at:at + chars]
    return cut[:cut.rfind("\n") + 1]  # whole lines only


def name(rng):
    return " ".join("".join(rng.choice(SYL) for _ in range(2)).capitalize() for _ in range(2))


def recall_text(filler, rng, tokens=2600, facts=12, gap=330):
    """Facts introduced over the first ~35% of the window, each restated three times `gap`
    tokens apart (the issue's spacing), ordinary report prose everywhere else."""
    lines = [l.strip() for l in filler.split("\n") if len(l.strip()) > 30]
    lines = lines[200:]  # past the Gutenberg header and the table of contents
    ships, subjects = SHIPS[:], SUBJECTS[:]
    rng.shuffle(ships)
    rng.shuffle(subjects)
    events, values = [], []
    for i in range(facts):
        t = 30 + i * 70
        if i % 2 == 0:
            ship, berth = ships.pop(), str(rng.randrange(10000, 100000))
            values.append(berth)
            intro = f"The ship {ship} is moored at berth {berth}."
            again = f"As noted, the ship {ship} is moored at berth {berth}."
        else:
            subject, who = subjects.pop(), name(rng)
            values.append(who)
            intro = f"The {subject} collection was catalogued by {who}."
            again = f"Again, the {subject} collection was catalogued by {who}."
        events.append((t, intro))
        events += [(t + gap * k, again) for k in (1, 2, 3)]
    events.sort(key=lambda e: e[0])
    out, est, line = [], 0.0, 0
    for t, sentence in events:
        while est < t:
            out.append(lines[line])
            est += len(lines[line]) / 4.3 + 1
            line += 1
        out.append(sentence)
        est += len(sentence) / 3.3 + 1
    while est < tokens:
        out.append(lines[line])
        est += len(lines[line]) / 4.3 + 1
        line += 1
    return "\n".join(out) + "\n", values


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=os.path.join(HERE, "data", "heldout"))
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    manifest = ["# Held-out texts (written by tools/make_heldout.py; do not tune on them)", "",
                "| file | kind | package (PyPI sdist) | path inside | sha256 of that file | licence |",
                "| --- | --- | --- | --- | --- | --- |"]
    licences = {"brotli": "public domain (Gutenberg / US government text)",
                "docutils": "public domain (docutils COPYING.txt)",
                "six": "MIT (notice kept at the top)"}
    with tempfile.TemporaryDirectory() as tmp:
        sdists = {k: fetch(tmp, k) for k in SDISTS}

        def row(file, kind, key, path, raw):
            top = sdists[key][1]
            digest = hashlib.sha256(raw).hexdigest()[:16]
            manifest.append(f"| {file} | {kind} | {top} | {path} | {digest}… | {licences[key]} |")

        for kind, key, path, start, chars in EXCERPTS:
            raw, text = member(sdists[key][0], sdists[key][1], path)
            with open(os.path.join(args.out_dir, f"{kind}.txt"), "w", encoding="utf-8") as f:
                f.write(excerpt(text, start, chars))
            row(f"{kind}.txt", kind, key, path, raw)
        raw, text = member(sdists[FILLER[0]][0], sdists[FILLER[0]][1], FILLER[1])
        recall, values = recall_text(text, random.Random(29))
        with open(os.path.join(args.out_dir, "recall.txt"), "w", encoding="utf-8") as f:
            f.write(recall)
        with open(os.path.join(args.out_dir, "recall_facts.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(values) + "\n")
        row("recall.txt, recall_facts.txt", "recall (generated)", FILLER[0], FILLER[1], raw)
    with open(os.path.join(args.out_dir, "MANIFEST.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(manifest) + "\n")


if __name__ == "__main__":
    main()
