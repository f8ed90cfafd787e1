"""LoRA (low-rank adapters, through peft): train a small adapter instead of every weight.

Each targeted linear layer W (out × in) gets a trainable update (alpha / r) · B·A with A (r × in) and
B (out × r); W stays frozen. peft starts B at zero, so a fresh adapter computes exactly the base model.

The reference π_ref, without a second copy of the weights in memory:

* **fresh adapter** (``--lora-r``): π_ref is the base model, i.e. the same model with its adapters
  disabled (peft's ``disable_adapter``). The precomputed pass and ``--reference model`` both score that
  way, so the reference never moves while the adapter trains.
* **continued adapter** (``--model`` is a folder holding ``adapter_config.json``): π_ref is the adapter
  *as loaded*, before any update, not the base model: that is the policy this run starts from (step-1
  loss ln 2). The precomputed pass scores the model with the loaded adapter active before the first step.
  ``--reference model`` would have to keep a second, frozen adapter beside the trained one, so it is
  refused for a continued adapter (precompute, the default, is the way).

What decides between "adapters disabled" and "as loaded" is whether the adapter is still a no-op (every
B zero, checked on the weights, see ``adapter_is_noop``): disabling a no-op adapter changes nothing but
skips its compute, and makes "equal to the base model" exact by construction.

Sharded (``--fsdp``, ``--deepspeed``): the same model, wrapped by ``dpolab.sharding`` or ``dpolab.zero``
after peft. The no-op check runs on the whole weights before sharding; saving gathers the adapter's
tensors only (``adapter_parameters``), and ``--merge-lora`` merges gathered weights in a CPU copy
(``save_merged_weights``), since a sharded model cannot be merged in place.
``adapters_disabled`` keeps the adapter's ``requires_grad`` (see there: FSDP2 reads it).

peft is optional: asking for LoRA without it is a one-line ``ConfigError`` (``pip install peft``).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from pathlib import Path
from typing import Callable, ContextManager, Iterator

import torch

from .errors import ConfigError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER = "default"
"""peft's name of the one adapter dpolab trains."""


def _peft(field: str = "lora_r"):
    try:
        import peft
    except ImportError:
        raise ConfigError(field, "LoRA needs the peft package, which is not installed",
                          "pip install peft (or pip install 'dpolab[lora]')") from None
    return peft


def is_lora(model) -> bool:
    """Whether ``model`` is a peft model (peft cannot have made it unless peft was imported)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place and active), else ``model``."""
    return model.get_base_model() if is_lora(model) else model


# ---------------------------------------------------------------------------------------------
# Adapter folders given as --model


def adapter_folder(name: str) -> Path | None:
    """``name`` as a folder when it holds a peft adapter (``adapter_config.json``), else None."""
    folder = Path(name)
    return folder if (folder / ADAPTER_CONFIG).is_file() else None


def _adapter_config(folder: Path) -> dict:
    try:
        return json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ConfigError("model", f"{folder / ADAPTER_CONFIG} is not a readable JSON file",
                          "pass a folder written by peft's save_pretrained") from None


def base_model_path(name: str) -> str:
    """The model to load weights from: ``name`` itself, or the base model of the adapter folder ``name``.

    An adapter names its base in ``base_model_name_or_path``: an absolute folder (dpolab writes those),
    a folder relative to the working directory or to the adapter folder, or a hub name.
    """
    folder = adapter_folder(name)
    if folder is None:
        return name
    cfg = _adapter_config(folder)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ConfigError("model", f"{folder} holds a {cfg.get('peft_type')} adapter; dpolab trains LoRA adapters",
                          "pass a base model with --lora-r N, or a LoRA adapter folder")
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError("model", f"{folder / ADAPTER_CONFIG} does not name its base model",
                          "write the base model's folder or hub name as base_model_name_or_path")
    for candidate in (Path(base), folder / base):
        if candidate.is_dir():
            return str(candidate.resolve())
    return base


def has_tokenizer(folder: str) -> bool:
    return (Path(folder) / "tokenizer_config.json").is_file()


# ---------------------------------------------------------------------------------------------
# Turning a loaded model into a LoRA model


def apply(model: torch.nn.Module, config) -> torch.nn.Module:
    """Wrap the freshly loaded base ``model`` as ``config`` asks: a new adapter (``lora_r``), the adapter
    of an adapter folder given as ``model`` (continued training), or nothing (full fine-tuning)."""
    folder = adapter_folder(config.model)
    if folder is not None:
        return _load_adapter(model, folder, config)
    if config.merge_lora and not config.lora_r:
        raise ConfigError("merge_lora", "there is no adapter to merge: this run trains all weights",
                          "add --lora-r N, or pass an adapter folder as --model, or drop --merge-lora")
    if not config.lora_r:
        return model
    peft = _peft()
    targets = ([n.strip() for n in config.lora_target_modules.split(",")] if config.lora_target_modules
               else "all-linear")  # peft's "all-linear": every nn.Linear except the output layer
    alpha = config.lora_alpha if config.lora_alpha is not None else 2 * config.lora_r
    lora_config = peft.LoraConfig(r=config.lora_r, lora_alpha=alpha, lora_dropout=config.lora_dropout,
                                  target_modules=targets, task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, lora_config)
    except ValueError as e:
        raise ConfigError("lora_target_modules", f"cannot place LoRA adapters: {_first_line(e)}",
                          "name linear layers of this model (e.g. q_proj,v_proj), or leave it unset") from None
    _record_base(wrapped, config.model)
    return wrapped


def _load_adapter(model: torch.nn.Module, folder: Path, config) -> torch.nn.Module:
    """Continue training the adapter in ``folder`` with its own settings (any --lora-* given must agree)."""
    saved = _adapter_config(folder)
    given = {"lora_r": (config.lora_r, saved.get("r")), "lora_alpha": (config.lora_alpha, saved.get("lora_alpha")),
             "lora_dropout": (config.lora_dropout or None, saved.get("lora_dropout") or None)}
    for name, (value, theirs) in given.items():
        if value is not None and value != theirs:
            raise ConfigError(name, f"--model {folder} is a LoRA adapter with {name.removeprefix('lora_')}="
                              f"{theirs}, which continued training keeps", f"drop --{name.replace('_', '-')}")
    if config.lora_target_modules is not None:
        raise ConfigError("lora_target_modules", f"--model {folder} is a LoRA adapter, whose target modules "
                          "continued training keeps", "drop --lora-target-modules")
    if config.reference == "model":
        raise ConfigError("reference", f"--model {folder} is a LoRA adapter: its reference is the adapter as "
                          "loaded, which --reference model would have to keep as a second frozen adapter",
                          "use --reference precompute (the default): it scores the loaded adapter before step 1")
    peft = _peft("model")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ConfigError("model", f"cannot load the LoRA adapter in {folder}: {_first_line(e)}",
                          "pass a folder written by peft's save_pretrained for this base model") from None
    _record_base(wrapped, base_model_path(config.model))
    return wrapped


def _record_base(model, name: str) -> None:
    """Saved adapters name their base as an absolute folder (when local), so they load from anywhere."""
    path = Path(name)
    model.peft_config[ADAPTER].base_model_name_or_path = str(path.resolve()) if path.is_dir() else name


def _first_line(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__


def describe(model: torch.nn.Module) -> str:
    """One line: rank, alpha, adapted module kinds, and trainable / all parameters (count and %)."""
    trainable, total = model.get_nb_trainable_parameters()
    cfg = model.peft_config[ADAPTER]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in model.targeted_module_names})
    return (f"LoRA: r={cfg.r}, alpha={cfg.lora_alpha:g}, {len(model.targeted_module_names)} layers "
            f"({', '.join(kinds)}): {trainable:,} trainable parameters of {total:,} "
            f"({100 * trainable / max(total, 1):.2f}%)")


# ---------------------------------------------------------------------------------------------
# The reference: adapters off


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` as its base model: every LoRA adapter off inside the block (peft's ``disable_adapter``).

    peft also clears the adapter's ``requires_grad`` while it is off; it is set again inside the block,
    since FSDP2 reads it at its first forward (the precomputed reference pass, in this block) to pick
    each unit's gradient reduce dtype: with the adapter seen frozen, bf16 gradients were never cast
    to the fp32 shards. Off adapters take no part in the forward, so they get no gradient either way."""
    if not is_lora(model):
        raise TypeError(f"{type(model).__name__} has no LoRA adapters to disable")
    trainable = [p for _, p in adapter_parameters(model) if p.requires_grad]
    with model.disable_adapter():
        for p in trainable:
            p.requires_grad_(True)
        yield


def adapter_is_noop(model: torch.nn.Module) -> bool:
    """True when every adapter's B matrix is zero: the adapters then add exactly nothing to the base model."""
    b = [p for name, p in model.named_parameters() if ".lora_B." in name or ".lora_embedding_B." in name]
    return all(int(torch.count_nonzero(p)) == 0 for p in b)


def initial_reference(model: torch.nn.Module) -> ContextManager:
    """The scope in which ``model``, before its first step, computes the reference log-probs.

    A fresh adapter (a no-op) is scored with adapters disabled: exactly the base model. A continued
    adapter is scored as loaded: the starting policy. Full fine-tuning: the model as it is.
    """
    if is_lora(model) and adapter_is_noop(model):
        return adapters_disabled(model)
    return contextlib.nullcontext()


def shared_reference(model: torch.nn.Module) -> Callable[[], ContextManager]:
    """For ``--reference model`` with LoRA: a factory of the scope in which the *trained* model scores as
    the reference (adapters disabled, eval mode), without a copy. Only valid while the base model is the
    reference, i.e. when the adapter is a no-op at the start; refused otherwise."""
    if not adapter_is_noop(model):
        raise ConfigError("reference", "the LoRA adapter is already trained, so the base model is not the "
                          "reference", "use --reference precompute (the default)")

    @contextlib.contextmanager
    def scope() -> Iterator[None]:
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                yield
        finally:
            model.train(was_training)

    return scope


# ---------------------------------------------------------------------------------------------
# Saving and loading


def save_merged(path: Path, model: torch.nn.Module, tokenizer) -> torch.nn.Module:
    """Merge the adapter into the base weights *in place* (no second copy in memory) and save the plain
    model + tokenizer to ``path``; returns the merged model (``model`` must not be used afterwards)."""
    from .checkpoint import save_pretrained

    merged = model.merge_and_unload()
    save_pretrained(path, merged, tokenizer)
    return merged


def save_merged_weights(path: Path, model: torch.nn.Module, state_dict: dict, tokenizer) -> None:
    """``--merge-lora`` of a sharded run (``--fsdp``/``--deepspeed``), on the main process: ``state_dict``
    holds the whole gathered weights of the peft ``model`` (base and adapter). They become the weights
    of a skeleton of the model's architecture built on the meta device (no second copy in memory, no
    random initialization), which peft merges in place and which is saved as a plain model; the sharded
    ``model`` itself is left as it is."""
    import copy

    from .checkpoint import save_pretrained

    peft = _peft("merge_lora")
    base = unwrap(model)
    with torch.device("meta"):  # no memory: the gathered tensors become its weights (assign=True)
        plain = type(base)(base.config)
    if getattr(base, "generation_config", None) is not None:  # saved as the unsharded merge saves it
        plain.generation_config = copy.deepcopy(base.generation_config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        wrapped = peft.PeftModel(plain, copy.deepcopy(model.peft_config[ADAPTER]))
    result = wrapped.load_state_dict(state_dict, strict=False, assign=True)
    plain.tie_weights()  # a tied LM head is the embedding again
    missing = [k for k in result.missing_keys if "lm_head" not in k and "embed" not in k]  # tied: stored once
    if missing or result.unexpected_keys:
        raise RuntimeError(f"gathered weights do not fit the model (missing {missing[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]})")
    save_pretrained(path, wrapped.merge_and_unload(), tokenizer)


def adapter_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The adapter's tensors (every LoRA A and B), named as in ``model.state_dict()``."""
    return [(name, p) for name, p in model.named_parameters() if ".lora_" in name]


def to_model_keys(model: torch.nn.Module, weights: dict, path: Path) -> dict:
    """A saved adapter's tensors (peft's file names leave out the adapter's name) keyed as in
    ``model.state_dict()``; a file that is not this model's adapter is refused (``--resume``)."""
    names = {name.replace(f".{ADAPTER}.", "."): name for name, _ in adapter_parameters(model)}
    missing, unexpected = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
    if missing or unexpected or not weights:
        raise ConfigError("resume", f"checkpoint {path} does not hold this run's LoRA adapter "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                          "resume with the same --model and --lora-* options")
    return {names[k]: v for k, v in weights.items()}


def load_adapter_weights(model: torch.nn.Module, weights: dict, path: Path) -> None:
    """Load a saved adapter's tensors (a checkpoint's ``adapter_model.safetensors``) into ``model``."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, weights, adapter_name=ADAPTER)
    expected = {name for name, _ in model.named_parameters() if ".lora_" in name}
    missing = sorted(expected & set(result.missing_keys))
    unexpected = sorted(result.unexpected_keys)
    if missing or unexpected or not weights:
        raise ConfigError("resume", f"checkpoint {path} does not hold this run's LoRA adapter "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                          "resume with the same --model and --lora-* options")
