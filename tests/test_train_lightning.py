"""The shared Trainer: atomic last.ckpt every epoch, every N steps, every few minutes and on Ctrl-C, the previous
one kept; safe loading; logs; precision; the non-finite stop."""

import os
import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from branchspec.errors import BranchspecError, Interrupted
from branchspec.rundir import RunDir
from branchspec.train.lightning import (PREVIOUS, csv_logs, default_precision, load_checkpoint_file, make_trainer,
                                        resume_checkpoint, set_learning_rate)


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
    trainer.fit(module, ckpt_path=resume_checkpoint(run), weights_only=True)
    return trainer


def saved_step(path):
    return load_checkpoint_file(path)["global_step"]


def test_checkpoint_every_epoch_logs_and_resume(tmp_path):
    run = RunDir(tmp_path / "run")
    assert resume_checkpoint(run) is None
    fit(run, Regression(), max_epochs=2)
    assert saved_step(run.checkpoints / "last.ckpt") == 8  # the end of each epoch, by default
    assert saved_step(run.checkpoints / PREVIOUS) == 4  # the one it replaced
    assert len(csv_logs(run)) == 1
    assert any((run.logs / "tensorboard").iterdir())
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["last.ckpt", PREVIOUS]  # no temporary files
    trainer = fit(run, Regression(), max_epochs=3)  # resumes from epoch 2
    assert trainer.global_step == 12 and saved_step(run.checkpoints / "last.ckpt") == 12
    assert len(csv_logs(run)) == 2  # the first run's log is kept


def test_checkpoints_by_wall_clock(tmp_path):
    class Steps(L.Callback):
        def __init__(self):
            self.saved = []

        def on_save_checkpoint(self, trainer, module, checkpoint):
            self.saved.append(trainer.global_step)

    steps = Steps()
    fit(RunDir(tmp_path / "run"), Regression(), max_epochs=1, checkpoint_minutes=0.0, callbacks=[steps])
    assert steps.saved == [1, 2, 3, 4]  # an interval of 0 minutes: after every step, and never twice


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
    trainer.fit(Regression(), ckpt_path=resume_checkpoint(run), weights_only=True)
    assert trainer.global_step == 4
    assert seen.seen[:3] == (4, 2, 4)  # its length, where the resume began, the last batch
    assert seen.seen[3].startswith("Epoch 0")


def test_ctrl_c_saves_after_the_step_under_way(tmp_path):
    """Exact resumes after Ctrl-C are tested on the studies (tests/test_resume.py), whose data are resumable."""
    class CtrlC(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends; the step under way still finishes

    run = RunDir(tmp_path / "run")
    module = Regression()
    with pytest.raises(Interrupted, match="after step 6.*run the same command again"):
        fit(run, module, max_epochs=3, callbacks=[CtrlC()])
    saved = load_checkpoint_file(run.checkpoints / "last.ckpt")
    assert saved["global_step"] == 6
    torch.testing.assert_close(saved["state_dict"]["lin.weight"], module.lin.weight.detach(), atol=0, rtol=0)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous(tmp_path, caplog):
    run = RunDir(tmp_path / "run")
    fit(run, Regression(), max_epochs=2)
    last = run.checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(BranchspecError, match="truncated or corrupt"):
        load_checkpoint_file(last)
    assert resume_checkpoint(run) == run.checkpoints / PREVIOUS
    assert "Resuming from previous.ckpt" in caplog.text
    trainer = fit(run, Regression(), max_epochs=2)  # redoes epoch 2 from the previous checkpoint
    assert trainer.global_step == 8 and saved_step(last) == 8
    (run.checkpoints / PREVIOUS).write_bytes(b"not a checkpoint")
    last.write_bytes(b"")
    with pytest.raises(BranchspecError, match="no checkpoint of .* can be read"):
        resume_checkpoint(run)


class _Payload:
    """Unpickling this calls os.system: what a checkpoint from an untrusted run directory could do."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = None


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path):
    global MARKER
    MARKER = tmp_path / "the-code-ran"
    run = RunDir(tmp_path / "run")
    fit(run, Regression(), max_epochs=1)
    ckpt = torch.load(run.checkpoints / "last.ckpt", weights_only=True)
    ckpt["payload"] = _Payload()
    torch.save(ckpt, run.checkpoints / "last.ckpt")
    with pytest.raises(BranchspecError, match="refused to load .*could run code"):
        load_checkpoint_file(run.checkpoints / "last.ckpt")
    with pytest.raises(BranchspecError, match="refused"):
        make_trainer(run, max_epochs=2, enable_progress_bar=False).fit(
            Regression(), ckpt_path=run.checkpoints / "last.ckpt")  # also through Lightning's own loading
    assert not MARKER.exists()


def test_non_finite_loss_stops_and_saves_the_state_before_it(tmp_path):
    run = RunDir(tmp_path / "run")
    module = Regression(nan_at=6)
    with pytest.raises(BranchspecError, match="non-finite at step 6.*saved the state before that step"):
        fit(run, module, max_epochs=3, checkpoint_every_n_steps=5)
    assert saved_step(run.checkpoints / "last.ckpt") == 6  # the state before the bad step
    assert saved_step(run.checkpoints / PREVIOUS) == 5
    state = load_checkpoint_file(run.checkpoints / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert torch.isfinite(module.lin.weight).all()  # the bad loss was never back-propagated


def test_set_learning_rate_scales_a_one_cycle_schedule():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    before = opt.param_groups[0]["lr"]
    assert set_learning_rate(opt, 0.05, key="max_lr")
    assert opt.param_groups[0]["lr"] == pytest.approx(before / 2) and opt.param_groups[0]["max_lr"] == 0.05
    assert not set_learning_rate(opt, 0.05, key="max_lr")  # a second resume with the same value changes nothing
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] <= 0.05


def test_precision_and_bad_requests(tmp_path):
    assert default_precision("cpu") == "32-true"
    assert default_precision("cuda") == "bf16-mixed"
    run = RunDir(tmp_path / "run")
    assert make_trainer(run, max_epochs=1).precision == "32-true"
    with pytest.raises(BranchspecError, match="length"):
        make_trainer(run)
    with pytest.raises(BranchspecError, match="cannot run on the CPU"):
        make_trainer(run, max_epochs=1, accelerator="cpu", precision="16-mixed")
    if not torch.cuda.is_available():
        with pytest.raises(BranchspecError, match="no GPU"):
            make_trainer(run, max_epochs=1, accelerator="cuda")
