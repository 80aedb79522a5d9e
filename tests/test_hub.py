"""Model card and Hub upload, with huggingface_hub's client stubbed (no network)."""

import json

import pytest
import yaml
from click.testing import CliRunner

from mlx_dpo.cli.commands import main
from mlx_dpo.export.hub import is_hub_id, model_card, upload

SECRET = "hf_TOPSECRETtoken1234567890abcdef"


@pytest.fixture
def export_dir(tmp_path):
    """What ``export --format hf`` writes, minus real weights."""
    out = tmp_path / "export"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "float16"}))
    (out / "model.safetensors").write_bytes(b"weights")
    (out / "tokenizer.json").write_text("{}")
    (out / ".hidden").write_text("not uploaded")
    info = {
        "format": "hf", "base_model": "Qwen/Qwen2.5-0.5B-Instruct", "fine_tune_type": "lora",
        "quantize": {"bits": 4, "group_size": 64, "mode": "affine"},
        "final_metrics": {"train": {"step": 100, "loss": 0.4123456, "rewards/accuracies": 0.875},
                          "eval": {"step": 100, "eval_loss": 0.5, "eval_rewards/accuracies": 0.8125}},
    }
    (out / "mlx_dpo_export.json").write_text(json.dumps(info))
    config = {"model": "Qwen/Qwen2.5-0.5B-Instruct", "data": "trl-lib/ultrafeedback_binarized", "beta": 0.1,
              "learning_rate": 5e-6, "loss_type": "sigmoid", "lora_rank": 8, "adapter": "lora"}
    (out / "mlx_dpo_config.yaml").write_text(yaml.safe_dump(config))
    return out


def front_matter(card):
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


@pytest.fixture
def hub_calls(monkeypatch):
    """Replace the network methods of ``HfApi``; record their arguments and the files sent."""
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, **kw):
        calls["create_repo"] = kw
        calls["token_seen"] = self.token or __import__("huggingface_hub").get_token()
        return f"https://huggingface.co/{kw['repo_id']}"

    def create_branch(self, **kw):
        calls["create_branch"] = kw

    def create_commit(self, **kw):
        from pathlib import Path

        calls["create_commit"] = kw
        calls["files"] = {op.path_in_repo: op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                          else Path(op.path_or_fileobj).read_bytes() for op in kw["operations"]}

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    return calls


def test_is_hub_id(tmp_path):
    assert is_hub_id("Qwen/Qwen2.5-0.5B") and is_hub_id("trl-lib/ultrafeedback_binarized")
    assert not is_hub_id("toy") and not is_hub_id("toy:llama") and not is_hub_id(str(tmp_path))
    assert not is_hub_id("data/train.jsonl") and not is_hub_id("./data") and not is_hub_id("a/b/c")


@pytest.mark.parametrize("fmt,library", [("hf", "transformers"), ("mlx", "mlx"), ("peft", "peft")])
def test_model_card(export_dir, fmt, library):
    info = json.loads((export_dir / "mlx_dpo_export.json").read_text())
    (export_dir / "mlx_dpo_export.json").write_text(json.dumps({**info, "format": fmt}))
    card = model_card(export_dir, "me/my-dpo")
    meta = front_matter(card)
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert meta["library_name"] == library
    assert {"dpo", "mlx", "mlx-dpo", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert "# me/my-dpo" in card and '"me/my-dpo"' in card
    assert "| beta | `0.1` |" in card and "4-bit" in card
    assert "Training (step 100)" in card and "| loss | 0.4123 |" in card and "| eval_rewards/accuracies | 0.8125 |" in card


def test_model_card_local_base_and_data(export_dir):
    info = json.loads((export_dir / "mlx_dpo_export.json").read_text())
    (export_dir / "mlx_dpo_export.json").write_text(json.dumps({**info, "base_model": str(export_dir)}))
    (export_dir / "mlx_dpo_config.yaml").write_text(yaml.safe_dump({"data": "toy"}))
    meta = front_matter(model_card(export_dir))
    assert "base_model" not in meta and "datasets" not in meta


def test_upload(export_dir, hub_calls, capsys, caplog):
    caplog.set_level("INFO", logger="mlx_dpo")
    url = upload(export_dir, "me/my-dpo", private=True, revision="v1")
    assert hub_calls["create_repo"] == {"repo_id": "me/my-dpo", "private": True, "exist_ok": True, "repo_type": "model"}
    assert hub_calls["create_branch"]["branch"] == "v1"
    sent = hub_calls["create_commit"]  # one commit: the folder's files and the card
    assert sent["repo_id"] == "me/my-dpo" and sent["revision"] == "v1"
    assert set(hub_calls["files"]) == {"README.md", "config.json", "model.safetensors", "tokenizer.json",
                                       "mlx_dpo_export.json", "mlx_dpo_config.yaml"}
    assert front_matter(hub_calls["files"]["README.md"].decode())["library_name"] == "transformers"
    assert hub_calls["token_seen"] == SECRET  # huggingface_hub found the token on its own
    assert "me/my-dpo" in url
    assert SECRET not in capsys.readouterr().out and SECRET not in caplog.text
    assert f"Uploaded {export_dir} to" in caplog.text
    assert not any(SECRET.encode() in p.read_bytes() for p in export_dir.rglob("*") if p.is_file())


def test_cli_upload_never_shows_token(export_dir, hub_calls):
    result = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "me/my-dpo"])
    assert result.exit_code == 0, result.output
    assert hub_calls["create_repo"]["private"] is False and "create_branch" not in hub_calls
    assert hub_calls["create_commit"]["revision"] is None
    assert SECRET not in result.output
    assert not any(SECRET.encode() in p.read_bytes() for p in export_dir.rglob("*") if p.is_file())


def test_cli_upload_dry_run(export_dir, hub_calls):
    result = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "me/my-dpo", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "Dry run" in result.output and "model.safetensors" in result.output and "README.md" in result.output
    assert ".hidden" not in result.output
    assert "create_repo" not in hub_calls and "create_commit" not in hub_calls
    assert not (export_dir / "README.md").exists()


def test_cli_upload_errors_are_reported(export_dir, monkeypatch):
    from huggingface_hub import HfApi

    def denied(self, **kw):
        raise PermissionError("403 Forbidden: you cannot create repos in this namespace")

    monkeypatch.setattr(HfApi, "create_repo", denied)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "other/name"])
    assert result.exit_code == 2 and "PermissionError: 403" in result.output and SECRET not in result.output
    bad = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "not a repo"])
    assert bad.exit_code == 2 and "user/name" in bad.output


@pytest.fixture
def hub_server(monkeypatch):
    """A local HTTP stand-in for the Hub API; huggingface_hub's real client talks to it."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    import huggingface_hub.constants as constants

    requests = []

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, obj, code=200):
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))
            if self.path == "/api/repos/create":
                return self._reply({"url": f"{endpoint}/me/my-dpo"})
            if "/preupload/" in self.path:
                files = json.loads(body)["files"]
                return self._reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if "/commit/" in self.path:
                return self._reply({"commitUrl": f"{endpoint}/me/my-dpo/commit/{'a' * 40}", "commitOid": "a" * 40})
            return self._reply({})

        def do_GET(self):
            requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, b""))
            self._reply({"error": "not found"}, 404)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # every request goes to the local stub
    monkeypatch.setenv("HF_TOKEN", SECRET)
    yield requests
    server.shutdown()


def test_upload_through_hub_client(export_dir, hub_server):
    import base64

    result = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "me/my-dpo", "--private",
                                       "--revision", "v1"])
    assert result.exit_code == 0, result.output
    by_path = {path: (headers, body) for path, headers, body in hub_server}
    create = json.loads(by_path["/api/repos/create"][1])
    assert create["organization"] == "me" and create["name"] == "my-dpo" and create["visibility"] == "private"
    assert "/api/models/me/my-dpo/branch/v1" in by_path
    commit = [json.loads(line) for line in by_path["/api/models/me/my-dpo/commit/v1"][1].splitlines()]
    files = {c["value"]["path"]: base64.b64decode(c["value"]["content"]) for c in commit if c["key"] == "file"}
    assert set(files) == {"README.md", "config.json", "model.safetensors", "tokenizer.json",
                          "mlx_dpo_export.json", "mlx_dpo_config.yaml"}
    assert front_matter(files["README.md"].decode())["base_model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    # The token travels only in the Authorization header of authenticated calls.
    assert by_path["/api/repos/create"][0]["authorization"] == f"Bearer {SECRET}"
    assert not any(SECRET.encode() in body for _, _, body in hub_server)
    assert SECRET not in result.output
    assert not any(SECRET.encode() in p.read_bytes() for p in export_dir.rglob("*") if p.is_file())


def test_model_card_hides_local_paths(export_dir, tmp_path):
    home = str(tmp_path / "home" / "me")
    config = {"model": f"{home}/models/my-base", "data": f"{home}/data/prefs.jsonl", "output_dir": f"{home}/runs/dpo",
              "cache_dir": f"{home}/.cache", "ref_adapter_path": f"{home}/sft", "eval_data": "org/evals", "beta": 0.1}
    (export_dir / "mlx_dpo_config.yaml").write_text(yaml.safe_dump(config))
    info = json.loads((export_dir / "mlx_dpo_export.json").read_text())
    info.update(base_model=f"{home}/models/my-base", run_dir=f"{home}/runs/dpo", data=config["data"])
    (export_dir / "mlx_dpo_export.json").write_text(json.dumps(info))
    card = model_card(export_dir, "me/my-dpo")
    assert home not in card and str(tmp_path) not in card
    full = yaml.safe_load(card.split("```yaml\n")[1].split("```")[0])
    assert full == {"model": "my-base", "data": "prefs.jsonl", "output_dir": "dpo", "cache_dir": ".cache",
                    "ref_adapter_path": "sft", "eval_data": "org/evals", "beta": 0.1}
    assert "`my-base`" in card and front_matter(card)["datasets"] == ["org/evals"]


@pytest.mark.parametrize("failing", ["create_repo", "create_commit"])
def test_a_failed_upload_changes_nothing_in_the_folder(export_dir, hub_calls, monkeypatch, failing):
    from huggingface_hub import HfApi

    def down(self, **kw):
        raise ConnectionError("the Hub could not be reached")

    (export_dir / "README.md").write_text("my own notes\n")
    before = {p.name: p.read_bytes() for p in export_dir.iterdir()}
    monkeypatch.setattr(HfApi, failing, down)
    result = CliRunner().invoke(main, ["upload", str(export_dir), "--repo-id", "me/my-dpo"])
    assert result.exit_code == 2
    assert "error: upload to me/my-dpo failed: ConnectionError: the Hub could not be reached" in result.output
    assert {p.name: p.read_bytes() for p in export_dir.iterdir()} == before


def test_a_successful_upload_sends_the_card_in_its_commit_then_writes_it(export_dir, hub_calls):
    upload(export_dir, "me/my-dpo")
    assert hub_calls["files"]["README.md"] == (export_dir / "README.md").read_bytes()
