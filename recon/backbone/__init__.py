"""The image encoder: arcface_torch's IResNet in Flax, ArcFace weight import, input preprocessing.

  iresnet:        `IResNet`, presets `iresnet18/34/50/100`, `IResNet.small()`, freezing labels
                  (`TRAINABLE_PREFIXES`, `backbone_trainable_labels`).
  arcface_import: `import_arcface(path) -> (module, variables)` for insightface ONNX files and
                  arcface_torch `.pth` state dicts (read without torch).
  torch_zip:      `load_torch_state_dict(path)`: torch zip checkpoints -> numpy, restricted pickle.
  preprocess:     the 112 x 112 input: `backbone_input_from_crop` (default: 224 crop -> 112),
                  `align_five_points` (ArcFace 5-point similarity alignment).
"""

from recon.backbone.arcface_import import (ArcFaceImportError, architecture_from_state_dict,
                                           import_arcface, state_dict_from_onnx,
                                           variables_from_state_dict)
from recon.backbone.iresnet import (ALWAYS_FROZEN_PATHS, BN_EPSILON, INPUT_SIZE, PART_NAMES,
                                    STAGE_NAMES, TRAINABLE_PREFIXES, IBasicBlock, IResNet, PReLU,
                                    backbone_trainable_labels, init_variables, iresnet18,
                                    iresnet34, iresnet50, iresnet100, is_trainable_path)
from recon.backbone.preprocess import (ARCFACE_TEMPLATE_112, BACKBONE_SIZE, align_five_points,
                                       arcface_alignment_matrix, backbone_input_from_crop,
                                       backbone_input_from_crop_jax, normalize_pixels,
                                       similarity_umeyama)
from recon.backbone.torch_zip import TorchCheckpointError, load_torch_state_dict

__all__ = [
    "ALWAYS_FROZEN_PATHS", "ARCFACE_TEMPLATE_112", "ArcFaceImportError", "BACKBONE_SIZE",
    "BN_EPSILON", "IBasicBlock", "INPUT_SIZE", "IResNet", "PART_NAMES", "PReLU", "STAGE_NAMES",
    "TRAINABLE_PREFIXES", "TorchCheckpointError", "align_five_points",
    "arcface_alignment_matrix", "architecture_from_state_dict", "backbone_input_from_crop",
    "backbone_input_from_crop_jax", "backbone_trainable_labels", "import_arcface",
    "init_variables", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "is_trainable_path",
    "load_torch_state_dict", "normalize_pixels", "similarity_umeyama", "state_dict_from_onnx",
    "variables_from_state_dict",
]
