"""The decode benchmark (python -m inference.decode_benchmark) on CPU with tiny contexts: its JSON and PNG,
cache bytes measured from the tensors, the budget column, real cached decoding, error rows and its CUDA branch."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402 - after choosing the Agg backend
import pytest
import torch

from arms import registry
from arms.arm import Arm
from config.settings import BASELINE, ExperimentConfig, cpu_preset
from exp6_baseline_attention_model import MultiHeadAttention
from exp6_flash_attention_model import FlashAttentionModel
from inference import decode_benchmark
from inference.transformers_mla import TRANSFORMERS_MODE
from models import checkpoint
from models.attention import KVCache
from models.transformer import MoELanguageModel
from tests.fake_cuda import FAKE_PEAK_MEMORY_BYTES, CudaOnCpu, install_fake_cuda

CONTEXTS = (8, 24)  # 24 is past the tiny runs' warm-up context; both below the CPU preset's max_seq_len
BATCHES = (1, 2)
NEW_TOKENS = 3
GIB = 2**30


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Two OpenMP threads on a small shared VM make step times erratic and slow; one is steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run(output: Path, *extra: str, contexts: tuple[int, ...] = CONTEXTS, batches: tuple[int, ...] = BATCHES,
         new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    return decode_benchmark.run_benchmark([
        "--device", "cpu", "--small", "--contexts", *map(str, contexts), "--batch-sizes", *map(str, batches),
        "--new-tokens", str(new_tokens), "--output", str(output), *extra])


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> tuple[dict[str, Any], Path]:
    output = tmp_path_factory.mktemp("decode") / "out" / "decode.json"
    _run(output)
    return json.loads(output.read_text()), output


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("decode_bf16") / "decode.json"
    _run(output, "--precision", "bf16", "--memory-budget-gb", "0.5", contexts=(12,), batches=(2,), new_tokens=2)
    saved: dict[str, Any] = json.loads(output.read_text())
    return saved


def _positive_finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _small_config() -> ExperimentConfig:
    return cpu_preset(ExperimentConfig(vocab_size=decode_benchmark.SMALL_VOCAB_SIZE))


def _cache_modes(arm: str) -> tuple[str, ...]:
    """The caches the arm's attention module declares, its own first."""
    return registry.ARMS[arm].attention(_small_config(), 0).cache_modes


def _labels_of(arm: str) -> list[str]:
    """The rows' attention labels of one arm: its short name (or its name) and each cache its module declares,
    transformers' own module for an attention with a latent cache (MLA), and generate for one with any cache."""
    modes = _cache_modes(arm)
    modes += (TRANSFORMERS_MODE,) if "latent" in modes else ()
    modes += (decode_benchmark.GENERATE_MODE,) if modes else ()
    return [f"{registry.ARMS[arm].short or arm} {mode}" for mode in modes]


# every arm of arms.ARMS, every cache, and MLA through transformers' own DeepseekV3Attention and cache
LABELS = tuple(label for arm in registry.ARMS for label in _labels_of(arm))


def _analytic_values(config: ExperimentConfig) -> dict[str, int]:
    """Values per token per layer of the built-in attentions from the shapes, written out independently of the
    modules (an arm added later is held to its own declaration, row by row)."""
    own = {
        "MHA kv": 2 * config.d_model,
        "MLA expanded": config.n_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim),
        "MLA latent": config.kv_lora_rank + config.qk_rope_head_dim,
        "MLA transformers": config.kv_lora_rank + config.qk_rope_head_dim,  # transformers 5.24 caches the latent too
        "GQA kv": 2 * config.gqa_kv_heads * config.head_dim,
        "MQA kv": 2 * config.head_dim,
    }
    # through generate, each arm decodes with its own default cache (MLA: latent)
    generated = {"MHA generate": own["MHA kv"], "MLA generate": own["MLA latent"], "GQA generate": own["GQA kv"],
                 "MQA generate": own["MQA kv"]}
    return own | generated


# ------------------------------------------------------------------------------------ the --small run

def test_small_run_writes_json_and_png_with_positive_timings(fp32_run: tuple[dict[str, Any], Path]) -> None:
    saved, output = fp32_run
    assert saved["status"] == "completed" and saved["failures"] == []
    assert {(r["attention"], r["context"], r["batch_size"]) for r in saved["rows"]} == {
        (label, c, b) for label in LABELS for c in CONTEXTS for b in BATCHES}
    for row in saved["rows"]:
        assert "error" not in row, row.get("error")
        for key in ("prefill_s", "decode_ms_per_token_median", "decode_ms_per_token_min", "decode_s",
                    "decode_tokens_per_s", "prefill_tokens_per_s", "cache_mb"):
            assert _positive_finite(row[key]), (row["name"], key)
        assert len(row["decode_step_ms"]) == NEW_TOKENS and all(map(_positive_finite, row["decode_step_ms"]))
        assert row["decode_tokens_per_s"] == pytest.approx(row["batch_size"] * NEW_TOKENS / row["decode_s"])
        assert row["precision"] == "float32"
        assert row["peak_memory_mb"] is None and row["decode_peak_memory_mb"] is None  # CPU: no CUDA memory stats
        assert row["attention_backend"] and row["moe_dispatch"]
        assert row["sdpa_backends"] == ["FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH"]  # pinned: no cuDNN
    assert saved["config"]["preset"] == "cpu" and saved["config"]["vocab_size"] == 2048
    for key in ("device_name", "torch_version", "date_utc", "method", "cache_bytes_note"):
        assert saved[key]
    assert "alone" in saved["memory_budget"]["note"] and "excluded" in saved["memory_budget"]["note"]

    png = output.with_suffix(".png")
    assert saved["plot"] == str(png)
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert width >= 1000 and 400 <= height < width  # two panels side by side
    assert image.std() > 0  # something is drawn


def test_transformers_rows_have_the_latent_rows_columns(fp32_run: tuple[dict[str, Any], Path]) -> None:
    """transformers' own DeepseekV3Attention, timed and measured like ours: the same columns, the same cache bytes,
    and the summary's per-step comparison with absorbed decoding (its outputs: tests/test_transformers_mla.py)."""
    saved = fp32_run[0]
    for context in CONTEXTS:
        for batch in BATCHES:
            rows = {r["attention"]: r for r in saved["rows"] if (r["context"], r["batch_size"]) == (context, batch)}
            latent, theirs = rows["MLA latent"], rows["MLA transformers"]
            assert set(theirs) == set(latent)
            assert theirs["cache_bytes_per_token_per_layer"] == latent["cache_bytes_per_token_per_layer"]
            assert theirs["attention_backend"] == [  # under the same SDPA backend choice as our rows
                "transformers DeepseekV3Attention (sdpa[FLASH_ATTENTION|EFFICIENT_ATTENTION|MATH]), "
                "latent cache re-expanded every step"]
            assert theirs["source"].endswith("attention through transformers' DeepseekV3Attention")
            assert any(line.startswith(f"  context {context}, batch {batch}: {latent['decode_ms_per_token_median']:.2f} "
                                       f"vs {theirs['decode_ms_per_token_median']:.2f} ms") for line in saved["summary"])


def test_cli_prints_the_table_and_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str], one_thread: None) -> None:
    code = decode_benchmark.main(["--device", "cpu", "--small", "--contexts", "6", "--batch-sizes", "1",
                                  "--new-tokens", "1", "--output", str(tmp_path / "d.json")])
    out = capsys.readouterr().out
    assert code == 0
    for text in (*LABELS, "Prefill ms", "Decode ms/tok", "Tokens/s", "B/tok/layer", "Analytic B", "Cache MB",
                 "Max batch 24 GiB", "Largest batch whose KV cache fits 24 GiB",
                 "MLA's latent cache holds 320 B per token per layer, 3.2x fewer bytes than MHA's 1024 B",
                 "transformers' DeepseekV3Attention caches the same latent and rotary key (320 B)",
                 "context 6, batch 1: ",
                 "MLA generate: the arm's own cache through transformers' generate, median decode step ",
                 "Measured cache bytes equal the analytic counts"):
        assert text in out, text


# ------------------------------------------------------------------------------- measured cache bytes

def _bytes_by_label(rows: list[dict[str, Any]]) -> dict[str, float]:
    sizes: dict[str, set[float]] = {}
    for row in rows:
        sizes.setdefault(row["attention"], set()).add(row["cache_bytes_per_token_per_layer"])
    assert all(len(s) == 1 for s in sizes.values()), sizes  # the same at every context and batch
    return {label: s.pop() for label, s in sizes.items()}


@pytest.mark.parametrize("precision, bytes_per_value", [("fp32", 4), ("bf16", 2)])
def test_measured_bytes_order_and_equal_the_analytic_ones(fp32_run: tuple[dict[str, Any], Path],
                                                          bf16_run: dict[str, Any], precision: str,
                                                          bytes_per_value: int) -> None:
    saved = fp32_run[0] if precision == "fp32" else bf16_run
    assert saved["status"] == "completed", saved["failures"]
    measured = _bytes_by_label(saved["rows"])
    assert measured["MLA latent"] < measured["MHA kv"] < measured["MLA expanded"]
    assert measured["MQA kv"] < measured["GQA kv"] < measured["MHA kv"]
    assert set(measured) == set(LABELS)
    expected = {label: values * bytes_per_value for label, values in _analytic_values(_small_config()).items()
                if label in measured}
    assert {label: measured[label] for label in expected} == expected
    for row in saved["rows"]:
        assert row["cache_layers_agree"] and len(set(row["cache_bytes_per_token_by_layer"])) == 1
        assert row["analytic_bytes_per_token_per_layer"] == row["cache_bytes_per_token_per_layer"]
        assert row["measured_equals_analytic"] is True


def test_bf16_cache_tensors_are_bf16(bf16_run: dict[str, Any]) -> None:
    """2 bytes per value because the cached tensors really are bf16 under autocast (not a formula)."""
    rows = {row["attention"]: row for row in bf16_run["rows"]}
    assert set(rows) == set(LABELS) and all(r["precision"] == "bf16 autocast" for r in rows.values())
    config = _small_config()
    assert rows["MLA latent"]["cache_shapes_layer0"] == {
        "latent_rope": [2, 12 + 2, config.kv_lora_rank + config.qk_rope_head_dim]}
    assert rows["MLA transformers"]["cache_shapes_layer0"] == {  # transformers' DynamicCache: latent, rotary key
        "latent": [2, 14, config.kv_lora_rank], "k_rope": [2, 14, config.qk_rope_head_dim]}
    assert rows["MHA kv"]["cache_shapes_layer0"] == {
        "k": [2, 14, config.n_heads, config.head_dim], "v": [2, 14, config.n_heads, config.head_dim]}
    assert rows["GQA kv"]["cache_shapes_layer0"] == {  # only the K/V heads are cached
        "k": [2, 14, config.gqa_kv_heads, config.head_dim], "v": [2, 14, config.gqa_kv_heads, config.head_dim]}
    assert rows["MQA kv"]["cache_shapes_layer0"] == {"k": [2, 14, 1, config.head_dim], "v": [2, 14, 1, config.head_dim]}


@pytest.mark.parametrize("which", ["fp32", "bf16"])
def test_budget_column_is_the_formula_on_the_measured_bytes(fp32_run: tuple[dict[str, Any], Path],
                                                            bf16_run: dict[str, Any], which: str) -> None:
    saved = fp32_run[0] if which == "fp32" else bf16_run
    budget = saved["memory_budget"]
    assert budget["bytes"] == budget["gb"] * GIB == (24 if which == "fp32" else 0.5) * GIB
    for row in saved["rows"]:
        per_token = row["cache_bytes_per_token_per_layer"]
        assert row["n_layers"] == _small_config().n_layers
        assert row["max_batch_in_budget"] == math.floor(budget["bytes"] / (per_token * row["n_layers"] * row["context"]))
        assert saved["max_batch_in_budget"][row["attention"]][str(row["context"])] == row["max_batch_in_budget"]
        tokens = row["context"] + row["new_tokens"]
        assert row["cache_mb"] == pytest.approx(per_token * row["n_layers"] * row["batch_size"] * tokens / 2**20)
    assert decode_benchmark.max_batch_in_budget(24 * GIB, 1024, 3, 32768) == 256  # MHA, bf16, default sizes


# ------------------------------------------------------------------------------- decoding is real

def _sharp_model(config: ExperimentConfig, build: Callable[..., MoELanguageModel]) -> MoELanguageModel:
    """O(1) activations, so greedy picks are decided by clear margins, not by rounding noise."""
    model = build(config.replace(vocab_size=61, dropout=0.0, router_noise_std=0.0), seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                p.normal_(0, p.shape[1] ** -0.5, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.mark.parametrize("arm, mode", [(arm, mode) for arm in registry.ARMS for mode in _cache_modes(arm)])
def test_cached_greedy_decode_equals_recomputing_the_full_prefix(config: ExperimentConfig, arm: str,
                                                                 mode: str) -> None:
    model = _sharp_model(config, registry.ARMS[arm].build)
    context, new_tokens = 12, 8  # 20 tokens in all: past the tiny config's max_seq_len of 16 (RoPE extends)
    prompt = torch.randint(0, 61, (2, context), generator=torch.Generator().manual_seed(1))
    cpu = torch.device("cpu")
    run = decode_benchmark.greedy_decode(model, prompt, new_tokens, mode, cpu, "fp32")

    ids, expected = prompt, []
    with torch.no_grad():
        for _ in range(new_tokens):
            logits, _ = model(ids)  # no cache: the whole prefix recomputed
            assert logits.shape[1] == ids.shape[1]  # the prefill's last-position hook is gone again
            expected.append(logits[:, -1].argmax(dim=-1, keepdim=True))
            ids = torch.cat([ids, expected[-1]], dim=1)
    assert torch.equal(run.tokens, torch.cat(expected, dim=1))
    assert len(set(run.tokens.flatten().tolist())) > 1  # not a degenerate single-token output
    assert all(isinstance(c, KVCache) and c.mode == mode and c.length == context + new_tokens for c in run.caches)
    assert len(run.step_s) == new_tokens and run.prefill_s > 0


@pytest.mark.parametrize("arm", [arm for arm in registry.ARMS if _cache_modes(arm)])
def test_decoding_through_generate_feeds_our_tokens_with_the_arms_own_cache(config: ExperimentConfig, arm: str) -> None:
    """The generate row decodes what our own loop decodes: the same greedy tokens fed back, the same number of timed
    steps, the arm's own cache (its default mode) filled to context + new tokens."""
    model = _sharp_model(config, registry.ARMS[arm].build)
    context, new_tokens = 12, 8
    prompt = torch.randint(0, 61, (2, context), generator=torch.Generator().manual_seed(1))
    cpu, mode = torch.device("cpu"), _cache_modes(arm)[0]
    ours = decode_benchmark.greedy_decode(model, prompt, new_tokens, mode, cpu, "fp32")
    bench = decode_benchmark.with_generate_twins([decode_benchmark.BenchModel(arm, model, "test")])
    assert [b.modes() for b in bench] == [list(decode_benchmark.ordered_modes(model)), ["generate"]]
    assert bench[1].generate is not None and bench[1].generate.lm is model  # the same modules and weights
    run = decode_benchmark.decode_run(bench[1], prompt, new_tokens, "generate", cpu, "fp32")
    assert torch.equal(run.tokens, ours.tokens) and len(run.step_s) == new_tokens and run.prefill_s > 0
    assert all(c.mode == mode and c.length == context + new_tokens for c in run.caches)
    assert [c.bytes_per_token() for c in run.caches] == [c.bytes_per_token() for c in ours.caches]


def test_every_row_decoded_context_plus_new_tokens(fp32_run: tuple[dict[str, Any], Path]) -> None:
    for row in fp32_run[0]["rows"]:
        assert row["cache_lengths_by_layer"] == [row["context"] + NEW_TOKENS] * row["n_layers"]
        first = next(iter(row["cache_shapes_layer0"].values()))
        assert first[:2] == [row["batch_size"], row["context"] + NEW_TOKENS]


def test_prefill_computes_only_the_last_positions_logits(config: ExperimentConfig) -> None:
    model = _sharp_model(config, FlashAttentionModel)
    ids = torch.randint(0, 61, (2, 9))
    with torch.no_grad():
        full, _ = model(ids)
        last, _ = model(ids, last_only=True)
    assert last.shape == (2, 1, 61)
    torch.testing.assert_close(last[:, 0], full[:, -1])


# ------------------------------------------------------------------------------------ failures

def test_a_failing_row_becomes_an_error_row_and_the_rest_still_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   one_thread: None) -> None:
    real = decode_benchmark.greedy_decode

    def out_of_memory_for_expanded(model: MoELanguageModel, prompt: torch.Tensor, new_tokens: int, mode: str,
                                   *args: Any, **kwargs: Any) -> decode_benchmark.DecodeRun:
        if mode == "expanded" and prompt.shape[1] == 16:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(model, prompt, new_tokens, mode, *args, **kwargs)

    monkeypatch.setattr(decode_benchmark, "greedy_decode", out_of_memory_for_expanded)
    output = tmp_path / "d.json"
    code = decode_benchmark.main(["--device", "cpu", "--small", "--contexts", "6", "16", "--batch-sizes", "1",
                                  "--new-tokens", "2", "--output", str(output)])
    assert code == 1
    saved = json.loads(output.read_text())
    assert saved["status"] == "completed with failures"
    assert saved["failures"] == ["MLA expanded ctx 16 batch 1"]
    rows = {r["name"]: r for r in saved["rows"]}
    assert len(rows) == 2 * len(LABELS)
    failed = rows["MLA expanded ctx 16 batch 1"]
    assert failed["error"].startswith("OutOfMemoryError: CUDA out of memory")
    assert failed["attention"] == "MLA expanded" and failed["context"] == 16
    for name, row in rows.items():
        if name != "MLA expanded ctx 16 batch 1":
            assert "error" not in row and _positive_finite(row["decode_tokens_per_s"]), name
    assert "16" not in saved["max_batch_in_budget"]["MLA expanded"]
    assert output.with_suffix(".png").exists()  # the plot is drawn from the rows that ran
    assert "FAILED: OutOfMemoryError" in capsys.readouterr().out


class NoCacheAttention(MultiHeadAttention):
    """A made-up arm's attention with no cached decode path: the baseline's, declaring no cache."""

    cache_modes = ()


def test_an_arm_without_a_cached_decode_path_is_one_line_and_no_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture[str],
                                                                      one_thread: None) -> None:
    """It does not stop the run: no rows of its own, one line saying so, and its entry in the JSON's models."""
    arms = {BASELINE: registry.ARMS[BASELINE], "nocache": Arm("nocache", "MHA, no cache", NoCacheAttention)}
    monkeypatch.setattr(registry, "ARMS", arms)  # the baseline beside it keeps the run short
    monkeypatch.setattr(decode_benchmark, "ARMS", arms)
    output = tmp_path / "d.json"
    code = decode_benchmark.main(["--device", "cpu", "--small", "--contexts", "6", "--batch-sizes", "1",
                                  "--new-tokens", "1", "--output", str(output)])
    notes = [line for line in capsys.readouterr().out.splitlines() if "no cached decode path" in line]
    saved = json.loads(output.read_text())
    assert code == 0 and saved["status"] == "completed" and saved["failures"] == []
    assert notes == ["nocache: no cached decode path; not benchmarked"]
    assert notes[0] in saved["summary"]
    assert {r["arm"] for r in saved["rows"]} == {BASELINE} and all("error" not in r for r in saved["rows"])
    entries: dict[str, dict[str, Any]] = {}
    for entry in saved["models"]:
        entries.setdefault(entry["arm"], entry)  # the arm's own model (its generate twin follows it)
    assert entries["nocache"]["cache_modes"] == [] and "no cached decode path" in entries["nocache"]["note"]
    assert entries[BASELINE]["cache_modes"] == list(_cache_modes(BASELINE)) and "note" not in entries[BASELINE]


def test_the_memory_plan_of_models_without_a_cache_has_no_row_to_hold(config: ExperimentConfig) -> None:
    """--checkpoint with only such models: their weights are planned for, and no row (not a crash on no rows)."""
    model = Arm("nocache", "MHA, no cache", NoCacheAttention).build(config.replace(vocab_size=64))
    need = decode_benchmark.decode_memory([model], [8], [1], 2)
    assert need.device["largest row (prompt, prefill, KV cache)"] == 0 and need.device["weights"] > 0
    assert need.host["step timings"] == 0


def test_the_summary_says_which_way_a_cache_compares_with_mhas() -> None:
    """An MLA latent cache larger than MHA's is reported as more bytes, not as fewer."""
    rows = [{"attention": label, "arm": arm, "cache_mode": mode, "cache_bytes_per_token_per_layer": size,
             "measured_equals_analytic": True, "cache_layers_agree": True}
            for label, arm, mode, size in (("MHA kv", BASELINE, "kv", 512), ("MLA latent", "deepseek", "latent", 1024))]
    lines = decode_benchmark.summary_lines({"rows": rows, "models": []})
    assert lines[0] == ("MLA's latent cache holds 1024 B per token per layer, 2.0x more bytes than MHA's 512 B: "
                        "0.5x the sequences or context in the same memory.")


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    for args in (["--contexts", "0"], ["--new-tokens", "0"], ["--memory-budget-gb", "0"], ["--device", "tpu"]):
        with pytest.raises(SystemExit) as exit_info:
            decode_benchmark.run_benchmark(["--small", "--output", str(tmp_path / "x.json"), *args])
        assert exit_info.value.code == 2, args


# ------------------------------------------------------------------------------------ --checkpoint

def test_checkpoint_models_are_benchmarked(tmp_path: Path, one_thread: None) -> None:
    """A results folder's saved models (one per arm) run with every cache; the saved shapes are used."""
    config = _small_config().replace(n_layers=1)
    results_dir = tmp_path / "results"
    for arm, build in registry.arm_builders().items():
        checkpoint.save_checkpoint(build(config, seed=9), arm, checkpoint.run_checkpoint_dir(results_dir, arm, 9), {})
    output = tmp_path / "d.json"
    code = decode_benchmark.main(["--device", "cpu", "--checkpoint", str(results_dir), "--contexts", "6",
                                  "--batch-sizes", "1", "--new-tokens", "2", "--output", str(output)])
    assert code == 0
    saved = json.loads(output.read_text())
    assert {r["attention"] for r in saved["rows"]} == set(LABELS)
    assert {m["arm"] for m in saved["models"]} == set(registry.ARMS)
    assert all(r["source"].startswith("checkpoint ") and r["n_layers"] == 1 for r in saved["rows"])
    assert saved["shapes"].startswith("checkpoint") and saved["config"]["n_layers"] == 1

    # a second seed of one arm: the rows of the two baseline models are told apart by their folders
    checkpoint.save_checkpoint(registry.ARMS[BASELINE].build(config, seed=10), BASELINE,
                               checkpoint.run_checkpoint_dir(results_dir, BASELINE, 10), {})
    assert decode_benchmark.main(["--device", "cpu", "--checkpoint", str(results_dir), "--contexts", "6",
                                  "--batch-sizes", "1", "--new-tokens", "1", "--output", str(output)]) == 0
    labels = {r["attention"] for r in json.loads(output.read_text())["rows"]}
    assert labels == ({f"{label} [{arm}-seed9]" for arm in registry.ARMS for label in _labels_of(arm)}
                      | {f"{label} [{BASELINE}-seed10]" for label in _labels_of(BASELINE)})


def test_a_missing_checkpoint_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        decode_benchmark.run_benchmark(["--device", "cpu", "--checkpoint", str(tmp_path / "nothing"),
                                        "--output", str(tmp_path / "d.json")])
    assert exit_info.value.code == 2
    assert "--checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ CUDA branch

@pytest.mark.filterwarnings("ignore:.*CUDA is not available.*:UserWarning", "ignore:.*autocast.*:UserWarning")
def test_decode_benchmark_cuda_branches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, one_thread: None) -> None:
    """--device cuda on the CPU (tests/fake_cuda.py): card name, timing syncs, peak memory and its resets,
    memory released between rows, bf16 autocast by default."""
    calls = install_fake_cuda(monkeypatch, "NVIDIA H200", (9, 0))
    output = tmp_path / "d.json"
    new_tokens = 2
    with CudaOnCpu():
        code = decode_benchmark.main(["--device", "cuda", "--small", "--contexts", "6", "--batch-sizes", "2",
                                      "--new-tokens", str(new_tokens), "--output", str(output)])
    assert code == 0
    saved = json.loads(output.read_text())
    assert saved["device"] == "cuda" and saved["device_name"] == "NVIDIA H200 (sm90)"
    assert saved["precision"] == "bf16 autocast"
    rows = saved["rows"]
    assert len(rows) == len(LABELS)  # one row per arm and cache, and per arm through generate
    fake_mb = FAKE_PEAK_MEMORY_BYTES / 2**20
    for row in rows:
        assert "error" not in row, row.get("error")
        assert row["peak_memory_mb"] == row["prefill_peak_memory_mb"] == row["decode_peak_memory_mb"] == fake_mb
        assert row["precision"] == "bf16 autocast" and row["cache_lengths_by_layer"][0] == 6 + new_tokens
    # per row: 2 syncs around the prefill and 2 around each decode step, in the warm-up and the timed run; through
    # generate, 1 before it and 1 at each step's logits (the prefill's and each decode step's)
    own = 2 * (1 + decode_benchmark.WARMUP_TOKENS) + 2 * (1 + new_tokens)
    generated = (2 + decode_benchmark.WARMUP_TOKENS) + (2 + new_tokens)
    assert len(calls.synchronize) >= sum(generated if r["cache_mode"] == "generate" else own for r in rows)
    assert all(device == torch.device("cuda") for device in calls.synchronize)
    assert len(calls.reset_peak) == 2 * len(rows) and len(calls.peak_reads) == 2 * len(rows)  # prefill and decode
    assert calls.empty_cache >= 2 * len(rows)  # before each timed run and after each row
    assert output.with_suffix(".png").exists()


def test_inference_never_imports_training() -> None:
    """Layering: inference/ uses models/ and the top-level model files, never training/."""
    import ast

    for path in Path(decode_benchmark.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(name == "training" or name.startswith("training.") for name in names), (path, names)
