"""Model cards (hf_lotion.cards): Hub metadata, the body a reader sees, plots, and atomic writes."""

from __future__ import annotations

import logging
import re
import struct
import sys

import jinja2
import pytest
import torch
import yaml
from conftest import build_tiny_model
from huggingface_hub import ModelCard, ModelCardData, metadata_eval_result

import hf_lotion
from hf_lotion import LotionConfig
from hf_lotion.cards import CardFacts, build_card, plots, save_card
from hf_lotion.cards import card as card_module
from hf_lotion.quant.grid import dequantize

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FP, RTN, THIS = 2.0, 2.4, 2.1  # share recovered: (2.4 - 2.1) / (2.4 - 2.0) = 75.0%

LOG_HISTORY = [
    *(
        {"loss": 4.0 - 0.05 * step, "grad_norm": 1.0, "learning_rate": 1e-3, "step": step}
        for step in range(1, 41)
    ),
    *(
        {"eval_loss": 2.5 - 0.01 * step, "eval_latent_loss": 2.4 - 0.01 * step, "step": step}
        for step in (20, 40)
    ),
    {"loss": float("nan"), "step": 41},  # not finite: left out of the curve
    {"train_runtime": 12.0, "train_loss": 3.0, "step": 40},  # the run's mean: not a curve
]


def all_facts(**changes) -> CardFacts:
    facts = dict(
        base_model="HuggingFaceTB/SmolLM2-135M",
        datasets=["HuggingFaceFW/fineweb-edu"],
        license="apache-2.0",
        language=["en"],
        training={
            "steps": 1000,
            "tokens": 65_536_000,
            "learning_rate": 2e-3,
            "data": "fineweb-edu, sample-10BT",
        },
        results={
            "full_precision": FP,
            "rtn": RTN,
            "this_model": THIS,
            "metric": "eval loss",
            "dataset": "HuggingFaceFW/fineweb-edu",
        },
        log_history=LOG_HISTORY,
        repo_id="someone/smol-lotion-4bit",
    )
    return CardFacts(**(facts | changes))


def latent_model(method: str = "lotion", grid: str | None = None, **options):
    model = build_tiny_model("llama")
    hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32, method=method, grid=grid, **options))
    return model.eval()


@pytest.fixture(scope="module")
def packed_model():
    return hf_lotion.convert(latent_model())


def metadata(text: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    assert match, "no YAML block at the top of the card"
    return yaml.safe_load(match.group(1))


def body(text: str) -> str:
    return text.split("\n---\n", 1)[1]


def assert_reads_cleanly(text: str) -> None:
    """No placeholder, missing value, empty table, empty list item or empty section."""
    for pattern in (
        r"\bNone\b",
        r"\bnull\b",
        r"\bnan\b",
        r"\binf\b",
        r"\{\{",
        r"\}\}",
        r"\{%",
        r"%\}",
        r"\{#",
    ):
        found = re.search(pattern, text, re.IGNORECASE)
        assert found is None, (
            f"{pattern!r} in the card: ...{text[max(0, found.start() - 80) : found.end() + 80]}..."
        )
    lines = body(text).splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^\| *-", line):  # a table's separator row: a row must follow
            assert i + 1 < len(lines) and lines[i + 1].startswith("|"), (
                f"empty table at line {i}: {lines[i - 1]}"
            )
        if line.startswith("|"):  # a table stands apart from the paragraphs around it
            assert i + 1 >= len(lines) or lines[i + 1].strip() == "" or lines[i + 1].startswith("|"), line
            assert lines[i - 1].strip() == "" or lines[i - 1].startswith("|"), f"{lines[i - 1]}\n{line}"
        assert not re.match(r"^- \*\*[^*]+\*\*: *$", line), f"empty list item: {line}"
        if line.startswith("#"):
            following = next((x for x in lines[i + 1 :] if x.strip()), "")
            assert following and not (
                following.startswith("#") and following.count("#") <= line.count("#")
            ), f"empty section: {line}"
    assert "\n\n\n" not in text


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# -- metadata ---------------------------------------------------------------------------------------------------


def test_metadata_keys_and_values(packed_model):
    card = build_card(packed_model, all_facts())
    meta = metadata(str(card))
    assert meta["library_name"] == "transformers"
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    assert meta["base_model_relation"] == "quantized"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["license"] == "apache-2.0"
    assert meta["datasets"] == ["HuggingFaceFW/fineweb-edu"]
    assert meta["language"] == ["en"]
    assert meta["tags"] == ["hf-lotion", "lotion", "qat", "4-bit", "quantized"]
    # The text round-trips through huggingface_hub's own parser unchanged.
    reloaded = ModelCard(str(card))
    assert reloaded.data.to_dict() == card.data.to_dict() == ModelCardData(**meta).to_dict()
    assert str(reloaded) == str(card)


@pytest.mark.parametrize(
    "method,options,tags",
    [
        ("stableqat", {}, ["hf-lotion", "stableqat", "qat", "4-bit", "quantized"]),
        ("full_precision", {}, ["hf-lotion", "rtn", "4-bit", "quantized"]),
    ],
)
def test_tags_name_the_method(method, options, tags):
    model = hf_lotion.convert(latent_model(method, **options))
    assert metadata(str(build_card(model)))["tags"] == tags


def test_base_model_relation_only_with_a_hub_base_model(packed_model, tmp_path):
    without = metadata(str(build_card(packed_model, all_facts(base_model=None))))
    assert "base_model" not in without and "base_model_relation" not in without

    # A local folder (or a bare name) is named in the text, not claimed as a Hub model in the metadata.
    local = str(tmp_path)
    card = str(build_card(packed_model, all_facts(base_model=local)))
    assert "base_model" not in metadata(card) and "base_model_relation" not in metadata(card)
    assert f"`{local}`" in body(card)
    assert "base_model" not in metadata(str(build_card(packed_model, all_facts(base_model="my-local-model"))))


def test_model_index_has_the_structure_the_hub_expects(packed_model, tmp_path):
    save_card(packed_model, tmp_path, all_facts())
    meta = metadata((tmp_path / "README.md").read_text())
    # The Hub's model-index format (hub-docs modelcard.md): task, dataset (name, type), metrics (type, value).
    assert meta["model-index"] == [
        {
            "name": "smol-lotion-4bit",
            "results": [
                {
                    "task": {"type": "text-generation"},
                    "dataset": {"name": "HuggingFaceFW/fineweb-edu", "type": "HuggingFaceFW/fineweb-edu"},
                    "metrics": [{"type": "loss", "value": THIS, "name": "eval loss"}],
                }
            ],
        }
    ]
    # huggingface_hub's own builder gives the same entry (plus its `verified: false`).
    built = metadata_eval_result(
        model_pretty_name="smol-lotion-4bit",
        task_pretty_name=None,
        task_id="text-generation",
        metrics_pretty_name="eval loss",
        metrics_id="loss",
        metrics_value=THIS,
        dataset_pretty_name="HuggingFaceFW/fineweb-edu",
        dataset_id="HuggingFaceFW/fineweb-edu",
    )["model-index"]
    built[0]["results"][0]["metrics"][0].pop("verified")
    assert meta["model-index"] == built
    # ModelCard.load parses it back into one EvalResult.
    loaded = ModelCard.load(tmp_path / "README.md")
    (result,) = loaded.data.eval_results
    assert loaded.data.model_name == "smol-lotion-4bit"
    assert (result.task_type, result.dataset_type, result.metric_type) == (
        "text-generation",
        "HuggingFaceFW/fineweb-edu",
        "loss",
    )
    assert result.metric_value == pytest.approx(THIS)


def test_model_index_needs_this_models_result_and_a_dataset(packed_model):
    no_dataset = all_facts(datasets=[], results={"full_precision": FP, "rtn": RTN, "this_model": THIS})
    assert "model-index" not in metadata(str(build_card(packed_model, no_dataset)))
    no_result = all_facts(results={"full_precision": FP, "rtn": RTN, "dataset": "d"})
    assert "model-index" not in metadata(str(build_card(packed_model, no_result)))
    # A dataset described in words keeps its words as the name and gets an identifier as its type.
    words = all_facts(results={"this_model": THIS, "dataset": "Held-out blocks, 128 bytes"})
    (entry,) = metadata(str(build_card(packed_model, words)))["model-index"][0]["results"]
    assert entry["dataset"] == {"name": "Held-out blocks, 128 bytes", "type": "held-out-blocks-128-bytes"}


# -- body --------------------------------------------------------------------------------------------------------


def test_results_table_and_share_recovered(packed_model):
    text = str(build_card(packed_model, all_facts()))
    assert "| model | eval loss | vs full precision |" in text
    assert "| full precision (before quantization) | 2.000 |  |" in text
    assert "| round-to-nearest 4-bit (RTN) | 2.400 | +0.400 |" in text
    assert "| this model (LOTION 4-bit) | 2.100 | +0.100 |" in text
    assert "recovers **75.0%** of RTN's degradation" in text
    assert "Eval loss on HuggingFaceFW/fineweb-edu; lower is better." in text


def test_results_without_a_degradation_or_a_reference(packed_model):
    # RTN no worse than full precision: no share (it would divide by zero or flip sign), a sentence instead.
    text = str(
        build_card(packed_model, all_facts(results={"full_precision": 2.0, "rtn": 2.0, "this_model": 1.9}))
    )
    assert "recovers" not in text and "RTN lost nothing against full precision" in text
    # No full-precision number: no "vs full precision" column and no share.
    text = str(build_card(packed_model, all_facts(results={"rtn": RTN, "this_model": THIS})))
    assert "| model | eval loss |\n| --- | ---: |" in text and "vs full precision" not in text
    assert "| this model (LOTION 4-bit) | 2.100 |\n" in text and "recovers" not in text
    # Text from the caller stays inside its table cell.
    text = str(
        build_card(packed_model, all_facts(results={"rtn": RTN, "this_model": THIS, "metric": "loss | nats"}))
    )
    assert "| model | loss \\| nats |\n" in text
    # Only this model's number: a sentence, not a one-row table.
    text = str(build_card(packed_model, all_facts(results={"this_model": THIS, "metric": "eval loss"})))
    assert "## Results\n\nThis model (LOTION 4-bit): eval loss 2.100 (lower is better).\n" in text
    assert "| model |" not in text


def test_loading_snippet_and_vllm_limits(packed_model):
    text = str(build_card(packed_model, all_facts()))
    assert "pip install hf-lotion" in text
    snippet = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert snippet.index("import hf_lotion") < snippet.index("from_pretrained")
    assert 'AutoModelForCausalLM.from_pretrained("someone/smol-lotion-4bit")' in snippet
    assert 'hf_lotion.export_compressed_tensors(model, "model-ct")' in text
    assert "vLLM serves this export" in text  # 4-bit, group 32
    two_bit = build_tiny_model("llama")
    hf_lotion.prepare(two_bit, LotionConfig(bits=2, group_size=16, method="ste"))
    text = str(build_card(hf_lotion.convert(two_bit.eval())))
    assert "vLLM will not serve this export" in text and "this model is 2-bit with group size 16" in text
    assert 'from_pretrained("path/to/this/model")  # this folder, or its Hub id' in text


def test_quantization_details_and_module_shares(packed_model):
    text = str(build_card(packed_model))
    assert "- **method**: [LOTION](https://arxiv.org/abs/2510.08757)" in text
    assert "- **weights**: 4-bit signed integers, levels -8 to 7" in text
    assert "- **group size**: 32 " in text
    assert "- **grid**: full range: scale = absmax / 7.5, all 16 levels" in text
    assert "- **scales**: absmax of each group, stored in float32" in text  # lotion has no learned scales
    assert "lambda" not in text  # a packed config does not keep it, and it was not given
    # Parameter shares by hand: tiny Llama, hidden 64, intermediate 96, vocab 96, 2 layers, untied head.
    # q and o project 64 -> 64, k and v 64 -> 32 (2 key-value heads of 16), gate and up 64 -> 96, down 96 -> 64.
    quantized = 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96)
    head = embeddings = 96 * 64
    norms = 2 * 2 * 64 + 64
    total = quantized + head + embeddings + norms
    assert (
        "| linear layers, 4-bit | `self_attn.q_proj`, `self_attn.k_proj`, `self_attn.v_proj`, `self_attn.o_proj`, "
        "`mlp.gate_proj`, `mlp.up_proj` and `mlp.down_proj` in each of the 2 `model.layers` | "
        f"{quantized:,} | {100 * quantized / total:.1f}% |"
    ) in text
    assert (
        f"| linear layers kept in full precision | `lm_head` | {head:,} | {100 * head / total:.1f}% |" in text
    )
    assert f"| embeddings (full precision) | `model.embed_tokens` | {embeddings:,} |" in text

    # Packed size vs bf16, by hand from the state dict.
    stored = sum(t.numel() * t.element_size() for t in packed_model.state_dict().values())
    assert (
        f"| whole model | {card_module._bytes(stored)} | {card_module._bytes(2 * total)} | {stored / (2 * total):.2f}x |"
        in text
    )


def test_method_options_when_known():
    text = str(build_card(latent_model("stableqat", stableqat_amplitudes=[0.15, 0.05])))
    assert "- **StableQAT surrogate amplitudes**: 0.15, 0.05" in text
    assert "- **scales**: learned during training (LSQ)" in text
    model = hf_lotion.convert(latent_model("lotion", lotion_lambda=4.0))
    assert "lambda" not in str(build_card(model))
    options = {"lotion_lambda": 4.0, "curvature": "fisher", "curvature_beta": 0.99, "curvature_every": 4}
    text = str(build_card(model, CardFacts(method_options=options)))
    assert "- **LOTION lambda (penalty strength)**: 4" in text
    assert "- **curvature estimate**: per-token empirical Fisher of each layer" in text


def test_latent_model_card_says_it_is_not_packed(tmp_path):
    model = latent_model()
    text = str(build_card(model, all_facts()))
    assert (
        "**Not packed yet.**" in text and "hf_lotion.convert(model)  # pack the latent weights first" in text
    )
    assert "| | after `hf_lotion.convert` | bf16 | ratio |" in text
    assert not any(isinstance(m, hf_lotion.PackedLinear) for m in model.modules())  # the card changed nothing
    packed_text = str(build_card(hf_lotion.convert(latent_model()), all_facts()))
    assert "Not packed" not in packed_text and "| | this checkpoint | bf16 | ratio |" in packed_text
    # The latent card plots the latent weights' distance to the grid.
    save_card(model, tmp_path, all_facts())
    assert (
        "Distance of each latent weight to the grid point it rounds to"
        in (tmp_path / "README.md").read_text()
    )


def test_plain_model_is_refused():
    with pytest.raises(ValueError, match="quantized with hf_lotion"):
        build_card(build_tiny_model("llama"))


SOME = CardFacts(license="mit", results={"this_model": 2.5}, training={"steps": 10})
JUNK = CardFacts(
    base_model="",
    datasets=["", "  "],
    license=None,
    language=[""],
    training={"steps": None, "tokens": float("nan"), "learning_rate": float("inf"), "data": "", "extra": []},
    results={
        "full_precision": None,
        "rtn": float("nan"),
        "this_model": None,
        "metric": None,
        "dataset": None,
    },
    log_history=[{"loss": float("nan"), "step": 1}, {"eval_loss": None, "step": 2}, {"step": None}],
    repo_id="",
    method_options={"lotion_lambda": None},
)


@pytest.mark.parametrize(
    "facts", [None, CardFacts(), SOME, JUNK, all_facts()], ids=["none", "empty", "some", "junk", "all"]
)
@pytest.mark.parametrize("kind", ["packed", "latent"])
def test_missing_facts_are_left_out_cleanly(facts, kind, packed_model, tmp_path):
    model = packed_model if kind == "packed" else latent_model()
    card = build_card(model, facts)
    assert_reads_cleanly(str(card))
    save_card(model, tmp_path, facts)
    assert_reads_cleanly((tmp_path / "README.md").read_text())
    if facts in (None, JUNK):
        text = str(card)
        for section in ("## Training", "## Results", "model-index", "base_model", "license", "datasets"):
            assert section not in text
    if facts is SOME:
        assert "## Training\n\n- **optimizer steps**: 10\n\n## Results" in str(card)


def test_every_template_variable_is_defined(packed_model):
    """`from_template` renders undefined variables as empty text: render strictly to catch a misspelt one."""
    for model, facts in ((packed_model, all_facts()), (latent_model(), None)):
        data, context = card_module._context(model, facts or CardFacts(), {})
        template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            card_module.TEMPLATE_PATH.read_text()
        )
        template.render({**data.to_dict(), **context, "card_data": data.to_yaml()})


# -- plots and files ---------------------------------------------------------------------------------------------


def test_save_card_writes_pngs_and_links_them(packed_model, tmp_path):
    written = save_card(packed_model, tmp_path, all_facts())
    assert written == [
        tmp_path / "plots" / "loss.png",
        tmp_path / "plots" / "weights.png",
        tmp_path / "README.md",
    ]
    for path in written[:2]:
        assert png_size(path) == (840, 480) and path.stat().st_size > 5_000
    text = (tmp_path / "README.md").read_text()
    assert "![Training and eval loss](plots/loss.png)" in text
    assert "![Where the weights sit on the grid](plots/weights.png)" in text
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["README.md", "loss.png", "plots", "weights.png"]
    assert "plots/" not in str(build_card(packed_model, all_facts()))  # build_card alone draws nothing

    # Saved again without a log history: no loss curve, in the card or left over in the folder.
    save_card(packed_model, tmp_path, all_facts(log_history=None))
    assert not (tmp_path / "plots" / "loss.png").exists() and (tmp_path / "plots" / "weights.png").exists()
    assert "loss.png" not in (tmp_path / "README.md").read_text()


def test_save_card_is_atomic(packed_model, tmp_path, monkeypatch):
    save_card(packed_model, tmp_path, all_facts())
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def broken(counts, path):  # fails halfway through writing the file it was given
        with open(path, "wb") as f:
            f.write(PNG_SIGNATURE)
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_levels", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        save_card(packed_model, tmp_path, all_facts(license="mit"))
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    # No temporary file left; the card and the weights plot are the earlier ones, whole. (The loss plot drawn
    # before the failure was replaced in one rename, so it is a whole PNG.)
    assert sorted(after) == sorted(before)
    assert after[tmp_path / "README.md"] == before[tmp_path / "README.md"]
    assert after[tmp_path / "plots" / "weights.png"] == before[tmp_path / "plots" / "weights.png"]
    assert png_size(tmp_path / "plots" / "loss.png") == (840, 480)


def test_without_matplotlib_the_card_has_no_plots(packed_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    caplog.set_level(logging.WARNING, logger="hf_lotion.cards.card")
    assert save_card(packed_model, tmp_path, all_facts()) == [tmp_path / "README.md"]
    assert [r.getMessage() for r in caplog.records if r.name == "hf_lotion.cards.card"] == [
        'matplotlib is not installed: the model card is written without plots (pip install "hf-lotion[cards]" '
        "to get them)."
    ]
    text = (tmp_path / "README.md").read_text()
    assert "## Plots" not in text and ".png" not in text
    assert_reads_cleanly(text)
    assert not (tmp_path / "plots").exists()


def test_loss_series_keeps_finite_losses_only():
    series = plots.loss_series(LOG_HISTORY)
    assert set(series) == {"loss", "eval_loss", "eval_latent_loss"}
    assert len(series["loss"]) == 40 and series["loss"][0] == pytest.approx((1.0, 3.95))
    assert [step for step, _ in series["eval_loss"]] == [20.0, 40.0]
    assert [value for _, value in series["eval_loss"]] == pytest.approx([2.3, 2.1])
    assert plots.loss_series(None) == {} and plots.loss_series([{"train_loss": 1.0, "step": 3}]) == {}


def test_weight_statistics(packed_model):
    counts = plots.level_counts(packed_model)
    (entry,) = counts.values()
    layers = [m for m in packed_model.modules() if isinstance(m, hf_lotion.PackedLinear)]
    assert entry.bits == 4 and entry.layers == len(layers) == 14
    assert entry.total == sum(m.in_features * m.out_features for m in layers)
    q = torch.cat([m.int_weight().flatten() for m in layers])
    assert entry.share(0) == pytest.approx((q == 0).double().mean().item())
    assert entry.end_share == pytest.approx(((q == -8) | (q == 7)).double().mean().item())

    # Latent weights exactly on grid points are at distance 0 (learned scales: they stay as they are while
    # the weights move).
    model = latent_model("ste", learned_scales=True)
    layers = [layer for _, layer in hf_lotion.lotion_layers(model)]
    with torch.no_grad():
        for layer in layers:
            q, scales = layer.quantize_weight()
            layer.weight.copy_(dequantize(q, scales, 32, torch.float32))
    histogram = plots.grid_distance_histogram(model)
    assert histogram.layers == 14 and histogram.beyond == 0
    assert histogram.counts[0] == histogram.total == sum(layer.weight.numel() for layer in layers)
    assert histogram.share_within(0.1) == 1.0
    # Weights spread evenly between grid points fill the bins evenly.
    with torch.no_grad():
        for layer in layers:
            q, scales = layer.quantize_weight()
            offsets = torch.rand(q.shape, generator=torch.Generator().manual_seed(0)) - 0.5
            layer.weight.copy_(dequantize(q.float() + offsets, scales, 32, torch.float32))
    histogram = plots.grid_distance_histogram(model)
    assert histogram.share_within(0.1) == pytest.approx(0.2, abs=0.01)
    # Scales halved: the outer weights are clipped, further than half a step from every level.
    with torch.no_grad():
        for layer in layers:
            layer.weight_scale.mul_(0.5)
    assert plots.grid_distance_histogram(model).beyond > 0

    # Absmax scales fix where each group's largest weight sits: it is left out.
    model = latent_model("lotion")
    histogram = plots.grid_distance_histogram(model)
    layers = [layer for _, layer in hf_lotion.lotion_layers(model)]
    groups = sum(layer.out_features * layer.in_features // 32 for layer in layers)
    assert histogram.pinned == groups and histogram.beyond == 0
    assert histogram.total == sum(layer.weight.numel() for layer in layers) - groups


def test_module_shares_and_sizes_do_not_depend_on_the_in_memory_layout():
    """A packed layer counts its checkpoint bytes once, prepared for a CPU kernel or holding packed words."""
    model = build_tiny_model("llama", dtype=torch.bfloat16)
    model = hf_lotion.prepare(model, LotionConfig(bits=4, group_size=32))
    hf_lotion.convert(model)
    layers = [m for m in model.modules() if isinstance(m, hf_lotion.PackedLinear)]
    assert layers and all(layer.cpu_kernel_ready for layer in layers)
    prepared = card_module._count_parts(model)
    for layer in layers:
        layer.release_cpu_kernel_()
    words = card_module._count_parts(model)
    assert prepared == words
    dense_params = sum(p.numel() for p in build_tiny_model("llama", dtype=torch.bfloat16).parameters())
    assert (
        words.quantized_params + words.other_params + words.embedding_params + words.kept_params
        == dense_params
    )
