"""Performance contracts that can be asserted exactly: no retracing beyond the length
buckets, gradient checkpointing changes no gradient, planning/MFU arithmetic."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_dpo.train import trainer as trainer_module
from mlx_dpo.data.batching import BatchSampler
from mlx_dpo.data.shapes import ShapePlan, bucket_length
from helpers import lognormal_lengths
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from mlx_dpo.model.loader import load_model
from mlx_dpo.monitor.perf import (Throughput, compute_parameters, flops_per_token, reference_blas_warning,
                                  static_memory_estimate)
from mlx_dpo.train.trainer import DPOTrainer


def lognormal_pairs(n, vocab, seed=0, **kw):
    """Pairs with UltraFeedback-like (lognormal, long-tailed) lengths."""
    rng = np.random.default_rng(seed)
    ids = lambda k: [int(x) for x in rng.integers(4, vocab, k)]  # noqa: E731
    return [TokenizedPair([1] + ids(p - 1), ids(c - 1) + [2], ids(r - 1) + [2])
            for p, c, r in lognormal_lengths(n, seed, **kw)]


def fed_shapes(trainer):
    """Record the array shapes every call of the compiled step receives."""
    seen, step = set(), trainer.grad_step

    def wrapped(batch, loss_state):
        seen.add(tuple(sorted((k, v.shape) for k, v in batch.items())))
        return step(batch, loss_state)

    trainer.grad_step = wrapped
    return seen


@pytest.mark.parametrize("prefix", ["true", "false"])
def test_traces_equal_fed_shapes_and_stay_within_the_bound(llama_dir, tmp_path, prefix):
    """Long-tailed lengths (which gave one new shape every few steps before): one trace per
    shape the step was fed, and never more than max_batch_shapes of them."""
    cfg = DPOConfig(model=str(llama_dir), output_dir=str(tmp_path / prefix), batch_size=2, max_steps=24,
                    eval_steps=0, save_steps=0, logging_steps=100, progress_bar=False, seed=0,
                    prefix_sharing=prefix, max_batch_shapes=4)
    model, tok, _ = load_model(cfg)
    pairs = lognormal_pairs(64, model.args.vocab_size, max_length=192, max_prompt_length=96)
    trainer = DPOTrainer(cfg, model, tok, pairs, [], log=lambda *a: None)
    seen = fed_shapes(trainer)
    trainer.train()
    assert trainer.trace_count == len(seen) and 1 < len(seen) <= 4, seen
    last = trainer.state.log_history[-1]
    assert last["compiled_shapes"] == len(seen)
    assert abs(last["compile_seconds"] - last["time/compile"]) <= 0.051  # one quantity (rounded to 0.1 s / 1 ms)
    # the last record carries the run's time split (compile: the traced steps beyond their tokens at steady speed)
    assert 0 <= last["time/compile"] and last["time/compile"] + last["time/train"] <= last["train_runtime"] + 0.1
    assert abs(sum(v for k, v in last.items() if k.startswith("time/")) - last["train_runtime"]) < 0.5


INPUTS = {  # input positions a pair fills / its floor (chosen and rejected padded to the longer), by layout
    "unshared": (lambda p, c, r: 2 * p + c + r - 2, lambda p, c, r: 2 * (p + max(c, r) - 1)),
    "prefix": (lambda p, c, r: p + c + r - 2, lambda p, c, r: p + 2 * (max(c, r) - 1)),
    "packed": (lambda p, c, r: p + c + r - 2, lambda p, c, r: p + c + r - 2),
}


@pytest.mark.parametrize("layout", ["unshared", "prefix", "packed"])
def test_shape_plan_covers_every_batch_with_few_cells_and_modest_padding(layout):
    """8k UltraFeedback-like pairs: <= 16 cells; every batch of an epoch pads to one of them and
    holds its pairs; padding (counted here from the raw lengths) stays within a few points of
    the floor that a batch of one pair already has (chosen and rejected padded to the longer)."""
    lengths = lognormal_lengths(8000, seed=0)
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lengths]
    plan = ShapePlan(pairs, layout, max_cells=16)
    assert len(plan.cells) <= 16
    sampler = BatchSampler(pairs, 4, seed=0, shapes=plan)
    slots = filled = 0
    fills, floors = INPUTS[layout]
    for batch in sampler.epoch_batches(0):
        a, b = plan.cell([pairs[i] for i in batch])
        assert (a, b) in plan.cells
        for p, c, r in (lengths[i] for i in batch):
            width = {"unshared": p + max(c, r) - 1, "prefix": p, "packed": p + c + r - 2}[layout]
            assert width <= a and max(c, r) <= b
            filled += fills(p, c, r)
        slots += len(batch) * {"unshared": 2 * a, "prefix": a + 2 * (b - 1), "packed": a}[layout]
    floor = 1 - sum(fills(*x) for x in lengths) / sum(floors(*x) for x in lengths)
    padding = 1 - filled / slots
    # measured: unshared 27.2% (floor 20.7%), prefix 38.7% (23.7%), packed 8.2% (0)
    assert padding < floor + {"unshared": 0.07, "prefix": 0.16, "packed": 0.10}[layout], (padding, floor)


def test_shape_plan_keeps_every_fine_cell_when_the_bound_allows():
    """With room for all of them, the cells are the pairs' own rounded widths (16, 32, 48, 64, 80, ...
    up to 128, then eighths of the next power of two: 160, 192, 224, ...) plus the one that holds all."""
    pairs = [TokenizedPair([1] * 10, [5] * 20, [6] * 3), TokenizedPair([1] * 40, [5] * 70, [6] * 90),
             TokenizedPair([1] * 5, [5] * 200, [6] * 1)]
    assert ShapePlan(pairs, "prefix", 8).cells == [(16, 32), (48, 96), (16, 224), (48, 224)]  # by cost P + 2C
    assert ShapePlan(pairs, "unshared", 8).cells == [(32, 32), (160, 96), (224, 224)]
    # one cell: the one that holds everything
    assert ShapePlan(pairs, "prefix", 1).cells == [(48, 224)]


def test_sampler_epochs_are_resumable_and_drop_different_pairs():
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lognormal_lengths(203, seed=1)]
    plan = ShapePlan(pairs, "unshared", 6)
    a = BatchSampler(pairs, 4, seed=3, shapes=plan)
    it = iter(a)
    run = [next(it) for _ in range(2 * len(a) + 5)]
    assert len(a) == 203 // 4
    epochs = [run[:len(a)], run[len(a): 2 * len(a)]]
    for epoch in epochs:
        seen = [i for g in epoch for i in g]
        assert len(seen) == len(set(seen)) == 4 * len(a)  # each pair at most once; 3 dropped
    dropped = [set(range(203)) - {i for g in e for i in g} for e in epochs]
    assert dropped[0] != dropped[1]  # not always the same (longest) pairs
    b = BatchSampler(pairs, 4, seed=3, shapes=plan)
    b.state.epoch, b.state.index = 1, 7  # resume mid-epoch
    it = iter(b)
    assert [next(it) for _ in range(len(a) - 7 + 5)] == run[len(a) + 7:]


def test_skipped_update_changes_nothing_and_one_sync_per_step(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), batch_size=4,
                    max_steps=6, eval_steps=0, save_steps=0, logging_steps=100, progress_bar=False, seed=0)
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    batch = trainer.to_device(trainer.collate(trainer.train_pairs, [0, 1, 2, 3]))
    grads = trainer.grad_step(batch, trainer.loss_state)[3]
    before = [np.array(v) for _, v in tree_flatten((trainer.model.trainable_parameters(), trainer.optimizer.state))]
    trainer.apply_update(grads, mx.array(False))
    after = [np.array(v) for _, v in tree_flatten((trainer.model.trainable_parameters(), trainer.optimizer.state))]
    assert len(before) == len(after) and all(np.array_equal(x, y) for x, y in zip(before, after))
    trainer.apply_update(grads, mx.array(True))
    assert trainer.optimizer.step.item() == 1
    evals = []
    real_eval = mx.eval
    monkeypatch.setattr(trainer_module.mx, "eval", lambda *a: (evals.append(sys._getframe(1).f_code.co_name),
                                                               real_eval(*a))[1])
    traced_before = trainer.trace_count
    trainer.train()
    in_steps = [name for name in evals if name in ("_train_loop", "_accumulate", "_step_metrics")]
    assert len(in_steps) == cfg.max_steps and trainer.trace_count > traced_before  # 1 per step, a tracing one too


def test_gradient_checkpointing_same_gradients(llama_dir, toy_data_dir, tmp_path):
    grads = []
    for ckpt in (False, True):
        cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / str(ckpt)),
                        batch_size=4, max_steps=2, progress_bar=False, seed=0, gradient_checkpointing=ckpt,
                        prefix_sharing="false")
        trainer = DPOTrainer(cfg, log=lambda *a: None)
        for layer in [m for _, m in trainer.model.named_modules() if hasattr(m, "lora_b")]:
            layer.lora_b = mx.random.normal(layer.lora_b.shape, key=mx.random.key(3)) * 0.05
        batch = trainer.to_device(trainer.collate(trainer.train_pairs, [0, 1, 2, 3]))
        loss, _, _, g, _ = trainer.grad_step(batch, trainer.loss_state)
        grads.append((loss.item(), dict(tree_flatten(g))))
    (l1, g1), (l2, g2) = grads
    assert abs(l1 - l2) < 1e-6
    for k in g1:
        np.testing.assert_allclose(np.array(g2[k]), np.array(g1[k]), atol=1e-6, rtol=1e-5, err_msg=k)


def test_flops_and_static_estimate(llama_dir):
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    a = model.args
    per_layer = (a.hidden_size * (a.num_attention_heads + 2 * a.num_key_value_heads) * a.head_dim
                 + a.num_attention_heads * a.head_dim * a.hidden_size + 3 * a.hidden_size * a.intermediate_size
                 + 2 * a.hidden_size)
    expected = a.num_hidden_layers * per_layer + a.hidden_size + a.vocab_size * a.hidden_size  # + final norm + head
    assert compute_parameters(model) == expected
    assert flops_per_token(model, True) == 6 * expected and flops_per_token(model, False) == 4 * expected
    small, big = (static_memory_estimate(model, b, 128)["total"] for b in (2, 4))
    shared = static_memory_estimate(model, 4, 128, prompt_len=64)["total"]
    ckpt = static_memory_estimate(model, 4, 128, gradient_checkpointing=True)["total"]
    assert small < big and shared < big and ckpt < big


def test_throughput_skips_warmup():
    t = Throughput(warmup=2)
    for tokens, seconds in [(100, 50.0), (100, 20.0), (100, 1.0), (300, 1.0)]:
        t.add(tokens, seconds)
    assert t.tokens_per_second == 200.0


def test_plan_leaves_the_config_alone_and_times_training_mode(llama_dir, toy_data_dir, tmp_path, monkeypatch):
    """``plan`` works on a copy of the config, and times the step with dropout on (train mode)."""
    import mlx_dpo.analysis.plan as plan_module

    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(tmp_path / "run"), batch_size=2,
                    max_steps=2, progress_bar=False, lora_dropout=0.1)
    seen, timed = [], plan_module._timed_steps

    def spy(trainer, *args, **kwargs):
        step = trainer.grad_step
        trainer.grad_step = lambda *a: (seen.append(trainer.model.training), step(*a))[1]
        return timed(trainer, *args, **kwargs)

    class Clock:  # every perf_counter() call advances 0.25 s: each timed step takes 0.25 s
        now = 0.0

        @classmethod
        def perf_counter(cls):
            cls.now += 0.25
            return cls.now

    monkeypatch.setattr(plan_module, "_timed_steps", spy)
    monkeypatch.setattr(plan_module, "gemm_peak_gflops", lambda: 100.0)
    monkeypatch.setattr(plan_module, "time", Clock)
    result = plan_module.plan(cfg, steps=1, log=lambda *a: None)
    # the step is timed on the 2 longest pairs: tokens = sum of both sequences of each pair
    _, tok, _ = load_model(cfg)
    from mlx_dpo.data import load_datasets

    pairs, _ = load_datasets(cfg, tok, log=lambda *a: None)
    longest = sorted(pairs, key=lambda p: p.length)[-2:]
    tokens = sum(2 * len(p.prompt) + len(p.chosen) + len(p.rejected) for p in longest)
    assert result["tokens_per_second"] == tokens / 0.25
    assert result["mfu"] == pytest.approx(tokens / 0.25 * result["flops_per_token"] / 100e9, rel=1e-12)
    assert cfg.output_dir == str(tmp_path / "run") and cfg.overwrite_output_dir is False
    assert seen and all(seen)
    assert 1 <= result["compiled_shapes"] <= cfg.max_batch_shapes and 0 < result["padding_fraction"] < 1
    # 2 steps, each at most the longest batch's 0.25 s (steps are scaled by their input positions); the timed
    # steps take 0.25 s from the first on, so nothing is compile; no precompute, no eval data
    split = result["time_split"]
    assert set(split) == {"startup", "data", "precompute", "compile", "train", "eval", "total"}
    assert 0.1 <= split["train"] <= 0.5 and split["compile"] == split["precompute"] == split["eval"] == 0.0


MLX_BLAS = "7f00-7f01 r-xp 0 08:01 1 /venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0\n"
NUMPY_BLAS = "7f02-7f03 r-xp 0 08:01 2 /venv/site-packages/numpy.libs/libscipy_openblas64_-ff651d7f.so\n"
OPENBLAS = "7f04-7f05 r-xp 0 08:01 3 /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3\n"


def test_reference_blas_warning_branches():
    warn = reference_blas_warning(MLX_BLAS + NUMPY_BLAS, "linux", "Device(cpu, 0)")
    assert "reference BLAS" in warn and "LD_PRELOAD=/usr/lib/" in warn and "openblas-pthread/libblas.so.3" in warn
    assert reference_blas_warning(MLX_BLAS + OPENBLAS, "linux", "Device(cpu, 0)") is None  # preloaded
    assert reference_blas_warning(MLX_BLAS, "linux", "Device(gpu, 0)") is None  # CUDA: no CPU GEMMs
    assert reference_blas_warning(MLX_BLAS, "darwin", "Device(cpu, 0)") is None  # Accelerate
    assert reference_blas_warning("", "linux", "Device(cpu, 0)") is None  # nothing mapped: nothing to say


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD and /proc are Linux's")
@pytest.mark.parametrize("preload", [False, True])
def test_reference_blas_warning_in_a_real_process(preload):
    """This machine: without the preload MLX uses its bundled reference BLAS, with it OpenBLAS
    (measured: 0.7 vs 3 GFLOP/s at 256^3 with the machine loaded, 140-200 at 1024^3 idle); the
    warning comes exactly in the first case."""
    import os
    import subprocess

    path = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"
    if not os.path.exists(path):
        pytest.skip("no system OpenBLAS here")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    if preload:
        env["LD_PRELOAD"] = path
    code = "import numpy; from mlx_dpo.monitor.perf import reference_blas_warning; print(reference_blas_warning())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert (out.strip() != "None") == (not preload), out


def test_plan_suggests_gradient_checkpointing_when_activations_dominate(llama_dir):
    from types import SimpleNamespace

    from mlx_dpo.analysis.plan import checkpointing_advice

    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))

    def advice(length, ckpt=False):
        pairs = [TokenizedPair([1] * (length // 2), [5] * (length // 2), [6])]  # prompt + completion = length
        cfg = DPOConfig(model=str(llama_dir), batch_size=8, gradient_checkpointing=ckpt)
        return checkpointing_advice(SimpleNamespace(cfg=cfg, train_pairs=pairs, model=model, prefix_sharing=False,
                                                    optimizer=None))  # None: AdamW's two states

    long = static_memory_estimate(model, 8, 1024)
    assert long["activations"] > 0.5 * long["total"]
    text = advice(1024)
    assert "gradient_checkpointing: true" in text
    assert f"~{long['activations'] / 1e9:.2f} of ~{long['total'] / 1e9:.2f} GB" in text
    assert advice(1024, ckpt=True) is None  # already on
    short = static_memory_estimate(model, 8, 4)
    assert short["activations"] < 0.5 * short["total"] and advice(4) is None  # weights dominate


def test_a_small_data_set_gets_few_shapes():
    """Each shape is a compile: with min_pairs, no cell is kept for fewer pairs than that."""
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lognormal_lengths(32, seed=0)]
    many, few = ShapePlan(pairs, "prefix", 16).cells, ShapePlan(pairs, "prefix", 16, min_pairs=16).cells
    assert len(many) > 8 and len(few) <= 2
    assert few[-1] == (max(bucket_length(len(p.prompt), 16) for p in pairs),
                       max(bucket_length(max(len(p.chosen), len(p.rejected)), 16) for p in pairs))


@pytest.mark.parametrize("import_torch", [False, True])
def test_training_process_keeps_torch_out(llama_dir, toy_data_dir, tmp_path, import_torch):
    """``mlx-dpo train`` trains without importing torch (mlx-lm's tokenizer import would, through
    transformers, whenever torch is installed: +180-230 MB RSS); torch stays importable after.
    ``MLX_DPO_IMPORT_TORCH=1`` (the second case) shows the import would otherwise happen here."""
    pytest.importorskip("torch")
    argv = ["train", "--model", str(llama_dir), "--data", str(toy_data_dir), "--output-dir", str(tmp_path / "run"),
            "--batch-size", "2", "--max-steps", "2", "--eval-steps", "0", "--no-progress-bar"]
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('TORCH', 'torch' in sys.modules, 'transformers' in sys.modules,"
              " __import__('torch').tensor([1.0]).item()))\n"
              f"sys.argv[1:] = {argv!r}\n"
              "from mlx_dpo.entry import run\nrun()\n")
    env = {k: v for k, v in os.environ.items() if k != "MLX_DPO_IMPORT_TORCH"}
    if import_torch:
        env["MLX_DPO_IMPORT_TORCH"] = "1"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "adapters.safetensors").exists()
    assert f"TORCH {import_torch} True 1.0" in out.stdout, out.stdout[-500:]


def test_run_clock_splits_compile_from_steady_training(monkeypatch):
    """compile = the traced steps' seconds beyond what their tokens cost at the steady rate; start-up =
    what no phase timed before the first step; other = the rest of the wall time."""
    from mlx_dpo.util import clock

    now = [100.0]
    monkeypatch.setattr(clock.time, "perf_counter", lambda: now[0])
    clock.mark_process_start()
    now[0] = 103.0  # 3 s of imports and model loading
    c = clock.RunClock()
    assert c.start == 100.0 and clock._process_start is None  # the process start is taken once
    with c.phase("data"):
        now[0] += 2.0
    with c.phase("precompute"):
        now[0] += 5.0
    c.started_training()
    c.step(12.0, 300, traced=True)  # at the steady 100 tokens/s, 3 s of it is compute: 9 s compiling
    c.step(10.0, 1000, traced=False)
    now[0] += 22.0
    with c.phase("save"):
        now[0] += 1.0
    now[0] += 0.5
    split = c.split()
    assert split == {"startup": 3.0, "data": 2.0, "precompute": 5.0, "compile": 9.0, "train": 13.0, "eval": 0.0,
                     "save": 1.0, "other": 0.5, "total": 33.5}
    assert c.line().startswith("time: 33.5 s = startup 3.0, data 2.0, precompute 5.0, compile 9.0, train 13.0")
    assert clock.RunClock().start == now[0]  # the next run (the Python API) counts from its own start


def test_shapes_are_weighed_against_the_run_length():
    """A 16-step run on 64 long-tailed pairs gets few shapes; a ~5000-step run on the same pairs gets
    more, as each shape's compile (COMPILE_STEPS median batches) is paid once and its padding saving
    every pass. The cost counted here from raw lengths (prefix layout: P + 2C per pair, a median batch
    per compile) is lower with the run-aware cells than with the bound alone, for the short run."""
    from mlx_dpo.data.shapes import COMPILE_STEPS

    lengths = lognormal_lengths(64, seed=0, max_length=1024)
    pairs = [TokenizedPair([1] * p, [5] * c, [6] * r) for p, c, r in lengths]
    bound_only = ShapePlan(pairs, "prefix", 16, min_pairs=4)
    short = ShapePlan(pairs, "prefix", 16, batch_size=4, passes=1.0)
    long = ShapePlan(pairs, "prefix", 16, batch_size=4, passes=5000 * 4 / 64)
    assert len(short.cells) == 6 and len(long.cells) == len(bound_only.cells) == 11, (short.cells, long.cells)

    median_batch = 4 * float(np.median([p + 2 * max(c, r) for p, c, r in lengths]))

    def run_cost(plan, passes):
        batches = BatchSampler(pairs, 4, seed=0, shapes=plan).epoch_batches(0)
        cells = [plan.cell([pairs[i] for i in b]) for b in batches]
        padded = sum(4 * (a + 2 * c) for a, c in cells)  # every batch pads its 4 pairs to its cell
        return passes * padded + COMPILE_STEPS * median_batch * len(set(cells))

    assert run_cost(short, 1.0) < run_cost(bound_only, 1.0)
