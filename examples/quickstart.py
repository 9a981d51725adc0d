"""The README quickstart: one decorator, then train as usual.

    python examples/quickstart.py                    # one plain process
    autopar run examples/quickstart.py --nproc 4     # 4 local processes, same losses
"""
import os

import torch
import torch.nn.functional as F

import autopar
from autopar.models.gpt import GPT, GPTConfig


@autopar.parallelize(cluster="local:4")  # or "h100x8", a Cluster, a profile JSON path
class MyGPT(GPT):
    def example_inputs(self):  # one global batch (or pass example_inputs=...)
        return (torch.randint(0, self.config.vocab_size, (8, self.config.block_size)),)


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def main() -> None:
    torch.manual_seed(0)
    model = MyGPT(GPTConfig.tiny())  # captured, planned, sharded on each rank
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if main_rank:
        print(model.plan)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 128, (8, 16), generator=g)
    y = torch.randint(0, 128, (8, 16), generator=g)
    for step in range(3):
        loss = model.train_step(x, y, loss_fn, opt)  # one global batch per step, any plan
        if main_rank:
            print(f"step {step} loss {float(loss):.6f}")


if __name__ == "__main__":
    main()
