"""``dpolab demo``: DPO's controlled-sentiment experiment in miniature, with nothing to download.

``grammar`` (the task and its gold reward), ``base`` (π_ref: tokenizer + small Llama, cached),
``pipeline`` (pairs → ``dpolab.train`` → ``dpolab.evaluate``), ``report`` (plots, HTML, summary),
``options`` (``DemoConfig``, the command's flags).
"""

__all__ = ["DemoConfig", "run_demo"]


def __getattr__(name: str):
    """Lazy: importing ``dpolab.demo.options`` for ``--help`` must not pull in torch."""
    if name == "DemoConfig":
        from .options import DemoConfig

        return DemoConfig
    if name == "run_demo":
        from .pipeline import run_demo

        return run_demo
    raise AttributeError(f"module 'dpolab.demo' has no attribute '{name}'")
