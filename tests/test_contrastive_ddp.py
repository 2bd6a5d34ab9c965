"""Cross-device negatives: InfoNCE gathered with gradients under DDP (2 CPU processes, gloo, ddp_spawn)
equals the single-process loss over the full batch, in value and in the (DDP-averaged) gradients.

One spawn checks both directions: the trained loss is plain InfoNCE + symmetric InfoNCE."""

import lightning as L
import torch

from bidirlm_pl.losses.contrastive import InfoNCE

B_LOCAL, N_NEG, D_IN, D_OUT = 3, 1, 10, 8


def _data():
    g = torch.Generator().manual_seed(0)
    world = 2 * B_LOCAL
    return (torch.randn(world, D_IN, generator=g, dtype=torch.float64),
            torch.randn(world, D_IN, generator=g, dtype=torch.float64),
            torch.randn(world, N_NEG, D_IN, generator=g, dtype=torch.float64))


def _encoder():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.Tanh(), torch.nn.Linear(16, D_OUT)).double()


def _losses(encoder, q, p, n, gather):
    eq, ep, en = encoder(q), encoder(p), encoder(n)
    plain = InfoNCE(0.05, gather_across_devices=gather).compute_loss(eq, ep, en)
    sym = InfoNCE(0.05, symmetric=True, gather_across_devices=gather).compute_loss(eq, ep, en)
    return plain, sym


class GatheredInfoNCE(L.LightningModule):
    def __init__(self, out_path: str):
        super().__init__()
        self.encoder = _encoder()
        self.out_path = out_path

    def train_dataloader(self):
        return torch.utils.data.DataLoader([0], batch_size=1)

    def training_step(self, batch, batch_idx):
        q, p, n = _data()
        rows = slice(self.global_rank * B_LOCAL, (self.global_rank + 1) * B_LOCAL)
        plain, sym = _losses(self.encoder, q[rows], p[rows], n[rows], gather=True)
        self.local = torch.stack([plain.detach(), sym.detach()])
        return plain + sym

    def on_after_backward(self):  # DDP has averaged the gradients over the two ranks here
        losses = self.all_gather(self.local)  # (2 ranks, 2 losses)
        if self.global_rank == 0:
            torch.save({"losses": losses.mean(0), "grads": [w.grad.clone() for w in self.encoder.parameters()]},
                       self.out_path)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def test_ddp_gathered_loss_and_gradients_equal_one_process_full_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(GatheredInfoNCE(str(out)))
    ddp = torch.load(out, weights_only=True)

    encoder = _encoder()
    q, p, n = _data()
    plain, sym = _losses(encoder, q, p, n, gather=False)
    (plain + sym).backward()
    assert torch.allclose(ddp["losses"], torch.stack([plain, sym]).detach(), atol=1e-10)
    for mine, ref in zip(ddp["grads"], encoder.parameters()):
        assert torch.allclose(mine, ref.grad, atol=1e-10)
    # the gathered candidates matter: rank 0's loss over its own half alone is different
    local_plain, _ = _losses(encoder, q[:B_LOCAL], p[:B_LOCAL], n[:B_LOCAL], gather=False)
    full_rank0_rows = InfoNCE(0.05).compute_loss(encoder(q), encoder(p), encoder(n))
    assert not torch.allclose(local_plain, full_rank0_rows)
