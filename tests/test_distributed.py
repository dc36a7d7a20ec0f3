"""Layer ranges on several ranks (torchrun, gloo on loopback): same tokens as one process, faults.

The ranks are real processes: ``torchrun`` for the launch tests, plain ``python -m layerrun`` with
torchrun's environment variables where a test kills a rank (torchrun itself would tear the
whole group down when one worker dies, so the survivors' own fault handling would not be seen).
Timeouts only bound hangs; nothing here is timed.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerrun.engine.distributed import RankInfo, parse_stages, place
from layerrun.errors import LayerRunError

HANG = 300  # seconds: only a bound on a hung test
STAGE_TIMEOUT = "60"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent), OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _torchrun(n: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-port",
           str(_free_port()), "-m", "layerrun", *args, "--stage-timeout", STAGE_TIMEOUT]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=HANG, env=_env())


def _rank(r: int, world: int, port: int, *args: str) -> subprocess.Popen:
    """One rank started as torchrun would start it (without torchrun's agent)."""
    env = _env(RANK=r, LOCAL_RANK=r, WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    return subprocess.Popen([sys.executable, "-m", "layerrun", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ---- placement ----------------------------------------------------------------------------------
def _info(rank, free, rate):
    return RankInfo(rank, "h", "x", free, rate, [])


def test_stages_flag_is_checked():
    assert parse_stages("0-1,2-5", 6, 2) == [range(0, 2), range(2, 6)]
    assert parse_stages("0,1-2", 3, 2) == [range(0, 1), range(1, 3)]
    for bad, why in [("0-1,3-5", "contiguous"), ("0-1", "1 stages"), ("0-1,2-4", "covers layers 0-4"), ("a-b,2-5", "not a layer range")]:
        with pytest.raises(LayerRunError, match=why):
            parse_stages(bad, 6, 2)


def test_placement_follows_read_rate_or_memory():
    sizes = [100] * 12
    # Streaming (the model does not fit in memory together): a rank reading 3x faster gets 3x the layers.
    ranges, why = place(sizes, [_info(0, 200, 1e9), _info(1, 200, 3e9)])
    assert [len(r) for r in ranges] == [3, 9] and "read rate" in why
    # Everything fits: split by free memory.
    ranges, why = place(sizes, [_info(0, 10_000, 1e9), _info(1, 10_000, 9e9), _info(2, 20_000, 1e9)])
    assert [len(r) for r in ranges] == [3, 3, 6] and "free memory" in why
    assert ranges[0].start == 0 and ranges[-1].stop == 12
    # Rank 0 also holds the embeddings and head: less room for its layers.
    ranges, _ = place(sizes, [_info(0, 2000, 1e9), _info(1, 1400, 1e9)], ends=600)
    assert [len(r) for r in ranges] == [6, 6]
    # Every rank gets at least one layer, however lopsided.
    ranges, _ = place([100] * 3, [_info(0, 1, 1e12), _info(1, 1, 1), _info(2, 1, 1)])
    assert [len(r) for r in ranges] == [1, 1, 1]
    with pytest.raises(LayerRunError, match="at most 3"):
        place([100] * 3, [_info(r, 1, 1) for r in range(4)])


# ---- same tokens as one process -------------------------------------------------------------------
def test_generate_two_ranks_matches_one_process(tiny_layered):
    import layerrun

    model = tiny_layered("llama_gqa")
    with layerrun.load(model, dtype="float32") as eng:
        want = eng.generate("hello world", max_new_tokens=12, chat=False, ignore_eos=True).token_ids
    p = _torchrun(2, "generate", str(model), "hello world", "--max-new-tokens", "12", "--raw", "--ignore-eos",
                  "--json", "--compute-dtype", "float32", "--explain", "--stats")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads(p.stdout)["token_ids"] == want
    assert "stage 1 (rank 1" in p.stderr and "per stage" in p.stderr  # --explain's plan, --stats' table


def test_batch_three_ranks_moe_matches_one_process(tiny_layered, tmp_path):
    """Rows join and leave (batch 2, four prompts of different lengths) across three stages of a streamed MoE."""
    import layerrun

    model = tiny_layered("mixtral")
    prompts = [{"prompt": "hello world", "max_new_tokens": 9}, {"prompt": "a longer prompt about cats", "max_new_tokens": 3},
               {"prompt": "x", "max_new_tokens": 12}, {"prompt": "the quick brown fox", "max_new_tokens": 6}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    with layerrun.load(model, dtype="float32", mode="stream") as eng:
        want = [g.token_ids for g in eng.generate_batch(prompts, batch_size=2, chat=False, ignore_eos=True)]
    p = _torchrun(3, "generate", str(model), "--prompts-file", str(f), "--batch-size", "2", "--raw", "--ignore-eos",
                  "--quiet", "--compute-dtype", "float32", "--mode", "stream")
    assert p.returncode == 0, p.stderr[-3000:]
    got = [json.loads(line)["token_ids"] for line in p.stdout.splitlines()]
    assert got == want


def test_batch_in_micro_batches_matches_one_process(tiny_layered, tmp_path):
    """Every stage resident: the live rows go through the stages in groups (micro-batches), each stage
    writing its group's rows of its KV cache; rows still join and leave between steps."""
    import layerrun

    model = tiny_layered("llama_gqa")
    prompts = [{"prompt": "hello world", "max_new_tokens": 10}, {"prompt": "a much longer prompt about cats", "max_new_tokens": 4},
               {"prompt": "x", "max_new_tokens": 14}, {"prompt": "the quick brown fox", "max_new_tokens": 7},
               {"prompt": "one more", "max_new_tokens": 9}]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    with layerrun.load(model, dtype="float32", mode="full") as eng:
        want = [g.token_ids for g in eng.generate_batch(prompts, batch_size=3, chat=False, ignore_eos=True)]
    p = _torchrun(2, "generate", str(model), "--prompts-file", str(f), "--batch-size", "3", "--raw", "--ignore-eos",
                  "--quiet", "--compute-dtype", "float32", "--mode", "full")
    assert p.returncode == 0, p.stderr[-3000:]
    assert [json.loads(line)["token_ids"] for line in p.stdout.splitlines()] == want


def test_mismatched_models_are_refused(tiny_layered):
    port = _free_port()
    procs = [_rank(0, 2, port, "generate", str(tiny_layered("llama_gqa")), "hi", "--stage-timeout", STAGE_TIMEOUT),
             _rank(1, 2, port, "generate", str(tiny_layered("mixtral")), "hi", "--stage-timeout", STAGE_TIMEOUT)]
    for p in procs:
        _, err = p.communicate(timeout=HANG)
        assert p.returncode == 1
        assert "the model differs between ranks: rank 1" in err, err[-2000:]


def test_draft_is_refused_under_torchrun_before_connecting(tiny_layered):
    """Speculative decoding does not cross stages yet: refused with one line at start (no rank 1 exists
    here, so a refusal after connecting would wait for it)."""
    p = _rank(0, 2, _free_port(), "generate", str(tiny_layered("llama_gqa")), "hi", "--draft", "ngram",
              "--stage-timeout", STAGE_TIMEOUT)
    _, err = p.communicate(timeout=HANG)
    assert p.returncode == 1
    assert "--draft: speculative decoding does not run across torchrun stages" in err, err[-2000:]
    assert len(err.strip().splitlines()) == 1, err


# ---- the server, and a rank that dies -----------------------------------------------------------------
def test_server_three_ranks_then_a_rank_dies(tiny_layered):
    openai = pytest.importorskip("openai")
    import httpx

    import layerrun

    model = tiny_layered("llama_gqa")
    with layerrun.load(model, dtype="float32") as eng:
        want = eng.generate("hello world", max_new_tokens=8, chat=False, ignore_eos=True).text
    port, http = _free_port(), _free_port()
    args = ["serve", str(model), "--port", str(http), "--served-model-name", "tiny", "--compute-dtype", "float32",
            "--stage-timeout", STAGE_TIMEOUT, "--log-level", "warning"]
    procs = [_rank(r, 3, port, *args) for r in range(3)]
    base = f"http://127.0.0.1:{http}"
    try:
        deadline = time.monotonic() + HANG
        while True:
            assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
            try:
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert httpx.get(f"{base}/health").json()["stages"] == 3
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        r = client.completions.create(model="tiny", prompt="hello world", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.choices[0].text == want
        while 'layerrun_stage_steps_total{stage="2",layers="2-2"} 0.0' in (m := httpx.get(f"{base}/metrics").text) \
                or 'stage="2"' not in m:  # stage figures arrive with rank 0's pings
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert "layerrun_stages_up 1" in m

        procs[2].send_signal(signal.SIGKILL)  # stage 2 dies
        _, err1 = procs[1].communicate(timeout=HANG)  # its neighbour ends, naming it
        assert procs[1].returncode == 1
        assert "lost stage 2 (rank 2" in err1, err1[-2000:]
        while True:  # rank 0 notices at its next ping and keeps serving: 503 naming the stage
            h = httpx.get(f"{base}/health")
            if h.status_code == 503:
                break
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert "stage 2 (rank 2, layers 2-2) is gone" in h.json()["error"]["message"]
        with pytest.raises(openai.APIStatusError) as e:
            client.with_options(max_retries=0).completions.create(model="tiny", prompt="hello", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            try:
                p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


def test_a_rank_needs_only_its_stage_files(tiny_layered, tmp_path, capsys):
    """Rank 1 runs from a folder holding only what `layerrun stage-files` lists for it; the tokens are the same."""
    import shutil

    import layerrun
    from layerrun.cli import main

    model = tiny_layered("llama_gqa")
    assert main(["stage-files", str(model), "--stages", "0-0,1-2", "--rank", "1"]) == 0
    names = capsys.readouterr().out.split()
    assert names == ["config.json", "layerrun.json", "layer_001.safetensors", "layer_002.safetensors"]
    part = tmp_path / "rank1"
    part.mkdir()
    for n in names:
        shutil.copy(model / n, part / n)
    with layerrun.load(model, dtype="float32") as eng:
        want = eng.generate("hello world", max_new_tokens=8, chat=False, ignore_eos=True).token_ids
    port = _free_port()
    common = ["hello world", "--max-new-tokens", "8", "--raw", "--ignore-eos", "--json", "--compute-dtype", "float32",
              "--stages", "0-0,1-2", "--stage-timeout", STAGE_TIMEOUT]
    procs = [_rank(0, 2, port, "generate", str(model), *common), _rank(1, 2, port, "generate", str(part), *common)]
    outs = [p.communicate(timeout=HANG) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert json.loads(outs[0][0])["token_ids"] == want
    # A rank whose folder lacks a layer of its range: every rank stops, naming it.
    (part / "layer_001.safetensors").unlink()
    port = _free_port()
    procs = [_rank(0, 2, port, "generate", str(model), *common), _rank(1, 2, port, "generate", str(part), *common)]
    for p in procs:
        _, err = p.communicate(timeout=HANG)
        assert p.returncode == 1
        assert f"rank 1 on {socket.gethostname()}: {part} lacks the files of its layers 1 (stage 1 is layers 1-2)" in err, err[-2000:]
