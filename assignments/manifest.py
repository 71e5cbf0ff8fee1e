"""The five assignments: their handout folder, notebook, and the graded tests with their points.

A test id is a pytest node id without parameters: "tests/test_x.py::test_name" (public, in the student
edition) or "hidden/test_aN_x.py::test_name" (kept in the instructor edition only). A parametrised test
scores its points only when every parameter passes.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    id: str
    folder: str
    title: str
    notebook: str
    tests: tuple  # ((test id, points), ...)

    @property
    def max_score(self) -> float:
        return float(sum(p for _, p in self.tests))


ASSIGNMENTS = (
    Assignment("a1", "a1_llama", "LLaMA components", "01_llama_from_scratch.ipynb", (
        ("tests/test_model.py::test_logits_equal_hf", 3),
        ("tests/test_model.py::test_sdpa_equals_explicit_softmax", 2),
        ("tests/test_model.py::test_prealloc_cache_writes_in_place", 1),
        ("tests/test_generate.py::test_tiny_top_p_is_greedy", 1),
        ("hidden/test_a1_llama.py::test_rmsnorm_matches_the_formula_in_bf16", 2),
        ("hidden/test_a1_llama.py::test_rope_matches_meta_complex_rotation", 2),
        ("hidden/test_a1_llama.py::test_math_attention_gqa_matches_a_slow_loop", 3),
        ("hidden/test_a1_llama.py::test_swiglu_matches_the_formula", 1),
        ("hidden/test_a1_llama.py::test_kv_cache_update_writes_in_place_at_an_offset", 2),
        ("hidden/test_a1_llama.py::test_top_p_never_draws_outside_the_nucleus", 2),
    )),
    Assignment("a2", "a2_lora", "LoRA", "02_lora.ipynb", (
        ("tests/test_lora.py::test_output_unchanged_at_init", 1),
        ("tests/test_lora.py::test_a_init_has_peft_bound_and_b_is_zero", 1),
        ("tests/test_lora.py::test_merge_unmerge_exact", 2),
        ("hidden/test_a2_lora.py::test_forward_equals_peft_with_trained_weights", 3),
        ("hidden/test_a2_lora.py::test_merge_equals_the_formula_and_unmerge_restores", 2),
        ("hidden/test_a2_lora.py::test_apply_lora_wraps_exactly_the_targets", 2),
    )),
    Assignment("a3", "a3_training", "Training techniques", "04_gradient_accumulation.ipynb", (
        ("tests/test_finetune.py::test_accumulated_gradient_equals_big_batch_with_ragged_padding", 2),
        ("tests/test_finetune.py::test_gradscaler_skips_steps_whose_gradients_overflow", 2),
        ("hidden/test_a3_training.py::test_train_step_equals_a_hand_written_step", 3),
        ("hidden/test_a3_training.py::test_checkpointed_forward_recomputes_and_keeps_gradients", 2),
        ("hidden/test_a3_training.py::test_autocast_step_runs_matmuls_in_bf16", 1),
    )),
    Assignment("a4", "a4_quantization", "Quantisation (NF4)", "06_qlora.ipynb", (
        ("tests/test_quant.py::test_ties_go_to_the_lower_level", 1),
        ("tests/test_quant.py::test_linear4bit_matches_bitsandbytes_linear4bit", 2),
        ("hidden/test_a4_quant.py::test_nf4_bytes_equal_bitsandbytes_on_odd_shapes", 3),
        ("hidden/test_a4_quant.py::test_pack_unpack_match_a_slow_formula", 1),
        ("hidden/test_a4_quant.py::test_linear4bit_forward_and_backward_match_the_formula", 2),
    )),
    Assignment("a5", "a5_long_context", "Long context", "07_longer_context.ipynb", (
        ("tests/test_rope_scaling.py::test_logits_equal_hf_beyond_the_window", 2),
        ("tests/test_rope_scaling.py::test_scale_one_equals_unscaled", 1),
        ("hidden/test_a5_long_context.py::test_inv_freq_equals_transformers", 3),
        ("hidden/test_a5_long_context.py::test_passkey_scoring_counts_per_depth", 2),
    )),
)
BY_ID = {a.id: a for a in ASSIGNMENTS}


def select(only=None) -> tuple:
    """The assignments named in `only` (ids like "a1"), or all of them."""
    if not only:
        return ASSIGNMENTS
    bad = [a for a in only if a not in BY_ID]
    if bad:
        raise ValueError(f"assignment {bad[0]!r} is unknown: expected some of {list(BY_ID)}.")
    return tuple(a for a in ASSIGNMENTS if a.id in only)
