"""Product quantization and Q-CNN (`pq` sub-config); the math is `jcompress.pq`."""

from jcompress import pq
from jcompress.methods.base import Method

METHOD = Method(
    name="pq",
    summary="product quantization of kernels into sub-vector codebooks (PQ, Q-CNN)",
    default_config=pq.default_config,
    transform=pq.transform_from_config,
)
