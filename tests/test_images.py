"""Image folders and preprocessing specs: labels, streaming, views split by image, and every bad-input line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgepack.calibration_data import ImageFolderOptions, ImageSample, read_samples, split_samples
from edgepack.calibration_data.images import BadImageError, read_image_folder
from edgepack.calibration_data.preprocess import ImagePreprocessing, from_hf_config
from edgepack.errors import BadInputError


def photo(path, size=(40, 30), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = 3 if mode == "RGB" else 1
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "images"
    for i in range(3):
        photo(root / "cat" / f"c{i}.png", seed=i)
        photo(root / "dog" / "nested" / f"d{i}.jpg", seed=10 + i)
    (root / "notes.txt").write_text("not an image")
    return root


def test_reader_lists_recursively_with_folder_labels_and_decodes_nothing(folder, monkeypatch):
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    samples = read_samples(folder, label_field="folder")
    assert len(samples) == 6 and all(isinstance(s, ImageSample) for s in samples)
    assert sorted({s.label for s in samples}) == ["cat", "dog"]
    assert not opened  # listing a folder reads no pixels: a 100k-image folder costs a list of paths
    assert samples[0].load().size == (40, 30) and len(opened) == 1


def test_csv_labels_relative_to_the_folder(folder):
    (folder / "labels.csv").write_text("file,label\ncat/c0.png,281\ndog/nested/d1.jpg,Golden retriever\n")
    samples = read_samples(folder, label_field="labels.csv")
    labels = {s.path.name: s.label for s in samples}
    assert labels["c0.png"] == 281 and labels["d1.jpg"] == "Golden retriever" and labels["c1.png"] is None
    (folder / "bad.csv").write_text("file,label\ncat/missing.png,1\n")
    with pytest.raises(BadInputError, match=r"bad.csv:2: image 'cat/missing.png' is not in"):
        read_samples(folder, label_field="bad.csv")


def test_empty_folder_is_one_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.gif").write_bytes(b"GIF89a")
    with pytest.raises(BadInputError, match=r"empty: no images \(found only: \.gif\); a directory is read as an image folder \(\.png"):
        read_samples(tmp_path / "empty")


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    good = photo(tmp_path / "good.png", size=(64, 64))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"a text file renamed to .jpg")
    header_only = tmp_path / "header.jpg"
    header_only.write_bytes(b"\xff\xd8\xff\xe0 a jpeg that stops after its marker")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BadImageError, match=r"broken.jpg: not an image PIL can read .*on_error: skip"):
        ImageSample(broken).load()
    with pytest.raises(BadImageError, match=r"truncated.png: corrupt or truncated image"):
        ImageSample(truncated).load()
    with pytest.raises(BadImageError, match=r"header.jpg: corrupt or truncated image"):
        ImageSample(header_only).load()


def test_split_stops_on_a_bad_image_or_skips_it_as_configured(tmp_path):
    for i in range(6):
        photo(tmp_path / f"{i}.png", seed=i)
    (tmp_path / "3.png").write_bytes(b"garbage")
    stop = read_samples(tmp_path)
    with pytest.raises(BadImageError, match=r"3.png"):
        split_samples(stop, n_calibration=3, n_evaluation=2, seed=0, source="imgs")
    skip = read_samples(tmp_path, images=ImageFolderOptions(on_error="skip"))
    split = split_samples(skip, n_calibration=3, n_evaluation=2, seed=0, source="imgs")
    names = {s.path.name for s in split.calibration + split.evaluation}
    assert len(names) == 5 and "3.png" not in names


def test_decompression_bomb_guard_reads_only_the_header(tmp_path):
    big = photo(tmp_path / "big.png", size=(300, 200))
    with pytest.raises(BadImageError, match=r"300 x 200 = 60,000 pixels, over the 10,000-pixel limit"):
        ImageSample(big, max_pixels=10_000).load()


def test_views_are_deterministic_crops_split_by_source_image(tmp_path):
    for i in range(6):
        photo(tmp_path / f"{i}.png", size=(80, 60), seed=i)
    samples = read_image_folder(tmp_path, ImageFolderOptions(views=4))
    assert len(samples) == 24 and samples[0].load().size == (80, 60)  # view 0: the whole image
    crops = {samples[k].load().size for k in range(1, 4)}
    assert all(w <= 80 and h <= 60 for w, h in crops) and crops != {(80, 60)}
    assert np.array_equal(np.asarray(samples[1].load()), np.asarray(samples[1].load()))  # seeded
    split = split_samples(samples, n_calibration=8, n_evaluation=8, seed=0, source="imgs")
    calibration_images = {s.path for s in split.calibration}
    assert len(split.calibration) == 8 and len(split.evaluation) == 8
    assert not calibration_images & {s.path for s in split.evaluation}  # held-out crops of held-out images
    with pytest.raises(BadInputError, match=r"6 images give .* with no image on both sides"):
        split_samples(samples, n_calibration=10, n_evaluation=13, seed=0, source="imgs")


def test_preprocessing_resize_crop_normalise_layouts(tmp_path):
    image = Image.open(photo(tmp_path / "p.png", size=(64, 48)))
    spec = ImagePreprocessing(resize=36, crop=32)
    out = spec.apply(image)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32 and spec.input_shape == (3, 32, 32)
    raw = np.asarray(image.resize((48, 36), Image.Resampling.BILINEAR), np.float32)[2:34, 8:40]  # center crop
    expected = (raw / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    assert np.allclose(out.transpose(1, 2, 0), expected, atol=1e-5)
    tf_style = ImagePreprocessing(resize=[32, 32], crop=None, scale=1, mean=127, std=128, channel_order="BGR",
                                  layout="NHWC")
    bgr = tf_style.apply(image)
    resized = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR), np.float32)
    assert bgr.shape == (32, 32, 3) and np.allclose(bgr[..., 0], (resized[..., 2] - 127) / 128, atol=1e-6)
    assert ImagePreprocessing(crop=32, dtype="uint8").apply(image).dtype == np.uint8
    gray = ImagePreprocessing(crop=32, channels=1, mean=0.5, std=0.5).apply(image)
    assert gray.shape == (1, 32, 32)


def test_preprocessing_is_checked():
    with pytest.raises(ValueError, match="mean has 2 values for 3 channel"):
        ImagePreprocessing(mean=[0.5, 0.5])
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        ImagePreprocessing.model_validate({"crop_mod": "center"})


def test_preprocessing_from_hf_configs_matches_the_hf_image_processor(tmp_path):
    from transformers import ConvNextImageProcessor, ViTImageProcessor

    noise = Image.open(photo(tmp_path / "p.png", size=(30, 20)))
    image = noise.resize((300, 200), Image.Resampling.BICUBIC)  # smooth, like a photo: resampling detail is small
    for processor in (ViTImageProcessor(size={"height": 64, "width": 64}),
                      ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)):
        processor.save_pretrained(tmp_path / type(processor).__name__)
        spec = from_hf_config(tmp_path / type(processor).__name__ / "preprocessor_config.json")
        ours = spec.apply(image)
        theirs = processor(images=image, return_tensors="np")["pixel_values"][0]
        assert ours.shape == theirs.shape and np.abs(ours - theirs).max() < 0.05, type(processor).__name__
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"size": {"longest": 3}}))
    with pytest.raises(BadInputError, match="has neither shortest_edge nor height/width"):
        from_hf_config(bad)
