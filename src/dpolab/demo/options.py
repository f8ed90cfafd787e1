"""``dpolab demo``'s options: one dataclass, one docstring per field (the ``--help`` text).

Kept apart from the pipeline so that ``dpolab --help`` does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..errors import ConfigError


@dataclass
class DemoConfig:
    """Everything `dpolab demo` needs; every field has a default (the flags are optional)."""

    output_dir: str = "runs/demo"
    """Folder for summary.json, report.html, the PNG plots, the preference data and each trained policy."""
    quick: bool = False
    """A smaller configuration of the same experiment (fewer prompts, a smaller π_ref, fewer steps): under a minute, for tests and a first look."""
    beta: float = 1.0
    """DPO's β for the main policy: higher keeps the policy closer to π_ref (less KL, less reward). 1.0 gives the best reward for its KL on this task with the demo's one epoch; see the README's frontier."""
    sweep_beta: str = ""
    """Comma-separated β values (e.g. 0.05,0.1,0.3,1.0): train one policy per β and plot gold reward against KL for each, as the DPO paper's frontier figure."""
    model: str = ""
    """Run the experiment on this pretrained causal LM (a folder or hub name) instead of training π_ref; with --task auto the task is stories (a TinyStories-style model)."""
    task: Literal["auto", "reviews", "stories"] = "auto"
    """The prompts and gold reward: reviews (how positive a movie-review verdict is) or stories (how happy a story continuation is). auto: reviews for the self-trained π_ref, stories with --model."""
    preferred_ft: bool = True
    """Also train the Preferred-FT baseline (SFT on the chosen completions, dpolab's sft loss) and place it on the frontier."""
    seed: int = 0
    """Seed of the corpus, the prompts, every sampling step and the training runs: the same seed gives the same report."""
    cache_dir: Optional[str] = None
    """Where the self-trained π_ref is cached (default: OUTPUT_DIR/cache); a second run with the same settings reuses it."""
    train_prompts: Optional[int] = None
    """Held-in prompts that π_ref completes to make the preference pairs (default: 512, quick: 48)."""
    eval_prompts: Optional[int] = None
    """Held-out prompts for the win rate, gold rewards and KL (default: 256, quick: 48)."""
    samples_per_prompt: Optional[int] = None
    """Completions sampled from π_ref per held-in prompt; every two with different rewards make a pair (default: 4)."""
    max_new_tokens: Optional[int] = None
    """Longest sampled completion in tokens (default: 40 for reviews; 48 with --model, 24 with --model --quick)."""
    learning_rate: Optional[float] = None
    """Peak learning rate of DPO and Preferred-FT (default: 1e-3 for the self-trained π_ref, 2e-4 with --model)."""
    epochs: Optional[float] = None
    """Passes of DPO over the preference pairs (default: 1)."""
    batch_size: int = 32
    """Preference pairs per optimizer step."""
    threads: Optional[int] = None
    """CPU threads for torch (default: the idle cores, i.e. torch's one per core minus the load average, at least 1: on a busy machine one thread is several times faster for these small models than two that wait for each other)."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        from ..config import _coerce_types

        _coerce_types(self)
        if self.beta <= 0:
            raise ConfigError("beta", f"must be > 0, got {self.beta}", "typical values are 0.05 to 1")
        self.betas()  # validates --sweep-beta
        for name in ("train_prompts", "eval_prompts", "samples_per_prompt", "max_new_tokens", "threads"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "samples_per_prompt" else 1):
                raise ConfigError(name, f"too small: {value}", "use a larger positive integer")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}", "try 32")

    def betas(self) -> list[float]:
        """β values to train: the main --beta first, then the sweep's others."""
        extra = []
        for part in filter(None, (p.strip() for p in self.sweep_beta.split(","))):
            try:
                value = float(part)
            except ValueError:
                raise ConfigError("sweep_beta", f"'{part}' is not a number", "write e.g. 0.05,0.1,0.3,1.0") from None
            if value <= 0:
                raise ConfigError("sweep_beta", f"β must be > 0, got {value}", "write e.g. 0.05,0.1,0.3,1.0")
            extra.append(value)
        return list(dict.fromkeys([self.beta, *extra]))
