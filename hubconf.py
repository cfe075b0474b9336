"""torch.hub entry points: every zoo name, e.g.
``torch.hub.load("<owner>/<repo>", "resnet20_fp")`` or ``torch.hub.load(path, "resnet20_w1a1", source="local")``.
Tagged names use ``__`` for the dot (``resnet20_fp__cifar10``)."""

dependencies = ["torch", "safetensors"]

import zoo as _zoo  # noqa: E402


def _entry(name: str):
    def load(pretrained: bool = True, **kwargs):
        """``pretrained=True``: the published checkpoint (eval mode); otherwise a random init
        built with ``kwargs`` (``num_classes``, quantizer specs)."""
        return _zoo.load(name) if pretrained else _zoo.create_model(name, **kwargs)

    load.__name__ = name.replace(".", "__")
    load.__doc__ = f"{name}: " + (load.__doc__ or "")
    return load


for _name in _zoo.list_models():
    globals()[_name.replace(".", "__")] = _entry(_name)
