"""Data parallelism (issue 18): two local ranks on the ring backend (MLX_RANK + MLX_HOSTFILE on
127.0.0.1 ports chosen now) against one process with the global batch, the oracle.

Every multi-process run has a hard timeout: the process groups are killed and the test fails
(the ring all_sum has a rare upstream deadlock, mlx#4475), so a hang never stalls CI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import yaml

from mlx_dpo.train import checkpoint
from mlx_dpo.data.batching import BatchSampler
from mlx_dpo.config.fields import DPOConfig
from mlx_dpo.data import TokenizedPair
from helpers import write_local_hostfile
from mlx_dpo.train.rundir import run_status
from mlx_dpo.train.trainer import DPOTrainer

RUN_TIMEOUT = 240  # seconds for a whole 2-rank run on a loaded 2-core box
TIMING = ("tokens_per_second", "peak_memory_gb", "compiled_shapes", "compile_seconds", "train_runtime")  # per process
ROOT = Path(__file__).resolve().parents[1]

# A rank that runs the trainer and, on rank 1, kills (SIGKILL), freezes (SIGSTOP) or terminates
# (SIGTERM, handled) itself at the start of step N: argv = config.yaml [kill:N | stop:N | term:N].
WORKER = """
import os, signal, sys
from mlx_dpo.errors import TrainingError, TrainingInterrupted
from mlx_dpo.config.fields import resolve_config
from mlx_dpo.train.trainer import DPOTrainer
trainer = DPOTrainer(resolve_config(sys.argv[1]))
if len(sys.argv) > 2 and trainer.rank == 1:
    kind, at = sys.argv[2].split(":")
    step = trainer.grad_step
    def faulty(batch, loss_state):
        if trainer.step + 1 == int(at):
            os.kill(os.getpid(), {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}[kind])
        return step(batch, loss_state)
    trainer.grad_step = faulty
try:
    trainer.train()
except (TrainingError, TrainingInterrupted) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(getattr(e, "exit_code", 1))
"""


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from mlx_dpo.model.toy import build_toy_dataset

    return build_toy_dataset(tmp_path_factory.mktemp("ddp") / "toy", n_train=48, n_valid=2)


def write_config(path, **values):
    path.write_text(yaml.safe_dump(values))
    return path


def base_config(model_dir, data_dir, out, **kw):
    values = dict(model=str(model_dir), data=str(data_dir), output_dir=str(out), max_steps=10, batch_size=4,
                  learning_rate=3e-3, logging_steps=1, save_steps=5, eval_strategy="no", progress_bar=False, seed=0)
    return {**values, **kw}


def launch(tmp_path, config_path, ranks=2, fault=None, env=None):
    """Start ``ranks`` processes on the ring backend; returns (processes, log paths)."""
    hostfile = write_local_hostfile(tmp_path / "hosts.json", ranks)
    procs, logs = [], []
    for rank in range(ranks):
        log = tmp_path / f"rank{rank}.log"
        args = [sys.executable, "-c", WORKER, str(config_path)] + ([fault] if fault else [])
        e = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "PYTHONPATH": str(ROOT),
             **(env or {})}
        procs.append(subprocess.Popen(args, stdout=log.open("w"), stderr=subprocess.STDOUT, env=e,
                                      start_new_session=True))
        logs.append(log)
    return procs, logs


def wait_all(procs, logs, timeout=RUN_TIMEOUT, only=None, kill_rest=True):
    """Exit codes of ``procs`` (or of ``procs[only]``); then (``kill_rest``), and always past
    ``timeout``, every process group left is killed (past ``timeout`` the test fails with the logs)."""
    deadline = time.monotonic() + timeout
    watched = procs if only is None else [procs[i] for i in only]
    done = False
    try:
        while any(p.poll() is None for p in watched):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed run hung past {timeout} s:\n" + "\n".join(l.read_text()[-2000:] for l in logs))
            time.sleep(0.1)
        done = True
        return [p.returncode for p in watched]
    finally:
        for p in procs if kill_rest or not done else ():
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait()


def run_ranks(tmp_path, config_path, **kw):
    procs, logs = launch(tmp_path, config_path, **kw)
    codes = wait_all(procs, logs)
    assert codes == [0] * len(procs), "\n".join(l.read_text()[-3000:] for l in logs)
    return [l.read_text() for l in logs]


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.startswith("time/")}
            for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(path):
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def assert_same_adapters(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)
    assert worst < atol, worst
    moved = max(float(np.abs(wa[k]).max()) for k in wa if "lora_b" in k)
    assert moved > 1e-3  # training moved the adapters (lora_b starts at 0): the comparison means something


def assert_same_metrics(one, two):
    m1, m2 = metrics(one), metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == list(range(1, len(m1) + 1))
    for r1, r2 in zip(m1, m2):
        assert r1.keys() == r2.keys()
        for k in r1:
            if k.endswith("accuracies") and abs(r1.get(k.replace("accuracies", "margins"), 1.0)) < 1e-5:
                continue  # margins of float-rounding size (step 1, adapters at 0): which side wins is rounding
            assert r2[k] == pytest.approx(r1[k], rel=1e-4, abs=1e-5), (r1["step"], k)


# ------------------------------------------------------------------ no processes


def test_ranks_slice_the_batches_of_one_process_with_the_global_batch():
    pairs = [TokenizedPair([1], [2] * (i % 7 + 1), [3] * (i % 5 + 1)) for i in range(40)]
    one = BatchSampler(pairs, 6, seed=3)
    ranks = [BatchSampler(pairs, 3, seed=3, rank=r, ranks=2) for r in range(2)]
    assert len(ranks[0]) == len(one) == 40 // 6
    iters = [iter(s) for s in (one, *ranks)]
    for _ in range(3 * len(one)):  # three epochs
        whole, a, b = (next(i) for i in iters)
        assert a + b == whole and len(a) == len(b) == 3
    assert ranks[0].state == ranks[1].state == one.state


def test_resume_on_another_number_of_ranks_needs_the_same_global_batch():
    saved = DPOConfig(batch_size=2).to_dict()
    errors, notes = checkpoint.config_differences(saved, DPOConfig(batch_size=4), ranks_then=2, ranks_now=1)
    assert errors == [] and notes == ["batch_size: checkpoint 2 x 2 ranks, now 4 x 1 ranks (the same global batch)"]
    errors, _ = checkpoint.config_differences(saved, DPOConfig(batch_size=2), ranks_then=2, ranks_now=1)
    assert errors == ["batch_size: the checkpoint's global micro-batch is 2 x 2 rank(s) = 4 pairs, now 2 x 1 = 2; "
                      "the same data order needs batch_size 4"]
    errors, _ = checkpoint.config_differences(saved, DPOConfig(batch_size=1), ranks_then=2, ranks_now=3)
    assert "needs a number of ranks dividing 4" in errors[0]
    errors, _ = checkpoint.config_differences(saved, DPOConfig(batch_size=4))  # one process, as before
    assert errors == ["batch_size: checkpoint 2, now 4"]


# ------------------------------------------------------------------ two ranks


def one_process(model_dir, data_dir, out, **kw):
    DPOTrainer(DPOConfig(**base_config(model_dir, data_dir, out, **kw)), log=lambda *a: None).train()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "kto_pair"])
def test_two_ranks_train_as_one_process_with_the_global_batch(llama_dir, small_data, tmp_path, loss_type):
    """kto_pair's reference points are batch means with a gradient: the gathered batch's backward
    pass must send every rank its share of the other ranks' terms."""
    one = one_process(llama_dir, small_data, tmp_path / "one", loss_type=loss_type)
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, small_data, tmp_path / "two", batch_size=2,
                                                            loss_type=loss_type))
    rank0, rank1 = run_ranks(tmp_path, cfg)
    assert "global batch 4 = batch_size 2 x gradient_accumulation_steps 1 x 2 ranks" in rank0
    assert rank1.strip() == ""  # rank 0 prints
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert_same_metrics(one, tmp_path / "two")
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "two")] == ["step-5", "step-10"]


@pytest.mark.slow
def test_two_ranks_bco_pair_with_a_precomputed_reference(llama_dir, small_data, tmp_path):
    """bco_pair's running reward mean couples the batch; the reference pass is split over the
    ranks and the cache file holds the values a single process writes."""
    kw = dict(loss_type="bco_pair", precompute_ref_log_probs=True, max_steps=8, save_steps=0)
    one = one_process(llama_dir, small_data, tmp_path / "one", cache_dir=str(tmp_path / "cache1"), **kw)
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, small_data, tmp_path / "two", batch_size=2,
                                                            cache_dir=str(tmp_path / "cache2"), **kw))
    run_ranks(tmp_path, cfg)
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert_same_metrics(one, tmp_path / "two")
    files = [sorted((tmp_path / c / "ref_logps").glob("*.npz")) for c in ("cache1", "cache2")]
    assert len(files[0]) == 2 and [f.name for f in files[0]] == [f.name for f in files[1]]  # train, eval
    for one_file, two_file in zip(*files):
        a, b = np.load(one_file), np.load(two_file)
        # equal to float32 rounding: each rank pads its own half-size batches, and block-causal
        # attention chunks a batch by its padded width (mlx_dpo/forward/blocks.py)
        assert a.files == b.files
        for k in a.files:
            np.testing.assert_allclose(a[k], b[k], rtol=2e-6, atol=1e-5, err_msg=k)


@pytest.fixture(scope="module")
def feedback_data(small_data, tmp_path_factory):
    """Unpaired rows where each 4 consecutive rows share one completion (under different prompts), so the
    KL pairs rotated within a rank's 2 rows are those of one process's 4: the same KL sequences."""
    pairs = [json.loads(line) for line in (small_data / "train.jsonl").read_text().splitlines()]
    labels = [True, False, True, True, False, True, False, False]
    rows = [{"prompt": p["prompt"], "completion": pairs[i - i % 4]["chosen"], "label": labels[i % 8]}
            for i, p in enumerate(pairs)]
    path = tmp_path_factory.mktemp("fb") / "feedback.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_two_ranks_kto_gather_the_kl_reference_point_and_the_metrics(llama_dir, feedback_data, tmp_path, loss_type):
    """KTO's KL reference point is a batch mean gathered over the ranks (then clamped) and its
    metrics are sums and counts over the ranks: two ranks of 2 rows train as one process of 4
    (apo_zero_unpaired: the same with no KL rows in the batches)."""
    kw = dict(loss_type=loss_type, desirable_weight=1.3, max_steps=6, save_steps=0)
    one = one_process(llama_dir, feedback_data, tmp_path / "one", **kw)
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, feedback_data, tmp_path / "two", batch_size=2,
                                                            **kw))
    run_ranks(tmp_path, cfg)
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert_same_metrics(one, tmp_path / "two")
    assert {"kl", "rewards/chosen", "rewards/rejected"} <= set(metrics(one)[0])
    if loss_type == "kto":
        assert max(r["kl"] for r in metrics(one)) > 1e-3  # the reference point moved: its gathering is tested


@pytest.mark.slow
def test_a_killed_rank_stops_the_other_and_the_run_resumes_on_one_process(llama_dir, small_data, tmp_path):
    """Measured: after a SIGKILL of rank 1 inside a step, the ring backend on rank 0 reports
    "Too many send/recv errors" but the step never returns, so rank 0's Python SIGTERM handler
    cannot run; mlx.launch then terminates rank 0, as done here, and the watchdog ends it."""
    kw = dict(max_steps=8, save_steps=2, ddp_timeout=120)
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, small_data, tmp_path / "two", batch_size=2,
                                                            **kw))
    procs, logs = launch(tmp_path, cfg, fault="kill:5")
    wait_all(procs, logs, only=[1], kill_rest=False)  # rank 1 kills itself at step 5; rank 0 is stuck in it
    assert procs[1].returncode == -signal.SIGKILL
    time.sleep(1)
    procs[0].send_signal(signal.SIGTERM)
    tic = time.monotonic()
    codes = wait_all(procs, logs, timeout=60)
    text = logs[0].read_text()
    assert codes[0] in (1, 128 + signal.SIGTERM) and time.monotonic() - tic < 30, (codes, time.monotonic() - tic, [l for l in text.splitlines() if "[ring]" not in l][-6:])
    if codes[0] == 1:  # seen once: the ring backend returned its error to rank 0 before the SIGTERM came
        assert "error" in text.lower()
    else:
        assert "error: rank 0 of 2: SIGTERM while step 5 waited for the other ranks (1)" in text
    assert "last checkpoint: " + str(tmp_path / "two" / "checkpoints" / "step-4") in text
    assert run_status(tmp_path / "two")[0] == 1  # what a script checks after mlx.launch (which exits 0)
    # resume on one process with batch 4 (the same global batch), against an uninterrupted run
    DPOTrainer(DPOConfig(**base_config(llama_dir, small_data, tmp_path / "two", batch_size=4, **kw),
                         resume_from_checkpoint="latest"), log=lambda *a: None).train()
    assert run_status(tmp_path / "two") == (0, f"complete: 8 steps, adapters in {tmp_path / 'two'}")
    one = one_process(llama_dir, small_data, tmp_path / "one", **kw)
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert_same_metrics(one, tmp_path / "two")


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_both_after_the_same_step_and_the_run_resumes_exactly(llama_dir, small_data,
                                                                                         tmp_path):
    kw = dict(max_steps=8, save_steps=0)
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, small_data, tmp_path / "two", batch_size=2,
                                                            **kw))
    procs, logs = launch(tmp_path, cfg, fault="term:4")
    codes = wait_all(procs, logs)
    texts = [l.read_text() for l in logs]
    assert codes == [128 + signal.SIGTERM] * 2, texts
    assert "SIGTERM: stopped after step 4; checkpoint saved to" in texts[0]
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "two")] == ["step-4"]
    resume = write_config(tmp_path / "resume.yaml", **base_config(llama_dir, small_data, tmp_path / "two",
                                                                  batch_size=2, resume_from_checkpoint="latest", **kw))
    run_ranks(tmp_path, resume)
    one = one_process(llama_dir, small_data, tmp_path / "one", **kw)
    assert_same_adapters(one / "adapters.safetensors", tmp_path / "two" / "adapters.safetensors")
    assert_same_metrics(one, tmp_path / "two")


@pytest.mark.slow
def test_a_hung_rank_times_out_the_other_with_its_rank(llama_dir, small_data, tmp_path):
    cfg = write_config(tmp_path / "two.yaml", **base_config(llama_dir, small_data, tmp_path / "two", batch_size=2,
                                                            max_steps=8, save_steps=2, ddp_timeout=5))
    procs, logs = launch(tmp_path, cfg, fault="stop:4")
    codes = wait_all(procs, logs, only=[0])  # rank 1 stays stopped; wait_all kills it
    text = logs[0].read_text()
    assert codes == [124], text[-2000:]
    assert "error: rank 0 of 2: step 4 waited more than 5 s (ddp_timeout) for the other ranks (1)" in text
    assert "last checkpoint: " in text and "step-2" in text
    assert checkpoint.load_checkpoint(checkpoint.latest_checkpoint(tmp_path / "two")).step == 2


def test_plan_reports_the_global_batch_and_the_bytes_all_reduced_per_step(llama_dir, small_data, tmp_path):
    from mlx_dpo.analysis.plan import plan

    cfg = DPOConfig(**base_config(llama_dir, small_data, tmp_path / "plan", batch_size=2, gradient_accumulation_steps=3,
                                  lora_rank=4, num_layers=2, lora_target_modules=["q_proj", "v_proj"]))
    lines = []
    result = plan(cfg, steps=1, log=lines.append, ranks=2)
    model = DPOTrainer(cfg, log=lambda *a: None).model
    # oracle from the shapes: LoRA r=4 on q and v of the last 2 layers,
    # A (in x r) + B (r x out), float32; once per micro-batch, plus 16 float32 metrics
    attn = model.layers[-1].self_attn
    per_layer = sum(4 * (m.linear.weight.shape[1] + m.linear.weight.shape[0]) for m in (attn.q_proj, attn.v_proj))
    assert result["allreduce_bytes_per_step"] == 3 * (2 * per_layer * 4 + 64)
    assert result["ranks"] == 2 and result["global_batch_size"] == 12
    one_gbe, ten_gbe = result["seconds_per_step"]["1 GbE"], result["seconds_per_step"]["10 GbE"]
    nbytes = result["allreduce_bytes_per_step"]
    assert one_gbe - ten_gbe == pytest.approx(nbytes / 0.117e9 - nbytes / 1.17e9)  # 2 (N-1)/N = 1 for N = 2
    assert any("global batch 12 = batch_size 2 x gradient_accumulation_steps 3 x 2 ranks" in line for line in lines)
