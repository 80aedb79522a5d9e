"""Step-by-step parity with TRL 1.16's KTOTrainer (issue 30), on :mod:`trl_parity`'s model,
initial LoRA weights, optimizer and schedule.

Eight unpaired rows (each pair of ``trl_parity.PAIRS`` as a desirable and an undesirable row),
batch 4, 10 steps. TRL rotates the completions by one within each batch of
``per_device_train_batch_size`` rows (``add_kl_completion_ids``, a batched ``datasets.map``) and
walks the rows in order (``train_sampling_strategy: sequential``), as mlx-dpo does. Per logged
step it compares TRL's KTO metrics (:data:`METRICS`); a metric TRL leaves out (``rewards/rejected``
of a batch with desirable rows only) must be left out here too.

    python benchmarks/trl_parity.py record tests/fixtures/trl_parity.json kto [case ...]
    python benchmarks/trl_parity.py compare tests/fixtures/trl_parity.json kto [case ...]
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import trl_parity as tp

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
           "logits/chosen", "logits/rejected", "kl", "grad_norm")
# Desirable and undesirable rows mixed in both batches (T F F T | F T T F).
ROWS = []
for _i, _p in enumerate(tp.PAIRS):
    _good, _bad = ({"prompt": _p["prompt"], "completion": _p[k], "label": k == "chosen"}
                   for k in ("chosen", "rejected"))
    ROWS += [_good, _bad] if _i % 2 == 0 else [_bad, _good]
# TRL's unpair_preference_dataset order: the first batch desirable only, the second undesirable only.
DESIRABLE_FIRST = ([{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in tp.PAIRS]
                   + [{"prompt": p["prompt"], "completion": p["rejected"], "label": False} for p in tp.PAIRS])
DATASETS = {"mixed": ROWS, "desirable_first": DESIRABLE_FIRST}
# Tokenization only: a chat-template row, a boundary merge ("Answer: " + "blue").
TOKENIZE_ONLY = [
    {"prompt": [{"role": "user", "content": "What color is the sky?"}],
     "completion": [{"role": "assistant", "content": "It is blue."}], "label": True},
    {"prompt": "Answer: ", "completion": "blue.", "label": False},
]

# name -> (options of both sides, dataset); TRL's KTOConfig takes the same names.
CASES = {
    "kto": ({"loss_type": "kto"}, "mixed"),
    "apo_zero_unpaired": ({"loss_type": "apo_zero_unpaired"}, "mixed"),
    "kto+weights 1.5/0.7": ({"loss_type": "kto", "desirable_weight": 1.5, "undesirable_weight": 0.7}, "mixed"),
    "kto+desirable-only batch": ({"loss_type": "kto"}, "desirable_first"),
    "kto+precompute_ref": ({"loss_type": "kto", "precompute_ref_log_probs": True}, "mixed"),
    "kto+logging_steps 5": ({"loss_type": "kto", "logging_steps": 5}, "mixed"),
}
# Cases whose difference is documented (docs/losses.md, "Differences from TRL"): not held to the tolerance.
EXPECTED_DIFFERENCES: dict = {}


def case_options(name: str) -> tuple:
    """``(options, rows)`` of a case, options complete."""
    options, data = CASES[name]
    return {"beta": 0.1, "learning_rate": tp.LORA_LR, "logging_steps": 1, **options}, DATASETS[data]


def _finite(record: dict) -> dict:
    """The KTO metrics of a log record that have a value (NaN: no row to average, left out)."""
    out = {k: float(record[k]) for k in METRICS if k in record and not math.isnan(float(record[k]))}
    return out | {"step": int(record["step"])}


# --------------------------------------------------------------------------- mlx-dpo


def run_mlx(name: str, model_dir: Path, work: Path) -> list:
    """Per logged step, mlx-dpo's KTO metrics on case ``name``."""
    from mlx_dpo import DPOTrainer
    from mlx_dpo.model.toy import write_jsonl

    options, rows = case_options(name)
    data = work / f"rows_{name.replace(' ', '_').replace('/', '_')}.jsonl"
    write_jsonl(data, rows)
    lora = tp.initial_lora(json.loads((model_dir / "config.json").read_text()), tp.SEED + 1)
    recorder = tp._Records()
    trainer = DPOTrainer(tp._mlx_config(options, model_dir, data, work / data.stem), log=lambda *a: None,
                         callbacks=[recorder])
    tp._set_lora(trainer.model, lora)
    trainer.train()
    return [_finite(r) for r in recorder.records]


def mlx_tokenize(model_dir: Path, records: list, batch_size: int = 4) -> list:
    """Our prompt_ids / completion_ids / KL_completion_ids / label of unpaired rows, in TRL's layout."""
    from mlx_lm.utils import load_tokenizer

    from mlx_dpo import DPOConfig
    from mlx_dpo.data import tokenize_pairs
    from mlx_dpo.data.unpaired import with_kl_completions

    rows, _ = tokenize_pairs([dict(r) for r in records], load_tokenizer(model_dir), DPOConfig())
    rows = with_kl_completions(rows, batch_size)
    return [{"prompt_ids": r.prompt, "completion_ids": r.chosen, "KL_completion_ids": r.rejected, "label": r.label}
            for r in rows]


# --------------------------------------------------------------------------- TRL 1.16


def _trl_trainer(model_dir: Path, rows: list, out: Path, callbacks=(), **options):
    """TRL 1.16's KTOTrainer with a fresh LoRA adapter (reference: adapters off) on ``rows``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    torch.manual_seed(tp.SEED)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=tp.STEPS,
                     lr_scheduler_type="linear", warmup_steps=0, seed=tp.SEED, report_to=[], save_strategy="no",
                     use_cpu=True, dataloader_num_workers=0, max_length=1024, bf16=False,
                     gradient_checkpointing=False, **options)  # KTOConfig defaults to bf16 autocast
    return KTOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), peft_config=tp._lora_config(),
                      processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=list(callbacks))


def run_trl(name: str, model_dir: Path, work: Path) -> list:
    """Per logged step, the metrics of TRL 1.16's KTOTrainer on case ``name``."""
    options, rows = case_options(name)
    recorder = tp._TrlRecorder(METRICS)
    trainer = _trl_trainer(model_dir, rows, work / "trl_kto" / name.replace(" ", "_").replace("/", "_"),
                           [recorder.callback], **options)
    tp._set_peft_lora(trainer.model, tp.initial_lora(json.loads((model_dir / "config.json").read_text()),
                                                     tp.SEED + 1))
    trainer.train()
    return recorder.records


def trl_tokenize(model_dir: Path, work: Path, records: list) -> list:
    """TRL's prompt_ids / completion_ids / KL_completion_ids / label of ``records`` (one format)."""
    trainer = _trl_trainer(model_dir, records, work / "tok_kto")
    keys = ("prompt_ids", "completion_ids", "KL_completion_ids", "label")
    return [{k: (list(row[k]) if k != "label" else bool(row[k])) for k in keys} for row in trainer.train_dataset]


def record(fixture: dict, model_dir: Path, work: Path, names=None, write=lambda: None) -> None:
    """Record TRL's tokenization and the KTO cases (or ``names``) into ``fixture["kto"]``."""
    kto = fixture.setdefault("kto", {"cases": {}})
    tokenize = {"rows": trl_tokenize(model_dir, work, ROWS)}
    tokenize["tokenize_only"] = [trl_tokenize(model_dir, work, [r])[0] for r in TOKENIZE_ONLY]  # one format each
    kto.update(records={"rows": ROWS, "tokenize_only": TOKENIZE_ONLY}, tokenize=tokenize)
    write()
    for name in names or CASES:
        print(f"TRL KTO: {name}")
        kto["cases"][name] = run_trl(name, model_dir, work)
        write()


def compare(fixture: dict, model_dir: Path, work: Path, names=None) -> dict:
    """``{case: {metric: max rel. diff}}`` of mlx-dpo against the recorded TRL KTO runs."""
    return {name: tp.rel_diffs(run_mlx(name, model_dir, work), fixture["kto"]["cases"][name], metrics=METRICS)
            for name in names or fixture["kto"]["cases"]}
