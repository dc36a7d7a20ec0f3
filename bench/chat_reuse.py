"""Prefill time of a chat's later turns with the KV cache of the turns before reused
(ChatSession, what `layerrun chat` does) against prefilling the whole conversation again.

Both run the same conversation (greedy answers, so identical), turn by turn, alternated within
each repeat. Run: python bench/chat_reuse.py [MODEL] [--turns 6] [--repeat 3] [--mode full]
"""

from __future__ import annotations

import argparse
import statistics

import layerrun
from layerrun.engine.session import ChatSession

QUESTIONS = ["What is the capital of France?", "And of Italy?", "Which of the two is bigger?",
             "Name a famous dish from each.", "How do you cook the first one?", "Thanks. Summarise our chat."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default="smollm2-135m-instruct")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--mode", default="full")
    ap.add_argument("--answer-tokens", type=int, default=40)
    a = ap.parse_args()
    eng = layerrun.load(a.model, mode=a.mode, batch_size=1)
    rows: dict[int, list[tuple[float, float, int, int]]] = {}
    for _ in range(a.repeat):
        session = ChatSession(eng)
        msgs: list[dict] = []
        for t in range(a.turns):
            msgs = msgs + [{"role": "user", "content": QUESTIONS[t % len(QUESTIONS)]}]
            chunks = list(session.stream(msgs, max_new_tokens=a.answer_tokens))
            reused = chunks[-1].stats.prefill_s
            fresh = eng.generate(msgs, max_new_tokens=1).stats.prefill_s  # the whole conversation again
            text = "".join(c.text for c in chunks)
            rows.setdefault(t, []).append((reused, fresh, session.last.reused_prompt_tokens, len(session.last.prompt_ids)))
            msgs = msgs + [{"role": "assistant", "content": text}]
    print(f"{a.model} ({a.mode}), prefill seconds per turn, median of {a.repeat} (min-max)")
    print("turn  prompt  reused  with reuse            from scratch          ratio")
    for t, r in rows.items():
        ru, fr = [x[0] for x in r], [x[1] for x in r]
        ratio = statistics.median(f / max(u, 1e-9) for u, f in zip(ru, fr))
        print(f"{t + 1:4d}  {r[0][3]:6d}  {r[0][2]:6d}  {statistics.median(ru):.3f} ({min(ru):.3f}-{max(ru):.3f})  "
              f"{statistics.median(fr):.3f} ({min(fr):.3f}-{max(fr):.3f})  {ratio:.2f}x")
    eng.close()


if __name__ == "__main__":
    main()
