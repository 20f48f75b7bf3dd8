"""The regressor: backbones (IResNet, dlib's face-recognition ResNet), weight imports, the
MICA-style head, and building a model from its options.

  iresnet:        arcface_torch's `IResNet`, presets `iresnet18/34/50/100`, freezing labels.
  arcface_import: `import_arcface(path) -> (module, variables)`: insightface ONNX files and
                  arcface_torch `.pth` state dicts (read without torch); `python -m recon.model`
                  checks one against onnxruntime.
  torch_zip:      `load_torch_state_dict(path)`: torch zip checkpoints -> numpy, restricted pickle.
  dlib_resnet:    `import_dlib_resnet(path=None) -> (module, variables)`: dlib's public-domain
                  face-recognition ResNet from its own file format (no dlib at run time).
  regressor:      `Regressor` (backbone -> head -> 486-d code), `trainable_labels`.
  build:          `ModelOptions`, `FlameOptions`, `build_model`, `load_flame`, `init_variables`.
"""

from recon.model.arcface_import import (ArcFaceImportError, architecture_from_state_dict,
                                        import_arcface, state_dict_from_onnx,
                                        variables_from_state_dict)
from recon.model.build import (BACKBONES, FlameOptions, ModelOptions, build_model, init_variables,
                               load_flame, trainable_labels)
from recon.model.dlib_resnet import DlibModelError, DlibResNet, import_dlib_resnet
from recon.model.iresnet import (ALWAYS_FROZEN_PATHS, BN_EPSILON, INPUT_SIZE, PART_NAMES,
                                 STAGE_NAMES, TRAINABLE_PREFIXES, IBasicBlock, IResNet, PReLU,
                                 backbone_trainable_labels, iresnet18, iresnet34, iresnet50,
                                 iresnet100, is_trainable_path)
from recon.model.regressor import MappingHead, Regressor, initial_code_offset
from recon.model.torch_zip import TorchCheckpointError, load_torch_state_dict

__all__ = [
    "ALWAYS_FROZEN_PATHS", "ArcFaceImportError", "BACKBONES", "BN_EPSILON", "DlibModelError",
    "DlibResNet", "FlameOptions", "IBasicBlock", "INPUT_SIZE", "IResNet", "MappingHead",
    "ModelOptions", "PART_NAMES", "PReLU", "Regressor", "STAGE_NAMES", "TRAINABLE_PREFIXES",
    "TorchCheckpointError", "architecture_from_state_dict", "backbone_trainable_labels",
    "build_model", "import_arcface", "import_dlib_resnet", "init_variables",
    "initial_code_offset", "iresnet18", "iresnet34", "iresnet50", "iresnet100",
    "is_trainable_path", "load_flame", "load_torch_state_dict", "state_dict_from_onnx",
    "trainable_labels", "variables_from_state_dict",
]
