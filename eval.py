"""NoW evaluation CLI: predict with a checkpoint and/or score prediction folders.

    python eval.py --now-split val                       # built-in synthetic split, default run
    python eval.py --now-root ~/NoW --checkpoint runs/paper --output outputs/now_val
    python eval.py --now-root ~/NoW --predictions deca/ --predictions ours/ --label DECA --label ours
    python eval.py --now-root ~/NoW --now-split test --checkpoint runs/paper   # export only
    python eval.py --now-root ~/NoW --predictions ours/ --metrical --unit m

Writes OUTPUT/results.json (fixed format), OUTPUT/cumulative_error.png and prints a table.
Missing predictions are all listed and the exit status is 2, unless --allow-missing.
With a checkpoint, the images are cut with the crop the model was trained on (landmark crops
need `pip install 'facerecon-jax[photo]'`), predictions go to OUTPUT/predictions/, and the
model's mean face (its FLAME template) is scored on the same images (OUTPUT/
predictions_mean_face/; results.json "mean_face", "mean face" rows in the table); images with
no detected face are listed in results.json "crop_fallbacks", those whose detected landmarks
strayed from NoW's face box and were moved onto it in "crop_corrections".
"""

import sys

from absl import app, flags, logging

flags.DEFINE_enum("now-split", "val", ["val", "test"], "NoW image list: val (scored) or test "
                  "(predictions exported for submission, not scored).")
flags.DEFINE_string("now-root", None, "NoW dataset root (the download's layout). Default: the "
                    "built-in synthetic split, built once under $FACERECON_CACHE_DIR.")
flags.DEFINE_string("checkpoint", None, "Training workdir to predict with (default runs/default); "
                    "ignored when --predictions is given.")
flags.DEFINE_multi_string("predictions", [], "Existing predictions folder to score "
                          "(<subject>/<challenge>/<image>.obj + .npy); repeat to compare methods.")
flags.DEFINE_multi_string("label", [], "Name of each --predictions folder in the table and plot.")
flags.DEFINE_string("output", "outputs/now_eval", "Output folder (results.json, "
                    "cumulative_error.png, predictions/).")
flags.DEFINE_bool("metrical", False, "Metrical protocol: scale fixed by --unit, not fitted.")
flags.DEFINE_enum("unit", "m", ["mm", "cm", "m"], "Unit of the predicted meshes (metrical).")
flags.DEFINE_bool("allow-missing", False, "Score the available predictions and list the missing "
                  "ones in results.json instead of exiting with status 2.")
flags.DEFINE_integer("workers", None, "Scoring processes (default: the available CPUs).")
flags.DEFINE_integer("synthetic-subjects", 20, "Validation subjects of the built-in split.")

FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from recon.now import cli

    # orbax logs every restore at INFO: warnings and errors only, unless --verbosity is given.
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    request = cli.EvalRequest(
        split=FLAGS["now-split"].value, now_root=FLAGS["now-root"].value,
        checkpoint=FLAGS.checkpoint, predictions=tuple(FLAGS.predictions),
        labels=tuple(FLAGS.label), output=FLAGS.output, metrical=FLAGS.metrical,
        unit=FLAGS.unit, allow_missing=FLAGS["allow-missing"].value, workers=FLAGS.workers,
        synthetic_subjects=FLAGS["synthetic-subjects"].value)
    sys.exit(cli.run(request))


if __name__ == "__main__":
    app.run(main)
