"""Ground truth from GPS: database images within a radius of each query.

Used for training positives (10 m), evaluation positives (25 m) and the set of
images never to be taken as negatives (everything within 25 m). Tokyo Time
Machine adds a rule: a positive must have been taken at a different time.
"""

from __future__ import annotations

import numpy as np
from sklearn.neighbors import NearestNeighbors


def _check_utm(utm: np.ndarray, name: str) -> np.ndarray:
    utm = np.asarray(utm, dtype=np.float64)
    if utm.ndim != 2 or utm.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape [num_images, 2] (easting, northing), got {utm.shape}"
        )
    return utm


def _check_timestamps(ts: np.ndarray, count: int, name: str) -> np.ndarray:
    ts = np.asarray(ts).reshape(-1)
    if ts.size != count:
        raise ValueError(f"{name} has {ts.size} entries for {count} images")
    return ts


def radius_positives(
    db_utm: np.ndarray,
    q_utm: np.ndarray,
    radius: float,
    db_timestamps: np.ndarray | None = None,
    q_timestamps: np.ndarray | None = None,
    db_regions: np.ndarray | None = None,
    q_regions: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Per query, the int64 indices of database images within ``radius`` metres.

    Indices are sorted by distance (ties by index); the boundary is included.
    With time stamps, database images taken at the query's own time stamp are
    dropped (Tokyo TM: a positive must show the place at another time). With
    regions, only database images of the query's own region count (MSLS cities:
    UTM coordinates of different zones may coincide without being near).
    """
    db_utm = _check_utm(db_utm, "db_utm")
    q_utm = _check_utm(q_utm, "q_utm")
    if (db_timestamps is None) != (q_timestamps is None):
        raise ValueError("give both db_timestamps and q_timestamps, or neither")
    if len(db_utm) == 0:
        return [np.empty(0, dtype=np.int64) for _ in range(len(q_utm))]

    knn = NearestNeighbors(algorithm="kd_tree").fit(db_utm)
    dists, indices = knn.radius_neighbors(q_utm, radius=radius)

    positives = []
    for dist, idx in zip(dists, indices, strict=True):
        order = np.lexsort((idx, dist))  # by distance, then index: deterministic ties
        positives.append(idx[order].astype(np.int64))

    if db_timestamps is not None:
        db_ts = _check_timestamps(db_timestamps, len(db_utm), "db_timestamps")
        q_ts = _check_timestamps(q_timestamps, len(q_utm), "q_timestamps")
        positives = [pos[db_ts[pos] != q_ts[i]] for i, pos in enumerate(positives)]
    if (db_regions is None) != (q_regions is None):
        raise ValueError("give both db_regions and q_regions, or neither")
    if db_regions is not None:
        db_reg = _check_timestamps(db_regions, len(db_utm), "db_regions")
        q_reg = _check_timestamps(q_regions, len(q_utm), "q_regions")
        positives = [pos[db_reg[pos] == q_reg[i]] for i, pos in enumerate(positives)]
    return positives
