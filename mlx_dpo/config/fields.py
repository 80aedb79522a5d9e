"""Training configuration: one dataclass, the single source of defaults.

Keys are flat and follow TRL's ``DPOConfig`` / ``TrainingArguments`` names where
one exists, mlx-lm's names where TRL has none. The CLI and YAML loaders are thin
layers over :class:`DPOConfig`: ``defaults < YAML file < command line``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional, Union

import yaml

from .checks import (chat_template_text, check_choices, check_combinations, check_file_code, check_ranges,
                     quantize_options)
from .coerce import as_bool, coerce_fields, load_yaml
from .keys import ALIASES, DEFAULT_LORA_TARGETS, KEY_LISTS, ROLES, canonical_keys, option  # noqa: F401 (re-exported)


@dataclass
class DPOConfig:
    """Every option of a run; TRL's ``DPOConfig``/``TrainingArguments`` names where one exists."""

    # ---- model ---------------------------------------------------------------
    model: str = option("toy:llama", "Local HF/MLX model directory, a Hub id (org/name), a GGUF file (path/model.gguf "
                        "or org/name/file.gguf on the Hub; Llama/Qwen2 family, Q4_0/Q4_1/Q8_0/F16/F32, kept quantized "
                        "as stored), demo:smollm2 (a real 135M instruct GGUF from PyPI), or toy:llama / toy:qwen2 "
                        "(a tiny random-weight model built locally; works offline).", "model")
    revision: Optional[str] = option(None, "Branch, tag or commit of a Hub model.", "model")
    trust_remote_code: bool = option(False, "Allow a Hub model's own Python code (transformers' flag), and "
                                     "module:function losses from a config file (a file never allows either "
                                     "alone).", "model", resume="note")
    quantize: Optional[dict] = option(None, "Quantize the base at load time (QLoRA): {bits: 4|8, group_size: "
                                      "32|64|128}.", "model", keys=("card",))
    compute_dtype: str = option("auto", "Dtype of the non-quantized weights and activations: auto (float32 on the "
                                "CPU backend, the checkpoint's dtype on Metal), float32, bfloat16, float16.", "model",
                                resume="note")

    # ---- adapters ------------------------------------------------------------
    train_type: str = option("adapter", "adapter (LoRA/DoRA on a frozen base) or full (train the last num_layers "
                             "blocks).", "adapter", keys=("ref_cache", "card"))
    adapter: str = option("lora", "Adapter kind: lora or dora.", "adapter", keys=("card",))
    lora_rank: int = option(8, "LoRA rank r (PEFT's r).", "adapter", keys=("card",))
    lora_alpha: float = option(16.0, "LoRA alpha; the adapter scale is lora_alpha / lora_rank (PEFT's "
                               "convention).", "adapter", keys=("card",))
    lora_dropout: float = option(0.0, "Dropout on the adapter's input (policy pass only).", "adapter", keys=("card",))
    lora_target_modules: Optional[list] = option(None, "Linear layers inside a transformer block that get adapters: "
                                                 "mlx-lm keys (self_attn.q_proj), PEFT's suffix names (q_proj) or "
                                                 "all-linear (default: attention and MLP projections, fused ones too).", "adapter")
    num_layers: int = option(-1, "Number of (last) transformer blocks that get adapters or are trained; -1 = all.",
                             "adapter", keys=("card",))
    gradient_checkpointing: bool = option(False, "Recompute each block's activations in the backward pass "
                                          "(less memory, ~30% slower).", "adapter", resume="note")

    # ---- reference model -----------------------------------------------------
    reference: str = option("base", "Reference model: base (the same weights with adapters off) or adapter (a "
                            "frozen copy of ref_adapter_path).", "reference", keys=("card",))
    ref_adapter_path: Optional[str] = option(None, "mlx-lm adapter directory the policy starts from and the "
                                             "reference stays at (reference: adapter).", "reference")
    reference_free: bool = option(False, "Ignore the reference model (log-ratios against a uniform reference).",
                                  "reference")
    precompute_ref_log_probs: bool = option(False, "Compute the reference log-probs once before training (cached "
                                            "on disk) instead of in every step.", "reference")
    precompute_ref_batch_size: Optional[int] = option(None, "Batch size of the reference precompute pass (default: "
                                                      "eval_batch_size, then batch_size).", "reference", resume="free")
    sync_ref_model: bool = option(False, "TR-DPO: move the reference adapter towards the policy every "
                                  "ref_model_sync_steps.", "reference")
    ref_model_mixup_alpha: float = option(0.6, "TR-DPO mix: ref <- alpha * policy + (1 - alpha) * ref.", "reference")
    ref_model_sync_steps: int = option(512, "TR-DPO: steps between reference updates.", "reference")

    # ---- data ----------------------------------------------------------------
    data: str = option("toy", "JSONL/JSON/Parquet file, an mlx-lm style directory, a Hub dataset id, or toy (a "
                       "small synthetic preference set generated locally).", "data", keys=("card",))
    eval_data: Optional[str] = option(None, "Evaluation data (same forms as data); default: the data's "
                                      "valid/validation/test split, else eval_split.", "data", resume="note")
    eval_split: float = option(0.0, "Fraction of the training records held out for evaluation (seeded) when "
                               "there is no eval set.", "data")
    dataset_subset: Optional[str] = option(None, "Subset (config) folder of a Hub dataset or directory.", "data")
    dataset_revision: Optional[str] = option(None, "Branch, tag or commit of a Hub dataset (revision is the "
                                             "model's).", "data")
    dataset_split: str = option("train", "Training split, optionally sliced: train, train[:10%], train[10:20].",
                                "data")
    eval_dataset_split: Optional[str] = option(None, "Evaluation split of data (or of eval_data).", "data",
                                               resume="note")
    data_format: str = option("auto", "auto (detected per file), or a format of mlx_dpo/data/formats.py: standard "
                              "(prompt/chosen/rejected strings), conversational (message lists), implicit "
                              "(chosen/rejected sharing a prompt).", "data")
    columns: Optional[dict] = option(None, "Column mapping, e.g. {prompt: question, chosen: response_j, rejected: "
                                     "response_k}.", "data")
    prompt_template: Optional[str] = option(None, "Template wrapping string prompts, e.g. 'Question: "
                                            "{prompt}\\n\\nAnswer: '.", "data")
    system_prompt: Optional[str] = option(None, "System message prepended to conversational prompts that have "
                                          "none.", "data")
    tools: Optional[list] = option(None, "Tool definitions passed to the chat template (conversational data); a "
                                   "'tools' column overrides them per row.", "data")
    chat_template_kwargs: Optional[dict] = option(None, "Extra variables for the chat template (TRL's name), e.g. "
                                                  "{enable_thinking: false}; a 'chat_template_kwargs' column adds to "
                                                  "them per row.", "data")
    chat_template: Optional[str] = option(None, "Chat template to use instead of the model's (TRL's "
                                          "chat_template_path): a Jinja file or the template text; the run records "
                                          "the text, and export writes it with the tokenizer.", "data")
    max_length: Optional[int] = option(1024, "Maximum prompt + completion tokens; each joined sequence is cut "
                                       "to it as truncation_mode says (TRL 1.16).", "data", keys=("card",))
    max_prompt_length: Optional[int] = option(None, "Maximum prompt tokens, their end is kept (not in TRL 1.16; "
                                              "applied before max_length).", "data", keys=("card",))
    max_completion_length: Optional[int] = option(None, "Maximum completion tokens, their start is kept (not in "
                                                  "TRL 1.16).", "data")
    truncation_mode: str = option("keep_start", "Which end of a joined prompt + completion longer than "
                                  "max_length to keep: keep_start (drops pairs whose prompt fills max_length) or "
                                  "keep_end (cuts the prompt's start).", "data")
    cache_dir: Optional[str] = option(None, "Where tokenized datasets and precomputed reference log-probs are "
                                      "cached (default ~/.cache/mlx_dpo).", "run")

    # ---- loss ----------------------------------------------------------------
    loss_type: Union[str, list] = option("sigmoid", "Loss name (sigmoid, ipo, hinge, robust, bco_pair, ... see "
                                         "docs/losses.md) or a list of them (a weighted mixture); kto or "
                                         "apo_zero_unpaired train on unpaired rows (prompt/completion/label).", "loss",
                                         keys=("card",))
    loss_weights: Optional[list] = option(None, "Weights of a loss_type mixture (default: 1 each).", "loss")
    beta: float = option(0.1, "Temperature of the implicit reward beta * log(pi / pi_ref); higher stays closer "
                         "to the reference.", "loss", keys=("card",))
    label_smoothing: float = option(0.0, "Assumed probability that a pair's preference label is flipped "
                                    "(conservative/robust DPO), in [0, 0.5].", "loss")
    f_divergence_type: str = option("reverse_kl", "f-DPO divergence: reverse_kl, forward_kl, js_divergence or "
                                    "alpha_divergence (sigmoid, hinge, ipo, robust, exo_pair, discopop, "
                                    "sigmoid_norm).", "loss")
    f_alpha_divergence_coef: float = option(0.5, "alpha of f_divergence_type: alpha_divergence, TRL's convention: "
                                            "score (exp((alpha-1) u) - 1)/(alpha-1), 1 = reverse KL; the "
                                            "paper's alpha is 1 - this.", "loss")
    discopop_tau: float = option(0.05, "Temperature of the discopop loss.", "loss")
    rpo_alpha: Optional[float] = option(None, "RPO: weight of an NLL loss on the chosen completions.", "loss")
    use_weighting: bool = option(False, "WPO: weight each pair by its policy probability.", "loss")
    ld_alpha: Optional[float] = option(None, "LD-DPO: weight of the completion tokens past the shorter one's "
                                       "length.", "loss", keys=("ref_cache",))
    desirable_weight: float = option(1.0, "KTO: weight of the desirable rows' losses (to counter unequal "
                                     "numbers of desirable and undesirable rows).", "loss")
    undesirable_weight: float = option(1.0, "KTO: weight of the undesirable rows' losses.", "loss")
    simpo_gamma: float = option(0.5, "SimPO target reward margin gamma.", "loss")
    dpop_lambda: float = option(50.0, "DPO-Positive (loss_type dpop) lambda: weight of the penalty on the "
                                "chosen log-prob falling below the reference's, inside the sigmoid as the paper (mlx-lm-lora's "
                                "delta adds it outside).", "loss")
    cpo_alpha: float = option(1.0, "CPO/SimPO: weight of the NLL term on the chosen completions.", "loss")

    # ---- optimisation --------------------------------------------------------
    optim: str = option("adamw", "Optimizer (transformers' optim; MLX's implementations): adamw (bias-corrected, "
                        "as torch's; adamw_torch, adamw_torch_fused, adamw_hf name it too), adafactor (a fixed "
                        "learning rate, no relative step or parameter scaling, as transformers' adafactor), lion "
                        "(lion_32bit; betas adam_beta1, adam_beta2), sgd, muon (2-D weights orthogonalized).",
                        "optim", resume="match", keys=("card",))
    optim_args: Optional[dict] = option(None, "Extra arguments of the optimizer's MLX class (transformers' "
                                        "optim_args), e.g. {momentum: 0.9, nesterov: true} for sgd, {momentum: "
                                        "0.95, ns_steps: 5} for muon, {beta_1: 0.9} for adafactor.", "optim")
    learning_rate: float = option(1e-6, "Peak learning rate.", "optim", keys=("card",))
    loraplus_lr_ratio: Optional[float] = option(None, "LoRA+ (PEFT/TRL's name): the LoRA B matrices learn at "
                                                "this multiple of the learning rate (the paper suggests 16).",
                                                "optim")
    weight_decay: float = option(0.0, "Decoupled weight decay, p -= lr * weight_decay * p, with every optim "
                                 "(0 disables); as transformers' Trainer, not on biases and norm weights.", "optim")
    adam_beta1: float = option(0.9, "AdamW and Lion beta1 (first-moment decay).", "optim")
    adam_beta2: float = option(0.999, "AdamW and Lion beta2 (second-moment decay).", "optim")
    adam_epsilon: float = option(1e-8, "AdamW epsilon (denominator term).", "optim")
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this (0 disables).", "optim")
    lr_scheduler_type: str = option("linear", "Schedule: constant, constant_with_warmup, linear, cosine or "
                                    "cosine_with_min_lr (transformers' get_scheduler).", "optim", keys=("card",))
    lr_scheduler_kwargs: Optional[dict] = option(None, "Extra arguments of the schedule (transformers' name): "
                                                 "num_cycles for cosine (default 0.5: one half-wave), and min_lr "
                                                 "or min_lr_rate for cosine_with_min_lr.", "optim")
    warmup_steps: int = option(0, "Linear warmup steps (overrides warmup_ratio).", "optim", keys=("card",))
    warmup_ratio: float = option(0.0, "Warmup as a fraction of the total steps.", "optim")
    batch_size: int = option(4, "Pairs per micro-batch (TRL's per_device_train_batch_size).", "optim",
                             resume="match", keys=("data_cache", "card"))
    eval_batch_size: Optional[int] = option(None, "Pairs per evaluation batch (default: batch_size).", "run")
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step.", "optim", resume="match",
                                              keys=("card",))
    max_steps: int = option(-1, "Optimizer steps to train; -1 = num_train_epochs.", "optim", resume="free",
                            keys=("card",))
    num_train_epochs: float = option(3.0, "Epochs to train when max_steps is -1.", "optim", resume="free",
                                     keys=("card",))
    seed: int = option(42, "Seed of the data order, the eval_split hold-out, adapter init and dropout.", "optim",
                       resume="match", keys=("data_cache", "card"))
    prefix_sharing: Union[str, bool] = option("auto", "auto / true / false: run each pair's prompt once for both "
                                              "completions.", "optim", keys=("ref_cache",))
    padding_free: Union[str, bool] = option("auto", "auto / true / false: pack each pair into one row (prompt once, "
                                            "then chosen, then rejected, each token at its own position, a "
                                            "block-diagonal causal mask): no padding but the row's tail (TRL's "
                                            "name; mlx_dpo/forward/packed.py). auto: on with MLX's CPU backend, where whole "
                                            "runs measured 1.3x faster, off on Metal (TRL's default).", "optim",
                                            keys=("ref_cache",))
    cpu_fast_math: bool = option(False, "On MLX's CPU backend, run attention's softmax and the gated MLP (SwiGLU, "
                                 "Gemma's GeGLU) through polynomial exp/sigmoid/tanh that MLX fuses (mlx_dpo/forward/cpu_math.py; float32 error "
                                 "<= 4e-7). Its sign depends on the processor (1.08x a whole run on an AMD EPYC, "
                                 "3.4x slower steps on an AVX-512 Xeon), so it is off unless asked for; no effect "
                                 "on Metal, which keeps MLX's kernels.", "optim", keys=("ref_cache",))
    max_batch_shapes: int = option(16, "At most this many padded batch shapes per run (each compiles the step "
                                   "once): batches group pairs that pad to the same one; fewer in a short run, "
                                   "where a compile costs more than the padding it saves (mlx_dpo/data/shapes.py).",
                                   "optim", resume="match")
    skip_nonfinite_steps: bool = option(False, "Skip (and retry) a step whose loss or gradients are not finite, "
                                        "instead of stopping.", "optim")
    ddp_timeout: float = option(1800.0, "Data parallel (mlx.launch): seconds the start-up or a step may wait for "
                                "the other ranks before this rank stops with an error naming it (TRL's "
                                "ddp_timeout).", "run")

    # ---- logging, eval, checkpoints -------------------------------------------
    output_dir: str = option("runs/dpo", "Run directory: adapters, checkpoints, metrics.jsonl, config.yaml.")
    overwrite_output_dir: bool = option(False, "Start over in an output_dir that holds a run.")
    logging_steps: int = option(10, "Log metrics every N optimizer steps.")
    eval_strategy: Optional[str] = option(None, "When to evaluate: no, steps (every eval_steps) or epoch (each "
                                          "epoch's end), and then also at the last step. Unset: steps when "
                                          "eval_steps is set, else no (TRL's default).")
    eval_steps: Optional[int] = option(None, "Evaluate every N steps with eval_strategy steps (default: "
                                       "logging_steps); 0 disables evaluation.")
    generate_during_eval: bool = option(False, "At each evaluation, greedy completions of the first "
                                        "generate_eval_prompts eval prompts by the policy (and, at the first, by the "
                                        "reference) to completions.jsonl, report.html and wandb/tensorboard (TRL's "
                                        "name); the training model generates, no second copy.")
    generate_eval_prompts: int = option(4, "How many (distinct) eval prompts generate_during_eval completes.")
    generate_max_new_tokens: int = option(64, "Longest completion generate_during_eval writes, in tokens.")
    eval_on_start: bool = option(False, "Evaluate before the first step (logged as step 0: the untrained "
                                 "baseline); not again on resume.")
    max_eval_batches: int = option(-1, "Evaluate on at most this many batches; -1 = all (pairs: evenly spaced "
                                   "over the data; unpaired rows: the first ones, TRL's sequential batches).")
    save_steps: int = option(500, "Save a resumable checkpoint every N steps (and at the end); 0 = only at the end.")
    save_total_limit: Optional[int] = option(None, "Keep only the newest N checkpoints (and, with "
                                             "load_best_model_at_end, the best evaluation's).")
    metric_for_best_model: str = option("eval_loss", "Evaluation metric that ranks evaluations, for "
                                        "load_best_model_at_end, early stopping and the report's best step "
                                        "(transformers' name; the eval_ prefix may be left out): eval_loss, "
                                        "eval_rewards/accuracies, eval_rewards/margins, ...", resume="note")
    greater_is_better: Optional[bool] = option(None, "Whether a higher metric_for_best_model is better; default: "
                                               "false for a metric ending in loss, true otherwise.", resume="note")
    load_best_model_at_end: bool = option(False, "Write the best evaluation's adapters to output_dir at the end "
                                          "(a checkpoint is saved at each new best, and save_total_limit keeps "
                                          "it); the last checkpoint still holds the last step, to resume from.")
    early_stopping_patience: Optional[int] = option(None, "Stop after this many evaluations in a row without "
                                                    "improvement of metric_for_best_model (transformers' "
                                                    "EarlyStoppingCallback); unset: never stop early.")
    early_stopping_threshold: float = option(0.0, "How much metric_for_best_model must improve on the best so far "
                                             "to reset early_stopping_patience's count.")
    resume_from_checkpoint: Optional[str] = option(None, "latest, a run directory or a checkpoints/step-N "
                                                   "directory to resume from.")
    progress_bar: bool = option(True, "Show a progress bar (metric lines are printed either way).")
    report_to: Optional[Union[str, list]] = option(None, "Live trackers (TRL's report_to): wandb, tensorboard, mlflow "
                                                   "(MLFLOW_TRACKING_URI, else OUTPUT_DIR/mlflow.db), trackio "
                                                   "(TRACKIO_DIR), or a list of them; "
                                                   "none by default (metrics.jsonl is always written).")
    health_warnings: bool = option(True, "Warn about unhealthy training (loss stuck at ln 2, chosen log-probs "
                                   "below the reference, overfitting, exploding margins, grad_norm spikes); "
                                   "also recorded under warnings in metrics.jsonl.")

    # ------------------------------------------------------------------------
    def __post_init__(self):
        self.validate()

    @property
    def trackers(self) -> list:
        """``report_to`` as a list of tracker names (``none`` dropped)."""
        names = [self.report_to] if isinstance(self.report_to, str) else list(self.report_to or [])
        return [n for n in names if n != "none"]

    @property
    def eval_mode(self) -> str:
        """``eval_strategy`` resolved: ``no``, ``steps`` or ``epoch``."""
        if self.eval_steps == 0:
            return "no"
        return self.eval_strategy or ("steps" if self.eval_steps else "no")

    @property
    def best_metric_key(self) -> str:
        """``metric_for_best_model`` with its ``eval_`` prefix (transformers adds it too)."""
        name = self.metric_for_best_model
        return name if name.startswith("eval_") else f"eval_{name}"

    @property
    def best_is_greater(self) -> bool:
        """``greater_is_better`` resolved: unset means lower is better for a ``*loss`` metric."""
        if self.greater_is_better is not None:
            return self.greater_is_better
        return not self.best_metric_key.endswith("loss")

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    @property
    def target_modules(self) -> tuple:
        """``lora_target_modules`` (or the default) as a tuple; one string (``all-linear``) is one name."""
        names = self.lora_target_modules or DEFAULT_LORA_TARGETS
        return (names,) if isinstance(names, str) else tuple(names)

    @property
    def loss_types(self) -> list:
        return list(self.loss_type) if isinstance(self.loss_type, (list, tuple)) else [self.loss_type]

    def validate(self) -> None:
        """Coerce command-line strings to the fields' types, then check every option."""
        coerce_fields(self)
        check_choices(self)
        check_ranges(self)
        self.quantize = quantize_options(self.quantize)
        self.chat_template = chat_template_text(self.chat_template)
        check_combinations(self)

    # ---- (de)serialisation ---------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: Union[str, Path]) -> None:
        from ..util.io import atomic_write_text

        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "DPOConfig":
        return cls(**normalize_keys(values, source))

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[dict] = None,
                  refuse_code: bool = True) -> "DPOConfig":
        """Defaults < the file < ``overrides``. With ``refuse_code``, the file's settings that run code
        (``trust_remote_code``, ``module:function`` losses) need ``trust_remote_code`` in ``overrides``
        (:func:`.checks.check_file_code`)."""
        from_file, given = normalize_keys(load_yaml(path), str(path)), normalize_keys(overrides or {}, "command line")
        if refuse_code:
            allowed = as_bool("trust_remote_code", given.get("trust_remote_code", False))
            check_file_code(from_file, str(path), allowed)
        return cls(**{**from_file, **given})


def config_field_names() -> list:
    return [f.name for f in fields(DPOConfig)]


def config_keys(kind: str) -> tuple:
    """Config keys by what they take part in, derived from each field's role and ``keys``:

    - ``resume_match`` / ``resume_note`` / ``resume_free``: a change on resume is refused /
      reported / allowed silently;
    - ``data_cache``: every ``data`` key, plus those that join it (the seed of eval_split);
    - ``ref_cache``: every ``model`` key, plus those that join it;
    - ``card``: the keys shown in a model card's table.
    """
    out = []
    for f in fields(DPOConfig):
        meta = f.metadata
        if kind.startswith("resume_"):
            member = meta["resume"] == kind[len("resume_"):]
        elif kind in KEY_LISTS:
            role = {"data_cache": "data", "ref_cache": "model"}.get(kind)
            member = meta["role"] == role or kind in meta["keys"]
        else:
            raise ValueError(f"unknown key list {kind!r}")
        if member:
            out.append(f.name)
    return tuple(out)


def normalize_keys(values: dict, source: str = "config") -> dict:
    """Map aliases to canonical names; unknown keys raise, naming the closest key."""
    return canonical_keys(values, set(config_field_names()), source)


def resolve_config(config: Optional[Union[str, Path]] = None, **overrides) -> DPOConfig:
    """Defaults < YAML file < keyword overrides (the Python API and the CLI use this)."""
    if config is None:
        return DPOConfig.from_dict(overrides, "arguments")
    return DPOConfig.from_yaml(config, overrides)
