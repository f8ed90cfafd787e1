"""Train a tiny model with DPO end to end, with nothing to download (under a minute on 2 CPU cores).

    python examples/quickstart.py [--output-dir runs/quickstart]

It writes a tiny random Llama and its tokenizer (the "SFT model"), synthetic preference pairs in
which the chosen answer copies the prompt and the rejected one does not, then runs exactly what
`dpolab train` runs and prints how the implicit reward separates chosen from rejected answers.
"""

import argparse
from pathlib import Path

import dpolab
from dpolab.toy import copy_task_rows, save_toy_model, write_jsonl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the model, data and run go")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    args = parser.parse_args()
    root = Path(args.output_dir)
    model_dir = save_toy_model(root / "base-model", hidden=48, layers=2)
    train_file = write_jsonl(root / "data" / "train.jsonl", copy_task_rows(256, seed=0))
    eval_file = write_jsonl(root / "data" / "eval.jsonl", copy_task_rows(64, seed=1))
    print(f"equivalent command:\n  dpolab train --model {model_dir} --data {train_file} --eval-data {eval_file} "
          f"--output-dir {root / 'run'} --max-steps {args.steps} --learning-rate 1e-3 --beta 0.1 --eval-steps 100\n")
    result = dpolab.train(dpolab.TrainConfig(
        model=str(model_dir), data=str(train_file), eval_data=str(eval_file), output_dir=str(root / "run"),
        max_steps=args.steps, learning_rate=1e-3, beta=0.1, eval_steps=100, logging_steps=10))
    first = result.eval_metrics
    print("\nheld-out pairs after training:")
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
                "eval_rewards/rejected"):
        print(f"  {key:26s} {first[key]: .4f}")
    print(f"\nmetrics: {result.output_dir / 'metrics.jsonl'}\nmodel:   {result.output_dir / 'final'}")


if __name__ == "__main__":
    main()
