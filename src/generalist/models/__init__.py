"""Model zoo: ``create_model(name, num_classes=...)`` builds any registered architecture.

Importing the family modules registers their names; every model takes [0,1] pixels and carries
its own input normalisation when given ``mean``/``std``.
"""

from __future__ import annotations

from generalist.models import (  # noqa: F401  (registers the families)
    cnn,
    imagenet_resnet,
    resnet,
    wide_resnet,
)
from generalist.models.normalization import InputNormalization, NormalizedModel
from generalist.models.registry import (
    count_parameters,
    create_model,
    list_models,
    model_source,
    register_model,
    register_model_pattern,
)

__all__ = [
    "InputNormalization",
    "NormalizedModel",
    "count_parameters",
    "create_model",
    "list_models",
    "model_source",
    "register_model",
    "register_model_pattern",
]
