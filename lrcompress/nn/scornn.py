"""The scaled Cayley orthogonal RNN (scoRNN) layer and its optimiser setup.

Helfrich, Willmott and Ye, "Orthogonal Recurrent Neural Networks with Scaled Cayley Transform",
ICML 2018: a plain RNN whose recurrent matrix ``W = (I + A)^{-1}(I - A) D`` stays orthogonal
(``lrcompress.orthogonal.ScaledCayley``), with the modReLU activation of Arjovsky, Shah and Bengio
(ICML 2016), and a separate learning rate for ``A``::

    h_t = modReLU(W h_{t-1} + V x_t + c),     modReLU(z) = sign(z) * relu(|z| + b)

    >>> rnn = ScoRNN(1, 170, negatives=17)         # the paper's MNIST model
    >>> out, h = rnn(torch.zeros(784, 2, 1))        # (steps, batch, input) -> (784, 2, 170), (1, 2, 170)
    >>> opt = scornn_optimizer(model, lr=1e-3, lr_orthogonal=1e-4)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..errors import ConfigError
from ..parametrizations import chained
from ..structured.orthogonal import ScaledCayley, random_originals


def modrelu(z: Tensor, b: Tensor) -> Tensor:
    """``sign(z) * relu(|z| + b)`` (Arjovsky et al. 2016, eq. 8, for real ``z``): keeps the sign,
    shrinks the magnitude by ``-b`` (zero when ``|z| <= -b``)."""
    return torch.sign(z) * torch.relu(z.abs() + b)


class ScoRNN(nn.Module):
    """One-layer scoRNN over a sequence, called like ``nn.RNN``: ``(output, h_n)``.

    Args: ``input_size``, ``hidden_size`` (n); ``negatives``: the number of ``-1`` entries of ``D``
    (the paper's rho; default ``n // 10``, the paper's MNIST setting of 17 for n = 170; its copy
    task used n/2); ``batch_first``; ``bias``: a bias ``c`` on the input map ``V x_t`` (as
    ``nn.RNN``'s ``bias_ih``); the modReLU bias ``b`` is always there (without it modReLU is the
    identity).

    Weights: ``weight_ih_l0`` ``(n, input_size)`` and ``bias_ih_l0`` ``(n,)``, drawn as ``nn.RNN``
    draws them (``U(-1/sqrt(n), 1/sqrt(n))``; the paper's code used ``U(-0.01, 0.01)`` for ``V``);
    ``weight_hh_l0`` ``(n, n)``, a ``ScaledCayley`` parametrization whose original
    ``parametrizations.weight_hh_l0.original0`` holds ``A``'s upper triangle (scoRNN's initial
    ``A``, ``orthogonal.random_originals``) and whose buffer ``...0.signs`` is ``D`` (the last
    ``negatives`` entries -1); ``modrelu_bias_l0`` ``(n,)``, zeros as in the paper's code.

    Input ``(L, N, input_size)`` (``(N, L, input_size)`` with ``batch_first``) or unbatched
    ``(L, input_size)``; ``hx`` ``(1, N, n)`` (``(1, n)`` unbatched), zeros when omitted. Returns
    ``output`` ``(L, N, n)`` (every ``h_t``) and ``h_n`` ``(1, N, n)``. A wrong shape raises
    ``ConfigError`` naming it.
    """

    def __init__(self, input_size: int, hidden_size: int, *, negatives: int | None = None,
                 batch_first: bool = False, bias: bool = True, device=None, dtype=None):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"ScoRNN {name} must be a positive integer, got {v!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.batch_first, self.bias = batch_first, bias
        self.negatives = hidden_size // 10 if negatives is None else negatives
        factory = {"device": device, "dtype": dtype}
        self.weight_ih_l0 = nn.Parameter(torch.empty(hidden_size, input_size, **factory))
        self.bias_ih_l0 = nn.Parameter(torch.empty(hidden_size, **factory)) if bias else None
        self.modrelu_bias_l0 = nn.Parameter(torch.zeros(hidden_size, **factory))
        self.weight_hh_l0 = nn.Parameter(torch.empty(hidden_size, hidden_size, **factory))
        param = ScaledCayley(1, hidden_size, hidden_size, negatives=self.negatives).to(device=device)
        param._pending = random_originals(1, hidden_size, hidden_size, options={"negatives": self.negatives},
                                          dtype=self.weight_hh_l0.dtype, device=self.weight_hh_l0.device)
        # unsafe: the placeholder weight is never read (the originals are drawn), and the
        # parametrization gives an (n, n) weight of the same dtype by construction.
        parametrize.register_parametrization(self, "weight_hh_l0", param, unsafe=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-draw every weight: ``V``, ``c`` as ``nn.RNN``; ``A`` as scoRNN; ``b = 0``; ``D`` kept."""
        k = 1.0 / math.sqrt(self.hidden_size)
        plist = self.parametrizations.weight_hh_l0
        with torch.no_grad():
            nn.init.uniform_(self.weight_ih_l0, -k, k)
            if self.bias_ih_l0 is not None:
                nn.init.uniform_(self.bias_ih_l0, -k, k)
            self.modrelu_bias_l0.zero_()
            a = plist.original0
            a.copy_(random_originals(1, self.hidden_size, self.hidden_size, options={"negatives": self.negatives},
                                     dtype=a.dtype, device=a.device)[0])

    def forward(self, input: Tensor, hx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = self.hidden_size
        if input.dim() not in (2, 3) or input.shape[-1] != self.input_size:
            raise ConfigError(f"ScoRNN input of shape {tuple(input.shape)} is not (steps, batch, {self.input_size}) "
                              f"or (steps, {self.input_size})")
        unbatched = input.dim() == 2
        x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if self.batch_first else input)
        steps, batch = x.shape[0], x.shape[1]
        if hx is None:
            h = x.new_zeros(batch, n)
        else:
            want = (1, n) if unbatched else (1, batch, n)
            if tuple(hx.shape) != want:
                raise ConfigError(f"ScoRNN hx of shape {tuple(hx.shape)} is not {want}")
            h = hx.reshape(batch, n)
        W = self.weight_hh_l0  # rebuilt once per call
        drive = x @ self.weight_ih_l0.T  # every V x_t at once, (steps, batch, n)
        if self.bias_ih_l0 is not None:
            drive = drive + self.bias_ih_l0
        outputs = []
        for t in range(steps):
            h = modrelu(h @ W.T + drive[t], self.modrelu_bias_l0)
            outputs.append(h)
        output = torch.stack(outputs) if outputs else x.new_zeros(0, batch, n)
        h_n = h.unsqueeze(0)
        if unbatched:
            return output.squeeze(1), h_n.squeeze(1)
        return (output.transpose(0, 1) if self.batch_first else output), h_n

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, negatives={self.negatives}, "
                f"batch_first={self.batch_first}, bias={self.bias}")


def orthogonal_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The skew originals (``A``'s upper triangles) of every ``ScaledCayley`` weight in ``model``."""
    found = []
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for plist in m.parametrizations.values():
                if len(chained(plist)) == 1 and isinstance(plist[0], ScaledCayley):
                    # A factor parametrized in turn trains through its own original.
                    own = parametrize.is_parametrized(plist, "original0")
                    found.append(plist.parametrizations.original0.original if own else plist.original0)
    return found


def scornn_optimizer(model: nn.Module, lr: float = 1e-3, lr_orthogonal: float = 1e-4, *,
                     optimizer: str = "rmsprop", **kwargs) -> torch.optim.Optimizer:
    """One ``torch.optim`` optimiser with two parameter groups: every scaled Cayley original
    (``A``, any ``ScaledCayley`` weight in ``model``) at ``lr_orthogonal``, the rest at ``lr``.

    scoRNN trains ``A`` with its own, smaller learning rate (the paper's code: RMSprop, 1e-3 for
    the other weights and 1e-4 for ``A`` on MNIST and the copy task). Autograd through the
    parametrization gives exactly the paper's gradient (Theorem 3.3, ``V^T - V`` with
    ``V = (I + A)^{-T} dL/dW (D + W^T)``, on the upper triangle). ``optimizer``: ``"rmsprop"``
    (``alpha=0.9`` unless given: TensorFlow's decay, which the paper's code used), ``"adam"`` or
    ``"sgd"``; ``kwargs`` go to its constructor. Raises ``ConfigError`` for a model without a
    scaled Cayley weight, an unknown optimiser or a learning rate that is not positive.

        >>> opt = scornn_optimizer(ScoRNN(1, 64), lr=1e-3, lr_orthogonal=1e-4)
        >>> [g["lr"] for g in opt.param_groups]
        [0.001, 0.0001]
    """
    classes = {"rmsprop": torch.optim.RMSprop, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}
    if optimizer not in classes:
        raise ConfigError(f"optimizer must be one of {', '.join(classes)}, got {optimizer!r}")
    for name, v in (("lr", lr), ("lr_orthogonal", lr_orthogonal)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or not math.isfinite(v):
            raise ConfigError(f"{name} must be a positive number, got {v!r}")
    skew = orthogonal_parameters(model)
    if not skew:
        raise ConfigError(f"{type(model).__name__} has no scaled Cayley weight (see ScoRNN, scaled_cayley())")
    ids = {id(p) for p in skew}
    rest = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
    if optimizer == "rmsprop":
        kwargs.setdefault("alpha", 0.9)
    groups = [{"params": rest, "lr": lr}] if rest else []
    groups.append({"params": skew, "lr": lr_orthogonal})
    return classes[optimizer](groups, **kwargs)
