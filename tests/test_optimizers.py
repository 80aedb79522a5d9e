"""Optimizers (transformers' optim names, MLX's classes), LoRA+ and lr_scheduler_kwargs: each update
rule against a float64 numpy implementation written here, exact resume with each, and plan's count
of their state; the schedules against transformers' get_scheduler."""


import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError, TrainingInterrupted
from mlx_dpo.monitor.perf import static_memory_estimate
from mlx_dpo.train.schedule import build_schedule
from helpers import interrupt_in_step

LR, WD, STEPS = 1e-2, 0.1, 3


def trainer_for(model_dir, data_dir, out, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(out), batch_size=4, max_steps=6,
                  learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=WD,
                  logging_steps=2, eval_steps=0, save_steps=3, progress_bar=False, seed=0)
    values.update(kw)
    return DPOTrainer(DPOConfig(**values), log=lambda *a: None)


# ---------------------------------------------------------------- float64 references, one parameter each
def adamw(p, g, s, t, lr, b1=0.9, b2=0.999, eps=1e-8):
    s["m"] = b1 * s.get("m", 0) + (1 - b1) * g
    s["v"] = b2 * s.get("v", 0) + (1 - b2) * g * g
    return p - lr * (s["m"] / (1 - b1 ** t)) / (np.sqrt(s["v"] / (1 - b2 ** t)) + eps)


def lion(p, g, s, t, lr, b1=0.9, b2=0.999):  # transformers passes the Adam betas to Lion
    m = s.get("m", 0)
    s["m"] = b2 * m + (1 - b2) * g
    return p - lr * np.sign(b1 * m + (1 - b1) * g)


def sgd(p, g, s, t, lr, momentum=0.9, nesterov=True):  # torch.optim.SGD, dampening 0
    s["v"] = momentum * s.get("v", 0) + g
    return p - lr * (g + momentum * s["v"] if nesterov else s["v"])


def adafactor(p, g, s, t, lr, eps1=1e-30, clip=1.0, decay=-0.8):
    """Shazeer & Stern 2018 as transformers' Adafactor(relative_step=False, scale_parameter=False)."""
    beta2 = 1 - t ** decay
    sq = g * g + eps1
    if g.ndim >= 2:
        s["row"] = beta2 * s.get("row", 0) + (1 - beta2) * sq.mean(-1)
        s["col"] = beta2 * s.get("col", 0) + (1 - beta2) * sq.mean(-2)
        r = 1 / np.sqrt(s["row"] / s["row"].mean(-1, keepdims=True))
        u = r[..., None] * (1 / np.sqrt(s["col"]))[..., None, :] * g
    else:
        s["v"] = beta2 * s.get("v", 0) + (1 - beta2) * sq
        u = g / np.sqrt(s["v"])
    u = u / max(1.0, np.sqrt(np.mean(u * u)) / clip)
    return p - lr * u


def muon(p, g, s, t, lr, momentum=0.95, steps=5):
    """Keller Jordan's Muon: Nesterov momentum, then the quintic Newton-Schulz orthogonalization."""
    s["v"] = momentum * s.get("v", 0) + (1 - momentum) * g
    u = g * (1 - momentum) + s["v"] * momentum
    if u.ndim < 2:
        return p - lr * u
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / (np.linalg.norm(x) + 1e-7)
    for _ in range(steps):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    x = x.T if u.shape[0] > u.shape[1] else x
    return p - lr * max(1.0, u.shape[0] / u.shape[1]) ** 0.5 * x


RULES = {"adamw": adamw, "lion": lion, "sgd": sgd, "adafactor": adafactor, "muon": muon}
ARGS = {"sgd": {"momentum": 0.9, "nesterov": True}}


@pytest.mark.parametrize("optim, ratio", [(name, None) for name in RULES] + [("adamw", 16.0), ("lion", 4.0)])
def test_update_rule_matches_numpy(llama_dir, toy_data_dir, tmp_path, optim, ratio):
    """STEPS updates with fixed random gradients; decoupled weight decay on every rule; LoRA+: the B
    matrices at ratio x the rate (their decay too, as PEFT's parameter group)."""
    trainer = trainer_for(llama_dir, toy_data_dir, tmp_path, optim=optim, optim_args=ARGS.get(optim),
                          loraplus_lr_ratio=ratio, adam_beta2=0.999)
    params = {k: np.array(v, np.float64) for k, v in tree_flatten(trainer.model.trainable_parameters())}
    assert any(k.endswith("lora_b") for k in params) and any(k.endswith("lora_a") for k in params)
    rng, states = np.random.default_rng(0), {k: {} for k in params}
    for t in range(1, STEPS + 1):
        grads = {k: rng.standard_normal(p.shape) * 0.01 for k, p in params.items()}
        trainer.apply_update(tree_unflatten([(k, mx.array(g.astype(np.float32))) for k, g in grads.items()]))
        for k, p in params.items():
            lr = LR * (ratio if ratio and k.endswith("lora_b") else 1.0)
            params[k] = RULES[optim](p, grads[k], states[k], t, lr, **ARGS.get(optim, {})) - lr * WD * p
    got = dict(tree_flatten(trainer.model.trainable_parameters()))
    for k, p in params.items():
        np.testing.assert_allclose(np.array(got[k]), p, atol=2e-6, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("optim", sorted(RULES))
def test_exact_resume_with_each_optimizer(llama_dir, toy_data_dir, tmp_path, optim):
    """6 steps straight == 3 steps, SIGINT, resume, 3 more: the same adapters and optimizer state."""
    kw = dict(optim=optim, optim_args=ARGS.get(optim), loraplus_lr_ratio=4.0, lr_scheduler_type="cosine",
              lr_scheduler_kwargs={"num_cycles": 0.3}, warmup_steps=1, max_grad_norm=1.0)
    straight = trainer_for(llama_dir, toy_data_dir, tmp_path / "a", **kw)
    straight.train()
    first = trainer_for(llama_dir, toy_data_dir, tmp_path / "b", **kw)
    interrupt_in_step(first, 3)
    with pytest.raises(TrainingInterrupted):
        first.train()
    resumed = trainer_for(llama_dir, toy_data_dir, tmp_path / "b", resume_from_checkpoint="latest", **kw)
    assert resumed.step == 3
    resumed.train()
    for name in ("adapters.safetensors", "checkpoints/step-6/optimizer.safetensors"):
        a, b = mx.load(str(tmp_path / "a" / name)), mx.load(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and len(a) > 1
        for k in a:
            np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), atol=1e-6, rtol=0, err_msg=f"{name}: {k}")


def expected_state_floats(optim: str, shape: tuple) -> int:
    """Floats of per-parameter state: Adam m, v; Lion, momentum SGD and Muon one buffer; Adafactor
    a row and a column factor for a matrix, a full second moment for a vector."""
    n = int(np.prod(shape))
    if optim == "adafactor":
        return shape[0] + shape[1] if len(shape) == 2 else n
    return {"adamw": 2, "lion": 1, "sgd": 1, "muon": 1}[optim] * n


@pytest.mark.parametrize("optim", sorted(RULES))
def test_plan_counts_the_optimizer_state(llama_dir, toy_data_dir, tmp_path, optim):
    trainer = trainer_for(llama_dir, toy_data_dir, tmp_path, optim=optim, optim_args=ARGS.get(optim),
                          train_type="full", num_layers=1)
    shapes = [v.shape for _, v in tree_flatten(trainer.model.trainable_parameters())]
    assert {len(s) for s in shapes} == {1, 2}  # norms and matrices
    est = static_memory_estimate(trainer.model, 4, 64, optimizer=trainer.optimizer)
    assert est["optimizer_state"] == 4 * sum(expected_state_floats(optim, s) for s in shapes)
    params = 4 * sum(int(np.prod(s)) for s in shapes)
    assert est["trainable_state"] == 2 * params + est["optimizer_state"]


@pytest.mark.parametrize("kind, kwargs", [("cosine", {"num_cycles": 1.5}), ("cosine", {}),
                                          ("cosine_with_min_lr", {"min_lr_rate": 0.1}),
                                          ("cosine_with_min_lr", {"min_lr": 0.02, "num_cycles": 0.25})])
def test_schedules_match_transformers(kind, kwargs):
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    total, warm, lr = 20, 4, 0.1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    ref = get_scheduler(kind, opt, num_warmup_steps=warm, num_training_steps=total, scheduler_specific_kwargs=kwargs)
    ours = build_schedule(kind, lr, total, warm, kwargs)
    for s in range(total):
        assert ours(s).item() == pytest.approx(ref.get_last_lr()[0], abs=1e-7), (kind, s)
        opt.step()
        ref.step()


def test_the_run_follows_lr_scheduler_kwargs(llama_dir, toy_data_dir, tmp_path):
    """The rate each update of a run used (logged) is transformers' cosine_with_min_lr at that step."""
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    kwargs = {"min_lr_rate": 0.3, "num_cycles": 0.7}
    trainer = trainer_for(llama_dir, toy_data_dir, tmp_path, lr_scheduler_type="cosine_with_min_lr",
                          lr_scheduler_kwargs=kwargs, warmup_steps=1, logging_steps=1, save_steps=0)
    logged = [r["learning_rate"] for r in trainer.train().history]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    ref = get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=1, num_training_steps=6,
                        scheduler_specific_kwargs=kwargs)
    expected = []
    for _ in range(6):
        expected.append(ref.get_last_lr()[0])
        opt.step()
        ref.step()
    np.testing.assert_allclose(logged, expected, atol=1e-8)


@pytest.mark.parametrize("kw, match", [
    (dict(optim="adam"), "optim must be one of adamw, adafactor, lion, sgd, muon"),
    (dict(optim="sgd", optim_args={"momentum": 0.9, "nesterof": True}), "takes dampening, momentum, nesterov"),
    (dict(optim="lion", optim_args={"betas": [0.9, 0.99]}), "betas is set by adam_beta1/adam_beta2"),
    (dict(lr_scheduler_kwargs={"num_cycles": 1}), "linear takes no arguments"),
    (dict(lr_scheduler_type="cosine_with_min_lr"), "needs one of min_lr and min_lr_rate"),
    (dict(loraplus_lr_ratio=16, train_type="full"), "loraplus_lr_ratio.*train_type: adapter"),
    (dict(loraplus_lr_ratio=0), "loraplus_lr_ratio must be > 0"),
])
def test_bad_optimizer_settings_are_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        DPOConfig(**kw)


def test_transformers_optim_names_are_accepted():
    assert DPOConfig(optim="adamw_torch_fused").optim == "adamw" and DPOConfig(optim="lion_32bit").optim == "lion"
