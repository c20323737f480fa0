"""A draft checkpoint cut from a target: its first N decoder layers, with its embeddings, LM head and vision tower.

For speculative decoding where no smaller checkpoint of the family is at hand (the tiny random checkpoints
of the tests and benchmarks): the cut shares the target's tokenizer and vision layout, so the engine takes
it as `speculative.model`, and how often its proposals are accepted says how close the first layers' output
is to the whole model's. The files besides the weights and config.json are copied as they are.

CLI: ``python -m cluster.tools.draft_checkpoint TARGET OUT --layers N [--force]``.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from model.loader import checkpoint_files

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_VISION = re.compile(r"(?:^|\.)(visual|vision_tower)\.")


def cut_draft(target: str | Path, out: str | Path, layers: int, force: bool = False) -> Path:
    """Write the draft to `out` (its directory is replaced with `force`); returns `out`."""
    target, out = Path(target), Path(out)
    config = json.loads((target / "config.json").read_text())
    text = config.get("text_config", config)  # transformers 5 nests the text model's keys
    total = int(text["num_hidden_layers"])
    if not 1 <= layers <= total:
        raise ValueError(f"--layers {layers} must be in [1, {total}] (the target has {total} decoder layers)")
    if out.exists():
        if not force:
            raise FileExistsError(f"{out} exists; pass --force to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = {}
    for file in checkpoint_files(target):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():
                match = _LAYER.search(key)
                if match and not _VISION.search(key) and int(match.group(1)) >= layers:
                    continue
                tensors[key] = f.get_tensor(key)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    text["num_hidden_layers"] = layers
    if "max_window_layers" in text:
        text["max_window_layers"] = min(int(text["max_window_layers"]), layers)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for item in target.iterdir():
        if (
            item.is_file()
            and item.suffix != ".safetensors"
            and item.name not in ("config.json", "tiny_spec.json")
            and not (item.name.endswith(".index.json"))
        ):
            shutil.copy2(item, out / item.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="the target checkpoint directory")
    parser.add_argument("out", help="where the draft is written")
    parser.add_argument("--layers", type=int, required=True, help="decoder layers the draft keeps (the first N)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        path = cut_draft(args.target, args.out, args.layers, args.force)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"draft with {args.layers} decoder layers written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
