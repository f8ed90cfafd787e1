"""Surviving kills and faults: exact resume, atomic checkpoints, signals, non-finite steps, strict data."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import dpolab
from conftest import copy_task_rows, save_toy_model, write_jsonl
from dpolab import checkpoint as ckpt
from dpolab import trainer
from dpolab.config import TrainConfig
from dpolab.errors import ConfigError, DataError, TrainingStopped

STEPS = 24


def rows_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_time(rows):
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A model slow enough (tens of ms per step) to be killed mid-run, its data, and the CLI arguments."""
    root = tmp_path_factory.mktemp("reliability")
    model = save_toy_model(root / "model", hidden=64, layers=2)
    data = write_jsonl(root / "train.jsonl", copy_task_rows(256))
    args = ["--model", model, "--data", data, "--max-steps", STEPS, "--batch-size", 32, "--learning-rate", 1e-3,
            "--logging-steps", 1, "--save-steps", 1, "--precision", "fp32", "--no-progress"]
    return root, [str(a) for a in args]


def start(args, out):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "dpolab", "train", *args, "--output-dir", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_step(proc, out, step, timeout=120):
    """Poll metrics.jsonl until it holds ``step``; fails if the run ended first (the kill would prove nothing)."""
    deadline = time.monotonic() + timeout
    path = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file() and any(json.loads(x)["step"] >= step for x in path.read_text().splitlines() if x.strip()
                                  and x.endswith("}")):
            return
        assert proc.poll() is None, f"run ended before step {step}: {proc.stderr.read()[-2000:]}"
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached in {timeout}s")


@pytest.fixture(scope="module")
def uninterrupted(job):
    root, args = job
    proc = start(args, root / "whole")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return rows_of(root / "whole")


def test_sigkill_at_a_random_step_then_resume_gives_the_same_metrics(job, uninterrupted):
    root, args = job
    out = root / "killed"
    kill_at = random.Random().randint(2, STEPS - 4)  # any step: also mid-checkpoint-save
    proc = start(args, out)
    wait_for_step(proc, out, kill_at)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert ckpt.list_checkpoints(out / "checkpoints"), "no complete checkpoint before the kill"
    resumed = start(args + ["--resume"], out)
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resumed from" in stdout and "reusing cache" in stdout
    rows = rows_of(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)), f"killed at {kill_at}"  # no duplicates
    assert without_time(rows) == without_time(uninterrupted), f"killed at {kill_at}"  # bit-identical in fp32


def test_sigterm_checkpoints_and_says_how_to_resume(job, uninterrupted):
    root, args = job
    out = root / "terminated"
    proc = start(args, out)
    wait_for_step(proc, out, 3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err and "--resume" in err.splitlines()[-1]
    stopped = rows_of(out)[-1]["step"]
    assert ckpt.list_checkpoints(out / "checkpoints")[-1].name == f"step-{stopped}"
    resumed = start(args + ["--resume"], out)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert without_time(rows_of(out)) == without_time(uninterrupted)


def small(tmp_path, tiny_model_dir, **overrides):
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(64))
    values = dict(model=str(tiny_model_dir), data=str(data), output_dir=str(tmp_path / "out"), precision="fp32",
                  learning_rate=1e-3, max_steps=6, logging_steps=1, progress=False)
    return TrainConfig(**{**values, **overrides})


def test_crash_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, tiny_model_dir, monkeypatch):
    real_save = torch.save
    calls = []  # torch.save is also used for the reference cache: count checkpoint saves only

    def failing_save(obj, path, *a, **k):
        if str(path).endswith("trainer_state.pt"):
            calls.append(path)
        if len(calls) == 2:  # second checkpoint: the model files are already written, then the crash
            raise OSError("disk full (injected)")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="injected"):
        dpolab.train(small(tmp_path, tiny_model_dir, save_steps=2))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    out = tmp_path / "out"
    complete = ckpt.list_checkpoints(out / "checkpoints")
    assert [p.name for p in complete] == ["step-2"]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(complete[0])  # the previous checkpoint loads
    result = dpolab.train(small(tmp_path, tiny_model_dir, save_steps=2, resume="latest"))
    assert result.steps == 6 and [r["step"] for r in rows_of(out)] == [1, 2, 3, 4, 5, 6]
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the leftover was cleaned by the next save


def test_a_nan_batch_is_skipped_and_counted(tmp_path, tiny_model_dir, monkeypatch):
    real = trainer.pair_losses
    calls = []

    def poisoned(*args, **kwargs):
        losses, metrics = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # the third optimizer step's batch
            losses = losses * float("nan")
            metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
        return losses, metrics

    monkeypatch.setattr(trainer, "pair_losses", poisoned)
    seen = {}
    real_step = torch.optim.AdamW.step

    def counting_step(self, *a, **k):
        seen["n"] = seen.get("n", 0) + 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    result = dpolab.train(small(tmp_path, tiny_model_dir))
    rows = rows_of(result.output_dir)
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert "loss" not in rows[2]  # the skipped step contributes nothing to the averages
    assert seen["n"] == 5  # six steps, one without an update
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


def test_too_many_non_finite_steps_stop_the_run(tmp_path, tiny_model_dir, monkeypatch):
    real = trainer.pair_losses

    def always_nan(*args, **kwargs):
        losses, metrics = real(*args, **kwargs)
        return losses * float("nan"), metrics

    monkeypatch.setattr(trainer, "pair_losses", always_nan)
    with pytest.raises(TrainingStopped, match="3 steps in a row") as err:
        dpolab.train(small(tmp_path, tiny_model_dir, max_skipped_steps=3))
    assert err.value.exit_code == 1 and "--learning-rate" in str(err.value)


def test_resume_with_other_settings_is_refused_unless_forced(tmp_path, tiny_model_dir, capsys):
    dpolab.train(small(tmp_path, tiny_model_dir, save_steps=2, max_steps=4))
    with pytest.raises(ConfigError, match=r"beta: 0\.1 -> 0\.2"):
        dpolab.train(small(tmp_path, tiny_model_dir, save_steps=2, max_steps=4, beta=0.2, resume="latest"))
    capsys.readouterr()
    result = dpolab.train(small(tmp_path, tiny_model_dir, save_steps=2, max_steps=4, beta=0.2, resume="latest",
                                resume_force=True))
    assert "beta: 0.1 -> 0.2" in capsys.readouterr().out and result.steps == 4
    with pytest.raises(ConfigError, match="not a checkpoint folder"):
        dpolab.train(small(tmp_path, tiny_model_dir, resume=str(tmp_path)))


def test_save_total_limit_keeps_the_newest(tmp_path, tiny_model_dir):
    dpolab.train(small(tmp_path, tiny_model_dir, save_steps=1, max_steps=6, save_total_limit=2))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "out" / "checkpoints")] == ["step-4", "step-5"]


def test_strict_refuses_unusable_rows_with_their_row_number(tmp_path, tiny_model_dir):
    rows = copy_task_rows(4)
    rows.insert(2, {"prompt": "copy: red", "chosen": " red", "rejected": " red"})  # row 3: identical
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    relaxed = small(tmp_path, tiny_model_dir, data=str(data), max_steps=1)
    assert dpolab.train(relaxed).steps == 1
    with pytest.raises(DataError, match="row 3.*chosen equals rejected"):
        dpolab.train(small(tmp_path, tiny_model_dir, data=str(data), max_steps=1, strict=True))
    long_rows = copy_task_rows(3)
    long_rows[1]["prompt"] = "copy: " + " ".join(["red"] * 40)  # row 2's prompt exceeds max_prompt_length
    long_data = write_jsonl(tmp_path / "l.jsonl", long_rows)
    with pytest.raises(DataError, match="row 2.*longer than max_prompt_length"):
        dpolab.train(small(tmp_path, tiny_model_dir, data=str(long_data), max_length=20, max_prompt_length=19,
                           strict=True))


def test_pickle_weights_need_allow_pickle(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model.config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="pickle.*--allow-pickle"):
        dpolab.train(small(tmp_path, tiny_model_dir, model=str(folder), max_steps=1))
    assert dpolab.train(small(tmp_path, tiny_model_dir, model=str(folder), max_steps=1, allow_pickle=True)).steps == 1


def test_model_folder_without_config_or_tokenizer(tmp_path, tiny_model_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        dpolab.train(small(tmp_path, tiny_model_dir, model=str(empty)))
    from transformers import AutoModelForCausalLM

    no_tok = tmp_path / "no-tokenizer"
    AutoModelForCausalLM.from_pretrained(tiny_model_dir).save_pretrained(no_tok)
    with pytest.raises(ConfigError, match="tokenizer"):
        dpolab.train(small(tmp_path, tiny_model_dir, model=str(no_tok)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_crash_then_resume_matches_the_uninterrupted_run(tmp_path, tiny_model_dir, monkeypatch, precision):
    """In process, both precisions: on the same machine bf16 autocast is as deterministic as fp32."""
    whole = dpolab.train(small(tmp_path / "whole", tiny_model_dir, precision=precision, save_steps=2))
    real_log = trainer._Run._log

    def crash_at_5(self, *args, **kwargs):
        if self.state.step == 5:
            raise RuntimeError("power cut (injected)")
        return real_log(self, *args, **kwargs)

    monkeypatch.setattr(trainer._Run, "_log", crash_at_5)
    with pytest.raises(RuntimeError, match="injected"):
        dpolab.train(small(tmp_path / "cut", tiny_model_dir, precision=precision, save_steps=2))
    monkeypatch.setattr(trainer._Run, "_log", real_log)
    resumed = dpolab.train(small(tmp_path / "cut", tiny_model_dir, precision=precision, save_steps=2,
                                 resume="latest"))
    assert without_time(rows_of(resumed.output_dir)) == without_time(rows_of(whole.output_dir))
    for a, b in zip(whole.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)
