"""Data-parallel training under real launchers (torchrun, accelerate launch) on CPU with gloo.

The expectation is always the single-process run: 2 processes x batch 4 must train exactly as
1 process x batch 8 (per-step loss, gradient norm, token count, eval metrics, final weights), and
write one set of outputs. Launches cost seconds of imports each, so runs are shared between tests.
"""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from dpolab.cli import main
from dpolab.config import TrainConfig
from dpolab.prepare import load_tokenizer, prepare_data
from dpolab.runtime import Runtime
from dpolab.toy import copy_task_rows, write_jsonl
from dpolab.trainer import optimizer_steps

TOL = 1e-5
TIMEOUT_S = 240  # a run takes seconds; a hang is a bug
STEPS = 5
# 33 pairs in batches of 8: the 5th step holds 1 pair, so the second process has no share of it and
# must still join the gradient all-reduce; 3 eval pairs in one eval batch of 4 leave it no eval share.
COMMON = ["--max-steps", str(STEPS), "--logging-steps", "1", "--eval-steps", "2", "--eval-batch-size", "4",
          "--save-steps", "2", "--learning-rate", "1e-3", "--precision", "fp32", "--device", "cpu", "--no-progress"]


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(launcher: list[str], args: list, cwd) -> subprocess.CompletedProcess:
    """Run a launcher to the end; on a hang (a collective that some process never joins) kill its
    whole process group, workers included, and fail."""
    cmd = [sys.executable, "-m", *launcher, *map(str, args)]
    with subprocess.Popen(cmd, cwd=cwd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            pytest.fail(f"{' '.join(cmd[:6])} … did not finish in {TIMEOUT_S} s:\n{stdout[-2000:]}{stderr[-2000:]}")
    assert popen.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "dpolab", "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(root / "train.jsonl", copy_task_rows(33, seed=5))
    eval_data = write_jsonl(root / "eval.jsonl", copy_task_rows(3, seed=6))
    return root, ["--model", tiny_model_dir, "--data", data, "--eval-data", eval_data, *COMMON]


@pytest.fixture(scope="module")
def single(setup):
    """The expectation: one process, batch 8 (in this process, with the same flags)."""
    root, args = setup
    assert main(["train", *map(str, args), "--batch-size", "8", "--output-dir", str(root / "single")]) == 0
    return root / "single"


@pytest.fixture(scope="module")
def torchrun_run(setup):
    root, args = setup
    proc = launch(TORCHRUN, [*args, "--batch-size", "4", "--output-dir", root / "torchrun"], root)
    return root / "torchrun", proc


def assert_resumed_as_uninterrupted(resumed, out) -> None:
    """A run resumed from a checkpoint logged the same steps and metrics, and ended with the same final
    weights, as the run that was never stopped."""
    got, want = read_rows(resumed), read_rows(out)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], abs=TOL), (b["step"], key)
    for name, weight in load_file(out / "final" / "model.safetensors").items():
        torch.testing.assert_close(load_file(resumed / "final" / "model.safetensors")[name], weight, atol=TOL, rtol=0)


def copy_for_resume(out, to):
    """The run as it was after its step-2 checkpoint (later checkpoints and final/ removed)."""
    shutil.copytree(out, to, ignore=shutil.ignore_patterns("final", "step-4"))
    return to


def assert_same_run(run, single, initial):
    rows, expected = read_rows(run), read_rows(single)
    assert [(r["step"], "loss" in r) for r in rows] == [(r["step"], "loss" in r) for r in expected]
    for got, want in zip(rows, expected):
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/accuracies"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=TOL), (got["step"], key)
        assert got.get("tokens") == want.get("tokens")
    final, final_single = (load_file(d / "final" / "model.safetensors") for d in (run, single))
    assert final.keys() == final_single.keys()
    for name, weight in final.items():
        torch.testing.assert_close(weight, final_single[name], atol=TOL, rtol=0)
    start = load_file(initial / "model.safetensors")  # training moved the weights far more than TOL
    assert max(float((final_single[k] - start[k]).abs().max()) for k in start) > 100 * TOL


def test_torchrun_two_processes_train_as_one_with_twice_the_batch(torchrun_run, single, tiny_model_dir):
    out, proc = torchrun_run
    assert_same_run(out, single, tiny_model_dir)
    rows = read_rows(out)
    assert len(rows) == len({(r["step"], "loss" in r) for r in rows})  # no row written twice
    assert sum("eval_loss" in r for r in rows) == 3  # steps 2, 4 and the last
    # one set of outputs: the same files as the single-process run, each written once
    listing = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert listing == sorted(p.relative_to(single).as_posix() for p in single.rglob("*") if p.is_file())
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4"]
    cached = sorted(p.name.split("-")[0] for p in (out / "cache").iterdir())
    assert cached == ["reference", "tokenized"]  # one reference cache and one tokenized-pairs cache
    assert proc.stdout.count("done: 5 steps") == 1  # only the main process talks
    assert proc.stdout.count("training: 33 pairs, 5 steps per epoch") == 1


def test_torchrun_resume_continues_the_same_run(setup, torchrun_run, tmp_path):
    root, args = setup
    out = tmp_path / "resumed"
    shutil.copytree(torchrun_run[0], out)
    shutil.rmtree(out / "final")
    launch(TORCHRUN, [*args, "--batch-size", "4", "--output-dir", out, "--resume", out / "checkpoints" / "step-2"],
           tmp_path)
    rows, expected = read_rows(out), read_rows(torchrun_run[0])
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    for got, want in zip(rows, expected):
        for key in ("loss", "grad_norm", "eval_loss"):
            if key in want:
                assert got[key] == pytest.approx(want[key], abs=TOL)


def test_accelerate_launch_trains_as_one_process(setup, single, tiny_model_dir):
    pytest.importorskip("accelerate")
    root, args = setup
    # --multi_gpu picks accelerate's torchrun-based launcher; on a machine without GPUs the processes
    # run on CPU with gloo. (--cpu --num_processes 2 would start a single process: accelerate's
    # multi-CPU mode needs mpirun and a hostfile.)
    launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
                "-m", "dpolab", "train"]
    if torch.cuda.is_available():
        pytest.skip("this test is the CPU recipe")
    launch(launcher, [*args, "--batch-size", "4", "--output-dir", root / "accelerate"], root)
    assert_same_run(root / "accelerate", single, tiny_model_dir)


GRAD_WORKER = textwrap.dedent("""
    import sys, torch
    from dpolab import distributed
    from dpolab.config import TrainConfig
    from dpolab.data.batching import collate
    from dpolab.prepare import load_model, load_tokenizer, prepare_data
    from dpolab.reference import pair_logps

    model_dir, data, out = sys.argv[1:4]
    with distributed.runtime("cpu", "fp32") as rt:
        config = TrainConfig(model=model_dir, data=data, output_dir="-", progress=False)
        tok = load_tokenizer(config)
        pairs = prepare_data(config, tok).train[:8]
        model = load_model(config, rt)
        mine = pairs[rt.rank::rt.world_size]
        micro = [mine[:2], mine[2:]]  # two micro-batches: the first accumulates locally (no_sync)

        def backward(policy, sync):
            for k, part in enumerate(micro):
                with (distributed.gradient_sync(policy, last=k == 1) if sync else torch.enable_grad()):
                    chosen, rejected = pair_logps(policy, collate(part, tok.pad_token_id))
                    ((chosen - 0.5 * rejected).sum() * rt.world_size / len(pairs)).backward()
            return {n: p.grad.clone() for n, p in model.named_parameters()}

        local = backward(model, sync=False)  # this process's share alone, no all-reduce
        model.zero_grad(set_to_none=True)
        synced = backward(distributed.wrap(model, rt), sync=True)
        torch.save({"local": local, "synced": synced}, f"{out}/grads-{rt.rank}.pt")
""")


def test_ddp_gradients_equal_the_single_process_gradients(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(8, seed=7))
    (tmp_path / "worker.py").write_text(GRAD_WORKER)
    launch(["torch.distributed.run", "--standalone", "--nproc-per-node", "2", tmp_path / "worker.py"],
           [tiny_model_dir, data, tmp_path], tmp_path)
    # the expectation: one process, all 8 pairs in one backward, the same objective
    from transformers import AutoModelForCausalLM

    from dpolab.data.batching import collate
    from dpolab.reference import pair_logps

    config = TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir="-", progress=False)
    tok = load_tokenizer(config)
    pairs = prepare_data(config, tok).train[:8]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    chosen, rejected = pair_logps(model, collate(pairs, tok.pad_token_id))
    ((chosen - 0.5 * rejected).sum() / len(pairs)).backward()
    expected = {n: p.grad for n, p in model.named_parameters()}
    for rank in (0, 1):
        grads = torch.load(tmp_path / f"grads-{rank}.pt", weights_only=True)
        assert grads["synced"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(grads["synced"][name], grad, atol=1e-6, rtol=1e-5)
        # each process's own share gives another gradient: the equality above is the all-reduce's doing
        assert max(float((grads["local"][n] - g).abs().max()) for n, g in expected.items()) > 1e-3


def test_each_process_takes_its_share_of_every_step(tiny_model_dir, tmp_path):
    """The shares of 2 (and 3) processes partition each step of the single-process run; a process with
    no share gets a pair that does not count."""
    data = write_jsonl(tmp_path / "train.jsonl", copy_task_rows(8, seed=8))
    config = TrainConfig(model=str(tiny_model_dir), data=str(data), output_dir="-", batch_size=2, grad_accum=2,
                         progress=False)
    pairs = prepare_data(config, load_tokenizer(config)).train
    cpu = torch.device("cpu")
    one = optimizer_steps(pairs, dataclasses.replace(config, batch_size=2 * 3), Runtime(cpu, "fp32"), 0)
    shares = [optimizer_steps(pairs, config, Runtime(cpu, "fp32", rank=r, world_size=3), 0) for r in range(3)]
    fillers = 0
    for _ in range(3):  # 8 pairs, steps of 2 micro-batches of 6: each epoch is one step, its 2nd micro-batch 2 pairs
        epoch, expected = next(one)
        per_rank = [next(s) for s in shares]
        assert {e for e, _ in per_rank} == {epoch}
        assert all(len(micro) == len(expected) for _, micro in per_rank)  # the same number of all-reduces
        for k, (batch, _) in enumerate(expected):
            counted = [int(i) for _, micro in per_rank for i in micro[k][0].index if micro[k][1]]
            assert sorted(counted) == sorted(int(i) for i in batch.index)
            fillers += sum(not micro[k][1] for _, micro in per_rank)
    assert fillers == 3  # the third process, in the short micro-batch of each step
