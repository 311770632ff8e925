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
        "qwen2": lambda: tf.Qwen2Config(**common, intermediate_size=48),
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


def _llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order of a q/k projection (which transformers' GGUF loader undoes for llama)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def save_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny dense Llama saved in ``model_dir`` (``save_model("llama", ...)``) written as an F32 GGUF file with
    its BPE tokenizer, the way llama.cpp lays it out (gguf-py's writer; q/k rows permuted, tied output)."""
    import json

    import gguf
    import transformers as tf

    model = tf.AutoModelForCausalLM.from_pretrained(model_dir)
    c, tok = model.config, tf.AutoTokenizer.from_pretrained(model_dir)
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_vocab_size(c.vocab_size)
    bpe = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].get)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == tok.eos_token else 1 for t in tokens])  # 3: control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in bpe["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    sd = model.state_dict()
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"].numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"].numpy())
    names = {"attn_norm": "input_layernorm", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}  # fmt: skip
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     _llama_cpp_permute(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads).numpy())
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     _llama_cpp_permute(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads).numpy())
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[f"{p}{theirs}.weight"].numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
