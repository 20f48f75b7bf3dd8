"""NoW evaluation: readers, protocol, exact distances, parallel scoring, plots, predictions.

    from recon import now
    results = now.evaluate_predictions(root, "preds/", split="val",
                                       options=now.ScoreOptions(metrical=False))
    now.write_outputs("out/", [results])     # results.json, cumulative_error.png
    print(now.format_table([results]))

The scorer computes with numpy, scipy and libigl only (JAX is imported with `flame_jax`'s file
helpers but never runs there); `recon.now.predict` (a checkpoint's predictions through
`recon.inference` and `recon.image`) and `recon.now.synthetic` are imported when used.
"""

from recon.now.distance import MeshDistance, point_mesh_distance, point_triangle_distance_reference
from recon.now.io import (CHALLENGES, ImageEntry, NowFileError, NowMissingError, face_box_array,
                          read_face_box, read_image_list, read_mesh, read_pp,
                          read_prediction_landmarks, write_face_box, write_mesh, write_pp,
                          write_prediction)
from recon.now.protocol import (LANDMARK_NAMES, RefineOptions, crop_mask, score_prediction,
                                similarity_procrustes)
from recon.now.scoring import (MethodResults, ScoreOptions, evaluate_predictions, format_table,
                               make_pool, results_dict, summary, write_outputs)

__all__ = ["MeshDistance", "point_mesh_distance", "point_triangle_distance_reference",
           "CHALLENGES", "ImageEntry", "NowFileError", "NowMissingError", "face_box_array",
           "read_face_box", "read_image_list", "read_mesh", "read_pp",
           "read_prediction_landmarks", "write_face_box", "write_mesh", "write_pp",
           "write_prediction", "LANDMARK_NAMES", "RefineOptions", "crop_mask", "score_prediction",
           "similarity_procrustes", "MethodResults", "ScoreOptions", "evaluate_predictions",
           "format_table", "make_pool", "results_dict", "summary", "write_outputs"]
