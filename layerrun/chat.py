"""``layerrun chat [MODEL]``: a conversation in the terminal.

Multi-turn with the model's chat template, answers streamed as they are generated. The history is
kept within the context: when a new turn would not fit (with room for an answer), the oldest turns
are dropped, with a notice. Ctrl-C stops the answer being written (not the program); Ctrl-D or
``/bye`` leaves. Commands: ``/clear``, ``/set NAME VALUE`` (sampling options, ``system``),
``/show``, ``/stats``, ``/help``. While the first token of an answer is on its way (in stream mode
that is a read of every layer, or several), a "reading layers" line shows the progress.

A turn that extends the conversation reuses the KV cache of the turns before it
(:class:`~layerrun.engine.session.ChatSession`), so only the new message is prefilled.
"""

from __future__ import annotations

import sys
import threading
import time

from layerrun.errors import LayerRunError

ANSWER_ROOM = 256  # tokens kept free for an answer when fitting the history into the context
SPIN = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
SETTABLE = {  # /set NAME VALUE: name -> (parser, the Engine.stream keyword)
    "temperature": (float, "temperature"), "top_p": (float, "top_p"), "top_k": (int, "top_k"),
    "min_p": (float, "min_p"), "repetition_penalty": (float, "repetition_penalty"),
    "frequency_penalty": (float, "frequency_penalty"), "presence_penalty": (float, "presence_penalty"),
    "seed": (int, "seed"), "max_new_tokens": (int, "max_new_tokens"),
}
HELP = """commands:
  /set NAME VALUE   temperature, top_p, top_k, min_p, repetition_penalty, frequency_penalty,
                    presence_penalty, seed, max_new_tokens; /set system TEXT replaces the system message
  /show             the current settings
  /stats            figures of the last answer (tokens/s, mode, memory, bytes read)
  /clear            forget the conversation (the system message stays)
  /bye              leave (or Ctrl-D); Ctrl-C stops an answer
  \"\"\"               begin / end a message of several lines"""


class Progress:
    """A line on stderr while the first token is awaited: elapsed time, and layers read in stream mode."""

    def __init__(self, engine, out=sys.stderr, delay: float = 0.25):
        self.engine, self.out, self.delay = engine, out, delay
        self.streamed = len(engine.plan.streamed)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._shown = False
        self._thread: threading.Thread | None = None

    def __enter__(self):
        self._t0 = time.perf_counter()
        self._read0 = self.engine.layers_read
        self._thread = threading.Thread(target=self._run, name="layerrun-chat-progress", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        i = 0
        while not self._done.wait(self.delay if i == 0 else 0.1):
            with self._lock:
                if self._done.is_set():
                    return
                dt = time.perf_counter() - self._t0
                what = "thinking"
                if self.streamed:
                    n = self.engine.layers_read - self._read0
                    what = f"reading layers {n % self.streamed or (self.streamed if n else 0)}/{self.streamed}"
                    if n >= self.streamed:
                        what += f" (pass {n // self.streamed + (1 if n % self.streamed else 0)})"
                self.out.write(f"\r\x1b[K{SPIN[i % len(SPIN)]} {what}… {dt:.1f} s")
                self.out.flush()
                self._shown = True
            i += 1

    def done(self) -> None:
        """The first token is here: clear the line (the answer is written after it)."""
        if self._done.is_set():
            return
        with self._lock:
            self._done.set()
            if self._shown:
                self.out.write("\r\x1b[K")
                self.out.flush()

    def __exit__(self, *exc):
        self.done()
        if self._thread is not None:
            self._thread.join()


class Chat:
    def __init__(self, engine, system: str | None, options: dict, out=sys.stdout, err=sys.stderr):
        from layerrun.engine.session import ChatSession

        self.engine, self.out, self.err = engine, out, err
        self.system = system
        self.options = options
        self.history: list[dict] = []
        self.last_stats = None
        self.session = ChatSession(engine)
        self.context = min(engine.context, engine.args.max_position_embeddings)

    # ---- input ----------------------------------------------------------------------------
    def read(self) -> str | None:
        """One message (None at end of input). Lines between \"\"\" and \"\"\" are one message."""
        line = input(">>> ")
        if line.strip().startswith('"""'):
            parts = [line.strip()[3:]]
            while True:
                more = input("... ")
                if more.rstrip().endswith('"""'):
                    parts.append(more.rstrip()[:-3])
                    break
                parts.append(more)
            return "\n".join(parts).strip("\n")
        return line

    def run(self) -> int:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        name = self.engine.path.name
        self.say(f"chatting with {name} ({self.engine.mode} mode, context {self.context} tokens). "
                 "/help for commands, Ctrl-D or /bye to leave.")
        while True:
            try:
                text = self.read()
            except EOFError:
                self.out.write("\n")
                return 0
            except KeyboardInterrupt:
                self.out.write("\n")
                self.say("(use Ctrl-D or /bye to leave)")
                continue
            if text is None or not text.strip():
                continue
            try:
                if text.strip().startswith("/"):
                    if self.command(text.strip()) == "bye":
                        return 0
                    continue
                self.turn(text)
            except KeyboardInterrupt:  # before the answer began (or a command): nothing is kept
                self.out.write("\n")
                self.say("(stopped)")

    def say(self, msg: str) -> None:
        self.err.write(msg + "\n")
        self.err.flush()

    # ---- commands ---------------------------------------------------------------------------
    def command(self, line: str) -> str | None:
        cmd, _, rest = line.partition(" ")
        rest = rest.strip()
        if cmd in ("/bye", "/exit", "/quit"):
            return "bye"
        if cmd == "/clear":
            self.history.clear()
            self.session.reset()
            self.say("cleared the conversation")
        elif cmd in ("/help", "/?"):
            self.say(HELP)
        elif cmd == "/show":
            shown = {k: v for k, v in self.options.items() if v is not None}
            self.say(f"system: {self.system!r}\n" + "\n".join(f"{k}: {v}" for k, v in sorted(shown.items())))
        elif cmd == "/stats":
            if self.last_stats is None:
                self.say("no answer yet")
            else:
                from layerrun.options import print_stats

                self.say(self.last_stats.summary())
                last = self.session.last
                if last is not None:
                    self.say(f"prompt: {len(last.prompt_ids)} tokens, {last.reused_prompt_tokens} of them from "
                             "the cache of the turns before (not computed again)")
                print_stats(self.last_stats, file=self.err)
        elif cmd == "/set":
            self.set(rest)
        else:
            self.say(f"unknown command {cmd}; /help lists them")
        return None

    def set(self, rest: str) -> None:
        name, _, value = rest.partition(" ")
        value = value.strip()
        if name == "system":
            self.system = value or None
            self.say("set the system message" if value else "removed the system message")
            return
        if name not in SETTABLE or not value:
            self.say(f"usage: /set NAME VALUE with NAME one of: system, {', '.join(SETTABLE)}")
            return
        parse, key = SETTABLE[name]
        try:
            v = parse(value)
        except ValueError:
            self.say(f"{name}: {value!r} is not a{'n integer' if parse is int else ' number'}")
            return
        trial = {**self.options, key: v}
        try:
            check_options(trial)  # the engine's own checks, with their messages
        except LayerRunError as e:
            self.say(f"not set: {e}")
            return
        self.options = trial
        self.say(f"set {name} to {v}")

    # ---- a turn -------------------------------------------------------------------------------
    def messages(self, user: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history + [{"role": "user", "content": user}]

    def fit(self, user: str) -> list[dict] | None:
        """The messages for this turn, the oldest turns dropped until they fit with room for an answer."""
        room = min(ANSWER_ROOM, self.options.get("max_new_tokens") or ANSWER_ROOM, self.context // 4)
        dropped = 0
        while True:
            msgs = self.messages(user)
            n = len(self.engine.encode_prompt(msgs))
            if n + room <= self.context:
                break
            if not self.history:
                self.say(f"this message is too long: {n} tokens, with room for an answer the context holds "
                         f"{self.context - room} (layerrun chat --context N for a longer one)")
                return None
            # the oldest exchange: a user message and what follows it up to the next user message
            k = 1
            while k < len(self.history) and self.history[k]["role"] != "user":
                k += 1
            del self.history[:k]
            dropped += 1
        if dropped:
            self.say(f"(the context is full: dropped the oldest {dropped} turn{'s' if dropped > 1 else ''})")
        return msgs

    def turn(self, user: str) -> None:
        msgs = self.fit(user)
        if msgs is None:
            return
        answer: list[str] = []
        opts = {k: v for k, v in self.options.items() if v is not None}
        stopped = False
        try:
            with Progress(self.engine, self.err) as progress:
                for chunk in self.session.stream(msgs, **opts):
                    if chunk.token_id is not None or chunk.text:
                        progress.done()
                    if chunk.text:
                        answer.append(chunk.text)
                        self.out.write(chunk.text)
                        self.out.flush()
                    if chunk.finish_reason:
                        self.last_stats = chunk.stats
        except KeyboardInterrupt:
            stopped = True
        except LayerRunError as e:
            self.out.write("\n")
            self.say(f"error: {e}")
            return
        self.out.write("\n")
        self.out.flush()
        if stopped:
            self.say("(stopped)")
        # the answer, as far as it went, is part of the conversation
        self.history += [{"role": "user", "content": user}, {"role": "assistant", "content": "".join(answer)}]


def check_options(opts: dict) -> None:
    """Raise LayerRunError (the sampler's own message) if the settings are out of range."""
    from layerrun.engine.sampling import SamplingParams

    fields = ("temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty", "frequency_penalty",
              "presence_penalty")
    SamplingParams(**{k: opts[k] for k in fields if opts.get(k) is not None}).check()
    if opts.get("max_new_tokens") is not None and opts["max_new_tokens"] < 1:
        raise LayerRunError(f"max_new_tokens must be >= 1, got {opts['max_new_tokens']}")


def cmd_chat(a) -> int:
    import layerrun
    from layerrun.options import engine_options, sampling_options

    model = a.model
    if model is None:
        from layerrun.formats.store import DEFAULT_MODEL, ensure_default

        ensure_default(log=lambda s: print(s, file=sys.stderr))
        model = DEFAULT_MODEL
    options = engine_options(a)
    options["batch_size"] = 1  # one conversation
    with layerrun.load(model, **options) as engine:
        if not engine.has_chat_template:
            raise LayerRunError(f"{engine.path}: the model has no chat template, so it cannot chat; "
                                "use layerrun generate --raw for plain text completion")
        opts = {**sampling_options(a), "max_new_tokens": a.max_new_tokens, "ignore_eos": a.ignore_eos or None}
        check_options(opts)
        return Chat(engine, a.system, opts).run()


def add_chat_parser(subparsers) -> None:
    """Register ``layerrun chat`` on the CLI's subparsers."""
    from layerrun.options import add_engine_flags, add_sampling_flags

    c = subparsers.add_parser("chat", help="chat with a model in the terminal")
    c.add_argument("model", nargs="?", default=None, metavar="MODEL",
                   help="model folder or local model name (default: the default model)")
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens per answer (default: up to the end of the context)")
    c.add_argument("--ignore-eos", action="store_true", help="keep generating past end-of-sequence (for testing)")
    add_sampling_flags(c)
    add_engine_flags(c)
    c.set_defaults(fn=cmd_chat)
