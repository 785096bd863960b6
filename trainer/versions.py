"""The oldest releases this project works with, checked when the trainer starts, with one message for all of them.

The floors are the ones pyproject.toml declares (a test keeps the two equal), and each has its reason:
- torch 2.4: fused AdamW on parameters that live on the CPU (ZeRO offload, the CPU path), torch.nn.attention.
- nvidia-dali 1.48: the first release whose video decoder takes per-sample `frames` and `pad_mode` (DALI 1.48.0
  release notes: "Added support for frame padding with configurable modes", "Added frame selection options").
  NGC PyTorch containers ship their own DALI, which `make`'s --system-site-packages venv reuses: older ones fail here.
- deepspeed 0.14.4: ds_to_universal --inject_missing_state, which resuming on another number of processes needs
  (deepspeedai/DeepSpeed#5608, June 2024).
- av (PyAV) 14.1: VideoFrame.rotation (PyAV-Org/PyAV#1675) and add_stream_from_template (#1613), which the shard
  builder uses for phone videos and for clips cut before their first keyframe.
- boto3 1.28 (botocore 1.31.0, July 2023): the first that takes AWS_ENDPOINT_URL from the environment, which is how
  an S3-compatible store (and GCS's S3 API) is named for shard sets in object storage (dali_pipes/shard_store.py).
Versions are read from the installed distributions' metadata, so the check costs no imports.
"""

import importlib.metadata
import re

FLOORS = {"torch": "2.4", "nvidia-dali": "1.48", "deepspeed": "0.14.4", "webdataset": "0.2.86", "einops": "0.7",
          "tensorboard": "2.14", "av": "14.1", "tqdm": "4.66", "pillow": "9", "numpy": "1.24",
          "boto3": "1.28", "safetensors": "0.4"}
# DALI is published per CUDA major (nvidia-dali-cuda120, -cuda130, ...); any of them will do
_DISTRIBUTION_PREFIX = {"nvidia-dali": "nvidia-dali-cuda"}


class VersionProblem(RuntimeError):
    """A required package is missing or too old; the message lists every one and how to fix it."""


def _release(text: str) -> tuple[int, ...]:
    """'2.13.0+cpu' -> (2, 13, 0); '1.48.0.dev1' -> (1, 48, 0)."""
    return tuple(int(part) for part in re.findall(r"\d+", text.split("+")[0])[:3])


def installed_version(package: str) -> str | None:
    prefix = _DISTRIBUTION_PREFIX.get(package)
    if prefix is None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None
    found = [d.version for d in importlib.metadata.distributions()
             if (d.metadata["Name"] or "").lower().startswith(prefix)]
    return max(found, key=_release, default=None)


def version_problems(floors: dict = FLOORS) -> list[str]:
    problems = []
    for package, floor in floors.items():
        version = installed_version(package)
        if version is None:
            problems.append(f"{package} is not installed (need >= {floor})")
        elif _release(version) < _release(floor):
            problems.append(f"{package} {version} is older than {floor}")
    return problems


def require_versions(floors: dict = FLOORS) -> None:
    problems = version_problems(floors)
    if problems:
        raise VersionProblem(
            "this environment cannot run the trainer: " + "; ".join(problems) + ". Install the project's "
            "requirements (`make` does it into .venv, or `pip install -e .`); inside an NGC container, upgrade its "
            "DALI with `pip install -U nvidia-dali-cuda120` (or the -cuda130 build matching the container).")
