"""`diff --report out.html` and `--plot out.png`: one self-contained page (nothing fetched)
with the diagnosis, the heat map marking the changed tensor, the divergence curve and the
findings, rendered by headless Chromium (Debian's package, which .ci/run installs); every
string from a file escaped; --plot without logits is an error that leaves no file."""
from __future__ import annotations

import re
import shutil
import subprocess

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

import cli
from diff import report as R
from diff.html import render_html
from oracles import copy_dir, make_hf_model

CHANGED = "model.layers.1.input_layernorm.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("html")
    a = make_hf_model(d / "a", "llama", hidden=32, layers=3, heads=4, kv_heads=2, ffn=64, vocab=448)
    b = copy_dir(a, d / "b")
    sd = load_file(str(b / "model.safetensors"))
    sd[CHANGED] = np.ones_like(sd[CHANGED])
    save_file(sd, str(b / "model.safetensors"), metadata={"format": "pt"})
    return a, b


def chromium(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "headless Chromium is missing: apt-get install chromium (.ci/run does)"
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", *args],
                          capture_output=True, text=True, timeout=120)


def test_report_and_plot(pair, tmp_path):
    a, b = pair
    page, png = tmp_path / "out.html", tmp_path / "curve.png"
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b), "--report", str(page),
                                      "--plot", str(png)])
    assert r.exit_code == 1, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text(encoding="utf-8")
    # self-contained: no fetched script, style, image or font
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<script" not in text
    dom = chromium("--dump-dom", page.as_uri()).stdout
    assert 'id="diagnosis"' in dom and "DIAGNOSIS: VALUES CHANGED" in dom
    for element in ("diagnosis", "files", "heatmap", "defect-key", "divergence", "findings"):
        assert f'id="{element}"' in dom, element
    cells = re.findall(r'<rect class="cell defect"[^>]* data-tensor="([^"]+)" data-defect="([^"]+)"', dom)
    assert cells == [(CHANGED, R.VALUES_CHANGED)], cells
    assert len(re.findall(r'<rect class="cell"', dom)) == 3 * 9 + 3 - 1   # every other tensor
    assert re.search(r'<text class="mark"[^>]*>1</text>', dom)            # the defect's number
    key = re.search(r'<ul id="defect-key">(.*?)</ul>', dom).group(1)
    assert R.VALUES_CHANGED in key and CHANGED in key
    assert re.search(r'<img id="divergence"[^>]+src="data:image/png;base64,', dom)
    assert CHANGED in re.search(r'<table id="findings">(.*?)</table>', dom).group(1)
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,1800", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_plot_needs_the_logits(pair, tmp_path):
    a, b = pair
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b), "--no-logits", "--plot",
                                      str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "--plot" in r.output
    assert not list(tmp_path.iterdir())


def test_plot_without_logits_leaves_no_report_either(pair, tmp_path):
    a, b = pair
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b), "--no-logits", "--report",
                                      str(tmp_path / "r.html"), "--plot", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "Traceback" not in r.output
    assert not list(tmp_path.iterdir())


def test_report_without_logits_says_why(pair, tmp_path):
    a, b = pair
    page = tmp_path / "r.html"
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b), "--no-logits", "--report", str(page)])
    assert r.exit_code == 1, r.output
    text = page.read_text(encoding="utf-8")
    assert re.search(r'<p id="divergence">The logits were not compared: [^<]*--no-logits', text)
    assert list(tmp_path.iterdir()) == [page]


@pytest.mark.parametrize("which", ["same", "input"])
def test_outputs_are_checked_before_anything_runs(pair, tmp_path, which):
    a, b = pair
    weights = b / "model.safetensors"
    before = weights.read_bytes()
    out = str(tmp_path / "x.out") if which == "same" else str(weights)
    r = CliRunner().invoke(cli.main, ["diff", str(a), str(b), "--report", out, "--plot",
                                      str(tmp_path / "x.out") if which == "same" else
                                      str(tmp_path / "c.png")])
    assert r.exit_code == 2 and r.output.startswith("error: "), r.output
    assert weights.read_bytes() == before
    assert not list(tmp_path.iterdir())


def test_odd_findings_render():
    """Findings without values (MISSING), non-finite errors, names no kind has, tied copies."""
    s = R.FileSummary("a", "apr", 3, {"F32": 3}, None, "none")
    nan = R.PairStats(rel_l2=float("nan"), identical=False)
    inf = R.PairStats(rel_l2=float("inf"), identical=False)
    tensors = [R.TensorFinding("model.layers.3.mlp.up_proj.weight", "missing", R.MISSING, "only in A"),
               R.TensorFinding("model.layers.0.mlp.up_proj.weight", "non-finite", R.NONFINITE,
                               "nan in B", stats=nan),
               R.TensorFinding("model.norm.weight", "changed", R.VALUES_CHANGED, "x", stats=inf),
               R.TensorFinding("some.custom.tensor", R.IDENTICAL, None, "same"),
               R.TensorFinding("lm_head.weight", R.TIED_COPY, None, "tied")]
    stages = [R.StageDelta("embeddings", None, 0.0, 0.0), R.StageDelta("layer 0", 0, float("nan"), 1.0)]
    rep = R.DiffReport(a=s, b=s, tensors=tensors, config=[], tokenizer=[],
                       logits=R.LogitsReport(ran=True, tolerance=1e-5, stages=stages,
                                             first_divergent="layer 0"),
                       diagnosis=R.Diagnosis(R.MISSING, [tensors[0].name], "m"))
    page = render_html(rep)
    assert page.count('class="cell defect"') == 3 and 'data-tensor="some.custom.tensor"' in page
    assert re.findall(r'layer \d', page)[:2] == ["layer 0", "layer 3"]      # rows in layer order
    assert "fill=\"#c8c8c8\"" in page                                       # no values: grey


def test_strings_from_files_are_escaped():
    evil = "<script>alert(1)</script>"
    f = R.TensorFinding(name=f"model.layers.0.{evil}", relation="changed",
                        defect=R.VALUES_CHANGED, message=evil)
    summary = R.FileSummary(evil, "apr", 1, {"F32": 1}, None, evil)
    rep = R.DiffReport(a=summary, b=summary, tensors=[f], config=[], tokenizer=[],
                       logits=R.LogitsReport(ran=False, note=evil),
                       diagnosis=R.Diagnosis(R.VALUES_CHANGED, [f.name], evil))
    page = render_html(rep)
    assert evil not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script" not in page
    quoted = R.TensorFinding(name='x" onmouseover="alert(1)', relation="changed",
                             defect=R.VALUES_CHANGED, message="m")
    rep.tensors = [quoted]
    rep.config = [R.ConfigFinding("<b>k</b>", 1, 2, message=evil)]
    rep.tokenizer = [R.TokenizerFinding(evil, evil)]
    page = render_html(rep)
    assert 'onmouseover="' not in page and "<b>k</b>" not in page and "<script" not in page
