"""Tests of hf_camhd.models: shapes, loss, Hub-mixin round trip, and training under transformers.Trainer."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hf_camhd.models import MLP, LeNet5

# (name, class, kwargs, input shape of one example)
CASES = [
    ("lenet-8x8-grey", LeNet5, dict(in_channels=1, image_size=8), (1, 8, 8)),
    ("lenet-28x28-grey", LeNet5, dict(in_channels=1, image_size=28), (1, 28, 28)),
    ("lenet-32x32-grey", LeNet5, dict(in_channels=1, image_size=32), (1, 32, 32)),
    ("lenet-8x8-rgb", LeNet5, dict(in_channels=3, image_size=8), (3, 8, 8)),
    ("lenet-28x28-rgb", LeNet5, dict(in_channels=3, image_size=28), (3, 28, 28)),
    ("lenet-32x32-rgb", LeNet5, dict(in_channels=3, image_size=32, num_classes=7, activation="tanh"), (3, 32, 32)),
    ("mlp-784", MLP, dict(input_size=784, hidden_sizes=[100, 100, 100]), (1, 28, 28)),
    ("mlp-64-tanh", MLP, dict(input_size=64, hidden_sizes=[32], num_classes=5, activation="tanh"), (1, 8, 8)),
    ("mlp-logistic", MLP, dict(input_size=64, hidden_sizes=[]), (64,)),
]
IDS = [c[0] for c in CASES]


def _build(cls, kwargs, seed=0):
    torch.manual_seed(seed)
    return cls(**kwargs)


@pytest.mark.parametrize("name, cls, kwargs, shape", CASES, ids=IDS)
def test_logits_shape_and_loss_only_with_labels(name, cls, kwargs, shape):
    model = _build(cls, kwargs)
    num_classes = kwargs.get("num_classes", 10)
    x = torch.randn(5, *shape)
    out = model(x)
    assert out.logits.shape == (5, num_classes)
    assert out.loss is None
    labels = torch.arange(5) % num_classes
    out = model(pixel_values=x, labels=labels)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, nn.functional.cross_entropy(out.logits, labels))
    # Trainer indexes outputs: with labels, out[0] is the loss and out[1] the logits
    assert out[0] is out.loss and out[1] is out.logits


@pytest.mark.parametrize(
    "image_size, flat", [(8, 16 * 2 * 2), (28, 16 * 5 * 5), (32, 16 * 5 * 5), (64, 16 * 13 * 13)]
)
def test_lenet_flattened_size_follows_image_size(image_size, flat):
    model = LeNet5(image_size=image_size)
    assert model.fc1.in_features == flat
    assert model(torch.randn(2, 1, image_size, image_size)).logits.shape == (2, 10)


def test_lenet_structure_is_named_stages_with_parameter_free_glue():
    model = LeNet5(in_channels=3, image_size=32)
    assert model.block_names() == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    with_params = [n for n, m in model.named_children() if any(True for _ in m.parameters())]
    assert with_params == model.block_names()
    assert (model.conv1.in_channels, model.conv1.out_channels, model.conv1.kernel_size) == (3, 6, (5, 5))
    assert (model.conv2.in_channels, model.conv2.out_channels) == (6, 16)
    assert (model.fc1.out_features, model.fc2.out_features, model.fc3.out_features) == (120, 84, 10)
    assert model.conv1.padding == (0, 0)  # classic LeNet on 32x32 pads nothing
    assert LeNet5(image_size=28).conv1.padding == (2, 2)  # classic LeNet on 28x28 MNIST
    assert isinstance(LeNet5(activation="tanh").act, nn.Tanh)


def test_mlp_structure():
    model = MLP(input_size=784, hidden_sizes=[1000, 1000], num_classes=10)
    assert [(m.in_features, m.out_features) for m in model.layers] == [(784, 1000), (1000, 1000)]
    assert (model.head.in_features, model.head.out_features) == (1000, 10)
    assert model.block_names() == ["layers.0", "layers.1", "head"]
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"layers", "head"}


@pytest.mark.parametrize(
    "cls, kwargs, match",
    [
        (LeNet5, dict(activation="gelu"), "Invalid activation: 'gelu'"),
        (LeNet5, dict(in_channels=0), "Invalid in_channels"),
        (LeNet5, dict(image_size=4, conv1_padding=0, conv2_padding=0), "Invalid image_size: 4"),
        (MLP, dict(hidden_sizes=[10, 0]), "Invalid hidden_sizes entry"),
        (MLP, dict(hidden_sizes=100), "Invalid hidden_sizes"),
        (MLP, dict(num_classes=-1), "Invalid num_classes"),
    ],
)
def test_invalid_arguments_raise_value_error(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_mlp_rejects_wrong_input_size_with_the_fix():
    with pytest.raises(ValueError, match="set input_size=64"):
        MLP(input_size=784)(torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("name, cls, kwargs, shape", CASES, ids=IDS)
def test_save_pretrained_from_pretrained_round_trip(tmp_path, name, cls, kwargs, shape):
    model = _build(cls, kwargs, seed=1).eval()
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in tmp_path.iterdir()}
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in kwargs.items():
        assert config[key] == value
    card = (tmp_path / "README.md").read_text()
    assert "library_name: hf_camhd" in card and "camhd" in card and "apache-2.0" in card

    loaded = cls.from_pretrained(tmp_path, strict=True).eval()
    assert type(loaded) is cls
    x = torch.randn(3, *shape)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)


def _synthetic_dataset(n, shape, num_classes=10, seed=0):
    from datasets import Array3D, ClassLabel, Dataset, Features

    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    # learnable signal: the class index shifts the mean of the image
    pixel_values = torch.randn(n, *shape, generator=g) + labels.view(-1, 1, 1, 1).float() / num_classes
    features = Features(
        {
            "pixel_values": Array3D(shape=shape, dtype="float32"),
            "labels": ClassLabel(names=[str(i) for i in range(num_classes)]),
        }
    )
    return Dataset.from_dict({"pixel_values": pixel_values.numpy(), "labels": labels.numpy()}, features=features).with_format(
        "torch"
    )


@pytest.mark.parametrize(
    "cls, kwargs, shape",
    [(LeNet5, dict(in_channels=3, image_size=32), (3, 32, 32)), (MLP, dict(input_size=64, hidden_sizes=[16]), (1, 8, 8))],
    ids=["lenet", "mlp"],
)
def test_transformers_trainer_trains_the_model(tmp_path, cls, kwargs, shape):
    from transformers import Trainer, TrainingArguments

    model = _build(cls, kwargs)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    train, evaluation = _synthetic_dataset(32, shape), _synthetic_dataset(16, shape, seed=1)
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation)
    result = trainer.train()
    assert result.global_step == 3
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])
