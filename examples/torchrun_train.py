"""A plain torchrun training script: torch.distributed and DistributedDataParallel, nothing else.

It knows nothing of orchestrator and runs the same under ``torchrun --nproc-per-node 2`` or

    orchestrator train job.kind=script job.script=examples/torchrun_train.py launcher=local

Each process writes ``rank{R}.json`` into ``--output-dir`` (by default ``$ORCHESTRATOR_RUN_DIR``, the
run dir): its rank, the world size, the sum of all ranks (an all-reduce), the final loss and a
checksum of its weights, which is the same on every rank when the gradients were averaged across them.
"""

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler


def main() -> None:
    parser = argparse.ArgumentParser(description="a small classifier trained with torch.distributed")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--output-dir", default=os.environ.get("ORCHESTRATOR_RUN_DIR", "."))
    args = parser.parse_args()

    # Rank, world size and the rendezvous (MASTER_ADDR, MASTER_PORT) come from the environment.
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if on_gpu else torch.device("cpu")

    torch.manual_seed(0)  # the same data and initial weights in every process
    inputs = torch.randn(512, 8)
    labels = (inputs[:, 0] + inputs[:, 1] > 0).long()
    dataset = TensorDataset(inputs, labels)
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)  # each process its own share
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2)).to(device))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)

    steps = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch_inputs, batch_labels in loader:
            loss = torch.nn.functional.cross_entropy(model(batch_inputs.to(device)), batch_labels.to(device))
            optimizer.zero_grad()
            loss.backward()  # DDP averages the gradients across processes here
            optimizer.step()
            steps += 1
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        mean_loss = mean_loss.item() / world_size
        if rank == 0:
            print(f"epoch {epoch}: loss {mean_loss:.4f} ({world_size} processes)", flush=True)

    rank_sum = torch.tensor(float(rank), device=device)
    dist.all_reduce(rank_sum)
    record = {
        "rank": rank,
        "world_size": world_size,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "backend": dist.get_backend(),
        "rank_sum": rank_sum.item(),
        "steps": steps,
        "final_loss": mean_loss,
        "weights_checksum": sum(tensor.double().sum().item() for tensor in model.module.state_dict().values()),
    }
    Path(args.output_dir, f"rank{rank}.json").write_text(json.dumps(record) + "\n")
    dist.barrier()  # gloo aborts a process whose peer tore the group down while it still used it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
