"""Weight quantization (`quant` sub-config): uniform, k-means and power-of-two codes, as PTQ
(`total_steps=0` from `init_from`) or QAT; the math is `jcompress.quantize`. Activation
quantization lives in the models (`model_kwargs.act_quant`)."""

from jcompress import quantize
from jcompress.methods.base import Method

METHOD = Method(
    name="quant",
    summary="weights to integer codes (uniform, k-means, power-of-two), PTQ or QAT",
    transform=quantize.transform_from_config,
)
