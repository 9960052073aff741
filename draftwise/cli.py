"""Command line: draftwise generate | bench | serve | chat | methods | models (list, install, bench-forward)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from draftwise.errors import DraftwiseError
from draftwise.models import registry
from draftwise.models.transformer import WEIGHT_MODES


def _add_target_args(p: argparse.ArgumentParser) -> None:
    """How the target model loads: every command that loads one takes these (one list, so a parser can
    never lack an option its load call reads)."""
    p.add_argument("--model", default=registry.DEFAULT_MODEL,
                   help=f"known name, local HF directory or .gguf file (default {registry.DEFAULT_MODEL})")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="weights and activations (default float32: greedy output stays identical to plain "
                        "decoding; in 16-bit, tree and one-token passes round differently and can disagree)")
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


def _load(a):
    """The engine of a command: the target (``_add_target_args``) and, where the parser has them, --draft
    and --draft-weights."""
    import draftwise

    eng = draftwise.load(a.model, device=a.device, dtype=a.dtype, threads=a.threads, graphs=a.graphs,
                         compile=a.compile, weights=a.weights, draft=getattr(a, "draft", None),
                         draft_weights=getattr(a, "draft_weights", "auto"))
    eng.guard = getattr(a, "guard", "on") == "on"
    return eng


def _method_help() -> str:
    from draftwise import methods

    return " | ".join(methods.names())


def cmd_methods(a) -> int:
    from draftwise import methods

    print(methods.describe_all())
    return 0


def cmd_generate(a) -> int:
    from draftwise import methods

    opts = methods.parse_opts(a.method_opts)
    if a.max_nodes is not None:
        opts["max_nodes"] = a.max_nodes
    methods.get(a.method).validate(opts)          # a bad method or option fails before any model loads
    eng = _load(a)
    kw = dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
              seed=a.seed, chat=a.chat, stop=a.stop or None)
    from draftwise.decoding import Stats

    stats = Stats()
    # one-time setup before anything is timed: the method's drafter (the cost curve, measured once per
    # machine and cached; vocabulary subsets), then, to compare, one short untimed pass
    eng.drafter(a.method, opts or None)
    if a.compare_ar:
        eng.generate(a.prompt, method="ar", **{**kw, "max_new_tokens": 2})
    for piece in eng.stream(a.prompt, method=a.method, stats=stats, method_opts=opts, **kw):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    line = (f"[draftwise] {a.method}: {stats.new_tokens} tokens in {stats.wall_s:.2f} s, "
            f"{stats.tokens_per_s:.2f} tok/s, tau {stats.tau:.2f}, {stats.steps} target passes"
            + (f" ({stats.guard_plain_steps} plain: the guard)" if stats.guard_plain_steps else "")
            + ("; accepted from " + ", ".join(f"{k} {v}" for k, v in stats.sources.items()) if stats.sources else ""))
    if a.compare_ar and a.method != "ar":
        ar = eng.generate(a.prompt, method="ar", **kw)
        same = "identical" if ar.token_ids == eng.last_token_ids else "DIFFERENT"
        line += (f"; ar {ar.stats.tokens_per_s:.2f} tok/s, speedup {stats.tokens_per_s / ar.stats.tokens_per_s:.2f}x, "
                 f"text {same}")
    print(line, file=sys.stderr)
    return 0


def _load_for_serving(a):
    from draftwise import methods

    opts = methods.parse_opts(a.method_opts) or None
    methods.get(a.method).validate(opts)          # a bad method or option fails before any model loads
    eng = _load(a)
    eng.drafter(a.method, opts)                   # build it now (cost curves, subsets): the first request stays fast
    return eng, opts


def cmd_serve(a) -> int:
    import os

    from draftwise.server import serve

    for d in a.allow_path or ():
        if not Path(d).is_dir():
            raise DraftwiseError(f"--allow-path {d} is not a directory")
    key = a.api_key if a.api_key is not None else os.environ.get("DRAFTWISE_API_KEY") or None
    if key is not None and len(key) < 8:
        raise DraftwiseError("--api-key must be at least 8 characters")
    eng, opts = _load_for_serving(a)
    serve(eng, host=a.host, port=a.port, method=a.method, method_opts=opts, max_queue=a.max_queue,
          timeout_s=a.timeout, max_body=a.max_body, api_key=key, allowed_hosts=tuple(a.allowed_host or ()),
          allow_paths=tuple(a.allow_path or ()))
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /method NAME, /stats, /quit (or Ctrl-D)"


def cmd_chat(a) -> int:
    """Interactive chat: history, streaming output; Ctrl-C stops the current answer."""
    from draftwise import methods
    from draftwise.decoding import Stats

    eng, opts = _load_for_serving(a)
    method, history, last = a.method, [], None
    print(f"[draftwise] {eng.model_id}, method {method}. {CHAT_HELP}", file=sys.stderr)
    while True:
        try:
            line = input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return 0
        except UnicodeDecodeError:
            raise DraftwiseError("the input is not UTF-8 text") from None
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history = []
                print("[draftwise] conversation cleared", file=sys.stderr)
            elif cmd == "/method":
                try:
                    methods.get(arg.strip()).validate(None)
                    eng.drafter(arg.strip())
                    method, opts = arg.strip(), None
                    print(f"[draftwise] method {method}", file=sys.stderr)
                except DraftwiseError as e:
                    print(f"draftwise: error: {e}", file=sys.stderr)
            elif cmd == "/stats":
                print("[draftwise] no answer yet" if last is None else
                      f"[draftwise] {last[0]}: {last[1].new_tokens} tokens, {last[1].tokens_per_s:.2f} tok/s, "
                      f"tau {last[1].tau:.2f}", file=sys.stderr)
            else:
                print(f"[draftwise] unknown command {cmd}; {CHAT_HELP}", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        stats, parts = Stats(), []
        try:
            ids = eng.encode_messages(history)
            for piece in eng.stream(ids, method=method, method_opts=opts, max_new_tokens=a.max_new_tokens,
                                    temperature=a.temperature, seed=a.seed, stats=stats):
                parts.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            print("\n[draftwise] stopped", file=sys.stderr)
        except DraftwiseError as e:
            history.pop()
            print(f"draftwise: error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(parts)})
        last = (method, stats)


def cmd_models_list(a) -> int:
    for m in registry.list_models():
        flag = "installed" if m["installed"] else "not installed"
        print(f"{m['name']:32s} {flag:14s} {'(default) ' if m['default'] else ''}{m['hf_name']}, "
              f"{m['license']}, from {m['source']}")
    return 0


def cmd_models_install(a) -> int:
    path = registry.install(a.name)
    print(path)
    return 0


def cmd_datastore_build(a) -> int:
    from transformers import AutoTokenizer

    from draftwise import datastore
    from draftwise.models.checkpoint import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve(a.model)))
    t0 = time.perf_counter()
    h = datastore.build(tok, a.input, a.out, model=a.model, max_tokens=a.max_tokens, progress=not a.quiet)
    print(f"{a.out}: {h['tokens']:,} tokens, {h['documents']:,} documents, built in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_datastore_info(a) -> int:
    from draftwise.datastore import Datastore

    ds = Datastore.load(a.path, verify=not a.no_verify)
    h = ds.header
    for k in ("version", "model", "tokenizer", "vocab_size", "tokens", "documents", "sa_dtype", "checksum"):
        print(f"{k:12s} {h.get(k)}")
    src = h.get("sources", [])
    print(f"{'sources':12s} {len(src)}" + (f" (first: {src[0]})" if src else ""))
    return 0


def cmd_train_early_exit(a) -> int:
    from draftwise.drafters.early_exit import train_exit

    eng = _load(a)
    info = train_exit(eng, a.layer, Path(a.out), data=a.data, max_tokens=a.max_tokens, max_steps=a.max_steps,
                      epochs=a.epochs, batch=a.batch, lr=a.lr, init=a.init,
                      features=Path(a.features) if a.features else None, vocab_subset=a.vocab_subset,
                      progress=not a.quiet, extra_layers=tuple(a.extra_layer or ()), val_every=a.val_every)
    print(f"{a.out}: exit layer after layer {info['layer']} (init from layer {info['init']}), "
          f"{info['train_tokens']:,} training tokens, {info['steps']} steps in {info['train_s']:.0f} s; "
          f"validation agreement with the target {info['val_agree_init']:.3f} -> {info['val_agree']:.3f}")
    return 0


def cmd_train_eagle(a) -> int:
    from draftwise.drafters.eagle import train_head

    eng = _load(a)
    info = train_head(eng, Path(a.out), data=a.data, max_tokens=a.max_tokens, max_steps=a.max_steps, epochs=a.epochs,
                      batch=a.batch, lr=a.lr, init=a.init, features=Path(a.features) if a.features else None,
                      vocab_subset=a.vocab_subset, progress=not a.quiet, val_every=a.val_every)
    print(f"{a.out}: EAGLE head (init {info['init']}), {info['train_tokens']:,} training tokens, {info['steps']} steps "
          f"in {info['train_s']:.0f} s; validation top-1 accuracy {info['val_agree_init']:.3f} -> {info['val_agree']:.3f}")
    return 0


def cmd_train_ldlp(a) -> int:
    from draftwise.drafters.eagle import train_ldlp

    eng = _load(a)
    info = train_ldlp(eng, a.head, Path(a.out), prompts=a.prompts, k_max=a.k_max, max_new_tokens=a.max_new_tokens,
                      max_steps=a.max_steps, vocab_subset=a.vocab_subset, progress=not a.quiet)
    best = next(r for r in info["sweep"] if r["lambda"] == info["lambda"])
    print(f"{a.out}: LDLP from {info['labels']} labels ({info['prompts']} prompts, {info['label_s']:.0f} s), "
          f"lambda {info['lambda']} (validation MAE {best['val_mae']:.2f}); expected tokens/ms on validation: "
          f"LDLP {best['val_tok_per_ms']:.4f}, best fixed k {max(info['val_tok_per_ms_fixed'].values()):.4f}, "
          f"oracle {info['val_tok_per_ms_oracle']:.4f}")
    return 0


def cmd_bench_forward(a) -> int:
    import draftwise
    from draftwise import kernels
    from draftwise.policies.budget import load_or_measure

    eng = draftwise.load(a.name, device=a.device, dtype=a.dtype, threads=a.threads)
    t0 = time.time()
    curve = load_or_measure(eng.model, eng.model_id, refresh=a.refresh, progress=True)
    for n, ms in zip(curve.ns, curve.ms):
        print(f"n={n:<3d} {ms:7.1f} ms")
    print(f"[draftwise] {'measured' if time.time() - t0 > 0.5 else 'cached'} "
          f"(kernels: {kernels.describe() if eng.model.fast else 'torch'}, weights: {eng.model.weights})", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    from pathlib import Path

    from draftwise.bench import datasets
    from draftwise.bench.runner import Runner

    from draftwise import methods as registry

    opts = registry.parse_opts(a.method_opts)
    if any(not isinstance(v, dict) for v in opts.values()):
        raise DraftwiseError('bench --method-opts maps method names to options: \'{"recycling": {"max_nodes": 8}}\'')
    eng = _load(a)
    if a.max_turns is not None and a.max_turns < 1:
        raise DraftwiseError(f"--max-turns must be >= 1, got {a.max_turns}")
    qs = datasets.balanced(datasets.load(a.dataset), a.limit)
    if a.max_turns:
        qs = [{**q, "turns": q["turns"][: a.max_turns]} for q in qs]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    r = Runner(eng, methods, qs, Path(a.out), max_new_tokens=a.max_new_tokens, temperature=a.temperature,
               draft=a.draft, config={"dataset": a.dataset, "limit": a.limit,
                                                                 "max_turns": a.max_turns}, method_opts=opts,
               early_exit_layer=a.early_exit_layer)
    summary = r.run()
    from draftwise.bench.report import table

    print(table(summary))
    print(f"[draftwise] report: {Path(a.out) / 'report.md'}", file=sys.stderr)
    return bench_exit_code(summary)


def bench_exit_code(summary: dict) -> int:
    """1 when any greedy output differs from AR (the lossless check failed), else 0."""
    if summary["mismatches"]:
        print(f"draftwise: error: {len(summary['mismatches'])} outputs differ from AR (lossless check failed)",
              file=sys.stderr)
        return 1
    return 0


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
    g.add_argument("--draft", default=None, help="draft model (same tokenizer) for methods that need one")
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
    b.add_argument("--draft", default=None, help="draft model (same tokenizer) for draft-model methods and hf-assisted")
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
        p.add_argument("--draft", default=None, help="draft model (same tokenizer) for draft-model methods")

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
    db.add_argument("--model", default=registry.DEFAULT_MODEL, help="whose tokenizer to use")
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
    tg.set_defaults(func=cmd_train_eagle)

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
    mb.add_argument("name", nargs="?", default=registry.DEFAULT_MODEL)
    mb.add_argument("--device", default="cpu")
    mb.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    mb.add_argument("--threads", type=int, default=None)
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
