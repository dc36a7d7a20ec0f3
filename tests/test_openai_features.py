"""Structured output, tools, logprobs and sampling options through a real `layerrun serve` on
loopback, used by the clients that depend on them: the `openai` package (``parse`` with a
pydantic model, streamed tool calls, logprobs) and LangChain (``with_structured_output``,
``bind_tools`` round trip).

Mechanics run on the tiny random "qwen2" (its output is gibberish, so whatever parses was made
to parse by the grammar); the real SmolLM2-135M-Instruct runs the client round trips (slow).
Every constrained output is validated against its schema.
"""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

import layerrun

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
from layerrun.server import running_server  # noqa: E402

MODEL = "tiny"
# Like Qwen 3's: enable_thinking=False pre-fills an empty thought.
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
            "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
            "{% endif %}{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a zone",
    "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
                   "additionalProperties": False}}}


class Person(BaseModel):  # bounded, so that a random model's output ends
    name: Annotated[str, Field(max_length=8)]
    age: Annotated[int, Field(ge=0, le=120)]
    city: Literal["Paris", "Rome"]


@pytest.fixture(scope="module")
def engine(tiny_layered, tmp_path_factory):
    src = tmp_path_factory.mktemp("features") / "m"
    shutil.copytree(tiny_layered("qwen2"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["max_position_embeddings"] = 2048  # room for the tools prompt in the tiny tokenizer's many tokens
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "chat_template.jinja").write_text(TEMPLATE)
    eng = layerrun.load(src, mode="full", batch_size=4)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine, model_name=MODEL) as s:
        yield s


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def validate_call(call, tools) -> dict:
    f = next(t["function"] for t in tools if t["function"]["name"] == call.function.name)
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, f["parameters"])
    return args


# ---- structured output ------------------------------------------------------------------------
def test_parse_with_a_pydantic_model(server):
    c = client(server)
    for seed in range(3):
        r = c.beta.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Who?"}],
                                          response_format=Person, max_tokens=120, temperature=1.0, seed=seed)
        m = r.choices[0].message
        assert isinstance(m.parsed, Person), m.content
        jsonschema.validate(json.loads(m.content), Person.model_json_schema())


def test_response_format_streamed_and_json_object(server):
    c = client(server)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                               "tag": {"enum": ["x", "y"]}},
              "required": ["n", "tag"], "additionalProperties": False}
    stream = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go"}], stream=True,
                                       max_tokens=80, temperature=0.8, seed=4,
                                       response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices)
    jsonschema.validate(json.loads(text), schema)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Go"}], max_tokens=80,
                                  temperature=0, response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_structured_requests_are_400_naming_the_field(server):
    c = client(server)
    msgs = [{"role": "user", "content": "hi"}]
    cases = [
        (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}),
         "response_format"),
        (dict(response_format={"type": "yaml"}), "response_format.type"),
        (dict(tool_choice="required"), "tool_choice"),  # no tools
        (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
         "tool_choice.function.name"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name!"}}]), "tools.0.function.name"),
        (dict(top_logprobs=3), "top_logprobs"),  # without logprobs
        (dict(top_logprobs=50, logprobs=True), "top_logprobs"),
        (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), "response_format"),
    ]
    for kw, param in cases:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, **kw)
        assert e.value.body["param"] == param, (kw, e.value.body)


# ---- tools --------------------------------------------------------------------------------------
def test_required_and_named_tool_choice_give_valid_calls(server):
    c = client(server)
    msgs = [{"role": "user", "content": "What's the weather in Paris?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, CLOCK], tool_choice="required",
                                  max_tokens=200, temperature=1.0, seed=1)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls" and ch.message.content is None and ch.message.tool_calls
    for call in ch.message.tool_calls:
        validate_call(call, [WEATHER, CLOCK])
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER, CLOCK], parallel_tool_calls=False,
                                  tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=200)
    calls = r.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_time"
    validate_call(calls[0], [CLOCK])


def test_streamed_tool_call_deltas(server):
    c = client(server)
    stream = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=200, temperature=0)
    calls: dict[int, dict] = {}
    finish, content = None, ""
    for chunk in stream:
        d = chunk.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:  # accumulate as the openai docs show
            acc = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            acc["id"] += tc.id or ""
            acc["name"] += tc.function.name or ""
            acc["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_tool_results_go_back_into_the_template(server, engine):
    c = client(server)
    msgs = [{"role": "user", "content": "Weather in Rome?"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=200)
    call = r.choices[0].message.tool_calls[0]
    msgs += [r.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": "22 degrees and sunny"}]
    r2 = c.chat.completions.create(model=MODEL, messages=msgs, tools=[WEATHER], max_tokens=3, temperature=0)
    prompt = engine.render_chat(msgs, tools=[WEATHER])
    assert "22 degrees and sunny" in prompt and call.function.name in prompt
    assert r2.usage.prompt_tokens == len(engine.tokenizer.encode(prompt, add_special_tokens=False))
    # tool_choice none: the tools are not put in front of the model
    r3 = c.chat.completions.create(model=MODEL, messages=msgs[:1], tools=[WEATHER], tool_choice="none", max_tokens=2)
    assert r3.usage.prompt_tokens == len(engine.encode_prompt(msgs[:1]))


# ---- logprobs, sampling options, template kwargs ----------------------------------------------
def test_logprobs_match_the_engine(server, engine):
    c = client(server)
    msgs = [{"role": "user", "content": "Hello"}]
    want = engine.generate(msgs, max_new_tokens=5, logprobs=3)
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                  top_logprobs=3)
    got = r.choices[0].logprobs.content
    assert len(got) == len(want.token_ids)
    for entry, tok, (lp, top) in zip(got, want.token_ids, want.logprobs):
        text = engine.tokenizer.decode([tok], skip_special_tokens=False)
        assert entry.token == text or (entry.token.startswith("bytes:") and text == "\ufffd")  # part of a character
        assert entry.logprob == pytest.approx(lp, abs=1e-5) and len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
    # streamed: the same entries, chunk by chunk
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=1, stream=True)
    streamed = [e for ch in stream if ch.choices and ch.choices[0].logprobs for e in ch.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == pytest.approx([lp for lp, _ in want.logprobs], abs=1e-5)
    # completions: OpenAI's legacy shape
    want = engine.generate("Hello", max_new_tokens=4, logprobs=2, chat=False)
    r = c.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx([x for x, _ in want.logprobs], abs=1e-5)
    assert len(lp.tokens) == 4 and all(len(t) == 2 for t in lp.top_logprobs)
    assert r.choices[0].text == want.text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(want.text)
    # a token's bytes are exactly its part of the text: together they spell it
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, temperature=0, logprobs=True)
    spelled = b"".join(bytes(e.bytes) for e in r.choices[0].logprobs.content)
    assert spelled.decode("utf-8", "replace") == r.choices[0].message.content
    assert c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2).choices[0].logprobs is None


def test_sampling_options_reach_the_sampler(server, engine):
    c = client(server)
    for kw in (dict(presence_penalty=1.5), dict(frequency_penalty=1.0), dict(repetition_penalty=2.0),
               dict(min_p=0.5, temperature=1.0, seed=7)):
        extra = {k: kw.pop(k) for k in ("repetition_penalty", "min_p") if k in kw}
        want = engine.generate("Once", max_new_tokens=12, chat=False, **kw, **extra,
                               **({} if "temperature" in kw else {"temperature": 0}))
        r = c.completions.create(model=MODEL, prompt="Once", max_tokens=12, extra_body=extra,
                                 **{"temperature": 0, **kw})
        assert r.choices[0].text == want.text, (kw, extra)
    plain = c.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0).choices[0].text
    assert plain != c.completions.create(model=MODEL, prompt="Once", max_tokens=12, temperature=0,
                                         presence_penalty=2.0).choices[0].text


def test_chat_template_kwargs_reach_the_template(server, engine):
    c = client(server)
    msgs = [{"role": "user", "content": "Hi"}]
    plain = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1).usage.prompt_tokens
    off = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=1,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}}).usage.prompt_tokens
    think = engine.tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False)
    assert off == plain + len(think)
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": msgs, "chat_template_kwargs": [1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


# ---- LangChain ----------------------------------------------------------------------------------
def langchain_llm(server, **kw):
    lc = pytest.importorskip("langchain_openai")
    return lc.ChatOpenAI(base_url=server.base_url, api_key="unused", model=MODEL, max_retries=0, **kw)


def test_langchain_structured_output_and_tool_round_trip(server, engine):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"], unit: Literal["c", "f"]) -> str:
        """Get the current weather in a city."""
        return f"21 {unit} in {city}"

    llm = langchain_llm(server, temperature=0, max_tokens=150)
    p = llm.with_structured_output(Person).invoke("Describe a person")
    assert isinstance(p, Person)
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    msgs = [HumanMessage("Weather in Paris?")]
    ai = bound.invoke(msgs)
    assert len(ai.tool_calls) >= 1 and ai.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(ai.tool_calls[0]["args"], get_weather.tool_call_schema.model_json_schema())
    result = get_weather.invoke(ai.tool_calls[0]["args"])
    msgs += [ai, ToolMessage(result, tool_call_id=ai.tool_calls[0]["id"])]
    final = llm.bind_tools([get_weather]).invoke(msgs)
    used = final.response_metadata["token_usage"]["prompt_tokens"]
    assert used > ai.response_metadata["token_usage"]["prompt_tokens"]  # the call and its result were sent back
    # streamed, the chunks add up to the same call
    chunks = list(bound.stream([HumanMessage("Weather in Paris?")]))
    total = chunks[0]
    for ch in chunks[1:]:
        total = total + ch
    assert [c["name"] for c in total.tool_calls] == ["get_weather"]
    assert total.tool_calls[0]["args"] == ai.tool_calls[0]["args"]  # greedy: the same call as unstreamed


# ---- the real SmolLM2 ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_server():
    from layerrun.formats import store

    eng = layerrun.load(store.pull("smollm2-135m-instruct", progress=False, log=print), mode="full", batch_size=2)
    with running_server(eng, model_name="smollm2") as s:
        yield s
    eng.close()


class City(BaseModel):
    name: str
    country: str
    population_millions: Annotated[int, Field(ge=0, le=2000)]  # a bound: small models loop on digits


@pytest.mark.slow
def test_smollm2_parse_and_tool_round_trip(smollm2_server):
    s = smollm2_server
    c = openai.OpenAI(base_url=s.base_url, api_key="unused", max_retries=0)
    r = c.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
        response_format=City, max_tokens=40, temperature=0)
    m = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and isinstance(m.parsed, City)
    jsonschema.validate(json.loads(m.content), City.model_json_schema())
    print("SmolLM2 parse:", m.content)

    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=s.base_url, api_key="unused", model="smollm2", temperature=0, max_tokens=40,
                     max_retries=0)
    tools = [{"type": "function", "function": WEATHER["function"]}]
    ai = llm.bind_tools(tools, tool_choice="required", parallel_tool_calls=False).invoke(
        [HumanMessage("What is the weather in Paris?")])
    assert len(ai.tool_calls) == 1 and ai.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(ai.tool_calls[0]["args"], WEATHER["function"]["parameters"])
    print("SmolLM2 call:", ai.tool_calls)
    final = llm.bind_tools(tools).invoke([HumanMessage("What is the weather in Paris?"), ai,
                                          ToolMessage("18 degrees, light rain", tool_call_id=ai.tool_calls[0]["id"])])
    assert final.content or final.tool_calls
    print("SmolLM2 after the tool:", final.content, final.tool_calls)
