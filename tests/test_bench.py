"""Smoke tests of `layerrun bench io|generate` on a tiny model: structure and sanity, not speed."""

from __future__ import annotations

import argparse
import json

import pytest

from layerrun import bench
from layerrun.bench_generate import bench_generate
from layerrun.errors import LayerRunError
from layerrun.formats.manifest import Manifest


def test_bench_io_reads_every_layer_byte_per_depth(tiny_layered):
    path = tiny_layered("llama_gqa")
    man = Manifest.read(path)
    layer_bytes = sum(e.bytes - e.data_start for e in man.layers)
    res = bench.bench_io(path, depths=[0, 1, 2], passes=2, reader="direct", caches=("cold", "warm"), refs=())
    assert res["layers"] == man.num_layers and res["layer_bytes"] == layer_bytes
    assert [r["depth"] for r in res["results"]] == [0, 1, 2]
    for r in res["results"]:
        for cache in ("cold", "warm"):
            m = r[cache]
            assert m["bytes"] == 2 * layer_bytes and m["bytes_per_pass"] == layer_bytes
            assert m["passes"] == 2 and len(m["pass_gb_s"]) == 2
            assert m["gb_s"] > 0 and m["first_pass_gb_s"] > 0 and m["stall_s"] >= 0
        assert r["warm"]["reader"] == "pread"
        assert r["cold"]["reader"] in ("direct", "pread")  # pread where the filesystem refuses O_DIRECT (noted)
    assert res["best_cold"]["depth"] in (0, 1, 2)
    assert res["machine"]["cpus"] >= 1 and res["memcpy_gb_s"] > 0
    json.dumps(res)  # --json must be able to print it


def test_bench_io_rounds_throttle_and_dd(tiny_layered):
    path = tiny_layered("llama_gqa")
    res = bench.bench_io(path, depths=[1], passes=1, reader="pread", throttle="2GB/s", caches=("cold",),
                         refs=("dd",), rounds=2)
    (row,) = res["results"]
    assert row["rounds"] == 2 and len(row["per_round"]) == 2 and len(row["cold"]["rounds_gb_s"]) == 2
    assert row["cold"]["gb_s"] <= 2.0 * 1.05  # the throttle holds
    assert "cold_vs_throttle" in row
    if "dd_direct" in row and "error" not in row["dd_direct"]:
        assert row["dd_direct"]["gb_s"] > 0 and "cold_vs_dd" in row


def test_bench_generate_modes_depths_throttles(tiny_layered):
    path = tiny_layered("llama_gqa")
    res = bench_generate(path, modes=("stream", "full"), depths=[0, 2], throttles="none,500MB/s",
                               max_new_tokens=3, prompt_tokens=5, repeat=2, warmup=0)
    rows = res["results"]
    # stream: 2 throttles x 2 depths; full: once.
    assert [(r["mode"], r["throttle"], r["depth"]) for r in rows] == [
        ("stream", None, 0), ("stream", None, 2), ("stream", 500_000_000, 0), ("stream", 500_000_000, 2),
        ("full", None, None)]
    man = Manifest.read(path)
    layer_bytes = sum(e.bytes - e.data_start for e in man.layers)
    for r in rows:
        assert r["generated_tokens"] == 3 and len(r["runs"]) == 2
        med = r["median"]
        assert med["decode_tokens_per_s"] > 0 and 0 <= med["stall_pct"] <= 100
        if r["mode"] == "stream":
            assert r["bytes_read_per_run"] == 3 * layer_bytes  # prefill + 2 decode steps, every layer each
            assert med["overlap_efficiency"] > 0 and med["overlap_efficiency_in_run"] > 0
        else:
            assert r["bytes_read_per_run"] == 0 and r["streamed_layers"] == 0
    assert res["same_tokens_everywhere"] is True  # greedy: streaming does not change the tokens
    assert {(b["mode"], b["throttle"]) for b in res["best"]} == {("stream", None), ("stream", 500_000_000), ("full", None)}
    json.dumps(res)


def test_bench_parser_and_cli(tiny_layered, capsys):
    p = argparse.ArgumentParser(prog="layerrun")
    sub = p.add_subparsers(dest="command")
    bench.add_bench_parser(sub)
    a = p.parse_args(["bench", "io", "M", "--depths", "0,4", "--reader", "pread", "--throttle", "200MB/s", "--json"])
    assert a.fn is bench.cmd_bench_io and a.depths == "0,4" and a.reader == "pread" and a.json
    a = p.parse_args(["bench", "generate", "M", "--modes", "stream", "--throttle", "none,200MB/s", "--repeat", "5"])
    assert a.fn is bench.cmd_bench_generate and a.repeat == 5
    assert p.parse_args(["bench"]).fn(None) == 2  # bare `bench` prints its help
    assert "generate" in capsys.readouterr().out

    path = str(tiny_layered("llama_gqa"))
    assert bench.main(["io", path, "--depths", "1", "--passes", "1", "--ref", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["bench"] == "io" and out["results"][0]["depth"] == 1
    assert bench.main(["generate", path, "--modes", "stream", "--depths", "1", "--max-new-tokens", "2",
                       "--repeat", "1", "--warmup", "0"]) == 0
    assert "decode tok/s" in capsys.readouterr().out


def test_bench_rejects_bad_options(tiny_layered):
    path = tiny_layered("llama_gqa")
    with pytest.raises(LayerRunError, match="--depths"):
        bench.parse_int_list("1,x")
    with pytest.raises(LayerRunError, match="--reader"):
        bench.bench_io(path, reader="mmap")
    with pytest.raises(LayerRunError, match="--modes"):
        bench_generate(path, modes=("fast",))
    with pytest.raises(LayerRunError, match="--max-new-tokens"):
        bench_generate(path, max_new_tokens=1)
