"""The ways people hand over their videos: Kinetics' official csv + a video folder, a "path label" list, class
folders, and Something-Something v2's official label files.

Each becomes a list of Source records with a dataset-unique key (no dots: webdataset splits names at the first dot).
"""

import csv
import hashlib
import json
import os
import re
from dataclasses import dataclass

from dali_pipes.shard_format import VIDEO_EXTS


@dataclass(frozen=True)
class Source:
    key: str
    path: str | None  # None when the csv names a clip that is not on disk
    label: str | None  # class name; None for unlabeled rows (Kinetics' test split)
    split: str
    youtube_id: str | None = None


def _is_video(name: str) -> bool:
    return name.rsplit(".", 1)[-1].lower() in VIDEO_EXTS


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "clip"


def _unique_keys(stems: list[str], paths: list[str]) -> list[str]:
    """Sanitized stems; a stem shared by several files gets a short hash of each one's path."""
    keys = [_sanitize(s) for s in stems]
    counts = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    return [k if counts[k] == 1 else f"{k}-{hashlib.sha1(p.encode()).hexdigest()[:8]}" for k, p in zip(keys, paths)]


def from_kinetics_csv(csv_path: str, videos_dir: str, splits=None) -> list[Source]:
    """Rows label, youtube_id, time_start, time_end, split[, is_cc]; files {youtube_id}_{start:06d}_{end:06d}.ext
    anywhere under videos_dir (flat or in class folders)."""
    on_disk = {}
    for folder, _, names in os.walk(videos_dir):
        for name in names:
            if _is_video(name):
                on_disk.setdefault(name.rsplit(".", 1)[0], os.path.join(folder, name))
    sources, seen = [], set()
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"youtube_id", "time_start", "time_end", "split"}
        if not needed <= set(reader.fieldnames or ()):
            raise ValueError(f"{csv_path}: expected Kinetics columns label, {', '.join(sorted(needed))}; "
                             f"found {reader.fieldnames}")
        for row in reader:
            if splits and row["split"] not in splits:
                continue
            stem = f"{row['youtube_id']}_{int(float(row['time_start'])):06d}_{int(float(row['time_end'])):06d}"
            if stem in seen:  # the same clip listed twice: shard it once
                continue
            seen.add(stem)
            label = (row.get("label") or "").strip() or None
            sources.append(Source(_sanitize(stem), on_disk.get(stem), label, row["split"], row["youtube_id"]))
    return sources


def from_list_file(list_path: str, split: str, videos_dir: str | None = None) -> list[Source]:
    """Lines "path label" (mae_st / SlowFast / VideoMAE; VideoMAE's extra columns are ignored; a path may hold
    spaces, as Kinetics class folders do). Relative paths are taken from videos_dir, else from the list's folder."""
    base = videos_dir or os.path.dirname(os.path.abspath(list_path))
    rows = []
    with open(list_path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            path_end = next((i for i, part in enumerate(parts) if _is_video(part)), 0) + 1
            if len(parts) <= path_end:
                raise ValueError(f"{list_path}:{number}: expected 'path label', got {line.strip()!r}")
            rows.append((os.path.join(base, " ".join(parts[:path_end])), parts[path_end]))
    keys = _unique_keys([os.path.basename(p).rsplit(".", 1)[0] for p, _ in rows], [p for p, _ in rows])
    return [Source(k, p, label, split) for k, (p, label) in zip(keys, rows)]


def from_class_folders(root: str, split: str) -> list[Source]:
    """root/<class name>/*.mp4 (any video extension)."""
    rows = []
    for label in sorted(os.listdir(root)):
        folder = os.path.join(root, label)
        if os.path.isdir(folder):
            rows += [(os.path.join(folder, n), label) for n in sorted(os.listdir(folder)) if _is_video(n)]
    if not rows:
        raise ValueError(f"{root}: no class folders with videos ({', '.join(VIDEO_EXTS)})")
    keys = _unique_keys([os.path.basename(p).rsplit(".", 1)[0] for p, _ in rows], [p for p, _ in rows])
    return [Source(k, p, label, split) for k, (p, label) in zip(keys, rows)]


def build_label_map(sources: list[Source], classes_file: str | None = None) -> dict[str, int]:
    """Class name -> index. Kinetics convention: the sorted class names. All-integer labels (list files) map to
    themselves. A classes file (one name per line) fixes the map, e.g. to build val with train's indices."""
    if classes_file:
        with open(classes_file) as f:
            names = [line.strip() for line in f if line.strip()]
        unknown = sorted({s.label for s in sources if s.label is not None} - set(names))
        if unknown:
            raise ValueError(f"labels not in {classes_file}: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
        return {name: i for i, name in enumerate(names)}
    names = sorted({s.label for s in sources if s.label is not None})
    if names and all(n.lstrip("-").isdigit() for n in names):
        return {n: int(n) for n in sorted(names, key=int)}
    return {name: i for i, name in enumerate(names)}


# Something-Something v2's official release (Qualcomm / 20BN; the layout VideoMAE's and SlowFast's SSv2 loaders read):
#   something-something-v2-labels.json      {"Holding something next to something": "41", ...}: template -> index
#   something-something-v2-train.json       [{"id": "78687", "label": "holding potato next to vicks vaporub bottle",
#   something-something-v2-validation.json    "template": "Holding [something] next to [something]",
#                                             "placeholders": ["potato", "vicks vaporub bottle"]}, ...]
#   something-something-v2-test.json        [{"id": "1420"}, ...]: no labels
#   videos: <id>.webm (VP9)
SSV2_FILES = {"train": "something-something-v2-train.json", "val": "something-something-v2-validation.json",
              "test": "something-something-v2-test.json"}
SSV2_LABELS = "something-something-v2-labels.json"


def ssv2_class(template: str) -> str:
    """A template's class name: its text with the brackets around the placeholders removed."""
    return template.replace("[", "").replace("]", "")


def read_ssv2_labels(labels_dir: str) -> dict[str, int]:
    """Class name -> the official index (the labels file gives it as a string)."""
    path = os.path.join(labels_dir, SSV2_LABELS)
    if not os.path.isfile(path):
        raise ValueError(f"{labels_dir} has no {SSV2_LABELS}: give --ssv2 the folder of the official label files")
    with open(path) as f:
        return {name: int(index) for name, index in json.load(f).items()}


def from_ssv2(labels_dir: str, videos_dir: str, splits=None) -> list[Source]:
    """The official SSv2 splits (train, val = the validation file, test without labels) of the files present."""
    classes, sources = read_ssv2_labels(labels_dir), []
    for split, name in SSV2_FILES.items():
        path = os.path.join(labels_dir, name)
        if (splits and split not in splits) or not os.path.isfile(path):
            continue
        with open(path) as f:
            entries = json.load(f)
        for number, entry in enumerate(entries):
            label = None
            if "template" in entry:
                label = ssv2_class(entry["template"])
                if label not in classes:
                    raise ValueError(f"{name}, entry {number} (id {entry['id']}): its class {label!r} is not in "
                                     f"{SSV2_LABELS}")
            video = os.path.join(videos_dir, f"{entry['id']}.webm")
            sources.append(Source(_sanitize(str(entry["id"])), video if os.path.isfile(video) else None, label, split))
    if not sources:
        raise ValueError(f"{labels_dir} holds none of {sorted(SSV2_FILES.values())}")
    return sources
