"""The normalisation layers of MONAI's ResNets.

``monai.networks.nets.ResNet`` (1.6) builds its stem's normalisation from its ``norm`` argument but not its residual
blocks' or their shortcuts' (``_make_layer`` is not handed ``norm``): every block keeps batch normalisation whatever
``norm`` says. :func:`with_norm` gives every one of them the layer ``norm`` names, built by MONAI's own factory.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def with_norm(net: nn.Module, norm: str | tuple[str, dict[str, Any]], spatial_dims: int) -> nn.Module:
    """``net`` with each batch normalisation replaced by MONAI's ``norm`` layer of the same channels (at its initial
    weights: no random draw); unchanged for ``norm`` batch."""
    from monai.networks.layers.utils import get_norm_layer  # imported here: monai's import is slow
    if (norm if isinstance(norm, str) else norm[0]) == "batch":
        return net
    for module in list(net.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=child.num_features))
    return net
