"""The command line: output, stats line and clear errors (exit code 2, one line)."""
import pytest

from draftwise.cli import main

SMOL = ["--model", "smollm2-135m-instruct"]


def test_generate_prints_text_and_stats(capsys):
    assert main(["generate", *SMOL, "--max-new-tokens", "12", "--method", "lookup", "--compare-ar",
                 "List: one, two, three, four,"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip()
    assert "tok/s" in cap.err and "tau" in cap.err and "text identical" in cap.err


@pytest.mark.parametrize("weights", ["gguf", "gguf-f32"])
def test_generate_in_each_gguf_mode(capsys, weights):
    """--weights gguf (8-bit activations, the CPU default) and gguf-f32 (fp32 activations) run end to end,
    a tree method equal to plain decoding in each."""
    assert main(["generate", *SMOL, "--weights", weights, "--max-new-tokens", "10", "--method", "recycling",
                 "--compare-ar", "def add(a, b):"]) == 0
    err = capsys.readouterr().err
    assert "text identical" in err


@pytest.mark.parametrize("args,msg", [
    (["--method", "bogus", "hi"], "unknown method"),
    (["--temperature", "-1", "hi"], "temperature"),
    (["--top-p", "0", "hi"], "top_p"),
    (["   "], "empty prompt"),
    (["--model", "/nonexistent/model", "hi"], "not found"),
])
def test_generate_errors(capsys, args, msg):
    a = args if "--model" in args else [*SMOL, *args]
    assert main(["generate", *a]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.startswith("draftwise: error:") and len(err.strip().splitlines()) == 1


def test_prompt_longer_than_context(capsys):
    assert main(["generate", *SMOL, "word " * 9000]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    assert "qwen2.5-coder-0.5b-instruct" in capsys.readouterr().out


def test_models_install_unknown(capsys):
    assert main(["models", "install", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_dtype_choices_and_cuda_without_gpu():
    import torch

    import draftwise
    from draftwise.errors import ConfigError

    with pytest.raises(ConfigError, match="unsupported dtype"):
        draftwise.load("smollm2-135m-instruct", dtype="int8", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            draftwise.load("smollm2-135m-instruct", device="cuda", progress=False)
    with pytest.raises(SystemExit):      # argparse rejects it before anything loads
        main(["generate", *SMOL, "--dtype", "int8", "hi"])
