"""Typed configuration: one dataclass, one docstring per field, validated on construction.

The docstring under each field is the single source of its ``--help`` text (read with ``ast`` by
``field_docs``), so the CLI, the YAML keys and the Python API can never disagree. Values are merged
as: dataclass defaults < YAML file (``--config``) < command-line flags.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .data.layout import Layout
from .errors import ConfigError


@dataclass
class TrainConfig:
    """Everything `dpolab train` needs. Construct it in Python or from YAML + flags."""

    # --- what to train on ---------------------------------------------------------------------
    model: str = ""
    """Policy to train: a local folder with a Hugging Face causal LM, or a hub name (e.g. org/model). It is also the frozen reference, unless --reference-model names another."""
    data: str = ""
    """Training preference pairs: .jsonl/.json/.parquet/.csv (optionally .gz), a datasets.save_to_disk folder, or a hub dataset name."""
    output_dir: str = ""
    """Folder for config.yaml, metrics.jsonl, checkpoints/ and final/. Nothing is written there until the data validates."""
    data_split: str = "train"
    """Split to read from a hub dataset or a DatasetDict folder."""
    eval_data: Optional[str] = None
    """Held-out preference pairs for evaluation (same formats as --data). Excludes --eval-split."""
    eval_split: float = 0.0
    """Fraction of --data held out for evaluation (e.g. 0.05) when no --eval-data is given; 0 disables."""

    # --- the objective -------------------------------------------------------------------------
    loss: str = "sigmoid"
    """Loss from the registry (see the README's loss table): sigmoid (DPO; alias dpo), robust, hinge, ipo, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop, dpop, sigmoid_norm; reference-free simpo, cpo, orpo, sft; kto (unpaired examples); bradley_terry (alias reward) trains a reward model instead of a policy (dpolab reward train). A comma list trains on their weighted sum (e.g. sigmoid,sft)."""
    loss_weights: Optional[str] = None
    """Comma-separated weights, one per --loss name, for a mix of losses (e.g. 0.8,0.2); default 1 each."""
    objective: Optional[list[str]] = field(default=None, metadata={"repeat": "NAME=WEIGHT[:PATH]"})
    """Multi-objective DPO: repeat once per objective, e.g. --objective helpful=0.7 --objective harmless=0.3. Pairs name their objective in an 'objective' column; NAME=WEIGHT:PATH trains NAME on the pairs of its own file PATH; untagged pairs belong to the one objective given without a PATH. The loss is sum_k w_k x (mean loss over objective k's pairs) / sum_k w_k."""
    beta: float = 0.1
    """Strength of the KL constraint to the reference: higher stays closer to it. For simpo it scales the per-token margin (the paper uses about 2); for orpo it weighs the odds-ratio term."""
    label_smoothing: float = 0.0
    """Assumed probability that a preference label is flipped, in [0, 0.5): conservative DPO for sigmoid, the noise rate for robust."""
    exo_epsilon: float = 1e-3
    """exo_pair: the label smoothing epsilon of its target distribution, in (0, 0.5)."""
    discopop_tau: float = 0.05
    """discopop: temperature of the sigmoid that blends its logistic and exponential parts (> 0, at most 1)."""
    dpop_lambda: float = 50.0
    """dpop: weight of the penalty on the chosen log-prob falling below the reference (>= 0)."""
    simpo_gamma: float = 0.5
    """simpo: target reward margin gamma subtracted inside the sigmoid."""
    f_divergence: Literal["reverse_kl", "forward_kl", "js", "alpha"] = "reverse_kl"
    """f-DPO: the divergence to the reference that regularizes a pairwise loss (reverse_kl is standard DPO); each log-ratio u becomes f'(e^u)."""
    f_alpha: float = 0.5
    """--f-divergence alpha: the alpha in [0, 1) of (e^((alpha-1)u) - 1)/(alpha-1); 0 is forward KL, near 1 reverse KL."""
    wpo: bool = False
    """WPO: weight each pair's loss by the policy's per-token probability of its chosen times its rejected completion (detached)."""
    ld_alpha: float = 1.0
    """LD-DPO: weight in [0, 1] of completion tokens past the shorter completion of a pair, in policy and reference log-probs (1 = off)."""
    desirable_weight: float = 1.0
    """kto: weight of the loss on desirable examples (> 0)."""
    undesirable_weight: float = 1.0
    """kto: weight of the loss on undesirable examples (> 0); keep desirable_weight x desirable / (undesirable_weight x undesirable) in [1, 4/3]."""
    reference: Literal["precompute", "model"] = "precompute"
    """precompute: score the data with the frozen initial model once and cache it on disk (fast, no second copy in memory); model: keep a frozen copy and score every batch."""
    reference_model: Optional[str] = None
    """π_ref from another model (same tokenizer) instead of --model itself, e.g. the initial policy while --model continues from later weights; precomputed or held per --reference."""
    ref_sync_steps: Optional[int] = None
    """TR-DPO: every N optimizer steps, move the reference towards the policy (needs --reference model)."""
    ref_sync_alpha: float = 0.6
    """TR-DPO: the update ref = alpha x policy + (1 - alpha) x ref, alpha in (0, 1] (1 copies the policy)."""

    # --- β schedule and KL control (dpolab.control) --------------------------------------------
    beta_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """How beta moves over training: constant, or linear / cosine from --beta-start at the first step to --beta-end at the last."""
    beta_start: Optional[float] = None
    """Beta at the first step (> 0; default: --beta)."""
    beta_end: Optional[float] = None
    """Beta at the last step with --beta-schedule linear or cosine (> 0; default: --beta)."""
    kl_eval_steps: Optional[int] = None
    """Every N optimizer steps, estimate the KL divergence of the policy from the reference by sampling on held-out prompts (eval pairs, else training pairs) and log kl, kl_stderr. With the precomputed reference this keeps a copy of the initial weights on the CPU."""
    kl_prompts: int = 64
    """Prompts (distinct, the first ones) sampled once each per KL estimate."""
    kl_max_new_tokens: int = 64
    """Longest sampled completion in tokens for the KL estimate (temperature 1, no top-p)."""
    target_kl: Optional[float] = None
    """Adaptive beta: after each KL estimate multiply beta by exp(kl_adapt_rate x clip(kl / target_kl - 1, -0.2, 0.2)), raising it when KL overshoots the target (needs --kl-eval-steps)."""
    kl_adapt_rate: float = 1.0
    """--target-kl: the rate eta of the adaptive beta update (> 0); beta moves by at most a factor exp(0.2 eta) per estimate."""
    max_kl: Optional[float] = None
    """Stop training (saving final/ as usual) when a KL estimate exceeds this many nats (needs --kl-eval-steps)."""

    # --- online DPO (dpolab.online) ------------------------------------------------------------
    online: bool = False
    """Online DPO: every --online-every steps the current policy samples --online-samples completions of --online-prompts training prompts, --judge ranks them, and each prompt's best and worst sample join that step's batch as a pair. Fresh samples need the reference's weights: --reference precompute becomes model (a fresh LoRA adapter is scored with the adapter off, no copy)."""
    online_every: int = 1
    """--online: sample new pairs every N optimizer steps (1 = every step)."""
    online_only: bool = False
    """--online: train on the sampled pairs only; --data then supplies just the prompts (and the number of steps per epoch)."""
    judge: Optional[str] = None
    """--online: who ranks the samples: module:function (a reward function, e.g. dpolab.demo.grammar:review_reward), a reward model folder, or ai:MODEL (an AI judge, with --constitution)."""
    constitution: Optional[str] = None
    """--online with an ai:MODEL judge: the file of principles the AI judge applies."""
    online_prompts: Optional[int] = None
    """--online: prompts sampled per online step (default: --batch-size), taken in turn from the distinct training prompts in a seeded order."""
    online_samples: int = 2
    """--online: completions sampled per prompt (>= 2); the best and the worst make the pair, a tie makes none."""
    online_max_new_tokens: int = 64
    """--online: longest sampled completion in tokens (also cut to fit --max-length)."""
    online_temperature: float = 1.0
    """--online: sampling temperature (> 0; 1 samples the policy itself)."""

    # --- optimisation --------------------------------------------------------------------------
    learning_rate: float = 5e-6
    """Peak AdamW learning rate."""
    batch_size: int = 8
    """Preference pairs per micro-batch per process (each pair is two sequences: chosen and rejected); under torchrun with N processes a step takes N x batch_size x grad_accum pairs."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step; the effective batch is batch_size x grad_accum (x processes) pairs."""
    epochs: float = 1.0
    """Passes over the training data (fractions allowed). Ignored when --max-steps is set."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (overrides --epochs)."""
    warmup_ratio: float = 0.1
    """Fraction of the steps over which the learning rate rises linearly from 0 to its peak."""
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    seed: int = 0
    """Seed for shuffling, the eval split and initialisation: the same seed gives the same run."""

    # --- sequences -----------------------------------------------------------------------------
    max_length: int = 1024
    """Longest prompt + completion in tokens; completions are cut to fit."""
    max_prompt_length: int = 512
    """Longest prompt in tokens; longer prompts keep their last tokens (and the BOS token)."""
    num_proc: int = 1
    """Tokenize the data in this many worker processes (same result as 1; worth it from tens of thousands of pairs). Tokenized pairs are cached in --output-dir/cache either way."""
    streaming: bool = False
    """Read --data (any source it takes; folders and Hub names through datasets' IterableDataset) row by row and tokenize on the fly, shuffled in a bounded buffer, with reference log-probs in a memory-mapped file: for data larger than memory. Works under torchrun and with --resume. Needs --max-steps; no --eval-split (use --eval-data)."""

    # --- hardware ------------------------------------------------------------------------------
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 autocast where the CPU/GPU has fast bf16 units, else fp32. Master weights stay fp32."""
    device: str = "auto"
    """Where to train: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ... Under torchrun, cuda means cuda:LOCAL_RANK."""
    eval_batch_size: Optional[int] = None
    """Pairs per batch for evaluation and the reference pass (default: 2 x batch_size)."""

    # --- speed (each on/off switch gives the same log-probs up to float rounding) ---------------
    prefix_sharing: bool = True
    """Encode each prompt once per pair: one row prompt+chosen+rejected whose attention mask hides the chosen tokens from the rejected ones (same log-probs as two padded rows, fewer tokens)."""
    packing: bool = True
    """Pack several pairs into one row with a block-diagonal attention mask, so rows carry almost no padding."""
    pack_length: Optional[int] = None
    """Longest packed row in tokens (default: the longest pair of the batch, so attention costs no more than without packing)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of storing them: much less memory, about a third slower."""
    activation_offloading: bool = False
    """On GPU: keep the activations saved for the backward pass in pinned CPU memory instead of GPU memory (torch.autograd.graph.save_on_cpu): frees GPU memory for larger batches, costs transfer time. Nothing to move on CPU (a note says so)."""
    fsdp: bool = False
    """Under torchrun, shard weights, gradients and optimizer state across processes with PyTorch FSDP2 instead of replicating them (DDP)."""
    deepspeed: Optional[str] = None
    """DeepSpeed JSON config (e.g. examples/deepspeed/zero3.json): train under a DeepSpeed ZeRO engine (pip install deepspeed); "auto" or missing batch, accumulation, clipping and bf16 values are filled from these options. Launch with torchrun or accelerate launch for several processes."""

    # --- LoRA ----------------------------------------------------------------------------------
    lora_r: Optional[int] = None
    """Train a LoRA adapter of this rank (needs peft) instead of all weights; the reference is then the same model with the adapter off, not a second copy. Unset or 0: full fine-tuning. To continue training an adapter, pass its folder as --model."""
    lora_alpha: Optional[float] = None
    """LoRA scaling alpha: the adapter's update is multiplied by alpha / r (default: 2 x lora_r)."""
    lora_dropout: float = 0.0
    """Dropout in [0, 1) on the input of the LoRA adapters during training (0 keeps policy log-probs deterministic)."""
    lora_target_modules: Optional[str] = None
    """Comma list of module names to adapt (e.g. q_proj,v_proj); default: every linear layer of the model except the LM head."""
    merge_lora: bool = False
    """Also write final-merged/: the adapter merged into the base weights, a plain model that AutoModelForCausalLM loads without peft."""

    # --- monitoring and outputs ----------------------------------------------------------------
    logging_steps: int = 10
    """Write a metrics row every N optimizer steps (the first and last steps are always logged)."""
    eval_steps: Optional[int] = None
    """Evaluate every N optimizer steps (default: only at the end). Needs eval data."""
    early_stopping_patience: Optional[int] = None
    """Stop when eval loss has not improved for this many evaluations. Needs --eval-steps."""
    save_steps: Optional[int] = None
    """Save a checkpoint to checkpoints/step-N/ every N optimizer steps (default: only final/)."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also send metrics to a tracker (metrics.jsonl is always written)."""
    run_name: Optional[str] = None
    """Name of the run in trackers (default: the output folder's name)."""
    progress: bool = True
    """Show progress bars."""
    trust_remote_code: bool = False
    """Allow model repositories to run their own Python code (only for models you trust)."""
    allow_pickle: bool = False
    """Allow loading model weights from pickle files (pytorch_model.bin), which can run code; by default only safetensors load."""

    # --- reliability ---------------------------------------------------------------------------
    resume: Optional[str] = field(default=None, metadata={"const": "latest"})
    """Continue a run from a checkpoint: --resume alone takes the newest one in --output-dir/checkpoints, --resume PATH a given step-N folder."""
    resume_force: bool = False
    """Resume even if the checkpoint was made with another config or data (the differences are printed)."""
    save_total_limit: Optional[int] = None
    """Keep only the newest K checkpoints (older ones are deleted once a newer one is complete)."""
    max_skipped_steps: int = 10
    """Stop the run after this many optimizer steps in a row skipped for a non-finite loss or gradient."""
    strict: bool = False
    """Refuse data with rows that would be dropped (identical pairs) or altered (prompts longer than max_prompt_length) instead of dropping/truncating and counting them."""

    def __post_init__(self) -> None:
        from .validation import validate  # late import: the rules import the losses

        for name in ("loss", "loss_weights"):  # YAML lists, e.g. loss: [sigmoid, sft], read as a comma list
            if isinstance(getattr(self, name), (list, tuple)):
                setattr(self, name, ",".join(str(v) for v in getattr(self, name)))
        from .objectives import normalise  # YAML forms: a list, or a mapping name: weight

        self.objective = normalise(self.objective)
        _coerce_types(self)
        validate(self)

    # --- helpers -------------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        """How batches are laid out in rows (``dpolab.data.layout``)."""
        return Layout(prefix_sharing=self.prefix_sharing, packing=self.packing, pack_length=self.pack_length)

    @property
    def effective_eval_batch_size(self) -> int:
        return self.eval_batch_size or 2 * self.batch_size

    @property
    def loss_weight_values(self) -> Optional[tuple[float, ...]]:
        """--loss-weights as numbers (None when not given)."""
        if self.loss_weights is None:
            return None
        return tuple(float(w) for w in self.loss_weights.split(","))

    def loss_hyperparameters(self) -> dict[str, Any]:
        """Keyword arguments every loss function (and objective) receives besides beta and the lengths."""
        return {"label_smoothing": self.label_smoothing, "exo_epsilon": self.exo_epsilon,
                "discopop_tau": self.discopop_tau, "dpop_lambda": self.dpop_lambda, "simpo_gamma": self.simpo_gamma,
                "loss_weights": self.loss_weight_values, "f_divergence": self.f_divergence, "f_alpha": self.f_alpha,
                "wpo": self.wpo, "ld_alpha": self.ld_alpha, "desirable_weight": self.desirable_weight,
                "undesirable_weight": self.undesirable_weight, "ref_sync_steps": self.ref_sync_steps,
                "ref_sync_alpha": self.ref_sync_alpha}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        return cls(**{**read_yaml(path), **overrides})


REQUIRED = ("model", "data", "output_dir")
"""Fields without which ``dpolab train`` cannot run (an empty value is refused by ``dpolab.validation``)."""


# ---------------------------------------------------------------------------------------------
# Field metadata: types and docstrings, shared by the CLI and the YAML reader
# ---------------------------------------------------------------------------------------------

def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """Map each dataclass field to the docstring written under it in the class body."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


@functools.lru_cache(maxsize=None)
def _type_hints(cls: type) -> dict[str, Any]:
    """Resolved annotations, once per class: re-evaluating them for every field made each config cost ~70 ms."""
    return typing.get_type_hints(cls)


def field_kind(cls: type, name: str) -> tuple[type, tuple | None, bool]:
    """(base type, choices or None, optional?) of a field, from its annotation."""
    hint = _type_hints(cls)[name]
    optional = False
    if typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is Literal:
        return str, typing.get_args(hint), optional
    return hint, None, optional


def _coerce_types(cfg: Any) -> None:
    """Check (and gently convert) every field's type, so YAML typos fail here, named."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        base, choices, optional = field_kind(type(cfg), f.name)
        if value is None:
            if not (optional or f.name in REQUIRED):
                raise ConfigError(f.name, "must not be empty", "give a value or remove the key")
            continue
        setattr(cfg, f.name, _convert(f.name, value, base, choices))


def _convert(name: str, value: Any, base: type, choices: tuple | None) -> Any:
    if typing.get_origin(base) is list:  # a repeatable flag (e.g. --objective): each item converted alike
        if not isinstance(value, (list, tuple)):
            raise ConfigError(name, f"expected a list, got {type(value).__name__} {value!r}", "write a YAML list")
        return [_convert(name, v, typing.get_args(base)[0], choices) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(name, f"expected true or false, got {value!r}", "write true or false")
    if base in (int, float):
        if isinstance(value, bool):
            raise ConfigError(name, f"expected a number, got {value!r}", f"write a {base.__name__}")
        try:
            out = base(value) if not (base is int and isinstance(value, float) and not value.is_integer()) else None
        except (TypeError, ValueError):
            out = None
        if out is None or (base is float and out != out):
            raise ConfigError(name, f"expected a {'whole number' if base is int else 'number'}, got {value!r}",
                              f"write e.g. --{name.replace('_', '-')} {'8' if base is int else '0.1'}")
        return out
    if not isinstance(value, (str, Path)):
        raise ConfigError(name, f"expected text, got {type(value).__name__} {value!r}", "quote the value")
    value = str(value)
    if choices is not None and value not in choices:
        raise ConfigError(name, f"unknown value '{value}'", _suggest(value, choices, "choose one of"))
    return value


def _suggest(word: str, options, lead: str) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}{lead}: {', '.join(sorted(options))}"


def load_yaml_file(path: str | Path, field: str, syntax_fix: str) -> Any:
    """The parsed content of a YAML file; a missing file or a syntax error is a ConfigError on ``field``
    (naming the line), with ``syntax_fix`` as the fix for the latter."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(field, f"file not found: {p}", f"check the path given to --{field.replace('_', '-')}")
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise ConfigError(field, f"{p} is not valid YAML{where}", syntax_fix) from None


def read_yaml(path: str | Path, cls: type = TrainConfig) -> dict[str, Any]:
    """Read a YAML config file into field values (dashes in keys are accepted), rejecting unknown keys."""
    p = Path(path)
    raw = load_yaml_file(p, "config", "fix the syntax (key: value per line)")
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError("config", f"{p} must hold a mapping of keys to values, found {type(raw).__name__}",
                          "write one 'key: value' per line")
    names = {f.name for f in dataclasses.fields(cls)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise ConfigError(str(key), f"unknown key in {p}", _suggest(name, names, "valid keys are"))
        out[name] = value
    return out
