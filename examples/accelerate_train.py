"""A plain Accelerate training script: a small regression model trained for a few epochs.

It knows nothing of orchestrator and runs the same under ``accelerate launch``, ``torchrun`` or

    orchestrator train job.kind=script job.script=examples/accelerate_train.py launcher=ray

Each process writes ``rank{R}.json`` into ``--output-dir`` (by default ``$ORCHESTRATOR_RUN_DIR``, the
run dir): its rank, the world size, the sum of all ranks (an all-reduce), the final loss and a
checksum of its weights, which is the same on every rank when the gradients were averaged across them.
"""

import argparse
import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser(description="a small regression model trained with Accelerate")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--output-dir", default=os.environ.get("ORCHESTRATOR_RUN_DIR", "."))
    args = parser.parse_args()

    accelerator = Accelerator()
    torch.manual_seed(0)  # the same data and initial weights in every process
    true_weights = torch.randn(8, 1)
    inputs = torch.randn(512, 8)
    targets = inputs @ true_weights + 0.01 * torch.randn(512, 1)
    loader = DataLoader(TensorDataset(inputs, targets), batch_size=args.batch_size, shuffle=True)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    # Wraps the model for data parallelism and gives each process its own share of the batches.
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps = 0
    for epoch in range(args.epochs):
        for batch_inputs, batch_targets in loader:
            loss = torch.nn.functional.mse_loss(model(batch_inputs), batch_targets)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
        mean_loss = accelerator.gather(loss.detach()).mean().item()
        accelerator.print(f"epoch {epoch}: loss {mean_loss:.4f} ({accelerator.num_processes} processes)")

    rank_sum = accelerator.reduce(torch.tensor(float(accelerator.process_index), device=accelerator.device),
                                  reduction="sum")
    weights = accelerator.unwrap_model(model).state_dict()
    record = {
        "rank": accelerator.process_index,
        "world_size": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "rank_sum": rank_sum.item(),
        "steps": steps,
        "final_loss": mean_loss,
        "weights_checksum": sum(tensor.double().sum().item() for tensor in weights.values()),
    }
    Path(args.output_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(record) + "\n")
    accelerator.end_training()


if __name__ == "__main__":
    main()
