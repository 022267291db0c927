"""MultiTaskNet: head shapes, generic backbones, channels_last, freezing, and strict local weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pipeline.model import BackboneWeightsError, MultiTaskNet
from pipeline.schema import TASKS

FOUR_TASKS = [TASKS["age"], TASKS["gender"], TASKS["race"], TASKS["emotion"]]


def images(batch: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def small_net(backbone: str = "resnet18", **options) -> MultiTaskNet:
    torch.manual_seed(0)
    return MultiTaskNet(FOUR_TASKS, backbone, shared_dims=(32,), head_hidden=16, **options)


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_small"])
def test_every_task_gets_an_output_of_its_head_width(backbone: str) -> None:
    outputs = small_net(backbone)(images(size=64))
    assert {task: tuple(out.shape) for task, out in outputs.items()} == {
        "age": (4, 1), "gender": (4, 2), "race": (4, 5), "emotion": (4, 7)
    }


def test_one_logit_binary_heads() -> None:
    assert small_net(binary_outputs=1)(images())["gender"].shape == (4, 1)


@pytest.mark.parametrize(("backbone", "feature_width"),
                         [("mobilenet_v2", 1280), ("efficientnet_b0", 1280), ("resnet50", 2048)])
def test_last_linear_of_any_torchvision_classifier_becomes_the_feature_output(
        backbone: str, feature_width: int) -> None:
    net = small_net(backbone).eval()
    assert net.backbone(images(batch=2)).shape == (2, feature_width)
    assert net.shared[0].in_features == feature_width


def test_layers_follow_the_thesis_order() -> None:
    net = MultiTaskNet([TASKS["age"]], "mobilenet_v3_small", shared_dims=(64, 32), head_hidden=8)
    assert [type(layer) for layer in net.shared] == [nn.Linear, nn.LeakyReLU, nn.BatchNorm1d] * 2
    assert [type(layer) for layer in net.heads["age"]] == [nn.Linear, nn.Dropout, nn.LeakyReLU, nn.Linear]
    assert (net.heads["age"][0].in_features, net.heads["age"][-1].out_features) == (32, 1)


def test_channels_last_model_and_input_give_the_same_outputs() -> None:
    net = small_net().eval()
    x = images()
    expected = net(x)
    net = net.to(memory_format=torch.channels_last)
    outputs = net(x.contiguous(memory_format=torch.channels_last))
    for task in expected:
        assert torch.allclose(outputs[task], expected[task], atol=1e-5)


def trunk_state(net: MultiTaskNet) -> dict[str, torch.Tensor]:
    """Parameters and buffers (BatchNorm running statistics included) of backbone and shared layers."""
    return {name: value.clone() for name, value in net.state_dict().items() if not name.startswith("heads.")}


def train_steps(net: MultiTaskNet, steps: int = 3) -> None:
    """A few AdamW steps (with weight decay) over *all* parameters; frozen ones must be left alone."""
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    net.train()
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        sum(output.square().mean() for output in net(images(seed=step)).values() if output.requires_grad).backward()
        optimizer.step()


def test_frozen_trunk_stays_bit_identical_in_eval_mode_and_gets_no_gradient() -> None:
    net = small_net()
    net.freeze_trunk()
    net.train()
    assert not net.backbone.training and not net.shared.training and net.heads.training
    before, head_before = trunk_state(net), net.heads["race"][0].weight.clone()

    train_steps(net)

    after = trunk_state(net)
    assert all(torch.equal(before[name], after[name]) for name in before)  # running stats included
    assert all(parameter.grad is None for parameter in net.trunk_parameters())
    assert not torch.equal(net.heads["race"][0].weight, head_before)
    assert {id(p) for p in net.trainable_parameters()} == {id(p) for p in net.heads.parameters()}


def test_unfrozen_trunk_running_statistics_do_change_in_train_mode() -> None:
    net = small_net()
    before = trunk_state(net)
    net.train()(images())
    assert not torch.equal(before["shared.2.running_mean"], net.shared[2].running_mean)


def test_frozen_head_stays_identical_in_eval_mode_while_trunk_and_other_heads_train() -> None:
    net = small_net()
    net.freeze_head("gender")
    net.train()
    assert not net.heads["gender"].training and net.heads["age"].training and net.backbone.training
    gender_before = {name: p.clone() for name, p in net.heads["gender"].named_parameters()}
    age_before, trunk_before = net.heads["age"][0].weight.clone(), trunk_state(net)

    train_steps(net)

    assert all(torch.equal(p, gender_before[name]) for name, p in net.heads["gender"].named_parameters())
    assert all(p.grad is None for p in net.head_parameters("gender"))
    assert not net(images())["gender"].requires_grad
    assert not torch.equal(net.heads["age"][0].weight, age_before)
    assert not torch.equal(trunk_state(net)["backbone.conv1.weight"], trunk_before["backbone.conv1.weight"])


def test_frozen_parts_reapply_to_a_fresh_model() -> None:
    net = small_net("mobilenet_v3_small")
    net.freeze_trunk()
    net.freeze_head("age")
    assert net.frozen_parts() == {"trunk": True, "heads": ["age"]}
    fresh = small_net("mobilenet_v3_small")
    fresh.apply_frozen_parts(net.frozen_parts())
    assert fresh.trunk_frozen and fresh.frozen_heads == {"age"}
    trainable = {name for name, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("heads.gender", "heads.race", "heads.emotion")) for name in trainable)


def test_freezing_an_unknown_head_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="'smile'.*age, gender, race, emotion"):
        small_net("mobilenet_v3_small").freeze_head("smile")


def test_local_torchvision_weights_load_into_the_backbone(tmp_path: Path) -> None:
    torch.manual_seed(1)
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)

    net = MultiTaskNet(FOUR_TASKS, "resnet18", weights_path=str(path)).eval()
    reference.fc = nn.Identity()
    x = images()
    assert torch.equal(net.backbone(x), reference.eval()(x))


def test_weights_of_another_architecture_are_an_error_naming_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "resnet34.pth"
    torch.save(torchvision.models.resnet34().state_dict(), path)
    with pytest.raises(BackboneWeightsError, match=re.escape(str(path)) + ".*resnet18.*unexpected keys: layer1.2"):
        MultiTaskNet(FOUR_TASKS, "resnet18", weights_path=str(path))


def test_missing_or_unreadable_weights_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        MultiTaskNet(FOUR_TASKS, "resnet18", weights_path=str(tmp_path / "absent.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(BackboneWeightsError, match="garbage.pth"):
        MultiTaskNet(FOUR_TASKS, "resnet18", weights_path=str(garbage))
