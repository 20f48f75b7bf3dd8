"""What the NoW box check of the detected landmarks does to one model's score: the measurement
behind `recon.now.predict.MAX_BOX_DEVIATION`.

    python scripts/now_crop_check.py --checkpoint runs/wide --out runs/now_crop_check
    [--now-root ~/NoW]   (default: the built-in synthetic split)

One model predicts the validation images five times, with five crop sources, and the five
prediction folders are scored in one `eval.py --predictions` run (`OUT/scores/`):
  unchecked: every detection used as found (no-face images: the template placed on NoW's box);
  checked:   `crop_sources` as eval.py uses it (strays moved onto NoW's box, "crop_corrections");
  template:  as checked, but a stray detection is replaced by the template placed on the box;
  refined:   as checked, then the untrusted crops cut again from the model's own landmarks
             (`refine_sources`, `predict_split(refine=True)`; eval.py does not do it);
  refined_all: the same without the box check of the model's landmarks.
It also prints the split's box relation and how many images were corrected and refined.
Landmark crops need the `photo` extra (mediapipe) unless the landmarks are cached.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--now-root", default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))

    from recon import inference
    from recon.now import cli
    from recon.now import io as now_io
    from recon.now import predict
    from recon.now import synthetic

    root = pathlib.Path(args.now_root) if args.now_root else synthetic.ensure_synthetic_split()
    out = pathlib.Path(args.out)
    entries = now_io.read_image_list(now_io.image_list_path(root, "val"))
    predictor = inference.load_predictor(args.checkpoint)
    if not predictor.crop.needs_landmarks:
        print(f"{args.checkpoint} crops from NoW's box ({predictor.crop.anchor}): no landmarks "
              f"to check", file=sys.stderr)
        return 1
    checked = predict.crop_sources(root, entries, predictor.crop, predictor.flame)
    relation = predict.measure_box_relation(
        [(source.landmarks, source.box) for source in checked if not source.fallback])
    template = predict.template_points(predictor.flame)
    unchecked = predict.crop_sources(root, entries, predictor.crop, predictor.flame,
                                     progress=False, max_box_deviation=float("inf"))
    replaced = [dataclasses.replace(source, box_corrected=False, fallback=True,
                                    landmarks=predict.fallback_landmarks(template, source.box,
                                                                         relation))
                if source.box_corrected else source for source in checked]
    corrected = collections.Counter(entry.challenge for entry, source in zip(entries, checked)
                                    if source.box_corrected)
    print(f"relation {relation}; corrected per challenge: {dict(corrected)}")
    folders = []
    refined = predict.refine_sources(root, entries, checked, predictor)
    refined_all = predict.refine_sources(root, entries, checked, predictor,
                                         max_box_deviation=float("inf"))
    print(f"refined {sum(source.refined for source in refined)} of "
          f"{sum(source.fallback or source.box_corrected for source in checked)} crops")
    for name, sources in (("unchecked", unchecked), ("checked", checked),
                          ("template", replaced), ("refined", refined),
                          ("refined_all", refined_all)):
        folder = out / name
        predict.predict_split(root, entries, predictor, folder, sources=sources, refine=False)
        folders.append(str(folder))
    request = cli.EvalRequest(now_root=str(root), predictions=tuple(folders),
                              output=str(out / "scores"))
    return cli.run(request)


if __name__ == "__main__":
    sys.exit(main())
