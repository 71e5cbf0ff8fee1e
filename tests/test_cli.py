"""The command line as a user drives it."""

import re
import subprocess
import sys

import torch

from minillama import create_model, generate, get_preset, load_model, load_tokenizer, save_model
from minillama.cli import main
from minillama.course.paths import tiny_model_dir


def test_doctor_reports_the_environment(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "cuda available" in out and "bitsandbytes" in out
    assert re.search(r"^bf16 autocast \(CPU\)\s+(native|emulated, slow|unknown)", out, re.M), out
    assert re.search(r"^bitsandbytes 4-bit \(CPU\)\s+(fused bf16 kernel|fp32|unknown)", out, re.M), out
    assert re.search(r"^torch.compile\s+(usable on cpu|torch.compile needs a C\+\+ compiler)", out, re.M), out


def test_demo_runs(capsys):
    assert main(["demo", "--device", "cpu", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "demo: OK" in out and "max |diff|" in out


def test_generate_streams_text(tmp_path, spm_path, capsys):
    tok = load_tokenizer(spm_path)
    model = create_model(get_preset("tiny").replace(n_layers=1, vocab_size=tok.vocab_size), seed=0)
    save_model(model, tmp_path / "m", tokenizer=tok)
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "Lily saw", "--max-new-tokens", "5",
                 "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Lily saw") and len(out) > len("Lily saw\n")
    assert main(["generate", "--model", str(tmp_path / "m"), "--prompt", "x", "--temperature", "-1"]) == 2
    assert "temperature=-1.0 is invalid" in capsys.readouterr().err


def test_generate_prints_the_decoded_sequence(capsys):
    """The streamed text is the decoding of all the ids: a new word keeps its space ("Once upon", which
    printing each token's own decoding made "Onceupon")."""
    tiny = tiny_model_dir()
    model, tok = load_model(tiny), load_tokenizer(tiny)
    prompt = tok.encode("Once", bos=True)
    new = generate(model, prompt, 12, eos_id=tok.eos_id)[0]
    assert tok.sp.id_to_piece(new[0]).startswith("\u2581")  # the first new token starts a word
    assert main(["generate", "--model", str(tiny), "--prompt", "Once", "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == tok.decode(prompt + new) + "\n"


def test_generate_bad_inputs_give_one_line_errors(tmp_path, spm_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not exist" in err and len(err.splitlines()) == 1
    model = create_model(get_preset("tiny").replace(n_layers=1, vocab_size=512))
    save_model(model, tmp_path / "m")
    assert main(["generate", "--model", str(tmp_path / "m"), "--tokenizer", str(spm_path), "--prompt", "x"]) == 2
    assert "vocab_size is 512" in capsys.readouterr().err


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "minillama.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "doctor" in out.stdout and "generate" in out.stdout
