"""Recurrent layers and cells with structured weights, built from scratch: ``structured_rnn``.

``LowRankGRU(..., rank=24)`` builds a low-rank layer; ``structured_rnn`` builds any structure of
``lrcompress.structures`` (Kronecker, tensor train, scaled Cayley orthogonal, or low rank) on
any recurrent class, with random originals at the scale of PyTorch's own init. The result is
the same factored class the converter gives (still an ``nn.GRU`` etc. for ``isinstance``), so
``lrcompress.save_model``/``load_model``/``merge`` and training treat it like a converted layer.

    >>> gru = structured_rnn(nn.GRU, 16, 256, structure="kronecker", kron_factors=(16, 16), batch_first=True)
    >>> out, h = gru(torch.zeros(2, 5, 16))
"""

from __future__ import annotations

from torch import nn


def structured_rnn(cls: type[nn.Module], *args, structure: str, include_input: bool = False,
                   include_projection: bool = False, rank=None, diag: bool = False, tied: bool = False,
                   kron_factors=None, terms: int | None = None, tt_ranks=None, tt_shape=None, joint: bool = False,
                   negatives: int | None = None, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` (``nn.GRU``/``nn.LSTM``/``nn.RNN``, their cells, or a subclass such as
    ``PaperGRU``) with its recurrent weights (and input weights with ``include_input``) of
    ``structure``, drawn at random: a layer for training from scratch.

    ``structure`` and its options are ``CompressionConfig``'s: ``"kronecker"`` (``kron_factors``,
    ``terms``), ``"tt"`` (``tt_ranks``, ``tt_shape``, ``joint``), ``"orthogonal"`` (``negatives``;
    square recurrent blocks), ``"lowrank"`` (``rank``, ``diag``, ``tied``). Every weight is checked
    by the structure's ``check`` before any is registered; a misfit raises ``ConfigError``
    naming the weight and its block shape.

    >>> lstm = structured_rnn(nn.LSTM, 8, 64, structure="tt", tt_ranks=4, tt_shape=(4, 4, 4))  # doctest: +SKIP
    """
    from ..convert import factor_from_scratch  # convert imports this package

    module = cls(*args, **kwargs)
    options = dict(kron_factors=kron_factors, terms=terms, tt_ranks=tt_ranks, tt_shape=tt_shape, joint=joint,
                   negatives=negatives)
    factor_from_scratch(module, rank=rank, diag=diag, tied=tied, include_input=include_input,
                        include_projection=include_projection, structure=structure,
                        **{k: v for k, v in options.items() if v not in (None, False)})
    return module
