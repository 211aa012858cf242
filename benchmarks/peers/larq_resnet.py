r"""Peer: a Keras/Larq binary ResNet-18 (CIFAR stem) train step, W1A1, in TensorFlow.

  TF_USE_LEGACY_KERAS=1 python benchmarks/peers/larq_resnet.py [--batch_size=64]   # protocol.py

Larq 0.14 needs Keras 2 (the `tf_keras` package; TF_USE_LEGACY_KERAS=1 is set here before
TensorFlow is imported). The network is jcompress's `bnn_resnet18_cifar` W1A1: float 3x3 stem
+ BN + ReLU; BinaryBasicBlocks (BN -> `QuantConv2D` with ste_sign inputs and kernels and
weight_clip, twice; real-valued residual sum; 3x3 binary projection with its own BN where the
shape changes); final BN + ReLU, global average pooling, float classifier. SGD with momentum 0.9,
cross-entropy, one synthetic batch, the step a compiled `tf.function` (XLA off, TF's default).
"""

import argparse
import os
import sys

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(__file__))

import protocol  # noqa: E402


def build(tf, lq, keras, num_classes=10):
  kw = dict(input_quantizer="ste_sign", kernel_quantizer="ste_sign",
            kernel_constraint="weight_clip", use_bias=False, padding="same")
  bn = lambda: keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5)  # noqa: E731
  inp = keras.Input((32, 32, 3))
  x = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(inp)
  x = keras.layers.ReLU()(bn()(x))
  cin = 64
  for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    for b in range(2):
      s = stride if b == 0 else 1
      y = lq.layers.QuantConv2D(cout, 3, strides=s, **kw)(bn()(x))
      y = lq.layers.QuantConv2D(cout, 3, **kw)(bn()(y))
      sc = x
      if s != 1 or cin != cout:
        sc = lq.layers.QuantConv2D(cout, 3, strides=s, **kw)(bn()(x))
      x = keras.layers.Add()([y, sc])
      cin = cout
  x = keras.layers.ReLU()(bn()(x))
  x = keras.layers.GlobalAveragePooling2D()(x)
  return keras.Model(inp, keras.layers.Dense(num_classes)(x))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--batch_size", type=int, default=64)
  args = p.parse_args()
  import larq as lq  # noqa: PLC0415
  import tensorflow as tf  # noqa: PLC0415
  import tf_keras as keras  # noqa: PLC0415

  tf.random.set_seed(0)
  model = build(tf, lq, keras)
  opt = keras.optimizers.SGD(0.1, momentum=0.9)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  x = tf.random.normal((args.batch_size, 32, 32, 3))
  y = tf.random.uniform((args.batch_size,), 0, 10, tf.int32)

  @tf.function
  def train_step():
    with tf.GradientTape() as tape:
      loss = loss_fn(y, model(x, training=True))
    grads = tape.gradient(loss, model.trainable_variables)
    opt.apply_gradients(zip(grads, model.trainable_variables))
    return loss

  def step():
    train_step().numpy()

  # Trainable weights only, as the jcompress side counts `params` (Keras' count_params() adds
  # the BatchNorms' moving means and variances, which jcompress keeps in `batch_stats`).
  params = int(sum(v.shape.num_elements() for v in model.trainable_variables))
  protocol.serve(step, {"framework": f"larq {lq.__version__}, tf {tf.__version__}",
                        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
                        "binary": True, "params": params})


if __name__ == "__main__":
  main()
