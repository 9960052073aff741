"""Carry a real model to the lent GPU machine in parts, and plan the device calls (issue 31).

The GPU machine has no network; each device call sends the working tree plus the ignored paths it
names in ``carry``, 64 MiB in all, and a warm machine keeps /tmp between calls (it goes back after
~30 s idle, so the calls follow each other at once). This script cuts the model's GGUF into parts
that fit beside the tree, and lays out what every call carries:

    python benchmarks/gpu_carry.py --model smollm2-135m-instruct        # writes .gpu/, prints the plan

    .gpu/common/   manifest.json (file name, size, sha256, part count), prompts.jsonl (HumanEval 0..L-1
                   and MT-Bench first turns 0..L-1 as text; prompts-ids.jsonl: the same as Qwen token ids),
                   configs of the installed Qwen shapes for random-weight runs, the pure-Python `gguf`
                   wheel (the device image lacks it)
    .gpu/p0 ...    one part each

Call k (k = 0 .. N-1) carries [".gpu/common", ".gpu/pk"] and runs ``bash benchmarks/gpu_real.sh k``:
it stashes part k in /tmp/dw and runs that call's stage; the last call assembles the file, checks its
sha256 and runs the real-weight benchmark (benchmarks/gpu_real.sh says which stage runs where).
SmolLM2-135M (98 MB) takes 3 calls with a ~31 MB tree; the Qwen 0.5B GGUF (491 MB) 15, more than
15 minutes of device time allow.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

MIB = 1 << 20
LIMIT = 64 * MIB


def tree_bytes(root: Path) -> int:
    """What a device call sends without carry: tracked files and untracked files git does not ignore."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                           check=True, capture_output=True).stdout.split(b"\0")
    return sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())


def model_gguf(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".gguf" and p.is_file():
        return p
    from draftwise.models.checkpoint import resolve

    found = sorted(Path(resolve(name)).glob("*.gguf"))
    if not found:
        sys.exit(f"error: {name} has no .gguf beside its checkpoint (install it with `draftwise models install`)")
    return found[0]


def prompts(limit: int) -> list[dict]:
    from draftwise import corpora

    he = [{"set": "humaneval", "prompt": q["turns"][0], "chat": False} for q in corpora.humaneval()[:limit]]
    mt = [{"set": "mtbench", "prompt": q["turns"][0], "chat": True} for q in corpora.mtbench()[:limit]]
    return he + mt


def encode(tok, p: dict) -> list[int]:
    if p["chat"]:
        text = tok.apply_chat_template([{"role": "user", "content": p["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        return tok.encode(text, add_special_tokens=False)
    return tok.encode(p["prompt"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="installed model name or a .gguf file")
    ap.add_argument("--out", default=".gpu", help="folder for the carried files (git-ignored)")
    ap.add_argument("--limit", type=int, default=10, help="prompts per set (HumanEval, MT-Bench)")
    ap.add_argument("--margin-mib", type=float, default=2, help="room left under 64 MiB per call")
    a = ap.parse_args()
    root = Path(subprocess.run(["git", "rev-parse", "--show-toplevel"], check=True, capture_output=True,
                               text=True).stdout.strip())
    out = root / a.out
    out.mkdir(exist_ok=True)             # ("dir/" patterns match existing folders only)
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out)], cwd=root).returncode == 0
    if not ignored:
        sys.exit(f"error: {out} is not git-ignored: the parts would travel with every call (add it to .gitignore)")
    if out.exists():
        shutil.rmtree(out)
    common = out / "common"
    common.mkdir(parents=True)

    (common / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts(a.limit)))
    from draftwise.models import catalog

    for name, short in (("qwen2.5-coder-0.5b-instruct", "qwen05"), ("qwen2.5-coder-1.5b-instruct", "qwen15")):
        if catalog.is_installed(name):      # its shape, for random-weight runs at real sizes
            cfg = json.loads((catalog.model_dir(name) / "config.json").read_text())
            keep = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "torch_dtype")}
            (common / f"{short}.json").write_text(json.dumps(keep, indent=1))
            if not (common / "prompts-ids.jsonl").exists():     # the same prompts as Qwen token ids
                from transformers import AutoTokenizer

                tok = AutoTokenizer.from_pretrained(str(catalog.model_dir(name)))
                (common / "prompts-ids.jsonl").write_text("".join(
                    json.dumps({"set": p["set"], "ids": encode(tok, p)}) + "\n" for p in prompts(a.limit)))
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(common),
                    f"gguf=={metadata.version('gguf')}"], check=True)

    src = model_gguf(a.model)
    size = src.stat().st_size
    room = LIMIT - tree_bytes(root) - sum(f.stat().st_size for f in common.iterdir()) - int(a.margin_mib * MIB)
    if room < 4 * MIB:
        sys.exit(f"error: the working tree leaves {room / MIB:.1f} MiB per call: no room for a part")
    n = -(-size // room)
    room = -(-size // n)                 # balanced parts
    digest = hashlib.sha256()
    with open(src, "rb") as fh:
        for k in range(n):
            d = out / f"p{k}"
            d.mkdir()
            chunk = fh.read(room)
            digest.update(chunk)
            (d / f"part{k:02d}").write_bytes(chunk)
    manifest = {"file": src.name, "bytes": size, "sha256": digest.hexdigest(), "parts": n,
                "part_bytes": room, "model": a.model}
    (common / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"{src.name}: {size / MIB:.1f} MiB in {n} parts of at most {room / MIB:.1f} MiB -> {out}")
    for k in range(n):
        print(f"call {k}: carry [\"{a.out}/common\", \"{a.out}/p{k}\"]  command: bash benchmarks/gpu_real.sh {k}")


if __name__ == "__main__":
    main()
