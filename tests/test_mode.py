"""Full mode on one GPU: precision, default preset, counted memory and the load check (no GPU needed).

``torch.cuda``'s queries are replaced by fakes describing a GPU (a 16 GB T4, a 24 GB L4, an
A100-80), so the rules are checked on a CPU.
"""

from __future__ import annotations

import logging

import pytest
import torch

from uoe_nb import mode

GiB = 2**30
T4 = (15_835_660_288, 15_835_660_288)  # torch's total for a Tesla T4
L4 = (23_580_639_232, 23_580_639_232)
A100_80 = (85_095_874_560, 85_095_874_560)


def fake_gpu(monkeypatch, memory=A100_80, *, bf16=True, free=None):
    """Make torch report one CUDA GPU with ``memory`` = (free, total) bytes."""
    total = memory[1]
    free = memory[0] if free is None else free
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))

    def bf16_supported(including_emulation=True):
        return bf16 or including_emulation  # a T4 emulates bf16: only the native answer is False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)


def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# --------------------------------------------------------------------------- precision and preset


def test_dtype_by_device(monkeypatch):
    no_gpu(monkeypatch)
    assert mode.dtype_for_device() == torch.float32
    assert mode.dtype_for_device("cpu") == torch.float32
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        mode.dtype_for_device("cuda")
    fake_gpu(monkeypatch, A100_80, bf16=True)
    assert mode.dtype_for_device() == torch.bfloat16
    assert mode.dtype_for_device("cpu") == torch.float32
    fake_gpu(monkeypatch, T4, bf16=False)  # torch would emulate bf16 on a T4: fp16 instead
    assert mode.dtype_for_device() == torch.float16


@pytest.mark.parametrize(
    ("total", "preset"),
    [
        (T4[1], "granite-3.0-1b-a400m"),
        (8 * 10**9, "granite-3.0-1b-a400m"),
        (20 * 10**9 - 1, "granite-3.0-1b-a400m"),
        (20 * 10**9, "olmoe-1b-7b"),
        (L4[1], "olmoe-1b-7b"),
        (42_298_834_944, "olmoe-1b-7b"),  # A100-40
        (A100_80[1], "olmoe-1b-7b"),
        (150 * 10**9, "olmoe-1b-7b"),  # H200
    ],
)
def test_preset_for_gpu_memory(total, preset):
    assert mode.preset_for_gpu_memory(total) == preset


def test_preset_for_gpu_memory_bad_input():
    for bad in (0, -1, 1.5e10, True, "16GB"):
        with pytest.raises(ValueError, match="positive int"):
            mode.preset_for_gpu_memory(bad)


def test_default_model_follows_the_gpu_and_the_environment(monkeypatch):
    monkeypatch.delenv("UOE_NB_MODEL", raising=False)
    no_gpu(monkeypatch)
    assert mode.default_model("tiny") == "tiny-qwen2moe"
    assert mode.default_model("full") == "olmoe-1b-7b"
    fake_gpu(monkeypatch, T4, bf16=False)
    assert mode.default_model("full") == "granite-3.0-1b-a400m"
    fake_gpu(monkeypatch, L4)
    assert mode.default_model("full") == "olmoe-1b-7b"
    monkeypatch.setenv("UOE_NB_MODEL", "mixtral-8x7b")
    assert mode.default_model("full") == "mixtral-8x7b"


# --------------------------------------------------------------------------- counted memory


def test_memory_need_of_olmoe_counted_by_hand():
    """OLMoE-1B-7B: 6,919,161,856 parameters; an expert is 3 x 2048 x 1024, the router 64 x 2048."""
    uoe = mode.memory_need("olmoe-1b-7b", "uoe", dtype=torch.bfloat16)
    assert uoe.parameters == 6_919_161_856 and uoe.weights == 2 * uoe.parameters
    assert uoe.trained == 3 * 2048 * 1024 + 64 * 2048
    assert uoe.training == 16 * uoe.trained  # copy + grad (2 + 2), fp32 master 4, two fp32 moments 8
    tokens = 4 * 512
    assert uoe.tokens == tokens
    assert uoe.activations == tokens * (8 * 2048 * 2 * 16 + 12 * 50304)
    assert uoe.total == int((uoe.weights + uoe.training + uoe.activations) * 1.1) + 512 * 2**20
    full = mode.memory_need("olmoe-1b-7b", "full", dtype=torch.bfloat16)
    assert full.training == 3 * full.weights  # gradients and two moments in bf16: 4x weights in all
    assert full.activations == tokens * (80 * 2048 * 2 * 16 + 12 * 50304)
    # the H100 measurement this is calibrated on: 64.5 GB peak for whole-model GA, 17.8 GB for UOE
    assert 64.5e9 < full.total < 64.5e9 * 1.25
    assert 17.8e9 * 0.95 < uoe.total < 17.8e9 * 1.25
    fp16 = mode.memory_need("olmoe-1b-7b", "full", dtype=torch.float16)
    assert fp16.training == 14 * fp16.parameters  # fp32 masters by default in fp16
    assert mode.memory_need("olmoe-1b-7b", "full", dtype=torch.float16, master_weights=False).training == (
        3 * fp16.weights
    )
    small = mode.memory_need("olmoe-1b-7b", "uoe", dtype=torch.bfloat16, batch_size=1, max_length=128)
    assert small.activations == uoe.activations // 16
    forward = mode.memory_need("olmoe-1b-7b", "forward", dtype=torch.bfloat16)
    assert forward.training == 0 and forward.activations < uoe.activations


def test_memory_need_of_a_loaded_model():
    from uoe_nb.zoo import load_zoo_model

    model, _ = load_zoo_model("tiny-qwen2moe")
    need = mode.memory_need(model, "uoe")
    assert need.dtype == torch.float32 and need.parameters == 1_206_976
    assert need.weights == 4 * 1_206_976
    assert need.training == 16 * need.trained and 0 < need.trained < need.parameters


def test_memory_need_bad_input():
    with pytest.raises(ValueError, match="scope must be one of"):
        mode.memory_need("olmoe-1b-7b", "lora")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        mode.memory_need("olmoe-1b-7b", batch_size=0)
    with pytest.raises(ValueError, match="preset name, a hub id or a loaded model"):
        mode.memory_need(42)


def test_fitting_preset():
    assert mode.fitting_preset(T4[0], torch.float16) == "granite-3.0-1b-a400m"
    assert mode.fitting_preset(L4[0]) == "olmoe-1b-7b"
    assert mode.fitting_preset(150 * 10**9) == "mixtral-8x7b"
    assert mode.fitting_preset(2 * GiB) is None


# --------------------------------------------------------------------------- training_fits


def test_training_fits_whole_model_on_an_a100_but_not_on_a_t4(monkeypatch):
    fake_gpu(monkeypatch, A100_80)
    ok, message = mode.training_fits("olmoe-1b-7b", "full", dtype=torch.bfloat16)
    assert ok and message.startswith("fits: needs 69.5 GiB") and "79.3 GiB free of 79.3 GiB" in message
    ok, message = mode.training_fits("qwen1.5-moe-a2.7b", "full", dtype=torch.bfloat16)
    assert not ok and message.startswith("does not fit: needs 138.2 GiB")
    assert mode.training_fits("qwen1.5-moe-a2.7b", "uoe", dtype=torch.bfloat16)[0]
    fake_gpu(monkeypatch, T4, bf16=False)
    ok, message = mode.training_fits("granite-3.0-1b-a400m", "full")
    assert not ok and "float16" in message and "14.7 GiB free" in message
    assert mode.training_fits("granite-3.0-1b-a400m", "uoe")[0]


def test_training_fits_counts_the_weights_of_a_loaded_model_as_used(monkeypatch):
    from uoe_nb.zoo import load_zoo_model

    model, _ = load_zoo_model("tiny-qwen2moe")
    need = mode.memory_need(model, "full")
    fake_gpu(monkeypatch, A100_80, free=need.total - 1)
    assert not mode.training_fits(model, "full")[0]  # on the CPU: its weights are not on the GPU yet
    monkeypatch.setattr(type(next(model.parameters())), "device", property(lambda p: torch.device("cuda", 0)))
    ok, message = mode.training_fits(model, "full")
    assert ok and "already loaded" in message


def test_training_fits_without_a_gpu_does_not_check(monkeypatch):
    no_gpu(monkeypatch)
    ok, message = mode.training_fits("mixtral-8x7b", "full", dtype=torch.bfloat16)
    assert ok and message.startswith("no CUDA GPU, memory not checked") and "428.1 GiB" in message


def test_training_fits_of_an_unreadable_hub_id_warns(monkeypatch, caplog):
    from transformers import AutoConfig

    def unreadable(name, *args, **kwargs):
        raise OSError(f"{name} is not cached and the hub is offline")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreadable)
    fake_gpu(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="uoe_nb.mode"):
        ok, message = mode.training_fits("someone/private-moe", "full")
    assert ok and "memory not checked" in message and "could not count someone/private-moe" in caplog.text


# --------------------------------------------------------------------------- load_model


@pytest.fixture
def fake_hub(monkeypatch):
    """Record what load_model asks transformers for, and load nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = {}

    class Model:
        def eval(self):
            return self

    class Tok:
        pad_token, eos_token = None, "</s>"

    def from_pretrained(hub_id, **kwargs):
        calls["model"] = (hub_id, kwargs)
        return Model()

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda hub_id: Tok())
    return calls


def test_load_model_puts_everything_on_one_gpu(monkeypatch, fake_hub):
    monkeypatch.delenv("UOE_NB_MODEL", raising=False)
    fake_gpu(monkeypatch, T4, bf16=False)
    _, tok = mode.load_model(mode="full")  # the T4's default preset
    hub_id, kwargs = fake_hub["model"]
    assert hub_id == "ibm-granite/granite-3.0-1b-a400m-instruct"
    assert kwargs == {"dtype": torch.float16, "device_map": {"": 0}}  # one GPU, nothing offloaded
    assert tok.pad_token == "</s>"
    fake_gpu(monkeypatch, L4)
    mode.load_model(mode="full")
    assert fake_hub["model"] == (
        "allenai/OLMoE-1B-7B-0125-Instruct",
        {"dtype": torch.bfloat16, "device_map": {"": 0}},
    )


def test_load_model_refuses_a_model_that_does_not_fit(monkeypatch, fake_hub):
    fake_gpu(monkeypatch, T4, bf16=False)
    with pytest.raises(RuntimeError) as err:
        mode.load_model("olmoe-1b-7b", mode="full")
    message = str(err.value)
    assert "olmoe-1b-7b does not fit this GPU for UOE training: it needs 17.1 GiB" in message
    assert "14.7 GiB free of 14.7 GiB" in message and "UOE_NB_MODEL=granite-3.0-1b-a400m" in message
    assert "never offloads" in message and "model" not in fake_hub  # refused before loading
    fake_gpu(monkeypatch, T4, bf16=False, free=GiB)  # something else holds the GPU
    with pytest.raises(RuntimeError, match="no preset fits; use a larger GPU or tiny mode"):
        mode.load_model("granite-3.0-1b-a400m", mode="full")


def test_load_model_counts_hub_ids_from_their_config_or_warns(monkeypatch, fake_hub, caplog):
    from transformers import AutoConfig

    from uoe_nb import scale

    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda name: scale.architecture_config("mixtral-8x7b"))
    fake_gpu(monkeypatch, A100_80)
    with pytest.raises(RuntimeError, match="someone/big-moe does not fit"):
        mode.load_model("someone/big-moe", mode="full")

    def unreadable(name):
        raise OSError("offline")

    monkeypatch.setattr(AutoConfig, "from_pretrained", unreadable)
    with caplog.at_level(logging.WARNING, logger="uoe_nb.mode"):
        mode.load_model("someone/big-moe", mode="full")
    assert "without the memory check" in caplog.text and fake_hub["model"][0] == "someone/big-moe"


def test_load_model_on_a_cpu_loads_fp32_without_a_device_map(monkeypatch, fake_hub):
    no_gpu(monkeypatch)
    mode.load_model("olmoe-1b-7b", mode="full")
    assert fake_hub["model"] == (
        "allenai/OLMoE-1B-7B-0125-Instruct",
        {"dtype": torch.float32, "device_map": None},
    )


def test_model_depth_reads_the_configuration_without_loading():
    from uoe_nb import mode as M
    from uoe_nb.scale import architecture_config

    assert M.model_depth("tiny-qwen2moe") == 4  # the zoo's four-layer models
    assert M.model_depth("olmoe-1b-7b") == architecture_config("olmoe-1b-7b").num_hidden_layers == 16
    with pytest.raises(ValueError, match="zoo name"):
        M.model_depth("")
