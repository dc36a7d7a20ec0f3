"""`layerrun chat` through a pseudo-terminal (pexpect), as a person uses it, and `layerrun generate`'s
prompt handling. The model is the tiny random "qwen2"; expected answers come from the engine run
in this process on the same folder (greedy, so they must match exactly)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import layerrun
from layerrun.engine.session import ChatSession

pexpect = pytest.importorskip("pexpect")
TIMEOUT = 120  # generous: a busy machine; the test never measures time


@pytest.fixture(scope="module")
def model(tiny_layered):
    return tiny_layered("qwen2")


@pytest.fixture(scope="module")
def engine(model):
    eng = layerrun.load(model, mode="full", batch_size=1)
    yield eng
    eng.close()


def spawn(*args: str):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH")] if p),
           "TERM": "dumb"}
    child = pexpect.spawn(sys.executable, ["-m", "layerrun", "chat", *args], env=env, encoding="utf-8",
                          timeout=TIMEOUT, dimensions=(50, 400))
    child.expect_exact(">>> ")
    return child


def answer_of(child) -> str:
    """The answer printed before the next prompt (progress lines and their erasure removed)."""
    child.expect_exact(">>> ")
    text = child.before.replace("\r\n", "\n")
    text = text.split("\x1b[K")[-1]  # whatever the progress line wrote is erased before the answer
    return text.rstrip("\n")


def test_a_conversation(model, engine):
    child = spawn(str(model), "--mode", "stream", "--max-new-tokens", "12", "--system", "Be brief.")
    child.sendline("Hello there")
    first = answer_of(child)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = engine.generate(msgs, max_new_tokens=12)
    assert first.endswith(want.text.strip("\n")) and want.text.strip()

    # the second turn sees the first: same tokens as the engine given the whole conversation
    child.sendline("And then?")
    second = answer_of(child)
    msgs += [{"role": "assistant", "content": want.text}, {"role": "user", "content": "And then?"}]
    assert second.endswith(engine.generate(msgs, max_new_tokens=12).text.strip("\n"))

    child.sendline("/stats")
    child.expect("decode [0-9.]+ tok/s")
    child.expect(r"from\s+the cache")  # the second turn reused the first turn's KV cache
    child.expect_exact(">>> ")

    child.sendline("/set temperature 0.7")
    child.expect_exact("set temperature to 0.7")
    child.expect_exact(">>> ")
    child.sendline("/set top_p 7")
    child.expect_exact("not set: top_p must be in (0, 1]")
    child.expect_exact(">>> ")
    child.sendline("/set temperature 0")
    child.expect_exact(">>> ")

    child.sendline("/clear")
    child.expect_exact("cleared the conversation")
    child.expect_exact(">>> ")
    child.sendline("Hello there")
    assert answer_of(child).endswith(want.text.strip("\n"))  # a fresh start: the first answer again

    child.sendline("/nonsense")
    child.expect_exact("unknown command /nonsense")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_and_ctrl_d_leaves(model):
    child = spawn(str(model), "--mode", "stream", "--ignore-eos", "--max-new-tokens", "100000")
    child.sendline("Tell me everything")
    child.expect_exact("Tell me everything\r\n")  # the echo of what was typed
    child.expect(r"\S")  # the answer has started
    child.sendintr()
    child.expect_exact("(stopped)")
    child.expect_exact(">>> ")
    child.sendintr()  # at the prompt: a hint, not an exit
    child.expect_exact("Ctrl-D or /bye")
    child.expect_exact(">>> ")
    child.sendline("/set max_new_tokens 3")
    child.expect_exact(">>> ")
    child.sendline("still there?")
    child.expect_exact(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0


def test_old_turns_are_dropped_when_the_context_fills(model):
    child = spawn(str(model), "--context", "160", "--max-new-tokens", "20", "--ignore-eos")
    for i in range(4):
        child.sendline(f"message number {i} " + "blah " * 10)
        child.expect_exact(">>> ")
        if "dropped the oldest" in child.before:
            break
    else:
        pytest.fail("no turn was dropped")
    child.sendline("x " * 400)  # alone longer than the context
    child.expect_exact("this message is too long")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_progress_shows_while_the_first_token_comes(model):
    # a throttled stream: every token reads the whole model at 200 KB/s, so the first one takes a while
    # (slow enough that the pipeline's read-ahead at start-up, the whole 3-layer model, is not done yet)
    child = spawn(str(model), "--mode", "stream", "--throttle", "200KB/s", "--max-new-tokens", "2")
    child.sendline("Hi")
    child.expect(r"reading layers \d+/3")
    child.expect_exact(">>> ")
    child.sendline("/bye")
    child.expect(pexpect.EOF)


def test_session_reuses_the_cache_and_gives_the_same_tokens(engine):
    s = ChatSession(engine)
    msgs = [{"role": "user", "content": "Hi"}]
    for q in ["And?", "Why?"]:
        got = [c.token_id for c in s.stream(msgs, max_new_tokens=8) if c.token_id is not None]
        want = engine.generate(msgs, max_new_tokens=8)
        assert got == want.token_ids
        msgs = msgs + [{"role": "assistant", "content": want.text}, {"role": "user", "content": q}]
    got = [c.token_id for c in s.stream(msgs, max_new_tokens=8) if c.token_id is not None]
    assert got == engine.generate(msgs, max_new_tokens=8).token_ids
    assert 0 < s.last.reused_prompt_tokens < len(s.last.prompt_ids)
    # a different conversation shares only what really is the same
    other = [{"role": "user", "content": "Something else entirely"}]
    got = [c.token_id for c in s.stream(other, max_new_tokens=8) if c.token_id is not None]
    assert got == engine.generate(other, max_new_tokens=8).token_ids


def test_chat_refuses_a_model_without_a_template(tmp_path, model):
    import shutil

    src = tmp_path / "m"
    shutil.copytree(model, src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    p = run_cli("chat", str(src), input="")
    assert p.returncode == 1 and "no chat template" in p.stderr and p.stderr.count("\n") == 1


# ---- generate's prompt --------------------------------------------------------------------------
def run_cli(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerrun", *args], capture_output=True, text=True, input=input,
                          timeout=600)


def test_generate_with_a_model_and_no_prompt_is_an_error(model):
    p = run_cli("generate", str(model))
    assert p.returncode == 1
    assert p.stderr.startswith("error: no prompt:") and "is a model" in p.stderr and p.stderr.count("\n") == 1


def test_generate_reads_the_prompt_from_stdin(model, engine):
    want = engine.generate("Hello from stdin", max_new_tokens=6, chat=False)
    p = run_cli("generate", str(model), "-", "--raw", "--max-new-tokens", "6", "--json", input="Hello from stdin\n")
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["token_ids"] == want.token_ids
    p = run_cli("generate", str(model), "-", input="  \n")
    assert p.returncode == 1 and "empty" in p.stderr


def test_generate_json_schema_and_sampling_flags(model, tmp_path):
    import jsonschema

    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"], "additionalProperties": False}
    f = tmp_path / "s.json"
    f.write_text(json.dumps(schema))
    p = run_cli("generate", str(model), "Answer", "--json-schema", str(f), "--max-new-tokens", "60", "--json",
                "--temperature", "0.9", "--seed", "2", "--min-p", "0.05", "--repetition-penalty", "1.1")
    assert p.returncode == 0, p.stderr
    jsonschema.validate(json.loads(json.loads(p.stdout)["text"]), schema)
    f.write_text("{broken")
    p = run_cli("generate", str(model), "Answer", "--json-schema", str(f))
    assert p.returncode == 1 and f"--json-schema {f}: not valid JSON" in p.stderr
    p = run_cli("generate", str(model), "Answer", "--presence-penalty", "9")
    assert p.returncode == 1 and "presence_penalty must be in [-2, 2]" in p.stderr
