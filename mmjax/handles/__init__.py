"""Per-family model handles: what `mmjax.load` returns."""

from mmjax.handles.analysis import Classifier, CLIPModel
from mmjax.handles.base import Model, UnsupportedMethodError
from mmjax.handles.generators import DiffusionModel, FlowModel, GANModel, Generator, VAEModel

# Family name -> the handle class whose methods are what that family can do.
HANDLES: dict[str, type[Model]] = {
    "diffusion": DiffusionModel,
    "flow": FlowModel,
    "vae": VAEModel,
    "gan": GANModel,
    "clip": CLIPModel,
    "cnn": Classifier,
}

__all__ = ["HANDLES", "Classifier", "CLIPModel", "DiffusionModel", "FlowModel", "GANModel", "Generator", "Model",
           "UnsupportedMethodError", "VAEModel"]
