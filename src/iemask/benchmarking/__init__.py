"""Side-by-side speed of the model presets (Mask R-CNN, IEMask†, IEMask) and the cost of scale.

``python -m iemask.benchmark`` is the command-line entry point; its modules hold:

* :mod:`~iemask.benchmarking.timing`: the timing loop (interleaved rounds, synchronised calls) and equal work
  (fixed detection counts), shared with :mod:`iemask.analysis`;
* :mod:`~iemask.benchmarking.models`: the compared models built from the composed ``model`` config, their
  training, inference and per-part time shares;
* :mod:`~iemask.benchmarking.pipeline`: the training ``DataLoader``'s images/s;
* :mod:`~iemask.benchmarking.evaluation`: ``evaluate``'s seconds on synthetic COCO/LVIS ground truth;
* :mod:`~iemask.benchmarking.report`: machine metadata, ratios to the baseline and Markdown tables;
* :mod:`~iemask.benchmarking.run`: the whole model benchmark (``conf/benchmark/default.yaml``, ``cpu.yaml``);
* :mod:`~iemask.benchmarking.scale`: memory and time at a fraction of LVIS v1 (``conf/benchmark/scale.yaml``).
"""
