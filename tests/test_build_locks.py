"""trainer/build_locks.py: a lock a killed DeepSpeed build left is removed, a live builder's kept."""

import subprocess
import sys
import time

from trainer.build_locks import remove_stale_build_locks


def test_a_dead_builders_lock_is_removed_and_a_live_ones_kept(tmp_path):
    stale, live = tmp_path / "deepspeed_shm_comm" / "lock", tmp_path / "some_op" / "lock"
    for lock in (stale, live):
        lock.parent.mkdir()
        lock.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", f"f = open({str(live)!r}); import time; time.sleep(60)"])
    try:
        time.sleep(0.5)  # (the holder has opened it)
        assert remove_stale_build_locks(str(tmp_path)) == [str(stale)]
        assert not stale.exists() and live.exists()
    finally:
        holder.kill()
        holder.wait()
