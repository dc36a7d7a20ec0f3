"""``generate`` / ``serve`` under ``torchrun``: one rank of a pipeline of stages; and ``layerrun stage-files``.

Every rank runs the same command line. Rank 0 runs the command itself (its engine holds the
tokenizer, embeddings, head, sampling, the server); the other ranks load only their layers and
serve steps until rank 0 stops them. See :mod:`layerrun.engine.distributed`.
"""

from __future__ import annotations

import sys

from layerrun.errors import LayerRunError

SAME_INTERRUPT_S = 5.0  # seconds: a second SIGINT this soon after the first is the same Ctrl-C (see _one_interrupt)


def run(a) -> int:
    """Run the command ``a`` (generate or serve) as one rank of several."""
    from layerrun.engine.distributed import connect
    from layerrun.options import engine_options

    if a.command not in ("generate", "serve"):
        raise LayerRunError(f"under torchrun only `generate` and `serve` run as a pipeline of stages; run "
                            f"`layerrun {a.command}` without torchrun")
    model = _model_arg(a)
    _one_interrupt()
    stage = connect(model, stages=a.stages, timeout=a.stage_timeout, max_memory=a.max_memory, throttle=a.throttle)
    stage.deep_ring = a.prefetch is None
    a.stage = stage
    try:
        if stage.rank == 0:
            return a.fn(a)
        from layerrun.engine.engine import Engine

        options = engine_options(a)
        options["draft"] = None  # speculation (drafting, verifying) happens on rank 0; this rank only runs layers
        if a.command == "generate" and not a.prompts_file:
            options["batch_size"] = 1  # as rank 0 plans it
        with Engine(model, **options) as engine:
            return stage.serve(engine)
    except BaseException as e:
        stage.abort(str(e) or type(e).__name__)  # ranks still waiting for this one to load learn why it did not
        raise
    finally:
        stage.close()


def _one_interrupt() -> None:
    """Ctrl-C in the terminal reaches each rank twice: from the terminal (the whole process group) and
    again from torchrun's agent, which forwards it to its workers. The second would land in the middle of
    the first's clean-up (leaving the group, telling the other ranks) and end the rank with a traceback;
    a SIGINT within :data:`SAME_INTERRUPT_S` of the one before counts as the same one."""
    import signal
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        return
    last = [-SAME_INTERRUPT_S]

    def interrupt(signum, frame):
        now = time.monotonic()
        if now - last[0] < SAME_INTERRUPT_S:
            return
        last[0] = now
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)


def _model_arg(a) -> str:
    """The model the command names (every rank must load the same one)."""
    if a.command == "generate":
        if a.prompts_file:
            model = a.args[0] if a.args else None
        else:
            model = a.args[0] if len(a.args) >= 2 else None
    else:
        model = a.model
    if model is None:
        from layerrun.formats.store import DEFAULT_MODEL, ensure_default

        ensure_default(log=lambda s: print(s, file=sys.stderr))
        return DEFAULT_MODEL
    if str(model).lower().endswith(".gguf"):
        raise LayerRunError(f"{model}: under torchrun every rank loads a layered folder; convert the GGUF first "
                            f"(layerrun convert {model} FOLDER) and copy FOLDER (or a stage's files) to each host")
    return model


def cmd_stage_files(a) -> int:
    from layerrun.engine.distributed import parse_stages, stage_files
    from layerrun.engine.engine import resolve_model_path
    from layerrun.formats.manifest import Manifest

    folder = resolve_model_path(a.model)
    m = Manifest.read(folder)
    ranges = parse_stages(a.stages, m.num_layers, len(str(a.stages).split(",")))
    if not 0 <= a.rank < len(ranges):
        raise LayerRunError(f"--rank {a.rank}: --stages {a.stages} has ranks 0-{len(ranges) - 1}")
    names = stage_files(m, ranges[a.rank], a.rank == 0)
    if a.rank == 0:  # the tokenizer and chat template live with rank 0
        names += sorted(p.name for p in folder.iterdir() if p.is_file() and p.name.startswith(("tokenizer", "special_tokens",
                                                                                             "chat_template", "generation_config")))
    for n in names:
        print(n)
    return 0


def add_stage_files_parser(subparsers) -> None:
    c = subparsers.add_parser("stage-files", help="list the files one rank needs under torchrun --stages (for rsync)")
    c.add_argument("model", help="model folder or local model name")
    c.add_argument("--stages", required=True, help="the layer ranges, one per rank, e.g. 0-9,10-29")
    c.add_argument("--rank", type=int, required=True, help="which rank's files to list")
    c.set_defaults(fn=cmd_stage_files)
