"""``python -m iemask.benchmark``: Mask R-CNN, IEMask† and IEMask side by side (speed, memory, pipeline, eval).

Examples:
    python -m iemask.benchmark                                   # the paper's settings (GPU)
    python -m iemask.benchmark benchmark=cpu                     # small inputs, in well under a minute on a CPU
    python -m iemask.benchmark benchmark=scale                   # memory and time at 0.05 of LVIS v1 (CPU)
    python -m iemask.benchmark benchmark.precision=bf16 model.channels_last=true benchmark.compile=[mask_head]
    python -m iemask.benchmark model/backbone=resnet101          # any model field, shared by the compared models
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from iemask.benchmarking.report import format_report
from iemask.benchmarking.run import run_benchmark
from iemask.benchmarking.scale import format_scale_report, run_scale_benchmark
from iemask.utils.config import CONFIG_DIR


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="benchmark")
def main(cfg: DictConfig) -> dict:
    """Run the configured benchmark, print its tables and write the JSON to ``benchmark.output``."""
    settings = OmegaConf.to_container(cfg.benchmark, resolve=True)
    preset = HydraConfig.get().runtime.choices.get("benchmark")
    command = shlex.join([sys.executable, "-m", "iemask.benchmark", *sys.argv[1:]])
    if settings.get("kind") == "scale":
        result = run_scale_benchmark(settings, preset=preset, command=command)
        print(format_scale_report(result))
    else:
        model = OmegaConf.to_container(cfg.model, resolve=True)
        result = run_benchmark(settings, model, preset=preset, command=command)
        print(format_report(result))
    output = Path(settings["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"written to {output}")
    return result


if __name__ == "__main__":
    main()
