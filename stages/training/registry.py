"""The pretraining methods by name: the workflow's ``{method}`` (``pretrain.methods``). Adding a method is one module
in stages/training/methods/, a class following :class:`stages.training.protocol.Method`, and one entry below; the
harness does not change."""

from __future__ import annotations

from stages.training.methods.mlsscl import MlssclLongShortMethod, MlssclMethod, MlssclMultiviewMethod
from stages.training.methods.momentum import ByolMethod, LongitudinalNceMethod, MocoMethod
from stages.training.methods.pretext import RelativeLocationMethod, RotationMethod, SwavMethod
from stages.training.methods.siamese import SiameseMethod
from stages.training.methods.simclr import SimclrMethod
from stages.training.methods.vae import VaeMethod
from stages.training.protocol import Method

METHODS: dict[str, type[Method]] = {"siamese": SiameseMethod, "simclr": SimclrMethod, "moco": MocoMethod,
                                     "byol": ByolMethod, "longitudinal_nce": LongitudinalNceMethod,
                                     "mlsscl": MlssclMethod, "mlsscl_multiview": MlssclMultiviewMethod,
                                     "mlsscl_long_short": MlssclLongShortMethod, "rotation": RotationMethod,
                                     "relative_location": RelativeLocationMethod, "swav": SwavMethod,
                                     "vae": VaeMethod}
