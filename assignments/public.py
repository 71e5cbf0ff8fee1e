"""`python -m assignments test aN`: one assignment's public tests, in both editions.

Each assignment's public tests touch only that assignment's pieces and, where they run the whole model, the
pieces of the assignments named in `needs` (a whole LLaMA needs assignment 1's RMSNorm, RoPE, attention,
SwiGLU and KV cache). The graded public tests of `manifest.py` are among them (tests/test_assignments.py
checks it). Other public tests in the same files may also need later assignments (test_model.py's RoPE
scaling test needs a5): run them when those are done.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Public:
    needs: tuple   # earlier assignments whose pieces these tests also run
    tests: tuple   # pytest node ids, relative to the repository root


PUBLIC = {
    "a1": Public((), ("tests/test_model.py::test_logits_equal_hf", "tests/test_model.py::test_sdpa_equals_explicit_softmax",
                      "tests/test_model.py::test_prealloc_cache_writes_in_place",
                      "tests/test_generate.py::test_tiny_top_p_is_greedy")),
    "a2": Public(("a1",), ("tests/test_lora.py::test_output_unchanged_at_init",
                           "tests/test_lora.py::test_a_init_has_peft_bound_and_b_is_zero",
                           "tests/test_lora.py::test_merge_unmerge_exact")),
    "a3": Public(("a1",), ("tests/test_finetune.py::test_accumulated_gradient_equals_big_batch_with_ragged_padding",
                           "tests/test_finetune.py::test_gradscaler_skips_steps_whose_gradients_overflow")),
    "a4": Public((), ("tests/test_quant.py::test_ties_go_to_the_lower_level",
                      "tests/test_quant.py::test_linear4bit_matches_bitsandbytes_linear4bit")),
    "a5": Public(("a1",), ("tests/test_rope_scaling.py::test_logits_equal_hf_beyond_the_window",
                           "tests/test_rope_scaling.py::test_scale_one_equals_unscaled")),
}


def pytest_command(assignment: str) -> list[str]:
    """The pytest command line that runs one assignment's public tests (from the repository root)."""
    if assignment not in PUBLIC:
        raise ValueError(f"assignment {assignment!r} is unknown: expected one of {list(PUBLIC)}.")
    return [sys.executable, "-m", "pytest", "-o", "addopts=", "-q", *PUBLIC[assignment].tests]


def run_public_tests(assignment: str, root) -> int:
    """Run them, saying first what they need; returns pytest's exit status (0: all passed)."""
    cmd = pytest_command(assignment)
    needs = PUBLIC[assignment].needs
    names = ", ".join(t.split("::")[1] for t in PUBLIC[assignment].tests)
    print(f"{assignment}'s public tests ({names}) need "
          f"{' and '.join(needs) + ' done too' if needs else 'nothing else'}.", flush=True)
    return subprocess.run(cmd, cwd=root).returncode
