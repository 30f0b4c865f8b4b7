"""Files written whole, and hashed.

SageMaker uploads output/ and model/ as they are when the job ends, and a Debugger rule or a user
may read output/data while the job writes it: a file is written beside its place and renamed
into it (a rename on one file system), so a reader finds the old file, the new one or none, never
half of one. JSON is written strict: NaN and the infinities, which JSON has no numbers for, are
written as the strings "nan", "inf" and "-inf".
"""

import hashlib
import json
import math
import os


def write_bytes(path, data):
    """Writes `data` to `path` whole: into path.tmp, then renamed; the folder is created."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


def write_json(value, path, *, indent=2, default=None):
    """Writes `value` as strict JSON (UTF-8, non-ASCII kept) to `path` whole; `default` turns
    values json cannot encode into ones it can (e.g. str)."""
    text = json.dumps(strict_json(value), indent=indent, default=default, ensure_ascii=False, allow_nan=False)
    write_bytes(path, text.encode("utf-8"))


def strict_json(value):
    """`value` with NaN and infinities as the strings "nan", "inf", "-inf" (JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
