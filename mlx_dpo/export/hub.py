"""Model cards and uploads to the Hugging Face Hub.

The token comes from ``HF_TOKEN`` or ``huggingface-cli login`` (huggingface_hub's own
lookup); this module never reads, prints or stores it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional, Union

import yaml

from ..config.fields import config_keys
from .writers import WRITERS
from ..util.hubnet import check_reachable
from ..util.io import atomic_write_text

log = logging.getLogger(__name__)

EXPORT_INFO = "mlx_dpo_export.json"  # written by ``export``: where the export came from
RUN_CONFIG = "mlx_dpo_config.yaml"  # the run's config.yaml, copied by ``export``
# Config keys that may hold local filesystem paths (shown in a card by their last component only).
PATH_KEYS = ("model", "data", "eval_data", "ref_adapter_path", "output_dir", "cache_dir", "resume_from_checkpoint")


def is_hub_id(name: Optional[str]) -> bool:
    """``org/name`` that is not a local path (or a data file name)."""
    if not name or name.startswith(("/", ".", "~", "toy")) or Path(name).expanduser().exists():
        return False
    if name.lower().endswith((".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")):
        return False
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None


def public_name(value):
    """A local path reduced to its last component (a card never shows where files live on
    this machine); Hub ids, ``toy`` names and non-strings are returned unchanged."""
    if not isinstance(value, str) or not value or is_hub_id(value) or value == "toy" or value.startswith("toy:"):
        return value
    return Path(value).expanduser().name or "<local>"


def _read_export(folder: Path) -> tuple:
    info_path, config_path = folder / EXPORT_INFO, folder / RUN_CONFIG
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {}
    if not info and (folder / "adapter_config.json").is_file():
        info = {"format": "peft"}
    config = {k: public_name(v) if k in PATH_KEYS else v for k, v in (config or {}).items()}
    info = {k: public_name(v) if k in ("base_model", "run_dir", "data") else v for k, v in info.items()}
    return info, config


def model_card(folder: Union[str, Path], repo_id: Optional[str] = None, location: Optional[str] = None) -> str:
    """A ``README.md`` with YAML metadata, usage, training configuration and final metrics.

    ``repo_id`` (or else ``location``, the final local path) names the model in the card.
    """
    folder = Path(folder)
    info, config = _read_export(folder)
    fmt = info.get("format", "mlx" if _is_mlx_quantized(folder) else "hf")
    writer = WRITERS.get(fmt, WRITERS["hf"])  # the format's library, usage and tags
    base = info.get("base_model") or config.get("model")
    adapter = info.get("fine_tune_type") or config.get("adapter", "lora")
    meta = {}
    if is_hub_id(base):
        meta["base_model"] = base
    meta["library_name"] = writer.library
    meta["pipeline_tag"] = "text-generation"
    meta["tags"] = ["dpo", "mlx", "mlx-dpo"] + ([adapter] if adapter in ("lora", "dora") else [])
    if writer.adapter and is_hub_id(base):
        meta["tags"].append(f"base_model:adapter:{base}")
    datasets = [d for d in (config.get("data"), config.get("eval_data")) if is_hub_id(d)]
    if datasets:
        meta["datasets"] = datasets
    where = repo_id or location or str(folder)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id or Path(where).name}", ""]
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`" if base else "a base model"
    what = writer.card_what if fmt in WRITERS else "model"
    lines += [
        f"A preference-tuned (DPO) version of {base_text}, trained with "
        f"[mlx-dpo](https://github.com/mlx-dpo/mlx-dpo) on Apple MLX and exported as a {what}.",
        "",
    ]
    if info.get("quantize"):
        q = info["quantize"]
        lines += [f"The adapters were trained on a {q.get('bits')}-bit quantized base (group size {q.get('group_size')}).", ""]
    lines += ["## Usage", "", f"```{writer.usage_language}", *(line.format(repo=where) for line in writer.usage), "```", ""]
    params = {k: config[k] for k in config_keys("card") if k in config}
    if params:
        lines += ["## Training configuration", "", "| key | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v)}` |" for k, v in params.items()]
        lines += ["", "<details><summary>Full configuration</summary>", "", "```yaml",
                  yaml.safe_dump(config, sort_keys=False).strip(), "```", "", "</details>", ""]
    metrics = info.get("final_metrics") or {}
    if any(metrics.get(part) for part in ("train", "eval")):
        lines += ["## Final metrics", ""]
        for part, title in (("train", "Training"), ("eval", "Evaluation")):
            record = dict(metrics.get(part) or {})
            if record:
                step = record.pop("step", None)
                lines += [f"{title}" + (f" (step {step})" if step is not None else "") + ":", "",
                          "| metric | value |", "|---|---|"]
                lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in record.items()]
                lines.append("")
    return "\n".join(lines)


def _is_mlx_quantized(folder: Path) -> bool:
    path = folder / "config.json"
    return path.is_file() and "quantization" in json.loads(path.read_text())


def write_model_card(folder: Union[str, Path], repo_id: Optional[str] = None, location: Optional[str] = None) -> Path:
    path = Path(folder) / "README.md"
    atomic_write_text(path, model_card(folder, repo_id, location))
    return path


def upload_files(folder: Path) -> list:
    """Files ``upload`` sends (hidden files are skipped), relative to ``folder``."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def commit_operations(folder: Path, card: str) -> list:
    """One commit: every file ``upload_files`` lists, with ``card`` as README.md."""
    from huggingface_hub import CommitOperationAdd

    files = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
             for name in upload_files(folder) if name != "README.md"]
    return files + [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8"))]


def upload(
    folder: Union[str, Path],
    repo_id: str,
    private: bool = False,
    revision: Optional[str] = None,
    dry_run: bool = False,
    commit_message: str = "Upload model exported with mlx-dpo",
) -> Union[str, list]:
    """Upload ``folder`` with its model card to ``repo_id`` in one commit (``create_repo`` +
    ``create_commit``); README.md is written into ``folder`` only once the upload succeeded.

    Returns the repository URL, or with ``dry_run`` the list of files that would be uploaded.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory")
    if not re.fullmatch(r"([\w.-]+/)?[\w.-]+", repo_id):
        raise ValueError(f"--repo-id must look like user/name, got {repo_id!r}")
    card = model_card(folder, repo_id)
    if dry_run:
        files = sorted(set(upload_files(folder)) | {"README.md"})
        where = f"{'private' if private else 'public'} repo {repo_id}" + (f" (revision {revision})" if revision else "")
        log.info(f"Dry run: would upload {len(files)} files from {folder} to {where}:")
        for name in files:
            size = (folder / name).stat().st_size if (folder / name).exists() else len(card.encode())
            log.info(f"  {name}  ({size:,} bytes)")
        return files
    from huggingface_hub import HfApi

    check_reachable(repo_id, "model")  # a stalled network fails here, in bounded time
    api = HfApi()
    url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(url, "repo_id", None) or repo_id
    if revision:
        api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
    api.create_commit(repo_id=repo_id, repo_type="model", revision=revision, commit_message=commit_message,
                      operations=commit_operations(folder, card))
    atomic_write_text(folder / "README.md", card)  # only now: a failed upload changes nothing here
    link = str(url) + (f"/tree/{revision}" if revision else "")
    log.info(f"Uploaded {folder} to {link}")
    return link


__all__ = ["model_card", "write_model_card", "upload", "upload_files", "is_hub_id"]
