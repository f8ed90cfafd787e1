"""Checkpoints that hold everything needed to continue a run exactly, written atomically.

A checkpoint folder ``checkpoints/step-N/`` holds the model and tokenizer (``save_pretrained``,
safetensors, loadable on its own; for a LoRA run the adapter only), ``trainer_state.pt`` (optimizer, loop counters, early-stopping
state, the metric window being averaged, RNG states) and ``run.json`` (the resolved config and a
fingerprint of the data, so a resume with other settings is refused with the differences named).

Atomicity: everything is written to ``checkpoints/.tmp-step-N`` and renamed into place in one
``os.replace``; a crash mid-save leaves the previous checkpoints untouched, and leftover ``.tmp-*``
folders are ignored (and cleaned on the next save).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import lora
from .errors import ConfigError

STEP_DIR = re.compile(r"^step-(\d+)$")

# Settings that do not change the trajectory of a run: they may differ between a run and its resume.
RESUME_FREE_FIELDS = frozenset({
    "output_dir", "resume", "resume_force", "save_total_limit", "save_steps", "progress", "report_to",
    "run_name", "logging_steps", "max_skipped_steps", "eval_batch_size", "device", "trust_remote_code",
    "allow_pickle", "strict", "merge_lora", "num_proc",
})


@dataclass
class TrainState:
    """Loop counters that a checkpoint carries (plain numbers, so they pickle-free serialize)."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    best_eval: float = math.inf
    bad_evals: int = 0
    skipped_steps: int = 0
    skipped_in_a_row: int = 0
    window_sums: dict[str, float] = field(default_factory=dict)
    window_pairs: int = 0
    beta_scale: float = 1.0
    """The adaptive multiplier of β (``--target-kl``, ``dpolab.control``)."""


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": json.dumps(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(path: Path, write) -> Path:
    """Call ``write(tmp_folder)``, then move the folder to ``path`` in one rename.

    A crash inside ``write`` leaves whatever was at ``path`` before untouched.
    """
    tmp = path.parent / f".tmp-{path.name}"
    for stale in path.parent.glob(".tmp-*"):  # left by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    _fsync_dir(tmp)
    if path.exists():  # the same folder saved again (e.g. by a resumed run): replace it whole
        old = path.parent / f".tmp-old-{path.name}"
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def save_pretrained(path: Path, model, tokenizer, state_dict: dict | None = None) -> Path:
    """model + tokenizer (safetensors), loadable by ``AutoModelForCausalLM.from_pretrained``, atomically.

    A LoRA (peft) model saves its adapter only: adapter_config.json + adapter_model.safetensors, which
    peft loads onto the base model (``dpolab.lora``; ``--merge-lora`` also writes a plain merged model).
    ``state_dict``: the weights to write instead of the model's own (a sharded model's gathered weights)."""

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **_weights(state_dict))
        tokenizer.save_pretrained(tmp)

    return atomic_save(path, write)


def _weights(state_dict: dict | None) -> dict:
    return {} if state_dict is None else {"state_dict": state_dict}


def save_checkpoint(out: Path, model, tokenizer, optimizer, state: TrainState, run_info: dict,
                    keep: int | None = None, state_dict: dict | None = None,
                    optimizer_state: dict | None = None) -> Path:
    """Write ``out/checkpoints/step-N`` atomically; then keep only the newest ``keep`` checkpoints.
    ``state_dict``/``optimizer_state``: what to write instead of the model's and optimizer's own."""
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **_weights(state_dict))
        tokenizer.save_pretrained(tmp)
        torch.save({"optimizer": optimizer_state, "state": asdict(state), "rng": rng_state()},
                   tmp / "trainer_state.pt")
        (tmp / "run.json").write_text(json.dumps(run_info, indent=1, sort_keys=True))

    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    path = atomic_save(root / f"step-{state.step}", write)
    if keep:
        prune_checkpoints(root, keep)
    return path


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()
             and (p / "trainer_state.pt").is_file()]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (called only after a newer one is complete)."""
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def resolve_resume(resume: str, out: Path) -> Path:
    """``latest`` -> newest checkpoint in ``out``; a folder path -> that checkpoint."""
    if resume == "latest":
        found = list_checkpoints(out / "checkpoints")
        if not found:
            raise ConfigError("resume", f"no checkpoint to resume from in {out / 'checkpoints'}",
                              "run without --resume, or pass --resume PATH/TO/checkpoints/step-N")
        return found[-1]
    path = Path(resume)
    if not (path / "trainer_state.pt").is_file():
        raise ConfigError("resume", f"'{path}' is not a checkpoint folder (no trainer_state.pt)",
                          "pass a folder like OUTPUT_DIR/checkpoints/step-N, or --resume for the latest")
    return path


def run_info(config_dict: dict, data_fingerprint: str) -> dict:
    return {"config": config_dict, "data": data_fingerprint}


def check_resumable(saved: dict, current: dict, force: bool) -> list[str]:
    """Differences between the checkpoint's run and this one; refuses them unless ``force``."""
    diffs = []
    old, new = saved.get("config", {}), current["config"]
    for key in sorted(set(old) | set(new)):
        if key not in RESUME_FREE_FIELDS and old.get(key) != new.get(key):
            diffs.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    if saved.get("data") != current["data"]:
        diffs.append("data: the tokenized training/eval pairs differ")
    if diffs and not force:
        raise ConfigError("resume", "the checkpoint was made with other settings (" + "; ".join(diffs) + ")",
                          "resume with the same config and data, or add --resume-force")
    return diffs


def read_run_info(path: Path) -> dict:
    return json.loads((path / "run.json").read_text())


def load_checkpoint(path: Path, model, optimizer, sharded=None) -> TrainState:
    """Load weights, optimizer, loop state and RNG states from ``path``.

    ``sharded``: a sharded policy (``dpolab.sharding``, ``dpolab.zero``) that loads the whole weights (with
    LoRA: the adapter) and optimizer state into its shards itself (``load_full_state``)."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(path.glob("*.safetensors")):  # one file, or shards of a large model
        weights.update(load_file(str(shard), device="cpu"))
    blob = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=True)
    if sharded is not None:
        _check_weights(path, *sharded.load_full_state(weights, blob["optimizer"], optimizer, path))
        set_rng_state(blob["rng"])
        return TrainState(**blob["state"])
    if lora.is_lora(model):  # a LoRA run's checkpoint holds the adapter only (adapter_model.safetensors)
        lora.load_adapter_weights(model, weights, path)
    else:
        _check_weights(path, *model.load_state_dict(weights, strict=False))
    optimizer.load_state_dict(blob["optimizer"])
    set_rng_state(blob["rng"])
    return TrainState(**blob["state"])


def _check_weights(path: Path, missing, unexpected) -> None:
    tied = {k for k in missing if "lm_head" in k or "embed" in k}  # tied weights are stored once
    if set(missing) - tied or unexpected:
        raise ConfigError("resume", f"checkpoint {path} does not match the model "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})",
                          "resume with the same --model")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics rows written after ``step`` (by a run killed after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
