"""Build models by name: a registry of the built-in models that also takes dotted class paths."""

import importlib
import inspect
from collections.abc import Callable
from typing import Any, TypeVar, Union

from torch import nn

from traincraft.models.alexnet import AlexNet
from traincraft.models.convnet import ConvNet
from traincraft.models.mlp import MLP
from traincraft.models.two_column import TwoColumnAlexNet

ModelT = TypeVar("ModelT", bound=type[nn.Module])

MODELS: dict[str, type[nn.Module]] = {
    "alexnet": AlexNet,
    "alexnet_two_column": TwoColumnAlexNet,
    "convnet": ConvNet,
    "mlp": MLP,
}
"""Registered model classes by lower-case name; add to it with :func:`register_model`."""


def register_model(name: str) -> Callable[[ModelT], ModelT]:
    """Class decorator that registers an ``nn.Module`` subclass under ``name`` (case-insensitive).

    Registering the same class twice is a no-op; a name already taken by another class raises ``ValueError``.

    Args:
        name: the registry name; must not contain dots (dotted names are read as class paths).

    Example:
        >>> @register_model("tiny_net")
        ... class TinyNet(nn.Linear):
        ...     pass
        >>> "tiny_net" in available_models()
        True
        >>> _ = MODELS.pop("tiny_net")
    """
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"model names must be non-empty strings without dots, got {name!r}.")
    key = name.lower()

    def decorator(cls: ModelT) -> ModelT:
        if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
            raise TypeError(f"register_model({name!r}) expects an nn.Module subclass, got {cls!r}.")
        existing = MODELS.get(key)
        if existing is not None and existing is not cls:
            raise ValueError(
                f"model name {key!r} is already registered to {existing.__module__}.{existing.__qualname__}; "
                "choose another name."
            )
        MODELS[key] = cls
        return cls

    return decorator


def available_models() -> list[str]:
    """Sorted names of the registered models."""
    return sorted(MODELS)


def _import_class(path: str) -> type[nn.Module]:
    module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not a class path; expected 'package.module.ClassName'.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(
            f"cannot import module {module_name!r} for model class path {path!r}: {err}"
        ) from err
    try:
        cls = getattr(module, attr)
    except AttributeError as err:
        raise ValueError(
            f"module {module_name!r} has no attribute {attr!r} (model class path {path!r})."
        ) from err
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise TypeError(f"model class path {path!r} names {cls!r}, which is not an nn.Module subclass.")
    return cls


def _resolve(model: Union[str, type[nn.Module]]) -> type[nn.Module]:
    if inspect.isclass(model):
        return model
    if not isinstance(model, str):
        raise TypeError(f"expected a model name, class path or class, got {model!r}.")
    if "." in model:
        return _import_class(model)
    try:
        return MODELS[model.lower()]
    except KeyError:
        raise ValueError(
            f"unknown model {model!r}; registered models are {', '.join(available_models())}. "
            "A dotted class path such as 'my_package.my_module.MyNet' also works."
        ) from None


def _accepted_keywords(cls: type[nn.Module]) -> tuple[list[str], bool]:
    """The keyword names `cls(...)` accepts, and whether it also takes ``**kwargs``."""
    params = inspect.signature(cls).parameters.values()
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def model_accepts(model: Union[str, type[nn.Module]], name: str) -> bool:
    """Whether the model's constructor accepts the keyword argument ``name``.

    Callers use it to pass ``num_classes``/``in_channels``/``input_size`` only to models that take them.

    Args:
        model: a registered name, a dotted class path or a class.
        name: the keyword argument.

    Example:
        >>> model_accepts("convnet", "input_size"), model_accepts(nn.Linear, "num_classes")
        (True, False)
    """
    names, var_keyword = _accepted_keywords(_resolve(model))
    return var_keyword or name in names


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a model from a registered name (case-insensitive) or a dotted class path.

    All ``kwargs`` go to the constructor; use :func:`model_accepts` to drop the ones a class does not take.

    Args:
        name: a name from :func:`available_models` or a class path such as ``"torch.nn.Identity"``.
        **kwargs: constructor arguments.

    Raises:
        ValueError: for an unknown name or a class path whose module or attribute cannot be found.
        TypeError: if a class path names something other than an ``nn.Module`` subclass, or a keyword argument
            is not accepted by the constructor.

    Example:
        >>> model = build_model("MLP", num_classes=3, in_channels=1, input_size=4, hidden=[8])
        >>> type(model).__name__, model.head.out_features
        ('MLP', 3)
        >>> type(build_model("torch.nn.Identity")).__name__
        'Identity'
    """
    cls = _resolve(name)
    names, var_keyword = _accepted_keywords(cls)
    unknown = [key for key in kwargs if key not in names]
    if unknown and not var_keyword:
        raise TypeError(
            f"{cls.__qualname__} does not accept the keyword argument(s) {', '.join(map(repr, unknown))}; it "
            f"accepts {', '.join(names) or 'none'}. Remove them or check their spelling."
        )
    return cls(**kwargs)
