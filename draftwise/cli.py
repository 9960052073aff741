"""Command line: draftwise generate | bench | serve | chat | methods | models (list, install, bench-forward)."""
from __future__ import annotations

import argparse
import sys

from draftwise.commands import (  # noqa: F401
    bench_exit_code,
    cmd_bench,
    cmd_bench_forward,
    cmd_chat,
    cmd_datastore_build,
    cmd_datastore_info,
    cmd_generate,
    cmd_head_export,
    cmd_methods,
    cmd_models_install,
    cmd_models_list,
    cmd_serve,
    cmd_train_eagle,
    cmd_train_early_exit,
    cmd_train_ldlp,
)
from draftwise.errors import DraftwiseError
from draftwise.models import catalog
from draftwise.models.transformer import KERNEL_MODES, WEIGHT_MODES


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """How the target model loads: every command that loads one takes these (one list, so a parser can
    never lack an option its load call reads)."""
    p.add_argument("--model", default=catalog.DEFAULT_MODEL,
                   help=f"known name, local HF directory or .gguf file (default {catalog.DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default float32; in 16 bits on CUDA the batch-invariant kernels "
                        "keep greedy output identical to plain decoding, see --kernels)")
    p.add_argument("--kernels", default="auto", choices=list(KERNEL_MODES),
                   help="invariant: Triton kernels computing every row alike whatever the rows in a pass, so a "
                        "16-bit tree pass rounds as plain decoding does (lossless in bf16/fp16; CUDA, or CPU under "
                        "TRITON_INTERPRET=1 for tests); torch: cuBLAS/SDPA (GPU) or draftwise's C kernels (CPU "
                        "fp32); auto (default): invariant on CUDA in 16 bits when Triton is installed, else torch")
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "static", "off"],
                   help="CUDA graphs for decoding/verification forwards (default auto: on for CUDA devices, "
                        "off on CPU; 'static' runs the padded static-shape forward without capture)")
    p.add_argument("--weights", default="auto", choices=list(WEIGHT_MODES),
                   help="gguf: the model's GGUF blocks with activations quantized to 8 bits per block, integer dot "
                        "products (the model as llama.cpp computes it); gguf-f32: the same blocks with fp32 "
                        "activations (exactly the fp32 weights, logits within ~1e-6); fp32: the dequantized "
                        "weights; auto (default): gguf on CPU when the .gguf is there, else fp32")
    p.add_argument("--compile", default="off", choices=["off", "glue", "layer"],
                   help="torch.compile the non-matmul steps ('glue') or whole layers with the kernel as a custom op "
                        "('layer'); off by default: both measured slower than eager on a 2-core CPU")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """The target's options plus the draft model's weights (commands that may take --draft) and the guard."""
    _add_target_args(p)
    p.add_argument("--guard", default="on", choices=["on", "off"],
                   help="the realized-throughput guard: plain steps while a request's drafting steps are measured "
                        "slower than plain ones (default on; off: the method drafts every step)")
    p.add_argument("--draft-weights", default="auto", choices=list(WEIGHT_MODES),
                   help="the draft model's weights (with --draft), chosen apart from the target's: they change only "
                        "its speed, never the output (auto: gguf on CPU fp32 when the draft's .gguf is there)")


def _method_help() -> str:
    from draftwise import methods

    return " | ".join(methods.names())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="draftwise", description="Lossless speculative decoding.")
    sub = p.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    _add_model_args(g)
    g.add_argument("prompt")
    g.add_argument("--method", default="auto", help=f"{_method_help()} (default auto: every source the engine has, "
                   "mixed per step; `draftwise methods` lists options)")
    g.add_argument("--method-opts", default=None, metavar="JSON",
                   help='the method\'s options as a JSON object, e.g. \'{"max_nodes": 8}\'')
    g.add_argument("--draft", default=None,
                   help="draft model for methods that need one (another tokenizer drafts over the shared vocabulary)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--max-nodes", type=int, default=None,
                   help="fixed draft size (default: sized from the measured cost curve)")
    g.add_argument("--compare-ar", action="store_true", help="also run plain decoding and report the speedup")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="Spec-Bench-style comparison of methods and baselines")
    _add_model_args(b)
    b.add_argument("--draft", default=None, help="draft model for draft-model methods and hf-assisted (another "
                   "tokenizer drafts over the shared vocabulary)")
    b.add_argument("--methods", default="ar,auto,recycling,lookup,retrieval",
                   help=f"comma list: {', '.join(_method_help().split(' | '))}; baselines hf, hf-lookup, hf-assisted "
                        "(needs --draft), llamacpp, llamacpp-lookup (need llama-cpp-python)")
    b.add_argument("--method-opts", default=None, metavar="JSON",
                   help='options per method, e.g. \'{"recycling": {"max_nodes": 8}, "draft-model": {"tree": "chain"}}\'')
    b.add_argument("--dataset", default="humaneval", help="humaneval | mtbench | sharegpt | FILE.jsonl")
    b.add_argument("--limit", type=int, default=None, help="at most N questions, round-robin over categories")
    b.add_argument("--max-turns", type=int, default=None, help="keep only the first N turns of each question")
    b.add_argument("--early-exit-layer", type=int, default=None, help="N for the hf-early-exit baseline (default: a quarter of the layers)")
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--temperature", type=float, default=0.0)
    b.add_argument("--out", default="bench_out")
    b.set_defaults(func=cmd_bench)

    def serving_args(p):
        _add_model_args(p)
        p.add_argument("--method", default="auto", help=f"default method (default auto): {_method_help()}")
        p.add_argument("--method-opts", default=None, metavar="JSON", help="options of the default method")
        p.add_argument("--draft", default=None,
                       help="draft model for draft-model methods (another tokenizer drafts over the shared vocabulary)")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat/completions, streaming)")
    serving_args(sv)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-queue", type=int, default=64, help="requests allowed to wait; more get 503")
    sv.add_argument("--timeout", type=float, default=600.0,
                    help="per-request deadline in seconds, from arrival: queueing and prefill count (default 600)")
    sv.add_argument("--max-body", type=int, default=8 * 2**20, help="largest request body in bytes (default 8 MiB)")
    sv.add_argument("--api-key", default=None,
                    help="require Authorization: Bearer KEY on every endpoint but /health (default: the "
                         "DRAFTWISE_API_KEY environment variable; none: no authentication)")
    sv.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                    help="also answer requests whose Host header is NAME (besides the bound address and "
                         "localhost; '*': any; repeatable)")
    sv.add_argument("--allow-path", action="append", default=None, metavar="DIR",
                    help="requests may name files under DIR in method options (datastore, head, exit, ldlp); "
                         "by default only the files of --method-opts (repeatable)")
    sv.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="interactive terminal chat (streaming, /reset, /method, /stats)")
    serving_args(ch)
    ch.add_argument("--max-new-tokens", type=int, default=512)
    ch.add_argument("--temperature", type=float, default=0.0)
    ch.add_argument("--seed", type=int, default=None)
    ch.set_defaults(func=cmd_chat)

    ds = sub.add_parser("datastore", help="build and inspect retrieval datastores (methods retrieval, rasd)")
    dsub = ds.add_subparsers(dest="dcmd", required=True)
    db = dsub.add_parser("build", help="tokenize text and build a suffix-array datastore")
    db.add_argument("--model", default=catalog.DEFAULT_MODEL, help="whose tokenizer to use")
    db.add_argument("--input", action="append", required=True,
                    help="a file, a directory, stdlib: (Python standard library) or sharegpt: (repeatable)")
    db.add_argument("--out", required=True, help="datastore file to write")
    db.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    db.add_argument("--quiet", action="store_true")
    db.set_defaults(func=cmd_datastore_build)
    di = dsub.add_parser("info", help="print a datastore's header")
    di.add_argument("path")
    di.add_argument("--no-verify", action="store_true", help="skip the checksum")
    di.set_defaults(func=cmd_datastore_info)

    tr = sub.add_parser("train", help="train drafters (early-exit layers, EAGLE heads, LDLP)")
    tsub = tr.add_subparsers(dest="tcmd", required=True)
    def teacher_args(p, what: str, lr: float, init: str, init_help: str):
        """Options shared by the commands that train on teacher features (early exit, EAGLE)."""
        _add_target_args(p)
        p.add_argument("--out", required=True, help=f"{what} file to write (.safetensors)")
        p.add_argument("--data", action="append", default=None,
                       help="training text: a file, a directory, stdlib: or sharegpt: (repeatable; "
                            "default: stdlib: and sharegpt:)")
        p.add_argument("--max-tokens", type=int, default=400_000, help="teacher-forced training tokens (default 400k)")
        p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (default: --epochs)")
        p.add_argument("--epochs", type=float, default=1.5)
        p.add_argument("--batch", type=int, default=4, help="chunks of 512 tokens per step")
        p.add_argument("--lr", type=float, default=lr)
        p.add_argument("--init", default=init, help=init_help)
        p.add_argument("--features", default=None, help="teacher-feature directory (default: OUT.features)")
        p.add_argument("--vocab-subset", type=int, default=32768)
        p.add_argument("--val-every", type=int, default=0, help="validate every N steps (default: at the end)")
        p.add_argument("--quiet", action="store_true")

    te = tsub.add_parser("early-exit", help="self-distil an exit layer after the target's first N layers (EESD)")
    teacher_args(te, "exit layer", 6e-4, "next", "initialise from target layer N (next, default), the last "
                 "layer (last) or a layer index")
    te.add_argument("--layer", type=int, required=True, help="N: the target layers the draft runs")
    te.add_argument("--extra-layer", type=int, action="append", help="also store this layer's output (sweeps)")
    te.set_defaults(func=cmd_train_early_exit)

    tg = tsub.add_parser("eagle", help="train an EAGLE draft head on the target's features")
    teacher_args(tg, "head", 5e-4, "last", "last (the target's last layer behind a pass-through fc, default) or random")
    tg.add_argument("--arch", default="eagle1", choices=("eagle1", "eagle3"),
                    help="eagle1: reads the last layer (default); eagle3: fused low/middle/high layers, training-time "
                         "test, the official EAGLE-3 layout")
    tg.add_argument("--ttt", type=int, default=None, help="eagle3: draft depths of training-time test (default 3)")
    tg.set_defaults(func=cmd_train_eagle)

    hd = sub.add_parser("head", help="draft heads: export a head trained here")
    hsub = hd.add_subparsers(dest="hcmd", required=True)
    hx = hsub.add_parser("export", help="write an EAGLE-3 head trained here as an official EAGLE-3 directory "
                                        "(config.json + model.safetensors: vLLM, SGLang and llama.cpp load it)")
    _add_target_args(hx)
    hx.add_argument("--head", required=True, help="the head (draftwise train eagle --arch eagle3)")
    hx.add_argument("--out", required=True, help="directory to write (must not exist or be empty)")
    hx.set_defaults(func=cmd_head_export)

    tl = tsub.add_parser("ldlp", help="train AdaEAGLE's draft-length predictor for a trained head")
    _add_target_args(tl)
    tl.add_argument("--head", required=True, help="the EAGLE head the labels come from")
    tl.add_argument("--out", required=True, help="LDLP file to write (.safetensors)")
    tl.add_argument("--prompts", type=int, default=64, help="training prompts decoded for labels (default 64)")
    tl.add_argument("--k-max", type=int, default=6, help="tokens the head drafts per labelled step (default 6)")
    tl.add_argument("--max-new-tokens", type=int, default=96)
    tl.add_argument("--max-steps", type=int, default=1500, help="optimizer steps per lambda (default 1500)")
    tl.add_argument("--vocab-subset", type=int, default=32768)
    tl.add_argument("--quiet", action="store_true")
    tl.set_defaults(func=cmd_train_ldlp)

    me = sub.add_parser("methods", help="list the decoding methods and their options")
    me.set_defaults(func=cmd_methods)

    m = sub.add_parser("models", help="list, install and measure models")
    msub = m.add_subparsers(dest="mcmd", required=True)
    ml = msub.add_parser("list")
    ml.set_defaults(func=cmd_models_list)
    mi = msub.add_parser("install")
    mi.add_argument("name")
    mi.set_defaults(func=cmd_models_install)
    mb = msub.add_parser("bench-forward", help="measure the cost curve t(n) of one forward")
    mb.add_argument("name", nargs="?", default=catalog.DEFAULT_MODEL)
    mb.add_argument("--device", default="cpu")
    mb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    mb.add_argument("--threads", type=int, default=None)
    mb.add_argument("--kernels", default="auto", choices=list(KERNEL_MODES),
                    help="as for generate: invariant, torch or auto (invariant on CUDA in 16 bits)")
    mb.add_argument("--refresh", action="store_true", help="measure again instead of using the cache")
    mb.set_defaults(func=cmd_bench_forward)
    return p


def check_args(a) -> None:
    """Everything about the arguments that can be checked without loading a model (a ConfigError): a user
    waits seconds for a model to load only to learn that --max-new-tokens 0 is wrong."""
    from draftwise.api import check_device
    from draftwise.errors import ConfigError, PromptError
    from draftwise.sampling import Sampling

    def at_least(name: str, lo: int) -> None:
        v = getattr(a, name, None)
        if v is not None and v < lo:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= {lo}, got {v}")

    for name, lo in (("max_new_tokens", 1), ("threads", 1), ("max_tokens", 1), ("limit", 1), ("max_turns", 1),
                     ("max_queue", 1), ("max_steps", 1), ("batch", 1), ("prompts", 1), ("k_max", 1),
                     ("vocab_subset", 0), ("max_body", 1024)):
        at_least(name, lo)
    if getattr(a, "device", None) is not None:
        check_device(a.device)
    if hasattr(a, "temperature"):
        Sampling(temperature=a.temperature, top_k=getattr(a, "top_k", 0), top_p=getattr(a, "top_p", 1.0),
                 seed=getattr(a, "seed", None))
    if isinstance(getattr(a, "prompt", None), str) and not a.prompt.strip():
        raise PromptError("empty prompt")
    if getattr(a, "timeout", None) is not None and not 0 < a.timeout <= 86400:
        raise ConfigError(f"--timeout must be in (0, 86400] seconds, got {a.timeout}")
    if getattr(a, "port", None) is not None:
        check_port(a.host, a.port)


def check_port(host: str, port: int) -> None:
    """The port is valid and free on host (tried before the model loads, not after)."""
    import socket

    from draftwise.errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in [1, 65535], got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host!r} does not resolve: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return args.func(args)
    except DraftwiseError as e:
        print(f"draftwise: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as e:              # a file that cannot be read or written: one line, no traceback
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"draftwise: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
