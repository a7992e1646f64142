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


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.ckpt_every_steps=0", "train.ckpt_every_steps"),
        ("train.max_steps_per_epoch=0", "train.max_steps_per_epoch"),
        ("train.log_every_steps=0", "train.log_every_steps"),
        ("train.device=tpu", "train.device"),
        ("optim.clip_grad=0", "optim.clip_grad"),
        ("optim.betas=[0.9,1.0]", "optim.betas"),
        ("optim.accum_steps=0", "optim.accum_steps"),
        ("model.drop_rate=1.0", "model.drop_rate"),
        ("name=a/b", "name"),
        ("train.ema_decay=1", "train.ema_decay"),
        ("loss.queue_size=-1", "loss.queue_size"),
        ("loss.chunk_size=0", "loss.chunk_size"),
    ],
)
def test_training_keys_are_validated(override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_training_keys_accept_valid_values():
    cfg = load_config(None, ["train.ckpt_every_steps=50", "train.device=cuda:1", "optim.clip_grad=null",
                             "train.max_steps_per_epoch=null", "loss.chunk_size=1024"])
    assert cfg.train.ckpt_every_steps == 50 and cfg.train.device == "cuda:1" and cfg.optim.clip_grad is None
