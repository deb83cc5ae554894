"""The one configuration object of the experiment, shared by every layer (models, data, training, inference).

Every setting lives in `ExperimentConfig`, with the experiment's values as defaults, and the
results JSON records it whole. Field names follow the public version of the experiment so that
its users can map settings one to one; the MLA fields are DeepSeek-V3's names.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

from common.errors import ConfigError

ATTENTION_BACKENDS = ("auto", "flash-attn", "sdpa", "eager")
PRECISIONS = ("auto", "bf16", "fp32")
MOE_DISPATCHES = ("auto", "grouped_mm", "sorted", "loop")
PARALLEL_MODES = ("auto", "seeds", "data")  # --parallel under torchrun: one seed per rank, or one batch split over ranks
OPTIMIZERS = ("muon", "adamw")  # --optimizer: per-matrix Muon for the block matrices, or an AdamW-only control
MUON_ADJUST_LR_FNS = ("original", "match_rms_adamw")  # torch.optim.Muon's adjust_lr_fn: each block's LR factor from its shape
BASELINE = "baseline"  # the arm every comparison pairs with: it always runs
DEFAULT_ARMS = (BASELINE, "deepseek")  # the experiment's two arms; arms/ holds every arm, one file each
DEFAULT_GQA_KV_HEADS = 2
INT64_LIMIT = 2**63  # every integer setting lies in [-2**63, 2**63): torch tensors, generators and numpy hold it
MAX_SEED = INT64_LIMIT - 1
MIN_OFFLINE_VOCAB = 257  # the byte-level BPE's 256 byte symbols and its EOS token; merges come on top
MAX_EXPERT_MODULES = 100_000  # n_layers x num_experts: a model is built module by module, in Python
MAX_DIST_TIMEOUT_MINUTES = 30 * 24 * 60  # 30 days: longer than any run, and well inside what timedelta and gloo/NCCL hold
PRESET_NAMES = ("full", "cpu", "tiny")  # PRESETS below builds each
STUDIES = ("frontier", "ladder")  # python -m training.study: the equal-cache frontier and the size ladder
NONE_WORD = "none"  # a setting that may be None, written in TOML or on the command line (TOML has no null)
# What a --resume may change: which runs there are (seeds, arms) and where and how often things are written
# or logged. Every other setting changes what a run computes, so a resume that changes it is refused.
RESUMABLE_CHANGES = frozenset({"seed", "seeds", "arms", "output_dir", "cache_dir", "device", "parallel",
                               "dist_timeout_minutes", "log_every", "save_checkpoints", "tensorboard", "wandb_project",
                               "save_every", "keep_training_state"})


def setting(default: Any, **cli: Any) -> Any:
    """A field whose command-line flag needs more than its name and type (config_cli.py reads `cli`):

    flag="--steps": its flag when not --field-name (which stays an alias); choices=(...): the values
    allowed; metavar="N"; off_flag="--no-save": a bool's extra flag that turns it off; values_into=
    "other_field": a bool flag that may take values for another field (--lr-sweep [M ...]);
    show_default=False: --help leaves out the default. A field's help is its trailing comment.
    """
    return dataclasses.field(default=default, metadata={"cli": cli})


@dataclass(frozen=True)
class ExperimentConfig:
    # Model (shared by every arm)
    d_model: int = 256  # model width (embedding and residual stream)
    n_heads: int = 4  # attention (query) heads; must divide d_model
    n_layers: int = 3  # transformer blocks
    d_ff: int = 1024  # hidden width of each MoE expert
    num_experts: int = 8  # experts per MoE layer
    expert_top_k: int = 2  # experts each token is routed to
    max_seq_len: int = setting(256, flag="--seq-len", metavar="N")  # tokens per training window
    dropout: float = 0.1  # dropout probability in training
    router_noise_std: float = 0.1  # Gaussian noise on router logits while training, as in the public version
    load_balancing_weight: float = 0.01  # weight of the MoE load-balancing loss
    rope_base: float = 10000.0  # RoPE base frequency
    vocab_size: int | None = None  # vocabulary size; none: taken from the tokenizer

    # DeepSeek-V3 Multi-head Latent Attention
    q_lora_rank: int | None = 128  # MLA query rank; none: a plain q_proj instead of the low-rank query path
    kv_lora_rank: int = 128  # MLA latent (compressed K/V) width: what its KV cache holds per token
    qk_nope_head_dim: int = 64  # MLA per-head query/key width without RoPE
    qk_rope_head_dim: int = 32  # MLA per-head width of the decoupled rotary query/key
    v_head_dim: int = 64  # MLA per-head value width

    # Grouped-query attention arm ("gqa"): the baseline's attention with this many K/V heads (MQA has 1)
    gqa_kv_heads: int = DEFAULT_GQA_KV_HEADS  # K/V heads of the gqa arm; must divide n_heads

    # Training (a step is one optimizer step)
    batch_size: int = 64  # sequences per optimizer step
    max_steps: int = setting(1000, flag="--steps", metavar="N")  # optimizer steps per model
    eval_every: int = 100  # steps between validation passes (never more than --steps)
    log_every: int = 10  # steps between progress-bar updates (the only host syncs in training)
    muon_lr: float = 0.01  # Muon learning rate (the blocks' matrices)
    adamw_lr: float = 0.001  # AdamW learning rate (embedding, norms, biases)
    weight_decay: float = 0.1  # Muon's matrices only; norm gains, biases and the embedding get none (training/optim.py)
    optimizer: str = setting("muon", choices=OPTIMIZERS)  # muon: per-matrix Muon + AdamW; adamw: AdamW only (a control run)
    muon_adjust_lr_fn: str = setting("original", choices=MUON_ADJUST_LR_FNS)  # Muon's LR factor per block (torch.optim.Muon's adjust_lr_fn): original = sqrt(max(1, rows/cols)); match_rms_adamw = 0.2 * sqrt(max(rows, cols))
    grad_clip: float = 1.0  # gradient-norm clipping threshold
    warmup_fraction: float = 0.05  # fraction of the steps with a linear LR warmup
    min_lr_ratio: float = 0.1  # the cosine ends at this fraction of the base LR
    seed: int = 42  # the seed when --seeds is not given
    seeds: tuple[int, ...] = setting((), metavar="SEED")  # train every arm once per seed, e.g. --seeds 42 43 44; empty: --seed alone
    arms: tuple[str, ...] = setting(DEFAULT_ARMS, metavar="ARM")  # which arms to train, one file each in arms/ (--help lists them); baseline (MHA) always runs
    lr_sweep: bool = setting(False, values_into="lr_sweep_multipliers", metavar="M")  # before the comparison, tune each arm's LRs: a short run per multiplier M on a seed not among --seeds, the best by its loss on the tuning set (training/lr_sweep.py)
    lr_sweep_multipliers: tuple[float, ...] = setting((0.25, 0.5, 1.0, 2.0, 4.0), metavar="M")  # each scales both muon_lr and adamw_lr
    lr_sweep_steps: int = 0  # steps per sweep run; 0: max_steps // 4 (at least 1)
    lr_sweep_seed: int | None = setting(None, metavar="SEED")  # the sweep runs' seed, never a reported one; none: one above the largest of --seeds

    # Data
    dataset_name: str = setting("HuggingFaceTB/smollm-corpus", flag="--dataset", metavar="NAME")  # Hugging Face dataset (streamed)
    dataset_config: str = setting("cosmopedia-v2", metavar="NAME")  # its configuration (subset)
    text_field: str = setting("text", metavar="FIELD")  # the field that holds the text, in the Hub dataset or a .jsonl/.parquet --data file
    tokenizer_name: str = setting("HuggingFaceTB/SmolLM-135M", flag="--tokenizer", metavar="NAME")  # Hugging Face tokenizer (online runs)
    num_documents: int = 1000  # documents read before tokenizing; 0: all (the default with --data)
    max_chars_per_doc: int = 3000  # each document cut to this many characters; 0: whole (the default with --data)
    max_tokens: int = 100_000  # tokens kept, every split together; 0: all (the default with --data)
    val_fraction: float = 0.1  # the last fraction of the tokens, held out for validation
    tuning_fraction: float = 0.1  # with --lr-sweep: this fraction of all tokens, just before validation, is the sweep's tuning set
    data_path: str | None = setting(None, flag="--data", metavar="PATH")  # your own .txt/.jsonl/.parquet instead of the Hub corpus, read whole unless you set a cap
    offline: bool = False  # skip the Hub and use the built-in corpus (or your --data file) with a BPE tokenizer trained on it
    offline_vocab_size: int = 8192  # vocabulary of the BPE tokenizer trained for the offline corpus
    cache_dir: str = "data_cache"  # where tokenized data is cached

    # Run
    preset: str = setting("full", choices=PRESET_NAMES, show_default=False)  # the base the other settings start from: full (the experiment as published; default on CUDA), cpu (scaled down, minutes on 2 cores; default without CUDA) or tiny (a smoke run of under a minute)
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    attention_backend: str = setting("auto", choices=ATTENTION_BACKENDS)  # MLA kernel: auto (flash-attn if installed, else SDPA), flash-attn, sdpa, eager
    precision: str = setting("auto", choices=PRECISIONS)  # auto: bf16 autocast on CUDA, fp32 on CPU; bf16 on CPU rehearses the GPU's mixed precision
    moe_dispatch: str = setting("auto", choices=MOE_DISPATCHES)  # auto: grouped_mm where it runs fused or on CPU, else the one-sync sorted split
    compile: bool = False  # torch.compile each block (needs bf16: CUDA, or CPU with --precision bf16)
    compile_optimizer: bool = False  # torch.compile Muon's batched update too (its LR then lives on the device)
    cuda_graph: bool = False  # capture the whole training step in one CUDA graph and replay it (CUDA, fused grouped_mm MoE only, one process per run)
    output_dir: str = "exp6_results"  # where the JSON, plots, curves and models go; one run at a time per folder
    save_checkpoints: bool = setting(True, off_flag="--no-save")  # each completed model run saves its weights under output_dir/checkpoints/
    sample_prompt: str = "The"  # each completed model's greedy continuation of it goes into the JSON
    sample_tokens: int = 32  # length of that greedy sample, in tokens

    # Live curves and resuming (training/metrics_log.py, training/train_state.py)
    tensorboard: bool = False  # also write TensorBoard event files to output_dir/tensorboard/
    wandb_project: str | None = setting(None, flag="--wandb", metavar="PROJECT")  # also log to this Weights & Biases project (wandb, in the requirements)
    save_every: int = 0  # steps between training-state saves, for --resume; 0: at each evaluation
    keep_training_state: bool = False  # keep each run's training state, saved once more at its last step (deleted by default)

    # Studies (python -m training.study; training/study_points.py states each rule)
    studies: tuple[str, ...] = setting((), choices=STUDIES, metavar="STUDY")  # which studies run: frontier (every attention at one size against its measured KV cache) and ladder (arms at growing sizes); empty: the plain comparison of --arms
    frontier_kv_ranks: tuple[int, ...] = setting((), metavar="RANK")  # MLA latent ranks on the frontier (q_lora_rank and head dims held); empty: d_model/16, /8, /4, /2 and d_model
    ladder_arms: tuple[str, ...] = setting(DEFAULT_ARMS, metavar="ARM")  # the arms the ladder trains at every size; baseline always
    ladder_sizes: int = 5  # model sizes on the ladder (size k: 2k heads of ladder_head_dim, k layers); a law is fitted from 4
    ladder_head_dim: int = 64  # the head dim every ladder size shares (width = heads x this)
    tokens_per_parameter: float = 20.0  # each ladder size trains on this many tokens per non-embedding parameter of its MHA model

    # Several processes started by torchrun (training/distributed.py); a single process ignores these
    parallel: str = setting("auto", choices=PARALLEL_MODES)  # auto: seeds when there are at least as many seeds as ranks, else data
    dist_timeout_minutes: float = setting(30.0, flag="--dist-timeout", metavar="MIN")  # longest a rank waits for the others in one collective before the job stops

    @property
    def run_seeds(self) -> tuple[int, ...]:
        return tuple(self.seeds) if self.seeds else (self.seed,)

    @property
    def sweep_seed(self) -> int:
        """The seed of every LR-sweep run: lr_sweep_seed, or one above the largest reported seed, so that the
        sweep's initial weights and batches are never those of a run the comparison reports."""
        return self.lr_sweep_seed if self.lr_sweep_seed is not None else max(self.run_seeds) + 1

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads if self.n_heads else 0  # 0 heads: refused by validate(), not a crash

    @property
    def warmup_steps(self) -> int:
        return max(1, round(self.warmup_fraction * self.max_steps))

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["seeds"] = list(self.run_seeds)
        out["arms"] = list(self.arms)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], base: "ExperimentConfig | None" = None) -> "ExperimentConfig":
        """The config a to_dict() (or a TOML file) wrote; lists come back as tuples, and the string "none"
        as None for a setting that may be None (TOML has no null).

        A key that is not a field, or a value of the wrong type, raises ConfigError naming it; a field
        the dict lacks takes its value from `base` (default: the dataclass's defaults).
        """
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}: not settings of ExperimentConfig "
                              "(written by another version of the experiment?); remove them")
        fields: dict[str, Any] = {}
        for name, value in values.items():
            if isinstance(value, list) and typing.get_origin(hints[name]) is tuple:  # JSON writes tuples as lists
                value = tuple(float(v) if typing.get_args(hints[name])[0] is float and _has_type(v, float) else v
                              for v in value)
            if value == NONE_WORD and _has_type(None, hints[name]):
                value = None
            if not _has_type(value, hints[name]):
                expected = hints[name].__name__ if isinstance(hints[name], type) else str(hints[name])
                raise ConfigError(f"config key {name}={value!r}: expected {expected}")
            fields[name] = float(value) if hints[name] is float else value
        return (base or cls()).replace(**fields)

    def _validate_arms(self) -> None:
        """Each arm once, the baseline among them. Whether each name is an arm is the registry's to say
        (arms/registry.py: check_arm_names), since the registry sits above the config."""
        given = " ".join(self.arms)
        if len(set(self.arms)) != len(self.arms):
            raise ConfigError(f"--arms {given}: an arm is repeated; give each arm once")
        if BASELINE not in self.arms:
            raise ConfigError(f"--arms {given}: must include {BASELINE} (every comparison is paired with it)")

    def _validate_kinds(self) -> None:
        """The checks every field gets from its type alone, so a setting added tomorrow has them too: the
        right type; strings non-empty and free of NUL bytes (paths, names, the prompt); integers inside
        int64; floats finite (NaN and infinity mean nothing as a rate, a weight or a fraction)."""
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            hint = hints[field.name]
            value = getattr(self, field.name)
            if not _has_type(value, hint):
                expected = hint.__name__ if isinstance(hint, type) else str(hint)
                raise ConfigError(f"{field.name}={value!r:.60}: expected {expected}")
            for item in value if isinstance(value, tuple) else (value,):
                if isinstance(item, str) and (not item or "\x00" in item):
                    raise ConfigError(f"{field.name}={item!r:.60}: must be a non-empty string without NUL bytes")
                if isinstance(item, int) and not isinstance(item, bool) and not -INT64_LIMIT <= item < INT64_LIMIT:
                    raise ConfigError(f"{field.name}={item}: out of range (integers must lie within +-2**63)")
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{field.name}={item}: must be a finite number")
            choices = field.metadata.get("cli", {}).get("choices")
            values = value if isinstance(value, tuple) else (value,)
            wrong = [item for item in values if choices is not None and item not in choices]
            if wrong:
                flag = field.metadata["cli"].get("flag", "--" + field.name.replace("_", "-"))
                raise ConfigError(f"{flag} {wrong[0]}: must be one of {', '.join(choices)}")

    def validate(self) -> "ExperimentConfig":
        """Raise ConfigError on the first impossible setting; return self when all is well."""
        self._validate_kinds()
        checks = self._model_checks() + self._training_checks() + self._data_checks() + self._study_checks()
        for ok, message in checks + self._run_checks():
            if not ok:
                raise ConfigError(message)
        self._validate_arms()
        self._validate_token_budget()
        return self

    def _model_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.d_model > 0 and self.n_heads > 0, "d_model and n_heads must be positive"),
            (self.d_model % max(self.n_heads, 1) == 0,
             f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; pick n_heads that divides d_model"),
            (self.head_dim % 2 == 0, f"head_dim=d_model/n_heads={self.head_dim} must be even for RoPE"),
            (self.n_layers > 0 and self.d_ff > 0, "n_layers and d_ff must be positive"),
            (self.num_experts > 0, f"num_experts={self.num_experts} must be positive"),
            (self.n_layers * self.num_experts <= MAX_EXPERT_MODULES,
             f"n_layers={self.n_layers} x num_experts={self.num_experts}: at most {MAX_EXPERT_MODULES:,} expert modules "
             "(each is built on its own); lower one of them"),
            (1 <= self.expert_top_k <= self.num_experts,
             f"expert_top_k={self.expert_top_k} must be between 1 and num_experts={self.num_experts}"),
            (self.max_seq_len >= 2, f"--seq-len {self.max_seq_len}: must be at least 2"),
            (0.0 <= self.dropout < 1.0, f"dropout={self.dropout} must be in [0, 1)"),
            (self.router_noise_std >= 0, f"router_noise_std={self.router_noise_std} must be >= 0"),
            (self.load_balancing_weight >= 0, f"load_balancing_weight={self.load_balancing_weight} must be >= 0"),
            (self.rope_base > 1, f"rope_base={self.rope_base} must be greater than 1 (10000 is the usual value)"),
            (self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or None"),
            (self.kv_lora_rank > 0, f"kv_lora_rank={self.kv_lora_rank} must be positive"),
            (self.qk_nope_head_dim > 0,
             f"qk_nope_head_dim={self.qk_nope_head_dim} must be positive: with 0 every head shares one rotary key"),
            (self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
             f"qk_rope_head_dim={self.qk_rope_head_dim} must be a positive even number (RoPE rotates pairs)"),
            (self.v_head_dim > 0, f"v_head_dim={self.v_head_dim} must be positive"),
            (self.gqa_kv_heads >= 1 and self.n_heads % max(self.gqa_kv_heads, 1) == 0,
             f"--gqa-kv-heads {self.gqa_kv_heads}: must be at least 1 and divide n_heads={self.n_heads} "
             f"(e.g. {', '.join(str(h) for h in range(1, min(self.n_heads, 64) + 1) if self.n_heads % h == 0)})"),
            (self.vocab_size is None or self.vocab_size > 1, "vocab_size must be > 1 or None"),
        ]

    def _training_checks(self) -> list[tuple[bool, str]]:
        seeds = (self.seed, *self.seeds) + ((self.lr_sweep_seed,) if self.lr_sweep_seed is not None else ())
        bad_seeds = [seed for seed in seeds if not 0 <= seed <= MAX_SEED]
        top_lr = max(self.muon_lr, self.adamw_lr) * (max(self.lr_sweep_multipliers, default=1.0) if self.lr_sweep else 1.0)
        return [
            (self.batch_size > 0, f"--batch-size {self.batch_size}: must be at least 1"),
            (self.max_steps > 0, f"--steps {self.max_steps}: must be at least 1"),
            (self.eval_every > 0, f"--eval-every {self.eval_every}: must be at least 1"),
            (self.log_every > 0, f"log_every={self.log_every} must be positive"),
            (self.muon_lr > 0 and self.adamw_lr > 0, "muon_lr and adamw_lr must be positive"),
            (math.isfinite(top_lr), f"muon_lr={self.muon_lr}, adamw_lr={self.adamw_lr} times the largest --lr-sweep multiplier "
                                    "overflows to infinity; use smaller values"),
            (len(self.lr_sweep_multipliers) > 0
             and all(m > 0 for m in self.lr_sweep_multipliers)
             and len(set(self.lr_sweep_multipliers)) == len(self.lr_sweep_multipliers),
             f"--lr-sweep multipliers {' '.join(map(str, self.lr_sweep_multipliers))}: need at least one, "
             "each positive, finite and given once"),
            (self.lr_sweep_steps >= 0, f"--lr-sweep-steps {self.lr_sweep_steps}: must be at least 1 (or 0 for --steps / 4)"),
            (self.weight_decay >= 0 and self.grad_clip > 0, "weight_decay must be >= 0 and grad_clip > 0"),
            (0.0 <= self.warmup_fraction < 1.0, f"warmup_fraction={self.warmup_fraction} must be in [0, 1)"),
            (0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]"),
            (self.lr_sweep_seed is None or self.lr_sweep_seed not in self.run_seeds,
             f"--lr-sweep-seed {self.lr_sweep_seed}: is one of the reported --seeds "
             f"{' '.join(map(str, self.run_seeds))}; the sweep must not tune on a reported seed, choose another"),
            (not bad_seeds, f"seed {' '.join(map(str, bad_seeds))}: a seed must be between 0 and 2**63 - 1"),
            (len(set(self.run_seeds)) == len(self.run_seeds),
             f"--seeds {' '.join(map(str, self.run_seeds))}: a seed is repeated; give each seed once"),
            (not (self.compile_optimizer and self.optimizer != "muon"),
             "--compile-optimizer compiles Muon's update, and --optimizer adamw has none (AdamW is one fused kernel); drop it"),
        ]

    def _data_checks(self) -> list[tuple[bool, str]]:
        return [
            (0.0 < self.val_fraction < 1.0, f"val_fraction={self.val_fraction} must be in (0, 1)"),
            (0.0 < self.tuning_fraction and self.val_fraction + self.tuning_fraction < 1.0,
             f"--tuning-fraction {self.tuning_fraction}: must be positive and leave training tokens "
             f"(tuning_fraction + val_fraction < 1; val_fraction is {self.val_fraction})"),
            (self.num_documents >= 0, f"--num-documents {self.num_documents}: must be at least 1, or 0 for every document"),
            (self.num_documents > 0 or self.offline or self.data_path is not None,
             "--num-documents 0 (every document) would stream the whole Hub dataset; give a number, or use --data"),
            (self.max_chars_per_doc >= 0,
             f"--max-chars-per-doc {self.max_chars_per_doc}: must be at least 1, or 0 for whole documents"),
            (self.max_tokens >= 0, f"--max-tokens {self.max_tokens}: must be at least 1, or 0 for every token"),
            (self.offline_vocab_size >= MIN_OFFLINE_VOCAB,
             f"offline_vocab_size={self.offline_vocab_size}: must be at least {MIN_OFFLINE_VOCAB} (the offline tokenizer's "
             "256 byte symbols and its end-of-text token); 8192 is the default"),
        ]

    def _study_checks(self) -> list[tuple[bool, str]]:
        return [
            (len(set(self.studies)) == len(self.studies), f"--studies {' '.join(self.studies)}: a study is repeated"),
            (all(rank > 0 for rank in self.frontier_kv_ranks) and len(set(self.frontier_kv_ranks)) == len(self.frontier_kv_ranks),
             f"--frontier-kv-ranks {' '.join(map(str, self.frontier_kv_ranks))}: each rank positive and given once"),
            (BASELINE in self.ladder_arms and len(set(self.ladder_arms)) == len(self.ladder_arms),
             f"--ladder-arms {' '.join(self.ladder_arms)}: must include {BASELINE} (each size's gap is paired with it), "
             "each arm once"),
            (1 <= self.ladder_sizes <= 64, f"--ladder-sizes {self.ladder_sizes}: must be between 1 and 64 (4 or more for a law)"),
            (self.ladder_head_dim > 0 and self.ladder_head_dim % 2 == 0,
             f"--ladder-head-dim {self.ladder_head_dim}: must be a positive even number (RoPE rotates pairs)"),
            (self.tokens_per_parameter > 0, f"--tokens-per-parameter {self.tokens_per_parameter}: must be positive"),
            (not (self.studies and self.lr_sweep), "--lr-sweep tunes the arms of the plain comparison; a study trains "
                                                   "every point at the configured LRs: drop --lr-sweep or --studies"),
        ]

    def _run_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.sample_tokens >= 0, f"sample_tokens={self.sample_tokens} must be >= 0"),
            (self.save_every >= 0, f"--save-every {self.save_every}: must be at least 1, or 0 for each evaluation"),
            (not (self.cuda_graph and self.device == "cpu"), "--cuda-graph needs a CUDA GPU; drop it with --device cpu"),
            (not (self.cuda_graph and self.moe_dispatch in ("sorted", "loop")),
             f"--cuda-graph needs static shapes, which --moe-dispatch {self.moe_dispatch} does not have (it reads "
             "expert sizes back to the host); use --moe-dispatch auto or grouped_mm"),
            (0 < self.dist_timeout_minutes <= MAX_DIST_TIMEOUT_MINUTES,
             f"--dist-timeout {self.dist_timeout_minutes:g}: must be a positive number of minutes, at most "
             f"{MAX_DIST_TIMEOUT_MINUTES} (30 days)"),
            (re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device) is not None,
             f"--device {self.device}: must be auto, cpu, cuda or cuda:N"),
        ]

    def _validate_token_budget(self) -> None:
        """Enough tokens for one window of each split: training and validation, and with --lr-sweep the tuning set
        too (without a sweep its tokens train)."""
        if not self.max_tokens:
            return
        window = self.max_seq_len + 1
        parts = ((1 - self.val_fraction - self.tuning_fraction, self.tuning_fraction, self.val_fraction)
                 if self.lr_sweep else (1 - self.val_fraction, self.val_fraction))
        if _enough_tokens(self.max_tokens, parts, window):
            return
        needed = max(len(parts) * window, *(math.ceil(window / part) for part in parts))
        while not _enough_tokens(needed, parts, window):  # guard against rounding in the division
            needed += 1
        what = "training, tuning and validation window" if self.lr_sweep else "training and one validation window"
        raise ConfigError(
            f"--max-tokens {self.max_tokens}: too few for one {what} of "
            f"{window} tokens (--seq-len {self.max_seq_len} + 1); use --max-tokens {needed} or more, or lower --seq-len"
        )


def _enough_tokens(tokens: int, parts: tuple[float, ...], window: int) -> bool:
    return tokens >= len(parts) * window and all(part * tokens >= window for part in parts)


def _has_type(value: Any, hint: Any) -> bool:
    """isinstance for the field types ExperimentConfig uses: int, float (an int is one too), bool, str,
    X | None and tuple[int, ...]; bool is not taken for int or float."""
    if isinstance(hint, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if typing.get_origin(hint) is tuple:
        (item, _ellipsis) = typing.get_args(hint)
        return isinstance(value, tuple) and all(_has_type(v, item) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
    return isinstance(value, hint)


MLA_SIZES = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def mla_sizes(d_model: int, n_heads: int) -> dict[str, int]:
    """MLA's sizes for a width, by the presets' own proportions (every preset follows them): query and latent
    ranks d_model / 2, nope and value head dims the MHA head dim, the rotary head dim half of it (even)."""
    head_dim = d_model // max(n_heads, 1)
    rank = max(1, d_model // 2)
    return {"q_lora_rank": rank, "kv_lora_rank": rank, "qk_nope_head_dim": max(1, head_dim),
            "qk_rope_head_dim": max(2, head_dim // 4 * 2), "v_head_dim": max(1, head_dim)}


def cpu_preset(base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A scaled-down run that finishes in minutes on 2 CPU cores; labelled as such in the JSON."""
    base = base or ExperimentConfig()
    return base.replace(
        preset="cpu",
        d_model=128, n_heads=4, n_layers=2, d_ff=512,
        max_seq_len=128, batch_size=16, max_steps=300, eval_every=50,
        q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
        num_documents=1000, max_tokens=300_000,
        ladder_sizes=4, ladder_head_dim=8, tokens_per_parameter=1.5,
    )


def tiny_preset(base: ExperimentConfig | None = None) -> ExperimentConfig:
    """A smoke run of under a minute on 2 CPU cores: every code path, no result worth reading."""
    base = base or ExperimentConfig()
    return base.replace(
        preset="tiny",
        d_model=64, n_heads=4, n_layers=2, d_ff=128, num_experts=4,
        max_seq_len=64, batch_size=8, max_steps=30, eval_every=10,
        q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        num_documents=200, max_tokens=40_000, offline_vocab_size=1024, sample_tokens=8,
        ladder_sizes=4, ladder_head_dim=8, tokens_per_parameter=0.5,
    )


PRESETS = {"full": lambda base: base.replace(preset="full"), "cpu": cpu_preset, "tiny": tiny_preset}
PRESET_NOTES = {
    "full": "full experiment",
    "cpu": "CPU preset: a scaled-down model and run so that it finishes in minutes on a CPU; not the full experiment",
    "tiny": "tiny preset: a smoke run of under a minute that exercises every code path; its numbers mean nothing",
}
