"""`python -m infer`: every mistake a user can make is one line and exit 2, Ctrl-C exit 130,
nothing is deleted or overwritten that the command did not write, and the console carries the
product's own lines. Mostly in-process through `infer.__main__.main` (the entrypoint itself,
handler included); through a real process where the process's own behaviour is the point."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from infer.__main__ import main

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    """Copies of the tiny model: weights cut in half, random bytes for weights, a config of other sizes."""
    root = tmp_path_factory.mktemp("broken")
    out = {}
    for name in ("truncated", "random", "mismatched"):
        shutil.copytree(tiny_model_dir, root / name)
        out[name] = root / name
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    (out["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (out["random"] / "model.safetensors").write_bytes(os.urandom(100_000))
    config = json.loads((tiny_model_dir / "config.json").read_text())
    (out["mismatched"] / "config.json").write_text(json.dumps({**config, "hidden_size": 96}))
    return out


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    row = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}
    path.write_text(json.dumps(row) + "\n")
    return path


MISTAKES = {
    "missing model": (["generate", "{tmp}/nope", "hi"], "does not exist"),
    "truncated safetensors": (["generate", "{truncated}", "hi"], "damaged or not a safetensors file"),
    "random-bytes safetensors": (["generate", "{random}", "hi"], "damaged or not a safetensors file"),
    "config not matching weights": (["generate", "{mismatched}", "hi"], "do not have the sizes its config.json"),
    "unknown device": (["generate", "{tiny}", "hi", "--device", "tpu"], "unknown device 'tpu'"),
    "invalid regex": (["eval", "{tiny}", "--data", "{data}", "--metric", "regex", "--regex", "(a"],
                      "not a valid regular expression"),
    "unwritable output": (["eval", "{tiny}", "--data", "{data}", "--output", "/proc/no/such/out.jsonl"], "cannot write"),
    "missing data": (["eval", "{tiny}", "--data", "{tmp}/none.jsonl"], "not found"),
    "bad option value": (["generate", "{tiny}", "hi", "--max-new-tokens", "many"], "invalid int value"),
}


@pytest.mark.parametrize("case", MISTAKES, ids=list(MISTAKES))
def test_a_user_mistake_is_one_line_and_exit_2(case, tiny_model_dir, broken_models, data_file, tmp_path, capsys):
    argv, expected = MISTAKES[case]
    names = {"tmp": tmp_path, "tiny": tiny_model_dir, "data": data_file, **broken_models}
    try:
        code = main([a.format(**names) for a in argv])
    except SystemExit as exc:  # argparse's own exit, through the one-line parser
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "Traceback" not in "\n".join(err)
    assert expected in err[-1] and "error" in err[-1]


@pytest.mark.parametrize("options, message", [
    (["--port", "70000"], "argument --port: '70000' is not a TCP port (0 to 65535; 0 picks a free one)"),
    (["--idle-spin", "-1"], "--idle-spin must be 0 or a positive number of milliseconds"),
    (["--idle-spin", "20", "--engine", "thread"], "--idle-spin applies to the engine process; drop it or use "
                                                  "--engine process"),
])
def test_serve_with_a_bad_option_is_one_line_and_exit_2(tiny_model_dir, options, message):
    proc = subprocess.run([sys.executable, "-m", "infer", "serve", str(tiny_model_dir), *options],
                          capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"python -m infer serve: error: {message} (see --help)"]


def test_serve_on_a_port_in_use_is_one_line_and_exit_2(tiny_model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "infer", "serve", str(tiny_model_dir), "--port", str(port)],
                              capture_output=True, text=True, cwd=REPO, env=ENV, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use; another process listens there: stop it, "
        "or pass another --port (--port 0 takes a free one)"]


def test_ctrl_c_exits_130_without_traceback(tiny_model_dir):
    """Ctrl-C at the chat prompt, as a user at a terminal sends it: stdin stays open (closing
    it would let the prompt end at end-of-file, exit 0, whichever came first)."""
    # SIGINT at its default in the child: a test run started in the background by a shell
    # without job control inherits SIGINT ignored, and so would the chat.
    proc = subprocess.Popen([sys.executable, "-m", "infer", "chat", str(tiny_model_dir)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ENV,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # "Chat: ..." on stderr: the model is loaded and the prompt waits for the user.
        while not proc.stderr.readline().startswith("Chat:"):
            assert proc.poll() is None, proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdin.close()
    assert proc.returncode == 130, err
    assert "Traceback" not in err


def test_a_bug_still_shows_its_traceback(monkeypatch, tiny_model_dir):
    import infer.__main__ as cli

    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "cmd_generate", broken)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        main(["generate", str(tiny_model_dir), "hi"])


def test_eval_checks_every_model_and_its_output_before_scoring(tiny_model_dir, data_file, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = ["eval", str(tiny_model_dir), "--data", str(data_file), "--max-new-tokens", "2", "--no-loss"]
    assert main([*run, "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "loaded" not in err and "%" not in err  # nothing was scored
    existing = tmp_path / "scores.jsonl"
    existing.write_text("earlier results\n")
    assert main([*run, "--output", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err and existing.read_text() == "earlier results\n"
    assert main([*run, "--output", str(existing), "--overwrite"]) == 0
    # --quant auto on the CPU is q8, and the label names what auto resolved to.
    assert json.loads(existing.read_text().splitlines()[0])["model"] == f"{tiny_model_dir}:q8"
    # Without --output: eval-results.jsonl, then a fresh name rather than over the first.
    assert main(run) == 0 and main(run) == 0
    assert sorted(p.name for p in tmp_path.glob("eval-results*")) == ["eval-results-2.jsonl", "eval-results.jsonl"]
    assert not list(tmp_path.glob(".*.tmp"))


def test_quantize_overwrite_never_deletes_what_it_did_not_write(tiny_model_dir, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(tiny_model_dir, source)
    run_dir = tmp_path / "runs" / "demo"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "manifest.json").write_text("{}")
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"meow")
    for out in (source, tmp_path, run_dir, unrelated, source / "config.json"):
        assert main(["quantize", str(source), "--quant", "int8", "--out", str(out), "--overwrite"]) == 2
        assert "error" in capsys.readouterr().err
    assert (source / "model.safetensors").is_file() and (run_dir / "checkpoints").is_dir()
    assert (unrelated / "cat.jpg").read_bytes() == b"meow"
    copy = tmp_path / "copy-int8"
    for _ in range(2):  # its own copy: replaced
        assert main(["quantize", str(source), "--quant", "int8", "--out", str(copy), "--overwrite"]) == 0
    assert json.loads((copy / "quantization.json").read_text())["written_by"] == "tunewright quantize"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy-int8", "photos", "runs", "src"]


def test_bench_removes_its_temporary_models_when_terminated(tmp_path, signal_when):
    args = ["bench", "--model", "tiny", "--rows", "baseline", "--batch-sizes", "1", "--prompt-len", "8",
            "--new-tokens", "100000", "--repeats", "1", "--device", "cpu", "--json", str(tmp_path / "bench.json")]
    temp = tmp_path / "tmp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "infer", *args], cwd=REPO, env={**ENV, "TMPDIR": str(temp)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, err = signal_when(proc, lambda: list(temp.glob("tunewright-bench-*")), signal.SIGTERM)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert list(temp.iterdir()) == []


def test_a_terminate_whose_interrupt_is_swallowed_still_ends_the_process():
    """The KeyboardInterrupt a SIGTERM raises can land where Python discards it (a weakref
    callback, `__del__`); here a loop discards it on purpose. The process still ends, with
    143, once the grace period is over, and does not outlive `timeout`-style supervisors."""
    code = (
        "import sys, time\n"
        "from infer.errors import terminate_as_interrupt\n"
        "with terminate_as_interrupt(grace_s=1.0):\n"
        "    while True:\n"
        "        try:\n"
        "            print('ready', flush=True)\n"
        "            time.sleep(0.05)\n"
        "        except KeyboardInterrupt:\n"
        "            print('swallowed', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=ENV, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert "swallowed" in out, out
    assert proc.returncode == 128 + signal.SIGTERM


def test_a_terminate_lost_in_a_weakref_callback_is_raised_again():
    """A SIGTERM whose KeyboardInterrupt lands in a weakref callback (Python prints it as "Exception
    ignored" and goes on) is raised again in the main code: its `finally` runs and the process ends
    as an uncaught Ctrl-C does, long before the grace period's 143."""
    code = (
        "import gc, os, signal, sys, time, weakref\n"
        "from infer.errors import terminate_as_interrupt\n"
        "class Thing: pass\n"
        "def callback(ref):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    for _ in range(100000): pass  # the handler runs here, inside the callback\n"
        "try:\n"
        "    with terminate_as_interrupt(grace_s=20.0):\n"
        "        thing = Thing(); ref = weakref.ref(thing, callback); del thing\n"
        "        print('lost', flush=True)\n"
        "        end = time.time() + 15\n"
        "        while time.time() < end: time.sleep(0.01)\n"
        "        print('not raised again', flush=True)\n"
        "finally:\n"
        "    print('finally', flush=True)\n"
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert "lost" in proc.stdout and "Exception ignored" in proc.stderr, (proc.stdout, proc.stderr)
    assert "not raised again" not in proc.stdout and "finally" in proc.stdout, proc.stdout
    # the interrupt raised again ends the program as an uncaught Ctrl-C does
    assert proc.returncode == -signal.SIGINT and proc.stderr.rstrip().endswith("KeyboardInterrupt"), proc.stderr
    assert time.time() - start < 12


def test_the_console_shows_the_products_lines(tiny_model_dir):
    """Progress bars and known-harmless library warnings only with --verbose."""
    def stderr(*extra):
        cmd = [sys.executable, "-m", "infer", "generate", str(tiny_model_dir), "hi", "--max-new-tokens", "2", *extra]
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=ENV, timeout=180).stderr

    quiet = stderr("--quant", "nf4")  # nf4 runs through transformers' forward: its FutureWarning
    assert "Loading weights" not in quiet and "Warning" not in quiet
    assert "loaded " in quiet and "tokens/s]" in quiet
    assert "Loading weights" in stderr("--verbose")
