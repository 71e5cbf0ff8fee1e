"""measuring.report: the one style of tables, CSV files and figures (synthetic rows: no model, explicit values)."""

import csv
import itertools

from test_bench import fake_row

from minillama.measuring import bench, compare, report


def test_short_labels_name_what_differs_and_the_title_what_is_shared():
    rows = [fake_row(lora=0, amp="off"), fake_row(lora=16, amp="bf16")]
    shared, labels = report.short_labels(rows)
    assert labels == ["full, fp32", "LoRA r16, bf16 AMP"]
    assert shared == "train, batch 8, seq 128"


def test_every_grid_dimension_has_a_short_word():
    assert set(bench.DIMENSIONS) <= set(report.WORDS), set(bench.DIMENSIONS) - set(report.WORDS)


def test_bench_table_names_rows_by_what_differs_and_says_the_rest_once_above():
    rows = [fake_row(lora=0, amp="off"), fake_row(lora=16, amp="off")]
    above, _, heads, _, *body = bench.format_table(rows, "md").split("\n")
    assert above.startswith("train, batch 8, seq 128, fp32 | device: cpu (test)") and len(above) < 200
    assert [line.split(" | ")[0] for line in body] == ["| full", "| LoRA r16"]
    assert "mode=train" not in bench.format_table(rows, "md")


def test_a_column_that_is_unknown_in_every_row_is_dropped():
    heads = ["row", "peak MiB", "MFU", "note"]
    # MFU unknown everywhere: dropped; a column unknown in one row only, or merely empty, stays
    cells = [["a", "1.00", "unknown", ""], ["b", "2.00", "unknown", "unknown"], ["c", "", "", "ok"]]
    assert report.drop_unknown_columns(heads, cells) == (
        ["row", "peak MiB", "note"], [["a", "1.00", ""], ["b", "2.00", "unknown"], ["c", "", "ok"]])
    cpu = [{**fake_row(), "mfu": None}, {**fake_row(lora=16), "mfu": None}]
    gpu = [{**r, "mfu": 0.25} for r in cpu]
    assert "MFU" not in bench.format_table(cpu, "md") and "| 25.0% |" in bench.format_table(gpu, "md")


def test_compare_table_drops_mfu_on_cpu_and_its_line_above_is_short():
    row = {"name": "lora-qv", "device_name": "cpu (test)", "dtype": "float32", "torch": "t", "preset": "tiny",
           "minillama_tokens_per_s": 100.0, "hf_tokens_per_s": 80.0, "tokens_per_s_ratio": 1.25,
           "minillama_peak_memory_bytes": 3 * 1024**2, "hf_peak_memory_bytes": 4 * 1024**2, "peak_memory_ratio": 0.75,
           "predicted_peak_memory_bytes": 3 * 1024**2, "minillama_mfu": None, "hf_mfu": None, "minillama_loss": 1.0,
           "hf_loss": 1.0, "losses_agree": True, "kernels": True, "compiled": "none"}
    above, _, heads, _, line = compare.format_compare([row], "md", settings=compare.Settings()).split("\n")
    assert "MFU" not in heads and "| lora-qv | 100 | 80 | 1.25 | 3.0 | 4.0 | 0.75 | 3.0 |" in line
    assert "MiB = 1024**2 bytes" in above and len(above) < 300, len(above)


def test_mib_is_1024_squared_bytes():
    assert report.mib(3 * 1024**2 // 2) == "1.50" and report.mib(10**6, 1) == "1.0" and report.mib(None) == ""


def test_csv_has_one_column_per_nested_key(tmp_path):
    rows = [{"name": "a", "memory_by_category": {"parameters": 1, "gradients": 2}, "per_depth": {0.5: 1.0}},
            {"name": "b", "memory_by_category": {"parameters": 3, "gradients": 4}, "per_depth": {0.5: 0.0}}]
    report.write_csv(rows, tmp_path / "r.csv")
    with open(tmp_path / "r.csv") as f:
        got = list(csv.reader(f))
    assert got == [["name", "memory_parameters_bytes", "memory_gradients_bytes", "per_depth_0.5"],
                   ["a", "1", "2", "1.0"], ["b", "3", "4", "0.0"]]


def test_figures_fit_1400_px_and_a_10x_range_gets_a_log_axis(tmp_path):
    from matplotlib.image import imread

    assert report.needs_log_scale([1.0, 10.0]) and not report.needs_log_scale([1.0, 9.9])
    rows = [fake_row(times=(t, t, t), lora=r, amp=a, accum=k, checkpointing=c)
            for t, (r, a, k, c) in zip([0.1 * (1 + i) for i in range(24)],
                                       itertools.product((0, 16), ("off", "fp16", "bf16"), (1, 4), (0, 1)))]
    report.plot_lab(rows, tmp_path / "lab.png")
    report.plot_memory(rows, tmp_path / "memory.png")
    report.plot_bars(rows, "step_time_s", 1000, "step time (ms)", tmp_path / "runtime.png")
    report.plot_scaling({"batch": [fake_row(batch=b) for b in (1, 2, 4)]}, tmp_path / "scaling.png")
    wide = report.new_figure(30, 3)  # asked wider than the limit: capped
    wide.subplots().plot([0, 1])
    report.save_figure(wide, tmp_path / "wide.png")
    for name in ("lab", "memory", "runtime", "scaling", "wide"):
        height, width = imread(tmp_path / f"{name}.png").shape[:2]
        assert width <= 1400 and height <= 1500, (name, width, height)


def test_figures_leave_matplotlibs_backend_alone(tmp_path):
    """The figures are drawn without pyplot: a notebook's inline backend stays in place (they called
    matplotlib.use("Agg"), after which a notebook's plt.show() drew nothing)."""
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")  # any non-Agg backend stands in for a notebook's inline one
    try:
        fig = report.plot_memory([fake_row()], tmp_path / "memory.png")
        report.plot_scaling({"batch": [fake_row(batch=b) for b in (1, 2)]}, tmp_path / "scaling.png")
        assert matplotlib.get_backend() == "svg" and fig.canvas.manager is None  # a Figure pyplot never saw
    finally:
        matplotlib.use(before)
