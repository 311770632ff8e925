"""Tiny random Hugging Face causal LMs built in code (nothing downloaded), saved with ``save_pretrained`` beside a
byte-level BPE tokenizer trained in code with ``tokenizers``: the fixtures of the ``model=hf`` tests."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 320
TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
        "The quick brown fox jumps over the lazy dog. Ünïcödé text, too: naïve café.\n") * 20  # fmt: skip


def tokenizer():
    """A byte-level BPE tokenizer with ``VOCAB`` ids at most and ``<|endoftext|>`` as EOS/BOS/PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")  # fmt: skip


def config(arch: str, **overrides):
    """The transformers config of a tiny ``arch`` (2 layers, d 32; prime and odd expert counts)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip
    make = {
        "mixtral": lambda: tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=5, num_experts_per_tok=2),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                               shared_expert_intermediate_size=40, num_experts=6,
                                               num_experts_per_tok=3, norm_topk_prob=False),  # fmt: skip
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24, num_experts=7,
                                               num_experts_per_tok=2, norm_topk_prob=True),  # fmt: skip
        "olmoe": lambda: tf.OlmoeConfig(**common, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: tf.DeepseekV3Config(
            **{k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}, num_key_value_heads=4,
            intermediate_size=48, moe_intermediate_size=16, first_k_dense_replace=1, n_routed_experts=8, n_group=4,
            topk_group=2, num_experts_per_tok=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8),
        "llama": lambda: tf.LlamaConfig(**{**common, "tie_word_embeddings": True}, intermediate_size=48),
    }[arch]
    cfg = make()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def save_model(arch: str, out: Path, seed: int = 0, dtype=torch.float32, fused: bool = False, **overrides) -> Path:
    """A tiny random ``arch`` model and the tokenizer in ``out`` (``fused``: transformers' in-memory expert layout
    on disk instead of the per-expert one ``save_pretrained`` writes by default)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = config(arch, **overrides)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # routers and the DeepSeek bias start at zero in some architectures: make them matter
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.to(dtype).save_pretrained(out, save_original_format=not fused)
    tokenizer().save_pretrained(out)
    return out
