"""Multi-process training (DistributedDataParallel over Gloo, 2 CPU processes) on a factored,
weight-normalised GRU: the averaged gradient of the two shards is the full-batch gradient, and
``fit`` under DDP ends where a single process on the full batches ends."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lrcompress.nn import LowRankGRU
from lrcompress.train import Batch, fit, weight_norm
from lrcompress.train.distributed import Distributed

RECIPE = {"steps": 4, "eval_every": 2, "lr": 1e-2, "clip": "norm", "weight_norm": True, "max_row_norm": 10.0}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = LowRankGRU(2, 6, rank=2, diag=True, batch_first=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def make_model(*, normalised: bool = False) -> Net:
    torch.manual_seed(0)
    model = Net()
    if normalised:
        weight_norm(model)
    return model


def make_batches(n: int = 4) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(8, 5, 2, generator=g), torch.randn(8, 1, generator=g)) for _ in range(n)]


def worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    ctx = Distributed.setup("cpu")  # starts the Gloo group
    model = make_model(normalised=True)
    ddp = ctx.wrap(model, torch.device("cpu"))
    batch = ctx.shard(make_batches(1)[0])
    assert len(batch) == 4
    nn.functional.mse_loss(ddp(batch.x), batch.y).backward()
    if rank == 0:
        torch.save({n: p.grad.clone() for n, p in model.named_parameters()}, os.path.join(out, "grads.pt"))
    model = make_model()
    result = fit(model, make_batches(), nn.functional.mse_loss, recipe=RECIPE, val_loader=make_batches(2),
                 run_dir=os.path.join(out, "run"), progress=False)
    if rank == 0:
        torch.save({"state": model.state_dict(), "val": result.val}, os.path.join(out, "fit.pt"))
    assert dist.is_initialized()  # fit left the group it did not start
    ctx.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without Gloo")
def test_ddp_matches_single_process(tmp_path):
    for attempt in range(3):
        try:
            mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
            break
        except mp.ProcessRaisedException as exc:  # the free port was taken meanwhile: try another
            if "address already in use" not in str(exc).lower() or attempt == 2:
                raise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model(normalised=True)
        batch = make_batches(1)[0]
        nn.functional.mse_loss(model(batch.x), batch.y).backward()
        grads = torch.load(tmp_path / "grads.pt")
        factor_grads = [n for n in grads if "parametrizations" in n]
        assert len(factor_grads) == 6  # L: scale, direction; R: direction; diagonal; input matrix: scale, direction
        for name, p in model.named_parameters():
            assert torch.allclose(grads[name], p.grad, rtol=0, atol=1e-6), name

        single = make_model()
        result = fit(single, make_batches(), nn.functional.mse_loss, recipe=RECIPE, val_loader=make_batches(2),
                     progress=False)
        distributed = torch.load(tmp_path / "fit.pt")
        for name, value in single.state_dict().items():
            assert torch.allclose(distributed["state"][name], value, rtol=0, atol=1e-5), name
        assert distributed["val"]["loss"] == pytest.approx(result.val["loss"], rel=1e-5)
        assert (tmp_path / "run" / "summary.json").is_file()
    finally:
        torch.set_num_threads(threads)
