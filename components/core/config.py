"""Typed, validated parameters: one pydantic model per `params.yaml` section.

`load_params("params.yaml")` fails at start with a message naming the offending key
(`dpo.beta: Input should be greater than 0`), so a typo never silently trains with a default.
Stages take their section (and `Runtime`, the few settings they read from other sections); the small pure
functions below them take flat arguments.

Why this file is long: it is params.yaml's schema, one model per section, read side by side with the file.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

EMBEDDED = "embedded"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ComputeConfig(Strict):
    # configs/accelerate/<name>.yaml; the launcher checks that the file exists (core/ops/launch.py)
    accelerate_config: str = Field("cpu", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    deterministic: bool = True  # deterministic kernels, recorded with each run (core/ops/determinism.py)


class ModelConfig(Strict):
    name_or_path: str = EMBEDDED
    trust_remote_code: bool = False
    # a .gguf name_or_path (a file, or package:file.gguf): the dtype its dequantised weights are saved in, and the
    # file's expected sha256 ("" = not pinned; the stage records the hash either way)
    gguf_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gguf_sha256: str = Field("", pattern=r"^([0-9a-f]{64})?$")
    hidden_size: int = Field(128, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int = Field(2, gt=0)
    intermediate_size: int = Field(384, gt=0)
    vocab_size: int = Field(512, ge=300)
    max_position_embeddings: int = Field(128, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})")
        return self


class SyntheticConfig(Strict):
    enabled: bool = True
    n_sft: int = Field(3000, ge=0)
    n_preference: int = Field(3000, ge=0)
    min_items: int = Field(3, ge=1)
    max_items: int = Field(6, ge=1)
    max_value: int = Field(30, ge=1)
    demo_noise: float = Field(0.4, ge=0.0, le=1.0)
    tool_demos: int = Field(0, ge=0)  # tool-task demonstrations (core/lockers.py) in sft.jsonl; > 0: the tokenizer learns tool calls
    tool_call_share: float = Field(0.8, ge=0.0, le=1.0)  # of those, the share that call the tool (the rest answer directly)

    @model_validator(mode="after")
    def _range(self) -> SyntheticConfig:
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) > max_items ({self.max_items})")
        return self


class SourceConfig(Strict):
    """A local file or directory (a DVC dependency of prepare, through the `sources` stage)."""

    path: str = Field(min_length=1)
    kind: Literal["auto", "sft", "preference", "unpaired"] = "auto"
    # canonical field -> the file's field, for files whose names differ (like LLaMA-Factory's dataset_info)
    columns: dict[str, str] = {}


class HubSourceConfig(Strict):
    """A Hugging Face hub dataset. Pin `revision` (a commit): params are DVC deps, the hub is not."""

    name: str = Field(min_length=1)
    split: str | None = None
    revision: str | None = None
    kind: Literal["auto", "sft", "preference", "unpaired"] = "auto"
    columns: dict[str, str] = {}


class DataConfig(Strict):
    sources: list[SourceConfig] = []
    hub_sources: list[HubSourceConfig] = []
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_length: int = Field(128, gt=0)
    max_prompt_length: int = Field(96, gt=0)
    dedupe: bool = True
    min_kept_fraction: float = Field(0.5, ge=0.0, le=1.0)
    skip_invalid_json: bool = False
    num_proc: int = Field(0, ge=0)  # prepare's tokenising processes; 0 = every available core. Same output for any

    @model_validator(mode="after")
    def _lengths(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError(f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})")
        if not self.sources and not self.hub_sources:
            raise ValueError("no data: set data.sources (local files) or data.hub_sources")
        return self


class LoraConfig(Strict):
    enabled: bool = False
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainLoopConfig(Strict):
    """The loop settings SFT and DPO share (same meaning in both sections)."""

    max_steps: int = Field(0, ge=0)
    epochs: int = Field(1, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, ge=0.0)
    # stop (no update applied, last checkpoint kept) when a step's loss or gradient norm exceeds this many
    # times its value at the run's first step (at least 1.0): divergence without a NaN
    divergence_factor: float = Field(100.0, gt=1.0)
    eval_every: int = Field(50, gt=0)
    save_every: int = Field(100, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(10, gt=0)
    # recompute activations in backward (memory for ~30% more compute); auto = on above 100M parameters, like TRL
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    lora: LoraConfig = LoraConfig()
    # the output is the model of the best held-out row (every eval_every steps) instead of the last step's
    keep_best: bool = False
    best_metric: str = Field("eval/loss", pattern=r"^eval/")  # a held-out metric of the stage's plots
    best_mode: Literal["min", "max"] = "min"

    @model_validator(mode="after")
    def _keep_best(self) -> TrainLoopConfig:
        if self.keep_best and self.lora.enabled:
            raise ValueError("keep_best with lora.enabled is not supported: saving a LoRA model merges its adapter")
        return self


def _check_in_backward(cfg: TrainLoopConfig, enabled: bool) -> None:
    """The fused step sees one backward's gradient of one parameter at a time: no accumulation over
    micro-batches, no global-norm clipping (it needs every gradient before any update); as torchtune's."""
    if enabled and cfg.grad_accum != 1:
        raise ValueError(f"optimizer_in_backward needs grad_accum: 1, not {cfg.grad_accum}: each parameter "
                         "is stepped in the backward of every micro-batch")
    if enabled and cfg.max_grad_norm != 0:
        raise ValueError(f"optimizer_in_backward needs max_grad_norm: 0 (no clipping), not "
                         f"{cfg.max_grad_norm}: clipping to a global norm needs every gradient before any update")


class SFTConfig(TrainLoopConfig):
    # several examples per row up to data.max_length, each with its own positions and a block-diagonal mask
    # (padding-free, core/data/packing.py); the loss is the same token mean as without it
    packing: bool = False
    # step each parameter's AdamW inside backward as soon as its gradient is complete, then drop that gradient
    # (core/train/in_backward.py): no whole-model gradient buffer, the same update; needs grad_accum 1,
    # max_grad_norm 0 and one process
    optimizer_in_backward: bool = False

    @model_validator(mode="after")
    def _in_backward(self) -> SFTConfig:
        _check_in_backward(self, self.optimizer_in_backward)
        return self


class ReferenceConfig(Strict):
    batch_size: int = Field(64, gt=0)
    # planned: score the training pairs the dpo run's plan visits (dpo.max_steps/batch_size/grad_accum/epochs,
    # seed) and every eval pair; a run shorter than an epoch pays only for what it uses. all: every pair.
    pairs: Literal["planned", "all"] = "planned"
    # score the pairs end to end in rows without padding (core/data/pair_packing.py): the same log-probs, less
    # compute on pairs of mixed lengths; models that cannot take a custom 4D mask score as without it
    padding_free: bool = False


# The preference losses `dpo.loss` accepts; core/algos/losses.py implements each (and imports this list).
LOSSES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "simpo", "orpo", "kto")
LossName = Literal[LOSSES]


class DPOConfig(TrainLoopConfig):
    loss: LossName = "sigmoid"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    simpo_gamma: float = Field(0.5, ge=0.0)
    orpo_alpha: float = Field(1.0, gt=0.0)
    kto_desirable_weight: float = Field(1.0, gt=0.0)
    kto_undesirable_weight: float = Field(1.0, gt=0.0)
    rpo_alpha: float = Field(0.0, ge=0.0)
    optimizer_in_backward: bool = False  # as sft's
    # the micro-batch's pairs end to end in rows without padding, each with its own positions and a block mask
    # (core/data/pair_packing.py): the same log-probs and gradients, less compute on pairs of mixed lengths
    padding_free: bool = False

    @model_validator(mode="after")
    def _per_loss(self) -> DPOConfig:
        # Label smoothing has a meaning only for the losses that model label noise.
        if self.label_smoothing > 0 and self.loss not in ("cdpo", "robust", "simpo"):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} only applies to loss cdpo, robust or simpo, not {self.loss!r}"
            )
        if self.loss in ("cdpo", "robust") and self.label_smoothing == 0:
            raise ValueError(f"loss {self.loss!r} needs label_smoothing > 0 (with 0 it is plain sigmoid DPO)")
        return self

    @model_validator(mode="after")
    def _in_backward(self) -> DPOConfig:
        _check_in_backward(self, self.optimizer_in_backward)
        return self


class RewardSpec(Strict):
    name: str = Field(min_length=1)  # components/core/algos/reward_functions.py REWARD_FUNCTIONS, or "package.module:function"
    weight: float = 1.0
    # a remote reward (core/algos/remote_reward.py): `name` labels it, the service at `url` scores batches over HTTP
    url: str | None = Field(None, pattern=r"^https?://")
    timeout_s: float = Field(30.0, gt=0.0)  # per request
    retries: int = Field(3, ge=0)  # after the first attempt, with exponential backoff from 0.5 s
    batch_size: int = Field(64, gt=0)  # items per request


class GRPOConfig(Strict):
    """Online RL with verifiable rewards (GRPO, Dr. GRPO, DAPO): every default spelled out, with its source."""

    enabled: bool = True  # false: the stage writes placeholders only (data without a verifiable reward)
    max_steps: int = Field(60, gt=0)  # optimizer steps
    prompts_per_step: int = Field(16, gt=0)  # prompts per generation round (global, all processes)
    num_generations: int = Field(8, ge=2)  # G: completions per prompt (the group)
    generation_batch_size: int = Field(8, gt=0)  # prompts per generate() call (x G rows)
    micro_batch_size: int = Field(64, gt=0)  # completions per forward/backward (whole groups, at least one)
    max_completion_length: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    learning_rate: float = Field(1e-6, gt=0.0)  # TRL's GRPOConfig default, for real models
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "constant"
    max_grad_norm: float = Field(1.0, ge=0.0)
    beta: float = Field(0.0, ge=0.0)  # k3 KL to the reference (TRL >= 0.19: 0.0); 0 = reference never loaded
    epsilon_low: float = Field(0.2, ge=0.0, lt=1.0)  # clip range below 1 (PPO / GRPO)
    epsilon_high: float = Field(0.2, ge=0.0)  # above 1; DAPO's clip-higher uses 0.28
    num_iterations: int = Field(1, gt=0)  # mu: optimizer steps per generation round (old log-probs kept when > 1)
    scale_rewards: Literal["group", "batch", "none"] = "group"
    # TRL 1.16's names: dapo (its default), grpo, bnpo, dr_grpo; cispo (MiniMax-M1: set epsilon_high 5.0, the
    # paper's), sapo (soft gate), luspo (needs importance_sampling_level: sequence). core/algos/rl.py has each
    # online_dpo: each group's best and worst completion by reward as a DPO pair, sigmoid loss with dpo_beta
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "online_dpo"] = "dapo"
    dpo_beta: float = Field(0.1, gt=0.0)  # online_dpo's beta (TRL OnlineDPOConfig's default)
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's one weight per completion
    sapo_temperature_pos: float = Field(1.0, gt=0.0)  # sapo's gate temperature for A > 0 (TRL's default)
    sapo_temperature_neg: float = Field(1.05, gt=0.0)  # and for A <= 0
    mask_truncated_completions: bool = False  # DAPO: completions without an end-of-turn carry no loss
    dynamic_sampling: bool = False  # DAPO: drop zero-std groups and generate more prompts to refill
    max_resample_rounds: int = Field(3, ge=0)  # dynamic sampling: extra generation rounds before giving up
    rewards: list[RewardSpec] = [RewardSpec(name="sorting")]
    # pref: the preference pairs' prompts (data/prepared/pref_train.jsonl); sft: the SFT conversations' (sft_train);
    # tools: the SFT records that offer tools, up to their first assistant turn (an environment's task)
    prompts: Literal["pref", "sft", "tools"] = "pref"
    zero_std_warning: float = Field(0.5, ge=0.0, le=1.0)  # warn when frac_reward_zero_std stays above it
    divergence_factor: float = Field(100.0, gt=1.0)
    save_every: int = Field(20, gt=0)
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(5, gt=0)
    gradient_checkpointing: bool | Literal["auto"] = "auto"  # as sft/dpo: auto = on above 100M parameters
    lora: LoraConfig = LoraConfig()
    # as sft/dpo's (core/train/in_backward.py): each parameter's AdamW steps in backward; needs one micro-batch
    # per step (micro_batch_size >= prompts_per_step x num_generations), max_grad_norm 0 and one process
    optimizer_in_backward: bool = False
    # asynchronous rollouts (core/train/async_rounds.py): a generator thread with its own copy of the weights samples
    # round r with the weights of round r - max_staleness while the trainer updates; 0 = the synchronous loop
    max_staleness: int = Field(0, ge=0)
    # the off-policy correction of an asynchronous round (TRL 1.16's vLLM importance-sampling correction):
    # pi_old / pi_sampler per token or per sequence, truncated to [is_clip_min, is_clip_max] or masked outside it
    is_correction_mode: Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = "token_truncate"
    is_clip_max: float | None = Field(3.0, gt=0.0)  # TRL's C_max
    is_clip_min: float | None = Field(None, ge=0.0)  # TRL's C_min (None: no lower bound)
    # held-out reward: every eval_every steps (0: never), one completion for each of the first eval_prompts prompts of
    # data/prepared/<prompts>_eval.jsonl, the same seeds each time; logged as eval/reward (and eval/reward/<fn>)
    eval_every: int = Field(0, ge=0)
    eval_prompts: int = Field(64, gt=0)
    keep_best: bool = False  # as sft/dpo's: the output is the model at the best held-out row (needs eval_every)
    best_metric: str = Field("eval/reward", pattern=r"^eval/")
    best_mode: Literal["min", "max"] = "max"
    # multi-turn rollouts with tools (core/algos/environments.py, core/train/episodes.py): "" = single-turn;
    # lockers = the embedded tool task (core/lockers.py, prompts: tools); or package.module:Class. max_completion_length then bounds all
    # of an episode's tokens (its turns and the tool results between them)
    environment: str = ""
    max_turns: int = Field(3, ge=1)  # assistant turns per episode (an environment's own max_turns wins)

    @model_validator(mode="after")
    def _in_backward(self) -> GRPOConfig:
        if self.optimizer_in_backward and self.micro_batch_size < self.prompts_per_step * self.num_generations:
            raise ValueError(f"optimizer_in_backward needs one micro-batch per step: micro_batch_size >= "
                             f"prompts_per_step x num_generations ({self.prompts_per_step * self.num_generations}), "
                             f"not {self.micro_batch_size} (each backward would step every parameter)")
        if self.optimizer_in_backward and self.max_grad_norm != 0:
            raise ValueError(f"optimizer_in_backward needs max_grad_norm: 0 (no clipping), not "
                             f"{self.max_grad_norm}: clipping to a global norm needs every gradient before any update")
        return self

    @property
    def needs_reference(self) -> bool:
        """The reference model's log-probs: for the KL term (beta > 0) or online DPO's loss."""
        return self.beta > 0 or self.loss_type == "online_dpo"

    @model_validator(mode="after")
    def _consistent(self) -> GRPOConfig:
        if self.save_every % self.num_iterations:
            raise ValueError(f"save_every ({self.save_every}) must be a multiple of num_iterations "
                             f"({self.num_iterations}): checkpoints fall between generation rounds")
        if not self.rewards and not self.environment:
            raise ValueError("rewards: at least one reward function (or an environment, whose reward it is)")
        if self.loss_type == "online_dpo" and self.beta != 0:
            raise ValueError("loss_type online_dpo keeps the policy near the reference through its DPO loss "
                             f"(dpo_beta): set beta: 0, not {self.beta}")
        if self.eval_every and self.max_staleness:
            raise ValueError("eval_every with max_staleness > 0 is not supported: held-out sampling would race the "
                             "rollout thread for torch's random numbers")
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best needs eval_every > 0: the held-out reward it keeps the best of")
        if self.keep_best and self.lora.enabled:
            raise ValueError("keep_best with lora.enabled is not supported: saving a LoRA model merges its adapter")
        if self.loss_type == "online_dpo" and self.max_staleness:
            raise ValueError("loss_type online_dpo judges pairs sampled by the current policy: max_staleness must be 0")
        if self.loss_type == "luspo" and self.importance_sampling_level != "sequence":
            raise ValueError("loss_type luspo is GSPO's sequence loss scaled by length: it needs "
                             "importance_sampling_level: sequence")
        return self


class RewardModelConfig(TrainLoopConfig):
    """Bradley-Terry reward model on the preference pairs (TRL RewardTrainer's loss; loop settings as sft/dpo)."""

    enabled: bool = True  # false: placeholders only (ppo then needs reward: functions)
    center_rewards_coefficient: float | None = Field(None, ge=0.0)  # TRL's default None; 0.01 in its docs' example
    use_margin: bool = True  # use a pair's `margin` field when the data has one: -log σ(r_c - r_r - margin)
    calibration_bins: int = Field(10, ge=2)
    init_seed: int | None = None  # seed of the new score head (None: the global seed)

    @model_validator(mode="after")
    def _no_keep_best(self) -> RewardModelConfig:
        if self.keep_best:
            raise ValueError("keep_best is sft's and dpo's: the reward model's calibration and held-out scores are "
                             "of its last step")
        return self


class PPOConfig(Strict):
    """The classic-RLHF online stages ppo and rloo (components/ppo.py, components/rloo.py), one section: defaults
    as TRL's PPOConfig (ppo) and RLOOConfig (rloo), every one written into the run's metrics and MLflow params.
    The rloo stage reads it with its `rloo:` overrides applied (`for_mode("rloo")`)."""

    enabled: bool = True  # false: placeholders only
    reward: Literal["reward_model", "functions"] = "reward_model"  # the trained RM, or the reward functions below
    rewards: list[RewardSpec] = [RewardSpec(name="sorting")]  # reward: functions (as grpo.rewards)
    max_steps: int = Field(40, gt=0)  # generation rounds (each: num_ppo_epochs x num_mini_batches updates)
    prompts_per_step: int = Field(16, gt=0)  # prompts per round (global)
    num_generations: int = Field(4, ge=2)  # rloo: G samples per prompt for the leave-one-out baseline (ppo: 1)
    generation_batch_size: int = Field(16, gt=0)  # prompts per generate() call
    micro_batch_size: int = Field(16, gt=0)  # completions per forward/backward
    max_completion_length: int = Field(53, gt=0)  # TRL PPOConfig response_length
    temperature: float = Field(0.7, gt=0.0)  # TRL PPOConfig 0.7 (RLOOConfig 1.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    learning_rate: float = Field(3e-6, gt=0.0)  # TRL PPOConfig
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    scheduler: Literal["cosine", "linear", "constant"] = "linear"
    max_grad_norm: float = Field(1.0, ge=0.0)
    kl_coef: float = Field(0.05, ge=0.0)  # per-token KL penalty in the reward (ppo); RLOO's beta (sequence KL)
    kl_estimator: Literal["k1", "k3"] = "k1"
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller: kl_coef follows target_kl
    target_kl: float = Field(6.0, gt=0.0)
    kl_horizon: int = Field(10000, gt=0)
    num_ppo_epochs: int = Field(4, gt=0)  # passes over each round's rollouts
    num_mini_batches: int = Field(1, gt=0)  # optimizer steps per pass
    cliprange: float = Field(0.2, gt=0.0)  # policy ratio clip (both modes)
    cliprange_value: float = Field(0.2, gt=0.0)
    vf_coef: float = Field(0.1, ge=0.0)
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    lam: float = Field(0.95, ge=0.0, le=1.0)
    whiten_rewards: bool = False
    normalize_advantages: bool = False  # rloo (TRL RLOOConfig default); ppo always whitens advantages
    missing_eos_penalty: float | None = None  # subtracted from the score of a completion with no end token
    value_init: Literal["reward_model", "sft"] = "reward_model"  # where the value model starts (TRL: the RM)
    divergence_factor: float = Field(100.0, gt=1.0)
    save_every: int = Field(10, gt=0)  # rounds between checkpoints
    keep_checkpoints: int = Field(2, gt=0)
    log_every: int = Field(5, gt=0)
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # held-out reward (the reward functions, the "true reward"), as grpo's: every eval_every rounds (0: never), one
    # completion for each of the first eval_prompts prompts of data/prepared/pref_eval.jsonl, the same seeds each time
    eval_every: int = Field(0, ge=0)
    eval_prompts: int = Field(64, gt=0)
    keep_best: bool = False  # the output is the policy at the best held-out row (needs eval_every > 0)
    best_metric: str = Field("eval/reward", pattern=r"^eval/")
    best_mode: Literal["min", "max"] = "max"
    rloo: dict = {}  # keys of this section that differ in the rloo stage (e.g. num_ppo_epochs: 1 as TRL's RLOO)

    @model_validator(mode="after")
    def _consistent(self) -> PPOConfig:
        if self.reward == "functions" and not self.rewards:
            raise ValueError("reward: functions needs at least one entry in rewards")
        if self.prompts_per_step % self.num_mini_batches:
            raise ValueError(f"prompts_per_step ({self.prompts_per_step}) must be a multiple of num_mini_batches "
                             f"({self.num_mini_batches}): every minibatch is one optimizer step of the schedule")
        if self.adaptive_kl and self.kl_coef == 0:
            raise ValueError("adaptive_kl multiplies kl_coef: start it above 0")
        if self.keep_best and not self.eval_every:
            raise ValueError("keep_best needs eval_every > 0: the held-out reward it keeps the best of")
        if "rloo" in self.rloo or "enabled" in self.rloo:
            raise ValueError("rloo: overrides the rloo stage's training keys only (not rloo or enabled)")
        if self.rloo:
            self.for_mode("rloo")  # unknown keys and bad values fail at load time, named
        return self

    def for_mode(self, mode: str) -> PPOConfig:
        """The settings of one stage (`mode`: ppo or rloo): this section, with `rloo` applied for the rloo stage."""
        if mode != "rloo" or not self.rloo:
            return self
        try:
            return PPOConfig.model_validate({**self.model_dump(exclude={"rloo"}), **self.rloo})
        except ValidationError as e:
            raise ValueError("rloo: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                  for err in e.errors())) from None


class EvaluateConfig(Strict):
    num_prompts: int = Field(200, ge=0)
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    batch_size: int = Field(64, gt=0)
    judge: Literal["synthetic", "reward_model", "function"] = "synthetic"
    judge_path: str = ""
    bootstrap_samples: int = Field(1000, ge=100)
    num_samples_in_report: int = Field(12, ge=0)
    base: bool = False  # also measure models/base: what SFT did to the reward, with a CI

    @model_validator(mode="after")
    def _judge_path(self) -> EvaluateConfig:
        if self.judge != "synthetic" and not self.judge_path:
            raise ValueError(f"judge {self.judge!r} needs judge_path")
        if self.judge == "function" and ":" not in self.judge_path:
            raise ValueError(f"judge_path for a function judge is 'package.module:function', got {self.judge_path!r}")
        return self


class GateConfig(Strict):
    # promotion re-scores both models per prompt with the judge: the judge's mean is the metric
    primary_metric: Literal["eval/reward_mean"] = "eval/reward_mean"
    min_delta: float = 0.0
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    max_kl: float = Field(50.0, gt=0.0)
    max_length_ratio: float = Field(2.0, gt=0.0)
    # a bootstrap over a handful of prompts is no evidence: refuse to promote on fewer
    min_prompts: int = Field(50, ge=1)


class RegisterConfig(Strict):
    model_name: str = Field("alignflow-default", min_length=1)
    candidate: Literal["dpo", "grpo", "ppo", "rloo"] = "dpo"  # which trained policy register proposes (models/<candidate>)
    # held-out prompts whose served greedy answers must equal the pipeline's (serving parity, required by the gate)
    parity_prompts: int = Field(8, ge=1)
    gate: GateConfig = GateConfig()


class Params(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    seed: int = 1234
    compute: ComputeConfig = ComputeConfig()
    model: ModelConfig = ModelConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    data: DataConfig
    sft: SFTConfig = SFTConfig()
    reference: ReferenceConfig = ReferenceConfig()
    dpo: DPOConfig = DPOConfig()
    grpo: GRPOConfig = GRPOConfig()
    reward_model: RewardModelConfig = RewardModelConfig()
    ppo: PPOConfig = PPOConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # "register" would shadow a pydantic attribute; the params file still says `register:`.
    registry: RegisterConfig = Field(RegisterConfig(), alias="register")

    @model_validator(mode="after")
    def _in_backward_one_process(self) -> Params:
        launch = self.compute.accelerate_config
        for name in ("sft", "dpo", "grpo"):
            if getattr(self, name).optimizer_in_backward and launch in ("multi_gpu", "fsdp"):
                raise ValueError(f"{name}.optimizer_in_backward needs one process, not "
                                 f"compute.accelerate_config: {launch} (each parameter would be stepped on "
                                 "its local gradient, before DDP / FSDP reduce it over processes)")
        if self.grpo.environment and launch == "fsdp":
            raise ValueError("grpo.environment with compute.accelerate_config: fsdp is not supported: each process's "
                             "episodes take their own number of turns, and FSDP's generate needs every process in "
                             "step (use multi_gpu)")
        return self


class Runtime(Strict):
    """What a stage reads from outside its own section: the seed, `compute.mixed_precision`,
    `model.trust_remote_code` and the data lengths. Stages take it beside their section:
    `run(cfg: <Section>Config, *, <paths>, runtime: Runtime, track: bool) -> dict`."""

    seed: int = 1234
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    trust_remote_code: bool = False
    max_length: int = Field(128, gt=0)
    max_prompt_length: int = Field(96, gt=0)
    deterministic: bool = True

    @classmethod
    def of(cls, p: Params) -> Runtime:
        return cls(seed=p.seed, mixed_precision=p.compute.mixed_precision, trust_remote_code=p.model.trust_remote_code,
                   max_length=p.data.max_length, max_prompt_length=p.data.max_prompt_length,
                   deterministic=p.compute.deterministic)


class ParamsError(ValueError):
    """A params file that does not validate; the message names file and key."""


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: top level must be a mapping of sections")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"]) or "<root>"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {key}: {msg}")
        raise ParamsError(f"{path}: invalid parameters\n" + "\n".join(lines)) from None


def params_hash(section: BaseModel | dict) -> str:
    """Stable short hash of a section (lineage tags, checkpoint fingerprints)."""
    data = section.model_dump() if isinstance(section, BaseModel) else section
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]
