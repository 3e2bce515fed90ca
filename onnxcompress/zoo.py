"""Reference CNNs exported to clean ONNX graphs (needs the ``torch`` extra: torch + torchvision).

``export(name, out_path, dataset=..., weights=...)`` builds a torchvision model, loads its weights, folds
every BatchNorm into the conv before it (in torch, ``fuse_conv_bn_eval``), exports with the TorchScript
exporter (``dynamo=False``) in eval mode, removes any Identity node, checks the graph (onnx.checker + shape
inference), optionally compares ONNX Runtime with the unfused torch model, and writes the file atomically.

Datasets:
* ``imagenet``: torchvision's architectures unchanged, 1000 classes, input 1x3x224x224.
* ``cifar10``: 10 classes, input 1x3x32x32, the usual small-image adaptations:
  - ResNet-18/34/50: 3x3 stride-1 stem conv (64 channels), no max-pool; the stages as in torchvision.
  - GoogLeNet: 3x3 stride-1 stem conv, the two stem max-pools removed (inception 3 runs at 32x32,
    inception 4 at 16x16, inception 5 at 8x8), no auxiliary heads, no input transform.
  - AlexNet: first conv 3x3 stride 1 (64 channels) instead of 11x11 stride 4; the rest of the features
    unchanged (32 -> 15 -> 7 -> 3 through the three max-pools); the adaptive 6x6 average pool removed, so
    the classifier's first Linear takes 256*3*3 = 2304 features (4096 -> 4096 -> 10 as in the original).
The core package never imports this module; ``import torch`` happens inside the functions.

Weights: ``default`` = torchvision's ImageNet weights (``ResNet18_Weights.DEFAULT`` ...; ImageNet only,
needs them in the torch hub cache or a network), ``none`` = seeded random init, or a path to a local state
dict (``.pth``/``.pt``; a checkpoint dict holding ``state_dict``/``model``/``model_state_dict`` works, as
does a ``module.`` prefix from DataParallel).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ._cachedir import cache_dir

__all__ = ["MODELS", "DATASETS", "ZooError", "cache_dir", "cached_export", "export", "list_models"]

MODELS = ("resnet18", "resnet34", "resnet50", "googlenet", "alexnet")
DATASETS = ("imagenet", "cifar10")
INPUT_SHAPES = {"imagenet": (1, 3, 224, 224), "cifar10": (1, 3, 32, 32)}
NUM_CLASSES = {"imagenet": 1000, "cifar10": 10}
# Parameter counts of the torch models (BatchNorm affine parameters included), as torchvision counts them.
# Checked against the torch models by tests/test_zoo.py.
_PARAMS = {
    ("resnet18", "imagenet"): 11689512, ("resnet18", "cifar10"): 11173962,
    ("resnet34", "imagenet"): 21797672, ("resnet34", "cifar10"): 21282122,
    ("resnet50", "imagenet"): 25557032, ("resnet50", "cifar10"): 23520842,
    ("googlenet", "imagenet"): 6624904, ("googlenet", "cifar10"): 5602474,
    ("alexnet", "imagenet"): 61100840, ("alexnet", "cifar10"): 28711754,
}
_WEIGHT_ENUMS = {
    "resnet18": "ResNet18_Weights", "resnet34": "ResNet34_Weights", "resnet50": "ResNet50_Weights",
    "googlenet": "GoogLeNet_Weights", "alexnet": "AlexNet_Weights",
}
_EXPORT_FORMAT = 1  # bump when the exported graph changes, to invalidate cached_export files
_DOWNLOAD_TIMEOUT_S = 20.0


class ZooError(RuntimeError):
    """A user-facing zoo problem (one line)."""


def list_models() -> list[dict]:
    """The exportable models: name, datasets, parameter count per dataset, input shape per dataset."""
    return [
        {
            "name": name,
            "datasets": list(DATASETS),
            "params": {ds: _PARAMS[(name, ds)] for ds in DATASETS},
            "input_shape": {ds: INPUT_SHAPES[ds] for ds in DATASETS},
            "default_weights": f"torchvision {_WEIGHT_ENUMS[name]}.DEFAULT (imagenet)",
        }
        for name in MODELS
    ]


# --------------------------------------------------------------------------------------------- building


def _import_torch():
    try:
        import torch
        import torchvision
    except ImportError:
        raise ZooError("the model zoo needs torch and torchvision: pip install 'onnxcompress[torch]'") from None
    return torch, torchvision


def _check_args(name: str, dataset: str) -> None:
    if name not in MODELS:
        raise ZooError(f"unknown model {name!r} (choose from {', '.join(MODELS)})")
    if dataset not in DATASETS:
        raise ZooError(f"unknown dataset {dataset!r} (choose from {', '.join(DATASETS)})")


def build(name: str, dataset: str = "imagenet", *, transform_input: bool = False):
    """The torch module (random init from the current RNG state), eval mode."""
    torch, tv = _import_torch()
    _check_args(name, dataset)
    nn = torch.nn
    m = tv.models
    nc = NUM_CLASSES[dataset]
    if name.startswith("resnet"):
        model = getattr(m, name)(weights=None, num_classes=nc)
        if dataset == "cifar10":
            model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
            model.maxpool = nn.Identity()
    elif name == "googlenet":
        model = m.googlenet(weights=None, num_classes=nc, aux_logits=False, init_weights=dataset == "imagenet",
                            transform_input=transform_input and dataset == "imagenet")
        if dataset == "cifar10":
            from torchvision.models.googlenet import BasicConv2d

            model.conv1 = BasicConv2d(3, 64, kernel_size=3, stride=1, padding=1)
            model.maxpool1 = nn.Identity()
            model.maxpool2 = nn.Identity()
    elif name == "alexnet":
        model = m.alexnet(weights=None, num_classes=nc)
        if dataset == "cifar10":
            model.features[0] = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1)
            model.avgpool = nn.Identity()
            model.classifier[1] = nn.Linear(256 * 3 * 3, 4096)
    else:  # pragma: no cover - guarded by _check_args
        raise ZooError(name)
    return model.eval()


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _default_state_dict(name: str):
    torch, tv = _import_torch()
    enum = getattr(tv.models, _WEIGHT_ENUMS[name]).DEFAULT
    msg = f"cannot download ImageNet weights for {name} (no network?): pass --weights PATH or --weights none"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not cached.is_file() and os.environ.get("ONNXCOMPRESS_OFFLINE", "") not in ("", "0"):
        raise ZooError(msg)
    try:
        with _socket_timeout(_DOWNLOAD_TIMEOUT_S):  # a dead network must fail, not hang
            import contextlib
            import io

            with contextlib.redirect_stdout(io.StringIO()):  # torch hub prints "Downloading: ..." regardless
                return torch.hub.load_state_dict_from_url(enum.url, map_location="cpu", progress=False)
    except ZooError:
        raise
    except Exception:  # noqa: BLE001 - URLError, timeouts, HTTP errors, a truncated file...
        raise ZooError(msg) from None


def _load_state_dict_file(path: Path):
    torch, _ = _import_torch()
    if not path.is_file():
        raise ZooError(f"weights file {path} not found")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ZooError(f"cannot load weights from {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if isinstance(sd, torch.nn.Module):  # pragma: no cover - weights_only refuses pickled modules
        sd = sd.state_dict()
    if isinstance(sd, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(hasattr(v, "shape") for v in sd.values()):
        raise ZooError(f"{path} does not hold a state dict of tensors")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _load(model, sd, source: str) -> None:
    # torchvision's GoogLeNet checkpoints carry the auxiliary heads; the exported model has none.
    sd = {k: v for k, v in sd.items() if not k.startswith(("aux1.", "aux2."))}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} shape mismatch(es), e.g. {k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise ZooError(f"weights {source} do not fit this model: {'; '.join(parts)}")
    model.load_state_dict(sd, strict=True)


def load_model(name: str, dataset: str = "imagenet", weights: str | os.PathLike = "none", *, seed: int = 0):
    """The torch model with its weights, eval mode (BatchNorm not yet folded)."""
    torch, _ = _import_torch()
    _check_args(name, dataset)
    w = os.fspath(weights)
    if w == "default" and dataset != "imagenet":
        raise ZooError(f"torchvision has no {dataset} weights for {name}: pass --weights PATH or --weights none")
    # weights first: a missing file or network fails before building anything
    if w == "default":
        sd, source = _default_state_dict(name), f"{_WEIGHT_ENUMS[name]}.DEFAULT"
    elif w != "none":
        sd, source = _load_state_dict_file(Path(w).expanduser()), w
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # torchvision's GoogLeNet ImageNet weights expect its input transform (transform_input=True)
        model = build(name, dataset, transform_input=(name == "googlenet" and w != "none"))
    if w != "none":
        _load(model, sd, source)
    return model.eval()


def fold_batchnorm(model) -> int:
    """Fold each BatchNorm2d into the Conv2d registered just before it in the same parent, in place.

    The BatchNorm becomes ``nn.Identity`` (which the exporter emits no node for). Returns the count.
    Relies on registration order matching execution order (true for torchvision's CNNs; the export's
    verification against the unfused model catches a wrong pairing).
    """
    torch, _ = _import_torch()
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    nn = torch.nn
    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (cname, conv), (bname, bn) in zip(children, children[1:]):
            if (type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels
                    and bn.track_running_stats):
                setattr(parent, cname, fuse_conv_bn_eval(conv.eval(), bn.eval()))
                setattr(parent, bname, nn.Identity())
                folded += 1
    return folded


# --------------------------------------------------------------------------------------------- graph cleanup


def _remove_identities(model) -> int:
    """Drop Identity nodes (rewire consumers; graph outputs keep their names)."""
    g = model.graph
    outputs = {o.name for o in g.output}
    removed = 0
    for node in list(g.node):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx"):
            continue
        src, dst = node.input[0], node.output[0]
        if dst in outputs:
            if src in outputs or any(i.name == src for i in g.input) or any(t.name == src for t in g.initializer):
                continue  # output is a graph input / initializer / another output: keep the node
            for other in g.node:  # rename the producer's output and every other use of src
                other.output[:] = [dst if o == src else o for o in other.output]
                other.input[:] = [dst if i == src else i for i in other.input]
        else:
            for other in g.node:
                other.input[:] = [src if i == dst else i for i in other.input]
        g.node.remove(node)
        removed += 1
    return removed


def _check_clean(model, name: str) -> None:
    ops = {n.op_type for n in model.graph.node}
    bad = ops & {"BatchNormalization", "Identity"}
    if bad:
        raise ZooError(f"export of {name} left {', '.join(sorted(bad))} nodes in the graph")


def _ort_check(path: Path, torch_model, input_shape, name: str) -> float:
    import numpy as np
    import onnxruntime as ort
    import torch

    x = torch.from_numpy(np.random.default_rng(0).standard_normal(input_shape, dtype=np.float32))
    with torch.no_grad():
        ref = torch_model(x).numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ZooError(f"{name}: ONNX Runtime output shape {got.shape} differs from torch's {ref.shape}")
    rel = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-12))
    if not rel <= 1e-4:
        raise ZooError(f"{name}: ONNX Runtime and torch disagree (relative error {rel:.2e} > 1e-4)")
    return rel


# --------------------------------------------------------------------------------------------- export


def export(
    name: str,
    out_path: str | os.PathLike,
    *,
    dataset: str = "imagenet",
    weights: str | os.PathLike = "default",
    opset: int = 17,
    dynamic_batch: bool = False,
    verify: bool = True,
    seed: int = 0,
) -> Path:
    """Export a zoo model to ``out_path`` (written atomically) and return the path.

    Graph: input ``input`` (1 or N, 3, H, W), output ``logits``; no BatchNormalization, no Identity nodes.
    ``verify``: ONNX Runtime (CPU) vs the unfused torch model on a random input, relative error <= 1e-4.
    """
    torch, _ = _import_torch()
    import onnx

    _check_args(name, dataset)
    out = Path(out_path).expanduser()
    if out.is_dir():
        raise ZooError(f"output {out} is a folder: give a file name such as {out / (name + '.onnx')}")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = load_model(name, dataset, weights, seed=seed)
    reference = None
    if verify:
        import copy

        reference = copy.deepcopy(model)
    fold_batchnorm(model)

    shape = INPUT_SHAPES[dataset]
    dummy = torch.zeros(shape)
    from .ir.modelio import create_temp

    fd, tmp = create_temp(out.parent, out.name)   # the mode a file the user writes gets (umask)
    os.close(fd)
    try:
        kwargs = {}
        if dynamic_batch:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        with torch.no_grad():
            torch.onnx.export(
                model, (dummy,), tmp, dynamo=False, opset_version=opset, input_names=["input"],
                output_names=["logits"], do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
                **kwargs,
            )
        proto = onnx.load(tmp)
        _remove_identities(proto)
        _check_clean(proto, name)
        proto.producer_name = "onnxcompress.zoo"
        proto.doc_string = f"{name} {dataset} weights={os.fspath(weights)}"
        try:
            onnx.checker.check_model(proto)
            proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
        except Exception as e:  # noqa: BLE001
            raise ZooError(f"export of {name} produced an invalid graph: {str(e).splitlines()[0]}") from None
        onnx.save(proto, tmp)
        if verify:
            _ort_check(Path(tmp), reference, shape, name)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def cached_export(name: str, dataset: str = "imagenet", weights: str | os.PathLike = "none", opset: int = 17) -> Path:
    """``export`` once per (name, dataset, weights, opset) into ``cache_dir()/zoo``; later calls reuse it.

    A weights file is keyed by its path, size and modification time.
    """
    _check_args(name, dataset)
    w = os.fspath(weights)
    if w in ("none", "default"):
        wkey = w
    else:
        p = Path(w).expanduser().resolve()
        st = p.stat() if p.exists() else None
        digest = hashlib.sha256(f"{p}|{st.st_size if st else 0}|{st.st_mtime_ns if st else 0}".encode()).hexdigest()
        wkey = "file-" + digest[:12]
    path = cache_dir() / "zoo" / f"{name}-{dataset}-{wkey}-opset{opset}-v{_EXPORT_FORMAT}.onnx"
    if not path.is_file():
        export(name, path, dataset=dataset, weights=weights, opset=opset, verify=True)
    return path

