"""Reads a GGUF file with llama.cpp's own Python reader (the `gguf` package)
and writes what it read: every tensor dequantized to f32 under its GGUF name
in OUT/tensors.safetensors, and the metadata and tensor types in
OUT/meta.json.

    python3 gguf_dump.py MODEL.gguf OUT
"""
import json
import sys

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.contents()
    if isinstance(value, list) and len(value) > 8:
        return {"len": len(value), "head": value[:8]}
    return value


def main(path, out):
    reader = GGUFReader(path)
    tensors = {}
    types = {}
    for t in reader.tensors:
        values = dequantize(t.data, t.tensor_type).astype(np.float32)
        tensors[t.name] = np.ascontiguousarray(values)
        types[t.name] = t.tensor_type.name
    save_file(tensors, f"{out}/tensors.safetensors")
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    meta = {
        "metadata": {k: field(reader, k) for k in keys},
        "types": types,
    }
    with open(f"{out}/meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)


if __name__ == "__main__":
    main(*sys.argv[1:3])
