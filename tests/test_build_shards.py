"""tools/build_shards.py: the three input formats, the codec paths, skip reasons, kill-and-rerun, one run per
folder, three readers."""

import csv
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import av
import numpy as np
import pytest
import webdataset as wds

from conftest import read_index, write_video
from dali_pipes.shard_format import read_manifest, unpack_info
from tools import build_shards
from tools.build_shards import prepare_all
from tools.shard_building.clip_prep import PrepOptions, SkipClip, prepare_clip
from tools.shard_building.shard_writer import lock_output
from tools.shard_building.video_sources import build_label_map, from_class_folders, from_kinetics_csv, from_list_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kinetics_folder(tmp_path, per_class=2, classes=("zumba", "abseiling", "juggling balls"), frames=40):
    """videos/<class>/<ytid>_<start>_<end>.mp4 plus the official-style csv (train and val rows, one missing file)."""
    rows = []
    for c, label in enumerate(classes):
        os.makedirs(tmp_path / "videos" / label, exist_ok=True)
        for i in range(per_class):
            ytid = f"y{c}-{i}_x"
            write_video(tmp_path / "videos" / label / f"{ytid}_{i * 10:06d}_{i * 10 + 10:06d}.mp4", frames, seed=c)
            rows.append((label, ytid, i * 10, i * 10 + 10, "train" if i else "val"))
    rows.append(("zumba", "notdownloaded", 0, 10, "train"))
    with open(tmp_path / "k.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split", "is_cc"])
        writer.writerows(r + (0,) for r in rows)
    return tmp_path / "k.csv", tmp_path / "videos"


def shard_keys(out, split="train"):
    keys = []
    for shard in read_manifest(str(out))["splits"][split]["shards"]:
        with tarfile.open(out / shard["tar"]) as tar:
            keys += sorted({m.name.split(".")[0] for m in tar.getmembers()})
    return keys


def test_kinetics_csv_input(tmp_path, capsys):
    csv_path, videos = kinetics_folder(tmp_path)
    out = tmp_path / "shards"
    args = ["--csv", str(csv_path), "--videos", str(videos)]
    assert build_shards.main([*args, "--out", str(out), "--workers", "2"]) == 0
    manifest = read_manifest(str(out))
    assert manifest["label_map"] == {"abseiling": 0, "juggling balls": 1, "zumba": 2}  # sorted class names
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["val"]["samples"] == 3
    assert [s["reason"] for s in manifest["skipped"]] == ["missing"]
    assert "y0-0_x_000000_000010" in shard_keys(out, "val")
    summary = capsys.readouterr().out
    assert "wrote 6 clips (train 3, val 3)" in summary and "skipped 1: file not found (missing) 1" in summary
    # the same csv with --split picks one split
    out2 = tmp_path / "val_only"
    assert build_shards.main([*args, "--out", str(out2), "--split", "val"]) == 0
    assert list(read_manifest(str(out2))["splits"]) == ["val"]


def test_list_and_folder_inputs_agree_on_labels(tmp_path):
    csv_path, videos = kinetics_folder(tmp_path)
    by_folder = from_class_folders(str(videos), "train")
    assert build_label_map(by_folder) == {"abseiling": 0, "juggling balls": 1, "zumba": 2}
    lines = [f"{os.path.relpath(s.path, videos)} {build_label_map(by_folder)[s.label]}" for s in by_folder]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    listed = from_list_file(str(tmp_path / "train.txt"), "train", str(videos))
    assert sorted(s.path for s in listed) == sorted(s.path for s in by_folder)
    assert build_label_map(listed) == {"0": 0, "1": 1, "2": 2}  # integer labels keep their value
    out = tmp_path / "from_list"
    assert build_shards.main(["--list", str(tmp_path / "train.txt"), "--videos", str(videos), "--out", str(out)]) == 0
    out2 = tmp_path / "from_root"
    assert build_shards.main(["--root", str(videos), "--out", str(out2), "--split", "train"]) == 0
    labels = {}
    for folder in (out, out2):
        for sample in wds.WebDataset(str(folder / "train-000000.tar"), shardshuffle=False):
            labels.setdefault(sample["__key__"], set()).add(int(sample["cls"]))
    assert len(labels) == 6 and all(len(v) == 1 for v in labels.values())  # same clip, same label either way
    assert from_kinetics_csv(str(csv_path), str(videos))[-1].path is None  # the missing one


def test_duplicate_file_names_get_unique_keys(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "root" / label).mkdir(parents=True)
        write_video(tmp_path / "root" / label / "clip.mp4")
    keys = [s.key for s in from_class_folders(str(tmp_path / "root"), "train")]
    assert len(set(keys)) == 2 and all(k.startswith("clip-") and "." not in k for k in keys)


@pytest.mark.parametrize("codec,decoder_name", [("copy", "h264"), ("h264", "h264"), ("vp9", "vp9"),
                                                ("mjpeg", "mjpeg")])
def test_each_codec_path(tmp_path, codec, decoder_name):
    (tmp_path / "root" / "c").mkdir(parents=True)
    write_video(tmp_path / "root" / "c" / "a.mp4", frames=40, width=80, height=60)
    out = tmp_path / "out"
    assert build_shards.main(["--root", str(tmp_path / "root"), "--out", str(out), "--codec", codec,
                              "--short-side", "32", "--gop", "4"]) == 0
    (sample,) = list(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False))
    meta, info = json.loads(sample["json"]), unpack_info(sample["info"])
    assert meta["codec"] == decoder_name and meta["num_frames"] == info["num_frames"] == 40
    expected_size = (80, 60) if codec == "copy" else (42, 32)  # re-encodes: short side 32, even width
    assert (meta["width"], meta["height"]) == expected_size == (info["width"], info["height"])
    assert info["fps_milli"] == 30000 and meta["duration"] == pytest.approx(40 / 30, abs=1e-3)
    with av.open(__import__("io").BytesIO(sample["mp4"])) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == decoder_name
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        if codec != "copy":  # keyframes every --gop frames
            container.seek(0)
            keyframes = [i for i, p in enumerate(container.demux(stream)) if p.size and p.is_keyframe]
            assert keyframes[:3] == [0, 4, 8] or codec == "mjpeg"
    assert [read_index(f, source_width=80) for f in frames] == list(range(40))


def test_every_skip_reason(tmp_path, bad_videos, capsys):
    root = tmp_path / "root" / "cls"
    root.mkdir(parents=True)
    for path in bad_videos.values():
        os.rename(path, root / os.path.basename(path))
    write_video(root / "fine.mp4", frames=40)
    out = tmp_path / "out"
    assert build_shards.main(["--root", str(tmp_path / "root"), "--out", str(out), "--workers", "2",
                              "--min-frames", "3"]) == 0
    skipped = {os.path.basename(s["source"]): s["reason"] for s in read_manifest(str(out))["skipped"]}
    assert skipped == {os.path.basename(p): reason for reason, p in bad_videos.items()}
    assert read_manifest(str(out))["splits"]["train"]["samples"] == 1
    assert "skipped 5" in capsys.readouterr().out


def test_truncated_after_the_index_is_caught_by_demuxing(tmp_path):
    """A 'faststart' mp4 (index first) cut in half still opens: it is caught by counting its packets."""
    path = tmp_path / "fast.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(60):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(np.random.randint(0, 255, (48, 64, 3), np.uint8))))
        out.mux(stream.encode(None))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SkipClip) as err:
        prepare_clip(str(path), PrepOptions())
    assert err.value.reason == "truncated" and "of 60 frames" in err.value.detail


def test_three_readers(tmp_path):
    csv_path, videos = kinetics_folder(tmp_path, per_class=3)
    out = tmp_path / "shards"
    assert build_shards.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(out), "--codec", "vp9",
                              "--max-per-shard", "2", "--split", "train", "--short-side", "48"]) == 0
    manifest = read_manifest(str(out))
    shards = [str(out / s["tar"]) for s in manifest["splits"]["train"]["shards"]]
    assert len(shards) == 3 and [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [2, 2, 2]
    # 1. tar -tf lists each sample's four members
    listing = subprocess.run(["tar", "-tf", shards[0]], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(n.split(".", 1)[1] for n in listing) == ["cls", "cls", "info", "info", "json", "json", "mp4", "mp4"]
    # 2. the webdataset library
    samples = list(wds.WebDataset(shards, shardshuffle=False))
    assert len(samples) == 6 and all(int(s["cls"]) == json.loads(s["json"])["label"] for s in samples)
    # 3. DALI's reader with the index files, decoding on the CPU
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=2, num_threads=1, device_id=None)
    def pipe():
        video, info = fn.readers.webdataset(paths=shards, index_paths=[s[:-4] + ".idx" for s in shards],
                                            ext=["mp4", "info"], dtypes=[types.UINT8, types.INT32])
        return fn.decoders.video(video, device="cpu", sequence_length=4, stride=2), info

    p = pipe()
    p.build()
    frames, info = p.run()
    assert np.array(frames.as_tensor()).shape == (2, 4, 48, 64, 3)
    assert np.array(info.as_tensor())[:, 1].tolist() == [40, 40]
    assert [read_index(f) for f in np.array(frames.as_tensor())[0]] == [0, 2, 4, 6]


def running(cmd) -> list[int]:
    """PIDs of the live processes whose command line is `cmd`: a run and the workers it forked."""
    wanted = ("\0".join(cmd) + "\0").encode()
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f, open(f"/proc/{pid}/status") as g:
                if f.read() == wanted and "\nState:\tZ" not in g.read():  # a zombie is dead, awaiting its reaping
                    pids.append(int(pid))
        except OSError:  # it ended meanwhile
            pass
    return pids


def sigterm_ignored_or_blocked(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    return bool((int(status["SigIgn"], 16) | int(status["SigBlk"], 16)) & 1 << (signal.SIGTERM - 1))


def ignore_sigterm():
    """What a launcher may hand on: an ignored or blocked signal stays so through fork and exec."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_and_rerun_finishes_without_duplicates(tmp_path):
    csv_path, videos = kinetics_folder(tmp_path, per_class=4, frames=60)
    out = tmp_path / "shards"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "build_shards.py"), "--csv", str(csv_path), "--videos",
           str(videos), "--out", str(out), "--codec", "vp9", "--max-per-shard", "1", "--workers", "1",
           "--split", "train"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=ignore_sigterm)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("train-*.tar"))) < 2:
        time.sleep(0.02)
    # held where it stands while its workers are looked at: on a core of its own it could finish the other clips
    # in the meantime (the worker busy with one may still commit it)
    proc.send_signal(signal.SIGSTOP)
    first = set(running(cmd)) - {proc.pid}
    time.sleep(0.3)  # (a worker seen the moment it was forked has not run its initializer yet)
    workers = {pid: sigterm_ignored_or_blocked(pid) for pid in set(running(cmd)) & first}
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    committed = len(list(out.glob("train-*.tar")))
    assert 2 <= committed < 9, "the kill should land mid-run"
    assert workers and not any(workers.values()), "the workers must take SIGTERM's default action"
    deadline = time.time() + 5
    while running(cmd) and time.time() < deadline:
        time.sleep(0.05)
    assert not running(cmd), "a worker outlived the killed run"
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    keys = shard_keys(out)
    assert len(keys) == len(set(keys)) == 9  # 3 classes x 3 train clips, each once
    assert not list((out / ".state").glob("*.partial")) and len(list(out.glob("*.idx"))) == 9
    assert read_manifest(str(out))["skipped"] == [{"key": "notdownloaded_000000_000010", "source": None,
                                                  "split": "train", "reason": "missing",
                                                  "detail": "not in the video folder"}]
    # a third run has nothing left to do and changes nothing
    before = sorted(os.listdir(out))
    assert subprocess.run(cmd, capture_output=True, text=True).returncode == 0
    assert sorted(os.listdir(out)) == before and len(shard_keys(out)) == 9


def test_one_run_at_a_time_per_output_folder(tmp_path):
    (tmp_path / "root" / "c").mkdir(parents=True)
    write_video(tmp_path / "root" / "c" / "a.mp4", frames=10)
    out = tmp_path / "out"
    args = ["--root", str(tmp_path / "root"), "--out", str(out), "--workers", "1"]
    (out / ".state").mkdir(parents=True)
    with lock_output(str(out)):  # a run in progress (flock: another open of the file conflicts, even in-process)
        with pytest.raises(SystemExit, match=rf"being written by another build_shards.py run \(PID {os.getpid()}\)"):
            build_shards.main(args)
        assert os.listdir(out / ".state") == ["lock"]  # refused before touching the folder
    assert build_shards.main(args) == 0


def test_resume_refuses_other_options(tmp_path):
    csv_path, videos = kinetics_folder(tmp_path, per_class=1)
    out = tmp_path / "shards"
    args = ["--csv", str(csv_path), "--videos", str(videos), "--out", str(out)]
    assert build_shards.main(args) == 0
    with pytest.raises(SystemExit, match="other options.*'codec': \\('copy', 'vp9'\\)"):
        build_shards.main(args + ["--codec", "vp9"])


def test_bad_arguments_and_empty_results(tmp_path, bad_videos, capsys):
    with pytest.raises(SystemExit) as err:
        build_shards.main(["--csv", str(tmp_path / "nope.csv"), "--videos", str(tmp_path), "--out", str(tmp_path)])
    assert err.value.code == 2 and "no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        build_shards.main(["--csv", __file__, "--out", str(tmp_path / "o")])
    assert err.value.code == 2 and "--csv needs --videos" in capsys.readouterr().err
    root = tmp_path / "root" / "c"
    root.mkdir(parents=True)
    os.rename(bad_videos["not_a_video"], root / "x.mp4")
    assert build_shards.main(["--root", str(tmp_path / "root"), "--out", str(tmp_path / "o2")]) == 1
    assert "nothing was written" in capsys.readouterr().err
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out"):
        build_shards.main(["--root", str(tmp_path / "root"), "--out", str(tmp_path / "ro" / "file")])


def _dies_on_poison(job):
    key, path, options = job
    if key == "poison":
        os._exit(1)  # what a segfaulting decoder looks like from the parent
    return key, ("ok", path)


def test_a_crashing_worker_costs_only_its_own_clip():
    jobs = [(k, k, None) for k in ("a", "b", "poison", "c", "d", "e")]
    results = list(prepare_all(jobs, workers=2, prepare=_dies_on_poison))
    assert [k for k, _ in results] == ["a", "b", "poison", "c", "d", "e"]
    assert dict(results)["poison"][0] == "crashed" and dict(results)["e"] == ("ok", "e")


def test_limit_seed_and_fixed_class_list(tmp_path):
    csv_path, videos = kinetics_folder(tmp_path, per_class=3)
    classes = tmp_path / "classes.txt"
    classes.write_text("zumba\njuggling balls\nabseiling\nbowling\n")
    out = tmp_path / "out"
    args = ["--root", str(videos), "--out", str(out), "--limit", "3", "--seed", "3", "--classes", str(classes)]
    assert build_shards.main(args) == 0
    manifest = read_manifest(str(out))
    assert manifest["splits"]["train"]["samples"] == 3
    assert manifest["label_map"] == {"zumba": 0, "juggling balls": 1, "abseiling": 2, "bowling": 3}
    # without the shuffle the first three of nine clips (three per class, listed by class) would share a class
    labels = [json.loads(s["json"])["label_name"] for s in wds.WebDataset(str(out / "train-000000.tar"),
                                                                         shardshuffle=False)]
    assert len(set(labels)) > 1
    classes.write_text("zumba\n")
    with pytest.raises(SystemExit, match="labels not in"):
        build_shards.main(["--root", str(videos), "--out", str(tmp_path / "o3"), "--classes", str(classes)])


def test_splits_built_one_at_a_time_share_one_set(tmp_path):
    """Train, then val into the same --out (the README's way): the second build rewrote manifest.json with only its
    own split, and fine-tuning stopped with "has no 'train' split". Later builds now add their splits, with the
    set's label map, and a map that contradicts it is refused with the reason."""
    csv_path, videos = kinetics_folder(tmp_path, per_class=2)
    out = tmp_path / "shards"
    assert build_shards.main(["--csv", str(csv_path), "--videos", str(videos), "--out", str(out), "--split",
                              "train"]) == 0
    train_map = read_manifest(str(out))["label_map"]
    root = tmp_path / "val_root"  # the val clips as class folders, one class short: its own sorted map would differ
    for label in ("zumba", "juggling balls"):
        os.makedirs(root / label)
        write_video(root / label / "clip.mp4", 30, seed=len(label))
    assert build_shards.main(["--root", str(root), "--out", str(out), "--split", "val"]) == 0
    manifest = read_manifest(str(out))
    assert set(manifest["splits"]) == {"train", "val"} and manifest["label_map"] == train_map
    assert manifest["splits"]["train"]["samples"] == 3 and manifest["splits"]["val"]["samples"] == 2
    labels = sorted(json.loads(s["json"])["label"] for s in wds.WebDataset(str(out / "val-000000.tar"),
                                                                          shardshuffle=False))
    assert labels == sorted(train_map[c] for c in ("zumba", "juggling balls"))
    from dali_pipes.shard_set import open_shard_set

    assert open_shard_set(str(out), "train").num_samples == 3 and open_shard_set(str(out), "val").num_samples == 2
    classes = tmp_path / "classes.txt"
    classes.write_text("zumba\njuggling balls\nabseiling\n")  # another order: another label for each class
    with pytest.raises(SystemExit, match="label map differs from the one of the set .* leave out --classes"):
        build_shards.main(["--root", str(root), "--out", str(out), "--split", "test", "--classes", str(classes)])
    (root / "bowling").mkdir()
    write_video(root / "bowling" / "clip.mp4", 30)
    with pytest.raises(SystemExit, match=r"do not include \['bowling'\]"):
        build_shards.main(["--root", str(root), "--out", str(out), "--split", "test"])
    assert set(read_manifest(str(out))["splits"]) == {"train", "val"}  # refused before touching it



def test_a_split_rebuilt_from_other_sources_is_refused_or_replaced_never_mixed(tmp_path, capsys):
    """Rebuilding val from another --root printed "resuming: 16 clips done before, 3 to go" and wrote 19 clips: the
    old ones stayed beside the new. A rerun resumes only the same build; another one is refused, or with --replace
    builds the split anew."""
    def videos(root, names):
        for name in names:
            os.makedirs(root / "zumba", exist_ok=True)
            write_video(root / "zumba" / f"{name}.mp4", 20, seed=len(name))
        return str(root)

    first, second, out = videos(tmp_path / "a", ["a1", "a2", "a3"]), videos(tmp_path / "b", ["b1", "b2"]), tmp_path / "s"
    build = ["--out", str(out), "--split", "val", "--workers", "1"]
    assert build_shards.main(["--root", first, *build]) == 0
    assert build_shards.main(["--root", first, *build]) == 0  # the same build again: nothing to do
    assert "val: resuming: 3 clips done before, 0 to go" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"'val' split in .* was built from other sources: it was built from 3 "
                                         r"sources, these are 2 \(2 not among them, 3 of them not here.* pass "
                                         r"--replace, or build into another --out"):
        build_shards.main(["--root", second, *build])
    # a folder holding the same clips and more is another build too (the review's case: val's clips among train's)
    videos(tmp_path / "a", ["a4"])
    with pytest.raises(SystemExit, match=r"built from 3 sources, these are 4 \(1 not among them, 0 of them not here"):
        build_shards.main(["--root", first, *build])
    assert read_manifest(str(out))["splits"]["val"]["samples"] == 3  # refused before touching it
    assert build_shards.main(["--root", second, *build, "--replace"]) == 0
    sources = [json.loads(s["json"])["source"] for s in wds.WebDataset(str(out / "val-000000.tar"), shardshuffle=False)]
    assert sorted(os.path.basename(p) for p in sources) == ["b1.mp4", "b2.mp4"]
    assert read_manifest(str(out))["splits"]["val"]["samples"] == 2 and not os.path.exists(out / "val-000001.tar")


GARBAGE_IN_A_WORKER = """
import gc
from nvidia.dali import fn, pipeline_def
from tools.build_shards import prepare_all

def collect_garbage(job):
    gc.collect()
    return job[0], "collected"

@pipeline_def(batch_size=1, num_threads=1, device_id=None)
def numbers():
    return fn.random.uniform(range=[0, 1])

if __name__ == "__main__":
    gc.disable()
    pipe = numbers()
    pipe.build()
    pipe.run()
    cycle = [pipe]
    cycle.append(cycle)  # garbage the parent has not collected when the worker forks
    del pipe, cycle
    print(list(prepare_all([("clip", None, None)], 1, prepare=collect_garbage)))
"""


def test_a_worker_never_tears_down_the_parents_dali_pipelines(tmp_path):
    """A process that builds shards may hold DALI pipelines among its garbage (the test suite does); a forked worker
    that collected one crashed (a segfault in CI) or hung in Pipeline.__del__, losing its clip as 'crashed'."""
    script = tmp_path / "garbage_in_a_worker.py"
    script.write_text(GARBAGE_IN_A_WORKER)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[('clip', 'collected')]"
