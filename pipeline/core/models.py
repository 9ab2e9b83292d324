"""Model registry: architectures by name, so configs pick a model without if-chains in the trainer."""

from __future__ import annotations

import json
import pickletools
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..registry import Registry
from ..store import StageError, atomic_path, first_line, parse_json

MODELS: Registry[Callable[..., nn.Module]] = Registry("train.arch")


def build_model(arch: str, num_classes: int, width: int = 32) -> nn.Module:
    return MODELS.lookup(arch)(num_classes=num_classes, width=width)


def _conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, width: int = 32) -> nn.Module:
    """A VGG-style CNN for small images (three stages of two 3x3 convolutions): enough capacity to
    memorise a few tens of thousands of images, cheap enough to train on two CPU cores."""
    w = width
    return nn.Sequential(
        _conv_bn(3, w),
        _conv_bn(w, w),
        nn.MaxPool2d(2),
        _conv_bn(w, 2 * w),
        _conv_bn(2 * w, 2 * w),
        nn.MaxPool2d(2),
        _conv_bn(2 * w, 4 * w),
        _conv_bn(4 * w, 4 * w),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * w, num_classes),
    )


def _torchvision_models() -> Any:
    """torchvision.models, imported when one of its architectures is first built: the import takes
    about a second, which an owner's audit of a small network would otherwise spend waiting."""
    import torchvision.models

    return torchvision.models


@MODELS.register("resnet18_cifar")
def resnet18_cifar(num_classes: int, width: int = 64) -> nn.Module:
    """torchvision's ResNet-18 with the small-image stem (3x3 stride-1 conv, no max-pool)."""
    model = _torchvision_models().resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class _WideBlock(nn.Module):
    """Pre-activation basic block of a wide ResNet (BN-ReLU-conv twice, 1x1 shortcut on shape change)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = None if (c_in, stride) == (c_out, 1) else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + (x if self.shortcut is None else self.shortcut(pre))


def wide_resnet(depth: int, widen: int, num_classes: int) -> nn.Module:
    """WRN-depth-widen of Zagoruyko & Komodakis (2016) for 32x32 inputs: three groups of
    (depth - 4) / 6 blocks with 16k, 32k, 64k channels, strides 1, 2, 2."""
    if (depth - 4) % 6:
        raise StageError(f"train.arch: wide ResNet depth {depth} is not 6n + 4")
    blocks, widths = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
    layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1, bias=False)]
    for group, stride in zip(range(3), (1, 2, 2)):
        for b in range(blocks):
            layers.append(
                _WideBlock(widths[group] if b == 0 else widths[group + 1], widths[group + 1], stride if b == 0 else 1)
            )
    layers += [
        nn.BatchNorm2d(widths[3]),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(widths[3], num_classes),
    ]
    return nn.Sequential(*layers)


@MODELS.register("wrn28_4")
def wrn28_4(num_classes: int, width: int = 4) -> nn.Module:
    """WRN-28-4 (5.9M parameters), the paper's CIFAR model; `train.width` is not used."""
    return wide_resnet(28, 4, num_classes)


@MODELS.register("wrn10_1")
def wrn10_1(num_classes: int, width: int = 1) -> nn.Module:
    """WRN-10-1 (78k parameters): a residual network of the small CNN's size at width 16 (72k),
    so the audit can be measured on another architecture family at equal capacity and CPU cost;
    `train.width` is not used."""
    return wide_resnet(10, 1, num_classes)


for _name in ("resnet18", "resnet50", "swin_t"):  # torchvision's, as published (Swin-T: stochastic depth 0.2)
    MODELS.register(_name)(
        lambda num_classes, width=64, _name=_name: getattr(_torchvision_models(), _name)(num_classes=num_classes)
    )


def pretrained_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file to fine-tune from: a state_dict (e.g. torchvision's resnet18
    ImageNet weights) or a model.pt this pipeline trained; anything else is refused in one line that
    says what the file is (read as untrusted bytes, like any checkpoint)."""
    try:
        state = read_checkpoint(Path(path))
    except StageError as exc:
        raise StageError(f"train.init_weights: {exc}") from None
    if isinstance(state, dict) and set(state) == {"state_dict", "meta"}:  # our model.pt: Normalized(net)
        state = {name.removeprefix("net."): tensor for name, tensor in state["state_dict"].items()}
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise StageError(f"train.init_weights: {path} is not a state_dict (it holds a {type(state).__name__})")
    return state


def load_pretrained(net: nn.Module, path: str | Path) -> None:
    """Start fine-tuning from `pretrained_state(path)`: every tensor whose name and shape match is
    loaded; a classifier head sized for another label set is left freshly initialised."""
    state = pretrained_state(path)
    own = net.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise StageError(f"train.init_weights: no tensor of {path} fits train.arch")
    net.load_state_dict(matching, strict=False)


def classifier_head(net: nn.Module) -> nn.Linear:
    """The network's last linear layer, the one a linear probe trains (every registered model ends in one)."""
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StageError("train.finetune 'head': the network has no linear layer to train")
    return linears[-1]


def freeze_backbone(net: nn.Module) -> None:
    """Every parameter but the classifier head's stops learning (last-layer fine-tuning)."""
    net.requires_grad_(False)
    classifier_head(net).requires_grad_(True)


def load_fitting(module: nn.Module, state: dict[str, Any]) -> None:
    """Load a whole state_dict, or raise StageError naming the first tensor that does not fit and both
    shapes: torch's own message begins with a line that names neither (and is cut to its first line)."""
    own = module.state_dict()
    for name, tensor in state.items():
        if name in own and isinstance(tensor, torch.Tensor) and tensor.shape != own[name].shape:
            raise StageError(
                f"tensor {name} has shape {tuple(tensor.shape)} in the file, {tuple(own[name].shape)} in the model"
            )
    missing, unexpected = [n for n in own if n not in state], [n for n in state if n not in own]
    if missing or unexpected:
        first = f"tensor {missing[0]} is missing from the file" if missing else f"the file's tensor {unexpected[0]}"
        raise StageError(
            f"{first}{'' if missing else ' is not in the model'} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    module.load_state_dict(state)


class Normalized(nn.Module):
    """Wraps a classifier so it takes uint8-range images: normalisation is part of the model, hence
    identical in training, audit and any black-box use of the checkpoint."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net((images.float() - self.mean) / self.std)


def dp_compatible(net: nn.Module) -> nn.Module:
    """The network with per-sample gradients possible (DP-SGD): BatchNorm mixes the samples of a
    batch, so Opacus swaps it for GroupNorm, and in-place activations would overwrite what its
    backward hooks hold."""
    from opacus.validators import ModuleValidator

    net = ModuleValidator.fix(net)
    for module in net.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return net


def save_weights(model: torch.nn.Module, meta: dict[str, Any], path: Path) -> None:
    """Plain tensors plus JSON metadata: loadable with `torch.load(weights_only=True)`. Saved through a
    file object, so the archive is not named after the temporary file: equal weights, equal bytes."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"state_dict": model.state_dict(), "meta": json.dumps(meta)}, fh)


def read_checkpoint(path: Path) -> Any:
    """`torch.load` restricted to tensors and plain containers (`weights_only`), so nothing in the
    file is executed; every failure becomes one line naming the file and saying what it is."""
    path = Path(path)
    if not path.exists():
        raise StageError(f"{path}: model checkpoint not found")
    if not path.is_file():
        raise StageError(f"{path}: {'a folder' if path.is_dir() else 'not a regular file'}, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch's remarks on pickle protocols mean nothing to the user
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # untrusted bytes: whatever the parser trips on is the file's fault
        raise StageError(f"{path}: {_why_not_loadable(path, exc)}") from None


_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"%PDF": "a PDF document",
    b"\x1f\x8b": "a gzip archive",
    b"\x93NUMPY": "a numpy array file",
    b"\x7fELF": "a program (ELF)",
}
_ALLOWED_MODULES = ("torch", "collections", "_codecs")  # what torch's own checkpoints import


def _why_not_loadable(path: Path, exc: Exception) -> str:
    """What the file is, told from its bytes: only a pickle that imports something beyond torch's
    own classes is called dangerous; an empty, truncated, text or image file is named as such."""
    with open(path, "rb") as fh:
        head = fh.read(1 << 26)  # a checkpoint's pickle (or a zip's index of it) is small; cap what is scanned
    if not head:
        return "not a loadable checkpoint: an empty file"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                pickles = [n for n in archive.namelist() if n.endswith("data.pkl")]
                if not pickles:
                    return "not a loadable checkpoint: a zip archive without a PyTorch checkpoint in it"
                head = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as zip_exc:
            return f"not a loadable checkpoint: a damaged or truncated zip archive ({first_line(zip_exc)})"
    imports = _pickle_imports(head)
    if imports is not None:
        foreign = sorted(i for i in imports if i.split(".")[0] not in _ALLOWED_MODULES)
        if foreign:
            return (
                f"refused: it holds Python objects other than tensors (it imports {', '.join(foreign[:3])}), "
                "and loading those could run code"
            )
        return f"not a loadable checkpoint ({first_line(exc)})"
    kind = next((name for magic, name in _MAGIC.items() if head.startswith(magic)), None)
    if kind is None:
        try:
            head[:4096].decode("utf-8")
            kind = "a text file"
        except UnicodeDecodeError:
            kind = "unrecognised binary data"
    return f"not a loadable checkpoint: {kind}"


def _pickle_imports(data: bytes) -> set[str] | None:
    """The `module.name` globals a pickle stream would import, or None when `data` is no whole pickle."""
    imports, strings = set(), []
    try:
        for op, arg, _ in pickletools.genops(data):
            if isinstance(arg, str):
                strings.append(arg)
            if op.name in ("GLOBAL", "INST"):
                imports.add(arg.replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                imports.add(f"{strings[-2]}.{strings[-1]}")
            if op.name == "STOP":
                return imports
    except Exception:  # not a pickle (or cut short): the caller names what it is instead
        return None
    return None


def load_weights(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild a classifier saved by `save_weights`, without executing any code from the file."""
    blob = read_checkpoint(path)
    try:
        meta = parse_json(blob["meta"])
        net = build_model(meta["arch"], meta["num_classes"], meta["width"])
        model = Normalized(dp_compatible(net) if meta.get("group_norm") else net, meta["mean"], meta["std"])
        load_fitting(model, blob["state_dict"])
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError, StageError) as exc:
        raise StageError(f"{path}: not a usable checkpoint ({first_line(exc)})") from None
    return model.eval(), meta
