"""The branches a Mac takes, forced on the CPU backend (slowly) and checked against the
float32 CPU path: MLX's fused quantized kernels, 16-bit prefix-sharing masks, the
recommended working set, ``compute_dtype: auto``."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.forward import logprobs, prefix
from mlx_dpo.model import loader as model_lib, quant
from mlx_dpo.monitor import perf
from mlx_dpo.train import trainer as trainer_lib
from mlx_dpo.model.adapters import add_adapters
from mlx_dpo.data.batching import collate
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.forward.logprobs import completion_logps
from mlx_dpo.model.loader import load_model
from mlx_dpo.forward.packed import enable_position_rope
from mlx_dpo.model.toy import build_toy_model
from mlx_dpo.util import metal
from mlx_dpo.train.trainer import DPOTrainer


def on_metal(monkeypatch):
    """``on_cpu()`` is False wherever it is looked up."""
    for module in (quant, logprobs, model_lib, prefix, trainer_lib):
        monkeypatch.setattr(module, "on_cpu", lambda: False)


def random_pairs(n, vocab, seed=0):
    """Prompts of 1..12 tokens (different lengths, so prefix sharing pads), completions 1..8."""
    rng = np.random.default_rng(seed)
    draw = lambda lo, hi: [int(t) for t in rng.integers(4, vocab, rng.integers(lo, hi))]  # noqa: E731
    return [TokenizedPair([1] + draw(0, 12), draw(0, 8) + [2], draw(0, 8) + [2]) for _ in range(n)]


def randomize_lora_b(model, seed=1):
    """Adapters that change the output (``lora_b`` starts at 0), so their gradients are non-trivial."""
    for layer in [m for _, m in model.named_modules() if hasattr(m, "lora_b")]:
        layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(seed)) * 0.05


# --------------------------------------------------------------------------- quantized kernels


def qlora_step(model_dir, tmp_path, name):
    """One compiled QLoRA step (live reference = the quantized base): loss, metrics, grads,
    and how many times MLX's fused quantized kernels ran (QuantizedLinear / the tied head)."""
    cfg = DPOConfig(model=str(model_dir), output_dir=str(tmp_path / name), quantize={"bits": 4, "group_size": 32},
                    compute_dtype="float32", batch_size=4, max_steps=1, progress_bar=False, seed=0)
    trainer = DPOTrainer(cfg, train_pairs=random_pairs(4, 200), log=lambda *a: None)
    randomize_lora_b(trainer.model)
    batch = trainer.to_device(trainer.collate(trainer.train_pairs, [0, 1, 2, 3]))
    loss, metrics, _, grads, _ = trainer.grad_step(batch, trainer.loss_state)
    return loss.item(), {k: v.item() for k, v in metrics.items()}, {k: np.array(v) for k, v in tree_flatten(grads)}


@pytest.mark.parametrize("arch", ["llama_dir", "qwen2_dir"])  # qwen2: tied QuantizedEmbedding.as_linear head
def test_fused_quantized_kernels_match_the_cpu_dequantize_path(arch, request, tmp_path, monkeypatch):
    """Metal runs ``quantized_matmul`` (and the tied head's ``QuantizedEmbedding.as_linear``);
    the CPU de-quantizes and runs a float32 GEMM. Same weights, so in float32 they differ
    by summation order only (measured: equal loss, grads within 5e-7 of their max)."""
    calls = {"linear": 0, "tied_head": 0}
    linear_call, as_linear = nn.QuantizedLinear.__call__, nn.QuantizedEmbedding.as_linear

    def count(key, fn):
        return lambda self, x: calls.__setitem__(key, calls[key] + 1) or fn(self, x)

    monkeypatch.setattr(nn.QuantizedLinear, "__call__", count("linear", linear_call))
    monkeypatch.setattr(nn.QuantizedEmbedding, "as_linear", count("tied_head", as_linear))
    loss_cpu, metrics_cpu, grads_cpu = qlora_step(request.getfixturevalue(arch), tmp_path, "cpu")
    assert calls == {"linear": 0, "tied_head": 0}  # the CPU path de-quantizes
    on_metal(monkeypatch)
    loss, metrics, grads = qlora_step(request.getfixturevalue(arch), tmp_path, "metal")
    assert calls["linear"] > 0 and (calls["tied_head"] > 0) == (arch == "qwen2_dir")

    assert loss == pytest.approx(loss_cpu, abs=1e-6)
    for k in metrics_cpu:
        assert metrics[k] == pytest.approx(metrics_cpu[k], abs=1e-5), k
    assert grads.keys() == grads_cpu.keys()
    scale = max(np.abs(g).max() for g in grads_cpu.values())
    assert scale > 1e-3  # non-trivial gradients
    for k in grads_cpu:
        np.testing.assert_allclose(grads[k], grads_cpu[k], atol=2e-5 * scale, rtol=1e-4, err_msg=k)


# --------------------------------------------------------------------------- 16-bit prefix sharing


def logps_and_grads(model_dir, dtype, layout, n=5):
    """Per-token log-probs and adapter gradients of ``n`` pairs in ``dtype``, in batch
    ``layout`` (unshared, shared prefix, packed); the same adapters in every call (seeded)."""
    mx.random.seed(0)
    cfg = DPOConfig(model=str(model_dir), compute_dtype=dtype)
    model, _, _ = load_model(cfg)
    add_adapters(model, cfg)
    randomize_lora_b(model)
    enable_position_rope(model)
    batch = {k: mx.array(v) for k, v in collate(random_pairs(n, 200, seed=3), list(range(n)), layout=layout)
             .arrays().items()}
    weights = mx.arange(batch["targets"].shape[1], dtype=mx.float32) + 1
    _, grads = nn.value_and_grad(model, lambda m: (completion_logps(m, batch)["token_logps"] * weights).sum())(model)
    out = completion_logps(model, batch)
    return (np.array(out["token_logps"]), np.array(out["mask"]) > 0,
            {k: np.array(v.astype(mx.float32)).ravel() for k, v in tree_flatten(grads)})


@pytest.mark.parametrize("dtype, atol", [("bfloat16", 1e-2), ("float16", 2e-3)])
def test_shared_prefix_in_16_bit_matches_unshared_and_float32(llama_dir, dtype, atol):
    """Shared-prefix and packed log-probs in bfloat16/float16 equal the unshared ones and float32's
    within the dtype's rounding (measured max |diff| on log-probs ~ -6.2: bfloat16 2.4e-3,
    float16 5e-4; hiding no left-pad key moves them by 0.59), gradients to cosine > 0.999
    (measured >= 0.99989; that mutation: -0.27)."""
    ref, mask, ref_grads = logps_and_grads(llama_dir, "float32", "unshared")
    for layout in ("unshared", "prefix", "packed"):
        logps, _, grads = logps_and_grads(llama_dir, dtype, layout)
        assert np.isfinite(logps).all()
        np.testing.assert_allclose(logps[mask], ref[mask], atol=atol, err_msg=layout)
        for k, g in grads.items():
            cosine = g @ ref_grads[k] / (np.linalg.norm(g) * np.linalg.norm(ref_grads[k]))
            assert cosine > 0.999, f"{layout} {k}: cosine {cosine:.5f}"


def test_prefix_masks_hold_no_infinity_in_float16():
    """An additive -1e9 is -inf in float16: on Metal a tile of keys that is all -inf makes an
    online softmax compute -inf - -inf = NaN. The masks are boolean (True = attend), exact in
    every dtype, and every query sees at least itself."""
    from mlx_dpo.forward.prefix import prefix_masks

    for mask in prefix_masks(mx.array([1, 4, 6]), 6, 3):
        assert mask.dtype == mx.bool_ or bool(mx.isfinite(mask.astype(mx.float16)).all())
        assert bool(mask.any(axis=-1).all())  # no empty row


# --------------------------------------------------------------------------- memory probe, compute_dtype


METAL_INFO = {"architecture": "applegpu_g15s", "device_name": "Apple M3 Pro", "memory_size": 36 * 2**30,
              "max_recommended_working_set_size": 27 * 2**30, "max_buffer_size": 20 * 2**30, "resource_limit": 499000}


def test_memory_is_metals_recommended_working_set(llama_dir, monkeypatch):
    """``mx.device_info()`` (MLX >= 0.29; ``mx.metal.device_info`` is deprecated) reports the
    recommended working set on Metal: it, not the physical RAM, bounds the memory warning.
    The CPU backend reports no memory size: physical RAM; CUDA reports ``total_memory``."""
    import os

    assert metal.system_memory_bytes() == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    pairs = random_pairs(4, 200)
    for recommended, warns in ((27 * 2**30, False), (2**20, True)):
        monkeypatch.setattr(mx, "device_info", lambda *a, **k: {**METAL_INFO,
                                                                "max_recommended_working_set_size": recommended})
        assert metal.system_memory_bytes() == recommended
        lines = []
        perf.warn_if_too_big(model, pairs, 4, False, False, log=lines.append)
        assert bool(lines) == warns and (not warns or f"{recommended / 1e9:.1f} GB available" in lines[0])
    monkeypatch.setattr(mx, "device_info", lambda *a, **k: {"device_name": "NVIDIA H100", "total_memory": 80 * 2**30})
    assert metal.system_memory_bytes() == 80 * 2**30


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return build_toy_model(tmp_path_factory.mktemp("bf16") / "model", arch="llama", dtype="bfloat16")


def float_dtypes(module):
    return {v.dtype for _, v in tree_flatten(module.parameters()) if mx.issubdtype(v.dtype, mx.floating)}


def test_compute_dtype_auto_keeps_the_checkpoint_dtype_on_metal(bf16_dir, tmp_path, monkeypatch):
    """``auto``: float32 on the CPU backend, the checkpoint's bfloat16 on Metal, where full
    fine-tuning then holds the trained block in float32 and the frozen ones in bfloat16."""
    cfg = DPOConfig(model=str(bf16_dir), output_dir=str(tmp_path / "run"), train_type="full", num_layers=1,
                    batch_size=4, max_steps=1, progress_bar=False, seed=0, cpu_fast_math=True)  # asked for: CPU only
    assert model_lib.compute_dtype(cfg) == mx.float32
    assert float_dtypes(load_model(cfg)[0]) == {mx.float32}
    on_metal(monkeypatch)
    assert model_lib.compute_dtype(cfg) is None
    assert model_lib.compute_dtype(DPOConfig(compute_dtype="float16")) == mx.float16  # explicit wins
    trainer = DPOTrainer(cfg, train_pairs=random_pairs(4, 200), log=lambda *a: None)
    assert float_dtypes(trainer.model.layers[0]) == float_dtypes(trainer.model.model.embed_tokens) == {mx.bfloat16}
    assert float_dtypes(trainer.model.layers[1]) == {mx.float32}
    assert not any(getattr(layer, "cpu_math", False) for layer in trainer.model.layers)  # MLX's kernels on Metal
    before = {k: np.array(v) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    trainer.train()
    after = dict(tree_flatten(trainer.model.trainable_parameters()))
    assert all(np.mean(np.array(after[k]) != v) > 0.95 for k, v in before.items())  # lr 1e-6 moves them


# --------------------------------------------------------------------------- quantized layers on the CPU


def test_every_quantized_layer_expands_on_the_cpu_and_matches_the_fused_kernel(qwen2_dir, monkeypatch):
    """Layers no adapter wraps (here all: no adapters yet) and the tied quantized head take the
    de-quantize + GEMM path on the CPU (MLX's CPU quantized matmul is ~15x slower); the
    logits equal those of MLX's fused ``quantized_matmul`` on the same weights."""
    model, tokenizer, _ = load_model(DPOConfig(model=str(qwen2_dir), quantize={"bits": 4, "group_size": 32}))
    kinds = {type(m).__name__ for _, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear,
                                                                                   nn.QuantizedEmbedding))}
    assert kinds == {"ExpandedOnCPULinear", "ExpandedOnCPUEmbedding"}
    fused = {"calls": 0}
    quantized_matmul = mx.quantized_matmul

    def counted(*args, **kwargs):
        fused["calls"] += 1
        return quantized_matmul(*args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", counted)
    x = mx.array([tokenizer.encode("Repeat: apple banana cherry. Answer:")])
    expanded = np.array(model(x))
    assert fused["calls"] == 0
    monkeypatch.setattr(quant, "on_cpu", lambda: False)  # the Metal branch: the fused kernels
    metal = np.array(model(x))
    assert fused["calls"] > 0
    scale = np.abs(metal).max()
    assert np.abs(expanded - metal).max() < 1e-5 * scale


def test_inference_dequantizes_once_on_the_cpu_only(qwen2_dir, monkeypatch):
    """generate/sample/audit on the CPU: the quantized layers become float32 ones (same logits
    as the quantized model's); on Metal the model stays quantized."""
    from mlx_dpo.model.loader import dequantize_for_inference, is_quantized

    cfg = DPOConfig(model=str(qwen2_dir), quantize={"bits": 4, "group_size": 32})
    model, tokenizer, _ = load_model(cfg)
    x = mx.array([tokenizer.encode("Repeat: apple banana cherry. Answer:")])
    quantized = np.array(model(x))
    dequantize_for_inference(model)
    assert not is_quantized(model)
    dense = np.array(model(x))
    assert np.abs(dense - quantized).max() < 1e-5 * np.abs(quantized).max()
    on_metal(monkeypatch)
    model, _, _ = load_model(cfg)
    dequantize_for_inference(model)
    assert is_quantized(model)


def test_training_wires_metals_working_set_and_restores_it(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    """As mlx-lm's trainer: ``mx.set_wired_limit(max_recommended_working_set_size)`` while training
    (not before the first step), the previous limit back at the end; a warning when the weights
    alone pass 90% of the set. The CPU backend: never called."""
    from mlx_dpo.util import metal

    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 123)
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "cpu"), max_steps=2,
                    batch_size=4, progress_bar=False, cache_dir=str(tmp_path / "cache"))
    DPOTrainer(cfg, log=lambda *a: None).train()
    assert calls == []  # not on Metal
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    monkeypatch.setattr(mx, "device_info", lambda *a, **k: {**METAL_INFO, "max_recommended_working_set_size": 10**9})
    monkeypatch.setattr(mx, "synchronize", lambda *a: calls.append("synchronize"))
    steps = []

    class Spy:  # what had been called when each step ended
        def on_step_end(self, *args):
            steps.append(list(calls))

    trainer = DPOTrainer(DPOConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "metal")}), log=lambda *a: None,
                         callbacks=[Spy()])
    trainer.train()
    assert steps[0] == [10**9] and calls == [10**9, "synchronize", 123]
    lines = []
    with metal.wired_limit(trainer.model, lines.append):
        pass
    assert lines == []
    monkeypatch.setattr(mx, "device_info", lambda *a, **k: {**METAL_INFO, "max_recommended_working_set_size": 1000})
    with metal.wired_limit(trainer.model, lines.append):
        pass
    assert len(lines) == 1 and "over 90% of Metal's recommended working set" in lines[0]


def test_buffer_cache_is_freed_after_evaluation_and_the_precompute(llama_dir, toy_data_dir, tmp_path):
    """Eval and precompute batches leave no buffers in MLX's cache (``mx.clear_cache``): measured
    with ``mx.get_cache_memory``, which holds megabytes after a forward without it."""
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), max_steps=1,
                    batch_size=8, progress_bar=False, precompute_ref_log_probs=True, eval_steps=1,
                    cache_dir=str(tmp_path / "cache"))  # its own: test_reference counts the forwards of a fresh one
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    trainer.model(mx.ones((8, 64), mx.int32)).sum().item()
    cached = mx.get_cache_memory()
    assert cached > 2**20  # a forward leaves megabytes of freed buffers cached
    trainer.precompute_reference()
    assert mx.get_cache_memory() == 0
    trainer.model(mx.ones((8, 64), mx.int32)).sum().item()
    assert mx.get_cache_memory() > 2**20
    assert trainer.evaluate()["eval_loss"] > 0
    assert mx.get_cache_memory() < 1024  # at most the last batch's scalars, freed on return


@pytest.mark.parametrize("arch", ["gemma3_text", "gemma2", "phi3"])
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_new_architectures_in_16_bit_stay_as_close_to_float32_as_mlx_lm(arch, dtype):
    """Gemma 3 (float16 takes its clipped residuals; sliding windows), Gemma 2 (soft-capped attention
    on grouped heads) and Phi-3 in a Mac's compute dtypes, in the shared-prefix layout (Metal's) and
    the packed one: summed completion log-probs stray from the float32 forward by at most 1.5 times
    what mlx-lm's own forward in that dtype strays."""
    from test_blocks import adapted, long_pairs, oracle

    model = adapted(arch)
    pairs = long_pairs(model.args.vocab_size)
    ref = np.array(oracle(model, pairs))
    model.set_dtype(dtype, lambda d: mx.issubdtype(d, mx.floating))
    theirs = np.abs(np.array(oracle(model, pairs).astype(mx.float32)) - ref).max()
    assert theirs > 0  # the dtype rounds
    for layout in ("prefix", "packed"):
        batch = {k: mx.array(v) for k, v in collate(pairs, [0, 1, 2], layout=layout).arrays().items()}
        sums = completion_logps(model, batch)["token_logps"].astype(mx.float32).sum(axis=-1)
        ours = np.abs(np.array(sums) - ref).max()
        assert ours <= 1.5 * theirs + 1e-3 * np.abs(ref).max(), (layout, ours, theirs)
