"""Turn the ``data_config`` dataset setting into request dicts.

A request is a plain dict ``{"id": str, "prompt": str, "images": [absolute image paths]}``.
Three dataset forms are accepted (see :func:`load_requests`):

- ``"default"``: the text prompts of ``dataset/default_prompt.json`` (a JSON object
  ``{"prompts": [str, ...]}``), repeated to fill the run;
- ``"vision-arena-bench-v0.1"``: a directory holding either ``dataset.jsonl`` or the
  Hugging Face parquet export of the dataset;
- a path ending in ``.jsonl``: one JSON object per line,
  ``{"id"?: str, "prompt": str, "images"?: [paths relative to the file]}``.

Image paths are resolved but not opened: a missing image becomes a per-request error in the
engine, so a bad row never hides the rest of the run.
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_DATASET = "default"
VISION_ARENA_DATASET = "vision-arena-bench-v0.1"
DEFAULT_PROMPT_FILE = Path("dataset") / "default_prompt.json"
VISION_ARENA_JSONL = "dataset.jsonl"
IMAGE_DIR_NAME = ".images"
CACHE_ENV = "QWEN2_5_VL_RAY_CACHE"
ID_COLUMNS = ("question_id", "id")

_ACCEPTED_FORMS = (
    f"'{DEFAULT_DATASET}' (prompts from {DEFAULT_PROMPT_FILE}), "
    f"'{VISION_ARENA_DATASET}' (dataset_dir holding {VISION_ARENA_JSONL} or *.parquet files), "
    "or a path ending in '.jsonl'"
)
_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

Request = dict[str, Any]


class DatasetError(ValueError):
    """A dataset that cannot be turned into requests; the message names the path, row or field."""


def load_requests(
    dataset: str,
    dataset_dir: str,
    batch_size: int,
    world_dp_size: int,
    num_samples: int | None,
    base_dir: Path,
) -> list[Request]:
    """Build the request list for one run.

    Args:
        dataset: ``"default"``, ``"vision-arena-bench-v0.1"`` or a path ending in ``.jsonl``
            (relative to ``base_dir`` unless absolute).
        dataset_dir: directory of the vision-arena data (relative to ``base_dir`` unless absolute);
            unused by the other forms.
        batch_size: requests per batch of one data-parallel group.
        world_dp_size: number of data-parallel groups.
        num_samples: number of requests wanted; ``None`` means one full batch per DP group for
            ``"default"`` and every row for the file-backed forms, which are never repeated.
        base_dir: the working directory that relative paths start from.

    Returns:
        Request dicts ``{"id", "prompt", "images"}`` with unique ids and absolute image paths.

    Raises:
        DatasetError: unknown dataset form, missing file, malformed line or row.
    """
    _check_positive("data_config.batch_size", batch_size)
    _check_positive("world_dp_size", world_dp_size)
    if num_samples is not None:
        _check_positive("data_config.num_samples", num_samples)
    base_dir = Path(base_dir)
    if dataset == DEFAULT_DATASET:
        count = num_samples if num_samples is not None else batch_size * world_dp_size
        return _default_requests(base_dir / DEFAULT_PROMPT_FILE, count)
    if dataset == VISION_ARENA_DATASET:
        return _vision_arena_requests(_resolve(dataset_dir, base_dir), num_samples)
    if isinstance(dataset, str) and dataset.endswith(".jsonl"):
        return _jsonl_requests(_resolve(dataset, base_dir), num_samples)
    raise DatasetError(f"data_config.dataset: unknown dataset {dataset!r}; expected {_ACCEPTED_FORMS}")


def _check_positive(field: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{field} must be a positive integer, got {value!r}")


def _resolve(path: str | os.PathLike[str], base_dir: Path) -> Path:
    p = Path(path).expanduser()
    return (p if p.is_absolute() else base_dir / p).resolve()


# ---------------------------------------------------------------------------------------------
# default prompts
# ---------------------------------------------------------------------------------------------


def _default_requests(prompt_file: Path, count: int) -> list[Request]:
    try:
        data = json.loads(prompt_file.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DatasetError(f"default prompt file not found: {prompt_file}") from e
    except json.JSONDecodeError as e:
        raise DatasetError(f"{prompt_file}: invalid JSON at line {e.lineno}: {e.msg}") from e
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not isinstance(prompts, list) or not prompts:
        raise DatasetError(f"{prompt_file}: expected an object with a non-empty 'prompts' list")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise DatasetError(f"{prompt_file}: prompts[{i}] must be a non-empty string")
    return [{"id": f"default-{i}", "prompt": prompts[i % len(prompts)], "images": []} for i in range(count)]


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def _jsonl_requests(path: Path, num_samples: int | None) -> list[Request]:
    """Read ``{"id"?, "prompt", "images"?}`` lines; ids default to ``<stem>-<line number>``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"dataset file not found: {path}") from e
    except IsADirectoryError as e:
        raise DatasetError(f"dataset path is a directory, expected a .jsonl file: {path}") from e
    requests: list[Request] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if num_samples is not None and len(requests) >= num_samples:
            break
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
        request = _jsonl_row(row, where, f"{path.stem}-{lineno}", path.parent)
        rid = request["id"]
        if rid in seen:
            raise DatasetError(f"{where}: duplicate id {rid!r} (first on line {seen[rid]})")
        seen[rid] = lineno
        requests.append(request)
    if not requests:
        raise DatasetError(f"{path}: no requests (empty file)")
    return requests


def _jsonl_row(row: dict[str, Any], where: str, default_id: str, image_root: Path) -> Request:
    rid = row.get("id", default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise DatasetError(f"{where}: field 'id' must be a non-empty string or integer, got {rid!r}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: field 'prompt' must be a string, got {type(prompt).__name__}")
    images = row.get("images", [])
    if images is None:
        images = []
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise DatasetError(f"{where}: field 'images' must be a list of non-empty path strings")
    return {"id": str(rid), "prompt": prompt, "images": [str(_resolve(p, image_root)) for p in images]}


# ---------------------------------------------------------------------------------------------
# vision-arena-bench-v0.1
# ---------------------------------------------------------------------------------------------


def _vision_arena_requests(dataset_dir: Path, num_samples: int | None) -> list[Request]:
    """Read vision-arena from ``dataset.jsonl`` if present, else from its parquet export."""
    if not dataset_dir.is_dir():
        raise DatasetError(f"data_config.dataset_dir: directory not found: {dataset_dir}")
    jsonl = dataset_dir / VISION_ARENA_JSONL
    if jsonl.is_file():
        return _jsonl_requests(jsonl, num_samples)
    files = sorted(
        p
        for p in dataset_dir.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
    )
    if not files:
        raise DatasetError(
            f"{dataset_dir}: no {VISION_ARENA_JSONL} and no *.parquet files; "
            f"expected the {VISION_ARENA_DATASET} parquet export or a {VISION_ARENA_JSONL}"
        )
    image_dir = _image_dir(dataset_dir)
    requests: list[Request] = []
    seen: set[str] = set()
    for index, (where, row) in enumerate(_parquet_rows(files, num_samples)):
        request = _parquet_row(row, index, where, dataset_dir, image_dir)
        if request["id"] in seen:
            raise DatasetError(f"{where}: duplicate id {request['id']!r}")
        seen.add(request["id"])
        requests.append(request)
    if not requests:
        raise DatasetError(f"{dataset_dir}: the parquet files hold no rows")
    return requests


def _parquet_rows(files: list[Path], limit: int | None) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(location, row)`` across the files in order, reading only the needed columns."""
    import pyarrow.parquet as pq

    emitted = 0
    for path in files:
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several unrelated types for a corrupt file
            raise DatasetError(f"{path}: cannot read parquet file: {e}") from e
        names = set(pf.schema_arrow.names)
        missing = {"turns", "images"} - names
        if missing:
            raise DatasetError(f"{path}: missing column(s) {sorted(missing)}; found {sorted(names)}")
        columns = ["turns", "images"] + [c for c in ID_COLUMNS if c in names][:1]
        row_in_file = 0
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            for row in batch.to_pylist():
                if limit is not None and emitted >= limit:
                    return
                yield f"{path} row {row_in_file}", row
                row_in_file += 1
                emitted += 1


def _parquet_row(row: dict[str, Any], index: int, where: str, dataset_dir: Path, image_dir: Path) -> Request:
    """One vision-arena row as a request, keeping every image of the row in order.

    vLLM's benchmark (``VisionArenaDataset``) sends only the first image of a row; this engine
    sends them all.
    """
    rid = next((row[c] for c in ID_COLUMNS if row.get(c) is not None), index)
    rid = str(rid)
    if not rid:
        raise DatasetError(f"{where}: empty id")
    try:
        prompt = row["turns"][0][0]["content"]
    except (TypeError, IndexError, KeyError) as e:
        raise DatasetError(f"{where}: field 'turns' has no turns[0][0]['content']") from e
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: field turns[0][0]['content'] must be a string, got {prompt!r}")
    images = row.get("images") or []
    if not isinstance(images, list):
        raise DatasetError(f"{where}: field 'images' must be a list of image structs")
    stem = _UNSAFE_NAME_CHARS.sub("_", rid)
    paths: list[str] = []
    for k, image in enumerate(images):
        if not isinstance(image, dict):
            raise DatasetError(f"{where}: field images[{k}] must be a struct with 'bytes' and 'path'")
        paths.append(str(_materialize_image(image, f"{stem}-{k}", dataset_dir, image_dir)))
    return {"id": rid, "prompt": prompt, "images": paths}


def _materialize_image(image: dict[str, Any], name: str, dataset_dir: Path, image_dir: Path) -> Path:
    """Return a file path for one image struct, writing its bytes once under ``image_dir``.

    Without bytes, the struct's own path (resolved against ``dataset_dir``) is returned whether
    or not it exists, or a placeholder naming the row when the struct has no path either.
    """
    data = image.get("bytes")
    src = image.get("path")
    if not data:
        if src:
            return _resolve(src, dataset_dir)
        return image_dir / f"{name}.missing-image"
    target = image_dir / f"{name}.{_image_ext(data, src)}"
    if target.is_file() and target.stat().st_size == len(data):
        return target
    _atomic_write_bytes(target, data)
    return target


def _image_ext(data: bytes, src: str | None) -> str:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format or ""
    except (UnidentifiedImageError, OSError):
        fmt = ""
    if fmt:
        return _PIL_FORMAT_EXT.get(fmt, fmt.lower())
    suffix = Path(src).suffix.lstrip(".").lower() if src else ""
    return suffix or "bin"


def _image_dir(dataset_dir: Path) -> Path:
    """``<dataset_dir>/.images`` when writable, else a per-dataset directory in the user cache."""
    local = dataset_dir / IMAGE_DIR_NAME
    if _writable_dir(local):
        return local
    cache_root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen2_5_vl_ray")
    key = _UNSAFE_NAME_CHARS.sub("_", str(dataset_dir).strip("/"))
    fallback = cache_root / "images" / key
    if _writable_dir(fallback):
        return fallback
    raise DatasetError(f"cannot write extracted images to {local} or {fallback}")


def _writable_dir(path: Path) -> bool:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
