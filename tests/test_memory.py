"""Memory accounting: predicted bytes must equal what torch really holds after a step."""
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from course_lib.freezing import unfreeze_top_k
from course_lib.lora import add_lora
from course_lib.memory import (
    choose_levers,
    fits_budget,
    human_bytes,
    measure_activation_bytes,
    measure_training_step,
    memory_table,
    optimizer_state_bytes,
    optimizer_state_bytes_per_param,
    predict_memory,
    tensor_state_bytes,
)
from course_lib.models import MLP, TinyTransformer
from course_lib.optimizers import OPTIMIZERS, make_optimizer
from course_lib.params import count_parameters

HAS_8BIT = importlib.util.find_spec("course_lib.optim8bit") is not None


def make_8bit(params, **kw):
    from course_lib.optim8bit import AdamW8bit

    return AdamW8bit(params, lr=1e-3, **kw)


def make_model(kind, trainable, seed=0):
    torch.manual_seed(seed)
    if kind == "transformer":
        model = TinyTransformer(d_model=64, n_heads=4, n_layers=2)  # q_proj has 4096 = min_8bit_size elements
        targets = ["q_proj", "v_proj", "up_proj"]
    else:
        model = MLP(hidden=(96, 80))              # 6144 and 7680 weights >= min_8bit_size, the head (800) below
        targets = ["blocks.0.0", "blocks.1.0"]
    if trainable == "frozen":
        unfreeze_top_k(model, 0)
    elif trainable == "partial":
        unfreeze_top_k(model, 1)
    elif trainable == "lora":
        add_lora(model, targets, r=4, alpha=8, train_modules="head")
    return model


def batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("optimizer", [name for name in OPTIMIZERS if HAS_8BIT or name != "adamw8bit"])
@pytest.mark.parametrize("trainable", ["full", "frozen", "partial", "lora"])
@pytest.mark.parametrize("kind", ["transformer", "mlp"])
def test_predicted_bytes_equal_measured_after_a_step(kind, trainable, optimizer):
    model = make_model(kind, trainable)
    # built from the one table fit builds from, so a name means the same optimizer in fit and here
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], optimizer, lr=1e-3, weight_decay=0.01)
    x, y = batch()
    measured = measure_training_step(model, opt, x, y)
    predicted = predict_memory(model, optimizer, activation_bytes=measured["activations"])
    for part in ("weights", "grads", "optimizer", "total"):
        assert predicted[part] == measured[part], (part, predicted, measured)
    trainable_n, total_n = count_parameters(model)
    assert measured["weights"] == 4 * total_n and measured["grads"] == 4 * trainable_n
    if trainable != "full":
        assert measured["grads"] < measured["weights"]
    assert optimizer_state_bytes(opt) == measured["optimizer"]


@pytest.mark.skipif(not HAS_8BIT, reason="course_lib.optim8bit not written yet")
@pytest.mark.parametrize("block_size,min_8bit_size", [(100, 4096), (256, 0), (64, 10**9)])
def test_8bit_prediction_follows_block_size_and_threshold(block_size, min_8bit_size):
    model = make_model("transformer", "full")
    opt = make_8bit(model.parameters(), block_size=block_size, min_8bit_size=min_8bit_size)
    measured = measure_training_step(model, opt, *batch())
    predicted = predict_memory(model, "adamw8bit", block_size=block_size, min_8bit_size=min_8bit_size)
    assert predicted["optimizer"] == measured["optimizer"]


def test_bf16_weights_predict_bf16_state():
    model = make_model("mlp", "full").to(torch.bfloat16)
    x, y = batch()
    measured = measure_training_step(model, torch.optim.AdamW(model.parameters()), x.bfloat16(), y)
    predicted = predict_memory(model, "adamw")                       # dtype read from the parameters
    assert predicted["weights"] == measured["weights"] == 2 * count_parameters(model)[1]
    assert predicted["optimizer"] == measured["optimizer"]
    as_fp32 = predict_memory(model, "adamw", weight_dtype=torch.float32)
    assert as_fp32["weights"] == 2 * predicted["weights"] and as_fp32["grads"] == 2 * predicted["grads"]


def test_adafactor_state_is_factored_for_any_rank():
    for shape in [(3, 5, 7), (6, 4), (9,), (1, 1, 8)]:
        p = nn.Parameter(torch.randn(shape))
        p.grad = torch.randn(shape)
        opt = torch.optim.Adafactor([p])
        opt.step()
        assert tensor_state_bytes("adafactor", shape) == optimizer_state_bytes(opt), shape
    big = tensor_state_bytes("adafactor", (4096, 4096))
    assert big == (4096 + 4096) * 4 + 4 < tensor_state_bytes("adamw", (4096, 4096)) / 1000


def test_predict_llm_size_on_meta_device_without_memory():
    d, n_layers = 12288, 96
    with torch.device("meta"):
        model = TinyTransformer(d_model=d, n_heads=96, n_layers=n_layers)
    assert all(p.is_meta for p in model.parameters())
    pred = predict_memory(model, "adamw")
    n_params = count_parameters(model)[1]
    # per block: q k v o (d*d + d each), up (d*4d + 4d), down (4d*d + d), two LayerNorms (2d each)
    per_block = 12 * d * d + 13 * d
    outside = (4 * d + d) + d + 16 * d + 2 * d + (10 * d + 10)  # embed, cls, pos, norm, head
    assert n_params == n_layers * per_block + outside > 170e9
    assert pred["weights"] == 4 * n_params and pred["grads"] == 4 * n_params
    n_tensors = len(list(model.parameters()))
    assert pred["optimizer"] == 8 * n_params + 4 * n_tensors
    assert pred["total"] == 16 * n_params + 4 * n_tensors
    half = predict_memory(model, "adamw", weight_dtype=torch.bfloat16)
    assert half["weights"] * 2 == pred["weights"]
    eight = predict_memory(model, "adamw8bit")
    assert 0.24 < eight["optimizer"] / pred["optimizer"] < 0.26        # ~2 bytes instead of 8 per parameter
    assert predict_memory(model, "adafactor")["optimizer"] < pred["optimizer"] / 1000
    with pytest.raises(ValueError, match="meta"):
        measure_activation_bytes(model, torch.zeros(1, 64))


def test_activation_bytes_count_saved_storages_once_and_skip_parameters():
    lin = nn.Linear(32, 8)
    x = torch.randn(5, 32, requires_grad=True)
    assert measure_activation_bytes(lin, x) == 5 * 32 * 4               # x saved; the weight is not counted

    class Gram(nn.Module):
        def forward(self, x):
            return x @ x.t()                                           # saves x and a view of x

    assert measure_activation_bytes(Gram(), x) == 5 * 32 * 4


def test_activation_bytes_scale_with_batch_and_drop_with_checkpointing():
    model = make_model("transformer", "full").train()
    x, y = batch(32)
    full = measure_activation_bytes(model, x, F.cross_entropy, y)
    half = measure_activation_bytes(model, x[:16], F.cross_entropy, y[:16])
    assert 1.9 < full / half < 2.1                                       # micro-batch halves activations
    model.set_activation_checkpointing(True)
    ckpt = measure_activation_bytes(model, x, F.cross_entropy, y)
    assert ckpt < full / 3
    model.eval()                                                         # checkpointing is a training feature
    assert measure_activation_bytes(model, x, F.cross_entropy, y) == full
    model.train().set_activation_checkpointing(False)
    step = measure_training_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y)
    assert step["activations"] == full
    assert step["total"] == sum(step[k] for k in ("weights", "grads", "optimizer", "activations"))


def test_bf16_autocast_reduces_activation_bytes():
    model = make_model("transformer", "full").train()
    x, y = batch(64)
    fp32 = measure_activation_bytes(model, x, F.cross_entropy, y)
    bf16 = measure_activation_bytes(model, x, F.cross_entropy, y, autocast_dtype=torch.bfloat16)
    assert bf16 < 0.8 * fp32
    step = measure_training_step(model, torch.optim.AdamW(model.parameters()), x, y, autocast_dtype=torch.bfloat16)
    assert step["activations"] == bf16 and step["weights"] == 4 * count_parameters(model)[1]


def test_per_param_figures_match_large_tensor_formula():
    n = 1 << 20
    for name, expected in [("sgd", 0), ("sgd_momentum", 4), ("adamw", 8), ("adam", 8), ("adamw8bit", 2 + 8 / 256)]:
        per = optimizer_state_bytes_per_param(name)
        assert per == expected
        assert abs(tensor_state_bytes(name, (1024, 1024)) / n - per) < 1e-5
    assert optimizer_state_bytes_per_param("adamw", torch.bfloat16) == 4
    assert optimizer_state_bytes_per_param("adamw8bit", block_size=64) == 2 + 8 / 64
    assert tensor_state_bytes("adamw8bit", (4095,)) == 8 * 4095          # below min_8bit_size: float32
    assert tensor_state_bytes("adamw8bit", (4097,)) == 2 * 4097 + 8 * 17


def test_memory_table_ratio_and_human_units():
    table = memory_table({"weights": 100, "grads": 0, "optimizer": 0, "total": 100},
                         {"weights": 110, "grads": 0, "optimizer": 8, "activations": 5, "total": 123})
    assert list(table.index) == ["weights", "grads", "optimizer", "activations", "total"]
    assert table.loc["weights", "ratio"] == pytest.approx(1.1)
    assert table.loc["grads", "ratio"] == 1.0
    assert math.isinf(table.loc["optimizer", "ratio"]) and math.isnan(table.loc["activations", "ratio"])
    assert table.loc["total", "measured_h"] == "123 B"
    assert human_bytes(1536) == "1.50 KiB" and human_bytes(3 * 2**20) == "3.00 MiB"
    assert human_bytes(5 * 2**40) == "5.00 TiB" and human_bytes(0) == "0 B"


def test_choose_levers_returns_first_configuration_that_fits():
    model = make_model("transformer", "full")
    full = predict_memory(model, "adamw", activation_bytes=10_000)
    eight = predict_memory(model, "adamw8bit", activation_bytes=10_000)
    lora_model = make_model("transformer", "lora")
    lora = predict_memory(lora_model, "adamw", activation_bytes=10_000)
    assert lora["total"] < eight["total"] < full["total"]
    candidates = {"full AdamW": full, "AdamW8bit": eight, "LoRA": lora}
    assert choose_levers(full["total"], candidates) == "full AdamW"
    assert choose_levers(full["total"] - 1, candidates) == "AdamW8bit"
    assert choose_levers(eight["total"] - 1, candidates) == "LoRA"
    assert choose_levers(lora["total"] - 1, candidates) is None
    assert fits_budget(lora, lora["total"]) and not fits_budget(lora["total"], lora["total"] - 1)


def test_bad_inputs_raise_clear_errors():
    model = make_model("mlp", "full")
    with pytest.raises(ValueError, match="optimizer must be one of .*'lion'"):
        predict_memory(model, "lion")
    with pytest.raises(ValueError, match="'rmsprop'"):
        tensor_state_bytes("rmsprop", (3, 3))
    with pytest.raises(ValueError, match="adafactor.*tensor_state_bytes"):
        optimizer_state_bytes_per_param("adafactor")
    with pytest.raises(TypeError, match="weight_dtype"):
        predict_memory(model, weight_dtype="fp16")
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        predict_memory(model, "adamw8bit", block_size=0)
    with pytest.raises(ValueError, match="activation_bytes must be an int >= 0, got -1"):
        predict_memory(model, activation_bytes=-1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        predict_memory("model")
    with pytest.raises(ValueError, match="y must be given with loss_fn"):
        measure_activation_bytes(model, batch()[0], F.cross_entropy)
    with pytest.raises(ValueError, match="budget must be a number of bytes > 0, got 0"):
        fits_budget(10, 0)
    with pytest.raises(ValueError, match="candidates must be a non-empty dict"):
        choose_levers(10, {})
    with pytest.raises(ValueError, match="'total'"):
        choose_levers(10, {"full": {"weights": 3}})
    with pytest.raises(TypeError, match="n must be a finite number of bytes"):
        human_bytes("3 MB")
