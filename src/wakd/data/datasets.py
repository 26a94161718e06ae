"""Place-recognition splits: image lists, UTM positions and their ground truth.

``load_split`` reads one split of a dataset from its ``raw`` folder, in the
NetVLAD ``.mat`` layout (Pittsburgh, Tokyo 24/7, Tokyo TM, the synthetic city)
or the UTM folder layout of newer VPR code (MSLS, Nordland, SF-XL, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from wakd.data import msls
from wakd.data.ground_truth import radius_positives
from wakd.data.netvlad_mat import DbStruct, load_dbstruct
from wakd.data.utm_names import check_one_zone, parse_utm_name

KINDS = ("pitts", "tokyo247", "tokyotm", "synthcity", "folder", "msls")
FOLDER_EXTENSIONS = (".jpg", ".jpeg", ".png")
# Appended by the entry scripts (wakd.cli) only where the user left the data location at its
# default: whoever named a root wants that data, not another dataset.
NO_DATA_HINT = (
    "no data? try dataset=synthcity "
    "(python -m wakd.synth.synthcity --out datasets/data --preset demo)"
)
EXPECTED_TREES = {
    "pitts": "<root>/pitts{30k,250k}_{train,val,test}.mat\n"
    "<root>/Pittsburgh/images/<dbImageFns>   (e.g. 000/000829_pitch1_yaw1.jpg)\n"
    "<root>/Pittsburgh/queries/<qImageFns>   (or Pittsburgh/queries_real/)",
    "tokyo247": "<root>/tokyo247.mat\n"
    "<root>/tokyo247/images/<dbImageFns>   (.png on disk, .jpg in the .mat)\n"
    "<root>/tokyo247/query/<qImageFns>",
    "tokyotm": "<root>/tokyoTM_{train,val}.mat\n<root>/tokyoTM/images/<dbImageFns and qImageFns>",
    "synthcity": "<root>/synthcity_{train,val,test}.mat\n"
    "<root>/images/<dbImageFns>\n<root>/queries/<qImageFns>",
    "folder": "<root>/images/{train,val,test}/database/@<utm_east>@<utm_north>@...@.jpg\n"
    "<root>/images/{train,val,test}/queries/@<utm_east>@<utm_north>@...@.jpg",
    "msls": msls.EXPECTED_TREE,
}


class MissingDatasetError(FileNotFoundError):
    """A dataset root, split specification or split folder is absent (a missing image is not)."""


@dataclass(eq=False)
class PlaceSplit:
    """Database and query images of one split with their UTM positions."""

    name: str  # 'pitts30k', 'pitts250k', 'tokyo247', 'tokyotm', 'synthcity', 'folder'
    split: str  # train / val / test
    root: Path  # dataset root; db_rel / q_rel are relative to it
    db_rel: list[str]
    q_rel: list[str]
    db_utm: np.ndarray  # [N, 2] float64 (easting, northing)
    q_utm: np.ndarray  # [M, 2]
    db_timestamps: np.ndarray | None = None  # [N] (YYYYMM), Tokyo TM
    q_timestamps: np.ndarray | None = None  # [M]
    db_group_ids: np.ndarray | None = None  # [N] int64 panorama id, for de-duplicating results
    # [N] / [M] int64: positives never cross regions (MSLS cities, whose UTM zones differ)
    db_regions: np.ndarray | None = None
    q_regions: np.ndarray | None = None
    train_pos_radius: float = 10.0
    eval_radius: float = 25.0
    _cache: dict[str, list[np.ndarray]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self.db_utm = np.asarray(self.db_utm, dtype=np.float64).reshape(-1, 2)
        self.q_utm = np.asarray(self.q_utm, dtype=np.float64).reshape(-1, 2)
        for what, arr, count in (
            ("db_utm", self.db_utm, self.num_db),
            ("q_utm", self.q_utm, self.num_queries),
            ("db_timestamps", self.db_timestamps, self.num_db),
            ("q_timestamps", self.q_timestamps, self.num_queries),
            ("db_group_ids", self.db_group_ids, self.num_db),
            ("db_regions", self.db_regions, self.num_db),
            ("q_regions", self.q_regions, self.num_queries),
        ):
            if arr is not None and len(arr) != count:
                raise ValueError(
                    f"{self.name} {self.split}: {what} has {len(arr)} rows for {count} images"
                )
        if (self.db_timestamps is None) != (self.q_timestamps is None):
            raise ValueError(
                f"{self.name} {self.split}: give both db and query time stamps, or neither"
            )
        if (self.db_regions is None) != (self.q_regions is None):
            raise ValueError(f"{self.name} {self.split}: give both db and query regions, or neither")

    @property
    def db_paths(self) -> list[Path]:
        return [self.root / rel for rel in self.db_rel]

    @property
    def q_paths(self) -> list[Path]:
        return [self.root / rel for rel in self.q_rel]

    @property
    def num_db(self) -> int:
        return len(self.db_rel)

    @property
    def num_queries(self) -> int:
        return len(self.q_rel)

    def _cached(self, key: str, compute: Callable[[], list[np.ndarray]]) -> list[np.ndarray]:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def eval_positives(self) -> list[np.ndarray]:
        """Per query, db indices within ``eval_radius`` (other time stamp for Tokyo TM)."""
        return self._cached(
            "eval",
            lambda: radius_positives(
                self.db_utm, self.q_utm, self.eval_radius, self.db_timestamps, self.q_timestamps,
                self.db_regions, self.q_regions,
            ),
        )

    def train_positives(self) -> list[np.ndarray]:
        """Per query, db indices within ``train_pos_radius`` (other time stamp for Tokyo TM)."""
        return self._cached(
            "train",
            lambda: radius_positives(
                self.db_utm,
                self.q_utm,
                self.train_pos_radius,
                self.db_timestamps,
                self.q_timestamps,
                self.db_regions,
                self.q_regions,
            ),
        )

    def non_negatives(self) -> list[np.ndarray]:
        """Per query, db indices within ``eval_radius`` whatever their time: never negatives."""
        return self._cached(
            "non_neg",
            lambda: radius_positives(
                self.db_utm, self.q_utm, self.eval_radius,
                db_regions=self.db_regions, q_regions=self.q_regions,
            ),
        )

    def queries_with_train_positive(self) -> np.ndarray:
        """Indices of the queries that have at least one training positive."""
        return np.flatnonzero([len(p) > 0 for p in self.train_positives()]).astype(np.int64)


def load_split(
    kind: str,
    root: str | os.PathLike,
    split: str,
    scale: str | None = None,
    check_images: bool = True,
    pos_dist_thr: float | None = None,
) -> PlaceSplit:
    """Load one split of a dataset of ``kind`` (see ``KINDS``) from its ``raw`` folder ``root``.

    ``scale`` ('30k' or '250k') selects the Pittsburgh variant. With ``check_images``
    every referenced image must exist. ``pos_dist_thr`` (metres) replaces the evaluation
    radius (the .mat's posDistThr, 25 m for the folder format).
    """
    _check_kind(kind)
    if pos_dist_thr is not None and not float(pos_dist_thr) > 0:
        raise ValueError(
            f"pos_dist_thr={pos_dist_thr} (dataset.pos_dist_thr): the positive radius must be "
            "a positive number of metres"
        )
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise MissingDatasetError(
            f"dataset root {root} does not exist. Expected for '{kind}':\n{EXPECTED_TREES[kind]}"
        )
    if kind == "folder":
        place_split = _load_folder(root, split)
    elif kind == "msls":
        place_split = _load_msls(root, split, 25.0 if pos_dist_thr is None else float(pos_dist_thr))
    else:
        place_split = _load_mat_split(kind, root, split, scale)
    if pos_dist_thr is not None:
        place_split = dataclasses.replace(place_split, eval_radius=float(pos_dist_thr))
    if check_images:
        _check_images_exist(place_split)
    return place_split


def split_files(kind: str, root: str | os.PathLike, split: str, scale: str | None = None) -> list[Path]:
    """The files or folders that define a split: its .mat, or its database and query folders.

    Lets a caller ask whether a split is there at all (as opposed to incomplete, which
    ``load_split`` reports image by image).
    """
    _check_kind(kind)
    root = Path(root).expanduser().absolute()
    if kind == "folder":
        return [root / "images" / split / "database", root / "images" / split / "queries"]
    if kind == "msls":
        return [root / "train_val" / city for city in _msls_cities(split)]
    return [root / _mat_layout(kind, root, split, scale)[1]]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind '{kind}'; choose one of {', '.join(KINDS)}")


def _mat_layout(kind: str, root: Path, split: str, scale: str | None) -> tuple[str, str, str, str]:
    """(dataset name, .mat file name, database folder, query folder) of a NetVLAD-format split."""
    if kind == "pitts":
        if scale not in ("30k", "250k"):
            raise ValueError(f"Pittsburgh needs scale='30k' or '250k', got {scale!r}")
        name, mat_name = f"pitts{scale}", f"pitts{scale}_{split}.mat"
        db_dir = "Pittsburgh/images"
        q_dir = _first_existing_dir(root, ("Pittsburgh/queries", "Pittsburgh/queries_real"))
    elif kind == "tokyo247":
        name, mat_name = "tokyo247", "tokyo247.mat"
        db_dir, q_dir = "tokyo247/images", "tokyo247/query"
    elif kind == "tokyotm":
        name, mat_name = "tokyotm", f"tokyoTM_{split}.mat"
        db_dir = q_dir = "tokyoTM/images"
    else:
        name, mat_name = "synthcity", f"synthcity_{split}.mat"
        db_dir, q_dir = "images", "queries"
    return name, mat_name, db_dir, q_dir


def _load_mat_split(kind: str, root: Path, split: str, scale: str | None) -> PlaceSplit:
    name, mat_name, db_dir, q_dir = _mat_layout(kind, root, split, scale)
    mat_path = root / mat_name
    if not mat_path.is_file():
        raise MissingDatasetError(
            f"dataset specification {mat_path} not found. Expected for '{kind}':\n"
            f"{EXPECTED_TREES[kind]}"
        )
    db = load_dbstruct(mat_path)
    db_rel = [_inside(root, db_dir, fn, mat_path) for fn in db.db_image_fns]
    q_rel = [_inside(root, q_dir, fn, mat_path) for fn in db.q_image_fns]
    group_ids = None
    if kind == "tokyo247":
        db_rel = [_jpg_or_png(root, rel) for rel in db_rel]
        group_ids = tokyo247_panorama_ids(db.db_image_fns)
    return _from_dbstruct(
        db, name, "test" if kind == "tokyo247" else split, root, db_rel, q_rel, group_ids
    )


def _from_dbstruct(
    db: DbStruct,
    name: str,
    split: str,
    root: Path,
    db_rel: list[str],
    q_rel: list[str],
    db_group_ids: np.ndarray | None,
) -> PlaceSplit:
    return PlaceSplit(
        name=name,
        split=split,
        root=root,
        db_rel=db_rel,
        q_rel=q_rel,
        db_utm=db.db_utm,
        q_utm=db.q_utm,
        db_timestamps=db.db_timestamps,
        q_timestamps=db.q_timestamps,
        db_group_ids=db_group_ids,
        train_pos_radius=db.train_pos_radius,
        eval_radius=db.pos_dist_thr,
    )


def _first_existing_dir(root: Path, candidates: tuple[str, ...]) -> str:
    """The first candidate folder that exists (the first one if none does yet)."""
    return next((c for c in candidates if (root / c).is_dir()), candidates[0])


def _inside(root: Path, folder: str, fn: str, source: Path) -> str:
    """``folder/fn`` relative to ``root``, refusing names that leave ``folder``.

    Checked lexically (no symlink resolution), so image folders that are symlinks
    to another disk keep working while '../' and absolute names are refused.
    """
    base = Path(os.path.normpath(root / folder))
    target = Path(os.path.normpath(base / fn))
    if target == base or not target.is_relative_to(base):
        raise ValueError(
            f"{source}: image name {fn!r} does not lie inside {base}; "
            "image names must be relative paths below the image folder"
        )
    return target.relative_to(root).as_posix()


def _jpg_or_png(root: Path, rel: str) -> str:
    """Tokyo 24/7 database images are distributed as .png although the .mat says .jpg."""
    if rel.endswith(".jpg") and not os.path.exists(root / rel):
        return rel[: -len(".jpg")] + ".png"
    return rel


_TOKYO_YAW_SUFFIX = re.compile(r"_\d+\.(jpg|png)$")


def tokyo247_panorama_ids(db_image_fns: list[str]) -> np.ndarray:
    """Panorama id per Tokyo 24/7 database image (int64, numbered in order of appearance).

    A name such as '03814/381418.231_3946450.428/JHVdmPpMNQcjBfR7qsWEtA_012_030.jpg'
    is one of 12 cut-outs (yaw 000..330) of panorama '.../JHVdmPpMNQcjBfR7qsWEtA_012'.
    """
    ids: dict[str, int] = {}
    return np.array(
        [ids.setdefault(_TOKYO_YAW_SUFFIX.sub("", fn), len(ids)) for fn in db_image_fns],
        dtype=np.int64,
    )


def _load_folder(root: Path, split: str) -> PlaceSplit:
    db_rel, db_utm = _list_utm_folder(root, Path("images") / split / "database")
    q_rel, q_utm = _list_utm_folder(root, Path("images") / split / "queries")
    rel = db_rel + q_rel
    check_one_zone([str(root / r) for r in rel], [parse_utm_name(r).zone for r in rel])
    return PlaceSplit("folder", split, root, db_rel, q_rel, db_utm, q_utm)


def _msls_cities(split: str) -> tuple[str, ...]:
    cities = {"val": msls.VAL_CITIES, "train": msls.TRAIN_CITIES}
    if split not in cities:
        raise ValueError(
            f"MSLS split {split!r}: choose val (the official validation protocol, cph and sf) or "
            "train (the 22 training cities); the test cities have no public coordinates"
        )
    return cities[split]


def _load_msls(root: Path, split: str, radius: float) -> PlaceSplit:
    """val: MSLS's official validation protocol (``wakd.data.msls``), 740 queries on the real
    data; train: every non-panorama image of the training cities."""
    val = split == "val"
    protocol = msls.read_protocol(
        root, _msls_cities(split), subtask="all" if val else None, radius=radius,
        drop_queries_without_positive=val,
    )
    return PlaceSplit(
        "msls", split, root, protocol.db_rel, protocol.q_rel, protocol.db_utm, protocol.q_utm,
        db_regions=protocol.db_regions, q_regions=protocol.q_regions, eval_radius=radius,
    )


def _list_utm_folder(root: Path, folder: Path) -> tuple[list[str], np.ndarray]:
    """Images below ``root/folder`` in sorted order, with UTM parsed from '@east@north@...'."""
    directory = root / folder
    if not directory.is_dir():
        raise MissingDatasetError(
            f"{directory} does not exist. Expected for 'folder':\n{EXPECTED_TREES['folder']}"
        )
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in directory.rglob("*")
        if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
    )
    if not rel:
        raise MissingDatasetError(f"{directory} holds no .jpg/.png images")
    names = [parse_utm_name(root / r) for r in rel]
    return rel, np.array([(n.east, n.north) for n in names], dtype=np.float64).reshape(-1, 2)


def _check_images_exist(place_split: PlaceSplit) -> None:
    missing = [p for p in place_split.db_paths + place_split.q_paths if not os.path.exists(p)]
    if missing:
        total = place_split.num_db + place_split.num_queries
        raise FileNotFoundError(
            f"image {missing[0]} not found ({len(missing)} of {total} images of "
            f"{place_split.name} {place_split.split} missing under {place_split.root}). "
            f"Expected layout:\n{EXPECTED_TREES[_kind_of(place_split.name)]}"
        )


def _kind_of(name: str) -> str:
    return "pitts" if name.startswith("pitts") else name
