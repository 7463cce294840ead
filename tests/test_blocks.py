from alphatoken.blocks import scored_linears


def test_scored_linears_are_the_proj_weights_of_the_last_k_blocks(tiny_model):
    names = list(scored_linears(tiny_model, last_k=2))
    expected = [
        f"model.layers.{i}.{part}.weight"
        for i in (2, 3)
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    ]
    assert sorted(names) == sorted(expected)
    params = dict(tiny_model.named_parameters())
    for name, linear in scored_linears(tiny_model, 2).items():
        assert params[name] is linear.weight
