"""``python -m iemask.analyze``: parameters, FLOPs and latency of one model (Table 8).

The model is composed as ``iemask.train`` composes it, from an experiment (``conf/experiment/``; default
``coco_r50``: 80 classes, ResNet-50) and any overrides; its data config gives the class count and test sizes,
and no data is loaded.

Examples:
    python -m iemask.analyze model=mask_rcnn
    python -m iemask.analyze experiment=lvis_r101                 # 1203 classes, ResNet-101
    python -m iemask.analyze model=iemask model/backbone=resnet101 analyze.detections=100
    python -m iemask.analyze ckpt_path=runs/train/<date>/checkpoints/best-....ckpt   # a trained model
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch import nn

from iemask.analysis import analyze_model, format_model_table
from iemask.classes import model_num_classes
from iemask.lit_module import InstanceSegmentationModule
from iemask.loggers import run_name
from iemask.utils.config import CONFIG_DIR, resolve_device


def build_analyzed_model(cfg: DictConfig) -> tuple[nn.Module, dict[str, Any]]:
    """The model to analyse and what it is: ``ckpt_path``'s own model, else the composed experiment's.

    Raises:
        ValueError: the experiment leaves ``data.num_classes`` to be read from a training json (``custom_r50``).
    """
    if cfg.get("ckpt_path"):
        module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)  # its own architecture and classes
        backbone = module.hparams["model"]["backbone"]
        name = f"{run_name(module.model.switches, backbone, module.model.variant)} ({Path(cfg.ckpt_path).name})"
        return module.model, {"model": name, "experiment": None, "backbone": backbone, "variant": module.model.variant}
    choices = HydraConfig.get().runtime.choices
    experiment = choices.get("experiment")
    if cfg.data.num_classes is None:
        raise ValueError(
            f"experiment={experiment} with data={choices.get('data')} leaves data.num_classes null (training reads "
            "it from the training json, which analyze does not load); set data.num_classes=<your class count>"
        )
    model = hydra.utils.instantiate(cfg.model)
    variant = f", {model.variant} variant" if model.variant != "paper" else ""
    name = f"{choices.get('model', 'model')} ({cfg.model.backbone}{variant})"
    return model, {"model": name, "experiment": experiment, "backbone": cfg.model.backbone, "variant": model.variant}


def analyze(cfg: DictConfig) -> dict[str, Any]:
    """Analyse the configured model, print a table and a final JSON line, write ``analyze.output``; return it."""
    model, about = build_analyzed_model(cfg)
    a = cfg.analyze
    stats = analyze_model(
        model,
        height=a.height,
        width=a.width,
        detections=a.detections,
        warmup=a.warmup,
        repeats=a.repeats,
        device=resolve_device(a.device),
        latency=a.latency,
    )
    result = {**about, "num_classes": model_num_classes(model), **stats.to_dict()}
    title = about["model"] + (f", experiment={about['experiment']}" if about["experiment"] else "")
    print(format_model_table(f"{title}, {result['num_classes']} classes", stats))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="analyze")
def main(cfg: DictConfig) -> dict[str, Any]:
    return analyze(cfg)


if __name__ == "__main__":
    main()
