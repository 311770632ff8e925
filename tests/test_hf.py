"""Parity with transformers' Mixtral / Qwen2-MoE / Qwen3-MoE sparse blocks (skipped without transformers)."""

import pytest
import torch

from moe.hf.blocks import from_hf_sparse_block, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def mixtral():
    from transformers.models.mixtral.modeling_mixtral import MixtralConfig, MixtralSparseMoeBlock

    cfg = MixtralConfig(hidden_size=16, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2)
    return MixtralSparseMoeBlock(cfg), cfg


def qwen2(norm):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeConfig, Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=16, moe_intermediate_size=12, shared_expert_intermediate_size=20, num_experts=7,
                         num_experts_per_tok=3, norm_topk_prob=norm)  # fmt: skip
    return Qwen2MoeSparseMoeBlock(cfg), cfg


def qwen3():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeConfig, Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=12, num_experts=6, num_experts_per_tok=2,
                         norm_topk_prob=True)  # fmt: skip
    return Qwen3MoeSparseMoeBlock(cfg), cfg


@pytest.mark.parametrize("make", [mixtral, lambda: qwen2(False), lambda: qwen2(True), qwen3],
                         ids=["mixtral", "qwen2-moe", "qwen2-moe-norm", "qwen3-moe"])  # fmt: skip
def test_round_trip_matches_transformers(make):
    torch.manual_seed(0)
    block, cfg = make()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    block.eval()
    x = torch.randn(2, 9, 16)
    layer = from_hf_sparse_block(block, cfg).eval()
    with torch.no_grad():
        expected = block(x)
        expected = expected[0] if isinstance(expected, tuple) else expected
        ours, routing = layer(x)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert routing.ids.shape == (18, cfg.num_experts_per_tok)
    # export back into a fresh block: identical outputs again
    fresh, _ = make()
    fresh.load_state_dict(to_hf_state_dict(layer))
    with torch.no_grad():
        again = fresh.eval()(x)
        again = again[0] if isinstance(again, tuple) else again
    torch.testing.assert_close(again, expected)


def test_non_silu_activation_is_refused():
    block, cfg = mixtral()
    cfg.hidden_act = "gelu"
    with pytest.raises(ValueError, match="hidden_act"):
        from_hf_sparse_block(block, cfg)
