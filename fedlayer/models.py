"""Models (FedAvg CNN, MLP, CIFAR ResNet-18, VGG-11) and their layer blocks and named groups.

A **block** is every state-dict tensor owned directly by one module (parameters and buffers, e.g. a
BatchNorm's ``running_mean`` and ``num_batches_tracked``), named by the module's path. Every model names its
classifier blocks in ``HEAD_BLOCKS``; the groups ``head``, ``body`` and ``norm`` are derived from that and
from module types, never from substrings of names.

**Extensions** are modules an algorithm adds to any model with ``head`` / ``body`` groups (FedRoD's second
head, FedDBE's feature bias, FedCP's personal head and policy, GPFL's category embedding and conditional
valve), built on the server and every client alike (:func:`extend`), so the state dict — and with it the
shared / personal key selection — includes them. An extension is attached to the model's own module tree
(keys ``<name>.<tensor>`` beside the model's unchanged keys) and works through forward hooks on the head
block, whose input is the body's features. The declaration (:mod:`strategies.algorithms`) names the
extension and says which of its blocks are shared.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.models.resnet import BasicBlock, ResNet
from torchvision.models.vgg import cfgs as VGG_CFGS

from fedlayer.config import NORMS, ConfigError, StrategyConfig

GROUPS = ("head", "body", "norm")
# By module type, so torchvision's `downsample.1` BatchNorm counts (a substring match on "bn" misses it).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, their lazy variants
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)
GROUP_NORM_GROUPS = 32  # Wu & He (2018) default; capped by gcd so it always divides the channels

NormLayer = Callable[[int], nn.Module]


def _check_norm(model: str, norm: str, allowed: tuple[str, ...]) -> None:
    if norm not in allowed:
        raise ConfigError(
            f"model.norm: {norm!r} is not allowed for {model}; choose one of: {', '.join(allowed)}"
        )


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(GROUP_NORM_GROUPS, channels), channels)


NORM_LAYERS: dict[str, NormLayer | None] = {"none": None, "batch": nn.BatchNorm2d, "group": _group_norm}


class CNN(nn.Module):
    """The FedAvg CNN (McMahan et al., 2017): 5x5 conv 32 + pool, 5x5 conv 64 + pool, fc 512, classifier.

    'Same' padding gives the paper's 1,663,370 parameters on 28x28x1 inputs. ``norm`` = batch | group adds
    ``bn1`` / ``bn2`` after the convolutions (a variant for FedBN; none is the paper's model).
    """

    HEAD_BLOCKS: ClassVar[tuple[str, ...]] = ("fc2",)
    TAIL_BLOCKS: ClassVar[tuple[str, ...]] = ("fc1", "fc2")  # what :meth:`tail` computes from its input
    PADDING: ClassVar[int] = 2  # 'same' for 5x5 kernels

    def __init__(self, num_classes: int, in_channels: int, image_size: int, norm: str = "none") -> None:
        super().__init__()
        _check_norm(model_name(self), norm, NORMS)
        layer = NORM_LAYERS[norm]
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=5, padding=self.PADDING)
        self.bn1 = layer(32) if layer is not None else nn.Identity()
        self.conv2 = nn.Conv2d(32, 64, kernel_size=5, padding=self.PADDING)
        self.bn2 = layer(64) if layer is not None else nn.Identity()
        self.fc1 = nn.Linear(64 * self._pooled_size(image_size) ** 2, 512)
        self.fc2 = nn.Linear(512, num_classes)

    def _pooled_size(self, size: int) -> int:
        for _ in range(2):  # conv (5x5) then 2x2 max-pool, twice
            size = (size + 2 * self.PADDING - 4) // 2
        return size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.tail(x.flatten(1))

    def tail(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from the input of the first of ``TAIL_BLOCKS`` (the flattened features)."""
        return self.fc2(F.relu(self.fc1(z)))


class PFLlibCNN(CNN):
    """PFLlib's ``FedAvgCNN``: the same layers without padding, so fc1 sees 4x4x64 = 1024 features on 28 px.

    582,026 parameters on 28x28x1 inputs (~3x fewer multiply-adds than ``cnn``); block names as in ``cnn``.
    """

    PADDING: ClassVar[int] = 0


class MLP(nn.Module):
    """The FedAvg '2NN' (McMahan et al., 2017): two hidden layers of 200 units with ReLU."""

    HEAD_BLOCKS: ClassVar[tuple[str, ...]] = ("fc3",)
    TAIL_BLOCKS: ClassVar[tuple[str, ...]] = ("fc2", "fc3")

    def __init__(self, num_classes: int, in_channels: int, image_size: int, norm: str = "none") -> None:
        super().__init__()
        _check_norm("mlp", norm, ("none",))
        self.fc1 = nn.Linear(in_channels * image_size**2, 200)
        self.fc2 = nn.Linear(200, 200)
        self.fc3 = nn.Linear(200, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(F.relu(self.fc1(x.flatten(1))))

    def tail(self, z: torch.Tensor) -> torch.Tensor:
        """The logits from the input of ``fc2``."""
        return self.fc3(F.relu(self.fc2(z)))


class ResNet18(ResNet):
    """torchvision's ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool) for 28-32 px inputs.

    ``norm = "none"`` puts ``nn.Identity`` where the norm layers were: no norm blocks, no running stats.
    """

    HEAD_BLOCKS: ClassVar[tuple[str, ...]] = ("fc",)

    def __init__(self, num_classes: int, in_channels: int, image_size: int, norm: str = "none") -> None:
        _check_norm("resnet18", norm, NORMS)
        layer = NORM_LAYERS[norm]
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes, norm_layer=layer or nn.Identity)
        # The ImageNet stem (7x7 stride 2 + max-pool) would shrink 32 px to 8 px before layer1.
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.maxpool = nn.Identity()


def _vgg_features(in_channels: int, image_size: int, layer: NormLayer | None) -> nn.Sequential:
    """torchvision's VGG-11 ``features`` (same module indices as vgg11 / vgg11_bn) for small images."""
    modules: list[nn.Module] = []
    channels, size = in_channels, image_size
    for item in VGG_CFGS["A"]:
        if item == "M":
            # 28 px is 1x1 after four pools; a fifth would leave nothing (it is the last entry: no reindex).
            if size >= 2:
                modules.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            continue
        modules.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
        modules += [layer(int(item))] if layer else []
        modules.append(nn.ReLU(inplace=True))
        channels = int(item)
    return nn.Sequential(*modules)


class VGG11(nn.Module):
    """torchvision's VGG-11 features, global average pooling and a 512-512-classes classifier.

    torchvision's 7x7 pooling and 4096-wide classifier (~120M parameters) are sized for ImageNet; the
    classifier keeps its three Linear layers (``classifier.0/2/4``) without dropout.
    """

    HEAD_BLOCKS: ClassVar[tuple[str, ...]] = ("classifier.4",)

    def __init__(self, num_classes: int, in_channels: int, image_size: int, norm: str = "none") -> None:
        super().__init__()
        _check_norm("vgg11", norm, NORMS)
        self.features = _vgg_features(in_channels, image_size, NORM_LAYERS[norm])
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialization; norm layers keep their default (weight 1, bias 0).
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
            if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.avgpool(self.features(x)).flatten(1))


MODEL_CLASSES: dict[str, type[CNN | MLP | ResNet18 | VGG11]] = {
    "cnn": CNN,
    "pfllib_cnn": PFLlibCNN,
    "mlp": MLP,
    "resnet18": ResNet18,
    "vgg11": VGG11,
}


def build_model(
    name: str, num_classes: int, in_channels: int, image_size: int, norm: str = "none"
) -> nn.Module:
    """Build a model; its initialization is drawn from torch's global RNG (seed it first).

    Parameters
    ----------
    name : str
        One of :data:`MODEL_CLASSES` (``cnn``, ``pfllib_cnn``, ``mlp``, ``resnet18``, ``vgg11``).
    num_classes : int
        Output units of the classifier.
    in_channels : int
        1 (MNIST, Fashion-MNIST) or 3 (CIFAR).
    image_size : int
        Height = width of the inputs, e.g. 28 or 32.
    norm : str
        ``none``, ``batch`` or ``group`` normalization (mlp allows only ``none``).

    Raises
    ------
    ConfigError
        A ValueError naming ``model.name`` or ``model.norm`` and the allowed values.
    """
    if name not in MODEL_CLASSES:
        raise ConfigError(f"model.name: {name!r} is not allowed; choose one of: {', '.join(MODEL_CLASSES)}")
    _check_norm(name, norm, NORMS)
    return MODEL_CLASSES[name](num_classes, in_channels, image_size, norm)


def model_name(model: nn.Module) -> str:
    """The registry name of ``model`` (``cnn``, ...), else its class name."""
    return next((name for name, cls in MODEL_CLASSES.items() if type(model) is cls), type(model).__name__)


def model_blocks(model: nn.Module) -> dict[str, list[str]]:
    """Block name (module path) -> its state-dict keys, both in state-dict (registration) order."""
    blocks: dict[str, list[str]] = {}
    for key in model.state_dict(keep_vars=True):
        module, _, _ = key.rpartition(".")
        blocks.setdefault(module, []).append(key)
    return blocks


def block_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Block name -> the module that owns its tensors."""
    modules = dict(model.named_modules())
    return {name: modules[name] for name in model_blocks(model)}


def model_groups(model: nn.Module) -> dict[str, list[str]]:
    """Named groups -> block names: ``head`` (the classifier), ``body`` (all others), ``norm`` (by type).

    Raises
    ------
    TypeError
        If the model does not define ``HEAD_BLOCKS`` (a tuple of block names).
    """
    modules = block_modules(model)
    head = set(getattr(model, "HEAD_BLOCKS", ()))
    if not head or not head <= modules.keys():
        blocks = ", ".join(modules)
        raise TypeError(
            f"{model_name(model)}: HEAD_BLOCKS must name blocks of the model; blocks are: {blocks}"
        )
    return {
        "head": [name for name in modules if name in head],
        "body": [name for name in modules if name not in head],
        "norm": [name for name, module in modules.items() if isinstance(module, NORM_TYPES)],
    }


# ----------------------------------------------------------------------------- extensions


def tail_blocks(model: nn.Module) -> tuple[str, ...]:
    """The blocks the model's ``tail(z)`` computes from the input z of the first of them, in order (the
    upper layers ``lmc_criterion = "shadow"`` trains shadows of); () for a model without a tail."""
    blocks = tuple(getattr(model, "TAIL_BLOCKS", ()))
    return blocks if callable(getattr(model, "tail", None)) else ()


def head_module(model: nn.Module) -> nn.Module:
    """The model's classifier: the single block of its class's ``head`` group (extensions add theirs to the
    instance's), whose input is the body's features."""
    head = [b for b in model_groups(model)["head"] if b in getattr(type(model), "HEAD_BLOCKS", ())]
    if len(head) != 1:
        raise TypeError(f"{model_name(model)}: an extension needs a head group of one block; it has {head}")
    return block_modules(model)[head[0]]


class DomainBias(nn.Module):
    """FedDBE's personal representation bias (PFLlib's ``client_mean``), added to the body's features."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.client_mean = nn.Parameter(torch.zeros(features))


class RunningMean(nn.Module):
    """FedDBE's running mean of the body's features over a round (shared: the server's sample-weighted
    average is the global mean); ``num_batches_tracked`` > 0 marks an average of real statistics."""

    running_mean: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))


class FeatureBias:
    """FedDBE's forward: the head sees z + client_mean; each forward keeps z (``features``) for the loss."""

    def __init__(self, bias: DomainBias) -> None:
        self.bias = bias
        self.active = True
        self.features: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> FeatureBias:
        twin = FeatureBias(copy.deepcopy(self.bias, memo))
        twin.active = self.active
        return twin

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.features = inputs[0]
        if not self.active:
            return inputs
        return (inputs[0] + self.bias.client_mean, *inputs[1:])


class PersonalHead:
    """FedRoD's forward: logits = g(z) + p(z.detach()), g the generic head, p the personal one on the same
    features z. Each forward keeps both outputs (``generic``, ``personal``) for the recipe's loss;
    ``active = False`` gives g(z) alone (the global model, evaluated on the server)."""

    def __init__(self, personal: nn.Module) -> None:
        self.personal_head = personal
        self.active = True
        self.generic: torch.Tensor | None = None
        self.personal: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> PersonalHead:
        # A copy of the model gets a hook on its own personal head; the last outputs (graph tensors) stay.
        twin = PersonalHead(copy.deepcopy(self.personal_head, memo))
        twin.active = self.active
        return twin

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        self.generic = output
        if not self.active:
            return output
        self.personal = self.personal_head(inputs[0].detach())
        return output + self.personal


def rod_head(model: nn.Module, strategy: StrategyConfig) -> None:
    """FedRoD (Chen & Chao, 2022): a personal head ``rod_head``, a copy of the initial generic head (as
    PFLlib), on the body's features; it joins the ``head`` group."""
    head = head_module(model)
    personal = copy.deepcopy(head)
    model.add_module("rod_head", personal)
    heads: tuple[str, ...] = tuple(getattr(model, "HEAD_BLOCKS", ()))
    model.HEAD_BLOCKS = (*heads, "rod_head")  # type: ignore[assignment]
    head.register_forward_hook(PersonalHead(personal))


def head_weight(head: nn.Module) -> torch.Tensor:
    """The head's weight (classes x features)."""
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise TypeError(f"an extension needs a head block with a weight; got {type(head).__name__}")
    return weight


def feature_size(head: nn.Module) -> int:
    """Width of the features a head takes (its weight's input dimension)."""
    return int(head_weight(head).shape[1])


def dbe(model: nn.Module, strategy: StrategyConfig) -> None:
    """FedDBE (Zhang et al., 2023): ``dbe_bias`` (personal bias of the features) and ``dbe_mean`` (their
    running mean, shared) on the head's input."""
    head = head_module(model)
    features = feature_size(head)
    bias = DomainBias(features)
    model.add_module("dbe_bias", bias)
    model.add_module("dbe_mean", RunningMean(features))
    head.register_forward_pre_hook(FeatureBias(bias))


CP_TAU = 1.0  # PFLlib's FedCP: Ensemble.tau = 1, hard = False (soft masks), whatever its --tau says


class ConditionalPolicy(nn.Module):
    """FedCP's Conditional Policy Network (PFLlib's ``ConditionalSelection``): Linear(d, 2d), LayerNorm,
    ReLU; per sample the 2d outputs are two rows of d logits, the personal and the global one per feature."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 2 * features)
        self.norm = nn.LayerNorm(2 * features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.linear(x))).view(x.shape[0], 2, -1)


def head_context(head: nn.Module) -> torch.Tensor:
    """FedCP's client context: the head's weight summed over its rows (classes), L2-normalised (PFLlib's
    ``set_head_g`` and ``Ensemble.forward``); a constant, no gradient."""
    weight = head.weight
    assert isinstance(weight, torch.Tensor)
    return F.normalize(weight.detach().sum(0), p=2, dim=0)


def gumbel(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Gumbel(0, 1) noise as ``F.gumbel_softmax`` draws it (-log of Exp(1)), from ``generator`` (CPU)."""
    return -torch.empty(shape).exponential_(generator=generator).log()


class FeatureSplit:
    """FedCP's forward on the features z: masks (pm, gm) = softmax over the policy's two logits per feature
    of z ⊙ c (c: :func:`head_context` of the personal head), so gm = 1 - pm; the logits are
    h_p(z ⊙ pm) + h_g(z ⊙ gm), h_g the model's own head (global), h_p the personal head ``cp_head``.

    While the recipe sets ``generator`` the logits get Gumbel noise from it (training, PFLlib's
    ``gumbel_softmax``); otherwise the masks are noise-free, so an evaluation is a deterministic function of
    the weights. ``context`` set by the recipe holds c fixed for a round (PFLlib sets it when the round's
    global head arrives); else c follows the personal head. Each forward keeps z (``features``) for the
    recipe's MMD term; ``active = False`` gives h_g(z) alone (the global model, evaluated on the server).
    """

    def __init__(self, personal: nn.Module, policy: ConditionalPolicy) -> None:
        self.personal_head = personal
        self.policy = policy
        self.active = True
        self.context: torch.Tensor | None = None
        self.generator: torch.Generator | None = None
        self.features: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> FeatureSplit:
        # The copy's hook works on the copy's modules; the recipe's round settings and graph tensors stay.
        twin = FeatureSplit(copy.deepcopy(self.personal_head, memo), copy.deepcopy(self.policy, memo))
        twin.active = self.active
        return twin

    def masks(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pm, gm) for the features ``z``."""
        context = self.context if self.context is not None else head_context(self.personal_head)
        logits = self.policy(z * context.to(z.device))
        if self.generator is not None:
            logits = logits + gumbel(logits.shape, self.generator).to(logits.device)
        masks = torch.softmax(logits / CP_TAU, dim=1)
        return masks[:, 0], masks[:, 1]

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        z = self.features = inputs[0]
        if not self.active:
            return output
        pm, gm = self.masks(z)
        # module.forward runs the global head without its hooks (this one included).
        return self.personal_head(z * pm) + module.forward(z * gm)


def cp(model: nn.Module, strategy: StrategyConfig) -> None:
    """FedCP (Zhang et al., 2023): a personal head ``cp_head``, a copy of the initial head (PFLlib's
    ``head_g`` and ``model.head`` start equal), joining the ``head`` group, and the policy ``cp_policy``;
    the model's own head becomes the global head (:class:`FeatureSplit`)."""
    head = head_module(model)
    personal = copy.deepcopy(head)
    policy = ConditionalPolicy(feature_size(head))
    model.add_module("cp_head", personal)
    model.add_module("cp_policy", policy)
    heads: tuple[str, ...] = tuple(getattr(model, "HEAD_BLOCKS", ()))
    model.HEAD_BLOCKS = (*heads, "cp_head")  # type: ignore[assignment]
    head.register_forward_hook(FeatureSplit(personal, policy))


class ConditionalValve(nn.Module):
    """GPFL's Conditional Valve (PFLlib's ``CoV``): per-feature γ = LN(ReLU(W_γ c + b_γ)) and
    β = LN(ReLU(W_β c + b_β)) from a conditional input c; the features z become ReLU(z ⊙ (1 + γ) + β)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.LayerNorm([features]))
        self.beta = nn.Sequential(nn.Linear(features, features), nn.ReLU(), nn.LayerNorm([features]))

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return F.relu(z * (1 + self.gamma(context)) + self.beta(context))


class ConditionalInputs(nn.Module):
    """GPFL's personal conditional inputs: ``generic`` (mean of the class embeddings) and ``personal``
    (their mean weighted by the client's class shares), computed after local training; zeros before."""

    generic: torch.Tensor
    personal: torch.Tensor

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("generic", torch.zeros(features))
        self.register_buffer("personal", torch.zeros(features))


def category_logits(features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """GPFL's Global Category Embedding scores: cosine similarity of each feature row to each class's
    embedding (PFLlib's ``GCE.forward`` before its log-softmax)."""
    return F.linear(F.normalize(features), F.normalize(embedding))


class ValveInput:
    """GPFL's forward (pre-hook on the head): the head sees CoV(z, personal input); each forward keeps z
    (``features``) for the loss. ``active = False`` (the global model) conditions on the generic input of the
    model's own GCE, the mean of its class embeddings (the server holds no client's inputs)."""

    def __init__(self, valve: ConditionalValve, inputs: ConditionalInputs, embedding: nn.Embedding) -> None:
        self.valve, self.inputs, self.embedding = valve, inputs, embedding
        self.active = True
        self.features: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, object]) -> ValveInput:
        twin = ValveInput(
            copy.deepcopy(self.valve, memo),
            copy.deepcopy(self.inputs, memo),
            copy.deepcopy(self.embedding, memo),
        )
        twin.active = self.active
        return twin

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        self.features = inputs[0]
        context = self.inputs.personal if self.active else self.embedding.weight.mean(0)
        return (self.valve(inputs[0], context), *inputs[1:])


class CategoryOutput:
    """GPFL's global prediction (forward hook on the head): with ``active = False`` the logits are the
    cosine scores of the conditioned features against the GCE (:func:`category_logits`), the classifier
    GPFL trains on the generic branch; active, the head's own output."""

    def __init__(self, embedding: nn.Embedding) -> None:
        self.embedding = embedding
        self.active = True

    def __deepcopy__(self, memo: dict[int, object]) -> CategoryOutput:
        twin = CategoryOutput(copy.deepcopy(self.embedding, memo))
        twin.active = self.active
        return twin

    def __call__(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        return output if self.active else category_logits(inputs[0], self.embedding.weight)


def gpfl(model: nn.Module, strategy: StrategyConfig) -> None:
    """GPFL (Zhang et al., 2023): ``gpfl_gce`` (the Global Category Embedding, one row per class),
    ``gpfl_cov`` (the Conditional Valve on the head's input) and ``gpfl_inputs`` (the personal conditional
    inputs) beside the model."""
    head = head_module(model)
    classes, features = head_weight(head).shape[:2]
    embedding = nn.Embedding(classes, features)
    valve = ConditionalValve(features)
    inputs = ConditionalInputs(features)
    model.add_module("gpfl_gce", embedding)
    model.add_module("gpfl_cov", valve)
    model.add_module("gpfl_inputs", inputs)
    head.register_forward_pre_hook(ValveInput(valve, inputs, embedding))
    head.register_forward_hook(CategoryOutput(embedding))


EXTENSIONS: dict[str, Callable[[nn.Module, StrategyConfig], None]] = {
    "rod_head": rod_head,
    "dbe": dbe,
    "cp": cp,
    "gpfl": gpfl,
}


def extend(model: nn.Module, name: str | None, strategy: StrategyConfig) -> nn.Module:
    """``model`` with the extension ``name`` attached (``None``: unchanged)."""
    if name is not None:
        EXTENSIONS[name](model, strategy)
    return model


Hook = PersonalHead | FeatureBias | FeatureSplit | ValveInput | CategoryOutput


def hooks_of(model: nn.Module) -> list[Hook]:
    """The extension hooks on the model's modules (a deep copy of a model has its own)."""
    hooks = [h for m in model.modules() for h in [*m._forward_hooks.values(), *m._forward_pre_hooks.values()]]
    return [h for h in hooks if isinstance(h, Hook)]


def global_view(model: nn.Module) -> nn.Module:
    """The model as the server evaluates it: the extensions' personal parts off (FedRoD: g(z) alone; FedDBE:
    no personal bias; FedCP: the global head on the whole features, h_g(z); GPFL: the GCE's cosine scores of
    CoV(z, generic input))."""
    for hook in hooks_of(model):
        hook.active = False
    return model
