"""Wise-FT (alphatoken.merge, the wiseft stage): the merged weights are the formula key by key (against
a NumPy float64 twin), alpha 0 and 1 are the endpoints bit for bit, tied weights stay tied, integer
buffers are copied, bad input is refused naming the key or the value; the stage writes a checkpoint
that loads as the evaluate stage loads a run's final/ and computes the logits of the hand-merged
weights. Tiny float64 models built here; nothing downloads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from alphatoken.merge import MergeError, alpha_tag, row_name, ties, wise_ft, wise_ft_model
from alphatoken.models import ModelSpec, build_tiny_model, load_model, save_pretrained, weights_fingerprint
from alphatoken.stages import wiseft as wiseft_stage
from alphatoken.stages.common import ParamsError

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
TIED = frozenset({"model.embed_tokens.weight", "lm_head.weight"})


def tiny_tied(seed: int, num_hidden_layers: int = 2):
    """A tiny float64 Llama whose lm_head is its input embedding (tie_word_embeddings, as SmolLM2)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=260, hidden_size=16, intermediate_size=24, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float64).eval()


def merged_by_hand(theta_0: dict, theta_ft: dict, alpha: float) -> dict:
    """The obviously-correct twin: the formula key by key in NumPy float64, stored in theta_ft's dtype;
    non-float entries are theta_ft's."""
    out = {}
    for key, b in theta_ft.items():
        if b.is_floating_point():
            value = (1 - alpha) * theta_0[key].double().numpy() + alpha * b.double().numpy()
            out[key] = torch.from_numpy(np.ascontiguousarray(value)).to(b.dtype)
        else:
            out[key] = b.clone()
    return out


def bytes_of(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# The merge of two state dicts


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3"])
def test_merged_weights_are_the_formula_tensor_by_tensor(arch):
    theta_0 = build_tiny_model(arch, dtype=torch.float64, seed=0).state_dict()
    theta_ft = build_tiny_model(arch, dtype=torch.float64, seed=1).state_dict()
    for alpha in (0.25, 0.5, 0.9):
        merged = wise_ft(theta_0, theta_ft, alpha)
        expected = merged_by_hand(theta_0, theta_ft, alpha)
        assert list(merged) == list(theta_ft)
        for key, value in merged.items():
            assert value.dtype == torch.float64 and value.shape == theta_ft[key].shape, key
            error = (value - expected[key]).abs().max().item()
            assert error <= 1e-12, f"{arch} alpha={alpha} {key}: max |merged - formula| = {error:.3g}"
        between = [k for k in merged if not torch.equal(merged[k], theta_0[k]) and not torch.equal(merged[k], theta_ft[k])]
        assert len(between) > len(merged) // 2  # not vacuous: the weights (not the norms, ones in both) moved


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_alpha_0_is_the_base_and_alpha_1_the_finetuned_model_bit_for_bit(arch):
    theta_0 = build_tiny_model(arch, dtype=torch.float64, seed=0).state_dict()
    theta_ft = build_tiny_model(arch, dtype=torch.float64, seed=1).state_dict()
    for alpha, endpoint in ((0.0, theta_0), (1.0, theta_ft), (0, theta_0), (1, theta_ft)):
        merged = wise_ft(theta_0, theta_ft, alpha)
        for key, value in merged.items():
            assert bytes_of(value) == bytes_of(endpoint[key]), f"alpha={alpha} {key}"
            assert value.data_ptr() != endpoint[key].data_ptr()  # new tensors: the sources are not aliased


def test_tied_weights_are_merged_once_and_stay_tied():
    base, finetuned = tiny_tied(0), tiny_tied(1)
    theta_0, theta_ft = base.state_dict(), finetuned.state_dict()
    assert TIED <= set(theta_ft) and ties(theta_ft) == ties(theta_0) == {TIED}  # the HF state dict has both keys
    merged = wise_ft(theta_0, theta_ft, 0.3)
    assert merged["lm_head.weight"] is merged["model.embed_tokens.weight"]
    assert ties(merged) == {TIED}
    expected = merged_by_hand(theta_0, theta_ft, 0.3)
    for key, value in merged.items():
        assert (value - expected[key]).abs().max().item() <= 1e-12, key
    model = wise_ft_model(base, finetuned, 0.3)
    assert model is finetuned
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    twin = tiny_tied(2)  # another initialisation, loaded with the hand-merged weights
    twin.load_state_dict(expected)
    ids = torch.randint(3, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        error = (model(input_ids=ids).logits - twin(input_ids=ids).logits).abs().max().item()
    assert error <= 1e-12, error


def test_tying_must_agree_between_the_two_state_dicts():
    theta_0 = tiny_tied(0).state_dict()
    untied = {k: v.clone() for k, v in tiny_tied(1).state_dict().items()}  # same values, two tensors
    with pytest.raises(MergeError, match=r"keys \['lm_head.weight', 'model.embed_tokens.weight'\] are one tensor "
                                         r"\(tied\) in theta_0 only"):
        wise_ft(theta_0, untied, 0.5)


def test_integer_buffers_are_copied_and_mixed_dtypes_merge_in_the_wider_one():
    gen = torch.Generator().manual_seed(0)
    w0, w1 = torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.randn(3, 2, generator=gen, dtype=torch.float64)
    theta_0 = {"w": w0, "h": w0.float(), "steps": torch.tensor([3, 5])}
    theta_ft = {"w": w1.float(), "h": w1, "steps": torch.tensor([7, 11])}
    merged = wise_ft(theta_0, theta_ft, 0.4)
    assert merged["steps"].tolist() == [7, 11] and merged["steps"].dtype == torch.int64  # theta_ft's, not interpolated
    assert merged["steps"].data_ptr() != theta_ft["steps"].data_ptr()
    # float64 x float32: computed in float64, stored in theta_ft's dtype
    assert merged["w"].dtype == torch.float32
    assert torch.equal(merged["w"], (0.6 * w0 + 0.4 * w1.float().double()).float())
    assert merged["h"].dtype == torch.float64
    assert torch.equal(merged["h"], 0.6 * w0.float().double() + 0.4 * w1)


def test_bad_state_dicts_and_alphas_are_refused_naming_the_key():
    t = torch.zeros(3, 2, dtype=torch.float64)
    base = {key: torch.zeros(3, 2, dtype=torch.float64) for key in "abc"}  # three tensors (one would be tied)
    with pytest.raises(MergeError, match=r"key 'b' is only in theta_0 \(the base model\) \(2 keys in one only\)"):
        wise_ft(base, {"a": t, "c": t, "d": t}, 0.5)
    with pytest.raises(MergeError, match=r"key 'd' is only in theta_ft"):
        wise_ft(base, {**base, "d": t}, 0.5)
    with pytest.raises(MergeError, match=r"'b': shape \(3, 2\) in theta_0, \(2, 3\) in theta_ft"):
        wise_ft(base, {**base, "b": torch.zeros(2, 3, dtype=torch.float64)}, 0.5)
    with pytest.raises(MergeError, match=r"'c': dtype torch.float64 in theta_0, torch.int64 in theta_ft"):
        wise_ft(base, {**base, "c": torch.zeros(3, 2, dtype=torch.int64)}, 0.5)
    with pytest.raises(MergeError, match=r"'a': the merge has non-finite values"):
        wise_ft(base, {**base, "a": torch.full((3, 2), math.inf, dtype=torch.float64)}, 0.5)
    for alpha in (-0.1, 1.5, math.nan, math.inf, True, "0.5", None):
        with pytest.raises(MergeError, match=r"alpha must be a number in \[0, 1\]"):
            wise_ft(base, base, alpha)


def test_alpha_text_is_str_of_a_float():
    """Paths and row names use str(alpha), which Snakemake's expand and DVC's ${item.alpha} both write:
    one name per merge, so an int (1 for 1.0) and a value str() writes with an exponent are refused."""
    assert [alpha_tag(a) for a in (0.0, 0.25, 0.5, 1.0, 0.0001)] == ["0.0", "0.25", "0.5", "1.0", "0.0001"]
    assert row_name(0.5) == "wiseft_a0.5"
    with pytest.raises(MergeError, match=r"alpha 1 is an integer: write it as a float \(1.0\)"):
        alpha_tag(1)
    with pytest.raises(MergeError, match=r"written '1e-05' by str\(\)"):
        alpha_tag(0.00001)
    for alpha in (True, 1.5, -0.0 - 1e-9):
        with pytest.raises(MergeError, match=r"alpha must be a number in \[0, 1\]"):
            alpha_tag(alpha)


# ---------------------------------------------------------------------------------------------
# The stage


def _params(tmp_path: Path, text: str = "wiseft:\n  of: full\n  alphas: [0.5]\n  dtype: float64\n") -> Path:
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(text)
    return overlay


def _checkpoints(tmp_path: Path, tokenizer, finetuned=None) -> tuple:
    base, finetuned = tiny_tied(0), finetuned if finetuned is not None else tiny_tied(1)
    save_pretrained(base, tokenizer, tmp_path / "model")
    save_pretrained(finetuned, tokenizer, tmp_path / "train" / "full-0" / "final")
    return base, finetuned


def _argv(tmp_path: Path, overlay: Path, alpha: str = "0.5", run: str = "full-0") -> list[str]:
    return ["--params", str(PARAMS), str(overlay), "--section", "wiseft", "--model", str(tmp_path / "model"),
            "--run", str(tmp_path / "train" / run), "--alpha", alpha, "--seed", "0", "--out", str(tmp_path / "wiseft" / f"{alpha}-0")]


def test_stage_writes_a_checkpoint_whose_logits_are_those_of_the_hand_merged_weights(tmp_path, tokenizer):
    from alphatoken.eval.suite import _load  # how the evaluate stage loads a checkpoint

    base, finetuned = _checkpoints(tmp_path, tokenizer)
    expected = merged_by_hand(base.state_dict(), finetuned.state_dict(), 0.5)
    wiseft_stage.main(_argv(tmp_path, _params(tmp_path)))
    out = tmp_path / "wiseft" / "0.5-0"
    evaluated, loaded_tokenizer = _load(out / "final", "float64", "cpu")
    assert loaded_tokenizer.eos_token == "<|im_end|>"
    assert evaluated.lm_head.weight.data_ptr() == evaluated.model.embed_tokens.weight.data_ptr()  # still tied
    # the same checkpoint with the twin's attention kernel (eager takes its softmax in float32, sdpa does not)
    merged, _ = load_model(ModelSpec(source="hub", name_or_path=str(out / "final"), dtype="float64", attn_implementation="eager"))
    state = merged.state_dict()
    for key, value in expected.items():
        assert (state[key] - value).abs().max().item() <= 1e-12, key
    twin = tiny_tied(2)
    twin.load_state_dict(expected)
    ids = torch.randint(3, 260, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        error = (merged.eval()(input_ids=ids).logits - twin(input_ids=ids).logits).abs().max().item()
    assert error <= 1e-10, error
    record = json.loads((out / "merge.json").read_text())
    assert (record["method"], record["row"], record["alpha"], record["of"], record["seed"]) == \
        ("wise_ft", "wiseft_a0.5", 0.5, "full", 0)
    assert record["base"] == {"path": str(tmp_path / "model"), "fingerprint": weights_fingerprint(base)}
    assert record["run"] == {"path": str(tmp_path / "train" / "full-0" / "final"), "fingerprint": weights_fingerprint(finetuned)}
    assert record["fingerprint"] == weights_fingerprint(merged)
    assert not (out / "final.tmp").exists()


def test_stage_refuses_bad_arguments_with_one_line(tmp_path, tokenizer, capsys):
    overlay = _params(tmp_path)

    def error(argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            wiseft_stage.main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert f"{tmp_path / 'model'} holds no Hugging Face checkpoint" in error(_argv(tmp_path, overlay))
    _checkpoints(tmp_path, tokenizer, finetuned=tiny_tied(1, num_hidden_layers=3))
    assert "--alpha '1': write it as 1.0" in error(_argv(tmp_path, overlay, alpha="1"))
    assert "--alpha '2.0': alpha must be a number in [0, 1]" in error(_argv(tmp_path, overlay, alpha="2.0"))
    assert "--alpha 'half'" in error(_argv(tmp_path, overlay, alpha="half"))
    message = error(_argv(tmp_path, overlay, run="random-0"))
    assert "is not the run of wiseft.of='full'" in message and "overlay.yaml:2" in message
    message = error(_argv(tmp_path, overlay))
    assert "key 'model.layers.2.self_attn.q_proj.weight' is only in theta_ft" in message
    bad = _params(tmp_path, "wiseft:\n  alphas: [1.5]\n")
    assert f"{bad}:2: wiseft.alphas[0]: expected a finite number in [0, 1], got 1.5" in error(_argv(tmp_path, bad))


def test_a_merge_name_in_the_methods_is_refused_naming_its_section(tmp_path):
    from alphatoken.stages.train import read_train_config

    for method in ("wiseft", "wiseft_a0.5"):
        with pytest.raises(ParamsError, match=rf"train.methods: '{method}' is not a run of the train matrix: it is Wise-FT"
                                              r".* configured in wiseft.of and wiseft.alphas"):
            read_train_config([PARAMS], "train", "valuation", method, 0, "out")
