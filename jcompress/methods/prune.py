"""Unstructured and N:M pruning (`prune` sub-config): masks beside the params, one-shot,
gradual or iterative; the math is `jcompress.prune`."""

from jcompress import prune
from jcompress.methods.base import Method

METHOD = Method(
    name="prune",
    summary="unstructured or N:M weight pruning by masks (magnitude, random, SNIP saliency)",
    default_config=prune.default_config,
    transform=prune.transform_from_config,
)
