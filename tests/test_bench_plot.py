"""`layerrun bench io|generate --plot FILE.png`: the pictures are drawn from the results, on a tiny model."""

from __future__ import annotations

import pytest

from layerrun.cli import main
from layerrun.errors import LayerRunError

plt = pytest.importorskip("matplotlib.pyplot")


def read_png(path):
    img = plt.imread(str(path))  # (H, W, 4) floats
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 600
    return img


def colored_pixels(img, rgb, tol=0.08) -> int:
    d = abs(img[..., 0] - rgb[0]) + abs(img[..., 1] - rgb[1]) + abs(img[..., 2] - rgb[2])
    return int((d < tol).sum())


def test_bench_io_plot(tiny_layered, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERRUN_HOME", str(tmp_path / "home"))
    out = tmp_path / "io.png"
    assert main(["bench", "io", str(tiny_layered("llama_gqa")), "--depths", "0,1,2", "--passes", "1", "--ref", "dd",
                 "--plot", str(out), "--quiet"]) == 0
    img = read_png(out)
    assert colored_pixels(img, (0x1F / 255, 0x77 / 255, 0xB4 / 255)) > 200  # the cold curve and markers
    assert colored_pixels(img, (0x2C / 255, 0xA0 / 255, 0x2C / 255)) > 200  # the warm curve


def test_bench_generate_plot(tiny_layered, tmp_path):
    out = tmp_path / "gen.png"
    assert main(["bench", "generate", str(tiny_layered("llama_gqa")), "--modes", "stream,full", "--depths", "0,2",
                 "--throttle", "none,50MB/s", "--max-new-tokens", "3", "--repeat", "1", "--warmup", "0",
                 "--plot", str(out), "--quiet"]) == 0
    img = read_png(out)
    assert img.shape[1] > 1.8 * img.shape[0]  # three panels side by side
    assert colored_pixels(img, (0x1F / 255, 0x77 / 255, 0xB4 / 255)) > 100  # first series (matplotlib's C0)
    assert colored_pixels(img, (0xFF / 255, 0x7F / 255, 0x0E / 255)) > 100  # second series (C1)


def test_plot_file_is_checked_before_the_benchmark_runs(tiny_layered, tmp_path, capsys):
    assert main(["bench", "io", str(tiny_layered("llama_gqa")), "--plot", str(tmp_path / "x.txt")]) == 1
    assert "give a .png, .svg or .pdf file name" in capsys.readouterr().err
    with pytest.raises(LayerRunError, match="does not exist"):
        from layerrun.bench_plot import check

        check(tmp_path / "missing" / "x.png")
