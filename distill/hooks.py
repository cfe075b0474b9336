"""Collect the outputs of named submodules during a forward pass."""

from __future__ import annotations

from torch import Tensor, nn


class FeatureHooks:
    """Forward hooks that store the outputs of ``modules`` (names from ``named_modules``)
    in ``self.features`` (name -> tensor), refreshed on every forward.

    The default modules are the model's ``feature_info`` entries (stage outputs
    and the penultimate feature of zoo models).
    """

    def __init__(self, model: nn.Module, modules: list[str] | None = None) -> None:
        if modules is None:
            info = getattr(model, "feature_info", None)
            if not info:
                raise ValueError(f"{type(model).__name__} has no feature_info; pass the module names to hook")
            modules = [entry["module"] for entry in info]
        self.modules = list(modules)
        self.features: dict[str, Tensor] = {}
        named = dict(model.named_modules())
        unknown = [m for m in self.modules if m not in named]
        if unknown:
            raise ValueError(f"no modules named {unknown} in {type(model).__name__}")
        self._handles = [named[name].register_forward_hook(self._store(name)) for name in self.modules]

    def _store(self, name: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> None:
            self.features[name] = output

        return hook

    def outputs(self) -> list[Tensor]:
        """The hooked outputs, in the order of ``modules``."""
        return [self.features[name] for name in self.modules]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
