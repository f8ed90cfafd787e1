"""--activation-offloading: on GPU the saved activations go to pinned CPU memory (save_on_cpu); on CPU
there is nothing to move, so the run says so and trains exactly as without the flag."""

import json

from dpolab.cli import main
from dpolab.toy import copy_task_rows, write_jsonl


def test_on_cpu_it_says_so_and_changes_nothing(tmp_path, tiny_model_dir, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(12, seed=3))
    common = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--max-steps", "3", "--logging-steps", "1",
              "--batch-size", "4", "--learning-rate", "1e-3", "--precision", "fp32", "--device", "cpu", "--no-progress"]
    assert main([*common, "--output-dir", str(tmp_path / "plain")]) == 0
    assert "activation-offloading" not in capsys.readouterr().out
    assert main([*common, "--output-dir", str(tmp_path / "offload"), "--activation-offloading"]) == 0
    assert "note: --activation-offloading moves activations from GPU to CPU memory" in capsys.readouterr().out
    rows = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("plain", "offload")]
    assert [(r["loss"], r["grad_norm"]) for r in rows[0]] == [(r["loss"], r["grad_norm"]) for r in rows[1]]

