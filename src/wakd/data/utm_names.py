"""File names of the UTM folder format, as VPR-datasets-downloader writes them.

    @utm_e@utm_n@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg

Only easting and northing are required; the other fields may be empty. Coordinates of
different UTM zones are not comparable (each zone has its own origin), so a split whose
names carry zones must stay within one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from wakd.data.netvlad_mat import DatasetFormatError

# The UTM zone of each NetVLAD-format dataset, whose .mat files give eastings and northings only.
DATASET_ZONES = {"pitts": "17T", "tokyo247": "54S", "tokyotm": "54S"}
FIELDS = (
    "utm_east", "utm_north", "utm_zone", "utm_letter", "lat", "lon", "pano_id", "tile_num",
    "heading", "pitch", "roll", "height", "timestamp", "note",
)


@dataclass(frozen=True)
class UtmName:
    east: float
    north: float
    zone: str | None  # e.g. '17T'; None where the name leaves zone and letter empty


def parse_utm_name(path: str | Path) -> UtmName:
    """Easting, northing and zone of an image from its file name (the folder path is ignored)."""
    parts = Path(path).name.split("@")
    try:
        east, north = float(parts[1]), float(parts[2])
    except (IndexError, ValueError):
        raise DatasetFormatError(
            f"{path}: name does not start with '@<utm_east>@<utm_north>@' (UTM folder format: "
            "@utm_e@utm_n@zone@letter@lat@lon@pano@tile@heading@pitch@roll@height@timestamp@note@.jpg)"
        ) from None
    # A zone only where both fields look like one ('17', 'T') and the letter's field is closed
    # by '@': shorter names such as '@e@n@note@.jpg' carry none.
    zone = None
    if len(parts) > 5 and re.fullmatch(r"\d{1,2}", parts[3]) and re.fullmatch(r"[A-Za-z]", parts[4]):
        zone = parts[3] + parts[4].upper()
    return UtmName(east, north, zone)


def format_utm_name(east: float, north: float, zone: str = "", suffix: str = ".jpg", **fields: object) -> str:
    """A file name in the downloader's layout; ``zone`` like '17T', other fields by name
    (``pano_id``, ``heading``, ``note``, ...), each free of '@' and '/'."""
    unknown = set(fields) - set(FIELDS[4:])
    if unknown:
        raise ValueError(f"unknown UTM name field(s) {sorted(unknown)}; choose from {FIELDS[4:]}")
    if zone and not re.fullmatch(r"\d{1,2}[C-X]", zone):
        raise ValueError(f"UTM zone {zone!r}: expected a number and a latitude band, e.g. '17T'")
    number, letter = (zone[:-1], zone[-1]) if zone else ("", "")
    values = [f"{east:.6f}", f"{north:.6f}", number, letter] + [str(fields.get(f, "")) for f in FIELDS[4:]]
    bad = [v for v in values if "@" in v or "/" in v]
    if bad:
        raise ValueError(f"UTM name fields may not contain '@' or '/': {bad}")
    return "@" + "@".join(values) + "@" + suffix


def check_one_zone(paths: list[str], zones: list[str | None]) -> str | None:
    """The one UTM zone of a split (None where no name gives one), or an error naming the
    first file in another zone."""
    named = [(p, z) for p, z in zip(paths, zones, strict=True) if z is not None]
    if not named:
        return None
    first_path, first_zone = named[0]
    for path, zone in named:
        if zone != first_zone:
            raise DatasetFormatError(
                f"{path}: UTM zone {zone}, but {first_path} is in zone {first_zone}; eastings and "
                "northings of different zones cannot be compared: keep one zone per split "
                "(reproject, or split the dataset)"
            )
    return first_zone
