"""Transformer path: SVD and data-aware (whitened) SVD of a small nn.TransformerEncoder's Gemm/MatMul
weights, then INT8 (QDQ) / FP16, on ONNX Runtime.

Model: 2 × TransformerEncoderLayer(d_model 64, 4 heads, FFN 128, batch_first) + mean pool + Linear(64, 10)
head, random weights (seed 0), exported with torch.onnx.export(dynamo=False), dynamic batch and sequence
length. Its linear layers export as MatMul on (B, L, D) activations (+ Add for the bias); the head as Gemm.
Inputs: token embeddings from a 64-token vocabulary whose embedding table is low rank (rank 12) plus noise,
with sinusoidal positions, so the layer inputs are anisotropic like a trained model's. Calibration and
evaluation use different random token sequences. Fidelity against the FP32 original: cosine, SQNR (dB)
and top-1 agreement of the head's logits.

    python benchmarks/transformer_svd.py [--ratios 2 3] [--n 256]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

D, L, VOCAB = 64, 16, 64


def build(seed: int = 0):
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(D, 4, 128, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(D, 10)

        def forward(self, x):
            return self.head(self.enc(x).mean(dim=1))

    torch.manual_seed(seed)
    net = Net()
    # nn.TransformerEncoder deep-copies one layer: re-draw every layer so they differ (as after training;
    # identical layers would also export as shared, deduplicated initializers)
    with torch.no_grad():
        for p in net.enc.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
            else:
                p.normal_(0.0, 0.02) if p.abs().sum() == 0 or p.shape[0] != D else p.add_(0.02 * torch.randn_like(p))
    return net.eval()


def export(out: Path, seed: int = 0) -> Path:
    import torch

    model = build(seed)
    x = torch.from_numpy(tokens(2, 0))
    out.parent.mkdir(parents=True, exist_ok=True)
    # grad mode on: the encoder's fused inference fast path (aten::_transformer_encoder_layer_fwd, which
    # the TorchScript exporter cannot export) is only taken without grad
    torch.onnx.export(model, (x,), str(out), dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "batch", 1: "seq"}, "logits": {0: "batch"}})
    with torch.no_grad():
        want = model(x).numpy()
    import onnxruntime as ort

    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert np.allclose(got, want, rtol=1e-4, atol=1e-4), float(np.abs(got - want).max())
    return out


def tokens(n: int, seed: int) -> np.ndarray:
    """(n, L, D) float32 embeddings: low-rank vocabulary table (fixed) + noise + sinusoidal positions."""
    table_rng = np.random.default_rng(1234)
    table = table_rng.standard_normal((VOCAB, 12)) @ table_rng.standard_normal((12, D)) / np.sqrt(12)
    table += 0.05 * table_rng.standard_normal((VOCAB, D))
    pos = np.arange(L)[:, None] / np.power(100.0, np.arange(0, D, 2)[None, :] / D)
    pe = np.zeros((L, D))
    pe[:, 0::2], pe[:, 1::2] = np.sin(pos), np.cos(pos)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, size=(n, L))
    return (table[ids] + 0.5 * pe[None]).astype(np.float32)


class ArrayData:
    kind = "tokens"
    has_labels = False

    def __init__(self, x, description):
        self.x, self.description, self.source = x, description, description

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size=1):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], None


def run(path, ratio, data_aware, quantize, cal, ev):
    from onnxcompress.pipeline import optimize
    from onnxcompress.recipe import Recipe

    rec = Recipe(method="svd" if ratio else "none", ratio=ratio, data_aware=data_aware and bool(ratio),
                 quantize=quantize, calibration_samples=len(cal), rank_multiple=1, latency_guard=False,
                 eval_samples=len(ev), input_shape={"x": [1, L, D]})
    t0 = time.perf_counter()
    r = optimize(str(path), rec, calibration=cal, eval_data=ev)
    f, m = r.report.fidelity, r.report.model
    return {"ratio": ratio, "data_aware": data_aware, "quantize": quantize, "cosine": f["cosine"],
            "sqnr_db": f["sqnr_db"], "top1": f["top1_agreement"], "layers": m.get("decomposed_layers", 0),
            "layer_ratio": m.get("decomposed_ratio"), "ops": sorted({n.op_type for n in r.model.graph.node}),
            "seconds": round(time.perf_counter() - t0, 2), "report": r.report}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[2.0, 3.0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--out", default="benchmarks/out/transformer_svd.json")
    a = ap.parse_args(argv)
    import tempfile

    path = export(Path(tempfile.mkdtemp()) / "encoder.onnx")
    cal = ArrayData(tokens(a.n, 1), f"{a.n} random token sequences (seed 1)")
    ev = ArrayData(tokens(a.n, 2), f"{a.n} random token sequences (seed 2)")
    rows = []
    for q in ("none", "int8", "fp16"):
        rows.append(run(path, None, False, q, cal, ev))
        for ratio in a.ratios:
            for da in (False, True):
                rows.append(run(path, ratio, da, q, cal, ev))
    for r in rows:
        r.pop("report")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print("| ratio | precision | method | layers | cosine | SQNR dB | top-1 agr. |\n|---|---|---|---|---|---|---|")
    for r in rows:
        meth = "none" if not r["ratio"] else ("data-aware SVD" if r["data_aware"] else "plain SVD")
        print(f"| {r['ratio'] or '-'} | {dict(none='FP32', int8='INT8', fp16='FP16')[r['quantize']]} | {meth} | "
              f"{r['layers']} | {r['cosine']:.4f} | {r['sqnr_db']:.2f} | {r['top1']:.3f} |")


if __name__ == "__main__":
    sys.exit(main())
