"""Tests for cluster.datasets: default prompts, JSONL and JSON files, the vision-arena layouts, the shipped sample."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from actors.request_fields import check_request_fields
from cluster.datasets import DatasetError, load_requests

REPO_ROOT = Path(__file__).resolve().parents[1]
VISION_ARENA = "vision-arena-bench-v0.1"

TURNS_TYPE = pa.list_(pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())])))
IMAGES_TYPE = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _image_bytes(mode: str, size: tuple[int, int], fmt: str, color: int | tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format=fmt)
    return buf.getvalue()


def _turns(text: str) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": text}], [{"role": "assistant", "content": "ignored"}]]


@pytest.fixture()
def arena_images() -> dict[str, bytes]:
    return {
        "rgb_png": _image_bytes("RGB", (40, 30), "PNG", (255, 0, 0)),
        "rgb_jpeg": _image_bytes("RGB", (64, 48), "JPEG", (0, 128, 255)),
        "second_png": _image_bytes("RGB", (20, 70), "PNG", (0, 255, 0)),
        "gray_png": _image_bytes("L", (33, 17), "PNG", 128),
        "cmyk_jpeg": _image_bytes("CMYK", (50, 50), "JPEG", (0, 255, 255, 0)),
    }


def _arena_table(images: dict[str, bytes]) -> pa.Table:
    rows = [
        ("q-one", "Describe the red image.", [{"bytes": images["rgb_png"], "path": "a.png"}]),
        (
            "q-two",
            "Compare the two images.",
            [{"bytes": images["rgb_jpeg"], "path": "b.jpg"}, {"bytes": images["second_png"], "path": None}],
        ),
        ("q-gray", "What shade of gray is this?", [{"bytes": images["gray_png"], "path": "gray.png"}]),
        ("q-cmyk", "Which colour is this CMYK image?", [{"bytes": images["cmyk_jpeg"], "path": "c.jpg"}]),
        ("q-lost", "This image is missing.", [{"bytes": None, "path": "does/not/exist.png"}]),
        ("q-blank", "This image has neither bytes nor path.", [{"bytes": None, "path": None}]),
    ]
    return pa.table(
        {
            "question_id": pa.array([r[0] for r in rows], pa.string()),
            "turns": pa.array([_turns(r[1]) for r in rows], TURNS_TYPE),
            "images": pa.array([r[2] for r in rows], IMAGES_TYPE),
            "num_turns": pa.array([1] * len(rows), pa.int64()),
        }
    )


@pytest.fixture()
def arena_dir(tmp_path: Path, arena_images: dict[str, bytes]) -> Path:
    root = tmp_path / "vision-arena"
    (root / "data").mkdir(parents=True)
    pq.write_table(_arena_table(arena_images), root / "data" / "train-00000-of-00001.parquet")
    return root


def _load(dataset: str, base_dir: Path, dataset_dir: str = "", num_samples: int | None = None) -> list[dict]:
    return load_requests(dataset, dataset_dir, 2, 3, num_samples, base_dir)


# ---------------------------------------------------------------------------------------------
# default
# ---------------------------------------------------------------------------------------------


def test_default_fills_one_batch_per_dp_group() -> None:
    prompts = json.loads((REPO_ROOT / "dataset" / "default_prompt.json").read_text())["prompts"]
    requests = load_requests("default", "", batch_size=4, world_dp_size=2, num_samples=None, base_dir=REPO_ROOT)
    assert len(requests) == 8
    assert [r["id"] for r in requests] == [f"default-{i}" for i in range(8)]
    assert [r["prompt"] for r in requests] == prompts[:8]
    assert all(r["images"] == [] for r in requests)


def test_default_num_samples_overrides_and_repeats(tmp_path: Path) -> None:
    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "default_prompt.json").write_text(json.dumps({"prompts": ["a", "b", "c"]}))
    requests = _load("default", tmp_path, num_samples=7)
    assert len(requests) == 7
    assert [r["prompt"] for r in requests] == ["a", "b", "c", "a", "b", "c", "a"]
    assert len({r["id"] for r in requests}) == 7


def test_default_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="default_prompt.json"):
        _load("default", tmp_path)


def test_shipped_prompt_file_is_varied() -> None:
    prompts = json.loads((REPO_ROOT / "dataset" / "default_prompt.json").read_text())["prompts"]
    assert len(prompts) >= 10
    assert len(set(prompts)) == len(prompts)


@pytest.mark.parametrize(("field", "kwargs"), [("batch_size", {"batch_size": 0}), ("num_samples", {"num_samples": 0})])
def test_rejects_non_positive_sizes(field: str, kwargs: dict[str, int]) -> None:
    args = {"batch_size": 2, "world_dp_size": 1, "num_samples": None} | kwargs
    with pytest.raises(DatasetError, match=field):
        load_requests("default", "", base_dir=REPO_ROOT, **args)


# ---------------------------------------------------------------------------------------------
# JSONL
# ---------------------------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_resolves_image_paths_and_default_ids(tmp_path: Path) -> None:
    absolute = tmp_path / "elsewhere" / "x.png"
    _write_lines(
        tmp_path / "data" / "reqs.jsonl",
        [
            json.dumps({"id": "first", "prompt": "p0", "images": ["img/a.png", "../b.jpg"]}),
            "",
            json.dumps({"prompt": "p1", "images": [str(absolute)]}),
            json.dumps({"prompt": "p2"}),
        ],
    )
    requests = _load("data/reqs.jsonl", tmp_path)
    assert [r["id"] for r in requests] == ["first", "reqs-3", "reqs-4"]
    assert [r["prompt"] for r in requests] == ["p0", "p1", "p2"]
    assert requests[0]["images"] == [str(tmp_path / "data" / "img" / "a.png"), str(tmp_path / "b.jpg")]
    assert requests[1]["images"] == [str(absolute)]
    assert requests[2]["images"] == []
    assert all(Path(p).is_absolute() for r in requests for p in r["images"])


def test_jsonl_absolute_path_and_num_samples(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "r.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(5)])
    requests = _load(str(path), Path("/nonexistent-base"), num_samples=2)
    assert [r["prompt"] for r in requests] == ["p0", "p1"]


def test_jsonl_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok"}), "", '{"prompt": "oops"'])
    with pytest.raises(DatasetError) as excinfo:
        _load("bad.jsonl", tmp_path)
    assert str(path) in str(excinfo.value)
    assert "line 3" in str(excinfo.value)


def test_jsonl_bad_field_names_field(tmp_path: Path) -> None:
    _write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "images": "a.png"})])
    with pytest.raises(DatasetError, match=r"line 1.*'images'"):
        _load("bad.jsonl", tmp_path)


def test_jsonl_duplicate_ids(tmp_path: Path) -> None:
    _write_lines(tmp_path / "dup.jsonl", [json.dumps({"id": "x", "prompt": "a"})] * 2)
    with pytest.raises(DatasetError, match="duplicate id 'x'"):
        _load("dup.jsonl", tmp_path)


def test_jsonl_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as excinfo:
        _load("nope/missing.jsonl", tmp_path)
    assert str(tmp_path / "nope" / "missing.jsonl") in str(excinfo.value)


def test_unknown_dataset_lists_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        _load("coco", tmp_path)
    message = str(excinfo.value)
    assert "'coco'" in message
    for form in ("default", VISION_ARENA, "'.jsonl'", "'.json'"):
        assert form in message


def test_jsonl_passes_mm_processor_kwargs_through(tmp_path: Path) -> None:
    kwargs = {"min_pixels": 3136, "max_pixels": 12544}
    _write_lines(
        tmp_path / "r.jsonl",
        [
            json.dumps({"id": "a", "prompt": "p", "images": ["x.png"], "mm_processor_kwargs": kwargs}),
            json.dumps({"id": "b", "prompt": "q"}),
        ],
    )
    a, b = _load("r.jsonl", tmp_path)
    assert a["mm_processor_kwargs"] == kwargs
    assert "mm_processor_kwargs" not in b


def test_jsonl_bad_mm_processor_kwargs(tmp_path: Path) -> None:
    _write_lines(tmp_path / "r.jsonl", [json.dumps({"prompt": "p", "mm_processor_kwargs": [1]})])
    with pytest.raises(DatasetError, match=r"line 1.*'mm_processor_kwargs'"):
        _load("r.jsonl", tmp_path)


def test_json_array_like_jsonl(tmp_path: Path) -> None:
    rows = [
        {"id": "first", "prompt": "p0", "images": ["img/a.png"], "mm_processor_kwargs": {"max_pixels": 12544}},
        {"prompt": "p1"},
        {"prompt": "p2", "images": []},
    ]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "reqs.json").write_text(json.dumps(rows, indent=2))
    requests = _load("data/reqs.json", tmp_path)
    assert requests == [
        {
            "id": "first",
            "prompt": "p0",
            "images": [str(tmp_path / "data" / "img" / "a.png")],
            "mm_processor_kwargs": {"max_pixels": 12544},
        },
        {"id": "reqs-1", "prompt": "p1", "images": []},
        {"id": "reqs-2", "prompt": "p2", "images": []},
    ]
    assert [r["id"] for r in _load("data/reqs.json", tmp_path, num_samples=2)] == ["first", "reqs-1"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"prompt": "an object, not an array"}', "expected a JSON array"),
        ('[{"prompt": "ok"},', "malformed JSON at line 1"),
        ('[{"prompt": "ok"}, "text"]', "item 1: expected a JSON object"),
        ('[{"id": "x", "prompt": "a"}, {"id": "x", "prompt": "b"}]', "item 1: duplicate id 'x' \\(first at item 0\\)"),
        ("[]", "no requests"),
    ],
)
def test_json_errors_name_file_and_item(tmp_path: Path, content: str, expected: str) -> None:
    (tmp_path / "bad.json").write_text(content)
    with pytest.raises(DatasetError, match=expected) as excinfo:
        _load("bad.json", tmp_path)
    assert str(tmp_path / "bad.json") in str(excinfo.value)


def test_rows_in_vision_arena_shape(tmp_path: Path) -> None:
    row = {"question_id": "q1", "turns": _turns("What is this?"), "images": [{"path": "imgs/1.png"}, "imgs/2.png"]}
    _write_lines(tmp_path / "arena.jsonl", [json.dumps(row)])
    assert _load("arena.jsonl", tmp_path) == [
        {"id": "q1", "prompt": "What is this?", "images": [str(tmp_path / "imgs" / n) for n in ("1.png", "2.png")]}
    ]
    _write_lines(tmp_path / "bad.jsonl", [json.dumps({"question_id": 7, "turns": []})])
    with pytest.raises(DatasetError, match=r"line 1.*turns"):
        _load("bad.jsonl", tmp_path)
    _write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "p", "images": [{"bytes": "..."}]})])
    with pytest.raises(DatasetError, match=r"images\[0\]"):
        _load("bad.jsonl", tmp_path)


# Every per-request field the driver API takes besides id, prompt and images.
CARRIED = {
    "stop": ["\n", "END"],
    "max_new_tokens": 16,
    "temperature": 0.7,
    "top_p": 0.9,
    "seed": 11,
    "n": 3,
    "ignore_eos": True,
    "mm_processor_kwargs": {"max_pixels": 12544},
}


@pytest.mark.parametrize("field", sorted(CARRIED))
def test_jsonl_carries_each_request_field(tmp_path: Path, field: str) -> None:
    _write_lines(
        tmp_path / "r.jsonl",
        [json.dumps({"id": "a", "prompt": "p", field: CARRIED[field]}), json.dumps({"id": "b", "prompt": "q"})],
    )
    a, b = _load("r.jsonl", tmp_path)
    assert a == {"id": "a", "prompt": "p", "images": [], field: CARRIED[field]}
    assert b == {"id": "b", "prompt": "q", "images": []}
    check_request_fields(a)  # what the driver API takes


def test_json_and_vision_arena_rows_carry_request_fields(tmp_path: Path) -> None:
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": "p", **CARRIED}]))
    assert _load("r.json", tmp_path) == [{"id": "r-0", "prompt": "p", "images": [], **CARRIED}]
    arena = {"question_id": "q1", "turns": _turns("What?"), "category": "ocr", "num_turns": 1, "max_new_tokens": 4}
    _write_lines(tmp_path / "arena.jsonl", [json.dumps(arena)])
    assert _load("arena.jsonl", tmp_path) == [{"id": "q1", "prompt": "What?", "images": [], "max_new_tokens": 4}]


@pytest.mark.parametrize("field", ["max_tokens", "temprature", "question_id", "category"])
def test_jsonl_unknown_field_names_row_and_field(tmp_path: Path, field: str) -> None:
    path = _write_lines(
        tmp_path / "r.jsonl", [json.dumps({"id": "a", "prompt": "p"}), json.dumps({"prompt": "q", field: 1})]
    )
    with pytest.raises(DatasetError, match=rf"line 2: unknown field '{field}'") as excinfo:
        _load("r.jsonl", tmp_path)
    assert str(path) in str(excinfo.value) and "max_new_tokens" in str(excinfo.value)
    (tmp_path / "r.json").write_text(json.dumps([{"prompt": "p"}, {"prompt": "q", field: 1}]))
    with pytest.raises(DatasetError, match=rf"item 1: unknown field '{field}'"):
        _load("r.json", tmp_path)


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "p", "temperature": -1}, "temperature=-1 must be >= 0"),
        ({"prompt": "p", "max_new_tokens": "16"}, "'max_new_tokens' must be an integer"),
        ({"prompt": "p", "stop": ["a"] * 5}, "at most 4 stop strings"),
        ({"prompt": "p", "ignore_eos": "yes"}, "'ignore_eos' must be true or false"),
        ({"messages": [{"role": "user", "content": "hi"}], "prompt": "p"}, "give 'messages' or 'prompt'"),
        ({"messages": "hi"}, "'messages' must be a list"),
    ],
)
def test_jsonl_bad_request_field_names_row(tmp_path: Path, row: dict, expected: str) -> None:
    _write_lines(tmp_path / "r.jsonl", [json.dumps(row)])
    with pytest.raises(DatasetError, match=rf"line 1: .*{expected}"):
        _load("r.jsonl", tmp_path)


def test_jsonl_messages_row_resolves_local_images(tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "img/a.png"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/b.png"}},
                {"type": "image", "image": "c.png"},
                {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
                {"type": "text", "text": "Compare them."},
            ],
        },
    ]
    _write_lines(tmp_path / "data" / "r.jsonl", [json.dumps({"id": "m", "messages": messages, "seed": 1})])
    [request] = _load("data/r.jsonl", tmp_path)
    parts = request["messages"][1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": str(tmp_path / "data" / "img" / "a.png")}}
    assert (
        parts[1:]
        == messages[1]["content"][1:2]
        + [{"type": "image", "image": str(tmp_path / "data" / "c.png")}]
        + messages[1]["content"][3:]
    )
    assert request == {"id": "m", "messages": [messages[0], {"role": "user", "content": parts}], "seed": 1}
    check_request_fields(request)


# ---------------------------------------------------------------------------------------------
# the shipped sample
# ---------------------------------------------------------------------------------------------


def test_shipped_sample_mixes_images_and_text() -> None:
    requests = load_requests(
        "dataset/sample_vl.jsonl", "", batch_size=4, world_dp_size=1, num_samples=None, base_dir=REPO_ROOT
    )
    with_images = [r for r in requests if r["images"]]
    assert len(with_images) >= 4 and len(requests) - len(with_images) >= 2
    assert any(len(r["images"]) > 1 for r in requests)
    assert any("mm_processor_kwargs" in r for r in requests)
    for path in {p for r in with_images for p in r["images"]}:
        assert Path(path).is_relative_to(REPO_ROOT / "dataset" / "images")
        with Image.open(path) as im:
            im.verify()
        assert Path(path).stat().st_size < 8192


def test_sample_images_are_what_the_script_draws(tmp_path: Path) -> None:
    import numpy as np

    spec = importlib.util.spec_from_file_location("make_sample_images", REPO_ROOT / "dataset" / "make_sample_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    names = sorted(script.IMAGES)
    script.main(tmp_path)
    shipped = sorted(p.name for p in (REPO_ROOT / "dataset" / "images").iterdir())
    assert shipped == names
    for name in names:
        with Image.open(tmp_path / name) as drawn, Image.open(REPO_ROOT / "dataset" / "images" / name) as ours:
            assert np.array_equal(np.asarray(drawn), np.asarray(ours)), name


# ---------------------------------------------------------------------------------------------
# vision-arena-bench-v0.1
# ---------------------------------------------------------------------------------------------


def test_arena_parquet_rows(arena_dir: Path, arena_images: dict[str, bytes]) -> None:
    requests = _load(VISION_ARENA, arena_dir.parent, dataset_dir=arena_dir.name)
    assert [r["id"] for r in requests] == ["q-one", "q-two", "q-gray", "q-cmyk", "q-lost", "q-blank"]
    assert requests[0]["prompt"] == "Describe the red image."
    assert [len(r["images"]) for r in requests] == [1, 2, 1, 1, 1, 1]

    def read(path: str) -> bytes:
        assert Path(path).is_absolute()
        assert Path(path).parent == arena_dir / ".images"
        return Path(path).read_bytes()

    assert read(requests[0]["images"][0]) == arena_images["rgb_png"]
    assert [read(p) for p in requests[1]["images"]] == [arena_images["rgb_jpeg"], arena_images["second_png"]]
    assert [Path(p).suffix for p in requests[1]["images"]] == [".jpg", ".png"]
    assert Path(requests[1]["images"][0]).name == "q-two-0.jpg"

    with Image.open(requests[2]["images"][0]) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (33, 17))
    with Image.open(requests[3]["images"][0]) as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "CMYK", (50, 50))

    lost = Path(requests[4]["images"][0])
    assert lost == arena_dir / "does" / "not" / "exist.png"
    assert not lost.exists()
    blank = Path(requests[5]["images"][0])
    assert "q-blank" in blank.name
    assert not blank.exists()


def test_arena_images_written_once(arena_dir: Path) -> None:
    first = _load(VISION_ARENA, arena_dir.parent, dataset_dir=str(arena_dir))
    paths = [Path(p) for r in first[:4] for p in r["images"]]
    mtimes = [p.stat().st_mtime_ns for p in paths]
    second = _load(VISION_ARENA, arena_dir.parent, dataset_dir=str(arena_dir))
    assert second == first
    assert [p.stat().st_mtime_ns for p in paths] == mtimes
    assert not [p for p in (arena_dir / ".images").iterdir() if p.name.endswith(".tmp")]


def test_arena_cache_fallback_when_dataset_dir_not_writable(
    arena_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arena_images: dict[str, bytes]
) -> None:
    (arena_dir / ".images").write_text("a file where the image directory would go")
    monkeypatch.setenv("QWEN2_5_VL_RAY_CACHE", str(tmp_path / "cache"))
    requests = _load(VISION_ARENA, arena_dir.parent, dataset_dir=arena_dir.name, num_samples=1)
    path = Path(requests[0]["images"][0])
    assert path.is_relative_to(tmp_path / "cache")
    assert path.read_bytes() == arena_images["rgb_png"]


def test_arena_num_samples_limits_rows(arena_dir: Path) -> None:
    requests = _load(VISION_ARENA, arena_dir.parent, dataset_dir=arena_dir.name, num_samples=2)
    assert [r["id"] for r in requests] == ["q-one", "q-two"]


def test_arena_multiple_files_sorted_and_row_index_ids(tmp_path: Path, arena_images: dict[str, bytes]) -> None:
    table = _arena_table(arena_images).drop_columns(["question_id"])
    root = tmp_path / "arena"
    (root / "data").mkdir(parents=True)
    pq.write_table(table.slice(3), root / "data" / "train-00001-of-00002.parquet")
    pq.write_table(table.slice(0, 3), root / "data" / "train-00000-of-00002.parquet")
    requests = _load(VISION_ARENA, tmp_path, dataset_dir="arena", num_samples=5)
    assert [r["id"] for r in requests] == ["0", "1", "2", "3", "4"]
    assert requests[3]["prompt"] == "Which colour is this CMYK image?"


def test_arena_bad_turns_names_row(tmp_path: Path) -> None:
    root = tmp_path / "arena"
    root.mkdir()
    table = pa.table(
        {
            "id": pa.array(["r0", "r1"]),
            "turns": pa.array([_turns("fine"), []], TURNS_TYPE),
            "images": pa.array([[], []], IMAGES_TYPE),
        }
    )
    pq.write_table(table, root / "part.parquet")
    with pytest.raises(DatasetError, match=r"part\.parquet row 1.*turns"):
        _load(VISION_ARENA, tmp_path, dataset_dir="arena")


def test_arena_jsonl_layout(tmp_path: Path) -> None:
    root = tmp_path / "arena"
    _write_lines(root / "dataset.jsonl", [json.dumps({"id": "a", "prompt": "p", "images": ["imgs/1.png"]})])
    requests = _load(VISION_ARENA, tmp_path, dataset_dir="arena")
    assert requests == [{"id": "a", "prompt": "p", "images": [str(root / "imgs" / "1.png")]}]


def test_arena_missing_or_empty_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="directory not found"):
        _load(VISION_ARENA, tmp_path, dataset_dir="absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"\*\.parquet"):
        _load(VISION_ARENA, tmp_path, dataset_dir="empty")


def test_arena_json_layout(tmp_path: Path) -> None:
    root = tmp_path / "arena"
    root.mkdir()
    (root / "dataset.json").write_text(json.dumps([{"id": "a", "prompt": "p", "images": ["imgs/1.png"]}]))
    assert _load(VISION_ARENA, tmp_path, dataset_dir="arena") == [
        {"id": "a", "prompt": "p", "images": [str(root / "imgs" / "1.png")]}
    ]


@pytest.mark.parametrize("dataset_dir", ["", None, "dataset/vision-arena-bench-v0.1"])
def test_arena_falls_back_to_the_sample_folder(tmp_path: Path, dataset_dir: str | None) -> None:
    """Unset or left at the (absent) default, dataset_dir becomes dataset/vision_arena_bench, the sample's layout."""
    root = tmp_path / "dataset" / "vision_arena_bench"
    _write_lines(root / "dataset.jsonl", [json.dumps({"id": "a", "prompt": "p", "images": ["1.png"]})])
    requests = load_requests(VISION_ARENA, dataset_dir, 2, 1, None, tmp_path)
    assert requests == [{"id": "a", "prompt": "p", "images": [str(root / "1.png")]}]


def test_arena_configured_dir_wins_and_a_wrong_one_is_an_error(tmp_path: Path) -> None:
    _write_lines(tmp_path / "dataset" / "vision_arena_bench" / "dataset.jsonl", [json.dumps({"prompt": "sample"})])
    _write_lines(tmp_path / "dataset" / "vision-arena-bench-v0.1" / "dataset.jsonl", [json.dumps({"prompt": "v0.1"})])
    _write_lines(tmp_path / "mine" / "dataset.jsonl", [json.dumps({"prompt": "mine"})])
    assert _load(VISION_ARENA, tmp_path, dataset_dir="dataset/vision-arena-bench-v0.1")[0]["prompt"] == "v0.1"
    assert _load(VISION_ARENA, tmp_path, dataset_dir="mine")[0]["prompt"] == "mine"
    assert _load(VISION_ARENA, tmp_path, dataset_dir="")[0]["prompt"] == "sample"
    with pytest.raises(DatasetError, match="directory not found.*typo"):
        _load(VISION_ARENA, tmp_path, dataset_dir="typo")


def test_arena_neither_default_folder_names_both(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as excinfo:
        _load(VISION_ARENA, tmp_path, dataset_dir="dataset/vision-arena-bench-v0.1")
    assert "vision_arena_bench" in str(excinfo.value) and "vision-arena-bench-v0.1" in str(excinfo.value)
