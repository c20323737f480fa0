"""Tiny random Qwen2.5-VL checkpoints: layouts, shards, tokenizer, spec marker, validation, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cluster.tools.tiny_checkpoint import SPECIAL_TOKENS, TOOL_TOKENS, TinySpec, build_tiny_checkpoint, is_built, main


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        "released": build_tiny_checkpoint(root / "released", TinySpec()),
        "transformers5": build_tiny_checkpoint(root / "t5", TinySpec(layout="transformers5")),
        "sharded": build_tiny_checkpoint(root / "sharded", TinySpec(num_shards=3)),
    }


@pytest.fixture(scope="module")
def reference(checkpoints: dict[str, Path]) -> Qwen2_5_VLForConditionalGeneration:
    return Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints["released"]).eval()


def _checkpoint_keys(path: Path) -> dict[str, str]:
    """Tensor name -> file name, over every safetensors file of a checkpoint."""
    keys = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file.name))
    return keys


def test_all_layouts_load_with_identical_weights(checkpoints: dict[str, Path], reference) -> None:
    expected = reference.state_dict()
    for name in ("transformers5", "sharded"):
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints[name], output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], name
        loaded = model.state_dict()
        assert loaded.keys() == expected.keys()
        for key, tensor in expected.items():
            assert loaded[key].dtype == torch.float32
            assert torch.equal(loaded[key], tensor), (name, key)


def test_reference_loads_without_missing_keys(checkpoints: dict[str, Path]) -> None:
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoints["released"], output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_key_layouts(checkpoints: dict[str, Path]) -> None:
    released = _checkpoint_keys(checkpoints["released"])
    for key in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.2.self_attn.o_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "visual.patch_embed.proj.weight",
        "visual.blocks.3.attn.qkv.bias",
        "visual.blocks.0.mlp.down_proj.bias",
        "visual.blocks.0.norm1.weight",
        "visual.merger.ln_q.weight",
        "visual.merger.mlp.2.bias",
    ):
        assert key in released, key
    assert "model.layers.0.self_attn.o_proj.bias" not in released
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in released)

    t5 = _checkpoint_keys(checkpoints["transformers5"])
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in t5} == {
        "model.language_model",
        "model.visual",
        "lm_head.weight",
    }
    assert len(t5) == len(released)


def test_shard_index(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["sharded"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    keys = _checkpoint_keys(path)
    assert index["weight_map"] == keys
    total = 0
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            total += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert index["metadata"]["total_size"] == total
    sizes = [(path / f).stat().st_size for f in files]
    assert max(sizes) < 1.5 * min(sizes)


def test_config_files(checkpoints: dict[str, Path]) -> None:
    config = json.loads((checkpoints["released"] / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["model_type"] == "qwen2_5_vl"
    assert config["hidden_size"] == 128 and config["num_key_value_heads"] == 2
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [4, 6, 6]}
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    vision = config["vision_config"]
    assert vision["out_hidden_size"] == config["hidden_size"]
    assert vision["fullatt_block_indexes"] == [1, 3] and vision["depth"] == 4
    t5 = json.loads((checkpoints["transformers5"] / "config.json").read_text())
    assert t5["text_config"]["hidden_size"] == 128
    assert t5["image_token_id"] == config["image_token_id"]

    generation = json.loads((checkpoints["released"] / "generation_config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["released"])
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert generation["pad_token_id"] == endoftext == generation["bos_token_id"]

    image_processor = Qwen2VLImageProcessorPil.from_pretrained(checkpoints["released"])
    assert image_processor.size["shortest_edge"] == 56 * 56
    assert image_processor.size["longest_edge"] == 28 * 28 * 64
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (14, 2, 2)


def test_tokenizer(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["released"]
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    for text in ("Describe the image in detail.", "  Hello,\n\nworld! 12345 ünïcödé 中文 🙂", "don't"):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
    added = (*SPECIAL_TOKENS, *TOOL_TOKENS)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in added]
    assert ids == list(range(ids[0], ids[0] + len(added)))
    assert ids[-1] == len(tokenizer) - 1 < config["vocab_size"]
    # The tool-call tags are one token each and, as in Qwen2.5's tokenizer, not special: they stay in
    # decoded text, also when a user types them.
    call = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    call_ids = tokenizer(call, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    assert call_ids[0] == ids[-2] and call_ids[-1] == ids[-1]
    assert tokenizer.decode(call_ids, skip_special_tokens=True) == call
    named = {
        "bos_token_id": "<|endoftext|>",
        "eos_token_id": "<|im_end|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    for key, token in named.items():
        assert config[key] == tokenizer.convert_tokens_to_ids(token), key
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("<|im_start|>user", add_special_tokens=False)["input_ids"][0] == ids[1]
    assert tokenizer.decode([config["vocab_size"] - 1]) == ""

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is it?<|im_end|>\n<|im_start|>assistant\n"
    )
    with_ids = tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in with_ids
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    assert template == tokenizer.chat_template


def test_build_is_deterministic(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    again = build_tiny_checkpoint(tmp_path / "again", TinySpec())
    for name in ("tokenizer.json", "config.json", "model.safetensors"):
        assert (again / name).read_bytes() == (checkpoints["released"] / name).read_bytes(), name


def test_marker_makes_second_build_a_no_op(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "ckpt"
    small = ["--num-layers", "1", "--vision-depth", "2", "--fullatt-blocks", "1"]
    assert main([str(out), *small]) == 0
    assert "built" in capsys.readouterr().out
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert main([str(out), *small]) == 0
    assert "already built" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns == stamp
    spec = TinySpec(num_hidden_layers=1, vision_depth=2, fullatt_block_indexes=[1])
    assert is_built(out, spec) and not is_built(out, TinySpec())

    assert main([str(out), *small, "--force"]) == 0
    assert "built" in capsys.readouterr().out
    assert weights.stat().st_mtime_ns != stamp

    assert main([str(out), *small, "--shards", "2"]) == 0
    assert not weights.exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    (out / "model-00002-of-00002.safetensors").unlink()
    assert not is_built(out, TinySpec(num_hidden_layers=1, vision_depth=2, fullatt_block_indexes=[1], num_shards=2))


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"mrope_section": [4, 6, 7]}, "mrope_section"),
        ({"fullatt_block_indexes": [1, 4]}, "fullatt_block_indexes"),
        ({"num_attention_heads": 3}, "num_attention_heads"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"vision_num_heads": 3}, "vision_num_heads"),
        ({"window_size": 100}, "window_size"),
        ({"layout": "megatron"}, "layout"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"min_pixels": 10**6}, "min_pixels"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"num_shards": 10_000}, "num_shards"),
    ],
)
def test_bad_spec_names_the_field(tmp_path: Path, changes: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_tiny_checkpoint(tmp_path / "bad", TinySpec(**changes))
    assert not is_built(tmp_path / "bad", TinySpec(**changes))


def test_cli_reports_bad_spec(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "x"), "--fullatt-blocks", "1,7"]) == 2
    assert "fullatt_block_indexes" in capsys.readouterr().err


def test_greedy_decoding_is_not_degenerate(checkpoints: dict[str, Path], reference) -> None:
    tokenizer = AutoTokenizer.from_pretrained(checkpoints["released"])
    for prompt in ("Describe the weather today.", "Tell me a story about a cat."):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        inputs = tokenizer(text, return_tensors="pt")
        out = reference.generate(
            **inputs,
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        new_tokens = out.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        assert len(new_tokens) == 12
        assert len(set(new_tokens)) >= 3, new_tokens
        gaps = torch.stack([s[0].topk(2).values for s in out.scores])
        gaps = gaps[:, 0] - gaps[:, 1]
        assert gaps.min() > 1e-3, gaps
        assert gaps.median() > 0.1, gaps
