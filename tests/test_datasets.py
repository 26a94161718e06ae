"""load_split on tiny trees of every kind, and image decoding."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wakd.data.datasets import MissingDatasetError, PlaceSplit, load_split, tokyo247_panorama_ids
from wakd.data.ground_truth import radius_positives
from wakd.data.images import (
    ImageListDataset,
    ImageLoadError,
    build_transform,
    decode_jpeg_at_size,
    load_rgb,
    to_float,
    uint8_images,
)
from wakd.data.netvlad_mat import DbStruct, load_dbstruct, save_dbstruct

SPECS = Path(__file__).resolve().parents[2] / "shared" / "datasets-specs"
E0, N0 = 585_000.0, 4_477_000.0


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _write_mat(
    path: Path, db_fns: list[str], q_fns: list[str], split: str = "train", timestamps: bool = False
) -> DbStruct:
    db = DbStruct(
        split=split,
        db_image_fns=db_fns,
        db_utm=np.array([[E0 + 3.0 * i, N0] for i in range(len(db_fns))]),
        q_image_fns=q_fns,
        q_utm=np.array([[E0 + 20.0 * i + 1.0, N0 + 1.0] for i in range(len(q_fns))]),
        db_timestamps=np.array([201306 + (i % 2) for i in range(len(db_fns))])
        if timestamps
        else None,
        q_timestamps=np.full(len(q_fns), 201306) if timestamps else None,
    )
    save_dbstruct(db, path)
    return db


DB_FNS = ["000/000001_pitch1_yaw1.jpg", "000/000001_pitch1_yaw2.jpg", "001/001000_pitch2_yaw1.jpg"]
Q_FNS = ["000/q1.jpg", "001/q2.jpg"]


@pytest.mark.parametrize("query_folder", ["queries", "queries_real"])
def test_pitts_tree(tmp_path: Path, query_folder: str) -> None:
    mat = _write_mat(tmp_path / "pitts30k_val.mat", DB_FNS, Q_FNS, split="val")
    for fn in DB_FNS:
        _touch(tmp_path / "Pittsburgh/images" / fn)
    for fn in Q_FNS:
        _touch(tmp_path / "Pittsburgh" / query_folder / fn)
    ps = load_split("pitts", tmp_path, "val", scale="30k")
    assert (ps.name, ps.split, ps.num_db, ps.num_queries) == ("pitts30k", "val", 3, 2)
    assert ps.db_rel[0] == "Pittsburgh/images/000/000001_pitch1_yaw1.jpg"
    assert ps.q_rel[1] == f"Pittsburgh/{query_folder}/001/q2.jpg"
    assert all(p.is_absolute() and p.is_file() for p in ps.db_paths + ps.q_paths)
    np.testing.assert_array_equal(ps.db_utm, mat.db_utm)
    assert (ps.train_pos_radius, ps.eval_radius) == (10.0, 25.0)
    assert ps.db_timestamps is None and ps.db_group_ids is None
    with pytest.raises(ValueError, match="scale"):
        load_split("pitts", tmp_path, "val")


def test_positives_match_independent_distances(tmp_path: Path) -> None:
    _write_mat(
        tmp_path / "synthcity_train.mat",
        [f"{i}.jpg" for i in range(12)],
        [f"{i}.jpg" for i in range(3)],
    )
    ps = load_split("synthcity", tmp_path, "train", check_images=False)
    dist = np.linalg.norm(ps.q_utm[:, None] - ps.db_utm[None], axis=-1)  # [M, N]
    for got, radius in (
        (ps.train_positives(), 10.0),
        (ps.eval_positives(), 25.0),
        (ps.non_negatives(), 25.0),
    ):
        for i, pos in enumerate(got):
            assert set(pos.tolist()) == set(np.flatnonzero(dist[i] <= radius).tolist())
    # db every 3 m from +0 to +33 m; queries at +1, +21, +41 m (1 m north)
    assert [len(p) for p in ps.train_positives()] == [4, 7, 1]
    np.testing.assert_array_equal(ps.queries_with_train_positive(), [0, 1, 2])
    assert ps.train_positives() is ps.train_positives()  # cached


def test_queries_without_train_positive_are_left_out() -> None:
    ps = PlaceSplit(
        "folder",
        "train",
        Path("/data"),
        ["a.jpg", "b.jpg"],
        ["q0.jpg", "q1.jpg", "q2.jpg"],
        db_utm=np.array([[0.0, 0.0], [100.0, 0.0]]),
        q_utm=np.array([[5.0, 0.0], [50.0, 0.0], [100.0, 9.0]]),
    )
    np.testing.assert_array_equal(ps.queries_with_train_positive(), [0, 2])
    assert ps.db_paths == [Path("/data/a.jpg"), Path("/data/b.jpg")]
    with pytest.raises(ValueError, match="q_utm has 1 rows for 3 images"):
        PlaceSplit(
            "folder",
            "train",
            Path("/data"),
            ["a.jpg"],
            ["q0", "q1", "q2"],
            np.zeros((1, 2)),
            np.zeros((1, 2)),
        )


def test_tokyo247_png_fallback_and_panoramas(tmp_path: Path) -> None:
    pano = "03814/381418.231_3946450.428/JHVdmPpMNQcjBfR7qsWEtA_012"
    db_fns = [f"{pano}_{yaw:03d}.jpg" for yaw in (0, 30, 60)] + ["03815/x/OtherPano_012_000.jpg"]
    _write_mat(tmp_path / "tokyo247.mat", db_fns, ["00010.jpg"], split="test")
    for fn in db_fns[:3]:
        _touch(tmp_path / "tokyo247/images" / fn.replace(".jpg", ".png"))
    _touch(tmp_path / "tokyo247/images" / db_fns[3])  # a real .jpg wins
    _touch(tmp_path / "tokyo247/query/00010.jpg")
    ps = load_split("tokyo247", tmp_path, "ignored")
    assert ps.split == "test" and ps.name == "tokyo247"
    assert [Path(r).suffix for r in ps.db_rel] == [".png", ".png", ".png", ".jpg"]
    np.testing.assert_array_equal(ps.db_group_ids, [0, 0, 0, 1])
    assert ps.q_rel == ["tokyo247/query/00010.jpg"]


@pytest.mark.skipif(not SPECS.is_dir(), reason=f"real NetVLAD .mat files not found at {SPECS}")
def test_tokyo247_real_panoramas_have_12_cutouts(tmp_path: Path) -> None:
    (tmp_path / "tokyo247.mat").symlink_to(SPECS / "tokyo247.mat")
    ps = load_split("tokyo247", tmp_path, "test", check_images=False)
    counts = np.bincount(ps.db_group_ids)
    assert len(counts) == 75_984 // 12 and np.all(counts == 12)
    # the 12 cut-outs of a panorama share one position
    spread = [
        np.ptp(ps.db_utm[ps.db_group_ids == g], axis=0).max() for g in range(0, len(counts), 500)
    ]
    assert max(spread) == 0.0


def test_panorama_ids_from_names() -> None:
    ids = tokyo247_panorama_ids(["a/P_012_000.jpg", "b/Q_012_000.jpg", "a/P_012_330.jpg"])
    np.testing.assert_array_equal(ids, [0, 1, 0])


def test_tokyotm_timestamps_and_time_rule(tmp_path: Path) -> None:
    db = _write_mat(
        tmp_path / "tokyoTM_val.mat",
        [f"d{i}.jpg" for i in range(6)],
        ["q0.jpg"],
        "val",
        timestamps=True,
    )
    ps = load_split("tokyotm", tmp_path, "val", check_images=False)
    assert ps.q_rel == ["tokyoTM/images/q0.jpg"] and ps.db_rel[0] == "tokyoTM/images/d0.jpg"
    np.testing.assert_array_equal(ps.db_timestamps, db.db_timestamps)
    # db at +0..+15 m, the query at +1/+1; odd indices are 201307, the query 201306
    np.testing.assert_array_equal(ps.train_positives()[0], [1, 3])
    np.testing.assert_array_equal(ps.eval_positives()[0], [1, 3, 5])
    np.testing.assert_array_equal(ps.non_negatives()[0], [0, 1, 2, 3, 4, 5])


def test_synthcity_tree(tmp_path: Path) -> None:
    _write_mat(tmp_path / "synthcity_test.mat", ["p0/a.png"], ["p0/q.png"], "test")
    _touch(tmp_path / "images/p0/a.png")
    _touch(tmp_path / "queries/p0/q.png")
    ps = load_split("synthcity", tmp_path, "test")
    assert (ps.db_rel, ps.q_rel) == (["images/p0/a.png"], ["queries/p0/q.png"])


def test_folder_format(tmp_path: Path) -> None:
    db_dir = tmp_path / "images/test/database"
    names = ["@585010.5@4477020.25@x@.jpg", "@585000@4477000@.png", "sub/@585005@4477001@@.jpg"]
    for n in names:
        _touch(db_dir / n)
    _touch(db_dir / "notes.txt")
    _touch(tmp_path / "images/test/queries/@585001@4477002@q@.jpg")
    ps = load_split("folder", tmp_path, "test")
    assert ps.db_rel == sorted(f"images/test/database/{n}" for n in names)
    expected = {
        "@585010.5@4477020.25@x@.jpg": (585010.5, 4477020.25),
        "@585000@4477000@.png": (585000, 4477000),
        "@585005@4477001@@.jpg": (585005, 4477001),
    }
    for rel, utm in zip(ps.db_rel, ps.db_utm, strict=True):
        assert tuple(utm) == expected[Path(rel).name]
    np.testing.assert_array_equal(ps.q_utm, [[585001, 4477002]])
    _touch(db_dir / "no_utm.jpg")
    with pytest.raises(ValueError, match=r"no_utm\.jpg.*@<utm_east>@<utm_north>@"):
        load_split("folder", tmp_path, "test")
    with pytest.raises(FileNotFoundError, match=r"images/val/database"):
        load_split("folder", tmp_path, "val")


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "000/../../x.jpg", "."])
def test_names_outside_the_image_folder_are_refused(tmp_path: Path, bad: str) -> None:
    _write_mat(tmp_path / "synthcity_train.mat", ["ok.jpg", bad], ["q.jpg"])
    with pytest.raises(ValueError, match=rf"synthcity_train\.mat.*{re.escape(repr(bad))}"):
        load_split("synthcity", tmp_path, "train", check_images=False)


def test_missing_root_explains_tree(tmp_path: Path) -> None:
    with pytest.raises(MissingDatasetError) as err:
        load_split("pitts", tmp_path / "nowhere", "train", scale="30k")
    message = str(err.value)
    assert "nowhere" in message and "Pittsburgh/images" in message
    assert "synthcity" not in message  # the entry scripts add it where no root was named
    with pytest.raises(FileNotFoundError, match=r"(?s)tokyoTM_train\.mat.*tokyoTM/images"):
        load_split("tokyotm", tmp_path, "train")
    with pytest.raises(ValueError, match="unknown dataset kind 'nordland'"):
        load_split("nordland", tmp_path, "train")


def test_missing_images_named_and_counted(tmp_path: Path) -> None:
    _write_mat(tmp_path / "synthcity_val.mat", ["a.jpg", "b.jpg", "c.jpg"], ["q.jpg"], "val")
    _touch(tmp_path / "images/a.jpg")
    with pytest.raises(FileNotFoundError, match=r"images/b\.jpg not found \(3 of 4 images"):
        load_split("synthcity", tmp_path, "val")
    assert load_split("synthcity", tmp_path, "val", check_images=False).num_db == 3


@pytest.mark.skipif(not SPECS.is_dir(), reason=f"real NetVLAD .mat files not found at {SPECS}")
def test_real_pitts30k_train_split(tmp_path: Path) -> None:
    (tmp_path / "pitts30k_train.mat").symlink_to(SPECS / "pitts30k_train.mat")
    ps = load_split("pitts", tmp_path, "train", scale="30k", check_images=False)
    assert len(ps.queries_with_train_positive()) == 7_320
    mat = load_dbstruct(SPECS / "pitts30k_train.mat")
    expected = radius_positives(mat.db_utm, mat.q_utm, 25.0)
    assert all(np.array_equal(a, b) for a, b in zip(ps.non_negatives(), expected, strict=True))


# ---- images -------------------------------------------------------------------------------


def _jpeg_bytes(size=(640, 480), color=(200, 30, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_transform_gives_unnormalised_0_1_pixels(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(_jpeg_bytes())
    Image.new("L", (50, 40), 128).save(tmp_path / "gray.png")
    tf = build_transform((48, 64), train=False)
    ds = ImageListDataset([tmp_path / "a.jpg", str(tmp_path / "gray.png")], tf)
    image, index, valid = ds[0]
    assert image.shape == (3, 48, 64) and index == 0 and valid is True
    decoded = (
        np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB"), dtype=np.float64)[240, 320] / 255
    )
    np.testing.assert_allclose(image[:, 24, 32].numpy(), decoded, atol=0.01)
    gray, _, _ = ds[1]
    assert gray.shape == (3, 48, 64)  # grayscale becomes 3 channels
    np.testing.assert_allclose(gray[:, 0, 0].numpy(), np.full(3, 128 / 255), atol=1e-7)


def _noise_jpeg(path: Path, size=(80, 60), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def _old_transform(image_size, train: bool):
    """The transform before uint8 decoding: PIL steps, ToTensor (models normalise themselves)."""
    from torchvision import transforms as T

    steps = [T.Resize(image_size)] + ([T.ColorJitter(0.7, 0.7, 0.7, 0.5)] if train else [])
    return T.Compose([*steps, T.ToTensor()])


@pytest.mark.parametrize("train", [False, True])
def test_transform_equals_totensor(tmp_path: Path, train: bool) -> None:
    image = Image.open(_noise_jpeg(tmp_path / "a.jpg")).convert("RGB")
    new, old = build_transform((48, 64), train=train), _old_transform((48, 64), train)
    for seed in range(3):  # the same colour jitter draws
        torch.manual_seed(seed)
        expected = old(image)
        torch.manual_seed(seed)
        got = new(image)
        assert got.dtype == torch.float32 and got.is_contiguous()
        assert torch.equal(got, expected)  # bit-identical
    if not train:  # not RGB: converted as load_rgb would
        gray = Image.new("L", (50, 40), 77)
        assert torch.equal(new(gray), old(gray.convert("RGB")))


def test_uint8_images_convert_to_the_same_batch(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from torch.utils.data import ConcatDataset, Subset

    paths = [_noise_jpeg(tmp_path / f"{i}.jpg", size=(96, 72), seed=i) for i in range(5)]
    (tmp_path / "bad.jpg").write_bytes(_jpeg_bytes()[:2000])
    tf = build_transform((48, 64), train=False)
    queries = ImageListDataset(paths[:2], tf, skip_corrupt=True)
    database = ImageListDataset([*paths[2:], tmp_path / "bad.jpg"], tf, skip_corrupt=True)
    dataset = Subset(ConcatDataset([queries, database]), [0, 2, 3, 5, 1])
    raw = uint8_images(dataset)
    assert raw is not None
    assert not queries.uint8 and not database.uint8  # the caller's datasets are untouched
    with caplog.at_level(logging.WARNING, logger="wakd.data.images"):
        items, raw_items = [dataset[i] for i in range(5)], [raw[i] for i in range(5)]
    assert [r[1:] for r in raw_items] == [r[1:] for r in items]  # same indices and validity
    assert all(r[0].dtype == torch.uint8 and r[0].shape == (3, 48, 64) for r in raw_items)
    batch = to_float(torch.stack([r[0] for r in raw_items]))  # skipped images: zero, as the float path
    assert torch.equal(batch, torch.stack([r[0] for r in items]))
    # Other datasets and transforms: no uint8 path.
    other = ImageListDataset(paths, lambda im: torch.zeros(3, 1, 1))
    assert uint8_images(ConcatDataset([queries, other])) is None
    assert uint8_images(ImageListDataset(paths, lambda im: torch.zeros(3, 1, 1))) is None
    assert uint8_images(torch.utils.data.TensorDataset(torch.zeros(2, 3, 4, 4))) is None
    with pytest.raises(TypeError):
        ImageListDataset(paths, lambda im: torch.zeros(3, 1, 1), uint8=True)


def test_jpegs_stored_at_the_target_size_decode_to_the_same_pixels(tmp_path: Path) -> None:
    """uint8 items of JPEGs already at the evaluation size skip PIL (torchvision decodes
    them): the same pixels as the PIL path, grayscale and other sizes included."""
    paths = [_noise_jpeg(tmp_path / f"{i}.jpg", size=(64, 48), seed=i) for i in range(3)]
    Image.new("L", (64, 48), 77).save(tmp_path / "gray.jpg")
    Image.fromarray(np.zeros((48, 64, 3), np.uint8)).save(tmp_path / "png.png")
    paths += [tmp_path / "gray.jpg", tmp_path / "png.png", _noise_jpeg(tmp_path / "big.jpg", size=(96, 72))]
    tf = build_transform((48, 64), train=False)
    assert tf.only_resizes and not build_transform((48, 64), train=True).only_resizes
    assert decode_jpeg_at_size(paths[0], (48, 64)) is not None  # the fast path is taken
    assert decode_jpeg_at_size(paths[4], (48, 64)) is None and decode_jpeg_at_size(paths[5], (48, 64)) is None
    fast = ImageListDataset(paths, tf, uint8=True)
    for i, path in enumerate(paths):
        assert torch.equal(fast[i][0], tf.to_uint8(load_rgb(path, (48, 64)))), path.name
    (tmp_path / "cut.jpg").write_bytes(paths[0].read_bytes()[:1500])  # header intact, data cut
    with pytest.raises(ImageLoadError, match=r"cut\.jpg"):
        ImageListDataset([tmp_path / "cut.jpg"], tf, uint8=True)[0]
    image, _, valid = ImageListDataset([tmp_path / "cut.jpg"], tf, skip_corrupt=True, uint8=True)[0]
    assert not valid and image.dtype == torch.uint8 and not image.any()


def test_jpeg_decoded_at_reduced_scale(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.jpg").write_bytes(_jpeg_bytes(size=(1280, 960)))
    seen = []
    ds = ImageListDataset(
        [tmp_path / "big.jpg"], lambda im: seen.append(im.size) or torch.zeros(3, 1, 1)
    )
    ds.image_size = (240, 320)
    ds[0]
    assert seen == [(320, 240)]  # 1/4 scale decode, still >= the target


def test_train_transform_jitters_colour() -> None:
    torch.manual_seed(0)
    image = Image.new("RGB", (32, 24), (120, 100, 80))
    train_tf, eval_tf = build_transform((24, 32), True), build_transform((24, 32), False)
    assert "ColorJitter" in repr(train_tf) and "ColorJitter" not in repr(eval_tf)
    assert not torch.allclose(train_tf(image), eval_tf(image))
    assert build_transform(None, False)(image).shape == (3, 24, 32)


def test_corrupt_images_raise_or_are_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "truncated.jpg").write_bytes(_jpeg_bytes()[:2000])
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    paths = [tmp_path / "truncated.jpg", tmp_path / "garbage.png", tmp_path / "missing.jpg"]
    tf = build_transform((48, 64), train=False)
    strict = ImageListDataset(paths, tf)
    for i, p in enumerate(paths):
        with pytest.raises(ImageLoadError, match=p.name):
            strict[i]
    lenient = ImageListDataset(paths, tf, skip_corrupt=True)
    with caplog.at_level(logging.WARNING, logger="wakd.data.images"):
        for i, p in enumerate(paths):
            image, index, valid = lenient[i]
            assert (index, valid) == (i, False) and image.shape == (3, 48, 64) and not image.any()
            assert p.name in caplog.text
    assert issubclass(ImageLoadError, OSError)


def test_jpeg_fast_path_for_progressive_and_exif_jpegs(tmp_path: Path) -> None:
    """JPEGs with APP segments (EXIF) or progressive scans at the target size decode by
    torchvision to PIL's pixels; CMYK, other formats and truncated files are left to PIL."""
    pixels = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x010E] = "x" * 3000  # ImageDescription: a long APP1 segment before the frame
    Image.fromarray(pixels).save(tmp_path / "exif.jpg", quality=90, exif=exif)
    Image.fromarray(pixels).save(tmp_path / "prog.jpg", quality=90, progressive=True)
    Image.fromarray(pixels).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    (tmp_path / "truncated.jpg").write_bytes(b"\xff\xd8\xff")
    for name in ("exif.jpg", "prog.jpg"):
        decoded = decode_jpeg_at_size(tmp_path / name, (48, 64))
        pil = torch.from_numpy(np.array(load_rgb(tmp_path / name))).permute(2, 0, 1)
        assert decoded is not None and torch.equal(decoded, pil)
        assert decode_jpeg_at_size(tmp_path / name, (64, 48)) is None  # another size: PIL resizes
    for name in ("cmyk.jpg", "image.png", "truncated.jpg", "missing.jpg"):  # PIL converts or names it
        assert decode_jpeg_at_size(tmp_path / name, (48, 64)) is None
