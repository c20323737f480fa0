"""Turn the ``data_config`` dataset setting into request dicts.

A request is a dict of the driver API's request fields (actors.request_fields): ``{"id": str,
"prompt": str, "images": [absolute image paths]}`` or ``{"id", "messages"}``, plus whatever else its
row sets (``max_new_tokens``, ``temperature``, ``top_p``, ``seed``, ``ignore_eos``, ``stop``,
``mm_processor_kwargs``). Three dataset forms are accepted (see :func:`load_requests`):

- ``"default"``: the text prompts of ``dataset/default_prompt.json`` (a JSON object
  ``{"prompts": [str, ...]}``), repeated to fill the run;
- ``"vision-arena-bench-v0.1"``: a directory holding ``dataset.jsonl``, ``dataset.json`` or the
  Hugging Face parquet export of the dataset. Without a ``dataset_dir`` of its own (unset, or the
  default ``dataset/vision-arena-bench-v0.1`` when that does not exist), ``dataset/vision_arena_bench``
  is used, the layout of the original sample;
- a path ending in ``.jsonl`` (one JSON object per line) or ``.json`` (a JSON array of the same
  objects): a request in the driver API's fields, ``{"id"?: str, "prompt": str, "images"?: [paths
  relative to the file], "videos"?: [videos: paths relative to the file, URLs, lists of frame
  paths, or ``{"video", "video_start", "video_end"}``], ...}`` or ``{"id"?, "messages": [...], ...}``
  (local image and video paths in the messages are relative to the file too). A key that is not a
  request field is an error naming the row and the key, never dropped. Vision-arena's own row shape
  is read too (a row with ``turns`` and no ``prompt`` or ``messages``; its other columns are not
  request fields and are ignored): ``question_id`` for the id, ``turns[0][0]["content"]`` for the
  prompt, image entries ``{"path": ...}``.

Image paths are resolved but not opened: a missing image becomes a per-request error in the
engine, so a bad row never hides the rest of the run.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from actors.errors import RequestError
from actors.request_fields import FIELDS, check_field
from cluster.config import DATASET_FILE_SUFFIXES as FILE_SUFFIXES
from cluster.results import atomic_write_bytes

DEFAULT_DATASET = "default"
VISION_ARENA_DATASET = "vision-arena-bench-v0.1"
DEFAULT_PROMPT_FILE = Path("dataset") / "default_prompt.json"
VISION_ARENA_FILES = ("dataset.jsonl", "dataset.json")
# Where vision-arena is looked for when dataset_dir is unset or left at its default: the original
# sample's folder first, then the config's default.
VISION_ARENA_DIRS = (Path("dataset") / "vision_arena_bench", Path("dataset") / "vision-arena-bench-v0.1")
IMAGE_DIR_NAME = ".images"
CACHE_ENV = "QWEN2_5_VL_RAY_CACHE"
ID_COLUMNS = ("question_id", "id")
# Request fields a file row sets through the loader's own rules; the others are copied as the row gives them.
_SHAPED_FIELDS = ("id", "prompt", "images", "videos", "messages")
# Image sources that are not paths relative to the file.
_URL_PREFIXES = ("data:", "file://", "http://", "https://")

_ACCEPTED_FORMS = (
    f"'{DEFAULT_DATASET}' (prompts from {DEFAULT_PROMPT_FILE}), "
    f"'{VISION_ARENA_DATASET}' (dataset_dir holding {' or '.join(VISION_ARENA_FILES)} or *.parquet files), "
    "or a path ending in '.jsonl' or '.json'"
)
_PIL_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff"}
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")

Request = dict[str, Any]


class DatasetError(ValueError):
    """A dataset that cannot be turned into requests; the message names the path, row or field."""


def load_requests(
    dataset: str,
    dataset_dir: str | None,
    batch_size: int,
    world_dp_size: int,
    num_samples: int | None,
    base_dir: Path,
) -> list[Request]:
    """Build the request list for one run.

    Args:
        dataset: ``"default"``, ``"vision-arena-bench-v0.1"`` or a path ending in ``.jsonl`` or
            ``.json`` (relative to ``base_dir`` unless absolute).
        dataset_dir: directory of the vision-arena data (relative to ``base_dir`` unless absolute);
            empty or None looks in :data:`VISION_ARENA_DIRS`; unused by the other forms.
        batch_size: requests per batch of one data-parallel group.
        world_dp_size: number of data-parallel groups.
        num_samples: number of requests wanted; ``None`` means one full batch per DP group for
            ``"default"`` and every row for the file-backed forms, which are never repeated.
        base_dir: the working directory that relative paths start from.

    Returns:
        Request dicts ``{"id", "prompt", "images"}`` or ``{"id", "messages"}``, plus the other request
        fields a row sets, with unique ids and absolute image paths.

    Raises:
        DatasetError: unknown dataset form, missing file, malformed line or row, a row's key that is
            not a request field, a field's value of the wrong type or range.
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
        return _vision_arena_requests(_vision_arena_dir(dataset_dir, base_dir), num_samples)
    if isinstance(dataset, str) and dataset.endswith(FILE_SUFFIXES):
        return _file_requests(_resolve(dataset, base_dir), num_samples)
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
# JSONL and JSON files
# ---------------------------------------------------------------------------------------------


def _file_requests(path: Path, num_samples: int | None) -> list[Request]:
    """Requests from a ``.jsonl`` or ``.json`` file; ids default to ``<stem>-<line or item number>``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise DatasetError(f"dataset file not found: {path}") from e
    except IsADirectoryError as e:
        raise DatasetError(f"dataset path is a directory, expected a {' or '.join(FILE_SUFFIXES)} file: {path}") from e
    rows = _json_rows(path, text) if path.suffix == ".json" else _jsonl_rows(path, text)
    requests: list[Request] = []
    seen: dict[str, str] = {}
    for where, number, row in rows:
        if num_samples is not None and len(requests) >= num_samples:
            break
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
        request = _file_row(row, where, f"{path.stem}-{number}", path.parent)
        rid = request["id"]
        if rid in seen:
            raise DatasetError(f"{where}: duplicate id {rid!r} (first at {seen[rid]})")
        seen[rid] = where.rpartition(", ")[2]
        requests.append(request)
    if not requests:
        raise DatasetError(f"{path}: no requests (empty file)")
    return requests


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[str, int, Any]]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {lineno}"
        try:
            yield where, lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, int, Any]]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
    if not isinstance(data, list):
        raise DatasetError(f"{path}: expected a JSON array of request objects, got {type(data).__name__}")
    for index, row in enumerate(data):
        yield f"{path}, item {index}", index, row


def _file_row(row: dict[str, Any], where: str, default_id: str, image_root: Path) -> Request:
    """One row as a request: its request fields, or vision-arena's ``question_id``, ``turns`` and ``images``."""
    arena = "turns" in row and "prompt" not in row and "messages" not in row
    unknown = [key for key in row if key not in FIELDS]
    if unknown and not arena:
        raise DatasetError(
            f"{where}: unknown field {unknown[0]!r}; a request row takes {', '.join(FIELDS)} "
            "(or vision-arena's question_id, turns and images)"
        )
    rid = next((row[c] for c in ("id", "question_id") if c in row), default_id)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid) == "":
        raise DatasetError(f"{where}: field 'id' must be a non-empty string or integer, got {rid!r}")
    request: Request = {"id": str(rid)}
    if row.get("messages") is not None:
        for key in ("prompt", "images", "videos"):
            if row.get(key) is not None:
                raise DatasetError(f"{where}: give 'messages' or '{key}', not both")
        request["messages"] = _message_images(_checked(row, "messages", where), image_root)
    else:
        request["prompt"] = _turns_prompt(row, where) if arena else row.get("prompt")
        if not isinstance(request["prompt"], str):
            raise DatasetError(f"{where}: field 'prompt' must be a string, got {type(request['prompt']).__name__}")
        request["images"] = _image_paths(row.get("images") or [], where, image_root)
        if row.get("videos") is not None:
            request["videos"] = _videos(_checked(row, "videos", where), image_root)
    for name in FIELDS:
        if name not in _SHAPED_FIELDS and row.get(name) is not None:
            request[name] = _checked(row, name, where)
    return request


def _checked(row: dict[str, Any], name: str, where: str) -> Any:
    """The row's value of the request field `name`, checked by the field's own rule."""
    try:
        check_field(name, row[name])
    except RequestError as e:
        raise DatasetError(f"{where}: {e}") from None
    return row[name]


def _image_paths(images: Any, where: str, image_root: Path) -> list[str]:
    if not isinstance(images, list):
        raise DatasetError(f"{where}: field 'images' must be a list of image paths")
    paths = []
    for k, image in enumerate(images):
        src = image.get("path") if isinstance(image, dict) else image
        if not isinstance(src, str) or not src:
            raise DatasetError(f'{where}: field images[{k}] must be a non-empty path string or {{"path": ...}}')
        paths.append(str(_resolve(src, image_root)))
    return paths


def _video(video: Any, image_root: Path) -> Any:
    """A video entry with its local paths (the file's, or each frame's) made absolute against `image_root`."""
    if isinstance(video, dict):
        return {**video, "video": _video(video.get("video"), image_root)}
    if isinstance(video, list):
        return [str(_resolve(frame, image_root)) if _is_local(frame) else frame for frame in video]
    return str(_resolve(video, image_root)) if _is_local(video) else video


def _videos(videos: list[Any], image_root: Path) -> list[Any]:
    """`videos` with local paths made absolute; malformed entries stay as they are (the engine names them)."""
    return [_video(video, image_root) for video in videos]


def _message_images(messages: list[Any], image_root: Path) -> list[Any]:
    """`messages` with each image part's local path made absolute against `image_root`; URLs, bytes and
    malformed parts stay as they are (the engine checks the messages when it prepares the request)."""
    out = []
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            message = {**message, "content": [_part_image(part, image_root) for part in content]}
        out.append(message)
    return out


def _part_image(part: Any, image_root: Path) -> Any:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "image" and _is_local(part.get("image")):
        return {**part, "image": str(_resolve(part["image"], image_root))}
    if kind == "video":
        return {**part, "video": _video(part.get("video"), image_root)}
    if kind == "video_url":
        url = part.get("video_url")
        if isinstance(url, dict) and _is_local(url.get("url")):
            return {**part, "video_url": {**url, "url": str(_resolve(url["url"], image_root))}}
        return part
    if kind == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict) and _is_local(url.get("url")):
            return {**part, "image_url": {**url, "url": str(_resolve(url["url"], image_root))}}
        if _is_local(url):
            return {**part, "image_url": str(_resolve(url, image_root))}
    return part


def _is_local(source: Any) -> bool:
    return isinstance(source, str) and bool(source) and not source.startswith(_URL_PREFIXES)


# ---------------------------------------------------------------------------------------------
# vision-arena-bench-v0.1
# ---------------------------------------------------------------------------------------------


def _vision_arena_dir(dataset_dir: str | None, base_dir: Path) -> Path:
    """The configured directory when it exists; unset or left at the default, the first of VISION_ARENA_DIRS found."""
    configured = _resolve(dataset_dir, base_dir) if dataset_dir else None
    if configured is not None and configured.is_dir():
        return configured
    if not dataset_dir or Path(dataset_dir) in VISION_ARENA_DIRS:
        for candidate in VISION_ARENA_DIRS:
            if (base_dir / candidate).is_dir():
                return (base_dir / candidate).resolve()
        looked = ", ".join(str(base_dir / c) for c in VISION_ARENA_DIRS)
        raise DatasetError(f"data_config.dataset_dir: no {VISION_ARENA_DATASET} directory; looked in {looked}")
    raise DatasetError(f"data_config.dataset_dir: directory not found: {configured}")


def _vision_arena_requests(dataset_dir: Path, num_samples: int | None) -> list[Request]:
    """Read vision-arena from ``dataset.jsonl`` or ``dataset.json`` if present, else from its parquet export."""
    for name in VISION_ARENA_FILES:
        if (dataset_dir / name).is_file():
            return _file_requests(dataset_dir / name, num_samples)
    files = sorted(
        p
        for p in dataset_dir.rglob("*.parquet")
        if not any(part.startswith(".") for part in p.relative_to(dataset_dir).parts)
    )
    if not files:
        raise DatasetError(
            f"{dataset_dir}: no {' or '.join(VISION_ARENA_FILES)} and no *.parquet files; "
            f"expected the {VISION_ARENA_DATASET} parquet export or a {' or '.join(VISION_ARENA_FILES)}"
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


def _turns_prompt(row: dict[str, Any], where: str) -> str:
    """Vision-arena's prompt: the first message of the first turn."""
    try:
        prompt = row["turns"][0][0]["content"]
    except (TypeError, IndexError, KeyError) as e:
        raise DatasetError(f"{where}: field 'turns' has no turns[0][0]['content']") from e
    if not isinstance(prompt, str):
        raise DatasetError(f"{where}: field turns[0][0]['content'] must be a string, got {prompt!r}")
    return prompt


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
    prompt = _turns_prompt(row, where)
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
    atomic_write_bytes(target, data)
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
