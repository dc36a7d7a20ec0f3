"""Per-token cost of a JSON-schema token mask, for the constrained-decoding libraries, on the real
models' vocabularies (SmolLM2: 49k tokens, Gemma-3: 262k).

Every library walks the same token path (a valid instance of the schema, tokenized by the model's
tokenizer): at each step it computes the allowed-token mask, then advances by the path's token.
Reports grammar compile time and the median / p90 mask time per token, libraries alternated in one
run. Run: python bench/constrained_mask.py [--repeat 3]  (needs llguidance, xgrammar, outlines-core,
transformers for xgrammar's tokenizer import; the models in the local store).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

STORE = Path.home() / ".cache" / "layerrun" / "models"
MODELS = {"smollm2 (49k)": STORE / "smollm2-135m-instruct", "gemma3 (262k)": STORE / "gemma3-270m"}
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string"}},
        "city": {"type": "string", "enum": ["London", "Paris", "Rome"]},
    },
    "required": ["name", "age", "languages", "city"],
    "additionalProperties": False,
}
INSTANCE = {"name": "Ada Lovelace", "age": 36, "languages": ["English", "French", "Italian"], "city": "London"}


def path_tokens(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def bench_llguidance(folder: Path, ids: list[int], vocab: int, eos: int):
    import llguidance
    import llguidance.torch as lt

    t0 = time.perf_counter()
    lltok = llguidance.LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=vocab, eos_token=eos)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
    m = llguidance.LLMatcher(lltok, grammar)
    t_compile = time.perf_counter() - t0
    mask = lt.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        a = time.perf_counter()
        lt.fill_next_token_bitmask(m, mask, 0)
        times.append(time.perf_counter() - a)
        if not m.consume_token(t):
            raise RuntimeError(f"llguidance refused token {t}: {m.get_error()}")
    return t_tok, t_compile, times


def bench_xgrammar(folder: Path, ids: list[int], vocab: int, eos: int):
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    cg = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    m = xgr.GrammarMatcher(cg)
    t_compile = time.perf_counter() - t0
    mask = xgr.allocate_token_bitmask(1, vocab)
    times = []
    for t in ids:
        a = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        times.append(time.perf_counter() - a)
        if not m.accept_token(t):
            raise RuntimeError(f"xgrammar refused token {t}")
    return t_tok, t_compile, times


def bench_outlines(folder: Path, ids: list[int], vocab: int, eos: int):
    import outlines_core as oc
    from outlines_core.json_schema import build_regex_from_schema
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    hf = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    words: dict[str, list[int]] = {}
    for i in range(len(hf)):
        if i == eos:
            continue
        s = hf.convert_tokens_to_string([hf.convert_ids_to_tokens(i)])
        if s:
            words.setdefault(s, []).append(i)
    voc = oc.Vocabulary(eos, words)
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = oc.Index(build_regex_from_schema(json.dumps(SCHEMA), r"[ ]?"), voc)
    guide = oc.Guide(index)
    t_compile = time.perf_counter() - t0
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        a = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - a)
        guide.advance(t)
    return t_tok, t_compile, times


def bench_layerrun(folder: Path, ids: list[int], vocab: int, eos: int):
    """What the generation loop pays per token: layerrun's GrammarProcessor (llguidance's mask, unpacked
    to a bool vector and applied to a (vocab,) float32 logits row), then accept()."""
    from types import SimpleNamespace

    from layerrun.engine.constrained import Grammar, processor
    from layerrun.engine.tokenizer import Tokenizer

    t0 = time.perf_counter()
    eng = SimpleNamespace(tokenizer=Tokenizer(folder), args=SimpleNamespace(vocab_size=vocab), eos_token_ids={eos},
                          path=folder)
    processor(eng, Grammar.json_schema(SCHEMA))  # builds (and caches) the vocabulary index
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    proc = processor(eng, Grammar.json_schema(SCHEMA))
    t_compile = time.perf_counter() - t0
    logits = torch.randn(vocab)
    times = []
    for t in ids:
        a = time.perf_counter()
        out = proc(ids, logits)
        times.append(time.perf_counter() - a)
        assert out[t] > float("-inf"), "the path's token was masked"
        proc.accept(t)
    return t_tok, t_compile, times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--libs", default="llguidance,xgrammar,outlines-core,layerrun")
    a = ap.parse_args()
    from tokenizers import Tokenizer

    fns = {"llguidance": bench_llguidance, "xgrammar": bench_xgrammar, "outlines-core": bench_outlines,
           "layerrun": bench_layerrun}
    libs = a.libs.split(",")
    for name, folder in MODELS.items():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        cfg = json.loads((folder / "config.json").read_text())
        vocab = cfg["vocab_size"]
        eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], int) else cfg["eos_token_id"][0]
        ids = path_tokens(tok, json.dumps(INSTANCE, separators=(",", ":")))  # compact JSON: what the server asks for
        print(f"\n{name}: vocab {vocab}, path of {len(ids)} tokens")
        res: dict[str, list] = {lib: [] for lib in libs}
        for _ in range(a.repeat):
            for lib in libs:  # alternate libraries within each repeat
                try:
                    res[lib].append(fns[lib](folder, ids, vocab, eos))
                except Exception as e:  # report and go on: one library failing must not hide the others
                    res[lib].append(e)
        for lib, runs in res.items():
            ok = [r for r in runs if not isinstance(r, Exception)]
            if not ok:
                print(f"  {lib:14s} failed: {runs[0]}")
                continue
            per = [statistics.median(r[2]) * 1e6 for r in ok]
            p90 = [sorted(r[2])[int(0.9 * len(r[2]))] * 1e6 for r in ok]
            print(f"  {lib:14s} tokenizer import {statistics.median(r[0] for r in ok):7.2f} s  "
                  f"compile {statistics.median(r[1] for r in ok) * 1e3:9.1f} ms  "
                  f"mask/token median {statistics.median(per):8.1f} us (runs {min(per):.1f}-{max(per):.1f})  "
                  f"p90 {statistics.median(p90):8.1f} us")


if __name__ == "__main__":
    main()
