"""Entry points given an output write their Hydra run folder (config, log) there, not under runs/."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from iemask.utils.config import CONFIG_DIR


def run_dir(config_name: str, overrides: list[str]) -> Path:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    return Path(OmegaConf.select(cfg, "hydra.run.dir"))


def test_predicts_run_folder_is_its_output(tmp_path):
    assert run_dir("predict", ["ckpt_path=x", "input=y", f"output={tmp_path / 'pred'}"]) == tmp_path / "pred"
    assert run_dir("predict", ["ckpt_path=x", "input=y"]).parent.name == "predict"  # runs/predict/<date>


def test_analyzes_run_folder_is_its_outputs_folder(tmp_path):
    assert run_dir("analyze", [f"analyze.output={tmp_path / 'a' / 'analysis.json'}"]) == tmp_path / "a"
    assert run_dir("analyze", []).parent.name == "analyze"  # runs/analyze/<date>/analysis.json
