"""ChipNet, CHIP, the baselines and the peers (Torch-Pruning's criteria tp_magnitude,
tp_taylor, tp_bn_scale and ModelOpt's fastnas, fine-tuned with the baselines' recipe where
the params have none for them) over several seeds, at given budgets,
through the real stage code (each stage's main, in process), from the pipeline's dense
checkpoint. Prints test top-1 as mean and spread per method and budget, and each method's
paired difference to random and to the best peer (same seed, same fine-tuning draws).

    python bench/seeds.py [--budgets flops-0.125 params-0.125] [--seeds 0 1 2]
                          [--methods chipnet chip random] [--dataset digits] [--model resnet20]
                          [--chip-combine sum normalised] [--params params.yaml]

The seed moves everything a method draws: ChipNet's gate init and data order, CHIP's scoring
images, the random baseline's scores, and every fine-tuning run. Needs `make run` first.
With several `--chip-combine` values CHIP runs once per value (`chip:sum`, `chip:normalised`,
same scoring images): how a residual stream's block outputs combine into one score.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

import yaml

from chipprune.methods.baselines import BASELINES, SEARCHES
from chipprune.methods.peers import PEER_CRITERIA
from stages import baseline_masks, evaluate, finetune, learn_masks, score_channels, select_channels

PEERS = (*PEER_CRITERIA, *SEARCHES)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--budgets", nargs="+", default=["flops-0.125", "params-0.125"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["chipnet", "chip", "random"])
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--chip-combine", nargs="+", default=None, choices=["sum", "normalised"])
    ap.add_argument("--params", default="params.yaml", help="the base params file")
    args = ap.parse_args()
    methods = []  # (label, its file-name form, method, chip combine or None)
    for m in args.methods:
        if m == "chip" and args.chip_combine:
            methods += [(f"chip:{c}", f"chip-{c}", m, c) for c in args.chip_combine]
        else:
            methods.append((m, m, m, None))

    work = Path(tempfile.mkdtemp(prefix="chipprune-seeds-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["MLFLOW_EXPERIMENT_NAME"] = "seeds"
    data = f"data/prepared/{args.dataset}"
    dense = f"runs/dense/{args.dataset}-{args.model}/checkpoint.pt"
    base = yaml.safe_load(Path(args.params).read_text())
    top1: dict[tuple[str, str], list[float]] = {}
    for seed in args.seeds:
        params = json.loads(json.dumps(base))  # deep copy, anchors resolved
        params["learn_masks"]["seed"] = params["baselines"]["seed"] = params["chip"]["seed"] = seed
        for _, _, method, _ in methods:  # a peer without a recipe: the baselines' (l1's)
            params["finetune"].setdefault(method, dict(params["finetune"]["l1"]))
        for recipe in params["finetune"].values():
            recipe["seed"] = seed
        listed = list(dict.fromkeys(m for _, _, m, _ in methods))
        params["prune"].update(budgets=args.budgets, datasets=[args.dataset], models=[args.model],
                               methods=listed, baselines=[m for m in listed if m in BASELINES])
        params["transfer"]["pairs"] = {}
        params["chip_rates"] = {}  # not run here; its check needs chip among the methods
        point = f"{args.dataset}-{args.model}"
        masks_root = {}  # label -> folder of <budget>-<dataset>-<model>/ mask folders
        for label, slug, method, combine in methods:
            if combine is not None:
                params["chip"]["combine"] = combine
            pfile = work / f"params-{seed}-{slug}.yaml"
            pfile.write_text(yaml.safe_dump(params))
            p = ["--params", str(pfile)]
            masks_root[label] = work / f"{slug}-{seed}"
            if method == "chip":
                scores = work / f"scores-{seed}-{slug}"
                score_channels.main([args.dataset, args.model, dense, data, str(scores / point), *p])
                select_channels.main([str(scores), "runs/dense", "data/prepared",
                                      str(masks_root[label]), *p])
            elif method != "chipnet":
                baseline_masks.main([method, "runs/dense", "data/prepared", str(masks_root[label]),
                                     *p])
        for budget in args.budgets:
            for label, slug, method, _ in methods:
                masks = masks_root[label] / f"{budget}-{point}"
                if method == "chipnet":
                    learn_masks.main([args.dataset, args.model, budget, data, dense, str(masks), *p])
                tuned = work / f"ft-{slug}-{budget}-{seed}"
                finetune.main([str(masks), dense, data, str(tuned), *p])
                evaluate.main([str(tuned / "eval"), "--run", "tuned", str(tuned / "checkpoint.pt"),
                               data, *p])
                m = json.loads((tuned / "eval/tuned/metrics.json").read_text())
                top1.setdefault((label, budget), []).append(m["test_top1"])

    print(f"\n{args.model} on {args.dataset}, seeds {args.seeds}")
    print(f"{'method':<18}{'budget':<14}{'top-1 mean':>11}{'stdev':>8}{'min':>8}{'max':>8}"
          f"{'vs random':>17}{'vs best peer':>17}  runs")
    for (method, budget), v in sorted(top1.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sd = statistics.stdev(v) if len(v) > 1 else 0.0
        # the best peer at this budget (by mean), where any ran
        peers = [(statistics.mean(top1[m, budget]), m) for m in PEERS
                 if (m, budget) in top1]
        best = max(peers)[1] if peers else None
        print(f"{method:<18}{budget:<14}{statistics.mean(v):>11.4f}{sd:>8.4f}{min(v):>8.4f}"
              f"{max(v):>8.4f}{paired(v, top1.get(('random', budget))):>17}"
              f"{paired(v, top1.get((best, budget))):>17}  {', '.join(f'{x:.4f}' for x in v)}")
    if peers:
        print("vs best peer: paired (same seed) difference to the peer (Torch-Pruning's criteria, "
              "FastNAS) with the highest mean at that budget, with its stdev over seeds")


def paired(v: list[float], ref: list[float] | None) -> str:
    """mean (stdev) of v - ref, seed by seed; '-' without a reference."""
    if not ref:
        return "-"
    d = [a - b for a, b in zip(v, ref, strict=True)]
    sd = statistics.stdev(d) if len(d) > 1 else 0.0
    return f"{statistics.mean(d):+.4f}({sd:.3f})"


if __name__ == "__main__":
    main()
