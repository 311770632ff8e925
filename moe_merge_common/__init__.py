"""What training (``moe``) and merging (``merging``) share, importing neither: the checkpoint reader and the
staged sharded writer (``io``, ``lora`` for PEFT adapters read as models), the output policy (``outputs``),
linear-time name patterns (``patterns``), the memory check (``resources``), and the command lines' plumbing
(``cli``: one-line errors, unknown-key refusal, Hydra helpers). ``aliases`` keeps moved modules importable from
their old paths."""
