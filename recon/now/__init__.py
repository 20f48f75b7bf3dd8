"""NoW evaluation: readers, protocol, exact distances, parallel scoring, plots, predictions.

    from recon import now
    results = now.evaluate_predictions(root, "preds/", split="val",
                                       options=now.ScoreOptions(metrical=False))
    now.write_outputs("out/", [results])     # results.json, cumulative_error.png
    print(now.format_table([results]))

No JAX is imported by the scorer (worker processes stay light); `recon.now.synthetic` and the
checkpoint predictor import it when used.
"""

from recon.now.distance import MeshDistance, point_mesh_distance, point_triangle_distance_reference
from recon.now.io import (CHALLENGES, ImageEntry, NowFileError, NowMissingError, read_face_box,
                          read_image_list, read_mesh, read_pp, read_prediction_landmarks,
                          write_face_box, write_pp, write_prediction)
from recon.now.protocol import (FLAME_STATIC_INDICES, LANDMARK_NAMES, RefineOptions, crop_mask,
                                score_prediction, similarity_procrustes)
from recon.now.scoring import (MethodResults, ScoreOptions, evaluate_predictions, format_table,
                               make_pool, results_dict, summary, write_outputs)

__all__ = ["MeshDistance", "point_mesh_distance", "point_triangle_distance_reference",
           "CHALLENGES", "ImageEntry", "NowFileError", "NowMissingError", "read_face_box",
           "read_image_list", "read_mesh", "read_pp", "read_prediction_landmarks",
           "write_face_box", "write_pp", "write_prediction", "FLAME_STATIC_INDICES",
           "LANDMARK_NAMES", "RefineOptions", "crop_mask", "score_prediction",
           "similarity_procrustes", "MethodResults", "ScoreOptions", "evaluate_predictions",
           "format_table", "make_pool", "results_dict", "summary", "write_outputs"]
