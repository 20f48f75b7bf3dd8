"""From a photo to FLAME: face detection and landmarks (`detect`), the regressor's crop
(`detect.crop_from_box`) and analysis-by-synthesis fitting (`fitting`). The CLI is
`python -m recon.predict`.

MediaPipe (the `photo` extra) is imported lazily by `detect`; `fitting` needs only jax.
"""
