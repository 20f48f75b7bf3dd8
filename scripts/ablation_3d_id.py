"""The paper's ablation on the built-in default: the same run with and without the 3D-ID loss.

    python scripts/ablation_3d_id.py --root runs/ablation --seeds 0 1 2 [-- --config.steps=500]

For each seed and each variant (3D-ID at the config's weight, and `--config.loss.id_3d=0.0`,
vertex loss only) it runs `train.py --config configs/default.py --config.seed=SEED` into
ROOT/id3d_<weight>_seed<SEED> (an existing finished run is reused: train.py resumes and returns
at once), then prints a Markdown table of the held-out `vertex_error_mm` (mean +- std over the
seeds, and each seed) next to the mean face, and writes ROOT/summary.json. Arguments after
`--` go to every train.py call (the same for both variants).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(root: pathlib.Path, id_3d: float, seed: int, extra: list) -> dict:
    workdir = root / f"id3d_{id_3d}_seed{seed}"
    command = [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs/default.py"),
               "--workdir", str(workdir), f"--config.seed={seed}", f"--config.loss.id_3d={id_3d}",
               *extra]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    return json.loads((workdir / "evaluation.json").read_text())


def summarise(values: list) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {spread:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="runs/ablation", help="folder of the runs")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--id-3d", type=float, default=0.5, help="3D-ID weight of the 'on' runs")
    parser.add_argument("extra", nargs="*", help="after --: more train.py flags for every run")
    args = parser.parse_args(argv)
    root = pathlib.Path(args.root)
    results = {}
    for weight in (args.id_3d, 0.0):
        for seed in args.seeds:
            results[(weight, seed)] = run(root, weight, seed, args.extra)

    names = ("vertex_error_mm", "face_vertex_error_mm", "scaled_vertex_error_mm")
    lines = ["| 3D-ID loss | held-out vertex_error_mm (mean ± std) | per seed | "
             "face region | similarity-aligned |", "|---|---|---|---|---|"]
    summary = {}
    for weight in (args.id_3d, 0.0):
        values = {key: [results[(weight, seed)][key] for seed in args.seeds] for key in names}
        name = f"on ({weight})" if weight else "off"
        lines.append(f"| {name} | {summarise(values['vertex_error_mm'])} | "
                     f"{', '.join(f'{value:.3f}' for value in values['vertex_error_mm'])} | "
                     f"{summarise(values['face_vertex_error_mm'])} | "
                     f"{summarise(values['scaled_vertex_error_mm'])} |")
        summary[name] = {"seeds": args.seeds, **values}
    first = results[(args.id_3d, args.seeds[0])]
    lines.append(f"| mean face (zero skill) | {first['mean_face_vertex_error_mm']:.3f} | | "
                 f"{first['mean_face_face_vertex_error_mm']:.3f} | "
                 f"{first['mean_face_scaled_vertex_error_mm']:.3f} |")
    summary["mean_face"] = {key: first[f"mean_face_{key}"] for key in names}
    print("\n".join(lines))
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
