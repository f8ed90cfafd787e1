"""The command line: bad input -> one line on stderr, exit code 2, no traceback, nothing written;
YAML + flags; ``--help`` from the field docstrings; metrics forwarded to trackers.

Most cases call ``dpolab.cli.main`` in process (a subprocess costs seconds of imports); a few real
subprocesses prove the exit code, the absence of a traceback and the single stderr line for real.
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib.machinery
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import yaml

from conftest import copy_task_rows, write_jsonl
from dpolab import cli
from dpolab.config import TrainConfig, field_docs

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


# ---------------------------------------------------------------------------------------------
# Helpers


def invoke(argv) -> int:
    """``dpolab ARGV`` in process; argparse's SystemExit becomes the exit code, as in a shell."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def run_subprocess(argv, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "dpolab", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def the_error_line(stderr: str, *needles: str) -> str:
    """Assert stderr is exactly one non-empty line, a dpolab error naming every needle; return it."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    line = lines[0]
    assert line.startswith("dpolab:"), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in: {line}"
    return line


def squash(text: str) -> str:
    """Text without any whitespace, so argparse's line wrapping (even at hyphens) does not matter."""
    return "".join(text.split())


def jsonl(*rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


OK = {"prompt": "copy: red blue", "chosen": " red blue", "rejected": " cat dog"}
CHAT_OK = {"prompt": [{"role": "user", "content": "copy: red"}], "chosen": [{"role": "assistant", "content": "red"}],
           "rejected": [{"role": "assistant", "content": "cat"}]}


def truncated_gzip() -> bytes:
    whole = gzip.compress(jsonl(*copy_task_rows(400)))
    return whole[: len(whole) // 2]


@pytest.fixture()
def good_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prefs.jsonl", copy_task_rows(16))


def base_args(model_dir, data, out) -> list:
    return ["train", "--model", model_dir, "--data", data, "--output-dir", out]


# ---------------------------------------------------------------------------------------------
# Bad data: one line naming file, row and field; exit 2; nothing under --output-dir


# (file name, content, extra flags, what the message must name)
DATA_CASES = {
    "missing key": ("prefs.jsonl", jsonl(OK, {"prompt": "a", "chosen": "b"}), [],
                    ["row 2", "'rejected'", "missing key"]),
    "number instead of text": ("prefs.jsonl", jsonl(OK, {"prompt": "a", "chosen": 5, "rejected": "c"}), [],
                               ["row 2", "field 'chosen'", "number 5"]),
    "null instead of text": ("prefs.jsonl", jsonl(OK, OK, {"prompt": "a", "chosen": "b", "rejected": None}), [],
                             ["row 3", "field 'rejected'", "null"]),
    "nested object instead of text": ("prefs.jsonl",
                                      jsonl(OK, {"prompt": "a", "chosen": "b", "rejected": {"text": "c"}}), [],
                                      ["row 2", "field 'rejected'", "object"]),
    # the blank line 2 still counts: the row is the line number an editor jumps to
    "invalid JSON line": ("prefs.jsonl", jsonl(OK) + b"\n" + jsonl(OK) + b'{"prompt": "a", "chosen": \n', [],
                          ["row 4", "not valid JSON"]),
    "line holding a list": ("prefs.jsonl", jsonl(OK, ["a", "b", "c"]), [], ["row 2", "array"]),
    "empty file": ("prefs.jsonl", b"", [], ["empty"]),
    "unknown extension": ("prefs.txt", jsonl(OK), [], [".txt", "unsupported"]),
    "undecodable bytes": ("prefs.jsonl", jsonl(OK) + b'{"prompt": "\xff\xfe", "chosen": "a", "rejected": "b"}\n',
                          [], ["row 2", "UTF-8"]),
    "truncated gzip": ("prefs.jsonl.gz", truncated_gzip(), [], ["gzip", "truncated"]),
    "standard then implicit-prompt row": ("prefs.jsonl", jsonl(OK, {"chosen": "Human: hi Assistant: a",
                                                                    "rejected": "Human: hi Assistant: b"}),
                                          [], ["row 2", "'prompt'"]),
    "implicit-prompt then standard row": ("prefs.jsonl", jsonl({"chosen": "Human: hi Assistant: a",
                                                                "rejected": "Human: hi Assistant: b"}, OK),
                                          [], ["row 2", "standard", "row 1 is implicit_prompt"]),
    "conversational row with unknown role": (
        "prefs.jsonl", jsonl(CHAT_OK, {**CHAT_OK, "chosen": [{"role": "robot", "content": "red"}]}), [],
        ["row 2", "field 'chosen[0].role'", "'robot'"]),
    "implicit prompt without Assistant: marker": ("prefs.jsonl", jsonl({"chosen": "Human: hi Bot: a",
                                                                        "rejected": "Human: hi Bot: b"}),
                                                  [], ["row 1", "'Assistant:'"]),
    # prompt keeps BOS + its last token, completions keep 2 tokens: "red cat" both -> identical -> dropped
    "all pairs too long": ("prefs.jsonl", jsonl(*[{"prompt": "copy: red cat dog", "chosen": " red cat dog",
                                                   "rejected": " red cat sun"}] * 3),
                           ["--max-length", "4", "--max-prompt-length", "2", "--no-progress"],
                           ["max_length=4", "--max-length"]),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_bad_data_is_one_line_exit_2_and_nothing_written(name, tmp_path, tiny_model_dir, capsys):
    filename, content, extra, needles = DATA_CASES[name]
    data = tmp_path / filename
    data.write_bytes(content)
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, data, out) + extra)
    err = capsys.readouterr().err
    assert code == 2
    the_error_line(err, "data error", filename, *needles)
    assert not out.exists()


def test_missing_data_file(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, tmp_path / "nowhere.jsonl", out))
    assert code == 2
    the_error_line(capsys.readouterr().err, "nowhere.jsonl", "not found")
    assert not out.exists() and not (tmp_path / "nowhere.jsonl").exists()


def test_broken_eval_data_names_the_eval_file(tmp_path, tiny_model_dir, good_data, capsys):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_bytes(jsonl(OK, OK, {"prompt": "a", "rejected": "b"}))
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, good_data, out) + ["--eval-data", heldout])
    assert code == 2
    line = the_error_line(capsys.readouterr().err, "heldout.jsonl", "row 3", "'chosen'")
    assert good_data.name not in line
    assert not out.exists()


def test_bad_data_leaves_an_existing_output_dir_untouched(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(jsonl(OK, {"prompt": "a"}))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert invoke(base_args(tiny_model_dir, data, out)) == 2
    the_error_line(capsys.readouterr().err, "prefs.jsonl", "row 2")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ---------------------------------------------------------------------------------------------
# Bad configuration


# (YAML file text or None, extra flags, what the message must name); "{config}" is the YAML file
CONFIG_CASES = {
    "negative beta": (None, ["--beta", "-0.5"], ["'beta'", "> 0", "-0.5"]),
    "unknown loss suggests the nearest": (None, ["--loss", "sigmod"], ["'loss'", "did you mean 'sigmoid'"]),
    "bad number": (None, ["--beta", "abc"], ["'beta'", "'abc'", "number"]),
    "max_prompt_length >= max_length": (None, ["--max-length", "64", "--max-prompt-length", "64"],
                                        ["'max_prompt_length'", "max_length=64"]),
    "eval steps without eval data": (None, ["--eval-steps", "5"], ["'eval_steps'", "--eval-data"]),
    "unknown YAML key suggests the nearest": ("bta: 0.2\n", [], ["'bta'", "{config}", "did you mean 'beta'"]),
    "YAML value of the wrong type": ("beta: [0.1]\n", [], ["'beta'", "number"]),
    "YAML bool that is not a bool": ("progress: sometimes\n", [], ["'progress'", "true or false"]),
    "YAML that is not a mapping": ("- beta\n- 0.1\n", [], ["'config'", "{config}", "mapping"]),
    "YAML with a syntax error": ("beta: [0.1\n", [], ["'config'", "{config}", "not valid YAML"]),
    "argparse: invalid choice": (None, ["--reference", "cached"], ["--reference", "invalid choice", "'cached'"]),
    "argparse: unknown flag": (None, ["--bta", "0.2"], ["unrecognized arguments", "--bta"]),
    "argparse: flag without its value": (None, ["--beta"], ["--beta", "expected one argument"]),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_bad_config_is_one_line_exit_2_and_nothing_written(name, tmp_path, tiny_model_dir, good_data, capsys):
    text, extra, needles = CONFIG_CASES[name]
    out = tmp_path / "out"
    args = base_args(tiny_model_dir, good_data, out)
    config = tmp_path / "exp.yaml"
    if text is not None:
        config.write_text(text)
        args += ["--config", config]
    code = invoke(args + extra)
    assert code == 2
    the_error_line(capsys.readouterr().err, *(n.replace("{config}", config.name) for n in needles))
    assert not out.exists()


def test_missing_config_file(tmp_path, tiny_model_dir, good_data, capsys):
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, good_data, out) + ["--config", tmp_path / "nope.yaml"])
    assert code == 2
    the_error_line(capsys.readouterr().err, "'config'", "nope.yaml", "not found")
    assert not out.exists()


def test_missing_model_folder(tmp_path, good_data, capsys):
    out = tmp_path / "out"
    code = invoke(base_args(tmp_path / "no-such-model", good_data, out))
    assert code == 2
    the_error_line(capsys.readouterr().err, "'model'", "no-such-model", "not found")
    assert not out.exists()


def test_output_dir_that_is_a_file(tmp_path, tiny_model_dir, good_data, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    code = invoke(base_args(tiny_model_dir, good_data, out) + ["--no-progress"])
    assert code == 2
    # refused before the model is loaded: no progress bars or loading messages precede the line
    the_error_line(capsys.readouterr().err, "'output_dir'", str(out), "not a folder")
    assert out.read_text() == "not a folder"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is not None, reason="tensorboard is installed")
def test_report_to_tensorboard_without_tensorboard(tmp_path, tiny_model_dir, good_data, capsys):
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, good_data, out) + ["--report-to", "tensorboard"])
    assert code == 2
    the_error_line(capsys.readouterr().err, "'report_to'", "tensorboard is not installed", "--report-to none")
    assert not out.exists()


def test_no_command_prints_help_and_exits_2(capsys):
    assert invoke([]) == 2
    out = capsys.readouterr().out
    assert out.startswith("usage: dpolab") and "train" in out


# ---------------------------------------------------------------------------------------------
# The same, for real: exit status, no traceback, one stderr line from a fresh interpreter


def test_subprocess_bad_data(tmp_path, tiny_model_dir):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(jsonl(OK, OK) + b"{not json}\n")
    proc = run_subprocess(base_args(tiny_model_dir, data, tmp_path / "out"), tmp_path)
    assert proc.returncode == 2, proc.stderr
    the_error_line(proc.stderr, "data error", "prefs.jsonl", "row 3", "not valid JSON")
    assert not (tmp_path / "out").exists()


def test_subprocess_bad_config(tmp_path, tiny_model_dir, good_data):
    config = tmp_path / "exp.yaml"
    config.write_text(f"model: {tiny_model_dir}\ndata: {good_data}\noutput_dir: {tmp_path / 'out'}\n"
                      "learning_rat: 0.001\n")
    proc = run_subprocess(["train", "--config", config], tmp_path)
    assert proc.returncode == 2, proc.stderr
    the_error_line(proc.stderr, "config error", "'learning_rat'", "exp.yaml", "did you mean 'learning_rate'")
    assert not (tmp_path / "out").exists()


def test_subprocess_help_documents_every_field(tmp_path):
    proc = run_subprocess(["train", "--help"], tmp_path)
    assert proc.returncode == 0 and proc.stderr == ""
    text = proc.stdout
    docs = field_docs()
    assert set(docs) == set(FIELDS), "every TrainConfig field needs a docstring"
    for name in FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in text, flag
        assert squash(docs[name]) in squash(text), f"help for {flag} lacks its docstring: {docs[name]}"
    for name in ("progress", "trust_remote_code"):  # booleans can be switched both ways
        assert "--no-" + name.replace("_", "-") in text
    assert "--config" in text and "examples:" in text


# ---------------------------------------------------------------------------------------------
# YAML and flags


# A valid, non-default value for every field, and the other fields it needs to be valid.
SAMPLES = {
    "model": "org/model", "data": "prefs.jsonl", "output_dir": "runs/x", "data_split": "test",
    "eval_data": "heldout.jsonl", "eval_split": 0.25, "loss": "ipo", "beta": 0.25, "label_smoothing": 0.2,
    "reference": "model", "learning_rate": 0.001, "batch_size": 3, "grad_accum": 2, "epochs": 2.5,
    "max_steps": 7, "warmup_ratio": 0.2, "lr_scheduler": "linear", "weight_decay": 0.01, "max_grad_norm": 0.5,
    "seed": 42, "max_length": 600, "max_prompt_length": 40, "precision": "bf16", "device": "cpu",
    "eval_batch_size": 5, "logging_steps": 3, "eval_steps": 4, "early_stopping_patience": 2, "save_steps": 6,
    "report_to": "wandb", "run_name": "exp-1", "progress": False, "trust_remote_code": True,
    "loss_weights": "0.8,0.2", "exo_epsilon": 0.01, "discopop_tau": 0.1, "dpop_lambda": 5.0, "simpo_gamma": 1.0,
    "f_divergence": "js", "f_alpha": 0.25, "wpo": True, "ld_alpha": 0.5, "desirable_weight": 1.5,
    "undesirable_weight": 0.75, "reference_model": "runs/base/final", "ref_sync_steps": 8, "ref_sync_alpha": 0.5,
    "allow_pickle": True, "resume": "runs/x/checkpoints/step-2", "resume_force": True, "save_total_limit": 2,
    "max_skipped_steps": 3, "strict": True, "prefix_sharing": False, "packing": False, "pack_length": 2048,
    "gradient_checkpointing": True, "activation_offloading": True, "fsdp": True, "deepspeed": "ds_config.json", "lora_r": 16, "lora_alpha": 32.0, "lora_dropout": 0.05,
    "lora_target_modules": "q_proj,v_proj", "merge_lora": True, "num_proc": 2,
    "beta_schedule": "linear", "beta_start": 0.5, "beta_end": 0.05, "kl_eval_steps": 5, "kl_prompts": 16,
    "kl_max_new_tokens": 32, "target_kl": 6.0, "kl_adapt_rate": 0.5, "max_kl": 20.0,
    "streaming": True, "objective": ["helpful=0.7", "harmless=0.3:harmless.jsonl"],
    "online": True, "online_every": 3, "online_only": True, "judge": "pkg.mod:reward", "constitution": "rules.txt",
    "online_prompts": 6, "online_samples": 4, "online_max_new_tokens": 32, "online_temperature": 0.7,
}
NEEDS = {"eval_steps": {"eval_data": "heldout.jsonl"},
         "early_stopping_patience": {"eval_data": "heldout.jsonl", "eval_steps": 4},
         "loss_weights": {"loss": "ipo,sft"}, "streaming": {"max_steps": 7}, "ref_sync_steps": {"reference": "model"},
         **{name: {"lora_r": 16} for name in ("lora_alpha", "lora_dropout", "lora_target_modules")},
         "beta_end": {"beta_schedule": "linear"}, "target_kl": {"kl_eval_steps": 5}, "max_kl": {"kl_eval_steps": 5},
         "kl_adapt_rate": {"kl_eval_steps": 5, "target_kl": 6.0},
         "online": {"judge": "pkg.mod:reward"}, "judge": {"online": True},
         "constitution": {"online": True, "judge": "ai:org/judge"},
         **{name: {"online": True, "judge": "pkg.mod:reward"} for name in (
             "online_every", "online_only", "online_prompts", "online_samples", "online_max_new_tokens",
             "online_temperature")}}
BASE = {"model": "org/model", "data": "prefs.jsonl", "output_dir": "runs/x"}


def test_samples_cover_every_field():
    assert set(SAMPLES) == set(FIELDS)


def parse(argv) -> TrainConfig:
    return cli.config_from_args(cli.build_parser().parse_args([str(a) for a in argv]))


def as_flags(values: dict) -> list[str]:
    args = []
    for name, value in values.items():
        flag = name.replace("_", "-")
        if isinstance(value, list):  # a repeatable flag (--objective): once per item
            args += [a for item in value for a in (f"--{flag}", str(item))]
            continue
        args += [f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return args


@pytest.mark.parametrize("name", FIELDS)
@pytest.mark.parametrize("spelling", ["underscore", "dash"])
def test_every_flag_works_as_a_yaml_key(name, spelling, tmp_path):
    values = {**BASE, **NEEDS.get(name, {}), name: SAMPLES[name]}
    expected = TrainConfig(**values)
    assert getattr(expected, name) != getattr(TrainConfig(**BASE), name) or name in BASE  # really set
    config = tmp_path / "exp.yaml"
    key = name if spelling == "underscore" else name.replace("_", "-")
    config.write_text(yaml.safe_dump({**{k: v for k, v in values.items() if k != name}, key: SAMPLES[name]}))
    assert parse(["train", "--config", config]) == expected
    assert parse(["train", *as_flags(values)]) == expected


def test_flags_override_yaml(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**BASE, "beta": 0.2, "progress": True, "max-steps": 9, "loss": "ipo"}))
    cfg = parse(["train", "--config", config, "--beta", "0.5", "--no-progress", "--output-dir", "elsewhere"])
    assert (cfg.beta, cfg.progress, cfg.output_dir) == (0.5, False, "elsewhere")  # from the flags
    assert (cfg.max_steps, cfg.loss, cfg.model) == (9, "ipo", "org/model")  # from the file


# ---------------------------------------------------------------------------------------------
# Successful runs


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_successful_run_writes_config_metrics_and_final(tmp_path, tiny_model_dir, good_data, capsys):
    out = tmp_path / "out"
    code = invoke(base_args(tiny_model_dir, good_data, out) + ["--max-steps", "1", "--no-progress",
                                                               "--precision", "fp32", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Traceback" not in captured.err and "dpolab:" not in captured.err
    assert "done: 1 steps" in captured.out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert set(saved) == set(FIELDS) and saved["max_steps"] == 1 and saved["batch_size"] == 4
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1] and {"loss", "rewards/accuracies", "learning_rate"} <= set(rows[0])
    final = out / "final"
    assert (final / "config.json").is_file() and (final / "model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()


def test_yaml_run_with_a_flag_override(tmp_path, tiny_model_dir, good_data, capsys):
    out = tmp_path / "out"
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": str(good_data), "output-dir": str(out),
                                      "beta": 0.2, "learning_rate": 0.001, "max-length": 64,
                                      "max_prompt_length": 16, "batch-size": 4, "loss": "ipo", "seed": 3,
                                      "progress": True, "precision": "fp32", "max_steps": 5}))
    code = invoke(["train", "--config", config, "--beta", "0.5", "--max-steps", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["beta"], saved["max_steps"], saved["progress"]) == (0.5, 1, False)  # flags win
    assert {k: saved[k] for k in ("learning_rate", "max_length", "max_prompt_length", "batch_size", "loss",
                                  "seed")} == {"learning_rate": 0.001, "max_length": 64, "max_prompt_length": 16,
                                               "batch_size": 4, "loss": "ipo", "seed": 3}  # from the file
    assert [r["step"] for r in read_metrics(out)] == [1]


# ---------------------------------------------------------------------------------------------
# Trackers, faked in sys.modules (neither tensorboard nor wandb needs to be installed)


def fake_module(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # what importlib.util.find_spec returns
    module.__dict__.update(attrs)
    return module


def scalars(row: dict) -> dict:
    return {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}


def two_step_run(tmp_path, model_dir, data, report_to: str) -> Path:
    out = tmp_path / "out"
    code = invoke(base_args(model_dir, data, out) + ["--max-steps", "2", "--logging-steps", "1", "--no-progress",
                                                     "--precision", "fp32", "--batch-size", "4",
                                                     "--report-to", report_to])
    assert code == 0
    return out


def test_report_to_tensorboard_sends_the_logged_metrics(tmp_path, tiny_model_dir, good_data, monkeypatch):
    calls = []

    class SummaryWriter:
        def __init__(self, log_dir=None, **kwargs):
            calls.append(("init", log_dir))

        def add_scalar(self, tag, value, step):
            calls.append(("scalar", tag, value, step))

        def flush(self):
            pass

        def close(self):
            calls.append(("close",))

    monkeypatch.setitem(sys.modules, "tensorboard", fake_module("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        fake_module("torch.utils.tensorboard", SummaryWriter=SummaryWriter))
    out = two_step_run(tmp_path, tiny_model_dir, good_data, "tensorboard")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    sent = [("scalar", k, v, r["step"]) for r in rows for k, v in scalars(r).items()]
    assert calls == [("init", str(out / "tensorboard")), *sent, ("close",)]
    assert {"loss", "rewards/accuracies", "rewards/margins", "learning_rate", "grad_norm"} <= {c[1] for c in sent}


def test_report_to_wandb_sends_the_logged_metrics(tmp_path, tiny_model_dir, good_data, monkeypatch):
    inits, logged, finished = [], [], []

    class Run:
        def log(self, data, step=None):
            logged.append((dict(data), step))

        def finish(self):
            finished.append(True)

    def init(**kwargs):
        inits.append(kwargs)
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", fake_module("wandb", init=init))
    out = two_step_run(tmp_path, tiny_model_dir, good_data, "wandb")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2]
    assert logged == [(scalars(r), r["step"]) for r in rows]
    assert {"loss", "rewards/accuracies", "learning_rate"} <= set(logged[0][0])
    assert finished == [True]
    (kwargs,) = inits
    assert kwargs["name"] == out.name and kwargs["dir"] == str(out)  # run name defaults to the folder's
    assert kwargs["config"] == yaml.safe_load((out / "config.yaml").read_text())
