#!/usr/bin/env python3
"""Writes the chat-template fixtures under tests/fixtures/chat/: for each template there, the
prompts transformers' apply_chat_template renders from it for conversations that exercise it.
tests/chat_template.rs renders the same conversations with edgemoe's minijinja path and compares
byte for byte.

- smollm2.json: SmolLM2-135M-Instruct's template read from its GGUF, plus a stress template.
- NAME.json for every other NAME.jinja (the MoE families' real templates; their sources are in
  tests/fixtures/chat/README.md). `--llama-cpp DIR` first refreshes the ones llama.cpp vendors
  from DIR (vendor/llama.cpp/models/templates of the llama-cpp-python sdist).

Templates that call strftime_now see a fixed clock (FIXED_NOW), which edgemoe's test sets too.

Needs `pip install transformers jinja2 gguf tokenizers` (no torch). Usage:
    python3 tools/chat_template_reference.py [--gguf path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
        [--llama-cpp path/to/llama.cpp/models/templates]
"""
import argparse
import datetime as dt
import json
import pathlib
import shutil

import jinja2
import transformers
import transformers.utils.chat_template_utils as ctu
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests/fixtures/chat"
DEFAULT_GGUF = ROOT / "target/models/SmolLM2-135M-Instruct.Q4_1.gguf"

# 2026-01-15 10:30:00, read as UTC by edgemoe's fixed clock (unix seconds).
FIXED_NOW = 1768473000

# Templates llama.cpp vendors: fixture name -> file name there.
LLAMA_CPP = {
    "qwen3": "Qwen-Qwen3-0.6B.jinja",
    "gpt-oss": "openai-gpt-oss-120b.jinja",
    "deepseek-v3.1": "deepseek-ai-DeepSeek-V3.1.jinja",
    "glm-4.6": "GLM-4.6.jinja",
    "granite-3.3": "ibm-granite-granite-3.3-2B-Instruct.jinja",
}

# Special tokens of each family's checkpoint (None: the tokenizer has none).
TOKENS = {
    "qwen3": (None, "<|im_end|>"),
    "gpt-oss": ("<|startoftext|>", "<|return|>"),
    "deepseek-v3.1": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "deepseek-v2": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "glm-4.6": (None, "<|endoftext|>"),
    "granite-3.0": ("<|end_of_text|>", "<|end_of_text|>"),
    "granite-3.3": ("<|end_of_text|>", "<|end_of_text|>"),
    "olmoe": (None, "<|endoftext|>"),
}


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

SIMPLE = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Colour of the sky?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "  And at night?\n"},
    ],
    [{"role": "user", "content": "héllo 世界 🎉 <|im_end|> {{ not jinja }}"}],
]

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city, e.g. Paris"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "description": "Forecast days"},
            },
            "required": ["city"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Searches the web.",
        "parameters": {
            "type": "object",
            "properties": {"query": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
            "required": ["query"],
        },
    },
}

# Every schema shape GPT-OSS's TypeScript rendering distinguishes (nullable, oneOf, defaults,
# nested objects, typed arrays, type lists), with floats and non-ASCII text for tojson.
RICH = {
    "type": "function",
    "function": {
        "name": "book_trip",
        "description": "Books a trip.\nTwo lines of description, «quoted».",
        "parameters": {
            "type": "object",
            "properties": {
                "to": {"type": "string", "description": "Destination"},
                "budget": {"type": "number", "default": 1500.5, "description": "In € (max 1e20)"},
                "nights": {"type": "integer", "default": 3, "nullable": True},
                "direct": {"type": "boolean", "default": False},
                "tags": {"type": "array", "items": {"type": "number"}},
                "legs": {"type": "array", "items": {"type": "object", "properties": {"from": {"type": "string"}}}},
                "mode": {"oneOf": [{"type": "string", "description": "by name"}, {"type": "integer"}]},
                "when": {"type": ["string", "null"]},
                "class": {"type": "string", "enum": ["eco", "biz"], "default": "eco"},
                "extra": {"type": "object", "properties": {"seat": {"type": "string"}}, "required": ["seat"]},
            },
            "required": ["to", "budget"],
        },
    },
}


def rich_turns():
    call = {"type": "function", "function": {"name": "book_trip", "arguments": {
        "to": "Zürich", "budget": 1200.75, "nights": None, "direct": True, "tags": [1.5, 2, -0.001],
        "legs": [{"from": "Paris"}], "extra": {"seat": "12A"}, "big": 1e20, "small": 1.5e-7}}}
    return [
        {"role": "user", "content": "Book me a trip to Zürich."},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": '{"ok": true}'},
        {"role": "assistant", "content": "Booked."},
    ]


def tool_turns(arguments_as_string=False, reasoning=None):
    """A user asks, the assistant calls a tool, the tool answers, the assistant answers."""
    args = {"city": "Paris", "unit": "celsius"}
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps(args) if arguments_as_string else args},
    }
    assistant = {"role": "assistant", "content": "", "tool_calls": [call]}
    if reasoning:
        assistant["reasoning_content"] = reasoning
    return [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "Weather in Paris?"},
        assistant,
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18, "sky": "clear"}'},
        {"role": "assistant", "content": "It is 18 °C and clear in Paris."},
        {"role": "user", "content": "And tomorrow?"},
    ]


def thinking_turns(field="reasoning_content"):
    """A finished turn with reasoning, then a new question; and one whose last turn reasons."""
    return [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4.", field: "Two plus two is four."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6.", field: "Three plus three is six."},
    ]


def inline_think_turns():
    """Reasoning written inline as <think>...</think> in the content, as models emit it."""
    return [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "<think>\nSmall primes: 2, 3.\n</think>\n\nTwo."},
        {"role": "user", "content": "Another?"},
    ]


def case(messages, gen, **extra):
    c = {"messages": messages, "add_generation_prompt": gen}
    c.update(extra)
    return c


def both(messages, **extra):
    return [case(messages, True, **extra), case(messages, False, **extra)]


def family_cases(name):
    """The conversations that exercise each template's features."""
    cases = [c for msgs in SIMPLE for c in both(msgs)]
    if name == "qwen3":
        cases += both(SIMPLE[1], kwargs={"enable_thinking": False})
        cases += both(thinking_turns())
        cases += both(inline_think_turns())
        cases += both(tool_turns(), tools=[WEATHER, SEARCH])
        cases += both(tool_turns(arguments_as_string=True, reasoning="Need the weather."), tools=[WEATHER])
        cases += both(rich_turns(), tools=[RICH])
    elif name == "gpt-oss":
        cases += both(SIMPLE[1], kwargs={"reasoning_effort": "high"})
        cases += both(SIMPLE[0], kwargs={"reasoning_effort": "low", "model_identity": "You are Edge."})
        cases += [case(thinking_turns("thinking"), False), case(thinking_turns("reasoning"), True)]
        turns = tool_turns(reasoning="I should call get_weather.")
        # gpt-oss: the developer message comes first; no system turn after it.
        cases += both(turns, tools=[WEATHER, SEARCH])
        cases += both(turns[:4], tools=[WEATHER], kwargs={"builtin_tools": ["browser", "python"]})
        cases += both(rich_turns(), tools=[RICH, WEATHER])
    elif name == "deepseek-v3.1":
        cases += both(SIMPLE[1], kwargs={"thinking": True})
        cases += both(SIMPLE[0], kwargs={"enable_thinking": True})
        cases += both(inline_think_turns())
        cases += both(tool_turns(arguments_as_string=True), tools=[WEATHER])
        cases += both(rich_turns())
        cases += both([{"role": "system", "content": "One."}, {"role": "system", "content": "Two."}]
                      + SIMPLE[0])
        cases += [case(SIMPLE[0] + [{"role": "assistant", "content": "Paris", "prefix": True}], False,
                       kwargs={"thinking": True})]
    elif name == "glm-4.6":
        cases += both(SIMPLE[1], kwargs={"enable_thinking": False})
        cases += both(thinking_turns())
        cases += both(inline_think_turns())
        cases += both(tool_turns(reasoning="Look it up."), tools=[WEATHER, SEARCH])
        multi = tool_turns()
        multi.insert(4, {"role": "tool", "tool_call_id": "call_2", "content": "second result"})
        cases += both(multi, tools=[WEATHER])
        cases += both(rich_turns(), tools=[RICH])
        parts = [{"type": "text", "text": "Hello "}, {"type": "image"}, {"type": "text", "text": "there"}]
        cases += both([{"role": "system", "content": parts}, {"role": "user", "content": parts}],
                      kwargs={"enable_thinking": True})
    elif name == "granite-3.0":
        cases += both(SIMPLE[1], tools=[WEATHER, SEARCH])
        cases += both(SIMPLE[0], tools=[RICH])
        cases += both([
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant_tool_call", "content": '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'},
            {"role": "tool_response", "content": '{"temp": 18}'},
        ], tools=[WEATHER])
    elif name == "granite-3.3":
        docs = [{"doc_id": 1, "text": "Paris is the capital of France."},
                {"doc_id": "b", "text": "The Seine runs through it."}]
        cases += both(SIMPLE[0], tools=[WEATHER])
        cases += both(SIMPLE[0], tools=[RICH])
        cases += both(SIMPLE[0], documents=docs)
        cases += both(SIMPLE[0], tools=[WEATHER], documents=docs)
        cases += both(SIMPLE[0], kwargs={"thinking": True})
        cases += both(SIMPLE[0], documents=docs, kwargs={"controls": {"citations": True, "hallucinations": True}})
        cases += both(SIMPLE[0], kwargs={"available_tools": [SEARCH]})
    return cases


def error_cases(name):
    """Conversations a template refuses: transformers raises, and so must edgemoe."""
    if name == "gpt-oss":
        return [
            case([{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "<|channel|>analysis<|message|>hm"}], False),
            case([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "orphan"}], True),
            case([{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "x", "thinking": "y",
                   "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}], True),
        ]
    if name == "glm-4.6":
        return [case(tool_turns(arguments_as_string=True), True, tools=[WEATHER])]
    if name == "qwen3":
        # Content given as a list of parts: the template calls .startswith on it.
        return [case([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], True)]
    return []


def render_error(tok, source, c):
    """What transformers raises for `c`: the template's own message, or the Jinja error's type."""
    try:
        render(tok, source, c)
    except jinja2.exceptions.TemplateError as e:
        # raise_exception raises TemplateError itself; Jinja's own errors are subclasses.
        own = type(e) is jinja2.exceptions.TemplateError
        return {"message": str(e) if own else None, "python": type(e).__name__}
    except Exception as e:  # noqa: BLE001 - a Python error inside the template (e.g. a list has no .startswith)
        return {"message": None, "python": type(e).__name__}
    raise SystemExit(f"expected {c} to fail")


def render(tok, source, c):
    tok.chat_template = source
    return tok.apply_chat_template(
        c["messages"],
        tools=c.get("tools"),
        documents=c.get("documents"),
        tokenize=False,
        add_generation_prompt=c["add_generation_prompt"],
        **c.get("kwargs", {}),
    )


def tokenizer(bos, eos):
    # Only the template and the special tokens matter to apply_chat_template(tokenize=False).
    special = {k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()), **special)


def write(name, obj):
    dest = FIXTURES / f"{name}.json"
    dest.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}")


def smollm2(gguf_path):
    import gguf

    r = gguf.GGUFReader(str(gguf_path))

    def field(key):
        f = r.fields[key]
        return f.parts[f.data[0]]

    template = bytes(field("tokenizer.chat_template")).decode()
    tokens = r.fields["tokenizer.ggml.tokens"]

    def token(key):
        i = int(field(key)[0])
        return bytes(tokens.parts[tokens.data[i]]).decode()

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    tok = tokenizer(bos, eos)
    templates = []
    for name, source in (("smollm2", template), ("stress", STRESS)):
        cases = [dict(c, expected=render(tok, source, c)) for msgs in SIMPLE for c in both(msgs)]
        templates.append({"name": name, "template": source, "cases": cases})
    write("smollm2", {
        "source": f"smollm2: {gguf_path.name}'s tokenizer.chat_template; stress: written in "
        f"tools/chat_template_reference.py to exercise whitespace control and Python methods; "
        f"expected prompts rendered by transformers {transformers.__version__} apply_chat_template",
        "bos_token": bos,
        "eos_token": eos,
        "templates": templates,
    })


class FixedClock(dt.datetime):
    @classmethod
    def now(cls, tz=None):
        return dt.datetime.fromtimestamp(FIXED_NOW, dt.timezone.utc).replace(tzinfo=None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", type=pathlib.Path, default=DEFAULT_GGUF)
    ap.add_argument("--llama-cpp", type=pathlib.Path)
    args = ap.parse_args()
    if args.llama_cpp:
        for name, file in LLAMA_CPP.items():
            shutil.copyfile(args.llama_cpp / file, FIXTURES / f"{name}.jinja")
    if args.gguf.exists():
        smollm2(args.gguf)
    else:
        print(f"{args.gguf} not fetched: smollm2.json left as it is")
    ctu.datetime = FixedClock  # strftime_now reads chat_template_utils.datetime.now()
    for name, (bos, eos) in TOKENS.items():
        source = (FIXTURES / f"{name}.jinja").read_text()
        tok = tokenizer(bos, eos)
        cases = [dict(c, expected=render(tok, source, c)) for c in family_cases(name)]
        cases += [dict(c, error=render_error(tok, source, c)) for c in error_cases(name)]
        write(name, {
            "template": f"{name}.jinja",
            "expected_by": f"transformers {transformers.__version__} apply_chat_template",
            "now_unix": FIXED_NOW,
            "bos_token": bos,
            "eos_token": eos,
            "cases": cases,
        })


if __name__ == "__main__":
    main()
