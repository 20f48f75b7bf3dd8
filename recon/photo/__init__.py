"""From a photo to FLAME by analysis-by-synthesis (`fitting`): FLAME fitted to a face crop's
landmarks and colours through `recon.render`, at the crop's own size. The CLI is
`python -m recon.predict`; faces and landmarks come from `recon.image.detect`, the crop from
`recon.image.crop_image`.

`fitting` needs only jax (no MediaPipe, nothing of the trainer).
"""

from recon.photo import fitting

__all__ = ["fitting"]
