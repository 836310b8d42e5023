"""Reads a compressed-tensors `pack-quantized` folder by its documented
layout with the `safetensors` package alone, and writes every weight
dequantized to f32 under its dense name in OUT/dense.safetensors, with the
quantization_config it found in OUT/config.json.

Each quantized linear NAME holds NAME.weight_packed (int32 words, 32/bits
codes each, the first in the lowest bits, offset by 2^(bits-1)),
NAME.weight_scale ([rows, cols/group]) and NAME.weight_shape ([rows, cols]).

    python3 ct_unpack.py FOLDER OUT
"""
import json
import sys

import numpy as np
from safetensors.numpy import load_file, save_file


def main(folder, out):
    config = json.load(open(f"{folder}/config.json"))
    q = config["quantization_config"]
    assert q["quant_method"] == "compressed-tensors", q
    assert q["format"] == "pack-quantized", q
    weights = q["config_groups"]["group_0"]["weights"]
    bits = weights["num_bits"]
    assert weights["type"] == "int" and weights["symmetric"], weights
    tensors = load_file(f"{folder}/model.safetensors")
    dense = {}
    per = 32 // bits
    offset = 1 << (bits - 1)
    mask = (1 << bits) - 1
    for name, t in tensors.items():
        if name.endswith(".weight_packed"):
            base = name[: -len(".weight_packed")]
            rows, cols = (int(x) for x in tensors[base + ".weight_shape"])
            words = t.astype(np.int64) & 0xFFFFFFFF
            codes = np.stack(
                [(words >> (bits * i)) & mask for i in range(per)], axis=-1
            ).reshape(rows, -1)[:, :cols] - offset
            scale = tensors[base + ".weight_scale"].astype(np.float32)
            group = cols // scale.shape[1]
            if weights["strategy"] == "group":
                assert group == weights["group_size"], (name, group)
            w = codes.astype(np.float32) * np.repeat(scale, group, axis=1)
            dense[base + ".weight"] = np.ascontiguousarray(w)
        elif name.endswith(".weight_scale") or name.endswith(".weight_shape"):
            continue
        elif np.issubdtype(t.dtype, np.floating):
            dense[name] = np.ascontiguousarray(t.astype(np.float32))
        else:
            dense[name] = t
    save_file(dense, f"{out}/dense.safetensors")
    json.dump(q, open(f"{out}/config.json", "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
