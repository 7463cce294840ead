"""LESS (alphatoken.less, stage `less`, workflow/rules/less.smk): the selection against a float64 twin written
as plain loops (per-example LoRA gradients by one backward per example, a hand-run AdamW warm-up, the dense
projection matrix built whole, the weighted sum of mean cosines), the exact ceil(rho * N) budget, the stage's
cached and resumable output, and the rules on the DAG (built, not run: the smoke e2e test in
tests/test_pipeline.py runs them). Tiny models built here, nothing downloaded."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from alphatoken.data import ChatExample, read_split, to_json
from alphatoken.less import (
    ADAM_BETAS, ADAM_EPS, PROJECTION_BLOCK, LessConfig, RademacherProjection, add_lora, encode, per_example_gradients,
    rank, select_examples, selection_size,
)
from alphatoken.losses import IGNORE_INDEX
from alphatoken.models import build_tiny_model, byte_tokenizer, save_pretrained
from alphatoken.stages import less as less_stage
from alphatoken.stages.common import ParamsError, Section, params_schema
from alphatoken.stages.train import resolve_run
from alphatoken.train.batches import collate, encode_example, pad_token_id
from conftest import BATCHING_TOL

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def examples(n: int, offset: int = 0) -> list[dict]:
    """Chat rows of different lengths (so batches pad)."""
    return [{"prompt": f"q{i}: add {i} and {i + 1}" + " please" * (i % 3),
             "response": f"the sum is {2 * i + 1}." + " yes" * (i % 4)} for i in range(offset, offset + n)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ---------------------------------------------------------------------------------------------------
# The slow, obviously correct twin (float64, one example at a time)


def twin_mean_loss(model, feature: dict) -> torch.Tensor:
    """Mean cross-entropy of one example's response tokens (labels shifted by one)."""
    ids = torch.tensor([feature["input_ids"]])
    labels = torch.tensor(feature["labels"])
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]  # (T, V)
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE_INDEX)


def twin_gradient(model, params: list, feature: dict) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(twin_mean_loss(model, feature), params)])


def twin_projection_matrix(dim_in: int, k: int, seed: int) -> torch.Tensor:
    """P `[dim_in, k]` whole: block j of PROJECTION_BLOCK rows from randint(0, 2) seeded by SHA-256 of "seed/j"."""
    blocks = []
    for j in range(math.ceil(dim_in / PROJECTION_BLOCK)):
        rows = min(PROJECTION_BLOCK, dim_in - j * PROJECTION_BLOCK)
        block_seed = int.from_bytes(hashlib.sha256(f"{seed}/{j}".encode()).digest()[:4], "little")
        bits = torch.randint(0, 2, (rows, k), generator=torch.Generator().manual_seed(block_seed), dtype=torch.int8)
        blocks.append(bits.double() * 2 - 1)
    return torch.cat(blocks) / math.sqrt(k)


def twin_less(model, tokenizer, train_rows, val_rows, cfg: LessConfig) -> list[float]:
    """LESS scores by plain loops: hand AdamW warm-up (bias-corrected updates, clipping, HF linear schedule),
    per-checkpoint per-example gradients, LESS's preconditioning, projection, normalisation, weighted mean dots."""
    train = [encode_example(tokenizer, r, i, cfg.max_length, False) for i, r in enumerate(train_rows)]
    val = [encode_example(tokenizer, r, i, cfg.max_length, False) for i, r in enumerate(val_rows)]
    model = add_lora(model, cfg)  # the same seeded initialisation as the library's
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    n_pool = math.ceil(cfg.warmup_fraction * len(train))
    pool = sorted(torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()[:n_pool])
    per_step = cfg.micro_batch_size * cfg.grad_accum_steps
    steps_per_epoch = math.ceil(len(pool) / per_step)
    total = steps_per_epoch * cfg.warmup_epochs
    warmup = math.ceil(cfg.warmup_ratio * total)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    t, checkpoints = 0, []
    for epoch in range(cfg.warmup_epochs):
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)).tolist()
        lrs = []
        for s in range(steps_per_epoch):
            step = epoch * steps_per_epoch + s
            lr = cfg.lr * (step / warmup if step < warmup else max(0.0, (total - step) / (total - warmup)))
            chunk = order[s * per_step:(s + 1) * per_step]
            grads = [torch.zeros_like(p) for p in params]
            for i in chunk:
                for g, gi in zip(grads, torch.autograd.grad(twin_mean_loss(model, train[pool[i]]), params)):
                    g += gi / len(chunk)
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            coef = min(1.0, cfg.max_grad_norm / (norm + 1e-6))
            t += 1
            with torch.no_grad():
                for p, g, mi, vi in zip(params, grads, m, v):
                    g = g * coef
                    mi.mul_(ADAM_BETAS[0]).add_((1 - ADAM_BETAS[0]) * g)
                    vi.mul_(ADAM_BETAS[1]).add_((1 - ADAM_BETAS[1]) * g * g)
                    m_hat, v_hat = mi / (1 - ADAM_BETAS[0] ** t), vi / (1 - ADAM_BETAS[1] ** t)
                    p -= lr * m_hat / (v_hat.sqrt() + ADAM_EPS)
            lrs.append(lr)
        checkpoints.append(([p.detach().clone() for p in params], torch.cat([x.reshape(-1) for x in m]),
                            torch.cat([x.reshape(-1) for x in v]), sum(lrs) / len(lrs)))
    dim = sum(p.numel() for p in params)
    P = twin_projection_matrix(dim, cfg.projection_dim, cfg.projection_seed)
    eta_total = sum(c[3] for c in checkpoints)
    scores = [0.0] * len(train)
    for weights, m_flat, v_flat, eta in checkpoints:
        with torch.no_grad():
            for p, w in zip(params, weights):
                p.copy_(w)
        val_reps = []
        for f in val:
            r = twin_gradient(model, params, f) @ P
            val_reps.append(r / r.norm())
        for z, f in enumerate(train):
            g = twin_gradient(model, params, f)
            gamma = (0.9 * m_flat + 0.1 * g) / torch.sqrt(0.999 * v_flat + 0.001 * g * g + 1e-8)
            r = gamma @ P
            r = r / r.norm()
            scores[z] += eta / eta_total * sum(float(r @ q) for q in val_reps) / len(val_reps)
    return scores


TWIN_CFG = LessConfig(ratio=0.5, warmup_fraction=0.5, warmup_epochs=2, lr=2e-2, warmup_ratio=0.1, micro_batch_size=1,
                      grad_accum_steps=2, max_grad_norm=0.05, lora_rank=2, lora_alpha=4.0, lora_dropout=0.0,
                      lora_targets=("q_proj", "v_proj", "o_proj"), projection_dim=24, max_length=128, grad_batch_size=3,
                      projection_batch=4, seed=1, projection_seed=2)


def test_less_scores_match_the_float64_twin(tokenizer):
    """Warm-up, preconditioning, projection, normalisation and the eta-weighted mean: the library's batched
    and blocked computation against plain loops, to 1e-6 in float64; the selection is the twin's top half."""
    model = build_tiny_model("llama", dtype=torch.float64)
    train, val = examples(9), examples(3, offset=50)
    result = select_examples(copy.deepcopy(model), tokenizer, train, val, TWIN_CFG, pad_token_id(tokenizer))
    expected = twin_less(copy.deepcopy(model), tokenizer, train, val, TWIN_CFG)
    assert result.scored == list(range(9))
    assert max(abs(a - b) for a, b in zip(result.scores, expected)) < 1e-6, (result.scores, expected)
    ranked = sorted(range(9), key=lambda i: -expected[i])
    assert expected[ranked[4]] - expected[ranked[5]] > 1e-5  # the values, not rounding, decide the boundary
    assert sorted(result.selected) == sorted(ranked[:5])  # ceil(0.5 * 9)
    assert result.mean_lrs == pytest.approx([0.6 * 2e-2, 0.4 * 2e-2])  # HF linear: lr x (0, 1, .8 | .6, .4, .2)
    assert len(result.warmup) == 5  # ceil(0.5 * 9)
    # the warm-up moved the adapter (the scores are not those of a zero adapter B, whose factor A has no gradient)
    assert max(expected) - min(expected) > 1e-3


def test_per_example_lora_gradients_match_one_backward_per_example(tokenizer):
    """One batched backward (factor inputs x output gradients) = a backward per example, with padding and
    every factor non-zero (B perturbed from peft's zero initialisation)."""
    cfg = dataclass_replace(TWIN_CFG, lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj"))
    model = add_lora(build_tiny_model("llama", dtype=torch.float64), cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    model.eval()
    _, features, _ = encode(tokenizer, examples(4), 128)
    assert len({len(f["input_ids"]) for f in features}) > 1  # the batch pads
    batch = collate(features, pad_token_id(tokenizer))
    fast = per_example_gradients(model, batch)  # (4, D)
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    for b, feature in enumerate(features):
        slow = twin_gradient(model, params, feature)
        assert rel_err(fast[b], slow) < BATCHING_TOL, b
        assert slow.abs().max() > 0


def dataclass_replace(cfg, **changes):
    import dataclasses

    return dataclasses.replace(cfg, **changes)


def test_projection_is_the_seeded_rademacher_matrix_drawn_in_blocks():
    dim, k = 2 * PROJECTION_BLOCK + 37, 8
    x = torch.randn(5, dim, dtype=torch.float64)
    projection = RademacherProjection(dim, k, seed=3)
    P = twin_projection_matrix(dim, k, 3)
    assert torch.allclose(projection.project(x), x @ P, rtol=0, atol=1e-12)
    assert torch.allclose(projection.project(x[:2]), projection.project(x)[:2], rtol=0, atol=1e-12)  # any batch
    assert set(P.abs().unique().tolist()) == {1 / math.sqrt(k)}
    assert abs(float((P > 0).double().mean()) - 0.5) < 0.05
    for other in (4, 3 + 2**32):  # another seed is another matrix, also past 32 bits
        assert not torch.equal(RademacherProjection(dim, k, seed=other).block(0, torch.float64), P[:PROJECTION_BLOCK])
    with pytest.raises(ValueError, match="projection of"):
        projection.project(x[:, :-1])


# ---------------------------------------------------------------------------------------------------
# The budget


@pytest.mark.parametrize("n, ratio, kept", [(10, 0.25, 3), (10, 0.3, 3), (10, 1.0, 10), (7, 0.5, 4), (946, 0.05, 48),
                                            (3, 0.01, 1)])
def test_example_budget_keeps_exactly_ceil_ratio_n(n, ratio, kept):
    assert selection_size(ratio, "examples", [1] * n, list(range(n))) == kept == math.ceil(round(ratio * n, 9))


def test_token_budget_keeps_the_fewest_best_examples_reaching_ceil_ratio_tokens():
    tokens = [5, 1, 1, 10]  # T = 17, ceil(0.5 * 17) = 9
    assert selection_size(0.5, "tokens", tokens, [3, 0, 1, 2]) == 1  # 10 >= 9
    assert selection_size(0.5, "tokens", tokens, [1, 2, 0, 3]) == 4  # 1 + 1 + 5 = 7 < 9
    assert selection_size(1.0, "tokens", tokens, [0, 1, 2, 3]) == 4


def test_ranking_breaks_ties_by_the_earlier_example_and_refuses_nan():
    assert rank(torch.tensor([0.5, 0.9, 0.5, 0.9], dtype=torch.float64)) == [1, 3, 0, 2]
    with pytest.raises(ValueError, match="NaN"):
        rank(torch.tensor([0.1, float("nan")]))


@pytest.mark.parametrize("value", [math.inf, math.nan], ids=["inf", "nan"])
@pytest.mark.parametrize("name", ["ratio", "warmup_fraction", "lr", "warmup_ratio", "max_grad_norm", "lora_alpha",
                                  "lora_dropout"])
def test_every_float_setting_refuses_non_finite_values(name, value):
    import dataclasses

    assert {f.name for f in dataclasses.fields(LessConfig) if "float" in str(f.type)} == {
        "ratio", "warmup_fraction", "lr", "warmup_ratio", "max_grad_norm", "lora_alpha", "lora_dropout"}
    with pytest.raises(ValueError, match=f"LessConfig.{name}: expected .*finite"):
        LessConfig(**{name: value})


def test_config_errors_name_the_field():
    for field, value in [("ratio", 0.0), ("budget", "bytes"), ("warmup_epochs", 0), ("lora_dropout", 1.0),
                         ("lora_targets", ()), ("projection_dim", 0)]:
        with pytest.raises(ValueError, match=field):
            LessConfig(**{field: value})


# ---------------------------------------------------------------------------------------------------
# The stage: its files, cached and resumable


def write_rows(path: Path, rows: list[dict], prefix: str) -> Path:
    lines = [json.dumps(to_json(ChatExample(f"{prefix}{i}", [{"role": "user", "content": r["prompt"]},
                                                               {"role": "assistant", "content": r["response"]}],
                                            "test")), sort_keys=True) for i, r in enumerate(rows)]
    path.write_text("\n".join(lines) + "\n")
    return path


STAGE_OVERLAY = """less:
  ratio: 0.3
  warmup_fraction: 0.4
  warmup_epochs: 2
  lr: 1.0e-2
  grad_accum_steps: 2
  lora_rank: 2
  lora_alpha: 4.0
  projection_dim: 16
  max_length: 128
  grad_batch_size: 3
  projection_batch: 5
resources:
  less: {threads: 1}
"""


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("less")
    torch.manual_seed(0)
    model_dir = save_pretrained(build_tiny_model("llama", dtype=torch.float32), byte_tokenizer(), root / "model")
    train = write_rows(root / "train.jsonl", examples(11), "t")
    val = write_rows(root / "val.jsonl", examples(3, offset=40), "v")
    overlay = root / "less.yaml"
    overlay.write_text(STAGE_OVERLAY)
    return root, model_dir, train, val, overlay


def run_stage(stage_inputs, out: Path, capsys) -> str:
    root, model_dir, train, val, overlay = stage_inputs
    less_stage.main(["--params", str(REPO / "params.yaml"), str(overlay), "--section", "less", "--model", str(model_dir),
                     "--train-data", str(train), "--val-data", str(val), "--out", str(out)])
    return capsys.readouterr().out


def test_stage_writes_the_selection_and_reruns_bit_identically_resuming_from_its_work(stage_inputs, tmp_path, capsys):
    out = tmp_path / "selection"
    first = run_stage(stage_inputs, out, capsys)
    assert "reused" not in first
    selection, manifest_text = (out / "selection.jsonl").read_bytes(), (out / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    selected = read_split(out / "selection.jsonl")  # the training file's format: the train stage reads it
    assert len(selected) == manifest["counts"]["selected"] == math.ceil(0.3 * 11) == 4
    assert manifest["counts"]["warmup"] == math.ceil(0.4 * 11)
    chosen = sorted((s for s in manifest["scores"] if s["selected"]), key=lambda s: s["index"])
    assert [e.id for e in selected] == [s["id"] for s in chosen]  # in the training file's order
    assert sorted(s["rank"] for s in chosen) == [0, 1, 2, 3]
    assert abs(sum(c["weight"] for c in manifest["checkpoints"]) - 1) < 1e-12
    assert manifest["settings"]["projection_dim"] == 16 and manifest["projection"]["dim_out"] == 16
    # a rerun reuses every piece of its work and writes the same bytes
    second = run_stage(stage_inputs, out, capsys)
    assert "reused warmup-1.pt, warmup-2.pt, features-1.pt, features-2.pt" in second
    assert (out / "selection.jsonl").read_bytes() == selection and (out / "manifest.json").read_text() == manifest_text
    # killed after the first warm-up epoch: it resumes from that checkpoint, to the same bytes
    for name in ("warmup-2.pt", "features-1.pt", "features-2.pt"):
        (out / "work" / name).unlink()
    (out / "selection.jsonl").unlink()
    third = run_stage(stage_inputs, out, capsys)
    assert "reused warmup-1.pt)" in third
    assert (out / "selection.jsonl").read_bytes() == selection and (out / "manifest.json").read_text() == manifest_text
    # from nothing, in another directory: the same bytes
    run_stage(stage_inputs, tmp_path / "fresh", capsys)
    assert (tmp_path / "fresh" / "selection.jsonl").read_bytes() == selection


def test_stage_work_of_other_settings_is_not_reused_and_the_ratio_alone_reuses_the_gradients(stage_inputs, tmp_path, capsys):
    root, model_dir, train, val, overlay = stage_inputs
    out = tmp_path / "selection"
    run_stage(stage_inputs, out, capsys)
    other = root / "other.yaml"
    other.write_text(STAGE_OVERLAY.replace("projection_dim: 16", "projection_dim: 12"))
    less_stage.main(["--params", str(REPO / "params.yaml"), str(other), "--section", "less", "--model", str(model_dir),
                     "--train-data", str(train), "--val-data", str(val), "--out", str(out)])
    assert "reused" not in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["projection"]["dim_out"] == 12
    other.write_text(STAGE_OVERLAY.replace("projection_dim: 16", "projection_dim: 12").replace("ratio: 0.3", "ratio: 0.6"))
    less_stage.main(["--params", str(REPO / "params.yaml"), str(other), "--section", "less", "--model", str(model_dir),
                     "--train-data", str(train), "--val-data", str(val), "--out", str(out)])
    assert "features-2.pt" in capsys.readouterr().out  # the budget does not change the gradients
    assert json.loads((out / "manifest.json").read_text())["counts"]["selected"] == math.ceil(0.6 * 11)


def test_stage_refuses_a_bad_value_naming_file_line_and_field(stage_inputs, tmp_path, capsys):
    root, model_dir, train, val, _ = stage_inputs
    bad = root / "bad.yaml"
    bad.write_text("less:\n  ratio: 1.5\n")
    with pytest.raises(SystemExit):
        less_stage.main(["--params", str(REPO / "params.yaml"), str(bad), "--section", "less", "--model", str(model_dir),
                         "--train-data", str(train), "--val-data", str(val), "--out", str(tmp_path / "x")])
    assert re.search(r"bad\.yaml:2: less\.ratio: expected", capsys.readouterr().err)


def test_schema_lists_exactly_the_keys_the_less_stage_and_rules_read():
    import dataclasses

    keys = set(params_schema()["properties"]["less"]["properties"])
    assert keys == {f.name for f in dataclasses.fields(LessConfig)} | set(less_stage.OWN_KEYS) | set(less_stage.RULE_KEYS)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["less"]["enabled"] is False  # off by default: the default DAG does not change
    assert set(params["less"]) == keys


# ---------------------------------------------------------------------------------------------------
# The rules


def test_less_in_a_methods_list_is_refused_naming_its_section(tmp_path):
    section = Section("train", {"methods": ["full", "less"]}, {"": "params.yaml:1", "methods": "params.yaml:2"})
    valuation = Section("valuation", {}, {"": "params.yaml:9"})
    with pytest.raises(ParamsError, match=r"params.yaml:2: train.methods: 'less' is not a run of the train matrix: it is LESS.*`less:`"):
        resolve_run(section, valuation, "less")
    overlay = tmp_path / "o.yaml"
    overlay.write_text("train:\n  methods: [full, less]\n")
    result = subprocess.run([SNAKEMAKE, "-n", "--configfile", str(overlay)], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "train.methods: 'less' is not a run of the train matrix: it is LESS" in result.stdout + result.stderr


def dry_run(*configfiles: str) -> str:
    result = subprocess.run([SNAKEMAKE, "-n", "-p", "--forceall", "--configfile", *configfiles], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_baselines_experiment_puts_less_on_the_smoke_dag_and_the_default_dag_does_not():
    """configs/experiments/baselines.yaml on the smoke model (what the e2e experiment test runs): the selection,
    one less run per seed trained with policy `full` on it, its evaluation, and the report's `less` row."""
    out = dry_run("configs/smoke.yaml", "configs/experiments/baselines.yaml")
    jobs = re.findall(r"^(?:local)?rule (\w+):", out, re.M)
    assert jobs.count("less") == 1 and jobs.count("train_less") == 1 and jobs.count("evaluate_less") == 1
    assert re.search(r"python -m alphatoken\.stages\.train .*--section train .*--method full --rule train_less --seed 0 "
                     r".*--train-data results/less/selection/selection\.jsonl .*--out results/less/train/less-0", out)
    assert "--extra-run less 0 results/eval/less/less-0 results/less/train/less-0" in out
    default = dry_run("configs/smoke.yaml")
    assert not {"less", "train_less", "evaluate_less"} & set(re.findall(r"^(?:local)?rule (\w+):", default, re.M))


def test_dvc_declares_the_less_stages_only_when_generated_with_them(tmp_path):
    from test_pipeline_dag import copy_pipeline

    default = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert not {"less", "train_less", "evaluate_less"} & set(default)
    repo = copy_pipeline(tmp_path / "repo")
    result = subprocess.run([sys.executable, str(REPO / "workflow/scripts/sync_dvc.py"), "--use",
                             "configs/experiments/baselines.yaml", "--root", str(repo)],
                            capture_output=True, text=True, timeout=300, cwd=repo)
    assert result.returncode == 0, result.stdout + result.stderr
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    selection = stages["less"]
    assert selection["outs"] == [{"results/less/selection": {"persist": True}}]  # its work resumes under dvc repro
    assert {"results/model", "results/data/train.jsonl", "results/data/val.jsonl", "alphatoken/less.py"} <= set(selection["deps"])
    assert {p for p in selection["params"]} == {f"less.{k}" for k in yaml.safe_load((REPO / "params.yaml").read_text())["less"]
                                                if k not in ("enabled", "seeds")}
    train = stages["train_less"]
    assert train["matrix"] == {"less_seed": "${less.seeds}"}
    assert "results/less/selection" in train["deps"] and "--seed ${item.less_seed}" in train["cmd"]
    assert stages["evaluate_less"]["matrix"] == {"less_seed": "${less.seeds}"}
    report = stages["report"]
    assert {"results/eval/less", "results/less/train"} <= set(report["deps"])
    assert "--extra-run less 0 results/eval/less/less-0 results/less/train/less-0" in report["cmd"]
