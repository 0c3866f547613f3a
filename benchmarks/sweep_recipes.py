"""Fine-tuning recipes side by side: the default command with each recipe's flags, one CSV row each.

    python benchmarks/sweep_recipes.py --csv benchmarks/results/recipes_cpu.csv \\
        --recipe "lm_1e-4=--no_distill --learning_rate 1e-4" --recipe "kd0.5_3e-4=--distill_alpha 0.5 --learning_rate 3e-4"

Each recipe runs `python -m sparse_adamw.pipeline.finetune FLAGS --output_dir out/sweep/NAME --overwrite_output_dir`
(the offline default: SmolLM2-135M pruned by Wanda, made first when missing; CPU-sized on a CPU), its log in
out/sweep/NAME.log. The row holds perplexity before, after and of the dense teacher (when distilling), the recovered
fraction and the times from its finetune_report.json. With --parallel N, N recipes run at once, spread over --gpus:
small models leave a GPU mostly idle (launch-bound), so the perplexities are as alone but the times are not.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from common import append_csv, git_sha  # noqa: E402


def _recipes(values):
    recipes = []
    for value in values:
        name, sep, flags = value.partition("=")
        if not sep or not name:
            raise SystemExit(f"--recipe {value!r}: expected NAME=FLAGS")
        recipes.append((name, shlex.split(flags)))
    return recipes


def _row(name, flags, out: Path, parallel: int) -> dict:
    report = json.loads((out / "finetune_report.json").read_text())
    ppl, timings = report["perplexity"], report["timings_s"]
    return {"recipe": name, "flags": " ".join(flags), "device": report["device"], "ppl_before": ppl["before"],
            "ppl_after": ppl["after"], "ppl_dense": ppl.get("dense"), "recovered": report.get("recovered_fraction"),
            "steps": report["steps"], "train_s": round(timings.get("train_s", 0.0), 1),
            "total_s": round(timings.get("total_s", 0.0), 1), "tokens_per_s": report.get("tokens_per_s"),
            "parallel": parallel, "git_sha": git_sha(), "date": datetime.date.today().isoformat()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", action="append", required=True, help="NAME=FLAGS (repeat)")
    parser.add_argument("--csv", required=True, help="append one row per recipe here")
    parser.add_argument("--root", default="out/sweep", help="output folders and logs go here")
    parser.add_argument("--parallel", type=int, default=1, help="recipes run at once")
    parser.add_argument("--gpus", default="", help="comma-separated GPU ids to spread the recipes over")
    args = parser.parse_args(argv)
    recipes, root = _recipes(args.recipe), Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    gpus = [g for g in args.gpus.split(",") if g]
    # Prune once, before recipes run side by side (each would otherwise start the prune step).
    from sparse_adamw.pipeline.cli import default_pruned_model

    if not default_pruned_model().exists():
        with open(root / "_prune.log", "w") as log:
            subprocess.run([sys.executable, "-m", "sparse_adamw.pipeline.prune"], check=True, stdout=log,
                           stderr=subprocess.STDOUT)
    pending, running, rows = list(enumerate(recipes)), [], []
    while pending or running:
        while pending and len(running) < args.parallel:
            i, (name, flags) = pending.pop(0)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
            cmd = [sys.executable, "-m", "sparse_adamw.pipeline.finetune", *flags, "--output_dir",
                   str(root / name), "--overwrite_output_dir"]
            print(f"[{datetime.datetime.now():%H:%M:%S}] start {name}: {shlex.join(cmd)}", flush=True)
            log = open(root / f"{name}.log", "w")
            running.append((name, flags, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        time.sleep(1.0)
        for item in [r for r in running if r[2].poll() is not None]:
            running.remove(item)
            name, flags, proc, log = item
            log.close()
            if proc.returncode != 0:
                print(f"{name}: exit {proc.returncode}, see {root / name}.log", flush=True)
                continue
            row = _row(name, flags, root / name, args.parallel)
            rows.append(row)
            print(json.dumps(row), flush=True)
            append_csv(args.csv, [row])
    return 0 if len(rows) == len(recipes) else 1


if __name__ == "__main__":
    sys.exit(main())
