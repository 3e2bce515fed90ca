#!/usr/bin/env python
"""Train the default model: a small ResNet-style CNN on scikit-learn's handwritten digits.

Data: ``sklearn.datasets.load_digits`` (1797 real labelled 8x8 digits, values 0..16, white ink on black).
Fixed stratified split: 80 % train / 20 % test (``train_test_split(..., stratify=y, random_state=0)``,
1437 / 360 images). Inputs: x / 16 -> [0, 1], upsampled to 16x16 with bilinear interpolation
(``F.interpolate(mode="bilinear", align_corners=False)``, the same numbers as Pillow's BILINEAR resize of
the 8x8 image), then normalized with ``onnxcompress.data.PRESETS["digits"]`` (mean 0.305, std 0.319).

Model (BatchNorm after every conv, ReLU, residual adds; ~0.3 M parameters):
  stem   conv3x3 1->32                                  16x16
  stage1 basic block 32->32  (two conv3x3)              16x16
  stage2 basic block 32->64  stride 2, 1x1 conv skip      8x8
  stage3 basic block 64->128 stride 2, 1x1 conv skip      4x4
  global average pool, Linear 128->10 ("logits")

Exported with the TorchScript exporter, opset 17, BatchNormalization nodes kept (training=PRESERVE on an
eval-mode model skips the exporter's Conv+BN fusion), input "input" (N,1,16,16) with a dynamic batch dim,
output "logits" (N,10). Writes digits_cnn.onnx, digits_calib.npz (64 training inputs + labels) and
digits_test.npz (all 360 test inputs + labels), then reports the test accuracy measured with ONNX Runtime.

    python models/train_digits.py              # ~1-3 minutes on one CPU thread
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from onnxcompress.data import PRESETS  # noqa: E402


def load_split(seed: int = 0):
    """-> (x_train, y_train, x_test, y_test): float32 (N,1,16,16) normalized inputs, int64 labels."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images[:, None] / 16.0, dtype=torch.float32)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    pp = PRESETS["digits"]
    x = ((x - pp.mean[0]) / pp.std[0]).numpy().astype(np.float32)
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=0.2, stratify=y, random_state=seed)
    return x[tr], y[tr], x[te], y[te]


def build_model():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.shortcut = nn.Identity()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + self.shortcut(x))

    class DigitsNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.stage1 = Block(32, 32, 1)
            self.stage2 = Block(32, 64, 2)
            self.stage3 = Block(64, 128, 2)
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            x = self.stage3(self.stage2(self.stage1(self.stem(x))))
            return self.fc(x.mean(dim=(2, 3)))

    return DigitsNet()


def augment(x, gen):
    """Random shifts of up to 1 pixel (16x16 grid), background filled with the normalized 0 value."""
    import torch
    import torch.nn.functional as F

    bg = (0.0 - PRESETS["digits"].mean[0]) / PRESETS["digits"].std[0]
    n = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=bg)
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i]:dy[i] + 16, dx[i]:dx[i] + 16]
    return out


def train(x_tr, y_tr, x_te, y_te, *, epochs: int, seed: int, log=print):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    model = build_model()
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=5e-4)
    steps_per_epoch = (len(xt) + 63) // 64
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(0, len(xt), 64):
            b = perm[s:s + 64]
            xb = augment(xt[b], gen)
            loss = loss_fn(model(xb), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(b)
        if epoch % 5 == 4 or epoch == epochs - 1:
            acc = accuracy_torch(model, x_te, y_te)
            log(f"epoch {epoch + 1:3d}  loss {total / len(xt):.4f}  test acc {acc * 100:.2f}%")
    model.eval()
    return model


def accuracy_torch(model, x, y) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export_onnx(model, path: Path) -> None:
    import warnings

    import onnx
    import torch

    model.eval()
    dummy = torch.zeros(1, 1, 16, 16)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():  # legacy-exporter deprecation; constant folding on an eval model
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (dummy,), tmp, dynamo=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE,  # keeps BatchNormalization (no Conv+BN fusion)
                do_constant_folding=True,
            )
        m = onnx.load(tmp)
        _inline_initializer_identities(m)
        m.producer_name, m.doc_string = "onnxcompress models/train_digits.py", "sklearn digits ResNet-style CNN"
        onnx.checker.check_model(m, full_check=True)
        onnx.save(m, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _inline_initializer_identities(m) -> None:
    """The exporter de-duplicates equal initializers behind Identity nodes (here: the two BatchNorm biases
    before each residual Add get identical gradients, so they train to identical values). Give each
    consumer its own initializer again so every BatchNormalization reads plain initializers."""
    import onnx

    inits = {t.name: t for t in m.graph.initializer}
    for node in list(m.graph.node):
        if node.op_type == "Identity" and node.input[0] in inits:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            m.graph.initializer.append(copy)
            m.graph.node.remove(node)


def accuracy_ort(path: Path, x, y) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return float((logits.argmax(1) == y).mean())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--out-dir", type=Path, default=HERE)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    x_tr, y_tr, x_te, y_te = load_split(args.seed)
    print(f"train {len(y_tr)}  test {len(y_te)}  input {x_tr.shape[1:]}")
    model = train(x_tr, y_tr, x_te, y_te, epochs=args.epochs, seed=args.seed)
    t_train = time.time() - t0

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)
    calib_idx = np.random.default_rng(args.seed).choice(len(y_tr), size=64, replace=False)
    np.savez_compressed(out / "digits_calib.npz", x=x_tr[calib_idx], y=y_tr[calib_idx])
    np.savez_compressed(out / "digits_test.npz", x=x_te, y=y_te)

    acc_t = accuracy_torch(model, x_te, y_te)
    acc_o = accuracy_ort(onnx_path, x_te, y_te)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"trained in {t_train:.0f}s, {n_params} parameters")
    print(f"test accuracy: torch {acc_t * 100:.2f}%  onnxruntime {acc_o * 100:.2f}%  ({len(y_te)} images)")
    for f in ("digits_cnn.onnx", "digits_calib.npz", "digits_test.npz"):
        print(f"{f}: {(out / f).stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
