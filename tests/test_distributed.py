"""`fxcompress.finetune.distributed` and the trainer under a real process group: two CPU processes on gloo
(torch.multiprocessing.spawn) train the same tiny model, and their weights, evaluations and broadcast objects are
compared with each other and with a single-process evaluation."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fxcompress.data import FASHION_MNIST_DIR
from fxcompress.errors import OptionError
from fxcompress.finetune import distributed
from fxcompress.finetune.trainer import evaluate, train
from test_trainer import quiet, tiny_net, toy_set

WORLD = 2


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank: a model initialised differently per rank (DDP must start from rank 0's), two training runs (the
    second on the module the first one unwrapped), an evaluation and a broadcast."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env(backend="gloo")
    try:
        model = tiny_net(seed=rank)
        first = train(model, toy_set(), quiet(), 2, seed=0)
        second = train(model, toy_set(), quiet(max_batches=1), 1, seed=1)
        result = {"state": model.state_dict(), "first": first, "second": second,
                  "evaluation": evaluate(model, toy_set(samples=50, seed=3), batch_size=7),
                  "received": distributed.broadcast_object({"sender": distributed.rank()}),
                  "where": (distributed.rank(), distributed.world_size(), distributed.is_main())}
        distributed.barrier()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow  # about 10 s: two fresh interpreters import torch
def test_two_gloo_ranks_train_the_same_model_and_agree_on_evaluation(tmp_path):
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    assert [result["where"] for result in ranks] == [(0, 2, True), (1, 2, False)]
    assert all(result["received"] == {"sender": 0} for result in ranks)
    zero, one = (result["state"] for result in ranks)
    assert all(torch.equal(zero[name], one[name]) for name in zero), "weights and BN statistics must agree"
    assert not torch.equal(zero["0.weight"], tiny_net(seed=0).state_dict()["0.weight"])
    assert ranks[0]["first"] == ranks[1]["first"] and ranks[0]["first"]["batches"] == 2 * 96 // (16 * WORLD)
    assert ranks[0]["second"]["batches"] == 1
    model = tiny_net()
    model.load_state_dict(zero)
    alone = evaluate(model, toy_set(samples=50, seed=3), batch_size=7)
    assert ranks[0]["evaluation"] == ranks[1]["evaluation"]
    evaluation = ranks[0]["evaluation"]
    assert evaluation.samples == alone.samples == 50 and evaluation.accuracy == alone.accuracy
    assert evaluation.loss == pytest.approx(alone.loss, rel=1e-6)


def test_without_a_process_group_the_helpers_are_a_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.init_from_env()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    payload = {"plan": [1, 2]}
    assert distributed.broadcast_object(payload) is payload
    distributed.barrier()
    distributed.shutdown()


def test_init_from_env_names_the_missing_torchrun_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(OptionError, match="RANK, MASTER_ADDR, MASTER_PORT"):
        distributed.init_from_env(backend="gloo")


def test_device_for_rank_follows_local_rank(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.device_for_rank() == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.device_for_rank() == torch.device("cpu")


def run_loop_rank(rank: int, port: int, out_dir: str) -> None:
    """One rank of the fine-tuning loop: each rank gives its own run folder; only rank 0's may be written."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init_from_env(backend="gloo")
    try:
        from fxcompress.data import fashion_mnist_splits
        from fxcompress.trainable import plan_of
        from fxcompress.finetune.loop import prune
        from loop_models import small_cnn
        data = fashion_mnist_splits(16, validation=64, train_samples=128, test_samples=64)
        result = prune(small_cnn(), (torch.randn(1, 3, 16, 16),), method="easier", data=data,
                       train_config=quiet(max_batches=2), steps=2, max_drop=1.0, calibration_batches=1,
                       out=os.path.join(out_dir, f"run{rank}"))
        torch.save({"plan": plan_of(result.model).to_dict(), "state": result.model.state_dict(),
                    "trajectory": result.trajectory.to_dict()}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        distributed.shutdown()


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="Fashion-MNIST is not installed")
def test_two_gloo_ranks_run_the_loop_to_the_same_plan_and_only_rank_0_writes(tmp_path):
    mp.spawn(run_loop_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]
    assert ranks[0]["plan"] == ranks[1]["plan"] and len(ranks[0]["plan"]["decisions"]) >= 2
    assert ranks[0]["trajectory"] == ranks[1]["trajectory"]
    assert all(torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]) for name in ranks[0]["state"])
    assert (tmp_path / "run0" / "checkpoint.pt").is_file() and not (tmp_path / "run1").exists()
