"""predict on a video: a short clip written here with PyAV goes through a tiny trained checkpoint frame by frame
into an annotated clip with the input's frames and timing, per-frame COCO results and a summary; a stride and a
frame limit, an interrupted run, unreadable files and a folder's videos are checked too."""

from __future__ import annotations

import json
import logging
import shutil
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch

from conftest import SHAPES_TINY, TINY_OVERRIDES, compose_config
from iemask import inference
from iemask.data.video import VideoDecodeError, VideoReader, VideoWriter, pick_encoder
from iemask.inference import VIDEO_IN_FOLDER, predict_image, predict_video, set_test_settings
from iemask.lit_module import InstanceSegmentationModule
from iemask.predict import predict
from iemask.train import train
from iemask.utils.visualize import draw_instances

FRAMES, HEIGHT, WIDTH, FPS = 8, 96, 128, 10
TIME_BASE = Fraction(1, 10_000)  # the input's, not the encoder's default: the output must keep it
TEST_SIZE = ["test_min_size=64", "max_size=64"]


@pytest.fixture(scope="module")
def checkpoint(shapes_cache, tmp_path_factory) -> Path:
    """A checkpoint after one training step on tiny shapes (scored at 0, it detects something everywhere)."""
    steps = ["schedule.max_iters=1", "schedule.eval_period=null", "schedule.warmup_iters=1",
             "schedule.reference_batch_size=2", "schedule.steps=[]"]  # fmt: skip
    overrides = [*TINY_OVERRIDES, *SHAPES_TINY, f"data.cache_dir={shapes_cache}", *steps]
    return Path(train(compose_config("train", overrides, tmp_path_factory.mktemp("run")))["best_checkpoint"])


def frame_image(index: int) -> np.ndarray:
    """(H, W, 3) uint8: a red square sliding right and a blue bar sliding down on a dark textured background."""
    y, x = np.mgrid[:HEIGHT, :WIDTH]
    image = np.stack([40 + (x * 3 + y) % 24, 50 + (x + y * 2) % 20, 45 + (x * y) % 16], axis=-1).astype(np.uint8)
    image[20:52, 10 + 6 * index : 42 + 6 * index] = (210, 40, 40)
    image[40 + 4 * index : 56 + 4 * index, 80:120] = (40, 60, 220)
    return image


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """An 8-frame 128×96 MPEG-4 clip at 10 fps, timestamps on a 1/10000 s time base."""
    path = tmp_path_factory.mktemp("clip") / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=FPS, options={"flags": "+qscale", "global_quality": "236"})
        stream.width, stream.height, stream.pix_fmt, stream.time_base = WIDTH, HEIGHT, "yuv420p", TIME_BASE
        for index in range(FRAMES):
            frame = av.VideoFrame.from_ndarray(frame_image(index), format="rgb24")
            frame.pts, frame.time_base = round(index / FPS / TIME_BASE), TIME_BASE
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def decode(path: Path) -> tuple[list[np.ndarray], list[float], SimpleNamespace]:
    """Every frame of ``path`` as (H, W, 3) uint8 with its time in seconds, read with PyAV alone, and its stream's
    ``average_rate``, ``time_base`` and ``codec`` (read while the file is open: a closed container's stream
    object reads freed memory)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        about = SimpleNamespace(
            average_rate=stream.average_rate, time_base=stream.time_base, codec=stream.codec_context.name
        )
        return [f.to_ndarray(format="rgb24") for f in frames], [float(f.time) for f in frames], about


def predict_config(ckpt: Path, source: Path, out: Path, *extra: str):
    args = [f"ckpt_path={ckpt}", f"input={source}", f"output={out}", "device=cpu", "score_thresh=0.0", *TEST_SIZE,
            *extra]  # fmt: skip
    return compose_config("predict", args, out)


@pytest.fixture(scope="module")
def predicted(checkpoint, clip, tmp_path_factory) -> Path:
    """The output folder of predicting the whole clip with the default video settings."""
    out = tmp_path_factory.mktemp("predicted")
    assert predict(predict_config(checkpoint, clip, out)) == out / "predictions.json"
    return out


def expected_overlays(ckpt: Path, clip: Path, indices: list[int]) -> list[np.ndarray]:
    """What the overlays of the decoded input frames ``indices`` are: the model and the drawing function, run here."""
    module = InstanceSegmentationModule.from_checkpoint(ckpt)
    model = module.model.eval()
    set_test_settings(model, 64, 64, score_thresh=0.0, mask_threshold=0.5)
    overlays = []
    for index in indices:
        image = torch.from_numpy(decode(clip)[0][index]).permute(2, 0, 1)
        out = predict_image(model, image, torch.device("cpu"))
        drawn = draw_instances(image, out["boxes"], out["labels"], out["masks"], out["scores"], module.class_names, 0.5)
        overlays.append(drawn.permute(1, 2, 0).numpy())
    return overlays


def luma_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of the (H, W, 3) images' luma: yuv420p keeps luma at full resolution (colour
    at half), so this measures what the encoder lost, not the format's colour subsampling."""
    weights = np.array([0.299, 0.587, 0.114], np.float32)
    return float(np.abs((a.astype(np.float32) - b.astype(np.float32)) @ weights).mean())


def test_a_video_is_annotated_frame_by_frame_at_its_own_timing(predicted, checkpoint, clip):
    inputs, input_times, input_stream = decode(clip)
    outputs, output_times, output_stream = decode(predicted / "clip.mp4")
    assert len(outputs) == len(inputs) == FRAMES
    assert all(o.shape == (HEIGHT, WIDTH, 3) for o in outputs)
    assert output_times == pytest.approx(input_times) and output_times[-1] == pytest.approx((FRAMES - 1) / FPS)
    assert output_stream.average_rate == input_stream.average_rate == FPS
    assert output_stream.time_base == input_stream.time_base == TIME_BASE
    assert output_stream.codec == ("h264" if "libx264" in av.codecs_available else "mpeg4")
    # A written frame is the overlay drawn on its input frame, up to the encoder's loss (measured: 4-5 grey
    # levels with libx264's default quality), and far from the input frame (measured: over 50).
    checked = [0, 3, FRAMES - 1]
    for index, expected in zip(checked, expected_overlays(checkpoint, clip, checked), strict=True):
        output, source = outputs[index], inputs[index]
        drawn = luma_difference(expected, source)
        assert drawn > 20, "score_thresh=0 draws detections all over every frame"
        assert luma_difference(output, expected) < min(10.0, drawn / 4)


def test_video_results_are_per_frame_coco_results_streamed_and_summarised(predicted):
    lines = [json.loads(line) for line in (predicted / "predictions.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [line["image_id"] for line in lines] == list(range(FRAMES))
    assert [line["time_s"] for line in lines] == pytest.approx([i / FPS for i in range(FRAMES)])
    assert {line["file_name"] for line in lines} == {"clip.mp4"}
    results = json.loads((predicted / "predictions.json").read_text())
    assert results == [r for line in lines for r in line["results"]] and results
    assert all(r["image_id"] == r["frame"] and 0 <= r["frame"] < FRAMES for r in results)
    assert all(r["time_s"] == pytest.approx(r["frame"] / FPS) for r in results)
    assert all(r["category_id"] in (1, 2, 3) and r["segmentation"]["size"] == [HEIGHT, WIDTH] for r in results)
    summary = json.loads((predicted / "summary.json").read_text())
    assert summary["frames_processed"] == FRAMES and summary["detections"] == len(results)
    assert summary["fps"] == FPS and summary["size"] == [WIDTH, HEIGHT] and summary["codec"] == pick_encoder()
    assert summary["video"] == str(predicted / "clip.mp4")
    assert not list(predicted.glob("*.png")) and not list(predicted.glob(".*.tmp"))


def test_every_n_frames_and_max_frames_pick_the_frames_predicted_and_written(checkpoint, clip, tmp_path):
    out = tmp_path / "out"
    predict(predict_config(checkpoint, clip, out, "video.every_n_frames=3", "video.max_frames=2"))
    _, times, _ = decode(out / "clip.mp4")
    assert times == pytest.approx([0.0, 0.3])  # frames 0 and 3 (not 6: at most 2), at their own times
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 3]
    assert {r["frame"] for r in json.loads((out / "predictions.json").read_text())} == {0, 3}
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["frames_processed"], summary["every_n_frames"], summary["max_frames"]) == (2, 3, 2)


def test_an_interrupted_run_keeps_the_frames_it_did(checkpoint, clip, tmp_path, monkeypatch):
    calls = []

    def fail_at_the_third_frame(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("interrupted")
        return predict_image(*args, **kwargs)

    monkeypatch.setattr(inference, "predict_image", fail_at_the_third_frame)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="interrupted"):
        predict(predict_config(checkpoint, clip, out))
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["frame"] for line in lines] == [0, 1]
    assert len(decode(out / "clip.mp4")[0]) == 2  # finished, so it plays up to there
    assert not (out / "predictions.json").exists() and not (out / "summary.json").exists()


def test_an_unreadable_video_is_refused_naming_the_file_and_what_to_do(checkpoint, clip, tmp_path):
    model = InstanceSegmentationModule.from_checkpoint(checkpoint).model

    def run(source: Path, out: Path, **video) -> None:
        predict_video(model, source, out, None, [1, 2, 3], torch.device("cpu"), **video)

    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(clip.read_bytes()[: clip.stat().st_size // 2])  # no index (moov) at the end
    with pytest.raises(VideoDecodeError, match=rf"cannot read video {junk}: .*ffprobe {junk}.*re-encode it"):
        predict(predict_config(checkpoint, junk, tmp_path / "out-junk"))
    with pytest.raises(VideoDecodeError, match=rf"cannot read video {truncated}: .*ffprobe {truncated}.*re-encode"):
        run(truncated, tmp_path / "out-truncated")
    for out in (tmp_path / "out-junk", tmp_path / "out-truncated"):
        assert not list(out.glob("*.mp4")) and not (out / "predictions.jsonl").exists()

    sound = tmp_path / "sound.mp4"
    with av.open(str(sound), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        for _ in range(3):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 8000
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with pytest.raises(VideoDecodeError, match=rf"{sound} has no video stream \(streams: audio\); give a file"):
        run(sound, tmp_path / "out-sound")
    with pytest.raises(ValueError, match=r"would overwrite the input video .*clip.mp4; give another output folder"):
        run(clip, clip.parent)
    with pytest.raises(ValueError, match=r"every_n_frames=0: predict every n-th frame, n >= 1"):
        run(clip, tmp_path / "out-stride", every_n_frames=0)
    with pytest.raises(ValueError, match=r"video.codec=nope: not an encoder of PyAV's FFmpeg; give one of .*mpeg4"):
        predict(predict_config(checkpoint, clip, tmp_path / "out-codec", "video.codec=nope"))
    assert not list((tmp_path / "out-stride").glob("*.mp4")) and not list((tmp_path / "out-codec").glob("*.mp4"))


def test_a_folders_videos_are_skipped_with_the_reason(checkpoint, clip, shapes_cache, tmp_path, caplog):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(clip, folder / "clip.mp4")
    (image,) = sorted(Path(shapes_cache).glob("shapes-*/val/*.png"))[:1]
    shutil.copy(image, folder / image.name)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        predict(predict_config(checkpoint, folder, out))
    assert any(f"clip.mp4: {VIDEO_IN_FOLDER}" in r.getMessage() for r in caplog.records)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["processed"], summary["skipped_files"]) == (1, {"clip.mp4": VIDEO_IN_FOLDER})
    assert [p.name for p in out.iterdir() if p.suffix in (".png", ".mp4")] == [image.name]


def test_the_writer_keeps_timestamps_and_evens_odd_sizes(tmp_path):
    odd = torch.zeros(3, 45, 63, dtype=torch.uint8)
    odd[0, :, -1] = 200  # the last column, repeated into the padding
    with VideoWriter(tmp_path / "odd.mp4", Fraction(5), Fraction(1, 1000), codec="mpeg4") as writer:
        for pts in (0, 400, 400, 1000):  # a repeated timestamp moves on by one frame (1/5 s)
            writer.write(odd, pts)
    frames, times, _ = decode(tmp_path / "odd.mp4")
    assert times == pytest.approx([0.0, 0.4, 0.6, 1.0])
    assert frames[0].shape == (46, 64, 3) and frames[0][:, -2:, 0].mean() > 150 and frames[0][:, :-4, 0].max() < 40
    with VideoReader(tmp_path / "odd.mp4") as reader:
        assert (reader.width, reader.height, reader.frame_count) == (64, 46, 4)
        assert [(f.index, f.time_s) for f in reader.frames(max_frames=3)] == pytest.approx([(0, 0), (1, 0.4), (2, 0.6)])
    with VideoWriter(tmp_path / "none.mp4", Fraction(5), Fraction(1, 1000)):
        pass
    assert not (tmp_path / "none.mp4").exists()  # no frames, no file
