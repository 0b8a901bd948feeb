"""Models of a run: the registry (name -> builder for the data's example shape)."""

from __future__ import annotations

from typing import Any

from fedjax_sim.experiment.registry import Entry, Registry
from fedjax_sim.models import Model, make_model


def _builder(name: str):
    def build(model_cfg: Any, example_shape: tuple[int, ...], num_classes: int) -> Model:
        return make_model(name, example_shape, num_classes, hidden=model_cfg.hidden)

    return build


REGISTRY = Registry("models", "model", "model", governed={"hidden": None})
REGISTRY.add(Entry("softmax", _builder("softmax"), "multinomial logistic regression"))
REGISTRY.add(Entry("mlp", _builder("mlp"), "fully connected ReLU network",
                   uses=frozenset({"hidden"})))
REGISTRY.add(Entry("cnn", _builder("cnn"), "two conv+pool blocks (images [H, W, C])"))


def build_model(cfg: Any, example_shape: tuple[int, ...], num_classes: int) -> Model:
    """The model ``cfg.model`` names, for the data's example shape and classes."""
    return REGISTRY[cfg.model.name].build(cfg.model, example_shape, num_classes)


__all__ = ["REGISTRY", "build_model"]
