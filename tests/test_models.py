import pytest
import torch

from classlab.config import CNNConfig, MLPConfig, PresetConfig
from classlab.errors import ClasslabError
from classlab.models import build_model
from classlab.models.summary import parameter_count as count_parameters

# STUDIES.md pins A's layer sizes (120 / 10,392 / 27,680 / 25,800, and 2,010 for 10 outputs) and D's total.
EXPECTED = {
    ("study_a_cnn", 10): 120 + 10392 + 27680 + 25800 + 2010,
    ("study_a_cnn", 3): 120 + 10392 + 27680 + 25800 + 603,
    ("study_d_mlp", 10): 242762,
    ("study_b_cnn", 3): 320 + 18496 + 73856 + 295168 + 16448 + 195,
    ("study_c_cnn", 10): 640 + 128 + 73856 + 295168 + 1180160 + 5130,
    ("study_e_cnn", 10): 832 + 51264 + 3137000 + 10010,
}


@pytest.mark.parametrize(("name", "classes"), list(EXPECTED))
def test_preset_parameter_counts(name, classes):
    model = build_model(PresetConfig(name=name), classes, (1, 28, 28))
    assert count_parameters(model)["total"] == EXPECTED[(name, classes)]
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, classes)


def test_study_a_layer_shapes():
    model = build_model(PresetConfig(name="study_a_cnn"), 10, (1, 28, 28))
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [sum(p.numel() for p in c.parameters()) for c in convs] == [120, 10392, 27680]
    x = torch.zeros(1, 1, 28, 28)
    assert model.features[:2](x).shape == (1, 12, 26, 26)


def test_switches_change_the_net():
    with_bn = build_model(PresetConfig(name="study_e_cnn", batchnorm=True), 10, (1, 28, 28))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in with_bn.modules()) == 2
    d_bn = build_model(PresetConfig(name="study_d_mlp", batchnorm=True), 10, (1, 28, 28))
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in d_bn.modules()) == 3
    d_drop = build_model(PresetConfig(name="study_d_mlp", dropout=0.2), 10, (1, 28, 28))
    assert sum(isinstance(m, torch.nn.Dropout) for m in d_drop.modules()) == 1


def test_cnn_layer_list_infers_sizes():
    cfg = CNNConfig.model_validate({"name": "cnn", "layers": [{"conv": {"out": 6, "kernel": 5}}, "bn", "relu",
                                                                {"maxpool": 2}, "flatten", "bn", {"linear": 7}]})
    model = build_model(cfg, 4, (3, 20, 20))
    assert model(torch.zeros(2, 3, 20, 20)).shape == (2, 4)
    assert model.features[5].num_features == 6 * 8 * 8


def test_cnn_that_shrinks_to_nothing_is_a_clear_error():
    cfg = CNNConfig.model_validate({"name": "cnn", "layers": [{"conv": {"out": 4, "kernel": 9}}, {"maxpool": 4},
                                                                {"conv": {"out": 4, "kernel": 5}}]})
    with pytest.raises(ClasslabError, match=r"model.layers\[2\] \(conv\)"):
        build_model(cfg, 2, (1, 16, 16))


def test_mlp():
    model = build_model(MLPConfig(name="mlp", hidden=[32, 16], activation="tanh", batchnorm=True, dropout=0.1),
                        5, (1, 8, 8))
    assert count_parameters(model)["total"] == (64 * 32 + 32) + 64 + (32 * 16 + 16) + 32 + (16 * 5 + 5)
