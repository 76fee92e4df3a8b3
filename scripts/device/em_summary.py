"""Tables of `scripts/device/em_experiments.sh`: pretraining progress and fine-tuning mIoU.

    python scripts/device/em_summary.py RUNS_DIR [FIGURE.png]

Pretraining: steps reached, first/last logged loss, median img/s (the runs shared one GPU, so
img/s is not a speed measurement). Fine-tuning: for every run, mIoU and per-class IoU at the
largest evaluated step that ALL runs of the same set reached (equal fine-tuning steps), the best
evaluation up to that step, and the last evaluation the run made; every evaluation of the longer
runs (``runs/ftlong``, phases C and D). With FIGURE.png, also the
data-efficiency plot (mIoU at the common step against the label fraction; runs named
SET_RUN_PERCENT, e.g. lucchi_b_25).
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path


def rows(path: Path) -> list[dict[str, float]]:
    if not path.is_file():
        return []
    out = []
    for r in csv.DictReader(path.open()):
        out.append({k: float(v) if v not in ("", None) else float("nan") for k, v in r.items()})
    return out


def pretraining(root: Path) -> None:
    print("pretraining: run | steps | loss_rec first -> last | median img/s (GPU shared)")
    for run in sorted(p for p in root.glob("pt/*") if p.is_dir()):
        log = rows(run / "log.csv")
        if not log:
            print(f"  {run.name:16s} no log")
            continue
        key = "loss_rec" if "loss_rec" in log[0] else "loss"
        ips = statistics.median(r["img_s"] for r in log)
        print(f"  {run.name:16s} {int(log[-1]['step']):5d} | {log[0][key]:.4f} -> "
              f"{log[-1][key]:.4f} | {ips:.1f}")


def fmt(r: dict[str, float] | None) -> str:
    if r is None:
        return "-"
    ious = " ".join(f"{k[4:]} {v:.4f}" for k, v in r.items() if k.startswith("iou_"))
    return f"mIoU {r['miou']:.4f} ({ious}) @ {int(r['step'])}"


def finetuning(root: Path) -> dict:
    runs = {p.name: rows(p / "eval.csv") for p in sorted(root.glob("ft/*")) if p.is_dir()}
    table: dict = {}
    for dataset in sorted({n.split("_")[0] for n in runs}):
        mine = {n: r for n, r in runs.items() if n.startswith(dataset + "_")}
        reached = [max((int(e["step"]) for e in r), default=0) for r in mine.values()]
        common = min(reached) if reached else 0
        print(f"fine-tuning {dataset}: equal-step comparison at step {common}")
        for name, ev in mine.items():
            at = next((e for e in ev if int(e["step"]) == common), None)
            upto = [e for e in ev if int(e["step"]) <= common]
            best = max(upto, key=lambda e: e["miou"]) if upto else None
            last = ev[-1] if ev else None
            table[name] = {"at_common": at, "best_upto_common": best, "last": last,
                           "common_step": common}
            print(f"  {name:14s} at {fmt(at)}\n  {'':14s} best {fmt(best)}\n"
                  f"  {'':14s} last {fmt(last)}")
    return table


def plot_data_efficiency(table: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    names = {"a": "AFF-Small, scratch", "b": "AFF-Small + AFFMAE", "c": "ViT-S/8 + MAE"}
    sets = sorted({n.split("_")[0] for n in table})
    fig = Figure(figsize=(4.2 * len(sets), 3.6))
    for i, dataset in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), i + 1)
        for run, label in names.items():
            pts = sorted((int(n.split("_")[2]), v["at_common"]["miou"]) for n, v in table.items()
                         if n.startswith(f"{dataset}_{run}_") and v["at_common"] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        step = next(v["common_step"] for n, v in table.items() if n.startswith(dataset + "_"))
        ax.set_xscale("log")
        ax.set_xticks([5, 25, 100], ["5%", "25%", "100%"])
        ax.set_xlabel("training labels")
        ax.set_ylabel("test mIoU")
        ax.set_title(f"{dataset}: fine-tuning step {step}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
    pretraining(root)
    table = finetuning(root)
    if len(sys.argv) > 2:
        plot_data_efficiency(table, Path(sys.argv[2]))
    for run in sorted(p for p in root.glob("ftlong/*") if p.is_dir()):  # phases C and D
        ev = rows(run / "eval.csv")
        print(f"long fine-tuning {run.name}: " + "; ".join(
            f"{int(e['step'])}: {e['miou']:.4f}" for e in ev))
        print(f"  last {fmt(ev[-1] if ev else None)}")
    for a in sorted(root.glob("analysis/*/analysis.json")):
        data = json.loads(a.read_text())
        er = data["effective_rank"]
        print(f"analysis {a.parent.name}: effective rank (unmasked) "
              + ", ".join(f"{lab} {v:.3f}" for lab, v in zip(er["layers"], er["unmasked"])))
    (root / "ft_summary.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
