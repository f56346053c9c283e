"""``python -m iemask.data.check data=<dataset> [data.root=...] [decode=true]``: every data problem, at once.

Builds both splits with the data module's own ``build_dataset`` (so the files are the ones training
reads) and reports every problem together instead of one per run, hours in:

- always: one ``stat`` per image file (no decoding; seconds for COCO's 118k images);
- with ``decode=true``: every image is also decoded and compared with the size its annotation file
  gives, and every target annotation is decoded (bad RLE or polygon, empty mask); Cityscapes ground
  truth files are read and compared with their image.

The log shows a count per kind and the list; the same goes to ``report_file`` (json, in the run
folder). The exit status is 1 if any problem of an error kind was found. ``skipped_annotation``
(degenerate boxes or segmentations, empty masks: training leaves them out, as Detectron2 does) is
reported as a warning and does not fail the check.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from iemask.data.base import DatasetError, DetectionDataModule, missing_files
from iemask.data.coco import COCOInstanceDataset, ImageSizeError
from iemask.utils.config import CONFIG_DIR
from iemask.utils.runs import write_json_atomic

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
KINDS = {
    "dataset": "a split could not be built (missing folder or annotation file, unreadable json, ...)",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file cannot be decoded (truncated, not an image, no permission)",
    "image_size": "an image is not the size its annotation file gives",
    "bad_annotation": "an annotation or ground truth file cannot be decoded or does not match its image",
    "skipped_annotation": "warning: an annotation training leaves out (degenerate box or segmentation, empty mask)",
}
WARNING_KINDS = {"skipped_annotation"}
LOGGED = 200  # problems listed in the log; the report file has all


@dataclass(frozen=True)
class Problem:
    """One problem: its kind (a key of ``KINDS``), the split and a message naming the file."""

    kind: str
    split: str
    message: str


@dataclass
class CheckReport:
    """What a check found: the images checked per split and every problem."""

    decode: bool
    images: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        """The problems that fail the check (all but warnings)."""
        return [p for p in self.problems if p.kind not in WARNING_KINDS]

    def counts(self) -> dict[str, int]:
        """Problems per kind, in ``KINDS`` order."""
        counter = Counter(p.kind for p in self.problems)
        return {kind: counter[kind] for kind in KINDS if counter[kind]}

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": not self.errors,
            "decode": self.decode,
            "images": self.images,
            "counts": self.counts(),
            "problems": [asdict(p) for p in self.problems],
        }

    def summary(self) -> str:
        """A few lines: the images checked, the count per kind, and the first ``LOGGED`` problems."""
        checked = ", ".join(f"{split} {n} images" for split, n in self.images.items()) or "no images"
        what = "exist, decode and match their annotations" if self.decode else "exist (add decode=true to decode them)"
        lines = [f"checked that the image files {what}: {checked}"]
        if not self.problems:
            return "\n".join([*lines, "no problems found"])
        warnings = len(self.problems) - len(self.errors)
        lines.append(f"{len(self.errors)} problem(s), {warnings} warning(s):")
        lines += [f"  {kind}: {n}  ({KINDS[kind]})" for kind, n in self.counts().items()]
        lines += [f"[{p.split}] {p.kind}: {p.message}" for p in self.problems[:LOGGED]]
        if len(self.problems) > LOGGED:
            lines.append(f"... and {len(self.problems) - LOGGED} more (all in the report file)")
        return "\n".join(lines)


def _image_problem(dataset: Any, image_id: int, present: bool) -> tuple[str, str] | None:
    """``(kind, message)`` if the item's image (when ``present``: not already found missing) fails to load."""
    if not present:
        return None
    try:
        dataset.load_image(image_id)
    except ImageSizeError as e:
        return "image_size", str(e)
    except FileNotFoundError as e:  # removed since the stat pass
        return "missing_image", str(e)
    except DatasetError as e:
        return "unreadable_image", str(e)
    return None


def check_split(
    datamodule: DetectionDataModule, split: str, decode: bool = False, workers: int = 8
) -> tuple[int, list[Problem]]:
    """``(images checked, problems)`` of one split, every image of it (also those training skips for lack of
    annotations), built as training builds it."""
    try:
        dataset = datamodule.build_dataset(split, train=False)
    except (OSError, ValueError) as e:  # missing files, bad json (DatasetError is a ValueError)
        return 0, [Problem("dataset", split, f"{e}")]
    problems = []
    if isinstance(dataset, COCOInstanceDataset):
        problems += [
            Problem("skipped_annotation", split, f"{dataset.annotation_file}, {message}")
            for message in dataset.skipped_annotations
        ]
    paths = dataset.image_paths()
    missing = set(missing_files(paths))
    source = dataset.annotation_file
    problems += [
        Problem(
            "missing_image",
            split,
            f"image file not found: {path} (image id {image_id} of {source}); restore it or remove its entry",
        )
        for image_id, path in zip(dataset.ids, paths, strict=True)
        if path in missing
    ]
    if decode:
        present = [path not in missing for path in paths]
        # Images decode in threads (Pillow releases the GIL); annotations in this thread, as pycocotools'
        # decoding in decode_masks swaps sys.stderr, which is not thread-safe.
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            image_problems = pool.map(_image_problem, [dataset] * len(paths), dataset.ids, present)
            items = zip(dataset.ids, image_problems, strict=True)
            for image_id, image_problem in tqdm(items, total=len(paths), desc=f"decoding {split}", disable=None):
                found = [image_problem] if image_problem else []
                found += dataset.annotation_problems(image_id)
                problems += [Problem(kind, split, message) for kind, message in found]
    return len(paths), problems


def check_data(datamodule: DetectionDataModule, decode: bool = False, workers: int = 8) -> CheckReport:
    """Check both splits of ``datamodule`` (see the module docstring), collecting every problem."""
    report = CheckReport(decode=decode)
    try:
        datamodule.prepare_data()  # the root exists (shapes: generated)
    except (OSError, ValueError) as e:
        report.problems.append(Problem("dataset", "-", f"{e}"))
        return report
    for split in SPLITS:
        report.images[split], problems = check_split(datamodule, split, decode, workers)
        report.problems += problems
    return report


def run_check(cfg: DictConfig) -> CheckReport:
    """Check ``cfg.data``, log the summary and write the report json to ``cfg.report_file``."""
    datamodule = hydra.utils.instantiate(cfg.data)
    report = check_data(datamodule, decode=cfg.decode, workers=cfg.workers)
    write_json_atomic(cfg.report_file, report.to_json())
    (log.error if report.errors else log.info)("%s\nreport: %s", report.summary(), Path(cfg.report_file))
    return report


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check")
def main(cfg: DictConfig) -> None:
    if run_check(cfg).errors:
        sys.exit(1)


if __name__ == "__main__":
    main()
