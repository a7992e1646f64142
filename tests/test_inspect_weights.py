"""``schane inspect-weights`` / :func:`schane.models.inspection.inspect_weights`: what a file holds and
what a backbone would load, ignore, interpolate or miss, without loading it.

The BEiT-3 files are the tiny replicas of the official layouts built from torchscale in
test_models_beit3.py (sources named there: microsoft/unilm beit3/README.md, modeling_utils.py,
modeling_finetune.py, utils.py).
"""

from __future__ import annotations

import pytest
import torch

from schane.cli import main
from schane.config import ModelConfig
from schane.models import build_model
from schane.models.inspection import inspect_weights
from test_models_beit3 import write_in1k_replica, write_itc_replica, write_pretraining_replica

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pretraining_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("beit3") / "beit3_base_patch16_224.zip"  # named as Azure downloads arrive
    return path, write_pretraining_replica(path)


def test_pretraining_replica_report(pretraining_file):
    path, sd = pretraining_file
    report = inspect_weights(path, "beit3_tiny")
    assert report.ok and report.problem() is None
    report.check()  # does not raise
    assert report.file_format == "PyTorch checkpoint (zip archive)"
    assert report.wrapper == ["model"] and report.stripped_prefixes == []
    assert report.extras["epoch"] == "int 149" and report.extras["args"].startswith("argparse.Namespace")
    assert report.n_tensors == len(sd) and report.n_params == sum(v.numel() for v in sd.values())
    assert report.dtypes == {"float32": len(sd)}
    groups = report.ignored_by_reason()
    assert groups["pretraining head (masked image modelling)"] == ["mim_head.weight", "mim_head.bias"]
    assert groups["pretraining head (masked language modelling)"] == ["mlm_head.weight", "mlm_head.bias"]
    assert report.ignored_params["mim_head.weight"] == sd["mim_head.weight"].numel()
    assert sorted(report.fresh) == ["fc_norm.bias", "fc_norm.weight"]
    assert report.missing == [] and report.unexpected == [] and report.interpolated == {}
    # the same plan the training load follows
    model = build_model(ModelConfig(backbone="beit3_tiny", pretrained=False, checkpoint=str(path)), 2)
    assert set(report.loaded) == set(model.backbone.state_dict()) - {"fc_norm.weight", "fc_norm.bias"}
    assert report.ignored == model.load_report.ignored_reasons
    text = report.format()
    for needle in ("'model'", "epoch: int 149", "args: argparse.Namespace", "pretraining head (masked image modelling)",
                   "mim_head.weight, mim_head.bias", "text branch (token embedding)", "result        fits beit3_tiny"):  # fmt: skip
        assert needle in text, needle


def test_interpolation_is_reported(pretraining_file):
    report = inspect_weights(pretraining_file[0], "beit3_tiny", img_size=48)
    assert report.ok
    assert report.interpolated == {"beit3.encoder.embed_positions.A.weight": ((19, 32), (39, 32))}
    assert "beit3.encoder.embed_positions.A.weight: (19, 32) -> (39, 32)" in report.format()


def test_itc_and_in1k_replicas(tmp_path):
    itc = tmp_path / "beit3_base_itc_patch16_224.pth"
    write_itc_replica(itc)
    report = inspect_weights(itc, "beit3_tiny")
    assert report.ok and "logit_scale" in report.ignored_by_reason()["image-text contrastive head (itc / retrieval)"]
    in1k = tmp_path / "beit3_base_patch16_224_in1k.pth"
    write_in1k_replica(in1k)
    report = inspect_weights(in1k, "beit3_tiny")
    assert report.ok and report.fresh == {} and "fc_norm.weight" in report.loaded
    assert report.ignored["head.weight"].startswith("task head")


def test_mismatch_is_reported_not_raised(pretraining_file):
    report = inspect_weights(pretraining_file[0], "beit3_tiny", encoder_layers=1)
    assert not report.ok
    assert report.unexpected and all(k.startswith("beit3.encoder.layers.1.") for k in report.unexpected)
    assert "does not match the backbone" in report.problem() and "\n" not in report.problem()
    with pytest.raises(ValueError, match="unexpected keys"):
        report.check()
    assert report.format().splitlines()[-1].startswith("result        does not fit:")


def test_timm_file_and_schane_checkpoint(tmp_path):
    src = build_model(ModelConfig(backbone="test_efficientnet", pretrained=False), num_classes=4)
    path = tmp_path / "schane_run.pth"
    torch.save({"model": src.state_dict(), "epoch": 3}, path)  # a schane training checkpoint
    report = inspect_weights(path, "test_efficientnet")
    assert report.ok and report.stripped_prefixes == ["backbone."]
    heads = report.ignored_by_reason()["schane classifier / projection head"]
    assert sorted(heads) == sorted(k for k in src.state_dict() if not k.startswith("backbone."))
    assert report.ignored_params["classifier.weight"] == src.classifier.weight.numel()


def test_cli_prints_the_report_and_exits_0(pretraining_file, capsys):
    rc = main(["inspect-weights", str(pretraining_file[0]), "--backbone", "beit3_tiny",
               "--set", "model.backbone_kwargs.img_size=48"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "mim_head.weight, mim_head.bias" in out and "pretraining head (masked language modelling)" in out
    assert "(19, 32) -> (39, 32)" in out and "fits beit3_tiny" in out


def test_cli_mismatch_and_bad_files_exit_2_with_one_line(pretraining_file, tmp_path, capsys):
    rc = main(["inspect-weights", str(pretraining_file[0]), "--backbone", "beit3_tiny",
               "--set", "model.backbone_kwargs.encoder_ffn_embed_dim=128"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "shape mismatch" in err
    assert main(["inspect-weights", str(tmp_path / "nope.pth"), "--backbone", "beit3_tiny"]) == 2
    assert "not found" in capsys.readouterr().err
    marker = tmp_path / "UNPICKLED"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.zip"
    torch.save({"model": {"w": torch.zeros(1)}, "args": Payload()}, evil)
    assert main(["inspect-weights", str(evil), "--backbone", "beit3_tiny"]) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()
