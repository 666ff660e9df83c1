"""The paper's CNN (`AttentionCNN`), its input scaling, and the fused stack of same-shaped CNNs (`_CNNStack`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from jaxtyping import Complex, Float
from torch import Tensor, nn

from mechmem.cnn.config import CNNConfig, INPUT_SCALINGS, LOG_EPS


def feature_side(seq_len: int, kernel_size: int) -> int:
    """Side of the feature map after conv(k) -> maxpool(2) -> conv(k) -> maxpool(2)."""
    side = (seq_len - kernel_size + 1) // 2
    side = (side - kernel_size + 1) // 2
    if side < 1:
        raise ValueError(f"seq_len {seq_len} is too short for kernel_size {kernel_size}")
    return side


def scaling_shape(scaling: str, n_layers: int, seq_len: int) -> tuple[int, int, int]:
    """Shape of an `InputScaling`'s statistics: one per layer, or one per (layer, query, key)."""
    return (n_layers, 1, 1) if scaling == "layer" else (n_layers, seq_len, seq_len)


def scale_input(x: Tensor, mean: Tensor, std: Tensor, log: bool) -> Tensor:
    """(f(x) - mean) / std, f = log(x + LOG_EPS) or identity: what InputScaling and the fused stack apply."""
    return ((torch.log(x + LOG_EPS) if log else x) - mean) / std


class InputScaling(nn.Module):
    """x -> (f(x) - mean) / std with fixed statistics of the training split; f = log(x + LOG_EPS) or identity."""

    mean: Tensor  # buffers, declared for the type checker
    std: Tensor

    def __init__(self, scaling: str, n_layers: int, seq_len: int):
        super().__init__()
        if scaling not in INPUT_SCALINGS[1:]:
            raise ValueError(f"InputScaling takes one of {INPUT_SCALINGS[1:]}, got {scaling!r}")
        self.scaling, self.log = scaling, scaling.startswith("log")
        shape = scaling_shape(scaling, n_layers, seq_len)
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("std", torch.ones(shape))

    def forward(self, x: Float[Tensor, "batch layer query key"]) -> Float[Tensor, "batch layer query key"]:
        return scale_input(x, self.mean, self.std, self.log)


# The CNN, layer by layer: one definition that both the single network (AttentionCNN, a module per
# entry, named so that localization can hook the ReLUs) and the fused stack (_CNNStack: the same
# sequence over G members at once, grouped convolutions and batched linears) are built from.
LAYERS: tuple[tuple[str, str], ...] = (
    ("conv1", "conv"), ("relu1", "relu"), ("drop1", "dropout"), ("pool1", "pool"),
    ("conv2", "conv"), ("relu2", "relu"), ("drop2", "dropout"), ("pool2", "pool"),
    ("flatten", "flatten"),  # (c h w) order
    ("fc1", "linear"), ("relu3", "relu"), ("drop3", "dropout"),
    ("fc2", "linear"),
)


def _layer_shapes(config: CNNConfig, n_layers: int, n_classes: int, seq_len: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each trained layer."""
    c, fc, side = config.channels, config.n_feat_fc, feature_side(seq_len, config.kernel_size)
    return {"conv1": (n_layers, c), "conv2": (c, c), "fc1": (c * side * side, fc), "fc2": (fc, n_classes)}


def fft_conv2d(x: Float[Tensor, "batch group_in h w"], weight: Float[Tensor, "group_out c_in k k"],
               bias: Float[Tensor, " group_out"], groups: int) -> Float[Tensor, "batch group_out h_out w_out"]:
    """What `F.conv2d(x, weight, bias, groups=groups)` computes (valid cross-correlation, stride 1),
    through the FFT: a k x k kernel on an h x w map costs a product per frequency instead of k^2
    multiply-adds a pixel (36 and 64 for the paper's kernels), and the transforms run at memory speed.
    cuDNN's grouped convolutions of the fused stack run near 10 TFLOP/s on an H100, far from its
    tensor cores; this is what makes the paper's grid at Pythia scale minutes (benchmarks/README.md).
    Float32 inside (also under bf16 autocast); it agrees with the direct convolution to float
    rounding (about 1e-6 relative), not bit for bit.
    """
    return spectrum_conv2d(Spectrum.of(x), weight, bias, groups)


class Spectrum(NamedTuple):
    """rfft2 of a convolution's input, with the input's height and width: the fleet transforms the
    scaled inputs once a step for all stacks that read them (`_CNNStack.forward` takes it in place of x)."""

    freq: Complex[Tensor, "batch channel h f"]
    size: tuple[int, int]

    @classmethod
    def of(cls, x: Float[Tensor, "batch channel h w"]) -> Spectrum:
        return cls(torch.fft.rfft2(x.float()), (x.shape[-2], x.shape[-1]))

    def select(self, index: Tensor, n_members: int) -> Spectrum:
        """The members `index` of a spectrum whose channels are "(member ...)" over `n_members`."""
        return Spectrum(select_channels(self.freq, index, n_members), self.size)


def spectrum_conv2d(x: Spectrum, weight: Float[Tensor, "group_out c_in k k"], bias: Float[Tensor, " group_out"],
                    groups: int) -> Float[Tensor, "batch group_out h_out w_out"]:
    """`fft_conv2d` from its input's spectrum."""
    h, w = x.size
    n_out, n_in, k, _ = weight.shape
    xf = x.freq.unflatten(1, (groups, n_in))
    wf = torch.fft.rfft2(weight.float(), s=(h, w)).unflatten(0, (groups, n_out // groups))
    # Circular cross-correlation is X * conj(W) per frequency; its first h-k+1 rows and columns never wrap.
    yf = einsum(xf, wf.conj(), "b g i h f, g o i h f -> b g o h f")
    y = torch.fft.irfft2(yf, s=(h, w))[..., : h - k + 1, : w - k + 1]
    return y.flatten(1, 2) + bias[:, None, None]


def dropout_mask(shape: torch.Size, p: float, generator: torch.Generator, device: torch.device) -> Tensor:
    """Dropout's keep-mask drawn from `generator`: a CNN's masks come from its own generator, so it
    trains the same alone, in a stack, or in the plain loop."""
    return torch.rand(shape, generator=generator, device=device) >= p


class SeededDropout(nn.Dropout):
    """nn.Dropout whose masks come from `generator` when one is set (training sets it); else torch's own."""

    generator: torch.Generator | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0 or self.generator is None:
            return super().forward(x)
        return x * dropout_mask(x.shape, self.p, self.generator, x.device) / (1 - self.p)


class AttentionCNN(nn.Module):
    """[input scaling ->] conv -> ReLU -> dropout -> maxpool, twice, then linear -> ReLU -> dropout -> linear.

    Layers are modules in one `nn.Sequential` (not functional calls), built from LAYERS, so that
    localization can hook the ReLUs by name for guided backpropagation. The input scaling (absent
    for "raw") holds the training split's statistics, so the CNN always reads raw pooled attention.
    """

    def __init__(self, n_layers: int, n_classes: int, config: CNNConfig = CNNConfig(), seq_len: int = 64,
                 input_scaling: str = "raw"):
        super().__init__()
        if n_layers < 1 or n_classes < 2:
            raise ValueError(f"need n_layers >= 1 and n_classes >= 2, got {n_layers}, {n_classes}")
        self.config, self.n_layers, self.n_classes, self.seq_len = config, n_layers, n_classes, seq_len
        self.input_scaling = input_scaling
        shapes = _layer_shapes(config, n_layers, n_classes, seq_len)
        make = {
            "conv": lambda name: nn.Conv2d(*shapes[name], config.kernel_size),
            "linear": lambda name: nn.Linear(*shapes[name]),
            "relu": lambda name: nn.ReLU(),
            "dropout": lambda name: SeededDropout(config.dropout),
            "pool": lambda name: nn.MaxPool2d(2),
            "flatten": lambda name: nn.Flatten(),
        }
        scale = [] if input_scaling == "raw" else [("scale", InputScaling(input_scaling, n_layers, seq_len))]
        self.layers = nn.Sequential(OrderedDict(scale + [(name, make[kind](name)) for name, kind in LAYERS]))

    def forward(self, x: Float[Tensor, "batch layer query key"]) -> Float[Tensor, "batch class"]:
        return self.layers(x)

    def set_dropout_generator(self, generator: torch.Generator | None) -> None:
        """Draw every dropout mask from `generator` (None: torch's global generator)."""
        for name, kind in LAYERS:
            if kind == "dropout":
                self.layers.get_submodule(name).generator = generator  # type: ignore[assignment]

    @property
    def fc_in_features(self) -> int:
        return self.layers.get_submodule("fc1").in_features  # type: ignore[return-value]

    @property
    def scale(self) -> InputScaling:
        """The input scaling layer (absent, KeyError, for "raw")."""
        return self.layers.get_submodule("scale")  # type: ignore[return-value]


class _CNNStack(nn.Module):
    """G same-shaped AttentionCNNs run as one network: LAYERS over a member axis.

    Input channels are the members' inputs side by side, "(member layer)"; grouped convolutions keep
    the members apart, and the linear layers are batched matmuls over a member axis. Dropout masks
    are drawn per member from the member's own generator, with the shapes a lone member would draw,
    so a member trains the same whether it is stacked with others or alone.
    """

    scale_mean: Tensor  # buffers (with input scaling), declared for the type checker
    scale_std: Tensor

    def __init__(self, members: Sequence[AttentionCNN]):
        super().__init__()
        first = members[0]
        if any(m.config.shape_key != first.config.shape_key or m.n_layers != first.n_layers
               or m.n_classes != first.n_classes or m.seq_len != first.seq_len
               or m.input_scaling != first.input_scaling for m in members):
            raise ValueError("only same-shaped AttentionCNNs can be stacked")
        self.configs = [m.config for m in members]
        self.n_layers, self.n_classes, self.seq_len = first.n_layers, first.n_classes, first.seq_len
        self.input_scaling = first.input_scaling
        G, k = len(members), first.config.kernel_size
        self.n_members, self.p = G, first.config.dropout
        shapes = _layer_shapes(first.config, first.n_layers, first.n_classes, first.seq_len)
        for name, kind in LAYERS:
            n_in, n_out = shapes.get(name, (0, 0))
            if kind == "conv":
                setattr(self, name, nn.Conv2d(G * n_in, G * n_out, k, groups=G))
            elif kind == "linear":
                setattr(self, f"{name}_w", nn.Parameter(torch.empty(G, n_out, n_in)))
                setattr(self, f"{name}_b", nn.Parameter(torch.empty(G, n_out)))
        self.log = self.input_scaling.startswith("log")
        if self.input_scaling != "raw":  # members' statistics side by side: "(member layer) query key"
            self.register_buffer("scale_mean", torch.cat([m.scale.mean for m in members]).clone())
            self.register_buffer("scale_std", torch.cat([m.scale.std for m in members]).clone())
        for g, m in enumerate(members):
            self.load_member_state(g, m.state_dict())
        self.generators: list[torch.Generator] | None = None  # per-member dropout RNGs, set to train
        self.fft = False  # convolutions through the FFT (`fft_conv2d`), set by the trainer on a GPU

    def _member_views(self, g: int) -> dict[str, Tensor]:
        """Member g's trained parameters as views into the stack, named as in an AttentionCNN."""
        views: dict[str, Tensor] = {}
        for name, kind in LAYERS:
            if kind == "conv":
                conv = getattr(self, name)
                C = conv.out_channels // self.n_members
                views |= {f"layers.{name}.{p}": getattr(conv, p)[g * C:(g + 1) * C] for p in ("weight", "bias")}
            elif kind == "linear":
                views |= {f"layers.{name}.weight": getattr(self, f"{name}_w")[g],
                          f"layers.{name}.bias": getattr(self, f"{name}_b")[g]}
        return views

    def member_state(self, g: int) -> dict[str, Tensor]:
        """A copy of member g's trained parameters (what early stopping keeps of its best epoch)."""
        return {k: v.detach().clone() for k, v in self._member_views(g).items()}

    def load_member_state(self, g: int, state: dict[str, Tensor]) -> None:
        with torch.no_grad():
            for k, v in self._member_views(g).items():
                v.copy_(state[k])

    def _dropout(self, x: Tensor) -> Tensor:
        """Dropout with member g's mask drawn from generator g; x's axis 1 is (member ...)."""
        if not self.training or self.p == 0:
            return x
        if self.generators is None:
            raise RuntimeError("set _CNNStack.generators before training")
        # Each member's uniforms drawn into its own contiguous slice, in the shape a lone member draws
        # (the numbers `dropout_mask` gives), then one comparison and one reshape for the whole stack:
        # half the kernels of a draw, a comparison and a concatenation a member.
        G = self.n_members
        u = torch.empty((G, x.shape[0], x.shape[1] // G, *x.shape[2:]), device=x.device)
        for g, generator in enumerate(self.generators):
            u[g].uniform_(generator=generator)
        return x * rearrange(u >= self.p, "g b c ... -> b (g c) ...") / (1 - self.p)

    def forward(self, x: Float[Tensor, "batch member_layer query key"] | Spectrum, scaled: bool = False
                ) -> Float[Tensor, "batch member class"]:
        """x: the members' inputs; `scaled`: already scaled by the members' statistics. A `Spectrum`
        (of scaled inputs, FFT path only) stands for x where the caller transformed the inputs once
        for several stacks; the output is the same."""
        h: Tensor
        if isinstance(x, Spectrum):  # the first convolution from the caller's transform
            if not self.fft:
                raise ValueError("a Spectrum input needs the FFT path (stack.fft)")
            (first, _), *rest = LAYERS
            conv = getattr(self, first)
            h, layers = spectrum_conv2d(x, conv.weight, conv.bias, conv.groups), tuple(rest)
        else:
            raw = scaled or self.input_scaling == "raw"
            h, layers = x if raw else scale_input(x, self.scale_mean, self.scale_std, self.log), LAYERS
        for name, kind in layers:
            if kind == "conv":
                conv = getattr(self, name)
                h = fft_conv2d(h, conv.weight, conv.bias, conv.groups) if self.fft else conv(h)
            elif kind == "linear":
                h = einsum(h, getattr(self, f"{name}_w"), "b g i, g o i -> b g o") + getattr(self, f"{name}_b")
            elif kind == "relu":
                h = F.relu(h)
            elif kind == "dropout":
                h = self._dropout(h)
            elif kind == "pool":
                h = F.max_pool2d(h, 2)
            elif kind == "flatten":
                h = rearrange(h, "b (g c) h w -> b g (c h w)", g=self.n_members)
        return h

    def keep(self, members: Sequence[int]) -> Tensor:
        """Keep only these members (positions, in this order), dropping the others' compute.

        Every parameter and buffer has the member axis first ("(member ...)"), so keeping is one
        slice each. Returns the index that slices a tensor of the old stack's layout (an optimizer's
        state) into the new one's: `select(t, index, n_old)`.
        """
        index = torch.tensor(list(members), dtype=torch.long, device=next(self.parameters()).device)
        G = self.n_members
        for module in [self, *[getattr(self, name) for name, kind in LAYERS if kind == "conv"]]:
            for name, param in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(select(param.detach(), index, G)))
            for name, buf in list(module.named_buffers(recurse=False)):
                setattr(module, name, select(buf, index, G))
        for name, kind in LAYERS:
            if kind == "conv":
                conv = getattr(self, name)
                conv.in_channels = conv.in_channels // G * len(index)
                conv.out_channels = conv.out_channels // G * len(index)
                conv.groups = len(index)
        self.configs = [self.configs[g] for g in members]
        if self.generators is not None:
            self.generators = [self.generators[g] for g in members]
        self.n_members = len(index)
        return index

    def unstack(self, members: Sequence[int] | None = None) -> list[AttentionCNN]:
        """The members (all, or these positions) as standalone AttentionCNNs (copies, on this stack's device)."""
        out = []
        L = self.n_layers
        for g in range(self.n_members) if members is None else members:
            config = self.configs[g]
            model = AttentionCNN(self.n_layers, self.n_classes, config, self.seq_len, self.input_scaling)
            state = self.member_state(g)
            if self.input_scaling != "raw":
                state |= {"layers.scale.mean": self.scale_mean[g * L:(g + 1) * L].clone(),
                          "layers.scale.std": self.scale_std[g * L:(g + 1) * L].clone()}
            model.load_state_dict(state)
            out.append(model.to(next(self.parameters()).device).eval())
        return out




def select(t: Tensor, index: Tensor, n_members: int) -> Tensor:
    """The members `index` of a tensor whose first axis is "(member ...)" over `n_members` members."""
    return t.unflatten(0, (n_members, -1))[index].flatten(0, 1).contiguous()


def select_channels(t: Tensor, index: Tensor, n_members: int) -> Tensor:
    """`select` along the second axis: the members `index` of a batch whose channels are "(member ...)"."""
    return t.unflatten(1, (n_members, -1))[:, index].flatten(1, 2)
