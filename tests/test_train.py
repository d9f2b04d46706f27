import math

import pandas as pd
import pytest
import torch
from torch import nn

from course_lib import seed_everything
from course_lib.checkpoint import BestCheckpoint
from course_lib.data import TensorLoader, digits_split, make_loaders
from course_lib.models import MLP
from course_lib.train import History, TrainingDiverged, evaluate, fit


def _run(seed=0, epochs=4, **kw):
    seed_everything(seed)
    split = digits_split(seed, n_train=200)
    tr, va, _ = make_loaders(split, 32, seed=seed)
    model = MLP(hidden=(32,), dropout=0.1)
    h = fit(model, tr, va, epochs=epochs, lr=3e-3, split_hash=split.split_hash, device="cpu", **kw)
    return model, h, tr, va


def test_same_seed_same_history():
    _, h1, _, _ = _run(seed=3)
    _, h2, _, _ = _run(seed=3)
    cols = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "grad_norm", "clip_frac"]
    pd.testing.assert_frame_equal(h1.to_frame()[cols], h2.to_frame()[cols])
    assert h1.steps == h2.steps
    _, h3, _, _ = _run(seed=4)
    assert h3.to_frame()["train_loss"].tolist() != h1.to_frame()["train_loss"].tolist()


def test_history_columns_and_best_checkpoint_restored():
    model, h, _, va = _run(epochs=5)
    df = pd.DataFrame(h)
    for col in ["epoch", "lr", "train_loss", "val_loss", "val_acc", "grad_norm", "clip_frac", "seconds"]:
        assert col in df.columns
    assert h.best_epoch == int(df.loc[df["val_loss"].idxmin(), "epoch"])
    # restore_best=True: the model holds the kept checkpoint, whose val loss is the best value
    assert evaluate(model, va)["loss"] == pytest.approx(h.best_value, rel=1e-6)
    assert len(h.steps) == 5 * math.ceil(200 / 32)
    assert h.trainable_params == h.total_params > 0


def test_resume_equals_uninterrupted(tmp_path):
    _, full, _, _ = _run(seed=1, epochs=6)

    def stop_after_3(history, model):
        if len(history) == 3:
            raise KeyboardInterrupt

    path = tmp_path / "state.pt"
    _, part, _, _ = _run(seed=1, epochs=6, save_to=path, callbacks=[stop_after_3])
    assert len(part) == 3 and part.stopped_early and "interrupted" in part.stop_reason
    # a fresh process would rebuild everything from scratch, with another seed even: resume must not care
    _, resumed, _, _ = _run(seed=1, epochs=6, resume_from=path, save_to=path)
    cols = ["epoch", "lr", "train_loss", "val_loss", "val_acc", "grad_norm"]
    pd.testing.assert_frame_equal(resumed.to_frame()[cols], full.to_frame()[cols])
    assert resumed.best_epoch == full.best_epoch
    assert [s["loss"] for s in resumed.steps] == [s["loss"] for s in full.steps]


def test_resume_with_scheduler_and_clipping(tmp_path):
    kw = dict(scheduler="cosine", warmup_ratio=0.1, clip_grad_norm=0.5, epochs=4)
    _, full, _, _ = _run(seed=2, **kw)

    def stop(history, model):
        if len(history) == 2:
            raise KeyboardInterrupt

    _run(seed=2, save_to=tmp_path / "s.pt", callbacks=[stop], **kw)
    _, resumed, _, _ = _run(seed=2, resume_from=tmp_path / "s.pt", **kw)
    assert resumed.to_frame()["lr"].tolist() == full.to_frame()["lr"].tolist()
    assert resumed.to_frame()["val_loss"].tolist() == full.to_frame()["val_loss"].tolist()


def test_clipping_logs_preclip_norm_and_fraction():
    _, h, _, _ = _run(epochs=2, clip_grad_norm=1e-3)
    steps = pd.DataFrame(h.steps)
    assert steps["clipped"].all() and (steps["grad_norm"] > 1e-3).all()
    assert h[0]["clip_frac"] == 1.0
    _, h2, _, _ = _run(epochs=2, clip_grad_norm=1e6)
    assert h2[0]["clip_frac"] == 0.0


def test_grad_accumulation_equals_big_batch():
    torch.manual_seed(0)
    X, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    base = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    m1, m2 = MLPWrap(base), MLPWrap(base)
    m2.load_state_dict(m1.state_dict())
    val = TensorLoader(X, y, 64)
    fit(m1, TensorLoader(X.double(), y, 64), val_as(val), epochs=1, optimizer="sgd", lr=0.1, device="cpu")
    fit(m2, TensorLoader(X.double(), y, 16), val_as(val), epochs=1, optimizer="sgd", lr=0.1, grad_accum_steps=4,
        device="cpu")
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2)


class MLPWrap(nn.Module):
    def __init__(self, base):
        super().__init__()
        import copy

        self.net = copy.deepcopy(base)

    def forward(self, x):
        return self.net(x.double())


def val_as(loader):
    return TensorLoader(loader.X.double(), loader.y, 64)


def test_nonfinite_loss_stops_loudly_and_keeps_history():
    def bad_loss(logits, y, reduction="mean"):
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction) * float("nan")

    seed_everything(0)
    split = digits_split(0, n_train=100)
    tr, va, _ = make_loaders(split, 32)
    with pytest.raises(TrainingDiverged, match=r"step 1 \(epoch 1, batch 1\) with lr=0.001") as info:
        fit(MLP(hidden=(16,)), tr, va, epochs=2, loss_fn=bad_loss, device="cpu")
    err = info.value
    assert isinstance(err, FloatingPointError) and (err.step, err.epoch, err.lr) == (1, 1, 1e-3)
    assert isinstance(err.history, History) and len(err.history) == 0
    import pickle

    again = pickle.loads(pickle.dumps(err))  # crosses process boundaries (parallel searches) intact
    assert str(again) == str(err) and again.step == 1 and isinstance(again.history, History)


def test_divergence_after_some_epochs_keeps_them():
    def nan_in_epoch_3(history, model):
        if len(history) == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("inf"))

    with pytest.raises(TrainingDiverged, match=r"step 15 \(epoch 3, batch 1\)") as info:
        _run(epochs=4, callbacks=[nan_in_epoch_3])
    history = info.value.history
    assert [r["epoch"] for r in history] == [1, 2] and len(history.steps) == 14


def test_lr_or_weight_decay_with_an_optimizer_object_is_refused():
    split = digits_split(0, n_train=50)
    tr, va, _ = make_loaders(split, 16)
    model = MLP(hidden=(8,))
    opt = torch.optim.Adafactor(model.parameters(), lr=1e-2)
    for kw in (dict(lr=1e-3), dict(weight_decay=0.01), dict(lr=1e-2, weight_decay=0.0)):
        with pytest.raises(ValueError, match=r"together with an optimizer object.*lr=0.01, weight_decay=0"):
            fit(model, tr, va, epochs=1, optimizer=opt, device="cpu", **kw)
    assert fit(model, tr, va, epochs=1, optimizer=opt, device="cpu", progress=False).final_epoch == 1


def test_progress_ends_in_one_summary_line_and_is_silent_when_off(capsys, monkeypatch):
    _run(epochs=2, name="demo", progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("demo: 2 epochs, kept epoch ") and "val_loss" in lines[0]
    monkeypatch.setenv("COURSE_PROGRESS", "0")
    _run(epochs=2, name="quiet")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_early_stopping_with_patience():
    seed_everything(0)
    split = digits_split(0, n_train=150)
    tr, va, _ = make_loaders(split, 16)
    h = fit(MLP(hidden=(256,)), tr, va, epochs=60, lr=3e-3, checkpoint=BestCheckpoint(patience=3), device="cpu")
    assert h.stopped_early and len(h) < 60
    assert len(h) == h.best_epoch + 3


@pytest.mark.parametrize("kw, match", [
    (dict(epochs=0), "epochs"), (dict(epochs=1, grad_accum_steps=0), "grad_accum_steps"),
    (dict(epochs=1, clip_grad_norm=0), "clip_grad_norm"), (dict(epochs=1, precision="fp8"), "precision"),
    (dict(epochs=1, optimizer="lion"), "optimizer"), (dict(epochs=1, lr=-1.0), "lr"),
])
def test_fit_bad_arguments(kw, match):
    split = digits_split(0, n_train=50)
    tr, va, _ = make_loaders(split, 16)
    with pytest.raises(ValueError, match=match):
        fit(MLP(hidden=(8,)), tr, va, device="cpu", **kw)


def test_fit_refuses_fully_frozen_model():
    split = digits_split(0, n_train=50)
    tr, va, _ = make_loaders(split, 16)
    m = MLP(hidden=(8,)).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        fit(m, tr, va, epochs=1, device="cpu")


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_and_activation_checkpointing_run(precision):
    from course_lib.models import TinyTransformer

    seed_everything(0)
    split = digits_split(0, n_train=64)
    tr, va, _ = make_loaders(split, 32)
    m = TinyTransformer(d_model=16, n_heads=2, n_layers=1)
    h = fit(m, tr, va, epochs=1, precision=precision, activation_checkpointing=True, device="cpu")
    assert math.isfinite(h[0]["val_loss"]) and m.activation_checkpointing


def test_clipping_really_scales_the_update():
    """One plain SGD step (lr 1): the parameter change is the clipped gradient, whose norm is the clip value."""
    torch.manual_seed(0)
    X, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    model = nn.Sequential(nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    h = fit(model, TensorLoader(X, y, 32), TensorLoader(X, y, 32), epochs=1, optimizer=opt, clip_grad_norm=0.01,
            device="cpu", restore_best=False)
    step = torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)])
    assert h.steps[0]["clipped"] and h.steps[0]["grad_norm"] > 0.01
    assert step.norm().item() == pytest.approx(0.01, rel=1e-4)


def test_kept_row_is_the_best_epoch_row_not_the_last():
    h = History([{"epoch": 1, "val_acc": 0.5}, {"epoch": 2, "val_acc": 0.9}, {"epoch": 3, "val_acc": 0.7}])
    h.best_epoch = 2
    assert h.kept_row() == {"epoch": 2, "val_acc": 0.9} and h.kept("val_acc") == 0.9
    with pytest.raises(KeyError, match="'val_loss' is not in the history"):
        h.kept("val_loss")
    h.best_epoch = None
    with pytest.raises(ValueError, match="no best epoch"):
        h.kept_row()
    _, run, _, _ = _run(epochs=3, checkpoint=BestCheckpoint("val_acc", "max"))
    assert run.kept("val_acc") == run.best_value and run.kept_row()["epoch"] == run.best_epoch


def test_optimizer_names_mean_one_thing():
    from course_lib.optimizers import OPTIMIZERS, make_optimizer

    params = [nn.Parameter(torch.zeros(3))]
    assert make_optimizer(params, "sgd", lr=0.1).defaults["momentum"] == 0
    assert make_optimizer(params, "sgd_momentum", lr=0.1).defaults["momentum"] == 0.9
    assert make_optimizer(params, "adafactor", lr=0.01, weight_decay=0.01).defaults["weight_decay"] == 0.01
    with pytest.raises(ValueError, match=r"optimizer must be one of \('sgd', 'sgd_momentum'.*'lion'"):
        make_optimizer(params, "lion", lr=0.1)
    assert list(OPTIMIZERS) == ["sgd", "sgd_momentum", "adam", "adamw", "adamw8bit", "adafactor"]
