"""Seeded random weights of a preset as a safetensors checkpoint, and a draft made from it, for speculative
decoding benchmarks where both engines must read the same weights (random weights make acceptance meaningless
otherwise):

    python benchmarks/write_spec_checkpoints.py --model llama-3.1-8b --out /tmp/spec [--draft-layers 2] [--eagle-head]
        -> /tmp/spec/target: every tensor, each from its own seed (its name's CRC32 plus --seed)
           /tmp/spec/draft:  the same embeddings, final norm and LM head, and the target's first 2 layers
           /tmp/spec/eagle, /tmp/spec/eagle3 (--eagle-head): random EAGLE-1 and EAGLE-3 heads in their
                             published layouts (fc and one layer; EAGLE-3 with its own norm and LM head over
                             the whole vocabulary), for method "eagle" / "eagle3"

Norm weights are ones, everything else N(0, 0.02) (HF's initializer range), generated on the GPU when there is
one. Each directory gets the preset's config.json (the draft's with num_hidden_layers lowered) and its synthetic
tokenizer, and shards of at most 4 GiB with an index, as HF writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.entrypoints.cli.bench.presets import model_path  # noqa: E402

SHARD_BYTES = 4 << 30


def tensor_shapes(config_path: str) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """The HF model's parameters, names and shapes, without allocating them."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(config_path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return {name: (p.shape, p.dtype) for name, p in model.state_dict().items()
            if not (config.tie_word_embeddings and name == "lm_head.weight")}


def seeded(name: str, shape: torch.Size, dtype: torch.dtype, seed: int, device: str) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    generator = torch.Generator(device=device).manual_seed(zlib.crc32(name.encode()) + seed)
    return (torch.randn(shape, generator=generator, device=device) * 0.02).to(dtype).cpu()


def write(out: Path, source: str, config: dict, names: list[str], shapes: dict, seed: int, device: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for item in os.listdir(source):  # the tokenizer's files
        if item.startswith(("tokenizer", "special_tokens")):
            shutil.copy(os.path.join(source, item), out / item)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    shards, current, size = [], {}, 0
    for name in names:
        shape, dtype = shapes[name]
        current[name] = seeded(name, shape, dtype, seed, device)
        size += current[name].numel() * current[name].element_size()
        if size >= SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
    if current:
        shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    print(f"{out}: {len(names)} tensors in {len(shards)} shards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a preset (bench --model) or a folder with a config.json")
    parser.add_argument("--out", required=True)
    parser.add_argument("--draft-layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eagle-head", action="store_true", help="also write random EAGLE-1 and EAGLE-3 heads")
    args = parser.parse_args()
    source = model_path(args.model)
    config = json.loads(Path(source, "config.json").read_text())
    shapes = tensor_shapes(source)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    write(Path(args.out, "target"), source, config, list(shapes), shapes, args.seed, device)
    layer_prefixes = tuple(f"model.layers.{i}." for i in range(args.draft_layers))
    draft_names = [n for n in shapes if not n.startswith("model.layers.") or n.startswith(layer_prefixes)]
    write(Path(args.out, "draft"), source, {**config, "num_hidden_layers": args.draft_layers}, draft_names, shapes,
          args.seed, device)
    if args.eagle_head:
        for eagle3 in (False, True):
            head_shapes = eagle_head_shapes(shapes, config["hidden_size"], eagle3)
            head_config = {**config, "num_hidden_layers": 1,
                           **({"architectures": ["LlamaForCausalLMEagle3"]} if eagle3 else {})}
            write(Path(args.out, "eagle3" if eagle3 else "eagle"), source, head_config, list(head_shapes),
                  head_shapes, args.seed, device)


def eagle_head_shapes(shapes: dict, hidden: int, eagle3: bool) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """An EAGLE head's tensors, from the target's layer 0: EAGLE-1 `fc` [H, 2H] and `layers.0.*` without its
    input norm; EAGLE-3 `fc` [H, 3H], `midlayer.*` with q/k/v over 2H and a `hidden_norm`, `norm`, `lm_head`."""
    dtype = shapes["model.embed_tokens.weight"][1]
    layer = "midlayer." if eagle3 else "layers.0."
    head = {"fc.weight": (torch.Size([hidden, (3 if eagle3 else 2) * hidden]), dtype)}
    for name, (shape, tensor_dtype) in shapes.items():
        if not name.startswith("model.layers.0.") or name.endswith("input_layernorm.weight") and not eagle3:
            continue
        if eagle3 and name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            shape = torch.Size([shape[0], 2 * hidden])
        head[layer + name.removeprefix("model.layers.0.")] = (shape, tensor_dtype)
    if eagle3:
        head |= {"midlayer.hidden_norm.weight": (torch.Size([hidden]), dtype),
                 "norm.weight": (torch.Size([hidden]), dtype),
                 "lm_head.weight": shapes.get("lm_head.weight", shapes["model.embed_tokens.weight"])}
    return head


if __name__ == "__main__":
    main()
