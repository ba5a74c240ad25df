"""docs/serving.md in numpy: predicts the rows of a CSV file from a gradflow export alone.

    python3 serving_reference.py MODEL.safetensors ROWS.csv PREDICTIONS.txt

Reads the export's tensors and its `serving` metadata (the safetensors layout is read here
directly: an 8-byte little-endian header length, a JSON header, then the raw tensors; so only
numpy is needed), computes each row's probability as docs/serving.md says (scaling, id
hashing, new rows for ids the model never stored, the forward pass), and compares with
PREDICTIONS.txt (one probability per row, gradflow's). Exits 0 when every probability is
within 1e-5, 1 otherwise, and 77 when numpy is not installed.
"""

import csv
import json
import math
import sys

try:
    import numpy as np
except ImportError as e:  # pragma: no cover
    print(f"skipped: {e}")
    sys.exit(77)

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
SPARSE_DOMAIN = 0x7370617273650000


DTYPES = {"F32": np.float32, "U64": np.uint64, "F64": np.float64, "I64": np.int64}


def load_safetensors(path):
    """The tensors and the metadata of a safetensors file."""
    with open(path, "rb") as f:
        data = f.read()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    body = data[8 + n :]
    tensors = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        array = np.frombuffer(body[start:end], dtype=np.dtype(DTYPES[t["dtype"]]).newbyteorder("<"))
        tensors[name] = array.reshape(t["shape"])
    return tensors, meta


def mix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & M64
    return h


def categorical_id(field, value):
    return mix64(fnv1a64(field.to_bytes(4, "little") + value))


def new_row(init, table, row, dim):
    kind = init["kind"]
    if kind == "zeros":
        return np.zeros(dim, dtype=np.float32)
    if kind == "constant":
        return np.full(dim, init["value"], dtype=np.float32)
    if kind != "normal":
        raise SystemExit(f"initializer {kind} is not implemented here")
    key = mix64((mix64(init.get("seed", 0) ^ SPARSE_DOMAIN) + fnv1a64(table.encode())) & M64)
    row_key = mix64(key ^ mix64((row + GOLDEN) & M64))

    def bits(i):
        return mix64((row_key + (i + 1) * GOLDEN) & M64)

    mean = float(np.float32(init["mean"]))
    std = float(np.float32(init["std"]))
    out = np.empty(dim, dtype=np.float32)
    for c in range(dim):
        u1 = ((bits(2 * c) >> 11) + 1) * 2.0**-53
        u2 = (bits(2 * c + 1) >> 11) * 2.0**-53
        out[c] = np.float32(mean + std * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return out


class Table:
    def __init__(self, tensors, name, init):
        self.name = name
        self.values = tensors[f"{name}.values"]
        self.index = {int(i): r for r, i in enumerate(tensors[f"{name}.ids"])}
        self.init = init

    def row(self, r):
        k = self.index.get(r)
        if k is not None:
            return self.values[k]
        return new_row(self.init, self.name, r, self.values.shape[1])


def main():
    model_path, rows_path, predictions_path = sys.argv[1:4]
    tensors, meta = load_safetensors(model_path)
    serving = json.loads(meta["serving"])
    spec = json.loads(meta["spec"])
    cfg = serving["model"]
    if cfg["kind"] != "wide_deep":
        raise SystemExit(f"model kind {cfg['kind']} is not implemented here")
    inputs = serving["input"]
    inits = {t["name"]: t["init"] for t in spec["sparse"]}
    wide = Table(tensors, "wide", inits["wide"])
    emb = Table(tensors, "embedding", inits["embedding"]) if cfg["num_fields"] > 0 else None
    buckets = cfg["hash_buckets"]
    layers = len(cfg["hidden"]) + 1
    scaling = serving.get("standardize")

    probs = []
    with open(rows_path, newline="") as f:
        for cells in csv.DictReader(f):
            x = np.array([np.float32(float(cells[c])) for c in inputs["dense"]], dtype=np.float32)
            if scaling:
                mean = np.array(scaling["mean"], dtype=np.float64)
                inv = 1.0 / np.array(scaling["std"], dtype=np.float64)
                x = ((x.astype(np.float64) - mean) * inv).astype(np.float32)
            rows = []
            for field, column in enumerate(inputs["categorical"]):
                i = categorical_id(field, cells[column].encode())
                rows.append(i % buckets if buckets else i)
            z_wide = tensors["wide_bias"][0] + sum(wide.row(r)[0] for r in rows)
            parts = [emb.row(r) for r in rows] if emb else []
            h = np.concatenate(parts + [x]).astype(np.float32)
            for l in range(layers):
                h = h @ tensors[f"deep_w{l}"] + tensors[f"deep_b{l}"]
                if l + 1 < layers:
                    h = np.maximum(h, 0)
            z = np.float32(z_wide) + h[0]
            probs.append(1.0 / (1.0 + math.exp(-float(z))))

    theirs = [float(line) for line in open(predictions_path) if line.strip()]
    if len(theirs) != len(probs):
        print(f"{len(probs)} rows here, {len(theirs)} predictions from gradflow")
        return 1
    worst = max(abs(a - b) for a, b in zip(probs, theirs))
    print(f"{len(probs)} rows, largest difference {worst:.3g}")
    return 0 if worst <= 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
