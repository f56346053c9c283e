"""``python -m iemask.analyze``: parameters, FLOPs and latency of one model (Table 8).

Examples:
    python -m iemask.analyze model=mask_rcnn
    python -m iemask.analyze model=iemask model/backbone=resnet101 analyze.detections=100
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from iemask.analysis import analyze_model, format_model_table
from iemask.utils.config import CONFIG_DIR, resolve_device


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="analyze")
def main(cfg: DictConfig) -> dict:
    """Build the configured model, analyse it, print a table and a final JSON line."""
    model = hydra.utils.instantiate(cfg.model)
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
    name = f"{HydraConfig.get().runtime.choices.get('model', 'model')} ({cfg.model.backbone})"
    result = {"model": name, **stats.to_dict()}
    print(format_model_table(name, stats))
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
