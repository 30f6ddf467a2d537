"""The recipes' command lines and YAML configs: data only, and bad values named by their flag.

No model is built here: every case stops at argument parsing or at the settings' own checks.
"""
import importlib.util
import os
import sys
import types

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = {"finetune": [], "predict": ["--checkpoint", "c", "--input_file", "i"], "chat": ["--checkpoint", "c"]}


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe_args", os.path.join(REPO, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def evil(monkeypatch):
    """An importable class that records being built: what a `class_path:` in a config would make."""
    built = []

    class Evil:
        def __init__(self, *args, **kwargs):
            built.append((args, kwargs))
    mod = types.ModuleType("tc2_test_evil")
    mod.Evil = Evil
    monkeypatch.setitem(sys.modules, "tc2_test_evil", mod)
    return {"class_path": "tc2_test_evil.Evil", "init_args": {}}, built


def _keys(namespace, prefix=""):
    """Every settable key of a parser's defaults: groups and leaves, dotted."""
    out = []
    for k, v in vars(namespace).items():
        if k == "config" or k.endswith("__path__"):
            continue
        out.append(prefix + k)
        if type(v).__name__ == "Namespace":
            out += _keys(v, prefix + k + ".")
    return out


def _nested(key, value):
    cfg = value
    for part in reversed(key.split(".")):
        cfg = {part: cfg}
    return cfg


def _exit_code(mod, argv):
    try:
        return mod.main(argv)
    except SystemExit as e:                                  # argument errors exit from the parser
        return e.code


@pytest.mark.parametrize("name", ["finetune", "predict", "chat"])
def test_configs_cannot_build_python_objects(name, evil, tmp_path, capsys):
    """A `class_path:` anywhere in a YAML config (a group, a field, a dict or list value) is an
    argument error naming the key; nothing is imported or built, no traceback."""
    value, built = evil
    mod = _recipe(name)
    keys = _keys(mod.build_parser().get_defaults())
    assert len(keys) > 20 and "parallel" in keys
    path = tmp_path / "c.yaml"
    for key in keys:
        for v in (value, {"x": value}, [value]):
            path.write_text(yaml.safe_dump(_nested(key, v)))
            assert _exit_code(mod, ["--config", str(path)] + REQUIRED[name]) == 2, (key, v)
            err = capsys.readouterr().err
            assert built == [] and "Traceback" not in err and "error:" in err, (key, v, err[-300:])
            assert key.split(".")[-1] in err or "class_path" in err, (key, v, err[-300:])
    if name == "finetune":                                  # plain values still parse
        parser = mod.build_parser()
        path.write_text(yaml.safe_dump({"model": {"overrides": {"n_layer": 3, "rope_theta": 5e5}}}))
        args = parser.parse_args(["--config", str(path)])
        assert parser.instantiate(args).model.overrides == {"n_layer": 3, "rope_theta": 5e5}


FINETUNE_FLAGS = [
    (["--train.micro_batch", "0"], "--train.micro_batch must be an int >= 1, got 0"),
    (["--train.global_batch", "0"], "--train.global_batch must be an int >= 1, got 0"),
    (["--train.steps", "-3"], "--train.steps must be an int >= 1 or null, got -3"),
    (["--train.epochs", "0"], "--train.epochs must be an int >= 1 or null, got 0"),
    (["--train.save_every", "-1"], "--train.save_every must be an int >= 0, got -1"),
    (["--train.steps", "5", "--train.epochs", "2"], "give --train.steps or --train.epochs, not both"),
    (["--data.eval_fraction", "1.0"], "--data.eval_fraction must be in [0, 1)"),
    (["--data.eval_fraction", "0.1", "--data.eval", "e.jsonl"], "give --data.eval or --data.eval_fraction"),
    (["--data.seq_length", "0"], "--data.seq_length must be an int >= 1, got 0"),
    (["--optim.lr", "-1"], "--optim.lr must be >= 0, got -1.0"),
    (["--optim.b2", "1.0"], "--optim.b2 must be in [0, 1), got 1.0"),
    (["--optim.warmup_steps", "-2"], "--optim.warmup_steps must be an int >= 0, got -2"),
    (["--model.dtype", "float64"], "--model.dtype must be one of"),
    (["--parallel.dp", "0"], "parallel.dp must be an int >= 1, got 0"),
]


@pytest.mark.parametrize("flags,message", FINETUNE_FLAGS)
def test_finetune_bad_values_name_the_flag(flags, message, capsys, tmp_path):
    fin = _recipe("finetune")
    config = os.path.join(REPO, "recipes", "configs", "finetune_tiny.yaml")
    assert fin.main(["--config", config, "--train.out_dir", str(tmp_path / "run")] + flags) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "run").exists()                  # stopped before touching the out_dir


@pytest.mark.parametrize("name,flags,message", [
    ("predict", ["--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ("predict", ["--max_new_tokens", "0"], "--max_new_tokens must be an int >= 1, got 0"),
    ("chat", ["--max_len", "1"], "--max_len must be an int >= 2, got 1"),
    ("chat", ["--style", "chatml"], "--style must be one of"),
])
def test_generation_bad_values_name_the_flag(name, flags, message, capsys):
    assert _recipe(name).main(REQUIRED[name] + flags) == 2        # before any checkpoint is read
    err = capsys.readouterr().err
    assert message in err, err


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    """An output under a regular file (unwritable even for root): a one-line error naming the path."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    fin = _recipe("finetune")
    config = os.path.join(REPO, "recipes", "configs", "finetune_tiny.yaml")
    assert fin.main(["--config", config, "--train.out_dir", str(blocker / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and "Traceback" not in err, err
    assert _recipe("predict").main(REQUIRED["predict"] + ["--output_file", str(blocker / "out.jsonl")]) == 2
    assert f"--output_file {blocker / 'out.jsonl'}: cannot write in {blocker}" in capsys.readouterr().err
