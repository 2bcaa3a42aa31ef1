#!/usr/bin/env python3
"""Writes tests/fixtures/chat/smollm2.json: SmolLM2-135M-Instruct's chat template (read from its
GGUF) and the prompts transformers' apply_chat_template renders from it for a few conversations.
tests/chat_template.rs renders the same conversations with edgemoe's minijinja path and compares.

Needs `pip install transformers jinja2 gguf` (no torch). Usage:
    python3 tools/chat_template_reference.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
"""
import json
import pathlib
import sys

import gguf
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT = ROOT / "target/models/SmolLM2-135M-Instruct.Q4_1.gguf"


# Whitespace control (trim_blocks/lstrip_blocks, `-`), namespace, loop filters and attributes,
# Python string methods and filters: what real templates (Llama 3, Qwen2, Mistral) lean on.
STRESS = """{%- set ns = namespace(sys='') -%}
{% for m in messages %}
  {% if m['role'] == 'system' %}
    {% set ns.sys = m['content'].strip() %}
  {% endif %}
{% endfor %}
{{ bos_token }}
{% if ns.sys %}[SYS] {{ ns.sys | upper }}
{% endif %}
{% for m in messages if m.role != 'system' %}
  {% if loop.last and m.role == 'user' %}
<<{{ m.role | capitalize }}>> {{ m.content | trim }} ({{ loop.index }}/{{ loop.length }})
  {% else %}
{{ m.role }}: {{ m.content.replace('\\n', ' ') }}{{ eos_token }}
  {% endif %}
{% endfor %}
{%- if add_generation_prompt %}assistant:{% endif %}"""


def field(reader, key):
    f = reader.fields[key]
    return f.parts[f.data[0]]


def main():
    path = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    r = gguf.GGUFReader(str(path))
    template = bytes(field(r, "tokenizer.chat_template")).decode()
    tokens = r.fields["tokenizer.ggml.tokens"]

    def token(key):
        i = int(field(r, key)[0])
        return bytes(tokens.parts[tokens.data[i]]).decode()

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    # Only the template and the special tokens matter to apply_chat_template(tokenize=False).
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), bos_token=bos, eos_token=eos)
    tok.chat_template = template
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Colour of the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "  And at night?\n"},
        ],
        [{"role": "user", "content": "héllo 世界 🎉 <|im_end|> {{ not jinja }}"}],
    ]
    version = __import__("transformers").__version__
    templates = []
    for name, source in (("smollm2", template), ("stress", STRESS)):
        tok.chat_template = source
        cases = []
        for msgs in conversations:
            for gen in (True, False):
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                cases.append({"messages": msgs, "add_generation_prompt": gen, "expected": text})
        templates.append({"name": name, "template": source, "cases": cases})
    out = {
        "source": f"smollm2: {path.name}'s tokenizer.chat_template; stress: written in "
        f"tools/chat_template_reference.py to exercise whitespace control and Python methods; "
        f"expected prompts rendered by transformers {version} apply_chat_template",
        "bos_token": bos,
        "eos_token": eos,
        "templates": templates,
    }
    dest = ROOT / "tests/fixtures/chat/smollm2.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
