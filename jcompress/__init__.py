"""jcompress: compression of computer-vision models as functions of Flax parameter trees.

The library, for a user's own Flax model and optax loop:

    import jcompress as jc
    q = jc.quantize_tree(params, bits=4)            # integer codes + scales
    w = jc.dequantize_tree(q)
    masks = jc.prune_mask_tree(params, 0.9)         # {0, 1} masks with the params' structure
    t = jc.chain(jc.pruning(params, 0.5), jc.quant_weights(params, bits=4))   # QAT + pruning
    state = t.init(params, rng); eff = t.apply(params, state)   # the weights the forward sees

Importing jcompress changes nothing in the process (no environment variable, XLA flag, jax
config or TensorFlow setting); the CPU tuning is the explicit `jcompress.runtime.configure_cpu()`.
"""

from jcompress.binary import binarize
from jcompress.binary import binary_weights
from jcompress.distill import cross_entropy
from jcompress.distill import dkd_loss
from jcompress.distill import fitnet_loss
from jcompress.distill import kd_loss
from jcompress.distill import logit_mse_loss
from jcompress.distill import tf_kd_loss
from jcompress.errors import ConfigError
from jcompress.errors import DataError
from jcompress.errors import JCompressError
from jcompress.errors import WorkdirError
from jcompress.lowrank import factorize_kernel
from jcompress.pq import pq_dequantize_tree
from jcompress.pq import pq_tree
from jcompress.prune import prune_mask_tree
from jcompress.prune import pruning
from jcompress.quantize import dequantize_tree
from jcompress.quantize import quant_weights
from jcompress.quantize import quantize_tree
from jcompress.transforms import ParamTransform
from jcompress.transforms import chain
from jcompress.transforms import identity

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "DataError", "JCompressError", "ParamTransform", "WorkdirError",
    "__version__", "binarize", "binary_weights", "chain", "cross_entropy", "dequantize_tree",
    "dkd_loss", "factorize_kernel", "fitnet_loss", "identity", "kd_loss", "logit_mse_loss",
    "pq_dequantize_tree", "pq_tree", "prune_mask_tree", "pruning", "quant_weights",
    "quantize_tree", "tf_kd_loss",
]
