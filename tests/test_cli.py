"""The command line: exit codes, the JSON contract, --select/--ignore, --output, explain, --version, and
every error path (exit 2, one line on stderr, a traceback only with --debug)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import initdoctor
from initdoctor.cli import main
from initdoctor.codes import CODES

HEALTHY = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
"""

INFO_ONLY = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        nn.init.kaiming_normal_(m[0].weight, nonlinearity="relu")
        nn.init.zeros_(m[2].weight)
        nn.init.zeros_(m[2].bias)
        return m
"""

WARNING_ONLY = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        with torch.no_grad():
            m[0].weight[1] = m[0].weight[0]
            m[0].bias[1] = m[0].bias[0]
        return m
"""

ERROR = """
    import torch
    from torch import nn

    def build_model():
        m = nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))
        for lin in (m[0], m[2]):
            nn.init.constant_(lin.weight, 0.3)
            nn.init.zeros_(lin.bias)
        return m

    def example_input():
        torch.manual_seed(1)
        return torch.randn(64, 2)
"""

MIXED = """
    import torch
    from torch import nn

    def build_model():
        torch.manual_seed(0)
        layers = []
        for _ in range(8):
            lin = nn.Linear(32, 32)
            nn.init.normal_(lin.weight, 0.0, 0.01)
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.Sigmoid()]
        return nn.Sequential(*layers, nn.Linear(32, 4))
"""


def run(argv: list[str]) -> int:
    """main() in-process; argparse errors raise SystemExit, which counts as the return code."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture
def files(tmp_path, tiny):
    return {name: tiny.write(tmp_path, f"{name}.py", src) for name, src in
            [("healthy", HEALTHY), ("info", INFO_ONLY), ("warning", WARNING_ONLY), ("error", ERROR),
             ("mixed", MIXED)]}


def _json(text: str) -> dict:
    def no_constants(name):
        raise ValueError(f"JSON holds {name}")

    return json.loads(text, parse_constant=no_constants)


# --- exit codes ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model, fail_on, code", [
    ("healthy", None, 0), ("healthy", "info", 0),
    ("info", None, 0), ("info", "error", 0), ("info", "warning", 0), ("info", "info", 1), ("info", "never", 0),
    ("warning", None, 0), ("warning", "warning", 1), ("warning", "info", 1), ("warning", "never", 0),
    ("error", None, 1), ("error", "error", 1), ("error", "warning", 1), ("error", "never", 0),
])
def test_exit_codes(files, capsys, model, fail_on, code):
    argv = ["check", files[model], "--format", "json"] + (["--fail-on", fail_on] if fail_on else [])
    assert run(argv) == code
    out = capsys.readouterr()
    assert out.err == ""
    sevs = {f["severity"] for f in _json(out.out)["findings"]}
    worst = {"healthy": set(), "info": {"info"}, "warning": {"warning"}, "error": {"error"}}[model]
    allowed = worst | ({"info"} if model == "error" else set())
    assert worst <= sevs <= allowed


# --- JSON contract ----------------------------------------------------------------------------------


def test_json_contract(files, capsys):
    assert run(["check", files["error"], "--format", "json", "--fail-on", "never"]) == 0
    d = _json(capsys.readouterr().out)
    for key in ("initdoctor", "target", "input", "findings", "layers", "plan"):
        assert key in d
    assert "after" not in d
    assert d["initdoctor"] == initdoctor.__version__
    assert d["target"] == files["error"]
    assert d["input"] == {"shape": [64, 2], "dtype": "float32", "inferred": False}
    for f in d["findings"]:
        assert {"code", "name", "severity", "layers", "message", "evidence"} <= set(f)
        assert f["name"] == CODES[f["code"]].name
        assert f["severity"] in ("error", "warning", "info")
        assert isinstance(f["layers"], list) and isinstance(f["evidence"], dict)
    assert [lay["name"] for lay in d["layers"]] == ["0", "2"]
    first = d["layers"][0]
    assert (first["type"], first["fan_in"], first["fan_out"], first["activation"]) == ("Linear", 2, 3, "sigmoid")
    schemes = {"xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "lecun_normal",
               "orthogonal", "zeros", "ones", "keep"}
    for p in d["plan"]:
        assert {"layer", "scheme", "gain", "mode", "bias", "reason"} <= set(p)
        assert p["scheme"] in schemes
    assert d["plan"][0]["layer"] == "0" and d["plan"][0]["scheme"].startswith("xavier")


def test_json_after_only_with_fix(files, capsys):
    assert run(["check", files["error"], "--format", "json", "--fix", "--fail-on", "never"]) == 0
    d = _json(capsys.readouterr().out)
    assert set(d["after"]) >= {"findings", "layers"}
    assert [lay["name"] for lay in d["after"]["layers"]] == ["0", "2"]
    assert not [f for f in d["after"]["findings"] if f["code"].startswith("ID1") and f["severity"] != "info"]


def test_fix_exit_code_reflects_the_cure(files, capsys):
    assert run(["check", files["error"], "--format", "json"]) == 1
    assert run(["check", files["error"], "--format", "json", "--fix"]) == 0
    capsys.readouterr()


# --- select / ignore / output / formats ------------------------------------------------------------------


def _codes_of(capsys) -> set[str]:
    return {f["code"] for f in _json(capsys.readouterr().out)["findings"]}


def test_select_and_ignore_by_prefix(files, capsys):
    run(["check", files["mixed"], "--format", "json", "--fail-on", "never"])
    everything = _codes_of(capsys)
    assert {"ID201", "ID203", "ID302"} <= everything
    run(["check", files["mixed"], "--format", "json", "--select", "ID2", "--fail-on", "never"])
    assert _codes_of(capsys) == {c for c in everything if c.startswith("ID2")}
    run(["check", files["mixed"], "--format", "json", "--ignore", "ID2", "--fail-on", "never"])
    assert _codes_of(capsys) == {c for c in everything if not c.startswith("ID2")}
    run(["check", files["mixed"], "--format", "json", "--select", "ID203,id302", "--fail-on", "never"])
    assert _codes_of(capsys) == {"ID203", "ID302"}
    # what is not selected does not count toward the exit code
    assert run(["check", files["mixed"], "--format", "json", "--select", "ID5"]) == 0
    assert run(["check", files["mixed"], "--format", "json", "--select", "ID2"]) == 1
    capsys.readouterr()


def test_output_writes_a_file(files, tmp_path, capsys):
    target = tmp_path / "report.json"
    assert run(["check", files["error"], "--format", "json", "--output", str(target), "--fail-on", "never"]) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert _json(target.read_text())["target"] == files["error"]


@pytest.mark.parametrize("fmt, marker", [("text", "ID103"), ("markdown", "|")])
def test_other_formats(files, capsys, fmt, marker):
    assert run(["check", files["error"], "--format", fmt]) == 1
    out = capsys.readouterr().out
    assert marker in out and "ID103" in out


# --- explain / version ---------------------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(CODES))
def test_explain_every_code(capsys, code):
    assert run(["explain", code]) == 0
    assert code in capsys.readouterr().out


def test_explain_by_name_and_lower_case(capsys):
    assert run(["explain", "vanishing-gradients"]) == 0
    assert "ID203" in capsys.readouterr().out
    assert run(["explain", "id301"]) == 0
    assert "ID301" in capsys.readouterr().out


def test_explain_unknown_code(capsys):
    assert run(["explain", "ID999"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ID999" in err and "Traceback" not in err


def test_version(capsys):
    assert run(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"initdoctor {initdoctor.__version__}"


def test_no_command_exits_2(capsys):
    assert run([]) == 2
    capsys.readouterr()


# --- error paths ----------------------------------------------------------------------------------------

ERROR_FILES = {
    "syntax.py": "def f(:\n",
    "importerror.py": "import initdoctor_no_such_module_xyz\n",
    "nomodel.py": "x = 1\n",
    "several.py": "from torch import nn\na = nn.Linear(2, 2)\nb = nn.Linear(2, 2)\n",
    "severalclasses.py": """
        from torch import nn
        class First(nn.Module):
            def forward(self, x): return x
        class Second(nn.Module):
            def forward(self, x): return x
    """,
    "needsargs.py": """
        from torch import nn
        class Net(nn.Module):
            def __init__(self, width):
                super().__init__()
                self.fc = nn.Linear(width, width)
            def forward(self, x): return self.fc(x)
    """,
    "notamodule.py": "def build_model():\n    return 42\n",
    "factoryraises.py": "def build_model():\n    raise RuntimeError('cannot build')\n",
    "forwardraises.py": """
        from torch import nn
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 4)
            def forward(self, x):
                raise RuntimeError("forward exploded")
    """,
    "exits.py": "import sys\nsys.exit(3)\n",
}


def _error_cases(tmp_path, tiny, healthy):
    for name, src in ERROR_FILES.items():
        tiny.write(tmp_path, name, src)
    (tmp_path / "notpython.txt").write_text("hello\n")
    (tmp_path / "folder").mkdir()
    d = str(tmp_path)
    return {
        "missing file": ([f"{d}/missing.py"], "no such file"),
        "directory": ([f"{d}/folder"], "directory"),
        "not .py": ([f"{d}/notpython.txt"], ".py"),
        "syntax error": ([f"{d}/syntax.py"], "syntax error"),
        "import error": ([f"{d}/importerror.py"], "initdoctor_no_such_module_xyz"),
        "sys.exit on import": ([f"{d}/exits.py"], "exit"),
        "no model": ([f"{d}/nomodel.py"], "no model"),
        "several instances": ([f"{d}/several.py"], "a, b"),
        "several classes": ([f"{d}/severalclasses.py"], "First, Second"),
        "constructor needs args": ([f"{d}/needsargs.py"], "constructor arguments"),
        "factory returns non-module": ([f"{d}/notamodule.py"], "int"),
        "unknown --model": ([f"{d}/notamodule.py", "--model", "nope"], "nope"),
        "build_model raises": ([f"{d}/factoryraises.py"], "cannot build"),
        "forward raises": ([f"{d}/forwardraises.py", "--input-shape", "2,4"], "forward exploded"),
        "shape not integers": ([healthy, "--input-shape", "a,b"], "a,b"),
        "shape not positive": ([healthy, "--input-shape", "0,3"], "0,3"),
        "wrong shape for model": ([healthy, "--input-shape", "4,3"], "--input-shape"),
        "bad dtype": ([healthy, "--input-shape", "4,8", "--input-dtype", "complex7"], "complex7"),
        "bad device": ([healthy, "--device", "bogus"], "bogus"),
        "cuda missing or bad index": ([healthy, "--device", "cuda:99"], "cuda"),
        "output folder missing": ([healthy, "--output", f"{d}/no/such/folder/out.json"], "does not exist"),
        "output is a directory": ([healthy, "--output", f"{d}/folder"], "directory"),
        "bad batch size": ([healthy, "--batch-size", "0"], "batch-size"),
        "save-fixed folder missing": ([healthy, "--save-fixed", f"{d}/no/such/fixed.pt"], "does not exist"),
        "plot extension": ([healthy, "--plot", f"{d}/figure.bmp"], ".png"),
        "checkpoint without --arch": ([f"{d}/weights.pt"], "--arch"),
        "bad fail-on": ([healthy, "--fail-on", "sometimes"], "fail-on"),
        "bad format": ([healthy, "--format", "xml"], "format"),
        "unknown module:attr": (["initdoctor_no_such_pkg.models:build"], "initdoctor_no_such_pkg"),
    }


def test_error_paths_exit_2_with_one_line(tmp_path, tiny, files, capsys):
    cases = _error_cases(tmp_path, tiny, files["healthy"])
    failures = []
    for label, (argv, needle) in cases.items():
        code = run(["check", *argv])
        err = capsys.readouterr().err
        lines = err.splitlines()
        if code != 2 or len(lines) != 1 or "Traceback" in err or needle.lower() not in err.lower() \
                or not lines[0].startswith("initdoctor: "):
            failures.append((label, code, err))
    assert failures == []


def test_error_paths_with_debug_show_a_traceback(tmp_path, tiny, files, capsys):
    cases = _error_cases(tmp_path, tiny, files["healthy"])
    argparse_errors = {"bad fail-on", "bad format", "bad batch size"}
    for label, (argv, _) in cases.items():
        if label in argparse_errors:
            continue
        assert run(["check", *argv, "--debug"]) == 2, label
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err, label
        assert err.rstrip().splitlines()[-1].startswith("initdoctor: "), label


def test_several_models_message_lists_candidates(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "several.py", ERROR_FILES["several.py"])
    assert run(["check", path]) == 2
    err = capsys.readouterr().err
    assert "a" in err and "b" in err and "--model" in err
    assert run(["check", path, "--model", "c"]) == 2
    err = capsys.readouterr().err
    assert "candidates" in err and "a, b" in err


def test_bad_input_dtype_without_shape_exits_2(files, capsys):
    assert run(["check", files["healthy"], "--input-dtype", "complex7"]) == 2
    assert "complex7" in capsys.readouterr().err


def test_input_dtype_long_with_shape(tmp_path, tiny, capsys):
    path = tiny.write(tmp_path, "emb.py", """
        import torch
        from torch import nn

        def build_model():
            torch.manual_seed(0)
            return nn.Sequential(nn.Embedding(20, 8), nn.Flatten(), nn.Linear(40, 4))
    """)
    assert run(["check", path, "--input-shape", "16,5", "--input-dtype", "long", "--format", "json"]) == 0
    d = _json(capsys.readouterr().out)
    assert d["input"] == {"shape": [16, 5], "dtype": "int64", "inferred": False}


# --- a few real subprocess runs ----------------------------------------------------------------------------


def _exe() -> str:
    exe = Path(sys.executable).with_name("initdoctor")
    return str(exe) if exe.exists() else "initdoctor"


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    return subprocess.run([_exe(), *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=120)


def test_subprocess_version(tmp_path):
    p = _subprocess(["--version"], tmp_path)
    assert p.returncode == 0 and p.stdout.strip() == f"initdoctor {initdoctor.__version__}"


def test_subprocess_json_and_exit_code(files, tmp_path):
    p = _subprocess(["check", files["error"], "--format", "json"], tmp_path)
    assert p.returncode == 1, p.stderr
    d = _json(p.stdout)
    assert "ID103" in {f["code"] for f in d["findings"]}


def test_subprocess_error_is_one_line(tmp_path):
    p = _subprocess(["check", "missing.py"], tmp_path)
    assert p.returncode == 2
    assert p.stdout == ""
    assert len(p.stderr.splitlines()) == 1 and "Traceback" not in p.stderr
