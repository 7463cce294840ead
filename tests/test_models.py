import torch

from alphatoken.models import ModelSpec, build_tiny_model, byte_tokenizer, load_model, save_pretrained, weights_fingerprint


def test_tiny_model_architectures_have_gqa_and_expected_layers(tiny_model):
    cfg = tiny_model.config
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    names = {n for n, _ in tiny_model.named_parameters()}
    assert "model.layers.3.self_attn.v_proj.weight" in names
    if cfg.model_type == "qwen2":
        assert "model.layers.0.self_attn.v_proj.bias" in names
    if cfg.model_type == "gemma3_text":
        assert set(cfg.layer_types) == {"sliding_attention", "full_attention"}
    assert next(tiny_model.parameters()).dtype == torch.float64


def test_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "def f(x):\n    return 'héllo' + \"\\t\" # ✓"
    assert tok.decode(tok(text)["input_ids"]) == text


def test_fingerprint_changes_with_any_weight():
    a = build_tiny_model("llama")
    b = build_tiny_model("llama")
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-12
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_tiny_spec_saves_a_standard_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = load_model(ModelSpec(source="tiny", tiny={"arch": "qwen2"}, dtype="float32", attn_implementation="eager"))
    save_pretrained(model, tok, tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert weights_fingerprint(again) == weights_fingerprint(model)
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == tok.chat_template
