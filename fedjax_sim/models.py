"""Models: flax modules behind a pure (init, apply, loss) interface.

The engine never touches a flax module directly: it sees a params pytree and the pure
functions of :class:`Model`. Any classifier whose ``apply(params, x)`` returns logits fits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_sim._layouts import dense_dot_general, patch_conv
from fedjax_sim._validation import check_choice, check_int, fail

PyTree = Any


class SoftmaxRegression(nn.Module):
    """Multinomial logistic regression on flattened inputs."""

    num_classes: int
    input_ndim: int = 1

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-self.input_ndim] + (-1,)) if self.input_ndim > 1 else x
        return nn.Dense(self.num_classes, dot_general=dense_dot_general)(x)


class MLP(nn.Module):
    """Fully connected ReLU network on flattened inputs."""

    num_classes: int
    hidden: Sequence[int] = (200, 200)
    input_ndim: int = 1

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[:-self.input_ndim] + (-1,)) if self.input_ndim > 1 else x
        for width in self.hidden:
            x = nn.relu(nn.Dense(width, dot_general=dense_dot_general)(x))
        return nn.Dense(self.num_classes, dot_general=dense_dot_general)(x)


class CNN(nn.Module):
    """Small convolutional network for ``[H, W, C]`` images (two conv+pool blocks)."""

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128

    @nn.compact
    def __call__(self, x):
        for f in self.features:
            x = nn.relu(nn.Conv(f, (3, 3), padding="SAME", conv_general_dilated=patch_conv)(x))
            # flax's avg_pool divides its float sum by ``np.prod(window_shape)``, a NumPy
            # integer (not a weak Python scalar), which strict dtype promotion rejects; the
            # standard rule gives the same float32 division.
            with jax.numpy_dtype_promotion("standard"):
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        x = x.reshape(x.shape[:-3] + (-1,))
        x = nn.relu(nn.Dense(self.dense, dot_general=dense_dot_general)(x))
        return nn.Dense(self.num_classes, dot_general=dense_dot_general)(x)


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array
                              ) -> tuple[jax.Array, jax.Array]:
    """Softmax cross-entropy and top-1 correctness of each example.

    The label's logit is picked with a one-hot select rather than a gather, so the
    gradient is the elementwise ``softmax - one_hot`` (a gather's gradient is a scatter,
    several small XLA ops per local step). Correctness equals ``argmax(logits) ==
    label`` with ``argmax``'s tie rule (the first maximum wins) without its variadic
    reduce: the label's logit must beat every earlier class strictly and every later
    one or equal. A label outside ``[0, num_classes)`` gives a NaN loss and counts as
    wrong, never a silently finite number.

    Args:
      logits: ``[..., num_classes]`` floats.
      labels: integer labels of shape ``logits.shape[:-1]``.

    Returns:
      ``(loss, correct)``: float loss and bool correctness, both of shape ``labels.shape``.
    """
    labels = jnp.asarray(labels)  # a NumPy int64 array becomes JAX's default int
    classes = jnp.arange(logits.shape[-1], dtype=labels.dtype).reshape(
        (1,) * labels.ndim + (-1,))
    y = labels[..., None]
    label_logit = jnp.sum(jnp.where(classes == y, logits, 0.0), axis=-1, keepdims=True)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    loss = jax.nn.logsumexp(logits, axis=-1) - label_logit[..., 0]
    loss = jnp.where(in_range, loss, jnp.nan)
    beaten = jnp.where(classes < y, logits < label_logit, logits <= label_logit)
    return loss, in_range & jnp.all(beaten, axis=-1)


@dataclasses.dataclass(frozen=True)
class Model:
    """A classifier as pure functions over a params pytree.

    Attributes:
      module: the flax module; ``module.apply({"params": p}, x)`` returns logits.
      example_shape: shape of one input example.
      num_classes: number of classes.
      compute_dtype: ``"float32"``, or ``"bfloat16"`` for mixed precision: the forward
        pass (and so the backward pass) runs on bfloat16 copies of the params and
        inputs, the logits come back as float32, and the loss, the gradients (the
        cast's transpose returns them in the params' dtype), the optimiser, every
        client's delta and the server state stay float32.
    """

    module: nn.Module
    example_shape: tuple[int, ...]
    num_classes: int
    compute_dtype: str = "float32"

    def init(self, key: jax.Array) -> PyTree:
        """Fresh parameters for one example of ``example_shape``."""
        dummy = jnp.zeros((1,) + tuple(self.example_shape), jnp.float32)
        return self.module.init(key, dummy)["params"]

    def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
        """Float32 logits ``[..., num_classes]`` for a batch ``[..., *example_shape]``,
        computed in :attr:`compute_dtype`."""
        if self.compute_dtype == "float32":
            return self.module.apply({"params": params}, x)
        low = COMPUTE_DTYPES[self.compute_dtype]
        params = jax.tree.map(lambda a: a.astype(low) if jnp.issubdtype(
            a.dtype, jnp.floating) else a, params)
        return self.module.apply({"params": params}, x.astype(low)).astype(jnp.float32)

    def per_example_loss(self, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        """Softmax cross-entropy of each example, shape ``y.shape``."""
        return per_example_cross_entropy(self.apply(params, x), y)[0]

    def per_example_metrics(self, params: PyTree, x: jax.Array, y: jax.Array
                            ) -> dict[str, jax.Array]:
        """Loss and 0/1 accuracy of each example."""
        loss, correct = per_example_cross_entropy(self.apply(params, x), y)
        return {"loss": loss, "accuracy": correct.astype(jnp.float32)}

    def num_params(self, params: PyTree) -> int:
        return int(sum(p.size for p in jax.tree.leaves(params)))


MODEL_NAMES = ("softmax", "mlp", "cnn")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
"""Forward/backward precisions of :class:`Model` (``compute_dtype``)."""


def make_model(name: str, example_shape: Sequence[int], num_classes: int, *,
               hidden: Sequence[int] = (200, 200), compute_dtype: str = "float32") -> Model:
    """Builds a named model: ``softmax``, ``mlp`` or ``cnn`` (images ``[H, W, C]``).

    Args:
      name: one of ``MODEL_NAMES``.
      example_shape: shape of one input example.
      num_classes: number of output classes (>= 2).
      hidden: hidden layer widths of the MLP.
      compute_dtype: ``"float32"`` or ``"bfloat16"`` (mixed precision; see :class:`Model`).

    Returns:
      The model.
    """
    check_choice("model", name, MODEL_NAMES)
    check_choice("compute_dtype", compute_dtype, tuple(COMPUTE_DTYPES))
    check_int("num_classes", num_classes, min_value=2)
    example_shape = tuple(int(d) for d in example_shape)
    if not example_shape or any(d < 1 for d in example_shape):
        fail("example_shape", example_shape, "must be a non-empty tuple of positive sizes")
    ndim = len(example_shape)
    if name == "softmax":
        module = SoftmaxRegression(num_classes, input_ndim=ndim)
    elif name == "mlp":
        hidden = tuple(int(h) for h in hidden)
        if any(h < 1 for h in hidden):
            fail("hidden", hidden, "widths must be >= 1")
        module = MLP(num_classes, hidden=hidden, input_ndim=ndim)
    else:
        if ndim != 3:
            fail("example_shape", example_shape, "cnn needs images of shape [H, W, C]")
        module = CNN(num_classes)
    return Model(module, example_shape, num_classes, compute_dtype)
