"""dpolab vs TRL's DPOTrainer: the same model on the same synthetic preference pairs, side by side.

Each trainer runs in its own child process, one after the other; for each we measure the whole
process (wall time from launch to exit, peak RSS), the training loop and the reference pass, and
report tokens/s, the ratio to TRL, MFU against the matmul peak measured here, and loss agreement.

    python benchmarks/throughput.py                       # small (~7M) workload, 30 steps
    python benchmarks/throughput.py --workload all --json results.json
    python benchmarks/throughput.py --steps 3 --variants "default=;no-packing=--no-packing" --skip-trl

Tokens are "logical": per pair 2*(prompt+BOS) + (chosen+EOS) + (rejected+EOS), counted from the data,
the same for both trainers whatever each does internally (dpolab may share the prompt, TRL pads).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LN2 = math.log(2)
COMMON_FLAGS = ["--learning-rate", "1e-5", "--beta", "0.1", "--warmup-ratio", "0", "--lr-scheduler", "constant",
                "--logging-steps", "1", "--max-length", "512", "--max-prompt-length", "256", "--no-progress",
                "--seed", "0"]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=[*C.WORKLOADS, "all"], default="small")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimizer steps (default: 30 small, 10 50m, 5 150k); the data is steps x batch pairs")
    ap.add_argument("--batch-size", type=int, default=C.BATCH_PAIRS, help="pairs per step (default 8)")
    ap.add_argument("--variants", default="default=",
                    help='dpolab runs as "name=FLAGS;name2=FLAGS2" (FLAGS passed through to dpolab train)')
    ap.add_argument("--skip-trl", action="store_true", help="do not run TRL")
    ap.add_argument("--check", action=argparse.BooleanOptionalAction, default=None,
                    help="fp32 agreement pass on 16 pairs (default: on for the small workload only)")
    ap.add_argument("--workdir", default="/tmp/dpolab-bench", help="models, data and run folders (reused)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--wait-idle", type=float, default=60.0, metavar="S",
                    help="before each run, wait up to S seconds for other processes to leave the CPUs (0: never)")
    return ap.parse_args(argv)


def parse_variants(spec: str) -> list[tuple[str, list[str]]]:
    out = []
    for part in spec.split(";"):
        part = part.strip()
        if not part:
            continue
        name, _, flags = part.partition("=")
        out.append((name.strip() or f"v{len(out)}", shlex.split(flags)))
    return out or [("default", [])]


def _env(run_dir: Path) -> dict:
    """Child env: offline, a fresh datasets cache per run (TRL caches reference log-probs there)."""
    src = str(REPO / "src")
    path = os.environ.get("PYTHONPATH")
    return C.child_env({"HF_DATASETS_CACHE": str(run_dir / "hf-datasets-cache"),
                        "PYTHONPATH": src + (os.pathsep + path if path else "")})


WAIT_IDLE_S = 0.0  # set from --wait-idle


def _fresh(run_dir: Path) -> Path:
    """An empty run folder, once the CPUs are free (see --wait-idle)."""
    if WAIT_IDLE_S > 0:
        waited, busy = C.wait_for_idle(WAIT_IDLE_S)
        if waited >= 2:
            print(f"  waited {waited:.0f} s for other processes to leave the CPUs (busy now: {100 * busy:.0f}%)",
                  flush=True)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    return run_dir


# --------------------------------------------------------------------------- the two trainers

def run_dpolab(model: Path, data: Path, run_dir: Path, steps: int, batch: int, flags: list[str]) -> dict:
    run_dir = _fresh(run_dir)
    out = run_dir / "out"
    cmd = [sys.executable, "-m", "dpolab", "train", "--model", str(model), "--data", str(data),
           "--output-dir", str(out), "--batch-size", str(batch), "--max-steps", str(steps),
           "--precision", "bf16", *COMMON_FLAGS, *flags]
    child = C.run_child(cmd, run_dir / "log.txt", _env(run_dir), cwd=str(run_dir))
    rows = [r for r in C.read_jsonl(out / "metrics.jsonl") if "loss" in r]
    res = {"trainer": "dpolab", "cmd": shlex.join(cmd), **_child_fields(child),
           "losses": [r["loss"] for r in rows], "steps_done": rows[-1]["step"] if rows else 0,
           "train_s": rows[-1]["elapsed_s"] if rows else None, "tokens_reported": rows[-1]["tokens"] if rows else None,
           "step1": rows[0] if rows else {}, "ref": C.parse_reference_line(child.output)}
    ref = res["ref"]  # its "X s" is rounded: derive the time from "N tokens ... (Y tokens/s)" when both are there
    res["ref_s"] = ref["tokens"] / ref["tokens_per_s"] if ref.get("tokens_per_s") else ref.get("seconds")
    return res


def run_trl(model: Path, data: Path, run_dir: Path, steps: int, batch: int, precision: str = "bf16") -> dict:
    run_dir = _fresh(run_dir)
    result_json = run_dir / "trl.json"
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "_trl_run.py"), "--model", str(model),
           "--data", str(data), "--output-dir", str(run_dir / "out"), "--json", str(result_json),
           "--steps", str(steps), "--batch-size", str(batch), "--precision", precision]
    child = C.run_child(cmd, run_dir / "log.txt", _env(run_dir), cwd=str(run_dir))
    info = json.loads(result_json.read_text()) if result_json.is_file() else {}
    rows = [r for r in info.get("log_history", []) if "loss" in r and "train_runtime" not in r]
    step1 = dict(rows[0]) if rows else {}
    return {"trainer": "trl", "cmd": shlex.join(cmd), **_child_fields(child),
            "losses": [r["loss"] for r in rows], "steps_done": rows[-1]["step"] if rows else 0,
            "train_s": info.get("train_s"), "train_runtime": info.get("train_runtime"),
            "ref_s": info.get("precompute_s"), "tokens_reported": info.get("num_tokens_trl"),
            "step1": step1, "setup": info.get("setup", {}), "save_s": info.get("save_s"),
            "init_s": info.get("init_s"), "import_s": info.get("import_s"),
            "trl_version": info.get("trl_version")}


def _child_fields(child: C.ChildResult) -> dict:
    fields = {"returncode": child.returncode, "wall_s": child.wall_s, "peak_rss_gb": child.peak_rss_gb,
              "polled_rss_gb": child.polled_rss_gb, "maxrss_gb": child.maxrss_gb, "cpu_s": child.cpu_s,
              "other_cpu_share": child.other_cpu_share, "log": str(child.log)}
    if child.other_cpu_share > 0.1:  # False for nan (no psutil)
        print(f"  note: other processes kept {100 * child.other_cpu_share:.0f}% of the cores busy during this run; "
              "its timings are not clean", flush=True)
    if child.returncode != 0:
        fields["error_tail"] = "\n".join(child.output.splitlines()[-25:])
        print(f"  !! exit code {child.returncode}; last lines of {child.log}:\n{fields['error_tail']}", flush=True)
    return fields


# --------------------------------------------------------------------------- figures

def _div(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def add_rates(res: dict, tokens: int, n_params: int, peaks: dict) -> dict:
    """Tokens/s over the training loop, the whole process and the reference pass; MFU vs the bf16 peak."""
    res["logical_tokens"] = tokens
    res["train_tok_s"] = _div(tokens, res.get("train_s")) if res.get("returncode") == 0 else None
    res["whole_tok_s"] = _div(tokens, res["wall_s"]) if res.get("returncode") == 0 else None
    res["ref_tok_s"] = _div(tokens, res.get("ref_s"))
    if res["train_tok_s"]:
        res["mfu_bf16"] = 6 * n_params * res["train_tok_s"] / (peaks["bf16"] * 1e9)
        res["mfu_fp32"] = 6 * n_params * res["train_tok_s"] / (peaks["fp32"] * 1e9)
    if res["ref_tok_s"]:
        res["ref_mfu_bf16"] = 2 * n_params * res["ref_tok_s"] / (peaks["bf16"] * 1e9)
    res["ref_over_train"] = _div(res["ref_tok_s"], res["train_tok_s"])
    loss1 = res["losses"][0] if res["losses"] else None
    res["step1_loss"] = loss1
    res["step1_loss_ok"] = loss1 is not None and abs(loss1 - LN2) < 1e-3
    return res


def compare_curves(dp: dict, trl: dict) -> dict:
    """Mean loss over the last third of the steps for both, their difference and its standard error."""
    if not dp.get("losses") or not trl.get("losses"):
        return {}
    m1, se1, k1 = C.tail_mean(dp["losses"])
    m2, se2, k2 = C.tail_mean(trl["losses"])
    se = math.sqrt(se1 ** 2 + se2 ** 2) if not (math.isnan(se1) or math.isnan(se2)) else float("nan")
    diff = m1 - m2
    paired = list(zip(dp["losses"], trl["losses"]))  # informative only: the two data orders may differ
    return {"max_step_diff": max(abs(a - b) for a, b in paired), "dpolab_tail_mean": m1, "trl_tail_mean": m2, "tail_steps": [k1, k2], "diff": diff, "diff_se": se,
            "within_noise": (abs(diff) <= 2 * se) if not math.isnan(se) else None,
            "dpolab_curve": dp["losses"], "trl_curve": trl["losses"]}


def agreement_check(workdir: Path, model: Path, vocab: int, tag: str, skip_trl: bool) -> dict:
    """Both trainers, fp32, on the same 16 pairs in one batch of 16, one step: compare step-1 log-probs."""
    data = C.write_pairs(workdir, "check", 16, vocab, seed=1)
    print(f"[{tag}] agreement check: 16 pairs, batch 16, 1 step, fp32", flush=True)
    dp = run_dpolab(model, data, workdir / "runs" / tag / "check-dpolab", 1, 16, ["--precision", "fp32"])
    out = {"data": str(data), "dpolab": {k: dp["step1"].get(k) for k in ("loss", "logps/chosen", "logps/rejected")}}
    if skip_trl:
        out["passed"] = None
        return out
    trl = run_trl(model, data, workdir / "runs" / tag / "check-trl", 1, 16, precision="fp32")
    out["trl"] = {k: trl["step1"].get(k) for k in ("loss", "logps/chosen", "logps/rejected")}
    ok = True
    for key in ("logps/chosen", "logps/rejected"):
        a, b = out["dpolab"][key], out["trl"][key]
        rel = abs(a - b) / max(abs(b), 1e-12) if a is not None and b is not None else None
        out[f"rel_diff {key}"] = rel
        ok = ok and rel is not None and rel <= 1e-3
    for who in ("dpolab", "trl"):
        loss = out[who]["loss"]
        ok = ok and loss is not None and abs(loss - LN2) < 1e-3
    out["passed"] = ok
    return out


# --------------------------------------------------------------------------- one workload

def run_workload(wl: C.Workload, args, peaks: dict, trl_ok: bool) -> dict:
    workdir = Path(args.workdir)
    steps = args.steps or wl.default_steps
    model = C.build_model(workdir, wl)
    info = C.model_info(model)
    n_pairs = steps * args.batch_size
    data = C.write_pairs(workdir, "train", n_pairs, wl.vocab)
    tokens = C.logical_tokens(data)
    print(f"[{wl.name}] model {model} ({info['params_total'] / 1e6:.2f}M params, "
          f"{info['params_non_embedding'] / 1e6:.2f}M without the input embedding); "
          f"{n_pairs} pairs, {tokens} logical tokens, {steps} steps of {args.batch_size}", flush=True)
    out = {"workload": wl.name, "model": str(model), **info, "steps": steps, "pairs": n_pairs,
           "data": str(data), "logical_tokens": tokens, "runs": {}}
    n = info["params_non_embedding"]
    check = args.check if args.check is not None else wl.name == "small"
    if check:
        out["check"] = agreement_check(workdir, model, wl.vocab, wl.name, args.skip_trl or not trl_ok)
    for name, flags in parse_variants(args.variants):
        print(f"[{wl.name}] dpolab {name}: {shlex.join(flags) or '(no extra flags)'}", flush=True)
        res = run_dpolab(model, data, workdir / "runs" / wl.name / f"dpolab-{name}", steps, args.batch_size, flags)
        out["runs"][f"dpolab:{name}"] = add_rates(res, tokens, n, peaks)
        _say_run(f"dpolab:{name}", res)
    if trl_ok and not args.skip_trl:
        print(f"[{wl.name}] trl DPOTrainer (bf16 autocast, precomputed reference, no checkpointing)", flush=True)
        res = run_trl(model, data, workdir / "runs" / wl.name / "trl", steps, args.batch_size)
        out["runs"]["trl"] = add_rates(res, tokens, n, peaks)
        _say_run("trl", res)
        first_dp = next((r for k, r in out["runs"].items() if k.startswith("dpolab:")), None)
        if first_dp is not None:
            out["loss_curves"] = compare_curves(first_dp, res)
    return out


def _say_run(label: str, res: dict) -> None:
    print(f"    {label}: exit {res['returncode']}, whole {res['wall_s']:.1f} s, train {_fmt(res.get('train_s'), 2)} s, "
          f"ref {_fmt(res.get('ref_s'), 2)} s, peak RSS {res['peak_rss_gb']:.2f} GB, "
          f"step-1 loss {_fmt(res.get('step1_loss'), 4)}, others' CPU {_fmt(100 * res['other_cpu_share'], 0, '%')}", flush=True)


# --------------------------------------------------------------------------- output

def _fmt(v, digits=0, suffix=""):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}{suffix}"


HEADER = ["workload", "run", "whole s", "train tok/s", "whole tok/s", "xTRL train", "xTRL whole", "peak RSS GB",
          "RSS/TRL", "MFU %", "ref tok/s", "ref/train", "loss@1", "others CPU"]


def table_rows(results: list[dict]) -> list[list[str]]:
    rows = []
    for wl in results:
        trl = wl["runs"].get("trl", {})
        for label, r in wl["runs"].items():
            rows.append([wl["workload"], label, _fmt(r["wall_s"], 1), _fmt(r.get("train_tok_s")),
                         _fmt(r.get("whole_tok_s")),
                         _fmt(_div(r.get("train_tok_s"), trl.get("train_tok_s")), 2, "x"),
                         _fmt(_div(r.get("whole_tok_s"), trl.get("whole_tok_s")), 2, "x"),
                         _fmt(r["peak_rss_gb"], 2), _fmt(_div(r["peak_rss_gb"], trl.get("peak_rss_gb")), 2, "x"),
                         _fmt(100 * r["mfu_bf16"] if r.get("mfu_bf16") else None, 1),
                         _fmt(r.get("ref_tok_s")), _fmt(r.get("ref_over_train"), 2, "x"),
                         _fmt(r.get("step1_loss"), 4), _fmt(100 * r["other_cpu_share"], 0, "%")])
    return rows


def print_report(results: list[dict], peaks: dict) -> None:
    rows = table_rows(results)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(HEADER)]

    def line(cells):
        return "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    print()
    print(line(HEADER))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    print()
    print(f"peak measured here: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s "
          f"(2048x2048 torch.mm, best of 5, at the start and the end, the higher kept; {os.cpu_count()} cores)")
    print("train tok/s: logical tokens / training-loop time (dpolab: elapsed_s of its last metrics row; TRL: "
          "trainer.train() wall time, which excludes its reference precompute, done in DPOTrainer.__init__).")
    print("whole tok/s: logical tokens / whole child-process wall time (imports, data, reference pass, training, "
          "saving the final model).  ref tok/s: logical tokens of all pairs / reference-pass time.")
    print("others CPU: share of all cores used by other processes during the run (above ~10% the timings are not "
          "clean).")
    print("MFU: 6*N*train tok/s / bf16 peak, N = parameters without the input embedding (LM head included); "
          "dpolab applies the LM head to completion tokens only, so this conventional formula overstates its work.")
    for wl in results:
        _print_checks(wl)


def _print_checks(wl: dict) -> None:
    name = wl["workload"]
    for label, r in wl["runs"].items():
        if r.get("step1_loss") is not None:
            print(f"[{name}] {label}: step-1 loss {r['step1_loss']:.5f} vs ln 2 = {LN2:.5f}: "
                  f"{'PASS' if r['step1_loss_ok'] else 'FAIL'}")
        if r.get("setup"):
            print(f"[{name}] trl setup: {json.dumps(r['setup'])}")
    cur = wl.get("loss_curves")
    if cur:
        verdict = {True: "within noise", False: "NOT within 2 s.e.", None: "too few steps to judge"}[cur["within_noise"]]
        print(f"[{name}] loss, mean of the last {cur['tail_steps'][0]} steps: dpolab {cur['dpolab_tail_mean']:.5f}, "
              f"TRL {cur['trl_tail_mean']:.5f}, difference {cur['diff']:+.5f} (+- {_fmt(cur['diff_se'], 5)} s.e.): "
              f"{verdict}; largest per-step difference {cur['max_step_diff']:.5f}")
    chk = wl.get("check")
    if chk:
        print(f"[{name}] agreement (fp32, 16 pairs, 1 step): dpolab {json.dumps(chk.get('dpolab'))}")
        if "trl" in chk:
            print(f"[{name}]                                   TRL    {json.dumps(chk.get('trl'))}")
            rel = {k: v for k, v in chk.items() if k.startswith("rel_diff")}
            print(f"[{name}] relative differences {json.dumps(rel)}: {'PASS' if chk['passed'] else 'FAIL'}")


def measure_peaks() -> dict:
    if WAIT_IDLE_S > 0:
        C.wait_for_idle(WAIT_IDLE_S)
    return {"bf16": C.measure_peak_gflops("bf16"), "fp32": C.measure_peak_gflops("fp32")}


def _clean(value):
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    trl_ok = importlib.util.find_spec("trl") is not None
    if not trl_ok and not args.skip_trl:
        print("note: trl is not importable (pip install 'dpolab[bench]'); running dpolab only", flush=True)
    global WAIT_IDLE_S
    WAIT_IDLE_S = args.wait_idle
    peaks = measure_peaks()
    print(f"matmul peak: bf16 {peaks['bf16']:.0f} GFLOP/s, fp32 {peaks['fp32']:.0f} GFLOP/s", flush=True)
    names = list(C.WORKLOADS) if args.workload == "all" else [args.workload]
    results = [run_workload(C.WORKLOADS[n], args, peaks, trl_ok) for n in names]
    again = measure_peaks()  # best of the two: a busy machine only ever lowers it (MFU is then recomputed)
    if again["bf16"] > peaks["bf16"] or again["fp32"] > peaks["fp32"]:
        peaks.update(bf16=max(peaks["bf16"], again["bf16"]), fp32=max(peaks["fp32"], again["fp32"]))
        for wl in results:
            for res in wl["runs"].values():
                add_rates(res, res["logical_tokens"], wl["params_non_embedding"], peaks)
    print_report(results, peaks)
    if args.json:
        import torch
        machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "peak_gflops": peaks}
        everything = {"machine": machine, "args": vars(args), "workloads": results,
                      "table": {"header": HEADER, "rows": table_rows(results)}}
        Path(args.json).write_text(json.dumps(_clean(everything), indent=1))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
