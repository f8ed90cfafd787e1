"""Where metrics go: metrics.jsonl always, plus TensorBoard or Weights & Biases on request."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import ConfigError


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLogger:
    """Appends one JSON object per logged step to ``metrics.jsonl`` (flushed at once) and mirrors it
    to the chosen tracker. Only the main process should create one with ``enabled=True``."""

    def __init__(self, output_dir: Path, *, report_to: str = "none", run_name: str | None = None,
                 config: dict | None = None, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self._file = open(Path(output_dir) / "metrics.jsonl", "a", encoding="utf-8")
        if report_to == "tensorboard":
            self._tb = _tensorboard_writer(Path(output_dir) / "tensorboard")
        elif report_to == "wandb":
            self._wandb = _wandb_run(run_name or Path(output_dir).name, config or {}, output_dir)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row.get("step", 0)
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _tensorboard_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("report_to", "tensorboard is not installed",
                          "pip install 'dpolab[tensorboard]' or use --report-to none") from None
    return SummaryWriter(log_dir=str(log_dir))


def _wandb_run(name: str, config: dict, output_dir: Path):
    try:
        import wandb
    except ImportError:
        raise ConfigError("report_to", "wandb is not installed",
                          "pip install 'dpolab[wandb]' or use --report-to none") from None
    return wandb.init(name=name, config=config, dir=str(output_dir))
