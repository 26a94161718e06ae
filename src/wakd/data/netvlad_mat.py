"""The NetVLAD ``dbStruct`` ``.mat`` format (Pittsburgh, Tokyo 24/7, Tokyo TM).

``loadmat(f)['dbStruct'][0, 0]`` holds ``whichSet``, ``dbImageFns`` (N x 1 cells),
``utmDb`` (2 x N), ``qImageFns``, ``utmQ`` (2 x M), ``numImages``, ``numQueries``,
``posDistThr``, ``posDistSqThr``, ``nonTrivPosDistSqThr`` and, for Tokyo TM,
``dbTimeStamp`` / ``qTimeStamp`` (YYYYMM). Fields are read by name, never by position.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io

from wakd.atomic import atomic_write_path

REQUIRED_FIELDS = (
    "whichSet",
    "dbImageFns",
    "utmDb",
    "qImageFns",
    "utmQ",
    "posDistThr",
    "posDistSqThr",
    "nonTrivPosDistSqThr",
)


class DatasetFormatError(ValueError):
    """A dataset file exists but does not have the expected content."""


@dataclass(frozen=True)
class DbStruct:
    """One split of a NetVLAD-format dataset; paths are relative to the image folders."""

    split: str
    db_image_fns: list[str]
    db_utm: np.ndarray  # [N, 2] float64, (easting, northing)
    q_image_fns: list[str]
    q_utm: np.ndarray  # [M, 2] float64
    pos_dist_thr: float = 25.0  # evaluation radius (m)
    non_triv_pos_dist_sq_thr: float = 100.0  # squared training-positive radius (m^2)
    db_timestamps: np.ndarray | None = None  # [N] int (YYYYMM), Tokyo TM only
    q_timestamps: np.ndarray | None = None  # [M] int

    @property
    def num_db(self) -> int:
        return len(self.db_image_fns)

    @property
    def num_queries(self) -> int:
        return len(self.q_image_fns)

    @property
    def train_pos_radius(self) -> float:
        """Radius of training positives: sqrt(nonTrivPosDistSqThr) = 10 m."""
        return float(np.sqrt(self.non_triv_pos_dist_sq_thr))

    @property
    def has_timestamps(self) -> bool:
        return self.db_timestamps is not None and self.q_timestamps is not None


def _cell_strings(value: np.ndarray, field: str, path: Path) -> list[str]:
    cells = np.asarray(value).reshape(-1)
    try:
        return [str(np.asarray(c).reshape(-1)[0]) if np.asarray(c).size else "" for c in cells]
    except Exception as exc:
        raise DatasetFormatError(f"{path}: field '{field}' is not a cell array of file names") from exc


def _utm(value: np.ndarray, field: str, count: int, path: Path) -> np.ndarray:
    utm = np.asarray(value, dtype=np.float64)
    if utm.ndim != 2 or utm.shape[0] != 2 or utm.shape[1] != count:
        raise DatasetFormatError(
            f"{path}: field '{field}' has shape {utm.shape}, expected (2, {count}) "
            "(one easting/northing column per image)"
        )
    return np.ascontiguousarray(utm.T)


def _scalar(value: np.ndarray, field: str, path: Path) -> float:
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1:
        raise DatasetFormatError(f"{path}: field '{field}' should be a scalar, has shape {np.shape(value)}")
    return float(arr[0])


def load_dbstruct(path: str | os.PathLike) -> DbStruct:
    """Parse a NetVLAD ``dbStruct`` file, naming the file and field on any problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset specification not found: {path}")
    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as exc:
        raise DatasetFormatError(f"{path}: not a readable MATLAB .mat file ({exc})") from exc
    if "dbStruct" not in mat:
        raise DatasetFormatError(f"{path}: no 'dbStruct' variable (found {sorted(k for k in mat if not k.startswith('__'))})")
    struct = mat["dbStruct"]
    names = struct.dtype.names or ()
    missing = [f for f in REQUIRED_FIELDS if f not in names]
    if missing:
        raise DatasetFormatError(f"{path}: dbStruct lacks field(s) {', '.join(missing)}")
    s = struct[0, 0]
    db_fns = _cell_strings(s["dbImageFns"], "dbImageFns", path)
    q_fns = _cell_strings(s["qImageFns"], "qImageFns", path)
    db_ts = q_ts = None
    if "dbTimeStamp" in names and "qTimeStamp" in names:
        db_ts = np.asarray(s["dbTimeStamp"], dtype=np.int64).reshape(-1)
        q_ts = np.asarray(s["qTimeStamp"], dtype=np.int64).reshape(-1)
        if db_ts.size != len(db_fns) or q_ts.size != len(q_fns):
            raise DatasetFormatError(f"{path}: dbTimeStamp/qTimeStamp lengths do not match the image lists")
    return DbStruct(
        split=str(np.asarray(s["whichSet"]).reshape(-1)[0]),
        db_image_fns=db_fns,
        db_utm=_utm(s["utmDb"], "utmDb", len(db_fns), path),
        q_image_fns=q_fns,
        q_utm=_utm(s["utmQ"], "utmQ", len(q_fns), path),
        pos_dist_thr=_scalar(s["posDistThr"], "posDistThr", path),
        non_triv_pos_dist_sq_thr=_scalar(s["nonTrivPosDistSqThr"], "nonTrivPosDistSqThr", path),
        db_timestamps=db_ts,
        q_timestamps=q_ts,
    )


def save_dbstruct(db: DbStruct, path: str | os.PathLike) -> None:
    """Write ``db`` in the original layout (atomically, :mod:`wakd.atomic`)."""
    fields: dict[str, object] = {
        "whichSet": db.split,
        "dbImageFns": np.array(db.db_image_fns, dtype=object).reshape(-1, 1),
        "utmDb": np.asarray(db.db_utm, dtype=np.float64).T,
        "qImageFns": np.array(db.q_image_fns, dtype=object).reshape(-1, 1),
        "utmQ": np.asarray(db.q_utm, dtype=np.float64).T,
        "numImages": np.array([[db.num_db]], dtype=np.int32),
        "numQueries": np.array([[db.num_queries]], dtype=np.int32),
        # doubles, not the originals' uint8/uint16: radii other than 25 m / 10 m must survive
        "posDistThr": np.array([[db.pos_dist_thr]], dtype=np.float64),
        "posDistSqThr": np.array([[db.pos_dist_thr**2]], dtype=np.float64),
        "nonTrivPosDistSqThr": np.array([[db.non_triv_pos_dist_sq_thr]], dtype=np.float64),
    }
    if db.has_timestamps:
        fields["dbTimeStamp"] = np.asarray(db.db_timestamps, dtype=np.int32).reshape(1, -1)
        fields["qTimeStamp"] = np.asarray(db.q_timestamps, dtype=np.int32).reshape(1, -1)
    with atomic_write_path(path) as tmp:
        scipy.io.savemat(tmp, {"dbStruct": fields})
