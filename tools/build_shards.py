"""Kinetics videos -> WebDataset video shards that DALI reads (see dali_pipes/shard_format.py for what they hold).

    python tools/build_shards.py --csv kinetics400/train.csv --videos kinetics400/train --out shards/k400 --codec copy
    python tools/build_shards.py --list train.txt --out shards/k400 --codec vp9 --workers 32
    python tools/build_shards.py --root k400/train --out shards/k400 --split train --limit 100
    python tools/build_shards.py --ssv2 ssv2/labels --videos ssv2/20bn-something-something-v2 --out shards/ssv2
    python tools/build_shards.py --root k400/val --split val --out s3://bucket/k400   # built in --staging, uploaded

Every clip is probed and test-decoded; bad ones are skipped with the reason recorded in OUT/manifest.json.
Killed at any point (even SIGKILL), the same command run again finishes the job: committed shards are kept, the
rest is redone, nothing is written twice. Its worker processes die with it, and a second run into the same --out
refuses to start while one is running.
"""

import argparse
import concurrent.futures as cf
import ctypes
import gc
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from concurrent.futures.process import BrokenProcessPool

from tqdm import tqdm

from dali_pipes.shard_format import MANIFEST, RECOMMENDED_SHORT_SIDE, pack_info
from dali_pipes.shard_store import HttpStore, LocalStore, StoreRefused, open_store
from tools.shard_building.clip_prep import CODECS, SKIP_REASONS, PrepOptions, SkipClip, prepare_clip
from tools.shard_building.publish import publish, staging_folder
from trainer.atomic_files import atomic_write_text
from tools.shard_building.shard_writer import (STATE_DIR, OutputLocked, ShardWriter, lock_output, recover,
                                               remove_split)
from tools.shard_building.video_sources import (build_label_map, from_class_folders, from_kinetics_csv,
                                                from_list_file, from_ssv2, read_ssv2_labels)

TOOL_VERSION = "1.1"  # 1.1: true frame counts, canonical codec names, rotation, pix_fmt: a rerun must not mix in 1.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>; man 2 prctl: the signal a process gets when the thread that forked it dies
# options that change what the shards hold: a rerun into the same --out must use the same ones
CONTENT_OPTIONS = ("codec", "short_side", "gop", "min_frames", "verify", "shard_size", "max_per_shard", "seed")


def parse_size(text: str) -> int:
    units = {"k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
    text = text.strip().lower().rstrip("b")
    try:
        return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1GB, 500MB, 200000000)") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--csv", help="official Kinetics annotation csv (label, youtube_id, time_start, time_end, split)")
    src.add_argument("--list", help='list file of "path label" lines (mae_st / SlowFast / VideoMAE)')
    src.add_argument("--root", help="folder tree root/<class name>/*.mp4")
    src.add_argument("--ssv2", metavar="LABELS_DIR",
                     help="Something-Something v2: the folder of its official label files (something-something-v2-"
                          "{labels,train,validation,test}.json); splits train, val, test (unlabelled)")
    p.add_argument("--videos", help="video folder for --csv (flat or class folders) and --ssv2 (<id>.webm); path "
                                    "prefix for --list")
    p.add_argument("--out", required=True, help="output folder for the shards, their indexes and manifest.json, or "
                                                "s3://bucket/prefix (gs://: README, Data in object storage): built "
                                                "in --staging, then uploaded, the manifest last")
    p.add_argument("--staging", help="--out s3://...: the local folder the set is built in first (default: one per "
                                     "location under the system's temp folder); a rerun resumes from it")
    p.add_argument("--split", help="--csv, --ssv2: comma-separated splits to build (default: all); "
                                   "--list/--root: the split's name (default: train)")
    p.add_argument("--codec", choices=CODECS, default="copy",
                   help="copy keeps the source bytes (GPU decode); h264/vp9/mjpeg re-encode. DALI's CPU decoder "
                        "reads only vp9/vp8/mjpeg (default: copy)")
    p.add_argument("--short-side", type=int, default=256, help="re-encode: resize the short side to this (0: keep)")
    p.add_argument("--gop", type=int, default=16, help="re-encode: keyframe interval in frames (default: 16)")
    p.add_argument("--min-frames", type=int, default=1,
                   help="skip clips with fewer decodable frames (default: 1, every clip that decodes: the loader "
                        "repeats a short clip's last frame, as mae_st and SlowFast do)")
    p.add_argument("--verify", choices=("fast", "full"), default="fast",
                   help="copy: test-decode the first and last group of pictures (fast) or every frame (full)")
    p.add_argument("--shard-size", type=parse_size, default=parse_size("1GB"), help="bytes per shard (default: 1GB)")
    p.add_argument("--max-per-shard", type=int, default=0, help="clips per shard at most (default: no limit)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes classes across shards")
    p.add_argument("--limit", type=int, help="only the first N clips of each split (after the shuffle)")
    p.add_argument("--classes", help="file of class names, one per line, fixing the label map")
    p.add_argument("--replace", action="store_true",
                   help="build the splits anew from these sources: their shards in --out, built from other sources "
                        "before, are deleted first (without it such a build is refused: a rerun resumes only the "
                        "same build)")
    args = p.parse_args(argv)
    for flag in ("csv", "ssv2"):
        if getattr(args, flag) and not args.videos:
            p.error(f"--{flag} needs --videos DIR, the folder that holds the clips")
    if args.ssv2 and args.classes:
        p.error("--ssv2 takes its class indices from the official labels file: drop --classes")
    if args.ssv2 and not os.path.isdir(args.ssv2):
        p.error(f"--ssv2: no such folder: {args.ssv2}")
    for flag in ("csv", "list", "classes"):
        if getattr(args, flag) and not os.path.isfile(getattr(args, flag)):
            p.error(f"--{flag}: no such file: {getattr(args, flag)}")
    for flag in ("root", "videos"):
        if getattr(args, flag) and not os.path.isdir(getattr(args, flag)):
            p.error(f"--{flag}: no such folder: {getattr(args, flag)}")
    if args.workers < 1 or args.gop < 1 or args.min_frames < 1 or args.shard_size < 1:
        p.error("--workers, --gop, --min-frames and --shard-size must be positive")
    return args


def load_sources(args):
    splits = set(args.split.split(",")) if args.split else None
    if args.ssv2:
        sources = from_ssv2(args.ssv2, args.videos, splits)
    elif args.csv:
        sources = from_kinetics_csv(args.csv, args.videos, splits)
    elif args.list:
        sources = from_list_file(args.list, args.split or "train", args.videos)
    else:
        sources = from_class_folders(args.root, args.split or "train")
    by_split = {}
    for source in sources:
        by_split.setdefault(source.split, []).append(source)
    for split, items in by_split.items():
        random.Random(args.seed).shuffle(items)  # shards then mix classes
        by_split[split] = items[: args.limit] if args.limit else items
    return by_split, sources


def existing_manifest(location: str) -> dict | None:
    """The manifest of the set already at the location (a later build adds its splits to it), or None."""
    return open_store(location).read_json(MANIFEST)


def settle_label_map(args, sources, existing: dict | None) -> dict:
    """This build's label map: SSv2's official one, --classes, or, when OUT already holds a set, the set's own (a
    split built after the others takes their map); else the sorted class names of these sources. One that differs
    from the set's is refused: the splits of one set must agree on what label 3 means."""
    if args.ssv2:
        label_map = read_ssv2_labels(args.ssv2)
    elif args.classes or existing is None:
        label_map = build_label_map(sources, args.classes)
    else:
        label_map = existing["label_map"]
        unknown = sorted({s.label for s in sources if s.label is not None} - set(label_map))
        if unknown:
            raise ValueError(f"{args.out} holds splits {sorted(existing['splits'])} whose {len(label_map)} classes do "
                             f"not include {unknown[:5]}{' ...' if len(unknown) > 5 else ''}: build this split into "
                             "another --out, or rebuild the set with --classes listing every class")
    if existing is not None and label_map != existing["label_map"]:
        changed = sorted(k for k in set(label_map) | set(existing["label_map"])
                         if label_map.get(k) != existing["label_map"].get(k))
        raise ValueError(f"this build's label map differs from the one of the set in {args.out} (splits "
                         f"{sorted(existing['splits'])}) for {len(changed)} classes, e.g. {changed[:3]}: leave out "
                         "--classes to take the set's own map, or build into another --out")
    return label_map


def check_output(args) -> None:
    """Create OUT, or say why it cannot be written."""
    state = os.path.join(args.out, STATE_DIR)
    try:
        os.makedirs(state, exist_ok=True)
        probe = os.path.join(state, "write-test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as err:
        sys.exit(f"error: cannot write to --out {args.out}: {err}")


def check_options(args) -> None:
    """Refuse to mix shards built with other options, or by another version of this tool, into OUT."""
    options = {"version": TOOL_VERSION, **{k: getattr(args, k) for k in CONTENT_OPTIONS}}
    path = os.path.join(args.out, STATE_DIR, "options.json")
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        changed = {k: (previous.get(k), v) for k, v in options.items() if previous.get(k) != v}
        if changed:
            sys.exit(f"error: {args.out} holds shards built with other options {changed} (was, now): "
                     "use the same options to resume, or a new --out")
    else:
        atomic_write_text(path, json.dumps(options))


def _prepare(job):
    """Worker: (key, path, options) -> (key, Clip) or (key, (reason, detail)). Never raises for a bad file."""
    key, path, options = job
    try:
        return key, prepare_clip(path, options)
    except SkipClip as skip:
        return key, (skip.reason, skip.detail)
    except Exception as err:  # an unforeseen failure is still one bad file, not a failed run
        return key, ("corrupt", f"{type(err).__name__}: {err}")


def _worker_init(parent: int) -> None:
    """Pool initializer: the worker takes SIGTERM's default action and dies with the build. Ignored and blocked
    signals pass through fork and exec, so a launcher that ignores SIGTERM would hand that on; and an orphaned worker
    blocks for good writing its result into a pipe whose read end it holds too (by fork: no EPIPE), keeping the
    build's lock on OUT. The parent's objects are frozen out of the worker's garbage collection: a process that
    forks workers may hold DALI pipelines among its garbage (the test suite does), and one torn down in a forked
    child crashes it (a segfault in Pipeline.__del__, seen in CI's suite)."""
    gc.freeze()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if sys.platform == "linux":
        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL)) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:
        threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if os.getppid() != parent:  # the build died before prctl ran: no signal will come
        os._exit(1)


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def _pool(workers: int) -> cf.ProcessPoolExecutor:
    return cf.ProcessPoolExecutor(workers, initializer=_worker_init, initargs=(os.getpid(),))


def prepare_all(jobs, workers: int, prepare=_prepare):
    """Yield prepare(job) in order, `workers` processes at a time. A worker that dies (a decoder crash) takes only
    its own clip with it: the pool is rebuilt, the clip retried alone, and skipped as 'crashed' if it dies again."""
    jobs, position = list(jobs), 0
    while position < len(jobs):
        broken = False
        with _pool(workers) as pool:
            window = {}
            try:
                while position < len(jobs):
                    for i in range(position, min(position + 2 * workers, len(jobs))):
                        if i not in window:
                            window[i] = pool.submit(prepare, jobs[i])
                    yield window.pop(position).result()
                    position += 1
            except BrokenProcessPool:
                broken = True
        if not broken:
            return
        with _pool(1) as alone:
            try:
                yield alone.submit(prepare, jobs[position]).result()
            except BrokenProcessPool:
                yield jobs[position][0], ("crashed", "the decoder process died on this file")
        position += 1


def foreign_build(out: str, split: str, committed: list, skipped: list, sources) -> str | None:
    """Why OUT's split is not a killed run of this build (None when it is, or is empty): the build records the list
    of sources it shards (a rerun from a folder with more, fewer or other files is a new build), and each clip its
    file (splits built before that list was recorded are checked by their clips alone)."""
    listed = {s.key: s.path for s in sources}
    record = os.path.join(out, STATE_DIR, f"sources-{split}.json")
    if os.path.exists(record):
        with open(record) as f:
            before = json.load(f)
        if before != listed:
            new, gone = len(listed.keys() - before.keys()), len(before.keys() - listed.keys())
            moved = sum(before[k] != listed[k] for k in listed.keys() & before.keys())
            return (f"it was built from {len(before)} sources, these are {len(listed)} ({new} not among them, {gone} "
                    f"of them not here, {moved} from another file)")
        return None
    found = [(s["key"], s.get("source")) for shard in committed for s in shard["samples"]]
    found += [(s["key"], s.get("source")) for s in skipped]
    foreign = [key for key, path in found if key not in listed or (path is not None and path != listed[key])]
    return f"{len(foreign)} of its {len(found)} clips (e.g. {foreign[0]}) are not among these" if foreign else None


def build_split(args, split, sources, label_map, options):
    """Shard one split, resuming after whatever a killed run of the same build committed; a split built from other
    sources before is refused, or with --replace deleted first. Returns (sidecars, skipped records)."""
    committed = recover(args.out, split)
    skip_log = os.path.join(args.out, STATE_DIR, f"skipped-{split}.jsonl")
    skipped = _read_jsonl(skip_log)
    foreign = foreign_build(args.out, split, committed, skipped, sources) if committed or skipped else None
    if foreign and not args.replace:
        sys.exit(f"error: the {split!r} split in {args.out} was built from other sources: {foreign}. A rerun "
                 f"resumes only the same build; to build {split!r} anew from these {len(sources)} sources (its shards "
                 "deleted first) pass --replace, or build into another --out")
    if foreign:
        print(f"{split}: --replace: deleting the {len(committed)} shards built from other sources")
        remove_split(args.out, split)
        committed, skipped = [], []
    atomic_write_text(os.path.join(args.out, STATE_DIR, f"sources-{split}.json"),
                      json.dumps({s.key: s.path for s in sources}))
    done = {s["key"] for shard in committed for s in shard["samples"]}
    done |= {s["key"] for s in skipped}
    todo = [s for s in sources if s.key not in done]
    by_key = {s.key: s for s in todo}
    first_index = max((int(c["tar"].split("-")[-1][:6]) for c in committed), default=-1) + 1
    writer = ShardWriter(args.out, split, args.shard_size, args.max_per_shard, first_index)
    if len(done):
        print(f"{split}: resuming: {len(done)} clips done before, {len(todo)} to go")
    bar = tqdm(total=len(todo), desc=split, unit="clip", dynamic_ncols=True)
    with open(skip_log, "a") as log:
        jobs = [(s.key, s.path, options) for s in todo]
        for key, result in prepare_all(jobs, min(args.workers, max(1, len(jobs)))):
            source = by_key[key]
            if isinstance(result, tuple):
                record = {"key": key, "source": source.path, "split": split, "reason": result[0], "detail": result[1]}
                log.write(json.dumps(record) + "\n")
                log.flush()
                skipped.append(record)
            else:
                label = label_map.get(source.label, -1)
                frame = {"height": result.height, "width": result.width, "pix_fmt": result.pix_fmt,
                         "rotation": result.rotation}
                meta = {"source": source.path, "youtube_id": source.youtube_id, "label": label,
                        "label_name": source.label, "split": split, "fps": result.fps,
                        "num_frames": result.num_frames, **frame, "codec": result.codec, "profile": result.profile,
                        "duration": round(result.duration, 3)}
                info = pack_info(label, result.num_frames, result.fps, result.height, result.width, result.rotation)
                files = {result.ext: result.data, "cls": str(label).encode(), "json": json.dumps(meta).encode(),
                         "info": info}
                writer.write(key, files, {"codec": result.codec, "num_frames": result.num_frames, "label": label,
                                          "source": source.path, **frame})
            bar.update()
            bar.set_postfix(skipped=len(skipped), refresh=False)
    writer.close()
    bar.close()
    return committed + writer.committed, skipped


def _read_jsonl(path: str) -> list[dict]:
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:  # the torn last line of a killed run: that clip is simply redone
                    pass
    return records


def frame_summary(samples: list[dict]) -> dict:
    """What the GPU preflight reads of a split: the decoder's formats, the rotations, and the frame sizes (decode
    cost grows with pixels)."""
    if not samples:
        return {"formats": {}, "rotations": {}, "short_side": {}, "pixels_median": 0}
    sides = sorted(min(s["height"], s["width"]) for s in samples)
    return {
        "formats": dict(Counter(f"{s['codec']}/{s['pix_fmt']}" for s in samples)),
        "rotations": dict(Counter(str(s["rotation"]) for s in samples)),
        "short_side": {"min": sides[0], "median": int(statistics.median(sides)), "max": sides[-1],
                       f"above_{RECOMMENDED_SHORT_SIDE}": sum(side > RECOMMENDED_SHORT_SIDE for side in sides)},
        "pixels_median": int(statistics.median(s["height"] * s["width"] for s in samples)),
    }


def write_manifest(args, label_map, results, existing: dict | None = None) -> dict:
    """OUT/manifest.json: this build's splits added to those a build before it wrote (a split built again replaces
    its entry), never one dropped."""
    kept = {split: info for split, info in (existing or {}).get("splits", {}).items() if split not in results}
    manifest = {
        "tool": "tools/build_shards.py", "version": TOOL_VERSION,
        "options": dict(vars(args)),
        "label_map": label_map, "splits": kept,
        "skipped": [s for s in (existing or {}).get("skipped", []) if s.get("split") not in results],
    }
    for split, (shards, skipped) in results.items():
        samples = [s for shard in shards for s in shard["samples"]]
        manifest["splits"][split] = {
            "samples": len(samples), "bytes": sum(s["bytes"] for s in shards),
            "codecs": dict(Counter(s["codec"] for s in samples)), **frame_summary(samples),
            "shards": [{"tar": s["tar"], "index": s["index"], "samples": len(s["samples"]), "bytes": s["bytes"],
                        **{k: s[k] for k in ("sha256", "index_bytes", "index_sha256") if k in s}} for s in shards],
        }
        manifest["skipped"] += skipped
    atomic_write_text(os.path.join(args.out, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def warn_large_copies(results) -> None:
    """--codec copy kept frames larger than GPU training needs: say so once, and what to do."""
    large = [s for shards, _ in results.values() for shard in shards for s in shard["samples"]
             if min(s["height"], s["width"]) > RECOMMENDED_SHORT_SIDE]
    if large:
        print(f"warning: --codec copy kept {len(large)} clips whose short side is above {RECOMMENDED_SHORT_SIDE} px "
              f"(e.g. {large[0]['key']}, {large[0]['width']}x{large[0]['height']}): NVDEC's decode time grows with "
              "pixels that a 224 crop does not need. For GPU training re-encode them: --codec h264 --short-side 256 "
              "(or 320)", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.time()
    try:
        store = open_store(args.out)
    except StoreRefused as err:
        sys.exit(f"error: {err}")
    if isinstance(store, HttpStore):
        sys.exit("error: --out cannot be an http(s) server: build into a folder the server serves, or into s3://")
    if not isinstance(store, LocalStore):  # an object store: built locally first, published at the end
        args.out, args.target = args.staging or staging_folder(args.out), args.out
    try:
        by_split, sources = load_sources(args)
    except ValueError as err:
        sys.exit(f"error: {err}")
    if not by_split:
        sys.exit("error: no clips to shard (check --split against the csv's split column)")
    check_output(args)
    try:
        lock = lock_output(args.out)
    except OutputLocked as err:
        sys.exit(f"error: {err}")
    with lock:
        try:
            existing = existing_manifest(getattr(args, "target", args.out))
            label_map = settle_label_map(args, sources, existing)
        except (ValueError, StoreRefused) as err:
            sys.exit(f"error: {err}")
        if existing is not None:
            print(f"{args.out} holds splits {sorted(existing['splits'])}: adding {sorted(by_split)} with the set's "
                  f"label map ({len(label_map)} classes)")
        return build(args, by_split, label_map, start, existing)


def build(args, by_split, label_map, start: float, existing: dict | None = None) -> int:
    """The build proper, run while holding OUT's lock; the exit status."""
    check_options(args)
    options = PrepOptions(args.codec, args.short_side, args.gop, args.min_frames, args.verify)
    results = {}
    for split, sources in sorted(by_split.items()):
        results[split] = build_split(args, split, sources, label_map, options)
    manifest = write_manifest(args, label_map, results, existing)

    elapsed = time.time() - start
    built = {split: manifest["splits"][split] for split in results}
    written = sum(s["samples"] for s in built.values())
    total_bytes = sum(s["bytes"] for s in built.values())
    shards = sum(len(s["shards"]) for s in built.values())
    per_split = ", ".join(f"{k} {v['samples']}" for k, v in built.items())
    print(f"wrote {written} clips ({per_split}) in {shards} shards, {total_bytes / 1e6:.1f} MB, to {args.out} "
          f"in {elapsed:.1f} s")
    reasons = Counter(s["reason"] for s in manifest["skipped"] if s.get("split") in results)
    if reasons:
        detail = ", ".join(f"{SKIP_REASONS.get(r, r)} ({r}) {n}" for r, n in reasons.most_common())
        print(f"skipped {sum(reasons.values())}: {detail}; every one is listed in {args.out}/{MANIFEST}")
    if args.codec == "copy":
        warn_large_copies(results)
    if not written:
        print("error: nothing was written: every clip was skipped", file=sys.stderr)
        return 1
    if hasattr(args, "target"):
        names = [name for split in results for shard in manifest["splits"][split]["shards"]
                 for name in (shard["tar"], shard["index"])]
        files, size = publish(open_store(args.target), args.out, names)
        print(f"published {files} files, {size / 1e6:.1f} MB, to {args.target} (the manifest last)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
