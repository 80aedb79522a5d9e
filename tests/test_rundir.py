"""One run per output directory: a second run is refused naming the holder; a killed holder's lock is taken over."""

import os
import signal
import subprocess
import sys

import pytest

from mlx_dpo import DPOConfig, DPOTrainer
from mlx_dpo.errors import ConfigError
from mlx_dpo.train.rundir import LOCK_FILE

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode())
print("holding", flush=True)
time.sleep(120)
"""


def test_a_second_run_in_the_same_output_dir_is_refused(llama_dir, toy_data_dir, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    cfg = DPOConfig(model=str(llama_dir), data=str(toy_data_dir), output_dir=str(out), max_steps=2, batch_size=4,
                    progress_bar=False, eval_steps=0, cache_dir=str(tmp_path / "cache"))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid}\)"):
            DPOTrainer(cfg, log=lambda *a: None)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing was written
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # a holder killed with -9: the OS drops its lock
        holder.wait(timeout=30)
        holder.stdout.close()
    trainer = DPOTrainer(cfg, log=lambda *a: None)
    trainer.train()
    assert trainer.step == 2 and (out / LOCK_FILE).read_text().strip() == str(os.getpid())
    with pytest.raises(ConfigError, match="already holds a finished run"):  # lock released; the usual check applies
        DPOTrainer(cfg, log=lambda *a: None)


def test_an_unwritable_output_dir_is_refused_before_loading(tmp_path):
    """Even for root (os.access says yes): an immutable directory is probed, not guessed."""
    import shutil

    parent = tmp_path / "locked"
    parent.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(parent)]).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(ConfigError, match=rf"output_dir: {parent} is not writable"):
            DPOTrainer(DPOConfig(model="/nonexistent", output_dir=str(parent / "run")))
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)
    assert list(parent.iterdir()) == []
