"""dpolab: Direct Preference Optimization for Hugging Face causal language models.

    import dpolab
    result = dpolab.train(dpolab.TrainConfig(model="./sft", data="prefs.jsonl", output_dir="runs/x"))

Heavy modules (torch, transformers) load on first use, so ``dpolab --help`` stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "train": ("trainer", "train"),
    "TrainResult": ("trainer", "TrainResult"),
    "TrainConfig": ("config", "TrainConfig"),
    "PreferencePair": ("data.records", "PreferencePair"),
    "LOSSES": ("losses", "LOSSES"),
    "register_loss": ("losses", "register_loss"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dpolab' has no attribute '{name}'")
