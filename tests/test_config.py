"""Config schema: YAML loading, dotted overrides and validation errors that name the key."""

import pytest

from schane.config import Config, load_config, save_config, to_dict


def test_defaults_are_the_release_recipe():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert (cfg.loss.lam, cfg.loss.temperature, cfg.loss.beta) == (0.9, 0.5, 1.0)
    assert (cfg.optim.lr, cfg.optim.layer_decay, cfg.optim.weight_decay) == (7e-4, 0.65, 0.05)


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\nloss:\n  name: supcon\n  temperature: 0.1\noptim:\n  lr: 0.01\n")
    cfg = load_config(p, ["optim.lr=1e-3", "fewshot.shots=[1,5,10]", "optim.betas=[0.9,0.95]"])
    assert cfg.name == "x" and cfg.loss.name == "supcon" and cfg.loss.temperature == 0.1
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.fewshot.shots == [1, 5, 10]
    assert cfg.optim.betas == (0.9, 0.95)


def test_roundtrip(tmp_path):
    cfg = load_config(None, ["loss.name=ce", "model.checkpoint=/tmp/w.pth"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("loss.nme=ce", "loss.nme"),
        ("nosection.x=1", "nosection"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("loss.name=triplet", "loss.name"),
        ("loss.lam=1.5", "loss.lam"),
        ("data.batch_size=2.5", "data.batch_size"),
        ("train.amp=fp8", "train.amp"),
        ("loss.temperature=0", "loss.temperature"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="--config"):
        load_config("/nonexistent/c.yaml")


def test_override_syntax():
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config(None, ["loss.name"])
