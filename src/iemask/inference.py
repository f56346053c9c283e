"""Inference outside the training loop: test-time settings, reading images, predicting folders and videos.

A folder is predicted image by image: unreadable files are skipped with a warning, results are
streamed to disk as they come, and a summary counts what was processed and what was skipped. A video
is predicted frame by frame, streamed the same way, into an annotated copy of it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.models.detection import MaskRCNN

from iemask.data.image_io import ImageDecodeError, read_rgb, write_png
from iemask.data.video import VideoReader, VideoWriter, is_video
from iemask.evaluation import to_coco_results
from iemask.models.postprocess import MaskPostprocessTransform
from iemask.models.tta import detect
from iemask.utils.runs import write_json_atomic
from iemask.utils.visualize import draw_instances

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_IN_FOLDER = "a video: give it as input= on its own"  # why a folder's videos are left out


def set_test_settings(
    model: MaskRCNN,
    min_size: int | None = None,
    max_size: int | None = None,
    detections_per_img: int | None = None,
    score_thresh: float | None = None,
    mask_threshold: float | None = None,
) -> None:
    """Apply a dataset's inference protocol to a model (``None`` keeps the current value).

    ``mask_threshold`` is where binary masks are cut (a model with ``mask_output=binary``); models
    returning probabilities leave thresholding to their consumers.
    """
    if min_size is not None:
        model.transform.min_size = (int(min_size),)
    if max_size is not None:
        model.transform.max_size = int(max_size)
    if detections_per_img is not None:
        model.roi_heads.detections_per_img = int(detections_per_img)
    if score_thresh is not None:
        model.roi_heads.score_thresh = float(score_thresh)
    if mask_threshold is not None and isinstance(model.transform, MaskPostprocessTransform):
        model.transform.mask_threshold = float(mask_threshold)


class NothingProcessedError(RuntimeError):
    """No input image (or video frame) could be read; the message names the input and what to do."""


def scan_inputs(source: str | Path) -> tuple[list[Path], dict[Path, str]]:
    """An image file, or the image files of a folder (sorted, not recursive), and the folder's other
    entries with the reason each is left out (they are reported, not silently ignored). A folder's
    videos are left out too: one video is predicted by :func:`predict_video`, given on its own."""
    source = Path(source)
    if source.is_file():
        return [source], {}
    if not source.is_dir():
        raise FileNotFoundError(f"input not found: {source} (give an image file or a folder of images)")
    images, left_out = [], {}
    for path in sorted(source.iterdir()):
        if path.is_dir():
            left_out[path] = "a folder (input folders are not searched recursively)"
        elif is_video(path):
            left_out[path] = VIDEO_IN_FOLDER
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            left_out[path] = f"not an image file name (suffix not one of {', '.join(IMAGE_SUFFIXES)})"
        else:
            images.append(path)
    return images, left_out


def image_id_for(path: Path, index: int) -> int:
    """COCO image id of a file: its numeric stem (``000000139.jpg`` → 139), else its index."""
    return int(path.stem) if path.stem.isdigit() else index


@torch.inference_mode()
def predict_image(model: MaskRCNN, image: torch.Tensor, device: torch.device) -> dict[str, Any]:
    """Detections of one uint8 (3, H, W) image by a model in eval mode on ``device``, on the CPU
    (masks as the model gives them: (N, 1, H, W) probabilities or ``BinaryMasks``)."""
    (output,) = detect(model, [image.to(device, torch.float32) / 255])  # with TTA when model.tta enables it
    return {k: v.cpu() for k, v in output.items()}


def _prepare(model: MaskRCNN, device: torch.device, mask_thresh: float) -> None:
    """Eval mode on ``device``; binary masks are cut in the model, at ``mask_thresh``."""
    model.eval().to(device)
    set_test_settings(model, mask_threshold=mask_thresh)


def _detect_and_draw(
    model: MaskRCNN,
    image: torch.Tensor,
    device: torch.device,
    class_names: Sequence[str] | None,
    score_thresh: float,
    mask_thresh: float,
    overlay: Mapping[str, Any],
) -> tuple[dict[str, Any], torch.Tensor]:
    """The detections of a uint8 (3, H, W) image kept by ``score_thresh``, and its overlay (uint8 (3, H, W))."""
    out = predict_image(model, image, device)
    keep = out["scores"] >= score_thresh
    out = {k: v[keep] for k, v in out.items()}
    drawn = draw_instances(
        image, out["boxes"], out["labels"], out["masks"], out["scores"], class_names, mask_thresh, **overlay
    )
    return out, drawn


def predict_folder(
    model: MaskRCNN,
    source: str | Path,
    output_dir: str | Path,
    class_names: Sequence[str] | None,
    category_ids: Sequence[int],
    device: torch.device,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    results_file: str = "predictions.json",
    overlay: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Predict every image of ``source``, writing ``<stem>.png`` overlays and COCO results into ``output_dir``.

    ``overlay`` holds ``draw_instances``' drawing settings (``alpha``, ``font_size``, ``show_boxes``);
    the detections drawn are those kept by ``score_thresh``.

    Results stream into ``<results stem>.jsonl`` (one flushed line per image: ``file_name``, ``image_id``,
    ``results``), so an interrupted run keeps what it did; ``results_file`` (a json list, each result
    with its ``file_name``) is written at the end, atomically. A file that cannot be read as an image
    is skipped with a warning naming it, and so is a video (:data:`VIDEO_IN_FOLDER`).
    ``summary.json`` counts processed and skipped files.

    Returns:
        The summary: ``processed``, ``skipped``, ``detections``, ``skipped_files`` (name → why), paths.

    Raises:
        NothingProcessedError: no image could be read (after writing ``summary.json``).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    results_path = output_dir / results_file
    stream_path = results_path.with_suffix(".jsonl")
    images, left_out = scan_inputs(source)
    skipped = {path.name: why for path, why in left_out.items()}
    for path, why in left_out.items():
        log.warning("skipping %s: %s", path, why)
    results: list[dict[str, Any]] = []
    processed = 0
    overlay = dict(overlay or {})
    _prepare(model, device, mask_thresh)
    with open(stream_path, "w") as stream:
        for index, path in enumerate(images):
            try:
                image = read_rgb(path)
            except ImageDecodeError as e:
                skipped[path.name] = str(e.__cause__ or e)
                log.warning("skipping %s: cannot be read as an image (%s)", path, skipped[path.name])
                continue
            out, drawn = _detect_and_draw(model, image, device, class_names, score_thresh, mask_thresh, overlay)
            write_png(drawn, output_dir / f"{path.stem}.png")
            image_id = image_id_for(path, index)
            image_results = [
                {**r, "file_name": path.name}
                for r in to_coco_results(image_id, out, category_ids, mask_threshold=mask_thresh)
            ]
            stream.write(json.dumps({"file_name": path.name, "image_id": image_id, "results": image_results}) + "\n")
            stream.flush()
            results.extend(image_results)
            processed += 1
            log.info("%s: %d detections", path.name, len(image_results))
    summary = {
        "input": str(source),
        "processed": processed,
        "skipped": len(skipped),
        "detections": len(results),
        "skipped_files": skipped,
        "results": str(results_path) if processed else None,
        "stream": str(stream_path),
    }
    write_json_atomic(output_dir / "summary.json", summary)
    if not processed:
        raise NothingProcessedError(
            f"no image of {source} could be processed ({len(skipped)} file(s) skipped, each named in a warning "
            f"and in {output_dir / 'summary.json'}); give an image file or a folder with readable images "
            f"({', '.join(IMAGE_SUFFIXES)})"
        )
    write_json_atomic(results_path, results, indent=None)
    log.log(
        logging.WARNING if skipped else logging.INFO,
        "%d image(s) processed, %d file(s) skipped%s; %d detections in %s (per image: %s)",
        processed,
        len(skipped),
        " (named above and in summary.json)" if skipped else "",
        len(results),
        results_path,
        stream_path.name,
    )
    return summary


def predict_video(
    model: MaskRCNN,
    source: str | Path,
    output_dir: str | Path,
    class_names: Sequence[str] | None,
    category_ids: Sequence[int],
    device: torch.device,
    score_thresh: float = 0.5,
    mask_thresh: float = 0.5,
    results_file: str = "predictions.json",
    overlay: Mapping[str, Any] | None = None,
    every_n_frames: int = 1,
    max_frames: int | None = None,
    codec: str | None = None,
    options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Predict the frames of a video, writing the annotated ``<stem>.mp4`` and COCO results into ``output_dir``.

    Frames are decoded, predicted, drawn (as :func:`predict_folder` draws images) and encoded one at a
    time, so memory does not grow with the clip. Every ``every_n_frames``-th frame is predicted, from
    the first, at most ``max_frames`` of them; the video written holds those frames at their own
    timestamps, on the input's time base, so it plays at the input's speed. ``codec`` and ``options``
    choose the encoder (:class:`~iemask.data.video.VideoWriter`: libx264 when available, else mpeg4).

    Results: a COCO result's ``image_id`` is its frame's index in the clip (from 0), and each result
    also carries ``frame`` (the same) and ``time_s`` (the frame's timestamp). They stream into
    ``<results stem>.jsonl``, one flushed line per frame, so an interrupted run (an error, Ctrl-C)
    keeps what it did, and the video is finished up to there; ``results_file`` is written at the end,
    atomically, with ``summary.json`` (frames processed, fps, size, codec, the video written).

    Returns:
        The summary.

    Raises:
        VideoDecodeError: the file is not a readable video, has no video stream, or fails part-way.
        NothingProcessedError: the video has no frame (after writing ``summary.json``).
    """
    source, output_dir = Path(source), Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    video_path = output_dir / f"{source.stem}.mp4"
    if video_path.resolve() == source.resolve():
        raise ValueError(f"output={output_dir} would overwrite the input video {source}; give another output folder")
    results_path = output_dir / results_file
    stream_path = results_path.with_suffix(".jsonl")
    overlay = dict(overlay or {})
    results: list[dict[str, Any]] = []
    _prepare(model, device, mask_thresh)
    with VideoReader(source) as reader:
        frames = reader.frames(every_n_frames, max_frames)
        with (
            VideoWriter(video_path, reader.fps, reader.time_base, codec, options) as writer,
            open(stream_path, "w") as stream,
        ):
            log.info(
                "%s: %dx%d at %.4g fps (%s frames); predicting every %s%s into %s (%s)",
                source, reader.width, reader.height, float(reader.fps), reader.frame_count or "unknown number of",
                f"{every_n_frames}th frame" if every_n_frames > 1 else "frame",
                f", at most {max_frames}" if max_frames else "", video_path, writer.codec,
            )  # fmt: skip
            for frame in frames:
                out, drawn = _detect_and_draw(
                    model, frame.image, device, class_names, score_thresh, mask_thresh, overlay
                )
                writer.write(drawn, frame.pts)
                when = {"frame": frame.index, "time_s": round(frame.time_s, 6)}
                frame_results = [
                    {**r, **when} for r in to_coco_results(frame.index, out, category_ids, mask_threshold=mask_thresh)
                ]
                line = {"file_name": source.name, "image_id": frame.index, **when, "results": frame_results}
                stream.write(json.dumps(line) + "\n")
                stream.flush()
                results.extend(frame_results)
                log.debug("frame %d (%.3f s): %d detections", frame.index, frame.time_s, len(frame_results))
    processed = writer.frames_written
    summary = {
        "input": str(source),
        "frames_processed": processed,
        "every_n_frames": every_n_frames,
        "max_frames": max_frames,
        "fps": float(reader.fps),
        "time_base": str(reader.time_base),
        "size": [reader.width, reader.height],
        "detections": len(results),
        "video": str(video_path) if processed else None,
        "codec": writer.codec,
        "results": str(results_path) if processed else None,
        "stream": str(stream_path),
    }
    write_json_atomic(output_dir / "summary.json", summary)
    if not processed:
        raise NothingProcessedError(
            f"no frame of {source} could be decoded (its video stream is empty); check that it plays "
            f"(`ffprobe {source}`), or give another video"
        )
    write_json_atomic(results_path, results, indent=None)
    log.info(
        "%d frame(s) of %s processed; %d detections in %s (per frame: %s), annotated video %s",
        processed, source.name, len(results), results_path, stream_path.name, video_path,
    )  # fmt: skip
    return summary
