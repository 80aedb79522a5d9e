"""Helpers shared by the tests (and the benchmarks, which put this directory on ``sys.path``):
oracles and workloads that are not part of the package."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def sequence_logps_reference(model: nn.Module, tokens, prompt_len: int) -> float:
    """Slow, loop-based sum of completion log-probs of ONE unpadded sequence (for tests):
    full forward, token ``t`` scored by the logits at ``t - 1``."""
    logits = model(mx.array([tokens]))[0].astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    total = 0.0
    for t in range(prompt_len, len(tokens)):
        total += logp[t - 1, tokens[t]].item()
    return total


# Token lengths of UltraFeedback-binarized-like pairs: lognormal (median, sigma) per
# field (see benchmarks/README.md for where they come from).
ULTRAFEEDBACK_LENGTHS = {"prompt": (90, 0.9), "chosen": (240, 0.7), "rejected": (200, 0.8)}


def lognormal_lengths(n: int, seed: int = 0, max_length: int = 1024, max_prompt_length: int = 512,
                      model: Optional[dict] = None) -> list:
    """``n`` (prompt, chosen, rejected) token lengths drawn from ``model`` (default
    :data:`ULTRAFEEDBACK_LENGTHS`), cut as the data loader cuts them: the prompt to
    ``max_prompt_length``, each completion to ``max_length - prompt``; all >= 1."""
    rng = np.random.default_rng(seed)
    model = model or ULTRAFEEDBACK_LENGTHS
    draw = {k: np.maximum(1, np.round(med * np.exp(sigma * rng.standard_normal(n)))).astype(int)
            for k, (med, sigma) in model.items()}
    out = []
    for p, c, r in zip(draw["prompt"], draw["chosen"], draw["rejected"]):
        p = int(min(p, max_prompt_length))
        out.append((p, int(min(c, max_length - p)), int(min(r, max_length - p))))
    return out


def write_local_hostfile(path, ranks: int):
    """A ring hostfile for ``ranks`` processes on this machine, one free 127.0.0.1 port each (what
    ``mlx.launch -n N`` writes for one host), for runs started without the launcher: each process
    gets ``MLX_RANK`` and ``MLX_HOSTFILE``. Returns ``path``."""
    socks = [socket.socket() for _ in range(ranks)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    path.write_text(json.dumps([[f"127.0.0.1:{port}"] for port in ports]))
    return path


def inject(trainer, at_step, fault):
    """Wrap the compiled step: ``fault(outputs)`` runs once, during step ``at_step`` (1-based)."""
    step = trainer.grad_step
    fired = []

    def wrapped(batch, loss_state):
        out = step(batch, loss_state)
        if trainer.step + 1 == at_step and not fired:
            fired.append(True)
            return fault(out)
        return out

    trainer.grad_step = wrapped


def interrupt_in_step(trainer, at_step: int) -> None:
    """A SIGINT during step ``at_step`` (1-based): the run saves a checkpoint and stops after it."""
    inject(trainer, at_step, lambda out: (os.kill(os.getpid(), signal.SIGINT), out)[1])


def tiny_mlx_lm(model_type: str, window: int = 4, cap: float = 5.0, scale: float = 4.0, seed: int = 0):
    """A random float32 mlx-lm model of ``model_type`` (``gemma3_text``, ``gemma2`` or ``phi3``;
    3 layers, 72 wide (Gemma's sqrt(72) embedding scale is not exact in bfloat16), vocabulary 101),
    built from mlx-lm's own class: Gemma 3 with a
    ``window``-token sliding window on every other layer and a tied embedding (as it ships),
    Gemma 2 with its logits capped at ``cap`` (so the cap shapes them). The weights are scaled
    by ``scale`` (sharper than the default init)."""
    import importlib

    from mlx.utils import tree_map

    module = importlib.import_module(f"mlx_lm.models.{model_type}")
    common = dict(model_type=model_type, hidden_size=72, num_hidden_layers=3, intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=101)
    extra = {"gemma3_text": dict(head_dim=16, sliding_window=window, sliding_window_pattern=2,
                                 query_pre_attn_scalar=16),
             "gemma2": dict(head_dim=16, query_pre_attn_scalar=16, final_logit_softcapping=cap),
             "phi3": {}}[model_type]
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs(**common, **extra))
    if model_type == "gemma3_text":
        model.sanitize({})  # no lm_head: the tied embedding
    model.update(tree_map(lambda p: p * scale, model.parameters()))
    mx.eval(model.parameters())
    return model


CHROMIUM_MISSING = (None if shutil.which("chromium")
                    else "chromium is not installed (apt-get install chromium; .ci/run installs it)")


def screenshot(page, png, size=(1200, 800), timeout: float = 120):
    """``page`` (an HTML file) as headless Chromium (Debian's ``chromium``) draws the top of it in a
    window of ``size``, saved to ``png``; its own profile, killed after ``timeout`` s.
    Returns the pixels, ``(height, width, 3)`` uint8."""
    import matplotlib.image

    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory() as profile:
        args = [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                "--no-first-run", f"--user-data-dir={profile}", f"--screenshot={png}",
                f"--window-size={size[0]},{size[1]}", url]
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # OpenBLAS preloaded: its GPU process dies
        proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium drew no screenshot of {url} in {timeout} s") from None
    assert proc.returncode == 0 and Path(png).is_file(), err.decode(errors="replace")[-2000:]
    return (matplotlib.image.imread(png)[..., :3] * 255).round().astype(np.uint8)


def spans(flags) -> list:
    """``[(start, stop), ...]`` of the runs of True in a 1-d boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(flags, np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def completions_header(rgb, colour) -> tuple:
    """``(top, bottom, cells)``: the rows of the one band of ``colour`` (``#rrggbb``) in a screenshot
    and the ``(left, right)`` of each cell in it (cells are apart by the table's border spacing)."""
    rgb_colour = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    fill = (np.abs(rgb.astype(int) - rgb_colour) <= 2).all(-1)
    bands = spans(fill.any(1))
    assert len(bands) == 1, f"expected one header row in {colour}, found rows {bands}"
    top, bottom = bands[0]
    return top, bottom, spans(fill[top:bottom].any(0))


def assert_completions_on_screen(rgb, rows: list) -> None:
    """The screenshot of a report shows the completions table of ``rows`` (completions.jsonl):
    its header row (white text on the report's header colour) with a cell for the prompt and one
    per model and step, each with text in it, and dark text beneath every column with any."""
    from mlx_dpo.analysis.report import COMPLETIONS_HEADER

    columns = sorted({(r["model"] != "reference", r["step"], r["model"]) for r in rows})
    top, bottom, cells = completions_header(rgb, COMPLETIONS_HEADER)
    assert 12 <= bottom - top <= 60, (top, bottom)  # one line of text and its padding
    assert len(cells) == 1 + len(columns), cells
    body = rgb[bottom:bottom + 40 * len({r["prompt"] for r in rows})].astype(int)
    texts = [[r["prompt"] for r in rows]] + [[r["completion"] for r in rows if (r["model"], r["step"]) == (model, step)]
                                             for _, step, model in columns]
    for i, ((left, right), column) in enumerate(zip(cells, texts)):
        assert (rgb[top:bottom, left:right] >= 200).all(-1).sum() >= 10, f"header cell {i}: no light text on its colour"
        if any(t.strip() for t in column):  # a column of empty completions draws nothing
            assert (body[:, left:right] <= 100).all(-1).sum() >= 10, f"column {i}: no dark text beneath its header"


def feedback_rows(toy_data_dir, n: int = 48) -> list:
    """Unpaired rows from the toy pairs: one side of each of the first ``n`` pairs, labels alternating
    in blocks of 3 (rows 0-2 desirable: the chosen side, 3-5 undesirable: the rejected side, ...)."""
    records = [json.loads(line) for line in (toy_data_dir / "train.jsonl").read_text().splitlines()][:n]
    return [{"prompt": r["prompt"], "completion": r["chosen" if (i // 3) % 2 == 0 else "rejected"],
             "label": (i // 3) % 2 == 0} for i, r in enumerate(records)]
