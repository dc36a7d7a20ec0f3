"""Structured output (constrained decoding), tool-call formats, logprobs and the sampling
options, through the engine's Python API on the tiny random "qwen2" model.

A random model's free output is gibberish, so whatever parses was made to parse by the grammar:
every constrained output is checked against its schema with the jsonschema package.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import layerrun
from layerrun.engine.constrained import Grammar, from_response_format
from layerrun.engine.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolCallStream,
    call_grammar,
    parse_tool_calls,
    prepare_messages,
)
from layerrun.errors import LayerRunError

pytest.importorskip("llguidance")

# Bounded strings and numbers: a random model never closes an unbounded string on its own.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "city", "ok"],
    "additionalProperties": False,
}
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
         "required": ["x", "y"], "additionalProperties": False}
ENUM = {"type": "object", "properties": {"k": {"enum": [1, "two", None]}}, "required": ["k"],
        "additionalProperties": False}
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def engine(tiny_layered, tmp_path_factory):
    import shutil

    src = tmp_path_factory.mktemp("structured") / "m"
    shutil.copytree(tiny_layered("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 2048  # room for a tool prompt in the tiny tokenizer's many tokens
    (src / "config.json").write_text(json.dumps(cfg))
    eng = layerrun.load(src, mode="full", batch_size=4)
    yield eng
    eng.close()


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_output_always_validates(engine, seed):
    g = engine.generate("Describe someone", max_new_tokens=120, json_schema=PERSON, temperature=1.0, seed=seed)
    assert g.finish_reason == "stop", g.text
    jsonschema.validate(json.loads(g.text), PERSON)


def test_json_object_and_response_format_shapes(engine):
    for rf in ("json_object", {"type": "json_object"}):  # (any object: keys are unbounded strings, so greedy)
        g = engine.generate("Hi", max_new_tokens=60, response_format=rf)
        assert g.finish_reason == "stop" and isinstance(json.loads(g.text), dict)
    g = engine.generate("Hi", max_new_tokens=60, response_format={"type": "json_schema", "json_schema": {
        "name": "point", "schema": POINT}})
    jsonschema.validate(json.loads(g.text), POINT)
    assert engine.generate("Hi", max_new_tokens=5, response_format={"type": "text"}).text == \
        engine.generate("Hi", max_new_tokens=5).text


def test_each_row_of_a_batch_follows_its_own_grammar(engine):
    prompts = [{"prompt": "a", "json_schema": PERSON}, {"prompt": "b", "json_schema": POINT},
               {"prompt": "c"}, {"prompt": "d", "response_format": {"type": "json_schema", "json_schema": {"schema": ENUM}}},
               {"prompt": "e", "json_schema": POINT, "temperature": 1.0, "seed": 5}]
    out = engine.generate_batch(prompts, max_new_tokens=100, batch_size=3)
    jsonschema.validate(json.loads(out[0].text), PERSON)
    jsonschema.validate(json.loads(out[1].text), POINT)
    assert out[2].text == engine.generate("c", max_new_tokens=100).text  # an unconstrained row is untouched
    jsonschema.validate(json.loads(out[3].text), ENUM)
    jsonschema.validate(json.loads(out[4].text), POINT)
    # and a constrained row gives the same tokens in the batch as alone (greedy)
    assert out[1].token_ids == engine.generate("b", max_new_tokens=100, json_schema=POINT).token_ids


def test_bad_schemas_are_one_clear_error(engine):
    with pytest.raises(LayerRunError, match="json_schema: not valid JSON"):
        engine.generate("x", json_schema="{nope")
    with pytest.raises(LayerRunError, match="json_schema"):
        engine.generate("x", json_schema={"type": "objectx"})
    with pytest.raises(LayerRunError, match="at most one of"):
        engine.generate("x", json_schema=POINT, response_format="json_object")
    with pytest.raises(LayerRunError, match="response_format.type"):
        from_response_format({"type": "yaml"})
    with pytest.raises(LayerRunError, match="unknown option"):
        engine.generate("x", json_shema=POINT)
    with pytest.raises(LayerRunError, match="regex parse error|unclosed"):
        Grammar.json_schema({"type": "string", "pattern": "(("}).check()


def test_logprobs_are_the_models_own(engine):
    prompt = "Hello"
    g = engine.generate(prompt, max_new_tokens=6, logprobs=3, chat=False)
    ids = engine.encode_prompt(prompt, chat=False)
    full = torch.log_softmax(engine.logits([ids + g.token_ids]).float()[0], -1)  # (T, V)
    for k, (tok, (lp, top)) in enumerate(zip(g.token_ids, g.logprobs)):
        row = full[len(ids) - 1 + k]
        assert lp == pytest.approx(float(row[tok]), abs=1e-4)
        assert [t for t, _ in top] == row.topk(3).indices.tolist()
        assert tok == top[0][0]  # greedy picks the most likely
    assert engine.generate(prompt, max_new_tokens=2).logprobs is None
    with pytest.raises(LayerRunError, match="logprobs"):
        engine.generate(prompt, logprobs=99)


def test_penalties_and_min_p_change_what_is_sampled(engine):
    plain = engine.generate("Hello", max_new_tokens=30, chat=False)
    assert len(set(plain.token_ids)) < 15  # a random model repeats itself...
    pen = engine.generate("Hello", max_new_tokens=30, chat=False, presence_penalty=2.0)
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))  # ...less with a presence penalty
    rep = engine.generate("Hello", max_new_tokens=30, chat=False, repetition_penalty=3.0)
    assert rep.token_ids != plain.token_ids
    # min_p = 1 keeps only the most likely token: sampling at any temperature is then greedy
    assert engine.generate("Hello", max_new_tokens=12, chat=False, temperature=1.5, seed=3, min_p=1.0).token_ids == \
        engine.generate("Hello", max_new_tokens=12, chat=False).token_ids[:12]
    with pytest.raises(LayerRunError, match="min_p"):
        engine.generate("Hello", min_p=2)


def test_chat_template_kwargs_reach_the_template(engine, tmp_path):
    tok = engine.tokenizer
    old = tok.chat_template, tok._template
    try:
        tok.chat_template = ("{% for m in messages %}{{ m.content }}{% endfor %}"
                             "{% if enable_thinking is defined and not enable_thinking %}[no-think]{% endif %}")
        tok._template = None
        assert engine.render_chat("hi") == "hi"
        assert engine.render_chat("hi", enable_thinking=False) == "hi[no-think]"
        a = engine.generate("hi", max_new_tokens=1, chat_template_kwargs={"enable_thinking": False}, logprobs=0)
        assert a.stats.prompt_tokens == len(tok.encode("hi[no-think]", add_special_tokens=False))
        with pytest.raises(LayerRunError, match="chat_template_kwargs must be an object"):
            engine.generate("hi", chat_template_kwargs=[1])
    finally:
        tok.chat_template, tok._template = old


# ---- tool calls ------------------------------------------------------------------------------
def test_parse_hermes_llama3_and_mistral_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>' \
           '\n<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
    content, calls = parse_tool_calls(text, HERMES)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "UTC"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2

    content, calls = parse_tool_calls('<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', LLAMA3)
    assert content == "" and json.loads(calls[0]["function"]["arguments"]) == {"zone": "CET"}
    content, calls = parse_tool_calls('{"name": "get_time", "parameters": {"zone": "CET"}}', LLAMA3)
    assert calls[0]["function"]["name"] == "get_time"
    content, calls = parse_tool_calls('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}, '
                                      '{"name": "get_weather", "arguments": {"city": "Rome", "days": 1}}]', MISTRAL)
    assert [c["function"]["name"] for c in calls] == ["get_time", "get_weather"]
    # plain text, and JSON that is not a call, stay content
    assert parse_tool_calls("The sky is blue.", HERMES) == ("The sky is blue.", [])
    assert parse_tool_calls('{"a": 1}', HERMES) == ('{"a": 1}', [])
    assert parse_tool_calls("<tool_call>{broken", HERMES) == ("<tool_call>{broken", [])


def test_tool_call_stream_holds_back_only_the_call():
    s = ToolCallStream(HERMES)
    out = "".join(s.feed(p) for p in ["Sure", ", one moment.", "\n<tool", "_call>\n{\"name\": \"get_time\", ",
                                      "\"arguments\": {\"zone\": \"UTC\"}}\n</tool_call>"])
    assert out == "Sure, one moment.\n"
    content, calls = s.finish()
    assert content == "" and calls[0]["function"]["name"] == "get_time"
    s = ToolCallStream(HERMES)
    assert s.feed("a <tool") == "a " and s.feed(" box") == "<tool box"  # a false alarm is released
    assert s.finish() == ("", [])


def test_templates_without_tools_get_the_hermes_prompt(engine):
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out, template = prepare_messages(engine.tokenizer, msgs, {"tools": WEATHER})
    assert "tools" not in template  # the tiny model's template does not use tools: they go in a system message
    assert out[0]["role"] == "system" and '"get_weather"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                                      '{"city": "Paris", "days": 1}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    text = engine.render_chat(msgs, tools=WEATHER)
    assert "sunny" in text and "get_weather" in text


def test_a_template_that_takes_tools_gets_them(engine):
    tok = engine.tokenizer
    old = tok.chat_template, tok._template
    try:
        tok.chat_template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}{% endif %}"
                             "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                             "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.arguments | tojson }}"
                             "{% endfor %}{% endfor %}")
        tok._template = None
        msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}]}]
        # arguments arrive as a JSON string (OpenAI) and reach the template as an object
        assert engine.render_chat(msgs, tools=WEATHER) == \
            'TOOLS:get_weather;get_time;[user]q[assistant]<tool_call>{"zone": "UTC"}'
    finally:
        tok.chat_template, tok._template = old


@pytest.mark.parametrize("name,parallel", [(None, True), ("get_time", False)])
def test_forced_calls_are_valid_calls(engine, name, parallel):
    grammar = call_grammar(WEATHER, HERMES, name, parallel)
    for seed in range(3):
        g = engine.generate("Call a tool", tools=WEATHER, max_new_tokens=200, grammar=grammar, temperature=1.0,
                            seed=seed)
        assert g.finish_reason == "stop", g.text
        _, calls = parse_tool_calls(g.text, HERMES)
        assert calls and (parallel or len(calls) == 1)
        for c in calls:
            f = next(t["function"] for t in WEATHER if t["function"]["name"] == c["function"]["name"])
            assert name is None or f["name"] == name
            jsonschema.validate(json.loads(c["function"]["arguments"]), f["parameters"])


def test_llama3_forced_call_grammar(engine):
    g = engine.generate("x", max_new_tokens=120, grammar=call_grammar(WEATHER, LLAMA3, "get_weather"))
    _, calls = parse_tool_calls(g.text, LLAMA3)
    assert calls[0]["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), WEATHER[0]["function"]["parameters"])


def test_grammar_checks_drafted_tokens_and_rolls_back(engine):
    from layerrun.engine.constrained import processor

    proc = processor(engine, Grammar.json_schema(POINT))
    good = engine.tokenizer.encode('{"x":3,"y":4}', add_special_tokens=False)
    bad = engine.tokenizer.encode('{"x":3,"z":4}', add_special_tokens=False)
    assert proc.valid_prefix(good) == len(good)
    n = proc.valid_prefix(bad)
    assert 0 < n < len(bad) and bad[:n] == good[:n]  # accepted up to where they differ
    for t in good[:3]:
        proc.accept(t)
    before = proc.allowed().clone()
    proc.accept(good[3])
    proc.rollback(1)
    assert torch.equal(proc.allowed(), before)
    for t in good[3:]:
        proc.accept(t)
    assert proc.complete and proc.allowed().nonzero().flatten().tolist() == sorted(engine.eos_token_ids)
