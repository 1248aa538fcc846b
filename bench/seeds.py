"""ChipNet, CHIP and the baselines against random masks over several seeds, at one budget
target, through the real stage code (each stage's main, in process), from the pipeline's
dense checkpoint. Prints test top-1 as mean and spread per method and budget type.

    python bench/seeds.py [--target 0.125] [--types flops params] [--seeds 0 1 2]
                          [--methods chipnet chip random] [--dataset digits] [--model resnet20]

The seed moves everything a method draws: ChipNet's gate init and data order, CHIP's scoring
images, the random baseline's scores, and every fine-tuning run. Needs `make run` first.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from stages import baseline_masks, evaluate, finetune, learn_masks, score_channels, select_channels


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default="0.125")
    ap.add_argument("--types", nargs="+", default=["flops", "params"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["chipnet", "chip", "random"])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="resnet20")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="chipprune-seeds-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "seeds"
    data = f"data/prepared/{args.dataset}"
    dense = f"runs/dense/{args.dataset}-{args.model}/checkpoint.pt"
    base = yaml.safe_load(Path("params.yaml").read_text())
    top1: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        params = json.loads(json.dumps(base))  # deep copy, anchors resolved
        params["learn_masks"]["seed"] = params["baselines"]["seed"] = params["chip"]["seed"] = seed
        for recipe in params["finetune"].values():
            recipe["seed"] = seed
        pfile = work / f"params-{seed}.yaml"
        pfile.write_text(yaml.safe_dump(params))
        p = ["--params", str(pfile)]
        scores = work / f"scores-{seed}"
        if "chip" in args.methods:
            score_channels.main([args.dataset, args.model, dense, data, str(scores), *p])
        for kind in args.types:
            for method in args.methods:
                masks = work / f"{method}-{kind}-{seed}"
                if method == "chipnet":
                    learn_masks.main([args.dataset, args.model, kind, args.target, data, dense,
                                      str(masks), *p])
                elif method == "chip":
                    select_channels.main([args.dataset, args.model, str(scores), dense, data,
                                          str(masks), "--budget", kind, args.target])
                else:
                    baseline_masks.main([method, args.dataset, args.model, kind, args.target,
                                         dense, data, str(masks), *p])
                tuned = work / f"ft-{method}-{kind}-{seed}"
                finetune.main([str(masks), dense, data, str(tuned), *p])
                evaluate.main([str(tuned / "checkpoint.pt"), data, str(tuned / "eval"), *p])
                m = json.loads((tuned / "eval/metrics.json").read_text())
                top1.setdefault((method, kind), []).append(m["test_top1"])

    print(f"\n{args.model} on {args.dataset}, target {args.target}, seeds {args.seeds}")
    print(f"{'method':<10}{'budget':<8}{'top-1 mean':>12}{'stdev':>9}{'min':>9}{'max':>9}  runs")
    for (method, kind), v in sorted(top1.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        print(f"{method:<10}{kind:<8}{statistics.mean(v):>12.4f}{sd:>9.4f}{min(v):>9.4f}"
              f"{max(v):>9.4f}  {', '.join(f'{x:.4f}' for x in v)}")


if __name__ == "__main__":
    main()
