"""The shared Trainer: atomic last.ckpt every epoch (and every N steps), logs, precision, non-finite stop."""

import pytest
import torch
import lightning as L
from torch.utils.data import DataLoader, TensorDataset

from branchspec.errors import BranchspecError
from branchspec.rundir import RunDir
from branchspec.train.lightning import csv_logs, default_precision, last_checkpoint, make_trainer


class Regression(L.LightningModule):
    """A linear fit whose loss turns NaN from step ``nan_at`` on."""

    def __init__(self, nan_at=None):
        super().__init__()
        self.lin = torch.nn.Linear(3, 1)
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = (self.lin(x) - y).pow(2).mean()
        if self.nan_at is not None and self.global_step >= self.nan_at:
            loss = loss * float("nan")
        self.log("loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)  # 4 steps per epoch


def fit(run, module, **kw):
    trainer = make_trainer(run, enable_progress_bar=False, log_every_n_steps=1, **kw)
    trainer.fit(module, ckpt_path=last_checkpoint(run))
    return trainer


def saved_step(run):
    return torch.load(last_checkpoint(run), weights_only=True)["global_step"]


def test_checkpoint_every_epoch_logs_and_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    assert last_checkpoint(run) is None
    fit(run, Regression(), max_epochs=2)
    assert saved_step(run) == 8
    assert len(csv_logs(run)) == 1
    assert any((run.logs / "tensorboard").iterdir())
    assert not [p for p in run.checkpoints.iterdir() if p.name != "last.ckpt"]  # no temporary files left
    trainer = fit(run, Regression(), max_epochs=3)  # resumes from epoch 2
    assert trainer.global_step == 12 and saved_step(run) == 12
    assert len(csv_logs(run)) == 2  # the first run's log is kept


def test_progress_bar_knows_its_length_after_a_mid_epoch_resume(tmp_path):
    class Seen(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            bar = trainer.progress_bar_callback.train_progress_bar
            self.seen = (bar.total, bar.initial, bar.n, bar.desc)

    class Killed(L.Callback):
        def on_train_batch_end(self, trainer, *_):
            if trainer.global_step == 3:
                raise RuntimeError("killed")

    run = RunDir(tmp_path / "run")
    with pytest.raises(RuntimeError, match="killed"):  # killed in the middle of epoch 0, after the step-2 checkpoint
        fit(run, Regression(), max_epochs=1, checkpoint_every_n_steps=2, callbacks=[Killed()])
    seen = Seen()
    trainer = make_trainer(run, max_epochs=1, callbacks=[seen])  # the bar on, as in the CLI
    trainer.fit(Regression(), ckpt_path=last_checkpoint(run))
    assert trainer.global_step == 4
    assert seen.seen[:3] == (4, 2, 4)  # its length, where the resume began, the last batch
    assert seen.seen[3].startswith("Epoch 0")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    run = RunDir(tmp_path / "run")
    module = Regression(nan_at=6)
    with pytest.raises(BranchspecError, match="non-finite at step 6"):
        fit(run, module, max_epochs=3, checkpoint_every_n_steps=5)
    assert saved_step(run) == 5  # the checkpoint from before the bad loss
    state = torch.load(last_checkpoint(run), weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert torch.isfinite(module.lin.weight).all()  # the bad loss was never back-propagated


def test_precision_and_bad_requests(tmp_path):
    assert default_precision("cpu") == "32-true"
    assert default_precision("cuda") == "bf16-mixed"
    run = RunDir(tmp_path / "run")
    assert make_trainer(run, max_epochs=1).precision == "32-true"
    with pytest.raises(BranchspecError, match="length"):
        make_trainer(run)
    if not torch.cuda.is_available():
        with pytest.raises(BranchspecError, match="no GPU"):
            make_trainer(run, max_epochs=1, accelerator="cuda")
