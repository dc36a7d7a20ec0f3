"""The ``layerrun`` command.

Every user error prints one line (``error: ...``) and exits non-zero; pass
``--debug`` for the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from layerrun import __version__
from layerrun.errors import LayerRunError
from layerrun.options import (
    add_engine_flags,
    add_sampling_flags,
    add_stage_flags,
    engine_options,
    human_bytes,
    human_count,
    looks_like_model,
    print_stage_stats,
    print_stats,
    sampling_options,
)

DEFAULT_MAX_NEW_TOKENS = 256
EXIT_ERROR = 1
EXIT_INVALID = 2


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _console():
    from rich.console import Console

    return Console()


# ---- convert ------------------------------------------------------------------
def cmd_convert(a) -> int:
    from layerrun.formats.convert import convert

    m = convert(
        a.src, a.dst, dtype=a.dtype, force=a.force, progress=not a.quiet, quantize=a.quantize,
        log=lambda s: print(s, file=sys.stderr),
    )
    print(
        f"converted {a.src} -> {a.dst}: {m.model_type}, {m.num_layers} layers, {m.dtype}, "
        f"{human_bytes(m.total_bytes)} in {len(m.files)} files ({m.source.get('seconds', 0):.1f} s)",
        file=sys.stderr,
    )
    return 0


# ---- inspect ------------------------------------------------------------------
def cmd_inspect(a) -> int:
    from layerrun.formats.inspect import inspect_path

    path = Path(a.path)
    if not path.exists():
        from layerrun.engine.engine import resolve_model_path

        path = resolve_model_path(a.path)  # a name in the local store
    info = inspect_path(path)
    if a.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    from rich.table import Table

    t = Table(title=f"{info.get('path', a.path)}", show_header=False, title_justify="left")
    t.add_column("field", style="bold")
    t.add_column("value")
    skip = {"path", "tensor_check", "source", "tensor_types"}
    for k, v in info.items():
        if k in skip:
            continue
        if "bytes" in k and isinstance(v, int):
            v = f"{human_bytes(v)} ({v:,} bytes)" + (
                " (one sequence, routed experts only)" if k == "bytes_stream_per_token" else "")
        elif k == "bytes_per_layer" and isinstance(v, dict):
            v = f"{human_bytes(v['min'])}" + ("" if v["min"] == v["max"] else f" .. {human_bytes(v['max'])}")
        elif k in ("parameters", "active_parameters"):
            v = f"{human_count(v)} ({v:,})" + (" per token (routed experts only)" if k == "active_parameters" else "")
        elif isinstance(v, (list, dict)):
            v = json.dumps(v) if v else "-"
        t.add_row(k.replace("_", " "), str(v))
    if "tensor_types" in info:
        t.add_row("tensor types", ", ".join(
            f"{k} x{n['count']} ({human_bytes(n['bytes'])})" if isinstance(n, dict) else f"{k}: {n}"
            for k, n in info["tensor_types"].items()))
    check = info.get("tensor_check")
    if check is not None:
        ok = not any(check.values())
        t.add_row("tensors", "all expected tensors present, shapes agree" if ok else "[red]problems (below)[/red]")
    c = _console()
    c.print(t)
    if check:
        for k in ("missing", "unexpected", "shape_mismatch"):
            for item in check.get(k, [])[:50]:
                c.print(f"  [red]{k}[/red] {item}", highlight=False)
            if len(check.get(k, [])) > 50:
                c.print(f"  … and {len(check[k]) - 50} more {k}")
    return 0


# ---- validate -----------------------------------------------------------------
def cmd_validate(a) -> int:
    from layerrun.engine.engine import resolve_model_path
    from layerrun.formats.validate import validate_folder

    a.path = resolve_model_path(a.path)
    problems = validate_folder(a.path, check_sha=not a.no_checksum)
    if a.reference and not problems:
        return _validate_reference(a)
    if a.json:
        print(json.dumps({"path": str(a.path), "ok": not problems, "problems": problems}, indent=2))
    else:
        for p in problems:
            print(f"problem: {p}", file=sys.stderr)
        if not problems:
            print(f"{a.path}: OK (files, sizes{'' if a.no_checksum else ', sha256'} and tensor shapes)")
        else:
            print(f"{a.path}: {len(problems)} problem(s)", file=sys.stderr)
    return 0 if not problems else EXIT_ERROR


def _validate_reference(a) -> int:
    import layerrun
    from layerrun.engine.reference import compare

    with layerrun.load(a.path, mode="full", dtype=a.compute_dtype) as engine:
        rep = compare(engine, n_tokens=a.tokens, log=lambda s: print(f"reference: {s}", file=sys.stderr))
    if a.json:
        print(json.dumps({"path": str(a.path), **rep.to_dict()}, indent=2))
    else:
        from rich.table import Table

        t = Table(title=f"{a.path} vs transformers", title_justify="left")
        t.add_column("check")
        t.add_column("result")
        t.add_column("detail")
        for c in rep.checks:
            t.add_row(c.name, "[green]pass[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
        _console().print(t)
        if rep.first_divergent_layer is not None:
            print(f"first divergence at layer {rep.first_divergent_layer}", file=sys.stderr)
        print(f"{a.path}: {'matches transformers' if rep.ok else 'differs from transformers'}")
    return 0 if rep.ok else EXIT_ERROR


# ---- tokenize -----------------------------------------------------------------
def cmd_tokenize(a) -> int:
    from layerrun.engine.engine import resolve_model_path
    from layerrun.engine.tokenizer import Tokenizer

    tok = Tokenizer(resolve_model_path(a.model))
    if a.chat:
        text = tok.apply_chat_template([{"role": "user", "content": a.text}], add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        text = a.text
        ids = tok.encode(text)
    tokens = [tok.id_to_token(i) for i in ids]
    decoded = tok.decode(ids, skip_special_tokens=False)
    if a.json:
        print(json.dumps({"text": text, "ids": ids, "tokens": tokens, "decoded": decoded,
                          "round_trip": decoded == text}, ensure_ascii=False))
        return 0
    print(f"{len(ids)} tokens")
    print("ids:    ", ids)
    print("tokens: ", tokens)
    print("decoded:", repr(decoded), "(round trip OK)" if decoded == text else "(differs from input)")
    return 0


# ---- generate -----------------------------------------------------------------
def _resolve_generate_args(a) -> tuple[str, str | None]:
    if a.prompts_file:
        if len(a.args) > 1:
            raise LayerRunError("with --prompts-file give only the model (or nothing for the default model)")
        if a.args:
            return a.args[0], None
        from layerrun.formats.store import DEFAULT_MODEL, ensure_default

        ensure_default(log=lambda s: print(s, file=sys.stderr))
        return DEFAULT_MODEL, None
    if len(a.args) == 0:
        raise LayerRunError("usage: layerrun generate [MODEL] PROMPT (or - to read the prompt from stdin, "
                            "or --prompts-file FILE)")
    if len(a.args) == 1:
        # One argument is the prompt for the default model, unless it names a model: then the prompt is missing.
        if a.args[0] != "-" and looks_like_model(a.args[0]):
            raise LayerRunError(f"no prompt: {a.args[0]!r} is a model (a folder or a name in the local store), "
                                f"so give the prompt after it: layerrun generate {a.args[0]} PROMPT "
                                "(or - to read it from stdin)")
        from layerrun.formats.store import DEFAULT_MODEL, ensure_default

        ensure_default(log=lambda s: print(s, file=sys.stderr))
        return DEFAULT_MODEL, _read_prompt(a.args[0])
    if len(a.args) == 2:
        return a.args[0], _read_prompt(a.args[1])
    raise LayerRunError("usage: layerrun generate [MODEL] PROMPT (give at most a model and one prompt; "
                        "quote a prompt that has spaces)")


def _read_prompt(arg: str) -> str:
    """``-`` reads the prompt from stdin (to its end); anything else is the prompt."""
    if arg != "-":
        return arg
    if sys.stdin is None or sys.stdin.isatty():
        print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
    text = sys.stdin.read() if sys.stdin is not None else ""
    if not text.strip():
        raise LayerRunError("the prompt read from stdin (-) is empty")
    return text.rstrip("\n")


def _json_schema(a) -> dict:
    """--json-schema FILE: structured output; {} when not given."""
    if not a.json_schema:
        return {}
    from layerrun.formats.files import read_user_text

    text = read_user_text(a.json_schema, "--json-schema file")  # a regular file, bounded: a FIFO is refused
    try:
        return {"json_schema": json.loads(text)}
    except json.JSONDecodeError as e:
        raise LayerRunError(f"--json-schema {a.json_schema}: not valid JSON ({e.msg} at line {e.lineno})") from None


def cmd_generate(a) -> int:
    import layerrun

    model, prompt = _resolve_generate_args(a)
    options = engine_options(a)
    if not a.prompts_file:
        options["batch_size"] = 1  # one sequence: plan the KV cache for one, not for --batch-size
    with layerrun.load(model, **options, trace=bool(a.trace), progress=True) as engine:
        if a.explain:
            print("\n".join(engine.explain_lines), file=sys.stderr)
        try:
            if a.prompts_file:
                return _generate_file(engine, a)
            return _generate(engine, prompt, a)
        finally:
            if a.trace:
                engine.trace.write(a.trace)
                print(f"trace written to {a.trace} (open it at ui.perfetto.dev)", file=sys.stderr)


def _read_prompts(path: str) -> list[dict]:
    prompts = []
    from layerrun.formats.files import read_user_text

    lines = read_user_text(path, "prompts file").splitlines()  # a FIFO or a device is refused, not read forever
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LayerRunError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), (str, list)):
            raise LayerRunError(f"{path}:{n}: expected an object with a \"prompt\" string")
        prompts.append(obj)
    if not prompts:
        raise LayerRunError(f"{path}: no prompts")
    return prompts


def _generate_file(engine, a) -> int:
    """--prompts-file IN --output OUT: batched generation, results in input order."""
    import time

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prompts = _read_prompts(a.prompts_file)
    out_path = Path(a.output) if a.output else None
    sampling = dict(
        max_new_tokens=a.max_new_tokens, **sampling_options(a), stop=a.stop, chat=False if a.raw else None,
        system=a.system, ignore_eos=a.ignore_eos, **_json_schema(a), speculate=not a.no_speculate,
    )
    t0 = time.perf_counter()
    tokens = 0
    with Progress(TextColumn("[bold]generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=Console(stderr=True), disable=a.quiet) as bar:
        task = bar.add_task("gen", total=len(prompts), rate="")

        def on_event(ev):
            nonlocal tokens
            tokens += 1 if ev.token_id is not None else 0
            rate = f"{tokens / max(time.perf_counter() - t0, 1e-9):.1f} tok/s"
            bar.update(task, advance=1 if ev.finish_reason else 0, rate=rate)

        results = engine.generate_batch(prompts, on_event=on_event, **sampling)
    elapsed = time.perf_counter() - t0
    lines = [
        json.dumps({"prompt": p["prompt"], "text": g.text, "token_ids": g.token_ids, "finish_reason": g.finish_reason},
                   ensure_ascii=False)
        for p, g in zip(prompts, results)
    ]
    if out_path:
        tmp = out_path.with_name(out_path.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(out_path)
    else:
        print("\n".join(lines))
    total = sum(len(g.token_ids) for g in results)
    print(f"{len(results)} sequences, {total} tokens in {elapsed:.2f} s = {total / elapsed:.2f} tok/s aggregate "
          f"(batch size {engine.batch_size}, {engine.mode})", file=sys.stderr)
    return 0


def _generate(engine, prompt, a) -> int:
    kwargs = dict(
        max_new_tokens=a.max_new_tokens, **sampling_options(a), stop=a.stop, chat=False if a.raw else None,
        system=a.system, ignore_eos=a.ignore_eos, **_json_schema(a), speculate=not a.no_speculate,
    )
    if a.json:
        g = engine.generate(prompt, **kwargs)
        print(json.dumps(g.to_dict(), ensure_ascii=False))
        if a.stats:
            print_stats(g.stats)
            if engine.stage is not None:
                print_stage_stats(engine.stage.collect_stats())
        return 0
    stats = None
    for chunk in engine.stream(prompt, **kwargs):
        if chunk.text:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
        if chunk.finish_reason:
            stats = chunk.stats
            finish = chunk.finish_reason
    sys.stdout.write("\n")
    sys.stdout.flush()
    if stats is not None:
        print(f"[{finish}] {stats.summary()}", file=sys.stderr)
        if a.stats:
            print_stats(stats)
            if engine.stage is not None:
                print_stage_stats(engine.stage.collect_stats())
        for note in stats.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


# ---- parser -------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="layerrun",
        description="Run language models larger than your memory by streaming layers from disk.",
    )
    p.add_argument("--version", action="version", version=f"layerrun {__version__}")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("convert", help="convert a Hugging Face folder or GGUF file to the layered format")
    c.add_argument("src", help="Hugging Face model folder (safetensors) or a .gguf file")
    c.add_argument("dst", help="destination folder for the layered model")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="storage dtype (auto: keep fp32/bf16; fp16 becomes bf16 because fp16 is very slow on CPUs)")
    c.add_argument("--quantize", default=None, metavar="SCHEME",
                   help="store the decoder layers' weights quantized: int8 (per output channel) or int4 "
                        "(groups of 32, scale and zero); a group size may follow, e.g. int4-g64, int8-g128")
    c.add_argument("--force", action="store_true", help="overwrite an existing or non-empty destination")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=cmd_convert)

    c = sub.add_parser("inspect", help="show architecture, sizes, dtypes and tensor checks of a model")
    c.add_argument("path", help="a Hugging Face folder, a layered folder or a .gguf file")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=cmd_inspect)

    c = sub.add_parser("validate", help="check a layered folder: files, sizes, sha256, shapes")
    c.add_argument("path", help="layered model folder")
    c.add_argument("--no-checksum", action="store_true", help="skip sha256 (faster)")
    c.add_argument("--reference", action="store_true",
                   help="also compare with transformers on the same weights: tokenizer, logits, every layer, greedy tokens")
    c.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare with --reference")
    c.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                   help="dtype for --reference (default: the stored dtype)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=cmd_validate)

    c = sub.add_parser("tokenize", help="show token ids and tokens for a text")
    c.add_argument("model", help="model folder or local model name")
    c.add_argument("text", help="text to tokenize")
    c.add_argument("--chat", action="store_true", help="apply the chat template (as a user message)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.set_defaults(fn=cmd_tokenize)

    c = sub.add_parser("generate", help="generate text: layerrun generate [MODEL] PROMPT")
    c.add_argument("args", nargs="*", metavar="[MODEL] PROMPT",
                   help="model folder or local model name (default: the default model), then the prompt "
                        "(- reads it from stdin)")
    c.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="most tokens to generate")
    add_sampling_flags(c)
    c.add_argument("--json-schema", default=None, metavar="FILE",
                   help="structured output: the answer is JSON valid against this JSON schema (constrained decoding)")
    c.add_argument("--stop", action="append", default=None, help="stop when this text appears (repeatable)")
    c.add_argument("--raw", action="store_true", help="do not apply the chat template")
    c.add_argument("--ignore-eos", action="store_true",
                   help="keep generating past end-of-sequence tokens (for benchmarks: always max-new-tokens)")
    c.add_argument("--system", default=None, help="system message (chat models)")
    add_engine_flags(c)
    c.add_argument("--no-speculate", action="store_true",
                   help="decode one token per pass even with --draft (to compare; the draft is still loaded)")
    add_stage_flags(c)
    c.add_argument("--prompts-file", default=None, metavar="JSONL",
                   help='batch mode: one JSON object per line, {"prompt": ...} with optional sampling fields')
    c.add_argument("--output", default=None, metavar="JSONL", help="batch mode: write results here (default: stdout)")
    c.add_argument("--quiet", action="store_true", help="batch mode: no progress bar")
    c.add_argument("--stats", action="store_true", help="print a table of pipeline figures at the end")
    c.add_argument("--explain", action="store_true", help="print the memory governor's decision and arithmetic")
    c.add_argument("--trace", default=None, metavar="FILE", help="write a Chrome/Perfetto trace JSON of the pipeline")
    c.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, finish_reason, stats")
    c.set_defaults(fn=cmd_generate)

    from layerrun.bench import add_bench_parser
    from layerrun.chat import add_chat_parser
    from layerrun.distributed_cli import add_stage_files_parser
    from layerrun.server import add_serve_parser
    from layerrun.store_cli import add_store_parsers

    add_chat_parser(sub)
    add_store_parsers(sub)
    add_serve_parser(sub)
    add_bench_parser(sub)
    add_stage_files_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if not getattr(a, "fn", None):
        parser.print_help()
        return EXIT_INVALID
    try:
        from layerrun.engine.distributed import launched

        if launched():  # torchrun: this process is one stage of a pipeline
            from layerrun.distributed_cli import run

            return run(a)
        return a.fn(a)
    except LayerRunError as e:
        if a.debug:
            raise
        _err(str(e))
        return EXIT_ERROR
    except KeyboardInterrupt:
        _err("interrupted")
        return 130
    except BrokenPipeError:
        return EXIT_ERROR
    except OSError as e:  # the system refused a file the user named (permissions, a full disk, ...)
        if a.debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        _err(f"{where}{e.strerror or e}")
        return EXIT_ERROR
    except Exception as e:  # a bug, not bad input: still one line unless --debug
        if a.debug:
            raise
        _err(f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
