#!/usr/bin/env python3
"""Writes the quantization material of issue 29 that is not held out:

  tools/data/calib/mix.txt    CALIBRATION text for `edgemoe quantize --calib`: four kinds
                              (KJV prose, verse, Python, reStructuredText docs) interleaved in
                              ~3 500-character blocks, so a calibration cut short still sees
                              every kind. ~56 000 characters, about 15 000 SmolLM2 tokens.
  tools/data/calib/mix3.txt   The same, three times as long (`--per-kind 42000 --calib-only
                              tools/data/calib/mix3.txt`; mix.txt's blocks first): ~168 000
                              characters, about 42 700 tokens, the W4A8 recipe's calibration.
  tools/data/tune/code.txt    TUNING texts for quantization settings (never calibrated on,
  tools/data/tune/docs.txt    never reported as held-out): Python and reStructuredText, the
                              kinds the KJV tuning text cannot speak for.

Sources (PyPI sdists fetched with pip at fixture time; none of them is a held-out text, see
tools/data/heldout/MANIFEST.md):

  KJV Psalms            tests/fixtures/trained-moe/calib.txt (Debian bible-kjv, the old calibration text)
  Paradise Lost         Brotli 1.1.0  tests/testdata/plrabn12.txt      public domain
  click core.py         click 8.1.7   src/click/core.py                BSD-3-Clause (notice kept)
  click options docs    click 8.1.7   docs/options.rst, commands.rst   BSD-3-Clause
  tune code             click 8.1.7   src/click/types.py               BSD-3-Clause
  tune docs             click 8.1.7   docs/advanced.rst                BSD-3-Clause

The held-out texts stay untouched: Brotli's alice29, asyoulik and lcet10, docutils' rst spec
and six.py are used by none of the above. Deterministic; standard library and pip only.
"""
import os
import subprocess
import sys
import tarfile
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
SDISTS = {"brotli": ("Brotli", "1.1.0"), "click": ("click", "8.1.7")}
CLICK_NOTICE = ("# click 8.1.7, Copyright 2014 Pallets, BSD-3-Clause licence "
                "(https://github.com/pallets/click/blob/main/LICENSE.rst)\n")
BLOCK = 3500
PER_KIND = 14000


def fetch(tmp, key):
    name, version = SDISTS[key]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                    "-d", tmp, f"{name}=={version}"], check=True, capture_output=True)
    path = next(os.path.join(tmp, f) for f in os.listdir(tmp)
                if f.lower().startswith(name.lower() + "-" + version) and f.endswith(".tar.gz"))
    return tarfile.open(path)


def member(tar, inner):
    top = tar.getnames()[0].split("/")[0]
    return tar.extractfile(f"{top}/{inner}").read().decode("utf-8", "replace")


def cut(text, start, n):
    i = text.find(start)
    if i < 0:
        raise SystemExit(f"start marker {start!r} not found")
    return text[i:i + n]


def main():
    # `--per-kind N --calib-only OUT`: only a calibration text of N characters per kind at OUT
    # (its first PER_KIND characters of each kind interleaved exactly as mix.txt's), the tuning
    # texts untouched.
    per_kind, calib_only = PER_KIND, None
    args = sys.argv[1:]
    while args:
        flag, value, args = args[0], args[1], args[2:]
        if flag == "--per-kind":
            per_kind = int(value)
        elif flag == "--calib-only":
            calib_only = value
        else:
            raise SystemExit(f"unknown argument {flag}")
    with tempfile.TemporaryDirectory() as tmp:
        brotli, click = fetch(tmp, "brotli"), fetch(tmp, "click")
        kjv = open(os.path.join(ROOT, "tests/fixtures/trained-moe/calib.txt")).read()
        kinds = [
            cut(kjv, "", per_kind),
            cut(member(brotli, "tests/testdata/plrabn12.txt"), "Of Man's first disobedience",
                per_kind),
            CLICK_NOTICE + cut(member(click, "src/click/core.py"), "import enum", per_kind),
            cut(member(click, "docs/options.rst") + "\n" + member(click, "docs/commands.rst"),
                "Options\n", per_kind),
        ]
        tune = {
            "code": CLICK_NOTICE + cut(member(click, "src/click/types.py"), "import os", 9000),
            "docs": cut(member(click, "docs/advanced.rst"), "Advanced Patterns", 9600),
        }
    if any(len(k) < per_kind for k in kinds):
        raise SystemExit(f"a source is shorter than {per_kind} characters")
    blocks = []
    for b in range(0, per_kind, BLOCK):
        blocks += [k[b:b + BLOCK] for k in kinds]
    if calib_only:
        with open(calib_only, "w") as f:
            f.write("\n".join(blocks) + "\n")
        print(calib_only, os.path.getsize(calib_only), "bytes")
        return
    os.makedirs(os.path.join(HERE, "data/calib"), exist_ok=True)
    os.makedirs(os.path.join(HERE, "data/tune"), exist_ok=True)
    out = os.path.join(HERE, "data/calib/mix.txt")
    with open(out, "w") as f:
        f.write("\n".join(blocks) + "\n")
    print(out, os.path.getsize(out), "bytes")
    for name, text in tune.items():
        path = os.path.join(HERE, f"data/tune/{name}.txt")
        with open(path, "w") as f:
            f.write(text)
        print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
