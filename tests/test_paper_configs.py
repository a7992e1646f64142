"""The paper's experiment configs (configs/paper/*.yaml): they validate, hold the released recipe and
preprocessing, cover every benchmark once, and each trains one step with a tiny BEiT-3 loaded through
``model.checkpoint`` from a tiny replica of the official pretraining file (built from torchscale in
test_models_beit3.py, sources named there) on fixture data in the dataset's real on-disk layout."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from fixtures import (
    write_caltech256,
    write_cifar100,
    write_cub200,
    write_flowers102,
    write_imagenet,
    write_inat2017,
    write_mini_imagenet_cache,
    write_oxford_pets,
    write_places365,
    write_tiered_imagenet_png,
)
from schane.config import ModelConfig, load_config
from schane.data import dataset_info, get_dataset, list_datasets
from schane.data.transforms import resolve_preprocessing
from schane.engine.run_log import read_metrics
from schane.models import build_model
from schane.models.backbones import BEIT3_CONFIGS
from schane.pipelines.train import peak_lr, train
from test_models_beit3 import write_pretraining_replica

PAPER_DIR = Path(__file__).resolve().parents[1] / "configs" / "paper"
FEWSHOT = ("cifar_fs", "fc100", "mini_imagenet", "tiered_imagenet")
CLASSIFICATION = (
    "cifar100", "cub200", "caltech256", "flowers102", "oxford_pets", "inat2017", "places365", "imagenet",
)  # fmt: skip
BENCHMARKS = FEWSHOT + CLASSIFICATION
CONFIGS = sorted(PAPER_DIR.glob("*.yaml"))
CIFAR_IMAGES = ("cifar100", "cifar_fs", "fc100")  # CIFAR-100's images
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_one_config_per_benchmark():
    names = {p.stem: load_config(p).data.name for p in CONFIGS}
    assert sorted(names) == sorted(BENCHMARKS), "configs/paper/ must hold exactly one YAML per benchmark"
    assert all(stem == data_name for stem, data_name in names.items()), names
    assert len({load_config(p).name for p in CONFIGS}) == len(CONFIGS), "run names must differ"


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_holds_released_recipe(path):
    cfg = load_config(path)
    bench = path.stem
    assert cfg.data.name in list_datasets(), f"{path.name}: unknown dataset {cfg.data.name!r}"
    kind = dataset_info(cfg.data.name).kind
    assert kind == ("fewshot" if bench in FEWSHOT else "classification")
    assert cfg.model.backbone == "beit3_base_patch16_224" and cfg.model.backbone in BEIT3_CONFIGS
    assert cfg.data.img_size == 224 and cfg.model.drop_path == 0.15
    assert cfg.model.checkpoint is None and cfg.data.root is None  # given with --set on the command line
    assert cfg.optim.lr == 7e-4 and cfg.optim.base_batch_size == 1024
    assert cfg.optim.layer_decay == 0.65 and cfg.optim.weight_decay == 0.05
    assert cfg.optim.warmup_epochs == 5
    assert cfg.optim.epochs == (100 if bench in FEWSHOT else 50)
    assert (cfg.loss.name, cfg.loss.lam, cfg.loss.temperature, cfg.loss.beta) == ("schane", 0.9, 0.5, 1.0)
    assert cfg.train.amp == "auto"
    # 8 processes x the per-process batch give the base batch: the peak lr is the released 7e-4
    assert cfg.data.batch_size * 8 == cfg.optim.base_batch_size
    assert math.isclose(peak_lr(cfg, world_size=8), 7e-4)
    assert math.isclose(peak_lr(cfg, world_size=1), 7e-4 * cfg.data.batch_size / 1024)
    if bench in FEWSHOT:
        assert cfg.fewshot.ways == 5 and sorted(cfg.fewshot.shots) == [1, 5]
    # preprocessing: the release's plain resize for evaluation, its CIFAR-100 statistics on CIFAR images
    assert cfg.data.eval_resize == "squash" and cfg.data.crop_pct is None
    if bench in CIFAR_IMAGES:
        assert (tuple(cfg.data.mean), tuple(cfg.data.std)) == (CIFAR100_MEAN, CIFAR100_STD)
    else:
        assert cfg.data.mean is None and cfg.data.std is None
    text = path.read_text()
    assert "# Preprocessing" in text and "SCHaNe release" in text  # the file names the reference it follows
    # the documented command line works on the file
    over = load_config(path, ["data.root=/data", "model.checkpoint=/w/beit3_base_patch16_224.pth"])
    assert over.data.root == "/data" and over.model.checkpoint == "/w/beit3_base_patch16_224.pth"


@pytest.fixture(scope="module")
def beit3_data_config():
    """``model.data_config`` of a BEiT-3 backbone (the official ImageNet fine-tuning values)."""
    return build_model(ModelConfig(backbone="beit3_tiny", pretrained=False), num_classes=2).data_config


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_preprocessing_resolves(path, beit3_data_config):
    pre = resolve_preprocessing(load_config(path).data, beit3_data_config)
    assert pre.eval_resize == "squash" and pre.interpolation == "bicubic"
    expected = (CIFAR100_MEAN, CIFAR100_STD) if path.stem in CIFAR_IMAGES else (IMAGENET_MEAN, IMAGENET_STD)
    assert (pre.mean, pre.std) == expected
    steps = [type(t).__name__ for t in pre.eval_transform(224).transforms]
    assert steps == ["Resize", "ToTensor", "Normalize"]  # no centre crop
    assert pre.eval_transform(224).transforms[0].size == (224, 224)


# ---------------------------------------------------------------------------------------------------------
# one training step per config on fixture data, from the pretraining file's replica


def _write(name: str, root: Path) -> Path:
    """Fixture data for benchmark ``name`` with about the fewest images its reader and a 4-image batch accept."""
    if name in ("cifar_fs", "fc100", "cifar100"):
        return write_cifar100(root, train_per_class=2, test_per_class=1)  # cifar100 holds out from train
    if name == "mini_imagenet":
        write_mini_imagenet_cache(root, "train", per_class=2, size=84)
        return root
    if name == "tiered_imagenet":
        return write_tiered_imagenet_png(root, "train", per_class=2, size=8)
    if name == "cub200":
        classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
        return write_cub200(root, classes, per_class=5, train_per_class=4, size=8)
    if name == "caltech256":
        # the default protocol puts 60 images of a class in train: a class needs at least 61
        return write_caltech256(root, {"001.ak47": 61, "002.american-flag": 61}, size=4)
    if name == "flowers102":
        return write_flowers102(root, n_classes=4, per_class=3, size=8)
    if name == "oxford_pets":
        return write_oxford_pets(root, ["Abyssinian", "american_bulldog"], per_class=4, test_per_class=1)
    if name == "inat2017":
        cats = [
            {"id": 0, "name": "Aves sp", "supercategory": "Aves"},
            {"id": 1, "name": "Felis catus", "supercategory": "Mammalia"},
        ]
        return write_inat2017(root, cats, train_per_class=3, val_per_class=1)
    if name == "places365":
        return write_places365(root, ["a/airfield", "b/bakery"], train_per_class=3, val_per_class=1)
    if name == "imagenet":
        return write_imagenet(root, ["n01440764", "n01443537"], train_per_class=3, val_per_class=1)
    raise ValueError(f"no fixture writer for {name!r}")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """``data_root(name)``: a folder with fixture data of ``name``, written once per module."""
    roots: dict[str, Path] = {}

    def get(name: str) -> Path:
        key = "cifar" if name in ("cifar_fs", "fc100", "cifar100") else name
        if key not in roots:
            roots[key] = _write(name, tmp_path_factory.mktemp(key))
        return roots[key]

    return get


@pytest.fixture(scope="module")
def pretraining_replica(tmp_path_factory):
    """A tiny ``beit3_base_patch16_224.pth``: ``{'model': {beit3.*, mlm_head.*, mim_head.*}, 'epoch', 'args'}``."""
    path = tmp_path_factory.mktemp("weights") / "beit3_base_patch16_224.pth"
    write_pretraining_replica(path)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_one_step(path, data_root, pretraining_replica, tmp_path, caplog):
    name = load_config(path).data.name
    root = data_root(name)
    cfg = load_config(
        path,
        [
            f"data.root={root}", "data.img_size=32", "data.batch_size=4", "data.eval_batch_size=64",
            "data.num_workers=0", "model.backbone=beit3_tiny", f"model.checkpoint={pretraining_replica}",
            "optim.epochs=1", "optim.warmup_epochs=0", "train.max_steps_per_epoch=1", "train.progress=false",
            "train.log_every_steps=1", "train.device=cpu", f"output_dir={tmp_path}",
        ],
    )  # fmt: skip
    assert cfg.model.pretrained is False and cfg.model.checkpoint == str(pretraining_replica)
    # the fixture has every split the run reads
    assert len(get_dataset(name, str(root), "train", val_fraction=cfg.data.val_fraction)) >= 4
    steps: list[dict] = []
    with caplog.at_level(logging.INFO, logger="schane.models"):
        result = train(cfg, callback=steps.append)
    # the backbone was loaded from the replica, its pretraining heads ignored
    loads = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded ")]
    expected = f"loaded 45 tensors from {pretraining_replica}; missing=0 unexpected=0 ignored=50"
    assert loads and set(loads) == {expected}
    assert any("pretraining head (masked image modelling)" in r.getMessage() for r in caplog.records)

    assert [s["global_step"] for s in steps] == [1]
    assert math.isfinite(steps[0]["loss"])
    run_dir = tmp_path / cfg.name
    assert result.run_dir == run_dir and result.last_checkpoint.is_file()
    final = json.loads((run_dir / "final.json").read_text())
    assert final["global_step"] == 1 and final["epochs"] == 1 and final["loss"] == "schane"
    assert final["best_val_top1"] is not None and 0.0 <= final["best_val_top1"] <= 1.0
    if name in CLASSIFICATION:  # test_at_end on the official test split
        assert final["test"] is not None and 0.0 <= final["test"]["top1"] <= 1.0
    else:
        assert final["test"] is None  # few-shot sets are evaluated by episodes (schane fewshot)
    epochs = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "epoch"]
    assert len(epochs) == 1 and math.isfinite(epochs[0]["train_loss"])
    assert 0.0 <= epochs[0]["train_contrastive"] and math.isfinite(epochs[0]["train_ce"])
