import jsonargparse
import pytest
import torch
from torch import nn

from traincraft.models import (
    MLP,
    MODELS,
    AlexNet,
    ConvNet,
    TwoColumnAlexNet,
    available_models,
    build_model,
    model_accepts,
    register_model,
)

SMALL = {"num_classes": 3, "in_channels": 1, "input_size": 32}
SMALL_OPTIONS = {"alexnet": {"width": 1 / 16}, "alexnet_two_column": {"width": 1 / 16}}


@pytest.fixture
def restore_registry():
    saved = dict(MODELS)
    yield
    MODELS.clear()
    MODELS.update(saved)


def test_builtin_models():
    assert available_models() == ["alexnet", "alexnet_two_column", "convnet", "mlp"]
    expected = {"alexnet": AlexNet, "alexnet_two_column": TwoColumnAlexNet, "convnet": ConvNet, "mlp": MLP}
    assert dict(MODELS) == expected


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_takes_the_common_arguments(name):
    torch.manual_seed(0)
    model = build_model(name, **SMALL, **SMALL_OPTIONS.get(name, {}))
    assert isinstance(model, MODELS[name])
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)
    assert all(model_accepts(name, key) for key in SMALL)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_builds_from_yaml(name):
    # LightningCLI builds models through jsonargparse: every constructor argument must have a type it parses.
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(MODELS[name], "model")
    options = {"convnet": "channels: [4, 8]\n  norm: layer", "mlp": "hidden: [8]\n  activation: tanh"}
    options.update({key: "width: 0.0625\n  init: paper" for key in SMALL_OPTIONS})
    cfg = parser.parse_string(
        f"model:\n  num_classes: 3\n  in_channels: 1\n  input_size: 32\n  {options[name]}"
    )
    model = MODELS[name](**cfg.model.as_dict())
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_names_are_case_insensitive():
    assert isinstance(build_model("ConvNet", channels=[4], hidden=8), ConvNet)


def test_class_path():
    assert isinstance(build_model("traincraft.models.MLP", hidden=[4]), MLP)
    assert isinstance(build_model("torch.nn.Identity"), nn.Identity)


def test_unknown_name_lists_the_registered_ones():
    with pytest.raises(
        ValueError, match=r"unknown model 'resnet'; .*alexnet, alexnet_two_column, convnet, mlp.*class path"
    ):
        build_model("resnet")


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("no_such_package_xyz.Net", ValueError, r"cannot import module 'no_such_package_xyz'"),
        (
            "traincraft.models.NoSuchNet",
            ValueError,
            r"module 'traincraft.models' has no attribute 'NoSuchNet'",
        ),
        (
            "collections.OrderedDict",
            TypeError,
            r"'collections.OrderedDict' names .* not an nn.Module subclass",
        ),
        ("torch.nn.functional.relu", TypeError, r"not an nn.Module subclass"),
        (".Net", ValueError, r"not a class path"),
    ],
)
def test_bad_class_paths(path, error, match):
    with pytest.raises(error, match=match):
        build_model(path)


def test_unknown_keyword_names_it_and_the_accepted_ones():
    with pytest.raises(
        TypeError, match=r"AlexNet does not accept .*'widht'.*accepts num_classes, .*width, dropout"
    ):
        build_model("alexnet", widht=0.5)


def test_model_accepts():
    assert model_accepts(AlexNet, "stem") and not model_accepts("mlp", "stem")
    assert not model_accepts(nn.Linear, "num_classes")
    assert model_accepts("torch.nn.Identity", "anything")  # takes **kwargs


def test_register_model(restore_registry):
    @register_model("My_Net")
    class MyNet(nn.Module):
        def __init__(self, num_classes: int = 2) -> None:
            super().__init__()
            self.head = nn.LazyLinear(num_classes)

    assert "my_net" in available_models()
    assert isinstance(build_model("my_net", num_classes=4), MyNet)
    assert register_model("my_net")(MyNet) is MyNet  # registering the same class again is harmless

    with pytest.raises(ValueError, match=r"'my_net' is already registered to .*MyNet; choose another name"):
        register_model("MY_NET")(nn.Linear)
    with pytest.raises(ValueError, match=r"without dots"):
        register_model("my.net")
    with pytest.raises(TypeError, match=r"expects an nn.Module subclass"):
        register_model("not_a_module")(dict)
