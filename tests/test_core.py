"""runtime, data, models, params, checkpoint, compare, plots, notebook helpers."""
import json

import numpy as np
import pytest
import torch

import course_lib
from course_lib import BOTTLENECKS, check_version, get_device, is_fast, seed_everything
from course_lib.checkpoint import BestCheckpoint
from course_lib.compare import compare_runs
from course_lib.data import TensorLoader, digits_split, make_loaders
from course_lib.models import MLP, TinyTransformer
from course_lib.notebook import save_decisions, use_or_fallback
from course_lib.params import count_parameters
from course_lib.train import History


def test_bottlenecks_and_version():
    assert BOTTLENECKS == ("optimization", "regularization", "adaptation")
    assert check_version(course_lib.__version__) == course_lib.__version__
    with pytest.raises(RuntimeError, match="FORCE_INSTALL"):
        check_version("9.9")
    assert check_version("0.1", installed="0.1.7") == "0.1.7"  # patch releases are compatible


def test_seed_everything_repeats_and_rejects_bad_seed():
    seed_everything(5)
    a = (torch.rand(3), np.random.rand(2))
    seed_everything(5)
    b = (torch.rand(3), np.random.rand(2))
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="seed"):
        seed_everything(-1)
    with pytest.raises(TypeError, match="seed"):
        seed_everything(1.5)


def test_device_and_fast_mode(monkeypatch):
    monkeypatch.setenv("COURSE_DEVICE", "cpu")
    assert get_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="device"):
        get_device("tpu9")
    monkeypatch.setenv("COURSE_FAST", "1")
    assert is_fast()
    monkeypatch.setenv("COURSE_FAST", "maybe")
    with pytest.raises(ValueError, match="COURSE_FAST"):
        is_fast()
    from course_lib.scenarios import by_mode

    assert by_mode(True, fast=20, full=40) == 20 and by_mode(False, **{"fast": 20, "full": 40}) == 40
    with pytest.raises(TypeError, match="fast_mode must be a bool"):
        by_mode("0", fast=20, full=40)  # a string from the environment: parse it with is_fast first


def test_digits_split_fixed_per_seed_and_disjoint():
    a, b, c = digits_split(0), digits_split(0), digits_split(1)
    assert a.split_hash == b.split_hash != c.split_hash
    assert torch.equal(a.X_train, b.X_train)
    assert a.sizes() == {"train": 1078, "val": 360, "test": 359}
    rows = lambda X: {tuple(r.tolist()) for r in X}  # noqa: E731
    assert len(rows(a.X_val) & rows(a.X_test)) < 5  # digits has a few duplicate images, nothing more
    assert 0.0 <= a.X_train.min() and a.X_train.max() <= 1.0


def test_small_and_noisy_and_class_subsets():
    s = digits_split(2, n_train=150)
    assert len(s.y_train) == 150 and torch.bincount(s.y_train).min() >= 13
    assert s.split_hash != digits_split(2).split_hash
    n = digits_split(2, n_train=150, label_noise=0.2)
    assert 0.1 < (n.y_train != s.y_train).float().mean() < 0.3
    assert torch.equal(n.y_val, s.y_val)
    sub = digits_split(0, classes=range(5, 10))
    assert sub.n_classes == 5 and set(sub.y_train.tolist()) == set(range(5))


@pytest.mark.parametrize("kw, match", [(dict(fractions=(0.5, 0.5)), "fractions"), (dict(n_train=3), "n_train"),
                                       (dict(classes=[1, 1]), "classes"), (dict(label_noise=1.0), "label_noise")])
def test_digits_split_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        digits_split(0, **kw)


def test_tensor_loader_reproducible_and_resumable():
    X, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    a = TensorLoader(X, y, 4, shuffle=True, seed=1)
    assert len(a) == 3 and [len(b[1]) for b in a] == [4, 4, 2]
    state = a.state_dict()
    first = [b[1].tolist() for b in a]
    a.load_state_dict(state)
    assert [b[1].tolist() for b in a] == first
    with pytest.raises(ValueError, match="batch_size"):
        TensorLoader(X, y, 0)
    split = digits_split(0, n_train=50)
    tr, va, te = make_loaders(split, 16)
    assert tr.shuffle and not va.shuffle and len(te.y) == 359


def test_models_shapes_and_contract_names():
    x = torch.rand(3, 64)
    assert MLP(dropout=0.2)(x).shape == (3, 10)
    t = TinyTransformer(d_model=32, n_heads=4, n_layers=2)
    assert t(x).shape == t(x.view(3, 1, 8, 8)).shape == (3, 10)
    blk = t.blocks[0]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        lin = getattr(blk.attn, name)
        assert isinstance(lin, torch.nn.Linear) and lin.weight.shape == (32, 32)
    assert blk.up_proj.weight.shape == (128, 32) and blk.down_proj.weight.shape == (32, 128)
    tok = TinyTransformer(d_model=16, n_heads=2, n_layers=1, vocab_size=7, max_len=12, n_classes=3)
    assert tok(torch.randint(0, 7, (2, 12))).shape == (2, 3)
    with pytest.raises(ValueError, match="divisible"):
        TinyTransformer(d_model=30, n_heads=4)
    from course_lib.models import PROJECTIONS

    linear_names = {n.rsplit(".", 1)[-1] for n, m in t.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(PROJECTIONS) == linear_names - {"embed", "head"} and len(PROJECTIONS) == 6


def test_meta_device_llm_size_count():
    d, layers = 12288, 96
    with torch.device("meta"):
        m = TinyTransformer(d_model=d, n_heads=96, n_layers=layers)
    trainable, total = count_parameters(m)
    per_block = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d  # projections + 2 LayerNorms
    assert total == trainable
    outside = (4 * d + d) + d + 16 * d + 2 * d + (d * 10 + 10)  # patch embed, cls, 16 positions, norm, head
    assert total == layers * per_block + outside
    assert 170e9 < total < 180e9  # GPT-3 sized blocks


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    m = TinyTransformer(d_model=16, n_heads=2, n_layers=2)
    x, y = torch.rand(4, 64), torch.randint(0, 10, (4,))
    torch.nn.functional.cross_entropy(m(x), y).backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.set_activation_checkpointing(True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
    for a, p in zip(g, m.parameters()):
        torch.testing.assert_close(a, p.grad)


def test_count_parameters_frozen():
    m = MLP(hidden=(4,))
    m.blocks.requires_grad_(False)
    assert count_parameters(m) == (4 * 10 + 10, 64 * 4 + 4 + 4 * 10 + 10)
    with pytest.raises(TypeError):
        count_parameters("model")


def test_best_checkpoint_rule():
    m = torch.nn.Linear(2, 1)
    ck = BestCheckpoint("val_loss", "min", patience=2)
    assert ck.update(1, {"val_loss": 1.0}, m)
    m.weight.data.fill_(7.0)
    assert not ck.update(2, {"val_loss": 1.0}, m)  # a tie keeps the earlier epoch
    assert ck.best_epoch == 1 and not torch.all(ck.best_state["weight"] == 7.0)  # a deep copy
    assert not ck.should_stop
    assert not ck.update(3, {"val_loss": float("nan")}, m)
    assert ck.should_stop
    mx = BestCheckpoint("val_acc", "max")
    mx.update(1, {"val_acc": 0.5})
    mx.update(2, {"val_acc": 0.7})
    assert (mx.best_epoch, mx.best_value, mx.should_stop) == (2, 0.7, False)
    with pytest.raises(KeyError, match="val_acc"):
        mx.update(3, {"val_loss": 1.0})
    for kw in (dict(mode="best"), dict(patience=0), dict(metric="")):
        with pytest.raises(ValueError):
            BestCheckpoint(**kw)


def _hist(name, split="s1", rule=("val_loss", "min", None), values=(3.0, 2.0, 2.5)):
    h = History([{"epoch": i + 1, "val_loss": v} for i, v in enumerate(values)], name=name, split_hash=split,
                rule=rule)
    h.best_epoch = int(np.argmin(values)) + 1
    h.best_value = min(values)
    return h


def test_compare_runs_table_and_refusals():
    df = compare_runs([_hist("a"), _hist("b", values=(1.5, 1.0))])
    assert list(df.index) == ["b", "a"]
    assert bool(df.loc["a", "best_before_final"]) and not bool(df.loc["b", "best_before_final"])
    assert df.loc["a", "final_value"] == 2.5
    with pytest.raises(ValueError, match="different split"):
        compare_runs({"a": _hist("a"), "b": _hist("b", split="s2")})
    with pytest.raises(ValueError, match="different checkpoint rule"):
        compare_runs({"a": _hist("a"), "b": _hist("b", rule=("val_acc", "max", None))})
    with pytest.raises(ValueError, match="no split_hash"):
        compare_runs({"a": _hist("a", split=None)})


def test_plots_save_png(tmp_path):
    from course_lib.plots import plot_comparison, plot_history, save_figure

    h = _hist("a")
    for row in h:
        row.update(train_loss=1.0, lr=1e-3, val_acc=0.5, grad_norm=1.0, grad_norm_max=2.0)
    p = save_figure(plot_history(h), tmp_path / "sub" / "h.png")
    q = save_figure(plot_comparison([h]), tmp_path / "c.png")
    assert p.read_bytes()[:4] == q.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="empty"):
        plot_history(History())


def test_use_or_fallback_and_decisions(tmp_path, capsys):
    def stub(x):
        raise NotImplementedError

    def ref(x):
        return x + 1

    assert use_or_fallback(stub, ref, 1) is ref
    assert "not written yet" in capsys.readouterr().out
    assert use_or_fallback(ref, stub, 1) is ref

    def buggy(x):
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        use_or_fallback(buggy, ref, 1)
    path = save_decisions(tmp_path / "o", first_problem="optimization", best_epoch=np.int64(4))
    assert json.loads(path.read_text()) == {"best_epoch": 4, "first_problem": "optimization"}
