#!/usr/bin/env python3
"""Writes the pre-tokenizer fixtures of tests/gguf_pretok.rs:

  tests/fixtures/pretok/NAME.gguf       a vocab-only GGUF: one small byte-level BPE (trained
                                        here), `tokenizer.ggml.pre` = NAME
  tests/fixtures/pretok/llama-spm.gguf  a SentencePiece BPE vocabulary (`tokenizer.ggml.model` =
                                        llama, as Mixtral's): pieces, scores, byte tokens
  tests/fixtures/pretok/reference.json  per NAME, the ids Hugging Face `tokenizers` gives the
                                        texts below with that BPE and the normalizer and
                                        pre_tokenizer JSON of the real checkpoints llama.cpp's
                                        converter names NAME

The reference JSON below is each checkpoint's own tokenizer.json section (the model named beside
it), not edgemoe's mapping; the Rust test checks edgemoe's rebuilt tokenizer gives the same ids.
The BPE is trained on whole lines, so its merges cross digit, space, punctuation and script
boundaries: each pre-tokenizer's splits then change the ids (checked below: every two different
configurations disagree on some text). The SentencePiece ids are llama.cpp's algorithm run here
in scalar form, cross-checked against transformers' reading of the same GGUF.

usage: /work/pyenv/bin/python tools/make_pretok_fixtures.py
"""
import json
from pathlib import Path

import gguf
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/pretok"


def byte_level(regex):
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": regex}


def split(*patterns):
    return [{"type": "Split", "pattern": {"Regex": p}, "behavior": "Isolated", "invert": False}
            for p in patterns]


def seq(*pretoks):
    return {"type": "Sequence", "pretokenizers": list(pretoks)}


DIGITS = {"type": "Digits", "individual_digits": True}
NFC = {"type": "NFC"}

LLAMA3 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
          "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2 = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+"
         "[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
GPT4O = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+"
         "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+"
         "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+"
         "[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
# DeepSeek LLM's cased-letter class, as code points (several are canonical singletons, e.g.
# U+212A KELVIN SIGN, that an editor's NFC would silently turn into other letters).
DS_LETTERS = "".join(chr(a) if a == b else chr(a) + "-" + chr(b) for a, b in [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA),
    (0x1BC, 0x1BF), (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x376),
    (0x377, 0x377), (0x37B, 0x37D), (0x37F, 0x37F), (0x386, 0x386), (0x388, 0x38A),
    (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481), (0x48A, 0x52F),
    (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15),
    (0x1F18, 0x1F1D), (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59),
    (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D), (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC),
    (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC), (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB),
    (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102), (0x2107, 0x2107),
    (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F),
    (0x2145, 0x2149), (0x214E, 0x214E), (0x2183, 0x2183), (0x2184, 0x2184), (0x2C00, 0x2C7B),
    (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF2), (0x2CF3, 0x2CF3), (0xA640, 0xA66D),
    (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2),
    (0x118A0, 0x118DF), (0x1E900, 0x1E943)])
DS_LLM = split("[\r\n]", "\\s?[" + DS_LETTERS + "]+",
               "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+", "\\s+$",
               "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+")
DS_V3 = split("\\p{N}{1,3}", "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
              "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?"
              "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+")

# name -> (normalizer, pre_tokenizer): the tokenizer.json of the checkpoint in the comment.
CONFIGS = {
    "gpt2": (None, byte_level(True)),  # openai-community/gpt2
    "olmo": (NFC, byte_level(True)),  # allenai/OLMoE-1B-7B-0924 (GPT-NeoX-20B's)
    "smollm": (None, seq(DIGITS, byte_level(True))),  # HuggingFaceTB/SmolLM2-135M
    "refact": (None, seq(DIGITS, byte_level(True))),  # ibm-granite/granite-3.0-1b-a400m-base
    "llama-bpe": (None, seq(*split(LLAMA3), byte_level(False))),  # meta-llama/Meta-Llama-3-8B
    "glm4": (None, seq(*split(LLAMA3), byte_level(False))),  # zai-org/GLM-4.5-Air
    "qwen2": (NFC, seq(*split(QWEN2), byte_level(False))),  # Qwen/Qwen3-30B-A3B, Qwen1.5-MoE-A2.7B
    "deepseek-llm": (None, seq(*DS_LLM, DIGITS, byte_level(False))),  # deepseek-ai/DeepSeek-V2-Lite
    # deepseek-ai/DeepSeek-V3 (its normalizer is an empty Sequence)
    "deepseek-v3": ({"type": "Sequence", "normalizers": []}, seq(*DS_V3, byte_level(False))),
    "gpt-4o": (None, seq(*split(GPT4O), byte_level(False))),  # openai/gpt-oss-20b
}

TEXTS = [
    # llama.cpp's own probe text (convert_hf_to_gguf.py's chktxt).
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated)"
    " ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 "
    "?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!??????"
    " I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea?"
    " We'Ve a'lL",
    "Hello World! It's 2024, isn't it? I'VE been told he'll go; we'd SAY 're.",
    "12345678 3.14159 1,000,000 and ½ ² ٣٤٥ 0x1F7D",
    "你好世界，我想在apple工作1314151天～ 日本語のテキスト カタカナ ひらがな 한국어 텍스트",
    "Punctuation runs: ?!...---=== ''''```\"\"\" ...!!!??? (a) [b] {c} <d> a/b/c http://x.y/z//",
    "line one\nline two\r\n\n\n  indented\ttab\t\t  \n   trailing   ",
    "emoji 🚀🦙 😶\u200d🌫️ ✅ CamelCaseWords HTMLParser iPhone McDonald's DON'T don't",
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ！ Café naïve cafe\u0301 \u212a\u212b ohm \u2126 ᾳ ΐ ῐ Ελληνικά",
    "  leading spaces, trailing newline\n",
    "x\n\n\ny   z\t\n\r\n  ",
]

CORPUS = TEXTS + [
    "the 2024 report says 123 456 789 and 1000 people, it's true, isn't it?",
    "  def main():\n    return 42\n\n\n# done!!! ... --- ===",
    "我想在工作 日本語 한국어 Ελληνικά нещо Български Café naïve café",
]


def train():
    tok = Tokenizer(models.BPE())
    # Whole lines, bytes only: merges then span every boundary a pre-tokenizer may draw.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    trainer = trainers.BpeTrainer(vocab_size=900, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>"])
    tok.train_from_iterator(CORPUS * 3, trainer)
    return json.loads(tok.to_str())


def reference(base, normalizer, pre):
    tj = dict(base, normalizer=normalizer, pre_tokenizer=pre, post_processor=None,
              decoder=byte_level(True))
    tok = Tokenizer.from_str(json.dumps(tj))
    return [tok.encode(t, add_special_tokens=False).ids for t in TEXTS]


def write_gguf(path, name, vocab, merges):
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(name)
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|endoftext|>"])
    w.add_add_bos_token(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --- SentencePiece BPE (`tokenizer.ggml.model` = llama: Llama 2, Mistral, Mixtral) ---

SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog and the cat",
    "it's a test, isn't it? we'll see what they've done",
    "hello world hello there the theory of everything",
    "numbers 123 456 and 2024 in the text",
    "café naïve résumé über straße",
]
SPM_TEXTS = [
    "Hello world, the quick brown fox!",
    "  two leading spaces and  double   gaps",
    " one leading space",
    "line one\nline two\n\n\ttab",
    "numbers 12345 and 2024 and 3.14",
    "emoji 🚀🦙 and CJK 我想在apple工作 fall back to bytes",
    "café naïve über Ωmega",
    "it's isn't they've we'll",
    "trailing space ",
]


def spm_vocab():
    """A SentencePiece-shaped vocabulary: <unk> <s> </s>, the 256 byte tokens, then pieces with
    SentencePiece BPE's scores (minus the merge step that made them; single characters last)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, min_frequency=1, show_progress=False)
    tok.train_from_iterator(SPM_CORPUS * 3, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    made = {m.replace(" ", ""): k for k, m in enumerate(merges)}
    pieces = sorted(model["vocab"], key=model["vocab"].get)
    tokens = ["<unk>", "<s>", "</s>"] + ["<0x%02X>" % b for b in range(256)]
    scores = [0.0] * len(tokens)
    types = [2, 3, 3] + [6] * 256
    singles = [p for p in pieces if p not in made]

    def score(p):
        return -float(made[p]) if p in made else -float(len(merges) + singles.index(p))

    for p in sorted(pieces, key=score, reverse=True):
        tokens.append(p)
        scores.append(score(p))
        types.append(1)
    return tokens, scores, types


def spm_llama_cpp(tokens, scores, text):
    """llama.cpp's SentencePiece BPE (llm_tokenizer_spm), scalar: `▁` first and for spaces,
    characters as symbols, repeatedly join the adjacent pair whose joined piece is in the vocabulary
    with the best score (leftmost on ties), then bytes for what is not in the vocabulary."""
    ids = {t: i for i, t in enumerate(tokens)}
    syms = list(("\u2581" + text).replace(" ", "\u2581"))
    while True:
        best = None
        for i in range(len(syms) - 1):
            j = ids.get(syms[i] + syms[i + 1])
            if j is not None and (best is None or scores[j] > best[0]):
                best = (scores[j], i)
        if best is None:
            break
        i = best[1]
        syms[i:i + 2] = [syms[i] + syms[i + 1]]
    out = []
    for s in syms:
        out += [ids[s]] if s in ids else [ids["<0x%02X>" % b] for b in s.encode()]
    return out


def write_spm(path, tokens, scores, types):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def spm_fixture():
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer, get_gguf_tokenizer)
    tokens, scores, types = spm_vocab()
    path = OUT / "llama-spm.gguf"
    write_spm(path, tokens, scores, types)
    want = [spm_llama_cpp(tokens, scores, t) for t in SPM_TEXTS]
    # transformers' reading of the same file agrees, except that its Metaspace adds no `▁` before
    # a text that already starts with a space (Mixtral's own tokenizer.json, a Prepend normalizer,
    # does, as SentencePiece and llama.cpp do).
    arch, tdict, _ = get_gguf_tokenizer(str(path))
    hf, _ = convert_gguf_tokenizer(arch, tdict)
    for text, ids in zip(SPM_TEXTS, want):
        got = hf.encode(text, add_special_tokens=False).ids
        assert (got == ids) != text.startswith(" "), (text, got, ids)
    assert any(tokens[i].startswith("<0x") for ids in want for i in ids)  # byte fallback used
    return {"texts": SPM_TEXTS, "ids": want, "bos": 1}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    base = train()
    vocab = base["model"]["vocab"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in base["model"]["merges"]]
    ref = {"texts": TEXTS, "ids": {}}
    for name, (normalizer, pre) in CONFIGS.items():
        ref["ids"][name] = reference(base, normalizer, pre)
        write_gguf(OUT / f"{name}.gguf", name, vocab, merges)
    # Every two different configurations must disagree somewhere, or the test could not tell
    # one mapping from another.
    names = list(CONFIGS)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if CONFIGS[a] != CONFIGS[b]:
                assert ref["ids"][a] != ref["ids"][b], (a, b)
    ref["spm"] = spm_fixture()
    (OUT / "reference.json").write_text(json.dumps(ref, ensure_ascii=False, indent=0) + "\n")
    print("wrote", len(CONFIGS), "GGUFs and reference.json to", OUT)


if __name__ == "__main__":
    main()
