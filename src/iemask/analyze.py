"""``python -m iemask.analyze``: parameters, FLOPs and latency of one model (Table 8).

Examples:
    python -m iemask.analyze model=mask_rcnn
    python -m iemask.analyze model=iemask model/backbone=resnet101 analyze.detections=100
    python -m iemask.analyze ckpt_path=runs/train/<date>/checkpoints/best-....ckpt   # a trained model
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iemask.analysis import analyze_model, format_model_table
from iemask.lit_module import InstanceSegmentationModule
from iemask.loggers import run_name
from iemask.utils.config import CONFIG_DIR, resolve_device


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="analyze")
def main(cfg: DictConfig) -> dict:
    """Build the configured model (or load ``ckpt_path``'s), analyse it, print a table and a final JSON line."""
    if cfg.get("ckpt_path"):
        module = InstanceSegmentationModule.from_checkpoint(cfg.ckpt_path)  # its own architecture and classes
        model = module.model
        name = f"{run_name(model.switches, module.hparams['model']['backbone'])} ({Path(cfg.ckpt_path).name})"
    else:
        model = hydra.utils.instantiate(cfg.model)
        name = f"{HydraConfig.get().runtime.choices.get('model', 'model')} ({cfg.model.backbone})"
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
    result = {"model": name, **stats.to_dict()}
    print(format_model_table(name, stats))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
