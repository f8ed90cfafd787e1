"""--streaming under several processes and with --resume: 2 processes x batch 4 under torchrun train exactly
as 1 process x batch 8 (the reference table scored in shares, one file written by process 0), and a run
resumed from a checkpoint replays the stream to its step and continues the same run."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from dpolab import streaming
from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.prepare import load_tokenizer, prepare_data
from dpolab.runtime import Runtime
from dpolab.toy import copy_task_rows, write_jsonl
from dpolab.trainer import optimizer_steps

from test_distributed import COMMON, TORCHRUN, TOL, assert_same_run, launch, read_rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stream-ddp")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(33, seed=5))
    eval_data = write_jsonl(root / "eval.jsonl", copy_task_rows(3, seed=6))
    return root, ["--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, "--streaming", *COMMON]


@pytest.fixture(scope="module")
def single(setup):
    """The expectation: one process, batch 8, --streaming (in this process)."""
    root, args = setup
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(root / "single")]) == 0
    return root / "single"


def test_each_process_takes_its_share_of_every_streamed_step(tiny_model_dir, tmp_path):
    """The shares of 3 processes partition each step of the single-process stream (batch 3 x 2 = 6); a
    process with no share gets a pair that does not count."""
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(8, seed=8))
    config = TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir="-", batch_size=2, grad_accum=2,
                         progress=False, streaming=True, max_steps=3)
    stream = prepare_data(config, load_tokenizer(config)).train
    cpu = torch.device("cpu")
    one = optimizer_steps(stream, dataclasses.replace(config, batch_size=6), Runtime(cpu, "fp32"), 0)
    shares = [optimizer_steps(stream, config, Runtime(cpu, "fp32", rank=r, world_size=3), 0) for r in range(3)]
    fillers, seen = 0, []
    for _ in range(3):  # 8 pairs in micro-batches of 6 and 2: one step per epoch
        epoch, expected = next(one)
        per_rank = [next(s) for s in shares]
        assert {e for e, _ in per_rank} == {epoch}
        assert [len(b.index) for b, _ in expected] == [6, 2]
        for k, (batch, _) in enumerate(expected):
            counted = [int(i) for _, micro in per_rank for i in micro[k][0].index if micro[k][1]]
            assert sorted(counted) == sorted(int(i) for i in batch.index)
            fillers += sum(not micro[k][1] for _, micro in per_rank)
        seen.append([int(i) for b, _ in expected for i in b.index])
    assert fillers == 3  # the third process, in the short micro-batch of each step
    assert all(sorted(s) == list(range(8)) for s in seen) and seen[0] != seen[1]  # each epoch: all, reshuffled


def test_torchrun_two_processes_stream_as_one_with_twice_the_batch(setup, single, tiny_model_dir):
    root, args = setup
    out = root / "torchrun"
    proc = launch(TORCHRUN, [*args, "--batch-size", "4", "--output-dir", out], root)
    assert_same_run(out, single, tiny_model_dir)
    assert len(list((out / "cache").glob("reference-stream-*.f32"))) == 1  # one table, written by process 0
    assert not list((out / "cache").glob("*.tmp"))
    table = (out / "cache").glob("reference-stream-*.f32").__next__().read_bytes()
    assert table == next((single / "cache").glob("reference-stream-*.f32")).read_bytes()
    assert proc.stdout.count("streamed pairs scored into") == 1 and proc.stdout.count("done: 5 steps") == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model_dir):
    """20 pairs in batches of 8: 3 steps per epoch; 7 steps with a checkpoint every 2."""
    root = tmp_path_factory.mktemp("stream-resume")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(20, seed=11))
    args = ["--model", tiny_model_dir, "--data", data, "--streaming", "--batch-size", "8", "--max-steps", "7",
            "--save-steps", "2", "--logging-steps", "1", "--learning-rate", "1e-3", "--precision", "fp32",
            "--device", "cpu", "--no-progress"]
    assert main(["train", *map(str, args), "--output-dir", str(root / "full")]) == 0
    return root / "full", args


@pytest.mark.parametrize("at, first_epoch", [(2, 0), (4, 1)])
def test_a_resumed_streaming_run_continues_the_same_run(uninterrupted, at, first_epoch, tmp_path, monkeypatch,
                                                        capsys, tiny_model_dir):
    full, args = uninterrupted
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    shutil.rmtree(out / "final")
    epochs = []
    read = streaming.PairStream.epoch_pairs
    monkeypatch.setattr(streaming.PairStream, "epoch_pairs", lambda self, e: epochs.append(e) or read(self, e))
    capsys.readouterr()
    assert main(["train", *map(str, args), "--output-dir", str(out), "--resume",
                 str(out / "checkpoints" / f"step-{at}")]) == 0
    said = capsys.readouterr().out
    assert "reference log-probs: reusing memory-mapped cache" in said and "resumed from" in said
    assert epochs == [first_epoch, first_epoch + 1, 2][: 3 - first_epoch]  # from step 4 on, epoch 0 is skipped unread
    rows, expected = read_rows(out), read_rows(full)
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == list(range(1, 8))
    for got, want in zip(rows, expected):
        for key in ("loss", "grad_norm", "logps/chosen", "rewards/margins"):
            assert got[key] == pytest.approx(want[key], abs=TOL), (got["step"], key)
    assert_same_weights(out, full, tiny_model_dir)


def assert_same_weights(run, expected, initial):
    from safetensors.torch import load_file

    got, want = (load_file(d / "final" / "model.safetensors") for d in (run, expected))
    start = load_file(initial / "model.safetensors")
    for name, weight in want.items():
        torch.testing.assert_close(got[name], weight, atol=TOL, rtol=0)
    assert max(float((want[k] - start[k]).abs().max()) for k in start) > 100 * TOL  # training moved them
