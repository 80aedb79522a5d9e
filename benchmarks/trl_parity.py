"""Step-by-step parity with TRL 1.16's DPOTrainer (issue 16).

The same tiny random Llama (built locally, saved as a Hugging Face directory both
load), the same four pairs, the same initial LoRA weights (or full fine-tuning of the
blocks), AdamW, a linear schedule, 10 steps, batch 4 (every step sees all four pairs),
for every TRL ``loss_type`` and the main options. Per step it compares ``loss``,
``rewards/chosen|rejected|margins``, ``logps/chosen|rejected`` and ``grad_norm``.

    # TRL's side: needs trl==1.16.0 (+ peft, datasets) next to the installed torch
    python benchmarks/trl_parity.py record tests/fixtures/trl_parity.json [case ...]
    # mlx-dpo against the recorded TRL numbers (no TRL needed); prints the table
    python benchmarks/trl_parity.py compare tests/fixtures/trl_parity.json [case ...]

    # TRL 1.16's KTOTrainer on unpaired rows (issue 30, benchmarks/trl_parity_kto.py): add "kto"
    python benchmarks/trl_parity.py record tests/fixtures/trl_parity.json kto [case ...]

``tests/test_trl_parity.py`` runs the comparison against the committed fixture.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the harness's other modules

from trl_parity_data import (PAIRS, TEMPLATE_RECORDS, TEMPLATES_DIR, TOKENIZE_ONLY, TRUNCATE,  # noqa: E402,F401
                             TRUNCATE_AT, mlx_tokenize, mlx_tokenize_templates, mlx_truncate, trl_tokenize,
                             trl_tokenize_templates, trl_truncate)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA, STEPS, SEED = 4, 8.0, 10, 0
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "grad_norm")
LORA_LR, FULL_LR = 5e-3, 3e-4

# name -> (mlx-dpo options, TRL DPOConfig options where they differ, None = absent there); every case trains LoRA
# against the base (adapters off) unless it sets train_type / reference.
LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
          "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"]
CASES = {name: ({"loss_type": name}, None) for name in LOSSES}
CASES["exo_pair"] = ({"loss_type": "exo_pair", "label_smoothing": 1e-3}, None)  # TRL refuses 0
CASES.update({
    "robust+label_smoothing": ({"loss_type": "robust", "label_smoothing": 0.1}, None),
    "aot+label_smoothing": ({"loss_type": "aot", "label_smoothing": 0.1}, None),
    "sigmoid+label_smoothing": ({"loss_type": "sigmoid", "label_smoothing": 0.1}, None),  # cDPO here; TRL ignores it
    "sigmoid+forward_kl": ({"f_divergence_type": "forward_kl"}, None),
    "sigmoid+js_divergence": ({"f_divergence_type": "js_divergence"}, None),
    "sigmoid+alpha_divergence": ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}, None),
    "ipo+alpha_divergence": ({"loss_type": "ipo", "f_divergence_type": "alpha_divergence"}, None),
    "hinge+js_divergence": ({"loss_type": "hinge", "f_divergence_type": "js_divergence"}, None),
    "sigmoid+ld_alpha": ({"ld_alpha": 0.5}, None),
    "sigmoid+sft": ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.8, 1.0]}, None),  # MPO-style
    "sigmoid+use_weighting": ({"use_weighting": True}, None),
    "sigmoid+rpo_alpha": ({"rpo_alpha": 0.5},  # TRL 1.16 has no rpo_alpha: its sft loss in a mixture
                          {"rpo_alpha": None, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}),
    "mixture sigmoid+hinge": ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [0.8, 0.2]}, None),
    "sigmoid+reference adapter": ({"reference": "adapter"}, None),
    "sigmoid+precompute_ref": ({"precompute_ref_log_probs": True}, None),
    "full+weight_decay": ({"train_type": "full", "weight_decay": 0.1, "learning_rate": FULL_LR}, None),
    "sigmoid+logging_steps 5": ({"logging_steps": 5}, None),
})
# Cases whose difference is documented (docs/losses.md, "Differences from TRL"): not held to the tolerance.
EXPECTED_DIFFERENCES = {
    "bco_pair": "BCO's running-mean reward shift delta kept (TRL 1.16 dropped it)",
    "sigmoid+label_smoothing": "cDPO kept (TRL >= 0.29 ignores label_smoothing for sigmoid)",
    "sigmoid+use_weighting": "WPO weights clamped at 1 (TRL 1.16 does not clamp; here they straddle 1)",
}


# --------------------------------------------------------------------------- shared setup


def build_model(out_dir: Path) -> Path:
    """The tiny random Llama (float32, BPE tokenizer with BOS), as a Hugging Face directory."""
    from mlx_dpo.model.toy import build_toy_model

    return build_toy_model(out_dir, arch="llama", seed=SEED)


def initial_lora(config: dict, seed: int) -> dict:
    """PEFT-layout initial LoRA weights ``{"layers.i.<module>": (A (r, in), B (out, r))}``;
    B is non-zero so the policy starts away from the reference."""
    rng = np.random.default_rng(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    shapes = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
              "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
              "mlp.down_proj": (inter, h)}
    out = {}
    for i in range(config["num_hidden_layers"]):
        for name, (n_in, n_out) in shapes.items():
            a = rng.uniform(-1, 1, size=(RANK, n_in)) / np.sqrt(n_in)
            b = rng.normal(0.0, 0.02, size=(n_out, RANK))
            out[f"layers.{i}.{name}"] = (a.astype(np.float32), b.astype(np.float32))
    return out


def case_options(name: str) -> tuple:
    """``(mlx-dpo options, TRL options)`` of a case, both complete."""
    mine, theirs = CASES[name]
    base = {"loss_type": "sigmoid", "beta": 0.1, "learning_rate": LORA_LR, "logging_steps": 1}
    mine = {**base, **mine}
    theirs = {k: v for k, v in {**mine, **(theirs or {})}.items() if v is not None}  # None: not in TRL
    return mine, theirs


# --------------------------------------------------------------------------- mlx-dpo


class _Records:
    def __init__(self):
        self.records = []

    def on_log(self, state, record):
        if "loss" in record:
            self.records.append(dict(record))


def _set_lora(model, lora: dict, prefix: str = "") -> None:
    import mlx.core as mx

    weights = []
    for key, (a, b) in lora.items():
        weights += [(f"model.{key}.{prefix}lora_a", mx.array(a.T)), (f"model.{key}.{prefix}lora_b", mx.array(b.T))]
    model.load_weights(weights, strict=False)


def _mlx_config(options: dict, model_dir: Path, data: Path, work: Path):
    from mlx_dpo import DPOConfig

    options = dict(options)
    if options.get("train_type") != "full":
        options.update(lora_rank=RANK, lora_alpha=ALPHA, lora_target_modules=TARGETS)
    return DPOConfig(model=str(model_dir), data=str(data), output_dir=str(work / "run"), batch_size=4,
                     max_steps=STEPS, lr_scheduler_type="linear", warmup_steps=0, seed=SEED,
                     progress_bar=False, health_warnings=False, save_steps=0, cache_dir=str(work / "cache"),
                     **options)


def _write_ref_adapter(model_dir: Path, data: Path, work: Path, lora: dict) -> Path:
    """The 'SFT' adapter as an mlx-lm adapter directory (the initial LoRA weights)."""
    from mlx_dpo import DPOTrainer

    trainer = DPOTrainer(_mlx_config({"loss_type": "sigmoid"}, model_dir, data, work / "sft"), log=lambda *a: None)
    _set_lora(trainer.model, lora)
    return trainer.save(work / "sft_adapter")


def run_mlx(name: str, model_dir: Path, work: Path) -> list:
    """Per logged step, the metrics of mlx-dpo on case ``name``."""
    from mlx_dpo import DPOTrainer
    from mlx_dpo.model.toy import write_jsonl

    options, _ = case_options(name)
    data = work / "pairs.jsonl"
    write_jsonl(data, PAIRS)
    config = json.loads((model_dir / "config.json").read_text())
    lora = initial_lora(config, SEED + 1)
    if options.get("reference") == "adapter":
        options["ref_adapter_path"] = str(_write_ref_adapter(model_dir, data, work, lora))
    recorder = _Records()
    trainer = DPOTrainer(_mlx_config(options, model_dir, data, work / name.replace(" ", "_")),
                         log=lambda *a: None, callbacks=[recorder])
    if options.get("train_type") != "full" and options.get("reference") != "adapter":
        _set_lora(trainer.model, lora)
    trainer.train()
    return [{k: float(r[k]) for k in METRICS} | {"step": int(r["step"])} for r in recorder.records]


# --------------------------------------------------------------------------- TRL 1.16


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")


def _set_peft_lora(model, lora: dict) -> None:
    """Copy the initial weights into the PEFT model's ``default`` adapter."""
    import torch

    with torch.no_grad():
        for module_name, module in model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = lora[module_name[module_name.index("layers."):]]
                module.lora_A["default"].weight.copy_(torch.from_numpy(a))
                module.lora_B["default"].weight.copy_(torch.from_numpy(b))


class _TrlRecorder:
    """The ``metrics`` TRL logs at each logged step (a metric TRL leaves out of a step is absent)."""

    def __init__(self, metrics=METRICS):
        from transformers import TrainerCallback

        outer = self
        self.records = []

        class CB(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                if logs and "loss" in logs:
                    outer.records.append({"step": state.global_step} | {k: float(v) for k, v in logs.items()
                                                                        if k in metrics})

        self.callback = CB()


def run_trl(name: str, model_dir: Path, work: Path) -> list:
    """Per logged step, the metrics of TRL 1.16's DPOTrainer on case ``name``."""
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    _, options = case_options(name)
    options = dict(options)
    torch.manual_seed(SEED)
    lora = initial_lora(json.loads((model_dir / "config.json").read_text()), SEED + 1)
    full = options.pop("train_type", None) == "full"
    reference = options.pop("reference", None)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if full:
        for pname, p in model.named_parameters():  # mlx-dpo's train_type: full trains the blocks
            p.requires_grad = ".layers." in pname
    elif reference == "adapter":  # a PeftModel passed in: TRL trains it against a frozen "ref" copy
        model = get_peft_model(model, _lora_config())
        _set_peft_lora(model, lora)
    else:  # a fresh adapter (reference: the base, adapters off), then our initial weights
        peft_config = _lora_config()
    args = DPOConfig(output_dir=str(work / "trl" / name.replace(" ", "_")), per_device_train_batch_size=4,
                     max_steps=STEPS, lr_scheduler_type="linear", warmup_steps=0, seed=SEED, report_to=[],
                     save_strategy="no", use_cpu=True, dataloader_num_workers=0, max_length=1024,
                     bf16=False, gradient_checkpointing=False, **options)  # TRL defaults to bf16 autocast
    recorder = _TrlRecorder()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(PAIRS), peft_config=peft_config,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[recorder.callback])
    if peft_config is not None:
        _set_peft_lora(trainer.model, lora)
    trainer.train()
    return recorder.records


# --------------------------------------------------------------------------- comparing


def rel_diffs(ours: list, theirs: list, beta: float = 0.1, metrics: tuple = METRICS) -> dict:
    """Max over steps of ``|ours - theirs| / scale`` per metric. The scale is ``|theirs|``,
    at least 0.05 for the loss (a loss near zero is held to 2e-4 * 0.05 absolute); for
    ``rewards/margins`` (a difference of two rewards), at least the rewards' own size; and for
    every ``rewards/*`` (beta x a difference of two log-probs of size ``|logps|``, which float32
    resolves to ~1e-7 of ``|logps|``), at least ``beta |logps| / 100``: a reward at or crossing
    zero is held to ``2e-6 beta |logps|`` absolute (seen on one CPU: 9e-7 at reward -0.0036, logps
    -35, beta 0.1, where another gave 3e-7; a first-step margin of 5e-8 where TRL's is 0). KTO's
    ``kl`` (a mean difference of log-probs, clamped at 0) is a reward with beta 1; ``logits/*`` (the
    mean over the vocabulary and the completion tokens, near 0 on the random toy model) is held to
    2e-7 absolute at least (seen: 2.4e-8 on a mean of 2.4e-4). A metric TRL left out of a step (no
    row to average) must be absent from ours too (else: infinite)."""
    if [r["step"] for r in ours] != [r["step"] for r in theirs]:
        raise AssertionError(f"logged steps differ: {[r['step'] for r in ours]} vs {[r['step'] for r in theirs]}")
    out = {}
    for key in metrics:
        worst = 0.0
        for a, b in zip(ours, theirs):
            if key not in a or key not in b:
                worst = worst if key not in a and key not in b else math.inf
                continue
            worst = max(worst, abs(a[key] - b[key]) / max(_scale(key, b, beta), 1e-12))
        out[key] = worst
    return out


def _scale(key: str, b: dict, beta: float) -> float:
    """:func:`rel_diffs`' scale of TRL's value ``b[key]``."""
    scale = abs(b[key])
    logps = max([abs(b[k]) for k in ("logps/chosen", "logps/rejected") if k in b] or [0.0])
    if key == "loss":
        scale = max(scale, 0.05)
    if key == "rewards/margins":
        scale = max(scale, abs(b["rewards/chosen"]), abs(b["rewards/rejected"]))
    if key.startswith("rewards/"):
        scale = max(scale, beta * logps / 100)
    if key == "kl":
        scale = max(scale, logps / 100)
    if key.startswith("logits/"):
        scale = max(scale, 1e-3)
    return scale


def kto_harness():
    """The KTOTrainer cases (``benchmarks/trl_parity_kto.py``), the ``kto`` section of the fixture."""
    import trl_parity_kto

    return trl_parity_kto


def record(path: Path, names=None) -> None:
    """Run TRL on every case (or ``names``, updating an existing fixture; ``tokenize`` alone redoes
    only the tokenization and truncation records; ``kto [case ...]`` only the KTOTrainer records)
    and write the fixture."""
    import trl

    fixture = json.loads(path.read_text()) if names and path.exists() else {"cases": {}}
    if names and names[0] == "kto":
        with tempfile.TemporaryDirectory() as tmp:
            kto_harness().record(fixture, build_model(Path(tmp) / "model"), Path(tmp), names[1:] or None,
                                 write=lambda: _write_fixture(path, fixture))
        return
    names = [n for n in names or CASES if n != "tokenize"]  # "tokenize": only the tokenization records
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = build_model(work / "model")
        fixture.update(trl_version=trl.__version__, steps=STEPS, tokenizer_json_sha256=_sha(model_dir / "tokenizer.json"),
                       tokenize={"records": TOKENIZE_ONLY, "trl": trl_tokenize(model_dir, work)},
                       templates={"records": TEMPLATE_RECORDS, "trl": trl_tokenize_templates(model_dir, work)},
                       truncate={mode: trl_truncate(model_dir, work, mode) for mode in ("keep_start", "keep_end")})
        _write_fixture(path, fixture)
        for name in names:
            print(f"TRL: {name}", file=sys.stderr)
            fixture["cases"][name] = run_trl(name, model_dir, work)
            _write_fixture(path, fixture)  # after every case: a crash keeps the others


def _write_fixture(path: Path, fixture: dict) -> None:
    """JSON with one line per record (small diffs when a case is re-recorded); the KTO cases last."""
    head = {k: v for k, v in fixture.items() if k not in ("cases", "kto")}
    text = json.dumps(head)[:-1] + ',\n"cases": {\n' + _cases_text(fixture["cases"]) + "\n}"
    if "kto" in fixture:
        kto_head = {k: v for k, v in fixture["kto"].items() if k != "cases"}
        text += (',\n"kto": ' + json.dumps(kto_head)[:-1] + ',\n"cases": {\n' + _cases_text(fixture["kto"]["cases"])
                 + "\n}}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "}\n")


def _cases_text(cases: dict) -> str:
    return ",\n".join(f" {json.dumps(name)}: [\n" + ",\n".join("  " + json.dumps(r) for r in records) + "]"
                       for name, records in cases.items())


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def checked_model(work: Path, fixture: dict) -> Path:
    """The toy model, its tokenizer the one the fixture was recorded with."""
    model_dir = build_model(work / "model")
    if _sha(model_dir / "tokenizer.json") != fixture["tokenizer_json_sha256"]:
        raise AssertionError("the toy tokenizer differs from the one the fixture was recorded with")
    return model_dir


def compare(path: Path, names=None) -> dict:
    """``{case: {metric: max rel. diff}}`` of mlx-dpo against the recorded TRL run (``kto [case ...]``:
    the KTOTrainer cases)."""
    fixture = json.loads(path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_dir = checked_model(work, fixture)
        if names and names[0] == "kto":
            return kto_harness().compare(fixture, model_dir, work, names[1:] or None)
        return {name: rel_diffs(run_mlx(name, model_dir, work), fixture["cases"][name])
                for name in names or fixture["cases"]}


def table(diffs: dict, version: str, metrics: tuple = METRICS, expected: dict = EXPECTED_DIFFERENCES) -> str:
    short = {k: k.replace("rewards/", "r/").replace("logps/", "lp/").replace("logits/", "lg/") for k in metrics}
    lines = [f"| case (vs TRL {version}) | " + " | ".join(short[k] for k in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for name, d in diffs.items():
        note = " (documented difference)" if name in expected else ""
        lines.append(f"| `{name}`{note} | " + " | ".join(f"{d[k]:.1e}" for k in metrics) + " |")
    return "\n".join(lines)


def main(argv) -> None:
    if len(argv) < 2 or argv[0] not in ("record", "compare"):
        raise SystemExit(__doc__)
    path = Path(argv[1])
    if argv[0] == "record":
        record(path, argv[2:] or None)
    else:
        names, version = argv[2:] or None, json.loads(path.read_text())["trl_version"]
        if names and names[0] == "kto":
            kto = kto_harness()
            print(table(compare(path, names), version, kto.METRICS, kto.EXPECTED_DIFFERENCES))
        else:
            print(table(compare(path, names), version))


if __name__ == "__main__":
    main(sys.argv[1:])
