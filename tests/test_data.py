import numpy as np
import pytest
import torch
from PIL import Image

from vitfab.data import Preprocess, eval_transform, load_image, make_split, scan_image_folder, train_transform
from vitfab.data.split import Split
from vitfab.errors import DataError

from conftest import write_image


# --- reading images --------------------------------------------------------------------
@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("RGB", ".jpg"), ("RGBA", ".png"), ("RGB", ".bmp"), ("L", ".tif")])
def test_every_format_becomes_rgb(tmp_path, mode, ext):
    p = write_image(tmp_path / f"img{ext}", mode=mode, value=200)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (16, 16)
    arr = np.asarray(img)
    assert abs(int(arr[..., 0].mean()) - 200) <= 2  # (JPEG is lossy)
    assert np.array_equal(arr[..., 0], arr[..., 1])


def test_16bit_keeps_intensity_scale(tmp_path):
    arr = np.full((8, 8), 65535 // 2, dtype=np.uint16)
    arr[0, 0] = 0
    Image.fromarray(arr).save(tmp_path / "xray16.tif")
    out = np.asarray(load_image(tmp_path / "xray16.tif"))
    assert out[1, 1, 0] == 127 and out[0, 0, 0] == 0  # scaled by bit depth, not min-max


def test_rgba_alpha_composited_on_black(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255
    arr[..., 3] = 128
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    px = np.asarray(load_image(tmp_path / "a.png"))[0, 0]
    assert 120 <= px[0] <= 136 and px[1] == 0


def test_truncated_image_fails_with_its_name(tmp_path):
    p = write_image(tmp_path / "ok.jpg", size=64)
    data = p.read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jpg"):
        load_image(bad)


# --- scanning folders -------------------------------------------------------------------
def test_scan_finds_classes_and_ignores_other_files(make_folder):
    root = make_folder({"good": 3, "void": 2})
    (root / "good" / "notes.txt").write_text("not an image")
    (root / "good" / ".hidden.png").write_bytes(b"junk")
    (root / "README.md").write_text("top-level file")
    idx = scan_image_folder(root)
    assert idx.classes == ["good", "void"]
    assert idx.class_counts() == {"good": 3, "void": 2}
    assert all(not p.endswith(".txt") for p, _ in idx.samples)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(tmp_path / "nope")


def test_one_class_is_refused(make_folder):
    with pytest.raises(DataError, match="only one class"):
        scan_image_folder(make_folder({"good": 3}))


def test_empty_class_folder_is_refused(make_folder):
    root = make_folder({"good": 3, "void": 2})
    (root / "crack").mkdir()
    with pytest.raises(DataError, match="crack has no images"):
        scan_image_folder(root)


def test_no_class_folders(tmp_path):
    write_image(tmp_path / "a.png")
    with pytest.raises(DataError, match="no class folders"):
        scan_image_folder(tmp_path)


def test_bad_image_fails_or_is_skipped(make_folder):
    root = make_folder({"good": 3, "void": 3})
    (root / "void" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="broken.png.*--skip-bad-images"):
        scan_image_folder(root)
    idx = scan_image_folder(root, skip_bad=True)
    assert [p for p, _ in idx.skipped] == [str(root / "void" / "broken.png")]
    assert idx.class_counts() == {"good": 3, "void": 3}


def test_class_with_only_bad_images(make_folder):
    root = make_folder({"good": 3, "void": 3})
    (root / "crack").mkdir()
    (root / "crack" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="no readable images"):
        scan_image_folder(root, skip_bad=True)


# --- splits ------------------------------------------------------------------------------
def test_split_is_stratified_disjoint_and_seeded(neu):
    idx = scan_image_folder(neu, validate=False)
    s = make_split(idx, 0.15, 0.15, seed=3)
    sets = [set(p for p, _ in s.subset(n)) for n in ("train", "val", "test")]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sum(map(len, sets)) == len(idx.samples) == 1799
    counts = s.class_counts()
    for c in idx.classes:
        total = sum(counts[n][c] for n in counts)
        assert abs(counts["test"][c] - 0.15 * total) <= 1 and abs(counts["val"][c] - 0.15 * total) <= 1
    assert make_split(idx, 0.15, 0.15, seed=3).test == s.test
    assert make_split(idx, 0.15, 0.15, seed=4).test != s.test
    assert s.imbalance_ratio() == pytest.approx(300 / 299)


def test_split_roundtrip_and_max_per_class(tmp_path, make_folder):
    idx = scan_image_folder(make_folder({"a": 10, "b": 7}))
    s = make_split(idx, 0.2, 0.2, seed=0, max_per_class=5)
    assert {c: sum(v[c] for v in s.class_counts().values()) for c in s.classes} == {"a": 5, "b": 5}
    s.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == s


def test_tiny_classes_keep_a_training_image(make_folder):
    idx = scan_image_folder(make_folder({"a": 1, "b": 2, "c": 3}))
    s = make_split(idx, 0.15, 0.15)
    train_counts = s.class_counts()["train"]
    assert all(n >= 1 for n in train_counts.values())
    assert s.class_counts()["test"]["c"] == 1 and s.class_counts()["val"]["c"] == 1


def test_bad_fractions(make_folder):
    idx = scan_image_folder(make_folder({"a": 4, "b": 4}))
    with pytest.raises(DataError):
        make_split(idx, 0.5, 0.5)


# --- transforms --------------------------------------------------------------------------
def test_transforms_shape_and_no_colour_jitter(tmp_path):
    pre = Preprocess(img_size=32)
    img = Image.fromarray(np.full((40, 40, 3), 100, dtype=np.uint8))
    x = train_transform(pre)(img)
    assert x.shape == (3, 32, 32)
    # a uniform image stays uniform under flips/rotations/crops: no intensity change
    expected = (100 / 255 - pre.mean[0]) / pre.std[0]
    assert torch.allclose(x[0], torch.full_like(x[0], expected), atol=1e-5)
    assert eval_transform(pre)(img).shape == (3, 32, 32)
