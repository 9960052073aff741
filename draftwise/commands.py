"""What each ``draftwise`` subcommand does, given its parsed arguments (``cli.py`` builds the parser,
checks the arguments and dispatches here). Each returns the process exit code."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from draftwise.errors import DraftwiseError
from draftwise.models import catalog


def _load(a):
    """The engine of a command: the target (``_add_target_args``) and, where the parser has them, --draft
    and --draft-weights."""
    import draftwise

    eng = draftwise.load(a.model, device=a.device, dtype=a.dtype, threads=a.threads, graphs=a.graphs,
                         compile=a.compile, weights=a.weights, kernels=a.kernels, draft=getattr(a, "draft", None),
                         draft_weights=getattr(a, "draft_weights", "auto"))
    eng.guard = getattr(a, "guard", "on") == "on"
    if eng.draft_bridge is not None:
        print(f"[draftwise] draft {a.draft} has another tokenizer than {a.model}: it drafts over the "
              f"{eng.draft_bridge.size:,} tokens both vocabularies share (draft-model option cross: tli | string)",
              file=sys.stderr)
    return eng


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
    for m in catalog.list_models():
        flag = "installed" if m["installed"] else "not installed"
        print(f"{m['name']:32s} {flag:14s} {'(default) ' if m['default'] else ''}{m['hf_name']}, "
              f"{m['license']}, from {m['source']}")
    return 0


def cmd_models_install(a) -> int:
    path = catalog.install(a.name)
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
    from draftwise.train.early_exit import train_exit

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
    from draftwise.train.eagle import train_head

    eng = _load(a)
    info = train_head(eng, Path(a.out), data=a.data, max_tokens=a.max_tokens, max_steps=a.max_steps, epochs=a.epochs,
                      batch=a.batch, lr=a.lr, init=a.init, features=Path(a.features) if a.features else None,
                      vocab_subset=a.vocab_subset, progress=not a.quiet, val_every=a.val_every, arch=a.arch,
                      ttt=a.ttt)
    depths = ", ".join(f"depth {j} {info.get(f'val_agree_d{j}_init', 0):.3f} -> {info[f'val_agree_d{j}']:.3f}"
                       for j in (2, 3) if f"val_agree_d{j}" in info)
    print(f"{a.out}: {'EAGLE-3' if a.arch == 'eagle3' else 'EAGLE'} head (init {info['init']}), "
          f"{info['train_tokens']:,} training tokens, {info['steps']} steps in {info['train_s']:.0f} s; validation "
          f"top-1 accuracy {info['val_agree_init']:.3f} -> {info['val_agree']:.3f}" + (f"; {depths}" if depths else ""))
    return 0


def cmd_head_export(a) -> int:
    from draftwise.drafters import eagle3
    from draftwise.drafters.eagle import read_head

    eng = _load(a)
    tensors, meta = read_head(Path(a.head), eng.model)
    out = eagle3.export_head(eng.model, tensors, meta, Path(a.out))
    print(f"{out}: EAGLE-3 head for {eng.model_id} (draft vocabulary {tensors['d2t'].numel():,} tokens, target layers "
          f"{[i + 1 for i in meta.get('aux_layers', eagle3.aux_layers(eng.model.cfg.num_layers))]} as "
          f"eagle_aux_hidden_state_layer_ids)")
    return 0


def cmd_train_ldlp(a) -> int:
    from draftwise.train.ldlp import train_ldlp

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

    eng = draftwise.load(a.name, device=a.device, dtype=a.dtype, threads=a.threads, kernels=a.kernels)
    t0 = time.time()
    curve = load_or_measure(eng.model, eng.model_id, refresh=a.refresh, progress=True)
    for n, ms in zip(curve.ns, curve.ms):
        print(f"n={n:<3d} {ms:7.1f} ms")
    print(f"[draftwise] {'measured' if time.time() - t0 > 0.5 else 'cached'} "
          f"(kernels: {kernels.describe() if eng.model.fast else 'invariant' if eng.model.invariant else 'torch'}, "
          f"weights: {eng.model.weights})", file=sys.stderr)
    return 0


def cmd_bench(a) -> int:
    from pathlib import Path

    from draftwise import corpora
    from draftwise.bench.runner import Runner
    from draftwise.methods import parse_opts

    opts = parse_opts(a.method_opts)
    if any(not isinstance(v, dict) for v in opts.values()):
        raise DraftwiseError('bench --method-opts maps method names to options: \'{"recycling": {"max_nodes": 8}}\'')
    eng = _load(a)
    if a.max_turns is not None and a.max_turns < 1:
        raise DraftwiseError(f"--max-turns must be >= 1, got {a.max_turns}")
    qs = corpora.balanced(corpora.load(a.dataset), a.limit)
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
