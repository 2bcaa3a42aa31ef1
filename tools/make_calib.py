#!/usr/bin/env python3
"""Writes tests/fixtures/trained-moe/calib.txt: calibration text for quantization, taken from the
*training* part of the KJV corpus (Psalms 1-40), so held-out perplexity stays unseen.

Needs Debian's bible-kjv (`apt-get install bible-kjv`)."""
import os
import re
import subprocess

REF_RE = re.compile(r"^[1-3]?[A-Za-z]+[0-9]+:[0-9]+ ")
HERE = os.path.dirname(os.path.abspath(__file__))

raw = subprocess.run(["bible", "-f", "psa1:1-psa40:17"], check=True, capture_output=True, text=True).stdout
lines = [REF_RE.sub("", l) for l in raw.splitlines() if l.strip()]
out = os.path.join(HERE, "..", "tests", "fixtures", "trained-moe", "calib.txt")
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print(out, os.path.getsize(out), "bytes")
