"""Export: merged HF / MLX models and PEFT adapters reproduce the trained MLX model."""

import json
import re
import struct

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlx_dpo.model.adapters import adapter_mode, add_adapters, load_adapter_weights
from mlx_dpo.cli.commands import main
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.export.exporter import export
from mlx_dpo.errors import ExportError, RunError
from mlx_dpo.model.loader import load_model
from mlx_dpo.export.verify import mlx_greedy, mlx_logits, prompt_batch

PROMPTS = [
    "Repeat: apple banana cherry. Answer:",
    "<|im_start|>user\nname three colours<|im_end|>\n<|im_start|>assistant\n",
    "Repeat: red moon. Answer: red",
]
TOL = 5e-6  # max |logit diff| relative to the logit scale, float32 export (measured <= 4.3e-7)
TOL_16BIT = {"float16": 4e-3, "bfloat16": 3e-2}  # measured 4.0e-4 and 2.9e-3


def train_run(tmp_path_factory, base_dir, data_dir, name, **kwargs):
    """Three DPO steps with a large learning rate, so the adapters move."""
    from mlx_dpo.train.trainer import train

    out = tmp_path_factory.mktemp(name) / "run"
    cfg = DPOConfig(model=str(base_dir), data=str(data_dir), output_dir=str(out), max_steps=3, learning_rate=1e-2,
                    batch_size=4, lora_rank=4, lora_alpha=8, max_length=64, logging_steps=1, eval_steps=3,
                    max_eval_batches=1, progress_bar=False, seed=0, **kwargs)
    train(cfg)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, llama_dir, qwen2_dir, toy_data_dir):
    """Training runs built on first use, keyed by name."""
    specs = {
        "llama-lora": (llama_dir, {}),
        "qwen2-lora": (qwen2_dir, {}),
        "llama-dora": (llama_dir, {"adapter": "dora"}),
        "qwen2-dora-last1": (qwen2_dir, {"adapter": "dora", "num_layers": 1}),
        "llama-lora-4bit": (llama_dir, {"quantize": {"bits": 4, "group_size": 32}}),
        "qwen2-dora-4bit": (qwen2_dir, {"adapter": "dora", "quantize": {"bits": 4, "group_size": 32}}),
    }
    cache = {}

    def get(name):
        if name not in cache:
            base, kwargs = specs[name]
            cache[name] = train_run(tmp_path_factory, base, toy_data_dir, name, **kwargs)
        return cache[name]

    return get


def mlx_reference(run_dir):
    """The trained model as the trainer saw it (quantized base + adapters), built independently."""
    cfg = DPOConfig.from_yaml(run_dir / "config.yaml")
    model, tokenizer, _ = load_model(cfg)
    add_adapters(model, cfg)
    load_adapter_weights(model, run_dir)
    batch, lengths = prompt_batch(tokenizer, PROMPTS)
    with adapter_mode(model, "base"):
        base_logits = mlx_logits(model, batch)
    return {
        "batch": batch,
        "lengths": lengths,
        "logits": mlx_logits(model, batch),
        "base_logits": base_logits,
        "greedy": mlx_greedy(model, batch[0, : lengths[0]].tolist(), 6),
        "tokenizer": tokenizer,
    }


def rel_diff(ref, other, lengths):
    diff = max(np.abs(ref[i, :n] - other[i, :n]).max() for i, n in enumerate(lengths))
    scale = max(np.abs(ref[i, :n]).max() for i, n in enumerate(lengths))
    return float(diff / scale)


def torch_outputs(model, ref):
    from mlx_dpo.export.verify import torch_greedy, torch_logits

    return (torch_logits(model, ref["batch"], ref["lengths"]),
            torch_greedy(model, ref["batch"][0, : ref["lengths"][0]].tolist(), 6))


def safetensors_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n))


def assert_adapters_matter(ref, diff):
    """The comparison is not vacuous: training moved the logits far more than the export error."""
    moved = rel_diff(ref["logits"], ref["base_logits"], ref["lengths"])
    print(f"adapters moved logits by {moved:.2e} of the logit scale")
    assert moved > 20 * max(diff, 1e-6), (moved, diff)


@pytest.mark.parametrize(
    "name", ["llama-lora", "qwen2-lora", "llama-dora", "qwen2-dora-last1", "llama-lora-4bit", "qwen2-dora-4bit"]
)
def test_hf_export_matches_mlx(runs, name, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = runs(name)
    ref = mlx_reference(run)
    out = export(run, tmp_path / "hf", format="hf", dtype="float32")

    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    assert config["torch_dtype"] == "float32" and config["dtype"] == "float32"
    header = safetensors_header(out / "model.safetensors")
    assert header["__metadata__"] == {"format": "pt"}
    assert not any(k.endswith((".scales", ".biases")) or "lora" in k for k in header)
    assert ("lm_head.weight" in header) == (not config["tie_word_embeddings"])
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (out / f).is_file(), f

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert_torch_model_matches(model, ref, f"{name}: hf export")

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert tokenizer(PROMPTS[1])["input_ids"] == ref["tokenizer"].encode(PROMPTS[1])


def assert_torch_model_matches(model, ref, label):
    """Logits within TOL of the MLX model's (relative to the logit scale), same greedy tokens."""
    logits, greedy = torch_outputs(model, ref)
    diff = rel_diff(ref["logits"], logits, ref["lengths"])
    print(f"{label} max |logit diff| / logit scale = {diff:.2e}")
    assert diff < TOL
    assert greedy == ref["greedy"]
    assert_adapters_matter(ref, diff)


@pytest.mark.parametrize("name", ["llama-lora", "qwen2-dora-last1"])
def test_peft_export_matches_mlx(runs, name, tmp_path, llama_dir, qwen2_dir):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    run = runs(name)
    ref = mlx_reference(run)
    out = export(run, tmp_path / "peft", format="peft")

    config = json.loads((out / "adapter_config.json").read_text())
    train_cfg = DPOConfig.from_yaml(run / "config.yaml")
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["lora_alpha"] / config["r"] == train_cfg.lora_scale
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert config["use_dora"] == (train_cfg.adapter == "dora")
    assert config["layers_to_transform"] == ([1] if name.endswith("last1") else None)
    header = safetensors_header(out / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj"
    assert header[f"{key}.lora_A.weight"]["shape"] == [4, 64]
    assert header[f"{key}.lora_B.weight"]["shape"] == [64, 4]
    assert (f"{key}.lora_magnitude_vector" in header) == config["use_dora"]

    base_dir = llama_dir if name.startswith("llama") else qwen2_dir
    assert config["base_model_name_or_path"] == str(base_dir.resolve())
    base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert_torch_model_matches(model, ref, f"{name}: peft export")


def test_peft_export_of_quantized_run_warns(runs, tmp_path, caplog):
    out = export(runs("llama-lora-4bit"), tmp_path / "peft", format="peft")
    assert "approximation" in caplog.text
    assert (out / "adapter_model.safetensors").is_file()


def test_mlx_export_loads_with_mlx_lm(runs, tmp_path):
    import mlx_lm

    run = runs("qwen2-lora")
    ref = mlx_reference(run)
    out = export(run, tmp_path / "mlx", format="mlx", dtype="float32")
    model, tokenizer = mlx_lm.load(str(out))
    logits = mlx_logits(model, ref["batch"])
    diff = rel_diff(ref["logits"], logits, ref["lengths"])
    print(f"qwen2-lora: mlx export max |logit diff| / logit scale = {diff:.2e}")
    assert diff < TOL
    assert mlx_greedy(model, ref["batch"][0, : ref["lengths"][0]].tolist(), 6) == ref["greedy"]


def test_mlx_export_of_quantized_run_is_requantized_merge(runs, tmp_path):
    """The mlx export of a 4-bit run is exactly the merged float model quantized again."""
    import mlx_lm
    from mlx_lm.utils import quantize_model

    run = runs("llama-lora-4bit")
    ref = mlx_reference(run)
    out = export(run, tmp_path / "mlx", format="mlx", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    model, _ = mlx_lm.load(str(out))

    merged = export(run, tmp_path / "hf", format="hf", dtype="float32")
    expected, _ = quantize_model(mlx_lm.load(str(merged))[0], {}, 32, 4)
    diff = rel_diff(mlx_logits(expected, ref["batch"]), mlx_logits(model, ref["batch"]), ref["lengths"])
    assert diff < 1e-5
    approx = rel_diff(ref["logits"], mlx_logits(model, ref["batch"]), ref["lengths"])
    print(f"llama-lora-4bit: re-quantized mlx export vs trained model: {approx:.2e} of the logit scale")


def test_16bit_export(runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = runs("llama-lora")
    ref = mlx_reference(run)
    for dtype, st_dtype in (("float16", "F16"), ("bfloat16", "BF16")):
        out = export(run, tmp_path / dtype, dtype=dtype)
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
        header = safetensors_header(out / "model.safetensors")
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {st_dtype}
        model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        logits, _ = torch_outputs(model, ref)
        diff = rel_diff(ref["logits"], logits, ref["lengths"])
        print(f"llama-lora: {dtype} export max |logit diff| / logit scale = {diff:.2e}")
        assert diff < TOL_16BIT[dtype]


def test_sharded_export(runs, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    run = runs("llama-lora")
    out = export(run, tmp_path / "hf", dtype="float32", max_shard_bytes=100_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref = mlx_reference(run)
    logits, _ = torch_outputs(model, ref)
    assert rel_diff(ref["logits"], logits, ref["lengths"]) < TOL


def test_failed_export_leaves_nothing(runs, tmp_path, monkeypatch):

    calls = []
    real_save = mx.save_safetensors

    def failing_save(path, weights, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save(path, weights, metadata=metadata)

    monkeypatch.setattr(mx, "save_safetensors", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export(runs("llama-lora"), tmp_path / "out", max_shard_bytes=100_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite(runs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="overwrite"):
        export(runs("llama-lora"), out, format="peft")
    assert (out / "keep.txt").read_text() == "mine"
    export(runs("llama-lora"), out, format="peft", overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "adapter_model.safetensors").is_file()


def test_export_records_run_for_the_model_card(runs, tmp_path):
    run = runs("llama-lora")
    out = export(run, tmp_path / "out", format="peft")
    info = json.loads((out / "mlx_dpo_export.json").read_text())
    assert info["format"] == "peft" and info["run_dir"] == str(run.resolve())
    assert info["final_metrics"]["train"]["step"] == 3 and "eval_loss" in info["final_metrics"]["eval"]
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert info["final_metrics"]["eval"]["eval_loss"] == logged[-1]["eval_loss"]  # the run's own last record
    assert info["final_metrics"]["train"]["loss"] == logged[-1]["loss"]
    assert DPOConfig.from_yaml(out / "mlx_dpo_config.yaml").max_steps == 3
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "eval_loss" in card


def test_cli_export_with_verify(runs, tmp_path, llama_dir):
    pytest.importorskip("transformers")
    out = tmp_path / "cli"
    args = ["export", "--adapter-path", str(runs("llama-lora")), "--output", str(out), "--model", str(llama_dir),
            "--dtype", "float32", "--verify"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    match = re.search(r"max \|logit diff\| = (\S+) \((\S+) of the logit scale", result.output)
    assert match and float(match.group(2)) < TOL, result.output
    assert "greedy generations agree" in result.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output


def test_cli_export_then_upload(runs, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, **kw: calls.setdefault("create_repo", kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda self, **kw: calls.setdefault("create_commit", kw))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["export", "--adapter-path", str(runs("llama-lora")), "--output", str(out),
                                       "--format", "peft", "--upload-repo", "me/dpo-peft", "--private"])
    assert result.exit_code == 0, result.output
    assert calls["create_repo"]["repo_id"] == "me/dpo-peft" and calls["create_repo"]["private"] is True
    sent = {op.path_in_repo for op in calls["create_commit"]["operations"]}
    assert sent == {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert "# me/dpo-peft" in (out / "README.md").read_text()


def full_run(tmp_path, llama_dir, weights):
    """A full fine-tune run directory holding ``weights`` as its trained blocks."""
    run = tmp_path / "full"
    run.mkdir()
    (run / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 1,
                                                          "model": str(llama_dir)}))
    mx.save_safetensors(str(run / "adapters.safetensors"), weights)
    return run


def test_full_finetune_export_loads_the_trained_weights(tmp_path, llama_dir):
    name = "model.layers.1.mlp.up_proj.weight"
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    trained = dict(tree_flatten(model.parameters()))[name] * 2 + 1
    out = export(full_run(tmp_path, llama_dir, {name: trained}), tmp_path / "out", format="mlx", dtype="float32")
    np.testing.assert_allclose(np.array(mx.load(str(out / "model.safetensors"))[name]), np.array(trained))


@pytest.mark.parametrize("case", ["unknown name", "other shape"])
def test_full_finetune_export_of_a_mismatched_run_is_refused(tmp_path, llama_dir, case):
    model, _, _ = load_model(DPOConfig(model=str(llama_dir)))
    w = dict(tree_flatten(model.parameters()))["model.layers.1.mlp.up_proj.weight"]
    if case == "unknown name":  # trained on a deeper model
        name = "model.layers.7.mlp.up_proj.weight"
    else:  # trained on a wider model
        name, w = "model.layers.1.mlp.up_proj.weight", mx.zeros((w.shape[0] + 8, w.shape[1]))
    with pytest.raises(RunError, match=re.escape(name)):
        export(full_run(tmp_path, llama_dir, {name: w}), tmp_path / "out", format="mlx")
    assert not (tmp_path / "out").exists()


def test_a_new_format_is_one_writers_entry(runs, tmp_path, monkeypatch):
    from mlx_dpo.export import writers as formats

    def write_note(run, out_dir, dtype, max_shard_bytes):
        (out_dir / "note.txt").write_text(f"{run.fine_tune_type} {dtype}")

    note = formats.Writer(write_note, default_dtype="bfloat16", library="notes", summary="a note", card_what="note",
                          usage=('print(open("{repo}/note.txt").read())',), load=formats.load_mlx)
    monkeypatch.setitem(formats.WRITERS, "note", note)
    out = export(runs("llama-lora"), tmp_path / "note", format="note")
    assert (out / "note.txt").read_text() == "lora bfloat16"
    card = (out / "README.md").read_text()
    assert "library_name: notes" in card and "exported as a note." in card and f'open("{out}/note.txt")' in card
    with pytest.raises(ExportError, match="one of hf, mlx, peft, gguf, note"):
        export(runs("llama-lora"), tmp_path / "other", format="onnx")


def test_cli_shows_the_export_log(runs, tmp_path):
    out = tmp_path / "cli"
    result = CliRunner().invoke(main, ["export", "--adapter-path", str(runs("llama-lora-4bit")), "--output", str(out),
                                       "--format", "peft"])
    assert result.exit_code == 0, result.output
    assert "approximation of the trained model" in result.output
    assert f"Exported peft model (float32) to {out}" in result.output


# --------------------------------------------------------------------------- GGUF


@pytest.mark.parametrize("name", ["llama-lora", "qwen2-lora", "llama-lora-4bit"])
def test_gguf_export_matches_mlx(runs, name, tmp_path):
    """transformers' own GGUF reader (gguf's numpy de-quantization, its own rope un-permute)
    loads the export: same logits as the trained MLX model, same greedy tokens, same tokens."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    run = runs(name)
    ref = mlx_reference(run)
    out = export(run, tmp_path / "gguf", format="gguf", dtype="float32")
    eos = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf").eos_token
    assert (out / "model.gguf").is_file() and eos
    assert (out / "Modelfile").read_text() == f'FROM ./model.gguf\nPARAMETER stop "{eos}"\n'  # Ollama's stop
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf",
                                                              dtype=torch.float32).eval()
    assert_torch_model_matches(model, ref, f"{name}: gguf export")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    for prompt in PROMPTS:
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ref["tokenizer"].encode(
            prompt, add_special_tokens=False)


@pytest.mark.parametrize("dtype,tol", [("float16", 4e-3), ("q8_0", 2e-2)])
def test_gguf_export_quantized_types(runs, tmp_path, dtype, tol):
    """16-bit and llama.cpp's Q8_0 blocks (32 int8 + one fp16 scale): within the dtype's error."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    run = runs("llama-lora")
    ref = mlx_reference(run)
    out = export(run, tmp_path / dtype, format="gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    want = {"float16": "F16", "q8_0": "Q8_0"}[dtype]
    assert types["blk.0.attn_q.weight"] == want and types["blk.0.attn_norm.weight"] == "F32"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), gguf_file="model.gguf",
                                                              dtype=torch.float32).eval()
    logits, _ = torch_outputs(model, ref)
    diff = rel_diff(ref["logits"], logits, ref["lengths"])
    print(f"gguf {dtype}: max |logit diff| / logit scale = {diff:.2e}")
    assert diff < tol
    assert_adapters_matter(ref, diff / 20 * 0.9)  # training moved the logits by more than the error


def test_gguf_export_sentencepiece_tokenizer(tmp_path_factory, llama_sp_dir, toy_data_dir, tmp_path):
    """A SentencePiece (tokenizer.model) base is written as llama.cpp's ``llama`` tokenizer."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    run = train_run(tmp_path_factory, llama_sp_dir, toy_data_dir, "sp")
    out = export(run, tmp_path / "gguf", format="gguf", dtype="float32")
    ours = load_model(DPOConfig(model=str(llama_sp_dir)))[1]
    theirs = transformers.AutoTokenizer.from_pretrained(str(out), gguf_file="model.gguf")
    for prompt in ("Repeat: apple banana cherry. Answer:", "two  spaces and ünïcode"):
        assert theirs(prompt, add_special_tokens=False)["input_ids"] == ours.encode(prompt, add_special_tokens=False)


def test_gguf_export_refuses_other_architectures():
    from mlx_dpo.export.gguf_export import model_fields
    from mlx_dpo.errors import GGUFExportError

    with pytest.raises(GGUFExportError, match="supports model types mistral, llama, qwen2, qwen3, gemma3_text, phi3, gemma2; "
                                              "this model is 'olmo2'"):
        model_fields({"model_type": "olmo2"})


def test_rope_permutation_matches_llama_cpp():
    """Row h·d + 2j + s of the GGUF weight is row h·d + s·d/2 + j of transformers' (d = head dim)."""
    from mlx_dpo.export.gguf_export import permute_rope

    heads, d = 3, 8
    w = np.arange(heads * d * 2, dtype=np.float32).reshape(heads * d, 2)
    p = permute_rope(w, heads)
    for h in range(heads):
        for j in range(d // 2):
            for s in range(2):
                assert (p[h * d + 2 * j + s] == w[h * d + s * d // 2 + j]).all()
