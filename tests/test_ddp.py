"""Two processes with DDP or FSDP2 (gloo, CPU) make the same update as one process
with gradient accumulation over the same micro-batches."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from _helpers import join_test_group
from fastencdec import EncDecConfig, EncoderDecoderLM
from fastencdec.data import BatchStream, LengthBucketBatchSampler, Seq2SeqCollator
from fastencdec.training import TrainConfig, Trainer

STEPS = 3


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(32):
        src = torch.randint(5, 60, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g)
        tgt = torch.randint(5, 60, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        out.append({"input_ids": src.tolist(), "labels": tgt.tolist() + [2]})
    return out


def _run(rank: int, world_size: int, grad_accum: int, strategy: str, optimizer: str, port: int,
         out: str):
    info = join_test_group(rank, world_size, port)
    torch.manual_seed(0)
    config = EncDecConfig.preset("tiny").replace(vocab_size=64)
    model = EncoderDecoderLM(config)
    examples = _examples()
    # micro-batches of 4: each step takes 2 of them (accumulated, or one per process)
    sampler = LengthBucketBatchSampler([len(e["input_ids"]) for e in examples], 4, seed=0)
    stream = BatchStream(examples, sampler, Seq2SeqCollator(), rank=info.rank,
                         world_size=info.world_size)
    cfg = TrainConfig(max_steps=STEPS, grad_accum=grad_accum, lr=1e-2, warmup_steps=0,
                      distributed=strategy, optimizer=optimizer, progress=False, seed=0)
    trainer = Trainer(model, cfg, stream, dist_info=info)
    history = trainer.train()
    params = trainer.state_dict()["model"]  # full tensors (FSDP gathers on every rank)
    trainer.save_model(out + ".model")
    if info.rank == 0:
        torch.save({"params": {k: v.detach().clone() for k, v in params.items()},
                    "losses": [r["loss"] for r in history]}, out)
    if world_size > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# FSDP2 with Muon also trains, but Newton-Schulz on sharded DTensors rounds differently
# in bf16, so only the AdamW run is compared exactly.
@pytest.mark.parametrize("strategy,optimizer", [("ddp", "muon"), ("fsdp", "adamw")])
def test_two_process_ddp_equals_accumulation(tmp_path, strategy, optimizer):
    single, multi = str(tmp_path / "single.pt"), str(tmp_path / "multi.pt")
    _run(0, 1, 2, strategy, optimizer, 0, single)
    mp.spawn(_run, args=(2, 1, strategy, optimizer, _free_port(), multi), nprocs=2, join=True)
    a = torch.load(single, weights_only=True)
    b = torch.load(multi, weights_only=True)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5, abs=1e-6)
    assert a["losses"][-1] != a["losses"][0]  # it did train
    saved = EncoderDecoderLM.from_pretrained(multi + ".model")
    torch.testing.assert_close(saved.embed.weight, b["params"]["model.embed.weight"])
    for name, value in a["params"].items():
        torch.testing.assert_close(b["params"][name], value, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
