"""NoW scorer at validation scale, beside brute-force references, plus prediction folders with
known errors.

    python benchmarks/now_scorer.py [--workers 2] [--subjects 20] [--figure-subjects 5]

1. Builds (cached under /tmp) a synthetic NoW validation split without images: 20 subjects x 20
   images, scans of 100k vertices (FLAME heads subdivided 3x, eyeballs removed, cut behind the
   ears, 0.2 mm noise, random scanner pose), `.pp` landmarks with 0.3 mm noise.
2. Writes prediction folders whose errors are known:
     perfect         the subject's exact neutral FLAME mesh (metres) under a random similarity
                     per image, exact landmarks -> only the scan noise remains: median
                     0.6745 sigma = 0.135 mm, mean 0.7979 sigma = 0.160 mm (normal component;
                     the refinement may absorb a little of it, so at most these).
     perfect_lmk2mm  the same with 2 mm landmark noise (realistic landmark error): the
                     refinement must bring it back to the `perfect` figures.
     offset_1mm      every vertex moved 1 mm along its normal: at most 1 mm plus the noise;
                     in fact much less, because over the cropped (fairly flat) face a shift
                     along the view axis (and, non-metrically, the scale) absorbs most of a
                     uniform offset: NoW is blind to such an inflation by design.
     scale_1.1       the perfect mesh 10% too large: non-metrical = perfect; metrical penalised.
     mean_face       the model's template (zero identity) with its own landmarks.
3. Times the whole validation scale (all images, both protocols) for a realistic folder, with
   `--workers` processes (wall time, and the summed per-image CPU time: on a shared machine the
   wall time measures the other users; CPU s / 2 estimates a quiet 2-core run), and checks the scorer against brute force on a subset in the same run:
   exact point-to-triangle distances (numpy) for 500 points of 3 images each, and the
   refinement's optimum against an independent alternating closest-point / Umeyama solver.
"""

import argparse
import os
import pathlib
import sys
import time

import numpy as np

import timing
from recon.now import distance, io as now_io, predict, protocol, scoring, synthetic


def vertex_normals(vertices, faces):
    normals = np.zeros_like(vertices)
    face_normals = np.cross(vertices[faces[:, 1]] - vertices[faces[:, 0]],
                            vertices[faces[:, 2]] - vertices[faces[:, 0]])
    for k in range(3):
        np.add.at(normals, faces[:, k], face_normals)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def random_rigid(rng):
    """A random rotation and a shift of ~10 cm (metres): the scorer must not care."""
    from scipy.spatial.transform import Rotation

    return Rotation.random(random_state=rng).as_matrix(), rng.normal(0, 0.1, 3)


def write_folders(root, out, entries, template, rng):
    """Prediction folders with known errors; returns {name: folder}."""
    gt = {}
    for entry in entries:
        if entry.subject not in gt:
            data = np.load(root / synthetic.GROUND_TRUTH_DIR / f"{entry.subject}.npz")
            gt[entry.subject] = {k: data[k].astype(np.float64) for k in data.files}
    faces = next(iter(gt.values()))["faces"].astype(np.int64)
    folders = {}
    variants = ("perfect", "perfect_lmk2mm", "offset_1mm", "scale_1.1", "mean_face")
    for name in variants:
        folder = out / name
        folders[name] = folder
        if (folder / "done").is_file():
            continue
        for entry in entries:
            truth = gt[entry.subject]
            vertices, landmarks = truth["vertices_m"], truth["landmarks7_m"]
            if name == "perfect_lmk2mm":
                landmarks = landmarks + rng.normal(0, 0.002, landmarks.shape)
            elif name == "offset_1mm":
                vertices = vertices + 0.001 * vertex_normals(vertices, faces)
            elif name == "scale_1.1":
                vertices, landmarks = 1.1 * vertices, 1.1 * landmarks
            elif name == "mean_face":
                vertices, landmarks = template
            rotation, shift = random_rigid(rng)
            now_io.write_prediction(folder, entry, vertices @ rotation + shift, faces,
                                    landmarks @ rotation + shift)
        (folder / "done").write_text("ok\n")
    return folders


def icp_reference(points, vertices, faces, iterations=60):
    """Independent refinement: alternate closest points and a similarity Umeyama fit.
    Returns the final sum of squared distances."""
    current = vertices.copy()
    for _ in range(iterations):
        tree = distance.MeshDistance(current, faces)
        _, _, closest = tree.query(points)
        step = protocol.similarity_procrustes(points, closest)
        current = step.apply(current)
    return float(np.sum(distance.MeshDistance(current, faces).query(points)[0]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--subjects", type=int, default=20)
    parser.add_argument("--timed-protocols", default="non-metrical,metrical",
                        help="protocols timed at full scale (comma-separated)")
    parser.add_argument("--figure-subjects", type=int, default=2,
                        help="subjects used for the known-error figures (all images of each)")
    parser.add_argument("--work", type=pathlib.Path, default=pathlib.Path("/tmp/now_scorer_bench"))
    args = parser.parse_args()
    args.timed_protocols = [{"non-metrical": False, "metrical": True}[name]
                            for name in args.timed_protocols.split(",") if name]
    timing.print_environment(workers=args.workers, subjects=args.subjects)

    config = synthetic.SyntheticNowConfig(num_val_subjects=args.subjects, num_test_subjects=0,
                                          subdivisions=3, max_scan_vertices=100_000)
    start = time.perf_counter()
    root = args.work / f"now_{config.key()}"
    if not (root / "complete.json").is_file():
        synthetic.build_synthetic_split(root, config, with_images=False)
        now_io.write_file(root / "complete.json", "{}\n")
    print(f"# dataset ready in {time.perf_counter() - start:.1f} s: {root}", flush=True)
    entries = now_io.read_image_list(root / "imagepathsvalidation.txt")
    import flame_jax

    model = flame_jax.synthetic(config.model_seed)
    rng = np.random.default_rng(0)
    folders = write_folders(root, args.work / "predictions", entries, predict.mean_face(model),
                            rng)

    # --- brute-force checks on a subset, same run
    checks = timing.Report("NoW scorer vs brute force (subset)", [
        ("image", "image", "{}"), ("points", "points", "{}"),
        ("max_abs_diff_mm", "max abs(libigl - brute force) mm", "{:.1e}"),
        ("igl_us_per_point", "libigl us/point", "{:.2f}"),
        ("brute_us_per_point", "brute force us/point", "{:.0f}"),
        ("cost_ours", "refined cost (ours) mm^2", "{:.2f}"),
        ("cost_icp", "refined cost (ICP/Umeyama, 60 it.) mm^2", "{:.2f}"),
        ("scan_vertices", "scan vertices", "{:,}"),
        ("scan_read_ms", "scan read ms (trimesh, recon.now.io.read_mesh)", "{:.0f}"),
    ])
    import trimesh  # noqa: F401 - imported before the scan read is timed

    for entry in entries[:: max(1, len(entries) // 3)][:3]:
        scan_path, pp_path = now_io.find_scan(root, entry.subject)
        t0 = time.perf_counter()
        scan, _ = now_io.read_mesh(scan_path)
        scan_read_s = time.perf_counter() - t0
        scan_landmarks = now_io.read_pp(pp_path)
        mesh_path, lmk_path = now_io.prediction_paths(folders["perfect_lmk2mm"], entry)
        vertices, faces = now_io.read_mesh(mesh_path)
        landmarks = now_io.read_prediction_landmarks(lmk_path)
        score = protocol.score_prediction(scan, scan_landmarks, vertices, faces, landmarks)
        cropped = scan[protocol.crop_mask(scan, scan_landmarks)]
        aligned = score.alignment.apply(vertices)
        subset = np.random.default_rng(1).choice(len(cropped), 500, replace=False)
        t0 = time.perf_counter()
        brute = distance.point_triangle_distance_reference(cropped[subset], aligned, faces)
        brute_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = distance.point_mesh_distance(cropped, aligned, faces)
        fast_s = time.perf_counter() - t0
        initial = protocol.procrustes_initialisation(scan_landmarks, landmarks, metrical=False)
        cost_icp = icp_reference(cropped, initial.apply(vertices), faces)
        checks.row(image=entry.key, points=len(subset),
                   max_abs_diff_mm=float(np.max(np.abs(score.distances_mm[subset] - brute))),
                   max_abs_diff_recomputed_mm=float(np.max(np.abs(fast[subset] - brute))),
                   igl_us_per_point=fast_s / len(cropped) * 1e6,
                   brute_us_per_point=brute_s / len(subset) * 1e6,
                   cost_ours=float(np.sum(score.distances_mm ** 2)), cost_icp=cost_icp,
                   scan_vertices=len(scan), scan_read_ms=1e3 * scan_read_s)
    checks.print_markdown()

    # --- validation-scale timing
    speed = timing.Report("NoW scorer, validation scale", [
        ("folder", "predictions", "{}"), ("protocol", "protocol", "{}"),
        ("images", "images", "{}"), ("points", "scan points", "{:,}"),
        ("workers", "processes", "{}"), ("seconds", "wall s (shared machine)", "{:.1f}"),
        ("cpu_seconds", "CPU s (all images)", "{:.1f}"),
        ("cpu_ms_per_image", "CPU ms / image", "{:.0f}"),
        ("quiet_estimate_s", "est. wall s, quiet 2 cores", "{:.1f}"),
        ("median_mm", "median mm", "{:.3f}"), ("mean_mm", "mean mm", "{:.3f}"),
        ("std_mm", "std mm", "{:.3f}")])
    pool = scoring.make_pool(args.workers)
    try:
        for metrical in args.timed_protocols:
            t0 = time.perf_counter()
            result = scoring.evaluate_predictions(
                root, folders["perfect_lmk2mm"], options=scoring.ScoreOptions(metrical=metrical),
                workers=args.workers, pool=pool, progress=False)
            seconds = time.perf_counter() - t0
            speed.row(folder="perfect_lmk2mm", protocol="metrical" if metrical else "non-metrical",
                      images=len(result.per_image), points=int(len(result.all_distances())),
                      workers=args.workers, seconds=seconds, cpu_seconds=result.cpu_seconds,
                      cpu_ms_per_image=1e3 * result.cpu_seconds / len(result.per_image),
                      quiet_estimate_s=result.cpu_seconds / 2,
                      load_average=os.getloadavg()[0],
                      **scoring.summary(result.all_distances()))
        speed.print_markdown()

        # --- known-error figures
        figure_subjects = sorted({e.subject for e in entries})[:args.figure_subjects]
        subset_list = args.work / "figures_list.txt"
        now_io.write_image_list(subset_list, [e for e in entries if e.subject in figure_subjects])
        figures = timing.Report("NoW figures of prediction folders with known errors", [
            ("folder", "predictions", "{}"), ("protocol", "protocol", "{}"),
            ("images", "images", "{}"), ("median_mm", "median mm", "{:.3f}"),
            ("mean_mm", "mean mm", "{:.3f}"), ("std_mm", "std mm", "{:.3f}"),
            ("expected", "expected", "{}")])
        expected = {"perfect": "scan noise only, <= 0.135 / 0.160",
                    "perfect_lmk2mm": "= perfect (refinement)",
                    "offset_1mm": "<= 1 (alignment absorbs part)",
                    "scale_1.1": "non-metrical = perfect; metrical penalised",
                    "mean_face": "identity error (no reference value)"}
        for metrical in (False, True):
            methods = []
            for name, folder in folders.items():
                result = scoring.evaluate_predictions(
                    root, folder, options=scoring.ScoreOptions(metrical=metrical), label=name,
                    workers=args.workers, pool=pool, image_list=subset_list, progress=False)
                methods.append(result)
                figures.row(folder=name, protocol="metrical" if metrical else "non-metrical",
                            images=len(result.per_image), expected=expected[name],
                            **scoring.summary(result.all_distances()))
            scoring.write_outputs(args.work / ("figures_metrical" if metrical else "figures"),
                                  methods)
        figures.print_markdown()
    finally:
        pool.shutdown()
    print(f"# plots: {args.work}/figures/cumulative_error.png, "
          f"{args.work}/figures_metrical/cumulative_error.png")


if __name__ == "__main__":
    sys.exit(main())
