"""The owner's key file: what a later audit needs to re-create the marks (plain JSON, nothing in it
is executed)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..store import StageError, file_sha256, read_json

KEY_NAME = "membership-key.json"
KEY_FORMAT = "mtrack-key/2"  # 2: a design, every original listed, only published ones marked


def load_key(key_path: str | Path, marked_folder: str | Path) -> dict[str, Any]:
    """Read a key (plain JSON, nothing executed) and check it was made for `marked_folder`."""
    key = read_json(key_path)
    if key.get("format") != KEY_FORMAT:
        raise StageError(f"{key_path}: not a {KEY_FORMAT} key file")
    for entry in (key["files"][i] for i in key["published"]):
        path = Path(marked_folder) / entry["marked"]
        if not path.is_file() or file_sha256(path) != entry["marked_sha256"]:
            raise StageError(f"{key_path}: made for another folder ({path} is missing or differs)")
    return key
